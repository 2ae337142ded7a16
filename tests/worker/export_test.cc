// worker/export and the torch.save writer (worker/torch_pickle): round trips through aviary's
// own readers, timm's names, and the refusals. Python's readers are checked by
// tests/parity/check_export.py.
#include "worker/export.h"

#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <vector>

#include <caffe2/serialize/inline_container.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/utils.h>

#include "absl/strings/match.h"
#include "common/backbone_fit.h"
#include "common/config.h"
#include "common/files.h"
#include "common/model_shapes.h"
#include "common/plot.h"
#include "common/utf8.h"
#include "worker/checkpoint.h"
#include "worker/ema.h"
#include "worker/models.h"
#include "worker/onnx_export.h"
#include "worker/torch_pickle.h"
#include "worker/weights.h"

namespace aviary::worker {
namespace {

std::string TempPath(const std::string& name) { return ::testing::TempDir() + "/export_test_" + name; }

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(WriteTorchSaveTensorsTest, RoundTripsThroughTheReaderWithDtypesAndShapes) {
  torch::manual_seed(1);
  NamedTensors tensors{{"a.weight", at::randn({3, 4})},
                       {"a.num_batches_tracked", at::scalar_tensor(7, at::kLong)},
                       {"b", at::randn({2, 3}).t()},  // not contiguous
                       {"c", at::arange(5, at::kInt)},
                       {"d", at::randn({1 << 17}).to(at::kDouble)},
                       {"e", at::empty({0, 3})}};
  const std::string path = TempPath("roundtrip.pt");
  ASSERT_TRUE(WriteTorchSaveTensors(tensors, path).ok());
  auto back = ReadTorchSaveTensors(path);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ((*back)[i].first, tensors[i].first);
    EXPECT_EQ((*back)[i].second.scalar_type(), tensors[i].second.scalar_type()) << tensors[i].first;
    EXPECT_TRUE(at::equal((*back)[i].second, tensors[i].second)) << tensors[i].first;
  }
}

// Two tensors of one storage key that disagree on its type or size (what torch.save never writes:
// a corrupt or hand-made file): an error naming the path and the tensor, not a view past the
// storage (torch throws out of as_strided) or a tensor of the other dtype.
TEST(ReadTorchSaveTensorsTest, AStorageClaimedWithAnotherTypeOrSizeIsAnErrorNamingTheTensor) {
  auto str = [](const std::string& v) {
    std::string s = "X";
    for (int k = 0; k < 4; ++k) s.push_back(static_cast<char>((v.size() >> (8 * k)) & 0xff));
    return s + v;
  };
  auto tensor = [&](const char* storage, int numel, int size) {
    return "ctorch._utils\n_rebuild_tensor_v2\n((" + str("storage") + "ctorch\n" + storage + "\n" + str("0") +
           str("cpu") + "K" + std::string(1, static_cast<char>(numel)) + "tQK" + std::string(1, '\0') + "(K" +
           std::string(1, static_cast<char>(size)) + "t(K\x01t\x89" "ccollections\nOrderedDict\n)RtR";
  };
  struct Case {
    std::string second;
    std::string expect;
  };
  const std::vector<Case> cases{
      {tensor("FloatStorage", 4, 4), "storage '0' is named with 2 elements of F32 and with 4 of F32"},
      {tensor("DoubleStorage", 2, 2), "storage '0' is named with 2 elements of F32 and with 2 of F64"},
  };
  const std::string path = TempPath("shared_storage.pt");
  const std::string data(16, '\0');
  for (const Case& c : cases) {
    const std::string pickle = "\x80\x02}(" + str("a") + tensor("FloatStorage", 2, 2) + str("b") + c.second + "u.";
    {
      caffe2::serialize::PyTorchStreamWriter writer(path);
      writer.writeRecord("data.pkl", pickle.data(), pickle.size());
      writer.writeRecord("data/0", data.data(), data.size());
      writer.writeEndOfFile();
    }
    auto r = ReadTorchSaveTensors(path);
    ASSERT_FALSE(r.ok()) << c.expect;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StartsWith(r.status().message(), path + ": ")) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), c.expect)) << r.status();
  }
  std::remove(path.c_str());
}

TEST(WriteTorchSaveTensorsTest, RefusesADtypeWithoutAStorageNamingTheTensor) {
  NamedTensors tensors{{"z", at::zeros({2}, at::kComplexFloat)}};
  absl::Status st = WriteTorchSaveTensors(tensors, TempPath("complex.pt"));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("tensor z"), std::string::npos) << st;
}

TEST(TimmToTorchvisionNameTest, MapsStemBlocksAndHead) {
  EXPECT_EQ(TimmToTorchvisionName("conv_stem.weight"), "features.0.0.weight");
  EXPECT_EQ(TimmToTorchvisionName("bn1.running_var"), "features.0.1.running_var");
  EXPECT_EQ(TimmToTorchvisionName("blocks.0.0.conv_dw.weight"), "features.1.0.block.0.0.weight");
  EXPECT_EQ(TimmToTorchvisionName("blocks.0.0.se.conv_expand.bias"), "features.1.0.block.1.fc2.bias");
  EXPECT_EQ(TimmToTorchvisionName("blocks.0.1.conv_pw.weight"), "features.1.1.block.2.0.weight");
  EXPECT_EQ(TimmToTorchvisionName("blocks.3.2.conv_pw.weight"), "features.4.2.block.0.0.weight");
  EXPECT_EQ(TimmToTorchvisionName("blocks.3.2.bn2.num_batches_tracked"),
            "features.4.2.block.1.1.num_batches_tracked");
  EXPECT_EQ(TimmToTorchvisionName("blocks.6.0.se.conv_reduce.weight"), "features.7.0.block.2.fc1.weight");
  EXPECT_EQ(TimmToTorchvisionName("blocks.6.0.conv_pwl.weight"), "features.7.0.block.3.0.weight");
  EXPECT_EQ(TimmToTorchvisionName("blocks.6.0.bn3.bias"), "features.7.0.block.3.1.bias");
  EXPECT_EQ(TimmToTorchvisionName("conv_head.weight"), "features.8.0.weight");
  EXPECT_EQ(TimmToTorchvisionName("bn2.weight"), "features.8.1.weight");
  EXPECT_EQ(TimmToTorchvisionName("classifier.weight"), "");
  EXPECT_EQ(TimmToTorchvisionName("blocks.7.0.conv_pw.weight"), "");
  EXPECT_EQ(TimmToTorchvisionName("blocks.1.0.conv_pwl"), "");
}

