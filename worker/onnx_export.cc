#include "worker/onnx_export.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <variant>
#include <vector>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/enum.h>
#include <torch/nn/modules/pooling.h>
#include <torch/utils.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "worker/frontend.h"

namespace aviary::worker {
namespace {

namespace nn = torch::nn;

constexpr double kPi = 3.14159265358979323846;

// One protobuf message in the wire format: fields appended in order.
class Msg {
 public:
  Msg& Varint(int field, uint64_t v) {
    Key(field, 0);
    PutVarint(v);
    return *this;
  }
  Msg& Bytes(int field, const std::string& s) {
    Key(field, 2);
    PutVarint(s.size());
    buf_ += s;
    return *this;
  }
  Msg& Float(int field, float f) {
    Key(field, 5);
    char b[4];
    std::memcpy(b, &f, 4);  // little-endian hosts (x86-64, aarch64)
    buf_.append(b, 4);
    return *this;
  }
  Msg& Sub(int field, const Msg& m) { return Bytes(field, m.buf_); }
  const std::string& str() const { return buf_; }

 private:
  void Key(int field, int wire) { PutVarint((static_cast<uint64_t>(field) << 3) | wire); }
  void PutVarint(uint64_t v) {
    while (v >= 0x80) {
      buf_ += static_cast<char>((v & 0x7f) | 0x80);
      v >>= 7;
    }
    buf_ += static_cast<char>(v);
  }
  std::string buf_;
};

// onnx.proto field numbers and enums.
enum AttrType { kAttrFloat = 1, kAttrInt = 2, kAttrString = 3, kAttrInts = 7 };
enum DataType { kFloat = 1, kInt64 = 7 };

struct Attr {
  Msg msg;
  static Attr Int(const std::string& name, int64_t v) {
    Attr a;
    a.msg.Bytes(1, name).Varint(3, static_cast<uint64_t>(v)).Varint(20, kAttrInt);
    return a;
  }
  static Attr Float(const std::string& name, float v) {
    Attr a;
    a.msg.Bytes(1, name).Float(2, v).Varint(20, kAttrFloat);
    return a;
  }
  static Attr String(const std::string& name, const std::string& v) {
    Attr a;
    a.msg.Bytes(1, name).Bytes(4, v).Varint(20, kAttrString);
    return a;
  }
  static Attr Ints(const std::string& name, const std::vector<int64_t>& v) {
    Attr a;
    a.msg.Bytes(1, name);
    for (int64_t x : v) a.msg.Varint(8, static_cast<uint64_t>(x));
    a.msg.Varint(20, kAttrInts);
    return a;
  }
};

Msg TensorProto(const std::string& name, const at::Tensor& tensor) {
  // Every initializer is FLOAT or INT64 (raw_data's length must be dims x 4 or 8 bytes): a
  // half, bfloat16 or double tensor is written as float32.
  at::Tensor t = tensor.detach().to(at::kCPU);
  if (t.scalar_type() != at::kLong) t = t.to(at::kFloat);
  t = t.contiguous();
  Msg m;
  for (int64_t d : t.sizes()) m.Varint(1, static_cast<uint64_t>(d));
  m.Varint(2, t.scalar_type() == at::kLong ? kInt64 : kFloat);
  m.Bytes(8, name);
  m.Bytes(9, std::string(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size()));
  return m;
}

// A float tensor value with dims (a number or a symbolic name).
Msg ValueInfo(const std::string& name, const std::vector<std::string>& dims) {
  Msg shape;
  for (const std::string& d : dims) {
    Msg dim;
    int64_t v = 0;
    if (!d.empty() && std::isdigit(static_cast<unsigned char>(d[0]))) {
      v = std::stoll(d);
      dim.Varint(1, static_cast<uint64_t>(v));
    } else {
      dim.Bytes(2, d);
    }
    shape.Sub(1, dim);
  }
  Msg tensor_type;
  tensor_type.Varint(1, kFloat).Sub(2, shape);
  Msg type;
  type.Sub(1, tensor_type);
  Msg info;
  info.Bytes(1, name).Sub(2, type);
  return info;
}

class Graph {
 public:
  std::string Node(const std::string& op, const std::vector<std::string>& inputs,
                   const std::vector<Attr>& attrs = {}) {
    const std::string out = absl::StrCat(op, "_", nodes_);
    Msg n;
    for (const std::string& in : inputs) n.Bytes(1, in);
    n.Bytes(2, out).Bytes(3, out).Bytes(4, op);
    for (const Attr& a : attrs) n.Sub(5, a.msg);
    graph_.Sub(1, n);
    ++nodes_;
    return out;
  }
  std::string Init(const std::string& hint, const at::Tensor& t) {
    const std::string name = absl::StrCat(hint, "_", inits_++);
    initializers_.push_back(TensorProto(name, t));
    return name;
  }
  std::string Floats(const std::vector<float>& v) {
    return Init("const", at::tensor(v, at::kFloat));
  }
  std::string Scalar(float v) { return Init("const", at::scalar_tensor(v, at::kFloat)); }
  std::string Int64s(const std::vector<int64_t>& v) { return Init("const", at::tensor(v, at::kLong)); }

