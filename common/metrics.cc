#include "common/metrics.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace aviary::common {
namespace {

template <typename T>
bool IsNan(T value) {
  if constexpr (std::is_floating_point_v<T>) {
    return std::isnan(value);
  } else {
    return false;
  }
}

MetricValue Defined(double value) {
  MetricValue m;
  m.value = value;
  return m;
}

MetricValue Undefined(std::string reason) {
  MetricValue m;
  m.undefined_reason = std::move(reason);
  return m;
}

template <typename T>
absl::Status CheckScores(const BinaryLabels& truth, MatrixView<T> scores) {
  if (truth.rows != scores.rows || truth.cols != scores.cols) {
    return absl::InvalidArgumentError(
        absl::StrCat("truth is ", truth.rows, " x ", truth.cols, " but scores are ", scores.rows,
                     " x ", scores.cols, " (rows = samples, columns = classes)"));
  }
  if (truth.values.size() != truth.rows * truth.cols) {
    return absl::InvalidArgumentError(absl::StrCat("truth holds ", truth.values.size(),
                                                   " values for ", truth.rows, " x ",
                                                   truth.cols));
  }
  const size_t n = scores.rows * scores.cols;
  AVIARY_RETURN_IF_ERROR(scores.CheckHeld("scores"));
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(scores.data[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("score at row ", i / scores.cols, ", class ", i % scores.cols, " is ",
                       static_cast<double>(scores.data[i]), ": metrics need finite scores"));
    }
  }
  return absl::OkStatus();
}

// The scores of one set of cells split by truth, each sorted in decreasing order.
template <typename T>
struct SortedCells {
  std::vector<T> positive;
  std::vector<T> negative;

  void Sort() {
    std::sort(positive.begin(), positive.end(), std::greater<T>());
    std::sort(negative.begin(), negative.end(), std::greater<T>());
  }
};

template <typename T>
SortedCells<T> ClassCells(const BinaryLabels& truth, MatrixView<T> scores, size_t col) {
  SortedCells<T> cells;
  for (size_t r = 0; r < scores.rows; ++r) {
    (truth(r, col) ? cells.positive : cells.negative).push_back(scores(r, col));
  }
  cells.Sort();
  return cells;
}

// scikit-learn's _binary_clf_curve: walks the distinct score values in decreasing order and
// calls visit(tps, fps) with the cumulative true and false positives at each threshold.
// `pad_positives` extra positive cells scoring `pad_score` are merged in (the padded cmAP).
template <typename T, typename Visit>
void WalkThresholds(const SortedCells<T>& cells, int64_t pad_positives, T pad_score,
                    Visit visit) {
  const std::vector<T>& pos = cells.positive;
  const std::vector<T>& neg = cells.negative;
  size_t i = 0, j = 0;
  bool pad_pending = pad_positives > 0;
  int64_t tps = 0, fps = 0;
  while (i < pos.size() || j < neg.size() || pad_pending) {
    bool have = false;
    T s{};
    auto consider = [&](bool available, T value) {
      if (available && (!have || value > s)) {
        s = value;
        have = true;
      }
    };
    consider(i < pos.size(), i < pos.size() ? pos[i] : T{});
    consider(j < neg.size(), j < neg.size() ? neg[j] : T{});
    consider(pad_pending, pad_score);
    while (i < pos.size() && pos[i] == s) ++i, ++tps;
    while (j < neg.size() && neg[j] == s) ++j, ++fps;
    if (pad_pending && pad_score == s) {
      tps += pad_positives;
      pad_pending = false;
    }
    visit(tps, fps);
  }
}

// average_precision_score for one binary problem: sum_k (R_k - R_{k-1}) P_k. With no positive,
// scikit-learn 1.2 sets recall to 1 everywhere and the sum reduces to the precision at the
// highest threshold, which is 0; callers decide whether that case is undefined.
template <typename T>
double AveragePrecision(const SortedCells<T>& cells, int64_t pad_positives, T pad_score) {
  const int64_t total_positives = static_cast<int64_t>(cells.positive.size()) + pad_positives;
  if (total_positives == 0) return 0.0;
  double sum = 0.0;
  int64_t previous_tps = 0;
  WalkThresholds(cells, pad_positives, pad_score, [&](int64_t tps, int64_t fps) {
    if (tps != previous_tps) {
      sum += static_cast<double>(tps - previous_tps) *
             (static_cast<double>(tps) / static_cast<double>(tps + fps));
      previous_tps = tps;
    }
  });
  return sum / static_cast<double>(total_positives);
}

