#include "coordinator/scheduler.h"

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iterator>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include <google/protobuf/util/field_comparator.h>
#include <google/protobuf/util/message_differencer.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "common/backbone_fit.h"
#include "common/catalog.h"
#include "common/config.h"
#include "common/layouts.h"
#include "common/manifest.h"
#include "common/mutex_lockable.h"
#include "common/status.h"
#include "common/utf8.h"
#include "coordinator/content_hash.h"
#include "coordinator/path_policy.h"
#include "coordinator/sweep.h"

namespace aviary::coordinator {

namespace fs = std::filesystem;
using aviary::v1::JobEvent;
using aviary::v1::JobInfo;
using aviary::v1::JobState;
using aviary::v1::TaskInfo;
using aviary::v1::TaskState;

namespace {

constexpr size_t kMaxEventsPerJob = 128;

bool TerminalTask(TaskState state) {
  return state == aviary::v1::TASK_STATE_SUCCEEDED || state == aviary::v1::TASK_STATE_FAILED ||
         state == aviary::v1::TASK_STATE_CANCELLED;
}

// A task's restarts over all its retries (aviary_task_restarts_total).
int RestartsTotal(const TaskInfo& info) { return info.restarts() + info.restarts_before_retry(); }

bool TerminalJob(JobState state) {
  return state == aviary::v1::JOB_STATE_SUCCEEDED || state == aviary::v1::JOB_STATE_FAILED ||
         state == aviary::v1::JOB_STATE_CANCELLED;
}

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string TaskStateName(TaskState state) {
  std::string name = aviary::v1::TaskState_Name(state);
  return name.rfind("TASK_STATE_", 0) == 0 ? name.substr(11) : name;
}

std::string JobStateName(JobState state) {
  std::string name = aviary::v1::JobState_Name(state);
  return name.rfind("JOB_STATE_", 0) == 0 ? name.substr(10) : name;
}

// Makes `path` absolute against `base` when relative (and non-empty).
void Resolve(const std::string& base, std::string* path) {
  if (path->empty() || fs::path(*path).is_absolute()) return;
  *path = (fs::path(base) / *path).lexically_normal().string();
}

absl::Status NotRegistered(const std::string& group_id) {
  return absl::NotFoundError(absl::StrCat(
      "group ", group_id,
      " is not registered (unknown, or removed after missing heartbeats); register again and "
      "abandon its task"));
}

// A store error that a retry cannot mend: the row or the bytes are gone or damaged.
bool PermanentLoadError(const absl::Status& status) {
  return absl::IsDataLoss(status) || absl::IsNotFound(status);
}

// The store's counter of the longest heartbeat timeout the registered groups may have been told
// (Group::fence_timeout_ms).
constexpr char kFenceTimeoutCounter[] = "groups_fence_timeout_ms";

// The augment keys a run reads (worker/augment.cc, worker/frontend.cc): the others set to their
// defaults. A value read only behind a probability of 0 draws nothing and changes nothing (the
// random draws per sample are the same whatever it is): the noise and time-shift keys behind
// audio_augment_prob, noise_std_* behind noise_prob, timeshift_max behind timeshift_prob, each
// mix's alpha behind its probability, a mask's width behind its probability (not the masks'
// counts: they set how many numbers each batch draws).
common::AugmentConfig AugmentWithoutUnreadKeys(const common::AugmentConfig& augment) {
  const common::AugmentConfig defaults;
  common::AugmentConfig out = augment;
  if (augment.audio_augment_prob <= 0) {
    out.noise_prob = defaults.noise_prob;
    out.timeshift_prob = defaults.timeshift_prob;
  }
  if (augment.audio_augment_prob <= 0 || augment.noise_prob <= 0) {
    out.noise_std_min = defaults.noise_std_min;
    out.noise_std_max = defaults.noise_std_max;
  }
  if (augment.audio_augment_prob <= 0 || augment.timeshift_prob <= 0) out.timeshift_max = defaults.timeshift_max;
  if (augment.mixup_prob <= 0) out.mixup_alpha = defaults.mixup_alpha;
  if (augment.cutmix_prob <= 0) out.cutmix_alpha = defaults.cutmix_alpha;
  if (augment.time_mask_prob <= 0) out.time_mask_param = defaults.time_mask_param;
  if (augment.freq_mask_prob <= 0) out.freq_mask_param = defaults.freq_mask_param;
  return out;
}

}  // namespace

absl::Status NoSuchJob(const std::string& job_id) {
  return absl::NotFoundError(absl::StrCat("job_id '", job_id, "': no such job"));
}

Scheduler::Scheduler(const SchedulerOptions& options, Store* store, CoordinatorMetrics* metrics)
    : options_(options), store_(store), metrics_(metrics), rng_(std::random_device{}()), fold_cache_(8, store) {}

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(const SchedulerOptions& options,
                                                             Store* store,
                                                             CoordinatorMetrics* metrics) {
  SchedulerOptions resolved = options;
  if (resolved.work_dir.empty()) return absl::InvalidArgumentError("work_dir is empty");
  std::error_code ec;
  const fs::path absolute = fs::absolute(resolved.work_dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("work_dir ", resolved.work_dir, ": cannot make it absolute: ", ec.message()));
  }
  resolved.work_dir = absolute.lexically_normal().string();
  // Run folders go to the groups in proto strings, and every task row holds one: bytes that are
  // not UTF-8 would make those rows unreadable (gRPC and protobuf refuse them), the database with
  // them.
  if (const size_t bad = common::FirstInvalidUtf8(resolved.work_dir); bad != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key 'work_dir': '", common::ValidUtf8(resolved.work_dir), "' is not UTF-8 (byte ", bad, ", 0x",
        absl::Hex(static_cast<unsigned char>(resolved.work_dir[bad]), absl::kZeroPad2),
        "); run folders are sent to worker groups as UTF-8 text: use a folder whose path is UTF-8"));
  }
  AVIARY_ASSIGN_OR_RETURN(resolved.data_roots, ResolveDataRoots("data_roots", resolved.data_roots));
  if (resolved.reaper_period_s <= 0) {
    resolved.reaper_period_s = std::min(1.0, resolved.heartbeat_timeout_s / 4);
  }
  std::unique_ptr<Scheduler> scheduler(new Scheduler(resolved, store, metrics));
  AVIARY_RETURN_IF_ERROR(scheduler->Restore());
  scheduler->FinishInterruptedRemovals();
  // Restore restarted the groups' clocks, but no heartbeat could arrive during the removals: the
  // reaper's first pass would have taken every group for lost after a slow one.
  scheduler->RestartHeartbeatClocks();
  scheduler->reaper_ = std::thread([s = scheduler.get()] { s->ReaperLoop(); });
  return scheduler;
}

void Scheduler::RestartHeartbeatClocks() {
  absl::ReaderMutexLock lock(&mu_);
  absl::MutexLock seen(&seen_mu_);
  const int64_t now = NowMs();
  for (auto& [id, group] : groups_) group->last_seen_ms = std::max(now, group->last_seen_ms.load());
}

Scheduler::~Scheduler() { Shutdown(); }

void Scheduler::Shutdown() {
  if (!shutdown_.exchange(true)) {
    absl::MutexLock lock(&reaper_mu_);  // the reaper is waiting, or has not checked the flag yet
    reaper_cv_.notify_all();
  }
  if (reaper_.joinable()) reaper_.join();
  // Under the lock, so that a watcher between its check and its wait sees the flag.
  absl::MutexLock lock(&mu_);
  for (auto& [id, job] : jobs_) job.watch_cv.notify_all();
}

