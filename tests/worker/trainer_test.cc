// The trainer on a real (tiny) synthetic corpus: exact resume, fine-tuning from a pretraining
// checkpoint, debug mode, refusals before any step, and the on_step / on_epoch hooks.
#include "worker/trainer.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <vector>

#include <ATen/Parallel.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/catalog.h"
#include "common/logging.h"
#include "common/manifest.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/status.h"
#include "client/synth.h"
#include "gtest/gtest.h"
#include "worker/checkpoint.h"
#include "worker/data/audio_cache.h"
#include "worker/models.h"
#include "worker/optimizer.h"
#include "worker/schedule.h"
#include "worker/weights.h"

namespace aviary::worker {
namespace {

namespace fs = std::filesystem;

// Prepares the decoded-audio cache `cache_dir` from the corpus at `corpus`, its files named under
// `root` (the corpus itself, or a link to it).
void PrepareCorpusCache(const std::string& corpus, const std::string& root, const std::string& cache_dir) {
  std::vector<std::string> audio;
  for (const auto& e : fs::recursive_directory_iterator(corpus)) {
    if (e.path().extension() != ".ogg" && e.path().extension() != ".mp3") continue;
    audio.push_back((fs::path(root) / fs::relative(e.path(), corpus)).string());
  }
  PrepareOptions prepare;
  prepare.cache_dir = cache_dir;
  prepare.num_threads = 1;
  ASSERT_TRUE(PrepareAudioCache(audio, prepare).ok());
}

// The warning lines logged while it lives.
class WarningTap {
 public:
  WarningTap() {
    common::SetLogTap([this](common::LogLevel level, int, absl::string_view line) {
      absl::MutexLock lock(&mu_);
      if (level == common::LogLevel::kWarning) lines_.emplace_back(line);
    });
  }
  ~WarningTap() { common::SetLogTap(nullptr); }
  std::vector<std::string> lines() const {
    absl::MutexLock lock(&mu_);
    return lines_;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::string> lines_;
};

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
  b.should_stop = [&polls] { return ++polls > 7; };  // 5 steps per epoch: stops at step 2 of epoch 1
  auto first = Trainer::Create(Config(), b);
  ASSERT_TRUE(first.ok());
  absl::Status st = (*first)->Run();
  ASSERT_TRUE(absl::IsCancelled(st)) << st;
  // last.pt holds the step it stopped at: after epoch 0, inside epoch 1.
  auto stopped = ReadCheckpointMeta(b.out_dir + "/last.pt");
  ASSERT_TRUE(stopped.ok()) << stopped.status();
  EXPECT_EQ(stopped->epoch, 0);
  EXPECT_EQ(stopped->in_epoch, 1);
  EXPECT_EQ(stopped->batches_done, 2);
  EXPECT_EQ(stopped->step, 7);
  EXPECT_EQ(ReadCheckpointMeta(b.out_dir + "/last.prev.pt")->in_epoch, -1);  // epoch 0's end
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
  // A finished run resumed again has nothing to do, and leaves its history files alone.
  const std::string history = b.out_dir + "/history.csv";
  auto inode = [](const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_ino) : int64_t{-1};
  };
  const int64_t before = inode(history);
  auto third = Trainer::Create(Config(), b);
  ASSERT_TRUE(third.ok());
  EXPECT_TRUE((*third)->Run().ok());
  EXPECT_EQ(inode(history), before);  // not written again
  // A fault after the last epoch's last.pt (a full disk, a kill) left history.csv without that
  // epoch and no history.png: the run resumed has nothing to train, and writes them again from
  // last.pt's history.
  auto full = common::ReadFileToString(history);
  ASSERT_TRUE(full.ok()) << full.status();
  const std::string last_row_cut = full->substr(0, full->rfind('\n', full->size() - 2) + 1);
  ASSERT_LT(last_row_cut.size(), full->size());
  ASSERT_TRUE(common::WriteFileAtomically(history, last_row_cut).ok());
  ASSERT_TRUE(fs::remove(b.out_dir + "/history.png"));
  auto fourth = Trainer::Create(Config(), b);
  ASSERT_TRUE(fourth.ok());
  EXPECT_TRUE((*fourth)->Run().ok());
  EXPECT_EQ(*common::ReadFileToString(history), *full);
  EXPECT_TRUE(fs::exists(b.out_dir + "/history.png"));
  // history.png alone gone (a fault after history.csv's rename): drawn again, history.csv kept.
  const int64_t kept = inode(history);
  ASSERT_TRUE(fs::remove(b.out_dir + "/history.png"));
  auto fifth = Trainer::Create(Config(), b);
  ASSERT_TRUE(fifth.ok());
  EXPECT_TRUE((*fifth)->Run().ok());
  EXPECT_TRUE(fs::exists(b.out_dir + "/history.png"));
  EXPECT_EQ(inode(history), kept);
  // The catch-up passes the lease fence as every write does: a group whose lease ran out
  // leaves the cut file as it is, and its error names the file.
  ASSERT_TRUE(common::WriteFileAtomically(history, last_row_cut).ok());
  TrainOptions stale = b;
  stale.commit_check = [](const std::string& path) {
    if (absl::EndsWith(path, "history.csv")) return absl::AbortedError("lease expired; not writing " + path);
    return absl::OkStatus();
  };
  auto sixth = Trainer::Create(Config(), stale);
  ASSERT_TRUE(sixth.ok());
  absl::Status refused = (*sixth)->Run();
  EXPECT_TRUE(absl::IsAborted(refused)) << refused;
  EXPECT_FALSE(common::IsLeaseRevoked(refused)) << "an expired lease is no cancel";
  EXPECT_NE(refused.message().find("not writing " + history), std::string::npos) << refused;
  EXPECT_EQ(*common::ReadFileToString(history), last_row_cut);
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
  // A last.pt that cannot be read now (an I/O error on a network share) is not a damaged one:
  // the resume stops, naming it, rather than going on from last.prev.pt and moving it aside.
  const std::string last_pt = o.out_dir + "/last.pt";
  SetCheckpointReadFaultForTest([&](const std::string& p) { return p == last_pt ? EIO : 0; });
  o.attempt = 2;
  o.extend_epochs = true;  // on to 3 epochs
  auto blocked = Trainer::Create(Config(), o);
  SetCheckpointReadFaultForTest(nullptr);
  ASSERT_FALSE(blocked.ok());
  EXPECT_EQ(blocked.status().code(), absl::StatusCode::kUnavailable) << blocked.status();
  EXPECT_TRUE(absl::StrContains(blocked.status().message(),
                                last_pt + ": reading the checkpoint: Input/output error: it may hold the newest epoch"))
      << blocked.status();
  EXPECT_EQ(ReadCheckpointMeta(last_pt)->epoch, 1);  // in place, not moved aside
  EXPECT_NE(::access((last_pt + ".unreadable").c_str(), F_OK), 0);
  // Replaced between the resume's choice and its restore (by a writer that still held the
  // folder): the resume chooses again with what the file holds then, and restores that
  // consistently (metadata, weights and optimizer state from one read).
  const std::string kept = o.out_dir + "/kept.pt";
  ASSERT_TRUE(common::WriteFileAtomically(kept, *common::ReadFileToString(last_pt)).ok());
  int opens = 0;
  SetCheckpointReadFaultForTest([&](const std::string& p) {
    if (p == last_pt && ++opens == 2) {  // the restore's open, after the choice's
      EXPECT_EQ(::system(("cp " + o.out_dir + "/last.prev.pt " + last_pt).c_str()), 0);
    }
    return 0;
  });
  WarningTap warnings;
  auto replaced = Trainer::Create(Config(), o);
  SetCheckpointReadFaultForTest(nullptr);
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  EXPECT_EQ((*replaced)->history().size(), 1u);  // epoch 0: what last.pt held when restored
  bool said = false;
  for (const std::string& line : warnings.lines()) {
    said = said || absl::StrContains(line, last_pt + " was replaced while it was read; choosing again");
  }
  EXPECT_TRUE(said);
  replaced->reset();
  ASSERT_EQ(::rename(kept.c_str(), last_pt.c_str()), 0);
  o.attempt = 1;
  o.extend_epochs = false;
  // A torn last.pt (storage trouble): the next attempt resumes from last.prev.pt.
  ASSERT_TRUE(common::WriteFileAtomically(o.out_dir + "/last.pt", "torn").ok());
  o.attempt = 2;
  o.extend_epochs = true;  // on to 3 epochs
  auto second = Trainer::Create(Config(), o);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*second)->history().size(), 1u);  // epoch 0 restored
  // The torn file is moved aside: the next rotation would otherwise rename it over the only
  // good checkpoint, last.prev.pt.
  EXPECT_EQ(*common::ReadFileToString(o.out_dir + "/last.pt.unreadable"), "torn");
  ASSERT_TRUE((*second)->Run().ok());
  auto last = ReadCheckpointMeta(o.out_dir + "/last.pt");
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->epoch, 2);
  EXPECT_EQ(last->attempt, 2);
  auto h = common::CsvTable::ReadFile(o.out_dir + "/history.csv");
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->num_rows(), 3u);
}