// roc_auc_score for one binary problem with at least one positive and one negative: the
// trapezoidal area under (fpr, tpr) over the distinct thresholds, from (0, 0). The doubled area
// in counts is a sum of integers (exact below 2^53), divided once.
template <typename T>
double RocAuc(const SortedCells<T>& cells) {
  const double p = static_cast<double>(cells.positive.size());
  const double n = static_cast<double>(cells.negative.size());
  double doubled_area = 0.0;
  int64_t previous_tps = 0, previous_fps = 0;
  WalkThresholds(cells, 0, T{}, [&](int64_t tps, int64_t fps) {
    doubled_area += static_cast<double>(fps - previous_fps) *
                    static_cast<double>(tps + previous_tps);
    previous_tps = tps;
    previous_fps = fps;
  });
  return doubled_area / (2.0 * p * n);
}

template <typename T>
MetricValue MicroAveragePrecisionUnchecked(const BinaryLabels& truth, MatrixView<T> scores) {
  SortedCells<T> cells;
  const size_t n = scores.rows * scores.cols;
  for (size_t i = 0; i < n; ++i) {
    (truth.values[i] ? cells.positive : cells.negative).push_back(scores.data[i]);
  }
  if (cells.positive.empty()) {
    return Undefined(n == 0 ? "no rows" : "no positive label in the truth");
  }
  cells.Sort();
  return Defined(AveragePrecision(cells, 0, T{}));
}

template <typename T, typename U>
MetricValue AccuracyUnchecked(MatrixView<T> truth, MatrixView<U> scores) {
  if (scores.rows == 0) return Undefined("no rows");
  std::vector<size_t> want = RowArgmax(truth);
  std::vector<size_t> got = RowArgmax(scores);
  size_t hits = 0;
  for (size_t r = 0; r < want.size(); ++r) hits += want[r] == got[r];
  return Defined(static_cast<double>(hits) / static_cast<double>(scores.rows));
}

}  // namespace

absl::StatusOr<BinaryLabels> OneHotLabels(const std::vector<int64_t>& class_indices,
                                          size_t num_classes) {
  BinaryLabels labels(class_indices.size(), num_classes);
  for (size_t r = 0; r < class_indices.size(); ++r) {
    const int64_t c = class_indices[r];
    if (c < 0 || static_cast<uint64_t>(c) >= num_classes) {
      return absl::InvalidArgumentError(absl::StrCat("class index ", c, " at row ", r,
                                                     " is outside [0, ", num_classes, ")"));
    }
    labels.at(r, static_cast<size_t>(c)) = 1;
  }
  return labels;
}

template <typename T>
absl::StatusOr<BinaryLabels> BinaryLabelsFromMatrix(MatrixView<T> truth) {
  BinaryLabels labels(truth.rows, truth.cols);
  for (size_t r = 0; r < truth.rows; ++r) {
    for (size_t c = 0; c < truth.cols; ++c) {
      const T v = truth(r, c);
      if (v == T(1)) {
        labels.at(r, c) = 1;
      } else if (v != T(0)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "truth at row ", r, ", class ", c, " is ", static_cast<double>(v),
            ": metrics take binary (0/1) truth; turn soft targets into hard ones with "
            "OneHotLabels (class indices) or ArgmaxLabels"));
      }
    }
  }
  return labels;
}

template <typename T>
std::vector<size_t> RowArgmax(MatrixView<T> m) {
  std::vector<size_t> out(m.rows, 0);
  for (size_t r = 0; r < m.rows; ++r) {
    size_t best = 0;
    for (size_t c = 0; c < m.cols; ++c) {
      const T v = m(r, c);
      if (IsNan(v)) {
        best = c;
        break;
      }
      if (v > m(r, best)) best = c;
    }
    out[r] = best;
  }
  return out;
}

