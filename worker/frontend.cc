#include "worker/frontend.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

// Per-operator headers only: <torch/torch.h> (or <ATen/ATen.h>) costs far more compile time.
#include <ATen/TensorOperators.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/hann_window.h>
#include <ATen/ops/linspace.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stft.h>
#include <ATen/ops/view_as_real.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace aviary::worker {
namespace {

constexpr double kAmin = 1e-10;  // torchaudio AmplitudeToDB's amin for power spectrograms
constexpr int64_t kMelsPerBlock = 8;

// No autograd graph, no autocast: the whole front end runs in float32 even inside a bf16
// autocast region of the caller (excluded dispatch keys win over included ones).
class Float32NoGradScope {
 public:
  Float32NoGradScope() : no_autocast_(c10::autocast_dispatch_keyset) {}

 private:
  at::NoGradGuard no_grad_;
  c10::impl::ExcludeDispatchKeyGuard no_autocast_;
};

double HzToMelHtk(double hz) { return 2595.0 * std::log10(1.0 + hz / 700.0); }

// torchaudio.functional.melscale_fbanks(n_freqs, f_min, f_max, n_mels, sample_rate, norm=None,
// mel_scale="htk"), op for op in float32 on the CPU, so that the weights are bit-identical.
at::Tensor MelFilterbankHtk(int64_t n_freqs, double f_min, double f_max, int64_t n_mels,
                            int sample_rate) {
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  at::Tensor all_freqs = at::linspace(0, sample_rate / 2, n_freqs, opts);  // integer // 2
  at::Tensor m_pts = at::linspace(HzToMelHtk(f_min), HzToMelHtk(f_max), n_mels + 2, opts);
  // Python's `10.0 ** t` is a 0-dim float32 tensor raised to t (Tensor.__rpow__).
  at::Tensor f_pts = (at::pow(at::scalar_tensor(10.0, opts), m_pts / 2595.0) - 1.0) * 700.0;
  at::Tensor f_diff = f_pts.slice(0, 1) - f_pts.slice(0, 0, -1);           // [n_mels + 1]
  at::Tensor slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1);        // [n_freqs, n_mels + 2]
  at::Tensor down = (slopes.slice(1, 0, -2) * -1.0) / f_diff.slice(0, 0, -1);
  at::Tensor up = slopes.slice(1, 2) / f_diff.slice(0, 1);
  return at::maximum(at::zeros({1}, opts), at::minimum(down, up));        // [n_freqs, n_mels]
}

// The filterbank cut into GEMMs over the frequency rows each group of mel bands touches. The
// HTK triangles are narrow (about 2,000 of the 130,000 weights are non-zero), so on the CPU,
// groups of kMelsPerBlock bands do ~13% of the dense multiply-adds with exactly the same non-zero
// terms. On a GPU one dense GEMM is faster than many small ones.
std::vector<MelBlock> MelBlocks(const at::Tensor& fb, c10::Device device) {
  const int64_t n_freqs = fb.size(0);
  const int64_t n_mels = fb.size(1);
  const int64_t per_block = device.is_cpu() ? kMelsPerBlock : n_mels;
  at::Tensor nonzero = fb.gt(0).contiguous();
  const bool* nz = nonzero.data_ptr<bool>();  // [n_freqs, n_mels], on the CPU
  std::vector<MelBlock> blocks;
  for (int64_t m0 = 0; m0 < n_mels; m0 += per_block) {
    const int64_t m1 = std::min(n_mels, m0 + per_block);
    int64_t f0 = n_freqs, f1 = 0;
    for (int64_t f = 0; f < n_freqs; ++f) {
      for (int64_t m = m0; m < m1; ++m) {
        if (nz[f * n_mels + m]) {
          f0 = std::min(f0, f);
          f1 = std::max(f1, f + 1);
        }
      }
    }
    if (f0 >= f1) {  // all-zero filters (n_mels too high): keep one row so the GEMM is valid
      f0 = 0;
      f1 = 1;
    }
    blocks.push_back({f0, f1, fb.slice(0, f0, f1).slice(1, m0, m1).contiguous().to(device)});
  }
  return blocks;
}