int64_t Scheduler::NowMs() const {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string Scheduler::NewId(char prefix) {
  return absl::StrFormat("%c%012x", prefix, rng_() & 0xffffffffffffULL);
}

// ---------------------------------------------------------------------------------------------
// Restore.

absl::Status Scheduler::Restore() {
  AVIARY_ASSIGN_OR_RETURN(std::vector<JobRow> jobs, store_->LoadJobs());
  AVIARY_ASSIGN_OR_RETURN(std::vector<TaskRow> tasks, store_->LoadTasks());
  AVIARY_ASSIGN_OR_RETURN(std::vector<GroupRow> groups, store_->LoadGroups());
  AVIARY_ASSIGN_OR_RETURN(const int64_t groups_lost_total, store_->GetCounter("groups_lost_total"));
  AVIARY_ASSIGN_OR_RETURN(const int64_t fence_told_ms, store_->GetCounter(kFenceTimeoutCounter));
  AVIARY_ASSIGN_OR_RETURN(const int64_t jobs_failed_total, store_->GetCounter("jobs_failed_total"));
  AVIARY_ASSIGN_OR_RETURN(auto epoch_ends, store_->LoadLatestEpochEnds());
  AVIARY_ASSIGN_OR_RETURN(std::vector<PointRow> last_points, store_->LoadLastPoints());
  std::map<std::string, int> reported_attempt;  // task -> the latest attempt that reported a point
  // task -> when that attempt's last point arrived (the last-progress timestamp; the task's
  // updated_unix_ms moves with a retry, a cancel or a preemption too)
  std::map<std::string, int64_t> reported_at_ms;
  {
    // Finished tasks report nothing more (a retry starts a new attempt): their points are not
    // kept, or every task ever run would hold one in memory.
    std::set<std::string> ended;
    for (const TaskRow& task : tasks) {
      if (TerminalTask(task.info.state())) ended.insert(task.info.task_id());
    }
    absl::MutexLock writer(&write_mu_);
    // The longest timeout a registered group may run its fence on, for the next start: this
    // one's, or the earlier one's while groups registered under it remain (ReapLostGroups keeps
    // it as they say theirs or go).
    const int64_t told = groups.empty() ? HeartbeatTimeoutMs() : std::max(HeartbeatTimeoutMs(), fence_told_ms);
    if (told != fence_told_ms) {
      AVIARY_RETURN_IF_ERROR(store_->Transaction([&] { return store_->SetCounter(kFenceTimeoutCounter, told); }));
    }
    fence_counter_ms_ = told;
    // task -> TaskInfo.points_reset_unix_ms: the points stored by then order nothing (of the same
    // millisecond too: the clock's resolution cannot tell which came first)
    std::map<std::string, int64_t> reset_at_ms;
    for (const TaskRow& task : tasks) {
      if (task.info.points_reset_unix_ms() > 0) reset_at_ms[task.info.task_id()] = task.info.points_reset_unix_ms();
    }
    for (const PointRow& row : last_points) {
      int& attempt = reported_attempt[row.task_id];
      if (row.attempt >= attempt) reported_at_ms[row.task_id] = row.time_unix_ms;
      attempt = std::max(attempt, row.attempt);
      if (ended.count(row.task_id) != 0) continue;
      if (auto reset = reset_at_ms.find(row.task_id); reset != reset_at_ms.end() && row.time_unix_ms <= reset->second) {
        continue;
      }
      LastPoint& last = last_points_[row.task_id];
      if (row.attempt >= last.attempt) last = {row.attempt, row.metrics};
    }
  }

  absl::MutexLock lock(&mu_);
  groups_lost_total_ = groups_lost_total;
  jobs_failed_total_ = jobs_failed_total;
  for (JobRow& row : jobs) {
    const std::string id = row.info.job_id();
    next_job_seq_ = std::max(next_job_seq_, row.seq + 1);
    job_order_[row.seq] = id;
    jobs_[id].row = std::move(row);
  }
  for (TaskRow& row : tasks) {
    auto job = jobs_.find(row.info.job_id());
    if (job == jobs_.end()) {
      return absl::DataLossError(absl::StrCat("database ", store_->path(), ": task ",
                                              row.info.task_id(), " belongs to unknown job ",
                                              row.info.job_id()));
    }
    job->second.task_ids.push_back(row.info.task_id());
    tasks_[row.info.task_id()] = std::move(row);
  }
  const int64_t now = NowMs();
  const int64_t timeout_ms = HeartbeatTimeoutMs();
  // Per group, the task it ended last (CompleteTask, FailTask): a group that holds none ships
  // that task's last lines after its outcome, also to a coordinator restarted just then.
  std::map<std::string, const TaskRow*> ended_last;
  for (const auto& [id, task] : tasks_) {
    const std::string& by = task.info.ended_by_group();
    if (by.empty()) continue;
    const TaskRow*& last = ended_last[by];
    if (last == nullptr || task.info.ended_unix_ms() > last->info.ended_unix_ms()) last = &task;
  }
  for (GroupRow& row : groups) {
    auto group = std::make_unique<Group>();
    group->row = std::move(row);
    group->last_seen_ms = now;  // every heartbeat clock restarts now
    // Told by an earlier coordinator, perhaps a longer timeout than this one's.
    group->fence_timeout_ms = std::max(timeout_ms, fence_told_ms);
    // The task it holds is the one whose last log lines it may ship after it ends.
    group->last_task_id = group->row.task_id;
    if (auto task = tasks_.find(group->row.task_id); task != tasks_.end()) {
      group->last_attempt = task->second.info.attempt();
    } else if (auto ended = ended_last.find(group->row.group_id); ended != ended_last.end()) {
      group->last_task_id = ended->second->info.task_id();
      group->last_attempt = ended->second->info.ended_attempt();
    }
    groups_[group->row.group_id] = std::move(group);
  }

  if (metrics_ != nullptr) {
    for (const auto& [id, task] : tasks_) {
      const TaskInfo& info = task.info;
      // A pruned job (retention, aviary prune: its tasks' manifest references are gone) exports
      // no series again.
      if (TerminalJob(jobs_.at(info.job_id()).row.info.state()) && task.manifest_hash.empty()) continue;
      metrics_->SetTaskRunning(info, info.state() == aviary::v1::TASK_STATE_LEASED);
      metrics_->AddTaskRestarts(info, RestartsTotal(info));
      auto end = epoch_ends.find(id);
      if (end != epoch_ends.end()) metrics_->ObservePoint(info, end->second.metrics, end->second.time_unix_ms);
      if (info.has_latest() && !info.latest().epoch_end()) {
        auto at = reported_at_ms.find(id);
        metrics_->ObservePoint(info, info.latest(), at != reported_at_ms.end() ? at->second : info.updated_unix_ms());
      }
      // A leased attempt that has not reported yet has no last-progress timestamp, as before
      // the restart (the points above may be an earlier attempt's).
      auto reported = reported_attempt.find(id);
      if (info.state() == aviary::v1::TASK_STATE_LEASED &&
          (reported == reported_attempt.end() || reported->second < info.attempt())) {
        metrics_->StartAttempt(info);
      }
    }
    metrics_->SetWorkerGroups(static_cast<int>(groups_.size()));
    metrics_->AddGroupsLost(groups_lost_total_);
    metrics_->AddJobsFailed(jobs_failed_total_);
    UpdateJobCountsLocked();
  }
  // A lease whose holder is not registered cannot come from one transaction (but from a damaged
  // group row, skipped); repair it anyway. That group may still be training the task and write
  // its run folder until its fence runs out: the task is not leased again before then.
  Changes repairs;
  const int64_t fence_ms = std::max(timeout_ms, fence_told_ms);
  for (auto& [id, task] : tasks_) {
    if (task.info.state() != aviary::v1::TASK_STATE_LEASED) continue;
    auto group = groups_.find(task.info.group_id());
    if (group == groups_.end() || group->second->row.task_id != id) {
      RestartOrFail(&repairs, id, absl::StrCat("lease held by unregistered group ",
                                               task.info.group_id(), " at restart"));
      if (group == groups_.end()) orphan_fence_until_ms_[id] = now + fence_ms;
    }
  }
  for (auto& [id, job] : jobs_) RefreshSnapshot(&job);
  if (!repairs.tasks.empty()) {
    log_.Warn(absl::StrCat("restore: ", repairs.tasks.size(),
                           " leases without a registered holder were put back; leased again after ", fence_ms / 1000,
                           " s (their group's fence: it may still be training them)"));
    AVIARY_RETURN_IF_ERROR(WriteChanges(&repairs));
    ApplyChanges(&repairs);
  }

  std::vector<std::string> damaged;
  if (const int64_t skipped = store_->TakeDamagedRows(&damaged); skipped > 0) {
    log_.Warn(absl::StrCat("restore: skipped ", skipped,
                           " damaged group or metric-point rows (history and registrations "
                           "only; jobs and tasks are whole); the first: ",
                           absl::StrJoin(damaged, "; ")));
  }
  log_.Info(absl::StrCat("restored ", jobs_.size(), " jobs, ", tasks_.size(), " tasks, ",
                         groups_.size(), " groups from ", store_->path()));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Staging and committing.

TaskRow& Scheduler::Stage(Changes* changes, const std::string& task_id) {
  auto it = changes->tasks.find(task_id);
  if (it != changes->tasks.end()) return it->second;
  return changes->tasks.emplace(task_id, tasks_.at(task_id)).first->second;
}

JobRow& Scheduler::StageJob(Changes* changes, const std::string& job_id) {
  auto it = changes->jobs.find(job_id);
  if (it != changes->jobs.end()) return it->second;
  return changes->jobs.emplace(job_id, jobs_.at(job_id).row).first->second;
}

const TaskRow& Scheduler::View(const Changes& changes, const std::string& task_id) const {
  auto it = changes.tasks.find(task_id);
  return it != changes.tasks.end() ? it->second : tasks_.at(task_id);
}

void Scheduler::RestartOrFail(Changes* changes, const std::string& task_id, const std::string& given_why) {
  // Valid UTF-8 whatever the reason quotes (a path a group's link resolves to): a string field
  // that is not would fail every client's parse of the job, and every watcher's stream.
  const std::string why = common::ValidUtf8(given_why);
  // Only a leased task restarts: an earlier change of the same commit may have ended it (e.g.
  // the reaper failed another task of its job, which cancelled this one).
  if (View(*changes, task_id).info.state() != aviary::v1::TASK_STATE_LEASED) return;
  TaskRow& task = Stage(changes, task_id);
  const int restarts = task.info.restarts() + 1;
  if (restarts > options_.max_restarts) {
    FailTaskAndJob(changes, task_id,
                   absl::StrCat(why, "; ", task.info.restarts(), " restarts, max_restarts ",
                                options_.max_restarts));
    return;
  }
  task.info.set_restarts(restarts);
  task.info.set_state(aviary::v1::TASK_STATE_READY);
  task.info.clear_group_id();
  task.info.set_updated_unix_ms(UnixMs());
  changes->events.push_back({task.info.job_id(), task_id, false, {},
                             absl::StrCat("task ", task_id, " READY again (restart ", restarts,
                                          " of ", options_.max_restarts, "): ", why)});
  DeriveJobState(changes, task.info.job_id());
}

void Scheduler::FailTaskAndJob(Changes* changes, const std::string& task_id,
                               const std::string& given_error) {
  const std::string error = common::ValidUtf8(given_error);  // as in RestartOrFail
  TaskRow& task = Stage(changes, task_id);
  const int64_t now = UnixMs();
  task.info.set_state(aviary::v1::TASK_STATE_FAILED);
  task.info.set_error(error);
  task.info.clear_group_id();
  task.info.set_updated_unix_ms(now);
  const std::string job_id = task.info.job_id();
  const Job& entry = jobs_.at(job_id);
  const bool sweep = entry.row.info.sweep_size() > 0;
  const int point = task.info.sweep_point();
  // A sweep: the tasks other points depend on (a pretraining shared with them) are not this
  // point's to cancel. `gone`: the failed task and the ones cancelled for it; the job's tasks are
  // in DAG order, so a task's dependency is decided before the task.
  std::set<std::string> shared, gone{task_id};
  if (sweep) {
    for (const std::string& id : entry.task_ids) {
      const TaskRow& row = View(*changes, id);
      if (!row.depends_on.empty() && row.info.sweep_point() != View(*changes, row.depends_on).info.sweep_point()) {
        shared.insert(row.depends_on);
      }
    }
  }
  for (const std::string& other : entry.task_ids) {
    if (other == task_id) continue;
    const TaskRow& view = View(*changes, other);
    if (TerminalTask(view.info.state())) continue;
    if (sweep && gone.count(view.depends_on) == 0 &&
        (view.info.sweep_point() != point || shared.count(other) > 0)) {
      continue;  // another grid point's: it trains on
    }
    gone.insert(other);
    TaskRow& row = Stage(changes, other);
    row.info.set_state(aviary::v1::TASK_STATE_CANCELLED);
    row.info.set_error(absl::StrCat("cancelled: task ", task_id, " failed"));
    row.info.clear_group_id();
    row.info.set_updated_unix_ms(now);
  }
  bool others_run = false;  // a sweep's other points, still to end
  for (const std::string& other : entry.task_ids) {
    others_run = others_run || (sweep && other != task_id && !TerminalTask(View(*changes, other).info.state()));
  }
  // The points that end with it: a shared pretraining's failure ends every point it serves.
  std::set<int> points{point};
  for (const std::string& id : gone) points.insert(View(*changes, id).info.sweep_point());
  changes->events.push_back(
      {job_id, task_id, false, {},
       absl::StrCat("task ", task_id, " FAILED: ", error,
                    others_run ? absl::StrCat(points.size() == 1 ? " (sweep point " : " (sweep points ",
                                              absl::StrJoin(points, ", "), "; the other points go on)")
                               : "")});
  if (sweep) {
    DeriveJobState(changes, job_id);  // FAILED once nothing is left to run
    return;
  }
  JobRow& job = StageJob(changes, job_id);
  if (!TerminalJob(job.info.state())) {
    job.info.set_state(aviary::v1::JOB_STATE_FAILED);
    job.info.set_error(absl::StrCat("task ", task_id, " failed: ", error));
    job.info.set_updated_unix_ms(now);
  }
}

void Scheduler::DeriveJobState(Changes* changes, const std::string& job_id) {
  const Job& job = jobs_.at(job_id);
  auto staged = changes->jobs.find(job_id);
  const JobState current =
      staged != changes->jobs.end() ? staged->second.info.state() : job.row.info.state();
  if (TerminalJob(current)) return;
  bool all_succeeded = true;
  bool all_ended = true;
  bool started = false;
  const TaskInfo* failed = nullptr;  // the first failed task (a sweep's points run on after it)
  int failed_count = 0;
  for (const std::string& id : job.task_ids) {
    const TaskInfo& info = View(*changes, id).info;
    if (info.state() != aviary::v1::TASK_STATE_SUCCEEDED) all_succeeded = false;
    if (!TerminalTask(info.state())) all_ended = false;
    if (info.state() == aviary::v1::TASK_STATE_FAILED) {
      if (failed == nullptr) failed = &info;
      ++failed_count;
    }
    if (info.attempt() > 0) started = true;
  }
  const JobState next = all_succeeded                    ? aviary::v1::JOB_STATE_SUCCEEDED
                        : all_ended && failed != nullptr ? aviary::v1::JOB_STATE_FAILED
                        : started                        ? aviary::v1::JOB_STATE_RUNNING
                                                         : aviary::v1::JOB_STATE_PENDING;
  if (next != current) {
    JobRow& row = StageJob(changes, job_id);
    row.info.set_state(next);
    if (next == aviary::v1::JOB_STATE_FAILED) {
      row.info.set_error(absl::StrCat("task ", failed->task_id(), " failed: ", failed->error(),
                                      failed_count > 1 ? absl::StrCat(" (and ", failed_count - 1, " more)") : ""));
    }
    row.info.set_updated_unix_ms(UnixMs());
    changes->events.push_back({job_id, "", false, {},
                               absl::StrCat("job ", job_id, " ", JobStateName(next))});
  }
}

absl::Status Scheduler::Commit(Changes* changes) {
  AVIARY_RETURN_IF_ERROR(WriteChanges(changes));
  // Committed: apply to memory, exclusively (readers waited for none of the above). No other
  // writer runs in between: write_mu_ is held throughout.
  std::vector<std::string> ended;  // their last points go: a finished task reports nothing more
  for (const auto& [id, task] : changes->tasks) {
    if (TerminalTask(task.info.state())) ended.push_back(id);
  }
  mu_.ReaderUnlock();
  mu_.Lock();
  ApplyChanges(changes);
  mu_.Unlock();
  mu_.ReaderLock();
  for (const std::string& id : ended) last_points_.erase(id);
  return absl::OkStatus();
}

absl::Status Scheduler::WriteChanges(Changes* changes) {
  // A job's updated_unix_ms follows its tasks.
  const int64_t now_unix_ms = UnixMs();
  std::set<std::string> task_jobs;
  for (const auto& [id, task] : changes->tasks) task_jobs.insert(task.info.job_id());
  for (const std::string& job_id : task_jobs) {
    StageJob(changes, job_id).info.set_updated_unix_ms(now_unix_ms);
  }
  // Jobs going to FAILED now (from any other state: a retried job that fails again counts again).
  changes->jobs_failed = 0;
  for (const auto& [id, job] : changes->jobs) {
    if (job.info.state() != aviary::v1::JOB_STATE_FAILED) continue;
    auto current = jobs_.find(id);
    if (current == jobs_.end() || current->second.row.info.state() != aviary::v1::JOB_STATE_FAILED) {
      ++changes->jobs_failed;
    }
  }
  const int64_t groups_lost_total = groups_lost_total_;  // the lambda is not analysed under mu_
  const int64_t jobs_failed_total = jobs_failed_total_;
  AVIARY_RETURN_IF_ERROR(store_->Transaction([&]() -> absl::Status {
    for (const auto& [id, task] : changes->tasks) AVIARY_RETURN_IF_ERROR(store_->UpdateTask(task));
    for (const auto& [id, job] : changes->jobs) AVIARY_RETURN_IF_ERROR(store_->PutJob(job));
    for (const auto& [id, group] : changes->put_groups) AVIARY_RETURN_IF_ERROR(store_->PutGroup(group));
    for (const std::string& id : changes->deleted_groups) AVIARY_RETURN_IF_ERROR(store_->DeleteGroup(id));
    for (const auto& write : changes->writes) AVIARY_RETURN_IF_ERROR(write());
    if (changes->groups_lost > 0) {
      AVIARY_RETURN_IF_ERROR(
          store_->SetCounter("groups_lost_total", groups_lost_total + changes->groups_lost));
    }
    if (changes->jobs_failed > 0) {
      AVIARY_RETURN_IF_ERROR(
          store_->SetCounter("jobs_failed_total", jobs_failed_total + changes->jobs_failed));
    }
    return absl::OkStatus();
  }));
  return absl::OkStatus();
}

void Scheduler::ApplyChanges(Changes* changes) {
  std::set<std::string> touched;
  for (const auto& [id, job] : changes->jobs) touched.insert(id);
  for (auto& [id, task] : changes->tasks) {
    touched.insert(task.info.job_id());
    TaskRow& current = tasks_.at(id);
    if (metrics_ != nullptr) {
      if (const int more = RestartsTotal(task.info) - RestartsTotal(current.info); more > 0) {
        metrics_->AddTaskRestarts(task.info, more);
      }
      const bool leased = task.info.state() == aviary::v1::TASK_STATE_LEASED;
      if (leased && (current.info.state() != aviary::v1::TASK_STATE_LEASED ||
                     current.info.attempt() != task.info.attempt())) {
        // A new attempt: its silence counts from its own first report (the earlier attempt's
        // timestamp made AviaryTaskStalled fire on a task leased again after a wait, and kept
        // AviaryTaskNeverReported from ever firing for it).
        metrics_->StartAttempt(task.info);
      }
      metrics_->SetTaskRunning(task.info, leased);
    }
    current = std::move(task);
  }
  bool job_states_changed = false;
  for (auto& [id, job] : changes->jobs) {
    JobRow& current = jobs_.at(id).row;
    if (current.info.state() != job.info.state()) job_states_changed = true;
    current = std::move(job);
  }
  for (auto& [id, group] : changes->put_groups) {
    auto it = groups_.find(id);
    if (it == groups_.end()) {
      auto fresh = std::make_unique<Group>();
      fresh->last_seen_ms = NowMs();
      fresh->fence_timeout_ms = HeartbeatTimeoutMs();  // as RegisterGroup tells it
      it = groups_.emplace(id, std::move(fresh)).first;
    }
    // The task it holds now, else the one it held until this change (a completion clears it).
    const std::string& last = !group.task_id.empty() ? group.task_id : it->second->row.task_id;
    if (!last.empty() && last != it->second->last_task_id) {
      it->second->last_task_id = last;
      auto task = tasks_.find(last);
      it->second->last_attempt = task != tasks_.end() ? task->second.info.attempt() : 0;
    } else if (!group.task_id.empty()) {  // the same task leased again (a retry): its attempt
      auto task = tasks_.find(last);
      if (task != tasks_.end()) it->second->last_attempt = task->second.info.attempt();
    }
    it->second->row = std::move(group);
  }
  for (const std::string& id : changes->deleted_groups) groups_.erase(id);
  groups_lost_total_ += changes->groups_lost;
  jobs_failed_total_ += changes->jobs_failed;
  if (metrics_ != nullptr) {
    for (const auto& [task, point] : changes->points) metrics_->ObservePoint(task, point, UnixMs());
    if (!changes->put_groups.empty() || !changes->deleted_groups.empty()) {
      metrics_->SetWorkerGroups(static_cast<int>(groups_.size()));
    }
    metrics_->AddGroupsLost(changes->groups_lost);
    metrics_->AddJobsFailed(changes->jobs_failed);
    if (job_states_changed) UpdateJobCountsLocked();
  }
  for (const std::string& id : touched) RefreshSnapshot(&jobs_.at(id));
  // Events, after the state they describe.
  for (const EventSpec& spec : changes->events) {
    Job& job = jobs_.at(spec.job_id);
    const bool shared = !job.events.empty() && job.events.back().job == job.snapshot;
    const size_t bytes = shared ? 0 : job.snapshot_bytes;
    job.events.push_back(Job::Event{job.next_event++, job.snapshot, spec, bytes});
    job.event_bytes += bytes;
  }
  std::map<std::string, size_t> event_jobs;  // job id -> events added now
  for (const EventSpec& spec : changes->events) ++event_jobs[spec.job_id];
  for (const auto& [id, added] : event_jobs) {
    Job& job = jobs_.at(id);
    // Bounded memory: a finished job keeps only the events of its final change (a watcher that
    // lags further gets the final state), a running one the latest kMaxEventsPerJob.
    // And at most max_event_bytes_per_job of snapshots, the newest commit's events always.
    const size_t keep = TerminalJob(job.row.info.state()) ? added : kMaxEventsPerJob;
    while (job.events.size() > added &&
           (job.events.size() > keep || job.event_bytes > options_.max_event_bytes_per_job)) {
      Job::Event& front = job.events.front();
      if (job.events.size() > 1 && job.events[1].job == front.job) {
        job.events[1].bytes = front.bytes;  // the next event holds the snapshot now
      } else {
        job.event_bytes -= front.bytes;
      }
      job.events.pop_front();
    }
    job.watch_cv.notify_all();
  }
}

void Scheduler::UpdateJobCountsLocked() {
  if (metrics_ == nullptr) return;
  std::map<JobState, int> counts;
  for (const auto& [id, job] : jobs_) {
    if (!job.deleted) ++counts[job.row.info.state()];
  }
  metrics_->SetJobCounts(counts);
}

void Scheduler::RefreshSnapshot(Job* job) {
  job->snapshot = std::make_shared<const JobInfo>(BuildJobInfo(*job));
  job->snapshot_bytes = job->snapshot->ByteSizeLong();
}

JobInfo Scheduler::BuildJobInfo(const Job& job) const {
  JobInfo info = job.row.info;
  for (const std::string& id : job.task_ids) *info.add_tasks() = tasks_.at(id).info;
  aviary::v1::SweepBest best;
  if (ComputeSweepBest(info, &best)) *info.mutable_sweep_best() = std::move(best);
  return info;
}

const TaskRow* Scheduler::HeldTask(const Group& group) const {
  if (group.row.task_id.empty()) return nullptr;
  auto it = tasks_.find(group.row.task_id);
  if (it == tasks_.end()) return nullptr;
  const TaskInfo& info = it->second.info;
  if (info.state() != aviary::v1::TASK_STATE_LEASED || info.group_id() != group.row.group_id) {
    return nullptr;
  }
  return &it->second;
}

absl::StatusOr<Scheduler::Group*> Scheduler::FindGroup(const std::string& group_id) const {
  auto it = groups_.find(group_id);
  if (it == groups_.end()) return NotRegistered(group_id);
  Group& group = *it->second;
  // Heard from: its heartbeat clock restarts, unless the reaper has judged it lost. Its commit
  // runs under a reader lock of mu_, as this does: refreshing the group then would answer "still
  // yours" (its agent renews its write fence) while the commit hands its task to another group.
  absl::MutexLock seen(&seen_mu_);
  if (group.reaped) {
    return absl::NotFoundError(absl::StrFormat(
        "group %s is lost (no heartbeat for more than heartbeat_timeout_s %g s) and being removed; register "
        "again and abandon its task",
        group_id, options_.heartbeat_timeout_s));
  }
  group.last_seen_ms = std::max(NowMs(), group.last_seen_ms.load());
  return &group;
}

// ---------------------------------------------------------------------------------------------
// JobService.

absl::StatusOr<std::string> Scheduler::SubmitJob(const aviary::v1::SubmitJobRequest& request,
                                                 const std::function<bool()>& caller_gone) {
  bool stale_cache = false;
  std::vector<std::unique_ptr<common::StageTable>> tables;
  absl::StatusOr<std::string> job_id =
      BuildAndRecordJob(request, /*use_cache=*/true, &stale_cache, &tables, caller_gone);
  if (stale_cache) job_id = BuildAndRecordJob(request, /*use_cache=*/false, &stale_cache, &tables, caller_gone);
  // The tables (~200 MB of strings for a BirdCLEF-size pool) freed and the heap trimmed on a
  // thread of their own, after the reply: 30-80 ms that the submit no longer waits for. The
  // thread touches nothing but what it owns.
  std::thread([tables = std::move(tables)]() mutable {
    tables.clear();
#ifdef __GLIBC__
    ::malloc_trim(0);  // glibc keeps freed arenas otherwise: 126 MiB after 3 pool-sized submits
#endif
  }).detach();
  return job_id;
}

absl::StatusOr<common::PipelineConfig> Scheduler::ResolveJobConfig(
    const aviary::v1::SubmitJobRequest& request, const std::string& source, const std::vector<std::string>& overrides,
    std::map<std::string, absl::Status>* weights_checked) const {
  AVIARY_ASSIGN_OR_RETURN(common::PipelineConfig config,
                          common::ParsePipelineConfig(request.pipeline_yaml(), source, overrides));

  // Relative data paths resolve against the client's working directory.
  const std::string& base = request.working_dir();
  std::map<std::string, std::string> relative;  // key -> the relative path as written
  auto check_and_resolve = [&](const std::string& key, std::string* path) -> absl::Status {
    if (path->empty() || fs::path(*path).is_absolute()) return absl::OkStatus();
    if (base.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": key '", key, "': relative path '", *path,
          "' but the request has no working_dir to resolve it against"));
    }
    relative[key] = *path;
    Resolve(base, path);
    return absl::OkStatus();
  };
  // Where a key's value came from: the last --set (or sweep point) that gave it, else the file.
  auto source_of = [&](const std::string& key) {
    for (size_t i = overrides.size(); i-- > 0;) {
      if (absl::StartsWith(overrides[i], key + "=")) {
        return absl::StrCat(static_cast<int>(i) < request.overrides_size() ? "--set " : "sweep point's ",
                            overrides[i]);
      }
    }
    return source;
  };
  AVIARY_RETURN_IF_ERROR(check_and_resolve("data.target.root", &config.data.target.root));
  for (size_t i = 0; i < config.data.pretrain_sources.size(); ++i) {
    AVIARY_RETURN_IF_ERROR(check_and_resolve(absl::StrCat("data.pretrain_sources.", i, ".root"),
                                             &config.data.pretrain_sources[i].root));
  }
  AVIARY_RETURN_IF_ERROR(check_and_resolve("data.corrupt_files", &config.data.corrupt_files));
  AVIARY_RETURN_IF_ERROR(check_and_resolve("data.cache_dir", &config.data.cache_dir));
  AVIARY_RETURN_IF_ERROR(
      check_and_resolve("model.pretrained_weights", &config.model.pretrained_weights));
  AVIARY_RETURN_IF_ERROR(common::Annotate(common::ValidatePipelineConfig(config), source));
  // Every path the workers will read or write lies inside a data root (after realpath).
  std::vector<std::pair<std::string, std::string>> data_paths{
      {"data.target.root", config.data.target.root}};
  for (size_t i = 0; i < config.data.pretrain_sources.size(); ++i) {
    data_paths.emplace_back(absl::StrCat("data.pretrain_sources.", i, ".root"),
                            config.data.pretrain_sources[i].root);
  }
  // And each source's metadata file, which the coordinator itself reads at submit: a link there to
  // a file outside the roots (/etc/passwd) was read, and its first line came back in the error.
  {
    std::vector<std::pair<std::string, const common::SourceConfig*>> sources{{"data.target.root", &config.data.target}};
    for (size_t i = 0; i < config.data.pretrain_sources.size(); ++i) {
      sources.emplace_back(absl::StrCat("data.pretrain_sources.", i, ".root"), &config.data.pretrain_sources[i]);
    }
    for (const auto& [key, source] : sources) {
      absl::StatusOr<common::Layout> layout = common::ParseLayout(source->layout);
      if (!layout.ok() || source->root.empty()) continue;  // ValidatePipelineConfig said it
      const std::string& file = common::GetLayoutSpec(*layout).metadata_file;
      data_paths.emplace_back(absl::StrCat(key, " (its ", file, ")"), absl::StrCat(source->root, "/", file));
    }
  }
  data_paths.emplace_back("data.corrupt_files", config.data.corrupt_files);
  data_paths.emplace_back("data.cache_dir", config.data.cache_dir);
  data_paths.emplace_back("model.pretrained_weights", config.model.pretrained_weights);
  for (const auto& [key, path] : data_paths) {
    absl::Status inside = CheckDataPath(key, path, options_.data_roots);
    if (inside.ok()) continue;
    // A metadata file's key is its root's, with "(its FILE)": the root's source and spelling.
    const std::string root_key = key.substr(0, key.find(" (its "));
    auto written = relative.find(root_key);
    if (written != relative.end()) {
      // The config's folder is not the base: a path relative to it was the likely intent.
      inside = absl::Status(inside.code(), absl::StrCat(inside.message(), " ('", written->second,
                                                        "' is relative: it resolves against the folder the client "
                                                        "ran in, ", base, ", not against the config's folder)"));
    }
    return common::Annotate(inside, source_of(root_key));
  }
  // After the paths: a path outside the data roots is refused as such whatever else is wrong.
  AVIARY_RETURN_IF_ERROR(common::CheckBeforeRun(config, source));
  // The ImageNet backbone file fits the model (the trainer's rule, common/backbone_fit.h) when
  // the coordinator can read it; a file only the workers can read is left to the trainer.
  if (config.model.pretrain == "imagenet") {
    // Once per file, model and planes in a submit (a sweep's points share them).
    const std::string fit_key = absl::StrCat(config.model.pretrained_weights, "\n", config.model.name, "\n",
                                             config.frontend.in_channels);
    auto checked = weights_checked->find(fit_key);
    if (checked == weights_checked->end()) {
      checked = weights_checked
                    ->emplace(fit_key, common::CheckWeightsFile(config.model.pretrained_weights, config.model.name,
                                                                config.frontend.in_channels))
                    .first;
    }
    const absl::Status& fit = checked->second;
    if (absl::IsNotFound(fit) || absl::IsPermissionDenied(fit)) {
      log_.Info(absl::StrCat(source, ": model.pretrained_weights not checked at submit (", fit.message(),
                             "); the trainer checks it"));
    } else {
      AVIARY_RETURN_IF_ERROR(common::Annotate(fit, source));
    }
  }

  return config;
}

