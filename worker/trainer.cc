#include "worker/trainer.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <cstdio>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <atomic>
#include <thread>
#include <unordered_set>

#include <ATen/Context.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/utils.h>
#include <torch/version.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "common/backbone_fit.h"
#include "common/catalog.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/model_shapes.h"
#include "common/plot.h"
#include "common/status.h"
#include "worker/augment.h"
#include "worker/checkpoint.h"
#include "worker/data/clip_loader.h"
#include "worker/ema.h"
#include "worker/comm/communicator.h"
#include "worker/comm/reducer.h"
#include "worker/cuda_graph_step.h"
#include "worker/device_copy.h"
#include "worker/frontend.h"
#include "worker/loader.h"
#include "worker/loss.h"
#include "worker/models.h"
#include "worker/optimizer.h"
#include "worker/schedule.h"
#include "worker/train_step.h"
#include "worker/weights.h"

namespace aviary::worker {
namespace {

const common::Logger& Log() {
  static const common::Logger logger("trainer");
  return logger;
}

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// train.cuda_graph: forward + backward passes that warm up cuDNN and autograd before the capture.
constexpr int kGraphWarmup = 3;

std::string Num(double v) {
  if (std::isnan(v)) return "nan";
  return absl::StrFormat("%.6g", v);
}

// A 62-bit FNV-1a digest of the items' paths and targets, in order (the ranks compare them, and
// a resume compares them with its checkpoint's).
int64_t ItemsDigest(const std::vector<LoaderItem>& items) {
  uint64_t h = 14695981039346656037ULL;
  auto mix = [&h](const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  };
  for (const LoaderItem& item : items) {
    mix(item.path.data(), item.path.size() + 1);  // with its NUL: "ab","c" differs from "a","bc"
    const int32_t target = item.target;
    mix(&target, sizeof(target));
  }
  return static_cast<int64_t>(h >> 2);
}

std::string HistoryCsv(const std::vector<EpochRecord>& rows) {
  std::ostringstream out;
  common::WriteCsvRow(out, HistoryColumns());
  for (const EpochRecord& r : rows) {
    common::WriteCsvRow(out, {std::to_string(r.epoch), std::to_string(r.step), Num(r.lr),
                              Num(r.train_loss), Num(r.train_acc), Num(r.val_loss), Num(r.val_auc),
                              Num(r.val_roc_auc), Num(r.val_cmap), Num(r.val_acc),
                              Num(r.samples_per_s)});
  }
  return out.str();
}

double ParseNum(const std::string& s) {
  if (s == "nan") return kNaN;
  return std::strtod(s.c_str(), nullptr);
}

absl::StatusOr<std::vector<EpochRecord>> ParseHistory(const std::string& csv,
                                                      const std::string& source) {
  AVIARY_ASSIGN_OR_RETURN(common::CsvTable table, common::CsvTable::Parse(csv, source));
  if (table.header() != HistoryColumns()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": unexpected history columns"));
  }
  std::vector<EpochRecord> rows;
  for (size_t i = 0; i < table.num_rows(); ++i) {
    const auto& f = table.row(i);
    EpochRecord r;
    // std::stoi would throw out of the trainer's start on a damaged history: an error naming it.
    if (!absl::SimpleAtoi(f[0], &r.epoch) || !absl::SimpleAtoi(f[1], &r.step)) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": history row ", i + 1, " has epoch '", f[0],
                                                     "' and step '", f[1], "', not whole numbers"));
    }
    r.lr = ParseNum(f[2]);
    r.train_loss = ParseNum(f[3]);
    r.train_acc = ParseNum(f[4]);
    r.val_loss = ParseNum(f[5]);
    r.val_auc = ParseNum(f[6]);
    r.val_roc_auc = ParseNum(f[7]);
    r.val_cmap = ParseNum(f[8]);
    r.val_acc = ParseNum(f[9]);
    r.samples_per_s = ParseNum(f[10]);
    rows.push_back(r);
  }
  return rows;
}

double MonitorValue(const std::string& monitor, const EpochRecord& r) {
  if (monitor == "roc_auc") return r.val_roc_auc;
  if (monitor == "cmap") return r.val_cmap;
  if (monitor == "acc") return r.val_acc;
  if (monitor == "loss") return r.val_loss;
  return r.val_auc;
}

// What each monitor is called in plots and logs.
std::string MonitorTitle(const std::string& monitor) {
  if (monitor == "roc_auc") return "val_roc_auc (BirdCLEF macro ROC-AUC)";
  if (monitor == "cmap") return "val_cmap (padded cmAP)";
  if (monitor == "acc") return "val_acc (accuracy)";
  if (monitor == "loss") return "val_loss";
  return "val_auc (micro PR-AUC)";
}

// The notebook's plot_history, from history.csv's columns only: the validation micro PR-AUC
// (val_auc) and BirdCLEF macro ROC-AUC (val_roc_auc), the best epoch of the monitored one
// marked, and the losses on a second axis (the minimum validation loss marked). Epochs are
// history.csv's (0-based).
absl::Status WriteHistoryPlot(const std::vector<EpochRecord>& rows, const std::string& monitor,
                              const std::string& title, const std::string& path) {
  auto series = [](const char* name, int color, bool loss) {
    common::Series s;
    s.name = name;
    s.rgb = common::PaletteColor(color);
    s.right_axis = loss;
    s.dashed = loss;
    return s;
  };
  common::Series val_auc = series("val_auc (micro PR-AUC)", 1, false);
  common::Series val_roc = series("val_roc_auc (BirdCLEF macro ROC-AUC)", 0, false);
  common::Series train_loss = series("train_loss", 2, true);
  common::Series val_loss = series("val_loss", 3, true);
  int best = -1, min_loss = -1;
  for (size_t i = 0; i < rows.size(); ++i) {
    const EpochRecord& r = rows[i];
    for (auto* s : {&val_auc, &val_roc, &train_loss, &val_loss}) s->x.push_back(r.epoch);
    val_auc.y.push_back(r.val_auc);
    val_roc.y.push_back(r.val_roc_auc);
    train_loss.y.push_back(r.train_loss);
    val_loss.y.push_back(r.val_loss);
    if (r.best) best = static_cast<int>(i);
    if (!std::isnan(r.val_loss) && (min_loss < 0 || r.val_loss < rows[min_loss].val_loss)) {
      min_loss = static_cast<int>(i);
    }
  }
  common::Series* marked = monitor == "roc_auc" ? &val_roc : monitor == "auc" ? &val_auc : nullptr;
  if (best >= 0 && marked != nullptr) {
    marked->marker_index = best;
    marked->marker_label = absl::StrFormat("best %.4f (epoch %d)", marked->y[best], rows[best].epoch);
  }
  if (min_loss >= 0) {
    val_loss.marker_index = min_loss;
    val_loss.marker_label = absl::StrFormat("min %.4f (epoch %d)", rows[min_loss].val_loss, rows[min_loss].epoch);
  }
  common::Panel panel;
  panel.title = absl::StrCat(title, "; monitor ", MonitorTitle(monitor),
                             best >= 0 ? absl::StrCat(", best epoch ", rows[best].epoch) : std::string());
  panel.x_label = "epoch (0-based, as history.csv)";
  panel.y_label = "AUC";
  panel.y2_label = "loss";
  panel.lines = {val_auc, val_roc, train_loss, val_loss};
  common::Figure figure;
  figure.width = 1100;
  figure.height = 520;
  figure.panels = {panel};
  // Not written through a symbolic link (WritePng is for a user's --plot): history.png is the run
  // folder's own file, as history.csv and the checkpoints are.
  absl::StatusOr<std::string> png = common::RenderPng(figure);
  if (!png.ok()) return common::Annotate(png.status(), absl::StrCat("history plot ", path));
  return common::Annotate(common::WriteFileAtomically(path, *png), absl::StrCat("history plot ", path));
}

// AVIARY_FAULT_INJECT="rank=R,step=K[,kind=throw|nan|hang|hang_stderr|sigterm|nan_from|nan_weights|
// nan_input|slow_write|fail_start|fail_resume][,seconds=S]" (tests only; trainer.h says what each
// does).
struct FaultPlan {
  int rank = -1;
  int64_t step = -1;
  std::string kind = "throw";
  double seconds = 0;  // kind=slow_write: how long
};

FaultPlan ReadFaultPlan() {
  FaultPlan plan;
  const char* env = std::getenv("AVIARY_FAULT_INJECT");
  if (env == nullptr) return plan;
  for (absl::string_view part : absl::StrSplit(env, ',')) {
    std::pair<std::string, std::string> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
    if (kv.first == "rank") plan.rank = std::atoi(kv.second.c_str());
    if (kv.first == "step") plan.step = std::atoll(kv.second.c_str());
    if (kv.first == "kind") plan.kind = kv.second;
    if (kv.first == "seconds") plan.seconds = std::atof(kv.second.c_str());
  }
  return plan;
}

// AVIARY_PROFILE="out=FILE[,skip=K][,steps=N]" (diagnostics: bench/gpu/acceptance.sh): rank 0
// records the torch profiler (CPU operators and, on a GPU, CUDA kernels, copies and runtime
// calls) over the run's optimizer steps K+1 .. K+N (default 10 and 8) and writes its chrome
// trace to FILE; bench/gpu/trace_summary.py says how busy the GPU was and where the host waited.
// A malformed value is refused before any work; a profiler that fails only logs why.
struct ProfilePlan {
  std::string out;  // empty: off
  int64_t skip = 10;
  int64_t steps = 8;
};

constexpr int64_t kMaxProfileSteps = 1000000000;

absl::StatusOr<ProfilePlan> ReadProfilePlan() {
  ProfilePlan plan;
  const char* env = std::getenv("AVIARY_PROFILE");
  if (env == nullptr || *env == '\0') return plan;
  for (absl::string_view part : absl::StrSplit(env, ',')) {
    std::pair<std::string, std::string> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
    int64_t n = -1;
    const bool number = absl::SimpleAtoi(kv.second, &n);
    if (kv.first == "out" && !kv.second.empty()) {
      plan.out = kv.second;
    } else if (kv.first == "skip" && number && n >= 0 && n <= kMaxProfileSteps) {
      plan.skip = n;
    } else if (kv.first == "steps" && number && n >= 1 && n <= kMaxProfileSteps) {
      plan.steps = n;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "AVIARY_PROFILE='", env, "': '", part, "' is not out=FILE, skip=K (0 <= K <= 1e9) or steps=N (1 <= N <= 1e9)"));
    }
  }
  if (plan.out.empty()) return absl::InvalidArgumentError(absl::StrCat("AVIARY_PROFILE='", env, "': needs out=FILE"));
  return plan;
}

// The profiler of a ProfilePlan, driven by the count of optimizer steps this run (this Trainer) took.
class StepProfiler {
 public:
  StepProfiler(ProfilePlan plan, bool cuda) : plan_(std::move(plan)), cuda_(cuda) {}
  ~StepProfiler() { Stop(); }
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  // After the run's `done`-th optimizer step (0: before the first).
  void AfterStep(int64_t done) {
    seen_ = done;
    if (!on_ && !over_ && done == plan_.skip) Start(done);
    if (on_ && done >= plan_.skip + plan_.steps) Stop();
  }
  // Writes what was recorded (also when the run ended first).
  void Stop() {
    if (!on_) return;
    on_ = false;
    over_ = true;
    namespace prof = torch::autograd::profiler;
    try {
      std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
      if (result != nullptr) result->save(plan_.out);
    } catch (const std::exception& e) {
      // The first line: libtorch's errors carry a backtrace after it.
      const std::string what = e.what();
      Log().Warn(absl::StrCat("AVIARY_PROFILE: the profiler failed: ", what.substr(0, what.find('\n'))));
      return;
    }
    std::error_code ec;
    if (std::filesystem::file_size(plan_.out, ec) > 0 && !ec) {
      Log().Info(absl::StrCat("AVIARY_PROFILE: optimizer steps ", first_, " to ", seen_, " of this run profiled in ",
                              plan_.out));
    } else {
      Log().Warn(absl::StrCat("AVIARY_PROFILE: torch wrote no trace to ", plan_.out, " (a torch built without kineto?)"));
    }
  }

 private:
  void Start(int64_t done) {
    namespace impl = torch::profiler::impl;
    std::error_code ec;
    std::filesystem::remove(plan_.out, ec);  // an earlier run's trace must not pass for this one's
    try {
      const impl::ProfilerConfig config(impl::ProfilerState::KINETO);
      std::set<impl::ActivityType> activities{impl::ActivityType::CPU};
      if (cuda_) activities.insert(impl::ActivityType::CUDA);
      torch::autograd::profiler::prepareProfiler(config, activities);
      torch::autograd::profiler::enableProfiler(config, activities);
    } catch (const std::exception& e) {
      over_ = true;
      Log().Warn(absl::StrCat("AVIARY_PROFILE: the profiler did not start: ", e.what()));
      return;
    }
    on_ = true;
    first_ = done + 1;
  }

  ProfilePlan plan_;
  bool cuda_;
  bool on_ = false;
  bool over_ = false;  // profiled (or failed): once per run
  int64_t first_ = 0;  // the first profiled step
  int64_t seen_ = 0;   // the last step seen
};

// Clip reads that failed for a cause that may pass and were made again (Loader): `count` of them.
void ReportReadRetries(int64_t count, const LoaderStats& stats, const std::string& where) {
  if (count <= 0) return;
  Log().Warn(absl::StrCat(count, " clip read(s) failed and were made again, ", where,
                          "; the run's first: ", stats.read_retry_example));
}

// The training clips broken (and substituted) or read again in epoch `epoch`: `after` less
// `before`, the train loader's totals at the end of the epoch and of the previous one.
void ReportNewBrokenClips(const LoaderStats& before, const LoaderStats& after, int epoch) {
  for (const auto& [problem, count] : after.problems) {
    auto was = before.problems.find(problem);
    const int64_t added = count - (was != before.problems.end() ? was->second : 0);
    if (added <= 0) continue;
    auto example = after.examples.find(problem);
    Log().Warn(absl::StrCat("epoch ", epoch, ": ", added, " training clip(s) skipped as ", problem, " (substituted)",
                            example != after.examples.end() ? absl::StrCat("; the run's first: ", example->second)
                                                            : ""));
  }
  ReportReadRetries(after.read_retries - before.read_retries, after, absl::StrCat("in epoch ", epoch));
}

// Epoch `epoch`'s validation left out other clips than the run's first (`first`; `before` and
// `after`: the validation loader's totals before and after it).
void ReportValidationChanges(const LoaderStats& first, const LoaderStats& before, const LoaderStats& after,
                             int epoch) {
  auto count = [](const LoaderStats& s, const std::string& problem) {
    auto it = s.problems.find(problem);
    return it != s.problems.end() ? it->second : int64_t{0};
  };
  std::set<std::string> problems;
  for (const LoaderStats* s : {&first, &after}) {
    for (const auto& [problem, n] : s->problems) problems.insert(problem);
  }
  for (const std::string& problem : problems) {
    const int64_t now = count(after, problem) - count(before, problem);
    if (now == count(first, problem)) continue;
    Log().Warn(absl::StrCat("epoch ", epoch, ": validation left out ", now, " clip(s) as ", problem,
                            ", the first validation ", count(first, problem),
                            ": its metrics are over other clips (a read that failed even when made again)"));
  }
  ReportReadRetries(after.read_retries - before.read_retries, after, absl::StrCat("in epoch ", epoch, "'s validation"));
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

std::string Eta(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  int s = static_cast<int>(seconds);
  return absl::StrFormat("%d:%02d:%02d", s / 3600, (s / 60) % 60, s % 60);
}

}  // namespace

const std::vector<std::string>& HistoryColumns() {
  static const std::vector<std::string> kColumns{
      "epoch",   "step",    "lr",          "train_loss", "train_acc",    "val_loss",
      "val_auc", "val_roc_auc", "val_cmap", "val_acc",   "samples_per_s"};
  return kColumns;
}

struct Trainer::State {
  common::PipelineConfig config;
  common::TrainConfig train;  // the stage's effective train settings
  TrainOptions options;
  common::StageTable table;
  std::vector<LoaderItem> train_items, valid_items;
  std::unique_ptr<AudioCache> cache;
  int64_t reported_cache_read_failures = 0;  // AudioCache::read_failures() said in the log so far
  // Of the data_files distinct training and validation files, those rank 0 reads from the cache
  // (CountCachedFiles; recorded in the checkpoints rank 0 writes and compared on resume; the
  // other ranks leave it 0 and stat nothing).
  int64_t cached_files = 0, data_files = 0;
  // The items as listed, before debug mode's cut (CheckpointMeta::train_items ...).
  int64_t listed_train = 0, listed_valid = 0, train_digest = 0, valid_digest = 0;
  std::unique_ptr<Loader> train_loader, valid_loader;
  std::unique_ptr<MelFrontend> frontend;
  std::shared_ptr<ClassifierImpl> model;
  std::unique_ptr<AdamOptimizer> optimizer;
  comm::Communicator* comm = nullptr;  // null: one process
  std::unique_ptr<comm::Reducer> reducer;
  std::unique_ptr<TrainStep> step_fn;
  // train.cuda_graph: the model step's graph, captured at the first batch of batch_size.
  std::unique_ptr<GraphedModelStep> graph;
  // The training batches' waveforms to the device, one batch ahead (worker/device_copy.h).
  std::unique_ptr<DeviceCopier> copier;
  // Batches TrainEpoch took from the loader ahead of the one training (counted as queued).
  int held_batches = 0;
  LoaderStats trained_loader_stats;  // the train loader's, at the end of the last epoch trained
  int rank = 0;
  int world = 1;
  FaultPlan fault;
  std::unique_ptr<StepProfiler> profiler;  // AVIARY_PROFILE, rank 0
  int64_t run_steps = 0;                   // optimizer steps this run took (from its start or resume)
  int epochs = 0;
  int global_batch = 0;
  bool autocast = false;
  int start_epoch = 0;
  bool restored = false;  // Resume went on from a checkpoint of the run folder
  int64_t step = 0;
  double best_value = kNaN;
  int best_epoch = -1;
  int64_t skipped_steps = 0;
  std::vector<EpochRecord> history;
  int accum = 1;                  // train.grad_accum_steps: loader batches per optimizer step
  std::unique_ptr<WeightEma> ema;  // train.ema_decay > 0
  // Early stopping (train.early_stop_patience): the value and epoch the patience counts from.
  double early_stop_value = kNaN;
  int early_stop_epoch = -1;
  bool stopped_early = false;
  // A mid-epoch last.pt (CheckpointMeta::in_epoch): where start_epoch resumes and its totals.
  struct MidEpoch {
    int64_t batches_done = 0;
    double loss_sum = 0;
    int64_t seen = 0, correct = 0;
  };
  MidEpoch mid;

