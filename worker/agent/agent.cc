#include "worker/agent/agent.h"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <utility>

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#if defined(AVIARY_WITH_CUDA_TORCH)
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/config.h"
#include "common/cpus.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/manifest.h"
#include "common/status.h"
#include "common/utf8.h"
#include "proto/aviary.pb.h"
#include "worker/agent/coordinator_link.h"
#include "worker/agent/group_control.h"
#include "worker/agent/group_metrics.h"
#include "worker/agent/signals.h"
#include "worker/agent/stall_watchdog.h"
#include "worker/comm/communicator.h"
#include "worker/comm/mpi_session.h"
#include "worker/trainer.h"

#ifndef AVIARY_VERSION
#define AVIARY_VERSION "unknown"
#endif

namespace aviary::worker {
namespace {

// T6's deadline after this rank's collective timed out (RunTask).
constexpr double kT6AfterCommTimeoutS = 10.0;

// How long a fired stall watchdog's report may take before the process ends regardless
// (Agent::OnStall): the report's own wait (Drain) is 15 s.
constexpr int kStallExitS = 25;

namespace v1 = ::aviary::v1;
using Clock = std::chrono::steady_clock;

const common::Logger& Log() {
  static const common::Logger logger("agent");
  return logger;
}

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------------------------
// Every rank: one task.

v1::Metrics ToMetrics(const EpochRecord& r, int64_t samples_total) {
  v1::Metrics m;
  m.set_epoch(r.epoch);
  m.set_step(r.step);
  m.set_lr(r.lr);
  m.set_train_loss(r.train_loss);
  m.set_train_acc(r.train_acc);
  m.set_val_loss(r.val_loss);
  m.set_val_auc(r.val_auc);
  m.set_val_roc_auc(r.val_roc_auc);
  m.set_val_cmap(r.val_cmap);
  m.set_val_acc(r.val_acc);
  m.set_samples_per_s(r.samples_per_s);
  m.set_samples_total(samples_total);
  m.set_epoch_end(true);
  return m;
}

struct Outcome {
  absl::Status status;   // the first failing rank's status (rank order), OK when all succeeded
  bool agreed = true;    // every rank ended with the same code
  std::vector<EpochRecord> history;  // rank 0's
};

class Agent {
 public:
  Agent(const AgentOptions& options, comm::MpiSession& session, GroupControl& control)
      : options_(options), session_(session), control_(control) {}

  absl::Status Serve();

 private:
  struct PreparedTask {
    common::PipelineConfig config;
    common::TaskManifest manifest;
  };

  // The loops of group_control.h: rank 0's (R1 to R5), the other ranks' (W1, W2).
  absl::Status ServeRank0();
  absl::Status ServeOther();
  absl::StatusOr<v1::RegisterGroupRequest> Describe(int metrics_port);
  c10::Device RankDevice() const;

  // One task on every rank (T1 to T6).
  Outcome RunTask(const v1::Task& task);
  // T1: the task's config and manifest, its run folder. No collective.
  absl::StatusOr<PreparedTask> Prepare(const v1::Task& task) const;
  // T3: the trainer's communicator, the trainer and its run (T4, T5 through its hooks).
  // `*history`: the trainer's epochs when Run returned.
  absl::Status Train(const v1::Task& task, const PreparedTask& prepared, std::vector<EpochRecord>* history);
  // The trainer's hooks (TrainOptions): T4 before each step, the step's metrics and points, T5.
  bool ShouldStop();
  void OnStep(const StepStats& s);
  void OnEpoch(const EpochRecord& record);
  // T4 and T5's exchange: this rank's signal flag and samples since the last one, rank 0's
  // `decision`. Returns {rank 0's decision, the number of signalled ranks}.
  std::pair<int64_t, int64_t> ExchangeSamples(int64_t kind, int64_t decision);
  // Rank 0's reports during a task.
  void PushStepPoint(const StepStats& s, double rate);
  void PushCheckpoint(const std::string& name, int epoch, bool best);
  void PushRestoredEpochs(const std::vector<EpochRecord>& history);

  // Every rank's {kind, a, b, c}, rank-major (GroupControl::Exchange); a rank out of step or an
  // exchange past its deadline ends the group (OutOfStep).
  std::vector<int64_t> Exchange(const std::string& task_id, int64_t kind, int64_t a, int64_t b, int64_t c,
                                double deadline_s, const absl::Status& mine);
  // Rank 0 reports a retryable failure (waiting a little for its delivery) and ends the group;
  // the other ranks give it 30 s to do so, then end it themselves.
  [[noreturn]] void OutOfStep(const std::string& task_id, const std::string& why);
  // The outcome agreement (group_control.h): every rank's code; the blamed rank's message.
  // `training`: ranks that ended differently poison the group (Outcome::agreed false).
  Outcome Agree(const std::string& task_id, const absl::Status& mine, double deadline_s, int64_t pending_samples,
                bool training);
  void Report0(const v1::Task& task, const Outcome& outcome);
  [[noreturn]] void EndGroup(const std::string& why);
  // Rank 0, before the group ends: a retryable FailTask for `task_id`, waited for (15 s at most).
  void FailBeforeTheEnd(const std::string& task_id, const std::string& message);
  void QueueFailure(const std::string& task_id, const std::string& message);  // its first half
  // Rank 0's watchdog fired (on its thread): the task is failed as retryable, the group ended
  // (within kStallExitS, whatever blocks).
  [[noreturn]] void OnStall(const std::string& task_id, double seconds, const std::string& last);