  std::string Finish(const std::string& input, const std::vector<std::string>& input_dims,
                     const std::string& output_node, const std::string& output,
                     const std::vector<std::string>& output_dims, const std::string& producer_version) {
    // The last node's output under the public name.
    Msg final_node;
    final_node.Bytes(1, output_node).Bytes(2, output).Bytes(3, "output").Bytes(4, "Identity");
    Msg graph = graph_;
    graph.Sub(1, final_node);
    graph.Bytes(2, "aviary");
    for (const Msg& i : initializers_) graph.Sub(5, i);
    graph.Sub(11, ValueInfo(input, input_dims));
    graph.Sub(12, ValueInfo(output, output_dims));
    Msg opset;
    opset.Bytes(1, "").Varint(2, 17);
    Msg model;
    model.Varint(1, 8).Bytes(2, "aviary").Bytes(3, producer_version).Sub(7, graph).Sub(8, opset);
    return model.str();
  }
  int64_t nodes() const { return nodes_; }
  int64_t initializers() const { return inits_; }

 private:
  Msg graph_;
  std::vector<Msg> initializers_;
  int64_t nodes_ = 0;
  int64_t inits_ = 0;
};

std::vector<int64_t> Pair(at::IntArrayRef a) { return {a[0], a[1]}; }

// Conv2d padding as explicit numbers ({} for "same"/"valid"); ADL picks c10::visit for libtorch
// 1.13's c10::variant and std::visit for 2.x's std::variant.
template <typename Options>
std::vector<int64_t> ConvPadding(const Options& options) {
  std::vector<int64_t> pads;
  visit(
      [&pads](const auto& p) {
        using T = std::decay_t<decltype(p)>;
        if constexpr (std::is_same_v<T, torch::ExpandingArray<2>>) {
          at::IntArrayRef a = p;
          pads = {a[0], a[1], a[0], a[1]};
        }
      },
      options.padding());
  return pads;
}

class Emitter {
 public:
  explicit Emitter(Graph* g) : g_(g) {}

