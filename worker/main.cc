// aviary-worker: trains a stage on this machine (`train`, one process or one rank of an mpirun
// world), measures the group's all-reduce (`allreduce-bench`), or serves a coordinator as part
// of a worker group (`serve`: worker/agent/agent.h).
//
// Under mpirun every failure of a rank ends the whole group (MPI_Abort) with a message naming
// the rank and the cause, so that no rank is left waiting in a collective.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include <torch/version.h>
#include <ATen/Parallel.h>
#include <ATen/Context.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "absl/strings/ascii.h"
#include "common/csv.h"
#include "common/config.h"
#include "common/flags.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/version.h"
#include "worker/comm/communicator.h"
#include "worker/comm/mpi_session.h"
#include "worker/agent/agent.h"
#include "worker/tools/tools.h"
#include "worker/trainer.h"

namespace {

struct CommandUsage {
  const char* name;
  const char* text;
};

// The usage text, written once: `aviary-worker --help` prints every entry, `aviary-worker CMD
// --help` one. mel and predict are the client's commands (their usage: client/usage.cc).
constexpr CommandUsage kCommands[] = {
    {"train",
     "  train --config P.yaml --stage S --fold K --out RUN [--init CKPT] [--no-resume]\n"
     "        [--device auto|cpu|cuda] [--threads N] [--log-level debug|info|warning|error]\n"
     "        [--set key=value ...]\n"
     "        one stage of one fold on this machine; RUN gets history.csv, best.pt, last.pt,\n"
     "        config.yaml and history.png; a RUN holding last.pt is resumed\n"
     "        under `mpirun -np N`, every rank is a replica (data parallel, comm.* settings)\n"},
    {"allreduce-bench",
     "  allreduce-bench [--min-bytes 1024] [--max-bytes 1073741824] [--dtype float32|bf16]\n"
     "        [--device cpu|cuda] [--backend auto|mpi|nccl] [--timeout-s 600]\n"
     "        all-reduce time, algbw and busbw (nccl-tests definitions) per size, under mpirun\n"},
    {"serve",
     "  serve --coordinator HOST:PORT [--token-file F] [--tls-ca F] [--metrics-listen ADDR]\n"
     "        [--metrics-port-file F] [--device auto|cpu|cuda] [--threads N] [--max-tasks N]\n"
     "        [--connect-timeout-s S] [--log-level debug|info|warning|error]\n"
     "        a worker group (under `mpirun -np N`, or one process): leases tasks from the\n"
     "        coordinator and trains them; the token comes from --token-file, else the file in\n"
     "        AVIARY_TOKEN_FILE, else AVIARY_TOKEN; TLS with --tls-ca (or AVIARY_TLS_CA);\n"
     "        /metrics on --metrics-listen (default 0.0.0.0:9471; port 0 picks one; \"\" disables);\n"
     "        --max-tasks N exits 0 after N tasks (0: forever); --connect-timeout-s S exits 1 when\n"
     "        the coordinator cannot be reached for S s (0: retry forever); SIGTERM/SIGINT stop\n"
     "        the task at the next step (reported to the coordinator as preempted: the task is\n"
     "        leased again and resumes from its last checkpoint) and exit 0\n"},
    {"mel", "  mel ...  the implementation of `aviary mel` (usage: aviary mel --help)\n"},
    {"predict", "  predict ...  the implementation of `aviary predict` (usage: aviary predict --help)\n"},
};

constexpr char kUsageHead[] =
    "usage: aviary-worker <command> [args]\n"
    "       aviary-worker <command> --help | aviary-worker --version\n"
    "\n"
    "commands:\n";

std::string Usage() {
  std::string out = kUsageHead;
  for (const CommandUsage& c : kCommands) out += c.text;
  return out;
}

const CommandUsage* FindCommand(const std::string& name) {
  for (const CommandUsage& c : kCommands) {
    if (name == c.name) return &c;
  }
  return nullptr;
}

int PrintVersion() {
  std::cout << "aviary-worker " << aviary::common::Version() << " (git " << aviary::common::GitCommit() << ")\n"
            << "libtorch " << TORCH_VERSION << ", CUDA " << (at::hasCUDA() ? "available" : "not available")
#ifdef AVIARY_WITH_CUDA_TORCH
            << " (built with CUDA; " << at::getNumGPUs() << " GPU(s) visible)"
#else
            << " (this libtorch has no CUDA)"
#endif
#ifdef AVIARY_WITH_NCCL_BACKEND
            << ", NCCL backend built\n";
#else
            << ", NCCL backend not built (comm.backend: mpi)\n";
#endif
  return 0;
}

// The MPI session of this process when it runs as a rank of a multi-process world.
aviary::worker::comm::MpiSession* g_session = nullptr;

int Fail(const std::string& command, const absl::Status& st) {
  if (g_session != nullptr && g_session->world_size() > 1) {
    // The other ranks may be waiting in a collective: end the whole group.
    g_session->Abort(absl::StrCat("aviary-worker ", command, ": ", st.message()), aviary::common::ExitCodeFor(st));
  }
  std::cerr << "aviary-worker " << command << ": " << st.message() << "\n";
  return aviary::common::ExitCodeFor(st);
}

// Torch intra-op threads per rank: the cores shared among the ranks of this host.
int DefaultThreads() {
  int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int local = g_session ? g_session->local_size() : 1;
  return std::max(1, cores / std::max(1, local));
}

// One device per local rank.
c10::Device RankDevice(bool cuda) {
  if (!cuda) return c10::Device(c10::kCPU);
  int local = g_session ? g_session->local_rank() : 0;
  int count = static_cast<int>(at::getNumGPUs());
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(count > 0 ? local % count : 0));
}

