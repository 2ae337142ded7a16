// The coordinator's scheduler: jobs as DAGs of tasks, leases held by worker groups while they
// heartbeat, the reaper that re-leases the tasks of lost groups, cancel / completion / failure,
// job-state derivation and job watchers (docs/SERVICE.md, "Jobs and tasks").
//
// State lives in memory for fast reads (GetJob / ListJobs / heartbeats take a reader lock briefly
// and never touch SQLite) and in the Store as the durable log: every mutation is staged on copies,
// written in one SQLite transaction, and only applied to memory once committed, so the memory
// view never runs ahead of the file. Create() restores the state from the store and restarts
// every group's heartbeat clock at that moment (groups that keep heartbeating keep their tasks
// after a coordinator restart).
//
// Request fields are validated at the RPC edge (service.cc); the scheduler checks existence
// (NOT_FOUND) and ownership (FAILED_PRECONDITION).
//
// Thread-safe. The reaper is a thread owned by the scheduler; Shutdown() (or the destructor)
// stops it and wakes every watcher.
#ifndef AVIARY_COORDINATOR_SCHEDULER_H_
#define AVIARY_COORDINATOR_SCHEDULER_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <set>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/config.h"
#include "common/logging.h"
#include "coordinator/fold_cache.h"
#include "coordinator/metrics.h"
#include "coordinator/store.h"
#include "proto/aviary.pb.h"

namespace aviary::coordinator {

struct SchedulerOptions {
  std::string work_dir = "runs";       // made absolute at Create
  double heartbeat_interval_s = 2.0;   // told to groups at registration
  double heartbeat_timeout_s = 20.0;   // a group silent this long is lost
  int max_restarts = 3;
  double reaper_period_s = 0;          // 0: min(1 s, heartbeat_timeout_s / 4)
  // A job finished longer ago than this loses its step points and manifests (PruneFinishedJobs);
  // its state, tasks and epoch-end history stay. <= 0: kept for ever.
  double retention_s = 30 * 86400.0;
  // The folders a job's data paths must resolve into (docs/SERVICE.md, "Security model");
  // realpath-resolved at Create (each must be an existing folder). Empty: every job is refused.
  std::vector<std::string> data_roots;
  // The retained events of a running job (WatchJob's replay for a watcher that fell behind):
  // at most this many bytes of job snapshots, by their serialized size (memory is more), and 128
  // events; the newest commit's events are always kept.
  size_t max_event_bytes_per_job = 16 << 20;
  // GetLogs' lines per answer, at most this many bytes (the first line always): a whole sweep's
  // logs (1024 tasks x 512 KiB) would pass the client's message limit and hold the logs' lock
  // for every group's ShipLogs meanwhile. The answer says `more`; the client asks again.
  size_t max_logs_response_bytes = 16 << 20;
};

// NOT_FOUND naming the job id: the answer for an unknown or deleted job.
absl::Status NoSuchJob(const std::string& job_id);

class Scheduler {
 public:
  // Restores the state from `store` and starts the reaper. `store` must outlive the scheduler;
  // `metrics` may be null.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(const SchedulerOptions& options,
                                                           Store* store,
                                                           CoordinatorMetrics* metrics);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Stops the reaper and ends every WatchJob (UNAVAILABLE). Idempotent.
  void Shutdown();

  // Retention: prunes (Store::PruneJob) every finished job whose last change is older than
  // retention_s and that this process has not pruned yet, then deletes the manifests no task
  // refers to any more (Store::SweepManifests). The reaper calls it every minute.
  // Returns how many jobs it pruned.
  absl::StatusOr<int> PruneFinishedJobs() ABSL_LOCKS_EXCLUDED(mu_, write_mu_);
  // The same with any age (`aviary prune`): jobs finished more than `older_than_s` ago (< 0:
  // retention_s, FAILED_PRECONDITION when that is 0, "keep for ever"; jobs already pruned by
  // this process are skipped). With `dry_run` the same
  // transaction runs and is rolled back: the counts are exact and nothing is removed.
  absl::StatusOr<aviary::v1::PruneJobsResponse> PruneJobs(double older_than_s, bool dry_run)
      ABSL_LOCKS_EXCLUDED(mu_, write_mu_);