// A last.pt whose weights read back but whose EMA state does not fit the model (damaged, or
// edited) falls back to last.prev.pt like damaged weights: it ended the run, with a good
// last.prev.pt beside it.
TEST_F(TrainerTest, ALastCheckpointWithABadEmaStateFallsBackToThePreviousOne) {
  common::PipelineConfig c = Config();
  for (auto* t : {&c.train, &c.stages["finetune"].train}) {
    t->epochs = 2;
    t->ema_decay = 0.9;
  }
  TrainOptions o;
  o.out_dir = Out("ema_fallback");
  auto first = Trainer::Create(c, o);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE((*first)->Run().ok());
  // last.pt rewritten with its own weights, optimizer state and metadata, and an EMA state that
  // names no parameter of the model.
  const std::string last = o.out_dir + "/last.pt";
  auto meta = ReadCheckpointMeta(last);
  ASSERT_TRUE(meta.ok()) << meta.status();
  auto model = BuildClassifier(c.model, meta->in_channels, meta->num_classes);
  ASSERT_TRUE(model.ok()) << model.status();
  AdamOptimizer optimizer(**model, AdamSettings{});
  auto restored = RestoreCheckpoint(last, **model, &optimizer);
  ASSERT_TRUE(restored.ok()) << restored.status();
  CheckpointGroups bad{{"ema_state", {{"not_a_parameter", at::zeros({3})}, {"__updates", at::scalar_tensor(5, at::kLong)}}}};
  ASSERT_TRUE(SaveCheckpoint(last, **model, &optimizer, *meta, {}, bad).ok());
  for (auto* t : {&c.train, &c.stages["finetune"].train}) t->epochs = 3;
  o.extend_epochs = true;
  WarningTap warnings;
  auto second = Trainer::Create(c, o);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*second)->history().size(), 1u);  // last.prev.pt: epoch 0
  bool said = false;
  for (const std::string& line : warnings.lines()) {
    said = said || absl::StrContains(line, last + ": the EMA state does not fit the model");
  }
  EXPECT_TRUE(said);
  ASSERT_TRUE((*second)->Run().ok());
  auto resumed = ReadCheckpointMeta(last);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(resumed->epoch, 2);
}

// An epoch that trained long enough is saved before its validation (a mid-epoch last.pt with
// every batch done): a run that dies during validation or the epoch's writes (here: its best.pt
// refused) resumes at the validation, not the epoch's first step, and ends as an uninterrupted
// run does.
TEST_F(TrainerTest, AnEpochSavedBeforeItsValidationResumesThere) {
  common::PipelineConfig two = Config();
  for (auto& [name, stage] : two.stages) stage.train.epochs = 2;
  TrainOptions a;
  a.out_dir = Out("straight_pv");
  auto straight = Trainer::Create(two, a);
  ASSERT_TRUE(straight.ok()) << straight.status();
  ASSERT_TRUE((*straight)->Run().ok());

  TrainOptions b;
  b.out_dir = Out("before_validation");
  b.checkpoint_before_validation_s = 0;  // every epoch
  b.commit_check = [](const std::string& path) {
    // As a cancel's revoked lease refuses it (worker/agent/lease_clock.cc).
    if (absl::EndsWith(path, "/best.pt")) {
      return common::MarkLeaseRevoked(absl::AbortedError("stopped for the test: not writing " + path));
    }
    return absl::OkStatus();
  };
  auto first = Trainer::Create(two, b);
  ASSERT_TRUE(first.ok()) << first.status();
  const absl::Status cancelled = (*first)->Run();
  ASSERT_TRUE(absl::IsAborted(cancelled)) << cancelled;
  EXPECT_TRUE(common::IsLeaseRevoked(cancelled)) << "the refusal's mark is lost on the way: " << cancelled;
  auto saved = ReadCheckpointMeta(b.out_dir + "/last.pt");
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(saved->epoch, -1);
  EXPECT_EQ(saved->in_epoch, 0);
  EXPECT_EQ(saved->batches_done, 5);  // all of epoch 0's
  EXPECT_EQ(saved->step, 5);
  b.commit_check = nullptr;
  int steps = 0;
  b.on_step = [&steps](const StepStats&) { ++steps; };
  auto second = Trainer::Create(two, b);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*second)->history().size(), 0u);
  ASSERT_TRUE((*second)->Run().ok());
  EXPECT_EQ(steps, 5);  // epoch 1's only: epoch 0 was validated without training it again
  auto ha = common::CsvTable::ReadFile(a.out_dir + "/history.csv");
  auto hb = common::CsvTable::ReadFile(b.out_dir + "/history.csv");
  ASSERT_TRUE(ha.ok() && hb.ok());
  ASSERT_EQ(ha->num_rows(), 2u);
  ASSERT_EQ(hb->num_rows(), 2u);
  const size_t speed = *ha->ColumnIndex("samples_per_s");
  for (size_t r = 0; r < 2; ++r) {
    for (size_t c = 0; c < ha->header().size(); ++c) {
      if (c == speed) continue;
      EXPECT_EQ(ha->row(r)[c], hb->row(r)[c]) << "row " << r << " " << ha->header()[c];
    }
  }
  EXPECT_EQ(hb->row(0)[speed], "nan");  // none of epoch 0 trained by the run that validated it
  EXPECT_NE(hb->row(1)[speed], "nan");
  auto wa = ReadCheckpointTensors(a.out_dir + "/last.pt");
  auto wb = ReadCheckpointTensors(b.out_dir + "/last.pt");
  ASSERT_TRUE(wa.ok() && wb.ok());
  ASSERT_EQ(wa->size(), wb->size());
  for (size_t i = 0; i < wa->size(); ++i) {
    EXPECT_TRUE(at::equal((*wa)[i].second, (*wb)[i].second)) << (*wa)[i].first;
  }
}

// `aviary-worker train` locks its run folder: a second run there (a rerun while the first still
// writes: a replacement pod in the first's grace period) is refused naming the holder, and goes
// once the first has ended.
TEST_F(TrainerTest, ASecondRunInALockedFolderIsRefused) {
  TrainOptions o;
  o.out_dir = Out("locked");
  o.lock_run_folder = true;
  auto first = Trainer::Create(Config(), o);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = Trainer::Create(Config(), o);
  ASSERT_FALSE(second.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(second.status())) << second.status();
  EXPECT_NE(second.status().message().find(absl::StrCat("(pid ", ::getpid(), " on ")), std::string::npos)
      << second.status();
  EXPECT_NE(second.status().message().find("is training in it"), std::string::npos) << second.status();
  first->reset();
  auto third = Trainer::Create(Config(), o);
  EXPECT_TRUE(third.ok()) << third.status();
}

// Sets AVIARY_FAULT_INJECT for one scope (the trainer reads it at Create).
class ScopedFault {
 public:
  explicit ScopedFault(const std::string& plan) { ::setenv("AVIARY_FAULT_INJECT", plan.c_str(), 1); }
  ~ScopedFault() { ::unsetenv("AVIARY_FAULT_INJECT"); }
};

// Weights made non-finite by a step whose loss was finite (a non-finite gradient: no check sees
// it unless clipping or train.skip_nonfinite asks) are not written over a good last.pt by the
// stop that follows; and a checkpoint that holds such weights is not resumed from.
TEST_F(TrainerTest, NonFiniteWeightsAreNeitherWrittenNorResumed) {
  TrainOptions o;
  o.out_dir = Out("nan_weights");
  common::PipelineConfig two = Config();
  for (auto& [name, stage] : two.stages) stage.train.epochs = 2;
  {
    ScopedFault fault("rank=0,step=7,kind=nan_weights");  // epoch 1, batch 2
    int polls = 0;
    o.should_stop = [&polls] { return ++polls > 8; };  // the stop at epoch 1 batch 3, right after
    auto t = Trainer::Create(two, o);
    ASSERT_TRUE(t.ok()) << t.status();
    const absl::Status st = (*t)->Run();
    ASSERT_TRUE(absl::IsCancelled(st)) << st;
  }
  auto last = ReadCheckpointMeta(o.out_dir + "/last.pt");
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->epoch, 0);  // epoch 0's end, not the stop's non-finite weights
  EXPECT_EQ(last->in_epoch, -1);
  // A last.pt with non-finite weights (written by an earlier aviary): last.prev.pt is resumed.
  fs::rename(o.out_dir + "/last.pt", o.out_dir + "/last.prev.pt");
  {
    auto model = BuildClassifier(two.model, last->in_channels, last->num_classes);
    ASSERT_TRUE(model.ok()) << model.status();
    {
      torch::NoGradGuard no_grad;
      (*model)->parameters().front().fill_(std::numeric_limits<float>::quiet_NaN());
    }
    auto optimizer = AdamOptimizer::FromConfig(two.stages.at("finetune").train, **model);
    ASSERT_TRUE(optimizer.ok()) << optimizer.status();
    CheckpointMeta later = *last;
    later.epoch = 1;
    ASSERT_TRUE(SaveCheckpoint(o.out_dir + "/last.pt", **model, optimizer->get(), later).ok());
  }
  o.should_stop = nullptr;
  auto resumed = Trainer::Create(two, o);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ((*resumed)->history().size(), 1u);  // after epoch 0 (last.prev.pt)
  EXPECT_TRUE(fs::exists(o.out_dir + "/last.pt.unreadable"));
  ASSERT_TRUE((*resumed)->Run().ok());
}