// The metadata of a one-plane, two-class small_cnn fine-tuning checkpoint written with `config`.
CheckpointMeta TwoClassSmallCnnMeta(const common::PipelineConfig& config) {
  CheckpointMeta meta;
  meta.stage = "finetune";
  meta.model_name = "small_cnn";
  meta.num_classes = 2;
  meta.in_channels = 1;
  meta.class_names = {"a", "b"};
  meta.config_yaml = common::PipelineConfigToYaml(config);
  return meta;
}

// A one-plane, two-class small_cnn of 32 mels (weights drawn with torch seed `seed`) saved as the
// checkpoint `ckpt`.
::testing::AssertionResult SaveTwoClassSmallCnn(const std::string& ckpt, int seed) {
  common::PipelineConfig config;
  config.model.name = "small_cnn";
  config.frontend.in_channels = 1;
  config.frontend.n_mels = 32;
  torch::manual_seed(seed);
  auto model = BuildClassifier(config.model, 1, 2);
  if (!model.ok()) return ::testing::AssertionFailure() << model.status();
  const absl::Status saved = SaveCheckpoint(ckpt, **model, nullptr, TwoClassSmallCnnMeta(config));
  if (!saved.ok()) return ::testing::AssertionFailure() << saved;
  return ::testing::AssertionSuccess();
}

// A checkpoint of efficientnet_b0, written as the trainer does.
std::string SaveB0(const std::string& name, common::PipelineConfig* config_out = nullptr) {
  common::PipelineConfig config;
  config.model.name = "efficientnet_b0";
  torch::manual_seed(5);
  auto model = BuildClassifier(config.model, 3, 4);
  EXPECT_TRUE(model.ok());
  CheckpointMeta meta;
  meta.stage = "finetune";
  meta.model_name = "efficientnet_b0";
  meta.num_classes = 4;
  meta.in_channels = 3;
  meta.class_names = {"a\"quote", "b", "c", "d"};
  meta.config_yaml = common::PipelineConfigToYaml(config);
  const std::string path = TempPath(name);
  EXPECT_TRUE(SaveCheckpoint(path, **model, nullptr, meta).ok());
  if (config_out) *config_out = config;
  return path;
}

TEST(ExportCheckpointTest, WritesEveryModelTensorInBothFormatsWithASidecar) {
  const std::string ckpt = SaveB0("b0.pt");
  auto expected = ReadCheckpointTensors(ckpt);
  ASSERT_TRUE(expected.ok());
  for (const char* format : {"state_dict", "safetensors"}) {
    ExportOptions o;
    o.checkpoint = ckpt;
    o.format = format;
    o.out = TempPath(std::string("b0_export.") + format);
    auto r = ExportCheckpoint(o);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->torchvision, "efficientnet_b0");
    EXPECT_EQ(r->sidecar_path, TempPath("b0_export.json"));
    auto back = ReadStateDict(o.out);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->size(), expected->size());
    std::map<std::string, at::Tensor> by_name(expected->begin(), expected->end());
    for (const auto& [name, t] : *back) {
      ASSERT_TRUE(by_name.count(name)) << name;
      EXPECT_TRUE(at::equal(by_name[name], t)) << name;
    }
    const std::string json = Slurp(r->sidecar_path);
    EXPECT_NE(json.find(R"("class_names": ["a\"quote", "b", "c", "d"])"), std::string::npos) << json;
    EXPECT_NE(json.find(R"("window_samples": 160000)"), std::string::npos) << json;
  }
}

