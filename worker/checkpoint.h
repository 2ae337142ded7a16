// Training checkpoints (best.pt, last.pt): model parameters and buffers, optimizer state and
// the run's metadata (labels, resolved config, history so far, best monitor value) in one torch
// archive. Writes are atomic: the archive is serialized in memory, then written through
// common::WriteFileAtomically (a temporary file, fsync, rename, fsync of the folder); a failed
// write (a full disk, a lease fence) leaves the previous checkpoint intact and no temporary file,
// and never throws.
//
// Thread-compatible.
#ifndef AVIARY_WORKER_CHECKPOINT_H_
#define AVIARY_WORKER_CHECKPOINT_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>


#include "absl/status/statusor.h"
#include "common/files.h"
#include "worker/models.h"
#include "worker/optimizer.h"
#include "worker/weights.h"

namespace aviary::worker {

struct CheckpointMeta {
  int format = 1;
  std::string stage;
  int fold = 0;
  int epoch = -1;                  // last completed epoch (0-based)
  int64_t step = 0;                // optimizer steps so far
  std::string monitor;
  double best_value = 0.0;
  int best_epoch = -1;
  std::string model_name;
  int num_classes = 0;
  int in_channels = 0;
  std::vector<std::string> class_names;  // index = target
  std::string config_yaml;               // the resolved config of the run
  std::string history_csv;               // history.csv up to `epoch`
  int64_t skipped_steps = 0;             // non-finite steps skipped (train.skip_nonfinite)
  // Of them, the batches skipped in a row just before it was written (a resume goes on counting
  // towards TrainOptions::max_skipped_in_a_row); 0 when absent.
  int64_t skipped_in_a_row = 0;
  // The lease that wrote it (fencing, docs/SERVICE.md): the coordinator's task id and attempt;
  // "" and 0 for `aviary-worker train` and checkpoints written before.
  std::string task_id;
  int attempt = 0;
  // The ranks of the run that wrote it (a mid-epoch position counts that run's loader batches);
  // 0: not recorded (checkpoints written before).
  int world_size = 0;
  // Of the stage's `data_files` distinct training and validation files, how many rank 0 read
  // from the decoded-audio cache (the rest are decoded on the fly: float, not 16-bit). -1: not
  // recorded (checkpoints written before).
  int64_t cached_files = -1;
  int64_t data_files = -1;
  // How it computed: "cpu" or "cuda", and with bf16 autocast (1) or in fp32 (0). "" and -1: not
  // recorded (checkpoints written before). A resume that computes otherwise is said (not bit-exact).
  std::string device_type;
  int autocast = -1;
  // The run's training and validation items as listed (paths and targets, in order; before
  // debug mode's cut): their counts and a 62-bit digest of each list. -1 counts: not recorded
  // (checkpoints written before). A resume over other items is refused (the folds moved).
  int64_t train_items = -1;
  int64_t valid_items = -1;
  int64_t train_items_digest = 0;
  int64_t valid_items_digest = 0;
  // A checkpoint written mid-epoch (a stop or preemption, TrainOptions::should_stop): epoch
  // `in_epoch` (= epoch + 1) is in progress and its first `batches_done` loader batches are
  // trained; `epoch_loss_sum`, `epoch_seen` and `epoch_correct` are the epoch's running totals
  // over every rank. -1: an epoch end.
  int in_epoch = -1;
  int64_t batches_done = 0;
  double epoch_loss_sum = 0;
  int64_t epoch_seen = 0;
  int64_t epoch_correct = 0;
  // Early stopping (train.early_stop_patience): the monitor value the patience counts from, its
  // epoch (-1: none yet), and whether the run stopped early (it then has nothing left to do).
  double early_stop_value = 0;
  int early_stop_epoch = -1;
  bool stopped_early = false;
};

// Named tensor groups stored beside the model and optimizer state ("ema_state").
using CheckpointGroups = std::vector<std::pair<std::string, NamedTensors>>;

// Saves `model` (and `optimizer`'s state when not null) with `meta` to `path` atomically;
// `write` adds the lease check before the rename and keeps the previous file (last.prev.pt).
// Errors are those of common::WriteFileAtomically (path, errno; a storage-fault payload), and
// INTERNAL when the archive cannot be serialized.
absl::Status SaveCheckpoint(const std::string& path, ClassifierImpl& model,
                            const AdamOptimizer* optimizer, const CheckpointMeta& meta,
                            const common::AtomicWriteOptions& write = {},
                            const CheckpointGroups& groups = {});

// What a resume on `device_type` ("cpu", "cuda") with or without bf16 autocast changes against
// the run that wrote `meta` ("was written by a run on cuda with bf16 autocast; this one trains on
// cpu in fp32: ... not bit-exact ..."); "" when nothing does or `meta` does not record it.
std::string NumericsChange(const CheckpointMeta& meta, const std::string& device_type, bool autocast);

// One checkpoint a run could resume from, and what reading its metadata gave.
struct ResumeCandidate {
  std::string path;
  absl::StatusOr<CheckpointMeta> meta;
};
// The choice among the candidates: the index of the newest valid one (-1: none) and, per
// candidate, why it was skipped ("" for the chosen one). Valid: its metadata was read, its stage
// and fold are `stage` and `fold`, and when both it and `task_id` name a task, the same task.
// Newest: the highest epoch, then (between attempts of one task) the highest attempt, then the
// most batches of the next epoch (a mid-epoch checkpoint), then the most optimizer steps, then
// the highest attempt, then the earlier candidate.
// Candidates are listed newest first (last.pt, then last.prev.pt: the rotation's order). One that
// could not be read for a reason other than its content (PERMISSION_DENIED, an I/O error:
// UNAVAILABLE; out of memory reading it: RESOURCE_EXHAUSTED; another version's format:
// FAILED_PRECONDITION; see BlocksResume) and is listed before the choice (or
// when none fits) is not passed over: it may hold the newest epoch, and falling back past it
// would lose that. `blocked` then says so and `index` is -1. An older one that cannot be read is
// skipped like a damaged one.
struct ResumeChoice {
  int index = -1;
  std::vector<std::string> skipped;
  absl::Status blocked;
};
ResumeChoice PickResumeCheckpoint(const std::vector<ResumeCandidate>& candidates, const std::string& stage,
                                  int fold, const std::string& task_id);

// Whether a checkpoint whose metadata read so is not to be passed over (nor removed, nor set
// aside) for an older one: it could not be read now (PERMISSION_DENIED, UNAVAILABLE,
// RESOURCE_EXHAUSTED) or was written by another version of aviary in a format this one does not
// read (IsOtherCheckpointFormat): either may hold the newest epoch. (A checkpoint of another
// label set or model, FAILED_PRECONDITION too, is passed over.)
bool BlocksResume(const absl::Status& status);
// The error of a checkpoint whose format this aviary does not read (marked by a payload).
bool IsOtherCheckpointFormat(const absl::Status& status);

// A checkpoint `path` that `access` refused with `error` (not ENOENT): PERMISSION_DENIED for
// EACCES/EPERM, UNAVAILABLE otherwise (an I/O error, ESTALE), "<path>: <doing>: <errno text>".
// PickResumeCheckpoint does not pass over either.
absl::Status UnreadableCheckpoint(const std::string& path, int error, const char* doing);

// Tests only: `fault(path)` runs before each open of a checkpoint to read it (it may replace the
// file); an errno it returns (0: none) fails that file's reads so. Empty: none. Not thread-safe.
void SetCheckpointReadFaultForTest(std::function<int(const std::string& path)> fault);

// Reads only the metadata.
absl::StatusOr<CheckpointMeta> ReadCheckpointMeta(const std::string& path);

// The model tensors of a checkpoint, by name (for initialising another model from it).
absl::StatusOr<NamedTensors> ReadCheckpointTensors(const std::string& path);

// One of the checkpoint's named groups (CheckpointGroups); NOT_FOUND when it has none of that
// name.
// `holds_optimizer`, when given, gets whether the checkpoint carries optimizer state (a last.pt;
// best.pt carries none), from the same open of the file, also when the group is NOT_FOUND.
absl::StatusOr<NamedTensors> ReadCheckpointGroup(const std::string& path, const std::string& group,
                                                 bool* holds_optimizer = nullptr);

// Restores `model` (and `optimizer`) from a checkpoint of the same model and classes. Refuses,
// naming both sides, a checkpoint of another model, class count or input channels. The
// optimizer state is read by parameter name ("optimizer_state"); checkpoints written before
// that (torch::optim's own "optimizer" archive) are read too where this libtorch can parse them.
// With `group_tensors`, the named group `group` is read too (as ReadCheckpointGroup: NOT_FOUND when
// absent). Metadata, weights, optimizer state and group all come from one open of the file (one
// renamed over meanwhile is read as it was when opened), and the metadata returned is theirs.
absl::StatusOr<CheckpointMeta> RestoreCheckpoint(const std::string& path, ClassifierImpl& model,
                                                 AdamOptimizer* optimizer, const std::string& group = "",
                                                 absl::StatusOr<NamedTensors>* group_tensors = nullptr);

// Whether two checkpoints' metadata are the same (every field).
bool SameCheckpointMeta(const CheckpointMeta& a, const CheckpointMeta& b);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_CHECKPOINT_H_
