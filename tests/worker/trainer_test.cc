// The trainer on a real (tiny) synthetic corpus: exact resume, fine-tuning from a pretraining
// checkpoint, debug mode, refusals before any step, and the on_step / on_epoch hooks.
#include "worker/trainer.h"

#include <unistd.h>

#include <filesystem>
#include <map>
#include <vector>

#include <ATen/Parallel.h>

#include "common/csv.h"
#include "common/files.h"
#include "client/synth.h"
#include "gtest/gtest.h"
#include "worker/checkpoint.h"

namespace aviary::worker {
namespace {

namespace fs = std::filesystem;

class TrainerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    at::set_num_threads(1);
    // ctest runs each test case as its own process, in parallel: every path is per process.
    root_ = new std::string(::testing::TempDir() + "/aviary_trainer_corpus_" + std::to_string(::getpid()));
    fs::remove_all(*root_);
    for (auto [layout, species, rows] : {std::tuple{common::Layout::k2024, 5, 60},
                                         std::tuple{common::Layout::k2021, 6, 70}}) {
      synth::SynthOptions o;
      o.out_dir = *root_ + "/" + common::LayoutName(layout);
      o.layout = layout;
      o.species = species;
      o.recordings = rows;
      o.seed = 11;
      o.max_seconds = 3;
      ASSERT_TRUE(synth::WriteSyntheticCorpus(o).ok());
    }
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
    c.data.pretrain_sources = {{"2021", *root_ + "/2021"}};
    c.folds.finetune_splits = 3;
    c.folds.pretrain_splits = 3;
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
    std::string dir = ::testing::TempDir() + "/aviary_trainer_" + name + "_" + std::to_string(::getpid());
    fs::remove_all(dir);
    fs::create_directories(dir);
    return dir;
  }
  static std::string* root_;
};
std::string* TrainerTest::root_ = nullptr;

TEST_F(TrainerTest, AnInterruptedAndResumedRunEqualsAnUninterruptedOne) {
  TrainOptions a;
  a.out_dir = Out("straight");
  auto straight = Trainer::Create(Config(), a);
  ASSERT_TRUE(straight.ok()) << straight.status();
  ASSERT_TRUE((*straight)->Run().ok());

  TrainOptions b;
  b.out_dir = Out("resumed");
  int polls = 0;
  b.should_stop = [&polls] { return ++polls > 5; };  // stops inside the second epoch
  auto first = Trainer::Create(Config(), b);
  ASSERT_TRUE(first.ok());
  absl::Status st = (*first)->Run();
  ASSERT_TRUE(absl::IsCancelled(st)) << st;
  EXPECT_EQ(ReadCheckpointMeta(b.out_dir + "/last.pt")->epoch, 0);
  b.should_stop = nullptr;
  auto second = Trainer::Create(Config(), b);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE((*second)->Run().ok());

  // Every column but samples_per_s (wall time) is the same.
  auto ha = common::CsvTable::ReadFile(a.out_dir + "/history.csv");
  auto hb = common::CsvTable::ReadFile(b.out_dir + "/history.csv");
  ASSERT_TRUE(ha.ok() && hb.ok());
  ASSERT_EQ(ha->num_rows(), 3u);
  ASSERT_EQ(hb->num_rows(), 3u);
  const size_t speed = *ha->ColumnIndex("samples_per_s");
  for (size_t r = 0; r < 3; ++r) {
    for (size_t c = 0; c < ha->header().size(); ++c) {
      if (c != speed) {
        EXPECT_EQ(ha->row(r)[c], hb->row(r)[c]) << "row " << r << " " << ha->header()[c];
      }
    }
  }
  auto wa = ReadCheckpointTensors(a.out_dir + "/last.pt");
  auto wb = ReadCheckpointTensors(b.out_dir + "/last.pt");
  ASSERT_TRUE(wa.ok() && wb.ok());
  ASSERT_EQ(wa->size(), wb->size());
  for (size_t i = 0; i < wa->size(); ++i) {
    EXPECT_EQ((*wa)[i].first, (*wb)[i].first);
    EXPECT_TRUE(at::equal((*wa)[i].second, (*wb)[i].second)) << (*wa)[i].first;
  }
  for (const char* f : {"best.pt", "config.yaml", "history.png"}) {
    EXPECT_TRUE(fs::exists(b.out_dir + "/" + f)) << f;
  }
  // A finished run resumed again has nothing to do.
  auto third = Trainer::Create(Config(), b);
  ASSERT_TRUE(third.ok());
  EXPECT_TRUE((*third)->Run().ok());
}