  // --- JobService.
  // Parses, resolves and validates the pipeline, reads the dataset and builds every task's
  // manifest (outside the lock), then records the job. Returns the job id. The dataset's tables
  // (hundreds of MB for the whole BirdCLEF pool) are freed before it returns, and the freed heap
  // is given back to the system, so the coordinator's RSS does not keep a submit's peak.
  // `caller_gone` (optional) is asked right before the job is recorded: true (the caller's
  // deadline passed, it cancelled, the server is stopping) records nothing (CANCELLED), so that a
  // caller who saw no answer may submit again without running the job twice.
  absl::StatusOr<std::string> SubmitJob(const aviary::v1::SubmitJobRequest& request,
                                        const std::function<bool()>& caller_gone = {});
  absl::StatusOr<aviary::v1::JobInfo> GetJob(const std::string& job_id) const;
  // Newest first; limit 0 = every job (the RPC asks for at most 10000; 0 there is 1000).
  // `max_bytes` (0: no cap) bounds the jobs' serialized size: the newest that fit, and always the
  // newest one; `*omitted` (optional) gets how many of the `limit` were left out for it, and
  // `*beyond_limit` (optional) how many older jobs the limit left out.
  std::vector<aviary::v1::JobInfo> ListJobs(int limit, size_t max_bytes = 0, int* omitted = nullptr,
                                            int* beyond_limit = nullptr) const;
  absl::StatusOr<aviary::v1::JobInfo> CancelJob(const std::string& job_id);
  // The last report of each epoch of the job's tasks, in task then epoch order. `tasks` (task
  // ids, or names within the job: "finetune-f0"), when not empty: those tasks' rows only;
  // NOT_FOUND naming a task the job does not have.
  absl::StatusOr<aviary::v1::GetHistoryResponse> GetHistory(const std::string& job_id,
                                                            const std::vector<std::string>& tasks = {});
  // Sends the job as it is, then one event per change of the job, until an event leaves the job
  // terminal (OK), `send` returns false or `cancelled` returns true (CANCELLED), or Shutdown
  // (UNAVAILABLE). `cancelled` is polled at least every 500 ms.
  absl::Status WatchJob(const std::string& job_id,
                        const std::function<bool(const aviary::v1::JobEvent&)>& send,
                        const std::function<bool()>& cancelled);

  // --- WorkerService.
  absl::StatusOr<aviary::v1::RegisterGroupResponse> RegisterGroup(
      const aviary::v1::RegisterGroupRequest& request);
  // Renews the group; returns cancel_task. A group that heartbeats without a task has let go of
  // one its row still names (LetGo).
  // `fence_timeout_ms`: the timeout the group's write fence runs on (0: not said); the reaper
  // waits for the longer of it and heartbeat_timeout_s.
  absl::StatusOr<bool> Heartbeat(const std::string& group_id, const std::string& task_id,
                                 int64_t gpu_memory_bytes = 0, int64_t fence_timeout_ms = 0);
  // What a heartbeat's answer tells the group (RegisterGroupResponse's values).
  int32_t heartbeat_interval_ms() const { return static_cast<int32_t>(HeartbeatIntervalMs()); }
  int32_t heartbeat_timeout_ms() const { return static_cast<int32_t>(HeartbeatTimeoutMs()); }
  // A group that already holds a task gets that task again (a retried LeaseTask is harmless).
  // The task carries its manifest's hash and size, not the manifest (GetManifest).
  absl::StatusOr<aviary::v1::LeaseTaskResponse> LeaseTask(const std::string& group_id);
  // Streams the manifest stored under `hash` in chunks of at most 1 MiB to a group whose leased
  // task refers to it (FAILED_PRECONDITION otherwise, NOT_FOUND for an unknown group), until
  // done or `send` returns false (CANCELLED).
  absl::Status GetManifest(const std::string& group_id, const std::string& hash,
                           const std::function<bool(const aviary::v1::ManifestChunk&)>& send);
  // Returns cancel_task.
  absl::StatusOr<bool> ReportProgress(const aviary::v1::ReportProgressRequest& request);
  // Whether the group holds the task (NOT_FOUND for an unknown group), as ReportProgress judges
  // it first: a report refused for its points is answered cancel_task when it is not.
  absl::StatusOr<bool> Holds(const std::string& group_id, const std::string& task_id) const;
  absl::Status ReportCheckpoint(const aviary::v1::ReportCheckpointRequest& request);
  absl::Status CompleteTask(const aviary::v1::CompleteTaskRequest& request);
  absl::Status FailTask(const aviary::v1::FailTaskRequest& request);
  // The holder's CompleteTask was refused as malformed (`refusal`, INVALID_ARGUMENT from the
  // checks of its fields): its agent drops a refused report and leases again, and would get the
  // same task back for ever. The task restarts instead (counted; FAILED at max_restarts) and the
  // group lets go of it. Returns `refusal`; nothing changes when the group does not hold the task.
  // (A FailTask with a malformed message is recorded with the refusal as its message.)
  // `attempt` (the request's; 0: not said): a refusal for an earlier attempt restarts nothing.
  absl::Status RefuseEndOfTask(const std::string& group_id, const std::string& task_id, const char* rpc,
                               const absl::Status& refusal, int attempt = 0) ABSL_LOCKS_EXCLUDED(mu_, write_mu_);
  // A group that ends normally: removed at once, not counted as lost (groups_lost_total and the
  // AviaryWorkerGroupLost alert stay quiet); a task it still holds goes back to READY without a
  // restart, like a preemption. NOT_FOUND for an unknown group.
  absl::Status LeaveGroup(const std::string& group_id, const std::string& reason);

