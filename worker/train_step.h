// One training step of the recipe, shared by the trainer (worker/trainer.cc) and the step
// benchmark (bench/train_step_bench.cc), so that what the benchmark times is what training runs.
//
//   Forward:  waveforms (on the device already: the trainer's copy-ahead; or host, pinned on
//             CUDA, copied non-blocking) and class ids -> the device, one-hot targets there, waveform augmentation (MixUp, CutMix, noise, shift), the mel front
//             end with SpecAugment, the model under bf16 autocast on CUDA, the loss.
//   Update:   zero the gradients, backward (the reducer's hooks all-reduce buckets during it),
//             the reducer's Finish, the optimizer step.
// Between the two the trainer checks the loss (non-finite steps are skipped on every rank).
//
// Gradient accumulation (train.grad_accum_steps = K > 1): Backward() runs once per micro-batch
// on loss / K, all-reduces that micro-batch's gradient (the reducer replaces .grad) and adds it
// to an accumulator; Apply() puts the sum into .grad and steps. Averaging is linear, so the
// result is the gradient of the mean loss over the K micro-batches of every rank: one step on
// batch_size x ranks x K samples (up to float rounding; BatchNorm layers in training mode
// normalize each micro-batch with its own statistics, as each rank does without SyncBatchNorm).
// An optimizer step made of n < K micro-batches (the end of an epoch, skipped micro-batches)
// is the mean over the samples it has: a micro-batch shorter than train.batch_size (an epoch's
// last with drop_remainder false) weighs each of its samples as a full one's do (it weighed as
// a whole micro-batch: 1 sample of a {32, 1} step counted half). Its learning rate is still the
// one of K full micro-batches (the trainer warns when an epoch's batches are no multiple of K).
// Gradient clipping (train.grad_clip_norm > 0): in Apply(), after the all-reduce and the
// accumulation, torch.nn.utils.clip_grad_norm_'s semantics: total = the L2 norm of all the
// gradients, and when total > max_norm every gradient is multiplied by max_norm / (total + 1e-6).
// Every rank holds the same averaged gradient then, so every rank clips by the same factor: the
// norm is that of the all-reduced gradient.
//
// Determinism: dropout and stochastic depth draw from the device's default generator, which
// Forward seeds with `seeds.dropout`; augmentation and SpecAugment draw from generators of their
// own seeded with `seeds.augment` and `seeds.spec_augment`.
//
// Not thread-safe; one per model replica.
#ifndef AVIARY_WORKER_TRAIN_STEP_H_
#define AVIARY_WORKER_TRAIN_STEP_H_

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/status.h"
#include "common/config.h"
#include "worker/frontend.h"
#include "worker/models.h"
#include "worker/optimizer.h"

namespace aviary::worker {
namespace comm {
class Reducer;
}

// bf16 autocast on CUDA for the scope's lifetime; a no-op when not enabled.
class AutocastGuard {
 public:
  explicit AutocastGuard(bool enabled);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool enabled_;
};

struct StepSeeds {
  uint64_t dropout = 0;
  uint64_t augment = 0;
  uint64_t spec_augment = 0;
};

struct StepInputs {
  at::Tensor features;  // [B, C, n_mels, frames] float32 on the device, after SpecAugment
  at::Tensor targets;   // [B, C] float32 on the device, after MixUp/CutMix
};

struct StepForward {
  at::Tensor loss;     // float32 scalar on the device (not synchronized)
  at::Tensor logits;   // [B, C], the autocast dtype
  at::Tensor targets;  // [B, C] float32, after MixUp/CutMix
};

class TrainStep {
 public:
  // The parts are not owned and must outlive the step. `reducer` may be null (one process).
  TrainStep(const common::PipelineConfig& config, const common::TrainConfig& train,
            MelFrontend* frontend, ClassifierImpl* model, AdamOptimizer* optimizer,
            comm::Reducer* reducer, c10::Device device, bool autocast);

