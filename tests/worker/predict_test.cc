#include "worker/predict.h"

#include <ATen/Context.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/checkpoint.h"
#include "worker/ema.h"
#include "worker/frontend.h"
#include "worker/models.h"

namespace aviary::worker {
namespace {

using ::testing::HasSubstr;

std::string Dir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/predict_test_" + name;
  // An earlier run's files (a folder it left at mode 0 first made readable again: a death
  // test's child runs this again after its parent set that mode).
  ::chmod(dir.c_str(), 0755);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  ::mkdir(dir.c_str(), 0755);
  return dir;
}

// A randomly initialised small CNN saved as a checkpoint of `classes`, as the trainer writes it.
std::string SaveModel(const std::string& name, const std::vector<std::string>& classes,
                      int num_classes = -1, const std::string& final_act = "softmax") {
  common::PipelineConfig config;
  config.model.name = "small_cnn";
  config.model.final_act = final_act;
  config.frontend.in_channels = 1;
  config.frontend.n_mels = 32;
  config.train.batch_size = 2;
  config.train.infer_bs = 2;
  if (final_act == "sigmoid") config.train.loss = "BCE";
  for (auto& [name, stage] : config.stages) stage.train = config.train;
  if (num_classes < 0) num_classes = static_cast<int>(classes.size());
  auto model = BuildClassifier(config.model, 1, num_classes);
  EXPECT_TRUE(model.ok()) << model.status();
  if (name.find("nonfinite") != std::string::npos) {
    torch::NoGradGuard no_grad;
    (*model)->named_parameters().begin()->value().view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
  }
  CheckpointMeta meta;
  meta.stage = "finetune";
  meta.monitor = "auc";
  meta.model_name = "small_cnn";
  meta.num_classes = num_classes;
  meta.in_channels = 1;
  meta.class_names = classes;
  meta.config_yaml = common::PipelineConfigToYaml(config);
  std::string path = ::testing::TempDir() + "/predict_test_" + name + ".pt";
  absl::Status st = SaveCheckpoint(path, **model, nullptr, meta);
  EXPECT_TRUE(st.ok()) << st;
  return path;
}

std::vector<float> Noise(int64_t n, uint32_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
  uint32_t x = seed * 2654435761u + 1;
  for (float& s : v) {
    x = x * 1664525u + 1013904223u;
    s = static_cast<float>((x >> 8) * (1.0 / (1u << 24)) - 0.5) * 0.2f;
  }
  return v;
}

TEST(PredictTest, RowIdsFollowBirdClef) {
  EXPECT_EQ(RowId("/data/test_soundscapes/460830.ogg", 5), "460830_5");
  EXPECT_EQ(RowId("460830.ogg", 240), "460830_240");
  EXPECT_EQ(RowId("dir/a.b.ogg", 10), "a.b_10");
  EXPECT_EQ(RowId("x.wav", 2.5), "x_2.5");
  // Six decimals whatever the size: past 10,000 s the ids stay distinct.
  EXPECT_EQ(RowId("x.wav", 10000.05), "x_10000.05");
  EXPECT_EQ(RowId("x.wav", 10000.1), "x_10000.1");
  EXPECT_EQ(RowId("x.wav", 16777.25), "x_16777.25");
  EXPECT_EQ(RowId("noext", 15.000000000001), "noext_15");
}

TEST(PredictTest, TtaShiftsAlternateAroundTheWindow) {
  EXPECT_EQ(TtaShifts(1, 160000), (std::vector<int64_t>{0}));
  EXPECT_EQ(TtaShifts(2, 160000), (std::vector<int64_t>{0, 40000}));
  EXPECT_EQ(TtaShifts(3, 160000), (std::vector<int64_t>{0, 26667, -26667}));
  EXPECT_EQ(TtaShifts(4, 160000), (std::vector<int64_t>{0, 20000, -20000, 40000}));
}

TEST(PredictTest, SmoothingIsACenteredAverageRenormalisedAtTheEdges) {
  // 3 rows x 2 columns.
  std::vector<float> p{1, 0, 0, 1, 0.5f, 0.5f};
  std::vector<float> s = SmoothRows(p, 3, 2, {1, 2, 1});
  EXPECT_NEAR(s[0], (2 * 1 + 1 * 0) / 3.0, 1e-6);
  EXPECT_NEAR(s[1], (2 * 0 + 1 * 1) / 3.0, 1e-6);
  EXPECT_NEAR(s[2], (1 + 0 + 0.5) / 4.0, 1e-6);
  EXPECT_NEAR(s[3], (0 + 2 + 0.5) / 4.0, 1e-6);
  EXPECT_NEAR(s[4], (1 * 0 + 2 * 0.5) / 3.0, 1e-6);
  for (int r = 0; r < 3; ++r) EXPECT_NEAR(s[2 * r] + s[2 * r + 1], 1.0, 1e-6);
  EXPECT_EQ(SmoothRows(p, 3, 2, {}), p);
}

TEST(PredictTest, OneRowPerWindowLastOnePadded) {
  PredictOptions options;
  options.checkpoints = {SaveModel("rows", {"b", "a", "c"})};
  options.window_s = 0.5;
  options.threads = 1;
  options.device = "cpu";
  auto predictor = Predictor::Create(options);
  ASSERT_TRUE(predictor.ok()) << predictor.status();
  Predictor& p = **predictor;
  EXPECT_EQ(p.class_names(), (std::vector<std::string>{"b", "a", "c"}));
  EXPECT_EQ(p.window_samples(), 16000);
  EXPECT_EQ(p.batch_windows(), 4);  // infer_bs x batch_size
  EXPECT_EQ(p.tta(), 1);
  EXPECT_EQ(p.NumWindows(0), 1);
  EXPECT_EQ(p.NumWindows(16000), 1);
  EXPECT_EQ(p.NumWindows(16001), 2);
  for (int64_t n : {int64_t{0}, int64_t{16000}, int64_t{40000}, int64_t{16000 * 9 + 5}}) {
    auto probs = p.PredictWaveform(Noise(n, 1));
    ASSERT_TRUE(probs.ok()) << probs.status();
    ASSERT_EQ(static_cast<int64_t>(probs->size()), p.NumWindows(n) * 3) << n;
    for (int64_t r = 0; r < p.NumWindows(n); ++r) {
      double sum = 0;
      for (int c = 0; c < 3; ++c) {
        float v = (*probs)[static_cast<size_t>(r * 3 + c)];
        EXPECT_TRUE(v >= 0 && v <= 1) << v;
        sum += v;
      }
      EXPECT_NEAR(sum, 1.0, 1e-5);
    }
  }
  // A window's probabilities do not depend on the batch it was computed in.
  std::vector<float> wave = Noise(16000 * 9 + 5, 2);
  auto batched = p.PredictWaveform(wave);
  options.batch_windows = 1;
  auto single = Predictor::Create(options);
  ASSERT_TRUE(single.ok());
  auto one_by_one = (*single)->PredictWaveform(wave);
  ASSERT_TRUE(batched.ok() && one_by_one.ok());
  for (size_t i = 0; i < batched->size(); ++i) EXPECT_NEAR((*batched)[i], (*one_by_one)[i], 1e-5);
}

TEST(PredictTest, EnsembleAndTtaAverage) {
  PredictOptions options;
  options.checkpoints = {SaveModel("ens_a", {"x", "y"}), SaveModel("ens_b", {"x", "y"})};
  options.window_s = 0.5;
  options.device = "cpu";
  std::vector<float> wave = Noise(16000 * 3, 3);
  std::vector<std::vector<float>> single;
  for (const std::string& ckpt : options.checkpoints) {
    PredictOptions one = options;
    one.checkpoints = {ckpt};
    auto p = Predictor::Create(one);
    ASSERT_TRUE(p.ok()) << p.status();
    auto probs = (*p)->PredictWaveform(wave);
    ASSERT_TRUE(probs.ok());
    single.push_back(*probs);
  }
  auto ensemble = Predictor::Create(options);
  ASSERT_TRUE(ensemble.ok()) << ensemble.status();
  auto probs = (*ensemble)->PredictWaveform(wave);
  ASSERT_TRUE(probs.ok());
  for (size_t i = 0; i < probs->size(); ++i) {
    EXPECT_NEAR((*probs)[i], 0.5 * (single[0][i] + single[1][i]), 1e-5);
  }
  options.tta = 3;
  auto tta = Predictor::Create(options);
  ASSERT_TRUE(tta.ok());
  EXPECT_EQ((*tta)->tta(), 3);
  auto tta_probs = (*tta)->PredictWaveform(wave);
  ASSERT_TRUE(tta_probs.ok());
  ASSERT_EQ(tta_probs->size(), probs->size());
}

// An ensemble of a softmax (CCE) and a sigmoid (BCE) model is refused naming both: their rows
// do not average (softmax rows sum to 1). A checkpoint whose weights are not finite (a run that
// diverged) is refused naming it and the first tensor: every cell would have been "nan".
TEST(PredictTest, RefusesMixedActivationsAndWeightsThatAreNotFinite) {
  PredictOptions options;
  options.checkpoints = {SaveModel("act_softmax", {"x", "y"}), SaveModel("act_sigmoid", {"x", "y"}, -1, "sigmoid")};
  options.window_s = 0.5;
  options.device = "cpu";
  auto mixed = Predictor::Create(options);
  ASSERT_FALSE(mixed.ok());
  EXPECT_EQ(mixed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(mixed.status().message()),
              HasSubstr("ensemble checkpoints end in different activations: " + options.checkpoints[1] +
                        " in sigmoid (loss BCE), " + options.checkpoints[0] + " in softmax (loss CCE)"));
  options.checkpoints = {options.checkpoints[1]};
  EXPECT_TRUE(Predictor::Create(options).ok());  // a sigmoid model alone
  options.checkpoints = {SaveModel("weights_nonfinite", {"x", "y"})};
  auto diverged = Predictor::Create(options);
  ASSERT_FALSE(diverged.ok());
  EXPECT_EQ(diverged.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(diverged.status().message()),
              HasSubstr(options.checkpoints[0] + ": 1 of the model's tensors are not finite, the first '"));
}

// Rows of `wave` computed one view at a time from the checkpoint's model and front end (no
// batching, no streaming): row i averages the model's probabilities on the views of window i
// shifted by TtaShifts(tta, window), zeros outside the recording; the last window zero-padded.
std::vector<float> ReferenceRows(const std::string& ckpt, const std::vector<float>& wave, int64_t window, int tta) {
  std::vector<float> out;
  auto meta = ReadCheckpointMeta(ckpt);
  EXPECT_TRUE(meta.ok()) << meta.status();
  if (!meta.ok()) return out;
  auto config = common::ParsePipelineConfig(meta->config_yaml, "reference");
  EXPECT_TRUE(config.ok()) << config.status();
  if (!config.ok()) return out;
  auto model = BuildClassifier(config->model, 1, meta->num_classes);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return out;
  EXPECT_TRUE(RestoreCheckpoint(ckpt, **model, nullptr).ok());
  (*model)->eval();
  auto frontend = MelFrontend::Create(config->frontend, config->augment, config->data.sample_rate);
  EXPECT_TRUE(frontend.ok()) << frontend.status();
  if (!frontend.ok()) return out;
  const int64_t n = static_cast<int64_t>(wave.size());
  const int64_t rows = std::max<int64_t>(1, (n + window - 1) / window);
  const std::vector<int64_t> shifts = TtaShifts(tta, window);
  torch::NoGradGuard no_grad;
  for (int64_t i = 0; i < rows; ++i) {
    at::Tensor sum = at::zeros({meta->num_classes});
    for (int64_t shift : shifts) {
      at::Tensor view = at::zeros({1, window});
      float* x = view.data_ptr<float>();
      for (int64_t j = 0; j < window; ++j) {
        const int64_t from = i * window + shift + j;
        if (from >= 0 && from < n) x[j] = wave[static_cast<size_t>(from)];
      }
      sum += (*model)->Probabilities((*model)->forward((*frontend)->Forward(view)).to(at::kFloat))[0];
    }
    sum /= static_cast<double>(shifts.size());
    for (int64_t k = 0; k < meta->num_classes; ++k) out.push_back(sum[k].item<float>());
  }
  return out;
}

// Each row is the model on its own window (the last one zero-padded) and, with TTA, the average of
// its shifted views (zeros outside the recording): computed one view at a time (ReferenceRows),
// against PredictWaveform's batched rows.
TEST(PredictTest, EachRowIsTheModelOnItsWindowAndTtaAveragesTheShiftedViews) {
  const std::string ckpt = SaveModel("rows", {"x", "y", "z"});
  PredictOptions options;
  options.checkpoints = {ckpt};
  options.window_s = 0.5;
  options.device = "cpu";
  const int64_t window = 16000;  // 0.5 s at the checkpoint's 32 kHz
  const std::vector<float> wave = Noise(window * 3 + window / 3, 9);  // 4 windows, the last padded
  for (int tta : {1, 3}) {
    options.tta = tta;
    auto predictor = Predictor::Create(options);
    ASSERT_TRUE(predictor.ok()) << predictor.status();
    ASSERT_EQ((*predictor)->window_samples(), window);
    auto rows = (*predictor)->PredictWaveform(wave);
    ASSERT_TRUE(rows.ok()) << rows.status();
    ASSERT_EQ(rows->size(), 4u * 3u);
    const std::vector<float> reference = ReferenceRows(ckpt, wave, window, tta);
    ASSERT_EQ(reference.size(), rows->size());
    for (size_t k = 0; k < rows->size(); ++k) {
      EXPECT_NEAR((*rows)[k], reference[k], 1e-5) << "tta " << tta << " window " << k / 3 << " class " << k % 3;
    }
  }
}

// With train.ema_eval, validation and best.pt use the averaged weights; last.pt holds the raw
// ones and the average (group "ema_state"). Predicting from last.pt must use the average, as
// the epoch's val_* did: it equals a best.pt of the same epoch. Without ema_eval the raw
// weights are the validated ones.
TEST(PredictTest, ALastCheckpointOfAnEmaEvalRunPredictsWithTheAverage) {
  common::PipelineConfig config;
  config.model.name = "small_cnn";
  config.frontend.in_channels = 1;
  config.frontend.n_mels = 32;
  config.train.ema_decay = 0.9;
  config.train.ema_eval = true;
  for (auto& [name, stage] : config.stages) stage.train = config.train;
  torch::manual_seed(11);
  auto raw = BuildClassifier(config.model, 1, 3);
  auto averaged = BuildClassifier(config.model, 1, 3);
  ASSERT_TRUE(raw.ok() && averaged.ok());
  // The average: other weights, the same buffers (the EMA does not average buffers).
  {
    torch::NoGradGuard no_grad;
    auto from = (*raw)->named_buffers();
    for (auto& b : (*averaged)->named_buffers()) b.value().copy_(from[b.key()]);
  }
  WeightEma ema(**averaged, 0.9, 0);
  CheckpointMeta meta;
  meta.stage = "finetune";
  meta.model_name = "small_cnn";
  meta.num_classes = 3;
  meta.in_channels = 1;
  meta.class_names = {"a", "b", "c"};
  auto save = [&](const std::string& name, const common::PipelineConfig& c, ClassifierImpl& model,
                  const CheckpointGroups& groups) {
    meta.config_yaml = common::PipelineConfigToYaml(c);
    const std::string path = ::testing::TempDir() + "/predict_test_" + name + ".pt";
    EXPECT_TRUE(SaveCheckpoint(path, model, nullptr, meta, {}, groups).ok());
    return path;
  };
  const std::string last = save("ema_last", config, **raw, {{"ema_state", ema.ExportState()}});
  const std::string best = save("ema_best", config, **averaged, {});
  common::PipelineConfig no_eval = config;
  no_eval.train.ema_eval = false;
  for (auto& [name, stage] : no_eval.stages) stage.train = no_eval.train;
  const std::string last_no_eval = save("ema_last_no_eval", no_eval, **raw, {{"ema_state", ema.ExportState()}});
  const std::string plain = save("ema_raw", no_eval, **raw, {});

  const std::vector<float> wave = Noise(16000 * 2, 7);
  auto predict = [&](const std::string& ckpt) {
    PredictOptions options;
    options.checkpoints = {ckpt};
    options.window_s = 0.5;
    options.device = "cpu";
    auto p = Predictor::Create(options);
    EXPECT_TRUE(p.ok()) << p.status();
    auto probs = (*p)->PredictWaveform(wave);
    EXPECT_TRUE(probs.ok()) << probs.status();
    return *probs;
  };
  // A last.pt of such a run without the group (written before it was): its optimizer state
  // says it holds the raw weights, which predict uses, and says so (it said "averaged").
  meta.config_yaml = common::PipelineConfigToYaml(config);
  const std::string old_last = ::testing::TempDir() + "/predict_test_ema_old_last.pt";
  AdamOptimizer adam(**raw, AdamSettings{});
  ASSERT_TRUE(SaveCheckpoint(old_last, **raw, &adam, meta, {}, {}).ok());
  auto used = UseValidatedWeights(old_last, config.train, **averaged);
  ASSERT_TRUE(used.ok()) << used.status();
  EXPECT_FALSE(*used);
  auto used_best = UseValidatedWeights(best, config.train, **averaged);
  ASSERT_TRUE(used_best.ok()) << used_best.status();
  EXPECT_TRUE(*used_best);
  const std::vector<float> from_last = predict(last), from_best = predict(best);
  const std::vector<float> from_raw = predict(plain), from_no_eval = predict(last_no_eval);
  ASSERT_EQ(from_last.size(), from_best.size());
  double differs = 0;
  for (size_t i = 0; i < from_last.size(); ++i) {
    EXPECT_NEAR(from_last[i], from_best[i], 1e-6) << i;
    EXPECT_NEAR(from_no_eval[i], from_raw[i], 1e-6) << i;
    differs = std::max<double>(differs, std::abs(from_raw[i] - from_best[i]));
  }
  EXPECT_GT(differs, 1e-4);  // the two weight sets predict differently
}

TEST(PredictTest, RefusesCheckpointsWithoutLabelsOrWithDifferentLabelSets) {
  PredictOptions options;
  options.device = "cpu";
  options.checkpoints = {SaveModel("nolabels", {}, 3)};
  auto st = Predictor::Create(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(st.message()), HasSubstr("has no class names"));

  options.checkpoints = {SaveModel("mismatch", {"a", "b"}, 3)};
  st = Predictor::Create(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(st.message()), HasSubstr("2 class names for 3 model outputs"));

  options.checkpoints = {SaveModel("set_a", {"a", "b", "c"}), SaveModel("set_b", {"a", "c", "b"})};
  st = Predictor::Create(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(st.message()), HasSubstr("different label sets"));
  EXPECT_THAT(std::string(st.message()), HasSubstr("column 2: 'c' vs 'b'"));

  options.checkpoints = {SaveModel("set_c", {"a", "b", "c"}), SaveModel("set_d", {"a", "b"})};
  st = Predictor::Create(options).status();
  EXPECT_THAT(std::string(st.message()), HasSubstr("has 2 classes"));

  std::string text = ::testing::TempDir() + "/predict_test_text.pt";
  std::ofstream(text) << "hello";
  options.checkpoints = {text};
  st = Predictor::Create(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("not an aviary checkpoint"));

  options.checkpoints = {SaveModel("ok", {"a"})};
  options.smooth = {1, 1};
  EXPECT_EQ(Predictor::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PredictTest, RunSkipsUndecodableFilesAndWritesTheHeader) {
  PredictOptions options;
  options.checkpoints = {SaveModel("run", {"a", "b"})};
  options.device = "cpu";
  auto p = Predictor::Create(options);
  ASSERT_TRUE(p.ok());
  std::string dir = Dir("run");
  std::ofstream(dir + "/empty.ogg").close();
  std::ofstream(dir + "/text.ogg") << "<html>404</html>\n";
  auto files = ListAudioFiles(dir);
  ASSERT_TRUE(files.ok()) << files.status();
  ASSERT_EQ(files->size(), 2u);
  std::ostringstream csv;
  int calls = 0;
  auto report = (*p)->Run(*files, csv, [&](const PredictProgress& progress) {
    ++calls;
    EXPECT_EQ(progress.files_total, 2);
  });
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(csv.str(), "row_id,a,b\n");
  EXPECT_EQ(report->files_predicted, 0);
  ASSERT_EQ(report->skipped.size(), 2u);
  EXPECT_EQ(report->skipped[0].reason, "empty");
  EXPECT_EQ(report->skipped[1].reason, "not_audio");
}

// A mono 16-bit PCM WAV of `samples` (in [-1, 1]) at `rate`.
void WriteWav(const std::string& path, const std::vector<float>& samples, int rate) {
  auto le = [](uint32_t v, int n) {
    std::string s;
    for (int k = 0; k < n; ++k) s.push_back(static_cast<char>((v >> (8 * k)) & 0xff));
    return s;
  };
  std::string data;
  for (float x : samples) data += le(static_cast<uint16_t>(static_cast<int16_t>(std::lround(x * 32767.0f))), 2);
  const uint32_t n = static_cast<uint32_t>(data.size());
  std::ofstream(path, std::ios::binary) << "RIFF" << le(36 + n, 4) << "WAVEfmt " << le(16, 4) << le(1, 2)
                                        << le(1, 2) << le(static_cast<uint32_t>(rate), 4)
                                        << le(static_cast<uint32_t>(rate) * 2, 4) << le(2, 2) << le(16, 2)
                                        << "data" << le(n, 4) << data;
}

// A CPU predictor of one small model with classes a and b (saved as `name`), windows of `window_s`.
std::unique_ptr<Predictor> TwoClassPredictor(const std::string& name, double window_s) {
  PredictOptions options;
  options.checkpoints = {SaveModel(name, {"a", "b"})};
  options.window_s = window_s;
  options.device = "cpu";
  auto p = Predictor::Create(options);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(*p) : nullptr;
}

// A window of a fraction of a sample is refused (its rows would be the rounded length while
// their ids count whole windows); one of whole samples, even of a fraction of a millisecond, is not.
TEST(PredictTest, AWindowOfAFractionOfASampleIsRefused) {
  PredictOptions options;
  options.checkpoints = {SaveModel("fraction", {"a", "b"})};
  options.device = "cpu";
  options.window_s = 0.50001 + 1.0 / 64000;  // 16000.82 samples at 32 kHz
  auto refused = Predictor::Create(options);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "window: ")) << refused.status();
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "not a whole number")) << refused.status();
  // A fraction of a sample within a millionth of the window (5.000004 s: 160000.128 samples).
  options.window_s = 5.000004;
  refused = Predictor::Create(options);
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "not a whole number")) << refused.status();
  options.window_s = 16001.0 / 32000;
  auto whole = Predictor::Create(options);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ((*whole)->window_samples(), 16001);
}

