// The scheduler's experiment calls (docs/SERVICE.md, "Groups, logs, retry and delete"): the
// list of groups, task logs shipped by the groups, retry and delete of a finished job. Kept apart
// from scheduler.cc, whose locking rules (scheduler.h) they follow.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"
#include "common/utf8.h"
#include "coordinator/path_policy.h"
#include "coordinator/scheduler.h"

namespace aviary::coordinator {

namespace fs = std::filesystem;
using aviary::v1::JobInfo;
using aviary::v1::TaskState;

namespace {

int64_t UnixNowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string StateName(aviary::v1::JobState state) {
  std::string name = aviary::v1::JobState_Name(state);
  return name.rfind("JOB_STATE_", 0) == 0 ? name.substr(10) : name;
}

}  // namespace

std::vector<aviary::v1::GroupInfo> Scheduler::ListGroups() const {
  std::vector<aviary::v1::GroupInfo> out;
  const int64_t now_steady = NowMs();
  const int64_t now_unix = UnixNowMs();
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [id, group] : groups_) {
    aviary::v1::GroupInfo info;
    const aviary::v1::RegisterGroupRequest& reg = group->row.info;
    info.set_group_id(id);
    info.set_world_size(reg.world_size());
    *info.mutable_hosts() = reg.hosts();
    *info.mutable_devices() = reg.devices();
    info.set_backend(reg.backend());
    info.set_version(reg.version());
    info.set_metrics_address(reg.metrics_address());
    info.set_registered_unix_ms(group->row.registered_unix_ms);
    info.set_last_heartbeat_unix_ms(now_unix - (now_steady - group->last_seen_ms.load()));
    info.set_gpu_memory_bytes(group->gpu_memory_bytes.load());
    if (const TaskRow* held = HeldTask(*group)) {
      info.set_task_id(held->info.task_id());
      info.set_job_id(held->info.job_id());
      info.set_stage(held->info.stage());
      info.set_fold(held->info.fold());
      if (held->info.has_latest()) *info.mutable_latest() = held->info.latest();
    }
    out.push_back(std::move(info));
  }
  return out;
}

absl::StatusOr<JobInfo> Scheduler::RetryJob(const std::string& job_id) {
  absl::MutexLock writer(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end() || it->second.deleted) {
    return NoSuchJob(job_id);
  }
  const aviary::v1::JobState state = it->second.row.info.state();
  if (state != aviary::v1::JOB_STATE_FAILED && state != aviary::v1::JOB_STATE_CANCELLED) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job_id, " is ", StateName(state), "; only a FAILED or CANCELLED job can be retried"));
  }
  Changes changes;
  const int64_t now = UnixNowMs();
  int ready = 0, blocked = 0;
  bool started = false;
  for (const std::string& id : it->second.task_ids) {  // DAG order: dependencies first
    const TaskRow& current = View(changes, id);
    if (current.info.attempt() > 0) started = true;
    const TaskState task_state = current.info.state();
    if (task_state != aviary::v1::TASK_STATE_FAILED && task_state != aviary::v1::TASK_STATE_CANCELLED) continue;
    if (current.manifest_hash.empty()) {
      // Retention (retention_days, aviary prune) dropped the job's manifests: nothing to train on.
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", job_id, " was pruned (retention_days / aviary prune): task ", id,
          " has no manifest any more; submit the pipeline again"));
    }
    TaskRow& task = Stage(&changes, id);
    const bool waits = !task.depends_on.empty() &&
                       View(changes, task.depends_on).info.state() != aviary::v1::TASK_STATE_SUCCEEDED;
    task.info.set_state(waits ? aviary::v1::TASK_STATE_BLOCKED : aviary::v1::TASK_STATE_READY);
    task.info.clear_error();
    task.info.clear_group_id();
    task.info.set_restarts_before_retry(task.info.restarts_before_retry() + task.info.restarts());
    task.info.set_restarts(0);
    task.info.set_updated_unix_ms(now);
    ++(waits ? blocked : ready);
  }
  JobRow& job = StageJob(&changes, job_id);
  job.info.set_state(started ? aviary::v1::JOB_STATE_RUNNING : aviary::v1::JOB_STATE_PENDING);
  job.info.clear_error();
  job.info.set_updated_unix_ms(now);
  changes.events.push_back({job_id, "", false, {},
                            absl::StrCat("job ", job_id, " retried: ", ready, " tasks READY, ", blocked,
                                         " BLOCKED (each resumes from its last checkpoint)")});
  AVIARY_RETURN_IF_ERROR(Commit(&changes));
  log_.Info(absl::StrCat("job ", job_id, " retried: ", ready, " tasks READY, ", blocked, " BLOCKED"));
  return *it->second.snapshot;
}

