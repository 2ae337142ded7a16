#include "worker/loader.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/mutex_lockable.h"
#include "common/numpy_random.h"

namespace aviary::worker {

uint64_t MixSeed(uint64_t seed, uint64_t a, uint64_t b, uint64_t c) {
  auto mix = [](uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  return mix(mix(mix(mix(seed) ^ a) ^ b) ^ c);
}

absl::StatusOr<std::unique_ptr<Loader>> Loader::Create(std::vector<LoaderItem> items, ClipFn clip,
                                                       LoaderOptions options) {
  auto bad = [](const std::string& field, auto value, const std::string& want) {
    return absl::InvalidArgumentError(
        absl::StrCat("loader option ", field, " = ", value, ": ", want));
  };
  if (items.empty()) return absl::InvalidArgumentError("loader: the item list is empty");
  if (!clip) return absl::InvalidArgumentError("loader: no clip function");
  if (options.batch_size < 1) return bad("batch_size", options.batch_size, "must be >= 1");
  if (options.num_threads < 1) return bad("num_threads", options.num_threads, "must be >= 1");
  if (options.prefetch_batches < 1) {
    return bad("prefetch_batches", options.prefetch_batches, "must be >= 1");
  }
  if (options.world_size < 1) return bad("world_size", options.world_size, "must be >= 1");
  if (options.rank < 0 || options.rank >= options.world_size) {
    return bad("rank", options.rank, absl::StrCat("must be in [0, ", options.world_size, ")"));
  }
  if (options.clip_samples < 1) return bad("clip_samples", options.clip_samples, "must be >= 1");
  if (options.num_classes < 1) return bad("num_classes", options.num_classes, "must be >= 1");
  if (options.max_substitutions < 1) {
    return bad("max_substitutions", options.max_substitutions, "must be >= 1");
  }
  for (double d : options.read_retry_delays_s) {
    if (!(d >= 0 && d <= 600)) return bad("read_retry_delays_s", d, "each must be in [0, 600] s");
  }
  if (options.pin_memory && !at::hasCUDA()) {
    return bad("pin_memory", "true", "needs a CUDA build of torch with a device");
  }
  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i].target < 0 || items[i].target >= options.num_classes) {
      return absl::InvalidArgumentError(
          absl::StrCat("loader: item ", i, " (", items[i].path, ") has target ", items[i].target,
                       ", outside [0, ", options.num_classes, ")"));
    }
  }
  const int64_t n = static_cast<int64_t>(items.size());
  if (options.train && options.drop_remainder &&
      n < static_cast<int64_t>(options.batch_size) * options.world_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "loader: ", n, " training items are fewer than one global batch (batch_size ",
        options.batch_size, " x ", options.world_size, " ranks) and drop_remainder is set: not one step per "
        "epoch; lower train.batch_size (or the stage's stages.<stage>.batch_size), run on fewer ranks, or set "
        "train.drop_remainder false"));
  }
  try {
    return std::unique_ptr<Loader>(new Loader(std::move(items), std::move(clip), options));
  } catch (const std::system_error& e) {
    return absl::ResourceExhaustedError(absl::StrCat("loader: cannot start a decode thread: ", e.what()));
  }
}

Loader::Loader(std::vector<LoaderItem> items, ClipFn clip, LoaderOptions options)
    : items_(std::move(items)), clip_(std::move(clip)), options_(options) {
  plan_ = Plan(0);
  num_batches_ = static_cast<int64_t>(plan_.size());
  plan_.clear();
  workers_.reserve(static_cast<size_t>(options_.num_threads));  // no reallocation with threads started
  try {
    for (int i = 0; i < options_.num_threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  } catch (const std::system_error& e) {
    // No thread left (EAGAIN under a thread limit): the threads started do the work, more slowly
    // (as common::ParallelFor). With none, the threads started must end before this object goes,
    // or their destruction terminates the process; Create then says why.
    if (workers_.empty()) {
      StopWorkers();
      throw;
    }
    common::Logger("loader").Warn(absl::StrCat("started ", workers_.size(), " of ", options_.num_threads,
                                               " decode threads (", e.what(), "); the loader is slower"));
  } catch (...) {
    StopWorkers();  // the threads started end before this object goes
    throw;
  }
}

Loader::~Loader() { StopWorkers(); }

void Loader::StopWorkers() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    work_.SignalAll();
    produced_.SignalAll();
    retry_cv_.notify_all();
  }
  for (auto& t : workers_) {
    if (t.joinable()) t.join();
  }
}