TEST(ExportCheckpointTest, RefusesAnUnknownFormatBadOutAndNonCheckpoints) {
  const std::string ckpt = SaveB0("b0_refuse.pt");
  ExportOptions o;
  o.checkpoint = ckpt;
  o.out = TempPath("x.tflite");
  o.format = "tflite";
  EXPECT_EQ(ExportCheckpoint(o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(o.out));
  o.format = "state_dict";
  o.out = TempPath("x.json");
  EXPECT_EQ(ExportCheckpoint(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.out = TempPath("x.pt");
  o.checkpoint = TempPath("missing.pt");
  auto r = ExportCheckpoint(o);
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(o.checkpoint), std::string::npos) << r.status();
}

// A folder as --out is refused before the checkpoint is read (a caller of ExportCheckpoint that
// skipped the CLI's check found out at the rename); a checkpoint path that is not UTF-8 (a
// Latin-1 name) is written into the sidecar as U+FFFD, so the sidecar stays JSON.
TEST(ExportCheckpointTest, AFolderOutIsRefusedFirstAndTheSidecarIsUtf8) {
  ExportOptions o;
  o.checkpoint = TempPath("missing_for_folder.pt");
  o.format = "state_dict";
  o.out = TempPath("export_folder.pt");
  std::filesystem::create_directories(o.out);
  auto r = ExportCheckpoint(o);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_NE(r.status().message().find("--out " + o.out + ": is a directory"), std::string::npos) << r.status();
  const std::string latin = TempPath("b0_caf\xe9.pt");
  std::filesystem::copy_file(SaveB0("b0_latin_src.pt"), latin, std::filesystem::copy_options::overwrite_existing);
  o.checkpoint = latin;
  o.out = TempPath("b0_latin_export.pt");
  r = ExportCheckpoint(o);
  ASSERT_TRUE(r.ok()) << r.status();
  const std::string json = Slurp(r->sidecar_path);
  EXPECT_EQ(common::FirstInvalidUtf8(json), std::string::npos) << json;
  EXPECT_NE(json.find("b0_caf\xef\xbf\xbd.pt"), std::string::npos) << json;
}

// --out naming the checkpoint itself (by its path or a link) is refused before anything is read
// or written: the export used to replace the trained checkpoint with a bare state dict. A
// successful export leaves no staged file behind.
TEST(ExportCheckpointTest, RefusesToOverwriteItsCheckpointAndLeavesNoStagedFiles) {
  const std::string ckpt = SaveB0("b0_self.pt");
  const std::string before = Slurp(ckpt);
  const std::string link = TempPath("b0_self_link.pt");
  std::filesystem::remove(link);
  std::filesystem::create_symlink(ckpt, link);
  for (const std::string& out : {ckpt, link}) {
    ExportOptions o;
    o.checkpoint = ckpt;
    o.format = "state_dict";
    o.out = out;
    auto r = ExportCheckpoint(o);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << out;
    EXPECT_NE(r.status().message().find("is the checkpoint " + ckpt + " itself"), std::string::npos) << r.status();
  }
  EXPECT_EQ(Slurp(ckpt), before);
  EXPECT_FALSE(std::filesystem::exists(TempPath("b0_self.json")));
  ExportOptions o;
  o.checkpoint = ckpt;
  o.format = "safetensors";
  o.out = TempPath("b0_self_export.safetensors");
  ASSERT_TRUE(ExportCheckpoint(o).ok());
  EXPECT_TRUE(std::filesystem::exists(TempPath("b0_self_export.json")));
  for (const auto& entry : std::filesystem::directory_iterator(std::filesystem::path(o.out).parent_path())) {
    const std::string name = entry.path().filename().string();
    EXPECT_EQ(name.find("b0_self_export.safetensors.partial"), std::string::npos) << name;
    EXPECT_EQ(name.find("b0_self_export.json.partial"), std::string::npos) << name;
  }
}

// A one-plane EfficientNet's stem is [32, 1, 3, 3]: its state dict loads into torchvision's model
// once the first convolution is replaced (docs/INFERENCE.md); the result says how many planes.
TEST(ExportCheckpointTest, AOnePlaneEfficientNetSaysItsPlanes) {
  common::PipelineConfig config;
  config.model.name = "efficientnet_b0";
  config.frontend.in_channels = 1;
  torch::manual_seed(5);
  auto model = BuildClassifier(config.model, 1, 2);
  ASSERT_TRUE(model.ok());
  CheckpointMeta meta = TwoClassSmallCnnMeta(config);
  meta.model_name = "efficientnet_b0";
  const std::string ckpt = TempPath("b0_mono.pt");
  ASSERT_TRUE(SaveCheckpoint(ckpt, **model, nullptr, meta).ok());
  ExportOptions o;
  o.checkpoint = ckpt;
  o.format = "state_dict";
  o.out = TempPath("b0_mono_export.pt");
  auto r = ExportCheckpoint(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->torchvision, "efficientnet_b0");
  EXPECT_EQ(r->in_channels, 1);
}

// A reader of the protobuf wire format, from onnx.proto's field numbers (not the writer's): the
// README's test command has no onnxruntime, so the file's structure is checked here.
struct Wire {
  // field number -> its values: a varint's value, or a length-delimited field's bytes.
  std::multimap<int, uint64_t> varints;
  std::multimap<int, std::string> bytes;
};

bool ParseWire(const std::string& data, Wire* out) {
  size_t at = 0;
  auto varint = [&](uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64 && at < data.size(); shift += 7) {
      const auto byte = static_cast<unsigned char>(data[at++]);
      *v |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return false;
  };
  while (at < data.size()) {
    uint64_t key = 0, v = 0;
    if (!varint(&key)) return false;
    const int field = static_cast<int>(key >> 3), type = static_cast<int>(key & 7);
    if (type == 0) {
      if (!varint(&v)) return false;
      out->varints.emplace(field, v);
    } else if (type == 2) {
      if (!varint(&v) || v > data.size() - at) return false;
      out->bytes.emplace(field, data.substr(at, v));
      at += v;
    } else if (type == 5) {  // fixed32 (AttributeProto.f)
      if (data.size() - at < 4) return false;
      at += 4;
    } else {
      return false;
    }
  }
  return true;
}

std::vector<std::string> All(const Wire& w, int field) {
  std::vector<std::string> values;
  for (auto [it, end] = w.bytes.equal_range(field); it != end; ++it) values.push_back(it->second);
  return values;
}

std::string One(const Wire& w, int field) {
  auto it = w.bytes.find(field);
  return it == w.bytes.end() ? "" : it->second;
}

// ValueInfoProto's name and dims (a dim_value as its number, a dim_param as its name).
std::pair<std::string, std::vector<std::string>> ValueInfoOf(const std::string& bytes) {
  Wire info, type, tensor, shape;
  EXPECT_TRUE(ParseWire(bytes, &info));
  EXPECT_TRUE(ParseWire(One(info, 2), &type));   // ValueInfoProto.type
  EXPECT_TRUE(ParseWire(One(type, 1), &tensor)); // TypeProto.tensor_type
  EXPECT_EQ(tensor.varints.count(1) == 1 ? tensor.varints.find(1)->second : 0u, 1u);  // elem_type FLOAT
  EXPECT_TRUE(ParseWire(One(tensor, 2), &shape));  // TypeProto.Tensor.shape
  std::vector<std::string> dims;
  for (const std::string& d : All(shape, 1)) {
    Wire dim;
    EXPECT_TRUE(ParseWire(d, &dim));
    dims.push_back(dim.varints.count(1) ? std::to_string(dim.varints.find(1)->second) : One(dim, 2));
  }
  return {One(info, 1), dims};
}

// The ONNX file as onnx.proto reads it: IR 8 and opset 17; the graph's input and output; every
// initializer's raw bytes as many as its dims and type say; every node's inputs made before it
// (the graph's input, an initializer, an earlier node's output); the counts the command prints;
// and the sidecar without a torchvision model (an ONNX file has no state dict).
TEST(ExportCheckpointTest, TheOnnxFileIsWellFormedOnTheWire) {
  const std::string ckpt = SaveB0("b0_wire.pt");
  ExportOptions o;
  o.checkpoint = ckpt;
  o.format = "onnx";
  o.out = TempPath("b0_wire.onnx");
  auto r = ExportCheckpoint(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->torchvision, "");
  EXPECT_NE(Slurp(r->sidecar_path).find("\"torchvision\": null"), std::string::npos) << Slurp(r->sidecar_path);

  Wire model, graph, opset;
  ASSERT_TRUE(ParseWire(Slurp(o.out), &model));
  ASSERT_EQ(model.varints.count(1), 1u);
  EXPECT_EQ(model.varints.find(1)->second, 8u);  // ir_version
  ASSERT_TRUE(ParseWire(One(model, 8), &opset));  // opset_import
  EXPECT_EQ(One(opset, 1), "");
  EXPECT_EQ(opset.varints.find(2)->second, 17u);
  ASSERT_TRUE(ParseWire(One(model, 7), &graph));  // graph
  const auto input = ValueInfoOf(One(graph, 11));
  const auto output = ValueInfoOf(One(graph, 12));
  EXPECT_EQ(input.first, "waveform");
  EXPECT_EQ(input.second, (std::vector<std::string>{"batch", "160000"}));
  EXPECT_EQ(output.first, "probabilities");
  EXPECT_EQ(output.second, (std::vector<std::string>{"batch", "4"}));

  std::set<std::string> made = {input.first};
  const std::vector<std::string> initializers = All(graph, 5);
  EXPECT_EQ(static_cast<int64_t>(initializers.size()), r->num_tensors);
  for (const std::string& bytes : initializers) {
    Wire t;
    ASSERT_TRUE(ParseWire(bytes, &t));
    uint64_t elements = 1;
    for (auto [it, end] = t.varints.equal_range(1); it != end; ++it) elements *= it->second;  // dims
    ASSERT_EQ(t.varints.count(2), 1u);
    const uint64_t type = t.varints.find(2)->second;
    ASSERT_TRUE(type == 1 || type == 7) << type;  // FLOAT, INT64
    const std::string name = One(t, 8);
    EXPECT_EQ(One(t, 9).size(), elements * (type == 1 ? 4 : 8)) << name;
    EXPECT_TRUE(made.insert(name).second) << "initializer " << name << " twice";
  }
  const std::vector<std::string> nodes = All(graph, 1);
  EXPECT_EQ(static_cast<int64_t>(nodes.size()), r->onnx_nodes);
  std::string last_op, last_output;
  for (const std::string& bytes : nodes) {
    Wire n;
    ASSERT_TRUE(ParseWire(bytes, &n));
    for (const std::string& in : All(n, 1)) {
      EXPECT_TRUE(made.count(in)) << One(n, 4) << " " << One(n, 3) << " reads " << in << " before it is made";
    }
    for (const std::string& out : All(n, 2)) EXPECT_TRUE(made.insert(out).second) << out << " made twice";
    last_op = One(n, 4);
    last_output = All(n, 2).empty() ? "" : All(n, 2).back();
  }
  EXPECT_EQ(last_op, "Identity");
  EXPECT_EQ(last_output, "probabilities");
}

// A layer the writer would get wrong is refused, naming it: ONNX's Conv pads with zeros (a
// reflect-padded one), and only an affine BatchNorm with running statistics folds.
TEST(OnnxModelBytesTest, RefusesAPaddingModeAndABatchNormItCannotWrite) {
  common::PipelineConfig config;
  config.model.name = "small_cnn";
  config.frontend.in_channels = 1;
  config.frontend.n_mels = 32;
  for (const char* change : {"padding_mode", "affine"}) {
    auto model = BuildClassifier(config.model, 1, 2);
    ASSERT_TRUE(model.ok()) << model.status();
    (*model)->eval();
    for (auto& m : (*model)->modules(/*include_self=*/false)) {
      if (auto* conv = m->as<torch::nn::Conv2d>(); conv != nullptr && std::string(change) == "padding_mode") {
        conv->options.padding_mode(torch::kReflect);
        break;
      }
      if (auto* bn = m->as<torch::nn::BatchNorm2d>(); bn != nullptr && std::string(change) == "affine") {
        bn->options.affine(false);
        break;
      }
    }
    auto bytes = OnnxModelBytes(**model, config.frontend, 32000, 32000, "test", nullptr);
    EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument) << change;
    EXPECT_TRUE(absl::StrContains(bytes.status().message(), std::string(change) == "padding_mode"
                                                                ? "padding_mode 'kReflect' (only zeros is supported)"
                                                                : "a BatchNorm2d with affine false"))
        << bytes.status();
  }
}

// small_cnn's four pools need 16 frames: a window shorter than that is refused at export (the
// files loaded and failed at inference), a longer one exports.
TEST(ExportCheckpointTest, ASmallCnnWindowOfTooFewFramesIsRefused) {
  const std::string ckpt = TempPath("cnn_window.pt");
  ASSERT_TRUE(SaveTwoClassSmallCnn(ckpt, 3));
  for (const char* format : {"onnx", "safetensors"}) {
    ExportOptions o;
    o.checkpoint = ckpt;
    o.format = format;
    o.out = TempPath(std::string("cnn_window.") + format);
    std::filesystem::remove(o.out);  // an earlier run's
    o.window_s = 0.2;  // 6400 samples at 32 kHz: 1 + 6400 / 835 = 8 frames
    auto r = ExportCheckpoint(o);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << format;
    EXPECT_TRUE(absl::StrContains(r.status().message(), "--window: 0.2 s: 6400 samples make 8 frames")) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), "fewer than model small_cnn takes (16")) << r.status();
    EXPECT_FALSE(std::filesystem::exists(o.out)) << format;
    o.window_s = 0.5;  // 20 frames
    EXPECT_TRUE(ExportCheckpoint(o).ok()) << format;
  }
}

