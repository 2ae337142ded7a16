// The worker group's /metrics (rank 0 serves them, worker/agent/metrics_server.h). The step,
// all-reduce, loader and GPU memory series are rank 0's own view; aviary_samples_total counts
// every rank's samples (exchanged at each step, worker/agent/group_control.h). Every series
// carries the label group_id.
//
// Thread-safe: the main thread updates the training series, rank 0's threads the connection and
// buffer gauges.
#ifndef AVIARY_WORKER_AGENT_GROUP_METRICS_H_
#define AVIARY_WORKER_AGENT_GROUP_METRICS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "worker/agent/metrics_server.h"

namespace aviary::worker {

struct StepStats;

class GroupMetrics {
 public:
  // `listen` empty: no endpoint (every update is still accepted). Errors name --metrics-listen.
  static absl::StatusOr<std::unique_ptr<GroupMetrics>> Create(const std::string& listen);

  // The bound port (0 without an endpoint).
  int port() const { return server_ ? server_->port() : 0; }

  // Every series carries label group_id; a new registration starts new series.
  void SetGroupId(const std::string& group_id);

  void OnStep(const StepStats& s);  // rank 0's step: its duration, all-reduce, loader
  void AddSamples(int64_t n);       // the group's samples (every rank's)
  void SetSamplesPerSecond(double v);
  // The task ended: the throughput and the loader's queue read 0 while the group is idle (they
  // kept the last task's values, and a dashboard's sum over groups overstated).
  void EndTask();
  void SetConnected(bool connected);
  void SetBuffered(size_t points);
  double Buffered() ABSL_LOCKS_EXCLUDED(mu_);  // the gauge's value (tests)
  // Process-wide counters without the group_id label (they survive a new registration).
  void AddFencedWrite();   // aviary_fenced_writes_total
  double FencedWrites() const { return fenced_writes_.Value(); }
  void AddStorageFault();  // aviary_storage_faults_total
  void SetGpuMemory(const std::string& device, double bytes);
  // The sum over the devices of the last SetGpuMemory calls (0 before any; sent with heartbeats).
  int64_t GpuMemoryBytes() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  GroupMetrics();

  absl::Mutex mu_;  // the series of the current group_id and the families' label maps
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<MetricsServer> server_;  // declared after registry_: stops before it goes
  prometheus::Family<prometheus::Counter>& samples_total_family_;
  prometheus::Family<prometheus::Gauge>& samples_per_second_family_;
  prometheus::Family<prometheus::Histogram>& step_duration_family_;
  prometheus::Family<prometheus::Histogram>& allreduce_duration_family_;
  prometheus::Family<prometheus::Gauge>& queue_depth_family_;
  prometheus::Family<prometheus::Counter>& loader_wait_family_;
  prometheus::Family<prometheus::Gauge>& gpu_memory_family_;
  prometheus::Family<prometheus::Gauge>& connected_family_;
  prometheus::Family<prometheus::Gauge>& buffered_family_;
  prometheus::Counter& fenced_writes_;   // thread-safe itself
  prometheus::Counter& storage_faults_;
  std::string group_id_ ABSL_GUARDED_BY(mu_);
  prometheus::Counter* samples_total_ ABSL_GUARDED_BY(mu_) = nullptr;
  prometheus::Gauge* samples_per_second_ ABSL_GUARDED_BY(mu_) = nullptr;
  prometheus::Histogram* step_duration_ ABSL_GUARDED_BY(mu_) = nullptr;
  prometheus::Histogram* allreduce_duration_ ABSL_GUARDED_BY(mu_) = nullptr;
  prometheus::Gauge* queue_depth_ ABSL_GUARDED_BY(mu_) = nullptr;
  prometheus::Counter* loader_wait_ ABSL_GUARDED_BY(mu_) = nullptr;
  prometheus::Gauge* connected_ ABSL_GUARDED_BY(mu_) = nullptr;
  prometheus::Gauge* buffered_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::map<std::string, prometheus::Gauge*> gpu_memory_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> gpu_memory_bytes_ ABSL_GUARDED_BY(mu_);
  double connected_value_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_AGENT_GROUP_METRICS_H_