  const AgentOptions& options_;
  comm::MpiSession& session_;
  GroupControl& control_;
  std::unique_ptr<GroupMetrics> metrics_;  // rank 0
  std::unique_ptr<CoordinatorLink> link_;  // rank 0
  std::unique_ptr<StallWatchdog> watchdog_;  // rank 0; after link_: destroyed (joined) first
  std::string leave_reason_;               // rank 0: LeaveGroup's reason after a clean loop end
  // A signal on some rank seen in any exchange of a task (T4 to T6), also one that a cancel's
  // stop at the same step, an epoch's end or the finish carried: the group leases no more.
  bool group_signalled_ = false;
  // The current task's state; RunTask starts it afresh.
  struct TaskState {
    std::string id;
    std::string out_dir;
    c10::Device device = c10::Device(c10::kCPU);
    double deadline_s = 0;                 // of T4 to T6's collectives
    int64_t pending_samples = 0;           // this rank's samples since the last exchange
    int32_t steps_per_epoch = 0;           // the trainer's last StepStats
    int64_t group_samples = 0;             // rank 0: the group's samples in this task
    std::map<int, int64_t> epoch_samples;  // rank 0: group_samples at each epoch end of this lease
    StopReason stop_reason = kNoStop;      // rank 0
    Clock::time_point last_point;          // rank 0: when the last step point was queued
    bool step_point_sent = false;          // rank 0: the lease's first step goes out at once
    int64_t samples_at_last_point = 0;     // rank 0: group_samples then
    bool fenced = false;                   // rank 0: a write was refused, the lease was gone
    std::optional<common::StorageFault> storage_fault;  // rank 0: the run's write that failed
  };
  // Rank 0, after a task that ended on a storage fault: waits until the node can write the run
  // folder again (the rule in docs/SERVICE.md, "Storage faults"). False: a signal came first.
  bool WaitUntilWritable(const common::StorageFault& fault);
  TaskState task_;
};

c10::Device Agent::RankDevice() const {
  const bool cuda = options_.device == "cuda" || (options_.device == "auto" && at::hasCUDA());
  if (!cuda) return c10::Device(c10::kCPU);
  int count = static_cast<int>(at::getNumGPUs());
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(count > 0 ? session_.local_rank() % count : 0));
}

[[noreturn]] void Agent::EndGroup(const std::string& why) {
  if (link_) link_->StopThreads();
  session_.Abort(absl::StrCat("aviary-worker serve: ", why), 1);
}

// Hosts and devices of every rank (a collective at start), the backend the default config
// resolves to, the version and the metrics address.
absl::StatusOr<v1::RegisterGroupRequest> Agent::Describe(int metrics_port) {
  char name[MPI_MAX_PROCESSOR_NAME] = {0};
  int len = 0;
  AVIARY_MPI_CHECK(MPI_Get_processor_name(name, &len));
  const c10::Device device = RankDevice();
  std::string mine = absl::StrCat(std::string(name, static_cast<size_t>(len)), "\t", device.str());
  mine.resize(2048, '\0');  // fixed width per rank (a longer name is cut)
  std::vector<int64_t> words(mine.size() / sizeof(int64_t));
  std::memcpy(words.data(), mine.data(), mine.size());
  AVIARY_ASSIGN_OR_RETURN(std::vector<int64_t> all, control_.AllGather(words, 0.02, 0));
  v1::RegisterGroupRequest r;
  r.set_world_size(control_.world());
  const size_t bytes_per_rank = words.size() * sizeof(int64_t);
  for (int i = 0; i < control_.world(); ++i) {
    std::string entry(reinterpret_cast<const char*>(all.data()) + i * bytes_per_rank, bytes_per_rank);
    entry = entry.substr(0, entry.find('\0'));
    size_t tab = entry.find('\t');
    r.add_hosts(common::ValidUtf8(entry.substr(0, tab)));  // text fields must be UTF-8 (common/utf8.h)
    r.add_devices(tab == std::string::npos ? "" : common::ValidUtf8(entry.substr(tab + 1)));
  }
  bool nccl = false;
#if defined(AVIARY_WITH_NCCL_BACKEND)
  nccl = device.is_cuda() && static_cast<int>(at::getNumGPUs()) >= session_.local_size();
#endif
  r.set_backend(nccl ? "nccl" : "mpi");
  r.set_version(AVIARY_VERSION);
  if (metrics_port > 0) {
    std::string host = options_.metrics_listen.substr(0, options_.metrics_listen.rfind(':'));
    if (host.empty() || host == "0.0.0.0" || host == "[::]" || host == "::") host = r.hosts(0);
    r.set_metrics_address(common::ValidUtf8(absl::StrCat(host, ":", metrics_port)));
  }
  return r;
}

absl::Status Agent::Serve() {
  InstallStopSignalHandlers();
  if (options_.threads > 0) {
    at::set_num_threads(options_.threads);
  } else {
    at::set_num_threads(common::CoresPerRank(session_.local_size()));
  }
  // Up to the registration (where rank 0 may wait long for a coordinator): rank 0's metrics
  // endpoint and port file (a stuck share), every rank's host and device.
  std::optional<comm::SetupDeadline> start_deadline;
  if (control_.world() > 1) {
    start_deadline.emplace(comm::MinSetupSeconds(), control_.rank(), control_.world(), "serve's start",
                           "rank 0's metrics endpoint and port file, each rank's host and device");
  }
  // Rank 0 sets up its endpoint first and shares the outcome, so that a bad --metrics-listen
  // stops every rank with one message.
  std::string setup;
  int metrics_port = 0;
  if (control_.rank() == 0) {
    auto metrics = GroupMetrics::Create(options_.metrics_listen);
    if (metrics.ok()) {
      metrics_ = std::move(*metrics);
      metrics_port = metrics_->port();
      if (!options_.metrics_port_file.empty() && metrics_port > 0) {
        absl::Status st = common::WriteFileAtomically(options_.metrics_port_file, absl::StrCat(metrics_port, "\n"));
        if (!st.ok()) setup = StopMessage(common::Annotate(st, "--metrics-port-file"));
      }
    } else {
      setup = StopMessage(metrics.status());
    }
  }
  // A control collective that fails fails on one rank, not all: returned, its error was printed
  // by rank 0 only (the others' errors are rank 0's stop) and the other ranks waited in the next
  // collective. It ends the group, naming this rank.
  if (absl::Status st = control_.Broadcast(&setup, 0, 0.02, 0); !st.ok()) EndGroup(std::string(st.message()));
  if (!setup.empty()) return ParseStopMessage(setup);
  absl::StatusOr<v1::RegisterGroupRequest> described = Describe(metrics_port);
  if (!described.ok()) EndGroup(std::string(described.status().message()));
  v1::RegisterGroupRequest registration = *std::move(described);
  start_deadline.reset();
  // One kind of device in a group (every rank sees every rank's): a CPU rank among GPU ranks
  // would fail every task it leases at the trainer's check (the replicas would drift apart), job
  // after job; the group is refused at its start instead, before it registers.
  int first_cpu = -1, first_gpu = -1;
  for (int r = 0; r < registration.devices_size(); ++r) {
    int& first = absl::StartsWith(registration.devices(r), "cuda") ? first_gpu : first_cpu;
    if (first < 0) first = r;
  }
  if (first_cpu >= 0 && first_gpu >= 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the group's ranks train on different kinds of device: rank ", first_cpu, " on ",
        registration.hosts(first_cpu), " has ", registration.devices(first_cpu), ", rank ", first_gpu, " on ",
        registration.hosts(first_gpu), " ", registration.devices(first_gpu),
        " (no GPU visible to that rank: a driver or CUDA_VISIBLE_DEVICES problem?); give every rank a GPU, or "
        "start the group with --device cpu"));
  }
  if (control_.rank() != 0) return ServeOther();
  if (metrics_port > 0) Log().Info(absl::StrCat("group metrics on ", registration.metrics_address(), "/metrics"));
  link_ = std::make_unique<CoordinatorLink>(options_, metrics_.get(), std::move(registration));
  watchdog_ = std::make_unique<StallWatchdog>(
      options_.stall_timeout_s,
      [this](const std::string& task_id, double seconds, const std::string& last) { OnStall(task_id, seconds, last); });
  absl::Status st = ServeRank0();
  // Tell the other ranks (OK: max tasks or a signal; else the error that ends the group).
  std::string stop = StopMessage(st);
  absl::Status sent = control_.Broadcast(&stop, 0, 0.02, 0);
  link_->StopThreads();
  if (!sent.ok()) EndGroup(std::string(sent.message()));
  // R6: a clean exit; the coordinator removes the group now rather than as lost later.
  link_->Leave(!st.ok() ? absl::StrCat("stopping on an error: ", st.message())
               : leave_reason_.empty() ? std::string("stopped") : leave_reason_);
  return st;
}

