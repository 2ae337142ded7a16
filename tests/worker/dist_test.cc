// Multi-rank tests of worker/comm: run under `mpirun -np 2 --oversubscribe` by ctest (they also
// pass as one process). Collectives on sizes from 1 element to many MB in float32 and bf16,
// the bucket plan, the reducer with uneven buckets, the equivalence of 2 ranks x batch b with
// 1 rank x batch 2b (also with gradient accumulation and clipping), the gathered validation
// metrics, and the BatchNorm buffer policy.
#include <gtest/gtest.h>
#include <mpi.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>

#include <cmath>
#include <cstdlib>
#include <memory>
#include <vector>

#include "common/metrics.h"
#include "common/status.h"
#include "worker/comm/communicator.h"
#include "worker/comm/mpi_communicator.h"
#include "worker/comm/mpi_session.h"
#include "worker/comm/reducer.h"
#include "worker/models.h"
#include "worker/optimizer.h"
#include "worker/train_step.h"

namespace aviary::worker::comm {
namespace {

Communicator* g_comm = nullptr;
MpiSession* g_session = nullptr;

Communicator& Comm() { return *g_comm; }

TEST(CommunicatorTest, AllReduceSizesFloat32AndBf16) {
  const int world = Comm().world_size();
  const int rank = Comm().rank();
  const double rank_sum = world * (world + 1) / 2.0;
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{1} << 16, int64_t{3} << 20}) {
      at::Tensor base = at::arange(n, at::kLong).remainder(7).to(at::kFloat);
      at::Tensor t = (base * (rank + 1)).to(dtype);
      ASSERT_TRUE(Comm().AllReduce(t).ok());
      at::Tensor want = base * rank_sum;
      EXPECT_TRUE(at::equal(t.to(at::kFloat), want)) << c10::toString(dtype) << " n=" << n;
      EXPECT_EQ(t.scalar_type(), dtype);
    }
  }
  at::Tensor m = at::tensor({static_cast<double>(rank)}, at::kDouble);
  ASSERT_TRUE(Comm().AllReduce(m, ReduceOp::kMax).ok());
  EXPECT_EQ(m.item<double>(), world - 1);
}

TEST(CommunicatorTest, BroadcastAndGather) {
  const int rank = Comm().rank();
  at::Tensor t = at::full({5, 3}, static_cast<float>(rank + 10));
  ASSERT_TRUE(Comm().Broadcast(t, 0).ok());
  EXPECT_TRUE(at::equal(t, at::full({5, 3}, 10.0f)));
  at::Tensor rows = at::full({rank + 1, 2}, static_cast<int64_t>(rank), at::kLong);  // uneven
  auto all = AllGatherRows(Comm(), rows);
  ASSERT_TRUE(all.ok()) << all.status();
  int64_t expect_rows = 0;
  for (int r = 0; r < Comm().world_size(); ++r) expect_rows += r + 1;
  ASSERT_EQ(all->size(0), expect_rows);
  int64_t at_row = 0;
  for (int r = 0; r < Comm().world_size(); ++r) {
    for (int k = 0; k <= r; ++k) EXPECT_EQ((*all)[at_row++][1].item<int64_t>(), r);
  }
  EXPECT_TRUE(Comm().Barrier().ok());
}

// A communicator one rank could not make (NCCL's init failing there alone: it connects lazily,
// and a shared GPU may be out of memory) fails every rank's CreateCommunicator with that rank's
// error: they went on into the trainer's first collective and waited there (30 minutes) while
// the failing rank's error never reached the coordinator.
TEST(CommunicatorTest, ACommunicatorOneRankCouldNotMakeFailsEveryRank) {
  if (Comm().world_size() == 1) GTEST_SKIP() << "needs two ranks";
  common::CommConfig config;
  config.backend = "mpi";
  config.timeout_s = 60;
  ASSERT_EQ(::setenv("AVIARY_FAULT_INJECT", "rank=1,kind=fail_comm", 1), 0);
  auto made = CreateCommunicator(config, *g_session, at::Device(at::kCPU));
  ::unsetenv("AVIARY_FAULT_INJECT");
  ASSERT_FALSE(made.ok());
  // Every rank the failing rank's own error (`serve` fails the task when the codes agree, and
  // ends the group when they differ).
  EXPECT_EQ(made.status().code(), absl::StatusCode::kInternal) << made.status();
  EXPECT_EQ(made.status().message(), "rank 1: AVIARY_FAULT_INJECT: rank 1 could not make its communicator (an NCCL "
                                     "init failing there alone)") << made.status();
  // The ranks are in step after it: the next one is made on both, and reduces.
  auto again = CreateCommunicator(config, *g_session, at::Device(at::kCPU));
  ASSERT_TRUE(again.ok()) << again.status();
  at::Tensor one = at::ones({3});
  ASSERT_TRUE((*again)->AllReduce(one).ok());
  EXPECT_EQ(one[0].item<float>(), 2.0f);
}

