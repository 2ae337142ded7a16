#include "coordinator/metrics.h"

#include <cmath>
#include <exception>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

namespace aviary::coordinator {
namespace {

// A sweep's tasks share job, stage and fold: they also carry their grid point (`point`; the
// label is absent outside sweeps, so those series are unchanged).
prometheus::Labels TaskLabels(const aviary::v1::TaskInfo& task) {
  prometheus::Labels labels{{"job_id", task.job_id()}, {"stage", task.stage()}, {"fold", absl::StrCat(task.fold())}};
  if (task.sweep_overrides_size() > 0) labels["point"] = absl::StrCat(task.sweep_point());
  return labels;
}

// NaN is a value the point does not carry (worker/trainer: an epoch without validation keeps the
// last one shown); an infinity is what the epoch measured (a val_loss of +Inf), exported as is:
// skipped, the previous epoch's healthy value stayed beside the new aviary_task_epoch.
void SetUnlessAbsent(prometheus::Family<prometheus::Gauge>* family, const prometheus::Labels& labels,
                     double value) {
  if (!std::isnan(value)) family->Add(labels).Set(value);
}

const char* JobStateLabel(aviary::v1::JobState state) {
  switch (state) {
    case aviary::v1::JOB_STATE_PENDING: return "pending";
    case aviary::v1::JOB_STATE_RUNNING: return "running";
    case aviary::v1::JOB_STATE_SUCCEEDED: return "succeeded";
    case aviary::v1::JOB_STATE_FAILED: return "failed";
    case aviary::v1::JOB_STATE_CANCELLED: return "cancelled";
    default: return nullptr;
  }
}

}  // namespace

CoordinatorMetrics::CoordinatorMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
  auto gauge = [this](const char* name, const char* help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Register(*registry_);
  };
  train_loss_ = gauge("aviary_train_loss", "Latest training loss of the task (steps and epoch ends)");
  train_accuracy_ = gauge("aviary_train_accuracy", "Latest epoch's training accuracy");
  val_loss_ = gauge("aviary_val_loss", "Latest epoch's validation loss");
  val_auc_ = gauge("aviary_val_auc", "Latest epoch's val_auc (micro PR-AUC, the monitor)");
  val_roc_auc_ = gauge("aviary_val_roc_auc", "Latest epoch's BirdCLEF macro ROC-AUC");
  val_cmap_ = gauge("aviary_val_cmap", "Latest epoch's padded cmAP");
  val_accuracy_ = gauge("aviary_val_accuracy", "Latest epoch's validation accuracy");
  learning_rate_ = gauge("aviary_learning_rate", "Latest learning rate of the task");
  task_epoch_ = gauge("aviary_task_epoch", "Epochs finished by the task");
  task_running_ = gauge("aviary_task_running", "1 while the task is leased, else 0");
  task_last_progress_ = gauge("aviary_task_last_progress_timestamp_seconds",
                              "Unix time of the task's last progress report");
  task_restarts_ = &prometheus::BuildCounter()
                        .Name("aviary_task_restarts_total")
                        .Help("Re-leases of the task after lost groups or retryable failures")
                        .Register(*registry_);
  jobs_ = gauge("aviary_jobs", "Jobs per state");
  worker_groups_ = &prometheus::BuildGauge()
                        .Name("aviary_worker_groups")
                        .Help("Registered live worker groups")
                        .Register(*registry_)
                        .Add({});
  worker_groups_lost_ = &prometheus::BuildCounter()
                             .Name("aviary_worker_groups_lost_total")
                             .Help("Worker groups removed for missing heartbeats")
                             .Register(*registry_)
                             .Add({});
  jobs_failed_ = &prometheus::BuildCounter()
                      .Name("aviary_jobs_failed_total")
                      .Help("Jobs that went to the failed state (a retried job failing again counts again)")
                      .Register(*registry_)
                      .Add({});
  for (aviary::v1::JobState state :
       {aviary::v1::JOB_STATE_PENDING, aviary::v1::JOB_STATE_RUNNING, aviary::v1::JOB_STATE_SUCCEEDED,
        aviary::v1::JOB_STATE_FAILED, aviary::v1::JOB_STATE_CANCELLED}) {
    jobs_->Add({{"state", JobStateLabel(state)}}).Set(0);
  }
}

CoordinatorMetrics::~CoordinatorMetrics() = default;

absl::StatusOr<std::unique_ptr<CoordinatorMetrics>> CoordinatorMetrics::Create(
    const std::string& listen_address) {
  std::unique_ptr<CoordinatorMetrics> metrics(new CoordinatorMetrics());
  if (listen_address.empty()) return metrics;
  try {
    // More than two threads and a request deadline (civetweb's 30 s): two idle connections held
    // open by anyone who can reach the port kept Prometheus's scrapes out.
    metrics->exposer_ = std::make_unique<prometheus::Exposer>(std::vector<std::string>{
        "listening_ports", listen_address, "num_threads", "8", "request_timeout_ms", "5000"});
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("metrics_listen ", listen_address, ": cannot serve /metrics: ", e.what()));
  }
  // The registry is served from Publish(), once the scheduler has restored the stored state.
  const std::vector<int> ports = metrics->exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(
        absl::StrCat("metrics_listen ", listen_address, ": the exposer reports no listening port"));
  }
  metrics->port_ = ports.front();
  return metrics;
}