  // --- The web console (coordinator/console.h): a read-only view of the groups.
  struct GroupView {
    GroupRow row;
    double last_heartbeat_age_s = 0;  // since its last call (heartbeat, lease, report)
    int64_t gpu_memory_bytes = 0;     // its last heartbeat's (0: not reported)
    bool has_task = false;
    aviary::v1::TaskInfo task;        // the task it holds, when has_task
  };
  // Every registered group, in group-id order.
  std::vector<GroupView> ConsoleGroups() const ABSL_LOCKS_EXCLUDED(mu_);

  // One reaper pass now; returns the number of groups removed.
  int ReapLostGroups();

  // --- Experiments (scheduler_experiments.cc; docs/SERVICE.md, "Logs, retry, delete").
  // The registered groups, each with the task it holds (if any) and its last heartbeat.
  std::vector<aviary::v1::GroupInfo> ListGroups() const;
  // Failed and cancelled tasks of a FAILED or CANCELLED job become READY again (BLOCKED while
  // their dependency has not succeeded), with their restarts reset and their resume checkpoint
  // kept; the job runs again. FAILED_PRECONDITION for a job in another state.
  absl::StatusOr<aviary::v1::JobInfo> RetryJob(const std::string& job_id);
  // Removes a finished job from memory and the store (its points, checkpoints, manifests, logs);
  // watchers end with NOT_FOUND. FAILED_PRECONDITION while it is PENDING or RUNNING. With
  // `with_run_folders`, the tasks' run folders are deleted too, only where they lie inside the
  // work dir (path_policy); returns the folders removed. With `with_run_folders`,
  // FAILED_PRECONDITION naming the group, task and folder while a group has not let go of a task
  // of the job cancelled or failed under it (it may still be writing the folder; "Fencing").
  // Without, the job goes at once (the group learns it at its next heartbeat).
  absl::StatusOr<std::vector<std::string>> DeleteJob(const std::string& job_id, bool with_run_folders);
  // Appends a registered group's log lines to the task's bounded log (kept in memory: the last
  // kMaxLogBytesPerTask bytes per task, each line counted as its text and kLogLineOverheadBytes,
  // lines cut at kMaxLogLineBytes).
  absl::Status ShipLogs(const aviary::v1::ShipLogsRequest& request);
  // The kept lines of one task of the job ("" = every task) with seq > after_seq, at most the
  // last `limit` per task (0 = all), and the job as it is.
  absl::StatusOr<aviary::v1::GetLogsResponse> GetLogs(const aviary::v1::GetLogsRequest& request) const;

  static constexpr size_t kMaxLogBytesPerTask = 512 << 10;
  static constexpr size_t kMaxLogLineBytes = 2048;
  static constexpr size_t kLogLineOverheadBytes = 128;  // counted per line beside its text
  static constexpr size_t kMaxLogTasks = 1024;  // the least recently written task's log goes first

  const SchedulerOptions& options() const { return options_; }

  // Tests only, set before any heartbeat: runs in a heartbeat that lets go of a lease, between
  // its read of that lease and its write (where a new lease and a cancel may land).
  void SetLetGoHookForTest(std::function<void()> hook) { let_go_hook_for_test_ = std::move(hook); }
  // Tests only: runs in GetManifest before its first chunk is sent (a slow fetch). Not thread-safe
  // with fetches under way.
  void SetManifestHookForTest(std::function<void()> hook) { manifest_hook_for_test_ = std::move(hook); }