// Rank 0's write outcome on every rank, and whether the coordinator's revoking of the lease
// refused it (the others then log the cancel as a warning, not as their failure).
TEST(CommunicatorTest, RankZerosOutcomeAndItsLeaseMarkReachEveryRank) {
  const bool root = Comm().rank() == 0;
  auto ok = ShareRootOutcome(Comm(), absl::OkStatus());
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->code, absl::StatusCode::kOk);
  EXPECT_FALSE(ok->lease_revoked);
  const absl::Status refused = absl::AbortedError("lease for task t attempt 1 is gone; not writing last.pt");
  auto cancelled = ShareRootOutcome(Comm(), root ? common::MarkLeaseRevoked(refused) : absl::OkStatus());
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_EQ(cancelled->code, absl::StatusCode::kAborted);
  EXPECT_TRUE(cancelled->lease_revoked);
  auto expired = ShareRootOutcome(Comm(), root ? refused : absl::OkStatus());
  ASSERT_TRUE(expired.ok()) << expired.status();
  EXPECT_EQ(expired->code, absl::StatusCode::kAborted);
  EXPECT_FALSE(expired->lease_revoked);
  auto full = ShareRootOutcome(Comm(), root ? absl::ResourceExhaustedError("disk full") : absl::OkStatus());
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->code, absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(full->lease_revoked);
}

TEST(BucketPlannerTest, SplitsAtByteCapFirstBucketSmallReverseOrder) {
  std::vector<at::Tensor> params = {at::zeros({1000}), at::zeros({1000}), at::zeros({10}),
                                    at::zeros({10}, at::kDouble), at::zeros({500})};
  ReducerOptions o;
  o.bucket_bytes = 4400;
  o.first_bucket_bytes = 1000;
  auto plan = PlanBuckets(params, o);
  // Reverse order: 4 (2000 B) alone (first cap 1000), then 3 (double) alone, then 2+1 (40+4000
  // <= 4400), then 0.
  ASSERT_EQ(plan.size(), 4u);
  EXPECT_EQ(plan[0], std::vector<size_t>({4}));
  EXPECT_EQ(plan[1], std::vector<size_t>({3}));
  EXPECT_EQ(plan[2], std::vector<size_t>({2, 1}));
  EXPECT_EQ(plan[3], std::vector<size_t>({0}));
}

TEST(ReducerTest, AveragesGradientsInUnevenBuckets) {
  const int world = Comm().world_size();
  const int rank = Comm().rank();
  std::vector<at::Tensor> params;
  for (int64_t n : {3, 1000, 17, 250000, 5, 64})
    params.push_back(at::zeros({n}).set_requires_grad(true));
  params.push_back(at::zeros({40}, at::kBFloat16).set_requires_grad(true));
  at::Tensor unused = at::zeros({9}).set_requires_grad(true);
  params.push_back(unused);
  ReducerOptions o;
  o.bucket_bytes = 4096;
  o.first_bucket_bytes = 64;
  auto reducer = Reducer::Create(params, &Comm(), o);
  ASSERT_TRUE(reducer.ok()) << reducer.status();
  EXPECT_GE((*reducer)->buckets().size(), 4u);
  for (int step = 0; step < 2; ++step) {
    (*reducer)->Prepare();
    at::Tensor loss = at::zeros({});
    for (size_t i = 0; i + 1 < params.size(); ++i) {
      at::Tensor c = at::arange(params[i].numel()).to(at::kFloat).remainder(5) * (rank + 1) + step;
      loss = loss + (params[i].to(at::kFloat) * c).sum();
    }
    loss.backward();
    ASSERT_TRUE((*reducer)->Finish().ok());
    const double mean_factor = (world + 1) / 2.0;
    for (size_t i = 0; i + 1 < params.size(); ++i) {
      at::Tensor want =
          at::arange(params[i].numel()).to(at::kFloat).remainder(5) * mean_factor + step;
      EXPECT_TRUE(at::allclose(params[i].grad().to(at::kFloat), want, 1e-2, 1e-6)) << "param " << i;
    }
    EXPECT_TRUE(at::equal(unused.grad(), at::zeros({9})));
  }
}

