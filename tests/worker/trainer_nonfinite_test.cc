// A run whose loss turns non-finite stops with an error naming the epoch, step and batch files,
// or skips and counts such steps with train.skip_nonfinite.
#include <unistd.h>

#include <filesystem>

#include <ATen/Parallel.h>

#include "client/synth.h"
#include "gtest/gtest.h"
#include "worker/checkpoint.h"
#include "worker/trainer.h"

namespace aviary::worker {
namespace {

namespace fs = std::filesystem;

common::PipelineConfig ExplodingConfig(const std::string& corpus) {
  common::PipelineConfig c;
  c.data.duration = 1.0;
  c.data.target = {"2024", corpus};
  c.data.pretrain_sources.clear();
  c.stages["pretrain"].enabled = false;
  c.folds.finetune_splits = 2;
  c.model.name = "small_cnn";
  c.train.batch_size = 8;
  c.train.epochs = 2;
  c.train.num_workers = 1;
  c.train.scheduler = "none";
  c.train.lr = 1e30;  // Adam steps of ~1e30 overflow the logits within a few steps
  c.stages["finetune"].train = c.train;
  return c;
}

class NonFiniteTest : public ::testing::Test {
 protected:
  void SetUp() override {
    at::set_num_threads(1);
    // ctest runs each test case as its own process, in parallel: every path is per process.
    corpus_ = ::testing::TempDir() + "/aviary_nonfinite_corpus_" + std::to_string(::getpid());
    fs::remove_all(corpus_);
    synth::SynthOptions o;
    o.out_dir = corpus_;
    o.species = 3;
    o.recordings = 40;
    o.seed = 5;
    o.max_seconds = 2;
    o.broken_files = false;
    ASSERT_TRUE(synth::WriteSyntheticCorpus(o).ok());
  }
  void TearDown() override { fs::remove_all(corpus_); }
  std::string corpus_;
};

TEST_F(NonFiniteTest, StopsNamingEpochStepAndFiles) {
  TrainOptions o;
  o.out_dir = ::testing::TempDir() + "/aviary_nonfinite_stop_" + std::to_string(::getpid());
  fs::create_directories(o.out_dir);
  auto t = Trainer::Create(ExplodingConfig(corpus_), o);
  ASSERT_TRUE(t.ok()) << t.status();
  absl::Status st = (*t)->Run();
  ASSERT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_NE(st.message().find("non-finite loss"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("at epoch 0 step "), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find(corpus_ + "/train_audio/"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("train.skip_nonfinite"), absl::string_view::npos) << st;
}

TEST_F(NonFiniteTest, SkipsAndCountsWhenAskedThenNamesDivergedWeights) {
  common::PipelineConfig c = ExplodingConfig(corpus_);
  c.stages["finetune"].train.skip_nonfinite = true;
  TrainOptions o;
  o.out_dir = ::testing::TempDir() + "/aviary_nonfinite_skip_" + std::to_string(::getpid());
  fs::create_directories(o.out_dir);
  auto t = Trainer::Create(c, o);
  ASSERT_TRUE(t.ok()) << t.status();
  absl::Status st = (*t)->Run();
  // The non-finite steps were skipped and counted; with this learning rate the weights
  // themselves diverge, which validation reports instead of producing nan metrics.
  EXPECT_GT((*t)->skipped_steps(), 0);
  ASSERT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_NE(st.message().find("outputs are not finite"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("after epoch 0"), absl::string_view::npos) << st;
}

}  // namespace
}  // namespace aviary::worker
