// Unit tests of worker/frontend: shapes, edge cases and SpecAugment. Numerical parity with
// torchaudio lives in tests/parity/check_frontend.py.
#include "worker/frontend.h"

#include <cmath>
#include <memory>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "gtest/gtest.h"

namespace aviary::worker {
namespace {

constexpr int kRate = 32000;

std::unique_ptr<MelFrontend> Make(common::FrontendConfig frontend = {},
                                  common::AugmentConfig augment = {},
                                  c10::MemoryFormat format = c10::MemoryFormat::Contiguous) {
  auto fe = MelFrontend::Create(frontend, augment, kRate, c10::Device(c10::kCPU), format);
  EXPECT_TRUE(fe.ok()) << fe.status();
  return fe.ok() ? std::move(*fe) : nullptr;
}

// [batch, samples]: chirps and noise at different levels, deterministic.
at::Tensor Waveforms(int64_t batch, int64_t samples, uint64_t seed = 1) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor t = at::arange(samples, at::kFloat).div_(kRate).unsqueeze(0);
  at::Tensor f0 = at::linspace(300, 6000, batch, at::kFloat).unsqueeze(1);
  at::Tensor tone = at::sin(t.mul(f0).mul_(2 * M_PI).mul_(t.add(1.0)));
  at::Tensor noise = at::randn({batch, samples}, gen, at::kFloat).mul_(0.01);
  at::Tensor level = at::logspace(0, -3, batch, 10.0, at::kFloat).unsqueeze(1);
  return tone.add_(noise).mul_(level);
}

at::Generator Gen(uint64_t seed) { return at::detail::createCPUGenerator(seed); }

TEST(MelFrontendTest, TenSecondsGive384FramesIn3Channels) {
  auto fe = Make();
  ASSERT_NE(fe, nullptr);
  EXPECT_EQ(fe->NumFrames(10 * kRate), 384);
  EXPECT_EQ(fe->n_freqs(), 1015);
  at::Tensor out = fe->Forward(Waveforms(2, 10 * kRate));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, 3, 128, 384}));
  EXPECT_EQ(out.scalar_type(), at::kFloat);
  EXPECT_TRUE(out.is_contiguous());
  EXPECT_TRUE(out.select(1, 0).equal(out.select(1, 2)));
  EXPECT_TRUE(at::isfinite(out).all().item<bool>());
}

TEST(MelFrontendTest, PerSampleSpansZeroToOneForEveryClip) {
  auto fe = Make();
  at::Tensor out = fe->Forward(Waveforms(4, 3 * kRate)).select(1, 0).flatten(1);
  EXPECT_TRUE(out.amin(1).abs().max().item<float>() < 1e-6);
  EXPECT_TRUE((out.amax(1) - 1).abs().max().item<float>() < 1e-6);
}

TEST(MelFrontendTest, PerBatchSpansZeroToOneOverTheBatch) {
  common::FrontendConfig cfg;
  cfg.normalize = "per_batch";
  cfg.in_channels = 1;
  auto fe = Make(cfg);
  at::Tensor out = fe->Forward(Waveforms(4, 3 * kRate));
  EXPECT_EQ(out.size(1), 1);
  EXPECT_NEAR(out.min().item<float>(), 0.0f, 1e-6);
  EXPECT_NEAR(out.max().item<float>(), 1.0f, 1e-6);
  // The quietest clip (-60 dB) does not reach 1 on its own.
  EXPECT_LT(out[3].max().item<float>(), 0.9f);
}

TEST(MelFrontendTest, TopDbFloorIsPerClip) {
  common::FrontendConfig cfg;
  cfg.normalize = "none";
  auto fe = Make(cfg);
  at::Tensor x = Waveforms(3, 2 * kRate);
  x.narrow(1, kRate, kRate).zero_();  // silent frames (-100 dB) reach every clip's floor
  at::Tensor db = fe->PowerToDb(fe->MelPower(x));
  at::Tensor peak = db.amax({1, 2});
  at::Tensor low = db.amin({1, 2});
  for (int64_t b = 0; b < 3; ++b) {
    EXPECT_NEAR((peak[b] - low[b]).item<float>(), 80.0f, 1e-3) << "clip " << b;
  }
  // The clips' peaks differ by ~60 dB, so a batch-wide floor would not give 80 for each.
  EXPECT_GT((peak[0] - peak[2]).item<float>(), 40.0f);
}