// Integer widths uniform in [0, max_width] and starts uniform in [0, size - width] from uniform
// draws in [0, 1); float32 arithmetic is exact for these small integers.
std::pair<at::Tensor, at::Tensor> WidthsAndStarts(const at::Tensor& u_width,
                                                  const at::Tensor& u_start, int64_t max_width,
                                                  int64_t size) {
  at::Tensor widths = (u_width * static_cast<double>(max_width + 1)).floor_();
  widths.clamp_max_(static_cast<double>(max_width));
  at::Tensor room = static_cast<double>(size) - widths;  // >= 0
  at::Tensor starts = at::minimum((u_start * (room + 1.0)).floor_(), room);
  return {widths, starts};
}

// [B, K] widths/starts -> [B, size] bool: covered by any of the K masks.
at::Tensor MaskFromIntervals(const at::Tensor& widths, const at::Tensor& starts, int64_t size) {
  at::Tensor pos = at::arange(size, widths.options()).view({1, 1, size});
  at::Tensor s = starts.unsqueeze(-1);
  at::Tensor inside = pos.ge(s).logical_and_(pos.lt(s + widths.unsqueeze(-1)));  // [B, K, size]
  return inside.any(1);
}

}  // namespace

absl::StatusOr<NormalizeMode> ParseNormalizeMode(const std::string& text) {
  if (text == "per_sample") return NormalizeMode::kPerSample;
  if (text == "per_batch") return NormalizeMode::kPerBatch;
  if (text == "none") return NormalizeMode::kNone;
  return absl::InvalidArgumentError(absl::StrCat(
      "frontend.normalize: expected per_sample, per_batch or none, got '", text, "'"));
}

absl::StatusOr<std::unique_ptr<MelFrontend>> MelFrontend::Create(
    const common::FrontendConfig& frontend, const common::AugmentConfig& augment,
    int sample_rate, c10::Device device, c10::MemoryFormat output_format) {
  auto bad = [](absl::string_view key, auto&&... what) {
    return absl::InvalidArgumentError(absl::StrCat("frontend: ", key, ": ", what...));
  };
  if (sample_rate <= 0) return bad("data.sample_rate", "expected > 0, got ", sample_rate);
  if (frontend.n_fft < 2) return bad("frontend.n_fft", "expected >= 2, got ", frontend.n_fft);
  if (frontend.hop_length < 1) {
    return bad("frontend.hop_length", "expected >= 1, got ", frontend.hop_length);
  }
  if (frontend.n_mels < 1) return bad("frontend.n_mels", "expected >= 1, got ", frontend.n_mels);
  if (!(frontend.fmin >= 0.0 && frontend.fmin < frontend.fmax)) {
    return bad("frontend.fmin", "expected 0 <= fmin < fmax (", frontend.fmax, "), got ",
               frontend.fmin);
  }
  if (frontend.fmax > sample_rate / 2.0) {
    return bad("frontend.fmax", "expected <= sample_rate / 2 (", sample_rate / 2.0, "), got ",
               frontend.fmax);
  }
  if (!(frontend.top_db > 0.0)) return bad("frontend.top_db", "expected > 0, got ", frontend.top_db);
  if (frontend.in_channels < 1) {
    return bad("frontend.in_channels", "expected >= 1, got ", frontend.in_channels);
  }
  for (const auto& [key, p] : {std::pair<const char*, double>{"augment.time_mask_prob",
                                                              augment.time_mask_prob},
                               {"augment.freq_mask_prob", augment.freq_mask_prob}}) {
    if (!(p >= 0.0 && p <= 1.0)) return bad(key, "expected in [0, 1], got ", p);
  }
  for (const auto& [key, n] : {std::pair<const char*, int>{"augment.num_time_masks",
                                                           augment.num_time_masks},
                               {"augment.time_mask_param", augment.time_mask_param},
                               {"augment.num_freq_masks", augment.num_freq_masks},
                               {"augment.freq_mask_param", augment.freq_mask_param}}) {
    if (n < 0) return bad(key, "expected >= 0, got ", n);
  }
  if (output_format != c10::MemoryFormat::Contiguous &&
      output_format != c10::MemoryFormat::ChannelsLast) {
    return absl::InvalidArgumentError("frontend: output format must be Contiguous or ChannelsLast");
  }
  auto normalize = ParseNormalizeMode(frontend.normalize);
  if (!normalize.ok()) return normalize.status();

  std::unique_ptr<MelFrontend> fe(new MelFrontend());
  fe->n_fft_ = frontend.n_fft;
  fe->hop_length_ = frontend.hop_length;
  fe->n_mels_ = frontend.n_mels;
  fe->in_channels_ = frontend.in_channels;
  fe->sample_rate_ = sample_rate;
  fe->top_db_ = frontend.top_db;
  fe->normalize_ = *normalize;
  fe->augment_ = augment;
  fe->device_ = device;
  fe->output_format_ = output_format;
  try {
    Float32NoGradScope scope;
    const auto cpu = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
    fe->window_ = at::hann_window(frontend.n_fft, /*periodic=*/true, cpu).to(device);
    // The device with its index ("cuda" is the current one, "cuda:0"): a tensor's device always
    // has one, and Forward compares them (a bare "cuda" refused every CUDA waveform).
    fe->device_ = fe->window_.device();
    at::Tensor fb = MelFilterbankHtk(fe->n_freqs(), frontend.fmin, frontend.fmax,
                                     frontend.n_mels, sample_rate);
    // torchaudio warns about empty filters (n_mels too high for n_fft); so do we.
    const int64_t empty_filters = fb.amax(0).eq(0).sum().item<int64_t>();
    if (empty_filters > 0) {
      common::Logger("frontend").Warn(absl::StrCat(
          empty_filters, " of ", frontend.n_mels, " mel filters are all zero: n_mels (",
          frontend.n_mels, ") is too high for n_fft (", frontend.n_fft, ")"));
    }
    fe->filterbank_ = fb.to(device);
    fe->mel_blocks_ = MelBlocks(fb, device);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("frontend: building the window and filterbank on ", device.str(), ": ",
                     e.what_without_backtrace()));
  }
  return fe;
}