template <typename T>
BinaryLabels ArgmaxLabels(MatrixView<T> soft) {
  BinaryLabels labels(soft.rows, soft.cols);
  if (soft.cols == 0) return labels;
  std::vector<size_t> best = RowArgmax(soft);
  for (size_t r = 0; r < soft.rows; ++r) labels.at(r, best[r]) = 1;
  return labels;
}

template <typename T>
absl::StatusOr<MetricValue> MicroAveragePrecision(const BinaryLabels& truth,
                                                  MatrixView<T> scores) {
  AVIARY_RETURN_IF_ERROR(CheckScores(truth, scores));
  return MicroAveragePrecisionUnchecked(truth, scores);
}

template <typename T>
absl::StatusOr<MetricValue> MacroRocAuc(const BinaryLabels& truth, MatrixView<T> scores,
                                        std::vector<size_t>* scored_classes) {
  AVIARY_RETURN_IF_ERROR(CheckScores(truth, scores));
  if (scored_classes != nullptr) scored_classes->clear();
  std::vector<size_t> keep;
  for (size_t c = 0; c < truth.cols; ++c) {
    for (size_t r = 0; r < truth.rows; ++r) {
      if (truth(r, c)) {
        keep.push_back(c);
        break;
      }
    }
  }
  if (scored_classes != nullptr) *scored_classes = keep;
  if (keep.empty()) {
    return Undefined(truth.cols == 0 ? "no classes" : "no class has a positive label");
  }
  double sum = 0.0;
  for (size_t c : keep) {
    SortedCells<T> cells = ClassCells(truth, scores, c);
    if (cells.negative.empty()) {
      MetricValue undefined = Undefined(absl::StrCat("class ", c,
                                                     " has no negative label (ROC-AUC needs both; every row "
                                                     "is positive)"));
      undefined.undefined_class = static_cast<int64_t>(c);
      return undefined;
    }
    sum += RocAuc(cells);
  }
  return Defined(sum / static_cast<double>(keep.size()));
}

template <typename T>
absl::StatusOr<MetricValue> PaddedCmap(const BinaryLabels& truth, MatrixView<T> scores,
                                       int pad_rows) {
  if (pad_rows < 0) {
    return absl::InvalidArgumentError(absl::StrCat("pad_rows must be >= 0, got ", pad_rows));
  }
  AVIARY_RETURN_IF_ERROR(CheckScores(truth, scores));
  if (truth.cols == 0) return Undefined("no classes");
  if (truth.rows == 0 && pad_rows == 0) return Undefined("no rows");
  double sum = 0.0;
  for (size_t c = 0; c < truth.cols; ++c) {
    sum += AveragePrecision(ClassCells(truth, scores, c), pad_rows, T(1));
  }
  return Defined(sum / static_cast<double>(truth.cols));
}

template <typename T>
absl::StatusOr<MetricValue> CategoricalAccuracy(const BinaryLabels& truth, MatrixView<T> scores) {
  AVIARY_RETURN_IF_ERROR(CheckScores(truth, scores));
  return AccuracyUnchecked(truth.view(), scores);
}

template <typename T>
absl::StatusOr<MetricValue> CategoricalAccuracy(MatrixView<T> soft_truth, MatrixView<T> scores) {
  if (soft_truth.rows != scores.rows || soft_truth.cols != scores.cols) {
    return absl::InvalidArgumentError(absl::StrCat("truth is ", soft_truth.rows, " x ",
                                                   soft_truth.cols, " but scores are ",
                                                   scores.rows, " x ", scores.cols));
  }
  AVIARY_RETURN_IF_ERROR(soft_truth.CheckHeld("truth"));
  AVIARY_RETURN_IF_ERROR(scores.CheckHeld("scores"));
  for (size_t i = 0; i < soft_truth.rows * soft_truth.cols; ++i) {
    if (!std::isfinite(soft_truth.data[i]) || !std::isfinite(scores.data[i])) {
      const bool truth_bad = !std::isfinite(soft_truth.data[i]);
      return absl::InvalidArgumentError(absl::StrCat(
          truth_bad ? "truth" : "score", " at row ", i / scores.cols, ", class ",
          i % scores.cols, " is ",
          static_cast<double>(truth_bad ? soft_truth.data[i] : scores.data[i]),
          ": metrics need finite values"));
    }
  }
  return AccuracyUnchecked(soft_truth, scores);
}