// The averages are handed out in the buckets' memory (no copy back): dense parameters in their
// own strides (a channels_last weight keeps channels_last, a transposed matrix its transpose),
// others contiguous; at aligned addresses (16 elements), the same memory every step, shared by
// the parameters of a bucket. Also a bf16 parameter (its own bucket) and an empty one.
TEST(ReducerTest, GradientsAreTheBucketsInTheParametersLayout) {
  const int world = Comm().world_size();
  const int rank = Comm().rank();
  std::vector<at::Tensor> params = {
      at::zeros({8, 3, 3, 3}).contiguous(at::MemoryFormat::ChannelsLast).set_requires_grad(true),
      at::zeros({5}).set_requires_grad(true),
      at::zeros({3, 7}).t().set_requires_grad(true),            // dense, strides (1, 7)
      at::zeros({4, 6}).narrow(1, 0, 3).set_requires_grad(true),  // not dense: strides (6, 1)
      at::zeros({0}).set_requires_grad(true),
      at::zeros({6, 2, 5, 5}).contiguous(at::MemoryFormat::ChannelsLast).set_requires_grad(true),
      at::zeros({10}, at::kBFloat16).set_requires_grad(true)};  // last: the first bucket
  ReducerOptions o;
  o.bucket_bytes = 1 << 20;
  o.first_bucket_bytes = 1 << 20;
  auto reducer = Reducer::Create(params, &Comm(), o);
  ASSERT_TRUE(reducer.ok()) << reducer.status();
  ASSERT_EQ((*reducer)->buckets().size(), 2u);  // the bf16 one, then the float ones
  std::vector<void*> first_addresses;
  at::Tensor previous;
  for (int step = 0; step < 3; ++step) {
    (*reducer)->Prepare();
    at::Tensor loss = at::zeros({});
    std::vector<at::Tensor> coefficients;
    for (const at::Tensor& p : params) {
      coefficients.push_back(at::arange(p.numel()).to(at::kFloat).reshape(p.sizes()).remainder(11));
      loss = loss + (p.to(at::kFloat) * coefficients.back() * (rank + 1 + step)).sum();
    }
    loss.backward();
    ASSERT_TRUE((*reducer)->Finish().ok());
    const double mean_factor = (world + 1) / 2.0 + step;
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& g = params[i].grad();
      ASSERT_TRUE(g.defined()) << "param " << i;
      if (params[i].is_non_overlapping_and_dense()) {
        EXPECT_EQ(g.strides(), params[i].strides()) << "param " << i << " step " << step;
      } else {
        EXPECT_TRUE(g.is_contiguous()) << "param " << i;
      }
      EXPECT_TRUE(at::allclose(g.to(at::kFloat), coefficients[i] * mean_factor))
          << "param " << i << " step " << step;
      EXPECT_EQ(reinterpret_cast<uintptr_t>(g.data_ptr()) % (16 * g.element_size()), 0u)
          << "param " << i;
      // The float parameters share one bucket: their gradients live in the same buffer.
      if (i + 1 < params.size()) {
        EXPECT_TRUE(g.storage().is_alias_of(params[0].grad().storage())) << "param " << i;
      }
      if (step == 0) {
        first_addresses.push_back(g.data_ptr());
      } else {
        EXPECT_EQ(g.data_ptr(), first_addresses[i]) << "param " << i << " moved at step " << step;
      }
    }
    if (step > 0) {
      EXPECT_FALSE(at::allclose(previous, params[0].grad())) << "the steps' gradients must differ";
    }
    previous = params[0].grad().clone();
  }
}