  std::string Path(const std::string& name) const { return options.out_dir + "/" + name; }
  void SetLr(double lr) { optimizer->set_lr(lr); }
  bool Better(double v) const {
    if (std::isnan(v)) return false;
    if (std::isnan(best_value)) return true;
    return train.monitor == "loss" ? v < best_value : v > best_value;
  }
  CheckpointMeta Meta(int epoch) const {
    CheckpointMeta m;
    m.stage = options.stage;
    m.fold = options.fold;
    m.epoch = epoch;
    m.step = step;
    m.monitor = train.monitor;
    m.best_value = best_value;
    m.best_epoch = best_epoch;
    m.model_name = model->name();
    m.num_classes = model->num_classes();
    m.in_channels = model->in_channels();
    m.class_names = table.class_names;
    m.config_yaml = common::PipelineConfigToYaml(config);
    m.history_csv = HistoryCsv(history);
    m.skipped_steps = skipped_steps;
    m.skipped_in_a_row = skipped_in_a_row;
    m.task_id = options.task_id;
    m.attempt = options.attempt;
    m.world_size = world;
    m.device_type = options.device.is_cuda() ? "cuda" : "cpu";
    m.autocast = autocast ? 1 : 0;
    m.cached_files = cached_files;
    m.data_files = data_files;
    m.train_items = listed_train;
    m.valid_items = listed_valid;
    m.train_items_digest = train_digest;
    m.valid_items_digest = valid_digest;
    m.early_stop_value = early_stop_value;
    m.early_stop_epoch = early_stop_epoch;
    m.stopped_early = stopped_early;
    return m;
  }
  // Whether `v` improves on early_stop_value by more than train.early_stop_min_delta.
  bool ImprovedForEarlyStop(double v) const {
    if (std::isnan(v)) return false;
    if (std::isnan(early_stop_value)) return true;
    const double delta = train.early_stop_min_delta;
    return train.monitor == "loss" ? v < early_stop_value - delta : v > early_stop_value + delta;
  }
  // The groups last.pt carries beside the model and optimizer (the EMA's state).
  CheckpointGroups LastGroups() const {
    CheckpointGroups groups;
    if (ema) groups.emplace_back("ema_state", ema->ExportState());
    return groups;
  }
  // One epoch's running totals (TrainEpoch's steps), this rank's until FinishEpoch.
  struct EpochTally {
    int epoch = 0;
    int64_t steps = 0;  // batches per epoch
    double lr = 0;      // the epoch's learning rate (EpochRecord::lr)
    double loss_sum = 0.0;
    int64_t seen = 0;
    int64_t correct = 0;
    // Correct predictions of steps since, summed on the device without waiting for it (a host
    // read each step would stall the GPU between steps); CorrectSoFar() reads it.
    at::Tensor correct_pending;
    int64_t seen_before = 0;  // of `seen`, the samples trained before a mid-epoch resume (rates)
    std::chrono::steady_clock::time_point start, last_log, step_start;
    double allreduce_before = 0.0;  // reducer time at the start of the step (it sums per epoch)
    int64_t first_batch = 0;        // > 0: resumed mid-epoch at this loader batch
    int64_t step_samples = 0;       // this rank's samples in the optimizer step so far
    double data_wait = 0.0;         // seconds the training thread waited for the loader's batches
  };

  absl::StatusOr<EpochRecord> TrainEpoch(int epoch);
  // This rank's correct predictions in the epoch so far (waits for the device).
  static int64_t CorrectSoFar(const EpochTally& t) {
    return t.correct + (t.correct_pending.defined() ? t.correct_pending.item<int64_t>() : 0);
  }
  // TrainEpoch's steps, in order.
  EpochTally StartEpoch(int epoch);
  // The loader's next batch (false at the epoch's end), its waveforms' copy to the device
  // started; `wait`: the seconds the loader kept the host waiting.
  absl::StatusOr<bool> NextBatch(Batch* batch, DeviceCopier::InFlight* copy, double* wait);
  absl::Status TrainBatch(const Batch& batch, int64_t s, double data_wait, EpochTally* t);
  // train.cuda_graph: `batch`'s forward, loss and backward as a replay of the graph (captured
  // now if not yet); true then. A batch of another size takes the eager Forward (false: the
  // caller runs Backward).
  absl::StatusOr<bool> GraphForward(const Batch& batch, const StepSeeds& seeds, StepForward* fwd);
  absl::StatusOr<EpochRecord> FinishEpoch(const EpochTally& t);
  // A stop between optimizer steps, before loader batch `next` of the epoch: last.pt at this
  // step (rank 0; every rank learns the outcome), then CANCELLED.
  absl::Status StopMidEpoch(const EpochTally& t, int64_t next);
  // Rank 0 writes last.pt at batch `next` of epoch t.epoch (every rank's totals summed). Returns
  // a failure of the ranks' collectives (the group is broken); `*wrote` gets the write's outcome,
  // shared by every rank (ShareWriteOutcome).
  absl::Status WriteMidEpoch(const EpochTally& t, int64_t next, absl::Status* wrote);
  // TrainOptions::checkpoint_before_validation_s, for the epoch TrainEpoch just trained.
  absl::Status CheckpointBeforeValidation();
  // The epoch TrainEpoch trained last, this rank's totals (CheckpointBeforeValidation).
  EpochTally trained_tally;
  // Whether every parameter and buffer of the model is finite (waits for the device): a
  // checkpoint of non-finite weights is not written, and not resumed from.
  bool ModelIsFinite() const;
  bool slowed = false;  // AVIARY_FAULT_INJECT kind=slow_write done
  // TrainOptions::lock_run_folder: the locked file's descriptor (rank 0), closed with the trainer.
  int lock_fd = -1;
  ~State() {
    if (lock_fd >= 0) ::close(lock_fd);
  }
  absl::Status LockRunFolder();
  // Steps skipped in a row for a non-finite loss (train.skip_nonfinite): a run that skips every
  // step trains nothing, and ends after TrainOptions::max_skipped_in_a_row batches without an
  // optimizer step applied (CountSkipped: `batches` more, the last at `where`).
  int64_t skipped_in_a_row = 0;
  absl::Status CountSkipped(int batches, const std::string& where);
  // The epoch's monitor value into best / early stopping; true when the run stops early here.
  // `write_best`: the epoch improved on best.pt's value (the re-run of an adopted best epoch
  // that does not do better is marked best, and leaves best.pt as it is).
  bool TrackMonitor(EpochRecord* record, bool* write_best);
  bool said_unmeasured_monitor = false;  // TrackMonitor's warning, once a run
  // TrainBatch's parts.
  StepSeeds SeedsFor(int epoch, int64_t s) const;
  void InjectFault(at::Tensor* loss) const;
  const Batch& InjectInputFault(const Batch& batch);
  Batch faulty_batch;  // InjectInputFault's batch
  bool input_fault_done = false;
  // train.skip_nonfinite: the buffers as they were at optimizer step `saved_buffers_step`, put
  // back when a skipped batch left them non-finite.
  static constexpr int64_t kBufferSaveSteps = 64;
  void SaveBuffers();
  void RestoreBuffers();
  bool BuffersAreFinite() const;
  std::vector<at::Tensor> saved_buffers;
  int64_t saved_buffers_step = 0;
  absl::StatusOr<std::string> NonFiniteRanks(double loss_value);
  absl::StatusOr<bool> SkipNonFinite(const Batch& batch, double loss_value, int epoch, int64_t s);
  at::Tensor Tally(const StepForward& fwd, double loss_value, int64_t b, EpochTally* t) const;
  void ReportStep(const EpochTally& t, int64_t s, int64_t samples, bool skipped, double data_wait);
  // on_step for a step that ends the run with a non-finite loss (StepStats::nonfinite_stop).
  void ReportNonFiniteStop(const EpochTally& t, int64_t s, double loss_value);
  StepStats StepStatsFor(const EpochTally& t, int64_t s, int64_t samples, bool skipped, double data_wait);
  void LogProgress(int64_t s, EpochTally* t);
  double StepLr(int epoch, int64_t s, int64_t steps) const;  // train.lr_per_step's rate at step s
  double AllReduceSeconds() const;  // the reducer's time in this epoch so far
  absl::Status Validate(EpochRecord* record);
  absl::Status BroadcastState(bool parameters);
  // Rank 0: best.pt (when `best`), last.pt (the previous one kept as last.prev.pt), history.csv,
  // history.png (its failure is only logged). Stops at the first failure.
  absl::Status WriteEpochFiles(int epoch, bool best, const common::AtomicWriteOptions& write);
  // history.csv and history.png from `history` (rank 0).
  absl::Status WriteHistoryFiles(const common::AtomicWriteOptions& write);
  absl::Status WriteHistoryPlotFile(const common::AtomicWriteOptions& write);  // history.png alone
  // A run that ended (all epochs, or stopped early) resumes to nothing, and its history files
  // may lack its last epoch: they are written after last.pt, and a fault between them (a full
  // disk, a fence, a kill) left them behind. Rank 0 writes them again from last.pt's history
  // when history.csv differs from it (history.png alone when it is missing or older than
  // history.csv); every rank shares the outcome.
  absl::Status CatchUpHistoryFiles(const common::AtomicWriteOptions& write);
  // Every rank, after each round of rank 0's writes (`what`): rank 0's `wrote`, known to all
  // (one all-reduce of its code). Rank 0 returns `wrote`; the others, when it failed, the same
  // code with "rank 0 could not write ...".
  absl::Status ShareWriteOutcome(const absl::Status& wrote, const std::string& what);
  // The same, apart: returns a failure of the all-reduce itself, and sets `*shared` to the
  // outcome every rank learns.
  absl::Status ShareWriteOutcome(const absl::Status& wrote, const std::string& what, absl::Status* shared);
  // Every rank, after Create's steps that each rank takes alone (device, items, loaders, model,
  // the lock): `mine`, and every rank's outcome. When any rank failed, every rank returns the
  // first failing rank's status ("rank R: ..."), so that all end the task together with one code
  // and its cause (a rank that failed alone used to leave the others in the start's barrier).
  absl::Status ShareStartOutcome(const absl::Status& mine);
  // Trainer::Create's steps that each rank takes alone (their outcome is then shared).
  absl::Status StartAlone(const TrainOptions& options);
  // Trainer::Create's steps, in order.
  absl::Status ConfigureDevice();
  absl::Status LoadItems();
  absl::Status CreateLoaders();
  void CountCachedFiles(const ClipRequest& base);
  void CheckSameDataSource(const CheckpointMeta& meta, const std::string& last) const;
  // Warns (rank 0) when the checkpoint was written on another device type or precision.
  void CheckSameNumerics(const CheckpointMeta& meta, const std::string& last) const;
  absl::Status CheckSameItems(const CheckpointMeta& meta, const std::string& last) const;
  absl::Status BuildModel();
  // Rank 0 tidies the run folder, and the others wait for it (a collective).
  absl::Status TidyRunFolder();
  // Each rank alone after TidyRunFolder: reads and restores its checkpoint (the outcome is then
  // shared as the start's: a rank whose read failed used to end the whole group alone).
  absl::Status Resume();
  absl::Status LoadInitCheckpoint();
  // Resume's checks and restores of the chosen checkpoint, in order.
  absl::Status CheckConfigUnchanged(const CheckpointMeta& meta, const std::string& path) const;
  absl::Status RestoreRunState(const CheckpointMeta& meta, const std::string& path);
  absl::Status JoinGroup();
  int64_t ResumeBatch(const CheckpointMeta& meta, const std::string& last) const;
  void AdoptNewerBest(const CheckpointMeta& last);
  absl::Status RemoveStaleTemporaries() const;
  // Renames each existing file of `names` in the run folder to the first free NAME<suffix>,
  // NAME<suffix>.2, ... (an earlier one's stays); `moved` lists "NAME to NEW" for the log.
  absl::Status MoveAside(std::initializer_list<const char*> names, const std::string& suffix,
                         std::vector<std::string>* moved) const;
};

// Rank 0's parameters (when asked) and buffers to every rank.
absl::Status Trainer::State::WriteEpochFiles(int epoch, bool best, const common::AtomicWriteOptions& write) {
  if (!ModelIsFinite()) {
    return absl::DataLossError(absl::StrCat("the weights after epoch ", epoch, " (step ", step, ") are not finite: ",
                                            "not written over ", Path("last.pt"), " (set train.grad_clip_norm or ",
                                            "train.skip_nonfinite to check each step's gradients)"));
  }
  if (best) {
    // train.ema_eval: best.pt holds the averaged weights, the ones that were validated.
    const bool swap = ema && train.ema_eval;
    if (swap) ema->Swap(*model);
    absl::Status saved = SaveCheckpoint(Path("best.pt"), *model, nullptr, Meta(epoch), write);
    if (swap) ema->Swap(*model);
    AVIARY_RETURN_IF_ERROR(saved);
  }
  common::AtomicWriteOptions last = write;
  last.keep_previous_as = Path("last.prev.pt");
  AVIARY_RETURN_IF_ERROR(
      SaveCheckpoint(Path("last.pt"), *model, optimizer.get(), Meta(epoch), last, LastGroups()));
  return WriteHistoryFiles(write);
}

absl::Status Trainer::State::WriteHistoryFiles(const common::AtomicWriteOptions& write) {
  AVIARY_RETURN_IF_ERROR(common::WriteFileAtomically(Path("history.csv"), HistoryCsv(history), write));
  return WriteHistoryPlotFile(write);
}

absl::Status Trainer::State::WriteHistoryPlotFile(const common::AtomicWriteOptions& write) {
  // history.png is drawn straight to its file: the fence is checked before, not at its rename.
  absl::Status plot = write.check ? write.check(Path("history.png")) : absl::OkStatus();
  if (!plot.ok()) return plot;
  plot = WriteHistoryPlot(history, train.monitor,
                          absl::StrCat(options.stage, " fold ", options.fold, " (", model->name(), ")"),
                          Path("history.png"));
  if (!plot.ok()) Log().Warn(absl::StrCat("history.png: ", plot.message()));
  return absl::OkStatus();
}

absl::Status Trainer::State::CatchUpHistoryFiles(const common::AtomicWriteOptions& write) {
  absl::Status wrote;
  if (rank == 0) {
    const std::string expected = HistoryCsv(history);
    absl::StatusOr<std::string> found = common::ReadFileToString(Path("history.csv"));
    struct stat csv_st {}, png_st {};
    if (!found.ok() || *found != expected) {
      Log().Warn(absl::StrCat(Path("history.csv"),
                              found.ok() ? " differs from the run's history in last.pt"
                                         : absl::StrCat(" cannot be read (", found.status().message(), ")"),
                              " (", history.size(), " epochs; a fault after last.pt was written?): written again"));
      wrote = WriteHistoryFiles(write);
    } else if (::stat(Path("history.png").c_str(), &png_st) != 0 ||
               (::stat(Path("history.csv").c_str(), &csv_st) == 0 && png_st.st_mtime < csv_st.st_mtime)) {
      // Drawn after history.csv: a fault between them left it missing or a version behind.
      Log().Warn(absl::StrCat(Path("history.png"), " is missing or older than history.csv: drawn again"));
      wrote = WriteHistoryPlotFile(write);
    }
  }
  return ShareWriteOutcome(wrote, "history.csv");
}

// The deadline of the collectives that wait for rank 0's files (ShareWriteOutcome, the start's
// barrier): writes and fsyncs of a large checkpoint on a loaded shared filesystem may take longer
// than comm.timeout_s, which is for hung ranks.
constexpr double kRankZeroFilesTimeoutS = 1800;

absl::Status Trainer::State::ShareWriteOutcome(const absl::Status& wrote, const std::string& what) {
  absl::Status shared;
  AVIARY_RETURN_IF_ERROR(ShareWriteOutcome(wrote, what, &shared));
  return shared;
}