  absl::StatusOr<std::string> Conv(nn::Conv2dImpl& conv, nn::BatchNorm2dImpl* bn, const std::string& x,
                                   const std::string& where) {
    std::vector<int64_t> pads = ConvPadding(conv.options);
    if (pads.empty()) {
      std::string mode;
      visit([&mode](const auto& p) {
              using T = std::decay_t<decltype(p)>;
              if constexpr (std::is_same_v<T, torch::enumtype::kSame>) mode = "same";
              if constexpr (std::is_same_v<T, torch::enumtype::kValid>) mode = "valid";
            },
            conv.options.padding());
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": padding '", mode, "' (only explicit padding is supported)"));
    }
    bool zero_padded = false;
    visit([&zero_padded](const auto& mode) {
            zero_padded = std::is_same_v<std::decay_t<decltype(mode)>, torch::enumtype::kZeros>;
          },
          conv.options.padding_mode());
    if (!zero_padded) {
      // ONNX's Conv pads with zeros: a reflect or circular Conv2d would be written wrong.
      return absl::InvalidArgumentError(absl::StrCat(where, ": padding_mode '",
                                                     torch::enumtype::get_enum_name(conv.options.padding_mode()),
                                                     "' (only zeros is supported)"));
    }
    if (bn != nullptr && (!bn->options.affine() || !bn->options.track_running_stats())) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": a BatchNorm2d with affine ", bn->options.affine() ? "true" : "false", " and track_running_stats ",
          bn->options.track_running_stats() ? "true" : "false", " (only affine with running statistics is folded)"));
    }
    at::Tensor w = conv.weight.detach().to(at::kDouble);
    at::Tensor b = conv.bias.defined() ? conv.bias.detach().to(at::kDouble)
                                       : at::zeros({w.size(0)}, at::kDouble);
    if (bn != nullptr) {
      at::Tensor scale = bn->weight.detach().to(at::kDouble) /
                         at::sqrt(bn->running_var.detach().to(at::kDouble) + bn->options.eps());
      w = w * scale.view({-1, 1, 1, 1});
      b = bn->bias.detach().to(at::kDouble) + (b - bn->running_mean.detach().to(at::kDouble)) * scale;
    }
    std::string wn = g_->Init("conv_w", w.to(at::kFloat));
    std::string bn_name = g_->Init("conv_b", b.to(at::kFloat));
    return g_->Node("Conv", {x, wn, bn_name},
                    {Attr::Ints("kernel_shape", {w.size(2), w.size(3)}),
                     Attr::Ints("strides", Pair(conv.options.stride())),
                     Attr::Ints("dilations", Pair(conv.options.dilation())), Attr::Ints("pads", pads),
                     Attr::Int("group", conv.options.groups())});
  }

  std::string Silu(const std::string& x) { return g_->Node("Mul", {x, g_->Node("Sigmoid", {x})}); }

  // A Sequential's children in order, a Conv2d followed by a BatchNorm2d fused.
  absl::StatusOr<std::string> Sequential(nn::Module& seq, std::string x, const std::string& where) {
    auto children = seq.named_children();
    for (size_t i = 0; i < children.size(); ++i) {
      const std::string here = absl::StrCat(where, where.empty() ? "" : ".", children[i].key());
      nn::Module& child = *children[i].value();
      if (auto* conv = child.as<nn::Conv2d>()) {
        nn::BatchNorm2dImpl* bn = nullptr;
        if (i + 1 < children.size()) bn = children[i + 1].value()->as<nn::BatchNorm2d>();
        if (bn != nullptr) ++i;
        AVIARY_ASSIGN_OR_RETURN(x, Conv(*conv, bn, x, here));
        continue;
      }
      AVIARY_ASSIGN_OR_RETURN(x, Module(child, x, here));
    }
    return x;
  }

  absl::StatusOr<std::string> Module(nn::Module& m, const std::string& x, const std::string& where) {
    if (m.as<nn::Sequential>() != nullptr) return Sequential(m, x, where);
    if (auto* conv = m.as<nn::Conv2d>()) return Conv(*conv, nullptr, x, where);
    if (m.as<nn::SiLU>() != nullptr) return Silu(x);
    if (m.as<nn::Dropout>() != nullptr) return x;  // eval mode
    if (auto* linear = m.as<nn::Linear>()) {
      const at::Tensor bias = linear->bias.defined() ? linear->bias : at::zeros({linear->weight.size(0)});
      return g_->Node("Gemm", {x, g_->Init("linear_w", linear->weight), g_->Init("linear_b", bias)},
                      {Attr::Int("transB", 1)});
    }
    if (auto* pool = m.as<nn::MaxPool2d>()) {
      const auto& o = pool->options;
      if (o.ceil_mode() || Pair(o.dilation()) != std::vector<int64_t>{1, 1}) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": MaxPool2d with ceil_mode ",
                                                       o.ceil_mode() ? "true" : "false", " and dilation ",
                                                       absl::StrJoin(Pair(o.dilation()), "x"),
                                                       " (only ceil_mode false and dilation 1x1 are supported)"));
      }
      std::vector<int64_t> p = Pair(o.padding());
      return g_->Node("MaxPool", {x},
                      {Attr::Ints("kernel_shape", Pair(o.kernel_size())), Attr::Ints("strides", Pair(o.stride())),
                       Attr::Ints("pads", {p[0], p[1], p[0], p[1]})});
    }
    auto children = m.named_children();
    auto child = [&](const std::string& name) -> std::shared_ptr<nn::Module> {
      for (const auto& c : children) {
        if (c.key() == name) return c.value();
      }
      return nullptr;
    };
    if (children.size() == 2 && child("fc1") && child("fc2")) {  // squeeze-excitation
      std::string s = g_->Node("GlobalAveragePool", {x});
      AVIARY_ASSIGN_OR_RETURN(s, Module(*child("fc1"), s, where + ".fc1"));
      s = Silu(s);
      AVIARY_ASSIGN_OR_RETURN(s, Module(*child("fc2"), s, where + ".fc2"));
      return g_->Node("Mul", {x, g_->Node("Sigmoid", {s})});
    }
    if (children.size() == 1 && child("block")) {  // MBConv: residual when the block keeps shape
      std::vector<nn::Conv2dImpl*> convs;
      for (const auto& sub : child("block")->modules(/*include_self=*/false)) {
        if (auto* c = sub->as<nn::Conv2d>()) convs.push_back(c);
      }
      bool residual = !convs.empty() && convs.front()->options.in_channels() == convs.back()->options.out_channels();
      for (auto* c : convs) {
        at::IntArrayRef stride = c->options.stride();
        residual = residual && stride[0] == 1 && stride[1] == 1;
      }
      AVIARY_ASSIGN_OR_RETURN(std::string y, Module(*child("block"), x, where + ".block"));
      return residual ? g_->Node("Add", {y, x}) : y;
    }
    return absl::InvalidArgumentError(absl::StrCat("ONNX export: module ", where.empty() ? "(top)" : where, " (",
                                                   m.name(), ") is not supported"));
  }

 private:
  Graph* g_;
};

