// One training stage for one fold: the notebook's training loop in libtorch.
//
// Data: the catalog's stage table and the fold's training list (cv_filter, upsample,
// downsample) and validation rows; clips from the decoded-audio cache when data.cache_dir holds
// one, decoded on the fly otherwise; a deterministic loader. Each step: waveform augmentation
// on the device, the mel front end (SpecAugment in training), the model (channels_last) under
// bf16 autocast on CUDA, the loss with label smoothing, the optimizer (worker/optimizer.h: one
// fused kernel per step with torch >= 2.4); worker/train_step.h is this step. Each epoch: validation (micro PR-AUC =
// val_auc, BirdCLEF macro ROC-AUC, padded cmAP, accuracy), a history.csv row, last.pt, best.pt
// when the monitor improved, history.png. Epochs are numbered from 0 everywhere (history.csv,
// the checkpoints, the log's "epoch 0/5" = epoch 0 of 0..5, history.png).
//
// Options (train.*, all off by default): grad_accum_steps K (an optimizer step every K loader
// batches; global batch = batch_size x ranks x K, and the learning-rate scaling uses it),
// grad_clip_norm (worker/train_step.h), ema_decay / ema_warmup_steps / ema_eval (worker/ema.h:
// the average is updated after every optimizer step; with ema_eval validation, the monitor and
// best.pt use it, last.pt keeps the raw weights and the average), early_stop_patience /
// early_stop_min_delta (the run ends after the epoch that is `patience` epochs past the last
// improvement of the monitor by more than min_delta; best.pt is the best epoch as always).
//
// Stopping (should_stop) happens between optimizer steps: rank 0 writes last.pt at that step
// (the epoch's position and running totals over all ranks, CheckpointMeta::in_epoch), and a
// resumed run continues from the next batch of the epoch. Resuming refuses a run folder whose
// config differs (naming the keys; TrainOptions::extend_epochs lets epochs grow).
//
// Determinism: the loader order, crops, augmentation, SpecAugment and dropout draws depend only
// on (seed, epoch, step, rank), so on CPU a run resumed from last.pt ends with the same weights
// and history as an uninterrupted one.
//
// Data parallel (TrainOptions::comm set, one process per rank of an mpirun world): every rank is
// a replica. Rank 0's parameters and buffers are broadcast at the start (after a resume too: all
// ranks read the same last.pt); each rank trains on its shard of the global batch (batch_size
// per rank, see loader.h) and gradients are averaged by the bucketed reducer (comm/reducer.h)
// before every optimizer step. Augmentation, SpecAugment and dropout draws differ per rank
// (rank 0 draws what a single process draws). A non-finite loss on any rank is known to all
// (one small all-reduce per step) so that every rank skips or fails the same step.
// BatchNorm policy: running statistics are not synchronized during training (each rank
// normalizes with its own batch statistics, as DDP without SyncBatchNorm); rank 0's running
// statistics (all buffers) are broadcast to every rank before each validation, so validation
// and the checkpoints use rank 0's statistics, like DDP's broadcast_buffers.
// Validation is sharded (item i on rank i % world) and the predictions are gathered and put
// back in item order, so the metrics are those of one process evaluating the same predictions.
// Only rank 0 writes config.yaml, history.csv, history.png, best.pt and last.pt (the previous
// last.pt kept as last.prev.pt), each through common::WriteFileAtomically with
// TrainOptions::commit_check before its rename. Every rank learns rank 0's outcome of each round
// of writes (config.yaml at the start, the epoch's files at its end) with one small all-reduce,
// so a full disk or a refused commit ends the run on every rank at the same point with the same
// code (rank 0's error names the path and errno; the others say that rank 0 failed).
// Resuming picks the newest valid checkpoint among last.pt and last.prev.pt (PickResumeCheckpoint:
// readable, this stage, fold and task, the highest epoch then attempt) and logs why it skipped
// the others; one that then fails to restore, or holds non-finite weights, is skipped for the
// next. No last.pt is written with non-finite weights.
// Fault injection for tests: AVIARY_FAULT_INJECT="rank=R,step=K[,kind=throw|nan|hang|hang_stderr|
// sigterm|nan_from|nan_weights|nan_input|slow_write|fail_start|fail_resume][,seconds=S]" makes rank R
// throw, produce a NaN loss, stop answering (hang_stderr: inside a log line, its stderr a pipe
// nobody reads, so the logger stays locked), or raise SIGTERM (a preemption) at optimizer step K
// of the run; produce a NaN loss at every step from K on; make its weights non-finite after step
// K (a finite loss, a non-finite gradient); put a NaN into its batch's input at step K; (rank 0) write the first epoch's files ending at step K or
// later S seconds late; fail its start (NOT_FOUND, before the first collective; no step needed);
// or fail its resume (UNAVAILABLE, after rank 0 tidied the run folder; no step needed).
//
// Not thread-safe: Run() once, from one thread.
#ifndef AVIARY_WORKER_TRAINER_H_
#define AVIARY_WORKER_TRAINER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/config.h"
#include "common/manifest.h"

