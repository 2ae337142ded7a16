// The training options' math on their own: gradient accumulation against one larger batch,
// gradient clipping against torch's clip_grad_norm_, the EMA of the weights, and what the CUDA
// graph step refuses. The trainer's use of them (resume, early stopping, config refusals) is in
// trainer_test.cc.
#include "worker/cuda_graph_step.h"
#include "worker/ema.h"
#include "worker/train_step.h"
#include "worker/trainer.h"

#include <ATen/Context.h>
#include <cmath>
#include <cstdlib>
#include <limits>

#include <torch/nn/modules/linear.h>
#include <torch/nn/utils/clip_grad.h>

#include "gtest/gtest.h"
#include "worker/models.h"
#include "worker/optimizer.h"

namespace aviary::worker {
namespace {

std::shared_ptr<ClassifierImpl> Model(uint64_t seed) {
  at::manual_seed(seed);
  common::ModelConfig c;
  c.name = "small_cnn";
  c.dropout = 0.0;
  auto m = BuildClassifier(c, 1, 5);
  EXPECT_TRUE(m.ok()) << m.status();
  return *m;
}

double MaxDifference(ClassifierImpl& a, ClassifierImpl& b) {
  double worst = 0;
  for (const auto& p : a.named_parameters()) {
    worst = std::max(worst, (p.value() - b.named_parameters()[p.key()]).abs().max().item<double>());
  }
  return worst;
}

// K micro-batches of b samples per optimizer step against one step on K x b samples: the same
// data (what the loader hands a larger batch), Adam with weight decay, clipping on (it binds
// at every step), 6 steps on the CPU. The model is in eval mode: BatchNorm then normalizes with
// its running statistics, so a sample's gradient does not depend on the rest of its batch (in
// training mode each micro-batch uses its own statistics, as each rank does in data-parallel
// training without SyncBatchNorm). What differs is only the order of float additions: the
// parameters agree within 2e-6 (they move by more than 1e-3 over the 6 steps, checked).
TEST(GradAccumTest, AccumulatedMicroBatchesEqualOneLargerBatch) {
  for (int k : {2, 4}) {
    common::PipelineConfig config;
    common::TrainConfig big;
    big.optimizer = "AdamW";
    big.lr = 2e-3;
    big.weight_decay = 0.01;
    big.loss = "BCE";
    big.grad_clip_norm = 0.05;
    common::TrainConfig small = big;
    small.grad_accum_steps = k;
    auto model_big = Model(7), model_small = Model(7);
    model_big->eval();
    model_small->eval();
    auto opt_big = AdamOptimizer::FromConfig(big, *model_big);
    auto opt_small = AdamOptimizer::FromConfig(small, *model_small);
    ASSERT_TRUE(opt_big.ok() && opt_small.ok());
    const c10::Device cpu(c10::kCPU);
    TrainStep step_big(config, big, nullptr, model_big.get(), opt_big->get(), nullptr, cpu, false);
    TrainStep step_small(config, small, nullptr, model_small.get(), opt_small->get(), nullptr, cpu, false);
    const int64_t b = 3;
    std::vector<double> norms;
    for (int s = 0; s < 6; ++s) {
      at::manual_seed(1000 + s);
      at::Tensor x = at::randn({k * b, 1, 32, 24});
      at::Tensor y = at::one_hot(at::randint(0, 5, {k * b}, at::kLong), 5).to(at::kFloat);
      ASSERT_TRUE(step_big.Update(step_big.ForwardFeatures(x, y, 1).loss).ok());
      norms.push_back(step_big.last_grad_norm());
      for (int m = 0; m < k; ++m) {
        EXPECT_EQ(step_small.pending_micro_batches(), m);
        StepForward fwd = step_small.ForwardFeatures(x.narrow(0, m * b, b), y.narrow(0, m * b, b), 1);
        ASSERT_TRUE(step_small.Backward(fwd.loss).ok());
      }
      ASSERT_TRUE(step_small.Apply());
      EXPECT_EQ(step_small.pending_micro_batches(), 0);
      EXPECT_NEAR(step_small.last_grad_norm(), step_big.last_grad_norm(), 1e-6 * step_big.last_grad_norm());
    }
    EXPECT_FALSE(step_small.Apply());  // nothing gathered: no step
    for (double n : norms) EXPECT_GT(n, big.grad_clip_norm) << "clipping should bind";
    const double diff = MaxDifference(*model_big, *model_small);
    EXPECT_LT(diff, 2e-6) << "K = " << k;
    EXPECT_GT(MaxDifference(*model_big, *Model(7)), 1e-3) << "the parameters should have moved";
  }
}

// train.skip_nonfinite: a finite loss whose gradient is not (backward through sqrt at 0, a
// bf16 overflow) skips the optimizer step; it used to step and turn every weight into NaN.
TEST(NonFiniteGradientTest, AStepWithANonFiniteGradientIsSkippedWhenAsked) {
  common::PipelineConfig config;
  common::TrainConfig train;
  train.skip_nonfinite = true;
  auto model = Model(3);
  auto before = Model(3);
  model->eval();
  auto optimizer = AdamOptimizer::FromConfig(train, *model);
  ASSERT_TRUE(optimizer.ok());
  const c10::Device cpu(c10::kCPU);
  TrainStep step(config, train, nullptr, model.get(), optimizer->get(), nullptr, cpu, false);
  at::manual_seed(5);
  at::Tensor x = at::randn({4, 1, 32, 24});
  at::Tensor y = at::one_hot(at::randint(0, 5, {4}, at::kLong), 5).to(at::kFloat);
  StepForward fwd = step.ForwardFeatures(x, y, 1);
  ASSERT_TRUE(std::isfinite(fwd.loss.item<double>()));
  ASSERT_TRUE(step.Backward(fwd.loss).ok());
  {
    torch::NoGradGuard no_grad;
    model->parameters()[0].mutable_grad().view(-1)[0] = std::numeric_limits<float>::infinity();
  }
  EXPECT_FALSE(step.Apply());
  EXPECT_TRUE(step.skipped_nonfinite());
  EXPECT_FALSE(std::isfinite(step.last_grad_norm()));
  EXPECT_EQ(MaxDifference(*model, *before), 0.0) << "a skipped step moves nothing";
  for (const at::Tensor& p : model->parameters()) EXPECT_FALSE(p.grad().defined());
  // The next step, finite, is taken.
  ASSERT_TRUE(step.Backward(step.ForwardFeatures(x, y, 1).loss).ok());
  EXPECT_TRUE(step.Apply());
  EXPECT_FALSE(step.skipped_nonfinite());
  EXPECT_TRUE(std::isfinite(step.last_grad_norm()));
  EXPECT_GT(MaxDifference(*model, *before), 0.0);
}

// An optimizer step made of fewer micro-batches than grad_accum_steps (the end of an epoch) is
// the mean over the ones it has: 1 micro-batch with K = 3 steps as K = 1 does on it.
TEST(GradAccumTest, APartialStepIsTheMeanOfItsMicroBatches) {
  common::PipelineConfig config;
  common::TrainConfig one;
  common::TrainConfig three = one;
  three.grad_accum_steps = 3;
  auto a = Model(3), b = Model(3);
  a->eval();
  b->eval();
  auto oa = AdamOptimizer::FromConfig(one, *a);
  auto ob = AdamOptimizer::FromConfig(three, *b);
  const c10::Device cpu(c10::kCPU);
  TrainStep sa(config, one, nullptr, a.get(), oa->get(), nullptr, cpu, false);
  TrainStep sb(config, three, nullptr, b.get(), ob->get(), nullptr, cpu, false);
  at::manual_seed(5);
  at::Tensor x = at::randn({4, 1, 32, 24});
  at::Tensor y = at::one_hot(at::randint(0, 5, {4}, at::kLong), 5).to(at::kFloat);
  ASSERT_TRUE(sa.Update(sa.ForwardFeatures(x, y, 1).loss).ok());
  ASSERT_TRUE(sb.Backward(sb.ForwardFeatures(x, y, 1).loss).ok());
  ASSERT_TRUE(sb.Apply());
  // The same float tolerance as the K-step test: torch 2.x scales and sums the micro-batch's
  // gradient in another order than 1.13 (4e-7 seen), and Adam's first step, g / (|g| + eps),
  // magnifies rounding in gradients near zero.
  EXPECT_LT(MaxDifference(*a, *b), 2e-6);
  EXPECT_GT(MaxDifference(*a, *Model(3)), 0.0) << "the step should have moved the parameters";
}

// A short micro-batch (an epoch's last with drop_remainder false) weighs its samples as a full
// one's do: micro-batches of 3 and 1 samples (batch_size 3, K = 2) step as one batch of 4. Each
// micro-batch's mean loss counted alike, the last sample weighed 1/2 instead of 1/4. And a step
// of one short micro-batch is that micro-batch's mean.
TEST(GradAccumTest, AShortMicroBatchWeighsItsSamplesAsAFullOnes) {
  common::PipelineConfig config;
  common::TrainConfig one;
  one.batch_size = 4;
  common::TrainConfig two = one;
  two.batch_size = 3;
  two.grad_accum_steps = 2;
  auto a = Model(3), b = Model(3), c = Model(3), d = Model(3);
  for (auto* m : {&a, &b, &c, &d}) (*m)->eval();
  auto oa = AdamOptimizer::FromConfig(one, *a);
  auto ob = AdamOptimizer::FromConfig(two, *b);
  auto oc = AdamOptimizer::FromConfig(one, *c);
  auto od = AdamOptimizer::FromConfig(two, *d);
  const c10::Device cpu(c10::kCPU);
  TrainStep sa(config, one, nullptr, a.get(), oa->get(), nullptr, cpu, false);
  TrainStep sb(config, two, nullptr, b.get(), ob->get(), nullptr, cpu, false);
  TrainStep sc(config, one, nullptr, c.get(), oc->get(), nullptr, cpu, false);
  TrainStep sd(config, two, nullptr, d.get(), od->get(), nullptr, cpu, false);
  at::manual_seed(11);
  // Adam's first step is about lr x sign(g): a second step shows the gradients' sizes too.
  for (int s = 0; s < 2; ++s) {
    at::Tensor x = at::randn({4, 1, 32, 24}) * (1 + 3 * at::arange(4, at::kFloat).view({4, 1, 1, 1}));
    at::Tensor y = at::one_hot(at::randint(0, 5, {4}, at::kLong), 5).to(at::kFloat);
    ASSERT_TRUE(sa.Update(sa.ForwardFeatures(x, y, 1).loss).ok());
    ASSERT_TRUE(sb.Backward(sb.ForwardFeatures(x.narrow(0, 0, 3), y.narrow(0, 0, 3), 1).loss, 3).ok());
    ASSERT_TRUE(sb.Backward(sb.ForwardFeatures(x.narrow(0, 3, 1), y.narrow(0, 3, 1), 1).loss, 1).ok());
    ASSERT_TRUE(sb.Apply());
    // One short micro-batch alone: its own mean, as K = 1 steps on it.
    ASSERT_TRUE(sc.Update(sc.ForwardFeatures(x.narrow(0, 1, 2), y.narrow(0, 1, 2), 1).loss).ok());
    ASSERT_TRUE(sd.Backward(sd.ForwardFeatures(x.narrow(0, 1, 2), y.narrow(0, 1, 2), 1).loss, 2).ok());
    ASSERT_TRUE(sd.Apply());
  }
  // Float rounding only (the loss scaled by 2/6 then the gradient by 6/2; Adam's g / sqrt(v)
  // magnifies it near zero): 2.5e-6 seen. The old weighting: 4e-3 apart.
  EXPECT_LT(MaxDifference(*a, *b), 1e-5);
  EXPECT_LT(MaxDifference(*c, *d), 1e-5);
  EXPECT_GT(MaxDifference(*a, *Model(3)), 1e-4) << "the steps should have moved the parameters";
}

// ClipGradNorm against torch::nn::utils::clip_grad_norm_ (the C++ twin of torch.nn.utils'):
// the same total norm, the same gradients after, whether the bound binds or not, and a
// parameter without a gradient left out.
TEST(ClipGradNormTest, MatchesTorchClipGradNorm) {
  for (double max_norm : {0.5, 1e6}) {
    at::manual_seed(11);
    std::vector<at::Tensor> mine, theirs;
    for (auto shape : {std::vector<int64_t>{4, 3}, {7}, {2, 2, 3}, {5}}) {
      at::Tensor p = at::randn(shape).requires_grad_(true);
      at::Tensor q = p.detach().clone().requires_grad_(true);
      if (shape.size() != 1 || shape[0] != 5) {  // the last one has no gradient
        at::Tensor g = at::randn(shape);
        p.mutable_grad() = g.clone();
        q.mutable_grad() = g.clone();
      }
      mine.push_back(p);
      theirs.push_back(q);
    }
    const double norm = ClipGradNorm(mine, max_norm);
    const double torch_norm = torch::nn::utils::clip_grad_norm_(theirs, max_norm);
    EXPECT_NEAR(norm, torch_norm, 1e-6 * torch_norm);
    double total = 0;
    for (size_t i = 0; i < mine.size(); ++i) {
      ASSERT_EQ(mine[i].grad().defined(), theirs[i].grad().defined());
      if (!mine[i].grad().defined()) continue;
      EXPECT_TRUE(at::allclose(mine[i].grad(), theirs[i].grad(), 1e-6, 1e-7)) << i;
      total += mine[i].grad().pow(2).sum().item<double>();
    }
    if (max_norm < norm) {
      EXPECT_NEAR(std::sqrt(total), max_norm, 1e-5);  // clipped to the bound
    } else {
      EXPECT_NEAR(std::sqrt(total), norm, 1e-5);  // untouched
    }
  }
}

// The EMA's update rule, warm-up and swap, computed by hand on a 2x2 linear layer.
TEST(WeightEmaTest, FollowsTheDecayScheduleAndSwapsExactly) {
  torch::nn::Linear layer(2, 2);
  torch::NoGradGuard no_grad;
  layer->weight.fill_(1.0);
  layer->bias.fill_(0.0);
  WeightEma ema(*layer, 0.9, 4);
  EXPECT_DOUBLE_EQ(ema.DecayAt(0), 0.0);
  EXPECT_DOUBLE_EQ(ema.DecayAt(2), 0.45);
  EXPECT_DOUBLE_EQ(ema.DecayAt(4), 0.9);
  EXPECT_DOUBLE_EQ(ema.DecayAt(400), 0.9);
  EXPECT_DOUBLE_EQ(WeightEma(*layer, 0.9, 0).DecayAt(0), 0.9);
  // The weights go 2, 3, 4, 5, 6 after five steps; the average by hand:
  double expected = 1.0;
  for (int n = 0; n < 5; ++n) {
    layer->weight.fill_(2.0 + n);
    ema.Update(*layer);
    const double d = 0.9 * std::min(1.0, n / 4.0);
    expected = d * expected + (1 - d) * (2.0 + n);
  }
  EXPECT_EQ(ema.updates(), 5);
  ema.Swap(*layer);
  EXPECT_NEAR(layer->weight[0][0].item<double>(), expected, 1e-6);
  EXPECT_NEAR(layer->bias[0].item<double>(), 0.0, 1e-7);
  ema.Swap(*layer);
  EXPECT_EQ(layer->weight[1][1].item<float>(), 6.0f);  // back exactly

  // The state round-trips (average and count), and one that does not fit is refused by name.
  WeightEma other(*layer, 0.9, 4);
  ASSERT_TRUE(other.ImportState(ema.ExportState(), "last.pt").ok());
  EXPECT_EQ(other.updates(), 5);
  layer->weight.fill_(10.0);
  ema.Update(*layer);
  other.Update(*layer);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(at::equal(ema.ExportState()[i].second, other.ExportState()[i].second));
  }
  NamedTensors bad = ema.ExportState();
  bad[0].second = at::zeros({3});
  absl::Status st = other.ImportState(bad, "last.pt");
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("last.pt"), std::string::npos) << st;
  EXPECT_NE(st.message().find("weight"), std::string::npos) << st;
}