void MelFrontend::CheckWaveforms(const at::Tensor& waveforms) const {
  TORCH_CHECK(waveforms.defined(), "MelFrontend: undefined waveform tensor");
  TORCH_CHECK(waveforms.dim() == 2, "MelFrontend: expected waveforms [batch, samples], got ",
              waveforms.sizes());
  TORCH_CHECK(waveforms.size(0) >= 1, "MelFrontend: an empty batch (waveforms ", waveforms.sizes(), ")");
  TORCH_CHECK(c10::isFloatingType(waveforms.scalar_type()),
              "MelFrontend: expected floating-point waveforms, got ", waveforms.scalar_type());
  TORCH_CHECK(waveforms.device() == device_, "MelFrontend: waveforms on ", waveforms.device(),
              " but the front end lives on ", device_);
  TORCH_CHECK(waveforms.size(1) >= MinSamples(), "MelFrontend: clips of ", waveforms.size(1),
              " samples are too short for reflect padding (n_fft ", n_fft_, " needs at least ",
              MinSamples(), " samples); pad clips to the configured duration first");
}

at::Tensor MelFrontend::MelPower(const at::Tensor& waveforms) const {
  CheckWaveforms(waveforms);
  Float32NoGradScope scope;
  at::Tensor x = waveforms.to(at::kFloat);
  at::Tensor spec = at::stft(x, n_fft_, hop_length_, n_fft_, window_, /*center=*/true, "reflect",
                             /*normalized=*/false, /*onesided=*/true, /*return_complex=*/true);
  at::Tensor ri = at::view_as_real(spec);  // [B, n_freqs, frames, 2]
  at::Tensor re = ri.select(-1, 0);
  at::Tensor im = ri.select(-1, 1);
  at::Tensor power = (re * re).addcmul_(im, im);  // [B, n_freqs, frames]
  // torch's STFT lays frames out as [B, frames, n_freqs] in memory (its result is a transposed
  // view), and the elementwise ops keep that layout: the rows below are a view, no copy.
  const int64_t batch = power.size(0);
  const int64_t frames = power.size(2);
  at::Tensor rows = power.transpose(1, 2).reshape({batch * frames, n_freqs()});
  std::vector<at::Tensor> parts;
  parts.reserve(mel_blocks_.size());
  for (const MelBlock& block : mel_blocks_) {
    parts.push_back(at::mm(rows.narrow(1, block.freq_begin, block.freq_end - block.freq_begin),
                           block.weights));
  }
  at::Tensor mel = parts.size() == 1 ? parts[0] : at::cat(parts, 1);  // [B * frames, n_mels]
  return mel.view({batch, frames, n_mels_}).transpose(1, 2);          // [B, n_mels, frames]
}