// train.skip_nonfinite skips a step whose loss is not finite; a run that skips every step
// trains nothing and ends, naming the count.
TEST_F(TrainerTest, SkippingEveryStepEndsTheRun) {
  TrainOptions o;
  o.out_dir = Out("skip_all");
  o.max_skipped_in_a_row = 4;
  common::PipelineConfig c = Config();
  for (auto& [name, stage] : c.stages) stage.train.skip_nonfinite = true;
  ScopedFault fault("rank=0,step=2,kind=nan_from");
  auto t = Trainer::Create(c, o);
  ASSERT_TRUE(t.ok()) << t.status();
  const absl::Status st = (*t)->Run();
  EXPECT_TRUE(absl::IsDataLoss(st)) << st;
  EXPECT_NE(st.message().find("4 batches in a row skipped"), std::string::npos) << st;
  // Stopped two skips into the streak and resumed: the streak goes on from last.pt (the run
  // ends at the same batch as the uninterrupted one, not after 4 more).
  TrainOptions b = o;
  b.out_dir = Out("skip_all_resumed");
  int polls = 0;
  b.should_stop = [&polls] { return ++polls > 4; };  // steps 0 and 1 trained, batches 2 and 3 skipped
  auto first = Trainer::Create(c, b);
  ASSERT_TRUE(first.ok()) << first.status();
  const absl::Status stopped = (*first)->Run();
  ASSERT_TRUE(absl::IsCancelled(stopped)) << stopped;
  auto meta = ReadCheckpointMeta(b.out_dir + "/last.pt");
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->skipped_in_a_row, 2);
  b.should_stop = nullptr;
  auto resumed = Trainer::Create(c, b);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  const absl::Status again = (*resumed)->Run();
  EXPECT_TRUE(absl::IsDataLoss(again)) << again;
  EXPECT_EQ(again.message(), st.message());
}

// A batch skipped for a non-finite loss leaves BatchNorm's running statistics as they were: its
// forward (a NaN in its input, as from a damaged cache shard) made them NaN for good, and every
// validation after it failed "outputs are not finite" though the step itself was skipped.
TEST_F(TrainerTest, ASkippedBatchLeavesTheRunningStatisticsAsTheyWere) {
  TrainOptions o;
  o.out_dir = Out("skip_nan_input");
  common::PipelineConfig c = Config();
  for (auto& [name, stage] : c.stages) {
    stage.train.skip_nonfinite = true;
    stage.train.epochs = 1;
  }
  ScopedFault fault("rank=0,step=2,kind=nan_input");
  auto t = Trainer::Create(c, o);
  ASSERT_TRUE(t.ok()) << t.status();
  const absl::Status st = (*t)->Run();
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ((*t)->skipped_steps(), 1);
  ASSERT_EQ((*t)->history().size(), 1u);
  EXPECT_TRUE(std::isfinite((*t)->history()[0].val_loss)) << (*t)->history()[0].val_loss;
  EXPECT_TRUE(std::isfinite((*t)->history()[0].train_loss)) << (*t)->history()[0].train_loss;
}

// Without train.skip_nonfinite a non-finite loss ends the run, and the step goes out through
// on_step first with that loss (the agent sends it at once, the coordinator exports it for the
// AviaryLossNotFinite alert): it used to end unreported, the running mean finite.
TEST_F(TrainerTest, ANonFiniteLossThatEndsTheRunIsReportedFirst) {
  TrainOptions o;
  o.out_dir = Out("nonfinite_stop");
  std::vector<StepStats> steps;
  o.on_step = [&](const StepStats& s) { steps.push_back(s); };
  ScopedFault fault("rank=0,step=2,kind=nan");
  auto t = Trainer::Create(Config(), o);
  ASSERT_TRUE(t.ok()) << t.status();
  const absl::Status st = (*t)->Run();
  EXPECT_TRUE(absl::IsDataLoss(st)) << st;
  ASSERT_EQ(steps.size(), 3u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_FALSE(steps[i].nonfinite_stop) << i;
    EXPECT_TRUE(std::isfinite(steps[i].train_loss)) << i;
  }
  EXPECT_TRUE(steps[2].nonfinite_stop);
  EXPECT_TRUE(std::isnan(steps[2].train_loss)) << steps[2].train_loss;
  EXPECT_TRUE(steps[2].skipped);
  EXPECT_EQ(steps[2].samples, 0);
}

// A stop between an epoch's two renames (best.pt, then last.pt): best.pt holds an epoch the
// resumed run trains again. Its value is adopted: the re-run replaces best.pt only by doing
// better, and the best epoch reported is the one whose weights best.pt holds.
TEST_F(TrainerTest, ABestCheckpointNewerThanTheResumedOneIsKept) {
  TrainOptions o;
  o.out_dir = Out("newer_best");
  common::PipelineConfig two = Config();
  for (auto& [name, stage] : two.stages) stage.train.epochs = 2;
  {
    auto first = Trainer::Create(two, o);
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_TRUE((*first)->Run().ok());
  }
  // As if epoch 2 had written best.pt (with a value no re-run reaches) and then stopped.
  auto meta = ReadCheckpointMeta(o.out_dir + "/best.pt");
  ASSERT_TRUE(meta.ok()) << meta.status();
  meta->epoch = meta->best_epoch = 2;
  meta->best_value = 0.999;
  {
    auto model = BuildClassifier(two.model, meta->in_channels, meta->num_classes);
    ASSERT_TRUE(model.ok()) << model.status();
    ASSERT_TRUE(SaveCheckpoint(o.out_dir + "/best.pt", **model, nullptr, *meta).ok());
  }
  auto kept = ReadCheckpointTensors(o.out_dir + "/best.pt");
  ASSERT_TRUE(kept.ok()) << kept.status();
  o.extend_epochs = true;  // on to 3 epochs
  auto second = Trainer::Create(Config(), o);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE((*second)->Run().ok());
  auto best = ReadCheckpointMeta(o.out_dir + "/best.pt");
  ASSERT_TRUE(best.ok()) << best.status();
  EXPECT_EQ(best->best_epoch, 2);
  EXPECT_EQ(best->best_value, 0.999);  // not replaced by a worse re-run of epoch 2
  // Nor its weights: they were written again with the re-run's, under the adopted value.
  auto weights = ReadCheckpointTensors(o.out_dir + "/best.pt");
  ASSERT_TRUE(weights.ok()) << weights.status();
  ASSERT_EQ(weights->size(), kept->size());
  for (size_t i = 0; i < kept->size(); ++i) {
    EXPECT_TRUE(at::equal((*weights)[i].second, (*kept)[i].second)) << (*kept)[i].first;
  }
  const auto& history = (*second)->history();
  ASSERT_EQ(history.size(), 3u);
  for (const EpochRecord& r : history) EXPECT_EQ(r.best, r.epoch == 2) << "epoch " << r.epoch;
  auto last = ReadCheckpointMeta(o.out_dir + "/last.pt");
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->best_epoch, 2);
}

// A stop between the rotation's renames (last.pt -> last.prev.pt, last.pt.ready.<pid> -> last.pt):
// the newest checkpoint is only the ready file. It is renamed back, not removed as stale (which
// lost an epoch); one cut short is removed, and so is a complete ".tmp." one (the lease fence may
// have refused it).
TEST_F(TrainerTest, ACompleteTemporaryCheckpointLeftByARotationIsResumed) {
  TrainOptions o;
  o.out_dir = Out("rotation");
  common::PipelineConfig two = Config();
  for (auto& [name, stage] : two.stages) stage.train.epochs = 2;
  {
    auto first = Trainer::Create(two, o);
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_TRUE((*first)->Run().ok());
  }
  const std::string complete = *common::ReadFileToString(o.out_dir + "/last.pt");
  fs::rename(o.out_dir + "/last.pt", o.out_dir + "/last.pt.ready.4242");
  ASSERT_TRUE(common::WriteFileAtomically(o.out_dir + "/last.pt.ready.4243", complete.substr(0, complete.size() / 2)).ok());
  fs::copy_file(o.out_dir + "/last.pt.ready.4242", o.out_dir + "/last.pt.tmp.4244");
  auto prev = ReadCheckpointMeta(o.out_dir + "/last.prev.pt");
  ASSERT_TRUE(prev.ok()) << prev.status();
  ASSERT_EQ(prev->epoch, 0);
  o.extend_epochs = true;  // on to 3 epochs
  auto resumed = Trainer::Create(Config(), o);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ((*resumed)->history().size(), 2u);  // after epoch 1, not epoch 0 (last.prev.pt)
  for (const char* left : {"last.pt.ready.4242", "last.pt.ready.4243", "last.pt.tmp.4244"}) {
    EXPECT_FALSE(fs::exists(o.out_dir + "/" + left)) << left;
  }
  EXPECT_EQ(*common::ReadFileToString(o.out_dir + "/last.pt"), complete);
  ASSERT_TRUE((*resumed)->Run().ok());
  EXPECT_EQ((*resumed)->history().size(), 3u);
}

// A stop between the rotation's first renames (the new file staged as last.pt.ready.X, last.pt
// not yet moved to last.prev.pt) left the newest epoch beside an older last.pt: the rotation is
// finished, not the newer file removed. A ready file that cannot be read now may be the newest
// epoch: the start is refused and the file kept.
TEST_F(TrainerTest, ARotationStoppedBeforeItsSecondRenameIsFinished) {
  TrainOptions o;
  o.out_dir = Out("rotation2");
  common::PipelineConfig two = Config();
  for (auto& [name, stage] : two.stages) stage.train.epochs = 2;
  {
    auto first = Trainer::Create(two, o);
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_TRUE((*first)->Run().ok());
  }
  const std::string epoch1 = *common::ReadFileToString(o.out_dir + "/last.pt");
  const std::string epoch0 = *common::ReadFileToString(o.out_dir + "/last.prev.pt");
  fs::rename(o.out_dir + "/last.pt", o.out_dir + "/last.pt.ready.4242");
  fs::rename(o.out_dir + "/last.prev.pt", o.out_dir + "/last.pt");

  // Unreadable now (EIO): refused, naming it, and kept.
  const std::string ready = o.out_dir + "/last.pt.ready.4242";
  SetCheckpointReadFaultForTest([&](const std::string& p) { return p == ready ? EIO : 0; });
  o.extend_epochs = true;  // on to 3 epochs
  auto refused = Trainer::Create(Config(), o);
  SetCheckpointReadFaultForTest(nullptr);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  EXPECT_NE(refused.status().message().find(ready), std::string::npos) << refused.status();
  EXPECT_NE(refused.status().message().find("may hold the newest epoch"), std::string::npos) << refused.status();
  EXPECT_TRUE(fs::exists(ready));
  EXPECT_EQ(*common::ReadFileToString(o.out_dir + "/last.pt"), epoch0);

  auto resumed = Trainer::Create(Config(), o);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ((*resumed)->history().size(), 2u);  // after epoch 1 (the ready file), not epoch 0
  EXPECT_FALSE(fs::exists(ready));
  EXPECT_EQ(*common::ReadFileToString(o.out_dir + "/last.pt"), epoch1);
  EXPECT_EQ(*common::ReadFileToString(o.out_dir + "/last.prev.pt"), epoch0);
  ASSERT_TRUE((*resumed)->Run().ok());
  EXPECT_EQ((*resumed)->history().size(), 3u);
}

