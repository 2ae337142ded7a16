// Benchmark: aviary's training step (worker/train_step.h, what the trainer runs), timed the way
// bench/train_step_reference.py times PyTorch's (not a test; see docs/BENCHMARKS.md).
//
//   train_step_bench [--config P.yaml] [--set key=value ...] [--device cpu|cuda]
//                    [--model efficientnet_b0] [--batch 16] [--seconds 5] [--classes 182]
//                    [--input wave|mel] [--steps 10] [--warmup 3] [--rounds 1] [--threads N]
//                    [--precision auto|fp32|bf16] [--channels-last auto|on|off]
//                    [--cudnn-benchmark auto|on|off]
//                    [--profile FILE] [--cuda-graph] [--graph-check N]
//
// wave: waveforms [B, seconds x sample_rate] on the host (pinned on CUDA) and class ids, copied
// to the device one step ahead on a copy stream, started before the step as the trainer does
// (worker/device_copy.h), then
// the trainer's step: augmentation, the mel front end with SpecAugment, the model (bf16
// autocast on CUDA), the loss, backward, the optimizer; the loss is read on the host every step
// as the trainer does. mel: the model step alone on random front-end-shaped input already on
// the device. On CUDA cuDNN picks its algorithms by benchmark (--cudnn-benchmark auto), as the
// trainer does outside train.deterministic. Each round times `steps` steps (the device synchronized at its end); prints one
// line of key=value pairs, aviary_samples_per_s being the best round.
// --profile FILE writes the autograd profiler's per-operator table of one extra round to FILE.
//
// --cuda-graph (mel input on CUDA; worker/cuda_graph_step.h, what train.cuda_graph runs):
// forward, loss and backward replayed as one CUDA graph, then the same clipping and Adam step as
// the eager step (the loss still read on the host every step). First, --graph-check N steps are
// run both ways from the same weights, optimizer state and seeds, and the line reports how far
// apart they are: graph_check_grad_rel_diff (|g_graph - g_eager| / |g_eager| over all the gradients of the
// first step), graph_check_loss_max_rel_diff (over the N losses) and
// graph_check_param_max_abs_diff (the weights after them). The timed steps start from the
// state the check left. --graph-check N without --cuda-graph runs the same check with the eager
// step on both sides: a test of the check itself (on the CPU every difference must be 0).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <fstream>
#include <iostream>
#include <memory>
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
#include "worker/cuda_graph_step.h"
#include "worker/device_copy.h"
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

// The model's weights and buffers and the optimizer's state, copied (the --graph-check).
struct Snapshot {
  std::vector<at::Tensor> model;
  aviary::worker::NamedTensors optimizer;
};

std::vector<at::Tensor> ModelTensors(aviary::worker::ClassifierImpl& model) {
  std::vector<at::Tensor> out = model.parameters();
  for (const at::Tensor& b : model.buffers()) out.push_back(b);
  return out;
}

Snapshot Take(aviary::worker::ClassifierImpl& model, const aviary::worker::AdamOptimizer& optimizer) {
  Snapshot s;
  for (const at::Tensor& t : ModelTensors(model)) s.model.push_back(t.detach().clone());
  for (const auto& [name, t] : optimizer.ExportState()) s.optimizer.emplace_back(name, t.clone());
  return s;
}

