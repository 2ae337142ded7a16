#include "worker/augment.h"

#include <algorithm>
#include <cmath>
#include <mutex>

namespace aviary::worker {

at::Generator MakeGenerator(const at::Device& device, uint64_t seed) {
  at::Generator base = at::globalContext().defaultGenerator(device);
  at::Generator g;
  {
    std::lock_guard<std::mutex> lock(base.mutex());
    g = base.clone();
  }
  g.set_current_seed(seed);
  return g;
}

double SampleBeta(double a, double b, at::Generator& generator) {
  at::Tensor alphas = at::tensor({a, b}, at::kDouble);
  at::Tensor g = at::_standard_gamma(alphas, generator);
  double ga = g[0].item<double>(), gb = g[1].item<double>();
  if (ga + gb <= 0.0) return 0.5;
  return ga / (ga + gb);
}

AugmentReport AugmentBatch(const common::AugmentConfig& config, uint64_t seed,
                           at::Tensor* waveforms, at::Tensor* targets) {
  AugmentReport report;
  at::Tensor x = *waveforms;
  at::Tensor y = *targets;
  const int64_t batch = x.size(0);
  const int64_t length = x.size(1);
  if (batch == 0 || length == 0) return report;
  at::Generator cpu = MakeGenerator(at::Device(at::kCPU), seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);

  // Per-sample draws on the CPU: [B, 6] uniforms.
  at::Tensor u = at::rand({batch, 6}, cpu, f64);
  auto ua = u.accessor<double, 2>();
  std::vector<float> noise_std(batch, 0.0f);
  std::vector<int64_t> shift(batch, 0);
  for (int64_t i = 0; i < batch; ++i) {
    if (ua[i][0] >= config.audio_augment_prob) continue;
    if (ua[i][1] < config.noise_prob) {
      noise_std[i] = static_cast<float>(config.noise_std_min +
                                        ua[i][2] * (config.noise_std_max - config.noise_std_min));
      ++report.noised;
    }
    if (ua[i][3] < config.timeshift_prob) {
      double frac = (2.0 * ua[i][4] - 1.0) * config.timeshift_max;
      shift[i] = static_cast<int64_t>(std::floor(frac * static_cast<double>(length)));
      if (shift[i] != 0) ++report.shifted;
    }
  }
  if (report.noised > 0) {
    at::Generator dev = MakeGenerator(x.device(), seed ^ 0x9e3779b97f4a7c15ULL);
    // non_blocking from pageable memory: CUDA stages the bytes before the call returns (no
    // stream sync, unlike a blocking copy), so the vector may go right after.
    at::Tensor stds = at::from_blob(noise_std.data(), {batch, 1}, at::kFloat)
                          .to(x.device(), x.scalar_type(), /*non_blocking=*/true, /*copy=*/true);
    x = x + at::randn(x.sizes(), dev, x.options()) * stds;
  }
  if (report.shifted > 0) {
    // A circular roll per sample: gather with (t - shift) mod T.
    at::Tensor shifts = at::from_blob(shift.data(), {batch, 1}, at::kLong)
                            .to(x.device(), at::kLong, /*non_blocking=*/true, /*copy=*/true);
    at::Tensor t = at::arange(length, x.options().dtype(at::kLong)).unsqueeze(0);
    at::Tensor idx = at::remainder(t - shifts, length);
    x = at::gather(x, 1, idx);
  }

  // Batch-level MixUp and CutMix with the batch rolled by one as the partner.
  at::Tensor b = at::rand({3}, cpu, f64);
  auto ba = b.accessor<double, 1>();
  if (batch > 1 && ba[0] < config.mixup_prob) {
    double lam = SampleBeta(config.mixup_alpha, config.mixup_alpha, cpu);
    x = lam * x + (1.0 - lam) * at::roll(x, {1}, {0});
    y = lam * y + (1.0 - lam) * at::roll(y, {1}, {0});
    report.mixup = true;
    report.mixup_lam = lam;
  }
  if (batch > 1 && ba[1] < config.cutmix_prob) {
    double lam = SampleBeta(config.cutmix_alpha, config.cutmix_alpha, cpu);
    int64_t cut = static_cast<int64_t>(std::floor(static_cast<double>(length) * (1.0 - lam)));
    cut = std::clamp<int64_t>(cut, 0, length);
    int64_t start = static_cast<int64_t>(std::floor(ba[2] * static_cast<double>(length - cut + 1)));
    start = std::clamp<int64_t>(start, 0, length - cut);
    if (cut > 0) {
      at::Tensor partner = at::roll(x, {1}, {0});
      x = x.clone();
      x.narrow(1, start, cut).copy_(partner.narrow(1, start, cut));
      double kept = 1.0 - static_cast<double>(cut) / static_cast<double>(length);
      y = kept * y + (1.0 - kept) * at::roll(y, {1}, {0});
      report.cutmix = true;
      report.cutmix_lam = kept;
    }
  }
  *waveforms = x;
  *targets = y;
  return report;
}

}  // namespace aviary::worker