// The hooks sit on the parameters' AccumulateGrad nodes and see the .grad autograd set: a .grad
// left from before Prepare (a foreign tensor, or the bucket's own from the last Finish) is not
// added in; a parameter used twice in the forward is reduced once, with both uses' sum; a
// parameter outside this backward is zeros; a backward without Prepare leaves the buckets alone.
TEST(ReducerTest, ReducesThisBackwardsGradientOnly) {
  const int world = Comm().world_size();
  const int rank = Comm().rank();
  at::Tensor shared = at::zeros({6}).set_requires_grad(true);
  at::Tensor plain = at::zeros({4}).set_requires_grad(true);
  at::Tensor idle = at::zeros({3}).set_requires_grad(true);
  std::vector<at::Tensor> params = {shared, plain, idle};
  auto reducer = Reducer::Create(params, &Comm(), ReducerOptions{});
  ASSERT_TRUE(reducer.ok()) << reducer.status();
  const double mean_rank = (world - 1) / 2.0;
  auto forward = [&](double scale) {
    // d/d(shared) = 2 + 3 (two uses), d/d(plain) = rank + scale, idle unused.
    return ((shared * 2).sum() + (shared * 3).sum() + (plain * (rank + scale)).sum());
  };
  plain.mutable_grad() = at::full({4}, 100.0);  // foreign, before the first Prepare
  for (int step = 0; step < 3; ++step) {
    (*reducer)->Prepare();
    forward(step).backward();
    ASSERT_TRUE((*reducer)->Finish().ok());
    EXPECT_TRUE(at::equal(shared.grad(), at::full({6}, 5.0))) << "step " << step << ": " << shared.grad();
    EXPECT_TRUE(at::allclose(plain.grad(), at::full({4}, mean_rank + step))) << "step " << step << ": " << plain.grad();
    ASSERT_TRUE(idle.grad().defined());
    EXPECT_TRUE(at::equal(idle.grad(), at::zeros({3})));
  }
  // Outside Prepare/Finish the hooks do nothing: autograd adds into the .grad Finish handed out.
  const at::Tensor bucket_grad = plain.grad();
  forward(0).backward();
  EXPECT_TRUE(plain.grad().is_same(bucket_grad));
  EXPECT_TRUE(at::allclose(plain.grad(), at::full({4}, mean_rank + 2 + rank)));
}

// The hooks go with the reducer, also from a node a pending graph still holds; a parameter moved
// to another dtype after the reducer was made (a new AccumulateGrad node, unhooked) makes Finish
// fail by name instead of reducing zeros.
TEST(ReducerTest, HooksGoWithTheReducerAndAnUnhookedGradientIsAnError) {
  at::Tensor w = at::ones({5}).set_requires_grad(true);
  at::Tensor pending_loss;
  {
    auto reducer = Reducer::Create({w}, &Comm(), ReducerOptions{});
    ASSERT_TRUE(reducer.ok()) << reducer.status();
    pending_loss = (w * 2).sum();  // its graph holds w's AccumulateGrad node
    auto node = torch::autograd::impl::try_get_grad_accumulator(w);
    ASSERT_NE(node, nullptr);
    EXPECT_EQ(node->post_hooks().size(), 1u);
  }
  auto node = torch::autograd::impl::try_get_grad_accumulator(w);
  ASSERT_NE(node, nullptr);
  EXPECT_EQ(node->post_hooks().size(), 0u);
  pending_loss.backward();  // no hook into the destroyed reducer
  EXPECT_TRUE(at::equal(w.grad(), at::full({5}, 2.0)));
  pending_loss = at::Tensor();
  node.reset();

  auto reducer = Reducer::Create({w}, &Comm(), ReducerOptions{});
  ASSERT_TRUE(reducer.ok()) << reducer.status();
  {
    torch::NoGradGuard no_grad;
    w.set_data(w.to(at::kDouble));
  }
  (*reducer)->Prepare();
  (w * 3).sum().backward();
  const absl::Status st = (*reducer)->Finish();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("parameter 0 received a gradient its hook did not see"), absl::string_view::npos) << st;
}

TEST(ReducerTest, RefusesReplicasThatDiffer) {
  if (Comm().world_size() == 1) GTEST_SKIP() << "needs two ranks";
  std::vector<at::Tensor> params = {at::zeros({10 + Comm().rank()}).set_requires_grad(true)};
  auto reducer = Reducer::Create(params, &Comm(), ReducerOptions{});
  ASSERT_FALSE(reducer.ok());
  EXPECT_NE(reducer.status().message().find("the replicas differ"), absl::string_view::npos)
      << reducer.status();
}