// A silent file keeps its rows (all-zero input; counted as silent), as a file with sound does:
// a submission needs a row for every window of every soundscape.
TEST(PredictTest, RunPredictsSilentFilesAndCountsThem) {
  std::unique_ptr<Predictor> p = TwoClassPredictor("silent", 0.5);
  ASSERT_NE(p, nullptr);
  std::string dir = Dir("silent");
  WriteWav(dir + "/quiet.wav", std::vector<float>(16000 * 3 + 100, 0.0f), 32000);
  WriteWav(dir + "/sound.wav", Noise(16000 * 2, 5), 32000);
  auto files = ListAudioFiles(dir);
  ASSERT_TRUE(files.ok()) << files.status();
  std::ostringstream csv;
  auto report = p->Run(*files, csv, nullptr);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->skipped.empty()) << report->skipped[0].message;
  EXPECT_EQ(report->files_predicted, 2);
  EXPECT_EQ(report->silent_files, 1);
  EXPECT_EQ(report->rows, 4 + 2);
  std::vector<std::string> ids;
  std::istringstream lines(csv.str());
  for (std::string line; std::getline(lines, line);) ids.push_back(line.substr(0, line.find(',')));
  EXPECT_EQ(ids, (std::vector<std::string>{"row_id", "quiet_0.5", "quiet_1", "quiet_1.5", "quiet_2",
                                           "sound_0.5", "sound_1"}));
}