absl::Status Agent::ServeRank0() {
  absl::Status st = link_->Register();
  if (absl::IsCancelled(st)) {
    Log().Info(absl::StrCat("stopped by signal (", StopSignalName(), ")"));
    return absl::OkStatus();
  }
  AVIARY_RETURN_IF_ERROR(st);
  link_->StartThreads();
  Backoff idle(1, 5);
  Backoff errors(0.5, 10);
  int tasks = 0;
  while (!Signalled()) {
    if (link_->lost()) {
      st = link_->Register();
      if (absl::IsCancelled(st)) break;
      AVIARY_RETURN_IF_ERROR(st);
    }
    v1::Task task;
    bool available = false;
    st = link_->Lease(&task, &available);
    if (!st.ok()) {
      if (link_->lost()) continue;
      if (absl::IsCancelled(st) && Signalled()) break;  // its manifest's fetch, stopped: the group leaves
      const double delay = errors.Next();
      Log().Warn(absl::StrFormat("%s; retrying in %.1f s", st.message(), delay));
      SleepUnlessSignalled(delay);
      continue;
    }
    errors.Reset();
    if (!available) {
      SleepUnlessSignalled(idle.Next());
      continue;
    }
    idle.Reset();
    link_->BeginTask(task.task_id(), task.attempt());  // first: the task's log (aviary logs) starts here
    Log().Info(absl::StrCat("leased task ", task.task_id(), " (attempt ", task.attempt(), ", stage ", task.stage(),
                            " fold ", task.fold(), ") -> ", task.out_dir()));
    // Armed before the task goes to the other ranks: the lease runs and the heartbeats name the
    // task from here, and a rank that never reaches the broadcast (a hung transport) held it
    // with no deadline.
    watchdog_->Arm(task.task_id(), "the task's start");
    std::string msg = std::string(1, kMsgTask) + task.SerializeAsString();
    absl::Status sent = control_.Broadcast(&msg, 0, 0.02, 0);
    if (!sent.ok()) EndGroup(std::string(sent.message()));
    Outcome outcome = RunTask(task);
    watchdog_->Disarm();
    metrics_->EndTask();  // before the outcome reaches the coordinator: an idle group reads 0
    Report0(task, outcome);
    // A fenced task is abandoned: its reports would be refused or would mislead. Not when the
    // ranks disagreed: the group ends, and its retryable FailTask is the coordinator's word of it
    // (refused if the task moved on; else the task waited for the group's heartbeat timeout).
    if (task_.fenced && outcome.agreed) link_->DropTask(task.task_id());
    // A signal on another rank bounds the drain as one here does (the coordinator away, rank 0
    // waited for ever, and the launcher's SIGKILL ended the group instead of its LeaveGroup).
    link_->Drain(task.task_id(), outcome.agreed ? -1 : 15, 30, group_signalled_);
    link_->EndTask();
    if (!outcome.agreed) {
      EndGroup(absl::StrCat("task ", task.task_id(), " ended differently on the ranks (", outcome.status.message(),
                            "); the group cannot be trusted any more"));
    }
    if (task_.stop_reason == kGroupLost) link_->DropTask(task.task_id());
    if (task_.stop_reason == kSignal || group_signalled_) {  // a signal on any rank stops the whole group
      leave_reason_ = "a rank was stopped by a signal";
      break;
    }
    if (task_.storage_fault && !outcome.status.ok() && !WaitUntilWritable(*task_.storage_fault)) break;
    ++tasks;
    if (options_.max_tasks > 0 && tasks >= options_.max_tasks) {
      leave_reason_ = absl::StrCat("served ", tasks, " task(s), --max-tasks ", options_.max_tasks);
      Log().Info(absl::StrCat("served ", tasks, " task(s) (--max-tasks)"));
      break;
    }
  }
  if (Signalled()) {
    leave_reason_ = absl::StrCat("stopped by signal (", StopSignalName(), ")");
    Log().Info(leave_reason_);
  }
  return absl::OkStatus();
}

