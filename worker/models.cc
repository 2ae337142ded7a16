#include "worker/models.h"

#include <cmath>

#include <torch/nn/functional/activation.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/pooling.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace aviary::worker {
namespace {

namespace nn = torch::nn;

// torchvision's _make_divisible.
int64_t MakeDivisible(double v, int64_t divisor = 8) {
  int64_t new_v = std::max<int64_t>(divisor, static_cast<int64_t>(v + divisor / 2.0) / divisor * divisor);
  if (new_v < 0.9 * v) new_v += divisor;
  return new_v;
}

// A Sequential that can nest in another (a non-templated forward).
class SeqImpl : public nn::SequentialImpl {
 public:
  using nn::SequentialImpl::SequentialImpl;
  at::Tensor forward(at::Tensor x) { return nn::SequentialImpl::forward(std::move(x)); }
};
TORCH_MODULE(Seq);

// Conv2dNormActivation: "0" conv (no bias), "1" BatchNorm, "2" SiLU when `act`.
Seq ConvBnAct(int64_t in, int64_t out, int64_t kernel, int64_t stride = 1,
                         int64_t groups = 1, bool act = true) {
  Seq seq;
  seq->push_back(nn::Conv2d(nn::Conv2dOptions(in, out, kernel)
                                .stride(stride)
                                .padding((kernel - 1) / 2)
                                .groups(groups)
                                .bias(false)));
  seq->push_back(nn::BatchNorm2d(nn::BatchNorm2dOptions(out).eps(1e-5).momentum(0.1)));
  if (act) seq->push_back(nn::SiLU());
  return seq;
}

// torchvision.ops.SqueezeExcitation with SiLU: fc1, fc2 are 1x1 convs with bias.
class SqueezeExcitationImpl : public nn::Module {
 public:
  SqueezeExcitationImpl(int64_t channels, int64_t squeeze)
      : fc1_(register_module("fc1", nn::Conv2d(nn::Conv2dOptions(channels, squeeze, 1)))),
        fc2_(register_module("fc2", nn::Conv2d(nn::Conv2dOptions(squeeze, channels, 1)))) {}
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor s = at::adaptive_avg_pool2d(x, {1, 1});
    s = fc2_->forward(at::silu(fc1_->forward(s)));
    return x * at::sigmoid(s);
  }

 private:
  nn::Conv2d fc1_;
  nn::Conv2d fc2_;
};
TORCH_MODULE(SqueezeExcitation);

// torchvision's MBConv with row-mode stochastic depth on the residual branch.
class MBConvImpl : public nn::Module {
 public:
  MBConvImpl(int64_t expand_ratio, int64_t kernel, int64_t stride, int64_t in, int64_t out,
             double stochastic_depth_prob)
      : use_residual_(stride == 1 && in == out), sd_prob_(stochastic_depth_prob) {
    Seq block;
    int64_t expanded = MakeDivisible(static_cast<double>(in * expand_ratio));
    if (expanded != in) block->push_back(ConvBnAct(in, expanded, 1));
    block->push_back(ConvBnAct(expanded, expanded, kernel, stride, expanded));
    block->push_back(SqueezeExcitation(expanded, std::max<int64_t>(1, in / 4)));
    block->push_back(ConvBnAct(expanded, out, 1, 1, 1, /*act=*/false));
    block_ = register_module("block", block);
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = block_->forward(x);
    if (!use_residual_) return y;
    if (is_training() && sd_prob_ > 0.0) {
      const double survival = 1.0 - sd_prob_;
      std::vector<int64_t> shape(y.dim(), 1);
      shape[0] = y.size(0);
      at::Tensor keep = at::empty(shape, y.options()).bernoulli_(survival).div_(survival);
      y = y * keep;
    }
    return y + x;
  }

 private:
  bool use_residual_;
  double sd_prob_;
  Seq block_{nullptr};
};
TORCH_MODULE(MBConv);

struct StageSpec {
  int64_t expand, kernel, stride, in, out, layers;
};
const StageSpec kB0Stages[] = {{1, 3, 1, 32, 16, 1},   {6, 3, 2, 16, 24, 2},
                               {6, 5, 2, 24, 40, 2},   {6, 3, 2, 40, 80, 3},
                               {6, 5, 1, 80, 112, 3},  {6, 5, 2, 112, 192, 4},
                               {6, 3, 1, 192, 320, 1}};

nn::Sequential EfficientNetFeatures(const EfficientNetScale& scale, int in_channels,
                                    int64_t* feature_dim) {
  const double sd_max = 0.2;  // torchvision's stochastic_depth_prob
  auto ch = [&](int64_t c) { return MakeDivisible(c * scale.width_mult); };
  auto depth = [&](int64_t n) {
    return static_cast<int64_t>(std::ceil(static_cast<double>(n) * scale.depth_mult));
  };
  nn::Sequential features;
  features->push_back(ConvBnAct(in_channels, ch(kB0Stages[0].in), 3, 2));
  int64_t total_blocks = 0;
  for (const auto& s : kB0Stages) total_blocks += depth(s.layers);
  int64_t block_id = 0;
  for (const auto& s : kB0Stages) {
    Seq stage;
    for (int64_t i = 0; i < depth(s.layers); ++i) {
      int64_t in = i == 0 ? ch(s.in) : ch(s.out);
      int64_t stride = i == 0 ? s.stride : 1;
      double sd = sd_max * static_cast<double>(block_id) / static_cast<double>(total_blocks);
      stage->push_back(MBConv(s.expand, s.kernel, stride, in, ch(s.out), sd));
      ++block_id;
    }
    features->push_back(stage);
  }
  int64_t last_in = ch(kB0Stages[6].out);
  *feature_dim = 4 * last_in;
  features->push_back(ConvBnAct(last_in, *feature_dim, 1));
  return features;
}

