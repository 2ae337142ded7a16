#include "client/format.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <ctime>

#include <google/protobuf/util/json_util.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"

namespace aviary::cli {

int ClientExitCode(absl::StatusCode code) { return common::ExitCodeFor(code); }

std::string FormatClientError(const std::string& command, const absl::Status& status) {
  // The message is the server's (or a network's, without TLS): escaped like the text it quotes
  // (a run folder's entry names a worker wrote, in a delete's error), one line.
  return absl::StrCat("aviary ", command, ": ", absl::StatusCodeToString(status.code()), ": ",
                      PrintableLines(std::string(status.message()), " / "));
}

std::string JobStateName(v1::JobState state) {
  switch (state) {
    case v1::JOB_STATE_UNSPECIFIED: return "UNSPECIFIED";
    case v1::JOB_STATE_PENDING: return "PENDING";
    case v1::JOB_STATE_RUNNING: return "RUNNING";
    case v1::JOB_STATE_SUCCEEDED: return "SUCCEEDED";
    case v1::JOB_STATE_FAILED: return "FAILED";
    case v1::JOB_STATE_CANCELLED: return "CANCELLED";
    default: return absl::StrCat("?", static_cast<int>(state));
  }
}

std::string TaskStateName(v1::TaskState state) {
  switch (state) {
    case v1::TASK_STATE_UNSPECIFIED: return "UNSPECIFIED";
    case v1::TASK_STATE_BLOCKED: return "BLOCKED";
    case v1::TASK_STATE_READY: return "READY";
    case v1::TASK_STATE_LEASED: return "LEASED";
    case v1::TASK_STATE_SUCCEEDED: return "SUCCEEDED";
    case v1::TASK_STATE_FAILED: return "FAILED";
    case v1::TASK_STATE_CANCELLED: return "CANCELLED";
    default: return absl::StrCat("?", static_cast<int>(state));
  }
}

bool IsTerminal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

std::string FormatMetric(double value) {
  if (!std::isfinite(value)) return "-";
  // A diverging loss (3.4e38) was 44 digits wide in every table.
  if (std::fabs(value) >= 1e6) return absl::StrFormat("%.4e", value);
  return absl::StrFormat("%.4f", value);
}

std::string FormatSmall(double value) {
  if (!std::isfinite(value)) return "-";
  return absl::StrFormat("%.3g", value);
}

std::string FormatDuration(double seconds) {
  // Beyond 10^15 s (31 million years: an estimate from a rate near 0) int64 and llround are
  // near their end (1e19 s printed "-9223372036854775808s").
  if (!std::isfinite(seconds) || seconds < 0 || seconds >= 1e15) return "-";
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  if (s < 60) return absl::StrFormat("%ds", s);
  if (s < 3600) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  if (s < 86400) return absl::StrFormat("%dh%02dm", s / 3600, (s / 60) % 60);
  return absl::StrFormat("%dd%02dh", s / 86400, (s / 3600) % 24);
}

std::string FormatUnixMs(int64_t unix_ms) {
  if (unix_ms <= 0) return "-";
  std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

TaskProgress ProgressOf(const v1::TaskInfo& task) {
  TaskProgress p;
  const int64_t spe = task.steps_per_epoch();
  const int64_t step = std::max<int64_t>(0, task.latest().step());
  if (spe > 0) {
    p.epochs_done = static_cast<int>(std::min<int64_t>(step / spe, std::max(task.epochs(), 0)));
    p.step_in_epoch = step - static_cast<int64_t>(p.epochs_done) * spe;
    if (p.epochs_done > 0 && p.epochs_done == task.epochs()) {
      // Past the plan's last step: show the last epoch as full.
      p.step_in_epoch = std::min<int64_t>(spe, step - static_cast<int64_t>(p.epochs_done - 1) * spe);
    }
    if (task.epochs() > 0) {
      p.total_steps = spe * task.epochs();
      p.fraction = std::min(1.0, static_cast<double>(step) / static_cast<double>(p.total_steps));
    }
  } else {
    // Without steps_per_epoch only epoch ends tell the progress.
    // An epoch end reports its epoch 0-based: the first one's end is one epoch done (within the
    // plan, when it is known).
    if (task.latest().epoch_end()) {
      const int64_t done = std::max<int64_t>(int64_t{task.latest().epoch()} + 1, 0);
      p.epochs_done = static_cast<int>(task.epochs() > 0 ? std::min<int64_t>(done, task.epochs()) : done);
    }
    if (task.epochs() > 0 && task.latest().epoch_end()) {
      p.fraction = std::min(1.0, static_cast<double>(p.epochs_done) / task.epochs());
    }
  }
  if (task.state() == v1::TASK_STATE_SUCCEEDED) p.fraction = 1.0;
  return p;
}

void EtaTracker::Observe(const v1::TaskInfo& task, double now_s) {
  const int64_t step = task.latest().step();
  auto it = samples_.find(task.task_id());
  // A new attempt (or a step count that went back, e.g. a resume from last.pt) restarts the
  // measurement: its rate is what matters for the time left.
  if (it == samples_.end() || it->second.attempt != task.attempt() || step < it->second.last_step) {
    Sample s;
    s.first_step = s.last_step = step;
    s.attempt = task.attempt();
    samples_[task.task_id()] = s;
    return;
  }
  Sample& s = it->second;
  if (step == s.last_step) return;
  if (s.first_s < 0) {  // the first change: the measurement starts here
    s.first_s = now_s;
    s.first_step = step;
  }
  s.last_step = step;
  s.last_s = now_s;
}

double EtaTracker::SecondsLeft(const v1::TaskInfo& task) const {
  if (task.state() != v1::TASK_STATE_LEASED) return -1;
  auto it = samples_.find(task.task_id());
  if (it == samples_.end()) return -1;
  const Sample& s = it->second;
  const TaskProgress p = ProgressOf(task);
  if (p.total_steps <= 0 || s.last_step <= s.first_step || s.last_s <= s.first_s) return -1;
  const double rate = (s.last_step - s.first_step) / (s.last_s - s.first_s);
  return std::max<double>(0, p.total_steps - s.last_step) / rate;
}

namespace {

// The characters in `text` (UTF-8: the bytes that start one), the columns most take on a
// terminal: a byte count padded "héé" one column short.
size_t Utf8Columns(absl::string_view text) {
  size_t n = 0;
  for (char ch : text) n += (static_cast<unsigned char>(ch) & 0xc0) != 0x80;
  return n;
}

}  // namespace

std::string PadRight(const std::string& text, size_t width) {
  const size_t columns = Utf8Columns(text);
  if (columns >= width) return text;
  return text + std::string(width - columns, ' ');
}

std::string FormatColumns(const std::vector<std::vector<std::string>>& rows) {
  // Every cell escaped here, whatever its caller did (PrintableText changes nothing twice): a
  // checkpoint path a worker reported reached the terminal raw in `watch`'s closing table.
  std::vector<std::vector<std::string>> cells(rows.size());
  std::vector<size_t> widths;
  for (size_t r = 0; r < rows.size(); ++r) {
    const auto& row = rows[r];
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t c = 0; c < row.size(); ++c) {
      cells[r].push_back(PrintableText(row[c]));
      widths[c] = std::max(widths[c], Utf8Columns(cells[r].back()));
    }
  }
  std::string out;
  for (const auto& row : cells) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      if (c + 1 == row.size()) {
        absl::StrAppend(&line, row[c]);
      } else {
        absl::StrAppend(&line, PadRight(row[c], widths[c]), "  ");
      }
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    absl::StrAppend(&out, line, "\n");
  }
  return out;
}