absl::Status Agent::ServeOther() {
  while (true) {
    std::string msg;
    // Returned, this rank's own failure went unsaid (only rank 0 prints a stop): it ends the group.
    if (absl::Status st = control_.Broadcast(&msg, 0, 0.02, 0); !st.ok()) EndGroup(std::string(st.message()));
    if (msg.empty()) EndGroup("empty control message from rank 0");
    if (msg[0] == kMsgStop) {
      absl::Status st = ParseStopMessage(msg);
      return st.ok() ? st : absl::Status(st.code(), absl::StrCat("rank 0: ", st.message()));
    }
    v1::Task task;
    if (msg[0] != kMsgTask || !task.ParseFromString(msg.substr(1))) {
      EndGroup(absl::StrCat("rank ", control_.rank(), ": unreadable control message from rank 0"));
    }
    Outcome outcome = RunTask(task);
    if (!outcome.agreed) {
      // Rank 0 reports it and ends the group; give it time, then end it from here.
      std::this_thread::sleep_for(std::chrono::seconds(60));
      EndGroup(absl::StrCat("task ", task.task_id(), " ended differently on the ranks; rank 0 did not end the group"));
    }
  }
}

Outcome Agent::RunTask(const v1::Task& task) {
  task_ = TaskState();
  task_.id = task.task_id();
  task_.out_dir = task.out_dir();
  task_.device = RankDevice();
  // The prepare agreement below waits up to 600 s for the peers, the trainer's collectives for
  // rank 0's files up to 1800 s (AtLeast again once the task's comm.timeout_s is known).
  if (watchdog_ && control_.world() > 1) watchdog_->AtLeast(1800 + 60);
  // T1, T2: every rank prepared the task, or every rank skips it.
  absl::StatusOr<PreparedTask> prepared = Prepare(task);
  Outcome agreed = Agree(task_.id, prepared.status(), 600, 0, /*training=*/false);
  if (!agreed.status.ok()) return agreed;
  task_.deadline_s = 2 * prepared->config.comm.timeout_s + 30;
  // Rank 0 may wait that long for a stuck peer before the exchange says which, and up to 1800 s
  // in the collectives that wait for its own files (the trainer's kRankZeroFilesTimeoutS): the
  // watchdog gives it that and a minute (a group of one rank has no peer to wait for).
  if (watchdog_ && control_.world() > 1) watchdog_->AtLeast(std::max(task_.deadline_s, 1800.0) + 60);
  // T3 to T5.
  task_.last_point = Clock::now();
  task_.step_point_sent = false;
  std::vector<EpochRecord> history;
  absl::Status status = Train(task, *prepared, &history);
  if (!status.ok() && !absl::IsCancelled(status)) {
    // A write refused because the coordinator took the lease away is how a cancel heard during
    // the epoch's writes ends: a warning (on every rank: the trainer shares rank 0's mark).
    const std::string line = absl::StrCat("task ", task_.id, " on rank ", control_.rank(), ": ", status.message());
    if (common::IsLeaseRevoked(status)) {
      Log().Warn(line);
    } else {
      Log().Error(line);
    }
  }
  // T6. When one of this rank's collectives timed out (comm.timeout_s: a peer did not arrive),
  // the peers are either here already (one failed alone) or cannot be reached (a network
  // partition between hosts, a hung host). Waiting T6's full deadline would keep a cut-off group
  // alive for 2 x comm.timeout_s + 30 s more; peers that timed out in the same collective arrive
  // within seconds, so give them kT6AfterCommTimeoutS, then end the group (OutOfStep).
  const double t6_deadline =
      absl::IsDeadlineExceeded(status) ? std::min(task_.deadline_s, kT6AfterCommTimeoutS) : task_.deadline_s;
  Outcome outcome = Agree(task_.id, status, t6_deadline, task_.pending_samples, /*training=*/true);
  outcome.history = std::move(history);
  return outcome;
}