int RunTrain(const std::vector<std::string>& args) {
  aviary::common::Flags flags({"config", "stage", "fold", "out", "init", "device", "threads", "log-level"},
                              {"no-resume"});
  if (absl::Status st = flags.Parse(args); !st.ok()) return Fail("train", st);
  if (!flags.positional().empty()) {
    return Fail("train", absl::InvalidArgumentError(absl::StrCat("unexpected argument '", flags.positional()[0], "'")));
  }
  if (auto level = flags.Get("log-level")) {
    aviary::common::LogLevel l;
    if (absl::Status st = aviary::common::ParseLogLevel(*level, &l); !st.ok()) return Fail("train", st);
    aviary::common::SetLogLevel(l);
  }
  auto config_path = flags.Require("config");
  if (!config_path.ok()) return Fail("train", config_path.status());
  auto config = aviary::common::LoadPipelineConfig(*config_path, flags.GetRepeated("set"));
  if (!config.ok()) return Fail("train", config.status());
  aviary::worker::TrainOptions options;
  auto stage = flags.Require("stage");
  if (!stage.ok()) return Fail("train", stage.status());
  options.stage = *stage;
  auto out = flags.Require("out");
  if (!out.ok()) return Fail("train", out.status());
  options.out_dir = *out;
  if (!flags.Has("fold")) return Fail("train", absl::InvalidArgumentError("missing required flag --fold"));
  auto fold = flags.GetInt("fold", 0, 0, 1000000);
  if (!fold.ok()) return Fail("train", fold.status());
  options.fold = static_cast<int>(*fold);
  options.init_checkpoint = flags.Get("init").value_or("");
  options.resume = !flags.GetBool("no-resume");
  const std::string device = flags.Get("device").value_or("auto");
  if (device == "cuda" || (device == "auto" && at::hasCUDA())) {
    options.device = RankDevice(true);
  } else if (device != "cpu" && device != "auto") {
    return Fail("train", absl::InvalidArgumentError(absl::StrCat("--device: expected auto, cpu or cuda, got '", device, "'")));
  }
  auto threads = flags.GetInt("threads", DefaultThreads(), 1, 1024);
  if (!threads.ok()) return Fail("train", threads.status());
  at::set_num_threads(static_cast<int>(*threads));
  options.progress_bar = ::isatty(STDERR_FILENO) != 0 && (g_session == nullptr || g_session->rank() == 0);
  std::unique_ptr<aviary::worker::comm::Communicator> comm;
  if (g_session != nullptr) {  // under mpirun, even -np 1 (the all-reduce path's cost)
    auto c = aviary::worker::comm::CreateCommunicator(config->comm, *g_session, options.device);
    if (!c.ok()) return Fail("train", c.status());
    comm = std::move(*c);
    options.comm = comm.get();
  }
  std::error_code ec;
  std::filesystem::create_directories(options.out_dir, ec);
  if (ec) {
    return Fail("train", absl::InvalidArgumentError(
                             absl::StrCat("--out: cannot create '", options.out_dir, "': ", ec.message())));
  }
  auto trainer = aviary::worker::Trainer::Create(*config, options);
  if (!trainer.ok()) return Fail("train", trainer.status());
  absl::Status st = (*trainer)->Run();
  if (!st.ok()) return Fail("train", st);
  const auto& history = (*trainer)->history();
  if (!history.empty() && (g_session == nullptr || g_session->rank() == 0)) {
    const auto& last = history.back();
    std::cout << "done: " << history.size() << " epochs in " << options.out_dir << "; last epoch val_auc "
              << last.val_auc << ", val_roc_auc " << last.val_roc_auc << ", val_acc " << last.val_acc << "\n";
  }
  return 0;
}

