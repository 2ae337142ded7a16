#include "common/metrics.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace aviary::common {
namespace {

// Row-major helpers for small hand-written cases.
BinaryLabels Truth(size_t rows, size_t cols, const std::vector<int>& values) {
  BinaryLabels t(rows, cols);
  for (size_t i = 0; i < values.size(); ++i) t.values[i] = static_cast<uint8_t>(values[i]);
  return t;
}

double Value(const absl::StatusOr<MetricValue>& m) {
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(m->defined()) << m->undefined_reason;
  return m->value;
}

TEST(MetricsTest, PerfectScoresGiveOne) {
  BinaryLabels y = Truth(4, 2, {1, 0, 0, 1, 1, 0, 0, 1});
  std::vector<double> s{0.9, 0.1, 0.2, 0.8, 0.7, 0.3, 0.4, 0.6};
  MatrixView<double> v(s, 4, 2);
  EXPECT_DOUBLE_EQ(Value(MicroAveragePrecision(y, v)), 1.0);
  EXPECT_DOUBLE_EQ(Value(MacroRocAuc(y, v)), 1.0);
  EXPECT_DOUBLE_EQ(Value(PaddedCmap(y, v)), 1.0);
  EXPECT_DOUBLE_EQ(Value(CategoricalAccuracy(y, v)), 1.0);
}

TEST(MetricsTest, InvertedScores) {
  // One class, positives scored lowest.
  BinaryLabels y = Truth(4, 1, {1, 1, 0, 0});
  std::vector<double> s{0.1, 0.2, 0.8, 0.9};
  MatrixView<double> v(s, 4, 1);
  EXPECT_DOUBLE_EQ(Value(MacroRocAuc(y, v)), 0.0);
  // Thresholds 0.9, 0.8 (false positives), 0.2 (P 1/3, R 1/2), 0.1 (P 1/2, R 1).
  EXPECT_DOUBLE_EQ(Value(MicroAveragePrecision(y, v)), 0.5 / 3 + 0.5 / 2);
  // Padding: 5 positives at 1.0 first (P 1, R 5/7), then 0.2 (P 6/8), 0.1 (P 7/9).
  EXPECT_NEAR(Value(PaddedCmap(y, v)), 5.0 / 7 + (6.0 / 8) / 7 + (7.0 / 9) / 7, 1e-15);
}

TEST(MetricsTest, AllTiesGiveChanceRocAndPrevalenceAp) {
  BinaryLabels y = Truth(4, 1, {1, 0, 1, 0});
  std::vector<double> s(4, 0.5);
  MatrixView<double> v(s, 4, 1);
  EXPECT_DOUBLE_EQ(Value(MacroRocAuc(y, v)), 0.5);
  EXPECT_DOUBLE_EQ(Value(MicroAveragePrecision(y, v)), 0.5);
  // 5 padded positives at 1.0 (P 1, R 5/7) then the tie group (P 7/9, R 1).
  EXPECT_NEAR(Value(PaddedCmap(y, v)), 5.0 / 7 + (7.0 / 9) * 2 / 7, 1e-15);
}

TEST(MetricsTest, PartialTiesAreHalfCounted) {
  // The positive at 0.5 ties a negative: ROC counts the pair as 1/2 (trapezoid).
  BinaryLabels y = Truth(4, 1, {1, 1, 0, 0});
  std::vector<double> s{0.8, 0.5, 0.5, 0.2};
  MatrixView<double> v(s, 4, 1);
  EXPECT_DOUBLE_EQ(Value(MacroRocAuc(y, v)), 3.5 / 4);
  // 0.8: P 1, R 1/2; 0.5 (one positive, one negative together): P 2/3, R 1.
  EXPECT_DOUBLE_EQ(Value(MicroAveragePrecision(y, v)), 0.5 + (2.0 / 3) * 0.5);
}

TEST(MetricsTest, SinglePositive) {
  BinaryLabels y = Truth(5, 1, {0, 0, 1, 0, 0});
  std::vector<double> s{0.1, 0.9, 0.5, 0.3, 0.2};
  MatrixView<double> v(s, 5, 1);
  EXPECT_DOUBLE_EQ(Value(MacroRocAuc(y, v)), 0.75);
  EXPECT_DOUBLE_EQ(Value(MicroAveragePrecision(y, v)), 0.5);
}

TEST(MetricsTest, RocSkipsClassesWithoutPositives) {
  // Class 1 has no positive: it is left out, not counted as 0.5 or NaN.
  BinaryLabels y = Truth(4, 3, {1, 0, 0,  0, 0, 1,  1, 0, 0,  0, 0, 1});
  std::vector<double> s{0.9, 0.5, 0.1,  0.3, 0.5, 0.2,  0.2, 0.5, 0.3,  0.4, 0.5, 0.6};
  MatrixView<double> v(s, 4, 3);
  std::vector<size_t> scored;
  // Class 0: positives 0.9, 0.2 vs negatives 0.3, 0.4 -> 2 of 4 pairs. Class 2: 0.2, 0.6 vs
  // 0.1, 0.3 -> 3 of 4.
  EXPECT_DOUBLE_EQ(Value(MacroRocAuc(y, v, &scored)), (0.5 + 0.75) / 2);
  EXPECT_EQ(scored, (std::vector<size_t>{0, 2}));
}

TEST(MetricsTest, UndefinedCasesAreNanWithAReason) {
  BinaryLabels none = Truth(3, 2, {0, 0, 0, 0, 0, 0});
  std::vector<double> s{0.1, 0.2, 0.3, 0.4, 0.5, 0.6};
  MatrixView<double> v(s, 3, 2);
  auto micro = MicroAveragePrecision(none, v);
  ASSERT_TRUE(micro.ok());
  EXPECT_TRUE(std::isnan(micro->value));
  EXPECT_NE(micro->undefined_reason.find("no positive"), std::string::npos);
  auto roc = MacroRocAuc(none, v);
  ASSERT_TRUE(roc.ok());
  EXPECT_TRUE(std::isnan(roc->value));
  EXPECT_NE(roc->undefined_reason.find("no class has a positive"), std::string::npos);
  // The padding gives every class positives: cmAP stays defined.
  EXPECT_GT(Value(PaddedCmap(none, v)), 0.0);
  // Without padding, scikit-learn's macro AP counts a class without positives as 0.
  EXPECT_DOUBLE_EQ(Value(PaddedCmap(none, v, 0)), 0.0);

  BinaryLabels all_positive = Truth(3, 2, {1, 1, 0, 1, 0, 1});
  auto roc2 = MacroRocAuc(all_positive, v);
  ASSERT_TRUE(roc2.ok());
  EXPECT_FALSE(roc2->defined());
  EXPECT_NE(roc2->undefined_reason.find("class 1 has no negative"), std::string::npos)
      << roc2->undefined_reason;

  BinaryLabels empty(0, 2);
  MatrixView<double> empty_view(nullptr, 0, 2);
  auto acc = CategoricalAccuracy(empty, empty_view);
  ASSERT_TRUE(acc.ok());
  EXPECT_FALSE(acc->defined());
  auto all = ComputeEvalMetrics(empty, empty_view);
  ASSERT_TRUE(all.ok());
  EXPECT_FALSE(all->val_auc.defined());
  EXPECT_FALSE(all->val_roc_auc.defined());
  EXPECT_FALSE(all->val_acc.defined());
  EXPECT_DOUBLE_EQ(all->val_cmap.value, 1.0);  // only the 5 padded rows, all ones
}

// A view of a vector holding other than rows x cols values (a model head of another width than
// the classes): refused, not read past its end; a soft truth without data too (it crashed).
TEST(MetricsTest, AViewOfAVectorOfAnotherSizeIsAnError) {
  BinaryLabels y = Truth(2, 2, {1, 0, 0, 1});
  std::vector<double> three{0.1, 0.9, 0.8};
  auto all = ComputeEvalMetrics(y, MatrixView<double>(three, 2, 2));
  ASSERT_FALSE(all.ok());
  EXPECT_EQ(all.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(all.status().message().find("scores hold 3 values for 2 x 2"), std::string::npos) << all.status();
  std::vector<double> s{0.1, 0.9, 0.8, 0.2};
  auto soft = CategoricalAccuracy(MatrixView<double>(nullptr, 2, 2), MatrixView<double>(s, 2, 2));
  ASSERT_FALSE(soft.ok());
  EXPECT_NE(soft.status().message().find("truth view has no data"), std::string::npos) << soft.status();
}

TEST(MetricsTest, NonFiniteScoresAreErrors) {
  BinaryLabels y = Truth(2, 2, {1, 0, 0, 1});
  for (double bad : {std::numeric_limits<double>::quiet_NaN(),
                     std::numeric_limits<double>::infinity()}) {
    std::vector<double> s{0.1, 0.2, 0.3, bad};
    MatrixView<double> v(s, 2, 2);
    for (const auto& result : {MicroAveragePrecision(y, v), MacroRocAuc(y, v), PaddedCmap(y, v),
                               CategoricalAccuracy(y, v)}) {
      EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(result.status().message().find("row 1, class 1"), absl::string_view::npos)
          << result.status();
    }
    EXPECT_FALSE(ComputeEvalMetrics(y, v).ok());
  }
}

TEST(MetricsTest, ShapeMismatchIsAnError) {
  BinaryLabels y = Truth(2, 2, {1, 0, 0, 1});
  std::vector<double> s{0.1, 0.2, 0.3};
  auto m = MicroAveragePrecision(y, MatrixView<double>(s, 1, 3));
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("2 x 2"), absl::string_view::npos);
}

TEST(MetricsTest, ArgmaxTakesTheFirstMaximumAndTheFirstNan) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> m{0.3, 0.3, 0.1,  0.1, 0.5, 0.5,  0.2, nan, nan,  0.0, 0.0, 0.0};
  EXPECT_EQ(RowArgmax(MatrixView<double>(m, 4, 3)), (std::vector<size_t>{0, 1, 1, 0}));
  // Accuracy uses that rule: row 0 ties go to class 0 (a hit), row 1 ties go to class 1 (the
  // truth is class 2).
  BinaryLabels y = Truth(2, 3, {1, 0, 0,  0, 0, 1});
  std::vector<double> s{0.4, 0.4, 0.2,  0.1, 0.45, 0.45};
  EXPECT_DOUBLE_EQ(Value(CategoricalAccuracy(y, MatrixView<double>(s, 2, 3))), 0.5);
}

