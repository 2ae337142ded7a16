#include "worker/agent/report_buffer.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <utility>

#include "common/mutex_lockable.h"

namespace aviary::worker {
namespace {

std::chrono::steady_clock::duration Steady(double seconds) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(std::clamp(seconds, 0.0, 1e7)));
}

}  // namespace

void ReportBuffer::Push(Report report) {
  absl::MutexLock lock(&mu_);
  const bool point = report.kind == Report::Kind::kPoint;
  if (point && points_ >= max_points_) {
    // Drop the oldest step point that is not being sent; epoch ends are kept.
    bool dropped = false;
    for (size_t i = in_flight_; i < queue_.size(); ++i) {
      if (queue_[i].kind == Report::Kind::kPoint && !queue_[i].point.epoch_end()) {
        queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(i));
        --points_;
        ++dropped_;
        dropped = true;
        break;
      }
    }
    if (!dropped && !report.point.epoch_end()) {  // only epoch ends (or in flight): drop the new one
      ++dropped_;
      return;
    }
  }
  if (point) ++points_;
  queue_.push_back(std::move(report));
  cv_.notify_all();
}

std::vector<Report> ReportBuffer::Peek(size_t max_points, double wait_s) {
  absl::MutexLock lock(&mu_);
  common::MutexLockable held{&mu_};
  cv_.wait_for(held, Steady(wait_s), [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return interrupted_ || queue_.size() > in_flight_;
  });
  std::vector<Report> run;
  if (in_flight_ > 0 || queue_.empty()) return run;
  const Report& first = queue_.front();
  if (first.kind != Report::Kind::kPoint) {
    run.push_back(first);
  } else {
    for (size_t i = 0; i < queue_.size() && run.size() < std::max<size_t>(1, max_points); ++i) {
      if (queue_[i].kind != Report::Kind::kPoint || queue_[i].task_id != first.task_id) break;
      run.push_back(queue_[i]);
    }
  }
  in_flight_ = run.size();
  return run;
}

void ReportBuffer::Pop() {
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < in_flight_ && !queue_.empty(); ++i) {
    if (queue_.front().kind == Report::Kind::kPoint) --points_;
    queue_.pop_front();
  }
  in_flight_ = 0;
  cv_.notify_all();
}

void ReportBuffer::Release() {
  absl::MutexLock lock(&mu_);
  in_flight_ = 0;
  cv_.notify_all();
}

void ReportBuffer::DropTask(const std::string& task_id) {
  absl::MutexLock lock(&mu_);
  std::deque<Report> kept;
  for (size_t i = 0; i < queue_.size(); ++i) {
    if (i >= in_flight_ && queue_[i].task_id == task_id) {
      if (queue_[i].kind == Report::Kind::kPoint) --points_;
      continue;
    }
    kept.push_back(std::move(queue_[i]));
  }
  queue_.swap(kept);
  cv_.notify_all();
}

bool ReportBuffer::WaitEmpty(double timeout_s) {
  absl::MutexLock lock(&mu_);
  common::MutexLockable held{&mu_};
  const auto done = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return queue_.empty() || interrupted_; };
  if (timeout_s < 0) {
    cv_.wait(held, done);
  } else {
    cv_.wait_for(held, Steady(timeout_s), done);
  }
  return queue_.empty();
}

void ReportBuffer::Interrupt() {
  absl::MutexLock lock(&mu_);
  interrupted_ = true;
  cv_.notify_all();
}

void ReportBuffer::Resume() {
  absl::MutexLock lock(&mu_);
  interrupted_ = false;
}

size_t ReportBuffer::size() const {
  absl::MutexLock lock(&mu_);
  return queue_.size();
}
size_t ReportBuffer::points() const {
  absl::MutexLock lock(&mu_);
  return points_;
}
int64_t ReportBuffer::dropped_points() const {
  absl::MutexLock lock(&mu_);
  return dropped_;
}

}  // namespace aviary::worker