absl::StatusOr<Agent::PreparedTask> Agent::Prepare(const v1::Task& task) const {
  const std::string& id = task.task_id();
  PreparedTask prepared;
  AVIARY_ASSIGN_OR_RETURN(prepared.config, common::ParsePipelineConfig(task.pipeline_yaml(), id + " config"));
  AVIARY_ASSIGN_OR_RETURN(prepared.manifest, common::ParseManifestCsv(task.manifest_csv(), id + " manifest"));
  std::error_code ec;
  std::filesystem::create_directories(task.out_dir(), ec);
  if (ec) {
    return absl::UnavailableError(absl::StrCat("rank ", control_.rank(), ": cannot create the run folder '",
                                               task.out_dir(), "': ", ec.message()));
  }
  return prepared;
}

absl::Status Agent::Train(const v1::Task& task, const PreparedTask& prepared, std::vector<EpochRecord>* history) {
  TrainOptions options;
  options.out_dir = task.out_dir();
  options.stage = task.stage();
  options.fold = task.fold();
  options.init_checkpoint = task.init_checkpoint();
  options.manifest = &prepared.manifest;
  options.resume = true;
  options.task_id = task.task_id();
  options.attempt = task.attempt();
  options.device = task_.device;
  if (control_.rank() == 0) {
    options.commit_check = [this](const std::string& path) {
      absl::Status st = link_->CheckLease(path);
      if (!st.ok()) task_.fenced = true;
      return st;
    };
  }
  options.on_step = [this](const StepStats& s) { OnStep(s); };
  options.on_epoch = [this](const EpochRecord& record) { OnEpoch(record); };
  options.should_stop = [this]() { return ShouldStop(); };
  if (watchdog_) options.on_progress = [this]() { watchdog_->Progress("a validation batch"); };
  // A task that ends in an error (or an exception) may end on this rank alone, its peers still
  // in a collective: its communicator is discarded (NCCL: aborted), before the trainer goes, not
  // destroyed, which waited for those peers for ever and kept this rank's error from the
  // coordinator (the group was ended instead). Declared in this order, destroyed in reverse.
  std::unique_ptr<comm::Communicator> communicator;
  std::unique_ptr<Trainer> trainer;
  struct DiscardUnlessDone {
    comm::Communicator* comm = nullptr;
    bool done = false;
    ~DiscardUnlessDone() {
      if (comm != nullptr && !done) comm->Discard();
    }
  } discard;
  try {
    AVIARY_ASSIGN_OR_RETURN(communicator, comm::CreateCommunicator(prepared.config.comm, session_, options.device));
    discard.comm = communicator.get();
    options.comm = communicator.get();
    AVIARY_ASSIGN_OR_RETURN(trainer, Trainer::Create(prepared.config, options));
    if (control_.rank() == 0) PushRestoredEpochs(trainer->history());
    absl::Status status = trainer->Run();
    discard.done = status.ok();
    *history = trainer->history();
    if (control_.rank() == 0 && !status.ok()) {
      task_.storage_fault = common::StorageFaultOf(status);
      if (task_.storage_fault) metrics_->AddStorageFault();
    }
    return status;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("rank ", control_.rank(), ": exception: ", e.what()));
  }
}