// The same ready file beside a last.pt that cannot be read now (EIO): kept, and the start refused
// by Resume; beside a damaged last.pt: adopted, the damaged one set aside (it was removed, and the
// run fell back to last.prev.pt: two epochs lost).
TEST_F(TrainerTest, AReadyCheckpointBesideAnUnreadableLastCheckpointIsKept) {
  TrainOptions o;
  o.out_dir = Out("rotation3");
  common::PipelineConfig two = Config();
  for (auto& [name, stage] : two.stages) stage.train.epochs = 2;
  {
    auto first = Trainer::Create(two, o);
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_TRUE((*first)->Run().ok());
  }
  const std::string epoch1 = *common::ReadFileToString(o.out_dir + "/last.pt");
  const std::string ready = o.out_dir + "/last.pt.ready.4242";
  const std::string last_pt = o.out_dir + "/last.pt";
  fs::rename(last_pt, ready);
  fs::copy_file(o.out_dir + "/last.prev.pt", last_pt);  // epoch 0
  SetCheckpointReadFaultForTest([&](const std::string& p) { return p == last_pt ? EIO : 0; });
  o.extend_epochs = true;  // on to 3 epochs
  auto refused = Trainer::Create(Config(), o);
  SetCheckpointReadFaultForTest(nullptr);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  EXPECT_TRUE(fs::exists(ready));

  ASSERT_TRUE(common::WriteFileAtomically(last_pt, "torn").ok());
  auto resumed = Trainer::Create(Config(), o);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ((*resumed)->history().size(), 2u);  // after epoch 1 (the ready file)
  EXPECT_FALSE(fs::exists(ready));
  EXPECT_EQ(*common::ReadFileToString(last_pt), epoch1);
  EXPECT_EQ(*common::ReadFileToString(o.out_dir + "/last.pt.unreadable"), "torn");
}

// A stop whose mid-epoch checkpoint could not be written for want of space is still a stop, but
// says so (the agent then waits for space before it leases another task).
TEST_F(TrainerTest, AStopWhoseCheckpointFoundNoSpaceSaysSo) {
  TrainOptions o;
  o.out_dir = Out("stop_enospc");
  int polls = 0;
  o.should_stop = [&polls] { return ++polls > 2; };
  o.commit_check = [](const std::string& path) {
    if (!absl::EndsWith(path, "/last.pt")) return absl::OkStatus();  // config.yaml at the start
    common::StorageFault fault;
    fault.path = path;
    fault.dir = fs::path(path).parent_path().string();
    fault.num_bytes = 1;
    fault.error = ENOSPC;
    return common::WithStorageFault(absl::ResourceExhaustedError(path + ": No space left on device (ENOSPC)"),
                                    fault);
  };
  auto t = Trainer::Create(Config(), o);
  ASSERT_TRUE(t.ok()) << t.status();
  const absl::Status stopped = (*t)->Run();
  EXPECT_TRUE(absl::IsCancelled(stopped)) << stopped;
  const std::optional<common::StorageFault> fault = common::StorageFaultOf(stopped);
  ASSERT_TRUE(fault.has_value()) << stopped;
  EXPECT_EQ(fault->error, ENOSPC);
  EXPECT_FALSE(fs::exists(o.out_dir + "/last.pt"));
}

// Starting over (--no-resume) in a folder of a finished run, stopped early: a later resume
// continues the new run. The old run's last.pt (epoch 1) used to stay as last.prev.pt and win
// over the new run's (epoch 0, mid-epoch) by its higher epoch.
TEST_F(TrainerTest, StartingOverMovesTheEarlierRunsCheckpointsAside) {
  TrainOptions o;
  o.out_dir = Out("over");
  common::PipelineConfig two = Config();
  for (auto& [name, stage] : two.stages) stage.train.epochs = 2;
  {
    auto first = Trainer::Create(two, o);
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_TRUE((*first)->Run().ok());
  }
  // What a write killed before its rename leaves (a SIGKILL): removed at the next start.
  common::WriteFileAtomically(o.out_dir + "/last.pt.tmp.12345", std::string(1000, 'x')).IgnoreError();
  common::WriteFileAtomically(o.out_dir + "/notes.tmp.1", "mine").IgnoreError();
  TrainOptions fresh = o;
  fresh.resume = false;
  int polls = 0;
  fresh.should_stop = [&polls] { return ++polls > 2; };
  {
    auto over = Trainer::Create(two, fresh);
    ASSERT_TRUE(over.ok()) << over.status();
    EXPECT_TRUE(absl::IsCancelled((*over)->Run()));
  }
  for (const char* name : {"last.pt", "last.prev.pt", "best.pt", "history.csv", "config.yaml"}) {
    EXPECT_TRUE(fs::exists(o.out_dir + "/" + name + ".replaced")) << name;
  }
  EXPECT_FALSE(fs::exists(o.out_dir + "/best.pt"));
  EXPECT_FALSE(fs::exists(o.out_dir + "/last.pt.tmp.12345"));
  EXPECT_TRUE(fs::exists(o.out_dir + "/notes.tmp.1"));  // not ours
  auto stopped = ReadCheckpointMeta(o.out_dir + "/last.pt");
  ASSERT_TRUE(stopped.ok()) << stopped.status();
  EXPECT_EQ(stopped->in_epoch, 0);
  auto resumed = Trainer::Create(two, o);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ((*resumed)->history().size(), 0u);  // inside the new run's epoch 0, not after the old run's epoch 1
  ASSERT_TRUE((*resumed)->Run().ok());
  EXPECT_EQ((*resumed)->history().size(), 2u);
  // Starting over again keeps the first start's files: the second run's go to *.replaced.2.
  const auto size_of = [&](const std::string& name) { return fs::file_size(o.out_dir + "/" + name); };
  const uintmax_t first_best = size_of("best.pt.replaced");
  const auto first_best_time = fs::last_write_time(o.out_dir + "/best.pt.replaced");
  polls = 0;
  {
    auto again = Trainer::Create(two, fresh);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_TRUE(absl::IsCancelled((*again)->Run()));
  }
  for (const char* name : {"last.pt", "last.prev.pt", "best.pt"}) {
    EXPECT_TRUE(fs::exists(o.out_dir + "/" + name + ".replaced")) << name;
    EXPECT_TRUE(fs::exists(o.out_dir + "/" + name + ".replaced.2")) << name;
  }
  EXPECT_EQ(size_of("best.pt.replaced"), first_best);
  EXPECT_EQ(fs::last_write_time(o.out_dir + "/best.pt.replaced"), first_best_time);
}

// A run folder with an earlier run's best.pt and history but no last.pt (removed to save space):
// nothing to resume, and this run's epoch 0 would replace them; they are moved aside instead.
TEST_F(TrainerTest, AFreshStartMovesAnEarlierRunsBestCheckpointAside) {
  TrainOptions o;
  o.out_dir = Out("leftover");
  {
    auto first = Trainer::Create(Config(), o);
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_TRUE((*first)->Run().ok());
  }
  const std::string best = *common::ReadFileToString(o.out_dir + "/best.pt");
  fs::remove(o.out_dir + "/last.pt");
  fs::remove(o.out_dir + "/last.prev.pt");
  auto again = Trainer::Create(Config(), o);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->history().size(), 0u);
  EXPECT_EQ(*common::ReadFileToString(o.out_dir + "/best.pt.replaced"), best);
  EXPECT_TRUE(fs::exists(o.out_dir + "/history.csv.replaced"));
  EXPECT_TRUE(fs::exists(o.out_dir + "/config.yaml.replaced"));
  EXPECT_FALSE(fs::exists(o.out_dir + "/best.pt"));
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

