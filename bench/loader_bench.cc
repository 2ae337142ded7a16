// Benchmark (not a test): does the loader, reading a prepared cache, keep up with a tiny model's
// training step on this machine? See bench/loader_bench.sh and docs/BENCHMARKS.md.
//
//   loader_bench CONFIG.yaml STEPS
// Prints three rates, in samples/s, for the config's finetune stage, fold 0:
//   loader:    the loader alone (the consumer only takes batches);
//   synthetic: front end + model forward/backward + optimizer on a fixed random batch;
//   real:      the same steps fed by the loader, with the time the consumer waited for data
//              (after one untimed batch and step, as the synthetic step's warm-up).
// With AVIARY_LOADER_BENCH_ONLY set, the loader's figure alone: STEPS batches timed after
// prefetch_batches + 1 untimed ones, what a GPU host's decode threads can feed
// (bench/gpu/acceptance.sh's `loader` row). Batches are in pinned memory where torch has a CUDA
// device, as the trainer's.
#include <chrono>
#include <cstdlib>
#include <iostream>

#include <ATen/Parallel.h>
#include <torch/optim/adam.h>

#include "common/catalog.h"
#include "common/config.h"
#include "worker/augment.h"
#include "worker/data/clip_loader.h"
#include "worker/frontend.h"
#include "worker/loader.h"
#include "worker/loss.h"
#include "worker/models.h"

namespace {

using namespace aviary;
using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int Die(const absl::Status& st) {
  std::cerr << "loader_bench: " << st.message() << "\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: loader_bench CONFIG.yaml STEPS\n";
    return 2;
  }
  const int steps = std::atoi(argv[2]);
  auto config = common::LoadPipelineConfig(argv[1]);
  if (!config.ok()) return Die(config.status());
  const common::TrainConfig& train = config->stages.at("finetune").train;
  auto table = common::BuildStageTable(*config, "finetune");
  if (!table.ok()) return Die(table.status());
  auto list = common::BuildTrainList(*config, *table, 0);
  if (!list.ok()) return Die(list.status());
  std::vector<worker::LoaderItem> items;
  for (size_t r : list->train) items.push_back({table->samples[r].filepath, table->samples[r].target});
  auto cache = worker::OpenConfiguredCache(config->data);
  if (!cache.ok()) return Die(cache.status());
  if (!*cache) return Die(absl::FailedPreconditionError("no prepared cache at data.cache_dir"));
  const worker::AudioCache* c = cache->get();
  worker::ClipRequest base;
  base.sample_rate = config->data.sample_rate;
  base.duration_s = config->data.duration;
  worker::ClipFn clip = [c, base](const worker::LoaderItem& item, bool train_mode, uint64_t seed,
                                  absl::Span<float> samples) {
    worker::ClipRequest r = base;
    r.mode = train_mode ? worker::ClipMode::kTrain : worker::ClipMode::kValidation;
    r.seed = seed;
    worker::ClipData out;
    auto res = worker::LoadClipInto(c, item.path, r, samples);
    if (!res.ok() || !res->ok()) out.problem = res.ok() ? worker::AudioProblemName(res->problem) : "error";
    return out;
  };
  worker::LoaderOptions lo;
  lo.batch_size = train.batch_size;
  lo.num_threads = train.num_workers;
  lo.clip_samples = worker::ClipSamples(base);
  lo.num_classes = static_cast<int>(table->class_names.size());
  lo.pin_memory = at::hasCUDA();
  auto make_loader = [&] { return worker::Loader::Create(items, clip, lo); };

  // 1. The loader alone. Alone, the first prefetch_batches + 1 batches are not timed: the first
  // (pinned) allocations and the empty queue at the start are not the steady rate.
  const bool only = std::getenv("AVIARY_LOADER_BENCH_ONLY") != nullptr;
  const int64_t untimed = only ? lo.prefetch_batches + 1 : 0;
  auto loader = make_loader();
  if (!loader.ok()) return Die(loader.status());
  int64_t n = 0, batches = 0;
  auto t0 = Clock::now();
  for (int epoch = 0; batches < untimed + steps; ++epoch) {
    (*loader)->StartEpoch(epoch);
    worker::Batch b;
    while (batches < untimed + steps) {
      absl::StatusOr<bool> more = (*loader)->Next(&b);
      if (!more.ok()) return Die(more.status());
      if (!*more) break;
      if (++batches == untimed) {
        t0 = Clock::now();
      } else if (batches > untimed) {
        n += b.waveforms.size(0);
      }
    }
  }
  const double loader_rate = n / Since(t0);
  if (only) {  // the loader's figure alone
    std::cout << "loader alone:       " << loader_rate << " samples/s (" << lo.num_threads << " thread(s), batch "
              << lo.batch_size << ", " << config->data.duration << " s clips" << (lo.pin_memory ? ", pinned" : "")
              << "; " << steps << " batches timed after " << untimed << ")\n";
    return 0;
  }