TEST(MelFrontendTest, SilentClipIsFiniteZerosAndLeavesOthersAlone) {
  auto fe = Make();
  at::Tensor x = Waveforms(3, 2 * kRate);
  x[1].zero_();
  at::Tensor out = fe->Forward(x);
  EXPECT_TRUE(at::isfinite(out).all().item<bool>());
  EXPECT_TRUE(out[1].eq(0).all().item<bool>());
  at::Tensor alone = fe->Forward(x.narrow(0, 0, 1));
  EXPECT_LT((out.narrow(0, 0, 1) - alone).abs().max().item<float>(), 1e-6);

  common::FrontendConfig per_batch;
  per_batch.normalize = "per_batch";
  auto fb = Make(per_batch);
  at::Tensor silence = fb->Forward(at::zeros({2, kRate}));
  EXPECT_TRUE(silence.eq(0).all().item<bool>());
}

TEST(MelFrontendTest, RefusesClipsTooShortForReflectPadding) {
  auto fe = Make();
  EXPECT_EQ(fe->MinSamples(), 1015);
  at::Tensor ok = fe->Forward(Waveforms(2, 1015));
  EXPECT_EQ(ok.size(3), 2);
  try {
    fe->Forward(Waveforms(2, 1014));
    FAIL() << "a 1014-sample clip must be refused";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("too short for reflect padding"),
              std::string::npos)
        << e.what_without_backtrace();
  }
}

TEST(MelFrontendTest, RefusesWrongRankDtypeAndDevice) {
  auto fe = Make();
  EXPECT_THROW(fe->Forward(at::zeros({kRate})), c10::Error);
  EXPECT_THROW(fe->Forward(at::zeros({2, kRate}, at::kInt)), c10::Error);
  // An empty batch is named as one (torch's reflect pad said "Expected 2D or 3D (batch mode)
  // tensor ... got [1, 0, 32000]").
  try {
    fe->Forward(at::zeros({0, kRate}));
    FAIL() << "an empty batch must be refused";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("MelFrontend: an empty batch (waveforms [0, 32000])"),
              std::string::npos)
        << e.what_without_backtrace();
  }
}

// A front end made for a bare "cuda" takes the current device's waveforms ("cuda:0": a tensor's
// device always has an index, and a bare "cuda" front end refused every CUDA waveform).
TEST(MelFrontendTest, ABareCudaDeviceTakesTheCurrentDevicesWaveforms) {
  if (!at::hasCUDA()) GTEST_SKIP() << "needs a CUDA device (the CUDA build on a GPU host)";
  auto fe = MelFrontend::Create({}, {}, kRate, c10::Device(c10::kCUDA));
  ASSERT_TRUE(fe.ok()) << fe.status();
  EXPECT_TRUE((*fe)->device().has_index()) << (*fe)->device();
  at::Tensor out = (*fe)->Forward(Waveforms(2, kRate).to(c10::Device(c10::kCUDA)));
  EXPECT_EQ(out.device(), (*fe)->device());
}