// The start's tidy-up (staged files of an earlier attempt removed, a stopped rotation finished)
// is fenced as the writes are: a group whose lease is gone before the start (reaped while it
// fetched the manifest) removed the new holder's staged checkpoint.
TEST_F(TrainerTest, TheStartsTidyUpIsFencedAsTheWritesAre) {
  TrainOptions o;
  o.out_dir = Out("tidy_fenced");
  fs::create_directories(o.out_dir);
  const std::string staged = o.out_dir + "/best.pt.tmp.123.456";  // the new holder's, being written
  std::ofstream(staged) << "being written";
  o.commit_check = [](const std::string& path) {
    return absl::AbortedError("lease for task j000000000001/finetune-f0 attempt 1 expired; not writing " + path);
  };
  auto t = Trainer::Create(Config(), o);  // the start (and its tidy-up) is Create's
  const absl::Status refused = t.ok() ? (*t)->Run() : t.status();
  EXPECT_TRUE(absl::IsAborted(refused)) << refused;
  EXPECT_TRUE(fs::exists(staged));
  // With the lease, the stale file goes.
  o.commit_check = nullptr;
  auto again = Trainer::Create(Config(), o);
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_TRUE((*again)->Run().ok());
  EXPECT_FALSE(fs::exists(staged));
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

// The tensors of `path` whose names start with `prefix`, by name.
std::map<std::string, at::Tensor> TensorsUnder(const std::string& path, const std::string& prefix) {
  std::map<std::string, at::Tensor> out;
  auto tensors = ReadCheckpointTensors(path);
  EXPECT_TRUE(tensors.ok()) << tensors.status();
  if (!tensors.ok()) return out;
  for (auto& [name, tensor] : *tensors) {
    if (absl::StartsWith(name, prefix)) out.emplace(name, tensor);
  }
  return out;
}

TEST_F(TrainerTest, FineTuningTakesTheBackboneAndResumesWithoutItsInitFile) {
  common::PipelineConfig c = Config();
  c.debug = true;
  TrainOptions pre;
  pre.stage = "pretrain";
  pre.out_dir = Out("init_pretrain");
  auto p = Trainer::Create(c, pre);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_TRUE((*p)->Run().ok());
  const std::string best = pre.out_dir + "/best.pt";

  // Stopped after its first step (at the ramp's 5e-6: Adam moves a weight by about that): the
  // backbone's weights are the pretraining's, give or take the step (a fresh one's are not).
  TrainOptions fine;
  fine.stage = "finetune";
  fine.out_dir = Out("init_finetune");
  fine.init_checkpoint = best;
  int polls = 0;
  fine.should_stop = [&polls] { return ++polls > 1; };
  auto stopped = Trainer::Create(c, fine);
  ASSERT_TRUE(stopped.ok()) << stopped.status();
  ASSERT_TRUE(absl::IsCancelled((*stopped)->Run()));
  ASSERT_EQ(ReadCheckpointMeta(fine.out_dir + "/last.pt")->step, 1);
  const auto pretrained = TensorsUnder(best, "features.");
  const auto initialised = TensorsUnder(fine.out_dir + "/last.pt", "features.");
  ASSERT_FALSE(pretrained.empty());
  ASSERT_EQ(initialised.size(), pretrained.size());
  int weights = 0;
  for (const auto& [name, tensor] : pretrained) {
    ASSERT_TRUE(initialised.count(name)) << name;
    if (!tensor.is_floating_point() || absl::StrContains(name, "running_")) continue;  // BatchNorm's statistics move
    ++weights;
    EXPECT_TRUE(at::allclose(initialised.at(name), tensor, /*rtol=*/0, /*atol=*/1e-4)) << name;
  }
  EXPECT_GT(weights, 0);

  // The pretraining's best.pt moved away (its run started over): the fine-tuning resumes from its
  // own last.pt, and ends as a run never stopped does.
  ASSERT_EQ(::rename(best.c_str(), (best + ".moved").c_str()), 0);
  fine.should_stop = nullptr;
  auto resumed = Trainer::Create(c, fine);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  ASSERT_TRUE((*resumed)->Run().ok());
  ASSERT_EQ(::rename((best + ".moved").c_str(), best.c_str()), 0);
  TrainOptions straight = fine;
  straight.out_dir = Out("init_straight");
  auto uninterrupted = Trainer::Create(c, straight);
  ASSERT_TRUE(uninterrupted.ok()) << uninterrupted.status();
  ASSERT_TRUE((*uninterrupted)->Run().ok());
  const auto a = TensorsUnder(straight.out_dir + "/last.pt", "");
  const auto b = TensorsUnder(fine.out_dir + "/last.pt", "");
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, tensor] : a) {
    ASSERT_TRUE(b.count(name)) << name;
    EXPECT_TRUE(at::equal(b.at(name), tensor)) << name;
  }

  // A run of the same classes takes the head too.
  TrainOptions again = fine;
  again.out_dir = Out("init_same_classes");
  again.init_checkpoint = fine.out_dir + "/best.pt";
  polls = 0;
  again.should_stop = [&polls] { return ++polls > 1; };
  auto same = Trainer::Create(c, again);
  ASSERT_TRUE(same.ok()) << same.status();
  ASSERT_TRUE(absl::IsCancelled((*same)->Run()));
  const auto head = TensorsUnder(again.init_checkpoint, "classifier.");
  const auto taken = TensorsUnder(again.out_dir + "/last.pt", "classifier.");
  ASSERT_FALSE(head.empty());
  ASSERT_EQ(taken.size(), head.size());
  for (const auto& [name, tensor] : head) {
    EXPECT_TRUE(at::allclose(taken.at(name), tensor, /*rtol=*/0, /*atol=*/1e-4)) << name;
  }

  // A checkpoint of another model is refused, naming both (B0's backbone would fit B1's by name
  // and shape, B1's extra blocks left random).
  common::PipelineConfig other = c;
  other.model.name = "efficientnet_b0";
  TrainOptions foreign = fine;
  foreign.out_dir = Out("init_foreign");
  auto refused = Trainer::Create(other, foreign);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_NE(refused.status().message().find("--init is a checkpoint of small_cnn"), std::string::npos)
      << refused.status();
  EXPECT_NE(refused.status().message().find("this run builds efficientnet_b0"), std::string::npos)
      << refused.status();
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
  // --init inside --out: read after the start moved the folder's checkpoints aside.
  o.init_checkpoint = o.out_dir + "/best.pt";
  auto inside = Trainer::Create(Config(), o);
  EXPECT_EQ(inside.status().code(), absl::StatusCode::kInvalidArgument) << inside.status();
  EXPECT_NE(inside.status().message().find("lies in the run folder --out"), std::string::npos) << inside.status();

  o.init_checkpoint.clear();
  common::PipelineConfig c = Config();
  c.model.pretrain = "imagenet";
  c.model.pretrained_weights = *root_ + "/2024/train_metadata.csv";  // not weights
  auto bad_weights = Trainer::Create(c, o);
  ASSERT_FALSE(bad_weights.ok());
  EXPECT_NE(bad_weights.status().message().find("train_metadata.csv"), absl::string_view::npos);

  // With drop_remainder false, a last training batch of one image per rank on a model that
  // shrinks the mel image to 1 x 1 (EfficientNet at 32 x 32) is refused before training: torch's
  // BatchNorm would throw at the epoch's last step.
  common::PipelineConfig tiny = Config();
  tiny.model.name = "efficientnet_b0";
  tiny.frontend.n_mels = 32;
  tiny.frontend.hop_length = 1024;  // 1 + 32000 / 1024 = 32 frames
  auto table = common::BuildStageTable(tiny, "finetune");
  ASSERT_TRUE(table.ok()) << table.status();
  auto list = common::BuildTrainList(tiny, *table, 0);
  ASSERT_TRUE(list.ok()) << list.status();
  const int n = static_cast<int>(list->train.size());
  tiny.train.batch_size = n - 1;
  tiny.train.drop_remainder = false;
  for (auto& [name, stage] : tiny.stages) stage.train = tiny.train;
  auto one_left = Trainer::Create(tiny, o);
  ASSERT_FALSE(one_left.ok());
  EXPECT_EQ(one_left.status().message(),
            absl::StrCat("stage finetune fold 0: the last training batch of each epoch holds 1 image per rank (", n,
                         " items, batch_size ", n - 1, " x 1 ranks) and model.name efficientnet_b0 shrinks the "
                         "32-mel image to 1 x 1, where BatchNorm cannot train; set train.drop_remainder to true"));
  tiny.train.batch_size = n - 2;  // a last batch of two images trains
  for (auto& [name, stage] : tiny.stages) stage.train = tiny.train;
  EXPECT_TRUE(Trainer::Create(tiny, o).ok());

  // train.cuda_graph on the CPU is refused by name, before training.
  common::PipelineConfig graphed = Config();
  graphed.train.cuda_graph = true;
  for (auto& [name, stage] : graphed.stages) stage.train = graphed.train;
  auto cpu_graph = Trainer::Create(graphed, o);
  ASSERT_FALSE(cpu_graph.ok());
  EXPECT_EQ(cpu_graph.status().message(),
            "train.cuda_graph: CUDA graphs need a CUDA device, got device cpu (set it false on the CPU)");

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

// model.pretrained_weights under the rule the coordinator applies at submit (common/backbone_fit):
// the model's own backbone loads (a 3-channel stem into a 1-channel model is left random); a
// tensor of another shape or a backbone tensor the model lacks is refused before training
// (both were skipped silently before), as is a file without the backbone.
TEST_F(TrainerTest, PretrainedWeightsMustFitTheBackbone) {
  common::ModelConfig small;
  small.name = "small_cnn";
  auto source = BuildClassifier(small, /*in_channels=*/3, /*num_classes=*/10);
  ASSERT_TRUE(source.ok()) << source.status();
  NamedTensors backbone;
  for (const auto& p : (*source)->named_parameters()) backbone.emplace_back(p.key(), p.value());
  for (const auto& b : (*source)->named_buffers()) backbone.emplace_back(b.key(), b.value());
  const std::string dir = Out("pretrained");
  auto write = [&](const std::string& name, const NamedTensors& tensors) {
    const std::string path = dir + "/" + name;
    EXPECT_TRUE(WriteSafetensors(tensors, path).ok());
    return path;
  };
  TrainOptions o;
  o.out_dir = Out("pretrained_run");
  common::PipelineConfig c = Config();
  c.model.pretrain = "imagenet";
  c.frontend.in_channels = 1;
  c.model.pretrained_weights = write("fits.safetensors", backbone);
  auto fits = Trainer::Create(c, o);
  EXPECT_TRUE(fits.ok()) << fits.status();

  NamedTensors wider = backbone;
  for (auto& [name, t] : wider) {
    if (name == "features.3.0.weight") t = at::zeros({256, 64, 3, 3});
  }
  NamedTensors deeper = backbone;
  deeper.emplace_back("features.4.0.weight", at::zeros({8, 128, 3, 3}));
  NamedTensors head_only;
  for (const auto& [name, t] : backbone) {
    if (name.rfind("features.", 0) != 0) head_only.emplace_back(name, t);
  }
  const std::vector<std::pair<std::string, NamedTensors>> refused{
      {"1 mismatched: features.3.0.weight: file [256, 64, 3, 3] vs model [128, 64, 3, 3]", wider},
      {"1 unexpected: features.4.0.weight", deeper},
      {"0 backbone tensors fit; ", head_only}};
  for (size_t i = 0; i < refused.size(); ++i) {
    c.model.pretrained_weights = write(absl::StrCat("refused", i, ".safetensors"), refused[i].second);
    auto bad = Trainer::Create(c, o);
    ASSERT_FALSE(bad.ok()) << refused[i].first;
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
    const std::string want = absl::StrCat("key 'model.pretrained_weights': '", c.model.pretrained_weights,
                                          "' does not fit model small_cnn (frontend.in_channels 1): ");
    EXPECT_NE(bad.status().message().find(want), absl::string_view::npos) << bad.status();
    EXPECT_NE(bad.status().message().find(refused[i].first), absl::string_view::npos) << bad.status();
  }
}

