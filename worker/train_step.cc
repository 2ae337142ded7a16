#include "worker/train_step.h"

#include <cmath>
#include <limits>
#include <utility>

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
  StepInputs in = Prepare(waveforms, class_ids, seeds);
  return ModelForward(in.features, in.targets);
}

StepInputs TrainStep::Prepare(const at::Tensor& waveforms, const at::Tensor& class_ids,
                              const StepSeeds& seeds) const {
  at::Tensor x = waveforms.to(device_, /*non_blocking=*/true);
  // The one-hot targets are made on the device from the class ids, as validation does: a
  // [B, classes] float matrix copied from pageable memory (211 KB at 256 x 206) may make the
  // host wait for the stream, the previous step's backward included. On CUDA one_hot leaves the
  // ids' range to a device assert, so host ids are checked here first (B values, no sync).
  const int64_t num_classes = model_->num_classes();
  at::Tensor y;
  if (device_.is_cuda()) {
    if (class_ids.device().is_cpu() && class_ids.numel() > 0) {
      const int64_t low = class_ids.min().item<int64_t>(), high = class_ids.max().item<int64_t>();
      TORCH_CHECK(low >= 0 && high < num_classes, "class ids must be in [0, ", num_classes, "), got [", low,
                  ", ", high, "]");
    }
    y = at::one_hot(class_ids.to(device_, /*non_blocking=*/true), num_classes).to(at::kFloat);
  } else {
    y = at::one_hot(class_ids, num_classes).to(at::kFloat);
  }
  AugmentBatch(config_.augment, seeds.augment, &x, &y);
  at::Generator gen = MakeGenerator(device_, seeds.spec_augment);
  StepInputs in;
  in.features = frontend_->Forward(x, FrontendMode::kTrain, gen);
  in.targets = std::move(y);
  return in;
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
  absl::Status st = Backward(loss);
  if (!st.ok()) return st;
  Apply();
  return absl::OkStatus();
}

absl::Status TrainStep::Backward(const at::Tensor& loss, int64_t samples) {
  const int k = train_.grad_accum_steps;
  const int64_t full = train_.batch_size;
  if (samples < 0) samples = full;
  optimizer_->ZeroGrad();
  if (reducer_ != nullptr) reducer_->Prepare();
  // K = 1 keeps the loss as it is (bit-identical to runs before accumulation existed), and so
  // does a full micro-batch under K > 1 (loss / K). A short one (an epoch's last, drop_remainder
  // false) weighs its samples as a full one's: loss x samples / (K x batch_size); Apply divides
  // by the samples gathered.
  if (k <= 1) {
    loss.backward();
  } else if (samples == full) {
    (loss / static_cast<double>(k)).backward();
  } else {
    (loss * (static_cast<double>(samples) / static_cast<double>(full * k))).backward();
  }
  accum_samples_ += samples;
  if (reducer_ != nullptr) {
    absl::Status st = reducer_->Finish();
    if (!st.ok()) return st;
  }
  ++pending_;
  if (k > 1) {
    torch::NoGradGuard no_grad;
    std::vector<at::Tensor> params = model_->parameters();
    if (accum_.empty()) accum_.resize(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& g = params[i].grad();
      if (!g.defined()) continue;
      if (accum_[i].defined()) {
        accum_[i].add_(g);
      } else {
        accum_[i] = g.clone();
      }
    }
  }
  return absl::OkStatus();
}

bool TrainStep::Apply() {
  skipped_nonfinite_ = false;
  if (pending_ == 0) return false;
  const int k = train_.grad_accum_steps;
  std::vector<at::Tensor> params = model_->parameters();
  if (k > 1) {
    torch::NoGradGuard no_grad;
    // The mean over the samples gathered: K x batch_size / samples, which is K / n for n full
    // micro-batches (1 for K of them).
    const int64_t full = static_cast<int64_t>(k) * train_.batch_size;
    for (size_t i = 0; i < params.size(); ++i) {
      if (!accum_[i].defined()) {
        params[i].mutable_grad() = at::Tensor();
        continue;
      }
      if (accum_samples_ != full && accum_samples_ > 0) {
        accum_[i].mul_(static_cast<double>(full) / static_cast<double>(accum_samples_));
      }
      params[i].mutable_grad() = std::move(accum_[i]);
    }
    accum_.clear();
  }
  pending_ = 0;
  accum_samples_ = 0;
  last_grad_norm_ = std::numeric_limits<double>::quiet_NaN();
  at::Tensor norm;
  if (train_.skip_nonfinite) {
    // A finite loss can still give a non-finite gradient (backward through sqrt at 0, a bf16
    // overflow); stepped on, it makes every weight NaN on every rank. Checked on the gradients
    // the ranks share after the all-reduce (equal on every rank, so they all decide alike),
    // at the price of one wait for the device before the step.
    norm = GradNorm(params);
    const double value = norm.defined() ? norm.item<double>() : 0.0;
    if (!std::isfinite(value)) {
      for (at::Tensor& p : params) p.mutable_grad() = at::Tensor();
      skipped_nonfinite_ = true;
      last_grad_norm_ = value;
      return false;
    }
    last_grad_norm_ = value;
  }
  if (train_.grad_clip_norm > 0) norm = ClipGradients(params, train_.grad_clip_norm);
  optimizer_->Step();
  // Read after the step is queued: on a GPU the host then waits while the step runs, not before.
  if (train_.grad_clip_norm > 0) last_grad_norm_ = norm.defined() ? norm.item<double>() : 0.0;
  return true;
}

at::Tensor GradNorm(const std::vector<at::Tensor>& params) {
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> norms;
  for (const at::Tensor& p : params) {
    if (p.grad().defined()) norms.push_back(p.grad().detach().norm(2.0).to(at::kFloat));
  }
  if (norms.empty()) return at::Tensor();
  return at::stack(norms).norm(2.0);
}

at::Tensor ClipGradients(const std::vector<at::Tensor>& params, double max_norm) {
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (const at::Tensor& p : params) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  if (grads.empty()) return at::Tensor();
  at::Tensor total = GradNorm(params);
  // As torch: the factor clamped to 1 and always applied (x 1.0 changes nothing), no sync.
  const at::Tensor coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
  for (at::Tensor& g : grads) g.mul_(coef.to(g.device(), g.scalar_type()));
  return total;
}

double ClipGradNorm(const std::vector<at::Tensor>& params, double max_norm) {
  const at::Tensor total = ClipGradients(params, max_norm);
  return total.defined() ? total.item<double>() : 0.0;
}

}  // namespace aviary::worker