// A window the front end cannot take (torch.stft's reflect padding needs more than n_fft / 2
// samples) is refused for every format, naming --window; a folder where the sidecar goes is
// refused before the weights are written (it failed after them, beside an older sidecar).
TEST(ExportCheckpointTest, RefusesAShortWindowAndASidecarPathThatIsAFolder) {
  const std::string ckpt = SaveB0("b0_window.pt");
  for (const char* format : {"state_dict", "safetensors", "onnx"}) {
    ExportOptions o;
    o.checkpoint = ckpt;
    o.format = format;
    o.out = TempPath(std::string("b0_window.") + format);
    o.window_s = 0.01;  // 320 samples at 32 kHz; n_fft 2028 needs 1015
    auto r = ExportCheckpoint(o);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << format;
    EXPECT_TRUE(absl::StrContains(r.status().message(), "--window: 0.01 s is 320 samples at 32000 Hz")) << r.status();
    EXPECT_FALSE(std::filesystem::exists(o.out)) << format;
    // Not a whole number of samples: the sidecar's window_samples and the row ids would drift.
    o.window_s = 1.0 / 3;  // 10666.67 samples
    r = ExportCheckpoint(o);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << format;
    EXPECT_TRUE(absl::StrContains(r.status().message(), "--window: 0.33333333333333331 s is 10666.666667 samples "
                                                        "at 32000 Hz, not a whole number")) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), "take 0.33331250000000001 s (10666 samples) or "
                                                        "0.33334374999999999 s (10667 samples)")) << r.status();
    EXPECT_FALSE(std::filesystem::exists(o.out)) << format;
  }
  ExportOptions o;
  o.checkpoint = ckpt;
  o.format = "state_dict";
  o.out = TempPath("b0_folder.pt");
  std::filesystem::remove(o.out);
  std::filesystem::create_directories(TempPath("b0_folder.json"));
  auto r = ExportCheckpoint(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "--out's sidecar " + TempPath("b0_folder.json") + ": is a directory"))
      << r.status();
  EXPECT_FALSE(std::filesystem::exists(o.out));
}


