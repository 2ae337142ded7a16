#include "common/config.h"

#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace aviary::common {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

std::string SourcePath(const std::string& relative) {
  return absl::StrCat(AVIARY_SOURCE_DIR, "/", relative);
}

// Writes `text` to a fresh file under the test temp dir and returns its path.
std::string WriteTemp(const std::string& name, const std::string& text) {
  const std::string path = absl::StrCat(::testing::TempDir(), "/", name);
  std::ofstream(path) << text;
  return path;
}

// The error message of parsing `text` as "x.yaml" with `overrides`; "" when it parsed.
std::string ParseError(const std::string& text, const std::vector<std::string>& overrides = {}) {
  absl::StatusOr<PipelineConfig> config = ParsePipelineConfig(text, "x.yaml", overrides);
  if (config.ok()) return "";
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << config.status();
  return std::string(config.status().message());
}

TEST(ConfigTest, PipelineYamlHoldsTheDefaults) {
  const std::string path = SourcePath("configs/pipeline.yaml");
  absl::StatusOr<PipelineConfig> config = LoadPipelineConfig(path);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->source_path, path);
  const PipelineConfig defaults;
  EXPECT_TRUE(*config == defaults) << PipelineConfigToYaml(*config);
  EXPECT_EQ(PipelineConfigToYaml(*config), PipelineConfigToYaml(defaults));
  EXPECT_EQ(config->data.pretrain_sources.size(), 4u);
  EXPECT_EQ(config->data.pretrain_sources[3].layout, "xc");
  EXPECT_EQ(config->model.name, "efficientnet_b1");
  ASSERT_EQ(config->stages.size(), 2u);
  EXPECT_TRUE(config->stages.at("pretrain").enabled);
  EXPECT_TRUE(config->stages.at("finetune").train == config->train);
}

TEST(ConfigTest, DemoYamlLoads) {
  absl::StatusOr<PipelineConfig> config = LoadPipelineConfig(SourcePath("configs/demo.yaml"));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->model.name, "small_cnn");
  EXPECT_EQ(config->train.batch_size, 8);
  EXPECT_EQ(config->train.epochs, 10);
  EXPECT_EQ(config->data.cache_dir, "data/demo/.cache");
  EXPECT_EQ(config->stages.at("pretrain").train.batch_size, 8);
  EXPECT_EQ(config->folds.pretrain_splits, 5);
  EXPECT_EQ(config->folds.finetune_splits, 3);
  EXPECT_EQ(config->sampling.upsample_thr, 8);
  EXPECT_EQ(config->sampling.downsample_thr, 60);
  EXPECT_EQ(config->data.duration, 5.0);
  EXPECT_EQ(config->data.target.root, "data/demo/birdclef-2024");
  ASSERT_EQ(config->data.pretrain_sources.size(), 4u);
  EXPECT_EQ(config->data.pretrain_sources[3].root, "data/demo/xeno-canto-extended");
}

TEST(ConfigTest, EmptyTextGivesDefaults) {
  absl::StatusOr<PipelineConfig> config = ParsePipelineConfig("# nothing\n", "<string>");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(*config == PipelineConfig{});
  EXPECT_EQ(config->source_path, "<string>");
}

TEST(ConfigTest, AbsentKeysKeepDefaults) {
  absl::StatusOr<PipelineConfig> config = ParsePipelineConfig(
      "train:\n  batch_size: 64\ndata:\n  target: {root: /t}\naugment:\n", "<string>");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->train.batch_size, 64);
  EXPECT_EQ(config->train.epochs, 25);
  EXPECT_EQ(config->data.target.layout, "2024");
  EXPECT_EQ(config->data.target.root, "/t");
  EXPECT_TRUE(config->augment == AugmentConfig{});
  EXPECT_EQ(config->stages.at("pretrain").train.batch_size, 64);
}

TEST(ConfigTest, UnknownKeySuggestsTheClosest) {
  const std::string text =
      "seed: 1\n"
      "train:\n"
      "  batch_size: 8\n"
      "  bach_size: 8\n";
  EXPECT_EQ(ParseError(text),
            "x.yaml:4: unknown key 'train.bach_size' (did you mean 'train.batch_size'?)");
}

TEST(ConfigTest, UnknownKeySuggestsAnotherSection) {
  EXPECT_THAT(ParseError("train:\n  sample_rate: 16000\n"),
              AllOf(HasSubstr("x.yaml:2: unknown key 'train.sample_rate'"),
                    HasSubstr("did you mean 'data.sample_rate'?")));
}

TEST(ConfigTest, UnknownKeyWithoutSuggestionListsTheKnownOnes) {
  EXPECT_THAT(ParseError("comm:\n  zzzzzzzz: 1\n"),
              AllOf(HasSubstr("x.yaml:2: unknown key 'comm.zzzzzzzz'"),
                    HasSubstr("expected one of backend, bucket_mb, timeout_s")));
}

TEST(ConfigTest, WrongTypeNamesFileLineKeyAndValue) {
  const std::string text =
      "seed: 1\n"
      "debug: false\n"
      "train:\n"
      "  epochs: 3\n"
      "  batch_size: abc\n";
  EXPECT_EQ(ParseError(text), "x.yaml:5: key 'train.batch_size': expected an integer, got 'abc'");
  EXPECT_EQ(ParseError("train:\n  lr: fast\n"),
            "x.yaml:2: key 'train.lr': expected a finite decimal number, got 'fast'");
  EXPECT_EQ(ParseError("debug: maybe\n"),
            "x.yaml:1: key 'debug': expected true or false, got 'maybe'");
  EXPECT_THAT(ParseError("folds:\n  selected_folds: [0, x]\n"),
              HasSubstr("x.yaml:2: key 'folds.selected_folds.1': expected an integer, got 'x'"));
  EXPECT_THAT(ParseError("train:\n  epochs: 99999999999\n"),
              HasSubstr("key 'train.epochs': expected an integer in ["));
}

// Booleans read as PyYAML and the coordinator config read them: true/false, yes/no, on/off in
// lower, Title or UPPER case; yaml-cpp's y/n and other cases (strings to PyYAML) are refused.
TEST(ConfigTest, BooleansReadAsPyYamlReadsThem) {
  for (const char* yes : {"true", "True", "TRUE", "yes", "Yes", "on", "ON"}) {
    auto config = ParsePipelineConfig(absl::StrCat("debug: ", yes, "\n"), "x.yaml");
    ASSERT_TRUE(config.ok()) << yes << ": " << config.status();
    EXPECT_TRUE(config->debug) << yes;
  }
  for (const char* no : {"false", "False", "no", "NO", "off", "Off"}) {
    auto config = ParsePipelineConfig(absl::StrCat("debug: true\nfolds:\n  cv_filter: ", no, "\n"), "x.yaml");
    ASSERT_TRUE(config.ok()) << no << ": " << config.status();
    EXPECT_FALSE(config->folds.cv_filter) << no;
  }
  EXPECT_EQ(ParseError("debug: y\n"), "x.yaml:1: key 'debug': expected true or false, got 'y'");
  EXPECT_EQ(ParseError("folds:\n  cv_filter: N\n"), "x.yaml:2: key 'folds.cv_filter': expected true or false, got 'N'");
  EXPECT_EQ(ParseError("debug: 1\n"), "x.yaml:1: key 'debug': expected true or false, got '1'");
  EXPECT_EQ(ParseError("debug: tRuE\n"), "x.yaml:1: key 'debug': expected true or false, got 'tRuE'");
}

