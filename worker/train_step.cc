#include "worker/train_step.h"

#include <ATen/autocast_mode.h>
#include <torch/utils.h>
#include <torch/version.h>

#include "worker/augment.h"
#include "worker/comm/reducer.h"
#include "worker/loss.h"

namespace aviary::worker {

// The autocast API changed in torch 2.4 (device-type arguments); both are built in CI.
AutocastGuard::AutocastGuard(bool enabled) : enabled_(enabled) {
  if (!enabled_) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
#else
  at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
  at::autocast::set_enabled(true);
#endif
}

AutocastGuard::~AutocastGuard() {
  if (!enabled_) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  at::autocast::set_autocast_enabled(at::kCUDA, false);
#else
  at::autocast::set_enabled(false);
#endif
  at::autocast::clear_cache();
}

TrainStep::TrainStep(const common::PipelineConfig& config, const common::TrainConfig& train,
                     MelFrontend* frontend, ClassifierImpl* model,
                     AdamOptimizer* optimizer, comm::Reducer* reducer,
                     c10::Device device, bool autocast)
    : config_(config),
      train_(train),
      frontend_(frontend),
      model_(model),
      optimizer_(optimizer),
      reducer_(reducer),
      device_(device),
      autocast_(autocast) {}

StepForward TrainStep::Forward(const at::Tensor& waveforms, const at::Tensor& class_ids,
                               const StepSeeds& seeds) const {
  at::manual_seed(seeds.dropout);
  at::Tensor x = waveforms.to(device_, /*non_blocking=*/true);
  // one_hot on the host: on CUDA it would check the ids' range with a device sync.
  at::Tensor y = at::one_hot(class_ids, model_->num_classes())
                     .to(at::kFloat)
                     .to(device_, /*non_blocking=*/true);
  AugmentBatch(config_.augment, seeds.augment, &x, &y);
  at::Generator gen = MakeGenerator(device_, seeds.spec_augment);
  at::Tensor mel = frontend_->Forward(x, FrontendMode::kTrain, gen);
  return ModelForward(mel, y);
}

StepForward TrainStep::ForwardFeatures(const at::Tensor& features, const at::Tensor& targets,
                                       uint64_t dropout_seed) const {
  at::manual_seed(dropout_seed);
  return ModelForward(features, targets);
}

StepForward TrainStep::ModelForward(const at::Tensor& input, const at::Tensor& targets) const {
  StepForward out;
  {
    AutocastGuard autocast_guard(autocast_);
    out.logits = model_->forward(input);
  }
  out.loss = ComputeLoss(train_.loss, out.logits, targets, train_.label_smoothing);
  out.targets = targets;
  return out;
}

absl::Status TrainStep::Update(const at::Tensor& loss) {
  optimizer_->ZeroGrad();
  if (reducer_ != nullptr) reducer_->Prepare();
  loss.backward();
  if (reducer_ != nullptr) {
    absl::Status st = reducer_->Finish();
    if (!st.ok()) return st;
  }
  optimizer_->Step();
  return absl::OkStatus();
}

}  // namespace aviary::worker
