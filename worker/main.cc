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
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <torch/version.h>
#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "absl/strings/ascii.h"
#include "common/csv.h"
#include "common/config.h"
#include "common/cpus.h"
#include "common/cli.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/tokens.h"
#include "common/version.h"
#include "worker/comm/communicator.h"
#include "worker/comm/mpi_session.h"
#include "worker/agent/agent.h"
#include "worker/agent/signals.h"
#include "worker/tools/tools.h"
#include "worker/trainer.h"

namespace {

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

// "aviary" when the client runs this program for `aviary mel|predict|export|weights`.
std::string g_program = "aviary-worker";

int Fail(const std::string& command, const absl::Status& st) {
  if (g_session != nullptr && g_session->world_size() > 1) {
    // The other ranks may be waiting in a collective: end the whole group.
    g_session->Abort(absl::StrCat(g_program, " ", command, ": ", st.message()), aviary::common::ExitCodeFor(st));
  }
  aviary::common::WriteLineToStderr(absl::StrCat(g_program, " ", command, ": ", st.message()));
  return aviary::common::ExitCodeFor(st);
}

// Torch intra-op threads per rank: the cores shared among the ranks of this host.
int DefaultThreads() {
  return aviary::common::CoresPerRank(g_session ? g_session->local_size() : 1);
}

// One device per local rank.
c10::Device RankDevice(bool cuda) {
  if (!cuda) return c10::Device(c10::kCPU);
  int local = g_session ? g_session->local_rank() : 0;
  int count = static_cast<int>(at::getNumGPUs());
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(count > 0 ? local % count : 0));
}

struct TrainArgs {
  std::string config;
  std::vector<std::string> overrides;
  aviary::worker::TrainOptions options;  // stage, fold, out_dir, init_checkpoint
  bool no_resume = false;
  bool extend_epochs = false;
  std::string device = "auto";
  int threads = 0;  // 0: DefaultThreads()
  std::string log_level;
};

absl::Status ApplyLogLevel(const std::string& level) {
  if (level.empty()) return absl::OkStatus();
  aviary::common::LogLevel l;
  AVIARY_RETURN_IF_ERROR(aviary::common::ParseLogLevel(level, &l));
  aviary::common::SetLogLevel(l);
  return absl::OkStatus();
}