// A checkpoint whose config asks the front end for another number of mel planes than its first
// convolution takes (an edited config_yaml, or a checkpoint pasted from another run): every
// format refuses it, naming the checkpoint and both counts, and writes nothing. The ONNX graph
// would otherwise feed 3 planes to a 1-channel convolution (onnxruntime fails on the first
// window) and the sidecar would tell the notebook to expand to 3 channels.
TEST(ExportCheckpointTest, RefusesAFrontendWhoseChannelsDifferFromTheFirstConvolution) {
  common::PipelineConfig config;
  config.model.name = "small_cnn";
  config.frontend.in_channels = 3;
  config.frontend.n_mels = 32;
  auto model = BuildClassifier(config.model, 1, 2);
  ASSERT_TRUE(model.ok()) << model.status();
  const CheckpointMeta meta = TwoClassSmallCnnMeta(config);
  const std::string ckpt = TempPath("channels.pt");
  ASSERT_TRUE(SaveCheckpoint(ckpt, **model, nullptr, meta).ok());
  for (const char* format : {"onnx", "state_dict", "safetensors"}) {
    ExportOptions o;
    o.checkpoint = ckpt;
    o.format = format;
    o.out = TempPath(std::string("channels_out.") + format);
    std::filesystem::remove(o.out);
    std::filesystem::remove(SidecarPath(o.out));
    auto r = ExportCheckpoint(o);
    ASSERT_FALSE(r.ok()) << format;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
    const std::string message(r.status().message());
    EXPECT_NE(message.find(ckpt), std::string::npos) << message;
    EXPECT_NE(message.find("frontend.in_channels 3"), std::string::npos) << message;
    EXPECT_NE(message.find("features.0.0.weight [16, 1, 3, 3] takes 1"), std::string::npos) << message;
    EXPECT_FALSE(std::filesystem::exists(o.out)) << format;
    EXPECT_FALSE(std::filesystem::exists(SidecarPath(o.out))) << format;
  }
}

// One ONNX file holds at most 2 GiB (a protobuf message), and its DFT kernels grow as n_fft^2: a
// front end of n_fft 32768 (4.3 GB of kernels) is refused before they are made, naming the key;
// the other formats carry no front end and export.
TEST(ExportCheckpointTest, AnOnnxGraphPastTwoGibIsRefusedNamingNfft) {
  common::PipelineConfig config;
  config.model.name = "small_cnn";
  config.frontend.in_channels = 1;
  config.frontend.n_mels = 32;
  config.frontend.n_fft = 32768;
  auto model = BuildClassifier(config.model, 1, 2);
  ASSERT_TRUE(model.ok()) << model.status();
  const std::string ckpt = TempPath("huge_nfft.pt");
  ASSERT_TRUE(SaveCheckpoint(ckpt, **model, nullptr, TwoClassSmallCnnMeta(config)).ok());
  ExportOptions o;
  o.checkpoint = ckpt;
  o.format = "onnx";
  o.out = TempPath("huge_nfft.onnx");
  std::filesystem::remove(o.out);
  auto r = ExportCheckpoint(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "the DFT kernels of frontend.n_fft 32768: 4295229440"))
      << r.status();
  EXPECT_FALSE(std::filesystem::exists(o.out));
  o.format = "safetensors";
  o.out = TempPath("huge_nfft.safetensors");
  EXPECT_TRUE(ExportCheckpoint(o).ok());
}