// What GraphedModelStep::Capture refuses before it touches a device: gradient accumulation, a
// build without CUDA torch, inputs off CUDA. The capture and the replays themselves need a GPU:
// bench/gpu/acceptance.sh runs them against the eager step (its step_graph check).
TEST(CudaGraphStepTest, RefusesWhatItCannotCapture) {
#ifdef AVIARY_EXPECT_CUDA_GRAPHS
  ASSERT_TRUE(GraphedModelStep::Built()) << "the CUDA configuration left the CUDA graph step out";
#else
  ASSERT_FALSE(GraphedModelStep::Built());
#endif
  auto model = Model(3);
  common::PipelineConfig config;
  common::TrainConfig train;
  auto optimizer = AdamOptimizer::FromConfig(train, *model);
  ASSERT_TRUE(optimizer.ok());
  TrainStep step(config, train, nullptr, model.get(), optimizer->get(), nullptr, c10::Device(c10::kCPU), false);
  const at::Tensor x = at::randn({2, 1, 32, 24});
  const at::Tensor y = at::zeros({2, 5});
  common::TrainConfig accumulating = train;
  accumulating.grad_accum_steps = 2;
  auto refused = GraphedModelStep::Capture(accumulating, &step, optimizer->get(), x, y, 1);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_NE(refused.status().message().find("train.grad_accum_steps is 2, not 1"), std::string::npos) << refused.status();
  refused = GraphedModelStep::Capture(train, &step, optimizer->get(), x, y, 1);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  const std::string expected = GraphedModelStep::Built() ? "CUDA graphs need the inputs on a CUDA device (features on cpu, targets on cpu)"
                                                         : "this aviary was built against a torch without CUDA";
  EXPECT_NE(refused.status().message().find(expected), std::string::npos) << refused.status();
  EXPECT_FALSE(model->parameters()[0].grad().defined()) << "a refused capture must not have stepped";
}

