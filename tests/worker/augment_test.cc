#include "worker/augment.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace aviary::worker {
namespace {

common::AugmentConfig NoAugment() {
  common::AugmentConfig c;
  c.audio_augment_prob = 0;
  c.noise_prob = 0;
  c.timeshift_prob = 0;
  c.mixup_prob = 0;
  c.cutmix_prob = 0;
  return c;
}

struct Inputs {
  at::Tensor x, y;
};
Inputs MakeInputs(int64_t b = 4, int64_t t = 1000, int64_t c = 3) {
  Inputs in;
  in.x = at::arange(b * t, at::kFloat).reshape({b, t}) / static_cast<double>(b * t);
  in.y = at::zeros({b, c});
  for (int64_t i = 0; i < b; ++i) in.y[i][i % c] = 1.0;
  return in;
}

TEST(AugmentTest, NothingHappensWithZeroProbabilities) {
  auto in = MakeInputs();
  at::Tensor x = in.x, y = in.y;
  AugmentReport r = AugmentBatch(NoAugment(), 1, &x, &y);
  EXPECT_TRUE(at::equal(x, in.x));
  EXPECT_TRUE(at::equal(y, in.y));
  EXPECT_EQ(r.noised + r.shifted, 0);
  EXPECT_FALSE(r.mixup || r.cutmix);
}

TEST(AugmentTest, NoiseHasTheConfiguredStd) {
  auto c = NoAugment();
  c.audio_augment_prob = 1;
  c.noise_prob = 1;
  c.noise_std_min = 0.01;
  c.noise_std_max = 0.02;
  auto in = MakeInputs(8, 20000);
  at::Tensor x = in.x, y = in.y;
  AugmentReport r = AugmentBatch(c, 3, &x, &y);
  EXPECT_EQ(r.noised, 8);
  at::Tensor std = (x - in.x).std(1);
  EXPECT_GE(std.min().item<double>(), 0.0095);
  EXPECT_LE(std.max().item<double>(), 0.0205);
  EXPECT_TRUE(at::equal(y, in.y));
}

TEST(AugmentTest, TimeShiftIsACircularRoll) {
  auto c = NoAugment();
  c.audio_augment_prob = 1;
  c.timeshift_prob = 1;
  c.timeshift_max = 0.5;
  auto in = MakeInputs(4, 100);
  at::Tensor x = in.x, y = in.y;
  AugmentReport r = AugmentBatch(c, 5, &x, &y);
  ASSERT_GT(r.shifted, 0);
  for (int64_t i = 0; i < 4; ++i) {
    bool found = false;
    for (int64_t s = 0; s < 100 && !found; ++s) found = at::equal(x[i], at::roll(in.x[i], {s}, {0}));
    EXPECT_TRUE(found) << "row " << i;
  }
}

TEST(AugmentTest, MixUpMixesWithTheRolledBatch) {
  auto c = NoAugment();
  c.mixup_prob = 1;
  auto in = MakeInputs();
  at::Tensor x = in.x, y = in.y;
  AugmentReport r = AugmentBatch(c, 7, &x, &y);
  ASSERT_TRUE(r.mixup);
  double lam = r.mixup_lam;
  EXPECT_GT(lam, 0.0);
  EXPECT_LT(lam, 1.0);
  at::Tensor want = lam * in.x + (1 - lam) * at::roll(in.x, {1}, {0});
  EXPECT_TRUE(at::allclose(x, want, 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(y.sum(1), at::ones({4}), 1e-5, 1e-6));
}

TEST(AugmentTest, CutMixLabelsFollowTheCutLength) {
  auto c = NoAugment();
  c.cutmix_prob = 1;
  auto in = MakeInputs(4, 1000);
  at::Tensor x = in.x, y = in.y;
  AugmentReport r = AugmentBatch(c, 11, &x, &y);
  ASSERT_TRUE(r.cutmix);
  const at::Tensor partner = at::roll(in.x, {1}, {0});
  const at::Tensor taken = x != in.x;  // MakeInputs' rows share no value: a taken sample differs
  const int64_t cut = static_cast<int64_t>(std::llround((1.0 - r.cutmix_lam) * 1000));
  ASSERT_GT(cut, 0);
  int64_t start = -1;
  for (int64_t t = 0; t < 1000 && start < 0; ++t) {
    if (taken[0][t].item<bool>()) start = t;
  }
  ASSERT_GE(start, 0);
  for (int64_t i = 0; i < 4; ++i) {
    // Every row took the same one segment from its partner, and kept the rest.
    EXPECT_EQ(taken[i].sum().item<int64_t>(), cut) << "row " << i;
    EXPECT_TRUE(at::equal(x[i].narrow(0, start, cut), partner[i].narrow(0, start, cut))) << "row " << i;
    EXPECT_TRUE(at::equal(x[i].narrow(0, 0, start), in.x[i].narrow(0, 0, start))) << "row " << i;
    EXPECT_TRUE(at::equal(x[i].narrow(0, start + cut, 1000 - start - cut),
                          in.x[i].narrow(0, start + cut, 1000 - start - cut)))
        << "row " << i;
  }
  // The labels are mixed by the content's shares: the sample's own kept share, the partner's cut.
  at::Tensor want_y = r.cutmix_lam * in.y + (1 - r.cutmix_lam) * at::roll(in.y, {1}, {0});
  EXPECT_TRUE(at::allclose(y, want_y, 1e-5, 1e-6));
}

// The outer gate: the noise and shift draws apply only within audio_augment_prob.
TEST(AugmentTest, TheAudioBlockIsGatedByAudioAugmentProb) {
  auto c = NoAugment();
  c.noise_prob = 1;
  c.timeshift_prob = 1;
  auto in = MakeInputs(64, 100);
  at::Tensor x = in.x, y = in.y;
  AugmentReport r = AugmentBatch(c, 3, &x, &y);  // audio_augment_prob 0
  EXPECT_EQ(r.noised, 0);
  EXPECT_EQ(r.shifted, 0);
  EXPECT_TRUE(at::equal(x, in.x));

  // The recipe's probabilities: noise on 0.5 x 0.35 of the samples (sd 24 of 4000).
  c.audio_augment_prob = 0.5;
  c.noise_prob = 0.35;
  c.timeshift_prob = 0;
  in = MakeInputs(4000, 8);
  x = in.x;
  y = in.y;
  r = AugmentBatch(c, 5, &x, &y);
  EXPECT_NEAR(r.noised, 700, 100);
}

struct Moments {
  double mean = 0, var = 0;
};
Moments MomentsOf(const std::vector<double>& v) {
  Moments m;
  for (double d : v) m.mean += d;
  m.mean /= static_cast<double>(v.size());
  for (double d : v) m.var += (d - m.mean) * (d - m.mean);
  m.var /= static_cast<double>(v.size() - 1);
  return m;
}

// Each mix draws its lam from its own alpha: MixUp Beta(0.5, 0.5) (variance 1/8), CutMix
// Beta(2.5, 2.5) (variance 1/24). Swapping the two alphas, or one for the other, fails.
TEST(AugmentTest, MixUpAndCutMixDrawFromTheirOwnAlpha) {
  auto c = NoAugment();
  c.mixup_prob = 1;
  c.cutmix_prob = 1;
  c.mixup_alpha = 0.5;
  c.cutmix_alpha = 2.5;
  std::vector<double> mixup, cutmix;
  for (uint64_t seed = 0; seed < 1500; ++seed) {
    auto in = MakeInputs(2, 10000, 2);
    at::Tensor x = in.x, y = in.y;
    AugmentReport r = AugmentBatch(c, seed, &x, &y);
    ASSERT_TRUE(r.mixup);
    mixup.push_back(r.mixup_lam);
    cutmix.push_back(r.cutmix ? r.cutmix_lam : 1.0);
  }
  const Moments m = MomentsOf(mixup), k = MomentsOf(cutmix);
  EXPECT_NEAR(m.mean, 0.5, 0.03);
  EXPECT_NEAR(m.var, 0.125, 0.012);
  EXPECT_NEAR(k.mean, 0.5, 0.02);
  EXPECT_NEAR(k.var, 1.0 / 24, 0.006);
}

TEST(AugmentTest, DeterministicForASeed) {
  common::AugmentConfig c;  // the recipe's defaults
  c.mixup_prob = 1;
  c.audio_augment_prob = 1;
  auto in = MakeInputs(6, 4000);
  at::Tensor x1 = in.x, y1 = in.y, x2 = in.x, y2 = in.y, x3 = in.x, y3 = in.y;
  AugmentBatch(c, 42, &x1, &y1);
  AugmentBatch(c, 42, &x2, &y2);
  AugmentBatch(c, 43, &x3, &y3);
  EXPECT_TRUE(at::equal(x1, x2));
  EXPECT_TRUE(at::equal(y1, y2));
  EXPECT_FALSE(at::equal(x1, x3));
}

TEST(AugmentTest, BetaSamplesHaveTheRightMoments) {
  at::Generator g = MakeGenerator(at::Device(at::kCPU), 1);
  // Beta(a, b): mean a / (a + b), variance ab / ((a + b)^2 (a + b + 1)).
  struct Case {
    double a, b, mean, var;
  };
  for (const Case& c : {Case{2.5, 2.5, 0.5, 1.0 / 24}, Case{0.5, 0.5, 0.5, 0.125}, Case{2, 5, 2.0 / 7, 10.0 / 392}}) {
    std::vector<double> v;
    for (int i = 0; i < 4000; ++i) v.push_back(SampleBeta(c.a, c.b, g));
    const Moments m = MomentsOf(v);
    EXPECT_NEAR(m.mean, c.mean, 0.015) << "Beta(" << c.a << ", " << c.b << ")";
    EXPECT_NEAR(m.var, c.var, c.var * 0.12) << "Beta(" << c.a << ", " << c.b << ")";
  }
}

}  // namespace
}  // namespace aviary::worker