template <typename T>
absl::StatusOr<EvalMetrics> ComputeEvalMetrics(const BinaryLabels& truth, MatrixView<T> scores) {
  AVIARY_RETURN_IF_ERROR(CheckScores(truth, scores));
  EvalMetrics out;
  out.val_auc = MicroAveragePrecisionUnchecked(truth, scores);
  out.val_acc = AccuracyUnchecked(truth.view(), scores);
  // One sort per class serves both the ROC-AUC (classes with a positive) and the cmAP.
  double roc_sum = 0.0, cmap_sum = 0.0;
  std::string roc_undefined;
  int64_t roc_undefined_class = -1;
  for (size_t c = 0; c < truth.cols; ++c) {
    SortedCells<T> cells = ClassCells(truth, scores, c);
    cmap_sum += AveragePrecision(cells, 5, T(1));
    if (cells.positive.empty()) continue;
    out.scored_classes.push_back(c);
    if (cells.negative.empty()) {
      if (roc_undefined.empty()) {
        roc_undefined = absl::StrCat(
            "class ", c, " has no negative label (ROC-AUC needs both; every row is positive)");
        roc_undefined_class = static_cast<int64_t>(c);
      }
      continue;
    }
    roc_sum += RocAuc(cells);
  }
  if (truth.cols == 0) {
    out.val_cmap = Undefined("no classes");
    out.val_roc_auc = Undefined("no classes");
  } else {
    out.val_cmap = Defined(cmap_sum / static_cast<double>(truth.cols));
    if (out.scored_classes.empty()) {
      out.val_roc_auc = Undefined("no class has a positive label");
    } else if (!roc_undefined.empty()) {
      out.val_roc_auc = Undefined(roc_undefined);
      out.val_roc_auc.undefined_class = roc_undefined_class;
    } else {
      out.val_roc_auc = Defined(roc_sum / static_cast<double>(out.scored_classes.size()));
    }
  }
  return out;
}

#define AVIARY_METRICS_INSTANTIATE_SCORES(T)                                                  \
  template absl::StatusOr<MetricValue> MicroAveragePrecision<T>(const BinaryLabels&,           \
                                                                MatrixView<T>);                \
  template absl::StatusOr<MetricValue> MacroRocAuc<T>(const BinaryLabels&, MatrixView<T>,      \
                                                      std::vector<size_t>*);                   \
  template absl::StatusOr<MetricValue> PaddedCmap<T>(const BinaryLabels&, MatrixView<T>, int); \
  template absl::StatusOr<MetricValue> CategoricalAccuracy<T>(const BinaryLabels&,             \
                                                              MatrixView<T>);                  \
  template absl::StatusOr<MetricValue> CategoricalAccuracy<T>(MatrixView<T>, MatrixView<T>);   \
  template absl::StatusOr<EvalMetrics> ComputeEvalMetrics<T>(const BinaryLabels&,              \
                                                             MatrixView<T>);                   \
  template BinaryLabels ArgmaxLabels<T>(MatrixView<T>);

#define AVIARY_METRICS_INSTANTIATE_ANY(T)                                               \
  template absl::StatusOr<BinaryLabels> BinaryLabelsFromMatrix<T>(MatrixView<T>);       \
  template std::vector<size_t> RowArgmax<T>(MatrixView<T>);

AVIARY_METRICS_INSTANTIATE_SCORES(float)
AVIARY_METRICS_INSTANTIATE_SCORES(double)
AVIARY_METRICS_INSTANTIATE_ANY(float)
AVIARY_METRICS_INSTANTIATE_ANY(double)
AVIARY_METRICS_INSTANTIATE_ANY(uint8_t)

#undef AVIARY_METRICS_INSTANTIATE_SCORES
#undef AVIARY_METRICS_INSTANTIATE_ANY

}  // namespace aviary::common