// Parameters on two devices are refused (their hooks would run on two threads at once).
TEST(ReducerTest, ParametersOnTwoDevicesAreRefused) {
  std::vector<at::Tensor> params = {at::zeros({4}).set_requires_grad(true),
                                    at::zeros({4}, at::TensorOptions().device(at::kMeta)).set_requires_grad(true)};
  auto reducer = Reducer::Create(params, &Comm(), ReducerOptions{});
  ASSERT_FALSE(reducer.ok());
  EXPECT_EQ(reducer.status().code(), absl::StatusCode::kInvalidArgument) << reducer.status();
  EXPECT_NE(reducer.status().message().find("Reducer: parameter 1 is on meta, parameter 0 on cpu"),
            absl::string_view::npos)
      << reducer.status();
}

// fp16 gradients are averaged without overflowing on the way: 40000 on each rank summed to
// 80000, past fp16's 65504, and the average was inf.
TEST(ReducerTest, Fp16GradientsAverageWithoutOverflow) {
  at::Tensor p = at::zeros({4}, at::kHalf).set_requires_grad(true);
  auto reducer = Reducer::Create({p}, &Comm(), ReducerOptions{});
  ASSERT_TRUE(reducer.ok()) << reducer.status();
  (*reducer)->Prepare();
  (p * 40000).sum().backward();
  ASSERT_TRUE((*reducer)->Finish().ok());
  EXPECT_TRUE(at::equal(p.grad().to(at::kFloat), at::full({4}, 40000.0f))) << p.grad();
}

// A sparse gradient is an error naming the parameter and its layout (the dense copy threw inside
// backward()).
TEST(ReducerTest, ASparseGradientIsNamed) {
  at::Tensor w = at::zeros({6, 2}).set_requires_grad(true);
  auto reducer = Reducer::Create({w}, &Comm(), ReducerOptions{});
  ASSERT_TRUE(reducer.ok()) << reducer.status();
  (*reducer)->Prepare();
  at::embedding(w, at::tensor({1, 3}, at::kLong), -1, false, /*sparse=*/true).sum().backward();
  const absl::Status st = (*reducer)->Finish();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("parameter 0 has a Sparse gradient"), absl::string_view::npos) << st;
}

// As many parameters and elements on each rank, in another order or dtype: refused at Create
// (the counts and totals agreed, and the first all-reduce summed mismatched buckets).
TEST(ReducerTest, RefusesReplicasWhoseShapesOrDtypesDiffer) {
  if (Comm().world_size() == 1) GTEST_SKIP() << "needs two ranks";
  const bool odd = Comm().rank() % 2 == 1;
  ReducerOptions one_each;
  one_each.bucket_bytes = 4;
  one_each.first_bucket_bytes = 4;
  std::vector<at::Tensor> swapped = {at::zeros({odd ? 32 : 16}).set_requires_grad(true),
                                     at::zeros({odd ? 16 : 32}).set_requires_grad(true)};
  auto reducer = Reducer::Create(swapped, &Comm(), one_each);
  ASSERT_FALSE(reducer.ok());
  EXPECT_EQ(reducer.status().code(), absl::StatusCode::kFailedPrecondition) << reducer.status();
  EXPECT_NE(reducer.status().message().find("sizes, order, memory layouts or dtypes differ"), absl::string_view::npos)
      << reducer.status();
  std::vector<at::Tensor> typed = {at::zeros({8}, odd ? at::kBFloat16 : at::kFloat).set_requires_grad(true)};
  reducer = Reducer::Create(typed, &Comm(), ReducerOptions{});
  ASSERT_FALSE(reducer.ok());
  EXPECT_NE(reducer.status().message().find("sizes, order, memory layouts or dtypes differ"), absl::string_view::npos)
      << reducer.status();
  std::vector<at::Tensor> shaped = {at::zeros({odd ? 4 : 8, odd ? 8 : 4}).set_requires_grad(true)};
  reducer = Reducer::Create(shaped, &Comm(), ReducerOptions{});
  ASSERT_FALSE(reducer.ok());
  EXPECT_NE(reducer.status().message().find("sizes, order, memory layouts or dtypes differ"), absl::string_view::npos)
      << reducer.status();
  // A channels_last weight on one rank, a contiguous one on the other: as many elements of one
  // shape, laid out differently in the bucket.
  std::vector<at::Tensor> laid_out = {
      at::zeros({8, 3, 3, 3})
          .contiguous(odd ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)
          .set_requires_grad(true)};
  reducer = Reducer::Create(laid_out, &Comm(), ReducerOptions{});
  ASSERT_FALSE(reducer.ok());
  EXPECT_NE(reducer.status().message().find("memory layouts"), absl::string_view::npos) << reducer.status();
  std::vector<at::Tensor> same = {at::zeros({16}).set_requires_grad(true), at::zeros({32}).set_requires_grad(true)};
  EXPECT_TRUE(Reducer::Create(same, &Comm(), one_each).ok());
}