std::pair<int64_t, int64_t> Agent::ExchangeSamples(int64_t kind, int64_t decision) {
  std::vector<int64_t> all = Exchange(task_.id, kind, decision, Signalled() ? 1 : 0, task_.pending_samples,
                                      task_.deadline_s, absl::OkStatus());
  task_.pending_samples = 0;
  int64_t samples = 0, signals = 0;
  for (int r = 0; r < control_.world(); ++r) {
    samples += all[kExchangeRow * r + 3];
    signals += all[kExchangeRow * r + 2];
  }
  if (signals != 0) group_signalled_ = true;
  if (control_.rank() == 0) {
    task_.group_samples += samples;
    metrics_->AddSamples(samples);
  }
  return {all[1], signals};  // rank 0's decision
}

bool Agent::ShouldStop() {
  const bool root = control_.rank() == 0;
  if (watchdog_) watchdog_->Progress("a training step");
  auto [decision, signals] = ExchangeSamples(kExStep, root ? static_cast<int64_t>(link_->Decide()) : 0);
  if (root && task_.stop_reason == kNoStop && (decision != 0 || signals != 0)) {
    task_.stop_reason = decision != 0 ? static_cast<StopReason>(decision) : kSignal;
  }
  return decision != 0 || signals != 0;
}

void Agent::OnStep(const StepStats& s) {
  task_.pending_samples += s.samples;
  task_.steps_per_epoch = static_cast<int32_t>(s.steps_per_epoch);
  if (control_.rank() != 0) return;
  metrics_->OnStep(s);
  const double since = SecondsSince(task_.last_point);
  // The first step of a lease at once (watch shows the task moving, and a task shorter than the
  // interval still leaves a step point), then at most every report_interval_s.
  if (task_.step_point_sent && since < options_.report_interval_s && !s.nonfinite_stop) return;
  // A step's samples reach rank 0 with the next step's exchange: at the lease's first point
  // none has, and its rate is not measured (NaN on the wire), not 0.
  const bool first = !task_.step_point_sent;
  task_.step_point_sent = true;
  const double rate =
      first ? kNaN : (task_.group_samples - task_.samples_at_last_point) / std::max(since, 1e-9);
  if (!first) metrics_->SetSamplesPerSecond(rate);
  task_.last_point = Clock::now();
  task_.samples_at_last_point = task_.group_samples;
#if defined(AVIARY_WITH_CUDA_TORCH)
  if (task_.device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(task_.device.index());
    metrics_->SetGpuMemory(task_.device.str(), static_cast<double>(stats.allocated_bytes[0].current));
  }
#endif
  PushStepPoint(s, rate);
}

void Agent::PushStepPoint(const StepStats& s, double rate) {
  Report r;
  r.kind = Report::Kind::kPoint;
  r.task_id = task_.id;
  r.steps_per_epoch = static_cast<int32_t>(s.steps_per_epoch);
  v1::Metrics& m = r.point;
  m.set_epoch(s.epoch);
  m.set_step(s.step);
  m.set_lr(s.lr);
  m.set_train_loss(s.train_loss);
  for (auto set : {&v1::Metrics::set_train_acc, &v1::Metrics::set_val_loss, &v1::Metrics::set_val_auc,
                   &v1::Metrics::set_val_roc_auc, &v1::Metrics::set_val_cmap, &v1::Metrics::set_val_acc}) {
    (m.*set)(kNaN);
  }
  m.set_samples_per_s(rate);
  m.set_samples_total(task_.group_samples);
  m.set_epoch_end(false);
  link_->Push(std::move(r));
}

void Agent::OnEpoch(const EpochRecord& record) {
  if (watchdog_) watchdog_->Progress("an epoch's end");
  ExchangeSamples(kExEpochEnd, 0);  // every rank calls on_epoch at the same point
  if (control_.rank() != 0) return;
  Report point;
  point.kind = Report::Kind::kPoint;
  point.task_id = task_.id;
  point.steps_per_epoch = task_.steps_per_epoch;
  point.point = ToMetrics(record, task_.group_samples);
  task_.epoch_samples[record.epoch] = task_.group_samples;
  link_->Push(std::move(point));
  // best.pt first, then last.pt: the latest checkpoint is the one to resume from.
  if (record.best) PushCheckpoint("best.pt", record.epoch, /*best=*/true);
  PushCheckpoint("last.pt", record.epoch, /*best=*/false);
}

void Agent::PushCheckpoint(const std::string& name, int epoch, bool best) {
  Report r;
  r.kind = Report::Kind::kCheckpoint;
  r.task_id = task_.id;
  r.path = task_.out_dir + "/" + name;
  r.epoch = epoch;
  r.best = best;
  link_->Push(std::move(r));
}

void Agent::PushRestoredEpochs(const std::vector<EpochRecord>& history) {
  if (history.empty()) return;
  // Resuming from last.pt: a killed group may have written epochs whose reports never reached
  // the coordinator. Report the restored epochs again (the coordinator keeps the last report of
  // each epoch), so that the task's history has no hole.
  for (const EpochRecord& record : history) {
    Report point;
    point.kind = Report::Kind::kPoint;
    point.task_id = task_.id;
    point.point = ToMetrics(record, 0);
    link_->Push(std::move(point));
  }
  Log().Info(absl::StrCat("task ", task_.id, ": reported the ", history.size(), " epochs restored from ",
                          task_.out_dir, "/last.pt again"));
}