// With train.ema_eval a last.pt's model tensors are the raw weights and its "ema_state" the
// validated average: the export carries the average (and says so in the sidecar).
TEST(ExportCheckpointTest, ALastCheckpointOfAnEmaEvalRunExportsTheAverage) {
  common::PipelineConfig config;
  config.model.name = "small_cnn";
  config.frontend.in_channels = 1;
  config.train.ema_decay = 0.5;
  config.train.ema_eval = true;
  for (auto& [name, stage] : config.stages) stage.train = config.train;
  torch::manual_seed(3);
  auto raw = BuildClassifier(config.model, 1, 2);
  auto averaged = BuildClassifier(config.model, 1, 2);
  ASSERT_TRUE(raw.ok() && averaged.ok());
  WeightEma ema(**averaged, 0.5, 0);
  const CheckpointMeta meta = TwoClassSmallCnnMeta(config);
  const std::string ckpt = TempPath("ema_last.pt");
  ASSERT_TRUE(SaveCheckpoint(ckpt, **raw, nullptr, meta, {}, {{"ema_state", ema.ExportState()}}).ok());
  ExportOptions o;
  o.checkpoint = ckpt;
  o.format = "safetensors";
  o.out = TempPath("ema_last.safetensors");
  auto r = ExportCheckpoint(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->ema);
  EXPECT_NE(Slurp(r->sidecar_path).find(R"("ema": true)"), std::string::npos) << Slurp(r->sidecar_path);
  // The run's best.pt holds the average as its tensors (no group): its export is the average too.
  const std::string best = TempPath("ema_best.pt");
  ASSERT_TRUE(SaveCheckpoint(best, **averaged, nullptr, meta).ok());
  ExportOptions from_best = o;
  from_best.checkpoint = best;
  from_best.out = TempPath("ema_best.safetensors");
  auto rb = ExportCheckpoint(from_best);
  ASSERT_TRUE(rb.ok()) << rb.status();
  EXPECT_TRUE(rb->ema);
  EXPECT_NE(Slurp(rb->sidecar_path).find(R"("ema": true)"), std::string::npos) << Slurp(rb->sidecar_path);
  auto back = ReadStateDict(o.out);
  ASSERT_TRUE(back.ok()) << back.status();
  std::map<std::string, at::Tensor> by_name(back->begin(), back->end());
  int compared = 0;
  for (const auto& p : (*averaged)->named_parameters()) {
    ASSERT_TRUE(by_name.count(p.key())) << p.key();
    EXPECT_TRUE(at::equal(by_name[p.key()], p.value())) << p.key();
    ++compared;
  }
  EXPECT_GT(compared, 0);
}

TEST(ImportWeightsTest, RefusesAFileWithoutTheBackboneAndWritesNothing) {
  const std::string in = TempPath("not_backbone.safetensors");
  ASSERT_TRUE(WriteSafetensors({{"fc.weight", at::zeros({2, 2})}}, in).ok());
  ImportOptions o;
  o.in = in;
  o.out = TempPath("not_backbone_out.safetensors");
  auto r = ImportWeights(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("missing"), std::string::npos) << r.status();
  EXPECT_FALSE(std::filesystem::exists(o.out));
  o.model = "small_cnn";
  EXPECT_EQ(ImportWeights(o).status().code(), absl::StatusCode::kInvalidArgument);
  // --out naming --in: refused, the download stays.
  o.model = "efficientnet_b0";
  o.out = in;
  r = ImportWeights(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("is the input " + in + " itself"), std::string::npos) << r.status();
  EXPECT_TRUE(ReadStateDict(in).ok());
}