double LatestLoss(const v1::TaskInfo& task) {
  return task.has_latest() ? task.latest().train_loss() : std::nan("");
}

double ShownValAuc(const v1::TaskInfo& task, double last_epoch_val_auc) {
  if (task.has_latest() && std::isfinite(task.latest().val_auc())) return task.latest().val_auc();
  if (std::isfinite(last_epoch_val_auc)) return last_epoch_val_auc;
  if (task.has_best()) return task.best().val_auc();
  return std::nan("");
}

std::string SweepPointSuffix(const v1::TaskInfo& task) {
  // The coordinator names a sweep's tasks JOB/STAGE-fFOLD-pPOINT and other tasks JOB/STAGE-fFOLD
  // (coordinator/scheduler.cc): sweep_point alone is 0 for both point 0 and no sweep.
  const std::string suffix = absl::StrCat("-p", task.sweep_point());
  return absl::EndsWith(task.task_id(), absl::StrCat("-f", task.fold(), suffix)) ? suffix : "";
}

std::string FormatTaskLine(const v1::TaskInfo& task, double eta_s, double last_epoch_val_auc) {
  const TaskProgress p = ProgressOf(task);
  const int width = std::max(2, static_cast<int>(absl::StrCat(task.epochs()).size()));
  std::string epoch =
      task.epochs() > 0 ? absl::StrFormat("epoch %*d/%d", width, p.epochs_done, task.epochs())
                        : absl::StrFormat("epoch %*d/?", width, p.epochs_done);
  std::string step = "step -";
  if (task.steps_per_epoch() > 0) {
    const std::string spe = absl::StrCat(task.steps_per_epoch());
    step = absl::StrFormat("step %*d/%s", static_cast<int>(spe.size()), p.step_in_epoch, spe);
  }
  std::string line = absl::StrFormat("%-8s  %-3s %-9s  %s  %s  loss %s  val_auc %s",
                                     task.stage(), absl::StrCat("f", task.fold(), SweepPointSuffix(task)),
                                     TaskStateName(task.state()),
                                     epoch, step, FormatMetric(LatestLoss(task)),
                                     FormatMetric(ShownValAuc(task, last_epoch_val_auc)));
  if (task.state() == v1::TASK_STATE_LEASED) {
    absl::StrAppend(&line, "  ETA ", FormatDuration(eta_s));
  } else if (task.restarts() > 0) {
    absl::StrAppend(&line, "  restarts ", task.restarts());
  }
  if (!task.error().empty() && task.state() == v1::TASK_STATE_FAILED) {
    absl::StrAppend(&line, "  error: ", PrintableLines(task.error(), " / "));
  }
  return line;
}