std::vector<int64_t> Agent::Exchange(const std::string& task_id, int64_t kind, int64_t a, int64_t b, int64_t c,
                                     double deadline_s, const absl::Status& mine) {
  auto all = control_.Exchange(kind, a, b, c, deadline_s, mine);
  if (!all.ok()) OutOfStep(task_id, std::string(all.status().message()));
  return *std::move(all);
}

void Agent::QueueFailure(const std::string& task_id, const std::string& message) {
  Report r;
  r.kind = Report::Kind::kFail;
  r.task_id = task_id;
  r.error = message;
  r.retryable = true;
  link_->Push(std::move(r));
}

void Agent::FailBeforeTheEnd(const std::string& task_id, const std::string& message) {
  QueueFailure(task_id, message);
  link_->Drain(task_id, 15, 5);
}

[[noreturn]] void Agent::OutOfStep(const std::string& task_id, const std::string& why) {
  const std::string message = absl::StrCat("task ", task_id, ": ", why);
  Log().Error(message);
  if (control_.rank() == 0 && link_) {
    FailBeforeTheEnd(task_id, message);  // so that the coordinator re-leases at once
  } else {
    std::this_thread::sleep_for(std::chrono::seconds(30));
  }
  EndGroup(message);
}

void Agent::OnStall(const std::string& task_id, double seconds, const std::string& last) {
  // A stuck training thread cannot stop the task: report it from here, then end the process.
  // What stalled training may block this thread too: a stderr that stopped draining holds the
  // logger's lock inside the training thread's last log line, and this thread's first log line
  // would wait behind it forever while the link's thread, which logs nothing while heartbeats
  // succeed, kept the lease alive. So the process's end is armed before anything else, the
  // lease is given up (a training thread that wakes meanwhile writes nothing into the run folder
  // the next attempt will use) and the report queued before the first log line; the link's own
  // thread sends it.
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(kStallExitS));
    std::_Exit(1);
  }).detach();
  const std::string message = absl::StrFormat(
      "task %s: no progress on rank 0 (or a rank it waits for) for %.0f s (the last sign: %s; --stall-timeout-s "
      "%g): a stuck read, device or deadlock; ending the group so that the task is leased again",
      task_id, seconds, last, options_.stall_timeout_s);
  link_->RevokeLease("the stall watchdog failed the task");
  QueueFailure(task_id, message);
  Log().Error(message);
  link_->Drain(task_id, 15, 5);
  // Not MPI_Abort: MPI runs MPI_THREAD_SERIALIZED and the main thread may be inside a call. A
  // rank that exits without MPI_Finalize makes mpirun end the others.
  common::WriteLineToStderr(absl::StrCat("aviary: rank 0 ends the group: ", message));
  std::_Exit(1);
}

Outcome Agent::Agree(const std::string& task_id, const absl::Status& mine, double deadline_s,
                     int64_t pending_samples, bool training) {
  Outcome out;
  auto all = Exchange(task_id, training ? kExFinished : kExPrepared, static_cast<int64_t>(mine.code()),
                      pending_samples, Signalled() ? 1 : 0, deadline_s, mine);
  if (control_.rank() == 0) {
    for (int r = 0; r < control_.world(); ++r) {
      task_.group_samples += all[kExchangeRow * r + 2];
      if (metrics_) metrics_->AddSamples(all[kExchangeRow * r + 2]);
    }
  }
  for (int r = 0; r < control_.world(); ++r) {
    if (all[kExchangeRow * r + 3] != 0) group_signalled_ = true;
  }
  const Verdict verdict = JudgeOutcome(all, control_.world(), training);
  out.agreed = verdict.agreed;
  if (verdict.blamed < 0) return out;
  std::string message(mine.message());
  absl::Status st = control_.Broadcast(&message, verdict.blamed, 0.005, deadline_s);
  if (!st.ok()) EndGroup(std::string(st.message()));
  const auto code = static_cast<absl::StatusCode>(all[kExchangeRow * verdict.blamed + 1]);
  out.status = absl::Status(code, control_.world() > 1 && !absl::StrContains(message, "rank ")
                                      ? absl::StrCat("rank ", verdict.blamed, ": ", message)
                                      : message);
  return out;
}

bool Agent::WaitUntilWritable(const common::StorageFault& fault) {
  // Room for the write that failed and as much again (the next last.pt beside last.prev.pt).
  const int64_t need = std::max<int64_t>(2 * fault.num_bytes, 1 << 20);
  Backoff backoff(1, 30);
  const auto start = Clock::now();
  while (true) {
    // The folder itself, or its nearest existing ancestor when it was removed meanwhile (its
    // filesystem is what matters; a missing folder must not keep the group out for ever).
    std::filesystem::path dir(fault.dir);
    std::error_code ec;
    while (!std::filesystem::exists(dir, ec) && dir.has_parent_path() && dir.parent_path() != dir) {
      dir = dir.parent_path();
    }
    absl::Status usable = common::ProbeWritable(dir.string(), need);
    if (usable.ok()) {
      Log().Info(absl::StrFormat("%s is writable again (%lld bytes free at least) after %.1f s; leasing again",
                                 dir.string(), static_cast<long long>(need), SecondsSince(start)));
      return true;
    }
    const double delay = backoff.Next();
    Log().Warn(absl::StrFormat("node not usable for tasks: %s; checking again in %.0f s", usable.message(), delay));
    if (!SleepUnlessSignalled(delay)) return false;
  }
}