std::vector<std::vector<int64_t>> Loader::Plan(int epoch) const {
  const int64_t n = static_cast<int64_t>(items_.size());
  const int64_t b = options_.batch_size;
  const int64_t w = options_.world_size;
  const int64_t r = options_.rank;
  std::vector<std::vector<int64_t>> plan;
  if (options_.train) {
    common::LegacyRandomState rng(options_.seed + static_cast<uint32_t>(epoch));
    std::vector<int64_t> order = rng.Permutation(n);
    const int64_t g = b * w;
    const int64_t full = n / g;
    for (int64_t s = 0; s < full; ++s) {
      plan.emplace_back(order.begin() + s * g + r * b, order.begin() + s * g + (r + 1) * b);
    }
    const int64_t rest = n - full * g;
    if (!options_.drop_remainder && rest > 0) {
      // The last global batch, padded from the start of the order to a multiple of the world
      // size so every rank takes the same number of steps with the same batch shape.
      const int64_t per_rank = (rest + w - 1) / w;
      std::vector<int64_t> last;
      for (int64_t k = 0; k < per_rank; ++k) {
        last.push_back(order[(full * g + r * per_rank + k) % n]);
      }
      plan.push_back(std::move(last));
    }
  } else {
    std::vector<int64_t> mine;
    for (int64_t i = r; i < n; i += w) mine.push_back(i);
    for (size_t s = 0; s < mine.size(); s += static_cast<size_t>(b)) {
      plan.emplace_back(mine.begin() + s, mine.begin() + std::min(mine.size(), s + b));
    }
  }
  if (options_.max_batches >= 0 && static_cast<int64_t>(plan.size()) > options_.max_batches) {
    plan.resize(options_.max_batches);
  }
  return plan;
}

// A batch being decoded: its rows go to whichever threads claim them.
struct Loader::Build {
  int64_t index = 0;
  int epoch = 0;
  uint64_t generation = 0;
  std::vector<int64_t> rows;                          // the plan's items
  std::shared_ptr<const std::vector<int64_t>> order;  // the epoch's order (substitutes)
  at::Tensor waveforms;                               // [rows, clip_samples], rows written in place
  // Per row, written by the thread that decoded it and read by the one that assembles the batch
  // after the last row (the mutex orders them): the item decoded, -1 when left out.
  std::vector<int64_t> used;
  // Under the loader's mu_.
  size_t next_row = 0;   // the next row to claim
  size_t rows_done = 0;  // rows decoded
};

void Loader::StartEpoch(int epoch, int64_t first_batch) {
  {
    absl::MutexLock lock(&mu_);
    const int64_t from = std::clamp<int64_t>(first_batch, 0, static_cast<int64_t>(plan_.size()));
    if (epoch_ == epoch && first_batch_ == from && next_to_consume_ == from && error_.ok()) return;
  }
  std::vector<std::vector<int64_t>> plan = Plan(epoch);
  auto order = std::make_shared<std::vector<int64_t>>();
  if (options_.train) {
    common::LegacyRandomState rng(options_.seed + static_cast<uint32_t>(epoch));
    *order = rng.Permutation(static_cast<int64_t>(items_.size()));
  }
  {
    absl::MutexLock lock(&mu_);
    epoch_ = epoch;
    ++generation_;
    unreadable_in_a_row_ = 0;
    plan_ = std::move(plan);
    epoch_order_ = std::move(order);
    building_.clear();
    ready_.clear();
    next_to_build_ = std::clamp<int64_t>(first_batch, 0, static_cast<int64_t>(plan_.size()));
    first_batch_ = next_to_build_;
    next_to_consume_ = next_to_build_;
    error_ = absl::OkStatus();
    work_.SignalAll();
    retry_cv_.notify_all();  // rows of the old epoch waiting to read again give up
  }
}