  auto frontend = worker::MelFrontend::Create(config->frontend, config->augment, config->data.sample_rate);
  if (!frontend.ok()) return Die(frontend.status());
  auto model = worker::BuildClassifier(config->model, config->frontend.in_channels, lo.num_classes);
  if (!model.ok()) return Die(model.status());
  torch::optim::Adam opt((*model)->parameters(), torch::optim::AdamOptions(1e-3));
  auto step = [&](at::Tensor x, at::Tensor targets, int64_t i) {
    at::Tensor y = at::one_hot(targets, lo.num_classes).to(at::kFloat);
    worker::AugmentBatch(config->augment, i, &x, &y);
    at::Tensor mel = (*frontend)->Forward(x, worker::FrontendMode::kTrain);
    at::Tensor loss = worker::ComputeLoss(train.loss, (*model)->forward(mel), y, train.label_smoothing);
    opt.zero_grad();
    loss.backward();
    opt.step();
  };

  // 2. The training step on a fixed random batch.
  at::Tensor fx = at::randn({lo.batch_size, lo.clip_samples}) * 0.1;
  at::Tensor fy = at::randint(0, lo.num_classes, {lo.batch_size}, at::kLong);
  step(fx, fy, 0);  // warm-up
  t0 = Clock::now();
  for (int i = 0; i < steps; ++i) step(fx, fy, i);
  const double synthetic_rate = steps * lo.batch_size / Since(t0);

  // 3. The step fed by the loader. Its first batch and step are not timed, as the synthetic
  // step's warm-up: the loader starts empty, and the first step allocates.
  auto fed = make_loader();
  if (!fed.ok()) return Die(fed.status());
  int64_t i = 0;
  int epoch = 0;
  (*fed)->StartEpoch(epoch);
  worker::Batch b;
  {
    absl::StatusOr<bool> more = (*fed)->Next(&b);
    if (!more.ok()) return Die(more.status());
    if (!*more) return Die(absl::FailedPreconditionError("the loader gave no batch"));
    step(b.waveforms, b.targets, 0);
  }
  const double wait_before = (*fed)->Stats().consumer_wait_s;
  n = 0;
  t0 = Clock::now();
  int64_t in_epoch = 1;  // batches taken in this epoch (the untimed one)
  while (i < steps) {
    absl::StatusOr<bool> more = (*fed)->Next(&b);
    if (!more.ok()) return Die(more.status());
    if (!*more) {
      if (in_epoch == 0) return Die(absl::FailedPreconditionError("an epoch of the loader gave no batch"));
      (*fed)->StartEpoch(++epoch);
      in_epoch = 0;
      continue;
    }
    ++in_epoch;
    step(b.waveforms, b.targets, ++i);
    n += b.waveforms.size(0);
  }
  const double real_time = Since(t0);
  worker::LoaderStats stats = (*fed)->Stats();
  stats.consumer_wait_s -= wait_before;
  std::cout << "batch " << lo.batch_size << ", " << lo.num_threads << " loader thread(s), "
            << at::get_num_threads() << " torch thread(s), model " << config->model.name << ", "
            << config->data.duration << " s clips\n"
            << "loader alone:       " << loader_rate << " samples/s\n"
            << "step on synthetic:  " << synthetic_rate << " samples/s\n"
            << "step fed by loader: " << n / real_time << " samples/s ("
            << 100.0 * (n / real_time) / synthetic_rate << "% of synthetic), consumer waited "
            << stats.consumer_wait_s << " s of " << real_time << " s ("
            << 100.0 * stats.consumer_wait_s / real_time << "%)\n";
  return 0;
}