// Numbers and booleans are read as PyYAML reads the same file: a quoted or !!str scalar is a
// string (a Python reader takes "false" for true), a hex float and 010 are not the decimal
// numbers they look like (PyYAML: a string, and octal 8).
TEST(ConfigTest, QuotedAndNonDecimalNumbersAreRefused) {
  EXPECT_EQ(ParseError("train:\n  batch_size: \"32\"\n"),
            "x.yaml:2: key 'train.batch_size': expected an integer, not a quoted or tagged string, got '32'");
  EXPECT_EQ(ParseError("train:\n  batch_size: !!str 16\n"),
            "x.yaml:2: key 'train.batch_size': expected an integer, not a quoted or tagged string, got '16'");
  EXPECT_EQ(ParseError("seed: '7'\n"), "x.yaml:1: key 'seed': expected an integer, not a quoted or tagged string, got '7'");
  EXPECT_EQ(ParseError("debug: \"false\"\n"),
            "x.yaml:1: key 'debug': expected true or false, not a quoted or tagged string, got 'false'");
  EXPECT_EQ(ParseError("train:\n  lr: \"0.001\"\n"),
            "x.yaml:2: key 'train.lr': expected a number, not a quoted or tagged string, got '0.001'");
  EXPECT_EQ(ParseError("train:\n  lr: 0x1p-3\n"),
            "x.yaml:2: key 'train.lr': expected a finite decimal number, got '0x1p-3'");
  EXPECT_EQ(ParseError("train:\n  lr: 0x10\n"), "x.yaml:2: key 'train.lr': expected a finite decimal number, got '0x10'");
  for (const char* tag : {"!!null", "!!binary", "!!timestamp", "!local"}) {
    EXPECT_THAT(ParseError(absl::StrCat("train:\n  batch_size: ", tag, " 32\n")), HasSubstr("not a quoted or tagged"))
        << tag;
  }
  EXPECT_EQ(ParseError("data:\n  duration: 010\n"),
            "x.yaml:2: key 'data.duration': expected a number without a leading zero (YAML 1.1 reads 010 as octal 8), "
            "got '010'");
  // What is a number stays one: a core tag, signs, a leading point, exponents, 0.5 and 0.
  auto config = ParsePipelineConfig(
      "train:\n  batch_size: !!int 16\n  lr: .5e-3\n  lr_min: 0\n  weight_decay: +1E-2\n  lr_start: 0.000001\n"
      "debug: !!bool true\n",
      "x.yaml");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->train.batch_size, 16);
  EXPECT_DOUBLE_EQ(config->train.lr, 0.0005);
  EXPECT_DOUBLE_EQ(config->train.weight_decay, 0.01);
  EXPECT_TRUE(config->debug);
  for (const char* bad : {"1.", "-", ".", "1e", "1e+", "1.5.2", " 1", "1 ", "1_0"}) {
    EXPECT_THAT(ParseError(absl::StrCat("train:\n  lr: '", bad, "'\n")), HasSubstr("not a quoted")) << bad;
    const std::string plain = ParseError(absl::StrCat("train:\n  lr: ", bad, "\n"));
    // 1. is a number; spaces around a plain scalar are YAML's own; a plain "-" is a list item.
    if (std::string(bad) == "1." || std::string(bad) == " 1" || std::string(bad) == "1 " || std::string(bad) == "-") {
      continue;
    }
    EXPECT_THAT(plain, HasSubstr("expected a finite decimal number")) << bad;
  }
}

// A string key's control characters (DEL, C1 such as YAML's "\N", U+2028) are refused as the C0
// ones are; a path of spaces is no path; messages show an escape's bytes escaped and a long
// unknown key cut.
TEST(ConfigTest, ControlCharactersBlankPathsAndShownValues) {
  for (const char* escape : {"\\x7f", "\\x85", "\\L", "\\P", "\\u2028"}) {
    EXPECT_THAT(ParseError(absl::StrCat("data:\n  target:\n    root: \"/data", escape, "x\"\n")),
                HasSubstr("key 'data.target.root': expected a string without control characters"))
        << escape;
  }
  EXPECT_THAT(ParseError("data:\n  target:\n    root: \"/data\\Nx\"\n"),
              HasSubstr("key 'data.target.root': expected UTF-8 text, got byte 0x85 at 5"));
  auto accented = ParsePipelineConfig("data:\n  target:\n    root: \"/data/\u00e9t\u00e9 \u0100\"\n", "x.yaml");
  ASSERT_TRUE(accented.ok()) << accented.status();
  EXPECT_EQ(accented->data.target.root, "/data/\u00e9t\u00e9 \u0100");
  EXPECT_THAT(ParseError("data:\n  target:\n    root: ' '\n"),
              HasSubstr("key 'data.target.root': expected a non-empty path"));
  EXPECT_EQ(ParseError("train:\n  lr: \"\\e[2J\"\n"),
            "x.yaml:2: key 'train.lr': expected a number, not a quoted or tagged string, got '\\x1b[2J'");
  const std::string message = ParseError(absl::StrCat("train:\n  ", std::string(1000, 'k'), ": 1\n"));
  EXPECT_THAT(message, HasSubstr("unknown key 'train.kkkk"));
  EXPECT_THAT(message, HasSubstr("...' (1006 bytes)"));
  EXPECT_LT(message.size(), 2000u) << message.size();
}

// CheckBeforeRun names a stage it does not know (it checked the top level's train.* instead).
TEST(ConfigTest, CheckBeforeRunRefusesAnUnknownStage) {
  auto config = ParsePipelineConfig("", "x.yaml");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(CheckBeforeRun(*config, "x.yaml", "finetune").ok());
  const absl::Status st = CheckBeforeRun(*config, "x.yaml", "distill");
  EXPECT_EQ(st.message(), "x.yaml: unknown stage 'distill' (expected one of pretrain, finetune)") << st;
}

// A config file is read up to kMaxConfigBytes: a path given by mistake is refused, not read.
TEST(ConfigTest, AConfigFileOverTheCapIsRefused) {
  const std::string path = WriteTemp("big.yaml", absl::StrCat("# ", std::string(kMaxConfigBytes, 'x'), "\n"));
  absl::StatusOr<PipelineConfig> config = LoadPipelineConfig(path);
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(), HasSubstr(path + ": larger than 4194304 bytes"));
  config = LoadPipelineConfig("/dev/zero");
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(config.status().message(), HasSubstr("/dev/zero: larger than"));
}

TEST(ConfigTest, WrongNodeKindIsAnError) {
  EXPECT_EQ(ParseError("train: 5\n"), "x.yaml:1: key 'train': expected a map, got '5'");
  EXPECT_EQ(ParseError("data:\n  target: [a, b]\n"),
            "x.yaml:2: key 'data.target': expected a map, got a list");
  EXPECT_EQ(ParseError("model:\n  name: {a: 1}\n"),
            "x.yaml:2: key 'model.name': expected a string, got a map");
  EXPECT_EQ(ParseError("folds:\n  selected_folds: 0\n"),
            "x.yaml:2: key 'folds.selected_folds': expected a list of integers, got '0'");
  EXPECT_THAT(ParseError("- a\n- b\n"),
              HasSubstr("x.yaml:1: expected a map of sections at the top level, got a list"));
}

TEST(ConfigTest, DuplicateKeyIsAnError) {
  EXPECT_EQ(ParseError("train:\n  lr: 0.1\n  lr: 0.2\n"),
            "x.yaml:3: duplicate key 'train.lr' (first set at x.yaml:2)");
}