// The first line of `path`, surrounding whitespace removed; an empty token is an error.
absl::StatusOr<std::string> ReadToken(const std::string& path, const std::string& what) {
  auto text = aviary::common::ReadFileToString(path);
  if (!text.ok()) return aviary::common::Annotate(text.status(), what);
  std::string line = text->substr(0, text->find('\n'));
  std::string token(absl::StripAsciiWhitespace(line));
  if (token.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": '", path, "' holds an empty token"));
  return token;
}

// Flag errors are the same on every rank: rank 0 says it, every rank exits with the code.
int ServeFail(const absl::Status& st) {
  if (g_session == nullptr || g_session->rank() == 0) std::cerr << "aviary-worker serve: " << st.message() << "\n";
  return aviary::common::ExitCodeFor(st);
}

int RunServe(const std::vector<std::string>& args) {
  aviary::common::Flags flags({"coordinator", "token-file", "tls-ca", "metrics-listen", "metrics-port-file",
                               "device", "threads", "log-level", "max-tasks", "connect-timeout-s"},
                              {});
  if (absl::Status st = flags.Parse(args); !st.ok()) return ServeFail(st);
  if (!flags.positional().empty()) {
    return ServeFail(absl::InvalidArgumentError(absl::StrCat("unexpected argument '", flags.positional()[0], "'")));
  }
  if (auto level = flags.Get("log-level")) {
    aviary::common::LogLevel l;
    if (absl::Status st = aviary::common::ParseLogLevel(*level, &l); !st.ok()) return ServeFail(st);
    aviary::common::SetLogLevel(l);
  }
  aviary::worker::AgentOptions options;
  auto coordinator = flags.Require("coordinator");
  if (!coordinator.ok()) return ServeFail(coordinator.status());
  options.coordinator = *coordinator;
  if (options.coordinator.find(':') == std::string::npos) {
    return ServeFail(absl::InvalidArgumentError(
        absl::StrCat("--coordinator: expected HOST:PORT, got '", options.coordinator, "'")));
  }
  if (auto file = flags.Get("token-file")) {
    auto token = ReadToken(*file, "--token-file");
    if (!token.ok()) return ServeFail(token.status());
    options.token = *token;
  } else if (const char* env = std::getenv("AVIARY_TOKEN_FILE"); env != nullptr && *env != '\0') {
    auto token = ReadToken(env, "AVIARY_TOKEN_FILE");
    if (!token.ok()) return ServeFail(token.status());
    options.token = *token;
  } else if (const char* env = std::getenv("AVIARY_TOKEN"); env != nullptr) {
    options.token = std::string(absl::StripAsciiWhitespace(env));
  }
  std::string ca = flags.Get("tls-ca").value_or("");
  if (ca.empty()) {
    if (const char* env = std::getenv("AVIARY_TLS_CA"); env != nullptr) ca = env;
  }
  if (!ca.empty()) {
    auto pem = aviary::common::ReadFileToString(ca);
    if (!pem.ok()) return ServeFail(aviary::common::Annotate(pem.status(), "--tls-ca"));
    options.tls_ca_pem = *pem;
  }
  options.metrics_listen = flags.Get("metrics-listen").value_or("0.0.0.0:9471");
  options.metrics_port_file = flags.Get("metrics-port-file").value_or("");
  options.device = flags.Get("device").value_or("auto");
  auto threads = flags.GetInt("threads", 0, 0, 1024);
  if (!threads.ok()) return ServeFail(threads.status());
  options.threads = static_cast<int>(*threads);
  auto max_tasks = flags.GetInt("max-tasks", 0, 0, 1000000000);
  if (!max_tasks.ok()) return ServeFail(max_tasks.status());
  options.max_tasks = static_cast<int>(*max_tasks);
  auto connect_timeout = flags.GetDouble("connect-timeout-s", 0);
  if (!connect_timeout.ok()) return ServeFail(connect_timeout.status());
  if (!(*connect_timeout >= 0)) {
    return ServeFail(absl::InvalidArgumentError(absl::StrCat("--connect-timeout-s: expected >= 0, got ", *connect_timeout)));
  }
  options.connect_timeout_s = *connect_timeout;
  // The agent ends the whole group itself (MPI_Abort) when ranks cannot agree; an error that
  // reaches here was shared by every rank.
  absl::Status st = aviary::worker::ServeAgent(options, *g_session);
  if (!st.ok()) return ServeFail(st);
  return 0;
}