namespace {

const char* UtcSuffix(int64_t unix_ms) { return unix_ms > 0 ? " UTC" : ""; }

int TasksDone(const v1::JobInfo& job) {
  int done = 0;
  for (const auto& t : job.tasks()) done += t.state() == v1::TASK_STATE_SUCCEEDED;
  return done;
}

}  // namespace

// TASKS is as wide as a job's most ("4096/4096 done"): a sweep's row keeps NAME in its column.
std::string JobLineHeader() {
  return absl::StrFormat("%-14s  %-9s  %-19s  %-14s  %s", "JOB", "STATE", "CREATED (UTC)",
                         "TASKS", "NAME");
}

std::string FormatJobLine(const v1::JobInfo& job) {
  std::string name = PrintableText(job.name());
  if (const std::string tags = FormatTags(job); !tags.empty()) {
    absl::StrAppend(&name, name.empty() ? "" : "  ", "[", tags, "]");
  }
  return absl::StrFormat("%-14s  %-9s  %-19s  %-14s  %s", job.job_id(), JobStateName(job.state()),
                         FormatUnixMs(job.created_unix_ms()),
                         absl::StrCat(TasksDone(job), "/", job.tasks_size(), " done"), name);
}

std::string FormatTags(const v1::JobInfo& job) {
  std::map<std::string, std::string> sorted(job.tags().begin(), job.tags().end());
  std::string out;
  for (const auto& [key, value] : sorted) {
    absl::StrAppend(&out, out.empty() ? "" : " ", PrintableText(key), value.empty() ? "" : "=",
                    PrintableText(value));
  }
  return out;
}