// TrainOptions::on_step and on_epoch: the step numbers add up to the history, the samples to
// the batches, and the checkpoints exist when on_epoch runs. on_progress comes with each
// validation batch: after an epoch's steps, the same number of times each epoch.
TEST_F(TrainerTest, StepStatsAddUpToTheHistory) {
  TrainOptions o;
  o.out_dir = Out("steps");
  std::vector<StepStats> steps;
  std::vector<bool> files_at_epoch_end;
  std::map<size_t, int> progress_after_steps;  // steps.size() at each on_progress -> calls
  o.on_step = [&](const StepStats& s) { steps.push_back(s); };
  o.on_progress = [&]() { ++progress_after_steps[steps.size()]; };
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
  ASSERT_EQ(progress_after_steps.size(), 3u);
  int epoch_end = 0;
  for (const auto& [after, calls] : progress_after_steps) {
    EXPECT_EQ(static_cast<int64_t>(after), per_epoch * ++epoch_end);
    EXPECT_GT(calls, 0);
    EXPECT_EQ(calls, progress_after_steps.begin()->second);
  }
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
  // train_acc: the correct predictions (summed on the device step by step, read at the epoch's
  // end) over the epoch's samples: a whole count each epoch, and not none over three epochs.
  double correct_total = 0;
  for (const EpochRecord& r : history) {
    const double count = r.train_acc * static_cast<double>(per_epoch * config.train.batch_size);
    EXPECT_NEAR(count, std::round(count), 1e-6) << "epoch " << r.epoch;
    EXPECT_LE(r.train_acc, 1.0);
    correct_total += count;
  }
  EXPECT_GT(correct_total, 0.5);
}

// Validation reads each batch's loss one batch behind and the probabilities at the end: its
// metrics are those of one batch over the whole validation set, whatever train.infer_bs cuts it
// into (here batches of 4 of the fold's 20 items, some of them broken, against a single batch).
TEST_F(TrainerTest, ValidationMetricsDoNotDependOnItsBatches) {
  std::vector<std::vector<EpochRecord>> histories;
  for (int infer_bs : {1, 64}) {
    common::PipelineConfig config = Config();
    config.train.batch_size = 4;
    config.train.epochs = 2;
    config.train.infer_bs = infer_bs;
    for (auto& [name, stage] : config.stages) stage.train = config.train;
    TrainOptions o;
    o.out_dir = Out(absl::StrCat("infer_bs", infer_bs));
    auto trainer = Trainer::Create(config, o);
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    ASSERT_TRUE((*trainer)->Run().ok());
    histories.push_back((*trainer)->history());
  }
  ASSERT_EQ(histories[0].size(), 2u);
  ASSERT_EQ(histories[1].size(), 2u);
  for (size_t e = 0; e < 2; ++e) {
    const EpochRecord& small = histories[0][e];
    const EpochRecord& whole = histories[1][e];
    EXPECT_EQ(small.train_loss, whole.train_loss) << "epoch " << e;  // validation changes no weights
    ASSERT_TRUE(std::isfinite(small.val_loss)) << "epoch " << e;
    EXPECT_NEAR(small.val_loss, whole.val_loss, 1e-5 * std::abs(whole.val_loss)) << "epoch " << e;
    EXPECT_NEAR(small.val_roc_auc, whole.val_roc_auc, 1e-6) << "epoch " << e;
    EXPECT_NEAR(small.val_auc, whole.val_auc, 1e-6) << "epoch " << e;
    EXPECT_NEAR(small.val_cmap, whole.val_cmap, 1e-6) << "epoch " << e;
    EXPECT_EQ(small.val_acc, whole.val_acc) << "epoch " << e;
  }
}

// train.lr_per_step with accumulation: the rate is set at an optimizer step's first micro-batch,
// and on_step reports that rate (the one the step used), not the rate of its last micro-batch.
TEST_F(TrainerTest, PerStepRatesAreTheRatesTheStepsUsed) {
  common::PipelineConfig c = Config();
  for (auto* t : {&c.train, &c.stages["finetune"].train}) {
    t->epochs = 2;
    t->lr_per_step = true;
    t->grad_accum_steps = 2;
    t->lr_ramp_epochs = 2;  // the rate changes at every micro-batch
  }
  TrainOptions o;
  o.out_dir = Out("lr_per_step");
  std::vector<StepStats> steps;
  o.on_step = [&](const StepStats& s) { steps.push_back(s); };
  auto trainer = Trainer::Create(c, o);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  ASSERT_TRUE((*trainer)->Run().ok());
  ASSERT_FALSE(steps.empty());
  // Loader batches per epoch: the micro-batches of the epoch's steps (the last may hold one).
  const int64_t per_epoch = steps.front().steps_per_epoch;
  std::map<int, int64_t> micro;  // epoch -> loader batches, from the samples reported
  for (const StepStats& s : steps) micro[s.epoch] += s.samples / c.train.batch_size;
  const int global_batch = c.train.batch_size * 2;
  for (const StepStats& s : steps) {
    const int64_t batches = micro[s.epoch];
    ASSERT_GE(batches, 2 * per_epoch - 1);
    const int64_t first = 2 * (s.step_in_epoch - 1);  // the step's first micro-batch
    EXPECT_DOUBLE_EQ(s.lr, LearningRate(c.train, s.epoch + static_cast<double>(first) / batches, global_batch))
        << "epoch " << s.epoch << " step " << s.step_in_epoch;
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
  // Resumed from last.pt (epoch 1 after 2 steps): the rest of epoch 1 and epoch 2, the global
  // step continuing.
  ASSERT_EQ(static_cast<int64_t>(second.size()), 2 * per_epoch - 2);
  EXPECT_EQ(second.front().epoch, 1);
  EXPECT_EQ(second.front().step_in_epoch, 3);
  EXPECT_EQ(second.front().step, per_epoch + 3);
  EXPECT_EQ(second.back().step, (*trainer)->history().back().step);
  EXPECT_EQ(second.back().step, 3 * per_epoch);
}

// Every history.csv column but samples_per_s (wall time) equal, row by row.
void ExpectSameHistory(const std::string& a, const std::string& b) {
  auto ha = common::CsvTable::ReadFile(a + "/history.csv");
  auto hb = common::CsvTable::ReadFile(b + "/history.csv");
  ASSERT_TRUE(ha.ok() && hb.ok());
  ASSERT_EQ(ha->num_rows(), hb->num_rows());
  const size_t speed = *ha->ColumnIndex("samples_per_s");
  for (size_t r = 0; r < ha->num_rows(); ++r) {
    for (size_t c = 0; c < ha->header().size(); ++c) {
      if (c == speed) continue;
      EXPECT_EQ(ha->row(r)[c], hb->row(r)[c]) << "row " << r << " " << ha->header()[c];
    }
  }
}

void ExpectSameTensors(const absl::StatusOr<NamedTensors>& a, const absl::StatusOr<NamedTensors>& b,
                       const std::string& what) {
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->size(), b->size()) << what;
  for (size_t i = 0; i < a->size(); ++i) {
    EXPECT_EQ((*a)[i].first, (*b)[i].first) << what;
    EXPECT_TRUE(at::equal((*a)[i].second, (*b)[i].second)) << what << " " << (*a)[i].first;
  }
}