absl::Status Trainer::State::ShareWriteOutcome(const absl::Status& wrote, const std::string& what,
                                               absl::Status* shared) {
  *shared = wrote;
  if (comm == nullptr) return absl::OkStatus();
  // The others wait for rank 0's writes; rank 0, which arrives last, waits as long as for any
  // collective (with the longer wait it noticed a rank lost before it after 30 minutes).
  comm::Communicator::LongerTimeout longer(rank != 0 ? comm : nullptr, kRankZeroFilesTimeoutS,
                                           "the wait for rank 0's file writes");
  // Said before the all-reduce: another rank's abort (it fails with "rank 0 could not write")
  // may end this process before its own error is printed.
  // A write the lease fence refused because the coordinator revoked the lease (a cancel; the task
  // given to another group: worker/agent/coordinator_link.cc) is the expected end of a cancel: a
  // warning, on every rank. An expired lease (a partition) or another failure is an error.
  if (rank == 0 && !wrote.ok()) {
    const std::string line = absl::StrCat("writing ", what, ": ", wrote.message());
    if (common::IsLeaseRevoked(wrote)) {
      Log().Warn(line);
    } else {
      Log().Error(line);
    }
  }
  AVIARY_ASSIGN_OR_RETURN(const comm::RootOutcome root, comm::ShareRootOutcome(*comm, wrote));
  if (rank != 0 && root.code != absl::StatusCode::kOk) {
    *shared = absl::Status(root.code, absl::StrCat("rank ", rank, ": rank 0 could not write ", what, " to ",
                                                   options.out_dir, " (its error ends the task",
                                                   root.lease_revoked ? ": the coordinator took the lease away" : "",
                                                   ")"));
    if (root.lease_revoked) *shared = common::MarkLeaseRevoked(*shared);
  }
  return absl::OkStatus();
}

absl::Status Trainer::State::ShareStartOutcome(const absl::Status& mine) {
  if (comm == nullptr || world == 1) return mine;
  // The others may still be reading a large manifest or a cold cache: a wait as long as the start's.
  comm::Communicator::LongerTimeout longer(comm, kRankZeroFilesTimeoutS, "the ranks' start");
  at::Tensor codes = at::zeros({world}, at::kLong);
  codes[rank] = static_cast<int64_t>(mine.code());
  AVIARY_RETURN_IF_ERROR(comm->AllReduce(codes, comm::ReduceOp::kSum));
  int first = -1;
  for (int r = 0; r < world && first < 0; ++r) {
    if (codes[r].item<int64_t>() != 0) first = r;
  }
  if (first < 0) return mine;
  if (!mine.ok() && rank != first) Log().Error(absl::StrCat("rank ", rank, ": ", mine.message()));
  // The first failing rank's message, to every rank: one byte per int64 (a type every backend
  // sends), its length first.
  std::string message = rank == first ? absl::StrCat("rank ", first, ": ", mine.message()) : std::string();
  if (message.size() > 4096) message.resize(4096);
  at::Tensor size = at::tensor({static_cast<int64_t>(message.size())}, at::kLong);
  AVIARY_RETURN_IF_ERROR(comm->Broadcast(size, first));
  const int64_t n = size[0].item<int64_t>();
  at::Tensor chars = at::zeros({std::max<int64_t>(n, 1)}, at::kLong);
  int64_t* c = chars.data_ptr<int64_t>();
  for (size_t i = 0; rank == first && i < message.size(); ++i) c[i] = static_cast<unsigned char>(message[i]);
  AVIARY_RETURN_IF_ERROR(comm->Broadcast(chars, first));
  c = chars.data_ptr<int64_t>();
  message.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) message[static_cast<size_t>(i)] = static_cast<char>(c[i]);
  return absl::Status(static_cast<absl::StatusCode>(codes[first].item<int64_t>()), message);
}

absl::Status Trainer::State::BroadcastState(bool parameters) {
  if (comm == nullptr || world == 1) return absl::OkStatus();
  return comm::BroadcastModuleState(*comm, *model, parameters);
}

Trainer::Trainer(std::unique_ptr<State> state) : state_(std::move(state)) {}
Trainer::~Trainer() = default;

const std::vector<EpochRecord>& Trainer::history() const { return state_->history; }
int64_t Trainer::skipped_steps() const { return state_->skipped_steps; }

void ConfigureCudaMode(bool deterministic) {
  ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
  auto& ctx = at::globalContext();
  ctx.setDeterministicCuDNN(deterministic);
  ctx.setBenchmarkCuDNN(!deterministic);  // fixed shapes: the fastest algorithm, chosen once
  ctx.setDeterministicAlgorithms(deterministic, /*warn_only=*/true);
}

bool Bf16Autocast(const std::string& precision, bool cuda, int compute_major) {
  if (!cuda || precision == "fp32") return false;
  if (precision == "bf16") return true;
  return compute_major < 0 || compute_major >= 8;  // auto: fp32 only on a GPU known to be older
}

// The device and precision checks; cuDNN's mode (train.deterministic).
absl::Status Trainer::State::ConfigureDevice() {
  if (train.tta != 1) {
    Log().Warn(absl::StrCat("train.tta = ", train.tta,
                            " applies to inference (aviary predict); validation runs one pass"));
  }
  if (options.device.is_cuda() && !at::hasCUDA()) {
    return absl::FailedPreconditionError("device cuda was asked for, but torch sees no CUDA device");
  }
  const int compute_major = options.device.is_cuda()
                                ? CudaComputeMajor(options.device.has_index() ? options.device.index() : -1)
                                : -1;
  autocast = Bf16Autocast(train.precision, options.device.is_cuda(), compute_major);
  if (options.device.is_cuda() && rank == 0 && compute_major >= 0 && compute_major < 8) {
    if (autocast) {
      Log().Warn(absl::StrCat("train.precision bf16 on a GPU of compute capability ", compute_major,
                              ".x (bf16 needs 8.0, Ampere, for its tensor cores): expect a slow step or a cuDNN "
                              "error; train.precision auto trains in fp32 there"));
    } else if (train.precision == "auto") {
      Log().Info(absl::StrCat("train.precision auto: fp32 on this GPU (compute capability ", compute_major,
                              ".x; bf16 autocast from 8.0, Ampere, on)"));
    }
  }
  if (options.device.is_cuda()) {
    ConfigureCudaMode(train.deterministic);
    // The rank's GPU current on this thread too: raw CUDA calls outside torch's guards (event
    // queries) would otherwise open a context on GPU 0 in every rank.
    if (options.device.has_index()) c10::impl::getDeviceGuardImpl(c10::kCUDA)->setDevice(options.device);
  }
  if (!options.device.is_cuda() && train.precision == "bf16") {
    return absl::InvalidArgumentError("train.precision: bf16 needs a CUDA device (use auto or fp32 on CPU)");
  }
  if (train.cuda_graph && !options.device.is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat("train.cuda_graph: CUDA graphs need a CUDA device, got device ",
                                                   options.device.str(), " (set it false on the CPU)"));
  }
  if (train.cuda_graph && !GraphedModelStep::Built()) {
    return absl::FailedPreconditionError(
        "train.cuda_graph: this aviary was built against a torch without CUDA (docs/DEPLOY.md); set it false");
  }
  return absl::OkStatus();
}

// This stage and fold's training and validation items (the task's manifest, or the dataset), and
// this rank's place in the group.
absl::Status Trainer::State::LoadItems() {
  if (options.manifest != nullptr) {
    const common::TaskManifest& m = *options.manifest;
    if (m.stage != options.stage || m.fold != options.fold) {
      return absl::InvalidArgumentError(absl::StrCat("the task manifest is for stage ", m.stage, " fold ", m.fold,
                                                     ", not stage ", options.stage, " fold ", options.fold));
    }
    table.stage = m.stage;
    table.class_names = m.class_names;
    for (const auto& item : m.train) train_items.push_back({item.path, item.target});
    for (const auto& item : m.valid) valid_items.push_back({item.path, item.target});
  } else {
    AVIARY_ASSIGN_OR_RETURN(table, common::BuildStageTable(config, options.stage));
    AVIARY_ASSIGN_OR_RETURN(common::TrainList list,
                            common::BuildTrainList(config, table, options.fold));
    for (size_t r : list.train) {
      train_items.push_back({table.samples[r].filepath, table.samples[r].target});
    }
    for (size_t r : list.valid) {
      valid_items.push_back({table.samples[r].filepath, table.samples[r].target});
    }
  }
  listed_train = static_cast<int64_t>(train_items.size());
  listed_valid = static_cast<int64_t>(valid_items.size());
  train_digest = ItemsDigest(train_items);
  valid_digest = ItemsDigest(valid_items);
  if (train.cuda_graph && world > 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "train.cuda_graph: CUDA graphs run in one-rank groups (the gradient all-reduce runs inside "
        "backward), this group has ", world, " ranks; set it false or run one rank"));
  }
  fault = ReadFaultPlan();
  AVIARY_ASSIGN_OR_RETURN(ProfilePlan profile_plan, ReadProfilePlan());
  if (!profile_plan.out.empty() && rank == 0) {
    profiler = std::make_unique<StepProfiler>(std::move(profile_plan), options.device.is_cuda());
  }
  epochs = config.debug ? 2 : train.epochs;
  if (config.debug) {
    // The notebook's debug mode: 2 epochs of 2 batches, validation cut to the same size.
    size_t keep = static_cast<size_t>(train.batch_size) * world * 2;
    if (valid_items.size() > keep) valid_items.resize(keep);
  }
  accum = train.grad_accum_steps;
  global_batch = train.batch_size * world * accum;
  return absl::OkStatus();
}

// The decoded-audio cache and the training and validation loaders.
absl::Status Trainer::State::CreateLoaders() {
  AVIARY_ASSIGN_OR_RETURN(cache, OpenConfiguredCache(config.data));
  const AudioCache* audio_cache = cache.get();
  ClipRequest base;
  base.sample_rate = config.data.sample_rate;
  base.duration_s = config.data.duration;
  base.channels = config.data.channels == "mean" ? ChannelMode::kMean : ChannelMode::kFirst;
  base.max_seconds = config.data.cache_max_seconds;
  if (audio_cache != nullptr) {
    const std::string mismatch = CacheMismatch(*audio_cache, base);
    if (!mismatch.empty()) {
      Log().Warn(absl::StrCat("not using the decoded-audio cache: ", mismatch,
                              "; every clip is decoded on the fly (run `aviary prepare` with this config)"));
    }
  }
  CountCachedFiles(base);
  ClipFn clip = [audio_cache, base](const LoaderItem& item, bool train, uint64_t seed, absl::Span<float> samples) {
    ClipRequest request = base;
    request.mode = train ? ClipMode::kTrain : ClipMode::kValidation;
    request.seed = seed;
    ClipData out;
    auto r = LoadClipInto(audio_cache, item.path, request, samples);
    if (!r.ok()) {
      out.problem = "error";
      out.message = std::string(r.status().message());
    } else if (!r->ok()) {
      out.problem = AudioProblemName(r->problem);
      out.message = r->message;
      out.unreadable = r->unreadable;
      out.retry = r->retry;
    }
    return out;
  };
  LoaderOptions lo;
  lo.batch_size = train.batch_size;
  lo.num_threads = train.num_workers;
  lo.seed = config.seed;
  lo.clip_samples = ClipSamples(base);
  lo.num_classes = static_cast<int>(table.class_names.size());
  lo.pin_memory = options.device.is_cuda();
  lo.drop_remainder = train.drop_remainder;
  lo.max_batches = config.debug ? 2 : -1;
  lo.rank = rank;
  lo.world_size = world;
  lo.train = true;
  auto created = Loader::Create(train_items, clip, lo);
  if (!created.ok()) {
    return common::Annotate(created.status(),
                            absl::StrCat("stage ", options.stage, " fold ", options.fold, " training"));
  }
  train_loader = std::move(*created);
  // The last, padded training batch of an epoch with drop_remainder false may hold one image per
  // rank; a model that shrinks the mel image to 1 x 1 cannot train on it (BatchNorm needs two
  // values per channel; batch_size 1 itself is refused with the config).
  const int64_t global = int64_t{lo.batch_size} * world;
  const int64_t rest = static_cast<int64_t>(train_items.size()) % global;
  const int64_t full = static_cast<int64_t>(train_items.size()) / global;
  const bool last_trained = lo.max_batches < 0 || full < lo.max_batches;
  if (!lo.drop_remainder && rest > 0 && last_trained) {
    const int64_t last_batch = (rest + world - 1) / world;
    AVIARY_ASSIGN_OR_RETURN(const int64_t plane,
                            common::SmallestNormPlane(config.model.name, config.frontend.n_mels,
                                                      common::MelFrames(lo.clip_samples, config.frontend)));
    if (last_batch * plane < 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stage ", options.stage, " fold ", options.fold, ": the last training batch of each epoch holds ",
          last_batch, " image per rank (", train_items.size(), " items, batch_size ", lo.batch_size, " x ", world,
          " ranks) and model.name ", config.model.name, " shrinks the ", config.frontend.n_mels,
          "-mel image to 1 x 1, where BatchNorm cannot train; set train.drop_remainder to true"));
    }
  }
  if (!valid_items.empty()) {
    LoaderOptions vo = lo;
    vo.train = false;
    vo.batch_size = train.batch_size * train.infer_bs;
    vo.max_batches = -1;
    AVIARY_ASSIGN_OR_RETURN(valid_loader, Loader::Create(valid_items, clip, vo));
  } else {
    Log().Warn(absl::StrCat("stage ", options.stage, " fold ", options.fold,
                            ": no validation rows; validation metrics will be nan"));
  }
  return absl::OkStatus();
}

// How many of the stage's files the clip loader reads from the cache (LoadClip's choice: a cache
// made for these clips, holding the file's current version); said in the log when the cache is
// configured. A file's version is checked once per run, so a file changed later keeps the answer.
void Trainer::State::CountCachedFiles(const ClipRequest& base) {
  std::unordered_set<std::string> paths;
  for (const auto* items : {&train_items, &valid_items}) {
    for (const LoaderItem& item : *items) paths.insert(item.path);
  }
  data_files = static_cast<int64_t>(paths.size());
  cached_files = 0;
  // One stat per file (LookupCurrent), which only the rank that writes the checkpoints spends:
  // 32 at a time, since on a network filesystem a stat is a round trip and BirdCLEF's pool is
  // 150,000 files or more (minutes one by one).
  if (rank != 0 || cache == nullptr || !CacheMismatch(*cache, base).empty()) return;
  const std::vector<std::string> files(paths.begin(), paths.end());
  std::atomic<size_t> next{0};
  std::atomic<int64_t> current{0}, known{0};  // known: in the cache under this path, current or not
  std::atomic<bool> aborted{false};
  auto count = [&] {
    try {
      for (size_t i = next.fetch_add(1); i < files.size(); i = next.fetch_add(1)) {
        if (cache->Lookup(files[i]) == nullptr) continue;
        known.fetch_add(1);
        if (cache->LookupCurrent(files[i]) != nullptr) current.fetch_add(1);
      }
    } catch (...) {  // (an allocation) no count rather than a wrong one
      aborted = true;
      next = files.size();
    }
  };
  // The calling thread counts too; a thread that cannot be started leaves it to the others.
  std::vector<std::thread> counters;
  const size_t threads = std::min<size_t>(32, files.size() / 256 + 1);
  try {
    for (size_t t = 1; t < threads; ++t) counters.emplace_back(count);
  } catch (const std::exception&) {
  }
  count();
  for (std::thread& t : counters) t.join();
  if (aborted) {
    // Unknown: not compared at a resume (CheckSameDataSource) nor reported as a cache miss.
    cached_files = -1;
    Log().Warn(absl::StrCat("could not count the files read from the decoded-audio cache ", cache->dir()));
    return;
  }
  cached_files = current.load();
  const std::string line = absl::StrCat("reading ", cached_files, " of the ", data_files,
                                        " files from the decoded-audio cache ", cache->dir());
  if (cached_files == data_files) {
    Log().Info(line);
  } else if (known.load() == 0 && cache->size() > 0) {
    // Decoding every file on the fly is several times slower than the cache: said loudly. The
    // cache is keyed by the absolute path `prepare` was given.
    Log().Warn(absl::StrCat(line, ": none of them is in it, though it holds ", cache->size(),
                            " files; they are all decoded on the fly. Was it prepared for another stage (`aviary "
                            "prepare --stage`), or under another path to the data (a symbolic link, another mount "
                            "point)? Prepare with this stage and the data roots this config names"));
  } else if (cached_files * 2 < data_files) {
    Log().Warn(absl::StrCat(line, "; the other ", data_files - cached_files, " are decoded on the fly (",
                            known.load() - cached_files, " changed since `aviary prepare`, ", data_files - known.load(),
                            " never prepared or too long to cache: run `aviary prepare` again)"));
  } else {
    Log().Info(absl::StrCat(line, "; the others are decoded on the fly (`aviary prepare` caches them)"));
  }
}

// The items listed now against the checkpoint's: another list is refused (the folds moved). Each
// rank compares its own (JoinGroup compares the ranks'); under mpirun the message names the rank.
absl::Status Trainer::State::CheckSameItems(const CheckpointMeta& meta, const std::string& last) const {
  if (meta.train_items < 0) return absl::OkStatus();  // written before items were recorded
  if (meta.train_items == listed_train && meta.valid_items == listed_valid &&
      meta.train_items_digest == train_digest && meta.valid_items_digest == valid_digest) {
    return absl::OkStatus();
  }
  const bool same_counts = meta.train_items == listed_train && meta.valid_items == listed_valid;
  return absl::FailedPreconditionError(absl::StrCat(
      world > 1 ? absl::StrCat("rank ", rank, ": ") : std::string(), "resume: ", last, " was trained on ", meta.train_items, " training and ", meta.valid_items,
      " validation items; this run lists ", listed_train, " and ", listed_valid,
      same_counts ? " (the same counts, other files or labels)" : "",
      ": the dataset changed since (a file added, removed or unreadable when the items were listed, or the "
      "metadata edited), which moves clips between the folds and changes every epoch's order. Restore the dataset "
      "as it was, or start over (--no-resume, which moves the checkpoints aside, or another --out)"));
}

void Trainer::State::CheckSameNumerics(const CheckpointMeta& meta, const std::string& last) const {
  if (rank != 0) return;
  // A retried task leased by a group of another kind (a CPU group, a GPU without bf16) went on
  // in other arithmetic without a word.
  const std::string change = NumericsChange(meta, options.device.is_cuda() ? "cuda" : "cpu", autocast);
  if (!change.empty()) Log().Warn(absl::StrCat("resume: ", last, " ", change));
}

