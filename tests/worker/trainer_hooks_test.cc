// TrainOptions::on_step and on_epoch on a real (tiny) synthetic corpus: the step numbers add up
// to the history, the samples to the batches, and the checkpoints exist when on_epoch runs.
#include <unistd.h>

#include <filesystem>
#include <map>
#include <vector>

#include <ATen/Parallel.h>

#include "common/synth.h"
#include "gtest/gtest.h"
#include "worker/trainer.h"

namespace aviary::worker {
namespace {

namespace fs = std::filesystem;

class TrainerHooksTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    at::set_num_threads(1);
    root_ = new std::string(::testing::TempDir() + "/aviary_hooks_corpus_" + std::to_string(::getpid()));
    fs::remove_all(*root_);
    common::SynthOptions o;
    o.out_dir = *root_ + "/2024";
    o.layout = common::Layout::k2024;
    o.species = 4;
    o.recordings = 50;
    o.seed = 5;
    o.max_seconds = 2;
    ASSERT_TRUE(common::WriteSyntheticCorpus(o).ok());
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
  }
  common::PipelineConfig Config() {
    common::PipelineConfig c;
    c.seed = 42;
    c.data.duration = 1.0;
    c.data.target = {"2024", *root_ + "/2024"};
    c.data.pretrain_sources = {};
    c.folds.finetune_splits = 3;
    c.sampling.upsample_thr = 4;
    c.model.name = "small_cnn";
    c.train.batch_size = 8;
    c.train.epochs = 3;
    c.train.num_workers = 1;
    c.train.lr_ramp_epochs = 1;
    for (auto& [name, stage] : c.stages) stage.train = c.train;
    return c;
  }
  std::string Out(const std::string& name) {
    std::string dir = ::testing::TempDir() + "/aviary_hooks_" + name + "_" + std::to_string(::getpid());
    fs::remove_all(dir);
    fs::create_directories(dir);
    return dir;
  }
  static std::string* root_;
};
std::string* TrainerHooksTest::root_ = nullptr;

TEST_F(TrainerHooksTest, StepStatsAddUpToTheHistory) {
  TrainOptions o;
  o.out_dir = Out("steps");
  std::vector<StepStats> steps;
  std::vector<bool> files_at_epoch_end;
  o.on_step = [&](const StepStats& s) { steps.push_back(s); };
  o.on_epoch = [&](const EpochRecord& r) {
    files_at_epoch_end.push_back(fs::exists(o.out_dir + "/last.pt") && fs::exists(o.out_dir + "/history.csv") &&
                                 (!r.best || fs::exists(o.out_dir + "/best.pt")));
  };
  const common::PipelineConfig config = Config();
  auto trainer = Trainer::Create(config, o);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  ASSERT_TRUE((*trainer)->Run().ok());
  const auto& history = (*trainer)->history();
  ASSERT_EQ(history.size(), 3u);
  EXPECT_EQ(files_at_epoch_end, (std::vector<bool>{true, true, true}));
  ASSERT_FALSE(steps.empty());
  const int64_t per_epoch = steps.front().steps_per_epoch;
  ASSERT_GT(per_epoch, 0);
  EXPECT_EQ(static_cast<int64_t>(steps.size()), per_epoch * 3);
  std::map<int, const StepStats*> last_of_epoch;
  int64_t samples = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    const StepStats& s = steps[i];
    EXPECT_FALSE(s.skipped);
    EXPECT_EQ(s.world_size, 1);
    EXPECT_EQ(s.steps_per_epoch, per_epoch);
    EXPECT_EQ(s.epoch, static_cast<int>(i / per_epoch));
    EXPECT_EQ(s.step_in_epoch, static_cast<int64_t>(i % per_epoch) + 1);
    EXPECT_EQ(s.step, static_cast<int64_t>(i) + 1);  // global optimizer steps
    EXPECT_EQ(s.samples, config.train.batch_size);   // drop_remainder: full batches
    EXPECT_GE(s.step_seconds, s.data_wait_seconds);
    EXPECT_GE(s.data_wait_seconds, 0.0);
    EXPECT_GE(s.allreduce_seconds, 0.0);
    EXPECT_GE(s.loader_queue_depth, 0);
    samples += s.samples;
    last_of_epoch[s.epoch] = &s;
  }
  EXPECT_EQ(samples, per_epoch * 3 * config.train.batch_size);
  for (const EpochRecord& r : history) {
    ASSERT_TRUE(last_of_epoch.count(r.epoch));
    const StepStats& s = *last_of_epoch[r.epoch];
    EXPECT_EQ(s.step, r.step);
    EXPECT_EQ(s.lr, r.lr);
    EXPECT_DOUBLE_EQ(s.train_loss, r.train_loss);  // one rank: the running mean ends at the epoch's
  }
}

TEST_F(TrainerHooksTest, AStoppedAndResumedRunReportsEveryStepOnce) {
  const std::string out = Out("resume");
  std::vector<StepStats> first, second;
  TrainOptions a;
  a.out_dir = out;
  int64_t polls = 0;  // one per step, before it
  a.on_step = [&](const StepStats& s) { first.push_back(s); };
  a.should_stop = [&] {  // stop two steps into the second epoch
    return ++polls > (first.empty() ? int64_t{1} << 40 : first.front().steps_per_epoch + 2);
  };
  {
    auto trainer = Trainer::Create(Config(), a);
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    absl::Status st = (*trainer)->Run();
    EXPECT_TRUE(absl::IsCancelled(st)) << st;
    ASSERT_EQ((*trainer)->history().size(), 1u);
  }
  ASSERT_FALSE(first.empty());
  const int64_t per_epoch = first.front().steps_per_epoch;
  ASSERT_EQ(static_cast<int64_t>(first.size()), per_epoch + 2);  // epoch 0 and 2 steps of epoch 1
  TrainOptions b;
  b.out_dir = out;
  b.on_step = [&](const StepStats& s) { second.push_back(s); };
  auto trainer = Trainer::Create(Config(), b);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  ASSERT_TRUE((*trainer)->Run().ok());
  // Resumed from last.pt (epoch 0): epochs 1 and 2 again, the global step continuing.
  ASSERT_EQ(static_cast<int64_t>(second.size()), 2 * per_epoch);
  EXPECT_EQ(second.front().epoch, 1);
  EXPECT_EQ(second.front().step, per_epoch + 1);
  EXPECT_EQ(second.back().step, (*trainer)->history().back().step);
  EXPECT_EQ(second.back().step, 3 * per_epoch);
}

}  // namespace
}  // namespace aviary::worker
