// Adam and AdamW for the trainer: one fused kernel per step where torch has one, and a state
// that checkpoints by parameter name, so that a last.pt resumes under any libtorch version.
//
// Step: with torch >= 2.4, torch's fused multi-tensor kernels (at::_fused_adam_ /
// _fused_adamw_, CPU and CUDA: one pass over every parameter instead of ~8 elementwise ops per
// tensor); older torch runs torch::optim::Adam's per-tensor arithmetic. The math is Adam's
// (Kingma & Ba, with bias correction; eps added outside the square root): Adam adds
// weight_decay x param to the gradient (L2), AdamW decays the parameter by lr x weight_decay
// (decoupled). Parameters without a gradient are skipped and their step count does not advance,
// as torch.optim does.
//
// State: per parameter exp_avg, exp_avg_sq (the parameter's shape, dtype and device) and its
// step count. ExportState/ImportState name them "<param>.exp_avg", "<param>.exp_avg_sq" and
// "<param>.step" (a 0-d int64 tensor), with the module's parameter names; ImportState refuses,
// naming the tensor, a state that does not fit.
//
// Not thread-safe; one per model replica.
#ifndef AVIARY_WORKER_OPTIMIZER_H_
#define AVIARY_WORKER_OPTIMIZER_H_

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/config.h"
#include "worker/weights.h"

namespace aviary::worker {

struct AdamSettings {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = false;  // AdamW
};

class AdamOptimizer {
 public:
  // The trainable parameters of `module` (requires_grad), with their names.
  AdamOptimizer(const torch::nn::Module& module, AdamSettings settings);
  // From train.optimizer ("Adam" / "AdamW"), train.lr and train.weight_decay.
  static absl::StatusOr<std::unique_ptr<AdamOptimizer>> FromConfig(
      const common::TrainConfig& train, const torch::nn::Module& module);

  // One update of every parameter that has a gradient.
  void Step();
  // Drops the gradients (set to none, as torch.optim's default).
  void ZeroGrad();

  void set_lr(double lr) { settings_.lr = lr; }
  double lr() const { return settings_.lr; }
  const AdamSettings& settings() const { return settings_; }
  // True when Step() runs torch's fused kernel.
  static bool Fused();

  // The state by name (see the file comment); copies on the CPU are not made: the tensors are
  // the optimizer's own (the checkpoint writer serializes them).
  NamedTensors ExportState() const;
  // Restores a state exported from an optimizer of the same parameters. INVALID_ARGUMENT naming
  // `source` and the tensor for a missing, extra or mis-shaped entry.
  absl::Status ImportState(const NamedTensors& state, const std::string& source);

 private:
  struct Slot {
    std::string name;
    at::Tensor param;
    at::Tensor exp_avg;     // undefined until the first step with a gradient
    at::Tensor exp_avg_sq;
    int64_t step = 0;
  };
  void StepUnfused(Slot& slot);

  AdamSettings settings_;
  std::vector<Slot> slots_;
};

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_OPTIMIZER_H_