// EMA (validated, in best.pt), gradient accumulation and clipping together: optimizer steps of 2
// micro-batches, and a run stopped between two of them mid-epoch and resumed equals an
// uninterrupted one (history, last.pt's weights and EMA state, best.pt).
TEST_F(TrainerTest, EmaAccumulationAndClippingResumeExactlyFromAMidEpochStop) {
  common::PipelineConfig c = Config();
  for (auto* t : {&c.train, &c.stages["finetune"].train}) {
    t->batch_size = 4;
    t->grad_accum_steps = 2;
    t->grad_clip_norm = 0.5;
    t->ema_decay = 0.9;
    t->ema_warmup_steps = 3;
    t->ema_eval = true;
  }
  TrainOptions a;
  a.out_dir = Out("ema_straight");
  std::vector<StepStats> steps;
  a.on_step = [&](const StepStats& s) { steps.push_back(s); };
  int bests = 0;
  a.on_epoch = [&](const EpochRecord& r) {
    if (!r.best) return;
    // best.pt holds the averaged weights: last.pt's EMA state of the same epoch.
    ++bests;
    auto best = ReadCheckpointTensors(a.out_dir + "/best.pt");
    auto ema = ReadCheckpointGroup(a.out_dir + "/last.pt", "ema_state");
    ASSERT_TRUE(best.ok() && ema.ok());
    std::map<std::string, at::Tensor> averages(ema->begin(), ema->end());
    int compared = 0;
    for (const auto& [name, t] : *best) {
      if (averages.count(name) == 0) continue;
      EXPECT_TRUE(at::equal(t, averages[name])) << name;
      ++compared;
    }
    EXPECT_GT(compared, 0);
  };
  auto straight = Trainer::Create(c, a);
  ASSERT_TRUE(straight.ok()) << straight.status();
  ASSERT_TRUE((*straight)->Run().ok());
  EXPECT_GT(bests, 0);
  // Optimizer steps of 2 micro-batches of 4 samples.
  ASSERT_FALSE(steps.empty());
  const int64_t per_epoch = steps.front().steps_per_epoch;
  EXPECT_EQ(static_cast<int64_t>(steps.size()), 3 * per_epoch);
  EXPECT_EQ(steps.front().samples, 8);
  EXPECT_EQ((*straight)->history().back().step, 3 * per_epoch);
  auto ema_meta = ReadCheckpointGroup(a.out_dir + "/last.pt", "ema_state");
  ASSERT_TRUE(ema_meta.ok()) << ema_meta.status();
  EXPECT_EQ(ema_meta->back().first, "__updates");
  EXPECT_EQ(ema_meta->back().second.item<int64_t>(), 3 * per_epoch);

  TrainOptions b;
  b.out_dir = Out("ema_resumed");
  int polls = 0;
  const int stop_at = static_cast<int>(per_epoch) + 2;  // inside epoch 1, between optimizer steps
  b.should_stop = [&] { return ++polls > stop_at; };
  auto first = Trainer::Create(c, b);
  ASSERT_TRUE(first.ok());
  absl::Status st = (*first)->Run();
  ASSERT_TRUE(absl::IsCancelled(st)) << st;
  auto stopped = ReadCheckpointMeta(b.out_dir + "/last.pt");
  ASSERT_TRUE(stopped.ok());
  EXPECT_EQ(stopped->in_epoch, 1);
  EXPECT_EQ(stopped->step, stop_at);
  EXPECT_EQ(stopped->batches_done, 2 * 2);  // 2 steps of 2 micro-batches into epoch 1
  b.should_stop = nullptr;
  auto second = Trainer::Create(c, b);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE((*second)->Run().ok());
  ExpectSameHistory(a.out_dir, b.out_dir);
  ExpectSameTensors(ReadCheckpointTensors(a.out_dir + "/last.pt"), ReadCheckpointTensors(b.out_dir + "/last.pt"),
                    "last.pt");
  ExpectSameTensors(ReadCheckpointGroup(a.out_dir + "/last.pt", "ema_state"),
                    ReadCheckpointGroup(b.out_dir + "/last.pt", "ema_state"), "ema_state");
  ExpectSameTensors(ReadCheckpointTensors(a.out_dir + "/best.pt"), ReadCheckpointTensors(b.out_dir + "/best.pt"),
                    "best.pt");
}

// Early stopping: where it must stop is computed from an uninterrupted run's history (the
// first epoch that is `patience` epochs past the last improvement by more than min_delta); the
// stopped run has exactly those rows, best.pt is the best of them, and a rerun has nothing to do.
TEST_F(TrainerTest, EarlyStoppingStopsAfterThePatienceAndKeepsTheBest) {
  common::PipelineConfig c = Config();
  for (auto* t : {&c.train, &c.stages["finetune"].train}) t->epochs = 8;
  TrainOptions full;
  full.out_dir = Out("early_full");
  auto run = Trainer::Create(c, full);
  ASSERT_TRUE(run.ok()) << run.status();
  ASSERT_TRUE((*run)->Run().ok());
  const std::vector<EpochRecord> all = (*run)->history();
  ASSERT_EQ(all.size(), 8u);

  const int patience = 2;
  const double min_delta = 0.002;
  int expected_rows = 8;
  double ref = std::numeric_limits<double>::quiet_NaN();
  int ref_epoch = -1;
  for (const EpochRecord& r : all) {
    if (!std::isnan(r.val_auc) && (std::isnan(ref) || r.val_auc > ref + min_delta)) {
      ref = r.val_auc;
      ref_epoch = r.epoch;
    }
    if (r.epoch - ref_epoch >= patience) {
      expected_rows = r.epoch + 1;
      break;
    }
  }
  ASSERT_LT(expected_rows, 8) << "the corpus should plateau within 8 epochs (else pick another min_delta)";

  for (auto* t : {&c.train, &c.stages["finetune"].train}) {
    t->early_stop_patience = patience;
    t->early_stop_min_delta = min_delta;
  }
  TrainOptions o;
  o.out_dir = Out("early");
  auto stopped = Trainer::Create(c, o);
  ASSERT_TRUE(stopped.ok()) << stopped.status();
  ASSERT_TRUE((*stopped)->Run().ok());
  const auto& rows = (*stopped)->history();
  ASSERT_EQ(static_cast<int>(rows.size()), expected_rows);
  int best_epoch = 0;
  for (const EpochRecord& r : rows) {
    EXPECT_EQ(r.val_auc, all[r.epoch].val_auc);  // the same run until it stops
    if (r.val_auc > rows[best_epoch].val_auc) best_epoch = r.epoch;
  }
  auto best = ReadCheckpointMeta(o.out_dir + "/best.pt");
  ASSERT_TRUE(best.ok());
  EXPECT_EQ(best->epoch, best_epoch);
  auto last = ReadCheckpointMeta(o.out_dir + "/last.pt");
  ASSERT_TRUE(last.ok());
  EXPECT_TRUE(last->stopped_early);
  EXPECT_EQ(last->epoch, expected_rows - 1);
  auto again = Trainer::Create(c, o);
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_TRUE((*again)->Run().ok());
  EXPECT_EQ(static_cast<int>((*again)->history().size()), expected_rows);
}

// An epoch whose monitor was not measured (NaN: here, a fold without validation rows) never ends
// the run by early stopping: it stopped at epoch patience - 1 as "not improving".
TEST_F(TrainerTest, EarlyStoppingWaitsWhileTheMonitorIsNotMeasured) {
  common::PipelineConfig c = Config();
  c.train.early_stop_patience = 1;
  for (auto& [name, stage] : c.stages) stage.train = c.train;
  auto table = common::BuildStageTable(c, "finetune");
  ASSERT_TRUE(table.ok()) << table.status();
  auto manifest = common::BuildTaskManifest(c, *table, 0);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  manifest->valid.clear();
  TrainOptions o;
  o.out_dir = Out("early_unmeasured");
  o.manifest = &*manifest;
  WarningTap warnings;
  auto run = Trainer::Create(c, o);
  ASSERT_TRUE(run.ok()) << run.status();
  ASSERT_TRUE((*run)->Run().ok());
  ASSERT_EQ((*run)->history().size(), 3u);
  for (const EpochRecord& r : (*run)->history()) EXPECT_TRUE(std::isnan(r.val_auc)) << r.epoch;
  auto last = ReadCheckpointMeta(o.out_dir + "/last.pt");
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_FALSE(last->stopped_early);
  int said = 0;
  for (const std::string& line : warnings.lines()) said += absl::StrContains(line, "is NaN after epoch 0 (not measured)");
  EXPECT_EQ(said, 1);
}

// The keys a resume lets differ change speed only; train.cuda_graph is one (its error messages
// tell users to set it false, which must not lock them out of their run folder).
TEST(ResumeMayChangeTest, SpeedOnlyKeys) {
  for (const char* key : {"data.cache_dir", "comm.backend", "comm.bucket_mb", "train.num_workers", "train.cuda_graph"}) {
    EXPECT_TRUE(ResumeMayChange(key)) << key;
  }
  for (const char* key : {"train.lr", "train.grad_accum_steps", "train.deterministic", "data.duration", "seed"}) {
    EXPECT_FALSE(ResumeMayChange(key)) << key;
  }
}

