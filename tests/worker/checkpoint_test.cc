#include "worker/checkpoint.h"

#include <grp.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

#include <tuple>
#include <vector>

#include <torch/optim/adam.h>
#include <torch/serialize/output-archive.h>

#include "absl/strings/str_cat.h"
#include "common/csv.h"
#include "common/files.h"
#include "gtest/gtest.h"

namespace aviary::worker {
namespace {

std::shared_ptr<ClassifierImpl> Model(int classes, const std::string& name = "small_cnn") {
  common::ModelConfig c;
  c.name = name;
  auto m = BuildClassifier(c, 1, classes);
  EXPECT_TRUE(m.ok());
  return *m;
}

CheckpointMeta Meta() {
  CheckpointMeta m;
  m.stage = "finetune";
  m.fold = 2;
  m.epoch = 4;
  m.step = 120;
  m.monitor = "auc";
  m.best_value = 0.8123456789012345;
  m.best_epoch = 3;
  m.model_name = "small_cnn";
  m.num_classes = 3;
  m.in_channels = 1;
  m.class_names = {"a", "b", "c"};
  m.config_yaml = "seed: 42\ntrain:\n  epochs: 5\n";
  m.history_csv = "epoch,step\n0,24\n";
  return m;
}

void Step(ClassifierImpl& model, AdamOptimizer& opt) {
  at::Tensor x = at::randn({2, 1, 32, 32});
  opt.ZeroGrad();
  model.forward(x).sum().backward();
  opt.Step();
}

void Step(ClassifierImpl& model, torch::optim::Optimizer& opt) {
  at::Tensor x = at::randn({2, 1, 32, 32});
  opt.zero_grad();
  model.forward(x).sum().backward();
  opt.step();
}

TEST(CheckpointTest, RoundTripsModelOptimizerAndMetadata) {
  at::manual_seed(0);
  auto a = Model(3);
  AdamOptimizer opt_a(*a, AdamSettings{});
  Step(*a, opt_a);
  std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_ckpt_roundtrip.pt";
  ASSERT_TRUE(SaveCheckpoint(path, *a, &opt_a, Meta()).ok());

  auto b = Model(3);
  AdamOptimizer opt_b(*b, AdamSettings{});
  auto meta = RestoreCheckpoint(path, *b, &opt_b);
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->class_names, Meta().class_names);
  EXPECT_EQ(meta->best_value, Meta().best_value);
  EXPECT_EQ(meta->config_yaml, Meta().config_yaml);
  EXPECT_EQ(meta->history_csv, Meta().history_csv);
  for (const auto& p : a->named_parameters()) {
    EXPECT_TRUE(at::equal(p.value(), b->named_parameters()[p.key()])) << p.key();
  }
  for (const auto& p : a->named_buffers()) {
    EXPECT_TRUE(at::equal(p.value(), b->named_buffers()[p.key()])) << p.key();
  }
  // The same next step from both: the optimizer moments came back too.
  at::manual_seed(5);
  Step(*a, opt_a);
  at::manual_seed(5);
  Step(*b, opt_b);
  for (const auto& p : a->named_parameters()) {
    EXPECT_TRUE(at::equal(p.value(), b->named_parameters()[p.key()])) << p.key();
  }
}

// A last.pt of the first wave: the optimizer as torch::optim::Adam's own archive. It resumes
// into AdamOptimizer, whose next step equals torch's Adam's (exactly without the fused kernel).
TEST(CheckpointTest, ReadsTheOptimizerArchiveOfEarlierCheckpoints) {
  at::manual_seed(0);
  auto a = Model(3);
  torch::optim::Adam opt_a(a->parameters(), torch::optim::AdamOptions(1e-3));
  Step(*a, opt_a);
  Step(*a, opt_a);
  std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_ckpt_legacy.pt";
  {
    torch::serialize::OutputArchive archive, weights, optim;
    for (const auto& p : a->named_parameters()) weights.write(p.key(), p.value().detach());
    for (const auto& b : a->named_buffers()) weights.write(b.key(), b.value(), /*is_buffer=*/true);
    archive.write("model", weights);
    opt_a.save(optim);
    archive.write("optimizer", optim);
    std::string yaml = "format: 1\nstage: finetune\nfold: 2\nepoch: 4\nstep: 2\nmonitor: auc\n"
                       "best_value: 0.5\nbest_epoch: 3\nmodel_name: small_cnn\nnum_classes: 3\n"
                       "in_channels: 1\nclass_names: [a, b, c]\nconfig_yaml: \"\"\nhistory_csv: \"\"\n";
    archive.write("meta", c10::IValue(yaml));
    archive.save_to(path);
  }
  auto b = Model(3);
  AdamOptimizer opt_b(*b, AdamSettings{});
  auto meta = RestoreCheckpoint(path, *b, &opt_b);
  ASSERT_TRUE(meta.ok()) << meta.status();
  at::manual_seed(5);
  Step(*a, opt_a);
  at::manual_seed(5);
  Step(*b, opt_b);
  for (const auto& p : a->named_parameters()) {
    const at::Tensor& theirs = p.value();
    const at::Tensor& ours = b->named_parameters()[p.key()];
    if (AdamOptimizer::Fused()) {
      EXPECT_TRUE(at::allclose(theirs, ours, 1e-5, 1e-6)) << p.key();
    } else {
      EXPECT_TRUE(at::equal(theirs, ours)) << p.key();
    }
  }
}

TEST(CheckpointTest, RefusesAnotherModelOrClassCount) {
  auto a = Model(3);
  std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_ckpt_refuse.pt";
  ASSERT_TRUE(SaveCheckpoint(path, *a, nullptr, Meta()).ok());
  auto b = Model(5);
  auto r = RestoreCheckpoint(path, *b, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("small_cnn with 3 classes and 1 input channels does not fit "
                                      "the model small_cnn with 5 classes"),
            absl::string_view::npos)
      << r.status();
}

TEST(CheckpointTest, AFailedWriteKeepsThePreviousCheckpoint) {
  auto a = Model(3);
  std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_ckpt_keep.pt";
  ASSERT_TRUE(SaveCheckpoint(path, *a, nullptr, Meta()).ok());
  auto before = common::ReadFileToString(path);
  ASSERT_TRUE(before.ok());
  // Block the temporary file with a directory of the same name.
  std::string tmp = absl::StrCat(path, ".tmp.", common::TemporarySuffix());
  ASSERT_EQ(::mkdir(tmp.c_str(), 0755), 0);
  CheckpointMeta m = Meta();
  m.epoch = 9;
  EXPECT_FALSE(SaveCheckpoint(path, *a, nullptr, m).ok());
  ::rmdir(tmp.c_str());
  auto after = common::ReadFileToString(path);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(*before, *after);
  EXPECT_EQ(ReadCheckpointMeta(path)->epoch, 4);
}

// How the writing run computed is kept in the metadata, and a resume that computes otherwise is
// named (a retried task on a CPU group after a GPU one went on in fp32 without a word).
TEST(CheckpointTest, TheDeviceAndPrecisionAreRecordedAndAChangeIsNamed) {
  CheckpointMeta m = Meta();
  EXPECT_EQ(NumericsChange(m, "cpu", false), "");  // not recorded: nothing to compare
  m.device_type = "cuda";
  m.autocast = 1;
  const std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_ckpt_numerics.pt";
  auto model = Model(3);
  ASSERT_TRUE(SaveCheckpoint(path, *model, nullptr, m).ok());
  absl::StatusOr<CheckpointMeta> back = ReadCheckpointMeta(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->device_type, "cuda");
  EXPECT_EQ(back->autocast, 1);
  EXPECT_EQ(NumericsChange(*back, "cuda", true), "");
  EXPECT_EQ(NumericsChange(*back, "cpu", false),
            "was written by a run on cuda with bf16 autocast; this one trains on cpu in fp32: the run goes on in "
            "other arithmetic, so it is not bit-exact against an uninterrupted one (the device and train.precision "
            "decide it)");
  EXPECT_NE(NumericsChange(*back, "cuda", false).find("this one trains on cuda in fp32"), std::string::npos);
}

TEST(CheckpointTest, ResumePicksTheNewestValidCheckpoint) {
  auto meta = [](int epoch, int attempt, const std::string& task = "j1/finetune-f2") {
    CheckpointMeta m = Meta();
    m.epoch = epoch;
    m.attempt = attempt;
    m.task_id = task;
    return m;
  };
  std::vector<ResumeCandidate> c;
  c.push_back({"run/last.pt", meta(4, 1)});
  c.push_back({"run/last.prev.pt", meta(3, 1)});
  ResumeChoice r = PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2");
  EXPECT_EQ(r.index, 0);
  EXPECT_NE(r.skipped[1].find("run/last.prev.pt holds epoch 3 (attempt 1), not newer than run/last.pt"),
            std::string::npos) << r.skipped[1];
  // A corrupt newest one falls back to the previous.
  c[0].meta = absl::InvalidArgumentError("run/last.pt: not an aviary checkpoint");
  r = PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2");
  EXPECT_EQ(r.index, 1);
  EXPECT_EQ(r.skipped[0], "run/last.pt: not an aviary checkpoint");
  // The same epoch by a later attempt wins; another task, stage or fold never does.
  c[0].meta = meta(3, 2);
  EXPECT_EQ(PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2").index, 0);
  c[0].meta = meta(9, 1, "j2/finetune-f2");
  r = PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2");
  EXPECT_EQ(r.index, 1);
  EXPECT_NE(r.skipped[0].find("belongs to task j2/finetune-f2"), std::string::npos) << r.skipped[0];
  EXPECT_EQ(PickResumeCheckpoint(c, "finetune", 1, "").index, -1);
  EXPECT_EQ(PickResumeCheckpoint(c, "pretrain", 2, "").index, -1);
  // Without a coordinator (no task id on either side) the task is not compared.
  EXPECT_EQ(PickResumeCheckpoint(c, "finetune", 2, "").index, 0);
  // A mid-epoch checkpoint (a stop inside epoch 4) is newer than epoch 3's end, whichever is listed first.
  CheckpointMeta mid = meta(3, 1);
  mid.in_epoch = 4;
  mid.batches_done = 7;
  c[0].meta = meta(3, 1);
  c[1].meta = mid;
  EXPECT_EQ(PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2").index, 1);
  std::swap(c[0], c[1]);
  EXPECT_EQ(PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2").index, 0);
  // Two stops inside the same epoch by runs on different numbers of ranks: batch 10 on one rank
  // is 10 rows of the order, batch 7 on two ranks is 14 (the later one), whichever is listed first.
  CheckpointMeta one = mid, two = mid;
  one.world_size = 1;
  one.batches_done = 10;
  two.world_size = 2;
  two.batches_done = 7;
  c[0].meta = two;
  c[1].meta = one;
  EXPECT_EQ(PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2").index, 0);
  std::swap(c[0], c[1]);
  EXPECT_EQ(PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2").index, 1);
  // `aviary-worker train` (attempt 0, no task) stopped inside epoch 4 in a folder whose epoch 3
  // end a task's attempt 2 wrote: the stop is newer, whichever is listed first (the attempt
  // decided first, and the newer file was set aside).
  CheckpointMeta by_train = meta(3, 0, "");
  by_train.in_epoch = 4;
  by_train.batches_done = 5;
  c[0].meta = by_train;
  c[1].meta = meta(3, 2);
  EXPECT_EQ(PickResumeCheckpoint(c, "finetune", 2, "").index, 0);
  std::swap(c[0], c[1]);
  EXPECT_EQ(PickResumeCheckpoint(c, "finetune", 2, "").index, 1);
  // Between attempts of one task the later attempt still decides first.
  CheckpointMeta late_write = meta(3, 1);
  late_write.in_epoch = 4;
  late_write.batches_done = 9;
  CheckpointMeta retried = meta(3, 2);
  retried.in_epoch = 4;
  retried.batches_done = 2;
  c[0].meta = late_write;
  c[1].meta = retried;
  EXPECT_EQ(PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2").index, 1);
  // A checkpoint that cannot be read now (a permission, an I/O error) may be the newest: the
  // choice is blocked, naming it, rather than falling back to the older one.
  for (const absl::Status& unreadable : {absl::PermissionDeniedError("run/last.pt: cannot read the checkpoint: "
                                                                     "Permission denied"),
                                         absl::UnavailableError("run/last.pt: cannot read the checkpoint: "
                                                                "Input/output error"),
                                         absl::ResourceExhaustedError("run/last.pt: reading the checkpoint (1 bytes): "
                                                                      "out of memory")}) {
    c[0].meta = unreadable;
    c[1].meta = meta(3, 1);
    r = PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2");
    EXPECT_EQ(r.index, -1);
    EXPECT_EQ(r.blocked.code(), unreadable.code());
    EXPECT_NE(r.blocked.message().find(std::string(unreadable.message()) + ": it may hold the newest epoch"),
              std::string::npos)
        << r.blocked;
    EXPECT_NE(r.blocked.message().find("--no-resume"), std::string::npos) << r.blocked;
    // The older one unreadable (listed after a good last.pt) is passed over: it cannot be newer.
    std::swap(c[0].meta, c[1].meta);
    c[0].meta = meta(4, 1);
    r = PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2");
    EXPECT_EQ(r.index, 0);
    EXPECT_TRUE(r.blocked.ok()) << r.blocked;
    // ... unless the newer one does not fit either (a damaged last.pt): then it is all there is.
    c[0].meta = absl::InvalidArgumentError("run/last.pt: not an aviary checkpoint");
    r = PickResumeCheckpoint(c, "finetune", 2, "j1/finetune-f2");
    EXPECT_EQ(r.index, -1);
    EXPECT_EQ(r.blocked.code(), unreadable.code());
  }
}

// The mid-epoch position and early-stopping state, and a named tensor group, read back exactly;
// a checkpoint without a group says NOT_FOUND.
TEST(CheckpointTest, MidEpochStateAndGroupsRoundTrip) {
  auto a = Model(3);
  CheckpointMeta m = Meta();
  m.in_epoch = 5;  // epoch 4 ended
  m.batches_done = 5;
  m.epoch_loss_sum = 12.345678901234567;
  m.epoch_seen = 40;
  m.epoch_correct = 17;
  m.early_stop_value = 0.8123456789012345;
  m.early_stop_epoch = 1;
  const std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_ckpt_mid.pt";
  CheckpointGroups groups{{"ema_state", {{"w", at::arange(6, at::kFloat)}, {"__updates", at::scalar_tensor(9, at::kLong)}}}};
  ASSERT_TRUE(SaveCheckpoint(path, *a, nullptr, m, {}, groups).ok());
  auto read = ReadCheckpointMeta(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->in_epoch, 5);
  EXPECT_EQ(read->batches_done, 5);
  EXPECT_EQ(read->epoch_loss_sum, m.epoch_loss_sum);
  EXPECT_EQ(read->epoch_seen, 40);
  EXPECT_EQ(read->epoch_correct, 17);
  EXPECT_EQ(read->early_stop_value, m.early_stop_value);
  EXPECT_EQ(read->early_stop_epoch, 1);
  EXPECT_FALSE(read->stopped_early);
  auto group = ReadCheckpointGroup(path, "ema_state");
  ASSERT_TRUE(group.ok()) << group.status();
  ASSERT_EQ(group->size(), 2u);
  EXPECT_TRUE(at::equal((*group)[0].second, at::arange(6, at::kFloat)));
  EXPECT_EQ(ReadCheckpointGroup(path, "epoch_state").status().code(), absl::StatusCode::kNotFound);
  // An epoch-end checkpoint has no position.
  ASSERT_TRUE(SaveCheckpoint(path, *a, nullptr, Meta()).ok());
  EXPECT_EQ(ReadCheckpointMeta(path)->in_epoch, -1);
}

// A read that fails (EIO, ESTALE on NFS) is UNAVAILABLE naming the file and the error, not "not
// an aviary checkpoint": a resume would take a healthy last.pt for a damaged one and go on from
// last.prev.pt. The whole restore, weights and a group included, reads one open file.
TEST(CheckpointTest, AReadErrorIsUnavailableNotDamage) {
  auto a = Model(3);
  const std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_ckpt_eio.pt";
  CheckpointGroups groups{{"ema_state", {{"w", at::arange(4, at::kFloat)}}}};
  ASSERT_TRUE(SaveCheckpoint(path, *a, nullptr, Meta(), {}, groups).ok());
  SetCheckpointReadFaultForTest([&](const std::string& p) { return p == path ? EIO : 0; });
  auto meta = ReadCheckpointMeta(path);
  EXPECT_EQ(meta.status().code(), absl::StatusCode::kUnavailable) << meta.status();
  EXPECT_EQ(meta.status().message(), path + ": reading the checkpoint: Input/output error");
  auto b = Model(3);
  auto restored = RestoreCheckpoint(path, *b, nullptr);
  EXPECT_EQ(restored.status().code(), absl::StatusCode::kUnavailable) << restored.status();
  SetCheckpointReadFaultForTest(nullptr);
  absl::StatusOr<NamedTensors> group = absl::UnknownError("not read");
  restored = RestoreCheckpoint(path, *b, nullptr, "ema_state", &group);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_TRUE(SameCheckpointMeta(*restored, Meta()));
  ASSERT_TRUE(group.ok()) << group.status();
  ASSERT_EQ(group->size(), 1u);
  EXPECT_TRUE(at::equal((*group)[0].second, at::arange(4, at::kFloat)));
  restored = RestoreCheckpoint(path, *b, nullptr, "epoch_state", &group);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(group.status().code(), absl::StatusCode::kNotFound);
  std::remove(path.c_str());
}

// Bytes changed inside a record (bit rot, a bad copy; the file's size unchanged) are found by the
// records' CRC-32, which torch writes but its reader does not check: a restore is DATA_LOSS naming
// the file and the record (a resume falls back to last.prev.pt), not damaged weights taken as
// good. The metadata alone still reads (a resume's choice among candidates): the tensors' bytes
// are checked once read, the records torch parses before it parses them.
TEST(CheckpointTest, ChangedBytesInARecordAreDamage) {
  auto a = Model(3);
  const std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_ckpt_rot.pt";
  CheckpointGroups groups{{"ema_state", {{"w", at::full({4096}, 1234.5678f)}}}};
  ASSERT_TRUE(SaveCheckpoint(path, *a, nullptr, Meta(), {}, groups).ok());
  auto b = Model(3);
  ASSERT_TRUE(RestoreCheckpoint(path, *b, nullptr).ok());
  ASSERT_TRUE(ReadCheckpointTensors(path).ok());
  std::string bytes = *common::ReadFileToString(path);
  const float value = 1234.5678f;
  const std::string pattern(reinterpret_cast<const char*>(&value), sizeof(value));
  const size_t run = bytes.find(pattern + pattern + pattern + pattern);
  ASSERT_NE(run, std::string::npos);
  bytes[run + 9] = static_cast<char>(bytes[run + 9] ^ 0x10);  // one bit of the third float
  ASSERT_TRUE(common::WriteFileAtomically(path, bytes).ok());
  EXPECT_TRUE(ReadCheckpointMeta(path).ok());
  auto restored = RestoreCheckpoint(path, *b, nullptr);
  EXPECT_EQ(restored.status().code(), absl::StatusCode::kDataLoss) << restored.status();
  EXPECT_NE(restored.status().message().find(path + ": damaged: record "), std::string::npos) << restored.status();
  EXPECT_NE(restored.status().message().find("has CRC-32"), std::string::npos) << restored.status();
  EXPECT_EQ(ReadCheckpointTensors(path).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(ReadCheckpointGroup(path, "ema_state").status().code(), absl::StatusCode::kDataLoss);
  std::remove(path.c_str());
}

// One byte changed in a record torch parses (the STOP of constants.pkl): its reader has no bounds
// checks, and the process aborted ("free(): invalid size") in export, predict and a resume, where
// a damaged checkpoint is DATA_LOSS (and a resume falls back). The CRCs are checked first.
TEST(CheckpointTest, ADamagedRecordTorchParsesIsDamageNotACrash) {
  auto a = Model(3);
  const std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_ckpt_pickle.pt";
  ASSERT_TRUE(SaveCheckpoint(path, *a, nullptr, Meta()).ok());
  std::string bytes = *common::ReadFileToString(path);
  auto u = [&bytes](size_t at, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(bytes[at + i]);
    return v;
  };
  // The record's central directory entry (the name's last occurrence), then its data.
  const size_t name = bytes.rfind("/constants.pkl");
  ASSERT_NE(name, std::string::npos);
  const size_t entry = bytes.rfind(std::string("PK\x01\x02", 4), name);
  ASSERT_NE(entry, std::string::npos);
  const uint64_t stored = u(entry + 20, 4), local = u(entry + 42, 4);
  const uint64_t data = local + 30 + u(local + 26, 2) + u(local + 28, 2);
  ASSERT_GT(stored, 0u);
  ASSERT_EQ(bytes[data + stored - 1], '.');  // pickle's STOP
  bytes[data + stored - 1] = 'b';
  ASSERT_TRUE(common::WriteFileAtomically(path, bytes).ok());
  for (const absl::Status& st : {ReadCheckpointMeta(path).status(), ReadCheckpointTensors(path).status()}) {
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
    EXPECT_NE(st.message().find("constants.pkl"), std::string::npos) << st;
  }
  std::remove(path.c_str());
}

// A zip directory listing one record many times (crafted: each entry's range is inside the file
// and its CRC right) was that many reads of the record: hours of checksum work from a file of
// tens of MB. Records that overlap are damage.
TEST(CheckpointTest, ADirectoryListingARecordManyTimesIsDamage) {
  auto a = Model(3);
  const std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_ckpt_dup.pt";
  CheckpointGroups groups{{"ema_state", {{"w", at::full({1 << 16}, 0.5f)}}}};
  ASSERT_TRUE(SaveCheckpoint(path, *a, nullptr, Meta(), {}, groups).ok());
  std::string bytes = *common::ReadFileToString(path);
  const auto le = [&](size_t at, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = v << 8 | static_cast<unsigned char>(bytes[at + i]);
    return v;
  };
  const auto put = [&](size_t at, int n, uint64_t v) {
    for (int i = 0; i < n; ++i) bytes[at + i] = static_cast<char>((v >> (8 * i)) & 0xFF);
  };
  const size_t eocd = bytes.rfind(std::string("PK\x05\x06", 4));
  ASSERT_NE(eocd, std::string::npos);
  ASSERT_EQ(le(eocd + 10, 2), le(eocd + 8, 2));
  const uint64_t entries = le(eocd + 10, 2), dir_size = le(eocd + 12, 4), dir_offset = le(eocd + 16, 4);
  ASSERT_LT(dir_offset, 0xFFFFFFFFu) << "a zip64 file: this test edits the plain record";
  const size_t dir_end = dir_offset + dir_size;
  // torch writes a zip64 end record and its locator between the directory and the plain end.
  const bool zip64 = eocd - dir_end == 76 && le(dir_end, 4) == 0x06064b50 && le(eocd - 20, 4) == 0x07064b50;
  ASSERT_TRUE(zip64 || dir_end == eocd) << "other records between the directory and its end";
  // Every entry again, 40 times more (at most 65,535 entries in all).
  const std::string dir = bytes.substr(dir_offset, dir_size);
  const uint64_t copies = std::min<uint64_t>(40, 65535 / entries - 1);
  std::string more;
  for (uint64_t c = 0; c < copies; ++c) more += dir;
  bytes.insert(dir_end, more);
  const uint64_t all = entries * (copies + 1), all_size = dir_size * (copies + 1);
  const size_t moved = eocd + more.size();
  put(moved + 8, 2, all);
  put(moved + 10, 2, all);
  put(moved + 12, 4, all_size);
  if (zip64) {
    const size_t record = dir_end + more.size();
    put(record + 24, 8, all);
    put(record + 32, 8, all);
    put(record + 40, 8, all_size);
    put(moved - 20 + 8, 8, record);  // the locator points at the record, moved
  }
  ASSERT_TRUE(common::WriteFileAtomically(path, bytes).ok());
  auto b = Model(3);
  auto restored = RestoreCheckpoint(path, *b, nullptr);
  ASSERT_FALSE(restored.ok());
  EXPECT_EQ(restored.status().code(), absl::StatusCode::kDataLoss) << restored.status();
  EXPECT_NE(restored.status().message().find("the records overlap"), std::string::npos) << restored.status();
  std::remove(path.c_str());
}

// Metadata a resume computes positions from is checked: a damaged or edited value is an error
// naming the file and the value (batches_done x world_size overflowed an int64).
TEST(CheckpointTest, InconsistentPositionsAreRefused) {
  auto a = Model(3);
  const std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_ckpt_position.pt";
  auto refused = [&](const CheckpointMeta& m) {
    EXPECT_TRUE(SaveCheckpoint(path, *a, nullptr, m).ok());
    return ReadCheckpointMeta(path).status();
  };
  CheckpointMeta m = Meta();
  m.in_epoch = 7;  // epoch 4 ended: in_epoch can only be 5
  m.batches_done = 3;
  absl::Status st = refused(m);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), path + ": checkpoint metadata has in_epoch 7 after epoch 4 (expected 5)");
  m.in_epoch = 5;
  m.world_size = 2;
  m.batches_done = int64_t{1} << 50;
  st = refused(m);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("batches_done 1125899906842624"), absl::string_view::npos) << st;
  m = Meta();
  m.best_epoch = -3;
  EXPECT_NE(refused(m).message().find("best_epoch -3"), absl::string_view::npos);
  m = Meta();
  m.in_epoch = 5;
  m.batches_done = 3;
  m.world_size = 2;
  EXPECT_TRUE(refused(m).ok());
  std::remove(path.c_str());
}

TEST(CheckpointTest, ARefusedCommitLeavesThePreviousCheckpointAndNoTemporary) {
  auto a = Model(3);
  const std::string dir = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_fenced";
  ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
  const std::string path = dir + "/last.pt";
  CheckpointMeta m = Meta();
  m.task_id = "j1/finetune-f2";
  m.attempt = 1;
  ASSERT_TRUE(SaveCheckpoint(path, *a, nullptr, m).ok());
  common::AtomicWriteOptions fenced;
  fenced.keep_previous_as = dir + "/last.prev.pt";
  fenced.check = [](const std::string& p) { return absl::AbortedError("lease expired; not writing " + p); };
  m.epoch = 5;
  absl::Status st = SaveCheckpoint(path, *a, nullptr, m, fenced);
  EXPECT_TRUE(absl::IsAborted(st)) << st;
  auto back = ReadCheckpointMeta(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->epoch, 4);
  EXPECT_EQ(back->task_id, "j1/finetune-f2");
  EXPECT_EQ(back->attempt, 1);
  EXPECT_NE(::access((path + ".tmp." + common::TemporarySuffix()).c_str(), F_OK), 0);
  EXPECT_NE(::access(fenced.keep_previous_as.c_str(), F_OK), 0);  // nothing was moved either
}

// A checkpoint of another version's format (a rollout or a rollback with the run half way) was
// "unreadable: bad conversion" (INVALID_ARGUMENT, damage): the resume went on from last.prev.pt,
// an epoch older, and set the newer file aside. It blocks the resume now, saying why.
TEST(CheckpointTest, AnotherVersionsFormatBlocksTheResume) {
  const std::string newer = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_format2.pt";
  const std::string older = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_format1.pt";
  auto small = Model(3);
  CheckpointMeta m2 = Meta();
  m2.format = 2;
  m2.epoch = 5;
  ASSERT_TRUE(SaveCheckpoint(newer, *small, nullptr, m2).ok());
  ASSERT_TRUE(SaveCheckpoint(older, *small, nullptr, Meta()).ok());
  auto read = ReadCheckpointMeta(newer);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), absl::StatusCode::kFailedPrecondition) << read.status();
  EXPECT_NE(read.status().message().find(newer + ": checkpoint format 2 is not supported (this aviary reads "
                                         "format 1): written by another version of aviary"),
            std::string::npos)
      << read.status();
  std::vector<ResumeCandidate> c(2);
  c[0].path = newer;
  c[0].meta = read;
  c[1].path = older;
  c[1].meta = ReadCheckpointMeta(older);
  ASSERT_TRUE(c[1].meta.ok()) << c[1].meta.status();
  ResumeChoice r = PickResumeCheckpoint(c, "finetune", 2, "");
  EXPECT_EQ(r.index, -1);
  EXPECT_EQ(r.blocked.code(), absl::StatusCode::kFailedPrecondition) << r.blocked;
  EXPECT_NE(r.blocked.message().find("format 2"), std::string::npos) << r.blocked;
  // Another FAILED_PRECONDITION (a last.pt of another label set or model) is passed over.
  c[0].meta = absl::FailedPreconditionError(newer + ": its label set differs from this stage's");
  r = PickResumeCheckpoint(c, "finetune", 2, "");
  EXPECT_EQ(r.index, 1);
  EXPECT_TRUE(r.blocked.ok()) << r.blocked;
  std::remove(newer.c_str());
  std::remove(older.c_str());
}

TEST(CheckpointTest, MissingOrForeignFilesAreClearErrors) {
  EXPECT_EQ(ReadCheckpointMeta("/nonexistent/best.pt").status().code(), absl::StatusCode::kNotFound);
  {
    // A checkpoint this user may not read is PERMISSION_DENIED naming it, not "no such
    // checkpoint" (a resume skipped it and went on from the older one). Checked as nobody when
    // run as root (root reads any file).
    const std::string locked = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_locked.pt";
    auto small = Model(3);
    ASSERT_TRUE(SaveCheckpoint(locked, *small, nullptr, Meta()).ok());
    const bool root = ::geteuid() == 0;
    ASSERT_EQ(::chmod(locked.c_str(), root ? 0600 : 0000), 0);
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) {
      if (root && (::setgroups(0, nullptr) != 0 || ::setresgid(65534, 65534, 65534) != 0 ||
                   ::setresuid(65534, 65534, 65534) != 0)) {
        ::_exit(2);
      }
      // Only open(2) runs before the answer: no torch work in the forked child.
      auto read = ReadCheckpointMeta(locked);
      const bool good = !read.ok() && read.status().code() == absl::StatusCode::kPermissionDenied &&
                        read.status().message() == locked + ": cannot read the checkpoint: Permission denied";
      if (!good) std::fprintf(stderr, "got: %s\n", read.status().ToString().c_str());
      ::_exit(good ? 0 : 1);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ::chmod(locked.c_str(), 0644);
    std::remove(locked.c_str());
    ASSERT_TRUE(WIFEXITED(status));
    if (WEXITSTATUS(status) == 2) GTEST_SKIP() << "root here cannot drop to uid 65534 (no CAP_SETUID, or unmapped)";
    EXPECT_EQ(WEXITSTATUS(status), 0);
  }
  std::string path = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_not_a_ckpt.pt";
  ASSERT_TRUE(common::WriteFileAtomically(path, "garbage").ok());
  auto r = ReadCheckpointMeta(path);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(path), absl::string_view::npos);
  // Metadata a model would be built from, out of range (an edited or damaged file): refused by
  // the reader, naming the file and the value, before anything is allocated for it (predict and
  // export build the model from it; in_channels 10^8 was a 100 GB first convolution).
  auto model = Model(3);
  for (const auto& [field, value, expect] :
       std::vector<std::tuple<std::string, int, std::string>>{{"in_channels", 100000000, "in_channels 100000000"},
                                                              {"in_channels", 2, "in_channels 2 (expected 1 or 3"},
                                                              {"num_classes", 0, "num_classes 0 (expected 1 to"},
                                                              {"num_classes", 2000000000, "num_classes 2000000000"}}) {
    CheckpointMeta meta = Meta();
    (field == "in_channels" ? meta.in_channels : meta.num_classes) = value;
    const std::string edited = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_edited.pt";
    ASSERT_TRUE(SaveCheckpoint(edited, *model, nullptr, meta).ok());
    auto read = ReadCheckpointMeta(edited);
    ASSERT_FALSE(read.ok()) << field;
    EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(read.status().message().find(edited + ": checkpoint metadata has " + expect), absl::string_view::npos)
        << read.status();
    std::remove(edited.c_str());
  }
}

}  // namespace
}  // namespace aviary::worker