// The eval-mode mel front end (worker/frontend.h) from `x` [B, T] to [B, C, n_mels, frames].
absl::StatusOr<std::string> EmitFrontend(Graph& g, const common::FrontendConfig& config, int sample_rate,
                                         const std::string& x) {
  AVIARY_ASSIGN_OR_RETURN(std::unique_ptr<MelFrontend> fe,
                          MelFrontend::Create(config, common::AugmentConfig{}, sample_rate));
  AVIARY_ASSIGN_OR_RETURN(NormalizeMode normalize, ParseNormalizeMode(config.normalize));
  const int64_t n_fft = config.n_fft, n_freqs = fe->n_freqs(), pad = n_fft / 2;
  at::Tensor window = fe->window().to(at::kDouble);
  at::Tensor n = at::arange(n_fft, at::kLong);
  at::Tensor k = at::arange(n_freqs, at::kLong);
  // (k * n) mod N keeps the angle exact in integers before the double cosine.
  at::Tensor phase = at::remainder(k.unsqueeze(1) * n.unsqueeze(0), n_fft).to(at::kDouble) * (2.0 * kPi / n_fft);
  at::Tensor re = (at::cos(phase) * window.unsqueeze(0)).to(at::kFloat).unsqueeze(1);   // [F, 1, N]
  at::Tensor im = (-at::sin(phase) * window.unsqueeze(0)).to(at::kFloat).unsqueeze(1);  // [F, 1, N]

  std::string y = g.Node("Unsqueeze", {x, g.Int64s({1})});  // [B, 1, T]
  y = g.Node("Pad", {y, g.Int64s({0, 0, pad, 0, 0, pad})}, {Attr::String("mode", "reflect")});
  auto dft = [&](const at::Tensor& w) {
    return g.Node("Conv", {y, g.Init("dft", w)},
                  {Attr::Ints("kernel_shape", {n_fft}), Attr::Ints("strides", {config.hop_length})});
  };
  std::string r = dft(re), i = dft(im);
  std::string power = g.Node("Add", {g.Node("Mul", {r, r}), g.Node("Mul", {i, i})});  // [B, F, frames]
  std::string mel = g.Node("MatMul", {g.Init("mel_fb", fe->mel_filterbank().t().contiguous()), power});
  std::string db = g.Node("Mul", {g.Node("Log", {g.Node("Max", {mel, g.Scalar(1e-10f)})}),
                                  g.Scalar(static_cast<float>(10.0 / std::log(10.0)))});
  std::string top = g.Node("ReduceMax", {db}, {Attr::Ints("axes", {1, 2}), Attr::Int("keepdims", 1)});
  db = g.Node("Max", {db, g.Node("Sub", {top, g.Scalar(static_cast<float>(config.top_db))})});
  if (normalize != NormalizeMode::kNone) {
    std::vector<int64_t> axes = normalize == NormalizeMode::kPerSample ? std::vector<int64_t>{1, 2}
                                                                       : std::vector<int64_t>{0, 1, 2};
    std::string lo = g.Node("ReduceMin", {db}, {Attr::Ints("axes", axes), Attr::Int("keepdims", 1)});
    std::string hi = g.Node("ReduceMax", {db}, {Attr::Ints("axes", axes), Attr::Int("keepdims", 1)});
    std::string range = g.Node("Sub", {hi, lo});
    std::string flat = g.Node("Greater", {range, g.Scalar(0.0f)});
    std::string shifted = g.Node("Sub", {db, lo});
    std::string safe = g.Node("Where", {flat, range, g.Scalar(1.0f)});
    db = g.Node("Where", {flat, g.Node("Div", {shifted, safe}), shifted});
  }
  std::string planes = g.Node("Unsqueeze", {db, g.Int64s({1})});  // [B, 1, M, frames]
  if (config.in_channels > 1) {
    planes = g.Node("Concat", std::vector<std::string>(static_cast<size_t>(config.in_channels), planes),
                    {Attr::Int("axis", 1)});
  }
  return planes;
}

