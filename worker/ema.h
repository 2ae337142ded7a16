// Exponential moving average of a model's weights (train.ema_decay, ema_warmup_steps, ema_eval).
//
// After each optimizer step (the n-th update, n = 0, 1, ...):
//   d_n = ema_decay x min(1, n / ema_warmup_steps)        (d_n = ema_decay when warm-up is 0)
//   ema = d_n x ema + (1 - d_n) x param                   (every trainable parameter)
// so with a warm-up the first update copies the weights and the average then forgets the early
// weights quickly. Buffers (BatchNorm running statistics, already averages) are not averaged:
// evaluating with the EMA uses the live model's buffers, the running statistics of the raw
// weights. (torch.optim.swa_utils.AveragedModel with use_buffers=False keeps the buffers of the
// model it was built from instead; timm's ModelEma averages them.) The average lives on the
// parameters' device and dtype (float32).
//
// Data parallel: every rank applies the same averaged gradient, so every rank holds the same
// weights and the same average; nothing is communicated.
//
// State: ExportState names each average "<param>" with the module's parameter names, plus
// "__updates" (a 0-d int64 tensor, n); ImportState refuses, naming the tensor, a state that does
// not fit. last.pt stores it (group "ema_state") so a resumed run averages on exactly.
//
// Not thread-safe; one per model replica.
#ifndef AVIARY_WORKER_EMA_H_
#define AVIARY_WORKER_EMA_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/config.h"
#include "worker/weights.h"

namespace aviary::worker {

class WeightEma {
 public:
  // Starts the average at the module's current trainable parameters (copies).
  WeightEma(const torch::nn::Module& module, double decay, int64_t warmup_steps);

  // The decay of update number `n` (0-based), as in the file comment.
  double DecayAt(int64_t n) const;
  // One update from the module's current parameters (after an optimizer step).
  void Update(const torch::nn::Module& module);
  // Exchanges the module's trainable parameters with the averages (exact copies both ways):
  // called twice, the module is back where it was. Validation and best.pt run in between.
  void Swap(torch::nn::Module& module);

  int64_t updates() const { return updates_; }
  NamedTensors ExportState() const;
  // INVALID_ARGUMENT naming `source` and the tensor for a missing, extra or mis-shaped entry.
  absl::Status ImportState(const NamedTensors& state, const std::string& source);

 private:
  // The averages pair with the module's trainable parameters by position: throws (c10::Error)
  // when the module's are not the ones the average was built from (a parameter frozen or
  // unfrozen since), which would otherwise average one tensor into another.
  void CheckSameParameters(const std::vector<std::pair<std::string, at::Tensor>>& params) const;

  double decay_;
  int64_t warmup_steps_;
  int64_t updates_ = 0;
  std::vector<std::string> names_;
  std::vector<at::Tensor> averages_;
};

// The weights a checkpoint was validated with, for inference (predict, export). With the
// stage's train.ema_eval, validation, the monitor and best.pt use the average: a checkpoint
// that carries an "ema_state" group (last.pt, whose model tensors are the raw weights) gets the
// averaged parameters copied into `module` (buffers stay: the EMA does not average them). best.pt
// already holds the average as its weights and carries no group (a last.pt without the group, of
// a build before it, holds the raw weights: its optimizer state tells it). True when `module` now holds
// the average (applied from the group, or a best.pt of such a run); the errors of reading the group and of WeightEma::ImportState, naming `path`; and
// FAILED_PRECONDITION naming `path` and the first tensor when a weight or buffer to be used is
// not finite (a run that diverged: every output would be NaN, written as "nan" cells).
absl::StatusOr<bool> UseValidatedWeights(const std::string& path, const common::TrainConfig& train,
                                         torch::nn::Module& module);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_EMA_H_