  // The whole forward from waveforms [B, T] (float32) and class ids [B] (int64), on the host.
  StepForward Forward(const at::Tensor& waveforms, const at::Tensor& class_ids,
                      const StepSeeds& seeds) const;
  // Forward's inputs to the model: the waveforms and class ids to the device, augmentation and
  // the front end (generators of their own; the dropout seed is the model's to set).
  StepInputs Prepare(const at::Tensor& waveforms, const at::Tensor& class_ids,
                     const StepSeeds& seeds) const;
  // The model and the loss only, from front-end output [B, C, n_mels, frames] and targets
  // [B, num_classes] already on the device (benchmarks of the model step alone).
  StepForward ForwardFeatures(const at::Tensor& features, const at::Tensor& targets,
                              uint64_t dropout_seed) const;
  // Backward, the gradient all-reduce and the optimizer step (Backward then Apply). Errors come
  // from the reducer (a collective that failed or timed out); the group must then end.
  absl::Status Update(const at::Tensor& loss);
  // One micro-batch of `samples` samples (-1: train.batch_size): backward of loss /
  // grad_accum_steps (weighted by samples / batch_size) and its gradient all-reduce, added to
  // the accumulator when grad_accum_steps > 1 (see the file comment).
  absl::Status Backward(const at::Tensor& loss, int64_t samples = -1);
  // The optimizer step on what Backward() gathered since the last Apply (clipped when
  // train.grad_clip_norm > 0). False, without a step, when no micro-batch was gathered, and
  // with train.skip_nonfinite when the gradient's norm is not finite (the gradients are then
  // dropped: skipped_nonfinite()).
  bool Apply();
  // Whether the last Apply() skipped the step for a non-finite gradient (its norm: last_grad_norm()).
  bool skipped_nonfinite() const { return skipped_nonfinite_; }
  // A micro-batch whose backward ran elsewhere (a CUDA graph's replay wrote .grad): counted
  // for Apply() like one Backward() gathered. Only without a reducer and with
  // grad_accum_steps 1 (GraphedModelStep's conditions).
  void AddGraphedMicroBatch() { ++pending_; }
  // Micro-batches gathered since the last Apply().
  int pending_micro_batches() const { return pending_; }
  // The gradient's L2 norm before clipping at the last Apply() (NaN when clipping and
  // train.skip_nonfinite are off).
  double last_grad_norm() const { return last_grad_norm_; }

  // The model (under autocast when on) and the loss; the RNG is the caller's to seed (a CUDA
  // graph capture cannot seed; worker/cuda_graph_step.h).
  StepForward ModelForward(const at::Tensor& input, const at::Tensor& targets) const;

  bool autocast() const { return autocast_; }
  ClassifierImpl* model() const { return model_; }
  // The gradient all-reduce, null in one process.
  comm::Reducer* reducer() const { return reducer_; }

 private:
  const common::PipelineConfig& config_;
  const common::TrainConfig& train_;
  MelFrontend* frontend_;
  ClassifierImpl* model_;
  AdamOptimizer* optimizer_;
  comm::Reducer* reducer_;
  c10::Device device_;
  bool autocast_;
  std::vector<at::Tensor> accum_;  // per trainable parameter (grad_accum_steps > 1)
  int pending_ = 0;
  int64_t accum_samples_ = 0;  // the samples Backward gathered since the last Apply
  double last_grad_norm_ = 0;
  bool skipped_nonfinite_ = false;
};

// torch.nn.utils.clip_grad_norm_ (norm_type 2, error_if_nonfinite false) over the gradients of
// `params` (those without one are left out): returns the total norm before clipping.
double ClipGradNorm(const std::vector<at::Tensor>& params, double max_norm);
// The same without waiting for the device: the total norm as a 0-d float32 tensor on the
// gradients' device (undefined when no parameter has a gradient), to be read later.
at::Tensor ClipGradients(const std::vector<at::Tensor>& params, double max_norm);
// The L2 norm of the parameters' gradients (those defined), a 0-d float tensor on their device,
// not read; undefined when none has a gradient.
at::Tensor GradNorm(const std::vector<at::Tensor>& params);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_TRAIN_STEP_H_