// A row id is a CSV field like the header's: quoted when the file's name holds a comma or a
// quote (the rows had one field too many, and pandas or `aviary score` refused the submission).
TEST(PredictTest, RowIdsAreQuotedWhenTheNameNeedsIt) {
  std::unique_ptr<Predictor> p = TwoClassPredictor("quoted", 1);
  ASSERT_NE(p, nullptr);
  std::string dir = Dir("quoted");
  WriteWav(dir + "/site,A.wav", Noise(32000, 3), 32000);
  std::ostringstream csv;
  auto report = p->Run({dir + "/site,A.wav"}, csv, nullptr);
  ASSERT_TRUE(report.ok()) << report.status();
  std::istringstream lines(csv.str());
  std::string header, row;
  std::getline(lines, header);
  std::getline(lines, row);
  EXPECT_EQ(row.substr(0, 12), "\"site,A_1\",0") << row;
}

TEST(PredictTest, ListAudioFilesChecksItsInput) {
  EXPECT_EQ(ListAudioFiles("/nonexistent/predict").status().code(), absl::StatusCode::kNotFound);
  std::string empty = Dir("empty_dir");
  EXPECT_EQ(ListAudioFiles(empty).status().code(), absl::StatusCode::kInvalidArgument);
  std::string dup = Dir("dup");
  std::ofstream(dup + "/1.ogg").close();
  std::ofstream(dup + "/1.wav").close();
  std::ofstream(dup + "/.hidden").close();
  auto st = ListAudioFiles(dup).status();
  EXPECT_THAT(std::string(st.message()), HasSubstr("same stem '1'"));
  std::string ok = Dir("sorted");
  std::ofstream(ok + "/b.ogg").close();
  std::ofstream(ok + "/a.ogg").close();
  auto files = ListAudioFiles(ok);
  ASSERT_TRUE(files.ok());
  EXPECT_EQ(*files, (std::vector<std::string>{ok + "/a.ogg", ok + "/b.ogg"}));
  EXPECT_EQ(*ListAudioFiles(ok + "/a.ogg"), (std::vector<std::string>{ok + "/a.ogg"}));
  // A dangling link is listed, not left out (its rows would be missing from the submission
  // without a word) and not an error for the whole folder: Run skips it as missing
  // (RunSkipsADanglingLinkAsMissing).
  std::string dangling = Dir("dangling");
  std::ofstream(dangling + "/a.ogg").close();
  std::filesystem::remove(dangling + "/b.ogg");
  std::filesystem::create_symlink(dangling + "/gone.ogg", dangling + "/b.ogg");
  files = ListAudioFiles(dangling);
  ASSERT_TRUE(files.ok()) << files.status();
  EXPECT_EQ(*files, (std::vector<std::string>{dangling + "/a.ogg", dangling + "/b.ogg"}));
  // Only audio files (by extension, any case) count for a stem: notes beside a recording do not
  // refuse the folder.
  std::string notes = Dir("notes");
  std::ofstream(notes + "/XC1.OGG").close();
  std::ofstream(notes + "/XC1.txt").close();
  files = ListAudioFiles(notes);
  ASSERT_TRUE(files.ok()) << files.status();
  EXPECT_EQ(files->size(), 2u);
  // A dangling link of a recording's stem gives no rows (Run skips it as missing): no collision.
  std::filesystem::create_symlink(notes + "/moved_away.ogg", notes + "/XC1.wav");
  files = ListAudioFiles(notes);
  ASSERT_TRUE(files.ok()) << files.status();
  EXPECT_EQ(files->size(), 3u);
  std::ofstream(notes + "/XC1.mp3").close();
  EXPECT_THAT(std::string(ListAudioFiles(notes).status().message()), HasSubstr("same stem 'XC1'"));
}