int RunTrain(const TrainArgs& args) {
  if (absl::Status st = ApplyLogLevel(args.log_level); !st.ok()) return Fail("train", st);
  auto config = aviary::common::LoadPipelineConfig(args.config, args.overrides);
  if (!config.ok()) return Fail("train", config.status());
  if (absl::Status st = aviary::common::CheckBeforeRun(*config, args.config, args.options.stage); !st.ok()) {
    return Fail("train", st);
  }
  aviary::worker::TrainOptions options = args.options;
  options.lock_run_folder = true;  // a second `train` in the same --out is refused
  options.resume = !args.no_resume;
  options.extend_epochs = args.extend_epochs;
  if (args.device == "cuda" || (args.device == "auto" && at::hasCUDA())) options.device = RankDevice(true);
  at::set_num_threads(args.threads > 0 ? args.threads : DefaultThreads());
  options.progress_bar = ::isatty(STDERR_FILENO) != 0 && (g_session == nullptr || g_session->rank() == 0);
  std::unique_ptr<aviary::worker::comm::Communicator> comm;
  if (g_session != nullptr) {  // under mpirun, even -np 1 (the all-reduce path's cost)
    auto c = aviary::worker::comm::CreateCommunicator(config->comm, *g_session, options.device);
    if (!c.ok()) return Fail("train", c.status());
    comm = std::move(*c);
    options.comm = comm.get();
  }
  // SIGTERM / SIGINT / SIGUSR2 (a preemption): the run stops at the next optimizer step with
  // last.pt at that step, and a rerun resumes there. Under mpirun every rank must stop at the
  // same step: the ranks agree on the flag (one small all-reduce per step).
  aviary::worker::InstallStopSignalHandlers();
  aviary::worker::comm::Communicator* group = options.comm;
  options.should_stop = [group] {
    if (group == nullptr || group->world_size() == 1) return aviary::worker::Signalled();
    at::Tensor flag = at::tensor({aviary::worker::Signalled() ? int64_t{1} : int64_t{0}}, at::kLong);
    absl::Status st = group->AllReduce(flag, aviary::worker::comm::ReduceOp::kMax);
    // A failed agreement is no stop signal: the group is broken (a rank stalled or died), so it
    // ends as any failed collective ends it, naming the cause (Fail aborts the group).
    if (!st.ok()) Fail("train", aviary::common::Annotate(st, "the per-step stop check"));
    return flag.item<int64_t>() != 0;
  };
  std::error_code ec;
  std::filesystem::create_directories(options.out_dir, ec);
  if (ec) {
    return Fail("train", absl::InvalidArgumentError(
                             absl::StrCat("--out: cannot create '", options.out_dir, "': ", ec.message())));
  }
  auto trainer = aviary::worker::Trainer::Create(*config, options);
  if (!trainer.ok()) return Fail("train", trainer.status());
  absl::Status st = (*trainer)->Run();
  if (absl::IsCancelled(st)) {  // only should_stop cancels: a stop signal here or on another rank
    if (g_session == nullptr || g_session->rank() == 0) {
      aviary::common::WriteLineToStderr(absl::StrCat(
          "aviary-worker train: stopped by ",
          aviary::worker::Signalled() ? aviary::worker::StopSignalName() : "a signal to another rank", ": ",
          st.message(), args.no_resume ? "; run the same command without --no-resume to resume"
                                        : "; run the same command again to resume"));
    }
    return 143;
  }
  if (!st.ok()) return Fail("train", st);
  const auto& history = (*trainer)->history();
  if (!history.empty() && (g_session == nullptr || g_session->rank() == 0)) {
    const auto& last = history.back();
    std::cout << "done: " << history.size() << " epochs in " << options.out_dir << "; last epoch val_auc "
              << last.val_auc << ", val_roc_auc " << last.val_roc_auc << ", val_acc " << last.val_acc << "\n";
  }
  return 0;
}


// Flag errors are the same on every rank: rank 0 says it, every rank exits with the code.
int ServeFail(const absl::Status& st) {
  if (g_session == nullptr || g_session->rank() == 0) {
    aviary::common::WriteLineToStderr(absl::StrCat("aviary-worker serve: ", st.message()));
  }
  return aviary::common::ExitCodeFor(st);
}

struct ServeArgs {
  aviary::worker::AgentOptions options;  // coordinator, metrics, device, threads, max_tasks, ...
  std::string token_file;
  std::string tls_ca;
  std::string tls_cert;
  std::string tls_key;
  std::string log_level;
};