void CoordinatorMetrics::Publish() {
  if (exposer_ == nullptr || published_) return;
  exposer_->RegisterCollectable(registry_);
  published_ = true;
}

std::string CoordinatorMetrics::Serialize() const {
  prometheus::TextSerializer serializer;
  return serializer.Serialize(registry_->Collect());
}

void CoordinatorMetrics::ObservePoint(const aviary::v1::TaskInfo& task,
                                      const aviary::v1::Metrics& point, int64_t time_unix_ms) {
  absl::MutexLock lock(&mu_);
  const prometheus::Labels labels = TaskLabels(task);
  if (point.epoch_end()) {
    SetUnlessAbsent(train_loss_, labels, point.train_loss());
  } else {
    // A step point always carries the running training loss: a NaN or an infinity here is a
    // diverging run, exported as is for the NaN/inf-loss alert (deploy/prometheus/alerts.yml).
    train_loss_->Add(labels).Set(point.train_loss());
  }
  SetUnlessAbsent(learning_rate_, labels, point.lr());
  task_last_progress_->Add(labels).Set(static_cast<double>(time_unix_ms) / 1000.0);
  if (!point.epoch_end()) return;
  SetUnlessAbsent(train_accuracy_, labels, point.train_acc());
  SetUnlessAbsent(val_loss_, labels, point.val_loss());
  SetUnlessAbsent(val_auc_, labels, point.val_auc());
  SetUnlessAbsent(val_roc_auc_, labels, point.val_roc_auc());
  SetUnlessAbsent(val_cmap_, labels, point.val_cmap());
  SetUnlessAbsent(val_accuracy_, labels, point.val_acc());
  // Epochs are numbered from 0 in history.csv: epoch e's end means e + 1 epochs finished.
  task_epoch_->Add(labels).Set(point.epoch() + 1);
}

void CoordinatorMetrics::SetTaskRunning(const aviary::v1::TaskInfo& task, bool running) {
  absl::MutexLock lock(&mu_);
  task_running_->Add(TaskLabels(task)).Set(running ? 1 : 0);
}

void CoordinatorMetrics::StartAttempt(const aviary::v1::TaskInfo& task) {
  absl::MutexLock lock(&mu_);
  const prometheus::Labels labels = TaskLabels(task);
  if (task_last_progress_->Has(labels)) task_last_progress_->Remove(&task_last_progress_->Add(labels));
}

void CoordinatorMetrics::AddTaskRestarts(const aviary::v1::TaskInfo& task, int restarts) {
  absl::MutexLock lock(&mu_);
  prometheus::Counter& counter = task_restarts_->Add(TaskLabels(task));
  if (restarts > 0) counter.Increment(restarts);
}

void CoordinatorMetrics::RemoveTasks(const std::vector<aviary::v1::TaskInfo>& tasks) {
  // One task at a time under mu_: each removal walks its family (prometheus-cpp 1.0), and the
  // reports of other tasks set their series between them.
  for (const aviary::v1::TaskInfo& task : tasks) RemoveTask(task);
}

void CoordinatorMetrics::RemoveTask(const aviary::v1::TaskInfo& task) {
  absl::MutexLock lock(&mu_);
  const prometheus::Labels labels = TaskLabels(task);
  for (prometheus::Family<prometheus::Gauge>* family :
       {train_loss_, train_accuracy_, val_loss_, val_auc_, val_roc_auc_, val_cmap_, val_accuracy_,
        learning_rate_, task_epoch_, task_running_, task_last_progress_}) {
    if (family->Has(labels)) family->Remove(&family->Add(labels));
  }
  if (task_restarts_->Has(labels)) task_restarts_->Remove(&task_restarts_->Add(labels));
}

void CoordinatorMetrics::SetJobCounts(const std::map<aviary::v1::JobState, int>& counts) {
  absl::MutexLock lock(&mu_);
  for (aviary::v1::JobState state :
       {aviary::v1::JOB_STATE_PENDING, aviary::v1::JOB_STATE_RUNNING, aviary::v1::JOB_STATE_SUCCEEDED,
        aviary::v1::JOB_STATE_FAILED, aviary::v1::JOB_STATE_CANCELLED}) {
    auto it = counts.find(state);
    jobs_->Add({{"state", JobStateLabel(state)}}).Set(it == counts.end() ? 0 : it->second);
  }
}

void CoordinatorMetrics::SetWorkerGroups(int groups) { worker_groups_->Set(groups); }

void CoordinatorMetrics::AddGroupsLost(int64_t lost) {
  if (lost > 0) worker_groups_lost_->Increment(static_cast<double>(lost));
}

void CoordinatorMetrics::AddJobsFailed(int64_t failed) {
  if (failed > 0) jobs_failed_->Increment(static_cast<double>(failed));
}

}  // namespace aviary::coordinator
