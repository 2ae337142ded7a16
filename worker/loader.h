// The training/validation loader: a deterministic order per (seed, epoch), per-rank shards,
// several decode threads, a bounded queue of ready batches, and batches in pinned memory when a
// CUDA device will consume them.
//
// Order and sharding. Training: the epoch's order is numpy's
// RandomState(seed + epoch).permutation(N) over the item list; step s covers the global batch
// order[s*G, (s+1)*G) with G = batch_size * world_size, and rank r takes its b = batch_size
// items at offset r*b of it, so 2 ranks with batch b see exactly what 1 rank with batch 2b sees
// (the full batches). drop_remainder drops the last partial global batch; otherwise each rank
// takes ceil(rest / world_size) of it, the last ranks' shares padded with items from the start of
// the epoch's order (every rank takes the same steps with the same batch shape: 21 items, batch
// 4, 2 ranks: a last step of 3 + 3 rows, one of them order[0] again). Validation: fixed item order, item i belongs to rank i % world_size,
// every item exactly once, batches of batch_size from the rank's share (last one partial).
//
// Broken clips. When the clip function reports a problem (corrupt, silent, ... file), the
// loader counts it per reason. In training it substitutes the next item of the epoch order
// (deterministically, whatever the thread timing), so batches keep their size; in validation
// the item is left out of its batch.
//
// Threading: Next() is called by one consumer thread; worker threads are internal. The unit of
// work is one clip, not one batch: every thread takes the next undecoded row of the earliest
// batch in progress and decodes it straight into that row of the batch's (pinned) tensor, then
// opens the next batch when the earlier ones have no row left, up to prefetch_batches batches
// ahead of the consumer. So all num_threads threads work on the batch the consumer waits for
// (an epoch's first batch arrives num_threads times sooner), and the loader's throughput does
// not stop at prefetch_batches threads. The clip function must be thread-safe. Destruction
// stops and joins the workers.
#ifndef AVIARY_WORKER_LOADER_H_
#define AVIARY_WORKER_LOADER_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace aviary::worker {

struct LoaderItem {
  std::string path;
  int target = 0;  // class index
};

// What became of one clip: a problem name ("" when fine) and its message.
struct ClipData {
  std::string problem;  // e.g. "truncated", "silent"
  std::string message;
  // The system could not read the file (not there, an I/O error, ...): no verdict on its contents.
  bool unreadable = false;
  // ... for a cause that may pass (an I/O error, too many open files, out of memory), so the
  // loader reads it again (LoaderOptions::read_retry_delays_s).
  bool retry = false;
};
// Writes the clip of `item` into `out` (clip_samples floats: the clip's row of the batch; what it
// leaves there on a problem is overwritten or dropped). `train` selects the random crop (seeded
// by `crop_seed`) rather than the first window. Called concurrently from the loader's threads.
using ClipFn = std::function<ClipData(const LoaderItem& item, bool train, uint64_t crop_seed, absl::Span<float> out)>;

struct LoaderOptions {
  int batch_size = 32;         // per rank
  int num_threads = 2;         // decode threads
  int prefetch_batches = 4;    // batches in progress or ready, ahead of the consumer, at most
  bool train = true;
  bool drop_remainder = true;  // training only
  uint32_t seed = 42;
  int rank = 0;
  int world_size = 1;
  int64_t clip_samples = 320000;
  int num_classes = 1;
  bool pin_memory = false;     // page-locked host batches (needs CUDA)
  int64_t max_batches = -1;    // per epoch, for debug runs; -1: all
  int max_substitutions = 64;  // broken clips in a row (a row's and its substitutes') that fail the epoch; >= 1
  // A row's clip that could not be read now (ClipData::retry) is read again after each of these
  // waits (the same item and crop: the batch is what it would have been) before it counts as
  // broken. Only the row's own item: its substitutes are not (a failed storage then ends the
  // epoch within seconds, well inside comm.timeout_s). A stop or a new epoch cuts the waits.
  std::vector<double> read_retry_delays_s = {0.25, 1.0, 4.0};
};

struct Batch {
  at::Tensor waveforms;       // [B, clip_samples] float32, pinned when asked
  at::Tensor targets;         // [B] int64 class indices
  std::vector<int64_t> items; // indices into the item list, one per row
  int64_t index = 0;          // batch number within the epoch
};

struct LoaderStats {
  std::map<std::string, int64_t> problems;  // broken clips per reason, this loader's lifetime
  std::map<std::string, std::string> examples;  // per reason, the first broken clip's message (its file)
  int64_t read_retries = 0;        // clips read again after a read that failed now (ClipData::retry)
  std::string read_retry_example;  // the first such read's message
  int64_t batches = 0;
  int64_t consumer_waits = 0;      // Next() calls that found no ready batch
  double consumer_wait_s = 0.0;    // time Next() spent waiting: the GPU starving
  int queue_depth = 0;             // ready batches now
};