TEST(MelFrontendTest, CreateRejectsBadSettings) {
  common::FrontendConfig cfg;
  cfg.fmax = 17000;
  auto fe = MelFrontend::Create(cfg, {}, kRate);
  EXPECT_EQ(fe.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(fe.status().message().find("frontend.fmax"), std::string::npos) << fe.status();
  cfg = {};
  cfg.normalize = "per_clip";
  EXPECT_NE(MelFrontend::Create(cfg, {}, kRate).status().message().find("per_sample, per_batch"),
            std::string::npos);
  common::AugmentConfig aug;
  aug.time_mask_prob = 1.5;
  EXPECT_FALSE(MelFrontend::Create({}, aug, kRate).ok());
}

TEST(MelFrontendTest, FilterbankIsHtkTrianglesWithoutNormalisation) {
  auto fe = Make();
  at::Tensor fb = fe->mel_filterbank();
  ASSERT_EQ(fb.sizes(), (std::vector<int64_t>{1015, 128}));
  EXPECT_GE(fb.min().item<float>(), 0.0f);
  EXPECT_LE(fb.max().item<float>(), 1.0f);
  EXPECT_TRUE(fb.amax(0).gt(0).all().item<bool>()) << "no empty filter";
  // Peaks move up in frequency; the first filter peaks near mel(20 Hz) + one step.
  at::Tensor peaks = fb.argmax(0);
  EXPECT_TRUE((peaks.slice(0, 1) >= peaks.slice(0, 0, -1)).all().item<bool>());
  auto mel = [](double hz) { return 2595.0 * std::log10(1.0 + hz / 700.0); };
  const double step = (mel(16000) - mel(20)) / 129.0;
  const double f1 = 700.0 * (std::pow(10.0, (mel(20) + step) / 2595.0) - 1.0);
  EXPECT_NEAR(peaks[0].item<int64_t>() * 16000.0 / 1014.0, f1, 16000.0 / 1014.0);
}

TEST(MelFrontendTest, Bfloat16InputAndAutocastStayFloat32) {
  common::FrontendConfig cfg;
  cfg.in_channels = 1;
  auto fe = Make(cfg);
  at::Tensor x = Waveforms(2, kRate).to(at::kBFloat16);
  at::Tensor ref = fe->Forward(x.to(at::kFloat));
  at::Tensor out = fe->Forward(x);
  EXPECT_EQ(out.scalar_type(), at::kFloat);
  EXPECT_TRUE(out.equal(ref));
  // Inside a CPU autocast region (bf16 by default) the front end still runs in float32: same
  // bits. Autocast is on when its key is not excluded (what at::autocast's setters do in 1.13
  // and 2.x alike); the matmul below proves the region is live.
  const bool was_excluded = c10::impl::tls_is_dispatch_key_excluded(c10::DispatchKey::AutocastCPU);
  c10::impl::tls_set_dispatch_key_excluded(c10::DispatchKey::AutocastCPU, false);
  at::Tensor probe = at::matmul(at::ones({2, 2}), at::ones({2, 2}));
  at::Tensor under_autocast = fe->Forward(x.to(at::kFloat));
  c10::impl::tls_set_dispatch_key_excluded(c10::DispatchKey::AutocastCPU, was_excluded);
  EXPECT_EQ(probe.scalar_type(), at::kBFloat16) << "autocast region not active";
  EXPECT_EQ(under_autocast.scalar_type(), at::kFloat);
  EXPECT_TRUE(under_autocast.equal(ref));
}

TEST(MelFrontendTest, ChannelsLastOutputHasTheSameValues) {
  auto plain = Make();
  auto cl = Make({}, {}, c10::MemoryFormat::ChannelsLast);
  at::Tensor x = Waveforms(2, kRate);
  at::Tensor a = plain->Forward(x);
  at::Tensor b = cl->Forward(x);
  EXPECT_TRUE(b.is_contiguous(c10::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(a.equal(b));
}

TEST(MelFrontendTest, BatchedEqualsOneClipAtATime) {
  auto fe = Make();
  at::Tensor x = Waveforms(3, 2 * kRate);
  at::Tensor batched = fe->Forward(x);
  for (int64_t b = 0; b < 3; ++b) {
    at::Tensor one = fe->Forward(x.narrow(0, b, 1));
    EXPECT_LT((batched.narrow(0, b, 1) - one).abs().max().item<float>(), 1e-6) << "clip " << b;
  }
}

// SpecAugment.

TEST(SpecAugmentTest, EvalModeNeverMasks) {
  common::AugmentConfig aug;
  aug.time_mask_prob = 1.0;
  aug.freq_mask_prob = 1.0;
  auto fe = Make({}, aug);
  at::Tensor x = Waveforms(4, 2 * kRate);
  at::Tensor eval1 = fe->Forward(x, FrontendMode::kEval, Gen(1));
  at::Tensor eval2 = fe->Forward(x, FrontendMode::kEval, Gen(2));
  EXPECT_TRUE(eval1.equal(eval2));
  at::Tensor train = fe->Forward(x, FrontendMode::kTrain, Gen(1));
  EXPECT_FALSE(train.equal(eval1));
}

TEST(SpecAugmentTest, DeterministicForASeed) {
  auto fe = Make();
  at::Tensor x = Waveforms(8, 2 * kRate);
  at::Tensor a = fe->Forward(x, FrontendMode::kTrain, Gen(42));
  at::Tensor b = fe->Forward(x, FrontendMode::kTrain, Gen(42));
  at::Tensor c = fe->Forward(x, FrontendMode::kTrain, Gen(43));
  EXPECT_TRUE(a.equal(b));
  EXPECT_FALSE(a.equal(c));
  SpecAugmentMasks m1 = fe->DrawSpecAugment(64, 384, Gen(7));
  SpecAugmentMasks m2 = fe->DrawSpecAugment(64, 384, Gen(7));
  EXPECT_TRUE(m1.time_mask.equal(m2.time_mask));
  EXPECT_TRUE(m1.freq_mask.equal(m2.freq_mask));
  EXPECT_TRUE(m1.time_widths.equal(m2.time_widths));
}

TEST(SpecAugmentTest, ApplicationRatesAreNearP) {
  common::AugmentConfig aug;  // time p 0.5, freq p 0.5
  aug.freq_mask_prob = 0.3;
  auto fe = Make({}, aug);
  const int64_t n = 20000;
  SpecAugmentMasks m = fe->DrawSpecAugment(n, 384, Gen(3));
  const double sigma = std::sqrt(0.25 / n);
  EXPECT_NEAR(m.time_applied.to(at::kDouble).mean().item<double>(), 0.5, 5 * sigma);
  EXPECT_NEAR(m.freq_applied.to(at::kDouble).mean().item<double>(), 0.3, 5 * sigma);
  // Independent coins for time and frequency.
  EXPECT_NEAR(m.time_applied.logical_and(m.freq_applied).to(at::kDouble).mean().item<double>(),
              0.15, 5 * sigma);
  // Samples without the coin have no mask at all.
  EXPECT_FALSE(m.time_mask.any(1).logical_and(m.time_applied.logical_not()).any().item<bool>());
  EXPECT_FALSE(m.freq_mask.any(1).logical_and(m.freq_applied.logical_not()).any().item<bool>());
}

TEST(SpecAugmentTest, WidthsAndStartsStayInBoundsAndCoverTheRange) {
  auto fe = Make();  // 2 time masks <= 25 frames, 1 freq mask <= 10 bins
  const int64_t n = 20000;
  SpecAugmentMasks m = fe->DrawSpecAugment(n, 384, Gen(4));
  ASSERT_EQ(m.time_widths.sizes(), (std::vector<int64_t>{n, 2}));
  ASSERT_EQ(m.freq_widths.sizes(), (std::vector<int64_t>{n, 1}));
  EXPECT_EQ(m.time_widths.min().item<int64_t>(), 0);
  EXPECT_EQ(m.time_widths.max().item<int64_t>(), 25);
  EXPECT_EQ(m.freq_widths.min().item<int64_t>(), 0);
  EXPECT_EQ(m.freq_widths.max().item<int64_t>(), 10);
  EXPECT_GE(m.time_starts.min().item<int64_t>(), 0);
  EXPECT_LE((m.time_starts + m.time_widths).max().item<int64_t>(), 384);
  EXPECT_LE((m.freq_starts + m.freq_widths).max().item<int64_t>(), 128);
  // Uniform widths: each of the 26 values about 1/26 of the draws.
  at::Tensor counts = at::bincount(m.time_widths.flatten(), {}, 26).to(at::kDouble) / (2.0 * n);
  EXPECT_LT((counts - 1.0 / 26).abs().max().item<double>(), 0.01);
  // Starts reach both ends.
  EXPECT_EQ(m.freq_starts.min().item<int64_t>(), 0);
  EXPECT_EQ((m.freq_starts + m.freq_widths).max().item<int64_t>(), 128);
}

TEST(SpecAugmentTest, MasksAreTheDrawnIntervals) {
  auto fe = Make();
  SpecAugmentMasks m = fe->DrawSpecAugment(50, 384, Gen(5));
  for (int64_t b = 0; b < 50; ++b) {
    std::vector<bool> want_t(384, false), want_f(128, false);
    if (m.time_applied[b].item<bool>()) {
      for (int64_t k = 0; k < 2; ++k) {
        const int64_t s = m.time_starts[b][k].item<int64_t>();
        for (int64_t t = s; t < s + m.time_widths[b][k].item<int64_t>(); ++t) want_t[t] = true;
      }
    }
    if (m.freq_applied[b].item<bool>()) {
      const int64_t s = m.freq_starts[b][0].item<int64_t>();
      for (int64_t f = s; f < s + m.freq_widths[b][0].item<int64_t>(); ++f) want_f[f] = true;
    }
    at::Tensor tm = m.time_mask[b].contiguous();
    at::Tensor fm = m.freq_mask[b].contiguous();
    for (int64_t t = 0; t < 384; ++t) ASSERT_EQ(tm.data_ptr<bool>()[t], want_t[t]) << b << " " << t;
    for (int64_t f = 0; f < 128; ++f) ASSERT_EQ(fm.data_ptr<bool>()[f], want_f[f]) << b << " " << f;
  }
}

TEST(SpecAugmentTest, MaskedCellsAreZeroAndOthersUnchanged) {
  auto fe = Make();
  at::Tensor x = Waveforms(16, 2 * kRate);
  at::Tensor eval = fe->Forward(x);
  at::Tensor train = fe->Forward(x, FrontendMode::kTrain, Gen(9));
  SpecAugmentMasks m = fe->DrawSpecAugment(16, eval.size(3), Gen(9));  // the same draws
  at::Tensor masked = m.time_mask.unsqueeze(1).logical_or(m.freq_mask.unsqueeze(2)).unsqueeze(1)
                          .expand_as(train);
  ASSERT_TRUE(masked.any().item<bool>());
  EXPECT_TRUE(train.masked_select(masked).eq(0).all().item<bool>());
  EXPECT_TRUE(train.masked_select(masked.logical_not()).equal(eval.masked_select(masked.logical_not())));
  // Every channel carries the same masks.
  EXPECT_TRUE(train.select(1, 0).equal(train.select(1, 1)));
}

TEST(SpecAugmentTest, ZeroProbabilityOrZeroMasksNeverMask) {
  common::AugmentConfig none;
  none.time_mask_prob = 0;
  none.freq_mask_prob = 0;
  auto fe = Make({}, none);
  SpecAugmentMasks m = fe->DrawSpecAugment(1000, 384, Gen(6));
  EXPECT_FALSE(m.time_mask.any().item<bool>());
  EXPECT_FALSE(m.freq_mask.any().item<bool>());
  common::AugmentConfig zero;
  zero.num_time_masks = 0;
  zero.num_freq_masks = 0;
  auto fz = Make({}, zero);
  SpecAugmentMasks z = fz->DrawSpecAugment(1000, 384, Gen(6));
  EXPECT_EQ(z.time_widths.size(1), 0);
  EXPECT_FALSE(z.time_mask.any().item<bool>());
  EXPECT_FALSE(z.freq_mask.any().item<bool>());
}

TEST(SpecAugmentTest, WidthIsCappedByTheSpectrogram) {
  common::AugmentConfig aug;
  aug.time_mask_param = 25;
  auto fe = Make({}, aug);
  SpecAugmentMasks m = fe->DrawSpecAugment(2000, 5, Gen(8));  // 5 frames only
  EXPECT_LE(m.time_widths.max().item<int64_t>(), 5);
  EXPECT_LE((m.time_starts + m.time_widths).max().item<int64_t>(), 5);
  EXPECT_GE(m.time_starts.min().item<int64_t>(), 0);
}

}  // namespace
}  // namespace aviary::worker