std::string FormatSweepBest(const v1::JobInfo& job) {
  if (!job.has_sweep_best()) return "";
  const v1::SweepBest& best = job.sweep_best();
  std::string overrides;
  for (const std::string& o : best.overrides()) absl::StrAppend(&overrides, overrides.empty() ? "" : ", ", o);
  return absl::StrCat("point ", best.point(), " (", PrintableText(overrides), "): ", best.metric(), " ",
                      FormatMetric(best.value()), ", mean of ", best.tasks(), "/", best.tasks_total(), " folds");
}

absl::Status ParseSweepFlag(const std::string& text, v1::SweepAxis* axis) {
  auto bad = [&text](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("--sweep '", text, "': ", why, " (expected key=[v1,v2,...])"));
  };
  const size_t eq = text.find('=');
  if (eq == std::string::npos) return bad("no '='");
  const std::string key(absl::StripAsciiWhitespace(text.substr(0, eq)));
  if (key.empty()) return bad("the key is empty");
  const std::string list(absl::StripAsciiWhitespace(text.substr(eq + 1)));
  if (list.size() < 2 || list.front() != '[' || list.back() != ']') return bad("the values are not one [...] list");
  axis->Clear();
  axis->set_key(key);
  int depth = 0;
  char quote = 0;
  std::string item;
  auto finish = [&]() -> absl::Status {
    const std::string value(absl::StripAsciiWhitespace(item));
    if (value.empty()) return bad(absl::StrCat("value ", axis->values_size() + 1, " is empty"));
    axis->add_values(value);
    item.clear();
    return absl::OkStatus();
  };
  // The last character of `item` that is not a space (0: none).
  auto last_non_space = [&item]() -> char {
    for (size_t k = item.size(); k > 0; --k) {
      if (item[k - 1] != ' ' && item[k - 1] != '\t') return item[k - 1];
    }
    return 0;
  };
  for (size_t i = 1; i + 1 < list.size(); ++i) {
    const char c = list[i];
    if (quote != 0) {
      if ((quote == '"' && c == '\\' && i + 2 < list.size()) ||  // an escape: the next character is not the end
          (quote == '\'' && c == '\'' && i + 2 < list.size() && list[i + 1] == '\'')) {  // '' in single quotes
        item += c;
        item += list[++i];
        continue;
      }
      if (c == quote) quote = 0;
    } else if ((c == '"' || c == '\'') && std::strchr("[{,:", last_non_space()) != nullptr) {
      // As YAML reads a flow collection: a quote opens a quoted scalar only where a scalar starts
      // (`it's` is a plain one). strchr finds the terminating 0 too: the item's start.
      quote = c;
    } else if (c == '[' || c == '{') {
      ++depth;
    } else if (c == ']' || c == '}') {
      if (--depth < 0) return bad("unbalanced brackets");
    } else if (c == ',' && depth == 0) {
      AVIARY_RETURN_IF_ERROR(finish());
      continue;
    }
    item += c;
  }
  if (quote != 0 || depth != 0) return bad("unbalanced brackets or quotes");
  return finish();
}

