// Sweeps (docs/SERVICE.md, "Sweeps"): `aviary submit P.yaml --sweep key=[v1,v2] ...` makes one
// job whose tasks are the grid of values x the selected folds. This file holds the pure parts:
// the grid's expansion and checks, and the best grid point by the job's monitor.
//
// Thread-compatible free functions.
#ifndef AVIARY_COORDINATOR_SWEEP_H_
#define AVIARY_COORDINATOR_SWEEP_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "google/protobuf/repeated_field.h"
#include "proto/aviary.pb.h"

namespace aviary::coordinator {

// At most this many grid points per job (the product of the axes' sizes).
inline constexpr size_t kMaxSweepPoints = 256;
// The most tasks one job may have (its sweep points times its stages' tasks).
inline constexpr size_t kMaxTasksPerJob = 4096;
// The most bytes of "key=value" overrides one grid point may have (every task carries its own).
inline constexpr size_t kMaxSweepPointBytes = 2048;

// The grid points in order (the last axis varies fastest), each as "key=value" overrides. No
// axes: one point with no overrides. INVALID_ARGUMENT naming the axis for an empty or
// malformed key, a key given twice, an axis with fewer than two values, an empty, overlong or
// repeated value, a grid larger than kMaxSweepPoints, or points of more than kMaxSweepPointBytes.
absl::StatusOr<std::vector<std::vector<std::string>>> ExpandSweep(
    const google::protobuf::RepeatedPtrField<aviary::v1::SweepAxis>& axes);

// The metric of TaskInfo.best that `monitor` (train.monitor) watches ("auc" -> "val_auc", ...)
// and whether higher is better. "" for an unknown monitor.
std::string MonitorMetric(const std::string& monitor, bool* higher_is_better);

// The best grid point of `job` (a sweep: job.sweep() not empty) by job.monitor(): per point, the
// mean over its final-stage tasks (finetune when the job has any, else pretrain) that have a best
// epoch; ties go to the lower point. false when no point has a value yet.
bool ComputeSweepBest(const aviary::v1::JobInfo& job, aviary::v1::SweepBest* best);

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_SWEEP_H_