// A run resumed with another share of its files in the cache is not bit-exact against an
// uninterrupted one: a cached clip is the 16-bit copy of the float one decoded on the fly (they
// differ by up to 2^-16). Not refused: data.cache_dir is operational, and a `prepare` that
// finishes between two attempts of a task is normal; the log says so.
void Trainer::State::CheckSameDataSource(const CheckpointMeta& meta, const std::string& last) const {
  if (rank != 0 || meta.cached_files < 0) return;
  if (meta.cached_files == cached_files && meta.data_files == data_files) return;
  Log().Warn(absl::StrCat("resume: ", last, " was written by a run that read ", meta.cached_files, " of its ",
                          meta.data_files, " files from the decoded-audio cache; this one reads ", cached_files,
                          " of ", data_files, ": the clips of the files that moved between the cache (16-bit) and "
                          "decoding on the fly (float) differ slightly, so the run is not bit-exact against an "
                          "uninterrupted one"));
}

// The front end, the model (ImageNet backbone or --init weights), its placement and optimizer.
absl::Status Trainer::State::BuildModel() {
  // NHWC on every device: cuDNN's and oneDNN's convolutions are faster on channels-last
  // activations (EfficientNet-B0's CPU step: 1.3x, docs/BENCHMARKS.md).
  const bool channels_last = true;
  AVIARY_ASSIGN_OR_RETURN(
      frontend,
      MelFrontend::Create(config.frontend, config.augment, config.data.sample_rate, options.device,
                          channels_last ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous));
  at::manual_seed(config.seed);
  AVIARY_ASSIGN_OR_RETURN(model, BuildClassifier(config.model, config.frontend.in_channels,
                                                    static_cast<int>(table.class_names.size())));
  if (config.model.pretrain == "imagenet") {
    AVIARY_ASSIGN_OR_RETURN(NamedTensors weights, ReadStateDict(config.model.pretrained_weights));
    // The rule the coordinator applies at submit (common/backbone_fit.h): every backbone tensor,
    // no other backbone tensor, shapes equal but for the stem of another channel count.
    AVIARY_RETURN_IF_ERROR(common::CheckBackboneFit(
        common::CompareBackbone(IndexOf(weights), BackboneIndex(*model)), config.model.pretrained_weights,
        config.model.name, config.frontend.in_channels));
    LoadOptions lw;
    lw.only_prefix = "features.";
    lw.allow_unexpected = true;  // the ImageNet classifier
    lw.skip_mismatched = true;   // the stem for another channel count (the only one the rule lets by)
    auto report = LoadIntoModule(weights, *model, lw,
                                 absl::StrCat("model.pretrained_weights ", config.model.pretrained_weights));
    if (!report.ok()) return report.status();
    Log().Info(absl::StrCat("backbone from ", config.model.pretrained_weights, ": ", report->Summary()));
  }
  AVIARY_RETURN_IF_ERROR(PlaceModel(*model, options.device, channels_last));
  AVIARY_ASSIGN_OR_RETURN(optimizer, AdamOptimizer::FromConfig(train, *model));
  if (train.ema_decay > 0) ema = std::make_unique<WeightEma>(*model, train.ema_decay, train.ema_warmup_steps);
  return absl::OkStatus();
}

// --init (fine-tuning from the pretraining's best.pt), read only when Resume restored nothing: a
// run that resumes goes on from its own checkpoint whatever became of the init file since (a
// pretraining run again with --no-resume moved it aside). The weights are copied into the placed
// model in place (the optimizer holds its parameters; no step has run), and the EMA starts from
// them. A checkpoint of another model or input is refused (every backbone tensor of B0 fits B1 by
// name and shape: B1's extra blocks would stay random); the head is new unless the classes are the
// same in the same order (an equal count of other classes would fit it by shape).
absl::Status Trainer::State::LoadInitCheckpoint() {
  const std::string& path = options.init_checkpoint;
  AVIARY_ASSIGN_OR_RETURN(const CheckpointMeta meta, ReadCheckpointMeta(path));
  if (meta.model_name != model->name() || meta.in_channels != model->in_channels()) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": --init is a checkpoint of ", meta.model_name, " on ", meta.in_channels, "-channel input; this run builds ",
        model->name(), " on ", model->in_channels(), "-channel input (model.name, frontend.in_channels)"));
  }
  AVIARY_ASSIGN_OR_RETURN(NamedTensors weights, ReadCheckpointTensors(path));
  const bool same_classes = meta.class_names == table.class_names;
  if (!same_classes) {
    weights.erase(std::remove_if(weights.begin(), weights.end(),
                                 [](const auto& named) { return absl::StartsWith(named.first, "classifier."); }),
                  weights.end());
  }
  LoadOptions li;
  li.skip_mismatched = true;
  li.require_all = false;
  li.allow_unexpected = true;
  AVIARY_ASSIGN_OR_RETURN(const LoadReport report, LoadIntoModule(weights, *model, li, path));
  if (report.loaded.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(path, ": no tensor fits the model ", model->name(), ": ",
                                                      report.Summary()));
  }
  std::vector<std::string> not_loaded;  // besides the new head
  for (const std::string& name : report.missing) {
    if (!absl::StartsWith(name, "classifier.")) not_loaded.push_back(name);
  }
  for (const std::string& mismatch : report.mismatched) {
    if (!absl::StartsWith(mismatch, "classifier.")) not_loaded.push_back(mismatch);
  }
  if (!not_loaded.empty()) {
    Log().Warn(absl::StrCat("--init ", path, ": ", not_loaded.size(), " tensor(s) of the model besides the head "
                            "keep their fresh values: ", report.Summary()));
  }
  if (ema) *ema = WeightEma(*model, train.ema_decay, train.ema_warmup_steps);
  Log().Info(absl::StrCat("initialised from ", path, ": ", report.Summary(),
                          same_classes ? " (the same classes: the head too)"
                                       : absl::StrCat(" (a new head for ", table.class_names.size(), " classes; the "
                                                      "checkpoint's ", meta.class_names.size(), " left out)")));
  return absl::OkStatus();
}

// What a write killed between its temporary file and the rename left ("last.pt.tmp.<suffix>": a
// SIGKILL after the stop's grace time, an OOM kill), a checkpoint's size each: a run folder
// preempted often would fill up with them. Nothing writes the folder before this run does.
// The rotation renames the new file (checked by the lease fence) last.pt.ready.<suffix>, last.pt
// to last.prev.pt, then the ready file to last.pt: a kill between those renames leaves the newest
// checkpoint only as the ready file (removing it lost an epoch). The newest ready file that reads
// as a checkpoint newer than what the folder holds finishes the rotation: beside a last.pt of the
// same run (killed before the second rename) last.pt becomes last.prev.pt first; with no last.pt
// (killed before the third) it must be newer than last.prev.pt. Resume's own checks follow as for
// any last.pt. A ready file that cannot be read now (an I/O error, a permission) may be the
// newest epoch: kept, and the start refused with its error, as Resume refuses a last.pt it cannot
// read (not with --no-resume, which starts over). A ".tmp." file is never put in place: the
// fence may have refused it.
absl::Status Trainer::State::RemoveStaleTemporaries() const {
  // Fenced as the writes are: a group that lost its lease before the start (reaped while it
  // fetched the manifest, stopped past the heartbeat timeout) would remove the new holder's
  // staged checkpoints and rotate its last.pt.
  if (options.commit_check) AVIARY_RETURN_IF_ERROR(options.commit_check(options.out_dir));
  std::error_code ec;
  int removed = 0;
  std::vector<std::string> ready;
  // increment(ec): a read error in the middle ends the tidy-up, never the run's start.
  for (std::filesystem::directory_iterator it(options.out_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::filesystem::path& path = it->path();
    const std::string name = path.filename().string();
    for (const char* ours : {"last.pt", "last.prev.pt", "best.pt", "history.csv", "history.png", "config.yaml"}) {
      for (const char* kind : {".tmp.", ".ready."}) {
        const std::string prefix = absl::StrCat(ours, kind);
        if (!absl::StartsWith(name, prefix) ||
            !common::IsTemporarySuffix(absl::string_view(name).substr(prefix.size()))) {
          continue;
        }
        if (std::strcmp(ours, "last.pt") == 0 && std::strcmp(kind, ".ready.") == 0) {
          ready.push_back(path.string());
          continue;
        }
        std::error_code gone;
        if (std::filesystem::remove(path, gone)) ++removed;
      }
    }
  }
  std::sort(ready.begin(), ready.end());
  const std::string last = Path("last.pt");
  const bool have_last = ::access(last.c_str(), F_OK) == 0;
  std::vector<absl::StatusOr<CheckpointMeta>> metas;
  for (const std::string& path : ready) metas.push_back(ReadCheckpointMeta(path));
  for (size_t i = 0; i < ready.size() && options.resume; ++i) {
    const absl::StatusCode code = metas[i].status().code();
    if (BlocksResume(metas[i].status())) {
      return absl::Status(code, absl::StrCat(metas[i].status().message(),
                                             ": a checkpoint a stopped rotation left, which may hold the newest epoch, "
                                             "so the run does not go on from an older one; make it readable, or start "
                                             "over with --no-resume (the earlier run's files are moved aside)"));
    }
  }
  std::string adopt;
  std::optional<CheckpointMeta> replaced;  // a readable last.pt that a newer ready file of its run follows
  bool damaged_last = false;               // a last.pt that does not read as a checkpoint (torn, damaged)
  bool keep_ready = false;
  if (!ready.empty() && options.resume) {
    // The newest that reads (several: kills in more than one rotation; each run's pid differs).
    std::pair<int, int64_t> newest{-2, -1};
    const absl::StatusOr<CheckpointMeta> last_meta =
        have_last ? ReadCheckpointMeta(last) : absl::StatusOr<CheckpointMeta>(absl::NotFoundError(last));
    if (have_last && BlocksResume(last_meta.status())) {
      // last.pt cannot be read now: Resume refuses the start with its error, and the ready files
      // stay for the start that can read it (one may be newer).
      keep_ready = true;
    }
    damaged_last = have_last && !last_meta.ok() && !keep_ready;
    const absl::StatusOr<CheckpointMeta> floor = last_meta.ok() ? last_meta : ReadCheckpointMeta(Path("last.prev.pt"));
    if (floor.ok()) newest = {floor->epoch, floor->step};
    for (size_t i = 0; i < ready.size() && !keep_ready; ++i) {
      if (!metas[i].ok()) continue;
      const CheckpointMeta& m = *metas[i];
      // Of the run the folder holds (last.pt's, else last.prev.pt's): another task's is not adopted.
      if (floor.ok() && (m.stage != floor->stage || m.fold != floor->fold || m.task_id != floor->task_id)) continue;
      if (std::make_pair(m.epoch, m.step) > newest) {
        newest = {m.epoch, m.step};
        adopt = ready[i];
      }
    }
    if (!adopt.empty() && last_meta.ok()) replaced = *last_meta;
  }
  for (const std::string& path : ready) {
    if (path == adopt || keep_ready) continue;
    std::error_code gone;
    if (std::filesystem::remove(path, gone)) ++removed;
  }
  if (!adopt.empty()) {
    // last.pt out of the way first: to last.prev.pt when it reads (the rotation's second rename),
    // aside as Resume sets a damaged last.pt aside (last.pt.unreadable, or .unreadable.N when
    // taken) when it does not.
    std::string aside = replaced ? Path("last.prev.pt") : "";
    absl::Status moved = absl::OkStatus();
    if (replaced && ::rename(last.c_str(), aside.c_str()) != 0) {
      moved = absl::InternalError(absl::StrCat("cannot rename ", last, " to ", aside, ": ", std::strerror(errno)));
    } else if (damaged_last) {
      std::vector<std::string> names;
      moved = MoveAside({"last.pt"}, ".unreadable", &names);
      if (moved.ok() && !names.empty()) aside = names.front().substr(names.front().rfind(' ') + 1);  // "last.pt to X"
    }
    if (!moved.ok()) {
      Log().Warn(absl::StrCat(moved.message(), " (", adopt, ", newer, left as it is; resuming from what else the "
                              "folder holds)"));
    } else if (::rename(adopt.c_str(), last.c_str()) != 0) {
      const int error = errno;
      Log().Warn(absl::StrCat("cannot rename ", adopt, " to ", last, ": ", std::strerror(error),
                              " (left as it is; resuming from what else the folder holds)"));
    } else {
      // The rename durable before this run writes over last.prev.pt (a failure only costs that).
      common::SyncFolder(options.out_dir).IgnoreError();
      const std::string name = adopt.substr(adopt.rfind('/') + 1);
      Log().Warn(replaced ? absl::StrCat("found last.pt of epoch ", replaced->epoch, " beside a complete, newer ", name,
                                         " (a stop between the checkpoint rotation's renames): the rotation finished "
                                         "(last.pt to last.prev.pt, it to last.pt)")
                 : damaged_last ? absl::StrCat("found a last.pt that does not read as a checkpoint beside a complete ",
                                               name, " newer than last.prev.pt: last.pt set aside as ", aside,
                                               ", it renamed to last.pt")
                                : absl::StrCat("found no ", last, " but a complete ", name,
                                               " (a stop between the checkpoint rotation's renames): renamed to last.pt"));
    }
  }
  if (removed > 0) {
    Log().Info(absl::StrCat("removed ", removed, " temporary file(s) an interrupted write left in ", options.out_dir));
  }
  return absl::OkStatus();
}

absl::Status Trainer::State::LockRunFolder() {
  const std::string path = Path(".aviary-train.lock");
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    const int error = errno;
    return absl::FailedPreconditionError(absl::StrCat("--out: cannot open ", path, ": ", std::strerror(error)));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    if (error != EWOULDBLOCK) {
      // A filesystem without locks (some NFS setups): the run goes on unguarded, as before.
      ::close(fd);
      Log().Warn(absl::StrCat("cannot lock ", path, " (", std::strerror(error),
                              "): a second run in this folder would not be refused"));
      return absl::OkStatus();
    }
    char holder[256] = {0};
    const ssize_t n = ::pread(fd, holder, sizeof(holder) - 1, 0);
    ::close(fd);
    std::string who = n > 0 ? std::string(holder, static_cast<size_t>(n)) : std::string();
    while (!who.empty() && (who.back() == '\n' || who.back() == '\0')) who.pop_back();
    return absl::FailedPreconditionError(absl::StrCat(
        "--out ", options.out_dir, ": another aviary-worker train", who.empty() ? "" : absl::StrCat(" (", who, ")"),
        " is training in it (", path, " is locked): wait for it to end, or use another --out"));
  }
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  const std::string me = absl::StrCat("pid ", ::getpid(), " on ", host, "\n");
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, me.data(), me.size(), 0) != static_cast<ssize_t>(me.size())) {
    const int error = errno;
    Log().Warn(absl::StrCat(path, ": cannot record this run in it (", std::strerror(error), ")"));
  }
  lock_fd = fd;
  return absl::OkStatus();
}

// Restores the newest valid checkpoint of the run folder (last.pt, last.prev.pt) when asked.
absl::Status Trainer::State::TidyRunFolder() {
  const absl::Status tidied = rank == 0 ? RemoveStaleTemporaries() : absl::OkStatus();
  // The other ranks read the folder after rank 0 has tidied it (a last.pt it renamed back in
  // place must be seen by all, or they would resume from different epochs), and hear of its
  // refusal: the outcome is shared once rank 0 has one.
  return ShareStartOutcome(tidied);
}