// Issue 14: numeric keys have upper bounds, so that a job cannot be absurd.
TEST(ConfigTest, NumericKeysHaveUpperBounds) {
  EXPECT_EQ(ParseError("train:\n  epochs: 2147483647\n"),
            "x.yaml:2: key 'train.epochs': expected an integer in [1, 10000], got '2147483647'");
  EXPECT_EQ(ParseError("stages:\n  pretrain:\n    epochs: 10001\n"),
            "x.yaml:3: key 'stages.pretrain.epochs': expected an integer in [1, 10000], got '10001'");
  EXPECT_EQ(ParseError("train:\n  batch_size: 65537\n"),
            "x.yaml:2: key 'train.batch_size': expected an integer in [1, 65536], got '65537'");
  EXPECT_EQ(ParseError("train:\n  num_workers: 100000\n"),
            "x.yaml:2: key 'train.num_workers': expected an integer in [1, 256], got '100000'");
  EXPECT_EQ(ParseError("folds:\n  finetune_splits: 1001\n"),
            "x.yaml:2: key 'folds.finetune_splits': expected an integer in [2, 1000], got '1001'");
  EXPECT_EQ(ParseError("data:\n  sample_rate: 1000000\n"),
            "x.yaml:2: key 'data.sample_rate': expected an integer in [1, 384000], got '1000000'");
  EXPECT_EQ(ParseError("data:\n  duration: 601\n"),
            "x.yaml:2: key 'data.duration': expected a number in (0, 600], got '601.0'");
  EXPECT_EQ(ParseError("frontend:\n  n_mels: 4096\n"),
            "x.yaml:2: key 'frontend.n_mels': expected an integer in [1, 1024], got '4096'");
  EXPECT_EQ(ParseError("train:\n  lr: 1000\n"),
            "x.yaml:2: key 'train.lr': expected a number in (0, 100], got '1000.0'");
  EXPECT_EQ(ParseError("comm:\n  timeout_s: 1e9\n"),
            "x.yaml:2: key 'comm.timeout_s': expected a number in [1, 86400], got '1000000000.0'");
  EXPECT_EQ(ParseError("comm:\n  timeout_s: 0.001\n"),
            "x.yaml:2: key 'comm.timeout_s': expected a number in [1, 86400], got '0.001'");
  // A YAML escape that makes a control character: a NUL cut every path at it.
  EXPECT_EQ(ParseError("data:\n  cache_dir: \"/data/c\\0x\"\n"),
            "x.yaml:2: key 'data.cache_dir': expected a string without control characters (a YAML escape such as "
            "\\0, \\n or \\N), got '/data/c\\x00x'");
  // Beyond int's range (and int64's) the message still gives the key's own range.
  EXPECT_EQ(ParseError("train:\n  epochs: 99999999999\n"),
            "x.yaml:2: key 'train.epochs': expected an integer in [1, 10000], got '99999999999'");
  EXPECT_EQ(ParseError("stages:\n  finetune:\n    batch_size: -99999999999999999999\n"),
            "x.yaml:3: key 'stages.finetune.batch_size': expected an integer in [1, 65536], "
            "got '-99999999999999999999'");
  EXPECT_EQ(ParseError("", {"frontend.n_mels=2147483648"}),
            "--set frontend.n_mels=2147483648: key 'frontend.n_mels': expected an integer in [1, 1024], "
            "got '2147483648'");
  EXPECT_EQ(ParseError("train:\n  epochs: 1e3\n"), "x.yaml:2: key 'train.epochs': expected an integer, got '1e3'");
  // A leading zero: octal 8 to PyYAML and yaml-cpp's as<int>, 10 to a decimal reading.
  EXPECT_EQ(ParseError("seed: 010\n"),
            "x.yaml:1: key 'seed': expected an integer without a leading zero (YAML 1.1 reads 010 as octal 8), got '010'");
  EXPECT_THAT(ParseError("train:\n  epochs: 07\n"), HasSubstr("x.yaml:2: key 'train.epochs': expected an integer "
                                                              "without a leading zero"));
  EXPECT_EQ(ParseError("seed: 0\n"), "");
  // A long value is shown cut (a message goes back to a client in a gRPC status).
  const std::string long_error = ParseError("train:\n  epochs: " + std::string(20000, 'a') + "\n");
  EXPECT_LT(long_error.size(), 400u) << long_error.size();
  EXPECT_THAT(long_error, HasSubstr("...' (20000 bytes)"));
  // The bounds themselves are accepted.
  EXPECT_EQ(ParseError("train:\n  epochs: 10000\n  batch_size: 65536\n  num_workers: 256\n"), "");
}

TEST(ConfigTest, OutOfRangeValues) {
  EXPECT_EQ(ParseError("train:\n  batch_size: 0\n"),
            "x.yaml:2: key 'train.batch_size': expected an integer in [1, 65536], got '0'");
  EXPECT_EQ(ParseError("\nfolds:\n  finetune_splits: 1\n"),
            "x.yaml:3: key 'folds.finetune_splits': expected an integer in [2, 1000], got '1'");
  EXPECT_THAT(ParseError("augment:\n  mixup_prob: 1.5\n"),
              HasSubstr("x.yaml:2: key 'augment.mixup_prob': expected a probability in [0, 1], "
                        "got '1.5'"));
  EXPECT_THAT(ParseError("model:\n  dropout: 1\n"),
              HasSubstr("x.yaml:2: key 'model.dropout': expected a number in [0, 1), got '1.0'"));
  EXPECT_THAT(ParseError("train:\n  label_smoothing: -0.1\n"),
              HasSubstr("key 'train.label_smoothing'"));
  EXPECT_THAT(ParseError("comm:\n  bucket_mb: 0\n"), HasSubstr("x.yaml:2: key 'comm.bucket_mb'"));
  // Below 1 KiB the bucket of bucket_mb x 2^20 bytes rounds to nothing.
  EXPECT_THAT(ParseError("comm:\n  bucket_mb: 1e-9\n"),
              HasSubstr("x.yaml:2: key 'comm.bucket_mb': expected a number in [0.0009765625, 4096], got "));
  EXPECT_THAT(ParseError("augment:\n  cutmix_alpha: 0\n"), HasSubstr("key 'augment.cutmix_alpha'"));
  EXPECT_THAT(ParseError("data:\n  sample_rate: -1\n"), HasSubstr("key 'data.sample_rate'"));
  EXPECT_THAT(ParseError("data:\n  duration: 0\n"), HasSubstr("key 'data.duration'"));
  EXPECT_THAT(ParseError("folds:\n  cv_filter_thr: 0\n"), HasSubstr("key 'folds.cv_filter_thr'"));
  // The front end refuses n_fft 1 when training starts; the config refuses it first.
  EXPECT_EQ(ParseError("frontend:\n  n_fft: 1\n  hop_length: 1\n"),
            "x.yaml:2: key 'frontend.n_fft': expected an integer in [2, 65536], got '1'");
  EXPECT_EQ(ParseError("data:\n  duration: 1\nfrontend:\n  n_fft: 2\n  hop_length: 1\n  n_mels: 2\n"), "");
  EXPECT_THAT(ParseError("frontend:\n  in_channels: 2\n"),
              HasSubstr("x.yaml:2: key 'frontend.in_channels': expected one of 1, 3, got '2'"));
}