class Loader {
 public:
  // INVALID_ARGUMENT for bad options (naming the field and value) or an empty item list.
  static absl::StatusOr<std::unique_ptr<Loader>> Create(std::vector<LoaderItem> items, ClipFn clip,
                                                        LoaderOptions options);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  // Starts producing epoch `epoch` (stops an epoch in progress) from its batch `first_batch`
  // (a run resumed mid-epoch: the batches before it are not built; what follows is what an
  // uninterrupted epoch produces there). Started already from there, with no batch taken and no
  // error, the work done is kept (the same batches, whatever the timing): so a trainer starts
  // the next epoch ahead, during validation, and starts it again when it begins.
  void StartEpoch(int epoch, int64_t first_batch = 0);
  // The next batch of the epoch in order; false at the end of the epoch. An error (e.g.
  // max_substitutions broken clips in a row: DATA_LOSS, or UNAVAILABLE when none of them
  // could be read (ClipData::unreadable): the files' storage or this node's view of it, not their
  // contents) is returned as a status. Validation leaves broken clips out, but max_substitutions
  // clips in a row that could not be read are UNAVAILABLE too (a storage outage: its metrics
  // would cover another set of clips, after minutes of waits); past 3 such rows, a row's read is
  // not made again after waits. A batch that is ready is returned even when a later one failed.
  absl::StatusOr<bool> Next(Batch* batch);

  int64_t BatchesPerEpoch() const { return num_batches_; }
  const std::vector<LoaderItem>& items() const { return items_; }
  LoaderStats Stats() const;
  // Ready batches now (prefetched, waiting for Next()); cheap: one lock, no copies.
  int QueueDepth() const;

  // The items rank `rank` gets for `epoch`, batch by batch (what the loader will produce,
  // before substitutions). Exposed for tests and for the distributed equivalence checks.
  std::vector<std::vector<int64_t>> Plan(int epoch) const;

 private:
  struct Build;  // a batch being decoded (loader.cc)
  // What became of one row: the item decoded into it (a substitute, maybe), or -1 when it was
  // left out (a broken validation clip); the problems met on the way.
  struct RowOutcome {
    int64_t item = -1;
    std::map<std::string, int64_t> problems;
    std::map<std::string, std::string> messages;  // the first per problem
    int64_t read_retries = 0;
    std::string read_retry_message;  // the first
    bool unreadable = false;  // validation: the row's clip was left out, not read at all
    std::string unreadable_message;
    absl::Status status;
  };

  Loader(std::vector<LoaderItem> items, ClipFn clip, LoaderOptions options);
  void StopWorkers();
  void WorkerLoop();
  // Decodes row k of `build` into its row of the tensor (training: substituting broken clips).
  RowOutcome FillRow(const Build& build, size_t k) const;
  // True when the loader stops, a new epoch started or the epoch failed: a row gives up.
  bool Abandoned(uint64_t generation) const;
  // Sleeps `seconds` unless the loader stops or a new epoch starts (false then).
  bool WaitToReadAgain(double seconds, uint64_t generation) const;
  // The finished batch: the rows left out dropped (validation), the targets, the items.
  Batch Assemble(const Build& build) const;

  const std::vector<LoaderItem> items_;
  const ClipFn clip_;
  const LoaderOptions options_;
  int64_t num_batches_ = 0;

  // The decode threads and the consumer share the plan, the batches in progress and the ready
  // batches under mu_.
  mutable absl::Mutex mu_;
  absl::CondVar produced_;  // a batch became ready, or an error
  absl::CondVar work_;      // a row to decode or room for a new batch, or stopping
  // A new epoch or stopping, for rows waiting to read again (WaitToReadAgain: on mu_, a wait on
  // the steady clock).
  mutable std::condition_variable_any retry_cv_;
  std::vector<std::thread> workers_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int epoch_ ABSL_GUARDED_BY(mu_) = -1;
  // Counts StartEpoch calls: work begun under an older one is dropped (the same epoch may start
  // again, from another batch).
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  // Validation: rows left out in a row because their clip could not be read (ClipData::unreadable).
  // Atomic: FillRow reads it (past a few, a row's read is not made again after waits).
  std::atomic<int> unreadable_in_a_row_{0};
  std::vector<std::vector<int64_t>> plan_ ABSL_GUARDED_BY(mu_);  // this epoch's batches for this rank
  // The epoch's full order (training), for substitutions; shared with in-flight builds.
  std::shared_ptr<const std::vector<int64_t>> epoch_order_ ABSL_GUARDED_BY(mu_) =
      std::make_shared<const std::vector<int64_t>>();
  int64_t first_batch_ ABSL_GUARDED_BY(mu_) = 0;    // where this epoch was started
  int64_t next_to_build_ ABSL_GUARDED_BY(mu_) = 0;  // the next batch to open
  int64_t next_to_consume_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int64_t, std::shared_ptr<Build>> building_ ABSL_GUARDED_BY(mu_);  // opened, rows undone
  std::map<int64_t, Batch> ready_ ABSL_GUARDED_BY(mu_);
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  LoaderStats stats_ ABSL_GUARDED_BY(mu_);
};

// Mixes a seed with up to three counters (SplitMix64): per-clip crop seeds and the like.
uint64_t MixSeed(uint64_t seed, uint64_t a, uint64_t b = 0, uint64_t c = 0);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_LOADER_H_