std::string FormatGroups(const std::vector<v1::GroupInfo>& groups, int64_t now_unix_ms) {
  std::vector<std::vector<std::string>> rows{
      {"GROUP", "RANKS", "BACKEND", "DEVICES", "HOSTS", "TASK", "SAMPLES/S", "GPU MEM", "HEARTBEAT",
       "REGISTERED (UTC)"}};
  for (const v1::GroupInfo& g : groups) {
    std::map<std::string, int> devices, hosts;
    for (const std::string& d : g.devices()) ++devices[d];
    for (const std::string& h : g.hosts()) ++hosts[h];
    auto counted = [](const std::map<std::string, int>& names) {
      std::string out;
      for (const auto& [name, n] : names) {
        absl::StrAppend(&out, out.empty() ? "" : ",", PrintableText(name), n > 1 ? absl::StrCat("x", n) : "");
      }
      return out.empty() ? std::string("-") : out;
    };
    const bool busy = !g.task_id().empty();
    const double rate = busy && g.has_latest() ? g.latest().samples_per_s() : std::nan("");
    rows.push_back({g.group_id(), absl::StrCat(g.world_size()), g.backend().empty() ? "-" : PrintableText(g.backend()),
                    counted(devices), counted(hosts), busy ? g.task_id() : std::string("idle"),
                    std::isfinite(rate) ? absl::StrFormat("%.1f", rate) : std::string("-"),
                    g.gpu_memory_bytes() > 0 ? absl::StrFormat("%.1f GiB", g.gpu_memory_bytes() / 1073741824.0)
                                             : std::string("-"),
                    absl::StrCat(FormatDuration((now_unix_ms - g.last_heartbeat_unix_ms()) / 1000.0), " ago"),
                    FormatUnixMs(g.registered_unix_ms())});
  }
  return FormatColumns(rows);
}

std::string FormatLogLine(const std::string& task_id, const v1::LogLine& line) {
  // The worker's clock, UTC; a time of 0 or before (a clock unset) shows as such, not as
  // "-.000" or "-.-500".
  const std::string time = line.time_unix_ms() <= 0 ? std::string("--:--:--.---") : [&] {
    const std::string stamp = FormatUnixMs(line.time_unix_ms());
    return absl::StrCat(stamp.size() > 11 ? stamp.substr(11) : stamp,
                        absl::StrFormat(".%03d", line.time_unix_ms() % 1000));
  }();
  return absl::StrCat(task_id.empty() ? "" : PrintableText(task_id) + "  ", time, " ",
                      PadRight(line.level().empty() ? "info" : PrintableText(line.level()), 7), " [rank ", line.rank(),
                      "] ", PrintableText(line.text()));
}

absl::StatusOr<std::string> ToJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  options.add_whitespace = true;
  std::string json;
  auto st = google::protobuf::util::MessageToJsonString(message, &json, options);
  if (!st.ok()) {
    return absl::InternalError(absl::StrCat(message.GetTypeName(), " to JSON: ", std::string(st.message())));
  }
  if (json.empty() || json.back() != '\n') json += '\n';
  return json;
}