// A run folder resumed with another config is refused, naming the keys; epochs alone may grow
// with extend_epochs; num_workers (speed only) may differ.
TEST_F(TrainerTest, ARunFolderRefusesAnotherConfigUnlessExtendingEpochs) {
  common::PipelineConfig c = Config();
  c.debug = true;  // 2 epochs of 2 batches
  TrainOptions o;
  o.out_dir = Out("config_change");
  auto first = Trainer::Create(c, o);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE((*first)->Run().ok());

  common::PipelineConfig lr = c;
  lr.train.lr = 2e-3;
  lr.stages["finetune"].train.lr = 2e-3;
  lr.train.grad_clip_norm = 1.0;
  lr.stages["finetune"].train.grad_clip_norm = 1.0;
  auto refused = Trainer::Create(lr, o);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_NE(refused.status().message().find("2 key(s) differ: train.grad_clip_norm: 0.0 -> 1.0; train.lr: 0.001 -> 0.002"),
            absl::string_view::npos)
      << refused.status();
  EXPECT_NE(refused.status().message().find("--no-resume"), absl::string_view::npos);

  // More epochs and debug off: not epochs alone, so --extend-epochs is not offered.
  common::PipelineConfig more = c;
  more.debug = false;
  for (auto* t : {&more.train, &more.stages["finetune"].train}) t->epochs = 5;
  auto not_extending = Trainer::Create(more, o);
  ASSERT_EQ(not_extending.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(not_extending.status().message().find("2 key(s) differ: debug: true -> false; train.epochs: 3 -> 5"),
            absl::string_view::npos)
      << not_extending.status();
  EXPECT_EQ(not_extending.status().message().find("--extend-epochs"), absl::string_view::npos)
      << not_extending.status();

  common::PipelineConfig epochs_only = c;
  for (auto* t : {&epochs_only.train, &epochs_only.stages["finetune"].train}) {
    t->epochs = 5;
    t->num_workers = 2;
  }
  auto refused_epochs = Trainer::Create(epochs_only, o);
  ASSERT_FALSE(refused_epochs.ok());
  EXPECT_NE(refused_epochs.status().message().find("1 key(s) differ: train.epochs: 3 -> 5; pass --extend-epochs"),
            absl::string_view::npos)
      << refused_epochs.status();
  o.extend_epochs = true;
  epochs_only.debug = false;
  auto mixed = Trainer::Create(epochs_only, o);  // debug changed too: still refused
  ASSERT_FALSE(mixed.ok());
  epochs_only.debug = true;
  auto extended = Trainer::Create(epochs_only, o);
  ASSERT_TRUE(extended.ok()) << extended.status();
  EXPECT_EQ((*extended)->history().size(), 2u);
  extended->reset();

  // Fewer epochs than last.pt holds (2, the debug run's): refused, naming both (it said "last.pt
  // already holds all 1 epochs (0-0)" and rewrote config.yaml to 1).
  const absl::StatusOr<std::string> config_yaml = common::ReadFileToString(o.out_dir + "/config.yaml");
  ASSERT_TRUE(config_yaml.ok()) << config_yaml.status();
  common::PipelineConfig fewer = c;
  for (auto* t : {&fewer.train, &fewer.stages["finetune"].train}) t->epochs = 1;
  auto shrunk = Trainer::Create(fewer, o);
  ASSERT_EQ(shrunk.status().code(), absl::StatusCode::kFailedPrecondition) << shrunk.status();
  EXPECT_NE(shrunk.status().message().find("--extend-epochs with train.epochs 1: "), absl::string_view::npos)
      << shrunk.status();
  EXPECT_NE(shrunk.status().message().find("already holds 2 epochs (0-1)"), absl::string_view::npos)
      << shrunk.status();
  // As many as it holds: nothing to train, and config.yaml stays the one of last.pt's epochs.
  for (auto* t : {&fewer.train, &fewer.stages["finetune"].train}) t->epochs = 2;
  auto held = Trainer::Create(fewer, o);
  ASSERT_TRUE(held.ok()) << held.status();
  ASSERT_TRUE((*held)->Run().ok());
  EXPECT_EQ(common::ReadFileToString(o.out_dir + "/config.yaml").value_or(""), *config_yaml);

  o.extend_epochs = false;
  o.resume = false;  // --no-resume: start over with any config
  EXPECT_TRUE(Trainer::Create(lr, o).ok());
}

// Extending a finished run's epochs recomputes the cosine schedule over the new count: the next
// epoch's rate is above the last trained epoch's, and the log says so with both rates.
TEST_F(TrainerTest, ExtendingEpochsSaysWhenTheLearningRateGoesBackUp) {
  common::PipelineConfig c = Config();  // 3 epochs, cos, 1 ramp epoch
  TrainOptions o;
  o.out_dir = Out("extend_lr");
  auto first = Trainer::Create(c, o);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE((*first)->Run().ok());
  for (auto* t : {&c.train, &c.stages["finetune"].train}) t->epochs = 10;
  o.extend_epochs = true;
  WarningTap warnings;
  auto extended = Trainer::Create(c, o);
  ASSERT_TRUE(extended.ok()) << extended.status();
  const int global_batch = c.train.batch_size;
  common::TrainConfig three = c.train;
  three.epochs = 3;
  const double was = LearningRate(three, 2, global_batch), now = LearningRate(c.train, 3, global_batch);
  ASSERT_GT(now, was * 1.01);
  int said = 0;
  for (const std::string& line : warnings.lines()) {
    said += absl::StrContains(line, absl::StrFormat("train.scheduler cos is computed over 10 epochs now: epoch 3 "
                                                    "trains at lr %.6g, above the %.6g of epoch 2", now, was));
  }
  EXPECT_EQ(said, 1);
}

// A run resumed after `aviary prepare` cached its files reads 16-bit clips where it decoded float
// ones: allowed (data.cache_dir is operational), recorded in the checkpoints, and said in the log.
TEST_F(TrainerTest, AResumeWithAnotherShareOfCachedFilesSaysItIsNotBitExact) {
  common::PipelineConfig c = Config();
  for (auto* t : {&c.train, &c.stages["finetune"].train}) t->epochs = 1;
  c.data.cache_dir = Out("cache_source_cache");
  TrainOptions o;
  o.out_dir = Out("cache_source");
  auto first = Trainer::Create(c, o);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE((*first)->Run().ok());
  absl::StatusOr<CheckpointMeta> before = ReadCheckpointMeta(o.out_dir + "/last.pt");
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(before->cached_files, 0);  // no cache was prepared
  EXPECT_GT(before->data_files, 10);
  EXPECT_EQ(before->device_type, "cpu");  // how it computed (a resume elsewhere is named)
  EXPECT_EQ(before->autocast, 0);

  PrepareCorpusCache(*root_, *root_, c.data.cache_dir);

  auto tap = std::make_unique<WarningTap>();
  common::PipelineConfig more = c;
  for (auto* t : {&more.train, &more.stages["finetune"].train}) t->epochs = 2;
  o.extend_epochs = true;
  auto resumed = Trainer::Create(more, o);
  const std::vector<std::string> warnings = tap->lines();
  tap.reset();
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  const std::string said = absl::StrCat("read 0 of its ", before->data_files, " files from the decoded-audio cache; ",
                                        "this one reads ", before->data_files, " of ", before->data_files);
  bool found = false;
  for (const std::string& w : warnings) found = found || (absl::StrContains(w, said) && absl::StrContains(w, "not bit-exact"));
  EXPECT_TRUE(found) << "no warning with \"" << said << "\" among " << warnings.size();
  ASSERT_TRUE((*resumed)->Run().ok());
  absl::StatusOr<CheckpointMeta> after = ReadCheckpointMeta(o.out_dir + "/last.pt");
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->cached_files, before->data_files);
  EXPECT_EQ(after->data_files, before->data_files);
}

// The items a run trained on are in its checkpoints: a resume over a dataset that changed since
// (a training file gone: the stage's table drops it, the folds move, every epoch's order
// changes) is refused, naming both lists' sizes; the dataset restored, it resumes.
TEST_F(TrainerTest, AResumeOverADatasetThatChangedIsRefused) {
  const std::string data = Out("changed_data") + "/2024";
  fs::copy(*root_ + "/2024", data, fs::copy_options::recursive);
  common::PipelineConfig c = Config();
  c.data.target = {"2024", data};
  for (auto* t : {&c.train, &c.stages["finetune"].train}) t->epochs = 2;
  TrainOptions o;
  o.out_dir = Out("changed");
  int polls = 0;
  o.should_stop = [&polls] { return ++polls > 3; };  // inside epoch 0
  auto first = Trainer::Create(c, o);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(absl::IsCancelled((*first)->Run()));
  absl::StatusOr<CheckpointMeta> meta = ReadCheckpointMeta(o.out_dir + "/last.pt");
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_GT(meta->train_items, 0);
  EXPECT_GT(meta->valid_items, 0);
  EXPECT_NE(meta->train_items_digest, 0);

  // One recording of the stage away (moved out of the dataset).
  std::string moved;
  for (const auto& e : fs::recursive_directory_iterator(data)) {
    if (e.path().extension() == ".ogg") {
      moved = e.path().string();
      break;
    }
  }
  ASSERT_FALSE(moved.empty());
  fs::rename(moved, o.out_dir + "/aside.ogg");
  o.should_stop = nullptr;
  auto refused = Trainer::Create(c, o);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_TRUE(absl::StrContains(refused.status().message(),
                                 absl::StrCat("was trained on ", meta->train_items, " training and ",
                                              meta->valid_items, " validation items")))
      << refused.status();
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "the dataset changed since")) << refused.status();

  fs::rename(o.out_dir + "/aside.ogg", moved);
  auto resumed = Trainer::Create(c, o);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_TRUE((*resumed)->Run().ok());
}

// A cache prepared under another path to the same files (a symbolic link, another mount point)
// holds none of the run's keys: every file is decoded on the fly, several times slower. Said as
// a warning naming the cause, not an info line reading "0 of N".
TEST_F(TrainerTest, ACachePreparedUnderAnotherPathIsAWarning) {
  common::PipelineConfig c = Config();
  for (auto* t : {&c.train, &c.stages["finetune"].train}) t->epochs = 1;
  c.data.cache_dir = Out("linked_cache");
  const std::string link = Out("linked_root");
  fs::remove(link);
  fs::create_symlink(*root_, link);
  PrepareCorpusCache(*root_, link, c.data.cache_dir);
  size_t files = 0;
  for (const auto& e : fs::recursive_directory_iterator(*root_)) {
    files += e.path().extension() == ".ogg" || e.path().extension() == ".mp3";
  }

  auto tap = std::make_unique<WarningTap>();
  TrainOptions o;
  o.out_dir = Out("linked_run");
  auto trainer = Trainer::Create(c, o);
  const std::vector<std::string> warnings = tap->lines();
  tap.reset();
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  bool found = false;
  for (const std::string& w : warnings) {
    found = found || (absl::StrContains(w, "none of them is in it, though it holds " + std::to_string(files)) &&
                      absl::StrContains(w, "another path to the data"));
  }
  EXPECT_TRUE(found) << "no such warning among " << warnings.size() << (warnings.empty() ? "" : ": " + warnings[0]);
}

}  // namespace
}  // namespace aviary::worker
