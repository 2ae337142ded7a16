// Waveform augmentation of the recipe, applied to a batch on the training device.
//
// Semantics follow the seed notebook (its TensorFlow data pipeline):
//   per sample, with probability audio_augment_prob, the audio block:
//     - gaussian noise with probability noise_prob, std ~ U(noise_std_min, noise_std_max);
//     - time shift with probability timeshift_prob: a circular roll by a uniform amount in
//       [-timeshift_max, timeshift_max] x clip length;
//   per batch:
//     - MixUp with probability mixup_prob: one lam ~ Beta(mixup_alpha, mixup_alpha) for the
//       batch, partner = the batch rolled by one; x = lam x + (1-lam) x', y likewise;
//     - CutMix with probability cutmix_prob: lam ~ Beta(cutmix_alpha, cutmix_alpha), a segment
//       of floor((1-lam) T) samples at a uniform start is taken from the partner; labels are
//       mixed by the segment's actual share of the clip (DESIGN.md: "label weight from the
//       cut length"). The notebook's CutMix (tensorflow_extra's image CutMix on a [B, 1, T, 1]
//       view) differs: its segment is about sqrt(1-lam) T long, centred at a uniform point and
//       clipped at the clip's ends, and it keeps the sample's own audio inside the segment while
//       weighting the sample's own label by the share outside it (content and labels disagree,
//       an upstream slip we do not copy).
// Decisions and small draws (probabilities, lam, shifts) come from a CPU generator seeded by
// the caller; the noise itself is drawn on the batch's device from a generator of that device
// seeded from the same seed (seed ^ 0x9e3779b97f4a7c15), so a (seed, batch) pair gives the same
// augmentation on every run.
//
// Thread-compatible: no state beyond the arguments.
#ifndef AVIARY_WORKER_AUGMENT_H_
#define AVIARY_WORKER_AUGMENT_H_

#include <cstdint>

#include <ATen/ATen.h>

#include "common/config.h"

namespace aviary::worker {

// What one call did (for logs and tests).
struct AugmentReport {
  int noised = 0;        // samples that received noise
  int shifted = 0;       // samples that were time-shifted
  bool mixup = false;
  bool cutmix = false;
  double mixup_lam = 1.0;
  double cutmix_lam = 1.0;  // share of the clip kept from the sample itself
};

// Augments `waveforms` [B, T] (float) and `targets` [B, C] (float, one-hot or soft) in place
// semantics: returns the new tensors through the pointers. Both on the same device.
AugmentReport AugmentBatch(const common::AugmentConfig& config, uint64_t seed,
                           at::Tensor* waveforms, at::Tensor* targets);

// Draws from Beta(a, b) with `generator` (via two standard gammas), as a double.
double SampleBeta(double a, double b, at::Generator& generator);

// A generator for `device` seeded with `seed`, independent of the global default generator.
at::Generator MakeGenerator(const at::Device& device, uint64_t seed);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_AUGMENT_H_