absl::StatusOr<std::string> Scheduler::BuildAndRecordJob(const aviary::v1::SubmitJobRequest& request,
                                                         bool use_cache, bool* stale_cache,
                                                         std::vector<std::unique_ptr<common::StageTable>>* tables,
                                                         const std::function<bool()>& caller_gone) {
  const absl::Time submit_started = absl::Now();
  *stale_cache = false;
  const std::string source = request.source_path().empty() ? "<submitted>" : request.source_path();
  // The grid (one point without --sweep); each point's overrides apply after --set.
  AVIARY_ASSIGN_OR_RETURN(const std::vector<std::vector<std::string>> grid, ExpandSweep(request.sweep()));
  const bool sweep = !request.sweep().empty();
  std::vector<common::PipelineConfig> configs;
  std::map<std::string, absl::Status> weights_checked;
  for (size_t p = 0; p < grid.size(); ++p) {
    std::vector<std::string> overrides(request.overrides().begin(), request.overrides().end());
    overrides.insert(overrides.end(), grid[p].begin(), grid[p].end());
    absl::StatusOr<common::PipelineConfig> config = ResolveJobConfig(request, source, overrides, &weights_checked);
    if (!config.ok() && sweep) {
      // The parser names every override "--set K=V": the point's own came from --sweep.
      std::string message(config.status().message());
      for (const std::string& o : grid[p]) message = absl::StrReplaceAll(message, {{"--set " + o, "--sweep " + o}});
      return absl::Status(config.status().code(), absl::StrCat("sweep point ", p, " (", absl::StrJoin(grid[p], ", "),
                                                               "): ", message));
    }
    AVIARY_RETURN_IF_ERROR(config.status());
    configs.push_back(*std::move(config));
  }
  const common::PipelineConfig& config = configs.front();
  // One job shares its dataset: the folds and manifests are built once, from point 0.
  for (size_t p = 1; p < configs.size(); ++p) {
    const common::PipelineConfig& other = configs[p];
    const char* differs = other.seed != config.seed             ? "seed"
                          : other.debug != config.debug         ? "debug"
                          : !(other.data == config.data)         ? "data"
                          : !(other.folds == config.folds)       ? "folds"
                          : !(other.sampling == config.sampling) ? "sampling"
                          : other.stages.at("pretrain").enabled != config.stages.at("pretrain").enabled ||
                                  other.stages.at("finetune").enabled != config.stages.at("finetune").enabled
                              ? "stages.*.enabled"
                          // The points are ranked by one metric (the job's monitor, SweepBest), and
                          // each point's best epoch must be chosen by it too.
                          : other.stages.at("pretrain").train.monitor != config.stages.at("pretrain").train.monitor ||
                                  other.stages.at("finetune").train.monitor != config.stages.at("finetune").train.monitor
                              ? "train.monitor"
                              : nullptr;
    if (differs != nullptr) {
      // Named against point 0 (the grid's first values): the point itself may hold the config's
      // own value ("data.duration=5" refused while point 0 set 3).
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": sweep point ", p, " (", absl::StrJoin(grid[p], ", "), ") changes '", differs,
          "' from point 0 (", absl::StrJoin(grid[0], ", "),
          "), which the tasks of one job share (the dataset, folds, stages and the metric its points are ranked "
          "by); submit one job per value"));
    }
  }

  // Two points that train alike (one value spelled two ways, "1e-3" and "0.001"; a key only a
  // disabled stage reads) would spend the GPU time twice on one result.
  if (sweep) {
    // A point's config as its tasks run it: each stage's train.* (the top-level one merged in;
    // the top-level section itself only feeds inference from the run's config.yaml), a disabled
    // stage as nothing; with `read_only`, less the keys the runs do not read (WithoutUnreadKeys).
    auto runs_of = [&](size_t p, bool read_only) {
      common::PipelineConfig runs = configs[p];
      runs.train = common::TrainConfig{};
      for (auto& [name, stage] : runs.stages) {
        if (!stage.enabled) stage = common::StageConfig{/*enabled=*/false, common::TrainConfig{}};
        if (read_only) stage.train = common::WithoutUnreadKeys(stage.train);
      }
      if (read_only) runs.augment = AugmentWithoutUnreadKeys(runs.augment);
      return common::PipelineConfigToYaml(runs);
    };
    std::map<std::string, size_t> trains;
    std::vector<std::string> reads(configs.size());
    for (size_t p = 0; p < configs.size(); ++p) {
      reads[p] = runs_of(p, true);
      const auto [first, fresh] = trains.emplace(runs_of(p, false), p);
      if (!fresh) {
        return absl::InvalidArgumentError(absl::StrCat(
            source, ": sweep points ", first->second, " (", absl::StrJoin(grid[first->second], ", "), ") and ", p,
            " (", absl::StrJoin(grid[p], ", "), ") train alike (the same config once parsed, the disabled stages "
            "left out); drop one of the values"));
      }
    }
    // A key whose values change nothing the runs read at any values of the other keys (train.lr
    // under the 'cos' schedule): every point of it repeats another's training. A key read at some
    // points only (train.lr swept with train.scheduler [cos, none]) is kept.
    for (int a = 0; a < request.sweep_size(); ++a) {
      if (request.sweep(a).values_size() < 2) continue;
      std::map<std::string, std::vector<size_t>> by_others;  // the other keys' values -> points
      for (size_t p = 0; p < grid.size(); ++p) {
        std::vector<std::string> others = grid[p];
        others.erase(others.begin() + a);
        by_others[absl::StrJoin(others, "\n")].push_back(p);
      }
      bool changes = false;
      for (const auto& [others, points] : by_others) {
        for (size_t i = 1; i < points.size() && !changes; ++i) changes = reads[points[i]] != reads[points[0]];
      }
      if (changes) continue;
      const std::vector<size_t>& pair = by_others.begin()->second;
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": sweep key '", request.sweep(a).key(), "' changes nothing the tasks read (points ", pair[0],
          " (", absl::StrJoin(grid[pair[0]], ", "), ") and ", pair[1], " (", absl::StrJoin(grid[pair[1]], ", "),
          ") train alike): train.lr is read only with train.scheduler none, lr_start, lr_max_per_sample and "
          "lr_ramp_epochs only with the other schedules, lr_min not with step, lr_decay not with cos, "
          "lr_step_epochs only with step, early_stop_min_delta only with early_stop_patience, "
          "ema_warmup_steps only with ema_decay; an augment key only when its probability (and "
          "audio_augment_prob for noise and time shift) is above 0; sweep a key the runs read"));
    }
  }

  const bool pretrain = config.stages.at("pretrain").enabled;
  const bool finetune = config.stages.at("finetune").enabled;
  if (!pretrain && !finetune) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": stages: both pretrain and finetune are disabled; nothing to run"));
  }
  // Fine-tuning has one task per selected fold: without a fold it would not run at all (without
  // pretraining the job had no task and stayed PENDING for ever; with it, the job "succeeded"
  // having pretrained only).
  if (finetune && config.folds.selected_folds.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": key 'folds.selected_folds': expected at least one fold while stages.finetune.enabled is "
                "true (fine-tuning runs one task per selected fold), got an empty list",
        pretrain ? "; set stages.finetune.enabled=false to pretrain only" : "; nothing to run"));
  }

  // One job's tasks are written in one transaction under the writers' lock (every lease and
  // report waits for it), each with its resolved config: a grid of 256 points times hundreds of
  // folds would hold it for minutes and store a gigabyte.
  // Pretraining tasks are shared by the points whose configs agree on everything pretraining
  // reads (they differ only in stages.finetune.*): key = that config as YAML.
  auto pretrain_key = [&](size_t p) {
    common::PipelineConfig reads = configs[p];
    reads.train = reads.stages.at("pretrain").train;
    reads.stages["finetune"] = common::StageConfig{};
    return common::PipelineConfigToYaml(reads);
  };
  std::set<std::string> pretrain_keys;
  for (size_t p = 0; pretrain && p < grid.size(); ++p) pretrain_keys.insert(pretrain_key(p));
  const size_t finetune_tasks = grid.size() * (finetune ? config.folds.selected_folds.size() : 0);
  const size_t most_tasks = pretrain_keys.size() + finetune_tasks;
  if (most_tasks > kMaxTasksPerJob) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": ", most_tasks, " tasks (", pretrain ? absl::StrCat(pretrain_keys.size(), " pretraining + ") : "",
        grid.size(), " sweep point(s) x ", finetune ? config.folds.selected_folds.size() : 0,
        " fold(s) of folds.selected_folds); one job has at most ", kMaxTasksPerJob,
        ": sweep fewer values or select fewer folds, or submit several jobs"));
  }

  struct NewTask {
    TaskRow row;
    TaskPayload payload;
    std::string manifest_deflated;  // of a manifest the store lacks, else ""
    int pretrain_index = -1;  // finetune: the new_tasks index of its pretraining task
  };
  std::vector<NewTask> new_tasks;
  std::map<std::string, int> pretrain_by_config;  // pretrain_key -> its new_tasks index
  std::vector<int> point_pretrain(grid.size(), -1);
  struct BuiltVersion {
    std::string key;
    std::vector<FileStamp> stamps;
    std::map<int, ManifestRef> manifests;
    // An audio folder changed at about the time its files were checked (a dataset unpacking
    // during the submit): the folders are stamped after the checks, so a file that appeared in
    // between would be in the stamp and not in the manifests, for every later submit. Not kept.
    std::string racy_folder;
  };
  // When the stages' files began to be read (wall clock, as file times are); folder times from
  // a second before it on are taken for changes during the read (clock ticks, a file server's
  // clock a little behind).
  int64_t read_started_ns = 0;
  // Per stage: each fold's manifest (the CSV empty when the cache has it stored), its reference
  // and its deflated bytes (made here when the store lacks them, so that the transaction below
  // only inserts them), and the version to record once the job is committed.
  struct StageManifests {
    std::string stage;
    std::vector<int> folds;
    bool cached = false;
    std::map<int, std::pair<std::string, ManifestRef>> manifests;
    std::map<int, std::string> deflated;
    BuiltVersion version;
    std::unique_ptr<common::StageTable> table;  // kept for SubmitJob to free after the reply
    absl::Status status;
  };
  std::vector<StageManifests> stages;
  for (const auto& [stage, enabled, folds] : {std::make_tuple("pretrain", pretrain, std::vector<int>{0}),
                                              std::make_tuple("finetune", finetune, config.folds.selected_folds)}) {
    if (!enabled) continue;
    stages.emplace_back();
    stages.back().stage = stage;
    stages.back().folds = folds;
  }
  // Builds the stage's folds' manifests from its table and stamps the files they came from.
  auto build_manifests = [&](StageManifests* out, absl::StatusOr<common::StageTable> built_table,
                             std::vector<FileStamp> metadata_stamps, absl::Duration read_time) -> absl::Status {
    BuiltVersion& version = out->version;
    version.key = FoldCache::Key(config, out->stage);
    version.stamps = std::move(metadata_stamps);
    AVIARY_RETURN_IF_ERROR(built_table.status());
    out->table = std::make_unique<common::StageTable>(*std::move(built_table));
    const common::StageTable& table = *out->table;
    const absl::Time started = absl::Now();
    // The folders' stamps (a few thousand stat calls) while the manifests are built.
    std::vector<FileStamp> folder_stamps;
    std::thread stamper([&] {
      for (const std::string& path : FoldCache::AudioFolders(table)) folder_stamps.push_back(StampFile(path));
    });
    absl::Status status = [&]() -> absl::Status {
      for (int fold : out->folds) {
        AVIARY_ASSIGN_OR_RETURN(common::TaskManifest manifest, common::BuildTaskManifest(config, table, fold));
        std::string csv = common::ManifestToCsv(manifest);
        ManifestRef ref{Sha256Hex(csv), static_cast<int64_t>(csv.size())};
        AVIARY_ASSIGN_OR_RETURN(bool stored, store_->HasManifest(ref.hash));
        if (!stored) out->deflated[fold] = DeflateManifest(csv);
        version.manifests[fold] = ref;
        out->manifests[fold] = {std::move(csv), ref};
      }
      return absl::OkStatus();
    }();
    stamper.join();
    constexpr int64_t kRacyMarginNs = 1000000000;
    for (const FileStamp& folder : folder_stamps) {
      // ctime: the kernel sets it when an entry is added or removed, and no archive carries it
      // over (tar and rsync -a keep mtimes, a future one from a machine whose clock ran ahead).
      if (folder.exists && folder.ctime_ns >= read_started_ns - kRacyMarginNs) {
        version.racy_folder = folder.path;
        break;
      }
    }
    log_.Info(absl::StrCat("stage ", out->stage, ": ", table.samples.size(), " samples read and checked in ",
                           absl::ToInt64Milliseconds(read_time), " ms; ", out->folds.size(), " manifest(s) in ",
                           absl::ToInt64Milliseconds(absl::Now() - started), " ms"));
    version.stamps.insert(version.stamps.end(), std::make_move_iterator(folder_stamps.begin()),
                          std::make_move_iterator(folder_stamps.end()));
    return status;
  };
  // Dataset and manifests, outside the lock: from the fold cache when this dataset version was
  // built before and none of its files changed, else read and built: the stages' tables from one
  // read of the files (both read the target), then each stage's manifests on a thread of its own.
  // A version another submit is building now is waited for (FoldCache::ClaimForBuild), not
  // built beside it; the claim is held until this job is recorded (or refused) and released
  // when this function returns.
  std::vector<StageManifests*> to_build;
  auto look_up = [&](StageManifests& stage) {
    std::optional<std::map<int, ManifestRef>> cached = fold_cache_.Lookup(FoldCache::Key(config, stage.stage), stage.folds);
    if (!cached) return false;
    stage.cached = true;
    for (int fold : stage.folds) stage.manifests[fold] = {"", cached->at(fold)};
    log_.Info(absl::StrCat("stage ", stage.stage, ": the dataset is unchanged since an earlier submit; its ",
                           stage.folds.size(), " manifest(s) are reused"));
    return true;
  };
  FoldCache::BuildClaim claim;
  if (use_cache) {
    std::vector<std::string> keys;
    for (StageManifests& stage : stages) {
      if (!look_up(stage)) keys.push_back(FoldCache::Key(config, stage.stage));
    }
    if (!keys.empty()) {
      bool waited = false, gave_up = false;
      claim = fold_cache_.ClaimForBuild(keys, &waited, caller_gone, &gave_up);
      if (gave_up) {
        return absl::CancelledError(
            "the caller gave up (its deadline passed or it cancelled) while the submit waited for another submit's "
            "build of the same dataset; nothing was recorded");
      }
      for (StageManifests& stage : stages) {
        if (!stage.cached && !(waited && look_up(stage))) to_build.push_back(&stage);
      }
    }
  } else {
    for (StageManifests& stage : stages) to_build.push_back(&stage);
  }
  if (!to_build.empty()) {
    // The metadata files are stamped before they are read: a change while reading makes the
    // stamp stale, never the manifests.
    std::vector<std::string> names;
    std::vector<std::vector<FileStamp>> metadata_stamps;
    for (StageManifests* stage : to_build) {
      names.push_back(stage->stage);
      metadata_stamps.emplace_back();
      for (const std::string& path : FoldCache::MetadataFiles(config, stage->stage)) {
        metadata_stamps.back().push_back(StampFile(path));
      }
    }
    const absl::Time started = absl::Now();
    read_started_ns = absl::ToUnixNanos(started);
    std::vector<absl::StatusOr<common::StageTable>> built_tables = common::BuildStageTables(config, names);
    const absl::Duration read_time = absl::Now() - started;
    // The read is the long part (minutes for a pool); the manifests would be built for no one.
    if (caller_gone && caller_gone()) {
      return absl::CancelledError(
          "the caller gave up (its deadline passed or it cancelled) while the dataset was read; nothing was recorded");
    }
    std::vector<std::thread> builders;
    for (size_t i = 0; i < to_build.size(); ++i) {
      builders.emplace_back([&, i] {
        to_build[i]->status =
            build_manifests(to_build[i], std::move(built_tables[i]), std::move(metadata_stamps[i]), read_time);
      });
    }
    for (std::thread& builder : builders) builder.join();
  }
  for (StageManifests& stage : stages) {
    if (stage.table != nullptr) tables->push_back(std::move(stage.table));
  }
  std::vector<BuiltVersion> built;  // recorded in the cache once the job is committed
  for (StageManifests& stage : stages) {
    AVIARY_RETURN_IF_ERROR(common::Annotate(stage.status, absl::StrCat("stage ", stage.stage)));
    if (stage.cached) continue;
    if (!stage.version.racy_folder.empty()) {
      log_.Info(absl::StrCat("stage ", stage.stage, ": ", stage.version.racy_folder,
                             " changed while the dataset was read; its manifests are not kept for reuse (the next "
                             "submit reads the files again)"));
      continue;
    }
    built.push_back(std::move(stage.version));
  }
  for (StageManifests& stage_manifests : stages) {
    const std::string& stage = stage_manifests.stage;
    for (int fold : stage_manifests.folds) {
      const auto& [manifest_csv, ref] = stage_manifests.manifests.at(fold);
      const auto deflated = stage_manifests.deflated.find(fold);
      for (size_t p = 0; p < grid.size(); ++p) {
        const common::PipelineConfig& point = configs[p];
        if (stage == "pretrain") {
          auto [it, fresh] = pretrain_by_config.emplace(pretrain_key(p), static_cast<int>(new_tasks.size()));
          point_pretrain[p] = it->second;
          if (!fresh) continue;
        }
        NewTask task;
        task.row.info.set_stage(stage);
        task.row.info.set_fold(fold);
        // As the trainer plans it (worker/trainer.cc): debug runs 2 epochs.
        task.row.info.set_epochs(point.debug ? 2 : point.stages.at(stage).train.epochs);
        task.row.info.set_monitor(point.stages.at(stage).train.monitor);
        task.row.info.set_sweep_point(static_cast<int>(p));
        for (const std::string& o : grid[p]) task.row.info.add_sweep_overrides(o);
        task.row.manifest_hash = ref.hash;
        task.payload.manifest_csv = manifest_csv;
        task.payload.manifest_hash = ref.hash;
        if (deflated != stage_manifests.deflated.end()) task.manifest_deflated = deflated->second;
        task.payload.pipeline_yaml = common::PipelineConfigToYaml(point);
        if (stage == "finetune") task.pretrain_index = point_pretrain[p];
        new_tasks.push_back(std::move(task));
      }
    }
  }

  absl::MutexLock writer(&write_mu_);
  std::string job_id;
  JobRow job_row;
  {
    absl::ReaderMutexLock lock(&mu_);
    do {
      job_id = NewId('j');
    } while (jobs_.count(job_id) != 0);
    const int64_t now = UnixMs();
    job_row.seq = next_job_seq_;
    job_row.info.set_job_id(job_id);
    job_row.info.set_state(aviary::v1::JOB_STATE_PENDING);
    job_row.info.set_name(request.name());
    job_row.info.set_created_unix_ms(now);
    job_row.info.set_updated_unix_ms(now);
    for (const std::string& tag : request.tags()) {
      const size_t eq = tag.find('=');
      (*job_row.info.mutable_tags())[tag.substr(0, eq)] = eq == std::string::npos ? "" : tag.substr(eq + 1);
    }
    job_row.info.set_note(request.note());
    *job_row.info.mutable_sweep() = request.sweep();
    // The sweep's points are ranked by what their final stage's tasks chose their best epoch by
    // (stages.finetune.monitor when set, not train.monitor).
    job_row.info.set_monitor(config.stages.at(finetune ? "finetune" : "pretrain").train.monitor);
    for (size_t i = 0; i < new_tasks.size(); ++i) {
      TaskRow& row = new_tasks[i].row;
      const std::string& stage = row.info.stage();
      const std::string suffix = sweep ? absl::StrCat("-p", row.info.sweep_point()) : "";
      const std::string task_id = absl::StrCat(job_id, "/", stage, "-f", row.info.fold(), suffix);
      row.seq = static_cast<int64_t>(i);
      row.info.set_task_id(task_id);
      row.info.set_job_id(job_id);
      row.info.set_out_dir((fs::path(options_.work_dir) / job_id /
                            absl::StrCat(stage, "-fold", row.info.fold(), suffix))
                               .string());
      row.info.set_updated_unix_ms(now);
      const int dependency = new_tasks[i].pretrain_index;
      if (dependency >= 0) {
        row.depends_on = new_tasks[dependency].row.info.task_id();  // set above: pretrain comes first
        row.info.set_state(aviary::v1::TASK_STATE_BLOCKED);
      } else {
        row.info.set_state(aviary::v1::TASK_STATE_READY);
      }
    }
    // A cached manifest is stored unless pruned since (pruning takes write_mu_ too).
    for (const NewTask& task : new_tasks) {
      if (!task.payload.manifest_csv.empty() || task.payload.manifest_hash.empty()) continue;
      AVIARY_ASSIGN_OR_RETURN(bool stored, store_->HasManifest(task.payload.manifest_hash));
      if (!stored) {
        fold_cache_.Erase(FoldCache::Key(config, task.row.info.stage()));
        *stale_cache = true;
        return absl::FailedPreconditionError("a cached manifest was pruned; building it again");
      }
    }
    // A caller that has given up (a dataset read longer than its --timeout, a coordinator stopping
    // under it) saw no job id: recording the job now would run it twice when it submits again.
    if (caller_gone && caller_gone()) {
      return absl::CancelledError(
          "the caller gave up (its deadline passed or it cancelled) before the job was recorded; nothing was recorded");
    }
    if (shutdown_) return absl::UnavailableError("the coordinator is shutting down; the job was not recorded");
    AVIARY_RETURN_IF_ERROR(store_->Transaction([&]() -> absl::Status {
      AVIARY_RETURN_IF_ERROR(store_->PutJob(job_row));
      for (const NewTask& task : new_tasks) {
        AVIARY_RETURN_IF_ERROR(store_->InsertTask(task.row, task.payload, task.manifest_deflated));
      }
      // The built dataset versions, with the tasks that keep their manifests: a restarted
      // coordinator finds them (FoldCache::Lookup).
      for (const BuiltVersion& version : built) {
        AVIARY_RETURN_IF_ERROR(store_->PutDatasetVersion(
            FoldCache::ToRow(version.key, version.stamps, version.manifests, now), fold_cache_.max_versions()));
      }
      return absl::OkStatus();
    }));
  }
  // Released the reader lock to take mu_ exclusively: write_mu_ keeps other writers out.
  absl::MutexLock exclusive(&mu_);
  ++next_job_seq_;
  Job& job = jobs_[job_id];
  job.row = job_row;
  job_order_[job_row.seq] = job_id;
  for (NewTask& task : new_tasks) {
    job.task_ids.push_back(task.row.info.task_id());
    if (metrics_ != nullptr) metrics_->SetTaskRunning(task.row.info, false);
    if (metrics_ != nullptr) metrics_->AddTaskRestarts(task.row.info, 0);
    tasks_[task.row.info.task_id()] = std::move(task.row);
  }
  RefreshSnapshot(&job);
  UpdateJobCountsLocked();
  for (BuiltVersion& version : built) {
    fold_cache_.Insert(version.key, std::move(version.stamps), std::move(version.manifests));
  }
  log_.Info(absl::StrCat("job ", job_id, " submitted (", source, "): ", new_tasks.size(), " tasks",
                         sweep ? absl::StrCat(", a sweep of ", grid.size(), " points") : "", ", in ",
                         absl::ToInt64Milliseconds(absl::Now() - submit_started), " ms"));
  return job_id;
}