namespace {

// The job's run folder for `aviary delete --with-run-folders` (the parent of its tasks' run
// folders as the groups were given them, `task_out_dir`; <work_dir>/JOB for a job without
// tasks), checked before anything is deleted: named after the job, directly in a folder inside
// the work dir (after realpath), not itself a symbolic link (whose target would go), and
// removable by this process. Sets `*parent` (resolved) and `*name`; `*name` stays empty when
// there is no such folder. FAILED_PRECONDITION ending in "nothing was deleted" otherwise.
absl::Status CheckRunFolderRemovable(const std::string& job_id, const std::string& task_out_dir,
                                     const std::string& work_dir, std::string* parent, std::string* name) {
  const fs::path folder =
      (task_out_dir.empty() ? fs::path(work_dir) / job_id : fs::path(task_out_dir).parent_path()).lexically_normal();
  auto refuse = [&](const std::string& why) {
    return absl::FailedPreconditionError(absl::StrCat("job ", job_id, ": run folder ", folder.string(), " ", why,
                                                      "; nothing was deleted (delete it without --with-run-folders "
                                                      "to keep the folder)"));
  };
  if (folder.filename() != job_id) return refuse("is not named after the job");
  AVIARY_ASSIGN_OR_RETURN(const std::string root, ResolvePolicyPath("work_dir", work_dir));
  AVIARY_ASSIGN_OR_RETURN(const std::string resolved, ResolvePolicyPath("run folder", folder.parent_path().string()));
  if (resolved != root && !PathIsInside(resolved, root)) return refuse(absl::StrCat("is not inside the work dir ", root));
  struct stat st;
  if (::lstat(folder.c_str(), &st) != 0) {
    const int error = errno;
    if (error == ENOENT) return absl::OkStatus();
    return refuse(absl::StrCat("cannot be looked at: ", std::strerror(error)));
  }
  if (S_ISLNK(st.st_mode)) return refuse("is a symbolic link (its target would be removed)");
  if (!S_ISDIR(st.st_mode)) return refuse("is not a folder");
  if (::access(resolved.c_str(), W_OK | X_OK) != 0 || ::access(folder.c_str(), R_OK | W_OK | X_OK) != 0) {
    const int error = errno;
    return refuse(absl::StrCat("cannot be removed by the coordinator's user: ", std::strerror(error)));
  }
  *parent = resolved;
  *name = job_id;
  return absl::OkStatus();
}

// The name a run folder has between its job's delete and its removal (in the same folder).
std::string DeletingName(const std::string& job_id) { return absl::StrCat(".", job_id, ".deleting"); }

// The job id of a DeletingName ("" for another name).
std::string JobOfDeletingName(const std::string& name) {
  constexpr absl::string_view kSuffix = ".deleting";
  if (name.size() <= 1 + kSuffix.size() || name[0] != '.' || !absl::EndsWith(name, kSuffix)) return "";
  const std::string job_id = name.substr(1, name.size() - 1 - kSuffix.size());
  // NewId's shape: 'j' and 12 hex digits.
  if (job_id.size() != 13 || job_id[0] != 'j' ||
      job_id.find_first_not_of("0123456789abcdef", 1) != std::string::npos) {
    return "";
  }
  return job_id;
}

}  // namespace

