#include "worker/optimizer.h"

#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/models.h"

namespace aviary::worker {
namespace {

using ::testing::HasSubstr;

std::shared_ptr<ClassifierImpl> Model(uint64_t seed) {
  at::manual_seed(seed);
  common::ModelConfig c;
  c.name = "small_cnn";
  auto m = BuildClassifier(c, 1, 4);
  EXPECT_TRUE(m.ok());
  return *m;
}

void Backward(ClassifierImpl& model, int step) {
  at::manual_seed(100 + step);
  at::Tensor x = at::randn({3, 1, 16, 16});
  model.forward(x).pow(2).sum().backward();
}

void ExpectSameParameters(ClassifierImpl& a, ClassifierImpl& b, bool exact) {
  for (const auto& p : a.named_parameters()) {
    const at::Tensor& other = b.named_parameters()[p.key()];
    if (exact) {
      EXPECT_TRUE(at::equal(p.value(), other)) << p.key();
    } else {
      EXPECT_TRUE(at::allclose(p.value(), other, 1e-5, 1e-6))
          << p.key() << " max diff " << (p.value() - other).abs().max().item<double>();
    }
  }
}

// Five steps of AdamOptimizer against torch::optim's Adam and AdamW with weight decay: equal
// operation for operation without the fused kernel, within float rounding with it.
TEST(OptimizerTest, MatchesTorchAdamAndAdamW) {
  for (bool decoupled : {false, true}) {
    auto ours = Model(1);
    auto theirs = Model(1);
    AdamSettings s;
    s.lr = 3e-3;
    s.weight_decay = 0.01;
    s.decoupled = decoupled;
    AdamOptimizer opt(*ours, s);
    std::unique_ptr<torch::optim::Optimizer> ref;
    if (decoupled) {
      ref = std::make_unique<torch::optim::AdamW>(theirs->parameters(),
                                                  torch::optim::AdamWOptions(3e-3).weight_decay(0.01));
    } else {
      ref = std::make_unique<torch::optim::Adam>(theirs->parameters(),
                                                 torch::optim::AdamOptions(3e-3).weight_decay(0.01));
    }
    for (int step = 0; step < 5; ++step) {
      opt.ZeroGrad();
      ref->zero_grad();
      Backward(*ours, step);
      Backward(*theirs, step);
      opt.Step();
      ref->step();
    }
    SCOPED_TRACE(decoupled ? "AdamW" : "Adam");
    ExpectSameParameters(*ours, *theirs, !AdamOptimizer::Fused());
  }
}

// NHWC weights (the trainer's layout) get the same updates from the same gradients, whichever
// layout the gradients come in (the reducer writes contiguous ones).
TEST(OptimizerTest, ChannelsLastParametersStepLikeContiguousOnes) {
  auto a = Model(2);
  auto b = Model(2);
  ASSERT_TRUE(PlaceModel(*b, c10::Device(c10::kCPU), /*channels_last=*/true).ok());
  AdamOptimizer opt_a(*a, AdamSettings{});
  AdamOptimizer opt_b(*b, AdamSettings{});
  for (int step = 0; step < 3; ++step) {
    opt_a.ZeroGrad();
    opt_b.ZeroGrad();
    Backward(*a, step);
    for (const auto& p : a->named_parameters()) {
      at::Tensor target = b->named_parameters()[p.key()];
      at::Tensor g = p.value().grad().clone();
      if (step == 1) g = g.contiguous(target.suggest_memory_format());
      target.mutable_grad() = g;
    }
    opt_a.Step();
    opt_b.Step();
  }
  ExpectSameParameters(*a, *b, /*exact=*/true);
}

TEST(OptimizerTest, StateRoundTripsByNameAndSkipsParametersWithoutGradients) {
  auto a = Model(3);
  auto b = Model(3);
  AdamOptimizer opt_a(*a, AdamSettings{});
  // Only the head's weight has a gradient in the first step: only it is stepped.
  opt_a.ZeroGrad();
  a->named_parameters()["classifier.1.weight"].sum().backward();
  opt_a.Step();
  NamedTensors state = opt_a.ExportState();
  ASSERT_EQ(state.size(), 3u);
  EXPECT_EQ(state[0].first, "classifier.1.weight.exp_avg");
  EXPECT_EQ(state[1].first, "classifier.1.weight.exp_avg_sq");
  EXPECT_EQ(state[2].first, "classifier.1.weight.step");
  EXPECT_EQ(state[2].second.item<int64_t>(), 1);

  {
    torch::NoGradGuard no_grad;
    for (const auto& p : a->named_parameters()) b->named_parameters()[p.key()].copy_(p.value());
  }
  AdamOptimizer opt_b(*b, AdamSettings{});
  ASSERT_TRUE(opt_b.ImportState(state, "test").ok());
  for (int step = 0; step < 2; ++step) {
    for (auto* pair : {&opt_a, &opt_b}) pair->ZeroGrad();
    Backward(*a, step);
    Backward(*b, step);
    opt_a.Step();
    opt_b.Step();
  }
  ExpectSameParameters(*a, *b, /*exact=*/true);
}

TEST(OptimizerTest, ImportRefusesAStateThatDoesNotFit) {
  auto a = Model(4);
  AdamOptimizer opt(*a, AdamSettings{});
  opt.ZeroGrad();
  Backward(*a, 0);
  opt.Step();
  const NamedTensors good = opt.ExportState();

  NamedTensors missing = good;
  missing.erase(missing.begin() + 1);  // the first parameter's exp_avg_sq
  absl::Status st = opt.ImportState(missing, "last.pt");
  EXPECT_THAT(std::string(st.message()), HasSubstr("last.pt: optimizer state '"));
  EXPECT_THAT(std::string(st.message()), HasSubstr(".exp_avg_sq' is missing"));

  NamedTensors shaped = good;
  shaped[0].second = at::zeros({7});
  st = opt.ImportState(shaped, "last.pt");
  EXPECT_THAT(std::string(st.message()), HasSubstr("has shape [7], the parameter ["));

  NamedTensors extra = good;
  extra.emplace_back("nope.exp_avg", at::zeros({1}));
  st = opt.ImportState(extra, "last.pt");
  EXPECT_THAT(std::string(st.message()), HasSubstr("'nope.exp_avg' belongs to no trainable parameter"));

  // A refused import leaves the optimizer as it was.
  EXPECT_EQ(opt.ExportState().size(), good.size());
}

}  // namespace
}  // namespace aviary::worker
