// Rank 0's link to the coordinator's WorkerService (docs/SERVICE.md, "Worker groups"): the main
// thread registers and leases (Agent::ServeRank0, steps R1 to R4 of worker/agent/group_control.h);
// three threads of its own send heartbeats, ship the task's log lines and send the buffered
// reports (in the order they were made).
//
// Failures: transient ones (UNAVAILABLE, DEADLINE_EXCEEDED, ...) are retried with backoff
// (0.5 s to 10 s) while training goes on and aviary_coordinator_connected is 0. A NOT_FOUND for
// the current group (the coordinator timed it out) marks the group lost: the task stops
// (kGroupLost) and the main thread registers anew. A cancel_task answer (Heartbeat,
// ReportProgress) for the current lease marks the task cancelled (kCancelled). A report refused
// for good (e.g. FAILED_PRECONDITION) is dropped and logged. UNAUTHENTICATED (a rotated worker
// token) re-reads the token file, if the token came from one, and keeps the reports and log
// lines for a retry with the token it now holds.
//
// The lease fence (lease_clock.h): Register learns the coordinator's heartbeat timeout, Lease
// notes when it asked, each answered heartbeat renews the current lease from its send time, a
// cancel answer or a NOT_FOUND revokes it; CheckLease is the trainer's commit check.
//
// Thread-safe: the main thread calls everything but the loops (and the stall watchdog's thread,
// which the main thread no longer answers to, RevokeLease, Push and Drain before the process
// ends); HeartbeatLoop, ShipLoop and
// SenderLoop run on the threads StartThreads starts. They share group_id_, the lease and running_ under mu_,
// the cancel and lost flags as atomics, and the ReportBuffer (itself thread-safe).
#ifndef AVIARY_WORKER_AGENT_COORDINATOR_LINK_H_
#define AVIARY_WORKER_AGENT_COORDINATOR_LINK_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "proto/aviary.grpc.pb.h"
#include "worker/agent/agent.h"
#include "worker/agent/group_control.h"
#include "worker/agent/group_metrics.h"
#include "worker/agent/lease_clock.h"
#include "worker/agent/report_buffer.h"

namespace aviary::worker {

class CoordinatorLink {
 public:
  // `options` and `metrics` must outlive the link.
  CoordinatorLink(const AgentOptions& options, GroupMetrics* metrics,
                  ::aviary::v1::RegisterGroupRequest registration);
  ~CoordinatorLink();  // StopThreads
  CoordinatorLink(const CoordinatorLink&) = delete;
  CoordinatorLink& operator=(const CoordinatorLink&) = delete;

  // Registers (retrying transient failures with backoff). UNAVAILABLE after connect_timeout_s;
  // CANCELLED when a signal arrived first; the coordinator's refusal otherwise, except that a
  // refused token from a file is retried (the file read again) when registering again.
  absl::Status Register();

  // The heartbeat, log-shipping and sender threads; StopThreads wakes and joins them (idempotent).
  void StartThreads();
  void StopThreads();

  // LeaseTask once. `*task` set when one was leased, its manifest_csv filled in from the
  // manifest cache or fetched by hash (GetManifest). NOT_FOUND marks the group lost. The lease
  // starts when LeaseTask answers: heartbeats name the task (and a cancel answer stops it) while
  // its manifest comes; a heartbeat naming no task there told the coordinator the group had let
  // go of it, and the task could be leased to a second group. A failed fetch keeps the lease
  // named (the coordinator hands the same task back to the retried LeaseTask).
  absl::Status Lease(::aviary::v1::Task* task, bool* available);
  // What GetManifest of `size` bytes may take beyond rpc_timeout_s: 1 ms per 8 KB (8 MB/s); the
  // whole allowance doubles for each fetch of it in a row that ran out of time (`slow_fetches`,
  // at most 2^8 times): a link slower than that (a WAN, a busy coordinator) restarted the
  // download from byte 0 at every retried lease, and the task never began, nor went elsewhere.
  static int64_t ManifestFetchExtraMs(int64_t size, double rpc_timeout_s, int slow_fetches);
  // Manifests fetched from the coordinator and leases served from the cache (main thread).
  int64_t manifest_fetches() const { return manifest_fetches_; }
  int64_t manifest_hits() const { return manifest_hits_; }

  // The lease the heartbeats name and a cancel answer may stop: the one Lease started for
  // `task_id` (a cancel that came meanwhile stays), else a new one. Its clock starts at the last
  // Lease call's send time.
  void BeginTask(const std::string& task_id, int attempt);
  void EndTask();

  // The fence before each write into the task's run folder (TrainOptions::commit_check): OK
  // while the lease is certainly still this group's (lease_clock.h); else ABORTED naming the
  // task, attempt and `path`, logged and counted (aviary_fenced_writes_total).
  absl::Status CheckLease(const std::string& path);

