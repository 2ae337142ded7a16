// Evaluation metrics of the recipe, torch-free: micro PR-AUC (`val_auc`, the monitor), the
// BirdCLEF 2024 macro ROC-AUC, the BirdCLEF 2022/2023 padded cmAP and categorical accuracy.
//
// Every metric is scikit-learn's definition, reproduced exactly (ties included) and checked
// against scikit-learn 1.2 by tests/parity/check_metrics.py:
//   MicroAveragePrecision  average_precision_score(y_true.ravel(), y_score.ravel())
//   MacroRocAuc            roc_auc_score(y_true[:, keep], y_score[:, keep], average='macro'),
//                          keep = the classes with at least one positive (BirdCLEF 2024)
//   PaddedCmap             average_precision_score(y_true + 5 rows of ones,
//                          y_score + 5 rows of ones, average='macro') (BirdCLEF 2022/2023)
//   CategoricalAccuracy    mean(argmax(y_score, 1) == argmax(y_true, 1)) (Keras); a truth row
//                          without a positive (a BirdCLEF "nocall" row) counts as class 0
//
// The notebook monitored Keras' AUC(curve='PR'), an interpolated Riemann sum over 200 fixed
// thresholds. aviary replaces it with scikit-learn's average precision: the step-wise,
// non-interpolated area under the precision-recall curve over the distinct score values
// (AP = sum_k (R_k - R_{k-1}) P_k over thresholds in decreasing order). It is what `val_auc`
// in history.csv and `monitor: auc` mean.
//
// Truth is binary. Scores are rows = samples, columns = classes, float or double, any scale
// (probabilities, logits): only their order and ties matter, except for the padded cmAP, whose
// padding rows score exactly 1. Soft targets (label smoothing, MixUp, CutMix) are not truth:
// build the truth with OneHotLabels() from class indices, BinaryLabelsFromMatrix() from an
// exact 0/1 matrix (it refuses anything else, naming the cell), or ArgmaxLabels() for the
// dominant class of each soft row. CategoricalAccuracy also takes soft truth, as Keras does.
//
// Errors and undefined values:
//   - INVALID_ARGUMENT for shape mismatches and for NaN or infinite scores (scikit-learn raises
//     ValueError on those), naming the row and column.
//   - A metric that is undefined for valid input comes back as MetricValue{NaN, reason}:
//     no positive label at all (micro AP; scikit-learn 1.2 warns and returns 0 there, aviary
//     returns NaN so that a monitor never mistakes it for a score), no class with a positive or
//     a scored class without a negative (macro ROC-AUC; scikit-learn raises), no rows
//     (accuracy), no classes (padded cmAP).
//
// Cost: each class is sorted once, O(n log n) per class, O(n) extra memory per class (the micro
// AP sorts the n*C cells once). 180 classes x 100k rows: 1.5-2.5 s on one core of the
// 2-vCPU development VM (docs/BENCHMARKS.md, the metrics rows).
//
// Thread safety: every function is pure (no globals, no caches); calls may run concurrently.
#ifndef AVIARY_COMMON_METRICS_H_
#define AVIARY_COMMON_METRICS_H_

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace aviary::common {

// A read-only, row-major view of a rows x cols matrix; does not own `data`.
template <typename T>
struct MatrixView {
  const T* data = nullptr;
  size_t rows = 0;
  size_t cols = 0;
  // The values `data` holds when known (a view of a vector), else SIZE_MAX: checked against
  // rows x cols by the metrics (a model head of another width read past the vector).
  size_t held = static_cast<size_t>(-1);

  MatrixView() = default;
  MatrixView(const T* data_in, size_t rows_in, size_t cols_in)
      : data(data_in), rows(rows_in), cols(cols_in) {}
  // A view of `values` (size must be rows * cols; the metrics refuse another).
  MatrixView(const std::vector<T>& values, size_t rows_in, size_t cols_in)
      : data(values.data()), rows(rows_in), cols(cols_in), held(values.size()) {}
  // Whether rows x cols values are there to read (INVALID_ARGUMENT naming `what` otherwise).
  absl::Status CheckHeld(const char* what) const {
    const size_t n = rows * cols;
    if (n > 0 && data == nullptr) return absl::InvalidArgumentError(absl::StrCat(what, " view has no data"));
    if (held != static_cast<size_t>(-1) && held != n) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " hold ", held, " values for ", rows, " x ", cols, " (rows = samples, columns = classes)"));
    }
    return absl::OkStatus();
  }

  const T& operator()(size_t row, size_t col) const { return data[row * cols + col]; }
};