TEST(MetricsTest, SoftTruthIsRefusedOrHardened) {
  std::vector<double> smoothed{0.025, 0.95, 0.025,  0.6, 0.4, 0.0};
  MatrixView<double> v(smoothed, 2, 3);
  auto refused = BinaryLabelsFromMatrix(v);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("row 0, class 0"), absl::string_view::npos)
      << refused.status();
  BinaryLabels hard = ArgmaxLabels(v);
  EXPECT_EQ(hard.values, (std::vector<uint8_t>{0, 1, 0, 1, 0, 0}));
  // Keras' accuracy on soft truth compares argmaxes.
  std::vector<double> s{0.1, 0.8, 0.1,  0.1, 0.8, 0.1};
  EXPECT_DOUBLE_EQ(Value(CategoricalAccuracy(v, MatrixView<double>(s, 2, 3))), 0.5);

  auto exact = BinaryLabelsFromMatrix(MatrixView<double>(std::vector<double>{0, 1, 1, 0}.data(), 2, 2));
  ASSERT_TRUE(exact.ok());
  EXPECT_EQ(exact->values, (std::vector<uint8_t>{0, 1, 1, 0}));
}

TEST(MetricsTest, OneHotLabelsFromClassIndices) {
  auto y = OneHotLabels({2, 0, 1}, 3);
  ASSERT_TRUE(y.ok());
  EXPECT_EQ(y->values, (std::vector<uint8_t>{0, 0, 1, 1, 0, 0, 0, 1, 0}));
  auto bad = OneHotLabels({0, 3}, 3);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("class index 3 at row 1"), absl::string_view::npos);
}