// One rank's failure to make its buckets and hooks (here a parameter without a gradient; on a
// GPU, memory) is every rank's error: the others used to go on to the first gradient all-reduce.
TEST(ReducerTest, WhatOneRankCannotBuildFailsEveryRank) {
  if (Comm().world_size() == 1) GTEST_SKIP() << "needs two ranks";
  std::vector<at::Tensor> params = {at::zeros({10}).set_requires_grad(Comm().rank() != 1)};
  auto reducer = Reducer::Create(params, &Comm(), ReducerOptions{});
  ASSERT_FALSE(reducer.ok());
  const std::string expected = Comm().rank() == 1 ? "rank 1: Reducer: parameter 0 does not require grad"
                                                  : "Reducer: rank 1 could not make its gradient buckets";
  EXPECT_NE(reducer.status().message().find(expected), absl::string_view::npos) << reducer.status();
  EXPECT_EQ(reducer.status().code(), absl::StatusCode::kInvalidArgument) << reducer.status();
}

torch::nn::Sequential SmallNet() {
  return torch::nn::Sequential(torch::nn::Linear(16, 32), torch::nn::ReLU(),
                               torch::nn::Linear(32, 4));
}

TEST(EquivalenceTest, TwoRanksOfBatchBMatchOneRankOfBatch2B) {
  const int world = Comm().world_size();
  const int rank = Comm().rank();
  const int64_t b = 8;
  torch::manual_seed(1000 + rank);  // different inits: the broadcast must fix them
  torch::nn::Sequential dist = SmallNet();
  ASSERT_TRUE(BroadcastModuleState(Comm(), *dist, true).ok());
  torch::nn::Sequential ref = SmallNet();
  {
    torch::NoGradGuard no_grad;
    auto src = dist->parameters();
    auto dst = ref->parameters();
    for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
  }
  auto reducer = Reducer::Create(dist->parameters(), &Comm(), ReducerOptions{2048, 256});
  ASSERT_TRUE(reducer.ok()) << reducer.status();
  torch::optim::Adam opt_dist(dist->parameters(), torch::optim::AdamOptions(1e-2));
  torch::optim::Adam opt_ref(ref->parameters(), torch::optim::AdamOptions(1e-2));
  for (int step = 0; step < 6; ++step) {
    at::Generator gen = at::detail::createCPUGenerator(77 + step);
    at::Tensor x = at::randn({b * world, 16}, gen);
    at::Tensor y = at::randn({b * world, 4}, gen);
    at::Tensor xs = x.narrow(0, rank * b, b), ys = y.narrow(0, rank * b, b);
    opt_dist.zero_grad();
    (*reducer)->Prepare();
    at::mse_loss(dist->forward(xs), ys).backward();
    ASSERT_TRUE((*reducer)->Finish().ok());
    opt_dist.step();
    opt_ref.zero_grad();
    at::mse_loss(ref->forward(x), y).backward();
    opt_ref.step();
  }
  if (world > 1) {
    EXPECT_GT((*reducer)->launched_during_backward(), 0);  // overlap
  }
  auto pd = dist->parameters();
  auto pr = ref->parameters();
  double worst = 0;
  for (size_t i = 0; i < pd.size(); ++i)
    worst = std::max(worst, (pd[i] - pr[i]).abs().max().item<double>());
  EXPECT_LT(worst, 1e-5);
  // The replicas agree with each other exactly.
  for (const auto& p : pd) {
    at::Tensor copy = p.detach().clone();
    ASSERT_TRUE(Comm().Broadcast(copy, 0).ok());
    EXPECT_TRUE(at::equal(copy, p.detach()));
  }
}