 private:
  // PruneJobs but for /metrics (it takes the locks); the pruned tasks' infos go to *gone_series (their /metrics series
  // are removed after the locks).
  absl::StatusOr<aviary::v1::PruneJobsResponse> PruneJobsInStore(double older_than_s, bool dry_run,
                                                                std::vector<aviary::v1::TaskInfo>* gone_series)
      ABSL_LOCKS_EXCLUDED(mu_, write_mu_);
  // `use_cache`: take the manifests of an unchanged dataset version from fold_cache_. Sets
  // `*stale_cache` (and fails) when a cached manifest is no longer stored (pruned since).
  // The dataset tables it read go to `*tables` (freed by the caller after the reply).
  absl::StatusOr<std::string> BuildAndRecordJob(const aviary::v1::SubmitJobRequest& request, bool use_cache,
                                                bool* stale_cache,
                                                std::vector<std::unique_ptr<common::StageTable>>* tables,
                                                const std::function<bool()>& caller_gone);
  // The request's pipeline with `overrides`, data paths resolved against its working_dir,
  // validated, and checked against the data roots.
  // `weights_checked`: the pretrained-weights checks done so far in this submit (by file, model
  // and planes), so that a sweep's points read the file once.
  absl::StatusOr<common::PipelineConfig> ResolveJobConfig(const aviary::v1::SubmitJobRequest& request,
                                                          const std::string& source,
                                                          const std::vector<std::string>& overrides,
                                                          std::map<std::string, absl::Status>* weights_checked) const;
  struct EventSpec {
    std::string job_id;
    std::string task_id;
    bool has_metrics = false;
    aviary::v1::Metrics metrics;
    std::string message;
  };
  struct Job {
    JobRow row;
    std::vector<std::string> task_ids;  // DAG order
    // The job with its tasks as of the last commit; readers copy it outside the lock.
    std::shared_ptr<const aviary::v1::JobInfo> snapshot;
    uint64_t next_event = 0;            // sequence number of the next event
    // The latest events, each with the snapshot after its commit (shared by the events of one
    // commit). The JobEvent sent is made from it by its watcher, outside the lock. At most
    // kMaxEventsPerJob, and at most SchedulerOptions::max_event_bytes_per_job of snapshots: a
    // running sweep's JobInfo holds every task, and each commit (a report) makes a new one.
    struct Event {
      uint64_t seq = 0;
      std::shared_ptr<const aviary::v1::JobInfo> job;
      EventSpec spec;
      size_t bytes = 0;  // the snapshot's size, on the first event holding it (0 on the others)
    };
    std::deque<Event> events;
    size_t event_bytes = 0;  // the sum of events' `bytes`
    size_t snapshot_bytes = 0;  // snapshot's size (RefreshSnapshot)
    // Notified (under mu_) after each commit that adds events, and at Shutdown. Job objects
    // never move (std::map, never erased), so watchers may wait on it. A
    // std::condition_variable_any on mu_ (common::ReaderMutexLockable): its timed wait runs on
    // the steady clock, where absl::CondVar's waited until a wall-clock time (a clock stepped
    // back an hour kept a watcher of a quiet job from noticing its client had gone for an hour).
    mutable std::condition_variable_any watch_cv;
    bool deleted = false;               // DeleteJob: kept (watchers may wait on it), never shown
  };
  struct Group {
    GroupRow row;
    // Steady clock; refreshed and judged under Scheduler::seen_mu_ (FindGroup, the reaper).
    std::atomic<int64_t> last_seen_ms{0};
    bool reaped = false;  // under seen_mu_: the reaper has decided it is lost (FindGroup refuses it)
    std::atomic<int64_t> gpu_memory_bytes{0};  // its last heartbeat's (0: not reported)
    // The heartbeat timeout its write fence runs on: told at registration, said by its heartbeats;
    // for a group registered with an earlier coordinator, the longest that one may have told
    // (the store's counter "groups_fence_timeout_ms") until its first heartbeat says. The reaper waits for
    // the longer of it and heartbeat_timeout_s: a coordinator restarted with a shorter timeout
    // reaped a group whose fence still let it write, and the task's next holder wrote beside it.
    std::atomic<int64_t> fence_timeout_ms{0};
    // The task it was leased last and that lease's attempt (in memory; under mu_): it may still
    // ship that task's last log lines after the task ended, and no other task's.
    std::string last_task_id;
    int last_attempt = 0;
  };
  // Staged changes of one mutation: copies of the rows it changes, written in one transaction,
  // then applied to memory.
  struct Changes {
    std::map<std::string, TaskRow> tasks;
    std::map<std::string, JobRow> jobs;
    std::map<std::string, GroupRow> put_groups;
    std::vector<std::string> deleted_groups;
    std::vector<std::function<absl::Status()>> writes;  // extra store writes
    std::vector<EventSpec> events;
    std::vector<std::pair<aviary::v1::TaskInfo, aviary::v1::Metrics>> points;
    int64_t groups_lost = 0;
    int64_t jobs_failed = 0;  // jobs going to FAILED in this change (WriteChanges counts them)
  };

