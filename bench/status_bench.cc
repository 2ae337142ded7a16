// status_bench: how the coordinator answers status polling while worker groups heartbeat.
//
// Starts a real `aviary-coordinator` (--coordinator-bin; 127.0.0.1 port 0, a fresh SQLite file,
// a client and a worker token) or uses a running one (--coordinator H:P --token-file F
// --worker-token-file F), submits --jobs jobs over a
// tiny hand-written dataset (a 2024-layout metadata CSV and empty audio files: the catalog only
// checks that they exist), registers --groups worker groups that heartbeat every
// --heartbeat-ms (the first --leased of them lease a task first and heartbeat with it; with
// --report-ms they also send ReportProgress, --report-points step points each, as a training
// group does every 2 s), and
// runs --pollers concurrent clients that call GetJob and ListJobs in a closed loop (or every
// --poll-interval-ms) for --duration seconds. Prints p50/p99/max latency and RPC/s of the
// pollers and of the heartbeats, as one JSON line and as a table.
//
// Every client is a thread with blocking calls on real gRPC stubs; --channels spreads them
// over that many channels, each its own TCP connection (local subchannel pools). The
// coordinator, the pollers and the groups share this machine's cores: the output says how
// many. Not a test: nothing here asserts a time. Exits 1 when any measured RPC failed, after
// printing the figures and the first error of each kind.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/cli.h"
#include "common/status.h"
#include "common/tokens.h"
#include "proto/aviary.grpc.pb.h"

namespace {

namespace fs = std::filesystem;
namespace v1 = aviary::v1;
using Clock = std::chrono::steady_clock;

constexpr char kToken[] = "status-bench-token";  // of a spawned coordinator
std::string g_token = kToken;                      // what the clients' calls send
constexpr char kWorkerToken[] = "status-bench-worker-token";  // of a spawned coordinator
std::string g_worker_token = kWorkerToken;                   // what the groups' calls send
constexpr double kCallTimeoutS = 10;

struct Options {
  std::string coordinator_bin;  // spawn this one ...
  std::string coordinator;      // ... or use this address
  std::string token_file;
  std::string worker_token_file;
  double duration_s = 10;
  int pollers = 200;
  int channels = 200;
  int groups = 50;
  int leased = 8;
  int jobs = 4;
  int heartbeat_ms = 100;
  int poll_interval_ms = 0;
  int list_every = 4;  // every k-th poll is a ListJobs, the others GetJob
  int list_limit = 20;
  std::string scratch;
  bool keep = false;
  // A load test at BirdCLEF size: submit this pipeline (its paths relative to working_dir,
  // which a spawned coordinator takes as a data root) instead of the tiny built-in one.
  std::string pipeline;
  std::string working_dir;
  // > 0: a group holding a task hands it back after this long (FailTask, preempted: no restart
  // counted) and leases again, so leases run at a steady rate; LeaseTask latency is measured,
  // and so is GetManifest, which a group calls (as aviary-worker does) for a manifest hash it
  // has not fetched yet (each group remembers its last 4).
  int task_ms = 0;
  // > 0: a group holding a task sends ReportProgress every this many ms (staggered over the
  // groups) with `report_points` step points (one SQLite transaction each).
  int report_ms = 0;
  int report_points = 4;
};

// Latencies of one kind of call, in microseconds, plus its error count.
struct Samples {
  std::vector<double> us;
  int64_t errors = 0;
  std::string first_error;
  void Merge(const Samples& other) {
    us.insert(us.end(), other.us.begin(), other.us.end());
    errors += other.errors;
    if (first_error.empty()) first_error = other.first_error;
  }
};

struct Summary {
  int64_t calls = 0, errors = 0;
  double rps = 0, p50_ms = 0, p99_ms = 0, max_ms = 0, mean_ms = 0;
};

Summary Summarize(Samples s, double seconds) {
  Summary out;
  out.calls = static_cast<int64_t>(s.us.size());
  out.errors = s.errors;
  out.rps = seconds > 0 ? out.calls / seconds : 0;
  if (s.us.empty()) return out;
  std::sort(s.us.begin(), s.us.end());
  auto pct = [&](double q) {
    size_t i = static_cast<size_t>(std::ceil(q * s.us.size())) ;
    i = std::min(s.us.size() - 1, i == 0 ? 0 : i - 1);
    return s.us[i] / 1000.0;
  };
  out.p50_ms = pct(0.50);
  out.p99_ms = pct(0.99);
  out.max_ms = s.us.back() / 1000.0;
  double sum = 0;
  for (double v : s.us) sum += v;
  out.mean_ms = sum / s.us.size() / 1000.0;
  return out;
}

std::string Json(const char* name, const Summary& s) {
  return absl::StrFormat(
      "\"%s\":{\"calls\":%d,\"errors\":%d,\"rpc_per_s\":%.1f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,"
      "\"max_ms\":%.3f,\"mean_ms\":%.3f}",
      name, s.calls, s.errors, s.rps, s.p50_ms, s.p99_ms, s.max_ms, s.mean_ms);
}

std::string Row(const char* name, const Summary& s) {
  return absl::StrFormat("%-12s %10d %8d %10.1f %9.3f %9.3f %9.3f", name, s.calls, s.errors,
                         s.rps, s.p50_ms, s.p99_ms, s.max_ms);
}

void Prepare(grpc::ClientContext* context) {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(kCallTimeoutS * 1000)));
  if (!g_token.empty()) context->AddMetadata("authorization", absl::StrCat("Bearer ", g_token));
}