at::Tensor MelFrontend::PowerToDb(const at::Tensor& mel_power) const {
  Float32NoGradScope scope;
  at::Tensor db = mel_power.clamp_min(kAmin).log10_().mul_(10.0);
  at::Tensor floor = db.amax({-2, -1}, /*keepdim=*/true).sub_(top_db_);
  return db.clamp_min_(floor);
}

at::Tensor MelFrontend::Normalize(const at::Tensor& db) const {
  if (normalize_ == NormalizeMode::kNone) return db;
  Float32NoGradScope scope;
  const int64_t groups = normalize_ == NormalizeMode::kPerSample ? db.size(0) : 1;
  // Min and max ignore element order: flatten whichever view is contiguous (MelPower's result is
  // [B, n_mels, frames] over [B, frames, n_mels] memory) so that the reshape is free.
  const at::Tensor& dense = db.is_contiguous() ? db : db.transpose(1, 2);
  at::Tensor lo, hi;
  std::tie(lo, hi) = at::aminmax(dense.reshape({groups, -1}), /*dim=*/1, /*keepdim=*/true);
  at::Tensor range = hi - lo;
  range.masked_fill_(range.le(0), 1.0);  // constant input: skip the division, giving zeros
  const std::vector<int64_t> shape{groups, 1, 1};
  return (db - lo.view(shape)).div_(range.view(shape));
}

SpecAugmentMasks MelFrontend::DrawSpecAugment(int64_t batch, int64_t frames,
                                              const at::Generator& generator) const {
  TORCH_CHECK(!generator.defined() || generator.device().type() == device_.type(),
              "MelFrontend: SpecAugment generator on ", generator.device(),
              " but the front end lives on ", device_);
  Float32NoGradScope scope;
  const int64_t kt = augment_.num_time_masks;
  const int64_t kf = augment_.num_freq_masks;
  // Columns: time coin, freq coin, kt time widths, kt time starts, kf freq widths, kf starts.
  at::Tensor u = at::rand({batch, 2 + 2 * kt + 2 * kf}, generator,
                          at::TensorOptions().dtype(at::kFloat).device(device_));
  SpecAugmentMasks m;
  m.time_applied = u.select(1, 0).lt(augment_.time_mask_prob);
  m.freq_applied = u.select(1, 1).lt(augment_.freq_mask_prob);
  auto [tw, ts] = WidthsAndStarts(u.narrow(1, 2, kt), u.narrow(1, 2 + kt, kt),
                                  std::min<int64_t>(augment_.time_mask_param, frames), frames);
  auto [fw, fs] = WidthsAndStarts(u.narrow(1, 2 + 2 * kt, kf), u.narrow(1, 2 + 2 * kt + kf, kf),
                                  std::min<int64_t>(augment_.freq_mask_param, n_mels_), n_mels_);
  m.time_mask = MaskFromIntervals(tw, ts, frames).logical_and_(m.time_applied.unsqueeze(1));
  m.freq_mask = MaskFromIntervals(fw, fs, n_mels_).logical_and_(m.freq_applied.unsqueeze(1));
  m.time_widths = tw.to(at::kLong);
  m.time_starts = ts.to(at::kLong);
  m.freq_widths = fw.to(at::kLong);
  m.freq_starts = fs.to(at::kLong);
  return m;
}

at::Tensor MelFrontend::ApplySpecAugment(const at::Tensor& spec,
                                         const SpecAugmentMasks& masks) const {
  Float32NoGradScope scope;
  at::Tensor masked = masks.time_mask.unsqueeze(1).logical_or(masks.freq_mask.unsqueeze(2));
  return spec.masked_fill(masked, 0.0);
}

at::Tensor MelFrontend::Tile(const at::Tensor& spec) const {
  at::Tensor x = spec.unsqueeze(1);
  if (in_channels_ > 1) x = x.expand({spec.size(0), in_channels_, spec.size(1), spec.size(2)});
  return x.contiguous(output_format_);
}

at::Tensor MelFrontend::Forward(const at::Tensor& waveforms, FrontendMode mode,
                                const at::Generator& generator) const {
  at::Tensor x = Normalize(PowerToDb(MelPower(waveforms)));
  if (mode == FrontendMode::kTrain) {
    x = ApplySpecAugment(x, DrawSpecAugment(x.size(0), x.size(2), generator));
  }
  return Tile(x);
}

}  // namespace aviary::worker