absl::Status Trainer::State::Resume() {
  if (fault.kind == "fail_resume" && rank == fault.rank) {
    return absl::UnavailableError(absl::StrCat("AVIARY_FAULT_INJECT: rank ", rank,
                                               " cannot read its checkpoint (an I/O error on its host, say)"));
  }
  if (!options.resume) {
    // Starting over (--no-resume): the earlier run's checkpoints are moved aside, not left for a
    // later resume to pick (the highest epoch wins: an abandoned epoch 9 over this run's epoch 0)
    // or to adopt as best.pt. Rank 0 writes the run folder.
    // Its history, plot and config too: they would be replaced by this run's.
    if (rank != 0) return absl::OkStatus();
    std::vector<std::string> moved;
    AVIARY_RETURN_IF_ERROR(MoveAside({"last.pt", "last.prev.pt", "best.pt", "history.csv", "history.png", "config.yaml"},
                                     ".replaced", &moved));
    if (!moved.empty()) {
      Log().Info(absl::StrCat("starting over (--no-resume): the earlier run's files moved aside in ",
                              options.out_dir, ": ", absl::StrJoin(moved, ", ")));
    }
    return absl::OkStatus();
  }
  std::vector<ResumeCandidate> candidates;
  for (const char* name : {"last.pt", "last.prev.pt"}) {  // newest first
    const std::string path = Path(name);
    if (::access(path.c_str(), F_OK) != 0) {
      const int error = errno;
      if (error == ENOENT || error == ENOTDIR) continue;
      // Not "absent": an I/O error or a permission may hide the newest checkpoint.
      candidates.push_back({path, UnreadableCheckpoint(path, error, "cannot look it up")});
      continue;
    }
    candidates.push_back({path, ReadCheckpointMeta(path)});
  }
  if (candidates.empty()) {
    // Nothing to resume, but an earlier run's best.pt or history (its last.pt removed to save
    // space, say): this run's epoch 0 would replace them. Moved aside as --no-resume does.
    if (rank != 0) return absl::OkStatus();
    std::vector<std::string> moved;
    if (::access(Path("best.pt").c_str(), F_OK) == 0 || ::access(Path("history.csv").c_str(), F_OK) == 0) {
      AVIARY_RETURN_IF_ERROR(MoveAside({"best.pt", "history.csv", "history.png", "config.yaml"}, ".replaced", &moved));
      Log().Warn(absl::StrCat("no last.pt in ", options.out_dir, " to resume, but an earlier run's files: starting "
                              "over with them moved aside: ", absl::StrJoin(moved, ", ")));
    }
    return absl::OkStatus();
  }
  constexpr int kMaxReplacedReads = 8;
  int replaced = 0;
  while (true) {
    ResumeChoice choice = PickResumeCheckpoint(candidates, options.stage, options.fold, options.task_id);
    AVIARY_RETURN_IF_ERROR(choice.blocked);
    if (choice.index < 0) {
      // Nothing fits: as before, a foreign last.pt is an error, not a silent fresh start.
      std::string why;
      for (const std::string& reason : choice.skipped) absl::StrAppend(&why, why.empty() ? "" : "; ", reason);
      return absl::FailedPreconditionError(absl::StrCat("no checkpoint in ", options.out_dir, " to resume stage ",
                                                        options.stage, " fold ", options.fold, " from (", why,
                                                        "): use another --out"));
    }
    const std::string last = candidates[choice.index].path;
    const CheckpointMeta& found = *candidates[choice.index].meta;
    AVIARY_RETURN_IF_ERROR(CheckConfigUnchanged(found, last));
    absl::StatusOr<NamedTensors> ema_state = absl::NotFoundError("");
    absl::StatusOr<CheckpointMeta> meta =
        found.class_names == table.class_names
            ? RestoreCheckpoint(last, *model, optimizer.get(), "ema_state", ema ? &ema_state : nullptr)
            : absl::StatusOr<CheckpointMeta>(absl::FailedPreconditionError(
                  absl::StrCat(last, ": its label set differs from this stage's; use another --out")));
    if (meta.ok() && !SameCheckpointMeta(*meta, found)) {
      // Replaced between the choice's read and the restore's (a rotation by a writer that still
      // held the run folder): choose again with what the file holds now.
      if (++replaced > kMaxReplacedReads) {
        return absl::UnavailableError(absl::StrCat(last, " was replaced ", replaced,
                                                   " times while this rank read it: another writer in ",
                                                   options.out_dir, "?"));
      }
      Log().Warn(absl::StrCat("resume: ", last, " was replaced while it was read; choosing again"));
      candidates[choice.index].meta = *meta;
      continue;
    }
    if (meta.ok() && !ModelIsFinite()) {
      // Written before its weights were checked (an older aviary): resuming would end at the first step.
      meta = absl::DataLossError(absl::StrCat(last, ": its weights are not finite"));
    }
    if (meta.ok() && ema) {
      // The EMA's state is part of the checkpoint: a damaged one falls back like damaged weights
      // (it ended the run, with a good last.prev.pt beside it).
      if (ema_state.ok()) {
        if (absl::Status imported = ema->ImportState(*ema_state, last); !imported.ok()) meta = imported;
      } else if (absl::IsNotFound(ema_state.status())) {
        Log().Warn(absl::StrCat("resume: ", last, " holds no EMA state; the average starts from its weights"));
        *ema = WeightEma(*model, train.ema_decay, train.ema_warmup_steps);
      } else {
        meta = ema_state.status();
      }
    }
    if (!meta.ok()) {
      Log().Warn(absl::StrCat("resume: ", meta.status().message(), "; trying the next checkpoint"));
      candidates[choice.index].meta = meta.status();
      continue;
    }
    for (size_t i = 0; i < candidates.size(); ++i) {
      if (static_cast<int>(i) != choice.index && !choice.skipped[i].empty()) {
        Log().Info(absl::StrCat("resume: skipped ", choice.skipped[i]));
      }
    }
    if (rank == 0 && last != Path("last.pt") && ::access(Path("last.pt").c_str(), F_OK) == 0) {
      // Resumed from last.prev.pt: the next epoch's rotation would rename the unusable last.pt
      // over it, the only good copy (then a crash between the rotation's two renames left none).
      std::vector<std::string> moved;
      AVIARY_RETURN_IF_ERROR(MoveAside({"last.pt"}, ".unreadable", &moved));
      Log().Warn(absl::StrCat("resume: ", absl::StrJoin(moved, ", "), " (kept for a look; this run goes on from ",
                              last, ")"));
    }
    return RestoreRunState(*meta, last);
  }
}

absl::Status Trainer::State::MoveAside(std::initializer_list<const char*> names, const std::string& suffix,
                                       std::vector<std::string>* moved) const {
  for (const char* name : names) {
    const std::string path = Path(name);
    if (::access(path.c_str(), F_OK) != 0) continue;
    std::string aside = path + suffix;
    for (int n = 2; ::access(aside.c_str(), F_OK) == 0; ++n) aside = absl::StrCat(path, suffix, ".", n);
    if (::rename(path.c_str(), aside.c_str()) != 0) {
      const int error = errno;
      return absl::FailedPreconditionError(absl::StrCat("cannot move ", path, " aside to ", aside, ": ",
                                                        std::strerror(error), " (it would be resumed or replaced)"));
    }
    moved->push_back(absl::StrCat(name, " to ", aside.substr(aside.rfind('/') + 1)));
  }
  return absl::OkStatus();
}

bool ResumeMayChange(const std::string& key) {
  return key == "data.cache_dir" || absl::StartsWith(key, "comm.") || key == "train.num_workers" ||
         key == "train.cuda_graph";
}

// The run folder's config (the checkpoint's) against this run's: a difference is refused, naming
// the keys, unless it is only epochs and TrainOptions::extend_epochs allows that.
absl::Status Trainer::State::CheckConfigUnchanged(const CheckpointMeta& meta, const std::string& path) const {
  // Read back through the typed config, so that keys added since the checkpoint was written
  // compare at their defaults.
  absl::StatusOr<common::PipelineConfig> before = common::ParsePipelineConfig(meta.config_yaml, path + " config");
  if (!before.ok()) {
    // Not compared is not the same: resuming would go on with whatever config is given now.
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": its config cannot be compared with this run's (", before.status().message(),
        "): written by another version of aviary? Resume with that version, or start over (--no-resume, which "
        "moves the checkpoints aside, or another --out)"));
  }
  // What this stage trains with: its effective train.* settings under `train`, no stage
  // overrides (the other stage's settings do not matter to this run).
  auto effective = [this](common::PipelineConfig c) {
    auto it = c.stages.find(options.stage);
    if (it != c.stages.end()) c.train = it->second.train;
    for (auto& [name, stage] : c.stages) stage.train = c.train;
    return c;
  };
  std::vector<std::string> changed;
  bool only_epochs = true;
  for (const common::ConfigDifference& d : common::DiffPipelineConfigs(effective(*before), effective(config))) {
    if (ResumeMayChange(d.key)) continue;
    changed.push_back(absl::StrCat(d.key, ": ", d.before, " -> ", d.after));
    if (d.key != "train.epochs") only_epochs = false;
  }
  if (changed.empty()) return absl::OkStatus();
  if (only_epochs && options.extend_epochs) {
    const int next = meta.in_epoch >= 0 ? meta.in_epoch : meta.epoch + 1;
    if (train.epochs < next) {
      // Fewer epochs than the run holds: nothing would train, and the log said last.pt "holds
      // all N epochs" of the new count while it held more.
      return absl::FailedPreconditionError(absl::StrCat(
          options.out_dir, ": --extend-epochs with train.epochs ", train.epochs, ": ", path, " already holds ", next,
          " epochs (0-", next - 1, "); the epoch count may grow, or shrink to no fewer than ", next));
    }
    Log().Info(absl::StrCat("resume: --extend-epochs: ", absl::StrJoin(changed, "; ")));
    // The schedule is a function of train.epochs (the notebook's): over more epochs its decay
    // starts again from higher up. Said, with the rates, when the next epoch's is above the last.
    if (next > 0) {
      const double was = LearningRate(effective(*before).train, next - 1, global_batch);
      const double now = LearningRate(train, next, global_batch);
      if (now > was * 1.01) {
        Log().Warn(absl::StrFormat(
            "resume: --extend-epochs: train.scheduler %s is computed over %d epochs now: epoch %d trains at "
            "lr %.6g, above the %.6g of epoch %d (the last trained): the decay goes back up, and Adam's moments "
            "come from the lower rate",
            train.scheduler, train.epochs, next, now, was, next - 1));
      }
    }
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(absl::StrCat(
      options.out_dir, " was trained with another config (", path, "): ", changed.size(), " key(s) differ: ",
      absl::StrJoin(changed, "; "),
      only_epochs ? "; pass --extend-epochs to train on to the new epoch count, or --no-resume to start over"
                  : "; use the run's config.yaml, another --out, or --no-resume to start over"));
}

// The run's progress from the restored checkpoint: history, best, early stopping, the EMA, and
// the position and totals of a mid-epoch checkpoint.
absl::Status Trainer::State::RestoreRunState(const CheckpointMeta& meta, const std::string& last) {
  AVIARY_ASSIGN_OR_RETURN(history, ParseHistory(meta.history_csv, last));
  AVIARY_RETURN_IF_ERROR(CheckSameItems(meta, last));
  restored = true;
  CheckSameDataSource(meta, last);
  CheckSameNumerics(meta, last);
  for (EpochRecord& r : history) r.best = r.epoch == meta.best_epoch;
  start_epoch = meta.epoch + 1;
  step = meta.step;
  best_value = meta.best_value;
  best_epoch = meta.best_epoch;
  AdoptNewerBest(meta);
  skipped_steps = meta.skipped_steps;
  skipped_in_a_row = meta.skipped_in_a_row;
  early_stop_value = meta.early_stop_epoch >= 0 ? meta.early_stop_value : kNaN;
  early_stop_epoch = meta.early_stop_epoch;
  stopped_early = meta.stopped_early;
  if (meta.in_epoch < 0 && meta.world_size > 0 && meta.world_size != world && rank == 0 &&
      meta.epoch + 1 < epochs && !meta.stopped_early) {  // not for a run with nothing left to train
    // At an epoch's end no batch moves (ResumeBatch says the mid-epoch case), but the global
    // batch and its learning rate do.
    Log().Warn(absl::StrCat("resume: ", last, " was written on ", meta.world_size,
                            meta.world_size == 1 ? " rank" : " ranks", "; on ", world,
                            world == 1 ? " rank" : " ranks", " the global batch is now ", global_batch,
                            " (the learning rate follows it, Adam's moments come from the old one), and the run "
                            "is not bit-exact against an uninterrupted one"));
  }
  if (meta.in_epoch >= 0) {
    start_epoch = meta.in_epoch;
    mid.batches_done = ResumeBatch(meta, last);
    // The epoch's totals were summed over the ranks when it stopped: rank 0 carries them.
    if (rank == 0) {
      mid.loss_sum = meta.epoch_loss_sum;
      mid.seen = meta.epoch_seen;
      mid.correct = meta.epoch_correct;
      // On other ranks the resume may start a few per-rank batches back (ResumeBatch): those are
      // trained and counted again, so the totals keep only the share of the batches before the
      // resume point (their mean is kept; the rows' own losses were summed away).
      const int64_t saved_rows = meta.world_size > 0 ? meta.batches_done * meta.world_size : 0;
      const int64_t kept_rows = mid.batches_done * world;
      if (kept_rows < saved_rows && mid.seen > 0) {
        const double share = static_cast<double>(kept_rows) / static_cast<double>(saved_rows);
        const int64_t seen = static_cast<int64_t>(std::llround(static_cast<double>(mid.seen) * share));
        Log().Info(absl::StrCat("resume: epoch ", meta.in_epoch, "'s running totals scaled from ", mid.seen,
                                " to the ", seen, " samples before batch ", mid.batches_done,
                                " (the samples after it are trained and counted again)"));
        mid.loss_sum *= share;
        mid.correct = static_cast<int64_t>(std::llround(static_cast<double>(mid.correct) * share));
        mid.seen = seen;
      }
    }
  }
  Log().Info(absl::StrCat("resuming ", last, " after epoch ", meta.epoch, " (step ", meta.step,
                          meta.task_id.empty() ? "" : absl::StrCat(", written by task ", meta.task_id, " attempt ",
                                                                       meta.attempt),
                          ")",
                          meta.in_epoch >= 0 ? absl::StrCat(" mid-epoch: at batch ", meta.batches_done, " of epoch ",
                                                            meta.in_epoch)
                                             : std::string()));
  return absl::OkStatus();
}

// best.pt is written before last.pt at an epoch's end: a stop between the two renames (or a
// resume from last.prev.pt) leaves a best.pt of an epoch this run trains again. Its monitor
// value is adopted, so that the re-run replaces it only by doing better, and the best epoch
// reported stays the one whose weights best.pt holds.
void Trainer::State::AdoptNewerBest(const CheckpointMeta& last) {
  std::error_code no_stat;  // a stat that fails (EIO): the read below says why
  if (!std::filesystem::exists(Path("best.pt"), no_stat) && !no_stat) return;
  absl::StatusOr<CheckpointMeta> best = ReadCheckpointMeta(Path("best.pt"));
  if (!best.ok()) {
    Log().Warn(absl::StrCat("resume: ", best.status().message(), "; the next best epoch replaces it"));
    return;
  }
  if (best->stage != last.stage || best->fold != last.fold || best->monitor != last.monitor ||
      best->best_epoch <= last.epoch || std::isnan(best->best_value)) {
    return;
  }
  Log().Info(absl::StrCat("resume: ", Path("best.pt"), " holds epoch ", best->best_epoch, " (", best->monitor, " ",
                          best->best_value, "), newer than the resumed epoch ", last.epoch,
                          ": the re-run of that epoch replaces it only if it does better"));
  best_value = best->best_value;
  best_epoch = best->best_epoch;
}


// Where a mid-epoch checkpoint resumes in this run's loader plan. Loader batch s of an epoch is
// rows [s*B*W, (s+1)*B*W) of the epoch's order for any number of ranks W (Loader::Plan), so a run
// on other ranks than the one that stopped resumes at the batch that starts where it stopped.
// When none starts there, at the one before: up to W-1 per-rank batches of the epoch are trained
// again (never skipped). Either way the run is no longer bit-exact against an uninterrupted one
// (other augmentation draws, another global batch and learning rate), and the log says so.
int64_t Trainer::State::ResumeBatch(const CheckpointMeta& meta, const std::string& last) const {
  if (meta.world_size <= 0 || meta.world_size == world) return meta.batches_done;
  const int64_t rows = meta.batches_done * meta.world_size;  // in per-rank batches of batch_size
  const int64_t batch = rows / world;
  const int64_t again = rows - batch * world;
  if (rank == 0) {
    Log().Warn(absl::StrCat(
        "resume: ", last, " stopped at batch ", meta.batches_done, " of epoch ", meta.in_epoch, " on ", meta.world_size,
        meta.world_size == 1 ? " rank" : " ranks", "; on ", world, world == 1 ? " rank" : " ranks",
        " that is batch ", batch,
        again == 0 ? std::string(" (the same samples)")
                   : absl::StrCat(" (", again * train.batch_size, " samples of the epoch are trained again)"),
        "; the global batch is now ", global_batch, ", and the run is not bit-exact against an uninterrupted one"));
  }
  return batch;
}

// The run as each rank was told it (config, stage, fold, --init, --extend-epochs), less what may
// differ per host: the decoded-audio cache's folder and the loader threads; and the data roots,
// whose files the items' own check compares (it names them). Ranks started with
// configs that differ otherwise (a stale copy of --config on one node) would all-reduce
// different sizes (batch_size, comm.bucket_mb: a hang or garbage) or drift apart silently (lr,
// augmentation, seed).
static int64_t RunDigest(common::PipelineConfig config, const TrainOptions& options) {
  config.data.cache_dir.clear();
  config.data.target.root.clear();
  for (common::SourceConfig& source : config.data.pretrain_sources) source.root.clear();
  config.train.num_workers = 0;
  for (auto& [name, stage] : config.stages) stage.train.num_workers = 0;
  const std::string text = absl::StrCat(common::PipelineConfigToYaml(config), "\n", options.stage, "\n",
                                        options.fold, "\n", options.init_checkpoint, "\n",
                                        options.extend_epochs ? 1 : 0, options.resume ? 1 : 0);
  uint64_t h = 14695981039346656037ULL;
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ULL;
  return static_cast<int64_t>(h >> 2);
}