// The flags, token and TLS files of `serve` into `options` (every rank reads them).
absl::Status PrepareServe(const ServeArgs& args, aviary::worker::AgentOptions* out) {
  AVIARY_RETURN_IF_ERROR(ApplyLogLevel(args.log_level));
  aviary::worker::AgentOptions options = args.options;
  AVIARY_RETURN_IF_ERROR(aviary::common::CheckDialAddress(options.coordinator, "--coordinator"));
  if (!args.token_file.empty()) {
    options.token_file = args.token_file;
    options.token_source = "--token-file";
  } else if (const char* env = std::getenv("AVIARY_TOKEN_FILE"); env != nullptr && *env != '\0') {
    options.token_file = env;
    options.token_source = "AVIARY_TOKEN_FILE";
  }
  if (!options.token_file.empty()) {
    auto token = aviary::worker::ReadTokenFile(options);
    if (!token.ok()) return token.status();
    options.token = *token;
  } else if (const char* env = std::getenv("AVIARY_TOKEN"); env != nullptr) {
    options.token = std::string(absl::StripAsciiWhitespace(env));
    if (const std::string problem = aviary::common::TokenByteProblem(options.token); !problem.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("AVIARY_TOKEN: ", problem));
    }
  }
  std::string ca = args.tls_ca;
  if (ca.empty()) {
    if (const char* env = std::getenv("AVIARY_TLS_CA"); env != nullptr) ca = env;
  }
  if (!ca.empty()) {
    auto pem = aviary::common::ReadFileToString(ca);
    if (!pem.ok()) return aviary::common::Annotate(pem.status(), "--tls-ca");
    options.tls_ca_pem = *pem;
  }
  // The group's client certificate for a coordinator with tls_client_ca_file (mutual TLS).
  std::string cert = args.tls_cert, key = args.tls_key;
  const char* cert_source = "--tls-cert";
  const char* key_source = "--tls-key";
  if (const char* env = std::getenv("AVIARY_TLS_CERT"); cert.empty() && env != nullptr) {
    cert = env;
    cert_source = "AVIARY_TLS_CERT";
  }
  if (const char* env = std::getenv("AVIARY_TLS_KEY"); key.empty() && env != nullptr) {
    key = env;
    key_source = "AVIARY_TLS_KEY";
  }
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        cert.empty() ? "--tls-key" : "--tls-cert",
        ": a client certificate needs both --tls-cert and --tls-key (or AVIARY_TLS_CERT and AVIARY_TLS_KEY)"));
  }
  if (!cert.empty()) {
    auto cert_pem = aviary::common::ReadFileToString(cert);
    if (!cert_pem.ok()) return aviary::common::Annotate(cert_pem.status(), cert_source);
    auto key_pem = aviary::common::ReadFileToString(key);
    if (!key_pem.ok()) return aviary::common::Annotate(key_pem.status(), key_source);
    options.tls_cert_pem = *cert_pem;
    options.tls_key_pem = *key_pem;
  }
  *out = std::move(options);
  return absl::OkStatus();
}

int RunServe(const ServeArgs& args) {
  aviary::worker::AgentOptions options;
  absl::Status mine = PrepareServe(args, &options);
  if (mine.ok()) mine = aviary::worker::CheckAgentOptions(options);
  // Every rank reads its flags and files; a rank that cannot start (a token file only rank 0's
  // host has, no GPU on one node) must not leave the others waiting in the group's first
  // collective: the ranks agree first, and the lowest failing rank says why.
  int first_failed = -1;
  absl::Status all;
  {
    // A rank hung in PrepareServe (a token or certificate file on a stuck share, a FIFO) would
    // keep the others in the agreement for ever: the group never registered, so no coordinator
    // notices, and mpirun never ends.
    std::optional<aviary::worker::comm::SetupDeadline> deadline;
    if (g_session->world_size() > 1) {
      deadline.emplace(aviary::worker::comm::MinSetupSeconds(), g_session->rank(), g_session->world_size(),
                       "serve's start", "reading each rank's flags and files");
    }
    all = g_session->AllRanksOk(mine, &first_failed);
  }
  if (!all.ok()) {
    if (first_failed < 0) {  // the agreement itself failed (MPI)
      aviary::common::WriteLineToStderr(absl::StrCat("aviary-worker serve: rank ", g_session->rank(), ": ", all.message()));
    } else if (g_session->rank() == first_failed) {
      aviary::common::WriteLineToStderr(absl::StrCat(
          "aviary-worker serve: ", g_session->world_size() > 1 ? absl::StrCat("rank ", first_failed, ": ") : "",
          mine.message()));
    }
    return aviary::common::ExitCodeFor(mine.ok() ? all : mine);
  }
  // The agent ends the whole group itself (MPI_Abort) when ranks cannot agree; an error that
  // reaches here was shared by every rank.
  absl::Status st = aviary::worker::ServeAgent(options, *g_session);
  if (!st.ok()) return ServeFail(st);
  return 0;
}

struct BenchArgs {
  int64_t min_bytes = 1024;
  int64_t max_bytes = int64_t{1} << 30;
  std::string dtype = "float32";
  std::string device = "cpu";
  std::string backend = "auto";
  int timeout_s = 600;
};