// The training options of issue 17: ranges, and ema_eval only with an average to validate.
TEST(ConfigTest, TrainingOptionsAreCheckedByKey) {
  EXPECT_EQ(ParseError("train:\n  grad_accum_steps: 0\n"),
            "x.yaml:2: key 'train.grad_accum_steps': expected an integer in [1, 65536], got '0'");
  EXPECT_THAT(ParseError("train:\n  ema_decay: 1\n"),
              HasSubstr("x.yaml:2: key 'train.ema_decay': expected a number in [0, 1), got '1.0'"));
  EXPECT_THAT(ParseError("train:\n  grad_clip_norm: -1\n"), HasSubstr("x.yaml:2: key 'train.grad_clip_norm'"));
  EXPECT_THAT(ParseError("train:\n  early_stop_patience: -2\n"),
              HasSubstr("x.yaml:2: key 'train.early_stop_patience'"));
  EXPECT_THAT(ParseError("train:\n  early_stop_min_delta: -0.1\n"),
              HasSubstr("x.yaml:2: key 'train.early_stop_min_delta'"));
  EXPECT_THAT(ParseError("train:\n  ema_warmup_steps: -1\n"), HasSubstr("x.yaml:2: key 'train.ema_warmup_steps'"));
  EXPECT_EQ(ParseError("train:\n  ema_eval: true\n"),
            "x.yaml:2: key 'train.ema_eval': expected false while ema_decay is 0 (no average to validate), "
            "got true");
  EXPECT_THAT(ParseError("train:\n  ema_decay: 0.99\nstages:\n  finetune: {ema_decay: 0.0, ema_eval: true}\n"),
              HasSubstr("key 'stages.finetune.ema_eval': expected false while ema_decay is 0"));
  // The loss must train the activation predict applies: refused where a run starts, while Parse
  // still takes it (a checkpoint written before the check carries such a config).
  auto mismatch = [](const std::string& yaml) {
    absl::StatusOr<PipelineConfig> c = ParsePipelineConfig(yaml, "x.yaml");
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::string(CheckLossMatchesActivation(*c, "x.yaml").message()) : std::string("parse failed");
  };
  EXPECT_EQ(mismatch("train:\n  loss: BCE\n"),
            "x.yaml: key 'train.loss': expected CCE while model.final_act is softmax (BCE trains sigmoids, CCE a "
            "softmax; validation and predict apply model.final_act), got BCE");
  EXPECT_THAT(mismatch("model:\n  final_act: sigmoid\ntrain:\n  loss: BCE\nstages:\n  pretrain: {loss: CCE}\n"),
              HasSubstr("key 'stages.pretrain.loss': expected BCE while model.final_act is sigmoid"));
  EXPECT_EQ(mismatch("model:\n  final_act: sigmoid\ntrain:\n  loss: BCE\n"), "");
  EXPECT_EQ(mismatch(""), "");
  // Only the stages that train: both overriding the top level's loss, or a disabled one.
  EXPECT_EQ(mismatch("model: {final_act: sigmoid}\nstages: {pretrain: {loss: BCE}, finetune: {loss: BCE}}\n"), "");
  EXPECT_EQ(mismatch("model: {final_act: sigmoid}\ntrain: {loss: BCE}\nstages: {pretrain: {enabled: false, loss: CCE}}\n"),
            "");
  EXPECT_THAT(mismatch("model: {final_act: sigmoid}\nstages: {pretrain: {loss: BCE}}\n"),
              HasSubstr("key 'train.loss': expected BCE while model.final_act is sigmoid"));  // finetune's
  // `aviary-worker train --stage pretrain` trains that stage, disabled or not.
  absl::StatusOr<PipelineConfig> disabled = ParsePipelineConfig(
      "model: {final_act: sigmoid}\ntrain: {loss: BCE}\nstages: {pretrain: {enabled: false, loss: CCE}}\n", "x.yaml");
  ASSERT_TRUE(disabled.ok()) << disabled.status();
  EXPECT_THAT(std::string(CheckLossMatchesActivation(*disabled, "x.yaml", "pretrain").message()),
              HasSubstr("key 'stages.pretrain.loss': expected BCE"));
  EXPECT_TRUE(CheckLossMatchesActivation(*disabled, "x.yaml", "finetune").ok());
  // CheckBeforeRun: that, and no weights file that would not be loaded.
  auto before_run = [](const std::string& yaml) {
    absl::StatusOr<PipelineConfig> c = ParsePipelineConfig(yaml, "x.yaml");
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::string(CheckBeforeRun(*c, "x.yaml").message()) : std::string("parse failed");
  };
  EXPECT_EQ(before_run("model:\n  pretrained_weights: w/b1.safetensors\n"),
            "x.yaml: key 'model.pretrained_weights': expected '' while model.pretrain is 'none' (the file would not "
            "be loaded), got 'w/b1.safetensors'; set model.pretrain=imagenet to start from it");
  EXPECT_THAT(before_run("train:\n  loss: BCE\n"), HasSubstr("key 'train.loss': expected CCE"));
  EXPECT_EQ(before_run("model:\n  pretrain: imagenet\n  pretrained_weights: w/b1.safetensors\n"), "");
  EXPECT_EQ(before_run(""), "");
  // Products of batch_size that the trainer holds in an int, bounded by 2^20: 65536 x 65536
  // wrapped to a validation batch of 0 ("loader option batch_size = 0") after the config was
  // accepted.
  EXPECT_EQ(ParseError("train:\n  batch_size: 65536\n  infer_bs: 65536\n"),
            "x.yaml:3: key 'train.infer_bs': expected batch_size x infer_bs <= 1048576 (batch_size is 65536), "
            "got '65536' (4294967296)");
  EXPECT_EQ(ParseError("train:\n  batch_size: 4096\nstages:\n  finetune: {grad_accum_steps: 512}\n"),
            "x.yaml:4: key 'stages.finetune.grad_accum_steps': expected batch_size x grad_accum_steps <= 1048576 "
            "(batch_size is 4096), got '512' (2097152)");
  EXPECT_THAT(ParseError("train:\n  infer_bs: 32768\n", {"stages.pretrain.batch_size=64"}),
              HasSubstr("--set stages.pretrain.batch_size=64: key 'stages.pretrain.infer_bs': expected batch_size x "
                        "infer_bs <= 1048576"));
  EXPECT_EQ(ParseError("train:\n  batch_size: 65536\n  infer_bs: 16\n  grad_accum_steps: 16\n"), "");
  EXPECT_EQ(ParseError("train:\n  ema_decay: 0.999\n  ema_eval: true\n  grad_accum_steps: 4\n"
                       "  grad_clip_norm: 1.0\n  early_stop_patience: 3\n"),
            "");
  // train.cuda_graph replays one micro-batch per optimizer step.
  EXPECT_EQ(ParseError("train:\n  cuda_graph: true\n  grad_accum_steps: 2\n"),
            "x.yaml:2: key 'train.cuda_graph': expected false while grad_accum_steps is 2 (a graph replays one "
            "micro-batch per optimizer step), got true");
  EXPECT_THAT(ParseError("train:\n  grad_accum_steps: 4\nstages:\n  finetune: {cuda_graph: true}\n"),
              HasSubstr("key 'stages.finetune.cuda_graph': expected false while grad_accum_steps is 4"));
  EXPECT_EQ(ParseError("train:\n  cuda_graph: true\n"), "");
}