// Under mpirun: every rank at the same epoch, rank 0's state everywhere, the gradient reducer.
absl::Status Trainer::State::JoinGroup() {
  if (comm != nullptr) {  // also with one rank under mpirun: the all-reduce path runs
    // All ranks must resume from the same checkpoint (the run folder on a shared filesystem): the
    // same epoch, mid-epoch position and optimizer step (a rank that found no mid-epoch last.pt
    // would start the epoch over with fresh optimizer moments, beside ranks that did not).
    // And the same training and validation items (`aviary-worker train` builds them on every
    // rank from its own view of the dataset: a file one host lacks would shift the epoch's order).
    // The run first: ranks with other configs also differ in what follows, for that reason.
    // And one kind of device: a CPU rank among GPU ranks computes its update in float32 where
    // the others use bf16 autocast and a fused optimizer, so the replicas drift apart (each
    // rank's weights are its own after the start's broadcast).
    const int64_t mine[7] = {RunDigest(config, options), start_epoch, mid.batches_done, step,
                             ItemsDigest(train_items), ItemsDigest(valid_items),
                             (options.device.is_cuda() ? 1 : 0) + (autocast ? 2 : 0)};
    std::vector<int64_t> both;
    for (int64_t v : mine) both.insert(both.end(), {v, -v});
    at::Tensor range = at::tensor(both, at::kLong);
    {
      // After each rank read its checkpoint from the shared run folder (and rank 0 moved files
      // aside): slow storage, no hang.
      comm::Communicator::LongerTimeout longer(comm, kRankZeroFilesTimeoutS, "the wait for the ranks' checkpoint reads");
      AVIARY_RETURN_IF_ERROR(comm->AllReduce(range, comm::ReduceOp::kMax));
    }
    const char* what[3] = {"epochs", "batches", "optimizer steps"};
    for (int i = 0; i < 7; ++i) {
      const int64_t hi = range[2 * i].item<int64_t>(), lo = -range[2 * i + 1].item<int64_t>();
      if (hi == lo) continue;
      if (i == 6 && hi % 2 == lo % 2) {  // one kind of device, bf16 on some ranks only
        return absl::FailedPreconditionError(absl::StrCat(
            "rank ", rank, " trains ", autocast ? "in bf16 (autocast)" : "in fp32",
            ", and another rank of the group ", autocast ? "in fp32" : "in bf16",
            " (train.precision auto: bf16 on GPUs of compute capability 8.0 and later only): the replicas would "
            "compute different updates and drift apart; give the group GPUs of one generation, or set "
            "train.precision fp32 or bf16"));
      }
      if (i == 6) {
        return absl::FailedPreconditionError(absl::StrCat(
            "rank ", rank, " trains on ", options.device.is_cuda() ? "a GPU" : "the CPU",
            ", and another rank of the group on ", options.device.is_cuda() ? "the CPU" : "a GPU",
            ": the replicas would compute different updates and drift apart; give every node of the group a GPU, "
            "or start every rank with --device cpu"));
      }
      if (i == 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "rank ", rank, ": the ranks' runs differ (the config, --set, --stage, --fold, --init, --extend-epochs or "
            "--no-resume ",
            "each rank was started with; only the data roots, data.cache_dir and train.num_workers may differ): "
            "start every rank "
            "with the same command and the same config file contents"));
      }
      if (i >= 4) {
        return absl::FailedPreconditionError(absl::StrCat(
            "rank ", rank, ": the ranks' ", i == 4 ? "training" : "validation", " items differ (this rank has ",
            i == 4 ? train_items.size() : valid_items.size(),
            "): every rank must see the same dataset files at the same paths (a filesystem shared by all ranks)"));
      }
      // UNAVAILABLE (a group under `serve` retries the task): a shared filesystem may show a
      // file renamed a moment ago to one host only (NFS caches a name's absence for a while).
      return absl::UnavailableError(absl::StrCat(
          "rank ", rank, " resumes at epoch ", start_epoch, " batch ", mid.batches_done, " step ", step,
          " but the ranks range over ", what[i - 1], " ", lo, "..", hi, ": every rank must see the same ",
          Path("last.pt"), " (put --out on a filesystem shared by all ranks)"));
    }
    AVIARY_RETURN_IF_ERROR(BroadcastState(/*parameters=*/true));
    if (train.cuda_graph) {
      // One rank: its all-reduce is the identity, and the graph captures backward whole.
      if (rank == 0) Log().Info("train.cuda_graph on one rank: no gradient all-reduce");
      return absl::OkStatus();
    }
    comm::ReducerOptions ro;
    ro.bucket_bytes = static_cast<int64_t>(config.comm.bucket_mb * (1 << 20));
    ro.first_bucket_bytes = std::min<int64_t>(1 << 20, ro.bucket_bytes);
    std::vector<at::Tensor> params;
    for (const auto& p : model->parameters()) {
      if (p.requires_grad()) params.push_back(p);
    }
    AVIARY_ASSIGN_OR_RETURN(reducer, comm::Reducer::Create(params, comm, ro));
    Log().Info(absl::StrCat("rank ", rank, " of ", world, " (", comm->backend(), "): ",
                            reducer->buckets().size(), " gradient buckets of at most ",
                            config.comm.bucket_mb, " MB; global batch ", global_batch));
  }
  return absl::OkStatus();
}

absl::Status Trainer::State::StartAlone(const TrainOptions& options) {
  AVIARY_RETURN_IF_ERROR(ConfigureDevice());
  AVIARY_RETURN_IF_ERROR(LoadItems());
  AVIARY_RETURN_IF_ERROR(CreateLoaders());
  AVIARY_RETURN_IF_ERROR(BuildModel());
  if (options.lock_run_folder && rank == 0) AVIARY_RETURN_IF_ERROR(LockRunFolder());
  if (fault.kind == "fail_start" && rank == fault.rank) {
    return absl::NotFoundError(
        absl::StrCat("AVIARY_FAULT_INJECT: rank ", rank, " cannot start (a data root missing on its host, say)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const common::PipelineConfig& config,
                                                         const TrainOptions& options) {
  auto s = std::make_unique<State>();
  s->config = config;
  s->options = options;
  AVIARY_ASSIGN_OR_RETURN(const common::StageConfig* stage, common::GetStage(config, options.stage));
  s->train = stage->train;
  if (options.out_dir.empty()) return absl::InvalidArgumentError("--out: the run folder is empty");
  if (!options.init_checkpoint.empty()) {
    // Read after the resume (LoadInitCheckpoint), by when the start may have moved the folder's
    // checkpoints aside (--no-resume) and every rank would race that rename.
    std::error_code ec;
    const std::filesystem::path init_dir = std::filesystem::path(options.init_checkpoint).parent_path();
    if (std::filesystem::equivalent(init_dir.empty() ? "." : init_dir, options.out_dir, ec)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--init ", options.init_checkpoint, " lies in the run folder --out ", options.out_dir,
          ", whose checkpoints this run moves aside or writes over: copy it elsewhere first"));
    }
  }
  s->comm = options.comm;
  s->rank = s->comm ? s->comm->rank() : 0;
  s->world = s->comm ? s->comm->world_size() : 1;
  // Each rank alone (its host's files, device and memory may fail where the others' do not).
  const absl::Status started = [&]() -> absl::Status {
    // An exception (CUDA out of memory on a shared GPU, no thread left for the loader) is this
    // rank's failure too: the others must hear of it here, not wait for it.
    try {
      return s->StartAlone(options);
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("exception at the start: ", e.what()));  // "rank R: " added when shared
    }
  }();
  AVIARY_RETURN_IF_ERROR(s->ShareStartOutcome(started));
  AVIARY_RETURN_IF_ERROR(s->TidyRunFolder());
  // The resume too: each rank reads the checkpoint on its own host (an I/O error, out of memory
  // copying the optimizer's moments to its GPU).
  const absl::Status resumed = [&]() -> absl::Status {
    try {
      AVIARY_RETURN_IF_ERROR(s->Resume());
      return s->restored || options.init_checkpoint.empty() ? absl::OkStatus() : s->LoadInitCheckpoint();
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("exception at the resume: ", e.what()));
    }
  }();
  AVIARY_RETURN_IF_ERROR(s->ShareStartOutcome(resumed));
  AVIARY_RETURN_IF_ERROR(s->JoinGroup());
  s->copier = std::make_unique<DeviceCopier>(options.device);
  s->step_fn = std::make_unique<TrainStep>(s->config, s->train, s->frontend.get(), s->model.get(),
                                           s->optimizer.get(), s->reducer.get(), options.device,
                                           s->autocast);
  Log().Info(absl::StrCat("stage ", options.stage, " fold ", options.fold, ": ",
                          s->train_items.size(), " training items, ", s->valid_items.size(),
                          " validation items, ", s->table.class_names.size(), " classes, model ",
                          s->model->name(), ", ", s->train_loader->BatchesPerEpoch(),
                          s->accum > 1 ? absl::StrCat(" batches (", (s->train_loader->BatchesPerEpoch() + s->accum - 1) /
                                                                      s->accum, " optimizer steps)")
                                       : std::string(" steps"),
                          " per epoch, ", s->epochs, " epochs, device ",
                          options.device.str(), s->autocast ? " (bf16 autocast)" : "",
                          s->cache ? ", decoded-audio cache" : ", decoding on the fly"));
  if (const int64_t batches = s->train_loader->BatchesPerEpoch(); s->accum > 1 && batches % s->accum != 0 && s->rank == 0) {
    // The learning rate follows the global batch of K full micro-batches (lr_max_per_sample x
    // batch_size x ranks x K); a step of fewer has fewer samples at that rate.
    Log().Warn(absl::StrCat(
        "train.grad_accum_steps ", s->accum, ": ",
        batches < s->accum ? absl::StrCat("every optimizer step has the epoch's ", batches, " batch(es)")
                           : absl::StrCat("each epoch's ", batches, " batches end with an optimizer step of ",
                                          batches % s->accum, " batch(es)"),
        ", at the learning rate of ", s->accum, " (a global batch of ", s->global_batch,
        "); its gradient is the mean over its samples",
        batches < s->accum ? "; lower train.grad_accum_steps" : ""));
  }
  return std::unique_ptr<Trainer>(new Trainer(std::move(s)));
}

absl::StatusOr<EpochRecord> Trainer::State::TrainEpoch(int epoch) {
  EpochTally t = StartEpoch(epoch);
  // An optimizer step's time runs from the end of the previous one (true: a step began).
  auto begin_step = [&] {
    if (step_fn->pending_micro_batches() != 0) return false;
    t.step_start = std::chrono::steady_clock::now();
    t.allreduce_before = AllReduceSeconds();
    t.step_samples = 0;
    return true;
  };
  // One batch ahead: batch s + 1 is fetched and its copy to the device started before step s
  // is queued, so that the copy runs during step s's forward and backward. (The step waits for
  // the device at its loss; with a CUDA graph, a reducer or clipping, after backward too: a copy
  // started after the step would overlap its optimizer update at most.)
  Batch batch;
  DeviceCopier::InFlight copy;
  double step_wait = 0;  // the loader's waits within the optimizer step (as its step_seconds)
  auto fetch = [&](Batch* b, DeviceCopier::InFlight* c) -> absl::StatusOr<bool> {
    double wait = 0;
    AVIARY_ASSIGN_OR_RETURN(const bool got, NextBatch(b, c, &wait));
    t.data_wait += wait;
    step_wait += wait;
    return got;
  };
  begin_step();
  AVIARY_ASSIGN_OR_RETURN(bool more, fetch(&batch, &copy));
  for (int64_t s = t.first_batch; more; ++s) {
    // Stops only between optimizer steps (no micro-batch gathered).
    if (step_fn->pending_micro_batches() == 0 && options.should_stop && options.should_stop()) {
      return StopMidEpoch(t, s);
    }
    batch.waveforms = copier->Take(std::move(copy));
    Batch next;
    DeviceCopier::InFlight next_copy;
    AVIARY_ASSIGN_OR_RETURN(const bool next_more, fetch(&next, &next_copy));
    held_batches = next_more ? 1 : 0;
    AVIARY_RETURN_IF_ERROR(TrainBatch(batch, s, step_wait, &t));
    if (begin_step()) step_wait = 0;
    batch = std::move(next);
    copy = std::move(next_copy);
    more = next_more;
  }
  held_batches = 0;
  // The broken clips of the epochs trained (the next one's rows decoded ahead are not); this
  // epoch's new ones are said now (a week-long run must not keep them for its end).
  LoaderStats before = std::move(trained_loader_stats);
  trained_loader_stats = train_loader->Stats();
  ReportNewBrokenClips(before, trained_loader_stats, epoch);
  if (cache != nullptr && cache->read_failures() > reported_cache_read_failures) {
    Log().Warn(absl::StrCat(cache->read_failures() - reported_cache_read_failures,
                            " reads of the decoded-audio cache failed by epoch ", epoch,
                            "'s end (I/O errors, ESTALE: the first are logged above); those clips were decoded "
                            "from their audio files instead, far slower"));
    reported_cache_read_failures = cache->read_failures();
  }
  // The next epoch's first batches decode meanwhile (the epoch's totals, validation, its files);
  // its StartEpoch keeps them. (Wasted if the run stops early: nothing else changes.)
  if (epoch + 1 < epochs) train_loader->StartEpoch(epoch + 1);
  if (options.progress_bar) std::fprintf(stderr, "\n");
  trained_tally = t;
  return FinishEpoch(t);
}

absl::StatusOr<bool> Trainer::State::NextBatch(Batch* batch, DeviceCopier::InFlight* copy, double* wait) {
  const auto wait_start = std::chrono::steady_clock::now();
  AVIARY_ASSIGN_OR_RETURN(bool more, train_loader->Next(batch));
  *wait = Seconds(wait_start);
  *copy = more ? copier->Start(batch->waveforms) : DeviceCopier::InFlight();
  return more;
}

absl::Status Trainer::State::StopMidEpoch(const EpochTally& t, int64_t next) {
  const std::string where = absl::StrCat("stopped at epoch ", t.epoch, " batch ", next, " (step ", step, ")");
  if (next == 0 || next == t.first_batch) {
    // Nothing trained since the checkpoint the run started from or the epoch's last.pt.
    return absl::CancelledError(where);
  }
  absl::Status shared;
  // The ranks' collectives failed (a rank did not arrive, a peer's network went, the communicator
  // broke earlier): the group is broken, and that ends the run with that error, naming the rank;
  // as a stop it was "preempted" under `serve`, and `train` waited in MPI_Finalize for the hung
  // rank for ever. (Only DEADLINE_EXCEEDED was passed on: an MPI or NCCL error was a stop.)
  AVIARY_RETURN_IF_ERROR(WriteMidEpoch(t, next, &shared));
  if (!shared.ok()) {
    Log().Warn(absl::StrCat(where, ": no mid-epoch checkpoint (", shared.message(), "); ", Path("last.pt"),
                            " holds what it held"));
    // Still a stop, but a disk that is full is said (the agent waits until it can write again
    // before it leases another task: worker/agent/agent.cc).
    const std::optional<common::StorageFault> fault = common::StorageFaultOf(shared);
    return fault ? common::WithStorageFault(absl::CancelledError(where), *fault) : absl::CancelledError(where);
  }
  if (rank == 0) Log().Info(absl::StrCat(where, ": ", Path("last.pt"), " holds this step"));
  return absl::CancelledError(absl::StrCat(where, "; ", Path("last.pt"), " holds this step"));
}

absl::Status Trainer::State::WriteMidEpoch(const EpochTally& t, int64_t next, absl::Status* shared) {
  // Every rank's totals, summed: rank 0's checkpoint carries them (a resumed rank 0 starts
  // from them, the others from zero, so FinishEpoch's sum is the same).
  double loss_sum = t.loss_sum;
  int64_t seen = t.seen, correct = CorrectSoFar(t);
  if (world > 1) {
    at::Tensor totals = at::tensor({loss_sum, static_cast<double>(seen), static_cast<double>(correct)}, at::kDouble);
    AVIARY_RETURN_IF_ERROR(comm->AllReduce(totals));
    loss_sum = totals[0].item<double>();
    seen = static_cast<int64_t>(totals[1].item<double>());
    correct = static_cast<int64_t>(totals[2].item<double>());
  }
  absl::Status wrote;
  if (rank == 0) {
    CheckpointMeta meta = Meta(t.epoch - 1);
    meta.in_epoch = t.epoch;
    meta.batches_done = next;
    meta.epoch_loss_sum = loss_sum;
    meta.epoch_seen = seen;
    meta.epoch_correct = correct;
    if (!ModelIsFinite()) {
      // A non-finite gradient the loss check did not see (it is not checked unless clipping or
      // train.skip_nonfinite asks): the weights would replace a good last.pt.
      wrote = absl::DataLossError(absl::StrCat("the weights at epoch ", t.epoch, " batch ", next, " (step ", step,
                                               ") are not finite: not written over ", Path("last.pt")));
    } else {
      common::AtomicWriteOptions write;
      write.check = options.commit_check;
      write.keep_previous_as = Path("last.prev.pt");
      wrote = SaveCheckpoint(Path("last.pt"), *model, optimizer.get(), meta, write, LastGroups());
    }
  }
  return ShareWriteOutcome(wrote, "the mid-epoch last.pt", shared);
}

absl::Status Trainer::State::CheckpointBeforeValidation() {
  if (!valid_loader || options.checkpoint_before_validation_s < 0) return absl::OkStatus();
  const EpochTally& t = trained_tally;
  // Trained nothing since last.pt (resumed at the epoch's end): that last.pt is this one.
  const bool wanted = t.first_batch < t.steps && Seconds(t.start) >= options.checkpoint_before_validation_s;
  bool write = wanted;
  if (comm != nullptr) {  // every rank the same answer: the write is a collective
    at::Tensor flag = at::tensor({wanted ? int64_t{1} : int64_t{0}}, at::kLong);
    AVIARY_RETURN_IF_ERROR(comm->AllReduce(flag, comm::ReduceOp::kMax));
    write = flag[0].item<int64_t>() != 0;
  }
  if (!write) return absl::OkStatus();
  absl::Status wrote;
  AVIARY_RETURN_IF_ERROR(WriteMidEpoch(t, t.steps, &wrote));
  AVIARY_RETURN_IF_ERROR(wrote);
  if (rank == 0) {
    Log().Info(absl::StrCat("epoch ", t.epoch, " trained: ", Path("last.pt"),
                            " holds it before its validation (a stop during validation resumes there)"));
  }
  return absl::OkStatus();
}

namespace {

// Whether every floating-point tensor of `tensors` is finite (one wait for the device).
bool AllFinite(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> finite;
  for (const at::Tensor& t : tensors) {
    if (t.is_floating_point()) finite.push_back(at::isfinite(t.detach()).all());
  }
  return finite.empty() || at::stack(finite).all().item<bool>();
}

}  // namespace