// In place: a captured graph keeps the weights' memory.
absl::Status Restore(const Snapshot& s, aviary::worker::ClassifierImpl& model,
                     aviary::worker::AdamOptimizer& optimizer) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> live = ModelTensors(model);
  for (size_t i = 0; i < live.size(); ++i) live[i].copy_(s.model[i]);
  return optimizer.ImportState(s.optimizer, "the --graph-check snapshot");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("train_step_bench: samples/s of the trainer's step (front end, forward, backward, Adam)",
               "train_step_bench");
  aviary::common::ConfigureApp(&app);
  std::string config_path, profile;
  std::vector<std::string> overrides;
  std::string model_name = "efficientnet_b0", input = "wave", device_name = "cpu", precision = "auto",
              cl = "auto", cudnn_benchmark = "auto";
  int64_t batch = 16, classes = 182, steps = 10, warmup = 3, rounds = 1;
  int threads = 0;
  double seconds = 5.0;
  bool cuda_graph = false;
  int64_t graph_check = 3;
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
  app.add_option("--cudnn-benchmark", cudnn_benchmark, "auto (on with CUDA, as the trainer), on or off")
      ->check(aviary::common::OneOf({"auto", "on", "off"}));
  app.add_option("--profile", profile, "write an autograd profile (chrome trace) of one round here");
  app.add_flag("--cuda-graph", cuda_graph, "--input mel on cuda: replay forward + backward as one CUDA graph");
  AddNumber<int64_t>(&app, "--graph-check", &graph_check, "N",
                     "steps compared with the eager step first (without --cuda-graph: eager against eager)", 0, 1000)
      ->capture_default_str();
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
  // The check with the eager step on both sides, when asked for without --cuda-graph.
  const bool self_check = !cuda_graph && app.count("--graph-check") > 0;
  if (cuda_graph && (input != "mel" || device_name != "cuda")) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--cuda-graph needs --input mel --device cuda (got --input ",
                                                        input, " --device ", device_name, ")")));
  }
  if (cuda_graph && !aviary::worker::GraphedModelStep::Built()) {
    return Fail(absl::FailedPreconditionError("--cuda-graph: this build has no CUDA torch"));
  }
  const c10::Device device = device_name == "cuda" ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  const bool autocast = device.is_cuda() && precision != "fp32";
  const bool benchmark_cudnn = device.is_cuda() && cudnn_benchmark != "off";
  if (device.is_cuda()) at::globalContext().setBenchmarkCuDNN(benchmark_cudnn);
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
  aviary::worker::DeviceCopier copier(device);
  aviary::worker::DeviceCopier::InFlight ahead;  // the next step's waveforms, on their way
  // One eager step (the trainer's); its loss.
  auto eager_step = [&]() -> absl::StatusOr<double> {
    aviary::worker::StepSeeds seeds{static_cast<uint64_t>(3 * counter), static_cast<uint64_t>(3 * counter + 1),
                                    static_cast<uint64_t>(3 * counter + 2)};
    ++counter;
    aviary::worker::StepForward fwd;
    if (input == "wave") {
      if (!ahead.tensor.defined()) ahead = copier.Start(wave);
      at::Tensor x = copier.Take(std::move(ahead));
      ahead = copier.Start(wave);  // the trainer's next batch, copied during this step
      fwd = step.Forward(x, ids, seeds);
    } else {
      fwd = step.ForwardFeatures(feats, onehot, seeds.dropout);
    }
    const double loss = fwd.loss.item<double>();  // the trainer's non-finite check
    if (absl::Status st = step.Update(fwd.loss); !st.ok()) return st;
    return loss;
  };
  // One graphed step: the replay (forward, loss, backward), then what TrainStep::Apply does
  // after the all-reduce. `before_update` sees the gradients (clipped, as the eager step leaves
  // them).
  std::unique_ptr<aviary::worker::GraphedModelStep> graphed;
  auto graph_step = [&](const std::function<void()>& before_update = nullptr) -> absl::StatusOr<double> {
    const uint64_t dropout_seed = static_cast<uint64_t>(3 * counter);
    ++counter;
    absl::StatusOr<at::Tensor> loss = graphed->Replay(feats, onehot, dropout_seed);
    if (!loss.ok()) return loss.status();
    const double value = loss->item<double>();
    if (config.train.grad_clip_norm > 0) {
      aviary::worker::ClipGradNorm((*model)->parameters(), config.train.grad_clip_norm);
    }
    if (before_update) before_update();
    optimizer.Step();
    return value;
  };
  // All the gradients as one float32 vector.
  auto gradients = [&]() {
    std::vector<at::Tensor> flat;
    for (const at::Tensor& p : (*model)->parameters()) {
      if (p.grad().defined()) flat.push_back(p.grad().detach().to(at::kFloat).reshape(-1));
    }
    return at::cat(flat);
  };
  std::string graph_report;
  if (cuda_graph || self_check) {
    // The check: N eager steps, then the same N graphed (or eager again), from the same state
    // and seeds.
    const Snapshot start = Take(**model, optimizer);
    std::vector<double> eager_losses;
    at::Tensor eager_grad;  // the first step's
    for (int64_t i = 0; i < graph_check; ++i) {
      absl::StatusOr<double> loss = eager_step();
      if (!loss.ok()) return Fail(loss.status());
      eager_losses.push_back(*loss);
      if (i == 0) eager_grad = gradients();
    }
    const Snapshot eager_end = Take(**model, optimizer);
    if (cuda_graph) {
      auto captured = aviary::worker::GraphedModelStep::Capture(config.train, &step, &optimizer, feats, onehot,
                                                                static_cast<int>(std::max<int64_t>(warmup, 1)));
      if (!captured.ok()) return Fail(captured.status());
      graphed = std::move(*captured);
    }
    if (absl::Status st = Restore(start, **model, optimizer); !st.ok()) return Fail(st);
    counter = 0;
    double loss_diff = 0, param_diff = 0, grad_diff = 0;
    for (int64_t i = 0; i < graph_check; ++i) {
      auto compare = [&] {
        if (i == 0) grad_diff = ((gradients() - eager_grad).norm() / eager_grad.norm().clamp_min(1e-30)).item<double>();
      };
      absl::StatusOr<double> loss;
      if (graphed) {
        loss = graph_step(compare);
      } else {
        loss = eager_step();  // the gradients stay in .grad after the update
        if (loss.ok()) compare();
      }
      if (!loss.ok()) return Fail(loss.status());
      loss_diff = std::max(loss_diff, std::abs(*loss - eager_losses[i]) / std::max(std::abs(eager_losses[i]), 1e-12));
    }
    const std::vector<at::Tensor> now = ModelTensors(**model);
    for (size_t i = 0; i < (*model)->parameters().size(); ++i) {
      param_diff = std::max(param_diff, (now[i].to(at::kFloat) - eager_end.model[i].to(at::kFloat)).abs().max().item<double>());
    }
    graph_report = absl::StrFormat(" cuda_graph=%d graph_check_steps=%lld", cuda_graph ? 1 : 0,
                                   static_cast<long long>(graph_check));
    if (graph_check > 0) {
      absl::StrAppendFormat(&graph_report,
                            " graph_check_grad_rel_diff=%.3g graph_check_loss_max_rel_diff=%.3g "
                            "graph_check_param_max_abs_diff=%.3g",
                            grad_diff, loss_diff, param_diff);
    }
  }
  auto run_step = [&]() -> absl::Status {
    absl::StatusOr<double> loss = graphed ? graph_step() : eager_step();
    return loss.status();
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
              "channels_last=%d cudnn_benchmark=%d copy_ahead=%d threads=%d steps=%lld rounds=%lld warmup_s=%.2f "
              "aviary_samples_per_s=%.2f aviary_median_samples_per_s=%.2f%s\n",
              TORCH_VERSION, device.str().c_str(), config.model.name.c_str(),
              static_cast<long long>(batch), input.c_str(), autocast ? 1 : 0, channels_last ? 1 : 0,
              benchmark_cudnn ? 1 : 0, input == "wave" && copier.overlaps() ? 1 : 0,
              at::get_num_threads(), static_cast<long long>(steps), static_cast<long long>(rounds),
              warmup_s, sorted.back(), sorted[sorted.size() / 2], graph_report.c_str());
  return 0;
}