  // The stop decision for the current task (rank 0's part of the step exchange, T4).
  StopReason Decide() const;
  bool lost() const { return lost_; }

  // Queues a report for the sender.
  void Push(Report r);

  // Waits until the buffer is delivered, at most `max_wait_s` (< 0: no limit). A lost group
  // drops `task_id`'s reports (they would be refused); after a signal (this process's, or
  // `group_signalled`: another rank's, which the ranks shared) it gives up after `signal_wait_s`.
  void Drain(const std::string& task_id, double max_wait_s, double signal_wait_s, bool group_signalled = false);
  void DropTask(const std::string& task_id);
  // The lease is given up here (the stall watchdog fails the task): every later CheckLease, the
  // training thread's commit check, refuses. Any thread.
  void RevokeLease(const std::string& why) { lease_.Revoke(why); }

  // LeaveGroup once (after StopThreads), on a clean exit of the agent: the coordinator removes
  // the group at once instead of counting it as lost after heartbeat_timeout_s. Nothing when the
  // group never registered or is lost. A failure is logged, never fatal (the group is then
  // removed as lost after the timeout).
  void Leave(const std::string& reason);

  std::string group_id() const;

  // Lines kept for shipping at most (the oldest go first when the coordinator is away).
  static constexpr size_t kMaxBufferedLogLines = 5000;

 private:
  // Rank 0's log lines of the current task (common::SetLogTap), shipped with ShipLogs every
  // heartbeat interval (ShipLoop: a slow ShipLogs must not hold the heartbeats up) and at EndTask (docs/SERVICE.md, "Logs"). Shared with the tap, which may
  // outlive a call into the link. Thread-safe.
  struct LogBuffer {
    absl::Mutex mu;
    std::string task_id ABSL_GUARDED_BY(mu);  // "" between tasks: nothing is kept
    // The lease's attempt, on every line: lines shipped after the task moved on (EndTask's, when
    // another group leased it again meanwhile) still name the attempt that logged them.
    int attempt ABSL_GUARDED_BY(mu) = 0;
    std::deque<::aviary::v1::LogLine> lines ABSL_GUARDED_BY(mu);
    int64_t dropped ABSL_GUARDED_BY(mu) = 0;
    // The last line's own number (LogLine.seq in ShipLogs): increasing over the process's life,
    // so that the coordinator stores a line sent again once, and the lines a ShipLogs delivered
    // are known after older ones were dropped meanwhile.
    int64_t last_seq ABSL_GUARDED_BY(mu) = 0;
  };
  // Sends the buffered lines of the current task (one ShipLogs call); kept for the next call on a
  // transient failure, dropped when refused for good. One call at a time (ship_mu_): the shipping
  // thread and EndTask both ship, and two calls in flight would send the same lines twice and then
  // drop as many unsent ones. At most 2,000 lines a call: true when the call succeeded and
  // lines are left.
  bool ShipLogs() ABSL_LOCKS_EXCLUDED(ship_mu_);
  // The deadline (rpc_timeout_s plus `extra_ms`) and the bearer token.
  void Prepare(grpc::ClientContext* ctx, int64_t extra_ms = 0) const;
  std::string CurrentToken() const ABSL_LOCKS_EXCLUDED(token_mu_);
  // Reads options_.token_file again after the coordinator refused the token in `rpc`: true when
  // it now holds another one (used from then on). At most once a second; the outcome is logged
  // (an unchanged file says what to do). False without a token file.
  bool RereadToken(const char* rpc) ABSL_LOCKS_EXCLUDED(token_mu_);
  // Whether a call refused with `st` is kept for a retry rather than dropped: UNAUTHENTICATED
  // while the token comes from a file (which may be fixed).
  bool KeepsRefused(const grpc::Status& st) const;
  // The manifest `hash` (`size` bytes): from the cache, else streamed by GetManifest and kept.
  absl::Status FetchManifest(const std::string& hash, int64_t size, const std::string& gid, std::string* csv);
  void Connected(bool c);
  // Logs a failed call made as group `gid` and classifies it: NOT_FOUND marks the group lost,
  // unless the group has registered anew since the call was made (a stale answer).
  absl::Status Failed(const char* rpc, const grpc::Status& st, const std::string& gid);
  // Heartbeats every interval from the previous one's send time (a slow answer does not push the
  // next one back by a whole interval: the lease is valid for timeout - margin from a send).
  void HeartbeatLoop();
  void ShipLoop();
  // Waits `d` on the steady clock, or less when StopThreads is called: false then.
  bool SleepUnlessStopped(std::chrono::steady_clock::duration d);
  // A heartbeat's answer with the coordinator's interval and timeout (0: an older coordinator)
  // other than those told at registration (it restarted with others): the group heartbeats and
  // fences its writes with them from now on.
  void AdoptHeartbeatValues(const v1::HeartbeatResponse& response);
  // Cancels the current task if it is still the lease the answer was about (`generation`; a
  // negative one: whatever lease of `task_id` is current). A heartbeat answered for an earlier
  // lease of the same task (failed as retryable and leased again) must not stop the new one.
  void CancelIfCurrent(const std::string& task_id, int64_t generation, const char* rpc);
  // Sends one run of reports. OK: delivered (or refused for good: dropped and logged).
  grpc::Status Send(const std::vector<Report>& run, const std::string& group_id);
  struct RefusedRun {
    bool kept = false;     // to be sent again later (a transient failure meanwhile)
    bool unknown = false;  // the coordinator no longer knows the group
  };
  // A run whose refusal `st` names one of its points: sent again without it (SenderLoop, Leave).
  RefusedRun ResendWithoutRefusedPoints(const std::vector<Report>& run, const grpc::Status& st,
                                        const std::string& gid);
  void SenderLoop();