void Scheduler::FinishInterruptedRemovals() {
  std::error_code ec;
  // increment(ec): a read error in the middle ends the scan, never the coordinator's start.
  for (fs::directory_iterator it(options_.work_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const fs::directory_entry& entry = *it;
    const std::string name = entry.path().filename().string();
    const std::string job_id = JobOfDeletingName(name);
    if (job_id.empty()) continue;
    struct stat st;
    if (::lstat(entry.path().c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) continue;  // not ours
    bool live = false;
    {
      absl::ReaderMutexLock lock(&mu_);
      auto job = jobs_.find(job_id);
      live = job != jobs_.end() && !job->second.deleted;
    }
    const std::string folder = absl::StrCat(options_.work_dir, "/", job_id);
    if (live) {
      // Renamed, then the delete's transaction did not commit: the job is there, its folder goes back.
      if (::lstat(folder.c_str(), &st) == 0 || ::rename(entry.path().c_str(), folder.c_str()) != 0) {
        log_.Warn(absl::StrCat("job ", job_id, " is not deleted, but its run folder is ", entry.path().string(),
                               " (a delete interrupted before it committed) and cannot go back to ", folder,
                               ": move it back by hand"));
      } else {
        log_.Warn(absl::StrCat("job ", job_id, ": its run folder is back at ", folder,
                               " (a delete interrupted before it committed)"));
      }
      continue;
    }
    int64_t entries = 0;
    const absl::Status gone = common::RemoveTreeNoFollow(options_.work_dir, name, &entries);
    if (gone.ok()) {
      log_.Info(absl::StrCat("removed ", entry.path().string(), " (", entries, " entries): the run folder of job ",
                             job_id, ", deleted with --with-run-folders before the coordinator stopped"));
    } else {
      log_.Warn(absl::StrCat("cannot finish removing ", entry.path().string(), ", the run folder of deleted job ",
                             job_id, ": ", gone.message(), "; remove it by hand"));
    }
  }
}

absl::StatusOr<std::vector<std::string>> Scheduler::DeleteJob(const std::string& job_id, bool with_run_folders) {
  std::vector<std::string> task_ids;
  std::string folder_parent, folder_name;  // the run folder removed after the commit (none: empty)
  std::vector<aviary::v1::TaskInfo> gone_series;  // their /metrics series, removed after the locks
  {
    absl::MutexLock writer(&write_mu_);
    {
      absl::ReaderMutexLock lock(&mu_);
      auto it = jobs_.find(job_id);
      if (it == jobs_.end() || it->second.deleted) {
        return NoSuchJob(job_id);
      }
      const aviary::v1::JobState state = it->second.row.info.state();
      if (state == aviary::v1::JOB_STATE_PENDING || state == aviary::v1::JOB_STATE_RUNNING) {
        return absl::FailedPreconditionError(absl::StrCat("job ", job_id, " is ", StateName(state),
                                                          "; cancel it first (aviary cancel ", job_id, ")"));
      }
      task_ids = it->second.task_ids;
      if (with_run_folders) {
        // A task cancelled or failed under its group stays that group's until it lets go: it may
        // still be training it and writing its run folder (docs/SERVICE.md, "Fencing"). Removing
        // the folder meanwhile races those writes (a checkpoint or history renamed into a folder
        // being removed, or the folder made again after it was "removed").
        for (const auto& [group_id, group] : groups_) {
          const std::string& held = group->row.task_id;
          if (held.empty() || std::find(task_ids.begin(), task_ids.end(), held) == task_ids.end()) continue;
          return absl::FailedPreconditionError(absl::StrCat(
              "job ", job_id, ": group ", group_id, " has not stopped task ", held,
              " yet and may still write its run folder ", tasks_.at(held).info.out_dir(), "; delete it with --with-run-folders once the group has let go (its next "
              "heartbeats, or heartbeat_timeout_s ", options_.heartbeat_timeout_s, " s for a silent group), or without "
              "--with-run-folders now"));
        }
      }
      if (with_run_folders) {
        AVIARY_RETURN_IF_ERROR(CheckRunFolderRemovable(
            job_id, task_ids.empty() ? "" : tasks_.at(task_ids.front()).info.out_dir(), options_.work_dir,
            &folder_parent, &folder_name));
      }
      if (!folder_name.empty()) {
        // Renamed to ".<job>.deleting" before the delete commits, removed after: a coordinator
        // stopped in between finds it at its next start (FinishInterruptedRemovals) and removes
        // it, or puts it back where the delete did not commit. Removed after the commit alone, it
        // stayed for ever, nothing left to say whose it was.
        const std::string trash = DeletingName(job_id);
        const std::string trash_path = absl::StrCat(folder_parent, "/", trash);
        struct stat st;
        if (::lstat(trash_path.c_str(), &st) == 0) {
          // An earlier delete of this job stopped in another work dir's folder: ours to remove.
          const absl::Status leftover = common::RemoveTreeNoFollow(folder_parent, trash);
          if (!leftover.ok()) {
            return absl::FailedPreconditionError(absl::StrCat("job ", job_id, ": cannot remove the leftover ",
                                                              trash_path, ": ", leftover.message(),
                                                              "; nothing was deleted"));
          }
        }
        const std::string folder = absl::StrCat(folder_parent, "/", folder_name);
        if (::rename(folder.c_str(), trash_path.c_str()) != 0) {
          const int error = errno;
          if (error != ENOENT) {
            return absl::FailedPreconditionError(absl::StrCat("job ", job_id, ": run folder ", folder,
                                                              " cannot be renamed for its removal: ",
                                                              std::strerror(error), "; nothing was deleted"));
          }
          folder_name.clear();  // gone meanwhile
        } else {
          // The rename durable before the delete commits: else a power loss could bring the
          // folder back under the job's name after the job is gone.
          common::SyncFolder(folder_parent).IgnoreError();
        }
      }
      // The manifests only this job referred to go with it (a submit that finds a swept one in
      // its fold cache builds it again: SubmitJob).
      int64_t manifests = 0, bytes = 0;
      const absl::Status committed = store_->Transaction([&]() -> absl::Status {
        AVIARY_RETURN_IF_ERROR(store_->DeleteJob(job_id));
        return store_->SweepManifests(&manifests, &bytes);
      });
      if (!committed.ok()) {
        if (!folder_name.empty()) {
          const std::string folder = absl::StrCat(folder_parent, "/", folder_name);
          const std::string trash_path = absl::StrCat(folder_parent, "/", DeletingName(job_id));
          if (::rename(trash_path.c_str(), folder.c_str()) != 0) {
            const int error = errno;
            log_.Warn(absl::StrCat("job ", job_id, ": its delete failed, and its run folder stays as ", trash_path,
                                   " (cannot rename it back: ", std::strerror(error), "); the next start puts it back"));
          }
        }
        return committed;
      }
    }
    absl::MutexLock exclusive(&mu_);
    Job& job = jobs_.at(job_id);
    job.deleted = true;
    job_order_.erase(job.row.seq);
    for (const std::string& id : task_ids) {
      gone_series.push_back(tasks_.at(id).info);
      tasks_.erase(id);
    }
    job.task_ids.clear();
    job.events.clear();
    job.event_bytes = 0;
    job.snapshot = std::make_shared<const JobInfo>();
    // Kept only as "deleted" for its watchers until the next start: not its sweep axes, tags and
    // note (a sweep's values are up to ~280 KB).
    job.row.info.Clear();
    job.row.info.set_job_id(job_id);
    job.watch_cv.notify_all();
    UpdateJobCountsLocked();
    pruned_.erase(job_id);
    for (const std::string& id : task_ids) last_points_.erase(id);
  }
  {
    absl::MutexLock logs(&logs_mu_);
    for (const std::string& id : task_ids) logs_.erase(id);
  }
  // Outside mu_ and write_mu_: prometheus-cpp finds a series to remove by a walk through its
  // family, so a 4096-task job among 200,000 series took minutes, every RPC waiting meanwhile
  // (heartbeats: the groups' fences ran out). Nothing adds these series again: the tasks are gone.
  if (metrics_ != nullptr) metrics_->RemoveTasks(gone_series);
  std::vector<std::string> removed;
  if (!folder_name.empty()) {
    // Checked above; removed without following a link anywhere in it (a subfolder swapped for a
    // link meanwhile is not descended into).
    const std::string folder = absl::StrCat(folder_parent, "/", folder_name);
    const std::string trash = DeletingName(job_id);
    int64_t entries = 0;
    const absl::Status gone = common::RemoveTreeNoFollow(folder_parent, trash, &entries);
    if (!gone.ok()) {
      const std::string trash_path = absl::StrCat(folder_parent, "/", trash);
      log_.Warn(absl::StrCat("job ", job_id, " deleted; removing its run folder ", folder, " (renamed ", trash_path,
                             ") stopped after ", entries, " entries: ", gone.message()));
      return absl::Status(gone.code(), absl::StrCat("job ", job_id, " was deleted, but removing its run folder ", folder,
                                                    " (renamed ", trash_path, ") stopped after ", entries,
                                                    " entries: ", gone.message(), "; remove the rest by hand"));
    }
    removed.push_back(folder);
  }
  log_.Info(absl::StrCat("job ", job_id, " deleted", removed.empty() ? "" : absl::StrCat(" with ", removed.front())));
  return removed;
}

absl::Status Scheduler::ShipLogs(const aviary::v1::ShipLogsRequest& request) {
  // mu_ stays held (as a reader) while the lines are appended: DeleteJob erases the task under
  // mu_ exclusively before it erases the task's log, so no log outlives its task.
  absl::ReaderMutexLock tasks_lock(&mu_);
  AVIARY_ASSIGN_OR_RETURN(Group * group, FindGroup(request.group_id()));
  auto task = tasks_.find(request.task_id());
  if (task == tasks_.end()) {
    // Not NOT_FOUND: that tells a group it is not registered.
    return absl::FailedPreconditionError(absl::StrCat("task_id '", request.task_id(),
                                                      "': no such task (its job was deleted); group ",
                                                      group->row.group_id, " keeps no log for it"));
  }
  // Only the group that runs the task, or ran it last, writes its log (another group's lines in
  // any job's log, or a thousand tasks' logs pushed out of memory by one group).
  const bool holds = group->row.task_id == request.task_id();
  if (!holds && group->last_task_id != request.task_id()) {
    return absl::FailedPreconditionError(absl::StrCat("task_id '", request.task_id(), "': group ",
                                                      group->row.group_id,
                                                      " neither runs it nor ran it last; its log is its holder's"));
  }
  // The attempt of this group's lease, not the task's current one (a retry leased to another
  // group since): what the group's own lines may say, at most.
  const int attempt = holds ? task->second.info.attempt() : group->last_attempt;
  absl::MutexLock lock(&logs_mu_);
  TaskLog& log = logs_[request.task_id()];
  if (log.log_id == 0) {
    log.log_id = std::max(last_log_id_ + 1, absl::ToUnixMicros(absl::Now()));
    last_log_id_ = log.log_id;
  }
  log.written = ++logs_clock_;
  int64_t& group_seq = log.group_seq[request.group_id()];
  for (const aviary::v1::LogLine& in : request.lines()) {
    if (in.seq() > 0) {
      if (in.seq() <= group_seq) continue;  // stored already: sent again after a lost answer
      group_seq = in.seq();
    }
    aviary::v1::LogLine line = in;
    if (line.text().size() > kMaxLogLineBytes) {
      // Cut at a UTF-8 character boundary: a string field must stay valid UTF-8 (a response
      // with half a character would not serialize).
      line.mutable_text()->resize(common::Utf8Prefix(line.text(), kMaxLogLineBytes).size());
      line.mutable_text()->append(" [cut]");
    }
    line.set_seq(++log.last_seq);
    if (line.attempt() <= 0 || line.attempt() > attempt) line.set_attempt(attempt);
    // A line's memory, not only its text: a short line's LogLine, string and deque slot cost
    // more than its characters (1,024 tasks of short lines held about 3x the budget).
    log.bytes += line.text().size() + kLogLineOverheadBytes;
    log.lines.push_back(std::move(line));
    while (log.bytes > kMaxLogBytesPerTask && !log.lines.empty()) {
      log.bytes -= log.lines.front().text().size() + kLogLineOverheadBytes;
      log.lines.pop_front();
      ++log.dropped;
    }
  }
  while (logs_.size() > kMaxLogTasks) {
    auto oldest = logs_.begin();
    for (auto it = logs_.begin(); it != logs_.end(); ++it) {
      if (it->second.written < oldest->second.written) oldest = it;
    }
    logs_.erase(oldest);
  }
  return absl::OkStatus();
}

absl::StatusOr<aviary::v1::GetLogsResponse> Scheduler::GetLogs(const aviary::v1::GetLogsRequest& request) const {
  aviary::v1::GetLogsResponse response;
  std::vector<std::string> task_ids;
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = jobs_.find(request.job_id());
    if (it == jobs_.end() || it->second.deleted) {
      return NoSuchJob(request.job_id());
    }
    *response.mutable_job() = *it->second.snapshot;
    if (request.task_id().empty()) {
      task_ids = it->second.task_ids;
    } else {
      for (const std::string& id : it->second.task_ids) {
        if (id == request.task_id()) task_ids.push_back(id);
      }
      if (task_ids.empty()) {
        return absl::NotFoundError(absl::StrCat("task_id '", request.task_id(), "': job ", request.job_id(),
                                                " has no such task"));
      }
    }
  }
  absl::MutexLock lock(&logs_mu_);
  size_t bytes = 0;
  for (const std::string& id : task_ids) {
    aviary::v1::GetLogsResponse::TaskLog* out = response.add_tasks();
    out->set_task_id(id);
    auto it = logs_.find(id);
    if (it == logs_.end()) continue;
    const TaskLog& log = it->second;
    out->set_dropped(log.dropped);
    out->set_last_seq(log.last_seq);
    out->set_log_id(log.log_id);
    auto by_task = request.after_seq_by_task().find(id);
    const int64_t after = by_task != request.after_seq_by_task().end() ? by_task->second : request.after_seq();
    size_t first = log.lines.size();
    while (first > 0 && log.lines[first - 1].seq() > after) --first;
    if (request.limit() > 0 && log.lines.size() - first > static_cast<size_t>(request.limit())) {
      first = log.lines.size() - static_cast<size_t>(request.limit());
    }
    for (size_t i = first; i < log.lines.size() && !response.more(); ++i) {
      const size_t line_bytes = log.lines[i].ByteSizeLong();
      if (bytes > 0 && bytes + line_bytes > options_.max_logs_response_bytes) {
        response.set_more(true);  // this task's later lines and the next tasks' in the next answer
        break;
      }
      bytes += line_bytes;
      *out->add_lines() = log.lines[i];
    }
  }
  return response;
}

}  // namespace aviary::coordinator