// The keys a run does not read go back to their defaults; the ones it reads are kept.
TEST(ConfigTest, WithoutUnreadKeysKeepsWhatTheScheduleReads) {
  TrainConfig t;
  t.lr = 5e-4;
  t.lr_start = 1e-5;
  t.lr_max_per_sample = 2e-6;
  t.lr_min = 2e-6;
  t.lr_ramp_epochs = 3;
  t.lr_decay = 0.5;
  t.lr_step_epochs = 4;
  t.lr_per_step = true;
  t.early_stop_min_delta = 0.01;
  t.ema_warmup_steps = 100;
  const TrainConfig d;
  t.scheduler = "cos";
  TrainConfig cos = WithoutUnreadKeys(t);
  EXPECT_EQ(cos.lr, d.lr);
  EXPECT_EQ(cos.lr_start, 1e-5);
  EXPECT_EQ(cos.lr_max_per_sample, 2e-6);
  EXPECT_EQ(cos.lr_min, 2e-6);
  EXPECT_EQ(cos.lr_ramp_epochs, 3);
  EXPECT_TRUE(cos.lr_per_step);
  EXPECT_EQ(cos.lr_decay, d.lr_decay);
  EXPECT_EQ(cos.lr_step_epochs, d.lr_step_epochs);
  EXPECT_EQ(cos.early_stop_min_delta, d.early_stop_min_delta);
  EXPECT_EQ(cos.ema_warmup_steps, d.ema_warmup_steps);
  t.scheduler = "exp";
  TrainConfig exp = WithoutUnreadKeys(t);
  EXPECT_EQ(exp.lr_decay, 0.5);
  EXPECT_EQ(exp.lr_min, 2e-6);
  EXPECT_EQ(exp.lr_step_epochs, d.lr_step_epochs);
  t.scheduler = "step";
  TrainConfig step = WithoutUnreadKeys(t);
  EXPECT_EQ(step.lr_decay, 0.5);
  EXPECT_EQ(step.lr_step_epochs, 4);
  EXPECT_EQ(step.lr_min, d.lr_min);
  t.scheduler = "none";
  t.early_stop_patience = 2;
  t.ema_decay = 0.99;
  TrainConfig none = WithoutUnreadKeys(t);
  EXPECT_EQ(none.lr, 5e-4);
  EXPECT_EQ(none.lr_start, d.lr_start);
  EXPECT_EQ(none.lr_max_per_sample, d.lr_max_per_sample);
  EXPECT_EQ(none.lr_min, d.lr_min);
  EXPECT_EQ(none.lr_ramp_epochs, d.lr_ramp_epochs);
  EXPECT_EQ(none.lr_per_step, d.lr_per_step);
  EXPECT_EQ(none.early_stop_min_delta, 0.01);
  EXPECT_EQ(none.ema_warmup_steps, 100);
}

// Two configs' differences by dotted key, both values named, a key only one side has absent.
TEST(ConfigTest, DiffNamesTheKeysThatDiffer) {
  PipelineConfig a, b;
  EXPECT_TRUE(DiffPipelineConfigs(a, b).empty());
  b.train.lr = 2e-3;
  b.model.name = "small_cnn";
  b.folds.selected_folds = {0, 1};
  b.stages["finetune"].train.epochs = 40;
  std::vector<std::string> got;
  for (const ConfigDifference& d : DiffPipelineConfigs(a, b)) got.push_back(d.key + ": " + d.before + " -> " + d.after);
  EXPECT_EQ(got, (std::vector<std::string>{"folds.selected_folds: [0] -> [0, 1]", "model.name: efficientnet_b1 -> small_cnn",
                                           "stages.finetune.epochs: (absent) -> 40",
                                           "stages.finetune.lr: (absent) -> 0.001",
                                           // the stages' copies of train.* keep the old rate: now overrides
                                           "stages.pretrain.lr: (absent) -> 0.001", "train.lr: 0.001 -> 0.002"}));
}

TEST(ConfigTest, SeedIsUnsigned32) {
  EXPECT_EQ(ParseError("seed: -1\n"),
            "x.yaml:1: key 'seed': expected an integer in [0, 4294967295], got '-1'");
  EXPECT_THAT(ParseError("seed: 4294967296\n"), HasSubstr("got '4294967296'"));
  absl::StatusOr<PipelineConfig> config = ParsePipelineConfig("seed: 4294967295\n", "x.yaml");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->seed, 4294967295u);
}

TEST(ConfigTest, BadEnumsListTheChoices) {
  EXPECT_EQ(ParseError("seed: 1\nmodel:\n  name: resnet50\n"),
            "x.yaml:3: key 'model.name': expected one of efficientnet_b0, efficientnet_b1, "
            "efficientnet_b2, efficientnet_b3, small_cnn, got 'resnet50'");
  EXPECT_THAT(ParseError("train:\n  optimizer: SGD\n"),
              HasSubstr("key 'train.optimizer': expected one of Adam, AdamW, got 'SGD'"));
  EXPECT_THAT(ParseError("train:\n  scheduler: linear\n"), HasSubstr("key 'train.scheduler'"));
  EXPECT_THAT(ParseError("train:\n  loss: MSE\n"), HasSubstr("key 'train.loss'"));
  EXPECT_THAT(ParseError("train:\n  monitor: f1\n"), HasSubstr("key 'train.monitor'"));
  EXPECT_THAT(ParseError("train:\n  precision: fp16\n"), HasSubstr("key 'train.precision'"));
  EXPECT_THAT(ParseError("comm:\n  backend: gloo\n"), HasSubstr("key 'comm.backend'"));
  EXPECT_THAT(ParseError("data:\n  channels: left\n"), HasSubstr("key 'data.channels'"));
  EXPECT_THAT(ParseError("frontend:\n  normalize: global\n"),
              HasSubstr("key 'frontend.normalize'"));
  EXPECT_THAT(ParseError("model:\n  final_act: relu\n"), HasSubstr("key 'model.final_act'"));
  EXPECT_THAT(ParseError("model:\n  pretrain: audioset\n"), HasSubstr("key 'model.pretrain'"));
  EXPECT_THAT(
      ParseError("data:\n  pretrain_sources:\n    - {layout: \"2021\", root: a}\n"
                 "    - {layout: \"2019\", root: b}\n"),
      HasSubstr("x.yaml:4: key 'data.pretrain_sources.1.layout': expected a layout, one of 2024, "
                "2023, 2022, 2021, 2020, xc, got '2019'"));
  EXPECT_THAT(ParseError("data:\n  target: {layout: xc, root: \"\"}\n"),
              HasSubstr("x.yaml:2: key 'data.target.root': expected a non-empty path"));
}