Loader::RowOutcome Loader::FillRow(const Build& build, size_t k) const {
  const int64_t t = options_.clip_samples;
  const std::vector<int64_t>& order = *build.order;
  const int64_t n = static_cast<int64_t>(items_.size());
  const absl::Span<float> out(build.waveforms.data_ptr<float>() + static_cast<int64_t>(k) * t,
                              static_cast<size_t>(t));
  RowOutcome outcome;
  int64_t item = build.rows[k];
  int64_t pos = -1;  // position of rows[k] in the epoch order, found on the first failure
  bool all_unreadable = true;  // no broken clip of the row so far could be read
  for (int attempt = 0;; ++attempt) {
    uint64_t crop_seed = MixSeed(options_.seed, static_cast<uint64_t>(build.epoch),
                                 static_cast<uint64_t>(item), static_cast<uint64_t>(attempt));
    ClipData clip = clip_(items_[item], options_.train, crop_seed, out);
    // A read of the row's own item that failed now (NFS, too many open files): the same clip
    // again, after a wait.
    // Validation after 3 rows in a row that could not be read: the storage, not this file.
    const bool outage = !options_.train && unreadable_in_a_row_.load() >= 3;
    for (size_t r = 0; attempt == 0 && !outage && !clip.problem.empty() && clip.retry &&
                       r < options_.read_retry_delays_s.size();
         ++r) {
      if (outcome.read_retries++ == 0) outcome.read_retry_message = clip.message;
      if (!WaitToReadAgain(options_.read_retry_delays_s[r], build.generation)) {
        outcome.status = absl::CancelledError("loader: stopped or a new epoch started");  // the row is dropped
        return outcome;
      }
      clip = clip_(items_[item], options_.train, crop_seed, out);
    }
    if (clip.problem.empty()) {
      outcome.item = item;
      return outcome;
    }
    all_unreadable = all_unreadable && clip.unreadable;
    // The row's own item only: a substitute that is broken too is counted as its own row's (it
    // counted twice, and on two ranks, when broken items met in the epoch's order).
    if (attempt == 0) {
      ++outcome.problems[clip.problem];
      outcome.messages.emplace(clip.problem, clip.message);
    }
    if (!options_.train) {  // validation leaves broken items out
      outcome.unreadable = clip.unreadable;
      if (clip.unreadable) outcome.unreadable_message = absl::StrCat(items_[item].path, ": ", clip.message);
      return outcome;
    }
    if (attempt + 1 >= options_.max_substitutions) {
      const std::string what = absl::StrCat(
          "loader: ", options_.max_substitutions, " broken clips in a row from ", items_[build.rows[k]].path,
          " on (last: ", items_[item].path, ": ", clip.message, ")");
      // None could be read at all: the storage failed (an unmounted share, a dead server), not the
      // files (the coordinator read them at submit); another attempt, maybe on another node, may.
      outcome.status = all_unreadable ? absl::UnavailableError(absl::StrCat(what, "; none could be read"))
                                      : absl::DataLossError(what);
      return outcome;
    }
    // Stopped, a new epoch, or another row's error: no more attempts (on failing storage each may
    // take long, and the loader's destructor waits for them).
    if (Abandoned(build.generation)) {
      outcome.status = absl::CancelledError("loader: stopped, a new epoch started or the epoch failed");
      return outcome;
    }
    // The deterministic substitute: the next items of the epoch order.
    if (pos < 0) pos = std::find(order.begin(), order.end(), build.rows[k]) - order.begin();
    item = order[(pos + attempt + 1) % n];
  }
}

bool Loader::Abandoned(uint64_t generation) const {
  absl::MutexLock lock(&mu_);
  return stopping_ || generation_ != generation || !error_.ok();
}

