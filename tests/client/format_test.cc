#include "client/format.h"

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace aviary::cli {
namespace {

v1::TaskInfo Task(const std::string& stage, int fold, v1::TaskState state, int epochs,
                  int steps_per_epoch, int64_t step) {
  v1::TaskInfo t;
  t.set_task_id(absl::StrCat("j0123456789ab/", stage, "-f", fold));
  t.set_job_id("j0123456789ab");
  t.set_stage(stage);
  t.set_fold(fold);
  t.set_state(state);
  t.set_epochs(epochs);
  t.set_steps_per_epoch(steps_per_epoch);
  t.set_attempt(1);
  t.mutable_latest()->set_step(step);
  t.mutable_latest()->set_train_loss(1.5);
  t.mutable_latest()->set_val_auc(std::nan(""));
  return t;
}

TEST(ClientExitCodeTest, CallerErrorsAreTwoOthersOne) {
  for (auto code : {absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
                    absl::StatusCode::kFailedPrecondition, absl::StatusCode::kUnauthenticated,
                    absl::StatusCode::kPermissionDenied, absl::StatusCode::kAlreadyExists,
                    absl::StatusCode::kOutOfRange}) {
    EXPECT_EQ(ClientExitCode(code), 2) << absl::StatusCodeToString(code);
  }
  for (auto code : {absl::StatusCode::kUnavailable, absl::StatusCode::kDeadlineExceeded,
                    absl::StatusCode::kInternal, absl::StatusCode::kUnknown,
                    absl::StatusCode::kCancelled, absl::StatusCode::kUnimplemented}) {
    EXPECT_EQ(ClientExitCode(code), 1) << absl::StatusCodeToString(code);
  }
  EXPECT_EQ(ClientExitCode(absl::StatusCode::kOk), 0);
}

TEST(ClientFormatTest, ErrorLineNamesCommandAndCode) {
  EXPECT_EQ(FormatClientError("status", absl::NotFoundError("job jx not found")),
            "aviary status: NOT_FOUND: job jx not found");
  EXPECT_EQ(FormatClientError("watch", absl::UnavailableError("down")),
            "aviary watch: UNAVAILABLE: down");
  // The message is the server's (a run folder's entry names, in a delete's): escaped, one line.
  EXPECT_EQ(FormatClientError("x", absl::NotFoundError("a\x1b[2J\nb")), "aviary x: NOT_FOUND: a\\x1b[2J / b");
}

TEST(ClientFormatTest, DurationsAndNumbers) {
  EXPECT_EQ(FormatDuration(45), "45s");
  EXPECT_EQ(FormatDuration(725), "12m05s");
  EXPECT_EQ(FormatDuration(3 * 3600 + 125), "3h02m");
  EXPECT_EQ(FormatDuration(2 * 86400 + 4 * 3600 + 59), "2d04h");
  EXPECT_EQ(FormatDuration(-1), "-");
  EXPECT_EQ(FormatDuration(std::nan("")), "-");
  EXPECT_EQ(FormatDuration(1e19), "-");  // was "-9223372036854775808s"
  EXPECT_EQ(FormatDuration(9.99e14), "11562500000d00h");
  EXPECT_EQ(FormatMetric(0.123456), "0.1235");
  EXPECT_EQ(FormatMetric(3.4e38), "3.4000e+38");  // a diverging loss: 44 digits wide in "%.4f"
  EXPECT_EQ(FormatMetric(-2.5e6), "-2.5000e+06");
  EXPECT_EQ(FormatMetric(999999.5), "999999.5000");
  EXPECT_EQ(FormatMetric(std::nan("")), "-");
  EXPECT_EQ(FormatMetric(INFINITY), "-");
  EXPECT_EQ(FormatSmall(0.00025), "0.00025");
  EXPECT_EQ(FormatUnixMs(0), "-");
  EXPECT_EQ(FormatUnixMs(86400000LL + 3723000LL), "1970-01-02 01:02:03");
}

TEST(ClientFormatTest, ProgressSplitsGlobalStepsIntoEpochs) {
  TaskProgress p = ProgressOf(Task("pretrain", 0, v1::TASK_STATE_LEASED, 25, 400, 1320));
  EXPECT_EQ(p.epochs_done, 3);
  EXPECT_EQ(p.step_in_epoch, 120);
  EXPECT_EQ(p.total_steps, 10000);
  EXPECT_DOUBLE_EQ(p.fraction, 0.132);
  // At the end of the plan the last epoch shows full, not "0 steps into epoch 26".
  p = ProgressOf(Task("finetune", 1, v1::TASK_STATE_SUCCEEDED, 3, 10, 30));
  EXPECT_EQ(p.epochs_done, 3);
  EXPECT_EQ(p.step_in_epoch, 10);
  EXPECT_DOUBLE_EQ(p.fraction, 1.0);
  // Unknown steps_per_epoch: nothing to divide.
  p = ProgressOf(Task("finetune", 1, v1::TASK_STATE_LEASED, 3, 0, 30));
  EXPECT_EQ(p.total_steps, 0);
  EXPECT_EQ(p.fraction, -1);
  // There the epoch ends tell it: epoch 0's end (epochs are 0-based) is one of 3 done, not none.
  v1::TaskInfo ended = Task("finetune", 1, v1::TASK_STATE_LEASED, 3, 0, 30);
  ended.mutable_latest()->set_epoch(0);
  ended.mutable_latest()->set_epoch_end(true);
  p = ProgressOf(ended);
  EXPECT_EQ(p.epochs_done, 1);
  EXPECT_DOUBLE_EQ(p.fraction, 1.0 / 3);
  ended.mutable_latest()->set_epoch(7);  // past the plan (an --extend-epochs run's old plan)
  EXPECT_EQ(ProgressOf(ended).epochs_done, 3);
  ended.set_epochs(0);  // a plan not known: the epoch ends count
  EXPECT_EQ(ProgressOf(ended).epochs_done, 8);
}

TEST(ClientFormatTest, TaskLineShowsProgressLossAucAndEta) {
  v1::TaskInfo t = Task("finetune", 1, v1::TASK_STATE_LEASED, 25, 400, 1320);
  t.mutable_best()->set_val_auc(0.41234);
  EXPECT_EQ(FormatTaskLine(t, 725),
            "finetune  f1  LEASED     epoch  3/25  step 120/400  loss 1.5000  val_auc 0.4123"
            "  ETA 12m05s");
  v1::TaskInfo blocked = Task("finetune", 2, v1::TASK_STATE_BLOCKED, 25, 0, 0);
  blocked.clear_latest();
  EXPECT_EQ(FormatTaskLine(blocked, -1),
            "finetune  f2  BLOCKED    epoch  0/25  step -  loss -  val_auc -");
}

// A sweep's tasks of one fold differ only in their point: `watch` names it as `status` does
// (the task id's "-pN"), a job without a sweep shows the fold alone.
TEST(ClientFormatTest, TaskLineOfASweepNamesItsPoint) {
  v1::TaskInfo t = Task("pretrain", 0, v1::TASK_STATE_SUCCEEDED, 2, 0, 0);
  t.clear_latest();
  EXPECT_EQ(SweepPointSuffix(t), "");
  EXPECT_EQ(FormatTaskLine(t, -1), "pretrain  f0  SUCCEEDED  epoch  0/2  step -  loss -  val_auc -");
  t.set_task_id("j0123456789ab/pretrain-f0-p0");  // sweep_point 0
  EXPECT_EQ(SweepPointSuffix(t), "-p0");
  EXPECT_EQ(FormatTaskLine(t, -1), "pretrain  f0-p0 SUCCEEDED  epoch  0/2  step -  loss -  val_auc -");
  t.set_task_id("j0123456789ab/pretrain-f0-p1");
  t.set_sweep_point(1);
  EXPECT_EQ(FormatTaskLine(t, -1), "pretrain  f0-p1 SUCCEEDED  epoch  0/2  step -  loss -  val_auc -");
}

TEST(EtaTrackerTest, RateFromObservedStepsAndResetOnNewAttempt) {
  EtaTracker eta;
  v1::TaskInfo t = Task("pretrain", 0, v1::TASK_STATE_LEASED, 2, 100, 10);
  eta.Observe(t, 0.0);
  EXPECT_EQ(eta.SecondsLeft(t), -1);  // one sample: no rate yet
  // The step first seen was reported up to a report interval before: the measurement starts at
  // the first change (from the first sight, 3 steps in a moment made "ETA 0s").
  t.mutable_latest()->set_step(13);
  eta.Observe(t, 0.5);
  EXPECT_EQ(eta.SecondsLeft(t), -1);
  t.mutable_latest()->set_step(30);
  eta.Observe(t, 9.0);               // 17 steps in 8.5 s: 2 steps/s, 170 steps left
  EXPECT_DOUBLE_EQ(eta.SecondsLeft(t), 85.0);
  t.set_attempt(2);                  // a new lease starts a new measurement
  t.mutable_latest()->set_step(0);
  eta.Observe(t, 11.0);
  EXPECT_EQ(eta.SecondsLeft(t), -1);
  t.set_state(v1::TASK_STATE_SUCCEEDED);
  EXPECT_EQ(eta.SecondsLeft(t), -1);
}

TEST(ClientFormatTest, BestTableHasOneRowPerTask) {
  v1::JobInfo job;
  job.set_job_id("j0123456789ab");
  v1::TaskInfo* a = job.add_tasks();
  *a = Task("pretrain", 0, v1::TASK_STATE_SUCCEEDED, 2, 10, 20);
  a->mutable_best()->set_epoch(2);
  a->mutable_best()->set_val_auc(0.5);
  a->mutable_best()->set_val_roc_auc(0.75);
  a->mutable_best()->set_val_acc(std::nan(""));
  a->set_best_checkpoint("runs/j/pretrain-fold0/best.pt");
  *job.add_tasks() = Task("finetune", 0, v1::TASK_STATE_CANCELLED, 2, 10, 0);
  EXPECT_EQ(FormatBestTable(job),
            "TASK                       STATE      BEST_EPOCH  VAL_AUC  VAL_ROC_AUC  VAL_ACC"
            "  CHECKPOINT\n"
            "j0123456789ab/pretrain-f0  SUCCEEDED  2           0.5000   0.7500       -"
            "        runs/j/pretrain-fold0/best.pt\n"
            "j0123456789ab/finetune-f0  CANCELLED  -           -        -            -"
            "        -\n");
  // The path is a worker's (CompleteTask, ReportCheckpoint): an OSC 52 (the clipboard) or a
  // colour in it reached the terminal raw.
  a->set_best_checkpoint("/w/j/\x1b]52;c;ZXZpbA==\x07" "best\x1b[31m.pt");
  const std::string table = FormatBestTable(job);
  EXPECT_EQ(table.find('\x1b'), std::string::npos) << table;
  EXPECT_NE(table.find("/w/j/\\x1b]52;c;ZXZpbA==\\x07best\\x1b[31m.pt"), std::string::npos) << table;
}

TEST(ClientFormatTest, HistoryCsvWritesNanAsHistoryCsvDoes) {
  v1::HistoryRow row;
  row.set_task_id("j0123456789ab/finetune-f0");
  row.set_stage("finetune");
  row.set_fold(0);
  row.set_attempt(2);
  v1::Metrics* m = row.mutable_metrics();
  m->set_epoch(3);
  m->set_step(300);
  m->set_lr(0.001);
  m->set_train_loss(0.5);
  m->set_train_acc(0.25);
  m->set_val_loss(std::nan(""));
  m->set_val_auc(0.75);
  m->set_val_roc_auc(0.8);
  m->set_val_cmap(0.9);
  m->set_val_acc(0.125);
  m->set_samples_per_s(1234.5);
  EXPECT_EQ(FormatHistoryCsv({row}),
            "task_id,stage,fold,attempt,epoch,step,lr,train_loss,train_acc,val_loss,val_auc,"
            "val_roc_auc,val_cmap,val_acc,samples_per_s\n"
            "j0123456789ab/finetune-f0,finetune,0,2,3,300,0.001,0.5,0.25,nan,0.75,0.8,0.9,"
            "0.125,1234.5\n");
}

TEST(ClientFormatTest, ColumnsAlignToWidestCell) {
  EXPECT_EQ(FormatColumns({{"A", "BB", "C"}, {"long", "x", ""}}),
            "A     BB  C\n"
            "long  x\n");
  // Columns are characters, not bytes (a host named "héé" pushed its next column one off), and
  // every cell is escaped.
  EXPECT_EQ(FormatColumns({{"h\xc3\xa9\xc3\xa9", "1"}, {"abcd", "2"}, {"e\x1b", "3"}}),
            "h\xc3\xa9\xc3\xa9    1\n"
            "abcd   2\n"
            "e\\x1b  3\n");
}

// A block taller than the terminal cannot be redrawn in place: `watch` shows the tasks that
// are running or waiting first and one line for the rest.
TEST(ClientFormatTest, WatchRowsFitTheTerminalRunningTasksFirst) {
  v1::JobInfo job;
  *job.add_tasks() = Task("pretrain", 0, v1::TASK_STATE_SUCCEEDED, 2, 10, 20);
  for (int fold = 0; fold < 5; ++fold) {
    *job.add_tasks() = Task("finetune", fold,
                            fold < 2 ? v1::TASK_STATE_SUCCEEDED
                                     : (fold == 4 ? v1::TASK_STATE_LEASED : v1::TASK_STATE_READY),
                            2, 10, 0);
  }
  std::string more;
  EXPECT_EQ(WatchRows(job, 6, &more), (std::vector<int>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(more, "");
  // Room for 3 task rows: 2 tasks and the summary; the LEASED one (5) and the first READY (3).
  EXPECT_EQ(WatchRows(job, 3, &more), (std::vector<int>{3, 5}));
  EXPECT_EQ(more, "... 4 more tasks: 1 READY, 3 SUCCEEDED");
  EXPECT_EQ(WatchRows(job, 1, &more), (std::vector<int>{}));
  EXPECT_EQ(more, "... 6 more tasks: 1 LEASED, 2 READY, 3 SUCCEEDED");
}

TEST(ClientFormatTest, ControlCharactersInNamesArePrintedEscaped) {
  EXPECT_EQ(PrintableText("evil\n\x1b[31mred\x7f"), "evil\\x0a\\x1b[31mred\\x7f");
  EXPECT_EQ(PrintableText("caf\xc3\xa9 run"), "caf\xc3\xa9 run");  // UTF-8 stays
  // The C1 controls (U+0080..U+009F): U+009B is CSI on terminals that honour them.
  EXPECT_EQ(PrintableText("x\xc2\x9b" "31mred\xc2\x80\xc2\xa0"), "x\\u009b31mred\\u0080\xc2\xa0");
  v1::JobInfo job;
  job.set_job_id("j0123456789ab");
  job.set_name("a\nb");
  EXPECT_EQ(FormatJobLine(job).find('\n'), std::string::npos);
  EXPECT_NE(FormatJobStatus(job).find("name     a\\x0ab\n"), std::string::npos);
}

// A task's error of several lines (or with a terminal escape in a file name) keeps `watch`'s row
// one line, and `status` indents its lines under the first.
TEST(ClientFormatTest, MultiLineErrorsStayInTheirRowsAndColumns) {
  EXPECT_EQ(PrintableLines("a\r\nb\x1b[2J\n", " / "), "a / b\\x1b[2J");
  EXPECT_EQ(PrintableLines("one", " / "), "one");
  v1::TaskInfo t = Task("finetune", 1, v1::TASK_STATE_FAILED, 25, 400, 1320);
  t.set_task_id("finetune-f1");
  t.set_error("rank 1: data error\ncaused by: /d/x.ogg: truncated\n");
  const std::string line = FormatTaskLine(t, -1);
  EXPECT_EQ(line.find('\n'), std::string::npos) << line;
  EXPECT_NE(line.find("error: rank 1: data error / caused by: /d/x.ogg: truncated"), std::string::npos) << line;
  v1::JobInfo job;
  job.set_job_id("j0123456789ab");
  job.set_error("2 tasks failed\nsee below");
  *job.add_tasks() = t;
  const std::string status = FormatJobStatus(job);
  EXPECT_NE(status.find("error    2 tasks failed\n         see below\n"), std::string::npos) << status;
  EXPECT_NE(status.find("finetune-f1: rank 1: data error\n             caused by: /d/x.ogg: truncated\n"),
            std::string::npos)
      << status;
}

TEST(ClientFormatTest, SweepFlagsSplitAtTopLevelCommas) {
  v1::SweepAxis axis;
  ASSERT_TRUE(ParseSweepFlag("train.lr=[1e-3, 5e-4,2e-4]", &axis).ok());
  EXPECT_EQ(axis.key(), "train.lr");
  ASSERT_EQ(axis.values_size(), 3);
  EXPECT_EQ(axis.values(0), "1e-3");
  EXPECT_EQ(axis.values(1), "5e-4");
  EXPECT_EQ(axis.values(2), "2e-4");
  ASSERT_TRUE(ParseSweepFlag("folds.selected_folds=[[0,1],[2]]", &axis).ok());
  ASSERT_EQ(axis.values_size(), 2);
  EXPECT_EQ(axis.values(0), "[0,1]");
  ASSERT_TRUE(ParseSweepFlag("model.name=['a,b', \"c\"]", &axis).ok());
  ASSERT_EQ(axis.values_size(), 2);
  EXPECT_EQ(axis.values(0), "'a,b'");
  // As YAML reads them: a quote inside a plain value is a character (`it's`, as --set takes it),
  // a backslash escapes a double quote inside double quotes, nested lists quote too.
  ASSERT_TRUE(ParseSweepFlag("data.tag=[it's, b]", &axis).ok());
  ASSERT_EQ(axis.values_size(), 2);
  EXPECT_EQ(axis.values(0), "it's");
  ASSERT_TRUE(ParseSweepFlag("model.name=[\"a\\\",b\", c]", &axis).ok());
  ASSERT_EQ(axis.values_size(), 2);
  EXPECT_EQ(axis.values(0), "\"a\\\",b\"");
  ASSERT_TRUE(ParseSweepFlag("data.tag=['it''s, ok', b]", &axis).ok());  // '' is a quote inside quotes
  ASSERT_EQ(axis.values_size(), 2);
  EXPECT_EQ(axis.values(0), "'it''s, ok'");
  ASSERT_TRUE(ParseSweepFlag("folds.selected_folds=[['x,y', 1], [2]]", &axis).ok());
  ASSERT_EQ(axis.values_size(), 2);
  EXPECT_EQ(axis.values(0), "['x,y', 1]");
  for (const char* bad : {"train.lr", "=[1]", "train.lr=1e-3", "train.lr=[]", "train.lr=[1,,2]", "train.lr=[[1]",
                          "train.lr=['1]"}) {
    const absl::Status status = ParseSweepFlag(bad, &axis);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(status.message().find(bad), std::string::npos) << status.message();
  }
}

// A sweep's job has up to 4,096 tasks: its TASKS cell ("4096/4096 done") pushed NAME out of the
// column the header and the other rows keep.
TEST(ClientFormatTest, ALargeSweepsRowKeepsTheNameColumn) {
  v1::JobInfo small;
  small.set_job_id("j0123456789ab");
  small.set_state(v1::JOB_STATE_SUCCEEDED);
  small.set_created_unix_ms(1700000000000);
  small.set_name("first");
  small.add_tasks()->set_state(v1::TASK_STATE_SUCCEEDED);
  v1::JobInfo large = small;
  large.set_name("sweep");
  for (int i = 1; i < 4096; ++i) large.add_tasks()->set_state(v1::TASK_STATE_SUCCEEDED);
  const size_t column = JobLineHeader().find("NAME");
  EXPECT_EQ(FormatJobLine(small).find("first"), column) << FormatJobLine(small);
  EXPECT_EQ(FormatJobLine(large).find("sweep"), column) << FormatJobLine(large);
  EXPECT_NE(FormatJobLine(large).find("4096/4096 done"), std::string::npos) << FormatJobLine(large);
}

TEST(ClientFormatTest, TagsNotesAndTheBestSweepPointAreShown) {
  v1::JobInfo job;
  job.set_job_id("j0123456789ab");
  job.set_name("search");
  (*job.mutable_tags())["team"] = "birds";
  (*job.mutable_tags())["alpha"] = "";
  job.set_note("try lower lr");
  job.set_monitor("auc");
  EXPECT_EQ(FormatTags(job), "alpha team=birds");
  EXPECT_NE(FormatJobLine(job).find("search  [alpha team=birds]"), std::string::npos) << FormatJobLine(job);
  v1::SweepAxis* axis = job.add_sweep();
  axis->set_key("train.lr");
  axis->add_values("1e-3");
  axis->add_values("5e-4");
  std::string status = FormatJobStatus(job);
  EXPECT_NE(status.find("tags     alpha team=birds\n"), std::string::npos) << status;
  EXPECT_NE(status.find("note     try lower lr\n"), std::string::npos) << status;
  EXPECT_NE(status.find("sweep    2 points: train.lr=[1e-3,5e-4]\n"), std::string::npos) << status;
  EXPECT_NE(status.find("best     - (no point has a best auc yet)"), std::string::npos) << status;
  v1::SweepBest* best = job.mutable_sweep_best();
  best->set_point(1);
  best->add_overrides("train.lr=5e-4");
  best->set_metric("val_auc");
  best->set_value(0.71234);
  best->set_tasks(2);
  best->set_tasks_total(2);
  EXPECT_EQ(FormatSweepBest(job), "point 1 (train.lr=5e-4): val_auc 0.7123, mean of 2/2 folds");
  EXPECT_NE(FormatJobStatus(job).find("best     point 1 (train.lr=5e-4)"), std::string::npos);
}

TEST(ClientFormatTest, GroupsAndLogLines) {
  v1::GroupInfo busy;
  busy.set_group_id("g0123456789ab");
  busy.set_world_size(2);
  busy.set_backend("mpi");
  busy.add_devices("cpu");
  busy.add_devices("cpu");
  busy.add_hosts("node1");
  busy.add_hosts("node1");
  busy.set_task_id("j0123456789ab/pretrain-f0");
  busy.mutable_latest()->set_samples_per_s(12.25);
  busy.set_last_heartbeat_unix_ms(1000000);
  busy.set_registered_unix_ms(1000);
  v1::GroupInfo idle = busy;
  idle.set_group_id("g000000000001");
  idle.clear_task_id();
  busy.set_gpu_memory_bytes(int64_t{3} << 29);  // 1.5 GiB (a CUDA group's heartbeat)
  const std::string table = FormatGroups({busy, idle}, 1003000);
  EXPECT_NE(table.find("cpux2"), std::string::npos) << table;
  EXPECT_NE(table.find("j0123456789ab/pretrain-f0"), std::string::npos) << table;
  EXPECT_NE(table.find("12.2"), std::string::npos) << table;
  EXPECT_NE(table.find("3s ago"), std::string::npos) << table;
  EXPECT_NE(table.find("idle"), std::string::npos) << table;
  EXPECT_NE(table.find("1.5 GiB"), std::string::npos) << table;
  v1::LogLine line;
  line.set_time_unix_ms(1764770400123);  // 2025-12-03 14:00:00.123 UTC
  line.set_level("warning");
  line.set_rank(0);
  line.set_text("[trainer] epoch 1\x1b[31m");
  EXPECT_EQ(FormatLogLine("", line), "14:00:00.123 warning [rank 0] [trainer] epoch 1\\x1b[31m");
  EXPECT_EQ(FormatLogLine("j/t", line).rfind("j/t  14:00:00.123", 0), 0u);
  // A worker's clock unset: no "-.000" or "-.-500".
  line.set_time_unix_ms(0);
  EXPECT_EQ(FormatLogLine("", line), "--:--:--.--- warning [rank 0] [trainer] epoch 1\\x1b[31m");
  line.set_time_unix_ms(-1500);
  EXPECT_EQ(FormatLogLine("", line).rfind("--:--:--.--- ", 0), 0u);
}

}  // namespace
}  // namespace aviary::cli
