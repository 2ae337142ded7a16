#include "worker/ema.h"

#include <algorithm>
#include <map>

#include <torch/utils.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "worker/checkpoint.h"

namespace aviary::worker {
namespace {

std::vector<std::pair<std::string, at::Tensor>> Trainable(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : module.named_parameters()) {
    if (p.value().requires_grad()) out.emplace_back(p.key(), p.value());
  }
  return out;
}

constexpr char kUpdates[] = "__updates";

}  // namespace

WeightEma::WeightEma(const torch::nn::Module& module, double decay, int64_t warmup_steps)
    : decay_(decay), warmup_steps_(warmup_steps) {
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : Trainable(module)) {
    names_.push_back(name);
    averages_.push_back(p.detach().clone());
  }
}

void WeightEma::CheckSameParameters(const std::vector<std::pair<std::string, at::Tensor>>& params) const {
  TORCH_CHECK(params.size() == names_.size(), "EMA: the model has ", params.size(),
              " trainable parameters, the average ", names_.size(),
              " (a parameter frozen or unfrozen after the average began)");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].first == names_[i], "EMA: trainable parameter ", i, " is ", params[i].first,
                ", the average's is ", names_[i]);
  }
}

double WeightEma::DecayAt(int64_t n) const {
  if (warmup_steps_ <= 0) return decay_;
  return decay_ * std::min(1.0, static_cast<double>(n) / static_cast<double>(warmup_steps_));
}

void WeightEma::Update(const torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  const double d = DecayAt(updates_);
  auto params = Trainable(module);
  CheckSameParameters(params);
  for (size_t i = 0; i < averages_.size(); ++i) {
    // ema + (1 - d)(p - ema) = d ema + (1 - d) p: torch's lerp_, one kernel.
    averages_[i].lerp_(params[i].second.detach(), 1.0 - d);
  }
  ++updates_;
}

void WeightEma::Swap(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  auto params = Trainable(module);
  CheckSameParameters(params);
  for (size_t i = 0; i < averages_.size(); ++i) {
    at::Tensor held = params[i].second.detach().clone();
    params[i].second.detach().copy_(averages_[i]);
    averages_[i].copy_(held);
  }
}

NamedTensors WeightEma::ExportState() const {
  NamedTensors out;
  for (size_t i = 0; i < names_.size(); ++i) out.emplace_back(names_[i], averages_[i]);
  out.emplace_back(kUpdates, at::scalar_tensor(updates_, at::kLong));
  return out;
}

absl::Status WeightEma::ImportState(const NamedTensors& state, const std::string& source) {
  std::map<std::string, at::Tensor> by_name(state.begin(), state.end());
  auto updates = by_name.find(kUpdates);
  if (updates == by_name.end() || updates->second.numel() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": the EMA state has no '", kUpdates, "' count"));
  }
  std::vector<std::string> missing, mismatched;
  for (size_t i = 0; i < names_.size(); ++i) {
    auto it = by_name.find(names_[i]);
    if (it == by_name.end()) {
      missing.push_back(names_[i]);
    } else if (it->second.sizes() != averages_[i].sizes()) {
      mismatched.push_back(names_[i]);
    }
  }
  const size_t extra = by_name.size() - 1 - (names_.size() - missing.size());
  if (!missing.empty() || !mismatched.empty() || extra != 0) {
    auto first = [](const std::vector<std::string>& v) {
      std::vector<std::string> head(v.begin(), v.begin() + std::min<size_t>(v.size(), 3));
      return absl::StrCat(v.size(), v.empty() ? "" : absl::StrCat(" (", absl::StrJoin(head, ", "),
                                                                  v.size() > 3 ? ", ..." : "", ")"));
    };
    return absl::InvalidArgumentError(absl::StrCat(source, ": the EMA state does not fit the model: missing ",
                                                   first(missing), ", mis-shaped ", first(mismatched),
                                                   ", extra ", extra));
  }
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < names_.size(); ++i) averages_[i].copy_(by_name[names_[i]]);
  updates_ = updates->second.item<int64_t>();
  return absl::OkStatus();
}

namespace {

absl::Status CheckFinite(const torch::nn::Module& module, const std::string& path, bool ema) {
  torch::NoGradGuard no_grad;
  int bad = 0;
  std::string first;
  auto check = [&](const std::string& name, const at::Tensor& t) {
    if (!t.is_floating_point() || at::isfinite(t).all().item<bool>()) return;
    if (bad++ == 0) first = name;
  };
  for (const auto& p : module.named_parameters()) check(p.key(), p.value());
  for (const auto& b : module.named_buffers()) check(b.key(), b.value());
  if (bad == 0) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      path, ": ", bad, " of the model's tensors", ema ? " (with its EMA average)" : "", " are not finite, the first '",
      first, "': a run that diverged; every output would be NaN. Use an earlier checkpoint"));
}

}  // namespace

absl::StatusOr<bool> UseValidatedWeights(const std::string& path, const common::TrainConfig& train,
                                         torch::nn::Module& module) {
  bool applied = false;
  bool averaged = false;
  if (train.ema_eval && train.ema_decay > 0) {
    bool holds_optimizer = false;
    absl::StatusOr<NamedTensors> state = ReadCheckpointGroup(path, "ema_state", &holds_optimizer);
    if (!state.ok() && !absl::IsNotFound(state.status())) return state.status();
    if (state.ok()) {
      WeightEma ema(module, train.ema_decay, train.ema_warmup_steps);
      absl::Status imported = ema.ImportState(*state, path);
      if (!imported.ok()) return imported;
      ema.Swap(module);
      applied = true;
    }
    // Without the group: a best.pt, whose tensors are the average already; or a last.pt written
    // before the group was (its optimizer state says so), whose tensors are the raw weights.
    averaged = applied || !holds_optimizer;
  }
  AVIARY_RETURN_IF_ERROR(CheckFinite(module, path, applied));
  return averaged;
}

}  // namespace aviary::worker