// train.grad_accum_steps and train.grad_clip_norm across ranks: every rank steps on K = 2
// micro-batches of b through TrainStep and the reducer; one process steps on all world x K x b
// samples at once. Clipping binds at every step, and the norm it clips by is the all-reduced
// gradient's: the reference's norm (torch's clip_grad_norm_ on the whole batch). The small CNN
// runs in eval mode (BatchNorm on running statistics, no dropout), so only float rounding
// differs: the parameters agree within 2e-6, the replicas exactly.
TEST(EquivalenceTest, AccumulatedClippedStepsOnRanksMatchOneLargeBatch) {
  const int world = Comm().world_size();
  const int rank = Comm().rank();
  const int k = 2;
  const int64_t b = 3;
  common::PipelineConfig config;
  common::TrainConfig big;
  big.loss = "BCE";
  big.lr = 2e-3;
  big.grad_clip_norm = 0.05;
  common::TrainConfig micro = big;
  micro.grad_accum_steps = k;
  auto make = [] {
    at::manual_seed(7);
    common::ModelConfig c;
    c.name = "small_cnn";
    c.dropout = 0.0;
    return *worker::BuildClassifier(c, 1, 5);
  };
  auto dist = make(), ref = make();
  dist->eval();
  ref->eval();
  auto reducer = Reducer::Create(dist->parameters(), &Comm(), ReducerOptions{1 << 16, 1 << 12});
  ASSERT_TRUE(reducer.ok()) << reducer.status();
  auto opt_dist = worker::AdamOptimizer::FromConfig(micro, *dist);
  auto opt_ref = worker::AdamOptimizer::FromConfig(big, *ref);
  ASSERT_TRUE(opt_dist.ok() && opt_ref.ok());
  const c10::Device cpu(c10::kCPU);
  worker::TrainStep step_dist(config, micro, nullptr, dist.get(), opt_dist->get(), reducer->get(), cpu, false);
  worker::TrainStep step_ref(config, big, nullptr, ref.get(), opt_ref->get(), nullptr, cpu, false);
  for (int s = 0; s < 6; ++s) {
    at::Generator gen = at::detail::createCPUGenerator(500 + s);
    const int64_t n = world * k * b;
    at::Tensor x = at::randn({n, 1, 32, 24}, gen);
    at::Tensor y = at::one_hot(at::randint(0, 5, {n}, gen, at::kLong), 5).to(at::kFloat);
    ASSERT_TRUE(step_ref.Update(step_ref.ForwardFeatures(x, y, 1).loss).ok());
    for (int m = 0; m < k; ++m) {
      const int64_t at_row = (m * world + rank) * b;  // as the loader: micro-batch m of the step
      auto fwd = step_dist.ForwardFeatures(x.narrow(0, at_row, b), y.narrow(0, at_row, b), 1);
      ASSERT_TRUE(step_dist.Backward(fwd.loss).ok());
    }
    ASSERT_TRUE(step_dist.Apply());
    EXPECT_GT(step_ref.last_grad_norm(), big.grad_clip_norm) << "clipping should bind";
    EXPECT_NEAR(step_dist.last_grad_norm(), step_ref.last_grad_norm(), 1e-5 * step_ref.last_grad_norm()) << s;
  }
  auto pd = dist->parameters();
  auto pr = ref->parameters();
  double worst = 0;
  for (size_t i = 0; i < pd.size(); ++i) worst = std::max(worst, (pd[i] - pr[i]).abs().max().item<double>());
  EXPECT_LT(worst, 2e-6);
  for (const auto& p : pd) {
    at::Tensor copy = p.detach().clone();
    ASSERT_TRUE(Comm().Broadcast(copy, 0).ok());
    EXPECT_TRUE(at::equal(copy, p.detach()));
  }
}

