// Rank 0's view of how long the lease on its current task is certainly still its own: the
// fence that keeps a group cut off from the coordinator from writing the run folder after the
// coordinator may have leased the task again (docs/SERVICE.md, "Fencing").
//
// The coordinator removes a group, and leases its task again, once it has heard nothing from it
// for heartbeat_timeout (told at registration). A heartbeat that the coordinator answered was
// received after it was sent, so the lease lasts at least until send time + timeout. The clock
// keeps "valid until" = the send time of the last answered heartbeat (or of the LeaseTask call)
// + timeout - margin, where margin = max(0.5 s, timeout / 10) covers the write being published
// and clock rate differences. A cancel answer or a NOT_FOUND for the group revokes the lease at
// once. With timeout 0 (a coordinator that does not say) the fence is off.
//
// Thread-safe (the heartbeat thread renews, the training thread checks).
#ifndef AVIARY_WORKER_AGENT_LEASE_CLOCK_H_
#define AVIARY_WORKER_AGENT_LEASE_CLOCK_H_

#include <time.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace aviary::worker {

// CLOCK_BOOTTIME: monotonic as steady_clock (CLOCK_MONOTONIC) is, but it runs on while the host
// is suspended. On steady_clock a host that hibernated (a spot GPU instance) past the timeout
// resumed with its lease still "valid", while the coordinator had leased the task again.
struct BootClock {
  using duration = std::chrono::nanoseconds;
  using rep = duration::rep;
  using period = duration::period;
  using time_point = std::chrono::time_point<BootClock>;
  static constexpr bool is_steady = true;
  static time_point now() noexcept {
    timespec ts{};
    ::clock_gettime(CLOCK_BOOTTIME, &ts);  // cannot fail for this clock id on Linux >= 2.6.39
    return time_point(duration(static_cast<rep>(ts.tv_sec) * 1000000000 + ts.tv_nsec));
  }
};

class LeaseClock {
 public:
  using Clock = BootClock;

  // The coordinator's heartbeat timeout (RegisterGroupResponse.heartbeat_timeout_ms, or a
  // heartbeat's answer after the coordinator restarted with another; 0: off). A shorter one
  // shortens the current lease too: it runs from its last renewal with the new timeout.
  void SetTimeout(int64_t timeout_ms);
  int64_t timeout_ms() const;
  // A new lease of `task_id` (attempt `attempt`), asked for at `asked_at`.
  void Begin(const std::string& task_id, int attempt, Clock::time_point asked_at);
  // An answered heartbeat for `task_id` sent at `sent_at` extends the lease (never shortens it).
  void Renew(const std::string& task_id, Clock::time_point sent_at);
  // The lease is gone (cancelled, the group removed): every later Check fails. `why` is logged
  // in the error. `by_cancel`: the coordinator took it away (a cancel, the task given to another
  // group), and Check's errors are marked common::MarkLeaseRevoked (the expected end of a cancel).
  void Revoke(const std::string& why, bool by_cancel = false);
  void End();

  // OK while the current lease is valid at `now`; else ABORTED "lease for task T attempt N
  // expired 1.2 s ago (no heartbeat answered since ...); not writing PATH".
  absl::Status Check(const std::string& path, Clock::time_point now) const;
  absl::Status Check(const std::string& path) const { return Check(path, Clock::now()); }

  // The margin subtracted from the timeout.
  static std::chrono::milliseconds Margin(int64_t timeout_ms);

 private:
  mutable absl::Mutex mu_;
  int64_t timeout_ms_ ABSL_GUARDED_BY(mu_) = 0;
  std::string task_id_ ABSL_GUARDED_BY(mu_);
  int attempt_ ABSL_GUARDED_BY(mu_) = 0;
  Clock::time_point valid_until_ ABSL_GUARDED_BY(mu_) = Clock::time_point{};
  Clock::time_point renewed_at_ ABSL_GUARDED_BY(mu_) = Clock::time_point{};  // Begin's or the last Renew's
  std::string revoked_ ABSL_GUARDED_BY(mu_);
  bool revoked_by_cancel_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_AGENT_LEASE_CLOCK_H_
