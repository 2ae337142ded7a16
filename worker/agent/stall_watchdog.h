// Rank 0's watch over its task's progress (`aviary-worker serve --stall-timeout-s S`; the
// fault table of docs/SERVICE.md, "Worker groups").
//
// A rank that stops making progress without failing (a read stuck on a hard-mounted NFS share,
// a deadlock, a device that hangs) keeps heartbeating from its link's thread, so the coordinator
// would keep the lease for ever. Other ranks notice a stuck peer (their exchanges and
// collectives time out: group_control.h); a group of one rank, or a stuck rank 0 whose peers
// wait in an 1800 s collective, has nobody to notice. The watchdog's thread checks once a second
// how long the armed task has gone without Progress() and calls `on_stall` once when that
// exceeds the timeout. Only running time counts: a check that finds the previous one more than
// kMaxCountedGapMs ago (the process was stopped, the machine suspended) counts kMaxCountedGapMs.
//
// Thread-safe: Progress() is called on the training thread (a lock-free store), Arm/Disarm on
// the main thread, `on_stall` runs on the watchdog's thread (and is expected to end the process:
// Disarm waits for a firing under way).
#ifndef AVIARY_WORKER_AGENT_STALL_WATCHDOG_H_
#define AVIARY_WORKER_AGENT_STALL_WATCHDOG_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace aviary::worker {

class StallWatchdog {
 public:
  // `seconds`: running time without progress; `last`: what Progress() last named.
  using OnStall = std::function<void(const std::string& task_id, double seconds, const std::string& last)>;

  static constexpr int64_t kCheckIntervalMs = 1000;
  static constexpr int64_t kMaxCountedGapMs = 5000;

  // timeout_s <= 0: off (no thread). `start_thread` false: no thread either; the caller drives
  // Check() (tests).
  StallWatchdog(double timeout_s, OnStall on_stall, bool start_thread = true);
  ~StallWatchdog();  // stops and joins the thread
  StallWatchdog(const StallWatchdog&) = delete;
  StallWatchdog& operator=(const StallWatchdog&) = delete;

  // A task starts (its clock starts now, `what` being its first sign of progress); Disarm: it
  // ended. A watchdog that fired stays quiet until the next Arm. Disarm waits while `on_stall`
  // runs (it ends the process: the task's outcome must not be reported meanwhile).
  void Arm(const std::string& task_id, const char* what) ABSL_LOCKS_EXCLUDED(mu_);
  void Disarm() ABSL_LOCKS_EXCLUDED(mu_);
  // The armed task's timeout, when it needs a longer one than the constructor's (the task's
  // own waits for a peer are longer); never shorter, and nothing when off.
  void AtLeast(double timeout_s) ABSL_LOCKS_EXCLUDED(mu_);
  // A sign of progress: the clock starts again. `what` must be a string literal (kept by address).
  void Progress(const char* what) {
    last_.store(what, std::memory_order_relaxed);
    progress_.fetch_add(1, std::memory_order_release);
  }

  // One check at `now_ms` (a monotonic clock in ms): fires `on_stall` when due. True if it fired.
  bool Check(int64_t now_ms) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Loop();

  const double timeout_s_;
  const OnStall on_stall_;
  std::atomic<uint64_t> progress_{0};
  std::atomic<const char*> last_{""};
  absl::Mutex mu_;
  std::condition_variable_any cv_;  // Loop's wait between checks (the steady clock)
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool armed_ ABSL_GUARDED_BY(mu_) = false;
  bool fired_ ABSL_GUARDED_BY(mu_) = false;
  bool firing_ ABSL_GUARDED_BY(mu_) = false;  // on_stall runs
  double task_timeout_s_ ABSL_GUARDED_BY(mu_) = 0;
  std::string task_id_ ABSL_GUARDED_BY(mu_);
  uint64_t seen_progress_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t last_check_ms_ ABSL_GUARDED_BY(mu_) = -1;  // -1: no check since Arm
  int64_t idle_ms_ ABSL_GUARDED_BY(mu_) = 0;         // running time since the last progress seen
  std::thread thread_;
};

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_AGENT_STALL_WATCHDOG_H_