bool Trainer::State::ModelIsFinite() const {
  std::vector<at::Tensor> tensors = model->parameters();
  for (const at::Tensor& b : model->buffers()) tensors.push_back(b);
  return AllFinite(tensors);
}

// The epoch's learning rate (set now unless train.lr_per_step), the model in training mode, the
// loader at `epoch`, the reducer's timers at zero.
Trainer::State::EpochTally Trainer::State::StartEpoch(int epoch) {
  EpochTally t;
  t.epoch = epoch;
  t.steps = train_loader->BatchesPerEpoch();
  t.lr = LearningRate(train, epoch, global_batch);
  if (!train.lr_per_step) SetLr(t.lr);
  model->train();
  if (epoch == start_epoch && mid.batches_done > 0) {
    // Resumed mid-epoch: the rest of the epoch, with its totals so far.
    t.first_batch = mid.batches_done;
    t.loss_sum = mid.loss_sum;
    t.seen = mid.seen;
    t.seen_before = mid.seen;
    t.correct = mid.correct;
    mid = MidEpoch();
  }
  train_loader->StartEpoch(epoch, t.first_batch);
  if (reducer) reducer->ResetTimers();
  t.start = t.last_log = t.step_start = std::chrono::steady_clock::now();
  return t;
}

// Step `s` of the epoch on `batch`: forward, the non-finite check, the optimizer update, the
// running totals, on_step and the progress line.
// With train.grad_accum_steps = K the batch is one micro-batch: the optimizer step comes after
// the K-th (or the epoch's last).
absl::Status Trainer::State::TrainBatch(const Batch& batch, int64_t s, double data_wait, EpochTally* t) {
  if (train.lr_per_step && step_fn->pending_micro_batches() == 0) SetLr(StepLr(t->epoch, s, t->steps));
  // The forward in training mode moves BatchNorm's running statistics: a batch whose loss is
  // not finite (a NaN in its input) made them NaN for good, and every validation after it failed
  // "outputs are not finite" though the step was skipped. A copy of them, taken every
  // kBufferSaveSteps optimizer steps (one copy per buffer: not every step's cost), is put back
  // when a skipped batch left them non-finite.
  if (train.skip_nonfinite && (saved_buffers.empty() || step >= saved_buffers_step + kBufferSaveSteps)) {
    SaveBuffers();
  }
  StepForward fwd;
  bool graphed = false;
  const Batch& input = InjectInputFault(batch);
  if (train.cuda_graph) {
    AVIARY_ASSIGN_OR_RETURN(graphed, GraphForward(input, SeedsFor(t->epoch, s), &fwd));
  } else {
    fwd = step_fn->Forward(input.waveforms, input.targets, SeedsFor(t->epoch, s));
  }
  at::Tensor loss = fwd.loss;
  InjectFault(&loss);
  const double loss_value = loss.item<double>();
  absl::StatusOr<bool> skip_or = SkipNonFinite(batch, loss_value, t->epoch, s);
  if (!skip_or.ok()) {
    // The run ends here: the step goes out first with the non-finite loss (the running mean
    // leaves it out), so the coordinator exports it (alert AviaryLossNotFinite): it used to end
    // unreported, and the alert could not fire without train.skip_nonfinite.
    if (absl::IsDataLoss(skip_or.status())) ReportNonFiniteStop(*t, s, loss_value);
    return skip_or.status();
  }
  const bool skip = *skip_or;
  if (skip && !BuffersAreFinite()) {
    Log().Warn(absl::StrCat("the skipped batch left BatchNorm's running statistics non-finite: those of step ",
                            saved_buffers_step, " are put back"));
    RestoreBuffers();
  }
  at::Tensor correct;  // on the device, summed into t->correct_pending unread
  if (!skip) {
    if (graphed) {
      step_fn->AddGraphedMicroBatch();  // the replay ran backward
    } else {
      AVIARY_RETURN_IF_ERROR(step_fn->Backward(loss, batch.waveforms.size(0)));
    }
    const int64_t b = batch.waveforms.size(0);
    correct = Tally(fwd, loss_value, b, t);
    t->step_samples += b;
  }
  auto count_correct = [&] {
    if (!correct.defined()) return;
    t->correct_pending = t->correct_pending.defined() ? t->correct_pending + correct : correct;
  };
  const bool boundary = (s + 1) % accum == 0 || s + 1 == t->steps;
  if (!boundary) {
    count_correct();
    return absl::OkStatus();
  }
  const int micro_batches = step_fn->pending_micro_batches();
  const bool applied = step_fn->Apply();
  if (step_fn->skipped_nonfinite()) {
    // train.skip_nonfinite: a finite loss whose gradient is not (the same on every rank: it
    // was checked after the all-reduce). Counted as the micro-batches it drops, as a loss's are.
    skipped_steps += micro_batches;
    const std::string where = absl::StrCat("non-finite gradient (norm ", step_fn->last_grad_norm(), ") at epoch ",
                                           t->epoch, " step ", s);
    Log().Warn(absl::StrCat("skipped: ", where));
    AVIARY_RETURN_IF_ERROR(CountSkipped(micro_batches, where));
  } else if (applied && train.grad_clip_norm > 0 && !std::isfinite(step_fn->last_grad_norm())) {
    // Stepped on (the norm is read after the step is queued): the weights are not finite now.
    return absl::DataLossError(absl::StrCat("non-finite gradient (norm ", step_fn->last_grad_norm(), ") at epoch ",
                                            t->epoch, " step ", s, " with a finite loss; the weights are no longer "
                                            "finite (set train.skip_nonfinite to skip such steps)"));
  }
  if (applied) {
    skipped_in_a_row = 0;
    if (fault.kind == "nan_weights" && rank == fault.rank && step == fault.step) {
      // A non-finite gradient that no check saw (none is made unless clipping or skip_nonfinite
      // asks), written into the weights by the optimizer: the step's loss was finite.
      Log().Warn(absl::StrCat("AVIARY_FAULT_INJECT: rank ", rank, " makes its weights non-finite at step ", step));
      torch::NoGradGuard no_grad;
      model->parameters().front().fill_(std::numeric_limits<float>::quiet_NaN());
    }
    ++step;
    if (ema) ema->Update(*model);
    if (profiler) profiler->AfterStep(++run_steps);
  }
  count_correct();
  ReportStep(*t, s, applied ? t->step_samples : 0, /*skipped=*/!applied, data_wait);
  if (applied) LogProgress(s, t);
  return absl::OkStatus();
}

absl::StatusOr<bool> Trainer::State::GraphForward(const Batch& batch, const StepSeeds& seeds, StepForward* fwd) {
  if (batch.waveforms.size(0) != train.batch_size) {  // drop_remainder false: the epoch's last
    *fwd = step_fn->Forward(batch.waveforms, batch.targets, seeds);
    return false;
  }
  at::manual_seed(seeds.dropout);  // as Forward (the replay seeds the device generator again)
  StepInputs in = step_fn->Prepare(batch.waveforms, batch.targets, seeds);
  if (graph == nullptr) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<std::unique_ptr<GraphedModelStep>> captured =
        GraphedModelStep::Capture(train, step_fn.get(), optimizer.get(), in.features, in.targets, kGraphWarmup);
    if (!captured.ok()) {
      return absl::Status(captured.status().code(),
                          absl::StrCat("train.cuda_graph: ", captured.status().message(), " (set it false to train eagerly)"));
    }
    graph = std::move(*captured);
    if (rank == 0) {
      Log().Info(absl::StrFormat("train.cuda_graph: the model step captured for batches of %d in %.2f s",
                                 train.batch_size, Seconds(start)));
    }
  }
  absl::StatusOr<at::Tensor> loss = graph->Replay(in.features, in.targets, seeds.dropout);
  if (!loss.ok()) {
    return absl::Status(loss.status().code(),
                        absl::StrCat("train.cuda_graph: ", loss.status().message(), " (set it false to train eagerly)"));
  }
  fwd->loss = *loss;
  fwd->logits = graph->logits();
  fwd->targets = graph->static_targets();
  return true;
}

double Trainer::State::StepLr(int epoch, int64_t s, int64_t steps) const {
  return LearningRate(train, epoch + static_cast<double>(s) / steps, global_batch);
}

double Trainer::State::AllReduceSeconds() const {
  return reducer ? reducer->finish_seconds() + reducer->hook_seconds() : 0.0;
}

// Dropout and stochastic depth draw from the global generator: it is seeded per step. Rank 0
// draws what a single process draws; other ranks draw their own augmentation.
StepSeeds Trainer::State::SeedsFor(int epoch, int64_t s) const {
  const uint64_t salt = static_cast<uint64_t>(rank) << 32;
  StepSeeds seeds;
  seeds.dropout = MixSeed(config.seed, epoch, s, 0x5EED + salt);
  seeds.augment = MixSeed(config.seed, epoch, s, 1 + salt);
  seeds.spec_augment = MixSeed(config.seed, epoch, s, 2 + salt);
  return seeds;
}

// The model's buffers (BatchNorm's running statistics and batch counts) copied aside, into
// tensors kept from step to step.
void Trainer::State::SaveBuffers() {
  torch::NoGradGuard no_grad;
  saved_buffers_step = step;
  const std::vector<at::Tensor> buffers = model->buffers();
  if (saved_buffers.size() != buffers.size()) saved_buffers.clear();
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (i < saved_buffers.size()) {
      saved_buffers[i].copy_(buffers[i].detach(), /*non_blocking=*/true);
    } else {
      saved_buffers.push_back(buffers[i].detach().clone());
    }
  }
}

bool Trainer::State::BuffersAreFinite() const { return AllFinite(model->buffers()); }

// The buffers back as SaveBuffers found them (in place: a captured CUDA graph holds them).
void Trainer::State::RestoreBuffers() {
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> buffers = model->buffers();
  if (buffers.size() != saved_buffers.size()) return;
  for (size_t i = 0; i < buffers.size(); ++i) buffers[i].detach().copy_(saved_buffers[i], /*non_blocking=*/true);
}

// AVIARY_FAULT_INJECT kind=nan_input: rank R's batch at step K with a NaN in its first
// waveform (a damaged cache shard), once; else `batch` itself.
const Batch& Trainer::State::InjectInputFault(const Batch& batch) {
  if (fault.kind != "nan_input" || rank != fault.rank || step != fault.step || input_fault_done) return batch;
  input_fault_done = true;  // once: a skipped batch leaves the step as it was
  Log().Warn(absl::StrCat("AVIARY_FAULT_INJECT: rank ", rank, " puts a NaN into its batch at step ", step));
  faulty_batch = batch;
  faulty_batch.waveforms = batch.waveforms.clone(at::MemoryFormat::Contiguous);
  faulty_batch.waveforms.view(-1)[0].fill_(std::numeric_limits<float>::quiet_NaN());
  return faulty_batch;
}