TEST(ConfigTest, CrossFieldChecks) {
  EXPECT_EQ(ParseError("data:\n  sample_rate: 16000\n"),
            "x.yaml:2: key 'frontend.fmax': expected <= data.sample_rate / 2 (8000.0), got "
            "'16000.0'");
  EXPECT_THAT(ParseError("frontend:\n  fmin: 100\n  fmax: 50\n"),
              HasSubstr("x.yaml:2: key 'frontend.fmin': expected < frontend.fmax"));
  EXPECT_THAT(ParseError("frontend:\n  n_fft: 512\n"),
              HasSubstr("x.yaml:2: key 'frontend.hop_length': expected <= frontend.n_fft (512), "
                        "got '835'"));
  // A clip shorter than the STFT's reflect padding needs (n_fft / 2 + 1 samples) is refused here,
  // not by the front end at the first training batch.
  EXPECT_EQ(ParseError("data:\n  duration: 0.02\n"),
            "x.yaml:2: key 'data.duration': expected a clip of at least frontend.n_fft / 2 + 1 = 1015 "
            "samples at data.sample_rate 32000 (0.03171875 s), got '0.02' (640 samples)");
  EXPECT_THAT(ParseError("data:\n  duration: 1\nfrontend:\n  n_fft: 65536\n  hop_length: 512\n"),
              HasSubstr("x.yaml:2: key 'data.duration': expected a clip of at least frontend.n_fft / 2 + 1 "
                        "= 32769 samples"));
  EXPECT_THAT(ParseError("", {"data.duration=0.1", "data.sample_rate=8000", "frontend.fmax=4000"}),
              HasSubstr("--set data.duration=0.1: key 'data.duration': expected a clip of at least "
                        "frontend.n_fft / 2 + 1 = 1015 samples at data.sample_rate 8000"));
  EXPECT_EQ(ParseError("data:\n  duration: 0.03171875\n"), "");
  EXPECT_EQ(ParseError("data:\n  duration: 0.05\nfrontend:\n  n_fft: 512\n  hop_length: 128\n"), "");
  // small_cnn's four 2x2 max-pools need a mel image of at least 16 x 16 (torch: "Output size is
  // too small" at the first batch).
  EXPECT_EQ(ParseError("model:\n  name: small_cnn\nfrontend:\n  n_mels: 8\n"),
            "x.yaml:4: key 'frontend.n_mels': expected >= 16 for model.name small_cnn (four 2x2 max-pools), got '8'");
  EXPECT_EQ(ParseError("model:\n  name: small_cnn\ndata:\n  duration: 0.4\n"), "");  // 1 + 12800 / 835 = 16
  EXPECT_EQ(ParseError("model:\n  name: small_cnn\ndata:\n  duration: 0.39\n"),
            "x.yaml:4: key 'data.duration': expected a clip of at least 16 frames for model.name small_cnn (four "
            "2x2 max-pools; frames = 1 + samples / frontend.hop_length 835), got '0.39' (12480 samples, 15 frames)");
  // An odd n_fft makes one frame fewer where hop_length divides the clip (torch.stft: 15 frames of
  // 12525 samples, n_fft 2027, hop 835): refused here, not at the first batch's max-pool.
  EXPECT_EQ(ParseError("model:\n  name: small_cnn\nfrontend:\n  n_fft: 2027\n", {"data.duration=0.391406250"}),
            "--set data.duration=0.391406250: key 'data.duration': expected a clip of at least 16 frames for "
            "model.name small_cnn (four 2x2 max-pools; frames = 1 + (samples - 1) / frontend.hop_length 835 with "
            "an odd frontend.n_fft), got '0.39140625' (12525 samples, 15 frames)");
  EXPECT_EQ(ParseError("model:\n  name: small_cnn\nfrontend:\n  n_fft: 2028\n", {"data.duration=0.391406250"}), "");
  EXPECT_THAT(ParseError("frontend:\n  hop_length: 2028\n", {"model.name=small_cnn", "data.duration=0.9"}),
              HasSubstr("--set data.duration=0.9: key 'data.duration': expected a clip of at least 16 frames"));
  EXPECT_EQ(ParseError("frontend:\n  n_mels: 8\n"), "");  // the EfficientNets have no such limit
  // An EfficientNet shrinks a mel image of at most 32 x 32 to 1 x 1, where torch's BatchNorm
  // refuses a training batch of one image ("Expected more than 1 value per channel").
  EXPECT_EQ(ParseError("train:\n  batch_size: 1\nfrontend:\n  n_mels: 32\n  hop_length: 1024\n",
                       {"data.duration=1"}),
            "x.yaml:2: key 'train.batch_size': expected >= 2 for model.name efficientnet_b1 on a mel image of 32 x 32 "
            "(frontend.n_mels x frames), which it shrinks to 1 x 1: BatchNorm cannot train on one value per "
            "channel; got '1'");
  EXPECT_THAT(ParseError("stages:\n  finetune:\n    batch_size: 1\n",
                         {"frontend.n_mels=32", "frontend.hop_length=1024", "data.duration=1"}),
              HasSubstr("x.yaml:3: key 'stages.finetune.batch_size': expected >= 2"));
  EXPECT_EQ(ParseError("train:\n  batch_size: 2\n", {"frontend.n_mels=32", "frontend.hop_length=1024", "data.duration=1"}), "");
  EXPECT_EQ(ParseError("train:\n  batch_size: 1\n", {"frontend.n_mels=33", "frontend.hop_length=1024", "data.duration=1"}), "");
  EXPECT_EQ(ParseError("train:\n  batch_size: 1\n", {"model.name=small_cnn", "frontend.n_mels=16", "data.duration=0.4"}), "");
  EXPECT_THAT(ParseError("sampling:\n  upsample_thr: 50\n  downsample_thr: 10\n"),
              HasSubstr("x.yaml:3: key 'sampling.downsample_thr': expected >= "
                        "sampling.upsample_thr (50)"));
  EXPECT_EQ(ParseError("sampling:\n  upsample_thr: 50\n  downsample_thr: 0\n"), "");
  EXPECT_THAT(ParseError("data:\n  duration: 5\n  cache_max_seconds: 4\n"),
              HasSubstr("x.yaml:3: key 'data.cache_max_seconds': expected 0 (whole recordings) or >= "
                        "data.duration (5.0), got '4.0'"));
  EXPECT_EQ(ParseError("data:\n  duration: 5\n  cache_max_seconds: 60\n"), "");
  EXPECT_THAT(ParseError("data:\n  cache_max_seconds: -1\n"), HasSubstr("key 'data.cache_max_seconds'"));
  EXPECT_THAT(ParseError("augment:\n  noise_std_min: 0.5\n"),
              HasSubstr("x.yaml:2: key 'augment.noise_std_min': expected <= "
                        "augment.noise_std_max"));
  EXPECT_EQ(ParseError("model:\n  name: small_cnn\n  pretrain: imagenet\n"),
            "x.yaml:3: key 'model.pretrained_weights': expected a weights file when "
            "model.pretrain is 'imagenet', got ''");
  EXPECT_EQ(ParseError("model:\n  pretrain: imagenet\n  pretrained_weights: w.pt\n"), "");
  EXPECT_EQ(ParseError("folds:\n  finetune_splits: 3\n  selected_folds: [0, 3]\n"),
            "x.yaml:3: key 'folds.selected_folds.1': expected a fold in [0, "
            "folds.finetune_splits) = [0, 3), got '3'");
  EXPECT_THAT(ParseError("folds:\n  selected_folds: [1, 1]\n"),
              HasSubstr("key 'folds.selected_folds.1': fold 1 is already listed"));
  EXPECT_THAT(ParseError("data:\n  pretrain_sources: []\n"),
              HasSubstr("x.yaml:2: key 'data.pretrain_sources': expected at least one source"));
  EXPECT_EQ(ParseError("data:\n  pretrain_sources: []\nstages:\n  pretrain: {enabled: false}\n"),
            "");
}

TEST(ConfigTest, OverrideScalarsAndLists) {
  absl::StatusOr<PipelineConfig> config = LoadPipelineConfig(
      SourcePath("configs/pipeline.yaml"),
      {"train.batch_size=64", "folds.selected_folds=[0,1, 4]", "data.pretrain_sources.0.root=/x",
       "data.target.layout=2023", "debug=true", "train.lr=2.5e-4", "data.corrupt_files="});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->train.batch_size, 64);
  EXPECT_EQ(config->stages.at("finetune").train.batch_size, 64);
  EXPECT_EQ(config->folds.selected_folds, (std::vector<int>{0, 1, 4}));
  ASSERT_EQ(config->data.pretrain_sources.size(), 4u);
  EXPECT_EQ(config->data.pretrain_sources[0].root, "/x");
  EXPECT_EQ(config->data.pretrain_sources[0].layout, "2021");
  EXPECT_EQ(config->data.pretrain_sources[1].root, "data/birdclef-2022");
  EXPECT_EQ(config->data.target.layout, "2023");
  EXPECT_TRUE(config->debug);
  EXPECT_EQ(config->train.lr, 2.5e-4);
  EXPECT_EQ(config->data.corrupt_files, "");
}

TEST(ConfigTest, OverrideReplacesAWholeListItem) {
  absl::StatusOr<PipelineConfig> config = ParsePipelineConfig(
      "", "x.yaml", {"data.pretrain_sources.3={layout: \"2020\", root: /birdsong}"});
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->data.pretrain_sources.size(), 4u);
  EXPECT_EQ(config->data.pretrain_sources[3].layout, "2020");
  EXPECT_EQ(config->data.pretrain_sources[3].root, "/birdsong");
}