int RunAllreduceBench(const BenchArgs& args) {
  if (g_session == nullptr) {
    return Fail("allreduce-bench", absl::FailedPreconditionError("run it under mpirun (e.g. mpirun -np 2 aviary-worker allreduce-bench)"));
  }
  if (args.min_bytes > args.max_bytes) {
    return Fail("allreduce-bench", absl::InvalidArgumentError(absl::StrCat(
        "--min-bytes ", args.min_bytes, " is more than --max-bytes ", args.max_bytes, ": no size to measure")));
  }
  if (args.device == "cuda" && !at::hasCUDA()) {
    return Fail("allreduce-bench", absl::FailedPreconditionError(
        "--device cuda: this libtorch has no CUDA, or no GPU is visible (CUDA_VISIBLE_DEVICES)"));
  }
  const std::string& dtype_name = args.dtype;
  const at::ScalarType dtype = dtype_name == "bf16" ? at::kBFloat16 : at::kFloat;
  const c10::Device device = RankDevice(args.device == "cuda");
  aviary::common::CommConfig cc;
  cc.backend = args.backend;
  cc.timeout_s = static_cast<double>(args.timeout_s);
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
  for (int64_t bytes = args.min_bytes; bytes <= args.max_bytes; bytes *= 4) {
    const int64_t count = std::max<int64_t>(1, bytes / elem);
    at::Tensor t = at::ones({count}, at::TensorOptions().dtype(dtype).device(device));
    const int iters = static_cast<int>(std::clamp<int64_t>((int64_t{64} << 20) / bytes, 3, 200));
    absl::Status st = c.AllReduce(t);  // warm-up
    if (st.ok()) st = c.Barrier();
    const auto t0 = std::chrono::steady_clock::now();
    // AllReduce returns once its collective completed (NCCL: the host waited for the event
    // after it), so the clock stops at the last one's end. (A copy of `t` to the host used to
    // stop it: that timed a pageable device-to-host copy, not NCCL.)
    for (int i = 0; i < iters && st.ok(); ++i) st = c.AllReduce(t);
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

// The subcommands' flags, on `app`; the one the command line names sets *run.
void AddCommands(CLI::App* app, aviary::common::CommandRunner* run) {
  using aviary::common::AddNumber;
  using aviary::common::OneOf;
  const char* kLogLevel = "debug|info|warning|error|off";
  // What ParseLogLevel takes (any case, "warn" too; "" leaves the default), said at parse time.
  const CLI::Validator kLogLevels(
      [](std::string& text) -> std::string {
        if (text.empty()) return "";
        aviary::common::LogLevel level;
        const absl::Status parsed = aviary::common::ParseLogLevel(text, &level);
        return parsed.ok() ? "" : std::string(parsed.message());
      },
      "", "log level");

  auto train = std::make_shared<TrainArgs>();
  CLI::App* t = aviary::common::AddCommand(
      app, "train", "one stage of one fold on this machine",
      "RUN gets history.csv, best.pt, last.pt, config.yaml and history.png; a RUN holding last.pt is "
      "resumed (refused, naming the keys, when its config differs). SIGTERM/SIGINT/SIGUSR2 stop at the next "
      "step with last.pt at that step (exit 143); the same command resumes there. Under `mpirun -np N` every "
      "rank is a replica (data parallel, comm.* settings).");
  t->add_option("--config", train->config, "the pipeline YAML")->type_name("P.yaml")->required();
  t->add_option("--stage", train->options.stage, "pretrain or finetune")
      ->type_name("S")
      ->required()
      ->check(OneOf({"pretrain", "finetune"}));
  AddNumber(t, "--fold", &train->options.fold, "K", "the validation fold", 0, 1000000)->required();
  t->add_option("--out", train->options.out_dir, "the run folder")->type_name("RUN")->required()->check(aviary::common::NonEmpty("a folder"));
  t->add_option("--init", train->options.init_checkpoint, "start from this checkpoint's weights")->type_name("CKPT");
  t->add_flag("--no-resume", train->no_resume,
              "start over even if RUN holds last.pt (its checkpoints, history and config.yaml are moved aside "
              "to *.replaced, or *.replaced.N when that is taken)");
  t->add_flag("--extend-epochs", train->extend_epochs,
              "resume RUN although its config had other epochs (train on to the new count)");
  t->add_option("--device", train->device, "auto uses the GPU when libtorch has CUDA")
      ->type_name("auto|cpu|cuda")
      ->check(OneOf({"auto", "cpu", "cuda"}));
  AddNumber(t, "--threads", &train->threads, "N", "torch threads (default: the cores this rank may use, shared among the ranks of its host)", 1, 1024);
  t->add_option("--log-level", train->log_level, "log level")->type_name(kLogLevel)->check(kLogLevels);
  aviary::common::AddSetOption(t, &train->overrides);
  t->callback([run, train] { *run = [train] { return RunTrain(*train); }; });

  auto bench = std::make_shared<BenchArgs>();
  CLI::App* b = aviary::common::AddCommand(
      app, "allreduce-bench", "all-reduce time, algbw and busbw per size, under mpirun",
      "algbw = size / time, busbw = algbw * 2(n-1)/n (the nccl-tests definitions); time is the slowest rank's.");
  AddNumber<int64_t>(b, "--min-bytes", &bench->min_bytes, "B", "smallest size", 4, int64_t{1} << 34)
      ->capture_default_str();
  AddNumber<int64_t>(b, "--max-bytes", &bench->max_bytes, "B", "largest size", 4, int64_t{1} << 34)
      ->capture_default_str();
  b->add_option("--dtype", bench->dtype, "element type")
      ->type_name("float32|bf16")
      ->check(OneOf({"float32", "bf16"}))
      ->capture_default_str();
  b->add_option("--device", bench->device, "where the buffers live")
      ->type_name("cpu|cuda")
      ->check(OneOf({"cpu", "cuda"}))
      ->capture_default_str();
  b->add_option("--backend", bench->backend, "comm.backend")
      ->type_name("auto|mpi|nccl")
      ->check(OneOf({"auto", "mpi", "nccl"}))
      ->capture_default_str();
  AddNumber(b, "--timeout-s", &bench->timeout_s, "S", "comm.timeout_s", 1, 86400)->capture_default_str();
  b->callback([run, bench] { *run = [bench] { return RunAllreduceBench(*bench); }; });

  auto serve = std::make_shared<ServeArgs>();
  aviary::worker::AgentOptions& o = serve->options;
  o.metrics_listen = "0.0.0.0:9471";
  o.device = "auto";
  CLI::App* s = aviary::common::AddCommand(
      app, "serve", "a worker group: leases tasks from the coordinator and trains them",
      "Under `mpirun -np N`, or one process. SIGTERM/SIGINT/SIGUSR2 (to mpirun: SIGUSR2, which it forwards at "
      "once) stop the task at the next step (reported to the coordinator as preempted: the task is leased "
      "again and resumes from its last checkpoint), leave the coordinator and exit 0.");
  s->add_option("--coordinator", o.coordinator, "the coordinator's address")->type_name("HOST:PORT")->required();
  // Given empty (a script's unset variable: --tls-ca "$CA") these are refused, not read as "not
  // given": that fell back to the environment or to none, and dialed in plaintext with the token.
  s->add_option("--token-file", serve->token_file, "the bearer token (else the file in AVIARY_TOKEN_FILE, else AVIARY_TOKEN)")
      ->type_name("F")
      ->check(aviary::common::NonEmpty("a file"));
  s->add_option("--tls-ca", serve->tls_ca, "CA certificate of a TLS coordinator (else AVIARY_TLS_CA)")
      ->type_name("F")
      ->check(aviary::common::NonEmpty("a file"));
  s->add_option("--tls-cert", serve->tls_cert,
                "client certificate (PEM) for a coordinator with tls_client_ca_file (else AVIARY_TLS_CERT)")
      ->type_name("F")
      ->check(aviary::common::NonEmpty("a file"));
  s->add_option("--tls-key", serve->tls_key, "the client certificate's private key (else AVIARY_TLS_KEY)")
      ->type_name("F")
      ->check(aviary::common::NonEmpty("a file"));
  s->add_option("--metrics-listen", o.metrics_listen, "/metrics address; port 0 picks one; \"\" disables")
      ->type_name("ADDR")
      ->capture_default_str();
  s->add_option("--metrics-port-file", o.metrics_port_file, "write the metrics port here")->type_name("F");
  s->add_option("--device", o.device, "auto uses the GPU when libtorch has CUDA")
      ->type_name("auto|cpu|cuda")
      ->check(OneOf({"auto", "cpu", "cuda"}));
  AddNumber(s, "--threads", &o.threads, "N", "torch threads per rank (0: the cores this rank may use, shared among the ranks of its host)", 0, 1024);
  AddNumber(s, "--max-tasks", &o.max_tasks, "N", "exit 0 after N tasks (0: forever)", 0, 1000000000);
  AddNumber(s, "--connect-timeout-s", &o.connect_timeout_s, "S",
            "exit 1 when registering with the coordinator fails for S s, at start or again after it lost "
            "the group (0: retry forever); once registered, the group waits out an unreachable coordinator, "
            "training on and buffering its reports", 0.0, 1e9);
  AddNumber(s, "--stall-timeout-s", &o.stall_timeout_s, "S",
            "fail the task (retryable) and end the group when it made no progress for S s (0: never)", 0.0, 1e9);
  s->add_option("--log-level", serve->log_level, "log level")->type_name(kLogLevel)->check(kLogLevels);
  s->callback([run, serve] { *run = [serve] { return RunServe(*serve); }; });

  aviary::cli::AddMelCommand(app, run);
  aviary::cli::AddPredictCommand(app, run);
  aviary::cli::AddExportCommands(app, run);
}

// This process's rank under mpirun from the launcher's environment (before MPI_Init), 0 otherwise.
int LaunchRank() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"}) {
    if (const char* v = std::getenv(name); v != nullptr && *v != '\0') return std::atoi(v);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  // `aviary mel|predict` run this program as "aviary" (client/main.cc): their help then names
  // the command the user typed.
  const std::string self = std::filesystem::path(argc > 0 ? argv[0] : "").filename().string();
  if (self == "aviary") g_program = "aviary";
  CLI::App app("aviary-worker: trains on this machine (train), serves a coordinator as part of a worker group "
               "(serve), measures the group's all-reduce (allreduce-bench), and runs `aviary mel`, "
               "`aviary predict`, `aviary export` and `aviary weights`.",
               self == "aviary" ? "aviary" : "aviary-worker");
  aviary::common::ConfigureApp(&app);
  app.require_subcommand(0, 1);
  bool version = false;
  app.add_flag("--version", version, "the version, git commit, libtorch, CUDA and NCCL");
  aviary::common::CommandRunner run;
  AddCommands(&app, &run);
  if (args.empty()) {
    std::cout << app.help();
    return 2;
  }
  // Every rank parses the same command line; rank 0 alone prints what is wrong with it.
  if (std::optional<int> code = aviary::common::ParseCommandLine(&app, args, LaunchRank() == 0)) return *code;
  if (version) return PrintVersion();
  CLI::App* command = aviary::common::SelectedSubcommand(&app);
  if (command == nullptr || !run) {
    std::cerr << "aviary-worker: missing command (aviary-worker --help lists them)\n";
    return 2;
  }
  const std::string name = command->get_name();
  std::unique_ptr<aviary::worker::comm::MpiSession> session;
  // serve always has a session (one process without mpirun is a world of one).
  if (((name == "train" || name == "allreduce-bench") && aviary::worker::comm::LaunchedUnderMpi()) ||
      name == "serve") {
    auto s = aviary::worker::comm::MpiSession::Create();
    if (!s.ok()) return Fail(name, s.status());
    session = std::move(*s);
    g_session = session.get();
  }
  int rc = 1;
  try {
    rc = run();
  } catch (const c10::Error& e) {
    // The first line: torch's dispatcher errors list every backend after it.
    const std::string what = e.what_without_backtrace();
    rc = Fail(name, absl::InternalError(absl::StrCat("uncaught exception: ", what.substr(0, what.find('\n')))));
  } catch (const std::exception& e) {
    // The first line: other errors may carry a backtrace after it.
    const std::string what = e.what();
    rc = Fail(name, absl::InternalError(absl::StrCat("uncaught exception: ", what.substr(0, what.find('\n')))));
  }
  g_session = nullptr;
  return rc;  // `session` finalizes MPI (when it initialized it)
}
