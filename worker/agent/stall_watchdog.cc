#include "worker/agent/stall_watchdog.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "common/mutex_lockable.h"

namespace aviary::worker {
namespace {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

StallWatchdog::StallWatchdog(double timeout_s, OnStall on_stall, bool start_thread)
    : timeout_s_(timeout_s), on_stall_(std::move(on_stall)) {
  if (timeout_s_ > 0 && start_thread) thread_ = std::thread([this] { Loop(); });
}

StallWatchdog::~StallWatchdog() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void StallWatchdog::Arm(const std::string& task_id, const char* what) {
  Progress(what);
  absl::MutexLock lock(&mu_);
  armed_ = true;
  fired_ = false;
  task_timeout_s_ = timeout_s_;
  task_id_ = task_id;
  seen_progress_ = progress_.load(std::memory_order_acquire);
  last_check_ms_ = -1;
  idle_ms_ = 0;
}

void StallWatchdog::Disarm() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](bool* firing) { return !*firing; }, &firing_));
  armed_ = false;
}

void StallWatchdog::AtLeast(double timeout_s) {
  absl::MutexLock lock(&mu_);
  if (timeout_s_ > 0) task_timeout_s_ = std::max(task_timeout_s_, timeout_s);
}

bool StallWatchdog::Check(int64_t now_ms) {
  std::string task_id;
  double idle_s = 0;
  {
    absl::MutexLock lock(&mu_);
    if (!armed_ || fired_ || timeout_s_ <= 0) return false;
    const uint64_t progress = progress_.load(std::memory_order_acquire);
    if (progress != seen_progress_ || last_check_ms_ < 0) {
      seen_progress_ = progress;
      idle_ms_ = 0;
    } else {
      idle_ms_ += std::clamp<int64_t>(now_ms - last_check_ms_, 0, kMaxCountedGapMs);
    }
    last_check_ms_ = now_ms;
    idle_s = static_cast<double>(idle_ms_) / 1000.0;
    if (idle_s <= task_timeout_s_) return false;
    fired_ = true;
    firing_ = true;
    task_id = task_id_;
  }
  on_stall_(task_id, idle_s, last_.load(std::memory_order_relaxed));
  absl::MutexLock lock(&mu_);
  firing_ = false;
  return true;
}

void StallWatchdog::Loop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      // On the steady clock: AwaitWithTimeout waited until a wall-clock time, and a clock stepped
      // back a day held the check (and a hung task's stall) back a day.
      common::MutexLockable held{&mu_};
      cv_.wait_for(held, std::chrono::milliseconds(kCheckIntervalMs),
                   [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return stopping_; });
      if (stopping_) return;
    }
    Check(NowMs());
  }
}

}  // namespace aviary::worker
