#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/backbone_fit.h"
#include "common/model_shapes.h"
#include "gtest/gtest.h"
#include "worker/models.h"
#include "worker/weights.h"

namespace aviary::worker {
namespace {

common::ModelConfig Config(const std::string& name, int neck = 0, const std::string& act = "softmax") {
  common::ModelConfig c;
  c.name = name;
  c.neck_features = neck;
  c.final_act = act;
  return c;
}

TEST(ModelsTest, SmallCnnShapesNeckAndActivation) {
  auto m = BuildClassifier(Config("small_cnn", 32), 3, 7);
  ASSERT_TRUE(m.ok()) << m.status();
  (*m)->eval();
  at::Tensor x = at::randn({2, 3, 128, 96});
  at::Tensor logits = (*m)->forward(x);
  EXPECT_EQ(logits.sizes(), (at::IntArrayRef{2, 7}));
  EXPECT_TRUE(at::allclose((*m)->Probabilities(logits).sum(1), at::ones({2})));
  auto s = BuildClassifier(Config("small_cnn", 0, "sigmoid"), 1, 5);
  ASSERT_TRUE(s.ok());
  at::Tensor p = (*s)->Probabilities((*s)->forward(at::randn({3, 1, 64, 64})));
  EXPECT_TRUE((p >= 0).all().item<bool>() && (p <= 1).all().item<bool>());
  EXPECT_EQ(p.sizes(), (at::IntArrayRef{3, 5}));
}

TEST(ModelsTest, EfficientNetNamesFollowTorchvision) {
  auto m = BuildClassifier(Config("efficientnet_b0"), 3, 10);
  ASSERT_TRUE(m.ok());
  auto params = (*m)->named_parameters();
  EXPECT_TRUE(params.contains("features.0.0.weight"));
  EXPECT_TRUE(params.contains("features.1.0.block.1.fc1.weight"));
  EXPECT_TRUE(params.contains("features.2.0.block.0.0.weight"));
  EXPECT_TRUE(params.contains("features.8.1.bias"));
  EXPECT_TRUE(params.contains("classifier.1.weight"));
  EXPECT_EQ((*m)->feature_dim(), 1280);
  auto b3 = BuildClassifier(Config("efficientnet_b3"), 3, 10);
  EXPECT_EQ((*b3)->feature_dim(), 1536);
}

// common::SmallestNormPlane (which the config and the trainer check batch sizes against) against
// torch itself: a training batch of one image fails in BatchNorm exactly when it says one value.
TEST(ModelsTest, SmallestNormPlaneIsWhereTorchsBatchNormRefusesOneImage) {
  const std::vector<std::pair<int64_t, int64_t>> sizes{{32, 32}, {33, 32}, {32, 33}, {17, 64}, {64, 64},
                                                       {16, 16}, {15, 40}, {24, 24}};
  for (const std::string name : {"efficientnet_b0", "efficientnet_b3", "small_cnn"}) {
    auto m = BuildClassifier(Config(name), 3, 4);
    ASSERT_TRUE(m.ok()) << m.status();
    (*m)->train();
    for (const auto& [h, w] : sizes) {
      auto plane = common::SmallestNormPlane(name, h, w);
      ASSERT_TRUE(plane.ok()) << plane.status();
      bool refused = false;
      try {
        (*m)->forward(at::randn({1, 3, h, w}));
      } catch (const c10::Error& e) {
        refused = std::string(e.what()).find("more than 1 value per channel") != std::string::npos;
        if (!refused && name == "small_cnn" && (h < 16 || w < 16)) continue;  // the pools refuse first
        EXPECT_TRUE(refused) << name << " " << h << "x" << w << ": " << e.what();
      }
      EXPECT_EQ(refused, *plane < 2) << name << " " << h << "x" << w << ": plane " << *plane;
    }
  }
  EXPECT_FALSE(common::SmallestNormPlane("resnet50", 64, 64).ok());
}

TEST(ModelsTest, UnknownModelIsNamed) {
  auto m = BuildClassifier(Config("resnet50"), 3, 10);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("model.name: unknown model 'resnet50'"), absl::string_view::npos);
}

TEST(WeightsTest, SafetensorsRoundTripAndMismatchReport) {
  auto a = BuildClassifier(Config("small_cnn"), 3, 4);
  auto b = BuildClassifier(Config("small_cnn"), 3, 6);  // another head
  ASSERT_TRUE(a.ok() && b.ok());
  NamedTensors tensors;
  for (const auto& p : (*a)->named_parameters()) tensors.emplace_back(p.key(), p.value());
  for (const auto& p : (*a)->named_buffers()) tensors.emplace_back(p.key(), p.value());
  std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_w.safetensors";
  ASSERT_TRUE(WriteSafetensors(tensors, path).ok());
  auto read = ReadStateDict(path);
  ASSERT_TRUE(read.ok()) << read.status();
  ASSERT_EQ(read->size(), tensors.size());

  // Strict loading into a model with another head fails and names the head tensors.
  auto strict = LoadIntoModule(*read, **b, LoadOptions{}, path);
  ASSERT_FALSE(strict.ok());
  EXPECT_NE(strict.status().message().find("classifier.1.weight: file [4, 128] vs model [6, 128]"),
            absl::string_view::npos) << strict.status();
  // Fine-tuning style: skip the mismatched head, load the backbone.
  LoadOptions skip;
  skip.skip_mismatched = true;
  auto loaded = LoadIntoModule(*read, **b, skip, path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->mismatched.size(), 2u);
  EXPECT_TRUE(at::equal((*b)->named_parameters()["features.0.0.weight"],
                        (*a)->named_parameters()["features.0.0.weight"]));
}

TEST(WeightsTest, MissingAndUnexpectedTensorsAreListed) {
  auto m = BuildClassifier(Config("small_cnn"), 3, 4);
  NamedTensors tensors{{"features.0.0.weight", at::zeros({16, 3, 3, 3})},
                       {"bogus.weight", at::zeros({2})}};
  auto r = LoadIntoModule(tensors, **m, LoadOptions{}, "x.pt");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("unexpected: bogus.weight"), absl::string_view::npos);
  EXPECT_NE(r.status().message().find("missing: "), absl::string_view::npos);
  // A long list is summarised: its count, the first 4 names and how many more.
  // (BatchNorm's num_batches_tracked counters may be left out, as PyTorch's load_state_dict allows.)
  size_t missing = (*m)->named_parameters().size() - 1;
  for (const auto& b : (*m)->named_buffers()) missing += !common::OptionalStateTensor(b.key());
  ASSERT_GT(missing, 4u);
  EXPECT_NE(r.status().message().find(absl::StrCat(missing, " missing: ")), absl::string_view::npos) << r.status();
  EXPECT_NE(r.status().message().find(absl::StrCat(", ... (", missing - 4, " more)")), absl::string_view::npos)
      << r.status();
  LoadOptions lax;
  lax.require_all = false;
  lax.allow_unexpected = true;
  auto ok = LoadIntoModule(tensors, **m, lax, "x.pt");
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->loaded.size(), 1u);
}