TEST(ValidationGatherTest, GatheredMetricsEqualSingleProcessExactly) {
  const int world = Comm().world_size();
  const int rank = Comm().rank();
  const int64_t n = 37, c = 5;
  at::Generator gen = at::detail::createCPUGenerator(5);
  at::Tensor probs = at::rand({n, c}, gen);
  at::Tensor targets = at::randint(c, {n}, gen, at::kLong);
  // Sharded like the loader: item i on rank i % world; gathered and put back in item order.
  std::vector<int64_t> mine;
  for (int64_t i = rank; i < n; i += world) mine.push_back(i);
  at::Tensor idx = at::tensor(mine, at::kLong);
  at::Tensor meta = at::stack({idx, targets.index_select(0, idx)}, 1);
  auto all_p = AllGatherRows(Comm(), probs.index_select(0, idx));
  auto all_meta = AllGatherRows(Comm(), meta);
  ASSERT_TRUE(all_p.ok() && all_meta.ok());
  at::Tensor order = all_meta->select(1, 0).argsort();
  at::Tensor gp = all_p->index_select(0, order).contiguous();
  at::Tensor gt = all_meta->select(1, 1).index_select(0, order).contiguous();
  auto metrics = [c](const at::Tensor& p, const at::Tensor& t) {
    std::vector<float> pv(p.data_ptr<float>(), p.data_ptr<float>() + p.numel());
    std::vector<int64_t> tv(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
    auto truth = common::OneHotLabels(tv, c);
    EXPECT_TRUE(truth.ok());
    auto m = common::ComputeEvalMetrics(*truth, common::MatrixView<float>(pv, tv.size(), c));
    EXPECT_TRUE(m.ok());
    return *m;
  };
  common::EvalMetrics got = metrics(gp, gt);
  at::Tensor pc = probs.contiguous();
  common::EvalMetrics want = metrics(pc, targets);
  EXPECT_EQ(got.val_auc.value, want.val_auc.value);
  EXPECT_EQ(got.val_roc_auc.value, want.val_roc_auc.value);
  EXPECT_EQ(got.val_cmap.value, want.val_cmap.value);
  EXPECT_EQ(got.val_acc.value, want.val_acc.value);
}

TEST(BatchNormPolicyTest, RankZeroStatisticsBroadcastBeforeValidation) {
  const int rank = Comm().rank();
  torch::nn::BatchNorm1d bn(6);
  bn->train();
  // Each rank normalizes with its own batch statistics during training.
  at::Generator gen = at::detail::createCPUGenerator(11 + rank);
  for (int i = 0; i < 3; ++i) bn->forward(at::randn({8, 6}, gen) * (rank + 1) + rank);
  at::Tensor mine = bn->running_mean.clone();
  auto all = AllGatherRows(Comm(), mine.unsqueeze(0));
  ASSERT_TRUE(all.ok());
  if (Comm().world_size() > 1) {
    EXPECT_FALSE(at::equal((*all)[0], (*all)[1]));
  }
  ASSERT_TRUE(BroadcastModuleState(Comm(), *bn, /*parameters=*/false).ok());
  EXPECT_TRUE(at::equal(bn->running_mean, (*all)[0]));
  auto after = AllGatherRows(Comm(), bn->running_var.unsqueeze(0));
  ASSERT_TRUE(after.ok());
  for (int r = 1; r < Comm().world_size(); ++r) EXPECT_TRUE(at::equal((*after)[r], (*after)[0]));
}

}  // namespace
}  // namespace aviary::worker::comm

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  auto session = aviary::worker::comm::MpiSession::Create();
  if (!session.ok()) {
    std::fprintf(stderr, "%s\n", std::string(session.status().message()).c_str());
    return 1;
  }
  at::set_num_threads(1);
  aviary::worker::comm::g_session = session->get();
  int rc = 0;
  {
    auto comm = aviary::worker::comm::MpiCommunicator::Create(60.0);
    if (!comm.ok()) return 1;
    aviary::worker::comm::g_comm = comm->get();
    rc = RUN_ALL_TESTS();
    // Every rank exits with the group's verdict.
    at::Tensor failed = at::tensor({rc != 0 ? 1.0f : 0.0f});
    if (!(*comm)->AllReduce(failed, aviary::worker::comm::ReduceOp::kMax).ok()) rc = 1;
    if (failed.item<float>() != 0.0f) rc = 1;
  }
  return rc;
}