// protobuf's limit on one message (what onnx.load and onnxruntime parse).
constexpr int64_t kMaxOnnxBytes = int64_t{1} << 31;

}  // namespace

absl::StatusOr<std::string> OnnxModelBytes(ClassifierImpl& model, const common::FrontendConfig& frontend,
                                           int sample_rate, int64_t window_samples,
                                           const std::string& producer_version, OnnxGraphInfo* info) {
  if (window_samples <= frontend.n_fft / 2) {
    return absl::InvalidArgumentError(absl::StrCat("ONNX export: a window of ", window_samples,
                                                   " samples is too short for reflect padding of ",
                                                   frontend.n_fft / 2));
  }
  // One protobuf message holds at most 2 GiB, and the initializers are in it: the two DFT
  // kernels ([n_fft / 2 + 1, 1, n_fft] float each) and the weights. Said before any is made
  // (n_fft 65536 would build 17 GB of phases for a file no reader opens).
  const int64_t n_freqs = frontend.n_fft / 2 + 1;
  int64_t weight_bytes = 0;
  for (const at::Tensor& t : model.parameters()) weight_bytes += t.numel() * 4;
  for (const at::Tensor& t : model.buffers()) weight_bytes += t.numel() * 4;
  const int64_t dft_bytes = 2 * n_freqs * frontend.n_fft * 4;
  if (dft_bytes + weight_bytes >= kMaxOnnxBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ONNX export: the graph's constants would take ", dft_bytes + weight_bytes, " bytes (the DFT kernels of ",
        "frontend.n_fft ", frontend.n_fft, ": ", dft_bytes, "; the weights: ", weight_bytes,
        "), more than the 2 GiB one ONNX file holds; export --format safetensors or state_dict instead"));
  }
  torch::NoGradGuard no_grad;
  Graph g;
  const std::string input = "waveform";
  AVIARY_ASSIGN_OR_RETURN(std::string x, EmitFrontend(g, frontend, sample_rate, input));
  Emitter e(&g);
  std::shared_ptr<nn::Module> features, neck, classifier;
  for (const auto& c : model.named_children()) {
    if (c.key() == "features") features = c.value();
    if (c.key() == "neck") neck = c.value();
    if (c.key() == "classifier") classifier = c.value();
  }
  if (!features || !classifier) return absl::InternalError("ONNX export: the model has no features/classifier");
  AVIARY_ASSIGN_OR_RETURN(x, e.Module(*features, x, "features"));
  x = g.Node("Flatten", {g.Node("GlobalAveragePool", {x})}, {Attr::Int("axis", 1)});
  if (neck) {
    AVIARY_ASSIGN_OR_RETURN(x, e.Module(*neck, x, "neck"));
  }
  AVIARY_ASSIGN_OR_RETURN(x, e.Module(*classifier, x, "classifier"));
  x = model.sigmoid() ? g.Node("Sigmoid", {x}) : g.Node("Softmax", {x}, {Attr::Int("axis", -1)});
  std::string bytes = g.Finish(input, {"batch", std::to_string(window_samples)}, x, "probabilities",
                               {"batch", std::to_string(model.num_classes())}, producer_version);
  if (static_cast<int64_t>(bytes.size()) >= kMaxOnnxBytes) {
    return absl::InvalidArgumentError(absl::StrCat("ONNX export: the model is ", bytes.size(),
                                                   " bytes, more than the 2 GiB one ONNX file holds"));
  }
  if (info != nullptr) {
    info->num_nodes = g.nodes() + 1;  // and Finish's Identity
    info->num_initializers = g.initializers();
  }
  return bytes;
}

}  // namespace aviary::worker