// A name twice (a safetensors header with a key twice; any reader's duplicate) is refused, even
// where unexpected and missing tensors are allowed: which of the two the model got was the
// order's accident (the last won).
TEST(WeightsTest, ATensorNamedTwiceIsRefusedNamingTheSourceAndTheName) {
  auto m = BuildClassifier(Config("small_cnn"), 3, 4);
  NamedTensors tensors{{"features.0.0.weight", at::zeros({16, 3, 3, 3})},
                       {"features.0.0.weight", at::ones({16, 3, 3, 3})}};
  LoadOptions lax;
  lax.require_all = false;
  lax.allow_unexpected = true;
  auto r = LoadIntoModule(tensors, **m, lax, "dup.safetensors");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("dup.safetensors: two tensors are named 'features.0.0.weight'"),
            absl::string_view::npos)
      << r.status();
}

TEST(WeightsTest, NonWeightFilesAreRefusedWithThePath) {
  std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_not_weights.pt";
  std::ofstream(path) << "hello";
  auto r = ReadStateDict(path);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(path), absl::string_view::npos);
  EXPECT_EQ(ReadStateDict("/nonexistent.pt").status().code(), absl::StatusCode::kNotFound);
}

// Corrupt safetensors headers are errors naming the file and the entry, never an exception out
// of the reader (yaml-cpp's on a malformed entry, torch's on a negative or wrapped-around shape
// at::empty is asked for).
TEST(WeightsTest, CorruptSafetensorsHeadersAreErrorsNamingTheEntry) {
  const std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_corrupt.safetensors";
  auto read = [&](const std::string& header, size_t data_bytes) {
    std::string bytes(8, '\0');
    const uint64_t n = header.size();
    for (int k = 0; k < 8; ++k) bytes[k] = static_cast<char>((n >> (8 * k)) & 0xff);
    bytes += header + std::string(data_bytes, '\0');
    std::ofstream(path, std::ios::binary) << bytes;
    return ReadStateDict(path);
  };
  struct Case {
    std::string header;
    size_t data_bytes;
    std::string expect;
  };
  const std::vector<Case> cases{
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8, "entry 'w' lacks dtype/shape/data_offsets"},
      {R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8, "entry 'w' lacks dtype/shape/data_offsets"},
      {R"({"w":{"dtype":"F32","shape":["two"],"data_offsets":[0,8]}})", 8,
       "entry 'w' has a dimension two that is not a JSON whole number"},
      {R"({"w":{"dtype":"F32","shape":[-2,-1],"data_offsets":[0,8]}})", 8,
       "entry 'w' has a dimension -2 that is not a JSON whole number"},
      {R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 8,
       "entry 'w' has a dimension 4611686018427387904 out of range"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551608,18446744073709551612]}})", 8,
       "entry 'w' has data_offsets"},
      // Empty, with sizes whose product no stride holds (torch threw out of the reader).
      {R"({"w":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],"data_offsets":[0,0]}})", 8,
       "entry 'w' has a dimension 4611686018427387904 out of range"},
      // Entries aliasing one range: a file's bytes copied once per entry.
      {R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
       8, "entry 'b' (bytes [4, 8)) overlaps entry 'a' (bytes [0, 8))"},
      // YAML's anchors and aliases (one entry repeated at 8 bytes a copy), which JSON has not.
      {R"({"a":&x {"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":*x})", 8, "outside a string: not JSON"},
  };
  for (const Case& c : cases) {
    auto r = read(c.header, c.data_bytes);
    ASSERT_FALSE(r.ok()) << c.header;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.header;
    EXPECT_NE(r.status().message().find(path + ": not a valid safetensors file: "), absl::string_view::npos)
        << r.status();
    EXPECT_NE(r.status().message().find(c.expect), absl::string_view::npos) << r.status();
  }
  // Entries back to back, one of them empty, read.
  auto fine = read(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0,3],)"
                   R"("data_offsets":[4,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                   8);
  ASSERT_TRUE(fine.ok()) << fine.status();
  ASSERT_EQ(fine->size(), 3u);
  EXPECT_EQ((*fine)[1].second.sizes(), (std::vector<int64_t>{0, 3}));
  std::remove(path.c_str());
}

}  // namespace
}  // namespace aviary::worker
