#include "coordinator/sweep.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace aviary::coordinator {

absl::StatusOr<std::vector<std::vector<std::string>>> ExpandSweep(
    const google::protobuf::RepeatedPtrField<aviary::v1::SweepAxis>& axes) {
  std::vector<std::vector<std::string>> points{{}};
  std::set<std::string> keys;
  size_t point_bytes = 0;  // the longest point's "key=value" bytes so far
  for (int i = 0; i < axes.size(); ++i) {
    const aviary::v1::SweepAxis& axis = axes.Get(i);
    const std::string field = absl::StrCat("sweep[", i, "]");
    const std::string& key = axis.key();
    bool key_ok = !key.empty() && key.size() <= 256 && key.front() != '.' && key.back() != '.';
    for (char c : key) {
      key_ok = key_ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                          c == '_' || c == '.');
    }
    if (!key_ok) {
      return absl::InvalidArgumentError(absl::StrCat("field '", field, ".key': '", key.substr(0, 80),
                                                     "' is not a dotted config key"));
    }
    if (!keys.insert(key).second) {
      return absl::InvalidArgumentError(absl::StrCat("field '", field, ".key': '", key,
                                                     "' is swept twice; give all its values in one --sweep"));
    }
    if (axis.values().empty()) {
      return absl::InvalidArgumentError(absl::StrCat("field '", field, "': key '", key, "' has no values"));
    }
    // Before each value is looked at: an axis of millions of values is refused at once.
    const size_t grid = points.size() * static_cast<size_t>(axis.values_size());
    if (grid > kMaxSweepPoints) {
      return absl::InvalidArgumentError(absl::StrCat("field '", field, "': key '", key, "' brings the grid to ",
                                                     grid, " points, more than ", kMaxSweepPoints));
    }
    std::set<std::string> seen;
    size_t longest = 0;
    for (int v = 0; v < axis.values_size(); ++v) {
      const std::string& value = axis.values(v);
      if (value.empty() || value.size() > 1024) {
        return absl::InvalidArgumentError(absl::StrCat("field '", field, ".values[", v, "]' of key '", key,
                                                       "': ", value.size(), " bytes (1 to 1024 allowed)"));
      }
      longest = std::max(longest, key.size() + 1 + value.size());
      // As --set's values (service.cc, CheckText): they reach the task's overrides, the logs and
      // the console. (Not UTF-8 is refused by protobuf itself: a proto3 string.)
      for (size_t b = 0; b < value.size(); ++b) {
        const unsigned char c = static_cast<unsigned char>(value[b]);
        if (c < 0x20 || c == 0x7f) {
          return absl::InvalidArgumentError(absl::StrCat("field '", field, ".values[", v, "]' of key '", key,
                                                         "': a control character (byte ", b, ")"));
        }
      }
      if (!seen.insert(value).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("field '", field, "': key '", key, "' lists the value '", value, "' twice"));
      }
    }
    // One value is a --set: the points could not differ in it, so the checks that compare the
    // points (the keys a job's points share, sweep best's metric) never saw it, and its bytes
    // were copied onto every task.
    if (axis.values_size() == 1) {
      return absl::InvalidArgumentError(absl::StrCat("field '", field, "': key '", key, "' has one value ('",
                                                     axis.values(0),
                                                     "'); a sweep needs two or more (give one value with --set)"));
    }
    // Every task carries its point's overrides (and every job snapshot, GetJob and WatchJob
    // event all of them): 4096 tasks of 2 KiB each is 8 MiB a snapshot.
    point_bytes += longest;
    if (point_bytes > kMaxSweepPointBytes) {
      return absl::InvalidArgumentError(absl::StrCat("field '", field, "': key '", key,
                                                     "' brings a point's overrides to ", point_bytes,
                                                     " bytes, more than ", kMaxSweepPointBytes, " (the keys and values)"));
    }
    std::vector<std::vector<std::string>> next;
    next.reserve(grid);
    for (const auto& point : points) {
      for (const std::string& value : axis.values()) {
        next.push_back(point);
        next.back().push_back(absl::StrCat(key, "=", value));
      }
    }
    points = std::move(next);
  }
  return points;
}

std::string MonitorMetric(const std::string& monitor, bool* higher_is_better) {
  *higher_is_better = true;
  if (monitor == "auc") return "val_auc";
  if (monitor == "roc_auc") return "val_roc_auc";
  if (monitor == "cmap") return "val_cmap";
  if (monitor == "acc") return "val_acc";
  if (monitor == "loss") {
    *higher_is_better = false;
    return "val_loss";
  }
  return "";
}

namespace {

double MetricValue(const aviary::v1::Metrics& m, const std::string& metric) {
  if (metric == "val_auc") return m.val_auc();
  if (metric == "val_roc_auc") return m.val_roc_auc();
  if (metric == "val_cmap") return m.val_cmap();
  if (metric == "val_acc") return m.val_acc();
  if (metric == "val_loss") return m.val_loss();
  return NAN;
}

}  // namespace

bool ComputeSweepBest(const aviary::v1::JobInfo& job, aviary::v1::SweepBest* best) {
  if (job.sweep().empty()) return false;
  bool higher = true;
  const std::string metric = MonitorMetric(job.monitor(), &higher);
  if (metric.empty()) return false;
  bool has_finetune = false;
  for (const auto& task : job.tasks()) has_finetune = has_finetune || task.stage() == "finetune";
  const std::string final_stage = has_finetune ? "finetune" : "pretrain";
  struct Sum {
    double total = 0;
    int counted = 0;
    int tasks = 0;
    const aviary::v1::TaskInfo* first = nullptr;
  };
  std::map<int, Sum> sums;
  for (const auto& task : job.tasks()) {
    if (task.stage() != final_stage) continue;
    Sum& sum = sums[task.sweep_point()];
    if (sum.first == nullptr) sum.first = &task;
    ++sum.tasks;
    if (!task.has_best()) continue;
    const double value = MetricValue(task.best(), metric);
    // Not measured (NaN), or an infinite loss (accepted in reports): a mean over it would be NaN
    // or win outright, and a NaN best was never replaced.
    if (!std::isfinite(value)) continue;
    sum.total += value;
    ++sum.counted;
  }
  bool found = false;
  double best_value = 0;
  int best_counted = 0;
  for (const auto& [point, sum] : sums) {
    if (sum.counted == 0) continue;
    const double mean = sum.total / sum.counted;
    // A point with more folds counted first: a mean over fewer folds (a point still running, or
    // one whose folds failed) is not comparable, and one lucky fold won over a finished point.
    if (found && (sum.counted < best_counted ||
                  (sum.counted == best_counted && !(higher ? mean > best_value : mean < best_value)))) {
      continue;
    }
    found = true;
    best_value = mean;
    best_counted = sum.counted;
    best->set_point(point);
    best->mutable_overrides()->CopyFrom(sum.first->sweep_overrides());
    best->set_metric(metric);
    best->set_value(mean);
    best->set_tasks(sum.counted);
    best->set_tasks_total(sum.tasks);
  }
  return found;
}

}  // namespace aviary::coordinator