// A folder that cannot be read is said with errno's own code and the folder's name, not as
// NOT_FOUND (the folder exists). Skipped where this process reads a folder of mode 0 (root with
// CAP_DAC_OVERRIDE).
// The child's side: lists `dir` (as nobody when root, whom a folder of mode 0 does not stop) and
// exits 3 when that is PERMISSION_DENIED.
[[noreturn]] void ListAsAnotherUser(const std::string& dir) {
  if (::geteuid() == 0 && (::setgid(65534) != 0 || ::setuid(65534) != 0)) std::_Exit(2);
  const absl::Status st = ListAudioFiles(dir).status();
  std::fprintf(stderr, "%s\n", std::string(st.ToString()).c_str());
  std::_Exit(st.code() == absl::StatusCode::kPermissionDenied ? 3 : 4);
}

TEST(PredictTest, ListAudioFilesSaysWhyAFolderCannotBeRead) {
  const std::string dir = Dir("unreadable");
  std::ofstream(dir + "/a.ogg").close();
  ASSERT_EQ(::chmod(dir.c_str(), 0), 0);
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(ListAsAnotherUser(dir), ::testing::ExitedWithCode(3),
              "predict_test_unreadable: cannot open the folder: Permission denied \\(EACCES\\)");
  ::chmod(dir.c_str(), 0755);
}

// A dangling link among the audio files (a recording moved away) is one bad file: skipped and
// reported as missing, and the other files are predicted (it ended the whole run before).
TEST(PredictTest, RunSkipsADanglingLinkAsMissing) {
  std::unique_ptr<Predictor> p = TwoClassPredictor("dangling_run", 1);
  ASSERT_NE(p, nullptr);
  const std::string dir = Dir("dangling_run");
  WriteWav(dir + "/a.wav", Noise(32000 * 2, 3), 32000);
  std::filesystem::create_symlink(dir + "/moved_away.wav", dir + "/b.wav");
  auto files = ListAudioFiles(dir);
  ASSERT_TRUE(files.ok()) << files.status();
  ASSERT_EQ(files->size(), 2u);
  std::ostringstream csv;
  auto report = p->Run(*files, csv, nullptr);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->files_predicted, 1);
  EXPECT_EQ(report->rows, 2);
  ASSERT_EQ(report->skipped.size(), 1u);
  EXPECT_EQ(report->skipped[0].path, dir + "/b.wav");
  EXPECT_EQ(report->skipped[0].reason, "missing");
  EXPECT_THAT(report->skipped[0].message, HasSubstr(dir + "/b.wav"));
}