// A small CNN for CPU demos: four conv-BN-SiLU-maxpool stages.
nn::Sequential SmallCnnFeatures(int in_channels, int64_t* feature_dim) {
  nn::Sequential features;
  int64_t in = in_channels;
  for (int64_t out : {16, 32, 64, 128}) {
    Seq stage = ConvBnAct(in, out, 3);
    stage->push_back(nn::MaxPool2d(nn::MaxPool2dOptions(2)));
    features->push_back(stage);
    in = out;
  }
  *feature_dim = in;
  return features;
}

void InitLikeTorchvision(nn::Module& module) {
  torch::NoGradGuard no_grad;
  for (auto& m : module.modules(/*include_self=*/false)) {
    if (auto* conv = m->as<nn::Conv2d>()) {
      nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut);
      if (conv->bias.defined()) nn::init::zeros_(conv->bias);
    } else if (auto* bn = m->as<nn::BatchNorm2d>()) {
      nn::init::ones_(bn->weight);
      nn::init::zeros_(bn->bias);
    } else if (auto* linear = m->as<nn::Linear>()) {
      double range = 1.0 / std::sqrt(static_cast<double>(linear->weight.size(0)));
      nn::init::uniform_(linear->weight, -range, range);
      nn::init::zeros_(linear->bias);
    }
  }
}

}  // namespace

const std::vector<std::string>& ModelNames() {
  static const std::vector<std::string> kNames{"efficientnet_b0", "efficientnet_b1",
                                               "efficientnet_b2", "efficientnet_b3", "small_cnn"};
  return kNames;
}

absl::StatusOr<std::shared_ptr<ClassifierImpl>> BuildClassifier(const common::ModelConfig& config,
                                                                int in_channels, int num_classes) {
  if (num_classes < 1) {
    return absl::InvalidArgumentError(absl::StrCat("model: num_classes must be >= 1, got ", num_classes));
  }
  if (in_channels < 1) {
    return absl::InvalidArgumentError(absl::StrCat("model: in_channels must be >= 1, got ", in_channels));
  }
  std::shared_ptr<ClassifierImpl> model(new ClassifierImpl());
  model->name_ = config.name;
  model->num_classes_ = num_classes;
  model->in_channels_ = in_channels;
  model->sigmoid_ = config.final_act == "sigmoid";
  int64_t feature_dim = 0;
  static const std::pair<const char*, EfficientNetScale> kScales[] = {
      {"efficientnet_b0", {1.0, 1.0, 0.2}},
      {"efficientnet_b1", {1.0, 1.1, 0.2}},
      {"efficientnet_b2", {1.1, 1.2, 0.3}},
      {"efficientnet_b3", {1.2, 1.4, 0.3}}};
  nn::Sequential features{nullptr};
  for (const auto& [name, scale] : kScales) {
    if (config.name == name) features = EfficientNetFeatures(scale, in_channels, &feature_dim);
  }
  if (config.name == "small_cnn") features = SmallCnnFeatures(in_channels, &feature_dim);
  if (features.is_empty()) {
    return absl::InvalidArgumentError(absl::StrCat("model.name: unknown model '", config.name,
                                                   "' (expected one of ",
                                                   absl::StrJoin(ModelNames(), ", "), ")"));
  }
  model->features_ = model->register_module("features", features);
  int64_t head_in = feature_dim;
  if (config.neck_features > 0) {
    nn::Sequential neck;
    neck->push_back(nn::Linear(feature_dim, config.neck_features));
    neck->push_back(nn::SiLU());
    model->neck_ = model->register_module("neck", neck);
    head_in = config.neck_features;
  }
  nn::Sequential classifier;
  classifier->push_back(nn::Dropout(nn::DropoutOptions(config.dropout)));
  classifier->push_back(nn::Linear(head_in, num_classes));
  model->classifier_ = model->register_module("classifier", classifier);
  model->feature_dim_ = feature_dim;
  InitLikeTorchvision(*model);
  return model;
}

absl::Status PlaceModel(ClassifierImpl& model, c10::Device device, bool channels_last) {
  try {
    model.to(device);
    if (channels_last) {
      torch::NoGradGuard no_grad;
      for (at::Tensor& p : model.parameters()) {
        if (p.dim() == 4) p.set_data(p.contiguous(c10::MemoryFormat::ChannelsLast));
      }
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("moving the model ", model.name(), " to ", device.str(),
                                            ": ", e.what_without_backtrace()));
  }
  return absl::OkStatus();
}

at::Tensor ClassifierImpl::Features(const at::Tensor& x) {
  at::Tensor f = features_->forward(x);
  return at::adaptive_avg_pool2d(f, {1, 1}).flatten(1);
}

at::Tensor ClassifierImpl::forward(const at::Tensor& x) {
  at::Tensor f = Features(x);
  if (!neck_.is_empty()) f = neck_->forward(f);
  return classifier_->forward(f);
}

at::Tensor ClassifierImpl::Probabilities(const at::Tensor& logits) const {
  return sigmoid_ ? at::sigmoid(logits) : at::softmax(logits, -1);
}

}  // namespace aviary::worker