  Scheduler(const SchedulerOptions& options, Store* store, CoordinatorMetrics* metrics);
  absl::Status Restore() ABSL_LOCKS_EXCLUDED(mu_, write_mu_);
  // At start, after Restore: the run folders a DeleteJob renamed ".<job>.deleting" in the work
  // dir and did not finish removing (the coordinator stopped) are removed, or renamed back where
  // the job is still in the store (its delete did not commit). Logs what it did; never fails.
  void FinishInterruptedRemovals() ABSL_LOCKS_EXCLUDED(mu_, write_mu_);
  // Every group's heartbeat clock restarts now (after a start that answered no heartbeat for a
  // while: the removals above may take minutes on a shared filesystem).
  void RestartHeartbeatClocks() ABSL_LOCKS_EXCLUDED(mu_);
  void ReaperLoop();

  // Staging helpers: read the state (mu_, shared or exclusive) into `changes`.
  TaskRow& Stage(Changes* changes, const std::string& task_id) ABSL_SHARED_LOCKS_REQUIRED(mu_);
  JobRow& StageJob(Changes* changes, const std::string& job_id) ABSL_SHARED_LOCKS_REQUIRED(mu_);
  const TaskRow& View(const Changes& changes, const std::string& task_id) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Puts a leased task back to READY with one more restart, or fails it (and its job) when that
  // would exceed max_restarts. `why` starts the failure message.
  void RestartOrFail(Changes* changes, const std::string& task_id, const std::string& why)
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Fails the task and its job; cancels the job's other unfinished tasks. In a sweep only the
  // failed task's grid point goes (its unfinished tasks, and the tasks that depend on a task
  // that went): the other points train on, and the job ends FAILED when its last task ends.
  void FailTaskAndJob(Changes* changes, const std::string& task_id, const std::string& error)
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Re-derives the job's state from its (staged) tasks: SUCCEEDED when all succeeded, FAILED
  // (naming the first failed task) when all ended and one failed (a sweep's other points ran on).
  void DeriveJobState(Changes* changes, const std::string& job_id) ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // A mutation, step by step: (1) take write_mu_, then mu_ as a reader; (2) stage the rows it
  // changes into a Changes (Stage, StageJob, ...) reading the state under the reader lock;
  // (3) Commit: WriteChanges writes them to SQLite in one transaction (readers still read),
  // then the reader lock becomes exclusive for ApplyChanges only (memory, snapshots, events,
  // watchers woken) and a reader lock again. write_mu_ keeps every other writer out from (1) on,
  // so the state staged in (2) is the state (3) applies to.
  absl::Status Commit(Changes* changes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_)
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::Status WriteChanges(Changes* changes) ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void ApplyChanges(Changes* changes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  aviary::v1::JobInfo BuildJobInfo(const Job& job) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void RefreshSnapshot(Job* job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The task the group holds (LEASED to it), or nullptr.
  const TaskRow* HeldTask(const Group& group) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Group*> FindGroup(const std::string& group_id) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Group commit of leases: a LeaseTask queues itself; the first in line (the leader) takes every
  // queued request, decides them in order (as one LeaseTask after the other would) and commits
  // the leases in one transaction, one fsync, then wakes them. Leases that arrive while a commit
  // is in flight form the next batch, so a start burst of N groups costs a few commits, not N.
  struct LeaseWaiter {
    std::string group_id;
    bool done = false;
    absl::Status status;
    std::optional<TaskRow> leased;  // nullopt: none available
  };
  void DecideLeases(const std::vector<LeaseWaiter*>& batch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_)
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Whether `group` holds task `task_id` (false for an unknown task: deleted with its job).
  bool GroupHolds(const Group& group, const std::string& task_id) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // FAILED_PRECONDITION naming the task, the group and the task's state (or that there is no
  // such task) unless the group holds the task ("...; only the holder may <action>" when
  // `action` is set). Never NOT_FOUND: that tells a group it is not registered.
  absl::Status RequireHolder(const Group& group, const std::string& task_id, absl::string_view action) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Whether task `task_id`'s current attempt was ended by `group`'s CompleteTask (`completed`) or
  // FailTask, and has not been leased since: a report the group sends again after its answer was
  // lost. A CompleteTask matches only with the same best checkpoint.
  bool EndedBy(const Group& group, const std::string& task_id, bool completed,
               const std::string& best_checkpoint) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Whether the group's row still names a task that is no longer leased to it (cancelled, failed
  // by another task of its job, retried since, deleted): the group may still be training it,
  // and writing its run folder, until it learns so. Nobody else leases that task meanwhile
  // (DecideLeases; docs/SERVICE.md, "Fencing").
  bool HoldsStale(const Group& group) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // An outcome for `attempt` (0: not said) of a task the group holds: `*late` when it is for an
  // earlier attempt than the current one (said; the caller answers it as taken);
  // FAILED_PRECONDITION for one past the current attempt.
  absl::Status CheckOutcomeAttempt(const std::string& task_id, int attempt, const std::string& group_id,
                                   const char* rpc, bool* late) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // RefuseEndOfTask with the locks held, for a group that holds `task_id`.
  absl::Status RestartRefusedEnd(const Group& group, const std::string& task_id, const char* rpc,
                                 const absl::Status& refusal) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_)
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The task's run folder and planned epochs, read under a short lock (known false for an
  // unknown task): a task's out_dir never changes, so its files are checked with no lock held.
  struct TaskPlanView {
    bool known = false;
    std::string out_dir;
    int epochs = 0;
  };
  TaskPlanView TaskPlan(const std::string& task_id) const ABSL_LOCKS_EXCLUDED(mu_);
  // The group has let go of `task_id` (it heartbeats without a task, reports the task's outcome,
  // or asks for work): when its row still names that task and it does not hold it, the row's
  // task is cleared (committed). Nothing otherwise.
  absl::Status LetGo(const Group& group, const std::string& task_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_)
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The payload or manifest of task `task_id`, leased to `group_id` in `attempt`, cannot be
  // loaded for good (`error`: DATA_LOSS or NOT_FOUND from the store): the task fails (and its
  // job, as failed tasks do) instead of staying leased for ever, and the group's row lets go of
  // it. Returns the DATA_LOSS to answer, naming the task and the error (FAILED_PRECONDITION when
  // the lease changed meanwhile).
  absl::Status FailUnloadableLease(const std::string& group_id, const std::string& task_id, int attempt,
                                   const absl::Status& error) ABSL_LOCKS_EXCLUDED(mu_, write_mu_);
  void UpdateJobCountsLocked() ABSL_SHARED_LOCKS_REQUIRED(mu_);
  std::string NewId(char prefix) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  int64_t NowMs() const;
  // heartbeat_timeout_s and heartbeat_interval_s in milliseconds, as the groups are told them.
  int64_t HeartbeatTimeoutMs() const { return std::llround(options_.heartbeat_timeout_s * 1000); }
  int64_t HeartbeatIntervalMs() const { return std::llround(options_.heartbeat_interval_s * 1000); }

  const SchedulerOptions options_;
  std::function<void()> let_go_hook_for_test_;
  std::function<void()> manifest_hook_for_test_;
  Store* const store_;
  CoordinatorMetrics* const metrics_;
  common::Logger log_{"scheduler"};

  // Writers (every mutation and the reaper) serialise on write_mu_, stage their changes and write
  // SQLite under a reader lock of mu_, and take mu_ exclusively only to apply the committed
  // changes: status readers never wait for an fsync.
  absl::Mutex write_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  // The store's "groups_fence_timeout_ms" as last written (Restore, ReapLostGroups).
  int64_t fence_counter_ms_ ABSL_GUARDED_BY(write_mu_) = 0;
  bool fence_counter_failing_ ABSL_GUARDED_BY(write_mu_) = false;
  mutable absl::Mutex mu_;
  // Tasks Restore put back from a lease whose holder was not registered (its group row damaged):
  // that group may still be training and writing under its fence, so nobody leases them before
  // this time (NowMs). Written by Restore only, read by DecideLeases.
  std::map<std::string, int64_t> orphan_fence_until_ms_ ABSL_GUARDED_BY(mu_);
  // A group's heartbeat clock: a message from it refreshes last_seen_ms only if the reaper has
  // not judged it lost, and the reaper judges under the same lock, so the two never both act
  // (a heartbeat answered "still yours" while the reaper's commit hands its task on). A leaf:
  // nothing else is taken under it.
  mutable absl::Mutex seen_mu_ ABSL_ACQUIRED_AFTER(mu_);
  std::map<std::string, Job> jobs_ ABSL_GUARDED_BY(mu_);  // never erased: references stay valid
  std::map<int64_t, std::string> job_order_ ABSL_GUARDED_BY(mu_);  // seq -> job id
  std::unordered_map<std::string, TaskRow> tasks_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::unique_ptr<Group>> groups_ ABSL_GUARDED_BY(mu_);
  int64_t next_job_seq_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t groups_lost_total_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t jobs_failed_total_ ABSL_GUARDED_BY(mu_) = 0;  // kept in the store, as groups_lost_total_
  std::mt19937_64 rng_ ABSL_GUARDED_BY(write_mu_);
  std::set<std::string> pruned_ ABSL_GUARDED_BY(write_mu_);  // jobs PruneFinishedJobs has done
  absl::Mutex lease_mu_ ABSL_ACQUIRED_BEFORE(write_mu_);
  std::vector<LeaseWaiter*> lease_queue_ ABSL_GUARDED_BY(lease_mu_);
  bool lease_leader_ ABSL_GUARDED_BY(lease_mu_) = false;
  FoldCache fold_cache_;  // the manifests of recent dataset versions (thread-safe itself)
  // The manifests being streamed by GetManifest, by hash: groups that fetch the same one at once
  // (a new dataset version leased by many groups together) share one inflated copy, which goes
  // when the last of them is done.
  absl::Mutex streaming_mu_;
  std::map<std::string, std::weak_ptr<const std::string>> streaming_ ABSL_GUARDED_BY(streaming_mu_);
  // Per task, the attempt and its last accepted progress point: within one attempt, epochs and
  // steps never go back. A new attempt starts afresh; at restart this is the last stored point of
  // each attempt. The whole point is kept so that a report sent again (its answer was lost, and
  // the group's retry may carry more points behind it) is recognised by its last delivered point
  // and only its new points are taken (ReportProgress).
  struct LastPoint {
    int attempt = 0;
    aviary::v1::Metrics point;
  };
  std::unordered_map<std::string, LastPoint> last_points_ ABSL_GUARDED_BY(write_mu_);

  // Task logs (ShipLogs / GetLogs), in memory only.
  struct TaskLog {
    std::deque<aviary::v1::LogLine> lines;
    size_t bytes = 0;
    int64_t last_seq = 0;
    int64_t dropped = 0;
    // Per group that shipped lines for the task: its highest own line number (ShipLogsRequest).
    std::map<std::string, int64_t> group_seq;
    uint64_t written = 0;  // logs_clock_ at the last append
    int64_t log_id = 0;    // GetLogsResponse.TaskLog.log_id: microseconds since the epoch at its start
  };
  mutable absl::Mutex logs_mu_ ABSL_ACQUIRED_AFTER(mu_);
  std::unordered_map<std::string, TaskLog> logs_ ABSL_GUARDED_BY(logs_mu_);
  uint64_t logs_clock_ ABSL_GUARDED_BY(logs_mu_) = 0;
  int64_t last_log_id_ ABSL_GUARDED_BY(logs_mu_) = 0;  // log_ids increase, across restarts too (the clock)

  // Wakes the reaper at Shutdown. Its wait between passes runs on the steady clock (absl's
  // Notification waited until a wall-clock time: a clock stepped back an hour stopped the
  // reaping of dead groups, and their tasks' new leases, for an hour).
  absl::Mutex reaper_mu_;
  std::condition_variable_any reaper_cv_;
  std::atomic<bool> shutdown_{false};
  std::thread reaper_;
};

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_SCHEDULER_H_