// A file not named as audio that decodes after all, with the stem of a recording predicted
// (whichever sorts first: it is taken right after the recording) or of another such file
// predicted before it: skipped and said (its row ids would repeat the other's); the run goes on.
TEST(PredictTest, RunSkipsAFileWhoseStemWasPredictedAlready) {
  std::unique_ptr<Predictor> p = TwoClassPredictor("stem", 1);
  ASSERT_NE(p, nullptr);
  std::string dir = Dir("stem");
  WriteWav(dir + "/a.wav", Noise(32000, 3), 32000);
  WriteWav(dir + "/a.bak", Noise(32000, 4), 32000);
  WriteWav(dir + "/b.wav", Noise(32000, 5), 32000);
  WriteWav(dir + "/c.bak", Noise(32000, 6), 32000);
  WriteWav(dir + "/c.old", Noise(32000, 7), 32000);
  auto files = ListAudioFiles(dir);
  ASSERT_TRUE(files.ok()) << files.status();
  ASSERT_EQ(files->size(), 5u);  // a.bak, a.wav, b.wav, c.bak, c.old
  std::ostringstream csv;
  std::vector<int64_t> bytes;
  auto report = p->Run(*files, csv, [&](const PredictProgress& progress) { bytes.push_back(progress.csv_bytes); });
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->files_predicted, 3);  // a.wav, b.wav, c.bak
  ASSERT_EQ(report->skipped.size(), 2u);
  EXPECT_EQ(report->skipped[0].path, dir + "/a.bak");
  EXPECT_EQ(report->skipped[0].reason, "duplicate_stem");
  EXPECT_THAT(report->skipped[0].message, HasSubstr("the same stem 'a' as " + dir + "/a.wav, the audio file"));
  EXPECT_EQ(report->skipped[1].path, dir + "/c.old");
  EXPECT_THAT(report->skipped[1].message, HasSubstr("the same stem 'c' as " + dir + "/c.bak (predicted)"));
  EXPECT_EQ(csv.str().find("\na_1,"), csv.str().rfind("\na_1,"));  // one row a_1, a.wav's
  // The CSV's length after each file's rows (a failed write keeps whole files only), in the
  // order taken: a.wav, a.bak, b.wav, c.bak, c.old.
  ASSERT_EQ(bytes.size(), 5u);
  EXPECT_LT(static_cast<int64_t>(csv.str().find('\n') + 1), bytes[0]);  // a.wav's rows
  EXPECT_EQ(bytes[0], bytes[1]);  // the skipped a.bak wrote nothing
  EXPECT_LT(bytes[1], bytes[2]);
  EXPECT_EQ(bytes[3], bytes[4]);  // the skipped c.old wrote nothing
  EXPECT_EQ(bytes[4], static_cast<int64_t>(csv.str().size()));
}

// A recording whose audio-named file gives no rows (an empty XC1.ogg from a failed conversion)
// is predicted from the other file of its stem (XC1.bwf, which libsndfile reads; it sorts
// first): the stem got no rows at all, both skipped.
TEST(PredictTest, AStemsOtherFileIsPredictedWhenItsAudioFileGivesNoRows) {
  std::unique_ptr<Predictor> p = TwoClassPredictor("stem_broken", 1);
  ASSERT_NE(p, nullptr);
  std::string dir = Dir("stem_broken");
  std::ofstream(dir + "/XC1.ogg").close();  // empty
  WriteWav(dir + "/XC1.bwf", Noise(64000, 8), 32000);
  auto files = ListAudioFiles(dir);
  ASSERT_TRUE(files.ok()) << files.status();
  ASSERT_EQ(files->size(), 2u);  // XC1.bwf, XC1.ogg
  std::ostringstream csv;
  auto report = p->Run(*files, csv, nullptr);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->files_predicted, 1);
  EXPECT_EQ(report->rows, 2);
  ASSERT_EQ(report->skipped.size(), 1u);
  EXPECT_EQ(report->skipped[0].path, dir + "/XC1.ogg");
  EXPECT_EQ(report->skipped[0].reason, "empty");
  EXPECT_THAT(csv.str(), HasSubstr("\nXC1_1,"));
  EXPECT_THAT(csv.str(), HasSubstr("\nXC1_2,"));
}

// Options out of range are refused at Create, naming each value (the streaming ones included).
TEST(PredictTest, CreateRefusesOptionsOutOfRange) {
  PredictOptions options;
  options.checkpoints = {SaveModel("options", {"a", "b"})};
  options.device = "cpu";
  for (auto [set, said] : std::vector<std::pair<std::function<void(PredictOptions*)>, std::string>>{
           {[](PredictOptions* o) { o->chunk_samples = -1; }, "chunk samples -1"},
           {[](PredictOptions* o) { o->progress_interval_s = -0.5; }, "progress interval -0.5"},
           {[](PredictOptions* o) { o->prefetch = 0; }, "prefetch 0"},
           {[](PredictOptions* o) { o->decode_threads = 0; }, "decode threads 0"}}) {
    PredictOptions bad = options;
    set(&bad);
    auto p = Predictor::Create(bad);
    ASSERT_FALSE(p.ok()) << said;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(p.status().message(), HasSubstr(said));
  }
}

// A mono 32-bit float WAV of `samples` at `rate` (exact samples, NaN included).
void WriteFloatWav(const std::string& path, const std::vector<float>& samples, int rate) {
  auto le = [](uint32_t v, int n) {
    std::string s;
    for (int k = 0; k < n; ++k) s.push_back(static_cast<char>((v >> (8 * k)) & 0xff));
    return s;
  };
  std::string data(samples.size() * 4, '\0');
  std::memcpy(data.data(), samples.data(), data.size());  // little-endian IEEE floats on x86/arm
  const uint32_t n = static_cast<uint32_t>(data.size());
  std::ofstream(path, std::ios::binary) << "RIFF" << le(36 + n, 4) << "WAVEfmt " << le(16, 4) << le(3, 2)
                                        << le(1, 2) << le(static_cast<uint32_t>(rate), 4)
                                        << le(static_cast<uint32_t>(rate) * 4, 4) << le(4, 2) << le(32, 2)
                                        << "data" << le(n, 4) << data;
}

// The probabilities of a CSV's rows (row ids dropped), row-major.
std::vector<float> CsvValues(const std::string& csv) {
  std::vector<float> values;
  std::istringstream lines(csv);
  std::string line;
  std::getline(lines, line);  // the header
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::string field;
    std::getline(fields, field, ',');  // row_id
    while (std::getline(fields, field, ',')) values.push_back(std::stof(field));
  }
  return values;
}

// A file streams through inference: its samples reach the models in the decoder's pieces (here
// 5000 at a time) and a block of `batch` windows runs once the samples it reads are there, so
// only about a block is held, not the file; the rows are those of the file taken whole, to the
// bit, and the model's own on each view (ReferenceRows), TTA shifts and smoothing across the
// blocks' edges included.
TEST(PredictTest, ALongFileStreamsThroughInferenceWithTheWholeFileRows) {
  PredictOptions options;
  options.checkpoints = {SaveModel("stream", {"a", "b", "c"})};
  options.window_s = 0.5;  // 16000 samples
  options.batch_windows = 3;
  options.tta = 3;         // shifts 0, +2667, -2667
  options.smooth = {0.25, 0.5, 0.25};
  options.threads = 1;
  options.device = "cpu";
  options.progress_interval_s = 0;
  const std::string dir = Dir("stream");
  const std::vector<float> wave = Noise(16000 * 80 + 777, 11);  // 40 s: 81 rows, 27 blocks
  WriteFloatWav(dir + "/long.wav", wave, 32000);
  WriteFloatWav(dir + "/short.wav", Noise(20000, 12), 32000);
  const std::vector<std::string> files = {dir + "/long.wav", dir + "/short.wav"};

  auto run = [&](int64_t chunk, int decoders, int prefetch, PredictReport* report) {
    PredictOptions o = options;
    o.chunk_samples = chunk;
    o.decode_threads = decoders;
    o.prefetch = prefetch;
    auto p = Predictor::Create(o);
    EXPECT_TRUE(p.ok()) << p.status();
    if (!p.ok()) return std::string();
    std::ostringstream csv;
    std::vector<PredictProgress> calls;
    auto r = (*p)->Run(files, csv, [&](const PredictProgress& progress) { calls.push_back(progress); });
    EXPECT_TRUE(r.ok()) << r.status();
    if (r.ok()) *report = *r;
    // A call after each file, and within the long one after each block that ran as its samples
    // came (the interval is 0), repeating the whole files' counts.
    std::vector<double> within;
    int64_t files_done = 0;
    for (const PredictProgress& c : calls) {
      if (c.file_audio_seconds > 0) {
        EXPECT_EQ(c.files_done, 0);
        EXPECT_EQ(c.rows, 0);
        EXPECT_EQ(c.csv_bytes, static_cast<int64_t>(strlen("row_id,a,b,c\n")));
        within.push_back(c.file_audio_seconds);
      } else {
        EXPECT_EQ(c.files_done, ++files_done);
      }
    }
    EXPECT_EQ(files_done, 2);
    EXPECT_FALSE(within.empty());
    EXPECT_TRUE(std::is_sorted(within.begin(), within.end()));
    for (double s : within) EXPECT_LE(s, 40.0);
    return csv.str();
  };
  PredictReport streamed, whole;
  const std::string pieces = run(5000, 2, 1, &streamed);
  // A chunk larger than the file: the decoder is never held back (inference still takes the
  // samples in pieces of its own, whatever is there when it wakes).
  const std::string at_once = run(int64_t{1} << 24, 1, 2, &whole);
  EXPECT_EQ(streamed.rows, 81 + 2);
  EXPECT_TRUE(streamed.skipped.empty());
  EXPECT_EQ(pieces, at_once);
  // Held: a block's span (3 x 16000 + 2 x 2667) and what came with the piece that completed it
  // (at most a chunk and a decoder block of 16384): under 80000 of the file's 1280777.
  EXPECT_GT(streamed.peak_file_samples, 3 * 16000);
  EXPECT_LT(streamed.peak_file_samples, 80000);

  std::vector<float> expected = ReferenceRows(options.checkpoints[0], wave, 16000, 3);
  ASSERT_EQ(expected.size(), 81u * 3u);
  expected = SmoothRows(expected, 81, 3, options.smooth);
  const std::vector<float> got = CsvValues(pieces);
  ASSERT_EQ(got.size(), (81u + 2u) * 3u);
  for (size_t k = 0; k < expected.size(); ++k) {
    EXPECT_NEAR(got[k], expected[k], 1e-5) << "row " << k / 3 << " class " << k % 3;
  }
}

