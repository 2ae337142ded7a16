// The reports rank 0 owes the coordinator (progress points, checkpoints, a task's outcome), in
// the order they were made, waiting in a bounded buffer for the sender thread
// (worker/agent/coordinator_link.h). Thread-safe.
#ifndef AVIARY_WORKER_AGENT_REPORT_BUFFER_H_
#define AVIARY_WORKER_AGENT_REPORT_BUFFER_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "proto/aviary.pb.h"

namespace aviary::worker {

// One report for the coordinator, in the order it was made.
struct Report {
  enum class Kind { kPoint, kCheckpoint, kComplete, kFail };
  Kind kind = Kind::kPoint;
  std::string task_id;
  ::aviary::v1::Metrics point;          // kPoint; kComplete: the best epoch's metrics
  int32_t steps_per_epoch = 0;    // kPoint
  std::string path;               // kCheckpoint: the file; kComplete: the best checkpoint
  int32_t epoch = 0;              // kCheckpoint
  bool best = false;              // kCheckpoint
  std::string error;              // kFail
  bool retryable = false;         // kFail
  bool preempted = false;         // kFail: stopped by a signal (not counted as a restart)
  int32_t attempt = 0;            // kComplete, kFail: the lease's attempt (set by the link's Push)
};

// The reports waiting for the coordinator. Bounded: at most `max_points` progress points; when a
// point would exceed it, the oldest step point (epoch_end false) not being sent is dropped; epoch
// ends, checkpoints and outcomes are never dropped (they may exceed the bound). The sender takes
// the front with Peek, sends it, then Pop (delivered or refused for good) or Release (retry).
// Thread-safe.
class ReportBuffer {
 public:
  explicit ReportBuffer(size_t max_points) : max_points_(max_points) {}

  void Push(Report report);
  // The front run to send, at most `max_points` long: consecutive points of one task, or one
  // other report. Waits up to `wait_s` for something (empty: nothing yet). Marks the run in
  // flight (not droppable) until Pop or Release.
  std::vector<Report> Peek(size_t max_points, double wait_s);
  void Pop();      // removes the run in flight
  void Release();  // keeps it (to retry)
  // Removes every report of `task_id` (a task the group no longer holds); keeps a run in flight.
  void DropTask(const std::string& task_id);
  // Waits until nothing is left or `timeout_s` passed (< 0: forever). True when empty.
  bool WaitEmpty(double timeout_s);
  // Wakes Peek and WaitEmpty callers (shutdown); they return at once until Resume.
  void Interrupt();
  // Undoes Interrupt (the link's threads started again): else the sender's Peek spun.
  void Resume();

  size_t size() const;
  size_t points() const;           // progress points waiting (the gauge)
  int64_t dropped_points() const;  // step points dropped for the bound so far

 private:
  const size_t max_points_;
  mutable absl::Mutex mu_;  // the trainer's thread pushes, rank 0's sender peeks and pops
  // Waits run on the steady clock (libstdc++: pthread_cond_clockwait, CLOCK_MONOTONIC); absl's
  // CondVar here waits until a wall-clock time, and a clock stepped back an hour made Drain's
  // 30 s limit on a signal an hour too.
  std::condition_variable_any cv_;
  std::deque<Report> queue_ ABSL_GUARDED_BY(mu_);
  size_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  size_t points_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
  bool interrupted_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_AGENT_REPORT_BUFFER_H_