absl::StatusOr<JobInfo> Scheduler::GetJob(const std::string& job_id) const {
  std::shared_ptr<const JobInfo> snapshot;
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = jobs_.find(job_id);
    if (it == jobs_.end() || it->second.deleted) return NoSuchJob(job_id);
    snapshot = it->second.snapshot;
  }
  return *snapshot;  // copied outside the lock
}

std::vector<JobInfo> Scheduler::ListJobs(int limit, size_t max_bytes, int* omitted, int* beyond_limit) const {
  std::vector<std::shared_ptr<const JobInfo>> snapshots;
  size_t listed = 0;
  {
    absl::ReaderMutexLock lock(&mu_);
    listed = limit > 0 ? std::min(job_order_.size(), static_cast<size_t>(limit)) : job_order_.size();
    if (beyond_limit != nullptr) *beyond_limit = static_cast<int>(job_order_.size() - listed);
    size_t bytes = 0;
    for (auto it = job_order_.rbegin(); it != job_order_.rend() && snapshots.size() < listed; ++it) {
      const std::shared_ptr<const JobInfo>& snapshot = jobs_.at(it->second).snapshot;
      if (max_bytes > 0) {
        // A sweep's job carries every grid point's tasks: a few hundred KB each, and 10,000 of
        // them were a GB answer built in the coordinator's memory.
        bytes += snapshot->ByteSizeLong();
        if (bytes > max_bytes && !snapshots.empty()) break;
      }
      snapshots.push_back(snapshot);
    }
  }
  if (omitted != nullptr) *omitted = static_cast<int>(listed - snapshots.size());
  std::vector<JobInfo> out;
  out.reserve(snapshots.size());
  for (const auto& snapshot : snapshots) out.push_back(*snapshot);
  return out;
}