// A NaN late in a long file ends its decode there: the file is skipped (non_finite, no rows)
// whatever blocks of its windows went through the models before; the next file is predicted.
TEST(PredictTest, AFileFoundNonFiniteWhileStreamingHasNoRows) {
  std::unique_ptr<Predictor> p = TwoClassPredictor("stream_nan", 0.5);
  ASSERT_NE(p, nullptr);
  const std::string dir = Dir("stream_nan");
  std::vector<float> wave = Noise(16000 * 60, 13);
  wave[16000 * 50 + 5] = std::nanf("");
  WriteFloatWav(dir + "/a_nan.wav", wave, 32000);
  WriteFloatWav(dir + "/b.wav", Noise(16000 * 2, 14), 32000);
  auto files = ListAudioFiles(dir);
  ASSERT_TRUE(files.ok()) << files.status();
  std::ostringstream csv;
  auto report = p->Run(*files, csv, nullptr);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->skipped.size(), 1u);
  EXPECT_EQ(report->skipped[0].reason, "non_finite");
  EXPECT_EQ(report->files_predicted, 1);
  EXPECT_EQ(csv.str().find("a_nan_"), std::string::npos) << csv.str().substr(0, 200);
  EXPECT_EQ(report->rows, 2);
}

// A sample past the decoder's damage threshold (1e8; finite) ends the streamed decode there, as
// a NaN does: the file was inferred to its end (hours on a long one) and only then skipped.
TEST(PredictTest, AHugeSampleEndsTheStreamedDecodeWhereItIs) {
  PredictOptions options;
  options.checkpoints = {SaveModel("stream_huge", {"a", "b"})};
  options.window_s = 0.5;
  options.batch_windows = 2;
  options.threads = 1;
  options.device = "cpu";
  options.progress_interval_s = 0;
  options.chunk_samples = 8000;
  options.decode_threads = 1;
  const std::string dir = Dir("stream_huge");
  std::vector<float> wave = Noise(16000 * 60, 15);  // 30 s
  wave[16000 * 10 + 3] = 1e9f;                      // at 5 s
  WriteFloatWav(dir + "/a.wav", wave, 32000);
  auto p = Predictor::Create(options);
  ASSERT_TRUE(p.ok()) << p.status();
  std::ostringstream csv;
  double furthest = 0;
  auto report = (*p)->Run({dir + "/a.wav"}, csv, [&](const PredictProgress& c) {
    furthest = std::max(furthest, c.file_audio_seconds);
  });
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->skipped.size(), 1u);
  EXPECT_EQ(report->skipped[0].reason, "non_finite");
  EXPECT_EQ(report->rows, 0);
  EXPECT_LT(furthest, 8.0);  // the inference's position in the file, not a time
}

// An exception in the file loop (here the progress callback's; an allocation, a stream set to
// throw) ends the run with a status naming the file, the decoders joined: it ended the process.
TEST(PredictTest, AnExceptionInTheFileLoopIsAStatus) {
  std::unique_ptr<Predictor> p = TwoClassPredictor("throws", 0.5);
  ASSERT_NE(p, nullptr);
  const std::string dir = Dir("throws");
  WriteFloatWav(dir + "/a.wav", Noise(16000 * 4, 16), 32000);
  WriteFloatWav(dir + "/b.wav", Noise(16000 * 40, 17), 32000);
  std::ostringstream csv;
  auto report = p->Run({dir + "/a.wav", dir + "/b.wav"}, csv,
                       [](const PredictProgress&) { throw std::runtime_error("the callback failed"); });
  EXPECT_EQ(report.status().code(), absl::StatusCode::kInternal) << report.status();
  EXPECT_TRUE(absl::StrContains(report.status().message(), "a.wav: the callback failed")) << report.status();
}

// A long file skipped for its stem (b.bak beside b.wav) while its decoder waits in the sink
// with a chunk of it not taken: marked unwanted, its samples are dropped and the decoder goes
// on to the end (its verdict decides the reason), and the files after it are predicted (a run
// that waited for its end with the chunk neither taken nor dropped would never end).
TEST(PredictTest, AStemDuplicateWhoseDecoderWaitsIsDrainedNotWaitedFor) {
  PredictOptions options;
  options.checkpoints = {SaveModel("stream_dup", {"a", "b"})};
  options.window_s = 0.5;
  options.device = "cpu";
  options.chunk_samples = 3000;
  options.decode_threads = 3;
  options.prefetch = 2;
  auto p = Predictor::Create(options);
  ASSERT_TRUE(p.ok()) << p.status();
  const std::string dir = Dir("stream_dup");
  WriteFloatWav(dir + "/a.wav", Noise(16000 * 20, 21), 32000);
  WriteFloatWav(dir + "/b.bak", Noise(16000 * 30, 22), 32000);
  WriteFloatWav(dir + "/b.wav", Noise(16000 * 4, 23), 32000);
  auto files = ListAudioFiles(dir);
  ASSERT_TRUE(files.ok()) << files.status();
  ASSERT_EQ(files->size(), 3u);  // a.wav, b.bak, b.wav
  std::ostringstream csv;
  auto report = (*p)->Run(*files, csv, nullptr);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->skipped.size(), 1u);
  EXPECT_EQ(report->skipped[0].path, dir + "/b.bak");
  EXPECT_EQ(report->skipped[0].reason, "duplicate_stem");
  EXPECT_EQ(report->files_predicted, 2);
  EXPECT_EQ(report->rows, 20 + 4);
}

// A stream that takes `limit` bytes and then fails, as a full disk does.
class FullDisk : public std::streambuf {
 public:
  explicit FullDisk(size_t limit) : limit_(limit) {}
  std::string written;

 protected:
  int_type overflow(int_type c) override {
    if (c == traits_type::eof()) return traits_type::not_eof(c);
    if (written.size() >= limit_) return traits_type::eof();
    written.push_back(static_cast<char>(c));
    return c;
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    std::streamsize k = 0;
    while (k < n && overflow(traits_type::to_int_type(s[k])) != traits_type::eof()) ++k;
    return k;
  }

 private:
  size_t limit_;
};