// AVIARY_FAULT_INJECT at its rank and optimizer step: a NaN loss, a rank that stops answering,
// or an exception.
void Trainer::State::InjectFault(at::Tensor* loss) const {
  // "nan_from": a non-finite loss at every step from `step` on (a run that trains nothing).
  if (rank == fault.rank && fault.kind == "nan_from" && step >= fault.step) {
    *loss = *loss * std::numeric_limits<float>::quiet_NaN();
  }
  if (rank != fault.rank || step != fault.step) return;
  if (fault.kind == "nan") *loss = *loss * std::numeric_limits<float>::quiet_NaN();

  if (fault.kind == "hang") {
    Log().Warn(absl::StrCat("AVIARY_FAULT_INJECT: rank ", rank, " stops answering at step ", step));
    while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  if (fault.kind == "hang_stderr") {
    // A stderr that stopped draining (an mpirun no longer forwarding output, a log file on a
    // hung mount): the log line that fills the pipe blocks with the logger's lock held, and
    // every other thread's log line waits behind it.
    Log().Warn(absl::StrCat("AVIARY_FAULT_INJECT: rank ", rank, " blocks its stderr at step ", step));
    int fds[2];
    if (::pipe(fds) != 0 || ::dup2(fds[1], STDERR_FILENO) < 0) {
      Log().Error(absl::StrCat("AVIARY_FAULT_INJECT: hang_stderr: ", std::strerror(errno)));
      std::_Exit(1);
    }
    const std::string line(4096, 'x');
    while (true) Log().Info(line);  // the read end stays open and unread: the 17th line blocks
  }
  if (fault.kind == "sigterm") {  // a preemption: the stop arrives as a real signal, once
    static bool raised = false;
    if (raised) return;
    raised = true;
    Log().Warn(absl::StrCat("AVIARY_FAULT_INJECT: rank ", rank, " raises SIGTERM at step ", step));
    ::raise(SIGTERM);
    return;
  }
  if (fault.kind == "throw") {
    throw std::runtime_error(absl::StrCat("AVIARY_FAULT_INJECT: rank ", rank, " throws at step ", step));
  }
}

// With several ranks: the ranks whose loss is not finite ("1, 3"; empty: none). A collective.
absl::StatusOr<std::string> Trainer::State::NonFiniteRanks(double loss_value) {
  if (world == 1) return std::string();
  at::Tensor flags = at::zeros({world}, at::kFloat);
  flags[rank] = std::isfinite(loss_value) ? 0.0f : 1.0f;
  AVIARY_RETURN_IF_ERROR(comm->AllReduce(flags));
  std::vector<std::string> bad;
  for (int r = 0; r < world; ++r) {
    if (flags[r].item<float>() != 0.0f) bad.push_back(std::to_string(r));
  }
  return absl::StrJoin(bad, ", ");
}

// Whether step `s` is skipped for a non-finite loss on any rank (train.skip_nonfinite; else
// DATA_LOSS naming the step, and the batch's files on the rank that saw it). Every rank must
// skip (or fail) the same steps: the ranks share who saw one.
absl::StatusOr<bool> Trainer::State::SkipNonFinite(const Batch& batch, double loss_value, int epoch, int64_t s) {
  AVIARY_ASSIGN_OR_RETURN(const std::string bad_ranks, NonFiniteRanks(loss_value));
  std::string where;
  if (!std::isfinite(loss_value)) {
    std::vector<std::string> files;
    for (int64_t item : batch.items) files.push_back(train_items[item].path);
    where = absl::StrCat("non-finite loss (", loss_value, ") on rank ", rank, " at epoch ", epoch, " step ", s,
                         "; batch files: ", absl::StrJoin(files, ", "));
    if (!train.skip_nonfinite) {
      return absl::DataLossError(absl::StrCat(where, " (set train.skip_nonfinite to skip such steps)"));
    }
  } else if (!bad_ranks.empty()) {
    where = absl::StrCat("non-finite loss on rank(s) ", bad_ranks, " at epoch ", epoch, " step ", s);
    if (!train.skip_nonfinite) return absl::DataLossError(where);
  } else {
    return false;
  }
  ++skipped_steps;
  Log().Warn(absl::StrCat("skipped: ", where));
  AVIARY_RETURN_IF_ERROR(CountSkipped(1, where));
  return true;
}

absl::Status Trainer::State::CountSkipped(int batches, const std::string& where) {
  skipped_in_a_row += batches;
  if (options.max_skipped_in_a_row <= 0 || skipped_in_a_row < options.max_skipped_in_a_row) return absl::OkStatus();
  // Every rank skips the same batches (the losses' and the gradient's checks are every rank's
  // answer): all end here.
  return absl::DataLossError(absl::StrCat(skipped_in_a_row, " batches in a row skipped for a non-finite loss or ",
                                          "gradient (train.skip_nonfinite), the last: ", where,
                                          "; the run trains nothing: look at the data and the learning rate"));
}

// A trained step's loss into the epoch's totals; its correct predictions, a 0-d tensor on the
// device for the caller to add to t->correct_pending (not read: reading waits for the device).
at::Tensor Trainer::State::Tally(const StepForward& fwd, double loss_value, int64_t b, EpochTally* t) const {
  t->loss_sum += loss_value * b;
  t->seen += b;
  at::Tensor pred = fwd.logits.detach().argmax(1);
  return pred.eq(fwd.targets.argmax(1)).sum();
}

// on_step's StepStats after step `s` of the epoch; a `skipped` step trained nothing.
void Trainer::State::ReportStep(const EpochTally& t, int64_t s, int64_t samples, bool skipped, double data_wait) {
  if (options.on_step) options.on_step(StepStatsFor(t, s, samples, skipped, data_wait));
}

void Trainer::State::ReportNonFiniteStop(const EpochTally& t, int64_t s, double loss_value) {
  if (!options.on_step) return;
  StepStats st = StepStatsFor(t, s, 0, /*skipped=*/true, 0);
  // This rank's loss when it is the non-finite one; NaN when another rank's was.
  st.train_loss = std::isfinite(loss_value) ? kNaN : loss_value;
  st.nonfinite_stop = true;
  options.on_step(st);
}

StepStats Trainer::State::StepStatsFor(const EpochTally& t, int64_t s, int64_t samples, bool skipped,
                                       double data_wait) {
  StepStats st;
  st.epoch = t.epoch;
  st.step = step;
  st.step_in_epoch = (s + accum) / accum;  // optimizer steps: ceil((s + 1) / K)
  st.steps_per_epoch = (t.steps + accum - 1) / accum;
  st.lr = optimizer->lr();  // the rate this step used (lr_per_step: set at its first micro-batch)
  st.train_loss = t.seen > 0 ? t.loss_sum / t.seen : kNaN;
  st.samples = samples;
  st.world_size = world;
  st.skipped = skipped;
  st.step_seconds = Seconds(t.step_start);
  st.data_wait_seconds = data_wait;
  st.allreduce_seconds = std::max(0.0, AllReduceSeconds() - t.allreduce_before);
  st.loader_queue_depth = train_loader->QueueDepth() + held_batches;
  return st;
}

// The live line on stderr (options.progress_bar), else a log line every log_every_s.
void Trainer::State::LogProgress(int64_t s, EpochTally* t) {
  const double elapsed = Seconds(t->start);
  // Rates and the ETA from what this run trained (a resumed epoch started at first_batch).
  const double rate = (t->seen - t->seen_before) / std::max(elapsed, 1e-9);
  const int64_t steps = t->steps;
  const int64_t done = std::max<int64_t>(s + 1 - t->first_batch, 1);
  if (options.progress_bar) {
    std::fprintf(stderr, "\repoch %d/%d  step %lld/%lld  loss %.4f  %.0f samples/s  ETA %s   ",
                 t->epoch, epochs - 1, static_cast<long long>(s + 1), static_cast<long long>(steps),
                 t->loss_sum / t->seen, rate, Eta((steps - s - 1) * elapsed / done).c_str());
  } else if (Seconds(t->last_log) >= options.log_every_s) {
    t->last_log = std::chrono::steady_clock::now();
    Log().Info(absl::StrFormat("epoch %d/%d step %lld/%lld loss %.4f %.0f samples/s ETA %s",
                               t->epoch, epochs - 1, static_cast<long long>(s + 1),
                               static_cast<long long>(steps), t->loss_sum / t->seen, rate,
                               Eta((steps - s - 1) * elapsed / done)));
  }
}

// The epoch's record from every rank's totals; rank 0 logs the all-reduce's share of the epoch.
absl::StatusOr<EpochRecord> Trainer::State::FinishEpoch(const EpochTally& t) {
  double loss_sum = t.loss_sum;
  int64_t seen = t.seen;
  int64_t correct = CorrectSoFar(t);
  int64_t seen_before = t.seen_before;
  if (world > 1) {
    at::Tensor totals = at::tensor({loss_sum, static_cast<double>(seen), static_cast<double>(correct),
                                    static_cast<double>(seen_before)},
                                   at::kDouble);
    AVIARY_RETURN_IF_ERROR(comm->AllReduce(totals));
    loss_sum = totals[0].item<double>();
    seen = static_cast<int64_t>(totals[1].item<double>());
    correct = static_cast<int64_t>(totals[2].item<double>());
    seen_before = static_cast<int64_t>(totals[3].item<double>());
  }
  const double elapsed = Seconds(t.start);
  if (rank == 0) {
    // The loader's share: time the host waited for a ready batch (a GPU may still have been busy
    // with queued work meanwhile; a large share means the data path cannot keep up).
    Log().Info(absl::StrFormat("epoch %d: waited %.3f s for the loader's batches of %.3f s (%.1f%%)", t.epoch,
                               t.data_wait, elapsed, 100.0 * t.data_wait / std::max(elapsed, 1e-9)));
  }
  if (reducer && rank == 0) {
    Log().Info(absl::StrFormat(
        "epoch %d: gradient all-reduce: %.3f s waiting after backward + %.3f s in hooks of %.3f s "
        "(%.1f%%), %d of %zu buckets launched during the last backward",
        t.epoch, reducer->finish_seconds(), reducer->hook_seconds(), elapsed,
        100.0 * AllReduceSeconds() / std::max(elapsed, 1e-9), reducer->launched_during_backward(),
        reducer->buckets().size()));
  }
  EpochRecord record;
  record.epoch = t.epoch;
  record.lr = t.lr;
  record.step = step;
  record.train_loss = seen > 0 ? loss_sum / seen : kNaN;
  record.train_acc = seen > 0 ? static_cast<double>(correct) / seen : kNaN;
  // Not measured when this run trained none of the epoch (resumed at its end: saved before its
  // validation): NaN, not 0.
  record.samples_per_s = seen > seen_before ? (seen - seen_before) / std::max(elapsed, 1e-9) : kNaN;
  return record;
}

bool Trainer::State::TrackMonitor(EpochRecord* record, bool* write_best) {
  const double value = MonitorValue(train.monitor, *record);
  *write_best = false;
  if (Better(value)) {
    best_value = value;
    best_epoch = record->epoch;
    record->best = true;
    *write_best = true;
    for (auto& h : history) h.best = false;
  } else if (record->epoch == best_epoch) {
    // The re-run of the epoch whose best.pt was adopted (AdoptNewerBest), not better: best.pt
    // stays that earlier run's (not written again), and stays this epoch's in the history.
    record->best = true;
    for (auto& h : history) h.best = false;
  }
  if (train.early_stop_patience <= 0) return false;
  if (std::isnan(value)) {
    // Not measured this epoch (no validation rows, every validation clip unreadable, one class
    // for roc_auc): no sign of a plateau, so it never ends the run. It stopped a run that had
    // measured nothing at epoch patience - 1, "not improving".
    if (!said_unmeasured_monitor) {
      Log().Warn(absl::StrCat("stage ", options.stage, " fold ", options.fold, ": train.monitor ", train.monitor,
                              " is NaN after epoch ", record->epoch, " (not measured): early stopping does not end "
                              "the run on such an epoch"));
      said_unmeasured_monitor = true;
    }
    stopped_early = false;
    return false;
  }
  if (ImprovedForEarlyStop(value)) {
    early_stop_value = value;
    early_stop_epoch = record->epoch;
  }
  // Epochs since the last improvement (since the start when there was none).
  stopped_early = record->epoch - early_stop_epoch >= train.early_stop_patience;
  return stopped_early;
}

absl::Status Trainer::State::Validate(EpochRecord* record) {
  record->val_loss = record->val_auc = record->val_roc_auc = record->val_cmap = record->val_acc = kNaN;
  if (!valid_loader) return absl::OkStatus();
  const int num_classes = model->num_classes();
  AVIARY_RETURN_IF_ERROR(BroadcastState(/*parameters=*/false));  // the BatchNorm policy
  model->eval();
  torch::NoGradGuard no_grad;
  valid_loader->StartEpoch(0);
  std::vector<int64_t> targets;
  std::vector<int64_t> items;
  // Nothing is read back until the last batch: the losses are summed on the device (in double,
  // in batch order: the sum a host loop would make) and the probabilities kept there. Once batch
  // i is queued and batch i + 1 fetched with its copy started (on the copier's stream, so it runs
  // during batch i's forward), the host waits for batch i - 1's work only (a mark, not a read:
  // reading a value waits for batch i too). So the device always has the next batch queued, and
  // at most about three batches' tensors are in device memory.
  at::Tensor loss_sum_dev;  // the losses times their batch's size, in double
  std::shared_ptr<DeviceCopier::Event> behind;  // batch i - 1's work
  std::vector<at::Tensor> probs_parts;
  Batch batch;
  DeviceCopier::InFlight copy;
  auto next = [&]() -> absl::StatusOr<bool> {
    batch = Batch();
    AVIARY_ASSIGN_OR_RETURN(const bool more, valid_loader->Next(&batch));
    copy = more ? copier->Start(batch.waveforms) : DeviceCopier::InFlight();
    return more;
  };
  AVIARY_ASSIGN_OR_RETURN(bool more, next());
  while (more) {
    // (next() drops the pinned host batch while its copy may be in flight: torch's caching host
    // allocator keeps the memory until the copy's recorded event, as in training.)
    at::Tensor x = copier->Take(std::move(copy));
    const int64_t n = x.size(0);
    at::Tensor loss;  // this batch's, times its size, in double
    if (n > 0) {
      // One-hot on the device: its few class ids are copied, not a float matrix from pageable
      // memory (a copy that large may make the host wait for the stream).
      at::Tensor y = at::one_hot(batch.targets.to(options.device, true), num_classes).to(at::kFloat);
      at::Tensor mel = frontend->Forward(x, FrontendMode::kEval);
      at::Tensor logits;
      {
        AutocastGuard autocast_guard(autocast);
        logits = model->forward(mel);
      }
      logits = logits.to(at::kFloat);
      loss = ComputeLoss(train.loss, logits, y, train.label_smoothing).to(at::kDouble) * static_cast<double>(n);
      probs_parts.push_back(model->Probabilities(logits));
      targets.insert(targets.end(), batch.targets.data_ptr<int64_t>(),
                     batch.targets.data_ptr<int64_t>() + batch.targets.numel());
      items.insert(items.end(), batch.items.begin(), batch.items.end());
    }
    if (loss.defined()) loss_sum_dev = loss_sum_dev.defined() ? loss_sum_dev + loss : loss;
    std::shared_ptr<DeviceCopier::Event> mark = copier->Mark();
    AVIARY_ASSIGN_OR_RETURN(more, next());
    DeviceCopier::Await(behind);
    behind = std::move(mark);
    if (options.on_progress) options.on_progress();
  }
  double loss_sum = loss_sum_dev.defined() ? loss_sum_dev.item<double>() : 0.0;
  std::vector<float> probs;
  if (!probs_parts.empty()) {
    const at::Tensor p = at::cat(probs_parts).to(at::kFloat).cpu().contiguous();
    probs.assign(p.data_ptr<float>(), p.data_ptr<float>() + p.numel());
  }
  if (world > 1) {
    // Gather every rank's predictions and put them back in item order.
    const int64_t n = static_cast<int64_t>(targets.size());
    at::Tensor p = at::from_blob(probs.data(), {n, num_classes}, at::kFloat);
    at::Tensor meta = at::empty({n, 2}, at::kLong);
    for (int64_t i = 0; i < n; ++i) {
      meta[i][0] = items[i];
      meta[i][1] = targets[i];
    }
    AVIARY_ASSIGN_OR_RETURN(at::Tensor all_p, comm::AllGatherRows(*comm, p));
    AVIARY_ASSIGN_OR_RETURN(at::Tensor all_meta, comm::AllGatherRows(*comm, meta));
    at::Tensor total_loss = at::tensor({loss_sum}, at::kDouble);
    AVIARY_RETURN_IF_ERROR(comm->AllReduce(total_loss));
    loss_sum = total_loss.item<double>();
    at::Tensor order = all_meta.select(1, 0).argsort();
    all_p = all_p.index_select(0, order).contiguous();
    at::Tensor t = all_meta.select(1, 1).index_select(0, order).contiguous();
    probs.assign(all_p.data_ptr<float>(), all_p.data_ptr<float>() + all_p.numel());
    targets.assign(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
  }
  if (targets.empty()) return absl::OkStatus();
  for (float p : probs) {
    if (!std::isfinite(p)) {
      return absl::DataLossError(absl::StrCat(
          "validation after epoch ", record->epoch, ": the model's outputs are not finite (its "
          "weights diverged; the learning rate was ", record->lr, "); the last good weights are in ",
          Path("last.pt")));
    }
  }
  record->val_loss = loss_sum / static_cast<double>(targets.size());
  AVIARY_ASSIGN_OR_RETURN(common::BinaryLabels truth, common::OneHotLabels(targets, num_classes));
  AVIARY_ASSIGN_OR_RETURN(
      common::EvalMetrics m,
      common::ComputeEvalMetrics(truth, common::MatrixView<float>(probs, targets.size(), num_classes)));
  record->val_auc = m.val_auc.value;
  record->val_roc_auc = m.val_roc_auc.value;
  record->val_cmap = m.val_cmap.value;
  record->val_acc = m.val_acc.value;
  return absl::OkStatus();
}

namespace {

// The loader's broken clips per reason, with the first one's message (it names the file).
void ReportBrokenClips(const LoaderStats& stats, const std::string& what, const std::string& fate) {
  for (const auto& [problem, count] : stats.problems) {
    auto example = stats.examples.find(problem);
    Log().Warn(absl::StrCat(count, " ", what, " as ", problem, fate,
                            example != stats.examples.end() ? absl::StrCat("; the first: ", example->second) : ""));
  }
}

}  // namespace

absl::Status Trainer::Run() {
  State& s = *state_;
  // AVIARY_PROFILE: from the run's first step (skip=0) at the earliest, and written when the run
  // returns (a failed multi-rank run ends the process without destroying the trainer).
  struct StopProfiler {
    StepProfiler* profiler;
    ~StopProfiler() {
      if (profiler != nullptr) profiler->Stop();
    }
  } stop_profiler{s.profiler.get()};
  if (s.profiler) s.profiler->AfterStep(0);
  const bool writer = s.rank == 0;  // only rank 0 writes the run folder
  const std::string config_path = s.Path("config.yaml");
  common::AtomicWriteOptions write;
  write.check = s.options.commit_check;
  absl::Status wrote;
  // A run with nothing left to train keeps the config.yaml of the epochs it holds (when there is
  // one): an early-stopped run resumed with --extend-epochs rewrote it to the new count, and a
  // later resume with the folder's own config.yaml was refused against last.pt.
  const bool nothing_to_do = s.stopped_early || s.start_epoch >= s.epochs;
  std::error_code no_stat;  // a stat that fails (EIO, EACCES) writes it, and the write says why
  if (writer && !(nothing_to_do && std::filesystem::exists(config_path, no_stat))) {
    wrote = common::WriteFileAtomically(config_path, common::PipelineConfigToYaml(s.config), write);
  }
  AVIARY_RETURN_IF_ERROR(s.ShareWriteOutcome(wrote, "config.yaml"));
  if (nothing_to_do) AVIARY_RETURN_IF_ERROR(s.CatchUpHistoryFiles(write));
  if (s.stopped_early) {
    Log().Info(absl::StrCat("nothing to do: the run stopped early after epoch ", s.start_epoch - 1,
                            " (train.early_stop_patience)"));
    return absl::OkStatus();
  }
  if (s.start_epoch >= s.epochs) {
    Log().Info(absl::StrCat("nothing to do: ", s.Path("last.pt"), " already holds all ", s.epochs,
                            " epochs (0-", s.epochs - 1, ")"));
    return absl::OkStatus();
  }
  LoaderStats first_validation, last_validation;  // the validation loader's totals after them
  for (int epoch = s.start_epoch; epoch < s.epochs; ++epoch) {
    absl::StatusOr<EpochRecord> record = absl::InternalError("not run");
    try {
      record = s.TrainEpoch(epoch);
    } catch (const std::exception& e) {
      record = absl::InternalError(absl::StrCat("rank ", s.rank, ": exception in epoch ", epoch, ": ", e.what()));
    }
    if (!record.ok()) return record.status();
    AVIARY_RETURN_IF_ERROR(s.CheckpointBeforeValidation());
    absl::Status validated;
    // train.ema_eval: validation (and best.pt, WriteEpochFiles) see the averaged weights.
    const bool swap = s.ema && s.train.ema_eval;
    if (swap) s.ema->Swap(*s.model);
    try {
      validated = s.Validate(&*record);
    } catch (const std::exception& e) {
      validated = absl::InternalError(absl::StrCat("rank ", s.rank, ": exception in validation of epoch ", epoch, ": ", e.what()));
    }
    if (swap) s.ema->Swap(*s.model);
    AVIARY_RETURN_IF_ERROR(validated);
    if (s.valid_loader) {
      // The same clips every validation: said once; a later one that left out others (a read
      // that failed even when made again) is said too: its metrics are over other clips.
      const LoaderStats valid = s.valid_loader->Stats();
      if (epoch == s.start_epoch) {
        ReportBrokenClips(valid, "validation clips left out", " (from every validation)");
        ReportReadRetries(valid.read_retries, valid, "in the first validation");
        first_validation = valid;
      } else {
        ReportValidationChanges(first_validation, last_validation, valid, epoch);
      }
      last_validation = valid;
    }
    bool write_best = false;
    const bool stop_early = s.TrackMonitor(&*record, &write_best);
    s.history.push_back(*record);
    if (writer && s.fault.kind == "slow_write" && s.fault.rank == 0 && s.step >= s.fault.step && !s.slowed) {
      // A loaded shared filesystem: the epoch's files take this long to write (once).
      Log().Warn(absl::StrFormat("AVIARY_FAULT_INJECT: rank 0 writes epoch %d's files %.1f s late", epoch,
                                 s.fault.seconds));
      std::this_thread::sleep_for(std::chrono::duration<double>(s.fault.seconds));
      s.slowed = true;
    }
    if (writer) wrote = s.WriteEpochFiles(epoch, write_best, write);
    AVIARY_RETURN_IF_ERROR(s.ShareWriteOutcome(wrote, absl::StrCat("epoch ", epoch, "'s files")));
    Log().Info(absl::StrFormat(
        "epoch %d/%d: lr %.3g loss %.4f acc %.4f | val loss %.4f auc %.4f roc_auc %.4f cmap %.4f "
        "acc %.4f | %.0f samples/s%s",
        epoch, s.epochs - 1, record->lr, record->train_loss, record->train_acc, record->val_loss,
        record->val_auc, record->val_roc_auc, record->val_cmap, record->val_acc,
        record->samples_per_s, record->best ? " | best" : ""));
    if (s.options.on_epoch) s.options.on_epoch(*record);
    if (stop_early) {
      Log().Info(absl::StrFormat(
          "early stop after epoch %d: %s did not improve by more than %g for %d epochs (since epoch %d); "
          "best.pt holds epoch %d",
          epoch, s.train.monitor, s.train.early_stop_min_delta, s.train.early_stop_patience, s.early_stop_epoch,
          s.best_epoch));
      break;
    }
  }
  ReportBrokenClips(s.trained_loader_stats, "training clips skipped", " (substituted)");
  ReportReadRetries(s.trained_loader_stats.read_retries, s.trained_loader_stats, "in the run's training");
  if (s.skipped_steps > 0) {
    // Counted per batch: with grad_accum_steps > 1 one is a micro-batch, and its optimizer step
    // may still have been taken from the others.
    Log().Warn(absl::StrCat(s.skipped_steps, s.accum > 1 ? " non-finite micro-batches skipped" : " non-finite steps skipped"));
  }
  return absl::OkStatus();
}

}  // namespace aviary::worker
