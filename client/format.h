// Pure text helpers of the `aviary` gRPC client (client/rpc_commands.cc): state
// names, numbers, durations, the live line of a task, the tables of `status`, `list`, `watch`
// and `history`, the history CSV, and the client's exit-code mapping. No I/O, no gRPC calls;
// every function is a pure function of its arguments and thread-safe (EtaTracker is not
// thread-safe: one per watcher).
#ifndef AVIARY_CLIENT_FORMAT_H_
#define AVIARY_CLIENT_FORMAT_H_

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"
#include "proto/aviary.pb.h"

namespace aviary::cli {

// The client's exit code (docs/SERVICE.md, "Client"): 0 for OK; 2 for caller errors
// (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, UNAUTHENTICATED, PERMISSION_DENIED,
// ALREADY_EXISTS, OUT_OF_RANGE); 1 otherwise.
int ClientExitCode(absl::StatusCode code);

// "aviary CMD: CODE_NAME: message", e.g. "aviary status: NOT_FOUND: job j0123 not found"; the
// message as PrintableLines joined by " / " (it comes from the server).
std::string FormatClientError(const std::string& command, const absl::Status& status);

// "PENDING", "RUNNING", ... / "BLOCKED", "READY", "LEASED", ... (the enum name without its
// prefix); "?<n>" for values this client does not know.
std::string JobStateName(v1::JobState state);
std::string TaskStateName(v1::TaskState state);
bool IsTerminal(v1::JobState state);

// "%.4f" for finite values ("%.4e" from 1e6 on), "-" for NaN and infinities.
std::string FormatMetric(double value);
// A learning rate or other small number: "%.3g", "-" when not finite.
std::string FormatSmall(double value);
// "45s", "12m05s", "3h02m", "2d04h"; "-" for negative, non-finite or >= 1e15 seconds.
std::string FormatDuration(double seconds);
// Unix milliseconds as UTC "YYYY-MM-DD HH:MM:SS"; "-" for 0.
std::string FormatUnixMs(int64_t unix_ms);

// Progress of a task from its latest point: `step` is the optimizer steps so far (the
// trainer's global step) and `steps_per_epoch` comes from the group (0 until known).
struct TaskProgress {
  int epochs_done = 0;          // finished epochs
  int64_t step_in_epoch = 0;    // steps into the current epoch
  int64_t total_steps = 0;      // steps_per_epoch * epochs, 0 when unknown
  double fraction = -1;         // 0..1, -1 when unknown
};
TaskProgress ProgressOf(const v1::TaskInfo& task);

// Estimates the time left of each task from the steps it made while being watched, measured
// from the first step change seen (the first sight's step was reported up to a report interval
// earlier: measured from there, the first rate was too high, "ETA 0s" with most steps left).
class EtaTracker {
 public:
  // Records the task's latest step at `now_s` (any monotonic clock, seconds).
  void Observe(const v1::TaskInfo& task, double now_s);
  // Seconds left, or -1 when unknown (no rate yet, unknown plan, or not LEASED).
  double SecondsLeft(const v1::TaskInfo& task) const;