// A deterministic CUDA task sets process-wide flags; the next task of a serving agent, not
// deterministic, must get benchmark cuDNN back and the deterministic modes off (they were left
// on before). The flags are plain settings: no GPU is needed to check them.
TEST(ConfigureCudaModeTest, EveryFlagIsSetEitherWay) {
  auto& ctx = at::globalContext();
  ::unsetenv("CUBLAS_WORKSPACE_CONFIG");
  ConfigureCudaMode(true);
  EXPECT_TRUE(ctx.deterministicCuDNN());
  EXPECT_FALSE(ctx.benchmarkCuDNN());
  EXPECT_TRUE(ctx.deterministicAlgorithms());
  EXPECT_TRUE(ctx.deterministicAlgorithmsWarnOnly());
  ASSERT_NE(std::getenv("CUBLAS_WORKSPACE_CONFIG"), nullptr);
  EXPECT_STREQ(std::getenv("CUBLAS_WORKSPACE_CONFIG"), ":4096:8");
  ConfigureCudaMode(false);
  EXPECT_FALSE(ctx.deterministicCuDNN());
  EXPECT_TRUE(ctx.benchmarkCuDNN());
  EXPECT_FALSE(ctx.deterministicAlgorithms());
  ::setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8", 1);  // a user's own setting is kept
  ConfigureCudaMode(true);
  EXPECT_STREQ(std::getenv("CUBLAS_WORKSPACE_CONFIG"), ":16:8");
  ConfigureCudaMode(false);
  ctx.setBenchmarkCuDNN(false);
  ::unsetenv("CUBLAS_WORKSPACE_CONFIG");
}

// train.precision against the device: auto is bf16 from compute capability 8 (Ampere) on and
// where the capability is unknown, fp32 on GPUs known to be older (a T4, a V100: bf16
// convolutions slow or refused by cuDNN) and on the CPU; bf16 is bf16 on any GPU (the trainer
// warns before 8.0), fp32 never.
TEST(PrecisionTest, AutoIsBf16FromAmpereOnOnly) {
  EXPECT_TRUE(Bf16Autocast("auto", true, 9));   // H100, H200
  EXPECT_TRUE(Bf16Autocast("auto", true, 8));   // A100
  EXPECT_FALSE(Bf16Autocast("auto", true, 7));  // T4, V100
  EXPECT_TRUE(Bf16Autocast("auto", true, -1));  // unknown (a build without the CUDA code): as before
  EXPECT_FALSE(Bf16Autocast("auto", false, -1));
  EXPECT_TRUE(Bf16Autocast("bf16", true, 7));
  EXPECT_FALSE(Bf16Autocast("bf16", false, -1));  // refused on the CPU by the trainer
  EXPECT_FALSE(Bf16Autocast("fp32", true, 9));
}

}  // namespace
}  // namespace aviary::worker