absl::StatusOr<JobInfo> Scheduler::CancelJob(const std::string& job_id) {
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end() || it->second.deleted) return NoSuchJob(job_id);
  if (TerminalJob(it->second.row.info.state())) return *it->second.snapshot;
  Changes changes;
  const int64_t now = UnixMs();
  for (const std::string& id : it->second.task_ids) {
    if (TerminalTask(tasks_.at(id).info.state())) continue;
    TaskRow& task = Stage(&changes, id);
    task.info.set_state(aviary::v1::TASK_STATE_CANCELLED);
    task.info.clear_group_id();
    task.info.set_updated_unix_ms(now);
  }
  JobRow& job = StageJob(&changes, job_id);
  job.info.set_state(aviary::v1::JOB_STATE_CANCELLED);
  job.info.set_error("cancelled by the user");
  job.info.set_updated_unix_ms(now);
  changes.events.push_back({job_id, "", false, {}, absl::StrCat("job ", job_id, " CANCELLED")});
  AVIARY_RETURN_IF_ERROR(Commit(&changes));
  log_.Info(absl::StrCat("job ", job_id, " cancelled"));
  return *it->second.snapshot;
}

namespace {

// Whether `again` is `first` as history.csv gives it back (each value to 6 significant digits;
// samples_total is not in the file).
bool RepeatsEpochEnd(const aviary::v1::Metrics& again, const aviary::v1::Metrics& first) {
  auto same = [](double a, double b) {
    if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
    return std::fabs(a - b) <= 1e-5 * std::max(std::fabs(a), std::fabs(b));
  };
  return again.epoch() == first.epoch() && again.step() == first.step() && same(again.lr(), first.lr()) &&
         same(again.train_loss(), first.train_loss()) && same(again.train_acc(), first.train_acc()) &&
         same(again.val_loss(), first.val_loss()) && same(again.val_auc(), first.val_auc()) &&
         same(again.val_roc_auc(), first.val_roc_auc()) && same(again.val_cmap(), first.val_cmap()) &&
         same(again.val_acc(), first.val_acc()) && same(again.samples_per_s(), first.samples_per_s());
}

}  // namespace

absl::StatusOr<aviary::v1::GetHistoryResponse> Scheduler::GetHistory(const std::string& job_id,
                                                                      const std::vector<std::string>& tasks) {
  std::map<std::string, std::pair<int64_t, const TaskInfo*>> order;
  std::map<std::string, TaskInfo> infos;
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = jobs_.find(job_id);
    if (it == jobs_.end() || it->second.deleted) return NoSuchJob(job_id);
    const std::vector<std::string>& job_tasks = it->second.task_ids;
    if (tasks.empty()) {
      for (const std::string& id : job_tasks) infos[id] = tasks_.at(id).info;
    } else {
      const std::set<std::string> of_job(job_tasks.begin(), job_tasks.end());
      for (const std::string& task : tasks) {
        const std::string id = absl::StrContains(task, '/') ? task : absl::StrCat(job_id, "/", task);
        if (!of_job.count(id)) return absl::NotFoundError(absl::StrCat("job ", job_id, " has no task '", task, "'"));
        if (!infos.count(id)) infos[id] = tasks_.at(id).info;
      }
    }
    for (const auto& [id, info] : infos) order[id] = {tasks_.at(id).seq, &info};
  }
  // A few tasks of a sweep: their rows by the task index, not the job's tens of thousands.
  std::vector<PointRow> points;
  int64_t damaged = 0;
  if (tasks.empty()) {
    AVIARY_ASSIGN_OR_RETURN(points, store_->LoadEpochEnds(job_id, &damaged));
  } else {
    for (const auto& [id, info] : infos) {
      AVIARY_ASSIGN_OR_RETURN(std::vector<PointRow> rows, store_->LoadTaskEpochEnds(id, &damaged));
      std::move(rows.begin(), rows.end(), std::back_inserter(points));
    }
  }
  // The last report of each (task, epoch); but a resumed attempt reports the epochs it restored
  // again (worker/agent: history.csv's 6 significant digits), and such a repeat keeps the report
  // it repeats: the epoch was trained by that attempt, at that time.
  std::map<std::pair<int64_t, int>, PointRow> last;
  for (PointRow& point : points) {
    auto it = order.find(point.task_id);
    if (it == order.end()) continue;
    const std::pair<int64_t, int> key{it->second.first, point.metrics.epoch()};
    auto kept = last.find(key);
    if (kept != last.end() && kept->second.attempt < point.attempt &&
        RepeatsEpochEnd(point.metrics, kept->second.metrics)) {
      continue;
    }
    last[key] = std::move(point);
  }
  aviary::v1::GetHistoryResponse response;
  response.set_damaged_points_skipped(damaged);
  // Named in the log the first time this coordinator meets them (Restore reads only the newest).
  std::vector<std::string> described;
  if (const int64_t first_met = store_->TakeDamagedRows(&described); first_met > 0) {
    log_.Warn(absl::StrCat("history of job ", job_id, ": skipped ", first_met,
                           " damaged metric-point rows (left out of the history; restore the database from a "
                           "backup to get them back); the first: ", absl::StrJoin(described, "; ")));
  }
  for (auto& [key, point] : last) {
    const TaskInfo& info = *order.at(point.task_id).second;
    aviary::v1::HistoryRow* row = response.add_rows();
    row->set_task_id(point.task_id);
    row->set_stage(info.stage());
    row->set_fold(info.fold());
    *row->mutable_metrics() = point.metrics;
    row->set_attempt(point.attempt);
    row->set_time_unix_ms(point.time_unix_ms);
  }
  return response;
}

absl::Status Scheduler::WatchJob(const std::string& job_id,
                                 const std::function<bool(const JobEvent&)>& send,
                                 const std::function<bool()>& cancelled) {
  const Job* found = nullptr;  // Job objects never move (std::map, never erased)
  JobEvent first;
  uint64_t seen = 0;
  {
    absl::ReaderMutexLock lock(&mu_);
    // A watcher that reconnects to a coordinator stopping under it: not one snapshot and then
    // UNAVAILABLE, which it would take as a connection made and retry at once.
    if (shutdown_) return absl::UnavailableError("the coordinator is shutting down");
    auto it = jobs_.find(job_id);
    if (it == jobs_.end() || it->second.deleted) return NoSuchJob(job_id);
    found = &it->second;
    *first.mutable_job() = *found->snapshot;
    first.set_message(absl::StrCat("job ", job_id, " ", JobStateName(found->row.info.state())));
    seen = found->next_event;
  }
  const Job& job = *found;
  if (!send(first)) return absl::CancelledError("the watcher went away");
  if (TerminalJob(first.job().state())) return absl::OkStatus();
  std::vector<Job::Event> batch;  // copied under the lock (a pointer and the spec), sent outside
  while (true) {
    batch.clear();
    {
      absl::ReaderMutexLock lock(&mu_);
      common::ReaderMutexLockable held{&mu_};
      job.watch_cv.wait_for(held, std::chrono::milliseconds(500), [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return shutdown_ || job.deleted || job.next_event > seen;
      });
      if (shutdown_) return absl::UnavailableError("the coordinator is shutting down");
      if (job.deleted) return absl::NotFoundError(absl::StrCat("job ", job_id, " was deleted"));
      if (job.next_event > seen) {
        const bool behind = job.events.empty() || job.events.front().seq > seen;
        if (behind) {
          // The watcher fell behind the retained events: say so with the state as it is now,
          // then send only the retained events of that state (the last commit's: a finished
          // job's stream still ends with "job J SUCCEEDED"). The older ones would take the
          // watcher back in time (tasks LEASED again after SUCCEEDED).
          Job::Event now{0, job.snapshot, {}};
          // console.js reloads the history on this prefix: "(events were dropped".
          now.spec.message = "(events were dropped for a slow watcher) current state";
          batch.push_back(std::move(now));
        }
        for (const Job::Event& event : job.events) {
          if (event.seq >= seen && (!behind || event.job == job.snapshot)) batch.push_back(event);
        }
        seen = job.next_event;
      }
    }
    if (cancelled()) return absl::CancelledError("the watcher went away");
    // Every event of a commit carries the job as it is after the commit: send the whole batch
    // (the change that ends the job has several events, "job J SUCCEEDED" last), then end.
    for (const Job::Event& event : batch) {
      JobEvent out;
      *out.mutable_job() = *event.job;
      out.set_task_id(event.spec.task_id);
      if (event.spec.has_metrics) *out.mutable_metrics() = event.spec.metrics;
      out.set_message(event.spec.message);
      if (!send(out)) return absl::CancelledError("the watcher went away");
    }
    if (!batch.empty() && TerminalJob(batch.back().job->state())) return absl::OkStatus();
  }
}