// A stream that cannot take the header ends the run before any file is decoded, said as the
// header's failure (it was not checked: the first file's rows were blamed, or with no rows to
// write the run ended well with an empty CSV).
TEST(PredictTest, AFailedHeaderWriteEndsTheRunAtOnce) {
  std::unique_ptr<Predictor> p = TwoClassPredictor("header_full", 0.5);
  ASSERT_NE(p, nullptr);
  const std::string dir = Dir("header_full");
  WriteWav(dir + "/a.wav", Noise(16000, 41), 32000);
  FullDisk disk(4);  // "row_" of the header
  std::ostream csv(&disk);
  int calls = 0;
  auto report = p->Run({dir + "/a.wav"}, csv, [&](const PredictProgress&) { ++calls; });
  ASSERT_FALSE(report.ok());
  EXPECT_THAT(report.status().message(), HasSubstr("writing the CSV failed at its header"));
  EXPECT_EQ(calls, 0);
}

// should_stop (SIGINT / SIGTERM in `aviary predict`) is asked before every file and every batch:
// true ends Run with CANCELLED, the CSV holding the header and the rows of the whole files before
// (as the last progress call counts them), never part of a file's rows.
TEST(PredictTest, ShouldStopEndsTheRunBetweenBatchesWithWholeFilesRows) {
  const std::string dir = Dir("stop");
  WriteFloatWav(dir + "/a.wav", Noise(16000 * 3, 51), 32000);   // 3 rows
  WriteFloatWav(dir + "/b.wav", Noise(16000 * 40, 52), 32000);  // 40 rows: 20 batches of 2
  WriteFloatWav(dir + "/c.wav", Noise(16000 * 2, 53), 32000);
  const std::vector<std::string> files = {dir + "/a.wav", dir + "/b.wav", dir + "/c.wav"};
  PredictOptions options;
  options.checkpoints = {SaveModel("stop", {"a", "b"})};
  options.window_s = 0.5;
  options.batch_windows = 2;
  options.device = "cpu";
  options.progress_interval_s = 0;
  options.chunk_samples = 8000;  // b.wav reaches inference in pieces: a progress call per batch
  // The stop arrives within b.wav, after some of its batches ran.
  int64_t asked = 0, asked_at_stop = 0;
  PredictProgress last;
  options.should_stop = [&] {
    ++asked;
    if (last.files_done == 1 && last.file_audio_seconds > 0) {
      if (asked_at_stop == 0) asked_at_stop = asked;
      return true;
    }
    return false;
  };
  auto p = Predictor::Create(options);
  ASSERT_TRUE(p.ok()) << p.status();
  std::ostringstream csv;
  auto report = (*p)->Run(files, csv, [&](const PredictProgress& progress) { last = progress; });
  ASSERT_FALSE(report.ok());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kCancelled) << report.status();
  EXPECT_THAT(report.status().message(), HasSubstr(dir + "/b.wav"));
  EXPECT_GT(asked, 3);  // asked per batch, not only per file
  EXPECT_EQ(asked, asked_at_stop);
  // The rows of a.wav only: b.wav's batches that ran are not written.
  EXPECT_EQ(last.files_done, 1);
  EXPECT_EQ(last.rows, 3);
  EXPECT_EQ(static_cast<int64_t>(csv.str().size()), last.csv_bytes);
  EXPECT_EQ(CsvValues(csv.str()).size(), 3u * 2u);
  EXPECT_EQ(csv.str().find("b_"), std::string::npos);

  // Asked before the first file: nothing but the header.
  PredictOptions at_once = options;
  at_once.should_stop = [] { return true; };
  auto q = Predictor::Create(at_once);
  ASSERT_TRUE(q.ok()) << q.status();
  std::ostringstream header_only;
  report = (*q)->Run(files, header_only, nullptr);
  EXPECT_EQ(report.status().code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(report.status().message(), HasSubstr("before " + dir + "/a.wav"));
  EXPECT_EQ(header_only.str(), "row_id,a,b\n");
}

// A file of fewer windows than a batch runs whole at its end (Finish): a stop is asked there, and
// between the views, not only before the blocks of a long file (a stop waited for the whole file
// x views x models). PredictWaveform feeds 40 windows in one piece (no block in Feed): its first
// ask is Finish's, its second the one between the first two views.
TEST(PredictTest, ShouldStopIsAskedAtTheFilesEndAndBetweenViews) {
  PredictOptions options;
  options.checkpoints = {SaveModel("stop_finish", {"a", "b"})};
  options.window_s = 0.5;
  options.batch_windows = 64;
  options.tta = 3;
  options.device = "cpu";
  const std::vector<float> wave = Noise(16000 * 40, 54);  // 40 windows of 0.5 s
  for (int stop_at : {1, 2, 3}) {
    int asked = 0;
    PredictOptions o = options;
    o.should_stop = [&] { return ++asked >= stop_at; };
    auto p = Predictor::Create(o);
    ASSERT_TRUE(p.ok()) << p.status();
    auto probs = (*p)->PredictWaveform(wave);
    EXPECT_EQ(probs.status().code(), absl::StatusCode::kCancelled) << "stop at ask " << stop_at;
    EXPECT_EQ(asked, stop_at);
  }
  // Through Run, stopped at its last ask (the last view of the file's one block): the CSV keeps
  // its header only, none of the file's rows.
  const std::string dir = Dir("stop_finish");
  WriteFloatWav(dir + "/a.wav", wave, 32000);
  int total = 0;
  {
    PredictOptions o = options;
    o.should_stop = [&] { ++total; return false; };
    auto p = Predictor::Create(o);
    ASSERT_TRUE(p.ok()) << p.status();
    std::ostringstream csv;
    ASSERT_TRUE((*p)->Run({dir + "/a.wav"}, csv, nullptr).ok());
  }
  int asked = 0;
  PredictOptions o = options;
  o.should_stop = [&] { return ++asked >= total; };
  auto p = Predictor::Create(o);
  ASSERT_TRUE(p.ok()) << p.status();
  std::ostringstream csv;
  auto report = (*p)->Run({dir + "/a.wav"}, csv, nullptr);
  EXPECT_EQ(report.status().code(), absl::StatusCode::kCancelled) << report.status();
  EXPECT_EQ(csv.str(), "row_id,a,b\n");
}

// On CUDA, predict computes in float32 as the CPU does: TF32 (cuDNN's default for convolutions)
// moved probabilities by up to 2.7e-3. Skipped without a CUDA device.
TEST(PredictTest, CudaPredictsWithoutTf32AsTheCpuDoes) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::globalContext().setAllowTF32CuDNN(true);  // libtorch's default, set by another user
  PredictOptions options;
  options.checkpoints = {SaveModel("tf32", {"a", "b", "c"})};
  options.window_s = 0.5;
  options.device = "cpu";
  auto cpu = Predictor::Create(options);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  options.device = "cuda";
  auto gpu = Predictor::Create(options);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_FALSE(at::globalContext().allowTF32CuBLAS());
  EXPECT_FALSE(at::globalContext().allowTF32CuDNN());
  const std::vector<float> wave = Noise(16000 * 8, 61);
  auto a = (*cpu)->PredictWaveform(wave);
  auto b = (*gpu)->PredictWaveform(wave);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(a->size(), b->size());
  for (size_t k = 0; k < a->size(); ++k) EXPECT_NEAR((*a)[k], (*b)[k], 1e-4) << k;
}

// A failed write ends the run while the next file's decoder waits in the sink: it is woken by
// the stop and the run returns (without the wake-up, Run would wait for it forever).
TEST(PredictTest, AFailedWriteStopsDecodersThatWait) {
  PredictOptions options;
  options.checkpoints = {SaveModel("stream_full", {"a", "b"})};
  options.window_s = 0.5;
  options.device = "cpu";
  options.chunk_samples = 3000;
  options.decode_threads = 2;
  auto p = Predictor::Create(options);
  ASSERT_TRUE(p.ok()) << p.status();
  const std::string dir = Dir("stream_full");
  WriteFloatWav(dir + "/a.wav", Noise(16000 * 2, 31), 32000);
  WriteFloatWav(dir + "/b.wav", Noise(16000 * 40, 32), 32000);
  WriteFloatWav(dir + "/c.wav", Noise(16000 * 40, 33), 32000);
  auto files = ListAudioFiles(dir);
  ASSERT_TRUE(files.ok()) << files.status();
  FullDisk disk(std::string("row_id,a,b\n").size() + 10);  // the header and part of a row
  std::ostream csv(&disk);
  auto report = (*p)->Run(*files, csv, nullptr);
  ASSERT_FALSE(report.ok());
  EXPECT_THAT(report.status().message(), HasSubstr("writing the CSV failed at the rows of " + dir + "/a.wav"));
}

