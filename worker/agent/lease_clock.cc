#include "worker/agent/lease_clock.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"

namespace aviary::worker {

std::chrono::milliseconds LeaseClock::Margin(int64_t timeout_ms) {
  return std::chrono::milliseconds(std::max<int64_t>(500, timeout_ms / 10));
}

void LeaseClock::SetTimeout(int64_t timeout_ms) {
  absl::MutexLock lock(&mu_);
  timeout_ms = std::max<int64_t>(0, timeout_ms);
  if (!task_id_.empty() && timeout_ms > 0) {
    const Clock::time_point from_renewal = renewed_at_ + std::chrono::milliseconds(timeout_ms) - Margin(timeout_ms);
    // From no fence (an older coordinator said no timeout) to one: the lease from its last
    // renewal; to a shorter one: not past that.
    if (timeout_ms_ <= 0) {
      valid_until_ = from_renewal;
    } else if (timeout_ms < timeout_ms_) {
      valid_until_ = std::min(valid_until_, from_renewal);
    }
  }
  timeout_ms_ = timeout_ms;
}

int64_t LeaseClock::timeout_ms() const {
  absl::MutexLock lock(&mu_);
  return timeout_ms_;
}

void LeaseClock::Begin(const std::string& task_id, int attempt, Clock::time_point asked_at) {
  absl::MutexLock lock(&mu_);
  task_id_ = task_id;
  attempt_ = attempt;
  revoked_.clear();
  revoked_by_cancel_ = false;
  renewed_at_ = asked_at;
  valid_until_ = asked_at + std::chrono::milliseconds(timeout_ms_) - Margin(timeout_ms_);
}

void LeaseClock::Renew(const std::string& task_id, Clock::time_point sent_at) {
  absl::MutexLock lock(&mu_);
  if (task_id.empty() || task_id != task_id_ || !revoked_.empty()) return;
  renewed_at_ = std::max(renewed_at_, sent_at);
  valid_until_ = std::max(valid_until_, sent_at + std::chrono::milliseconds(timeout_ms_) - Margin(timeout_ms_));
}

void LeaseClock::Revoke(const std::string& why, bool by_cancel) {
  absl::MutexLock lock(&mu_);
  if (task_id_.empty() || !revoked_.empty()) return;
  revoked_ = why;
  revoked_by_cancel_ = by_cancel;
}

void LeaseClock::End() {
  absl::MutexLock lock(&mu_);
  task_id_.clear();
  revoked_.clear();
  revoked_by_cancel_ = false;
}

absl::Status LeaseClock::Check(const std::string& path, Clock::time_point now) const {
  absl::MutexLock lock(&mu_);
  if (task_id_.empty()) return absl::OkStatus();  // not under a lease (nothing to fence)
  if (!revoked_.empty()) {
    absl::Status gone = absl::AbortedError(
        absl::StrCat("lease for task ", task_id_, " attempt ", attempt_, " is gone (", revoked_, "); not writing ", path));
    return revoked_by_cancel_ ? common::MarkLeaseRevoked(gone) : gone;
  }
  if (timeout_ms_ <= 0 || now < valid_until_) return absl::OkStatus();
  const double ago_s = std::chrono::duration<double>(now - valid_until_).count();
  return absl::AbortedError(absl::StrFormat(
      "lease for task %s attempt %d expired %.1f s ago (no heartbeat answered within heartbeat_timeout %.1f s "
      "less a margin of %.1f s); not writing %s",
      task_id_, attempt_, ago_s, timeout_ms_ / 1000.0, Margin(timeout_ms_).count() / 1000.0, path));
}

}  // namespace aviary::worker