std::vector<Scheduler::GroupView> Scheduler::ConsoleGroups() const {
  std::vector<GroupView> views;
  const int64_t now = NowMs();
  absl::ReaderMutexLock lock(&mu_);
  views.reserve(groups_.size());
  for (const auto& [id, group] : groups_) {
    GroupView view;
    view.row = group->row;
    view.last_heartbeat_age_s = std::max<int64_t>(0, now - group->last_seen_ms.load()) / 1000.0;
    view.gpu_memory_bytes = group->gpu_memory_bytes.load();
    if (const TaskRow* held = HeldTask(*group); held != nullptr) {
      view.has_task = true;
      view.task = held->info;
    }
    views.push_back(std::move(view));
  }
  return views;
}

// ---------------------------------------------------------------------------------------------
// WorkerService.

absl::StatusOr<aviary::v1::RegisterGroupResponse> Scheduler::RegisterGroup(
    const aviary::v1::RegisterGroupRequest& request) {
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  GroupRow row;
  Group* again = nullptr;
  if (!request.registration_id().empty()) {
    for (const auto& [id, group] : groups_) {
      if (group->row.info.registration_id() == request.registration_id()) again = group.get();
    }
  }
  if (again != nullptr) {
    // The answer to the first call was lost; the group is the one it registered. It could not
    // heartbeat without its id: it has been heard from now.
    if (!google::protobuf::util::MessageDifferencer::Equals(again->row.info, request)) {
      return absl::InvalidArgumentError(absl::StrCat("field 'registration_id': '", request.registration_id(),
                                                     "' registered group ", again->row.group_id,
                                                     " with other details (world_size, hosts, devices, ...); "
                                                     "a registration sent again must be the same"));
    }
    row = again->row;
    again->last_seen_ms = NowMs();
    log_.Info(absl::StrCat("group ", row.group_id, " sent its registration again (the answer was lost)"));
  } else {
    Changes changes;
    do {
      row.group_id = NewId('g');
    } while (groups_.count(row.group_id) != 0);
    row.registered_unix_ms = UnixMs();
    row.info = request;
    changes.put_groups[row.group_id] = row;
    AVIARY_RETURN_IF_ERROR(Commit(&changes));
    log_.Info(absl::StrCat("group ", row.group_id, " registered: world_size ", request.world_size(),
                           ", backend ", request.backend(), ", hosts ",
                           request.hosts_size() > 0 ? request.hosts(0) : "?",
                           request.hosts_size() > 1 ? ", ..." : ""));
  }
  aviary::v1::RegisterGroupResponse response;
  response.set_group_id(row.group_id);
  response.set_heartbeat_interval_ms(static_cast<int32_t>(HeartbeatIntervalMs()));
  response.set_heartbeat_timeout_ms(static_cast<int32_t>(HeartbeatTimeoutMs()));
  return response;
}

absl::StatusOr<bool> Scheduler::Heartbeat(const std::string& group_id, const std::string& task_id,
                                          int64_t gpu_memory_bytes, int64_t fence_timeout_ms) {
  // The lease the group has let go of: its task and that task's attempt (each lease adds one).
  std::string stale_task;
  int stale_attempt = 0;
  {
    absl::ReaderMutexLock lock(&mu_);
    AVIARY_ASSIGN_OR_RETURN(Group * group, FindGroup(group_id));
    group->gpu_memory_bytes = gpu_memory_bytes;
    if (fence_timeout_ms > 0) group->fence_timeout_ms = fence_timeout_ms;
    const TaskRow* held = HeldTask(*group);
    const bool cancel = !task_id.empty() && (held == nullptr || held->info.task_id() != task_id);
    // The usual heartbeat: nothing to write. A group still running a task it no longer holds
    // is told to stop, again and again: an answer lost on its way must not count as heard.
    if (!task_id.empty() || !HoldsStale(*group)) return cancel;
    stale_task = group->row.task_id;
    auto it = tasks_.find(stale_task);
    stale_attempt = it == tasks_.end() ? 0 : it->second.info.attempt();
  }
  if (let_go_hook_for_test_) let_go_hook_for_test_();
  // The group runs no task while its row still names one it no longer holds: it has let go.
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  AVIARY_ASSIGN_OR_RETURN(Group * group, FindGroup(group_id));
  // Of that lease only. A heartbeat carries no attempt: one sent before the group leased again
  // (another task, or this one retried) and answered after that lease was cancelled too would
  // otherwise lift the fence on a task the group may be training now, and a second group could
  // lease it into the same run folder. The group's next heartbeat lets go of that one.
  auto it = tasks_.find(stale_task);
  if ((it == tasks_.end() ? 0 : it->second.info.attempt()) != stale_attempt) return false;
  AVIARY_RETURN_IF_ERROR(LetGo(*group, stale_task));
  return false;
}

void Scheduler::DecideLeases(const std::vector<LeaseWaiter*>& batch) {
  Changes changes;
  std::vector<LeaseWaiter*> staged;  // the waiters whose lease is in `changes`
  std::vector<LeaseWaiter*> let_go;  // the waiters whose group lets go of a task in `changes`
  std::vector<std::string> points_reset;  // held tasks leased again: their point ordering starts afresh
  // Tasks that a registered group may still be training (cancelled or failed under it, retried
  // since): nobody else leases them until that group lets go (never two writers of one run
  // folder; docs/SERVICE.md, "Fencing"). Task id -> those groups.
  std::map<std::string, std::set<std::string>> stopping;
  for (const auto& [id, group] : groups_) {
    if (HoldsStale(*group)) stopping[group->row.task_id].insert(id);
  }
  for (LeaseWaiter* waiter : batch) {
    const std::string& group_id = waiter->group_id;
    absl::StatusOr<Group*> group = FindGroup(group_id);
    if (!group.ok()) {
      waiter->status = group.status();
      continue;
    }
    // A group the batch leased to already (the same request twice): that task again.
    if (auto it = changes.put_groups.find(group_id);
        it != changes.put_groups.end() && !it->second.task_id.empty()) {
      waiter->leased = View(changes, it->second.task_id);
      staged.push_back(waiter);
      continue;
    }
    if (const TaskRow* held = HeldTask(**group)) {
      // The group asks for work while holding a task: it has dropped the task (a failed manifest
      // fetch, or its lease fence ran out while the coordinator was away) and resumes it from its
      // checkpoint, possibly behind its last report. The attempt stays (docs/SERVICE.md,
      // "Fencing"); its progress points start afresh, as a new attempt's do: in the store too
      // (TaskInfo.points_reset_unix_ms), or a restart before its first report restored the
      // ordering from its old points and refused the resumed run's.
      const std::string held_id = held->info.task_id();
      points_reset.push_back(held_id);  // in memory once committed
      Stage(&changes, held_id).info.set_points_reset_unix_ms(UnixMs());
      changes.put_groups[group_id] = (*group)->row;  // unchanged: the lease it holds
      staged.push_back(waiter);
      continue;
    }
    if (HoldsStale(**group) && changes.put_groups.count(group_id) == 0) {
      // Asking for work, it has let go of the task its row still names.
      stopping[(*group)->row.task_id].erase(group_id);
      GroupRow row = (*group)->row;
      row.task_id.clear();
      changes.put_groups[group_id] = row;
      let_go.push_back(waiter);
    }
    // The oldest READY task, as staged by the leases before this one in the batch.
    std::string next;
    for (const auto& [seq, job_id] : job_order_) {
      const Job& job = jobs_.at(job_id);
      if (TerminalJob(job.row.info.state())) continue;
      for (const std::string& id : job.task_ids) {
        if (View(changes, id).info.state() != aviary::v1::TASK_STATE_READY) continue;
        if (auto fence = stopping.find(id); fence != stopping.end() && !fence->second.empty()) continue;
        if (auto orphan = orphan_fence_until_ms_.find(id); orphan != orphan_fence_until_ms_.end()) {
          if (NowMs() < orphan->second) continue;
        }
        next = id;
        break;
      }
      if (!next.empty()) break;
    }
    if (next.empty()) continue;  // none available
    TaskRow& task = Stage(&changes, next);
    task.info.set_state(aviary::v1::TASK_STATE_LEASED);
    task.info.set_group_id(group_id);
    task.info.set_attempt(task.info.attempt() + 1);
    task.info.clear_error();
    task.info.set_updated_unix_ms(UnixMs());
    GroupRow group_row = (*group)->row;
    group_row.task_id = next;
    changes.put_groups[group_id] = group_row;
    changes.events.push_back({task.info.job_id(), next, false, {},
                              absl::StrCat("task ", next, " LEASED to group ", group_id,
                                           " (attempt ", task.info.attempt(), ")")});
    DeriveJobState(&changes, task.info.job_id());
    staged.push_back(waiter);
  }
  if (staged.empty() && let_go.empty()) return;
  // The tasks as leased (a later DeriveJobState of the batch does not touch them).
  for (LeaseWaiter* waiter : staged) {
    waiter->leased = View(changes, changes.put_groups.at(waiter->group_id).task_id);
  }
  const absl::Status committed = Commit(&changes);
  if (!committed.ok()) {
    for (LeaseWaiter* waiter : let_go) waiter->status = committed;
  } else {
    for (const std::string& id : points_reset) last_points_.erase(id);
  }
  std::set<std::string> logged;  // a group that asked twice is logged once
  for (LeaseWaiter* waiter : staged) {
    if (!committed.ok()) {
      waiter->status = committed;
      waiter->leased.reset();
      continue;
    }
    if (!logged.insert(waiter->group_id).second) continue;
    log_.Info(absl::StrCat("task ", waiter->leased->info.task_id(), " leased to group ", waiter->group_id,
                           " (attempt ", waiter->leased->info.attempt(), ")"));
  }
}

absl::StatusOr<aviary::v1::LeaseTaskResponse> Scheduler::LeaseTask(const std::string& group_id) {
  LeaseWaiter me;
  me.group_id = group_id;
  {
    absl::MutexLock queue(&lease_mu_);
    lease_queue_.push_back(&me);
    // Answered by a leader's batch, or the leader now (none is, and this request is still queued).
    auto answered_or_no_leader = [this, &me]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(lease_mu_) {
      return me.done || !lease_leader_;
    };
    lease_mu_.Await(absl::Condition(&answered_or_no_leader));
    if (!me.done) {
      lease_leader_ = true;
      std::vector<LeaseWaiter*> batch;
      batch.swap(lease_queue_);
      lease_mu_.Unlock();
      {
        absl::MutexLock writer(&write_mu_);
        absl::ReaderMutexLock lock(&mu_);
        DecideLeases(batch);
      }
      lease_mu_.Lock();
      for (LeaseWaiter* waiter : batch) waiter->done = true;
      lease_leader_ = false;
    }
  }
  AVIARY_RETURN_IF_ERROR(me.status);
  if (!me.leased) {
    aviary::v1::LeaseTaskResponse none;
    none.set_available(false);
    return none;
  }
  const TaskRow& leased = *me.leased;
  // A payload or manifest that cannot be loaded for good fails the task: left leased, every
  // retried LeaseTask would hand back the same task and the same error, for ever.
  auto load_failed = [&](const absl::Status& error) {
    if (!PermanentLoadError(error)) return error;  // e.g. a busy database: the group retries
    return FailUnloadableLease(group_id, leased.info.task_id(), leased.info.attempt(), error);
  };
  absl::StatusOr<TaskPayload> loaded = store_->LoadTaskPayload(leased.info.task_id());
  if (!loaded.ok()) return load_failed(loaded.status());
  TaskPayload& payload = *loaded;
  aviary::v1::LeaseTaskResponse response;
  response.set_available(true);
  aviary::v1::Task* task = response.mutable_task();
  task->set_task_id(leased.info.task_id());
  task->set_job_id(leased.info.job_id());
  task->set_stage(leased.info.stage());
  task->set_fold(leased.info.fold());
  task->set_pipeline_yaml(std::move(payload.pipeline_yaml));
  task->set_init_checkpoint(leased.init_checkpoint);
  task->set_resume_checkpoint(leased.resume_checkpoint);
  task->set_out_dir(leased.info.out_dir());
  if (!payload.manifest_hash.empty()) {
    absl::StatusOr<int64_t> size = store_->ManifestSize(payload.manifest_hash);
    if (!size.ok()) return load_failed(size.status());
    task->set_manifest_hash(payload.manifest_hash);
    task->set_manifest_size(*size);
  }
  task->set_attempt(leased.info.attempt());
  return response;
}

absl::Status Scheduler::GetManifest(const std::string& group_id, const std::string& hash,
                                    const std::function<bool(const aviary::v1::ManifestChunk&)>& send) {
  std::string held_id;
  int held_attempt = 0;
  {
    absl::ReaderMutexLock lock(&mu_);
    AVIARY_ASSIGN_OR_RETURN(Group * group, FindGroup(group_id));
    const TaskRow* held = HeldTask(*group);
    if (held == nullptr || held->manifest_hash != hash) {
      return absl::FailedPreconditionError(absl::StrCat("group ", group_id, " holds no task whose manifest is ",
                                                        hash, held == nullptr ? " (it holds no task)" : ""));
    }
    held_id = held->info.task_id();
    held_attempt = held->info.attempt();
  }
  std::shared_ptr<const std::string> shared;
  absl::Status load_error;
  {
    absl::MutexLock lock(&streaming_mu_);  // held while loading: concurrent fetchers wait for one load
    for (auto it = streaming_.begin(); it != streaming_.end();) {  // drop the finished ones
      it = it->second.expired() ? streaming_.erase(it) : std::next(it);
    }
    auto it = streaming_.find(hash);
    if (it != streaming_.end()) shared = it->second.lock();
    if (shared == nullptr) {
      absl::StatusOr<std::string> loaded = store_->LoadManifest(hash);
      if (loaded.ok()) {
        shared = std::make_shared<const std::string>(*std::move(loaded));
        streaming_[hash] = shared;
      } else {
        load_error = loaded.status();
      }
    }
  }
  if (!load_error.ok()) {
    // As in LeaseTask: a manifest that cannot be loaded for good fails the task that needs it.
    if (!PermanentLoadError(load_error)) return load_error;
    return FailUnloadableLease(group_id, held_id, held_attempt, load_error);
  }
  const std::string& csv = *shared;
  if (manifest_hook_for_test_) manifest_hook_for_test_();
  constexpr size_t kChunk = size_t{1} << 20;
  aviary::v1::ManifestChunk chunk;
  size_t offset = 0;
  do {
    const size_t n = std::min(kChunk, csv.size() - offset);
    chunk.set_data(csv.data() + offset, n);
    chunk.set_offset(static_cast<int64_t>(offset));
    chunk.set_total_size(static_cast<int64_t>(csv.size()));
    if (!send(chunk)) return absl::CancelledError(absl::StrCat("manifest ", hash, ": the group stopped reading"));
    offset += n;
  } while (offset < csv.size());
  return absl::OkStatus();
}