// A backbone file without BatchNorm's num_batches_tracked counters (older PyTorch, exports that
// drop them) is accepted wherever PyTorch's load_state_dict accepts it: by the submit-time rule,
// by the trainer's strict load, and by `weights import`, which writes them as zeros.
TEST(ImportWeightsTest, AFileWithoutNumBatchesTrackedIsABackbone) {
  common::ModelConfig mc;
  mc.name = "efficientnet_b0";
  torch::manual_seed(3);
  auto model = BuildClassifier(mc, 3, 1);
  ASSERT_TRUE(model.ok()) << model.status();
  NamedTensors kept;
  size_t counters = 0;
  for (const auto& p : (*model)->named_parameters(true)) {
    if (p.key().rfind("features.", 0) == 0) kept.emplace_back(p.key(), p.value().detach().clone());
  }
  for (const auto& b : (*model)->named_buffers(true)) {
    if (b.key().rfind("features.", 0) != 0) continue;
    if (common::OptionalStateTensor(b.key())) {
      ++counters;
    } else {
      kept.emplace_back(b.key(), b.value().clone());
    }
  }
  ASSERT_GT(counters, 40u);
  const std::string in = TempPath("no_counters.safetensors");
  ASSERT_TRUE(WriteSafetensors(kept, in).ok());

  auto index = common::ReadTensorIndex(in);
  ASSERT_TRUE(index.ok()) << index.status();
  auto shapes = common::BackboneShapes("efficientnet_b0", 3);
  ASSERT_TRUE(shapes.ok());
  const common::BackboneFit fit = common::CompareBackbone(*index, *shapes);
  EXPECT_TRUE(fit.ok()) << fit.Summary();

  auto fresh = BuildClassifier(mc, 3, 1);
  ASSERT_TRUE(fresh.ok());
  LoadOptions strict;
  strict.only_prefix = "features.";
  auto loaded = LoadIntoModule(kept, **fresh, strict, in);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->loaded.size(), kept.size());
  EXPECT_TRUE(loaded->missing.empty());

  ImportOptions o;
  o.in = in;
  o.out = TempPath("no_counters_out.safetensors");
  auto imported = ImportWeights(o);
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_TRUE(imported->missing.empty());
  auto back = ReadStateDict(o.out);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->size(), kept.size() + counters);
  for (const auto& [name, t] : *back) {
    if (common::OptionalStateTensor(name)) {
      EXPECT_EQ(t.item<int64_t>(), 0) << name;
    }
  }
  // Integer codes for a float weight (a quantized file) are refused, not cast into weights.
  NamedTensors codes = kept;
  codes[5].second = codes[5].second.to(at::kChar);
  const std::string quantized = TempPath("quantized.safetensors");
  ASSERT_TRUE(WriteSafetensors(codes, quantized).ok());
  ImportOptions q;
  q.in = quantized;
  q.out = TempPath("quantized_out.safetensors");
  auto refused = ImportWeights(q);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(refused.status().message(), codes[5].first + ": file Char values vs model Float"))
      << refused.status();
  EXPECT_FALSE(std::filesystem::exists(q.out));
  // Any other missing buffer is still missing.
  NamedTensors no_mean;
  for (const auto& [name, t] : kept) {
    if (name != "features.0.1.running_mean") no_mean.emplace_back(name, t);
  }
  EXPECT_FALSE(LoadIntoModule(no_mean, **fresh, strict, in).ok());
  EXPECT_FALSE(common::CompareBackbone(IndexOf(no_mean), *shapes).ok());
}

// A fresh folder under the test's temporary folder.
std::string FreshDir(const std::string& name) {
  const std::string dir = TempPath(name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// The names in `dir` that hold `part`.
std::vector<std::string> NamesWith(const std::string& dir, const std::string& part) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.find(part) != std::string::npos) names.push_back(name);
  }
  return names;
}

// The file an output link leads to, by the rule WriteOutputFileAtomically writes through with:
// relative targets from the link's folder, chains, a dangling link's target; a loop refused.
TEST(ResolveOutputPathTest, FollowsLinksToTheFileTheyEndAt) {
  const std::string dir = FreshDir("resolve");
  std::filesystem::create_directories(dir + "/real");
  EXPECT_EQ(*common::ResolveOutputPath(dir + "/plain.csv"), dir + "/plain.csv");  // absent
  std::ofstream(dir + "/real/a.csv") << "x";
  EXPECT_EQ(*common::ResolveOutputPath(dir + "/real/a.csv"), dir + "/real/a.csv");
  std::filesystem::create_symlink("real/a.csv", dir + "/rel.csv");
  EXPECT_EQ(std::filesystem::weakly_canonical(*common::ResolveOutputPath(dir + "/rel.csv")),
            std::filesystem::path(dir + "/real/a.csv"));
  std::filesystem::create_symlink(dir + "/rel.csv", dir + "/chain.csv");
  EXPECT_EQ(std::filesystem::weakly_canonical(*common::ResolveOutputPath(dir + "/chain.csv")),
            std::filesystem::path(dir + "/real/a.csv"));
  std::filesystem::create_symlink(dir + "/real/new.csv", dir + "/dangling.csv");
  EXPECT_EQ(*common::ResolveOutputPath(dir + "/dangling.csv"), dir + "/real/new.csv");
  std::filesystem::create_symlink(dir + "/loop2", dir + "/loop1");
  std::filesystem::create_symlink(dir + "/loop1", dir + "/loop2");
  EXPECT_EQ(common::ResolveOutputPath(dir + "/loop1").status().code(), absl::StatusCode::kInvalidArgument);
  // A device or a descriptor, named or linked to (/dev/stdout led to the file stdout was redirected
  // to, which the rename replaced), is refused; /dev/shm holds ordinary files.
  std::filesystem::create_symlink("/dev/stdout", dir + "/to_stdout.csv");
  for (const std::string& path : {std::string("/dev/stdout"), std::string("/proc/self/fd/2"), dir + "/to_stdout.csv"}) {
    auto refused = common::ResolveOutputPath(path);
    ASSERT_FALSE(refused.ok()) << path;
    EXPECT_THAT(std::string(refused.status().message()), ::testing::HasSubstr("a device or a descriptor")) << path;
  }
  if (std::filesystem::is_directory("/dev/shm")) {
    EXPECT_TRUE(common::ResolveOutputPath("/dev/shm/aviary_resolve_test.csv").ok());
  }
}