// `aviary predict` itself (worker/tools/predict_command.cc), run as aviary-worker: what only the
// command does (its output file, its signals, its list of inputs).
class PredictCommandTest : public ::testing::Test {
 protected:
  // Starts `aviary-worker predict` with `args`, its stdout and stderr into `log_`.
  pid_t Start(const std::vector<std::string>& args) {
    log_ = dir_ + ".log";  // beside the folder: it may be the --audio folder
    std::vector<std::string> argv_text = {AVIARY_WORKER_BIN, "predict", "--device", "cpu", "--threads", "1"};
    argv_text.insert(argv_text.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& a : argv_text) argv.push_back(a.data());
    argv.push_back(nullptr);
    const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    EXPECT_GE(fd, 0);
    const pid_t pid = ::fork();
    if (pid == 0) {  // only async-signal-safe calls here
      ::dup2(fd, STDOUT_FILENO);
      ::dup2(fd, STDERR_FILENO);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(fd);
    EXPECT_GT(pid, 0);
    return pid;
  }
  // The wait status.
  static int WaitStatus(pid_t pid) {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return status;
  }
  // The exit code (128 + the signal for a process a signal ended).
  static int Wait(pid_t pid) {
    const int status = WaitStatus(pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  int Run(const std::vector<std::string>& args) { return Wait(Start(args)); }
  std::string Log() const { return Read(log_); }
  static std::string Read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  // The names in `dir` that start with `prefix`.
  static std::vector<std::string> NamesStarting(const std::string& dir, const std::string& prefix) {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
      const std::string name = e.path().filename().string();
      if (name.rfind(prefix, 0) == 0) names.push_back(name);
    }
    return names;
  }

  std::string dir_;
  std::string log_;
};

// --out as a symbolic link (a relative one here) is written through: its target gets the CSV
// and the link stays a link; no temporary file is left beside either. The rename replaced the
// link with a regular file, and its target kept the old bytes.
TEST_F(PredictCommandTest, AnOutputLinkIsWrittenThrough) {
  dir_ = Dir("cli_link");
  const std::string ckpt = SaveModel("cli_link", {"a", "b"});
  ::mkdir((dir_ + "/audio").c_str(), 0755);
  ::mkdir((dir_ + "/real").c_str(), 0755);
  WriteWav(dir_ + "/audio/x.wav", Noise(32000, 71), 32000);
  std::ofstream(dir_ + "/real/sub.csv") << "old\n";
  std::filesystem::create_symlink("real/sub.csv", dir_ + "/link.csv");
  ASSERT_EQ(Run({"--checkpoint", ckpt, "--audio", dir_ + "/audio", "--out", dir_ + "/link.csv", "--window", "0.5"}), 0)
      << Log();
  EXPECT_TRUE(std::filesystem::is_symlink(dir_ + "/link.csv"));
  const std::string csv = Read(dir_ + "/real/sub.csv");
  EXPECT_EQ(csv.rfind("row_id,a,b\nx_0.5,", 0), 0u) << csv;
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 3);
  EXPECT_THAT(NamesStarting(dir_ + "/real", "sub.csv."), ::testing::IsEmpty());
  EXPECT_THAT(NamesStarting(dir_, "link.csv."), ::testing::IsEmpty());
}

// SIGINT while a long file is in inference (after a SIGCONT): the run stops between batches, keeps the rows of the
// whole files before it as --out.partial (nothing of the long file's), removes its temporary
// file, writes no --out, says so and ends by the SIGINT. (The temporary file was left with the rows so
// far, not cut back to whole files, and no .partial.)
TEST_F(PredictCommandTest, SigintKeepsTheWholeFilesRowsAsPartial) {
  dir_ = Dir("cli_sigint");
  const std::string ckpt = SaveModel("cli_sigint", {"a", "b"});
  ::mkdir((dir_ + "/audio").c_str(), 0755);
  WriteWav(dir_ + "/audio/a.wav", Noise(32000, 72), 32000);        // 2 rows
  WriteWav(dir_ + "/audio/b.wav", Noise(32000 * 120, 73), 32000);  // 240 rows x 64 views: seconds
  const std::string out = dir_ + "/sub.csv";
  const pid_t pid = Start({"--checkpoint", ckpt, "--audio", dir_ + "/audio", "--out", out, "--window", "0.5",
                           "--tta", "64", "--batch", "2"});
  // a.wav's rows in the temporary file: b.wav is in inference.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  bool a_done = false;
  while (!a_done && std::chrono::steady_clock::now() < deadline) {
    for (const std::string& name : NamesStarting(dir_, "sub.csv.tmp.")) {
      const std::string rows = Read(dir_ + "/" + name);
      a_done = a_done || std::count(rows.begin(), rows.end(), '\n') >= 3;
    }
    if (!a_done) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(a_done) << Log();
  // A SIGCONT first (a shell's `fg` after Ctrl-Z) is no stop: the SIGINT is the one said (the
  // serving agent's handlers took the SIGCONT as mpirun's stop: exit 143, "stopped by SIGCONT").
  ASSERT_EQ(::kill(pid, SIGCONT), 0);
  ASSERT_EQ(::kill(pid, SIGINT), 0);
  // Ended by SIGINT itself once its rows are kept (a shell's loop stops there; an exit of 130 it
  // takes as a command that handled the signal, and goes on).
  const int status = WaitStatus(pid);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGINT) << status << "\n" << Log();
  const std::string partial = Read(out + ".partial");
  EXPECT_EQ(partial.rfind("row_id,a,b\na_0.5,", 0), 0u) << partial;
  EXPECT_EQ(std::count(partial.begin(), partial.end(), '\n'), 3) << partial;
  EXPECT_EQ(partial.find("b_"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(out));
  EXPECT_THAT(NamesStarting(dir_, "sub.csv.tmp."), ::testing::IsEmpty());
  EXPECT_THAT(Log(), HasSubstr("stopped by SIGINT"));
  EXPECT_THAT(Log(), HasSubstr("are in " + out + ".partial; " + out + " not written"));
}

// --out inside the --audio folder: an earlier run's .partial and a killed run's temporary file
// are not read as audio, and a dangling link there is one file skipped as missing, not the end
// of the run (it ended it with "cannot stat").
TEST_F(PredictCommandTest, OutputsAndDanglingLinksInTheAudioFolder) {
  dir_ = Dir("cli_inside");
  const std::string ckpt = SaveModel("cli_inside", {"a", "b"});
  WriteWav(dir_ + "/x.wav", Noise(32000, 74), 32000);
  std::ofstream(dir_ + "/sub.csv.partial") << "row_id,a,b\n";
  std::ofstream(dir_ + "/sub.csv.tmp.4242.123456789") << "row_id,a,b\nx_0.5,0.5";
  std::filesystem::create_symlink(dir_ + "/moved_away.wav", dir_ + "/y.wav");
  ASSERT_EQ(Run({"--checkpoint", ckpt, "--audio", dir_, "--out", dir_ + "/sub.csv", "--window", "0.5"}), 0) << Log();
  EXPECT_THAT(Log(), HasSubstr("2 rows from 1 of 2 file(s)"));
  EXPECT_THAT(Log(), HasSubstr("skipped 1 file(s) (no rows): 1 missing"));
  EXPECT_THAT(Log(), HasSubstr(dir_ + "/y.wav"));
}

}  // namespace
}  // namespace aviary::worker