bool Loader::WaitToReadAgain(double seconds, uint64_t generation) const {
  absl::MutexLock lock(&mu_);
  // Another row's error ends the wait too (the epoch failed; the read would be thrown away).
  auto cut = [this, generation]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return stopping_ || generation_ != generation || !error_.ok();
  };
  // On the steady clock (AwaitWithTimeout waited until a wall-clock time: a clock stepped back
  // an hour held a row's read, and the batch, an hour).
  common::MutexLockable held{&mu_};
  retry_cv_.wait_for(held, std::chrono::duration<double>(seconds), cut);
  return !cut();
}

Batch Loader::Assemble(const Build& build) const {
  const int64_t t = options_.clip_samples;
  Batch batch;
  for (int64_t item : build.used) {
    if (item >= 0) batch.items.push_back(item);
  }
  const int64_t rows_out = static_cast<int64_t>(batch.items.size());
  if (rows_out == static_cast<int64_t>(build.used.size())) {
    batch.waveforms = build.waveforms;
  } else {  // validation rows left out: the others, in order, in a tensor of their own
    batch.waveforms =
        at::empty({rows_out, t}, at::TensorOptions().dtype(at::kFloat).pinned_memory(options_.pin_memory));
    const float* src = build.waveforms.data_ptr<float>();
    float* dst = batch.waveforms.data_ptr<float>();
    int64_t r = 0;
    for (size_t k = 0; k < build.used.size(); ++k) {
      if (build.used[k] < 0) continue;
      std::memcpy(dst + r * t, src + static_cast<int64_t>(k) * t, sizeof(float) * static_cast<size_t>(t));
      ++r;
    }
  }
  batch.targets = at::empty({rows_out}, at::TensorOptions().dtype(at::kLong));
  int64_t* tgt = batch.targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows_out; ++i) tgt[i] = items_[batch.items[i]].target;
  batch.index = build.index;
  return batch;
}