TEST_F(TrainerTest, AnUnreadableLastCheckpointFallsBackToThePreviousOne) {
  TrainOptions o;
  o.out_dir = Out("fallback");
  o.task_id = "j000000000001/finetune-f0";
  o.attempt = 1;
  common::PipelineConfig two = Config();
  for (auto& [name, stage] : two.stages) stage.train.epochs = 2;
  auto first = Trainer::Create(two, o);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE((*first)->Run().ok());
  auto prev = ReadCheckpointMeta(o.out_dir + "/last.prev.pt");
  ASSERT_TRUE(prev.ok()) << prev.status();
  EXPECT_EQ(prev->epoch, 0);
  EXPECT_EQ(prev->task_id, o.task_id);
  EXPECT_EQ(prev->attempt, 1);
  // A torn last.pt (storage trouble): the next attempt resumes from last.prev.pt.
  ASSERT_TRUE(common::WriteFileAtomically(o.out_dir + "/last.pt", "torn").ok());
  o.attempt = 2;
  auto second = Trainer::Create(Config(), o);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*second)->history().size(), 1u);  // epoch 0 restored
  ASSERT_TRUE((*second)->Run().ok());
  auto last = ReadCheckpointMeta(o.out_dir + "/last.pt");
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->epoch, 2);
  EXPECT_EQ(last->attempt, 2);
  auto h = common::CsvTable::ReadFile(o.out_dir + "/history.csv");
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->num_rows(), 3u);
}

TEST_F(TrainerTest, ARefusedCommitEndsTheRunAndKeepsThePreviousFiles) {
  TrainOptions o;
  o.out_dir = Out("fenced");
  o.task_id = "j000000000001/finetune-f0";
  o.attempt = 1;
  int last_commits = 0;
  o.commit_check = [&last_commits](const std::string& path) {
    if (path.size() >= 7 && path.compare(path.size() - 7, 7, "last.pt") == 0 && ++last_commits > 1) {
      return absl::AbortedError("lease for task j000000000001/finetune-f0 attempt 1 expired; not writing " + path);
    }
    return absl::OkStatus();
  };
  auto t = Trainer::Create(Config(), o);
  ASSERT_TRUE(t.ok()) << t.status();
  absl::Status st = (*t)->Run();
  ASSERT_TRUE(absl::IsAborted(st)) << st;
  EXPECT_NE(st.message().find("not writing " + o.out_dir + "/last.pt"), std::string::npos) << st;
  auto last = ReadCheckpointMeta(o.out_dir + "/last.pt");
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->epoch, 0);  // epoch 1 was not published
  auto h = common::CsvTable::ReadFile(o.out_dir + "/history.csv");
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->num_rows(), 1u);
  for (const auto& e : fs::directory_iterator(o.out_dir)) {
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
  }
}

TEST_F(TrainerTest, FineTuningStartsFromThePretrainingCheckpointWithANewHead) {
  common::PipelineConfig c = Config();
  c.debug = true;
  TrainOptions pre;
  pre.stage = "pretrain";
  pre.out_dir = Out("pretrain");
  auto p = Trainer::Create(c, pre);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_TRUE((*p)->Run().ok());
  EXPECT_EQ((*p)->history().size(), 2u);  // debug: 2 epochs
  EXPECT_EQ((*p)->history()[0].step, 2);  // of 2 batches
  auto pre_meta = ReadCheckpointMeta(pre.out_dir + "/best.pt");
  ASSERT_TRUE(pre_meta.ok());
  EXPECT_EQ(pre_meta->num_classes, 6);

  TrainOptions fine;
  fine.stage = "finetune";
  fine.out_dir = Out("finetune");
  fine.init_checkpoint = pre.out_dir + "/best.pt";
  auto f = Trainer::Create(c, fine);
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_TRUE((*f)->Run().ok());
  EXPECT_EQ(ReadCheckpointMeta(fine.out_dir + "/last.pt")->num_classes, 5);
}

TEST_F(TrainerTest, RefusesBadInputsBeforeTraining) {
  TrainOptions o;
  o.out_dir = Out("refuse");
  o.fold = 3;
  auto bad_fold = Trainer::Create(Config(), o);
  ASSERT_FALSE(bad_fold.ok());
  EXPECT_NE(bad_fold.status().message().find("fold 3 is out of range"), absl::string_view::npos);

  o.fold = 0;
  o.init_checkpoint = "/nonexistent/best.pt";
  EXPECT_EQ(Trainer::Create(Config(), o).status().code(), absl::StatusCode::kNotFound);

  o.init_checkpoint.clear();
  common::PipelineConfig c = Config();
  c.model.pretrain = "imagenet";
  c.model.pretrained_weights = *root_ + "/2024/train_metadata.csv";  // not weights
  auto bad_weights = Trainer::Create(c, o);
  ASSERT_FALSE(bad_weights.ok());
  EXPECT_NE(bad_weights.status().message().find("train_metadata.csv"), absl::string_view::npos);

  // A run folder of another stage is not resumed into.
  TrainOptions other;
  other.out_dir = Out("other_stage");
  auto first = Trainer::Create([&] { auto d = Config(); d.debug = true; return d; }(), other);
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE((*first)->Run().ok());
  other.stage = "pretrain";
  auto mixed = Trainer::Create(Config(), other);
  ASSERT_FALSE(mixed.ok());
  EXPECT_NE(mixed.status().message().find("belongs to stage finetune"), absl::string_view::npos)
      << mixed.status();
}

// TrainOptions::on_step and on_epoch: the step numbers add up to the history, the samples to
// the batches, and the checkpoints exist when on_epoch runs.
TEST_F(TrainerTest, StepStatsAddUpToTheHistory) {
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

TEST_F(TrainerTest, AStoppedAndResumedRunReportsEveryStepOnce) {
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