 private:
  struct Sample {
    double first_s = -1, last_s = -1;  // -1: no step change seen yet
    int64_t first_step = 0, last_step = 0;
    int32_t attempt = 0;
  };
  std::map<std::string, Sample> samples_;
};

// `text` with control characters written as \xNN, and the C1 controls U+0080..U+009F as \uNNNN:
// a job name from a database older than the coordinator's check (docs/SERVICE.md), or a worker's
// error text, must not move the cursor or colour the terminal.
std::string PrintableText(const std::string& text);

// A multi-line text (a task's error: a worker's stack of causes) as PrintableText lines joined
// by `separator` ("\r\n" and "\n" end a line; a trailing newline adds none): `watch` keeps each
// task on its one row, `status` indents the lines after the first.
std::string PrintableLines(const std::string& text, absl::string_view separator);

// The tasks `watch` draws when its block may have at most `max_rows` task rows (the terminal's
// height: a block taller than the screen cannot be redrawn in place). All of them when they
// fit; else max_rows - 1 of them, LEASED first, then READY and BLOCKED, then finished ones (each
// group in job order), returned in job order, and `*summary` gets the line that stands for
// the rest ("... 7 more tasks: 6 SUCCEEDED, 1 BLOCKED"); empty when all fit.
std::vector<int> WatchRows(const v1::JobInfo& job, int max_rows, std::string* summary);

// The latest training loss (NaN before the first report).
double LatestLoss(const v1::TaskInfo& task);
// The val AUC shown for a task: the latest point's when it has one (epoch ends); else
// `last_epoch_val_auc` (what a watcher saw at the last epoch end; step points carry NaN); else
// the best epoch's once known; else NaN.
double ShownValAuc(const v1::TaskInfo& task, double last_epoch_val_auc = std::nan(""));

// "-p3" for a task of sweep point 3 (its task id ends in "-p3", as `status` shows it); "" for a
// task of a job without a sweep.
std::string SweepPointSuffix(const v1::TaskInfo& task);

// The live line of one task:
// "finetune  f1  LEASED     epoch  3/25  step  120/400  loss 2.3456  val_auc 0.4123  ETA 12m05s";
// a sweep's task names its point after the fold: "finetune  f1-p3  LEASED ...".
std::string FormatTaskLine(const v1::TaskInfo& task, double eta_s,
                           double last_epoch_val_auc = std::nan(""));

// The job's one-line summary used by `list` and as the header of `status` / `watch`:
// "j0123456789ab  RUNNING    2026-11-25 16:00:00  2/6 tasks done  name".
std::string FormatJobLine(const v1::JobInfo& job);
// Column header matching FormatJobLine.
std::string JobLineHeader();

// `status`: the job's fields, then one row per task (state, epoch, step, latest loss and
// val AUC, best val AUC, restarts, attempt, group, run folder, error).
std::string FormatJobStatus(const v1::JobInfo& job);

// `watch`'s closing table: per task its state, best epoch, val_auc, val_roc_auc, val_acc.
std::string FormatBestTable(const v1::JobInfo& job);

// `history`: an aligned table of the epoch rows / the same as CSV with the header
// task_id,stage,fold,attempt,epoch,step,lr,train_loss,train_acc,val_loss,val_auc,
// val_roc_auc,val_cmap,val_acc,samples_per_s (NaN written as "nan", as history.csv).
std::string FormatHistoryTable(const std::vector<v1::HistoryRow>& rows);
std::string FormatHistoryCsv(const std::vector<v1::HistoryRow>& rows);

// --- Experiments (issue 16).

// A job's tags as "k=v k2" (sorted by key; a bare key has no '='); "" without tags.
std::string FormatTags(const v1::JobInfo& job);
// "point 3 (train.lr=5e-4, model.dropout=0.3): val_auc 0.5123, mean of 2/2 folds"; "" when the
// job has no sweep_best.
std::string FormatSweepBest(const v1::JobInfo& job);
// A --sweep value "key=[v1,v2,...]" as an axis: the key, then the list's items split at its
// top-level commas (brackets, braces and quotes nest), each trimmed. INVALID_ARGUMENT naming the
// text for a missing '=', an empty key, a value that is not one [...] list, or an empty item.
absl::Status ParseSweepFlag(const std::string& text, v1::SweepAxis* axis);
// `aviary groups`: one row per group (id, world size, backend, devices, hosts, task, samples/s,
// last heartbeat age at `now_unix_ms`).
std::string FormatGroups(const std::vector<v1::GroupInfo>& groups, int64_t now_unix_ms);
// `aviary logs`: "HH:MM:SS.mmm LEVEL [rank R] text" (the worker's clock, UTC; "--:--:--.---"
// for a time of 0 or before), with "TASK " first when `task_id` is set.
std::string FormatLogLine(const std::string& task_id, const v1::LogLine& line);
// The message as JSON (proto field names, defaults printed, indented), ending with a newline.
absl::StatusOr<std::string> ToJson(const google::protobuf::Message& message);

// Pads `text` with spaces to `width` columns (a column a UTF-8 character; left-aligned; longer
// text is kept whole).
std::string PadRight(const std::string& text, size_t width);

// Renders rows as columns separated by two spaces, each column as wide as its widest cell (in
// characters); the first row is the header. Every cell is written as PrintableText.
std::string FormatColumns(const std::vector<std::vector<std::string>>& rows);

}  // namespace aviary::cli

#endif  // AVIARY_CLIENT_FORMAT_H_