std::string FormatJobStatus(const v1::JobInfo& job) {
  std::string out;
  absl::StrAppend(&out, "job      ", job.job_id(), "\n");
  if (!job.name().empty()) absl::StrAppend(&out, "name     ", PrintableText(job.name()), "\n");
  absl::StrAppend(&out, "state    ", JobStateName(job.state()), "\n");
  absl::StrAppend(&out, "created  ", FormatUnixMs(job.created_unix_ms()), UtcSuffix(job.created_unix_ms()), "\n");
  absl::StrAppend(&out, "updated  ", FormatUnixMs(job.updated_unix_ms()), UtcSuffix(job.updated_unix_ms()), "\n");
  absl::StrAppend(&out, "tasks    ", TasksDone(job), "/", job.tasks_size(), " succeeded\n");
  if (!job.error().empty()) absl::StrAppend(&out, "error    ", PrintableLines(job.error(), "\n         "), "\n");
  if (const std::string tags = FormatTags(job); !tags.empty()) absl::StrAppend(&out, "tags     ", tags, "\n");
  if (!job.note().empty()) absl::StrAppend(&out, "note     ", PrintableText(job.note()), "\n");
  if (!job.sweep().empty()) {
    size_t points = 1;
    std::string axes;
    for (const v1::SweepAxis& axis : job.sweep()) {
      points *= static_cast<size_t>(axis.values_size());
      std::string values;
      for (const std::string& v : axis.values()) absl::StrAppend(&values, values.empty() ? "" : ",", v);
      absl::StrAppend(&axes, axes.empty() ? "" : " x ", PrintableText(axis.key()), "=[", PrintableText(values), "]");
    }
    absl::StrAppend(&out, "sweep    ", points, " points: ", axes, "\n");
    const std::string best = FormatSweepBest(job);
    absl::StrAppend(&out, "best     ", best.empty() ? absl::StrCat("- (no point has a best ", job.monitor(), " yet)") : best,
                    "\n");
  }
  if (job.tasks_size() == 0) return out;
  std::vector<std::vector<std::string>> rows{{"TASK", "STATE", "EPOCH", "STEP", "LOSS",
                                              "VAL_AUC", "BEST_AUC", "RESTARTS", "ATTEMPT",
                                              "GROUP", "RUN"}};
  for (const auto& t : job.tasks()) {
    const TaskProgress p = ProgressOf(t);
    rows.push_back({t.task_id(), TaskStateName(t.state()),
                    absl::StrCat(p.epochs_done, "/", t.epochs()),
                    t.steps_per_epoch() > 0
                        ? absl::StrCat(p.step_in_epoch, "/", t.steps_per_epoch())
                        : std::string("-"),
                    FormatMetric(LatestLoss(t)), FormatMetric(ShownValAuc(t)),
                    t.has_best() ? FormatMetric(t.best().val_auc()) : std::string("-"),
                    absl::StrCat(t.restarts()), absl::StrCat(t.attempt()),
                    t.group_id().empty() ? std::string("-") : t.group_id(),
                    t.out_dir().empty() ? std::string("-") : t.out_dir()});
  }
  absl::StrAppend(&out, "\n", FormatColumns(rows));
  for (const auto& t : job.tasks()) {
    if (!t.error().empty()) {
      const std::string head = absl::StrCat(t.task_id(), ": ");
      absl::StrAppend(&out, head, PrintableLines(t.error(), absl::StrCat("\n", std::string(head.size(), ' '))), "\n");
    }
  }
  return out;
}

std::string FormatBestTable(const v1::JobInfo& job) {
  std::vector<std::vector<std::string>> rows{
      {"TASK", "STATE", "BEST_EPOCH", "VAL_AUC", "VAL_ROC_AUC", "VAL_ACC", "CHECKPOINT"}};
  for (const auto& t : job.tasks()) {
    if (t.has_best()) {
      rows.push_back({t.task_id(), TaskStateName(t.state()), absl::StrCat(t.best().epoch()),
                      FormatMetric(t.best().val_auc()), FormatMetric(t.best().val_roc_auc()),
                      FormatMetric(t.best().val_acc()),
                      t.best_checkpoint().empty() ? std::string("-") : t.best_checkpoint()});
    } else {
      rows.push_back({t.task_id(), TaskStateName(t.state()), "-", "-", "-", "-", "-"});
    }
  }
  return FormatColumns(rows);
}