// Rank 0: the task's outcome for the coordinator.
void Agent::Report0(const v1::Task& task, const Outcome& outcome) {
  Report r;
  r.task_id = task.task_id();
  if (outcome.status.ok()) {
    const EpochRecord* best = nullptr;
    for (const EpochRecord& e : outcome.history) {
      if (e.best) best = &e;
    }
    r.kind = Report::Kind::kComplete;
    r.path = task.out_dir() + "/best.pt";
    if (best == nullptr && !outcome.history.empty()) {
      // The monitor was never defined (no validation rows): the last epoch stands for the best.
      best = &outcome.history.back();
      r.path = task.out_dir() + "/last.pt";
    }
    if (best != nullptr) {
      auto it = task_.epoch_samples.find(best->epoch);  // 0 for an epoch of an earlier lease
      r.point = ToMetrics(*best, it == task_.epoch_samples.end() ? 0 : it->second);
    }
    Log().Info(absl::StrCat("task ", task.task_id(), " done: ", outcome.history.size(), " epochs, best ", r.path));
    link_->Push(std::move(r));
    return;
  }
  // A cancel heard after the epoch's last step asked should_stop (during validation or the
  // epoch's writes) reaches no step: the write it fenced ends the task.
  if (task_.stop_reason == kNoStop && task_.fenced && link_->Decide() == kCancelled) task_.stop_reason = kCancelled;
  if (outcome.agreed && task_.stop_reason == kCancelled && (absl::IsCancelled(outcome.status) || task_.fenced)) {
    // Before the fence's case: a cancel takes the lease away, so a last.pt written after the
    // heartbeat that learned of it (the stop's, or an epoch's end just then) was fenced: a matter
    // of timing, and the cancel is what happened.
    Log().Info(absl::StrCat("task ", task.task_id(), " stopped: cancelled by the coordinator"));
    return;
  }
  if (task_.fenced && outcome.agreed) {
    // The coordinator has leased the task again or will: nothing to report, nothing written.
    Log().Warn(absl::StrCat("task ", task.task_id(), " attempt ", task.attempt(), " abandoned: ",
                            outcome.status.message()));
    return;
  }
  if (absl::IsCancelled(outcome.status) && outcome.agreed) {
    switch (task_.stop_reason) {
      case kCancelled:  // above
        return;
      case kGroupLost:
        Log().Warn(absl::StrCat("task ", task.task_id(), " abandoned: the coordinator no longer knows this group"));
        return;
      case kNoStop:
        // CANCELLED that no stop asked for (an error of that code from deeper down): a failure,
        // retryable, that counts a restart; as a preemption it never would, and a task failing
        // so would be leased again for ever.
        break;
      case kSignal:
        r.kind = Report::Kind::kFail;
        r.error = "stopped by signal";
        r.retryable = true;
        r.preempted = true;
        Log().Info(absl::StrCat("task ", task.task_id(), " stopped by signal; reported as preempted (it is leased "
                                "again without counting a restart)"));
        link_->Push(std::move(r));
        return;
    }
  }
  r.kind = Report::Kind::kFail;
  r.error = std::string(outcome.status.message());
  r.retryable = !outcome.agreed || IsRetryable(outcome.status);
  Log().Error(absl::StrCat("task ", task.task_id(), " failed (", r.retryable ? "retryable" : "not retryable", "): ",
                           r.error));
  link_->Push(std::move(r));
}

}  // namespace

double Backoff::Next() {
  const double d = next_s_;
  next_s_ = std::min(max_s_, next_s_ * 2);
  return d;
}

bool IsRetryable(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kDataLoss:
      return false;
    // NOT_FOUND is retryable: the coordinator read the dataset at submit, so a file missing
    // here is usually this node's view (a shared filesystem not mounted, a checkpoint not yet
    // visible); another group may see it, and max_restarts bounds the retries.
    default:
      return true;
  }
}

absl::Status CheckAgentOptions(const AgentOptions& options) {
  if (options.coordinator.empty()) return absl::InvalidArgumentError("missing required flag --coordinator");
  if (options.device != "auto" && options.device != "cpu" && options.device != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("--device: expected auto, cpu or cuda, got '", options.device, "'"));
  }
  if (options.device == "cuda" && !at::hasCUDA()) {
    return absl::FailedPreconditionError("--device cuda: torch sees no CUDA device");
  }
  return absl::OkStatus();
}

absl::Status ServeAgent(const AgentOptions& options, comm::MpiSession& session) {
  AVIARY_RETURN_IF_ERROR(CheckAgentOptions(options));
  AVIARY_ASSIGN_OR_RETURN(std::unique_ptr<GroupControl> control, GroupControl::Create());
  Agent agent(options, session, *control);
  return agent.Serve();
}

}  // namespace aviary::worker