TEST(MetricsTest, PaddingMergesWithScoresOfExactlyOneAndRanksBelowLargerScores) {
  BinaryLabels negative = Truth(1, 1, {0});
  for (double score : {2.0, 1.0}) {
    // Either way the 5 padded positives share or follow a false positive: P 5/6 at R 1.
    std::vector<double> s{score};
    EXPECT_DOUBLE_EQ(Value(PaddedCmap(negative, MatrixView<double>(s, 1, 1))), 5.0 / 6);
  }
  std::vector<double> low{0.5};
  EXPECT_DOUBLE_EQ(Value(PaddedCmap(negative, MatrixView<double>(low, 1, 1))), 1.0);
  EXPECT_EQ(PaddedCmap(negative, MatrixView<double>(low, 1, 1), -1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(MetricsTest, FloatMatchesDoubleAndEvalMetricsMatchesTheSingleFunctions) {
  BinaryLabels y = Truth(6, 3, {1, 0, 0,  0, 1, 0,  0, 0, 1,  1, 0, 0,  0, 1, 1,  0, 0, 0});
  std::vector<double> s{0.5, 0.25, 0.25,  0.5, 0.5, 0.0,  0.75, 0.125, 0.125,
                        0.25, 0.5, 0.25,  0.0, 0.5, 0.5,  1.0, 0.0, 0.0};
  std::vector<float> f(s.begin(), s.end());
  MatrixView<double> vd(s, 6, 3);
  MatrixView<float> vf(f, 6, 3);
  auto all = ComputeEvalMetrics(y, vd);
  ASSERT_TRUE(all.ok());
  EXPECT_DOUBLE_EQ(all->val_auc.value, Value(MicroAveragePrecision(y, vd)));
  EXPECT_DOUBLE_EQ(all->val_roc_auc.value, Value(MacroRocAuc(y, vd)));
  EXPECT_DOUBLE_EQ(all->val_cmap.value, Value(PaddedCmap(y, vd)));
  EXPECT_DOUBLE_EQ(all->val_acc.value, Value(CategoricalAccuracy(y, vd)));
  EXPECT_DOUBLE_EQ(all->val_auc.value, Value(MicroAveragePrecision(y, vf)));
  EXPECT_DOUBLE_EQ(all->val_roc_auc.value, Value(MacroRocAuc(y, vf)));
  EXPECT_DOUBLE_EQ(all->val_cmap.value, Value(PaddedCmap(y, vf)));
  EXPECT_DOUBLE_EQ(all->val_acc.value, Value(CategoricalAccuracy(y, vf)));
  EXPECT_EQ(all->scored_classes, (std::vector<size_t>{0, 1, 2}));
}

TEST(MetricsTest, RocAucDoesNotDependOnScoreScale) {
  // Only the order matters: a monotone transform leaves ROC-AUC and AP unchanged.
  BinaryLabels y = Truth(5, 1, {1, 0, 1, 0, 0});
  std::vector<double> s{0.3, 0.1, 0.7, 0.3, 0.2};
  std::vector<double> logits;
  for (double p : s) logits.push_back(std::log(p / (1 - p)) * 10);
  EXPECT_DOUBLE_EQ(Value(MacroRocAuc(y, MatrixView<double>(s, 5, 1))),
                   Value(MacroRocAuc(y, MatrixView<double>(logits, 5, 1))));
  EXPECT_DOUBLE_EQ(Value(MicroAveragePrecision(y, MatrixView<double>(s, 5, 1))),
                   Value(MicroAveragePrecision(y, MatrixView<double>(logits, 5, 1))));
}

}  // namespace
}  // namespace aviary::common