void Loader::WorkerLoop() {
  while (true) {
    std::shared_ptr<Build> build;  // the row's batch, or the batch to open
    size_t k = 0;
    bool open = false;
    {
      absl::MutexLock lock(&mu_);
      while (true) {
        if (stopping_) return;
        if (epoch_ >= 0 && error_.ok()) {
          // A row of the earliest batch in progress first: the consumer waits for that one.
          for (auto& [index, b] : building_) {
            if (b->next_row < b->rows.size()) {
              build = b;
              k = b->next_row++;
              break;
            }
          }
          if (build == nullptr && next_to_build_ < static_cast<int64_t>(plan_.size()) &&
              next_to_build_ < next_to_consume_ + options_.prefetch_batches) {
            build = std::make_shared<Build>();
            build->index = next_to_build_++;
            build->epoch = epoch_;
            build->generation = generation_;
            build->rows = plan_[build->index];
            build->order = epoch_order_;
            open = true;
          }
        }
        if (build != nullptr) break;
        work_.Wait(&mu_);
      }
    }
    RowOutcome outcome;
    if (open) {
      // The batch's tensor, outside the lock (a first pinned allocation takes a while); then its
      // rows are open to every thread, this one taking row 0.
      try {
        build->waveforms = at::empty(
            {static_cast<int64_t>(build->rows.size()), options_.clip_samples},
            at::TensorOptions().dtype(at::kFloat).pinned_memory(options_.pin_memory));
        build->used.assign(build->rows.size(), -1);
      } catch (const std::exception& e) {
        outcome.status = absl::ResourceExhaustedError(
            absl::StrCat("loader: batch ", build->index, ": allocating its ", build->rows.size(), " x ",
                         options_.clip_samples, " samples: ", e.what()));
      }
      absl::MutexLock lock(&mu_);
      if (build->generation != generation_) continue;  // a new epoch started meanwhile: drop it
      if (!outcome.status.ok()) {
        if (error_.ok()) error_ = outcome.status;
        retry_cv_.notify_all();  // rows waiting to read again give up
        produced_.SignalAll();
        continue;
      }
      if (build->rows.empty()) {  // nothing to decode (cannot happen with a valid plan)
        ready_[build->index] = Assemble(*build);
        produced_.SignalAll();
        continue;
      }
      k = build->next_row++;
      building_[build->index] = build;
      work_.SignalAll();
    }
    try {
      outcome = FillRow(*build, k);
    } catch (const std::exception& e) {
      outcome.status = absl::InternalError(absl::StrCat("loader: batch ", build->index, " row ", k, " (",
                                                        items_[build->rows[k]].path, " or a substitute): ", e.what()));
    }
    bool last = false;
    {
      absl::MutexLock lock(&mu_);
      // A new epoch started meanwhile: the row is dropped (and made again), uncounted.
      if (build->generation != generation_) continue;
      for (const auto& [name, count] : outcome.problems) stats_.problems[name] += count;
      for (const auto& [name, message] : outcome.messages) stats_.examples.emplace(name, message);
      if (outcome.read_retries > 0 && stats_.read_retries == 0) stats_.read_retry_example = outcome.read_retry_message;
      stats_.read_retries += outcome.read_retries;
      if (!options_.train && outcome.status.ok()) {
        if (!outcome.unreadable) {
          unreadable_in_a_row_ = 0;
        } else if (++unreadable_in_a_row_ >= options_.max_substitutions) {
          outcome.status = absl::UnavailableError(absl::StrCat(
              "loader: ", options_.max_substitutions, " validation clips in a row could not be read (last: ",
              outcome.unreadable_message, "): missing or unreadable, the storage's failure (an unmounted or failed "
              "share) more likely than the files'; validation without them would measure another set of clips"));
        }
      }
      if (!outcome.status.ok()) {
        if (error_.ok()) error_ = outcome.status;
        retry_cv_.notify_all();  // rows waiting to read again give up
        produced_.SignalAll();
        continue;
      }
      build->used[k] = outcome.item;
      if (++build->rows_done == build->rows.size()) {
        building_.erase(build->index);
        last = true;
      }
    }
    if (!last) continue;
    // The last row's thread assembles the batch (a copy only when validation left rows out).
    Batch batch;
    absl::Status status;
    try {
      batch = Assemble(*build);
    } catch (const std::exception& e) {
      status = absl::InternalError(absl::StrCat("loader: batch ", build->index, ": ", e.what()));
    }
    absl::MutexLock lock(&mu_);
    if (build->generation != generation_) continue;
    if (!status.ok()) {
      if (error_.ok()) error_ = status;
      retry_cv_.notify_all();  // rows waiting to read again give up
    } else {
      ready_[build->index] = std::move(batch);
    }
    produced_.SignalAll();
  }
}

absl::StatusOr<bool> Loader::Next(Batch* batch) {
  absl::MutexLock lock(&mu_);
  if (epoch_ < 0) return absl::FailedPreconditionError("loader: Next() before StartEpoch()");
  if (next_to_consume_ >= static_cast<int64_t>(plan_.size())) return false;
  if (error_.ok() && ready_.count(next_to_consume_) == 0) {
    ++stats_.consumer_waits;
    auto t0 = std::chrono::steady_clock::now();
    while (error_.ok() && ready_.count(next_to_consume_) == 0) produced_.Wait(&mu_);
    stats_.consumer_wait_s +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  // A batch that is ready is delivered even when a later one (prefetched) failed: the epoch
  // fails at the first batch it cannot have, not at a step that depends on prefetch timing.
  auto it = ready_.find(next_to_consume_);
  if (it == ready_.end()) return error_;
  *batch = std::move(it->second);
  ready_.erase(it);
  ++next_to_consume_;
  ++stats_.batches;
  work_.SignalAll();  // room for one more batch
  return true;
}

LoaderStats Loader::Stats() const {
  absl::MutexLock lock(&mu_);
  LoaderStats s = stats_;
  s.queue_depth = static_cast<int>(ready_.size());
  return s;
}

int Loader::QueueDepth() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(ready_.size());
}

}  // namespace aviary::worker