int RunAllreduceBench(const std::vector<std::string>& args) {
  aviary::common::Flags flags({"min-bytes", "max-bytes", "dtype", "device", "backend", "timeout-s"}, {});
  if (absl::Status st = flags.Parse(args); !st.ok()) return Fail("allreduce-bench", st);
  if (g_session == nullptr) {
    return Fail("allreduce-bench", absl::FailedPreconditionError("run it under mpirun (e.g. mpirun -np 2 aviary-worker allreduce-bench)"));
  }
  auto min_bytes = flags.GetInt("min-bytes", 1024, 4, int64_t{1} << 34);
  auto max_bytes = flags.GetInt("max-bytes", int64_t{1} << 30, 4, int64_t{1} << 34);
  if (!min_bytes.ok()) return Fail("allreduce-bench", min_bytes.status());
  if (!max_bytes.ok()) return Fail("allreduce-bench", max_bytes.status());
  const std::string dtype_name = flags.Get("dtype").value_or("float32");
  if (dtype_name != "float32" && dtype_name != "bf16") {
    return Fail("allreduce-bench", absl::InvalidArgumentError(absl::StrCat("--dtype: expected float32 or bf16, got '", dtype_name, "'")));
  }
  const at::ScalarType dtype = dtype_name == "bf16" ? at::kBFloat16 : at::kFloat;
  const std::string device_name = flags.Get("device").value_or("cpu");
  if (device_name != "cpu" && device_name != "cuda") {
    return Fail("allreduce-bench", absl::InvalidArgumentError(absl::StrCat("--device: expected cpu or cuda, got '", device_name, "'")));
  }
  const c10::Device device = RankDevice(device_name == "cuda");
  aviary::common::CommConfig cc;
  cc.backend = flags.Get("backend").value_or("auto");
  auto timeout = flags.GetInt("timeout-s", 600, 1, 86400);
  if (!timeout.ok()) return Fail("allreduce-bench", timeout.status());
  cc.timeout_s = static_cast<double>(*timeout);
  at::set_num_threads(DefaultThreads());
  auto comm = aviary::worker::comm::CreateCommunicator(cc, *g_session, device);
  if (!comm.ok()) return Fail("allreduce-bench", comm.status());
  aviary::worker::comm::Communicator& c = **comm;
  const int n = c.world_size();
  const int64_t elem = dtype == at::kFloat ? 4 : 2;
  if (c.rank() == 0) {
    std::printf("# aviary-worker allreduce-bench: %d ranks, backend %s, device %s, %s\n", n,
                c.backend().c_str(), device.str().c_str(), dtype_name.c_str());
    std::printf("# algbw = size / time; busbw = algbw * 2(n-1)/n (nccl-tests); time = max over ranks\n");
    std::printf("%14s %12s %8s %12s %12s %12s\n", "size_bytes", "count", "iters", "time_us", "algbw_GB/s", "busbw_GB/s");
  }
  for (int64_t bytes = *min_bytes; bytes <= *max_bytes; bytes *= 4) {
    const int64_t count = std::max<int64_t>(1, bytes / elem);
    at::Tensor t = at::ones({count}, at::TensorOptions().dtype(dtype).device(device));
    const int iters = static_cast<int>(std::clamp<int64_t>((int64_t{64} << 20) / bytes, 3, 200));
    absl::Status st = c.AllReduce(t);  // warm-up
    if (st.ok()) st = c.Barrier();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters && st.ok(); ++i) st = c.AllReduce(t);
    if (device.is_cuda()) t.cpu();  // waits for the stream
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
    at::Tensor worst = at::tensor({seconds}, at::kDouble);
    if (st.ok()) st = c.AllReduce(worst, aviary::worker::comm::ReduceOp::kMax);
    if (!st.ok()) return Fail("allreduce-bench", st);
    seconds = worst.item<double>();
    const double actual = static_cast<double>(count * elem);
    const double algbw = actual / seconds / 1e9;
    const double busbw = algbw * 2.0 * (n - 1) / n;
    if (c.rank() == 0) {
      std::printf("%14lld %12lld %8d %12.1f %12.3f %12.3f\n", static_cast<long long>(count * elem),
                  static_cast<long long>(count), iters, seconds * 1e6, algbw, busbw);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
    std::cout << Usage();
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version") return PrintVersion();
  std::vector<std::string> rest(args.begin() + 1, args.end());
  const CommandUsage* usage = FindCommand(args[0]);
  if (usage == nullptr) {
    std::cerr << "aviary-worker: unknown command '" << args[0] << "'\n\n" << Usage();
    return 2;
  }
  if (aviary::common::HelpRequested(rest)) {
    std::cout << "usage: aviary-worker " << args[0] << " ...\n\n" << usage->text;
    return 0;
  }
  std::unique_ptr<aviary::worker::comm::MpiSession> session;
  // serve always has a session (one process without mpirun is a world of one).
  if (((args[0] == "train" || args[0] == "allreduce-bench") && aviary::worker::comm::LaunchedUnderMpi()) ||
      args[0] == "serve") {
    auto s = aviary::worker::comm::MpiSession::Create();
    if (!s.ok()) return Fail(args[0], s.status());
    session = std::move(*s);
    g_session = session.get();
  }
  int rc = 2;
  try {
    if (args[0] == "train") rc = RunTrain(rest);
    else if (args[0] == "allreduce-bench") rc = RunAllreduceBench(rest);
    else if (args[0] == "serve") rc = RunServe(rest);
    else if (args[0] == "mel") rc = aviary::cli::RunMel(rest);
    else if (args[0] == "predict") rc = aviary::cli::RunPredict(rest);
    else rc = -1;
  } catch (const std::exception& e) {
    rc = Fail(args[0], absl::InternalError(absl::StrCat("uncaught exception: ", e.what())));
  }
  if (rc != -1) {
    g_session = nullptr;
    return rc;  // `session` finalizes MPI (when it initialized it)
  }
  std::cerr << "aviary-worker: command '" << args[0] << "' has no handler\n";
  return 1;
}