TEST(ConfigTest, OverrideIntoDefaultListAbsentFromTheFile) {
  // The file does not list the sources: the override indexes the default list.
  absl::StatusOr<PipelineConfig> config =
      ParsePipelineConfig("seed: 3\n", "x.yaml", {"data.pretrain_sources.1.root=/y"});
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->data.pretrain_sources.size(), 4u);
  EXPECT_EQ(config->data.pretrain_sources[1].root, "/y");
  EXPECT_EQ(config->data.pretrain_sources[1].layout, "2022");
  EXPECT_EQ(config->data.pretrain_sources[2].root, "data/birdclef-2023");
}

TEST(ConfigTest, OverrideErrorsNameTheOverride) {
  EXPECT_EQ(ParseError("train:\n  batch_size: 8\n", {"train.batch_size=abc"}),
            "--set train.batch_size=abc: key 'train.batch_size': expected an integer, got 'abc'");
  EXPECT_EQ(ParseError("", {"train.bach_size=3"}),
            "--set train.bach_size=3: unknown key 'train.bach_size' (did you mean "
            "'train.batch_size'?)");
  EXPECT_EQ(ParseError("", {"folds.selected_folds=[0,7]"}),
            "--set folds.selected_folds=[0,7]: key 'folds.selected_folds.1': expected a fold in "
            "[0, folds.finetune_splits) = [0, 5), got '7'");
  EXPECT_EQ(ParseError("", {"model.pretrain=imagenet"}),
            "--set model.pretrain=imagenet: key 'model.pretrained_weights': expected a weights "
            "file when model.pretrain is 'imagenet', got ''");
  EXPECT_EQ(ParseError("", {"data.target=x"}),
            "--set data.target=x: 'data.target' is a section; set its keys one by one (data.target.KEY=VALUE)");
}

// A section set whole dropped (or reverted to their defaults) the file's other keys in it.
TEST(ConfigTest, ASectionIsNotSetWhole) {
  EXPECT_EQ(ParseError("train:\n  lr: 0.1\n", {"train="}),
            "--set train=: 'train' is a section; set its keys one by one (train.KEY=VALUE)");
  EXPECT_THAT(ParseError("", {"data={sample_rate: 16000}"}), HasSubstr("'data' is a section"));
  // Lists stay settable whole (the pool's sources).
  EXPECT_EQ(ParseError("", {"data.pretrain_sources=[]", "stages.pretrain.enabled=false"}), "");
}

// What would not read back as written: a second document (YAML::Load read the first only), an
// alias (a --set through it changed every place it stands), bytes that are not UTF-8
// (written back as U+FFFD: a resume could not see the path change).
TEST(ConfigTest, TextThatWouldNotReadBackIsRefused) {
  EXPECT_EQ(ParseError("train: {lr: 0.1}\n---\ntrain: {lrr: 0.2}\n"),
            "x.yaml:2: a second YAML document ('---'); a config is one document, and the rest would be ignored");
  EXPECT_THAT(ParseError("train: {lr: 0.1}\n---\ntrain: [x\n"), HasSubstr("x.yaml:2: a second YAML document"));
  EXPECT_THAT(ParseError("train: {lr_start: &ls 5.0e-6}\nstages:\n  finetune: {lr_start: *ls}\n"),
              HasSubstr("x.yaml:3: a YAML alias (*name); not supported in a config"));
  EXPECT_THAT(ParseError("data:\n  target: {root: \"d\xe9\"}\n"), HasSubstr("x.yaml:2:20: byte 0xe9 is not UTF-8"));
  EXPECT_THAT(ParseError("", {"data.target.root=d\xe9"}), HasSubstr("byte 0xe9 is not UTF-8"));
  EXPECT_THAT(ParseError("", {"train.lr=0.2\n---\n[x"}), HasSubstr("a second YAML document"));
  // A refused bound reads as a value the check takes: 1/1024 (0.000976562 is just below it).
  EXPECT_THAT(ParseError("", {"comm.bucket_mb=0.0001"}), HasSubstr("expected a number in [0.0009765625, 4096]"));
}

TEST(ConfigTest, BadOverrideForms) {
  EXPECT_EQ(ParseError("", {"train.batch_size"}),
            "--set train.batch_size: expected dotted.key=value");
  EXPECT_EQ(ParseError("", {"=3"}), "--set =3: empty key (expected dotted.key=value)");
  EXPECT_EQ(ParseError("", {"train..lr=3"}),
            "--set train..lr=3: empty component in key 'train..lr'");
  EXPECT_EQ(ParseError("", {"data.pretrain_sources.4.root=/x"}),
            "--set data.pretrain_sources.4.root=/x: index 4 out of range for "
            "'data.pretrain_sources' (a list of 4 items)");
  EXPECT_EQ(ParseError("", {"data.pretrain_sources.first.root=/x"}),
            "--set data.pretrain_sources.first.root=/x: 'data.pretrain_sources' is a list; "
            "expected an item index, got 'first'");
  EXPECT_THAT(ParseError("train:\n  lr: 0.1\n", {"train.lr.x=1"}),
              HasSubstr("--set train.lr.x=1: 'train.lr' is a single value"));
  EXPECT_THAT(ParseError("", {"train.lr=[1,"}),
              HasSubstr("--set train.lr=[1,: value '[1,' is not valid YAML"));
}

TEST(ConfigTest, StageOverridesApplyOverTrain) {
  const std::string text =
      "train:\n"
      "  batch_size: 16\n"
      "  epochs: 10\n"
      "stages:\n"
      "  pretrain: {epochs: 3, lr: 0.01}\n"
      "  finetune:\n"
      "    enabled: false\n";
  absl::StatusOr<PipelineConfig> config =
      ParsePipelineConfig(text, "x.yaml", {"stages.finetune.optimizer=AdamW"});
  ASSERT_TRUE(config.ok()) << config.status();
  const StageConfig& pretrain = config->stages.at("pretrain");
  EXPECT_TRUE(pretrain.enabled);
  EXPECT_EQ(pretrain.train.epochs, 3);
  EXPECT_EQ(pretrain.train.lr, 0.01);
  EXPECT_EQ(pretrain.train.batch_size, 16);
  EXPECT_EQ(config->train.epochs, 10);
  EXPECT_EQ(config->train.lr, 1.0e-3);
  const StageConfig& finetune = config->stages.at("finetune");
  EXPECT_FALSE(finetune.enabled);
  EXPECT_EQ(finetune.train.epochs, 10);
  EXPECT_EQ(finetune.train.optimizer, "AdamW");

  absl::StatusOr<const StageConfig*> stage = GetStage(*config, "pretrain");
  ASSERT_TRUE(stage.ok());
  EXPECT_EQ((*stage)->train.epochs, 3);
}

TEST(ConfigTest, StagesBeforeTrainStillInheritTrain) {
  absl::StatusOr<PipelineConfig> config =
      ParsePipelineConfig("stages:\n  finetune: {epochs: 2}\ntrain:\n  batch_size: 4\n", "x.yaml");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->stages.at("finetune").train.batch_size, 4);
  EXPECT_EQ(config->stages.at("finetune").train.epochs, 2);
}