bool Scheduler::GroupHolds(const Group& group, const std::string& task_id) const {
  const TaskRow* held = HeldTask(group);
  return held != nullptr && held->info.task_id() == task_id;
}

// The worker's link (worker/agent/coordinator_link.cc TakenAwayByAUser) reads these words: it
// logs reports refused "(state CANCELLED)" (a user's cancel, or the job's cancel after another
// task failed, which that task reports), "(state READY|BLOCKED)" (a cancel, then a retry) or
// "no such task" (a cancel, then a delete) as a warning.
absl::Status Scheduler::RequireHolder(const Group& group, const std::string& task_id,
                                      absl::string_view action) const {
  if (GroupHolds(group, task_id)) return absl::OkStatus();
  auto it = tasks_.find(task_id);
  return absl::FailedPreconditionError(absl::StrCat(
      "task ", task_id, " is not leased to group ", group.row.group_id,
      it == tasks_.end() ? absl::StrCat(" (task_id '", task_id, "': no such task; its job was deleted)")
                         : absl::StrCat(" (state ", TaskStateName(it->second.info.state()), ")"),
      action.empty() ? "" : absl::StrCat("; only the holder may ", action)));
}

bool Scheduler::EndedBy(const Group& group, const std::string& task_id, bool completed,
                        const std::string& best_checkpoint) const {
  auto it = tasks_.find(task_id);
  if (it == tasks_.end()) return false;
  const aviary::v1::TaskInfo& info = it->second.info;
  if (info.ended_by_group().empty() || info.ended_by_group() != group.row.group_id ||
      info.ended_attempt() != info.attempt()) {
    return false;
  }
  const bool succeeded = info.state() == aviary::v1::TASK_STATE_SUCCEEDED;
  return completed ? succeeded && info.best_checkpoint() == best_checkpoint : !succeeded;
}

bool Scheduler::HoldsStale(const Group& group) const {
  return !group.row.task_id.empty() && HeldTask(group) == nullptr;
}

absl::Status Scheduler::LetGo(const Group& group, const std::string& task_id) {
  if (!HoldsStale(group) || group.row.task_id != task_id) return absl::OkStatus();
  Changes changes;
  GroupRow row = group.row;
  row.task_id.clear();
  changes.put_groups[row.group_id] = row;
  AVIARY_RETURN_IF_ERROR(Commit(&changes));
  log_.Info(absl::StrCat("group ", row.group_id, " let go of task ", task_id, " (no longer leased to it)"));
  return absl::OkStatus();
}

absl::Status Scheduler::FailUnloadableLease(const std::string& group_id, const std::string& task_id, int attempt,
                                            const absl::Status& error) {
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  auto it = tasks_.find(task_id);
  if (it == tasks_.end() || it->second.info.state() != aviary::v1::TASK_STATE_LEASED ||
      it->second.info.group_id() != group_id || it->second.info.attempt() != attempt) {
    // Cancelled, re-leased or deleted meanwhile: nothing to fail; the group leases again.
    return absl::FailedPreconditionError(absl::StrCat("task ", task_id, " is no longer leased to group ", group_id,
                                                      " (", error.message(), "); lease again"));
  }
  const std::string why = absl::StrCat("task ", task_id, ": cannot load its manifest: ", error.message());
  Changes changes;
  FailTaskAndJob(&changes, task_id, why);
  if (auto group = groups_.find(group_id); group != groups_.end() && group->second->row.task_id == task_id) {
    GroupRow row = group->second->row;
    row.task_id.clear();
    changes.put_groups[group_id] = row;
  }
  AVIARY_RETURN_IF_ERROR(Commit(&changes));
  log_.Error(absl::StrCat(why, "; the task FAILED (group ", group_id, ", attempt ", attempt, ")"));
  return absl::DataLossError(absl::StrCat(why, "; the task FAILED, lease another"));
}

absl::StatusOr<bool> Scheduler::Holds(const std::string& group_id, const std::string& task_id) const {
  absl::ReaderMutexLock lock(&mu_);
  AVIARY_ASSIGN_OR_RETURN(Group * group, FindGroup(group_id));
  return GroupHolds(*group, task_id);
}

absl::StatusOr<bool> Scheduler::ReportProgress(const aviary::v1::ReportProgressRequest& request) {
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  AVIARY_ASSIGN_OR_RETURN(Group * group, FindGroup(request.group_id()));
  if (!GroupHolds(*group, request.task_id())) {
    return true;  // ignored, and the group told to stop (an unknown task too: deleted with its job)
  }
  if (request.points_size() == 0 && request.steps_per_epoch() <= 0) return false;
  Changes changes;
  TaskRow& task = Stage(&changes, request.task_id());
  // Epochs count from 0 within the task's plan.
  for (int i = 0; i < request.points_size(); ++i) {
    const int32_t epoch = request.points(i).epoch();
    if (task.info.epochs() > 0 && epoch >= task.info.epochs()) {
      return absl::InvalidArgumentError(absl::StrCat("field 'points[", i, "].epoch': ", epoch,
                                                     " is outside the task's plan of ", task.info.epochs(),
                                                     " epochs (0-based)"));
    }
  }
  // Within one attempt, epochs and steps never go back (the first point of an attempt may
  // start anywhere: a resumed attempt starts at its checkpoint).
  LastPoint last;
  bool has_last = false;
  if (auto it = last_points_.find(task.info.task_id());
      it != last_points_.end() && it->second.attempt == task.info.attempt()) {
    last = it->second;
    has_last = true;
  }
  // A report sent again: its answer was lost (a deadline, a network blip) after the points were
  // stored, and the group's retry carries the same run, possibly with newer points behind it.
  // Its points up to the one equal to the last accepted point were taken already: they are
  // skipped, in order, and only the points after them are checked and stored.
  // NaN is how a point says "absent" (every step point's validation values): equal to NaN here.
  int first_new = 0;
  if (has_last) {
    google::protobuf::util::DefaultFieldComparator comparator;
    comparator.set_treat_nan_as_equal(true);
    google::protobuf::util::MessageDifferencer same;
    same.set_field_comparator(&comparator);
    for (int i = request.points_size() - 1; i >= 0; --i) {
      const aviary::v1::Metrics& point = request.points(i);
      if (point.step() == last.point.step() && same.Compare(point, last.point)) {
        first_new = i + 1;
        break;
      }
    }
  }
  bool has_previous = has_last && first_new == 0;  // the skipped run is checked within itself
  aviary::v1::Metrics previous = last.point;
  for (int i = 0; i < request.points_size(); ++i) {
    const aviary::v1::Metrics& point = request.points(i);
    if (has_previous && point.epoch() < previous.epoch()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "field 'points[", i, "].epoch': ", point.epoch(), " is less than the epoch ", previous.epoch(),
          " of the previous point of attempt ", task.info.attempt(), " (epochs never go back within an attempt)"));
    }
    if (has_previous && point.step() < previous.step()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "field 'points[", i, "].step': ", point.step(), " is less than the step ", previous.step(),
          " of the previous point of attempt ", task.info.attempt(), " (steps never go back within an attempt)"));
    }
    previous = point;
    has_previous = true;
  }
  if (first_new == request.points_size() && first_new > 0) {
    return false;  // all of it was delivered before
  }
  if (first_new < request.points_size()) last = {task.info.attempt(), request.points(request.points_size() - 1)};
  has_last = has_last || request.points_size() > 0;
  const int64_t now = UnixMs();
  if (request.steps_per_epoch() > 0) task.info.set_steps_per_epoch(request.steps_per_epoch());
  std::vector<aviary::v1::Metrics> points(request.points().begin() + first_new, request.points().end());
  if (!points.empty()) {
    *task.info.mutable_latest() = points.back();
    task.info.set_updated_unix_ms(now);
  }
  // Each epoch's last end in the batch: an earlier end of the same epoch (a resumed run's repeats)
  // is no event of its own (a report of thousands of one epoch's ends sent every watcher
  // thousands of job snapshots).
  std::map<int, size_t> last_end;
  for (size_t i = 0; i < points.size(); ++i) {
    if (points[i].epoch_end()) last_end[points[i].epoch()] = i;
  }
  for (size_t i = 0; i < points.size(); ++i) {
    const aviary::v1::Metrics& point = points[i];
    // Gauges keep the latest values only: epoch ends and the last point are enough.
    const bool repeated = point.epoch_end() && last_end.at(point.epoch()) != i;
    if (!repeated && (point.epoch_end() || i + 1 == points.size())) {
      changes.points.emplace_back(task.info, point);
      changes.events.push_back(
          {task.info.job_id(), task.info.task_id(), true, point,
           point.epoch_end()
               ? absl::StrCat("task ", task.info.task_id(), " epoch ", point.epoch() + 1, " of ",
                              task.info.epochs(), " done")
               : absl::StrCat("task ", task.info.task_id(), " step ", point.step())});
    }
  }
  const std::string job_id = task.info.job_id();
  const std::string task_id = task.info.task_id();
  const int attempt = task.info.attempt();
  changes.writes.push_back([this, job_id, task_id, attempt, now, points]() {
    return store_->AddPoints(job_id, task_id, attempt, now, points);
  });
  AVIARY_RETURN_IF_ERROR(Commit(&changes));
  if (has_last) last_points_[task_id] = last;
  return false;
}

Scheduler::TaskPlanView Scheduler::TaskPlan(const std::string& task_id) const {
  absl::ReaderMutexLock lock(&mu_);
  TaskPlanView plan;
  auto it = tasks_.find(task_id);
  if (it == tasks_.end()) return plan;
  plan.known = true;
  plan.out_dir = it->second.info.out_dir();
  plan.epochs = it->second.info.epochs();
  return plan;
}

absl::Status Scheduler::ReportCheckpoint(const aviary::v1::ReportCheckpointRequest& request) {
  // Only a file inside the task's own run folder (the coordinator reads the shared work_dir).
  // Checked before any lock: a stalled filesystem must not hold up every writer.
  const TaskPlanView plan = TaskPlan(request.task_id());
  const int epochs = plan.epochs;
  absl::Status checked =
      plan.known ? CheckCheckpointPath("path", request.path(), plan.out_dir, options_.work_dir) : absl::OkStatus();
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  AVIARY_ASSIGN_OR_RETURN(Group * group, FindGroup(request.group_id()));
  AVIARY_RETURN_IF_ERROR(RequireHolder(*group, request.task_id(), ""));
  AVIARY_RETURN_IF_ERROR(checked);
  if (epochs > 0 && request.epoch() >= epochs) {
    return absl::InvalidArgumentError(absl::StrCat("field 'epoch': ", request.epoch(),
                                                   " is outside the task's plan of ", epochs,
                                                   " epochs (0-based)"));
  }
  Changes changes;
  TaskRow& task = Stage(&changes, request.task_id());
  task.resume_checkpoint = request.path();
  if (request.best()) task.info.set_best_checkpoint(request.path());
  const int64_t now = UnixMs();
  const std::string task_id = task.info.task_id();
  const int attempt = task.info.attempt();
  changes.writes.push_back([this, task_id, attempt, request, now]() {
    return store_->AddCheckpoint(task_id, attempt, request.path(), request.epoch(), request.best(),
                                 now);
  });
  return Commit(&changes);
}

absl::Status Scheduler::CompleteTask(const aviary::v1::CompleteTaskRequest& request) {
  // The best checkpoint inside the task's run folder, checked before any lock (as ReportCheckpoint).
  const TaskPlanView plan = TaskPlan(request.task_id());
  const int epochs = plan.epochs;
  absl::Status checked =
      plan.known ? CheckCheckpointPath("best_checkpoint", request.best_checkpoint(), plan.out_dir, options_.work_dir)
                 : absl::OkStatus();
  if (checked.ok() && request.has_best() && epochs > 0 && request.best().epoch() >= epochs) {
    checked = absl::InvalidArgumentError(absl::StrCat("field 'best.epoch': ", request.best().epoch(),
                                                      " is outside the task's plan of ", epochs, " epochs (0-based)"));
  }
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  AVIARY_ASSIGN_OR_RETURN(Group * group, FindGroup(request.group_id()));
  if (absl::Status holder = RequireHolder(*group, request.task_id(), "complete it"); !holder.ok()) {
    if (EndedBy(*group, request.task_id(), true, request.best_checkpoint())) {
      log_.Info(absl::StrCat("group ", request.group_id(), " sent CompleteTask for task ", request.task_id(),
                             " again (its answer was lost); it succeeded already"));
      return absl::OkStatus();
    }
    AVIARY_RETURN_IF_ERROR(LetGo(*group, request.task_id()));  // it has stopped the task
    return holder;
  }
  bool late = false;
  AVIARY_RETURN_IF_ERROR(CheckOutcomeAttempt(request.task_id(), request.attempt(), request.group_id(), "CompleteTask", &late));
  if (late) return absl::OkStatus();
  if (absl::IsInvalidArgument(checked)) return RestartRefusedEnd(*group, request.task_id(), "CompleteTask", checked);
  AVIARY_RETURN_IF_ERROR(checked);  // UNAVAILABLE: the group sends it again
  Changes changes;
  TaskRow& task = Stage(&changes, request.task_id());
  task.info.set_state(aviary::v1::TASK_STATE_SUCCEEDED);
  task.info.set_ended_by_group(request.group_id());
  task.info.set_ended_attempt(task.info.attempt());
  task.info.set_ended_unix_ms(UnixMs());
  task.info.set_best_checkpoint(request.best_checkpoint());
  if (request.has_best()) *task.info.mutable_best() = request.best();
  task.info.clear_group_id();
  task.info.clear_error();
  task.info.set_updated_unix_ms(UnixMs());
  const std::string task_id = task.info.task_id();
  const std::string job_id = task.info.job_id();
  changes.events.push_back({job_id, task_id, false, {}, absl::StrCat("task ", task_id, " SUCCEEDED")});
  GroupRow group_row = group->row;
  group_row.task_id.clear();
  changes.put_groups[group_row.group_id] = group_row;
  for (const std::string& id : jobs_.at(job_id).task_ids) {
    const TaskRow& other = View(changes, id);
    if (other.depends_on != task_id || other.info.state() != aviary::v1::TASK_STATE_BLOCKED) continue;
    TaskRow& dependent = Stage(&changes, id);
    dependent.init_checkpoint = request.best_checkpoint();
    dependent.info.set_state(aviary::v1::TASK_STATE_READY);
    dependent.info.set_updated_unix_ms(UnixMs());
    changes.events.push_back({job_id, id, false, {},
                              absl::StrCat("task ", id, " READY (init_checkpoint ",
                                           request.best_checkpoint(), ")")});
  }
  DeriveJobState(&changes, job_id);
  AVIARY_RETURN_IF_ERROR(Commit(&changes));
  log_.Info(absl::StrCat("task ", task_id, " succeeded on group ", request.group_id(),
                         ": best checkpoint ", request.best_checkpoint()));
  return absl::OkStatus();
}