namespace aviary::worker {
namespace comm {
class Communicator;
}

// One row of history.csv. NaN marks a metric that is undefined (e.g. no validation rows).
struct EpochRecord {
  int epoch = 0;
  int64_t step = 0;           // optimizer steps so far
  double lr = 0;
  double train_loss = 0;
  double train_acc = 0;
  double val_loss = 0;
  double val_auc = 0;
  double val_roc_auc = 0;
  double val_cmap = 0;
  double val_acc = 0;
  double samples_per_s = 0;
  bool best = false;          // the monitor improved at this epoch
};

// One optimizer step as seen by one rank (TrainOptions::on_step). Times are this rank's wall
// clock; nothing here is reduced across ranks.
struct StepStats {
  int epoch = 0;
  int64_t step = 0;             // optimizer steps so far in the run (global, as EpochRecord::step)
  int64_t step_in_epoch = 0;    // 1-based: the step just finished within the epoch
  int64_t steps_per_epoch = 0;  // batches per epoch (the same on every rank)
  double lr = 0;
  double train_loss = 0;        // running mean of this rank's loss over the epoch so far
  int64_t samples = 0;          // this rank's samples in the step (0 for a skipped step)
  int world_size = 1;
  bool skipped = false;         // a non-finite loss skipped the optimizer step
  double step_seconds = 0;      // wall time of the step, the wait for data included
  double data_wait_seconds = 0; // time spent waiting for the loader's batches within the step
  double allreduce_seconds = 0; // gradient all-reduce time not hidden by backward (reducer)
  int loader_queue_depth = 0;   // prefetched batches ready beyond this step's (the next one,
                                // already taken for its copy to the device, included)
  // The run ends at this step for a non-finite loss (train.skip_nonfinite off): train_loss is
  // that loss (NaN when it was another rank's), for the coordinator's export; sent at once.
  bool nonfinite_stop = false;
};

// The history.csv header, in the contract's column order.
const std::vector<std::string>& HistoryColumns();

struct TrainOptions {
  std::string out_dir;              // RUN: history.csv, best.pt, last.pt, config.yaml, history.png
  std::string stage = "finetune";   // "pretrain" or "finetune"
  int fold = 0;
  std::string init_checkpoint;      // fine-tuning: the pretraining best.pt (head skipped)
  // The task's data as the coordinator computed it (not owned; null: build the stage table and
  // the fold's train list from the config's data sources here). Stage and fold must match.
  const common::TaskManifest* manifest = nullptr;
  bool resume = true;               // continue from out_dir/last.pt (or last.prev.pt) when it exists
  // Resuming refuses a run folder trained with another config (naming the keys); true lets the
  // epochs (train.epochs, stages.*.epochs) differ, so that a finished run trains on.
  bool extend_epochs = false;
  // The lease the run trains under (recorded in the checkpoints; "" and 0 without a coordinator).
  std::string task_id;
  int attempt = 0;
  // Rank 0: called right before each file is renamed into out_dir (the lease fence); an error
  // leaves the previous file and ends the run with that error on every rank.
  std::function<absl::Status(const std::string& path)> commit_check;
  c10::Device device = c10::Device(c10::kCPU);
  bool progress_bar = false;        // a live line on stderr (a terminal); else log lines
  double log_every_s = 10.0;        // plain progress lines at most this often
  // Called on every rank after every epoch with its record (progress reports to the
  // coordinator), after rank 0 wrote the epoch's files: when it runs, out_dir/last.pt (and
  // out_dir/best.pt when the record is the best so far) hold this epoch, and history.csv has
  // its row.
  std::function<void(const EpochRecord&)> on_epoch;
  // Called on every rank after each optimizer step, and after a step skipped for a non-finite
  // loss (StepStats::skipped), from the training thread. Must be cheap; must not call
  // collectives of the trainer's communicator.
  std::function<void(const StepStats&)> on_step;
  // Polled between optimizer steps; returning true stops the run (CANCELLED) after saving
  // last.pt at that step (mid-epoch: the next run resumes there and ends as an uninterrupted
  // run would). In a multi-rank run it must answer the same on every rank at the same step.
  std::function<bool()> should_stop;
  // Called on this rank from the training thread for each validation batch: a sign of progress
  // between optimizer steps (the agent's stall watchdog). Must be cheap; no collectives.
  std::function<void()> on_progress;
  // An epoch whose training took at least this long (on any rank) is saved in last.pt before
  // its validation, as a mid-epoch checkpoint with every batch done: a stop or crash during a
  // long validation (a kill after the stop's grace time, an out-of-memory error) then loses the
  // validation, not the epoch. < 0: never.
  double checkpoint_before_validation_s = 60.0;
  // `aviary-worker train`: rank 0 holds an exclusive lock (flock) on out_dir/.aviary-train.lock for
  // the trainer's life, and a second run in the folder (a rerun while the first still writes) is
  // refused, FAILED_PRECONDITION naming the holder. (`serve` has the coordinator's lease fence.)
  bool lock_run_folder = false;
  // train.skip_nonfinite: this many batches skipped (for a non-finite loss or gradient) with no
  // optimizer step applied in between end the run (DATA_LOSS): it trains nothing (a learning
  // rate that diverged, a broken data path). <= 0: never.
  int64_t max_skipped_in_a_row = 100;
  // The worker group (not owned; null: one process without the all-reduce path). With one rank
  // the reducer still runs (its cost can be measured), unless train.cuda_graph. Must outlive
  // the trainer.
  comm::Communicator* comm = nullptr;
};

// Config keys (as the resume check names them) that change how fast a run goes, not what it
// computes: data.cache_dir, comm.*, train.num_workers and train.cuda_graph (the graphed step is
// the eager step's arithmetic). A run folder resumes under other values of these.
bool ResumeMayChange(const std::string& key);

// The process-wide GPU settings of a CUDA task: with `deterministic`, deterministic cuDNN
// without benchmark and torch's deterministic algorithms (warn only); without, the fastest
// cuDNN algorithms chosen by benchmark and the rest off. Every flag is set either way: a serving
// agent runs one task after another in one process, and a deterministic task must not leave
// its mode to the next. cuBLAS's workspace (CUBLAS_WORKSPACE_CONFIG=:4096:8, what determinism
// needs; the default size on Hopper) is set, unless already set, by the first task of the
// process: cuBLAS reads it when its handle is created, once.
void ConfigureCudaMode(bool deterministic);

// Whether train.precision asks for bf16 autocast on a device: "fp32" never; "bf16" on CUDA;
// "auto" on CUDA devices of compute capability 8 or more (`compute_major`: bf16 tensor cores,
// Ampere on) and where it is unknown (-1: a build without aviary's CUDA code, as before), not on
// GPUs known to be older (a T4 or V100 runs bf16 convolutions slowly, or cuDNN refuses them).
// Never on the CPU. The ranks of a group must agree (the trainer's start checks it).
bool Bf16Autocast(const std::string& precision, bool cuda, int compute_major);

class Trainer {
 public:
  // Builds the data, the model (with pretrained or pretraining weights) and the optimizer, and
  // restores last.pt when resuming. Every problem with the inputs is reported here, before any
  // training step: bad fold, empty lists, weights that do not fit, a foreign checkpoint.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const common::PipelineConfig& config,
                                                         const TrainOptions& options);
  ~Trainer();

  // Trains the remaining epochs. Errors name the epoch, step and batch files (non-finite
  // loss), or the file or device at fault.
  absl::Status Run();

  const std::vector<EpochRecord>& history() const;
  // Steps skipped for a non-finite loss (train.skip_nonfinite).
  int64_t skipped_steps() const;

 private:
  struct State;
  explicit Trainer(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_TRAINER_H_