TEST(ConfigTest, StageErrors) {
  EXPECT_EQ(ParseError("stages:\n  pretrian: {enabled: true}\n"),
            "x.yaml:2: unknown stage 'stages.pretrian' (did you mean 'stages.pretrain'?)");
  EXPECT_EQ(ParseError("stages:\n  distill: {}\n"),
            "x.yaml:2: unknown stage 'stages.distill' (expected one of pretrain, finetune)");
  EXPECT_EQ(ParseError("stages:\n  pretrain:\n    epoch: 3\n"),
            "x.yaml:3: unknown key 'stages.pretrain.epoch' (did you mean "
            "'stages.pretrain.epochs'?)");
  EXPECT_EQ(ParseError("stages:\n  finetune:\n    batch_size: 0\n"),
            "x.yaml:3: key 'stages.finetune.batch_size': expected an integer in [1, 65536], got '0'");
  EXPECT_EQ(ParseError("", {"stages.pretrain.enabled=sure"}),
            "--set stages.pretrain.enabled=sure: key 'stages.pretrain.enabled': expected true or "
            "false, got 'sure'");
  EXPECT_THAT(ParseError("stages:\n  pretrain:\n    train: {epochs: 3}\n"),
              HasSubstr("x.yaml:3: key 'stages.pretrain.train': per-stage overrides of train.* go "
                        "directly under the stage"));
  EXPECT_THAT(ParseError("stages: [pretrain]\n"),
              HasSubstr("x.yaml:1: key 'stages': expected a map of stages"));

  PipelineConfig config;
  absl::StatusOr<const StageConfig*> stage = GetStage(config, "distill");
  EXPECT_EQ(stage.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(stage.status().message(), HasSubstr("'distill'"));
}

TEST(ConfigTest, MissingFileIsNotFound) {
  const std::string path = absl::StrCat(::testing::TempDir(), "/no/such/config.yaml");
  absl::StatusOr<PipelineConfig> config = LoadPipelineConfig(path);
  EXPECT_EQ(config.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(config.status().message(), HasSubstr(path));
}

TEST(ConfigTest, ErrorsFromAFileNameIt) {
  const std::string path = WriteTemp("config_test_bad.yaml", "seed: 1\ntrain:\n  epochs: many\n");
  absl::StatusOr<PipelineConfig> config = LoadPipelineConfig(path);
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(config.status().message(),
            absl::StrCat(path, ":3: key 'train.epochs': expected an integer, got 'many'"));
}

TEST(ConfigTest, YamlSyntaxErrorNamesFileAndLine) {
  const std::string path =
      WriteTemp("config_test_syntax.yaml", "seed: 1\ntrain:\n  batch_size: 8\n  epochs: [1, 2\n");
  absl::StatusOr<PipelineConfig> config = LoadPipelineConfig(path);
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(), HasSubstr(absl::StrCat(path, ":4: invalid YAML")));
  EXPECT_THAT(ParseError("a: b: c\n"), HasSubstr("x.yaml:1: invalid YAML"));
}

TEST(ConfigTest, RoundTripsThroughYaml) {
  PipelineConfig config;
  config.seed = 4294967295u;
  config.debug = true;
  config.data.duration = 7.3;
  config.data.target = {"2023", "/data/with space/and: colon"};
  config.data.pretrain_sources = {{"2020", "a"}, {"xc", "\"quoted\" #hash"}};
  config.data.corrupt_files = "corrupt.json";
  config.data.channels = "mean";
  config.folds.selected_folds = {0, 2, 4};
  config.folds.cv_filter = false;
  config.frontend.fmin = 1.0 / 3.0;
  config.augment.noise_std_min = 1e-7;
  config.augment.mixup_alpha = 0.1;
  config.model.name = "efficientnet_b3";
  config.model.pretrain = "imagenet";
  config.model.pretrained_weights = "weights/b3.pt";
  config.train.lr = 3.0e-4;
  config.train.lr_max_per_sample = 1.23456789012345e-6;
  config.train.weight_decay = 1e-2;
  config.stages["pretrain"].train = config.train;
  config.stages["finetune"].train = config.train;
  config.stages["pretrain"].train.epochs = 40;
  config.stages["pretrain"].train.lr = 0.1;
  config.stages["finetune"].enabled = false;
  config.stages["finetune"].train.optimizer = "AdamW";
  config.comm.timeout_s = 12.5;
  ASSERT_TRUE(ValidatePipelineConfig(config).ok()) << ValidatePipelineConfig(config);

  const std::string yaml = PipelineConfigToYaml(config);
  absl::StatusOr<PipelineConfig> parsed = ParsePipelineConfig(yaml, "<resolved>");
  ASSERT_TRUE(parsed.ok()) << parsed.status() << "\n" << yaml;
  EXPECT_TRUE(*parsed == config) << yaml;
  EXPECT_EQ(PipelineConfigToYaml(*parsed), yaml);
  EXPECT_EQ(parsed->frontend.fmin, 1.0 / 3.0);
  EXPECT_EQ(parsed->data.pretrain_sources[1].root, "\"quoted\" #hash");
  EXPECT_THAT(yaml, HasSubstr("pretrain: {enabled: true, epochs: 40, lr: 0.1}"));
  EXPECT_THAT(yaml, HasSubstr("finetune: {enabled: false, optimizer: \"AdamW\"}"));

  // A stage that differs from `train` in fields nobody set on it (a hand-built config whose
  // stages kept the default train settings) round-trips as well.
  PipelineConfig diverged;
  diverged.train.lr = 0.5;
  diverged.train.weight_decay = 0.25;
  absl::StatusOr<PipelineConfig> reparsed_diverged =
      ParsePipelineConfig(PipelineConfigToYaml(diverged), "<diverged>");
  ASSERT_TRUE(reparsed_diverged.ok()) << reparsed_diverged.status();
  EXPECT_TRUE(*reparsed_diverged == diverged) << PipelineConfigToYaml(*reparsed_diverged);
  EXPECT_EQ(reparsed_diverged->stages.at("pretrain").train.lr, 1.0e-3);

  // The defaults round-trip too, and every section appears.
  const std::string defaults = PipelineConfigToYaml(PipelineConfig{});
  absl::StatusOr<PipelineConfig> reparsed = ParsePipelineConfig(defaults, "<defaults>");
  ASSERT_TRUE(reparsed.ok()) << reparsed.status();
  EXPECT_TRUE(*reparsed == PipelineConfig{});
  for (const char* key : {"seed:", "data:", "folds:", "sampling:", "frontend:", "augment:",
                          "model:", "train:", "stages:", "comm:", "lr_start: 5.0e-06"}) {
    EXPECT_THAT(defaults, HasSubstr(key));
  }
}

TEST(ConfigTest, EqualityComparesSettingsNotSource) {
  PipelineConfig a;
  PipelineConfig b;
  b.source_path = "elsewhere.yaml";
  EXPECT_TRUE(a == b);
  b.stages["finetune"].train.tta = 2;
  EXPECT_TRUE(a != b);
  EXPECT_TRUE(a.train == b.train);
}

TEST(ConfigTest, ValidateHandBuiltConfig) {
  PipelineConfig config;
  EXPECT_TRUE(ValidatePipelineConfig(config).ok());
  config.train.batch_size = 0;
  absl::Status status = ValidatePipelineConfig(config);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "key 'train.batch_size': expected an integer in [1, 65536], got '0'");
  config.source_path = "my.yaml";
  EXPECT_EQ(ValidatePipelineConfig(config).message(),
            "my.yaml: key 'train.batch_size': expected an integer in [1, 65536], got '0'");

  config.train.batch_size = 8;
  config.stages["pretrain"].train.num_workers = 0;
  EXPECT_THAT(ValidatePipelineConfig(config).message(),
              HasSubstr("key 'stages.pretrain.num_workers'"));
  config.stages.erase("pretrain");
  EXPECT_THAT(ValidatePipelineConfig(config).message(), HasSubstr("missing stage 'pretrain'"));
}

TEST(ConfigTest, DidYouMean) {
  const std::vector<std::string> keys{"batch_size", "epochs", "lr", "loss"};
  EXPECT_EQ(DidYouMean("bach_size", keys), "batch_size");
  EXPECT_EQ(DidYouMean("epoch", keys), "epochs");
  EXPECT_EQ(DidYouMean("ls", keys), "lr");
  EXPECT_EQ(DidYouMean("learning_rate", keys), "");
  EXPECT_EQ(DidYouMean("x", {}), "");
}

}  // namespace
}  // namespace aviary::common
