// The coordinator's Prometheus metrics (docs/SERVICE.md, "Metrics", the coordinator's table):
// one owner of a prometheus::Registry and, when an address is given, the Exposer serving
// `/metrics` on it.
//
// Thread-safe: prometheus-cpp metrics are atomic; the label maps are guarded by a mutex.
#ifndef AVIARY_COORDINATOR_METRICS_H_
#define AVIARY_COORDINATOR_METRICS_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "proto/aviary.pb.h"

namespace prometheus {
class Exposer;
class Registry;
class Gauge;
class Counter;
template <typename T>
class Family;
}  // namespace prometheus

namespace aviary::coordinator {

class CoordinatorMetrics {
 public:
  // Without `listen_address` ("") the registry exists but nothing serves it.
  static absl::StatusOr<std::unique_ptr<CoordinatorMetrics>> Create(const std::string& listen_address);
  ~CoordinatorMetrics();

  // The bound port of /metrics, 0 when not serving.
  int port() const { return port_; }
  // Serves the registry on /metrics; until then there is no /metrics (404). Called once the
  // scheduler has restored the stored counters and jobs: served before, a restarted coordinator's
  // counters read 0 for as long as the restore took, and Prometheus took 5 -> 0 -> 5 for a
  // counter reset (increase() of 5: AviaryJobFailed and AviaryWorkerGroupLost fired).
  void Publish();
  // The text exposition of the registry (what /metrics answers).
  std::string Serialize() const;

  // A reported point of a task: train loss and lr always, epoch-end metrics when it is one.
  void ObservePoint(const aviary::v1::TaskInfo& task, const aviary::v1::Metrics& point,
                    int64_t time_unix_ms);
  void SetTaskRunning(const aviary::v1::TaskInfo& task, bool running);
  // A new attempt of the task was leased: drops its last-progress timestamp, which the new
  // attempt's first report sets again (deploy/prometheus/alerts.yml: AviaryTaskNeverReported
  // until then, AviaryTaskStalled after).
  void StartAttempt(const aviary::v1::TaskInfo& task);
  void AddTaskRestarts(const aviary::v1::TaskInfo& task, int restarts);
  // Drops every series of the task (its job was deleted, or pruned by retention): /metrics then
  // shows what a restarted coordinator, which exports neither, would.
  void RemoveTask(const aviary::v1::TaskInfo& task);
  // RemoveTask of each, taking the lock for one task at a time. Each removal walks its family's
  // series (prometheus-cpp 1.0): call it without the scheduler's locks.
  void RemoveTasks(const std::vector<aviary::v1::TaskInfo>& tasks);
  // Sets aviary_jobs{state} for every state.
  void SetJobCounts(const std::map<aviary::v1::JobState, int>& counts);
  void SetWorkerGroups(int groups);
  void AddGroupsLost(int64_t lost);
  // aviary_jobs_failed_total: jobs that went to FAILED (each time: a retried job that fails
  // again counts again). The AviaryJobFailed alert watches it; the aviary_jobs{state="failed"}
  // gauge cannot tell a new failure from another failed job deleted or retried meanwhile.
  void AddJobsFailed(int64_t failed);

 private:
  CoordinatorMetrics();

  // Guards the families' label maps (Add); the gauges and counters themselves are atomic.
  absl::Mutex mu_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
  bool published_ = false;

  prometheus::Family<prometheus::Gauge>* train_loss_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* train_accuracy_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* val_loss_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* val_auc_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* val_roc_auc_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* val_cmap_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* val_accuracy_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* learning_rate_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* task_epoch_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* task_running_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* task_last_progress_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Counter>* task_restarts_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* jobs_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Gauge* worker_groups_ = nullptr;
  prometheus::Counter* worker_groups_lost_ = nullptr;
  prometheus::Counter* jobs_failed_ = nullptr;
};

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_METRICS_H_
