// The classifiers: EfficientNet B0-B3 (torchvision's architecture and parameter names, so a
// torchvision state dict loads by name) and a small CNN for CPU demos and tests, each with the
// recipe's head: global average pooling, an optional neck (`neck_features` > 0: Linear + SiLU),
// dropout and a linear layer. The model returns logits; `final_act` (softmax or sigmoid) is
// applied by Probabilities() for metrics and inference, and the losses take logits.
//
// Parameter names: backbone `features.*` exactly as torchvision's efficientnet_bN; head
// `classifier.1.*` (torchvision's) when there is no neck, `neck.0.*` + `classifier.1.*` with one.
//
// Not thread-safe (a torch module); one per replica.
#ifndef AVIARY_WORKER_MODELS_H_
#define AVIARY_WORKER_MODELS_H_

#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>

#include "absl/status/statusor.h"
#include "common/config.h"

namespace aviary::worker {

// Width/depth multipliers of efficientnet_b0..b3 (torchvision), and torchvision's dropout for
// each (0.2, 0.2, 0.3, 0.3), kept for reference only: the head's dropout is model.dropout (0.2 by
// default) for every model, as the recipe sets it.
struct EfficientNetScale {
  double width_mult;
  double depth_mult;
  double dropout;
};

class ClassifierImpl : public torch::nn::Module {
 public:
  // [B, C, H, W] -> logits [B, num_classes].
  at::Tensor forward(const at::Tensor& x);
  // Pooled features [B, feature_dim] (before neck/dropout/classifier).
  at::Tensor Features(const at::Tensor& x);
  // Logits -> probabilities with the configured final activation.
  at::Tensor Probabilities(const at::Tensor& logits) const;

  const std::string& name() const { return name_; }
  int num_classes() const { return num_classes_; }
  int in_channels() const { return in_channels_; }
  int64_t feature_dim() const { return feature_dim_; }
  bool sigmoid() const { return sigmoid_; }

 private:
  friend absl::StatusOr<std::shared_ptr<ClassifierImpl>> BuildClassifier(
      const common::ModelConfig& config, int in_channels, int num_classes);
  ClassifierImpl() = default;

  std::string name_;
  int num_classes_ = 0;
  int in_channels_ = 3;
  int64_t feature_dim_ = 0;
  bool sigmoid_ = false;
  torch::nn::Sequential features_{nullptr};
  torch::nn::Sequential neck_{nullptr};
  torch::nn::Sequential classifier_{nullptr};
};

// Builds the model named by config.name (efficientnet_b0..b3, small_cnn) for `in_channels`
// input planes and `num_classes` outputs; randomly initialised as torchvision does
// (kaiming-normal fan_out convs, ones/zeros BatchNorm, uniform(+-1/sqrt(out)) linear).
// INVALID_ARGUMENT naming model.name for an unknown model.
absl::StatusOr<std::shared_ptr<ClassifierImpl>> BuildClassifier(const common::ModelConfig& config,
                                                                int in_channels, int num_classes);

// Moves `model` to `device`; with `channels_last`, its 4-d weights become NHWC (oneDNN's CPU
// convolutions and cuDNN's run faster on channels-last activations; the front end then
// produces its output in the same layout). INTERNAL naming the device when torch refuses.
absl::Status PlaceModel(ClassifierImpl& model, c10::Device device, bool channels_last);

// The names BuildClassifier accepts.
const std::vector<std::string>& ModelNames();

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_MODELS_H_
