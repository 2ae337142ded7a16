#include "worker/agent/group_metrics.h"

#include <algorithm>
#include <utility>

#include "common/status.h"
#include "worker/trainer.h"

namespace aviary::worker {

GroupMetrics::GroupMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      samples_total_family_(prometheus::BuildCounter()
                                .Name("aviary_samples_total")
                                .Help("Samples trained by the group (all ranks)")
                                .Register(*registry_)),
      samples_per_second_family_(prometheus::BuildGauge()
                                     .Name("aviary_samples_per_second")
                                     .Help("The group's throughput over the last report interval")
                                     .Register(*registry_)),
      step_duration_family_(prometheus::BuildHistogram()
                                .Name("aviary_step_duration_seconds")
                                .Help("Optimizer step time, data wait included (rank 0)")
                                .Register(*registry_)),
      allreduce_duration_family_(prometheus::BuildHistogram()
                                     .Name("aviary_allreduce_duration_seconds")
                                     .Help("Per step: gradient all-reduce time not hidden by backward (rank 0)")
                                     .Register(*registry_)),
      queue_depth_family_(prometheus::BuildGauge()
                              .Name("aviary_loader_queue_depth")
                              .Help("Prefetched batches waiting (rank 0)")
                              .Register(*registry_)),
      loader_wait_family_(prometheus::BuildCounter()
                              .Name("aviary_loader_wait_seconds_total")
                              .Help("Time steps waited for data (rank 0)")
                              .Register(*registry_)),
      gpu_memory_family_(prometheus::BuildGauge()
                             .Name("aviary_gpu_memory_bytes")
                             .Help("Memory allocated by torch per device (CUDA only; rank 0's devices)")
                             .Register(*registry_)),
      connected_family_(prometheus::BuildGauge()
                            .Name("aviary_coordinator_connected")
                            .Help("1 while the coordinator answers")
                            .Register(*registry_)),
      buffered_family_(prometheus::BuildGauge()
                           .Name("aviary_reports_buffered")
                           .Help("Progress points waiting for the coordinator")
                           .Register(*registry_)),
      fenced_writes_(prometheus::BuildCounter()
                         .Name("aviary_fenced_writes_total")
                         .Help("Writes into a run folder refused because the task's lease was gone")
                         .Register(*registry_)
                         .Add({})),
      storage_faults_(prometheus::BuildCounter()
                          .Name("aviary_storage_faults_total")
                          .Help("Tasks that ended on a failed write into the run folder (full disk, I/O error)")
                          .Register(*registry_)
                          .Add({})) {}

absl::StatusOr<std::unique_ptr<GroupMetrics>> GroupMetrics::Create(const std::string& listen) {
  auto m = std::unique_ptr<GroupMetrics>(new GroupMetrics());
  if (!listen.empty()) {
    auto server = MetricsServer::Start(listen, m->registry_);
    if (!server.ok()) return common::Annotate(server.status(), "--metrics-listen");
    m->server_ = std::move(*server);
  }
  m->SetGroupId("");
  return m;
}

void GroupMetrics::SetGroupId(const std::string& group_id) {
  absl::MutexLock lock(&mu_);
  if (samples_total_ != nullptr) {
    samples_total_family_.Remove(samples_total_);
    samples_per_second_family_.Remove(samples_per_second_);
    step_duration_family_.Remove(step_duration_);
    allreduce_duration_family_.Remove(allreduce_duration_);
    queue_depth_family_.Remove(queue_depth_);
    loader_wait_family_.Remove(loader_wait_);
    connected_family_.Remove(connected_);
    buffered_family_.Remove(buffered_);
    for (auto& [device, gauge] : gpu_memory_) gpu_memory_family_.Remove(gauge);
    gpu_memory_.clear();
    gpu_memory_bytes_.clear();
  }
  group_id_ = group_id;
  const prometheus::Labels labels{{"group_id", group_id}};
  samples_total_ = &samples_total_family_.Add(labels);
  samples_per_second_ = &samples_per_second_family_.Add(labels);
  step_duration_ = &step_duration_family_.Add(
      labels, prometheus::Histogram::BucketBoundaries{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                      2.5, 5, 10, 25, 60, 120});
  allreduce_duration_ = &allreduce_duration_family_.Add(
      labels, prometheus::Histogram::BucketBoundaries{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                      0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5});
  queue_depth_ = &queue_depth_family_.Add(labels);
  loader_wait_ = &loader_wait_family_.Add(labels);
  connected_ = &connected_family_.Add(labels);
  buffered_ = &buffered_family_.Add(labels);
  connected_->Set(connected_value_);
}

void GroupMetrics::OnStep(const StepStats& s) {
  absl::MutexLock lock(&mu_);
  step_duration_->Observe(s.step_seconds);
  allreduce_duration_->Observe(s.allreduce_seconds);
  queue_depth_->Set(s.loader_queue_depth);
  loader_wait_->Increment(std::max(0.0, s.data_wait_seconds));
}

void GroupMetrics::AddSamples(int64_t n) {
  absl::MutexLock lock(&mu_);
  if (n > 0) samples_total_->Increment(static_cast<double>(n));
}

void GroupMetrics::SetSamplesPerSecond(double v) {
  absl::MutexLock lock(&mu_);
  samples_per_second_->Set(v);
}

void GroupMetrics::EndTask() {
  absl::MutexLock lock(&mu_);
  samples_per_second_->Set(0);
  queue_depth_->Set(0);
  // The task's tensors are gone with its trainer: an idle group showed (and sent with its
  // heartbeats) the memory its last task had allocated.
  for (auto& [device, gauge] : gpu_memory_) {
    gauge->Set(0);
    gpu_memory_bytes_[device] = 0;
  }
}

void GroupMetrics::SetConnected(bool connected) {
  absl::MutexLock lock(&mu_);
  connected_value_ = connected ? 1 : 0;
  connected_->Set(connected_value_);
}

void GroupMetrics::AddFencedWrite() { fenced_writes_.Increment(); }

void GroupMetrics::AddStorageFault() { storage_faults_.Increment(); }

void GroupMetrics::SetBuffered(size_t points) {
  absl::MutexLock lock(&mu_);
  buffered_->Set(static_cast<double>(points));
}

double GroupMetrics::Buffered() {
  absl::MutexLock lock(&mu_);
  return buffered_->Value();
}

void GroupMetrics::SetGpuMemory(const std::string& device, double bytes) {
  absl::MutexLock lock(&mu_);
  auto it = gpu_memory_.find(device);
  if (it == gpu_memory_.end()) {
    it = gpu_memory_.emplace(device, &gpu_memory_family_.Add({{"group_id", group_id_}, {"device", device}})).first;
  }
  it->second->Set(bytes);
  gpu_memory_bytes_[device] = static_cast<int64_t>(bytes);
}

int64_t GroupMetrics::GpuMemoryBytes() {
  absl::MutexLock lock(&mu_);
  int64_t total = 0;
  for (const auto& [device, bytes] : gpu_memory_bytes_) total += bytes;
  return total;
}

}  // namespace aviary::worker