// --out as a symbolic link is written through, and so is the sidecar's name (OUT.json, beside the
// name given: where the notebook looks): the link's target gets the weights, the sidecar link's
// target the JSON, the links stay links and no staged file is left anywhere. (The renames
// replaced the links with files and the targets kept the old bytes.)
TEST(ExportCheckpointTest, AnOutputLinkIsWrittenThroughAndSoIsTheSidecarsName) {
  const std::string dir = FreshDir("export_link");
  const std::string ckpt = dir + "/best.pt";
  ASSERT_TRUE(SaveTwoClassSmallCnn(ckpt, 4));
  std::filesystem::create_directories(dir + "/store");
  std::filesystem::create_directories(dir + "/elsewhere");
  std::ofstream(dir + "/store/model.pt") << "old weights";
  std::ofstream(dir + "/elsewhere/side.json") << "old sidecar";
  std::filesystem::create_symlink("store/model.pt", dir + "/link.pt");
  std::filesystem::create_symlink(dir + "/elsewhere/side.json", dir + "/link.json");
  ExportOptions o;
  o.checkpoint = ckpt;
  o.format = "state_dict";
  o.window_s = 0.5;
  o.out = dir + "/link.pt";
  auto r = ExportCheckpoint(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(std::filesystem::is_symlink(dir + "/link.pt"));
  EXPECT_TRUE(std::filesystem::is_symlink(dir + "/link.json"));
  EXPECT_EQ(std::filesystem::weakly_canonical(r->weights_path), std::filesystem::path(dir + "/store/model.pt"));
  EXPECT_EQ(r->sidecar_path, dir + "/elsewhere/side.json");
  auto back = ReadStateDict(dir + "/store/model.pt");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(static_cast<int64_t>(back->size()), r->num_tensors);
  const std::string json = Slurp(dir + "/elsewhere/side.json");
  EXPECT_NE(json.find(R"("weights": "link.pt")"), std::string::npos) << json;
  EXPECT_THAT(NamesWith(dir, ".partial"), ::testing::IsEmpty());
  EXPECT_THAT(NamesWith(dir + "/store", ".partial"), ::testing::IsEmpty());
  EXPECT_THAT(NamesWith(dir + "/elsewhere", ".partial"), ::testing::IsEmpty());
  EXPECT_FALSE(std::filesystem::exists(dir + "/store/model.json"));
  // A sidecar name that is the weights file under another spelling (m.json -> ./m.pt) is refused
  // before anything is written (the JSON went over the weights).
  std::ofstream(dir + "/m.pt") << "old weights";
  std::filesystem::create_symlink("./m.pt", dir + "/m.json");
  o.out = dir + "/m.pt";
  auto same = ExportCheckpoint(o);
  ASSERT_FALSE(same.ok());
  EXPECT_THAT(std::string(same.status().message()), ::testing::HasSubstr("the JSON sidecar would overwrite the weights"));
  EXPECT_EQ(Slurp(dir + "/m.pt"), "old weights");
  // A pipe (or a device) as the output, or a link to one, is refused: the rename would replace it.
  ASSERT_EQ(::mkfifo((dir + "/pipe").c_str(), 0644), 0);
  std::filesystem::create_symlink("pipe", dir + "/to_pipe.pt");
  o.out = dir + "/to_pipe.pt";
  auto piped = ExportCheckpoint(o);
  ASSERT_FALSE(piped.ok());
  EXPECT_THAT(std::string(piped.status().message()), ::testing::HasSubstr("not a regular file"));
  EXPECT_TRUE(std::filesystem::is_fifo(dir + "/pipe"));
  // A link to the checkpoint is still the checkpoint.
  std::filesystem::create_symlink(ckpt, dir + "/to_ckpt.pt");
  o.out = dir + "/to_ckpt.pt";
  EXPECT_EQ(ExportCheckpoint(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// `weights import --out link` writes the backbone into the link's target; the link stays.
TEST(ImportWeightsTest, AnOutputLinkIsWrittenThrough) {
  common::ModelConfig mc;
  mc.name = "efficientnet_b0";
  torch::manual_seed(6);
  auto model = BuildClassifier(mc, 3, 1);
  ASSERT_TRUE(model.ok()) << model.status();
  NamedTensors backbone;
  for (const auto& p : (*model)->named_parameters(true)) {
    if (p.key().rfind("features.", 0) == 0) backbone.emplace_back(p.key(), p.value().detach().clone());
  }
  for (const auto& b : (*model)->named_buffers(true)) {
    if (b.key().rfind("features.", 0) == 0) backbone.emplace_back(b.key(), b.value().clone());
  }
  const std::string dir = FreshDir("import_link");
  ASSERT_TRUE(WriteSafetensors(backbone, dir + "/download.safetensors").ok());
  std::filesystem::create_directories(dir + "/weights");
  std::ofstream(dir + "/weights/b0.safetensors") << "old";
  std::filesystem::create_symlink("weights/b0.safetensors", dir + "/b0.safetensors");
  ImportOptions o;
  o.in = dir + "/download.safetensors";
  o.out = dir + "/b0.safetensors";
  auto r = ImportWeights(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(std::filesystem::is_symlink(o.out));
  auto back = ReadStateDict(dir + "/weights/b0.safetensors");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(static_cast<int64_t>(back->size()), r->written);
  EXPECT_THAT(NamesWith(dir, ".tmp."), ::testing::IsEmpty());
  EXPECT_THAT(NamesWith(dir + "/weights", ".tmp."), ::testing::IsEmpty());
  // A link to the input is the input.
  std::filesystem::create_symlink(o.in, dir + "/to_in.safetensors");
  o.out = dir + "/to_in.safetensors";
  EXPECT_EQ(ImportWeights(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// A PNG written to a symbolic link (`--plot link.png`) goes to the
// link's target; the link stays.
TEST(WritePngTest, ALinkIsWrittenThrough) {
  const std::string dir = FreshDir("png_link");
  std::filesystem::create_directories(dir + "/plots");
  std::ofstream(dir + "/plots/p.png") << "old";
  std::filesystem::create_symlink("plots/p.png", dir + "/p.png");
  common::Figure figure;
  figure.width = 400;
  figure.height = 300;
  common::Panel panel;
  common::Series line;
  line.x = {0, 1, 2};
  line.y = {1, 3, 2};
  panel.lines = {line};
  figure.panels = {panel};
  ASSERT_TRUE(common::WritePng(figure, dir + "/p.png").ok());
  EXPECT_TRUE(std::filesystem::is_symlink(dir + "/p.png"));
  EXPECT_EQ(Slurp(dir + "/plots/p.png").substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_THAT(NamesWith(dir, ".tmp."), ::testing::IsEmpty());
  EXPECT_THAT(NamesWith(dir + "/plots", ".tmp."), ::testing::IsEmpty());
}

}  // namespace
}  // namespace aviary::worker
