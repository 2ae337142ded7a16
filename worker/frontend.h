// The on-device mel front end: waveforms -> the model's input image, batched, plus SpecAugment.
//
//   [B, T] waveforms (any floating dtype; computed in float32)
//   -> STFT: periodic Hann window, n_fft = win_length, hop_length, center=True, reflect padding
//   -> power spectrum |X|^2                                  [B, n_fft/2 + 1, frames]
//   -> HTK mel filterbank, no area normalisation              [B, n_mels, frames]
//      (= torchaudio.functional.melscale_fbanks(n_freqs, fmin, fmax, n_mels, sample_rate,
//       norm=None, mel_scale="htk"), built the same way in float32)
//   -> dB = 10 * log10(max(M, 1e-10)), clamped below at (max - top_db) per clip
//   -> normalize ("per_sample", "per_batch" or "none")
//   -> SpecAugment (FrontendMode::kTrain only)
//   -> tiled to in_channels                                   [B, in_channels, n_mels, frames]
//
// frames = 1 + T / hop_length (10 s at 32 kHz, hop 835 -> 384).
//
// Parity: equals torchaudio 0.13's MelSpectrogram(power=2, center=True, pad_mode="reflect",
// norm=None, mel_scale="htk") + AmplitudeToDB(stype="power", top_db) applied to a
// [B, 1, n_mels, frames] tensor, within float rounding (tests/parity/check_frontend.py). Note the
// torchaudio trap: amplitude_to_DB clamps over the last three dims, so a [B, n_mels, frames]
// input (no channel dim) is clamped at the maximum of the whole batch; this front end always
// clamps per clip, which is what torchaudio does for [B, 1, n_mels, frames].
//
// Normalisation: "per_sample" is the notebook's z-score followed by min-max to [0, 1], per clip;
// "per_batch" the same over the whole batch. Min-max is invariant to the positive affine map of
// the z-score, so both are computed as one min-max ((x - min) / (max - min)); this equals the
// two-step form up to float rounding (< 1e-6) and costs one reduction instead of three. A clip
// (or batch) with max == min (silence) skips the division and comes out all zeros, never NaN.
// "none" leaves the dB values.
//
// SpecAugment (training only; the notebook's TF TimeFreqMask layer), per sample, vectorised:
//   - time masks: with probability time_mask_prob the sample gets num_time_masks masks (one coin
//     per sample for the group); each mask has an integer width w uniform in
//     [0, min(time_mask_param, frames)] (both ends included) and an integer start uniform in
//     [0, frames - w]; frames t with start <= t < start + w are masked;
//   - frequency masks: the same with freq_mask_prob, num_freq_masks, freq_mask_param over the
//     n_mels bins;
//   - masks may overlap; masked cells are set to 0 (after normalisation, before tiling, so all
//     channels share the masks);
//   - every draw comes from one at::rand call on the front end's device with the caller's
//     generator: the same generator state gives the same masks (on the same device type).
//
// Performance: one STFT call for the batch, the mel projection as GEMMs over [B * frames,
// n_freqs] rows (on the CPU one per group of 8 bands, restricted to the frequency rows the group
// touches: ~13% of the dense multiply-adds, the same non-zero terms; on a GPU one dense GEMM),
// no host syncs, no per-clip loops. The STFT, log and normalisation run in float32 with autocast disabled (the
// output is float32 even under bf16 autocast; the model casts at its first layer). No autograd
// graph is recorded (the front end has no parameters).
//
// Thread safety: a MelFrontend is immutable after Create; its const methods may be called
// concurrently (on CUDA, from the caller's current stream).
#ifndef AVIARY_WORKER_FRONTEND_H_
#define AVIARY_WORKER_FRONTEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/MemoryFormat.h>

#include "absl/status/statusor.h"
#include "common/config.h"

namespace aviary::worker {

// kEval: no SpecAugment (validation, inference, `aviary mel`). kTrain: SpecAugment on.
enum class FrontendMode { kEval, kTrain };

enum class NormalizeMode { kPerSample, kPerBatch, kNone };

// Parses FrontendConfig::normalize ("per_sample", "per_batch", "none").
absl::StatusOr<NormalizeMode> ParseNormalizeMode(const std::string& text);

// The random draws of one SpecAugment call, all on the front end's device. Exposed for tests and
// for logging what a batch got.
struct SpecAugmentMasks {
  at::Tensor time_applied;  // [B] bool: the sample got its time masks
  at::Tensor freq_applied;  // [B] bool: the sample got its frequency masks
  at::Tensor time_widths;   // [B, num_time_masks] int64, in [0, min(time_mask_param, frames)]
  at::Tensor time_starts;   // [B, num_time_masks] int64, in [0, frames - width]
  at::Tensor freq_widths;   // [B, num_freq_masks] int64, in [0, min(freq_mask_param, n_mels)]
  at::Tensor freq_starts;   // [B, num_freq_masks] int64, in [0, n_mels - width]
  at::Tensor time_mask;     // [B, frames] bool, true = masked (already ANDed with time_applied)
  at::Tensor freq_mask;     // [B, n_mels] bool, true = masked (already ANDed with freq_applied)
};

// A slice of the filterbank: mel bands whose weights are non-zero only in rows
// [freq_begin, freq_end). MelPower multiplies each slice with its rows only.
struct MelBlock {
  int64_t freq_begin = 0;
  int64_t freq_end = 0;
  at::Tensor weights;  // [freq_end - freq_begin, bands in the block], on the device
};

class MelFrontend {
 public:
  // Validates the settings and builds the Hann window and the mel filterbank once, on `device`
  // (the filterbank is computed on the CPU in float32 exactly as torchaudio does, then copied).
  // `output_format` is the memory format of Forward's result (ChannelsLast for channels_last
  // models). INVALID_ARGUMENT naming the field for bad settings (fmax above Nyquist, ...).
  static absl::StatusOr<std::unique_ptr<MelFrontend>> Create(
      const common::FrontendConfig& frontend, const common::AugmentConfig& augment,
      int sample_rate, c10::Device device = c10::Device(c10::kCPU),
      c10::MemoryFormat output_format = c10::MemoryFormat::Contiguous);