// Binary ground truth, row-major, every value 0 or 1. Build it with the helpers below.
struct BinaryLabels {
  size_t rows = 0;
  size_t cols = 0;
  std::vector<uint8_t> values;  // rows * cols

  BinaryLabels() = default;
  BinaryLabels(size_t rows_in, size_t cols_in)
      : rows(rows_in), cols(cols_in), values(rows_in * cols_in, 0) {}
  uint8_t operator()(size_t row, size_t col) const { return values[row * cols + col]; }
  uint8_t& at(size_t row, size_t col) { return values[row * cols + col]; }
  MatrixView<uint8_t> view() const { return {values, rows, cols}; }
};

// One-hot truth from class indices (the validation targets before label smoothing).
// INVALID_ARGUMENT naming the row when an index is outside [0, num_classes).
absl::StatusOr<BinaryLabels> OneHotLabels(const std::vector<int64_t>& class_indices,
                                          size_t num_classes);

// Truth from a matrix that must hold exactly 0 or 1 in every cell. INVALID_ARGUMENT naming the
// first other value's row and column (a soft label: use OneHotLabels or ArgmaxLabels).
template <typename T>
absl::StatusOr<BinaryLabels> BinaryLabelsFromMatrix(MatrixView<T> truth);

// One-hot of each row's argmax (numpy's rule, see RowArgmax): the hard target behind a
// label-smoothed or mixed row. Rows of a MixUp pair tied at 0.5 go to the first class.
template <typename T>
BinaryLabels ArgmaxLabels(MatrixView<T> soft);

// numpy.argmax(m, axis=1): the first index of the row maximum; a NaN counts as the maximum
// (the first NaN wins). Rows of zero columns give 0.
template <typename T>
std::vector<size_t> RowArgmax(MatrixView<T> m);

// A metric value, or NaN with the reason it is undefined for this input.
struct MetricValue {
  double value = std::numeric_limits<double>::quiet_NaN();
  std::string undefined_reason;  // empty when `value` is defined
  int64_t undefined_class = -1;  // the class (column) the reason names, -1 when none

  bool defined() const { return undefined_reason.empty(); }
};

// average_precision_score(truth.ravel(), scores.ravel()): `val_auc`, micro PR-AUC.
// Undefined when no cell is positive.
template <typename T>
absl::StatusOr<MetricValue> MicroAveragePrecision(const BinaryLabels& truth, MatrixView<T> scores);

// The BirdCLEF 2024 metric: roc_auc_score(truth[:, keep], scores[:, keep], average='macro')
// over the classes with at least one positive. Undefined when no class has a positive or when
// a kept class has no negative (the reason names the first such class index).
// `scored_classes`, when given, receives the kept class indices.
template <typename T>
absl::StatusOr<MetricValue> MacroRocAuc(const BinaryLabels& truth, MatrixView<T> scores,
                                        std::vector<size_t>* scored_classes = nullptr);

// The BirdCLEF 2022/2023 padded cmAP: `pad_rows` rows of ones appended to truth and scores,
// then average_precision_score(average='macro') over every class. Undefined without classes
// (or without rows when pad_rows is 0). With pad_rows = 0 this is the plain macro AP, where a
// class without positives counts as 0, as in scikit-learn. INVALID_ARGUMENT when pad_rows < 0.
template <typename T>
absl::StatusOr<MetricValue> PaddedCmap(const BinaryLabels& truth, MatrixView<T> scores,
                                       int pad_rows = 5);

// Keras CategoricalAccuracy: the fraction of rows whose RowArgmax of the scores equals that of
// the truth. The truth may be binary or soft. Undefined without rows.
template <typename T>
absl::StatusOr<MetricValue> CategoricalAccuracy(const BinaryLabels& truth, MatrixView<T> scores);
template <typename T>
absl::StatusOr<MetricValue> CategoricalAccuracy(MatrixView<T> soft_truth, MatrixView<T> scores);

// The four validation metrics of one evaluation, named as in history.csv.
struct EvalMetrics {
  MetricValue val_auc;      // MicroAveragePrecision
  MetricValue val_roc_auc;  // MacroRocAuc
  MetricValue val_cmap;     // PaddedCmap, 5 rows
  MetricValue val_acc;      // CategoricalAccuracy
  std::vector<size_t> scored_classes;  // the classes MacroRocAuc averaged over
};

// All four metrics at once, validating the input once.
template <typename T>
absl::StatusOr<EvalMetrics> ComputeEvalMetrics(const BinaryLabels& truth, MatrixView<T> scores);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_METRICS_H_