  const AgentOptions& options_;
  GroupMetrics* metrics_;
  ::aviary::v1::RegisterGroupRequest registration_;
  ReportBuffer buffer_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<::aviary::v1::WorkerService::Stub> stub_;
  mutable absl::Mutex token_mu_;
  std::string token_ ABSL_GUARDED_BY(token_mu_);  // options_.token, then what RereadToken read
  std::chrono::steady_clock::time_point token_read_at_ ABSL_GUARDED_BY(token_mu_){};
  std::chrono::steady_clock::time_point token_said_at_ ABSL_GUARDED_BY(token_mu_){};  // "still holds it"
  absl::Mutex ship_mu_;  // held across one ShipLogs call
  // The main thread and rank 0's two threads (heartbeat, sender) share these under mu_.
  mutable absl::Mutex mu_;
  bool running_ ABSL_GUARDED_BY(mu_) = false;
  // The threads' pauses (SleepUnlessStopped) wait on the steady clock: Abseil's CondVar
  // deadlines are wall-clock times, and a clock stepped back (NTP, a VM's tools) stretched a
  // heartbeat's wait past the lease.
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
  bool stopping_ = false;  // guarded by sleep_mu_: StopThreads was called
  std::string group_id_ ABSL_GUARDED_BY(mu_);
  int heartbeat_ms_ ABSL_GUARDED_BY(mu_) = 2000;
  int64_t heartbeat_timeout_ms_ ABSL_GUARDED_BY(mu_) = 0;  // the coordinator's; 0: not said
  std::string task_id_ ABSL_GUARDED_BY(mu_);
  int attempt_ ABSL_GUARDED_BY(mu_) = 0;  // task_id_'s lease's attempt
  int64_t lease_generation_ ABSL_GUARDED_BY(mu_) = 0;  // the leases' count
  bool leased_not_begun_ ABSL_GUARDED_BY(mu_) = false;  // Lease named task_id_, BeginTask not yet
  // task_id_'s outcome (CompleteTask, FailTask) is pushed: the task is over here, and a heartbeat
  // answered "cancel" after the coordinator took the outcome (SUCCEEDED; until EndTask) stops nothing.
  bool outcome_pushed_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<bool> cancel_{false};
  std::atomic<bool> lost_{false};
  std::atomic<bool> connected_{false};  // the last call answered (Connected)
  LeaseClock lease_;                       // thread-safe itself
  LeaseClock::Clock::time_point lease_asked_at_{};  // main thread only
  bool registered_before_ = false;                  // main thread only (Register)
  // The last few manifests by hash, most recent first (main thread only): a group that trains
  // the folds of one dataset version fetches each manifest once.
  static constexpr size_t kCachedManifests = 4;
  std::list<std::pair<std::string, std::string>> manifests_;
  int64_t manifest_fetches_ = 0, manifest_hits_ = 0;
  // Fetches of `slow_manifest_` in a row that ran out of time (main thread only): each doubles
  // the next one's allowance (ManifestFetchExtraMs).
  std::string slow_manifest_;
  int slow_fetches_ = 0;
  std::thread heartbeat_, shipper_, sender_;
  std::shared_ptr<LogBuffer> logs_ = std::make_shared<LogBuffer>();
};

// True when `refused` says the task was taken from this group by a user (cancelled, then maybe
// retried or its job deleted): reports refused so are dropped with a warning, not an error.
bool TakenAwayByAUser(const grpc::Status& refused);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_AGENT_COORDINATOR_LINK_H_