  MelFrontend(const MelFrontend&) = delete;
  MelFrontend& operator=(const MelFrontend&) = delete;

  // waveforms [B, T] (floating, on device(), B >= 1, T >= MinSamples()) -> float32
  // [B, in_channels, n_mels, NumFrames(T)] in output_format. kTrain applies SpecAugment with
  // draws from `generator` (a generator of device()'s type; an undefined one means that
  // device's default generator). Throws c10::Error naming the problem for a wrong rank, dtype,
  // device, an empty batch or a clip too short for reflect padding (torch itself refuses
  // those). Values are not checked (a check would wait for the device every batch): a NaN or
  // infinite sample makes its clip's image NaN, and with normalize per_batch the whole batch's
  // (train.skip_nonfinite then skips the step).
  at::Tensor Forward(const at::Tensor& waveforms, FrontendMode mode = FrontendMode::kEval,
                     const at::Generator& generator = {}) const;

  // The stages of Forward, for tests and for callers that need intermediate results.
  // [B, T] -> mel power [B, n_mels, frames], float32.
  at::Tensor MelPower(const at::Tensor& waveforms) const;
  // mel power -> dB with the per-clip top_db floor ([B, n_mels, frames]).
  at::Tensor PowerToDb(const at::Tensor& mel_power) const;
  // dB -> normalised per the config ([B, n_mels, frames]).
  at::Tensor Normalize(const at::Tensor& db) const;
  // Draws SpecAugment masks for a batch of `batch` spectrograms with `frames` frames.
  SpecAugmentMasks DrawSpecAugment(int64_t batch, int64_t frames,
                                   const at::Generator& generator = {}) const;
  // spec [B, n_mels, frames] -> a copy with the masked cells set to 0.
  at::Tensor ApplySpecAugment(const at::Tensor& spec, const SpecAugmentMasks& masks) const;
  // [B, n_mels, frames] -> [B, in_channels, n_mels, frames] in output_format.
  at::Tensor Tile(const at::Tensor& spec) const;

  // torch.stft's frame count with center=True: the clip padded by n_fft / 2 on both sides,
  // 1 + (num_samples + 2 (n_fft / 2) - n_fft) / hop_length (1 + num_samples / hop_length for an
  // even n_fft).
  int64_t NumFrames(int64_t num_samples) const {
    return 1 + (num_samples + 2 * (n_fft_ / 2) - n_fft_) / hop_length_;
  }
  // The shortest clip reflect padding accepts: n_fft / 2 + 1 samples (torch requires the pad,
  // n_fft / 2, to be smaller than the clip). Clips are padded to the configured duration long
  // before this matters; shorter ones are refused, not silently changed.
  int64_t MinSamples() const { return n_fft_ / 2 + 1; }
  int64_t n_freqs() const { return n_fft_ / 2 + 1; }
  int64_t n_mels() const { return n_mels_; }
  int64_t in_channels() const { return in_channels_; }
  int sample_rate() const { return sample_rate_; }
  NormalizeMode normalize() const { return normalize_; }
  c10::Device device() const { return device_; }  // with its index ("cuda:0" for a bare "cuda")
  // [n_freqs, n_mels], float32, on device(): torchaudio's melscale_fbanks layout.
  const at::Tensor& mel_filterbank() const { return filterbank_; }
  // [n_fft], float32, on device(): periodic Hann.
  const at::Tensor& window() const { return window_; }

 private:
  MelFrontend() = default;
  void CheckWaveforms(const at::Tensor& waveforms) const;

  int64_t n_fft_ = 0;
  int64_t hop_length_ = 0;
  int64_t n_mels_ = 0;
  int64_t in_channels_ = 1;
  int sample_rate_ = 0;
  double top_db_ = 80.0;
  NormalizeMode normalize_ = NormalizeMode::kPerSample;
  common::AugmentConfig augment_;
  c10::Device device_ = c10::Device(c10::kCPU);
  c10::MemoryFormat output_format_ = c10::MemoryFormat::Contiguous;
  at::Tensor window_;      // [n_fft]
  at::Tensor filterbank_;  // [n_freqs, n_mels]
  std::vector<MelBlock> mel_blocks_;
};

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_FRONTEND_H_