// The same for WorkerService calls (the worker groups' token).
void PrepareWorker(grpc::ClientContext* context) {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(kCallTimeoutS * 1000)));
  if (!g_worker_token.empty()) context->AddMetadata("authorization", absl::StrCat("Bearer ", g_worker_token));
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, int index) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // its own connection
  args.SetInt("aviary.bench.channel", index);           // distinct args: no channel sharing
  args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 1 << 30);  // leases carry the manifest, as the worker's
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

absl::Status ToStatus(const grpc::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(what, ": ", s.error_message()));
}

// One call into `samples`: its latency when it succeeded, else an error (the first one's text
// kept, as `rpc` of group `group`, or of a client when group < 0).
void Record(Samples* samples, const grpc::Status& s, Clock::duration took, const char* rpc, int group = -1) {
  if (s.ok()) {
    samples->us.push_back(std::chrono::duration<double, std::micro>(took).count());
    return;
  }
  samples->errors++;
  if (samples->first_error.empty()) {
    samples->first_error = ToStatus(s, group < 0 ? std::string(rpc) : absl::StrCat(rpc, " of group ", group)).ToString();
  }
}

absl::Status WriteFile(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

// A 2024-layout dataset of 3 classes x 6 recordings with empty audio files, and a pipeline
// that fine-tunes folds 0 and 1 of a 2-fold split (two tasks per job).
absl::StatusOr<std::string> WriteDataset(const fs::path& root) {
  std::string csv = "primary_label,secondary_labels,author,rating,filename\n";
  int n = 0;
  for (const char* label : {"asbfly", "ashdro1", "ashpri1"}) {
    for (int i = 0; i < 6; ++i) {
      ++n;
      const std::string file = absl::StrCat(label, "/XC", 1000 + n, ".ogg");
      absl::StrAppend(&csv, label, ",[],author", i, ",4.0,", file, "\n");
      AVIARY_RETURN_IF_ERROR(WriteFile(root / "ds" / "train_audio" / file, ""));
    }
  }
  AVIARY_RETURN_IF_ERROR(WriteFile(root / "ds" / "train_metadata.csv", csv));
  return std::string(
      "seed: 42\n"
      "data:\n"
      "  target: {layout: \"2024\", root: ds}\n"
      "  pretrain_sources: []\n"
      "folds: {finetune_splits: 2, selected_folds: [0, 1]}\n"
      "model: {name: small_cnn}\n"
      "train: {epochs: 2, batch_size: 4}\n"
      "stages:\n"
      "  pretrain: {enabled: false}\n"
      "  finetune: {enabled: true}\n");
}

// A coordinator child process: started on 127.0.0.1 port 0, stopped with SIGTERM (then
// SIGKILL) when this goes out of scope.
class CoordinatorProcess {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorProcess>> Start(const std::string& bin,
                                                                   const fs::path& dir,
                                                                   const std::string& extra_root) {
    const fs::path config = dir / "coordinator.yaml";
    const fs::path port_file = dir / "port";
    AVIARY_RETURN_IF_ERROR(WriteFile(dir / "token", std::string(kToken) + "\n"));
    AVIARY_RETURN_IF_ERROR(WriteFile(dir / "worker.token", std::string(kWorkerToken) + "\n"));
    AVIARY_RETURN_IF_ERROR(WriteFile(
        config, absl::StrCat("listen: 127.0.0.1:0\n"
                             "port_file: ", port_file.string(), "\n"
                             "metrics_listen: \"\"\n"
                             "database: ", (dir / "aviary.db").string(), "\n"
                             "work_dir: ", (dir / "runs").string(), "\n"
                             "data_roots: [\"", dir.string(), "\"",
                             extra_root.empty() ? "" : absl::StrCat(", \"", extra_root, "\""), "]\n"
                             "token_file: ", (dir / "token").string(), "\n"
                             "worker_token_file: ", (dir / "worker.token").string(), "\n"
                             "heartbeat_timeout_s: 20\n"
                             "log_level: warning\n")));
    const fs::path log = dir / "coordinator.log";
    pid_t pid = ::fork();
    if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
    if (pid == 0) {
      FILE* f = std::freopen(log.c_str(), "w", stderr);
      (void)f;
      ::execl(bin.c_str(), bin.c_str(), "--config", config.c_str(), static_cast<char*>(nullptr));
      std::fprintf(stderr, "exec %s: %s\n", bin.c_str(), std::strerror(errno));
      ::_exit(127);
    }
    auto process = std::unique_ptr<CoordinatorProcess>(new CoordinatorProcess(pid));
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    while (Clock::now() < deadline) {
      std::ifstream in(port_file);
      int port = 0;
      if (in >> port && port > 0) {
        process->address_ = absl::StrCat("127.0.0.1:", port);
        return process;
      }
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        process->pid_ = -1;
        return absl::FailedPreconditionError(absl::StrCat(
            bin, " exited (status ", status, ") before writing ", port_file.string(),
            "; see ", log.string()));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return absl::DeadlineExceededError(absl::StrCat(bin, " wrote no port to ", port_file.string(),
                                                    " within 30 s; see ", log.string()));
  }

  ~CoordinatorProcess() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    for (int i = 0; i < 100; ++i) {
      if (::waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }

  const std::string& address() const { return address_; }
  // CPU seconds (user + system) the coordinator has used so far; -1 when unknown.
  double CpuSeconds() const {
    std::ifstream in(absl::StrCat("/proc/", pid_, "/stat"));
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t paren = text.rfind(')');
    if (paren == std::string::npos) return -1;
    std::istringstream fields(text.substr(paren + 2));
    std::string field;
    double utime = 0, stime = 0;
    for (int i = 3; i <= 15 && fields >> field; ++i) {  // fields 14 and 15: utime, stime (ticks)
      if (i == 14) utime = std::atof(field.c_str());
      if (i == 15) stime = std::atof(field.c_str());
    }
    return (utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
  }

 private:
  explicit CoordinatorProcess(pid_t pid) : pid_(pid) {}
  pid_t pid_;
  std::string address_;
};

std::atomic<bool> g_stop{false};

// A worker group: registers, optionally leases a task, then heartbeats every interval.
void RunGroup(std::shared_ptr<grpc::Channel> channel, int index, const Options& options,
              bool lease, Clock::time_point measure_from, Samples* out, std::string* held,
              Samples* first_leases, Samples* leases, Samples* fetches, Samples* reports) {
  auto stub = v1::WorkerService::NewStub(channel);
  v1::RegisterGroupRequest reg;
  reg.set_world_size(1);
  reg.add_hosts("status-bench");
  reg.add_devices("cpu");
  reg.set_backend("mpi");
  reg.set_version("status_bench");
  v1::RegisterGroupResponse reg_response;
  {
    grpc::ClientContext context;
    PrepareWorker(&context);
    // A new channel whose first connect attempt fails would fail the call at once, and the group
    // would never register (seen once: 8 of 64 groups, one channel); the real agent retries its
    // registration, so the bench waits for the channel within the call's deadline.
    context.set_wait_for_ready(true);
    grpc::Status s = stub->RegisterGroup(&context, reg, &reg_response);
    if (!s.ok()) {
      out->errors++;
      out->first_error = ToStatus(s, absl::StrCat("RegisterGroup of group ", index)).ToString();
      return;
    }
  }
  std::string task_id;
  std::deque<std::string> fetched;  // the manifest hashes this group holds, newest last
  auto fetch_manifest = [&](const v1::Task& task) {
    if (task.manifest_hash().empty() ||
        std::find(fetched.begin(), fetched.end(), task.manifest_hash()) != fetched.end()) {
      return;
    }
    v1::GetManifestRequest req;
    req.set_group_id(reg_response.group_id());
    req.set_manifest_hash(task.manifest_hash());
    grpc::ClientContext context;
    PrepareWorker(&context);
    const auto t0 = Clock::now();
    auto reader = stub->GetManifest(&context, req);
    v1::ManifestChunk chunk;
    int64_t bytes = 0;
    while (reader->Read(&chunk)) bytes += static_cast<int64_t>(chunk.data().size());
    grpc::Status s = reader->Finish();
    if (s.ok() && bytes != task.manifest_size()) {
      s = grpc::Status(grpc::StatusCode::DATA_LOSS, absl::StrCat(bytes, " bytes, the lease said ", task.manifest_size()));
    }
    Record(fetches, s, Clock::now() - t0, "GetManifest", index);
    if (s.ok()) {
      fetched.push_back(task.manifest_hash());
      if (fetched.size() > 4) fetched.pop_front();
    }
  };
  // `samples`: the first lease (all groups at once, the start burst) or a later one (steady).
  auto lease_task = [&](Samples* samples) {
    v1::LeaseTaskRequest req;
    req.set_group_id(reg_response.group_id());
    v1::LeaseTaskResponse resp;
    grpc::ClientContext context;
    PrepareWorker(&context);
    const auto t0 = Clock::now();
    grpc::Status s = stub->LeaseTask(&context, req, &resp);
    Record(samples, s, Clock::now() - t0, "LeaseTask", index);
    if (s.ok() && resp.available()) {
      task_id = resp.task().task_id();
      fetch_manifest(resp.task());
    }
  };
  if (lease) lease_task(first_leases);
  *held = task_id;
  auto leased_at = Clock::now();
  const auto interval = std::chrono::milliseconds(options.heartbeat_ms);
  auto next = Clock::now();
  // Reports: staggered over the groups, as groups started at different times are.
  const auto report_interval = std::chrono::milliseconds(options.report_ms);
  auto next_report = Clock::now() + report_interval * index / std::max(1, options.groups);
  int64_t step = 0;
  auto report = [&] {
    v1::ReportProgressRequest req;
    req.set_group_id(reg_response.group_id());
    req.set_task_id(task_id);
    req.set_steps_per_epoch(1000);
    const double absent = std::nan("");  // a step point has no validation values
    for (int k = 0; k < options.report_points; ++k) {
      v1::Metrics* m = req.add_points();
      m->set_epoch(0);
      m->set_step(++step);
      m->set_lr(1e-3);
      m->set_train_loss(1.0 / static_cast<double>(step));
      m->set_train_acc(0.5);
      for (auto set : {&v1::Metrics::set_val_loss, &v1::Metrics::set_val_auc, &v1::Metrics::set_val_roc_auc,
                       &v1::Metrics::set_val_cmap, &v1::Metrics::set_val_acc}) {
        (m->*set)(absent);
      }
      m->set_samples_per_s(512);
      m->set_samples_total(step * 64);
    }
    v1::ReportProgressResponse resp;
    grpc::ClientContext context;
    PrepareWorker(&context);
    const auto t0 = Clock::now();
    grpc::Status s = stub->ReportProgress(&context, req, &resp);
    if (t0 >= measure_from) Record(reports, s, Clock::now() - t0, "ReportProgress", index);
  };
  while (!g_stop.load()) {
    v1::HeartbeatRequest req;
    req.set_group_id(reg_response.group_id());
    req.set_task_id(task_id);
    v1::HeartbeatResponse resp;
    grpc::ClientContext context;
    PrepareWorker(&context);
    const auto t0 = Clock::now();
    grpc::Status s = stub->Heartbeat(&context, req, &resp);
    if (t0 >= measure_from) Record(out, s, Clock::now() - t0, "Heartbeat", index);
    if (lease && options.task_ms > 0 && Clock::now() - leased_at >= std::chrono::milliseconds(options.task_ms)) {
      if (!task_id.empty()) {  // hand it back, as a preempted group does
        v1::FailTaskRequest fail;
        fail.set_group_id(reg_response.group_id());
        fail.set_task_id(task_id);
        fail.set_error("status_bench: handed back");
        fail.set_retryable(true);
        fail.set_preempted(true);
        v1::FailTaskResponse fail_response;
        grpc::ClientContext fail_context;
        PrepareWorker(&fail_context);
        grpc::Status handed_back = stub->FailTask(&fail_context, fail, &fail_response);
        if (!handed_back.ok()) {
          ++leases->errors;  // counted: the run exits 1 with it, as for the leases themselves
          if (leases->first_error.empty()) leases->first_error = ToStatus(handed_back, "FailTask").ToString();
        }
        task_id.clear();
      }
      lease_task(leases);
      leased_at = Clock::now();
    }
    if (options.report_ms > 0) {
      // Reports between heartbeats, each at its own time.
      while (!g_stop.load() && next_report < next + interval) {
        std::this_thread::sleep_until(next_report);
        if (!task_id.empty()) report();
        next_report += report_interval;
        if (next_report < Clock::now()) next_report = Clock::now();  // late: no burst
      }
    }
    next += interval;
    if (next < Clock::now()) next = Clock::now();  // late: do not burst to catch up
    std::this_thread::sleep_until(next);
  }
}

// A polling client: GetJob on a random job, every list_every-th call ListJobs instead.
void RunPoller(std::shared_ptr<grpc::Channel> channel, int index, const Options& options,
               const std::vector<std::string>& job_ids, Clock::time_point until,
               Samples* get_out, Samples* list_out) {
  auto stub = v1::JobService::NewStub(channel);
  std::mt19937 rng(1234 + index);  // fixed seed per poller
  std::uniform_int_distribution<size_t> pick(0, job_ids.size() - 1);
  int64_t n = index;  // staggers the ListJobs calls across pollers
  while (Clock::now() < until) {
    grpc::ClientContext context;
    Prepare(&context);
    const bool list = options.list_every > 0 && (n++ % options.list_every) == 0;
    const auto t0 = Clock::now();
    grpc::Status s;
    if (list) {
      v1::ListJobsRequest req;
      req.set_limit(options.list_limit);
      v1::ListJobsResponse resp;
      s = stub->ListJobs(&context, req, &resp);
    } else {
      v1::GetJobRequest req;
      req.set_job_id(job_ids[pick(rng)]);
      v1::JobInfo resp;
      s = stub->GetJob(&context, req, &resp);
    }
    Record(list ? list_out : get_out, s, Clock::now() - t0, list ? "ListJobs" : "GetJob");
    if (options.poll_interval_ms > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(options.poll_interval_ms));
    }
  }
}

// Parses the flags into *o; std::nullopt to run, else the exit code (help or a flag error).
std::optional<int> ParseOptions(int argc, char** argv, Options* o) {
  CLI::App app("status_bench: GetJob/ListJobs latency under many pollers and heartbeating groups",
               "status_bench");
  aviary::common::ConfigureApp(&app);
  using aviary::common::AddNumber;
  app.add_option("--coordinator-bin", o->coordinator_bin, "start this coordinator");
  app.add_option("--coordinator", o->coordinator, "or use the one at H:P");
  app.add_option("--token-file", o->token_file, "its client token (with --coordinator)");
  app.add_option("--worker-token-file", o->worker_token_file, "its worker-group token (with --coordinator)");
  AddNumber(&app, "--duration", &o->duration_s, "S", "seconds of load", 0.001, 1e6)->capture_default_str();
  AddNumber(&app, "--pollers", &o->pollers, "N", "polling threads", 1, 5000)->capture_default_str();
  CLI::Option* channels = AddNumber(&app, "--channels", &o->channels, "N", "channels (default: one per poller)", 1, 5000);
  AddNumber(&app, "--groups", &o->groups, "N", "heartbeating worker groups", 0, 5000)->capture_default_str();
  AddNumber(&app, "--leased", &o->leased, "N", "groups holding a task (<= --groups)", 0, 5000)->capture_default_str();
  AddNumber(&app, "--jobs", &o->jobs, "N", "jobs submitted", 1, 1000)->capture_default_str();
  AddNumber(&app, "--heartbeat-ms", &o->heartbeat_ms, "MS", "heartbeat period", 1, 60000)->capture_default_str();
  AddNumber(&app, "--poll-interval-ms", &o->poll_interval_ms, "MS", "pause between polls", 0, 60000);
  AddNumber(&app, "--list-every", &o->list_every, "K", "every K-th poll is a ListJobs", 0, 1000000)->capture_default_str();
  AddNumber(&app, "--list-limit", &o->list_limit, "N", "ListJobs limit", 0, 10000)->capture_default_str();
  app.add_option("--scratch", o->scratch, "scratch folder (default /tmp/aviary_status_bench_PID)");
  app.add_flag("--keep", o->keep, "keep the scratch folder");
  app.add_option("--pipeline", o->pipeline, "submit this pipeline YAML instead of the built-in tiny one");
  app.add_option("--working-dir", o->working_dir,
                 "the pipeline's relative paths resolve here (a data root of a spawned coordinator)");
  AddNumber(&app, "--report-ms", &o->report_ms, "MS",
            "groups holding a task send ReportProgress every MS (0: none)", 0, 3600000)
      ->capture_default_str();
  AddNumber(&app, "--report-points", &o->report_points, "N", "step points per report", 1, 10000)
      ->capture_default_str();
  AddNumber(&app, "--task-ms", &o->task_ms, "MS",
            "groups holding a task hand it back after MS and lease again (0: hold it)", 0, 86400000)
      ->capture_default_str();
  if (std::optional<int> code = aviary::common::ParseCommandLine(&app, {argv + 1, argv + argc})) return code;
  const bool channels_given = channels->count() > 0;
  if (o->coordinator_bin.empty() == o->coordinator.empty()) {
    std::cerr << "status_bench: give exactly one of --coordinator-bin PATH (start one) or --coordinator H:P (use one)\n";
    return 2;
  }
  if (o->leased > o->groups) {
    std::cerr << "status_bench: --leased " << o->leased << " is more than --groups " << o->groups << "\n";
    return 2;
  }
  o->channels = channels_given ? std::min(o->channels, o->pollers) : o->pollers;
  if (o->scratch.empty()) o->scratch = absl::StrCat("/tmp/aviary_status_bench_", ::getpid());
  return std::nullopt;
}

absl::Status Run(const Options& options) {
  const fs::path scratch = options.scratch;
  fs::create_directories(scratch);
  std::unique_ptr<CoordinatorProcess> process;
  std::string address = options.coordinator;
  if (!options.coordinator_bin.empty()) {
    AVIARY_ASSIGN_OR_RETURN(process, CoordinatorProcess::Start(options.coordinator_bin, scratch, options.working_dir));
    address = process->address();
  } else {
    for (auto [flag, path, token] : {std::tuple<const char*, const std::string*, std::string*>{
                                         "--token-file", &options.token_file, &g_token},
                                     {"--worker-token-file", &options.worker_token_file, &g_worker_token}}) {
      token->clear();
      if (path->empty()) continue;
      std::ifstream in(*path);
      if (!in) return absl::NotFoundError(absl::StrCat(flag, " ", *path, ": cannot open"));
      std::ostringstream text;
      text << in.rdbuf();
      std::vector<std::string> tokens = aviary::common::ParseTokenLines(text.str());
      if (tokens.empty()) return absl::InvalidArgumentError(absl::StrCat(flag, " ", *path, ": holds no token"));
      *token = tokens.front();
    }
  }
  std::cerr << "status_bench: coordinator " << address << ", scratch " << scratch.string() << "\n";

  // Jobs.
  std::string yaml;
  if (options.pipeline.empty()) {
    AVIARY_ASSIGN_OR_RETURN(yaml, WriteDataset(scratch));
  } else {
    std::ifstream in(options.pipeline);
    if (!in) return absl::NotFoundError(absl::StrCat("--pipeline ", options.pipeline, ": cannot open"));
    yaml.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const std::string working_dir = options.working_dir.empty() ? scratch.string() : options.working_dir;
  const auto submit_start = Clock::now();
  auto setup_channel = MakeChannel(address, -1);
  auto jobs_stub = v1::JobService::NewStub(setup_channel);
  std::vector<std::string> job_ids;
  for (int j = 0; j < options.jobs; ++j) {
    v1::SubmitJobRequest req;
    req.set_pipeline_yaml(yaml);
    req.set_name(absl::StrCat("status-bench-", j));
    req.set_source_path((scratch / "pipeline.yaml").string());
    req.set_working_dir(working_dir);
    v1::SubmitJobResponse resp;
    grpc::ClientContext context;
    Prepare(&context);
    context.set_wait_for_ready(true);
    AVIARY_RETURN_IF_ERROR(ToStatus(jobs_stub->SubmitJob(&context, req, &resp),
                                    absl::StrCat("SubmitJob ", j, " to ", address)));
    job_ids.push_back(resp.job_id());
  }
  const double submit_s = std::chrono::duration<double>(Clock::now() - submit_start).count();

  // Groups: one thread each, on their own channels (8 groups per channel).
  std::vector<std::shared_ptr<grpc::Channel>> group_channels;
  const int group_channel_count = std::max(1, (options.groups + 7) / 8);
  for (int i = 0; i < group_channel_count; ++i) group_channels.push_back(MakeChannel(address, 100000 + i));
  std::vector<Samples> heartbeats(options.groups), first_lease_samples(options.groups), lease_samples(options.groups),
      fetch_samples(options.groups), report_samples(options.groups);
  std::vector<std::string> held(options.groups);
  std::vector<std::thread> group_threads;
  const auto warmup_end = Clock::now() + std::chrono::seconds(1);
  for (int g = 0; g < options.groups; ++g) {
    group_threads.emplace_back(RunGroup, group_channels[g % group_channel_count], g,
                               std::cref(options), g < options.leased, warmup_end,
                               &heartbeats[g], &held[g], &first_lease_samples[g], &lease_samples[g],
                               &fetch_samples[g], &report_samples[g]);
  }
  std::this_thread::sleep_until(warmup_end);
  // The coordinator's CPU over the window hb_s divides it by (from warmup_end, after the second
  // the groups had to register and take their first leases).
  const double cpu_before = process ? process->CpuSeconds() : -1;

  // Pollers.
  std::vector<std::shared_ptr<grpc::Channel>> poll_channels;
  for (int i = 0; i < options.channels; ++i) poll_channels.push_back(MakeChannel(address, i));
  std::vector<Samples> gets(options.pollers), lists(options.pollers);
  std::vector<std::thread> pollers;
  const auto t0 = Clock::now();
  const auto until = t0 + std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(options.duration_s));
  for (int p = 0; p < options.pollers; ++p) {
    pollers.emplace_back(RunPoller, poll_channels[p % options.channels], p, std::cref(options),
                         std::cref(job_ids), until, &gets[p], &lists[p]);
  }
  for (auto& t : pollers) t.join();
  const double poll_s = std::chrono::duration<double>(Clock::now() - t0).count();
  g_stop.store(true);
  for (auto& t : group_threads) t.join();
  const double hb_s = std::chrono::duration<double>(Clock::now() - warmup_end).count();
  const double cpu_s = process && cpu_before >= 0 ? process->CpuSeconds() - cpu_before : -1;
  // Leases: the first of each group (all at the start: the burst) and the later ones (steady).
  Samples lease_all, lease_burst_all, lease_steady_all, fetch_all;
  for (auto& s : first_lease_samples) lease_burst_all.Merge(s);
  for (auto& s : lease_samples) lease_steady_all.Merge(s);
  lease_all.Merge(lease_burst_all);
  lease_all.Merge(lease_steady_all);
  for (auto& s : fetch_samples) fetch_all.Merge(s);
  Samples report_all;
  for (auto& s : report_samples) report_all.Merge(s);
  const Summary lease = Summarize(lease_all, hb_s), fetch = Summarize(fetch_all, hb_s);
  const Summary progress = Summarize(report_all, hb_s);
  const Summary lease_burst = Summarize(lease_burst_all, hb_s), lease_steady = Summarize(lease_steady_all, hb_s);

  Samples get_all, list_all, hb_all, poll_all;
  for (auto& s : gets) get_all.Merge(s);
  for (auto& s : lists) list_all.Merge(s);
  for (auto& s : heartbeats) hb_all.Merge(s);
  poll_all.Merge(get_all);
  poll_all.Merge(list_all);
  int holding = 0;
  for (const auto& h : held) holding += !h.empty();
  const Summary get = Summarize(get_all, poll_s), list = Summarize(list_all, poll_s),
                poll = Summarize(poll_all, poll_s), hb = Summarize(hb_all, hb_s);
  const unsigned cores = std::thread::hardware_concurrency();
  const int client_threads = options.pollers + options.groups;

  std::cout << "{"
            << absl::StrFormat(
                   "\"coordinator\":\"%s\",\"spawned\":%s,\"cores\":%u,\"duration_s\":%.2f,"
                   "\"jobs\":%d,\"pollers\":%d,\"poller_threads\":%d,\"poller_channels\":%d,"
                   "\"poll_interval_ms\":%d,\"list_every\":%d,\"list_limit\":%d,\"groups\":%d,"
                   "\"group_threads\":%d,\"group_channels\":%d,\"groups_holding_leases\":%d,"
                   "\"heartbeat_ms\":%d,",
                   address, process ? "true" : "false", cores, poll_s, options.jobs,
                   options.pollers, options.pollers, options.channels, options.poll_interval_ms,
                   options.list_every, options.list_limit, options.groups, options.groups,
                   group_channel_count, holding, options.heartbeat_ms)
            << Json("poll", poll) << "," << Json("get_job", get) << "," << Json("list_jobs", list)
            << "," << Json("heartbeat", hb) << "," << Json("lease", lease) << "," << Json("lease_burst", lease_burst)
            << "," << Json("lease_steady", lease_steady) << "," << Json("get_manifest", fetch)
            << "," << Json("report_progress", progress)
            << absl::StrFormat(",\"report_ms\":%d,\"report_points\":%d", options.report_ms, options.report_points)
            << absl::StrFormat(",\"submit_s\":%.2f,\"coordinator_cpu_s\":%.2f,\"coordinator_cores\":%.3f}\n",
                               submit_s, cpu_s, cpu_s >= 0 ? cpu_s / hb_s : -1.0);

  std::cout << "\n"
            << absl::StrFormat(
                   "status_bench: %d pollers (%d threads, %d channels%s) and %d groups "
                   "(%d threads, %d channels, heartbeat every %d ms, %d holding leases)\n"
                   "over %d jobs for %.1f s; coordinator %s%s; %u cores shared by the "
                   "coordinator and all %d client threads\n\n",
                   options.pollers, options.pollers, options.channels,
                   options.poll_interval_ms > 0
                       ? absl::StrCat(", every ", options.poll_interval_ms, " ms")
                       : std::string(", closed loop"),
                   options.groups, options.groups, group_channel_count, options.heartbeat_ms,
                   holding, options.jobs, poll_s, address, process ? " (spawned)" : "", cores,
                   client_threads)
            << absl::StrFormat("%-12s %10s %8s %10s %9s %9s %9s\n", "rpc", "calls", "errors",
                               "rpc/s", "p50 ms", "p99 ms", "max ms")
            << Row("poll (all)", poll) << "\n"
            << Row("  GetJob", get) << "\n"
            << Row("  ListJobs", list) << "\n"
            << Row("Heartbeat", hb) << "\n"
            << Row("LeaseTask", lease) << "\n"
            << Row("  burst", lease_burst) << "\n"
            << Row("  steady", lease_steady) << "\n"
            << Row("GetManifest", fetch) << "\n"
            << Row("ReportProgress", progress) << "\n"
            << absl::StrFormat("\nsubmits: %d in %.1f s; coordinator CPU while loaded: %s\n", options.jobs, submit_s,
                               cpu_s >= 0 ? absl::StrFormat("%.1f s in %.1f s (%.2f cores)", cpu_s, hb_s, cpu_s / hb_s)
                                          : std::string("unknown (not spawned)"));
  for (const Samples* s : {&get_all, &list_all, &hb_all, &lease_burst_all, &lease_steady_all, &fetch_all, &report_all}) {
    if (!s->first_error.empty()) std::cout << "first error: " << s->first_error << "\n";
  }
  process.reset();
  if (!options.keep) {
    std::error_code ec;
    fs::remove_all(scratch, ec);
  }
  // Failed RPCs make the figures above a partial measurement: the exit status says so.
  int64_t failed = 0;
  std::string first_error;
  for (const Samples* s : {&get_all, &list_all, &hb_all, &lease_burst_all, &lease_steady_all, &fetch_all, &report_all}) {
    failed += s->errors;
    if (first_error.empty()) first_error = s->first_error;
  }
  if (failed > 0) {
    return absl::UnavailableError(absl::StrCat(failed, " RPC(s) failed during the run (first: ", first_error, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (std::optional<int> code = ParseOptions(argc, argv, &options)) return *code;
  absl::Status status = Run(options);
  if (!status.ok()) {
    std::cerr << "status_bench: " << status.ToString() << "\n";
    return aviary::common::ExitCodeFor(status);
  }
  return 0;
}
