// Benchmark: aviary's training step (worker/train_step.h, what the trainer runs), timed the way
// bench/train_step_reference.py times PyTorch's (not a test; see docs/BENCHMARKS.md).
//
//   train_step_bench [--config P.yaml] [--set key=value ...] [--device cpu|cuda]
//                    [--model efficientnet_b0] [--batch 16] [--seconds 5] [--classes 182]
//                    [--input wave|mel] [--steps 10] [--warmup 3] [--rounds 1] [--threads N]
//                    [--precision auto|fp32|bf16] [--channels-last auto|on|off]
//                    [--profile FILE]
//
// wave: waveforms [B, seconds x sample_rate] on the host (pinned on CUDA) and class ids, then
// the trainer's step: augmentation, the mel front end with SpecAugment, the model (bf16
// autocast on CUDA), the loss, backward, the optimizer; the loss is read on the host every step
// as the trainer does. mel: the model step alone on random front-end-shaped input already on
// the device. Each round times `steps` steps (the device synchronized at its end); prints one
// line of key=value pairs, aviary_samples_per_s being the best round.
// --profile FILE writes the autograd profiler's per-operator table of one extra round to FILE.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/Device.h>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/version.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/config.h"
#include "common/cli.h"
#include "worker/frontend.h"
#include "worker/models.h"
#include "worker/optimizer.h"
#include "worker/train_step.h"

