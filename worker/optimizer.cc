#include "worker/optimizer.h"

#include <cmath>
#include <map>
#include <set>
#include <tuple>

#include <torch/utils.h>
#include <torch/version.h>

#include "absl/strings/str_cat.h"

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define AVIARY_FUSED_ADAM 1
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#endif

namespace aviary::worker {

AdamOptimizer::AdamOptimizer(const torch::nn::Module& module, AdamSettings settings)
    : settings_(settings) {
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    if (!item.value().requires_grad()) continue;
    Slot slot;
    slot.name = item.key();
    slot.param = item.value();
    slots_.push_back(std::move(slot));
  }
}

absl::StatusOr<std::unique_ptr<AdamOptimizer>> AdamOptimizer::FromConfig(
    const common::TrainConfig& train, const torch::nn::Module& module) {
  if (train.optimizer != "Adam" && train.optimizer != "AdamW") {
    return absl::InvalidArgumentError(
        absl::StrCat("train.optimizer: expected Adam or AdamW, got '", train.optimizer, "'"));
  }
  AdamSettings s;
  s.lr = train.lr;
  s.weight_decay = train.weight_decay;
  s.decoupled = train.optimizer == "AdamW";
  return std::make_unique<AdamOptimizer>(module, s);
}

bool AdamOptimizer::Fused() {
#ifdef AVIARY_FUSED_ADAM
  return true;
#else
  return false;
#endif
}

void AdamOptimizer::ZeroGrad() {
  for (Slot& slot : slots_) {
    if (slot.param.grad().defined()) slot.param.mutable_grad().reset();
  }
}

// torch::optim::Adam / AdamW's per-tensor arithmetic, operation for operation.
void AdamOptimizer::StepUnfused(Slot& slot) {
  const AdamSettings& o = settings_;
  at::Tensor grad = slot.param.grad();
  const double bias_correction1 = 1 - std::pow(o.beta1, static_cast<double>(slot.step));
  const double bias_correction2 = 1 - std::pow(o.beta2, static_cast<double>(slot.step));
  if (o.weight_decay != 0) {
    if (o.decoupled) {
      slot.param.mul_(1 - o.lr * o.weight_decay);
    } else {
      grad = grad.add(slot.param, o.weight_decay);
    }
  }
  slot.exp_avg.mul_(o.beta1).add_(grad, 1 - o.beta1);
  slot.exp_avg_sq.mul_(o.beta2).addcmul_(grad, grad, 1 - o.beta2);
  at::Tensor denom = (slot.exp_avg_sq.sqrt() / std::sqrt(bias_correction2)).add_(o.eps);
  slot.param.addcdiv_(slot.exp_avg, denom, -o.lr / bias_correction1);
}

void AdamOptimizer::Step() {
  torch::NoGradGuard no_grad;
  // The fused kernel takes lists of one device and dtype, and one step tensor per parameter:
  // parameters sharing (device, dtype, step) go in one call (normally all of them).
  using Key = std::tuple<std::string, int, int64_t>;
  std::map<Key, std::vector<Slot*>> groups;
  for (Slot& slot : slots_) {
    if (!slot.param.grad().defined()) continue;
    if (!slot.exp_avg.defined()) {
      slot.exp_avg = at::zeros_like(slot.param, c10::MemoryFormat::Preserve);
      slot.exp_avg_sq = at::zeros_like(slot.param, c10::MemoryFormat::Preserve);
    }
    ++slot.step;
    if (!Fused()) {
      StepUnfused(slot);
      continue;
    }
    groups[{slot.param.device().str(), static_cast<int>(slot.param.scalar_type()), slot.step}].push_back(&slot);
  }
#ifdef AVIARY_FUSED_ADAM
  const AdamSettings& o = settings_;
  for (auto& [key, members] : groups) {
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    at::Tensor step = at::full({}, static_cast<double>(std::get<2>(key)),
                               at::TensorOptions().dtype(at::kFloat).device(members[0]->param.device()));
    for (Slot* slot : members) {
      params.push_back(slot->param);
      // The fused kernels walk parameter and gradient memory alike: same strides.
      at::Tensor g = slot->param.grad();
      if (g.strides() != slot->param.strides()) g = g.contiguous(slot->param.suggest_memory_format());
      grads.push_back(g);
      exp_avgs.push_back(slot->exp_avg);
      exp_avg_sqs.push_back(slot->exp_avg_sq);
      steps.push_back(step);
    }
    if (o.decoupled) {
      at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, o.lr,
                        o.beta1, o.beta2, o.weight_decay, o.eps, /*amsgrad=*/false, /*maximize=*/false);
    } else {
      at::_fused_adam_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, o.lr,
                       o.beta1, o.beta2, o.weight_decay, o.eps, /*amsgrad=*/false, /*maximize=*/false);
    }
  }
#endif
}

NamedTensors AdamOptimizer::ExportState() const {
  NamedTensors out;
  for (const Slot& slot : slots_) {
    if (!slot.exp_avg.defined()) continue;  // never stepped
    out.emplace_back(slot.name + ".exp_avg", slot.exp_avg);
    out.emplace_back(slot.name + ".exp_avg_sq", slot.exp_avg_sq);
    out.emplace_back(slot.name + ".step", at::scalar_tensor(slot.step, at::kLong));
  }
  return out;
}

absl::Status AdamOptimizer::ImportState(const NamedTensors& state, const std::string& source) {
  std::map<std::string, const at::Tensor*> by_name;
  for (const auto& [name, t] : state) by_name[name] = &t;
  std::set<std::string> used;
  auto bad = [&](const std::string& name, const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": optimizer state '", name, "' ", what));
  };
  std::vector<Slot> restored = slots_;
  for (Slot& slot : restored) {
    const std::string m = slot.name + ".exp_avg", v = slot.name + ".exp_avg_sq", s = slot.name + ".step";
    const bool has_m = by_name.count(m) > 0, has_v = by_name.count(v) > 0, has_s = by_name.count(s) > 0;
    if (!has_m && !has_v && !has_s) {  // a parameter that had not been stepped
      slot.exp_avg = at::Tensor();
      slot.exp_avg_sq = at::Tensor();
      slot.step = 0;
      continue;
    }
    for (const auto& [name, present] : {std::pair{m, has_m}, {v, has_v}, {s, has_s}}) {
      if (!present) return bad(name, "is missing");
      used.insert(name);
    }
    for (const std::string& name : {m, v}) {
      const at::Tensor& t = *by_name[name];
      if (t.sizes() != slot.param.sizes()) {
        return bad(name, absl::StrCat("has shape ", c10::str(t.sizes()), ", the parameter ",
                                      c10::str(slot.param.sizes())));
      }
    }
    const at::Tensor& step = *by_name[s];
    if (step.numel() != 1) return bad(s, "is not a scalar");
    slot.step = step.to(at::kLong).item<int64_t>();
    if (slot.step < 0) return bad(s, absl::StrCat("is negative (", slot.step, ")"));
    // The parameter's device, dtype and memory format (channels_last convolutions).
    auto like = [&](const at::Tensor& t) {
      return t.to(slot.param.options()).contiguous(slot.param.suggest_memory_format()).clone();
    };
    slot.exp_avg = like(*by_name[m]);
    slot.exp_avg_sq = like(*by_name[v]);
  }
  for (const auto& [name, t] : state) {
    if (!used.count(name)) return bad(name, "belongs to no trainable parameter of the model");
  }
  slots_ = std::move(restored);
  return absl::OkStatus();
}

}  // namespace aviary::worker