namespace {

std::string CsvNumber(double v) {
  if (std::isnan(v)) return "nan";
  return absl::StrFormat("%.6g", v);
}

// Quotes a CSV field when it holds a comma, a quote or a line break.
std::string CsvField(const std::string& text) {
  if (text.find_first_of(",\"\n\r") == std::string::npos) return text;
  std::string out = "\"";
  for (char c : text) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

}  // namespace

std::string FormatHistoryTable(const std::vector<v1::HistoryRow>& rows) {
  std::vector<std::vector<std::string>> table{{"TASK", "ATTEMPT", "EPOCH", "STEP", "LR",
                                               "TRAIN_LOSS", "TRAIN_ACC", "VAL_LOSS", "VAL_AUC",
                                               "VAL_ROC_AUC", "VAL_CMAP", "VAL_ACC",
                                               "SAMPLES/S"}};
  for (const auto& r : rows) {
    const v1::Metrics& m = r.metrics();
    table.push_back({r.task_id(), absl::StrCat(r.attempt()), absl::StrCat(m.epoch()),
                     absl::StrCat(m.step()), FormatSmall(m.lr()), FormatMetric(m.train_loss()),
                     FormatMetric(m.train_acc()), FormatMetric(m.val_loss()),
                     FormatMetric(m.val_auc()), FormatMetric(m.val_roc_auc()),
                     FormatMetric(m.val_cmap()), FormatMetric(m.val_acc()),
                     std::isfinite(m.samples_per_s()) ? absl::StrFormat("%.1f", m.samples_per_s())
                                                      : std::string("-")});
  }
  return FormatColumns(table);
}

std::string FormatHistoryCsv(const std::vector<v1::HistoryRow>& rows) {
  std::string out =
      "task_id,stage,fold,attempt,epoch,step,lr,train_loss,train_acc,val_loss,val_auc,"
      "val_roc_auc,val_cmap,val_acc,samples_per_s\n";
  for (const auto& r : rows) {
    const v1::Metrics& m = r.metrics();
    absl::StrAppend(&out, CsvField(r.task_id()), ",", CsvField(r.stage()), ",", r.fold(), ",",
                    r.attempt(), ",", m.epoch(), ",", m.step(), ",",
                    absl::StrJoin({CsvNumber(m.lr()), CsvNumber(m.train_loss()),
                                   CsvNumber(m.train_acc()), CsvNumber(m.val_loss()),
                                   CsvNumber(m.val_auc()), CsvNumber(m.val_roc_auc()),
                                   CsvNumber(m.val_cmap()), CsvNumber(m.val_acc()),
                                   CsvNumber(m.samples_per_s())},
                                  ","),
                    "\n");
  }
  return out;
}

std::string PrintableText(const std::string& text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f) {
      absl::StrAppend(&out, absl::StrFormat("\\x%02x", c));
    } else if (c == 0xc2 && i + 1 < text.size() && static_cast<unsigned char>(text[i + 1]) >= 0x80 &&
               static_cast<unsigned char>(text[i + 1]) <= 0x9f) {
      // U+0080..U+009F, the C1 controls: U+009B is CSI on terminals that honour C1 codes.
      absl::StrAppend(&out, absl::StrFormat("\\u%04x", static_cast<unsigned char>(text[i + 1])));
      ++i;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

std::string PrintableLines(const std::string& text, absl::string_view separator) {
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  if (lines.size() > 1 && lines.back().empty()) lines.pop_back();
  std::string out;
  for (size_t i = 0; i < lines.size(); ++i) {
    std::string& line = lines[i];
    if (!line.empty() && line.back() == '\r') line.pop_back();
    absl::StrAppend(&out, i == 0 ? "" : separator, PrintableText(line));
  }
  return out;
}

std::vector<int> WatchRows(const v1::JobInfo& job, int max_rows, std::string* summary) {
  summary->clear();
  const int n = job.tasks_size();
  std::vector<int> rows;
  if (n <= max_rows) {
    for (int i = 0; i < n; ++i) rows.push_back(i);
    return rows;
  }
  auto rank = [](v1::TaskState state) {
    switch (state) {
      case v1::TASK_STATE_LEASED: return 0;
      case v1::TASK_STATE_READY: return 1;
      case v1::TASK_STATE_BLOCKED: return 2;
      default: return 3;
    }
  };
  std::vector<int> order(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return rank(job.tasks(a).state()) < rank(job.tasks(b).state());
  });
  const size_t shown = static_cast<size_t>(std::max(0, max_rows - 1));
  rows.assign(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(std::min(shown, order.size())));
  std::sort(rows.begin(), rows.end());
  std::map<std::string, int> hidden;  // state name -> count
  for (size_t i = rows.size(); i < order.size(); ++i) ++hidden[TaskStateName(job.tasks(order[i]).state())];
  *summary = absl::StrCat("... ", order.size() - rows.size(), " more tasks:");
  bool first = true;
  for (const auto& [state, count] : hidden) {
    absl::StrAppend(summary, first ? " " : ", ", count, " ", state);
    first = false;
  }
  return rows;
}

}  // namespace aviary::cli