namespace {

int Fail(const absl::Status& st) {
  std::cerr << "train_step_bench: " << st.message() << "\n";
  return 2;
}

void Sync(const c10::Device& device, const at::Tensor& t) {
  if (device.is_cuda()) (void)t.sum().item<double>();  // waits for the stream
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("train_step_bench: samples/s of the trainer's step (front end, forward, backward, Adam)",
               "train_step_bench");
  aviary::common::ConfigureApp(&app);
  std::string config_path, profile;
  std::vector<std::string> overrides;
  std::string model_name = "efficientnet_b0", input = "wave", device_name = "cpu", precision = "auto",
              cl = "auto";
  int64_t batch = 16, classes = 182, steps = 10, warmup = 3, rounds = 1;
  int threads = 0;
  double seconds = 5.0;
  using aviary::common::AddNumber;
  app.add_option("--config", config_path, "a pipeline YAML (default: the recipe's defaults)");
  aviary::common::AddSetOption(&app, &overrides);
  app.add_option("--model", model_name, "model.name")->capture_default_str();
  AddNumber<int64_t>(&app, "--batch", &batch, "N", "samples per step", 1, 65536)->capture_default_str();
  AddNumber<int64_t>(&app, "--classes", &classes, "N", "classes", 1, 100000)->capture_default_str();
  AddNumber<int64_t>(&app, "--steps", &steps, "N", "timed steps per round", 1, 100000)->capture_default_str();
  AddNumber<int64_t>(&app, "--warmup", &warmup, "N", "untimed steps first", 0, 100000)->capture_default_str();
  AddNumber<int64_t>(&app, "--rounds", &rounds, "N", "rounds (one rate each)", 1, 1000)->capture_default_str();
  AddNumber(&app, "--threads", &threads, "N", "torch threads (0: torch's default)", 0, 1024);
  AddNumber(&app, "--seconds", &seconds, "S", "clip length", 0.1, 600.0)->capture_default_str();
  app.add_option("--input", input, "wave: the whole step; mel: from features")->check(aviary::common::OneOf({"wave", "mel"}));
  app.add_option("--device", device_name, "cpu or cuda")->check(aviary::common::OneOf({"cpu", "cuda"}));
  app.add_option("--precision", precision, "auto (bf16 autocast on CUDA) or fp32");
  app.add_option("--channels-last", cl, "auto or off");
  app.add_option("--profile", profile, "write an autograd profile (chrome trace) of one round here");
  if (std::optional<int> code = aviary::common::ParseCommandLine(&app, {argv + 1, argv + argc})) return *code;
  aviary::common::PipelineConfig config;
  if (!config_path.empty()) {
    auto loaded = aviary::common::LoadPipelineConfig(config_path, overrides);
    if (!loaded.ok()) return Fail(loaded.status());
    config = *loaded;
  }
  config.model.name = model_name;
  if (device_name == "cuda" && !at::hasCUDA()) {
    return Fail(absl::FailedPreconditionError("--device cuda: torch sees no CUDA device"));
  }
  const c10::Device device = device_name == "cuda" ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  const bool autocast = device.is_cuda() && precision != "fp32";
  const bool channels_last = cl != "off";  // auto: the trainer's layout, NHWC everywhere
  if (threads > 0) at::set_num_threads(threads);
  config.data.duration = seconds;
  config.train.batch_size = static_cast<int>(batch);
  const int64_t num_classes = classes;

  const auto format = channels_last ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous;
  auto frontend = aviary::worker::MelFrontend::Create(config.frontend, config.augment,
                                                      config.data.sample_rate, device, format);
  if (!frontend.ok()) return Fail(frontend.status());
  at::manual_seed(config.seed);
  auto model = aviary::worker::BuildClassifier(config.model, config.frontend.in_channels,
                                               static_cast<int>(num_classes));
  if (!model.ok()) return Fail(model.status());
  if (absl::Status st = aviary::worker::PlaceModel(**model, device, channels_last); !st.ok()) return Fail(st);
  aviary::worker::AdamOptimizer optimizer(**model, aviary::worker::AdamSettings{config.train.lr});
  aviary::worker::TrainStep step(config, config.train, frontend->get(), model->get(), &optimizer,
                                 /*reducer=*/nullptr, device, autocast);

  const int64_t samples = static_cast<int64_t>(seconds * config.data.sample_rate);
  const int64_t frames = (*frontend)->NumFrames(samples);
  at::Generator gen = at::detail::createCPUGenerator(0);
  at::Tensor wave = at::randn({batch, samples}, gen, at::kFloat).mul_(0.05);
  at::Tensor ids = at::randint(num_classes, {batch}, gen, at::kLong);
  if (device.is_cuda()) wave = wave.pin_memory();
  at::Tensor feats = at::rand({batch, config.frontend.in_channels, config.frontend.n_mels, frames}, gen, at::kFloat)
                         .to(device)
                         .contiguous(format);
  at::Tensor onehot = at::one_hot(ids, num_classes).to(at::kFloat).to(device);
  (*model)->train();

  int64_t counter = 0;
  auto run_step = [&]() -> absl::Status {
    aviary::worker::StepSeeds seeds{static_cast<uint64_t>(3 * counter), static_cast<uint64_t>(3 * counter + 1),
                                    static_cast<uint64_t>(3 * counter + 2)};
    ++counter;
    aviary::worker::StepForward fwd = input == "wave" ? step.Forward(wave, ids, seeds)
                                                      : step.ForwardFeatures(feats, onehot, seeds.dropout);
    (void)fwd.loss.item<double>();  // the trainer's non-finite check
    return step.Update(fwd.loss);
  };

  const auto t_start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < warmup; ++i) {
    if (absl::Status st = run_step(); !st.ok()) return Fail(st);
  }
  Sync(device, feats);
  const double warmup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::vector<double> rates;
  for (int64_t r = 0; r < rounds; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < steps; ++i) {
      if (absl::Status st = run_step(); !st.ok()) return Fail(st);
    }
    Sync(device, feats);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    rates.push_back(static_cast<double>(batch * steps) / s);
  }
  if (!profile.empty()) {
    torch::autograd::profiler::RecordProfile guard(profile);
    for (int64_t i = 0; i < steps; ++i) {
      if (absl::Status st = run_step(); !st.ok()) return Fail(st);
    }
    Sync(device, feats);
  }
  std::vector<double> sorted = rates;
  std::sort(sorted.begin(), sorted.end());
  std::printf("side=aviary torch=%s device=%s model=%s batch=%lld input=%s compile=0 bf16=%d "
              "channels_last=%d threads=%d steps=%lld rounds=%lld warmup_s=%.2f "
              "aviary_samples_per_s=%.2f aviary_median_samples_per_s=%.2f\n",
              TORCH_VERSION, device.str().c_str(), config.model.name.c_str(),
              static_cast<long long>(batch), input.c_str(), autocast ? 1 : 0, channels_last ? 1 : 0,
              at::get_num_threads(), static_cast<long long>(steps), static_cast<long long>(rounds),
              warmup_s, sorted.back(), sorted[sorted.size() / 2]);
  return 0;
}