absl::Status Scheduler::FailTask(const aviary::v1::FailTaskRequest& request) {
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  AVIARY_ASSIGN_OR_RETURN(Group * group, FindGroup(request.group_id()));
  if (absl::Status holder = RequireHolder(*group, request.task_id(), "fail it"); !holder.ok()) {
    if (EndedBy(*group, request.task_id(), false, "")) {
      log_.Info(absl::StrCat("group ", request.group_id(), " sent FailTask for task ", request.task_id(),
                             " again (its answer was lost); taken already"));
      return absl::OkStatus();
    }
    AVIARY_RETURN_IF_ERROR(LetGo(*group, request.task_id()));  // it has stopped the task
    return holder;
  }
  bool late = false;
  AVIARY_RETURN_IF_ERROR(CheckOutcomeAttempt(request.task_id(), request.attempt(), request.group_id(), "FailTask", &late));
  if (late) return absl::OkStatus();
  Changes changes;
  GroupRow group_row = group->row;
  group_row.task_id.clear();
  changes.put_groups[group_row.group_id] = group_row;
  const std::string why = absl::StrCat("group ", request.group_id(), ": ", request.error());
  if (request.preempted()) {
    // Asked to stop (a time limit, a preemption): READY again, no restart counted, so that a
    // long task can be requeued any number of times.
    TaskRow& task = Stage(&changes, request.task_id());
    task.info.set_state(aviary::v1::TASK_STATE_READY);
    task.info.clear_group_id();
    task.info.set_updated_unix_ms(UnixMs());
    changes.events.push_back({task.info.job_id(), request.task_id(), false, {},
                              absl::StrCat("task ", request.task_id(), " READY again (preempted: ", why, ")")});
    DeriveJobState(&changes, task.info.job_id());
  } else if (request.retryable()) {
    RestartOrFail(&changes, request.task_id(), why);
  } else {
    FailTaskAndJob(&changes, request.task_id(), absl::StrCat(why, " (not retryable)"));
  }
  TaskRow& ended = Stage(&changes, request.task_id());
  ended.info.set_ended_by_group(request.group_id());
  ended.info.set_ended_attempt(ended.info.attempt());
  ended.info.set_ended_unix_ms(UnixMs());
  AVIARY_RETURN_IF_ERROR(Commit(&changes));
  log_.Warn(absl::StrCat("task ", request.task_id(), " failed on group ", request.group_id(),
                         request.preempted() ? " (preempted): " : request.retryable() ? " (retryable): " : ": ",
                         request.error(),
                         "; now ", TaskStateName(tasks_.at(request.task_id()).info.state())));
  return absl::OkStatus();
}

absl::Status Scheduler::CheckOutcomeAttempt(const std::string& task_id, int attempt, const std::string& group_id,
                                            const char* rpc, bool* late) const {
  *late = false;
  const int current = tasks_.at(task_id).info.attempt();
  if (attempt <= 0 || attempt == current) return absl::OkStatus();  // not said, or the current one
  if (attempt > current) {
    return absl::FailedPreconditionError(absl::StrCat("field 'attempt': ", attempt, " of task ", task_id,
                                                      " is past its current attempt ", current,
                                                      " (the group's state or the coordinator's is wrong)"));
  }
  // The group holds the task again, at a later attempt: this outcome is a copy of one taken
  // before (its first answer lost, the retry answered; the copy held up in a busy server). Taken
  // as the current attempt's, it ended the attempt the group is training now.
  log_.Info(absl::StrCat("group ", group_id, " sent ", rpc, " for task ", task_id, " attempt ", attempt,
                         " while it holds attempt ", current, ": a late copy of an outcome taken before; ignored"));
  *late = true;
  return absl::OkStatus();
}

absl::Status Scheduler::RefuseEndOfTask(const std::string& group_id, const std::string& task_id, const char* rpc,
                                        const absl::Status& refusal, int attempt) {
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  AVIARY_ASSIGN_OR_RETURN(Group * group, FindGroup(group_id));
  if (!GroupHolds(*group, task_id)) return refusal;
  bool late = false;
  AVIARY_RETURN_IF_ERROR(CheckOutcomeAttempt(task_id, attempt, group_id, rpc, &late));
  if (late) return refusal;
  return RestartRefusedEnd(*group, task_id, rpc, refusal);
}

absl::Status Scheduler::RestartRefusedEnd(const Group& group, const std::string& task_id, const char* rpc,
                                          const absl::Status& refusal) {
  Changes changes;
  GroupRow row = group.row;
  row.task_id.clear();
  changes.put_groups[row.group_id] = row;
  RestartOrFail(&changes, task_id,
                absl::StrCat("group ", row.group_id, "'s ", rpc, " was refused: ", refusal.message()));
  AVIARY_RETURN_IF_ERROR(Commit(&changes));
  const std::string state = TaskStateName(tasks_.at(task_id).info.state());
  log_.Warn(absl::StrCat("task ", task_id, ": group ", row.group_id, "'s ", rpc, " refused (", refusal.message(),
                         "); the group let go of it, now ", state));
  return absl::Status(refusal.code(), absl::StrCat(refusal.message(), " (task ", task_id, " is ", state, " now)"));
}

absl::Status Scheduler::LeaveGroup(const std::string& group_id, const std::string& reason) {
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  AVIARY_ASSIGN_OR_RETURN(Group * group, FindGroup(group_id));
  Changes changes;
  changes.deleted_groups.push_back(group_id);
  const std::string why = reason.empty() ? "no reason given" : reason;
  std::string released;
  if (const TaskRow* held = HeldTask(*group)) {
    // As FailTask(preempted): READY again, no restart counted.
    released = held->info.task_id();
    TaskRow& task = Stage(&changes, released);
    task.info.set_state(aviary::v1::TASK_STATE_READY);
    task.info.clear_group_id();
    task.info.set_updated_unix_ms(UnixMs());
    changes.events.push_back({task.info.job_id(), released, false, {},
                              absl::StrCat("task ", released, " READY again (group ", group_id, " left: ", why, ")")});
    DeriveJobState(&changes, task.info.job_id());
  }
  AVIARY_RETURN_IF_ERROR(Commit(&changes));
  log_.Info(absl::StrCat("group ", group_id, " left (", why, ")",
                         released.empty() ? "" : absl::StrCat("; its task ", released, " is READY again")));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// The reaper.

int Scheduler::ReapLostGroups() {
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  const int64_t now = NowMs();
  const int64_t configured_ms = HeartbeatTimeoutMs();
  // The store's counter follows the longest fence a registered group runs on: up when a group says
  // a longer one than it holds (an upgrade from a coordinator that kept none), down once the
  // groups told a longer timeout have said a shorter one or gone (it only grew before).
  int64_t longest_fence_ms = configured_ms;
  for (const auto& [id, group] : groups_) longest_fence_ms = std::max(longest_fence_ms, group->fence_timeout_ms.load());
  if (longest_fence_ms != fence_counter_ms_) {
    const absl::Status kept =
        store_->Transaction([&] { return store_->SetCounter(kFenceTimeoutCounter, longest_fence_ms); });
    if (kept.ok()) {
      if (fence_counter_failing_) log_.Info("reaper: the groups' fence timeout is kept in the store again");
      fence_counter_ms_ = longest_fence_ms;
      fence_counter_failing_ = false;
    } else if (!fence_counter_failing_) {  // said once, not at every pass
      log_.Warn(absl::StrCat("reaper: cannot keep the groups' fence timeout in the store (tried again at each pass): ",
                             kept.message()));
      fence_counter_failing_ = true;
    }
  }
  Changes changes;
  std::vector<std::string> lost;
  for (const auto& [id, group] : groups_) {
    int64_t silent_ms = 0;
    // Not before the group's own fence has run out (a longer timeout an earlier coordinator told).
    const int64_t timeout_ms = std::max(configured_ms, group->fence_timeout_ms.load());
    {
      absl::MutexLock seen(&seen_mu_);  // as FindGroup judges: never both
      silent_ms = now - group->last_seen_ms.load();
      if (silent_ms <= timeout_ms || group->reaped) continue;
      group->reaped = true;
    }
    lost.push_back(id);
    changes.deleted_groups.push_back(id);
    ++changes.groups_lost;
    if (const TaskRow* held = HeldTask(*group)) {
      RestartOrFail(&changes, held->info.task_id(),
                    absl::StrFormat("lost group %s (no heartbeat for %.1f s, timeout %g s)", id, silent_ms / 1000.0,
                                    timeout_ms / 1000.0));
    }
  }
  if (lost.empty()) return 0;
  absl::Status status = Commit(&changes);
  if (!status.ok()) {
    log_.Error(absl::StrCat("reaper: cannot remove lost groups ", absl::StrJoin(lost, ", "), ": ", status.message()));
    absl::MutexLock seen(&seen_mu_);  // judged again at the next pass (still silent)
    for (const std::string& id : lost) groups_.at(id)->reaped = false;
    return 0;
  }
  for (const std::string& id : lost) {
    log_.Warn(absl::StrCat("group ", id, " lost (no heartbeat within its timeout: heartbeat_timeout_s ",
                           options_.heartbeat_timeout_s, " s, or the longer one its fence runs on); removed"));
  }
  return static_cast<int>(lost.size());
}

absl::StatusOr<int> Scheduler::PruneFinishedJobs() {
  if (options_.retention_s <= 0) return 0;
  AVIARY_ASSIGN_OR_RETURN(aviary::v1::PruneJobsResponse response, PruneJobs(options_.retention_s, false));
  for (const aviary::v1::PrunedJob& job : response.jobs()) {
    log_.Info(absl::StrCat("job ", job.job_id(), " finished more than ", options_.retention_s / 86400,
                           " days ago (retention_days): removed ", job.step_points(), " step points and ",
                           job.manifest_refs(), " task manifest references; its state and epoch history stay"));
  }
  if (response.manifests_deleted() > 0) {
    log_.Info(absl::StrCat("retention: deleted ", response.manifests_deleted(), " manifests no task refers to (",
                           response.manifest_bytes_deleted(), " bytes)"));
  }
  return response.jobs_size();
}

absl::StatusOr<aviary::v1::PruneJobsResponse> Scheduler::PruneJobs(double older_than_s, bool dry_run) {
  std::vector<aviary::v1::TaskInfo> gone_series;
  absl::StatusOr<aviary::v1::PruneJobsResponse> response = PruneJobsInStore(older_than_s, dry_run, &gone_series);
  // The pruned tasks' /metrics series, after the locks (as in DeleteJob: removing one walks its
  // family). A pruned task reports no more (its job is finished), so nothing adds them again.
  if (metrics_ != nullptr) metrics_->RemoveTasks(gone_series);
  return response;
}

absl::StatusOr<aviary::v1::PruneJobsResponse> Scheduler::PruneJobsInStore(double older_than_s, bool dry_run,
                                                                         std::vector<aviary::v1::TaskInfo>* gone_series) {
  if (older_than_s < 0) {
    // retention_days 0 keeps everything for ever: as a default age it must not mean "every
    // finished job" (which pruned a job cancelled a second ago, so that it could not be retried).
    if (options_.retention_s <= 0) {
      return absl::FailedPreconditionError(
          "retention_days is 0 (finished jobs are kept for ever), so there is no default age to prune at; "
          "give one (aviary prune --older-than DAYS; 0: every finished job)");
    }
    older_than_s = options_.retention_s;
  }
  aviary::v1::PruneJobsResponse response;
  response.set_older_than_days(older_than_s / 86400);
  response.set_dry_run(dry_run);
  absl::MutexLock writer(&write_mu_);
  const int64_t cutoff = UnixMs() - static_cast<int64_t>(older_than_s * 1000);
  std::vector<std::string> due;
  {
    absl::ReaderMutexLock lock(&mu_);
    for (const auto& [seq, job_id] : job_order_) {
      const Job& job = jobs_.at(job_id);
      if (!job.deleted && TerminalJob(job.row.info.state()) && job.row.info.updated_unix_ms() < cutoff &&
          pruned_.count(job_id) == 0) {
        due.push_back(job_id);
      }
    }
  }
  const absl::Status kRolledBack = absl::AbortedError("dry run: rolled back");
  int64_t manifests = 0, bytes = 0;
  absl::Status status = store_->Transaction([&]() -> absl::Status {
    for (const std::string& job_id : due) {
      int64_t points = 0, refs = 0;
      AVIARY_RETURN_IF_ERROR(store_->PruneJob(job_id, &points, &refs));
      if (points > 0 || refs > 0) {
        aviary::v1::PrunedJob* job = response.add_jobs();
        job->set_job_id(job_id);
        job->set_step_points(points);
        job->set_manifest_refs(static_cast<int32_t>(refs));
      }
    }
    AVIARY_RETURN_IF_ERROR(store_->SweepManifests(&manifests, &bytes));
    return dry_run ? kRolledBack : absl::OkStatus();
  });
  if (dry_run && status == kRolledBack) status = absl::OkStatus();
  AVIARY_RETURN_IF_ERROR(status);
  response.set_manifests_deleted(manifests);
  response.set_manifest_bytes_deleted(bytes);
  if (!dry_run) {
    absl::MutexLock lock(&mu_);
    for (const std::string& job_id : due) {
      pruned_.insert(job_id);
      for (const std::string& task_id : jobs_.at(job_id).task_ids) {
        tasks_.at(task_id).manifest_hash.clear();
        // Its series leave /metrics: per-task series of every job ever run would grow for ever.
        gone_series->push_back(tasks_.at(task_id).info);
      }
    }
  }
  return response;
}

void Scheduler::ReaperLoop() {
  const auto period = std::chrono::milliseconds(
      std::max<int64_t>(10, static_cast<int64_t>(options_.reaper_period_s * 1000)));
  auto next_prune = std::chrono::steady_clock::now();
  while (true) {
    {
      absl::MutexLock lock(&reaper_mu_);
      common::MutexLockable held{&reaper_mu_};
      if (reaper_cv_.wait_for(held, period, [this] { return shutdown_.load(); })) return;
    }
    ReapLostGroups();
    if (std::chrono::steady_clock::now() >= next_prune) {
      absl::StatusOr<int> pruned = PruneFinishedJobs();
      if (!pruned.ok()) log_.Error(absl::StrCat("retention: ", pruned.status().message()));
      next_prune = std::chrono::steady_clock::now() + std::chrono::minutes(1);
    }
  }
}

}  // namespace aviary::coordinator
