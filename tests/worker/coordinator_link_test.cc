// Rank 0's CoordinatorLink against a real coordinator on loopback (docs/SERVICE.md, "Logs"): the
// log lines of a task, shipped with ShipLogs, reach `aviary logs` whole when the task ends, also
// after more piled up than one call takes (a coordinator that was away for a while).
#include "worker/agent/coordinator_link.h"

#include <sqlite3.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <memory>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status.h"
#include "coordinator/service.h"
#include "coordinator/store.h"
#include "gtest/gtest.h"
#include "tests/coordinator/tiny_dataset.h"
#include "worker/agent/signals.h"

namespace aviary::worker {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::aviary::v1;

// The log lines that hold `part`, with their levels, while it lives. A link's destructor
// removes every tap: Tap() again after one.
class TappedLines {
 public:
  explicit TappedLines(std::string part) : part_(std::move(part)) { Tap(); }
  ~TappedLines() { common::SetLogTap(nullptr); }
  void Tap() {
    common::SetLogTap([this](common::LogLevel level, int, absl::string_view line) {
      if (!absl::StrContains(line, part_)) return;
      absl::MutexLock lock(&mu_);
      lines_.emplace_back(level, std::string(line));
    });
  }
  void Clear() {
    absl::MutexLock lock(&mu_);
    lines_.clear();
  }
  // The lines so far, once there is one or `wait` has passed.
  std::vector<std::pair<common::LogLevel, std::string>> Lines(absl::Duration wait = absl::ZeroDuration()) {
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithTimeout(absl::Condition(this, &TappedLines::Any), wait);
    return lines_;
  }

 private:
  bool Any() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !lines_.empty(); }
  const std::string part_;
  absl::Mutex mu_;
  std::vector<std::pair<common::LogLevel, std::string>> lines_ ABSL_GUARDED_BY(mu_);
};

class CoordinatorLinkTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = absl::StrCat("/tmp/aviary_link_", ::getpid(), "_XXXXXX");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    coordinator::WriteTinyDataset(root_);
    Write("token", "the-token\n");
    Write("worker.token", "the-worker-token\n");
    coordinator::CoordinatorConfig config = coordinator::LoopbackTestConfig(root_);
    // No /metrics here: prometheus-cpp's civetweb (the group's) and Debian's (the coordinator's)
    // meet in this one process, which no deployment has; with CUDA's libtorch linked, starting
    // the coordinator's endpoint failed ("null context when constructing CivetServer").
    config.metrics_listen = "";
    auto secrets = coordinator::LoadCoordinatorSecrets(config);
    ASSERT_TRUE(secrets.ok()) << secrets.status();
    auto started = coordinator::Coordinator::Start(config, *secrets);
    ASSERT_TRUE(started.ok()) << started.status();
    coordinator_ = std::move(*started);
    address_ = absl::StrCat("127.0.0.1:", coordinator_->grpc_port());
    jobs_ = v1::JobService::NewStub(grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
    options_.coordinator = address_;
    options_.token = "the-worker-token";
    options_.metrics_listen = "";
    auto metrics = GroupMetrics::Create("");
    ASSERT_TRUE(metrics.ok()) << metrics.status();
    metrics_ = std::move(*metrics);
  }
  void TearDown() override {
    if (coordinator_) {
      EXPECT_TRUE(coordinator_->Shutdown().ok());
    }
    coordinator_.reset();
    fs::remove_all(root_);
  }

  void Write(const std::string& rel, const std::string& text) {
    std::ofstream(fs::path(root_) / rel) << text;
  }
  std::unique_ptr<grpc::ClientContext> Ctx() {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->AddMetadata("authorization", "Bearer the-token");
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return ctx;
  }

  // A job of the tiny dataset's pipeline (coordinator::kPipeline).
  void Submit(v1::SubmitJobResponse* submitted) {
    v1::SubmitJobRequest submit;
    submit.set_pipeline_yaml(coordinator::kPipeline);
    submit.set_source_path("pipe.yaml");
    submit.set_working_dir(root_);
    const grpc::Status status = jobs_->SubmitJob(Ctx().get(), submit, submitted);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  // `aviary logs` of one task.
  void TaskLogs(const std::string& job_id, const std::string& task_id, v1::GetLogsResponse::TaskLog* out) {
    v1::GetLogsRequest request;
    request.set_job_id(job_id);
    request.set_task_id(task_id);
    v1::GetLogsResponse response;
    const grpc::Status status = jobs_->GetLogs(Ctx().get(), request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    ASSERT_EQ(response.tasks_size(), 1);
    *out = response.tasks(0);
  }
  // Registers `link` and leases a task of the submitted job.
  static void RegisterAndLease(CoordinatorLink& link, v1::Task* task) {
    ASSERT_TRUE(link.Register().ok());
    bool available = false;
    ASSERT_TRUE(link.Lease(task, &available).ok());
    ASSERT_TRUE(available);
  }
  // An epoch end of `task_id` as the trainer reports it (valid values).
  static Report EpochEndReport(const std::string& task_id, int epoch, int64_t step) {
    Report report;
    report.kind = Report::Kind::kPoint;
    report.task_id = task_id;
    report.steps_per_epoch = 10;
    v1::Metrics& m = report.point;
    m.set_epoch(epoch);
    m.set_step(step);
    m.set_epoch_end(true);
    m.set_lr(1e-3);
    m.set_train_loss(1.25);
    m.set_train_acc(0.4);
    m.set_val_loss(0.9);
    m.set_val_auc(0.5 + 0.1 * epoch);
    m.set_val_roc_auc(0.7);
    m.set_val_cmap(0.6);
    m.set_val_acc(0.5);
    m.set_samples_total(160);
    return report;
  }
  // The task `task_id` of the job as `aviary status` gets it.
  void TaskInfoOf(const std::string& job_id, const std::string& task_id, v1::TaskInfo* out) {
    v1::GetJobRequest get;
    get.set_job_id(job_id);
    v1::JobInfo job;
    const grpc::Status status = jobs_->GetJob(Ctx().get(), get, &job);
    ASSERT_TRUE(status.ok()) << status.error_message();
    for (const v1::TaskInfo& t : job.tasks()) {
      if (t.task_id() == task_id) {
        *out = t;
        return;
      }
    }
    FAIL() << "no task " << task_id << " in job " << job_id;
  }
  // The epochs of `task_id` in the job's history (`aviary history`), in order.
  void HistoryEpochs(const std::string& job_id, const std::string& task_id, std::vector<int>* epochs) {
    v1::GetHistoryRequest request;
    request.set_job_id(job_id);
    v1::GetHistoryResponse history;
    const grpc::Status status = jobs_->GetHistory(Ctx().get(), request, &history);
    ASSERT_TRUE(status.ok()) << status.error_message();
    for (const v1::HistoryRow& row : history.rows()) {
      if (row.task_id() == task_id) epochs->push_back(row.metrics().epoch());
    }
  }
  static v1::RegisterGroupRequest OneRank() {
    v1::RegisterGroupRequest registration;
    registration.set_world_size(1);
    registration.set_backend("mpi");
    return registration;
  }

  // LeaveGroup in the group's name (the coordinator forgets it: a reap after a partition).
  grpc::Status LeaveGroupFor(const std::string& group_id) {
    auto workers = v1::WorkerService::NewStub(grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer the-worker-token");
    v1::LeaveGroupRequest leave;
    leave.set_group_id(group_id);
    leave.set_reason("the test");
    v1::LeaveGroupResponse left;
    return workers->LeaveGroup(&ctx, leave, &left);
  }

  std::string root_;
  std::string address_;
  std::unique_ptr<coordinator::Coordinator> coordinator_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
  AgentOptions options_;  // the links' (set in SetUp)
  std::unique_ptr<GroupMetrics> metrics_;
};

TEST_F(CoordinatorLinkTest, EndTaskShipsEveryLineAlsoMoreThanOneCallTakes) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));

  // No threads started: nothing ships until the task ends, as when the coordinator was away.
  link.BeginTask(task.task_id(), task.attempt());
  const common::Logger log("trainer");
  // More than one ShipLogs call takes (2,000), fewer than the group's buffer (5,000) and the
  // coordinator's budget (512 KiB counting 128 bytes a line) keep.
  constexpr int kLines = 2500;
  for (int i = 0; i < kLines; ++i) log.Info(absl::StrCat("line ", i));
  link.EndTask();

  v1::GetLogsResponse::TaskLog logs;
  ASSERT_NO_FATAL_FAILURE(TaskLogs(submitted.job_id(), task.task_id(), &logs));
  int found = 0;
  std::string last;
  for (const v1::LogLine& line : logs.lines()) {
    if (line.text().find("[trainer] line ") == std::string::npos) continue;
    ++found;
    last = line.text();
  }
  EXPECT_EQ(found, kLines);
  EXPECT_EQ(last, absl::StrCat("[trainer] line ", kLines - 1));
  EXPECT_EQ(logs.dropped(), 0);
}

// A group's lines keep the attempt that logged them. Group 1 stops its task (preempted: READY
// again), group 2 leases it (attempt 2), and only then does group 1's EndTask ship its lines, one
// of them logged after the new lease: the coordinator used to stamp them with the task's attempt
// at arrival (2).
TEST_F(CoordinatorLinkTest, LinesShippedAfterTheTaskMovedOnKeepTheirAttempt) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink first(options_, metrics_.get(), OneRank());
  CoordinatorLink second(options_, metrics_.get(), OneRank());
  ASSERT_TRUE(first.Register().ok());
  ASSERT_TRUE(second.Register().ok());

  v1::Task task;
  bool available = false;
  ASSERT_TRUE(first.Lease(&task, &available).ok());
  ASSERT_TRUE(available);
  ASSERT_EQ(task.attempt(), 1);
  first.BeginTask(task.task_id(), task.attempt());
  const common::Logger log("trainer");
  log.Info("logged by attempt 1 before the stop");

  auto workers = v1::WorkerService::NewStub(grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
  v1::FailTaskRequest stop;
  stop.set_group_id(first.group_id());
  stop.set_task_id(task.task_id());
  stop.set_error("stopped for the test");
  stop.set_preempted(true);
  v1::FailTaskResponse stopped;
  grpc::ClientContext stop_ctx;
  stop_ctx.AddMetadata("authorization", "Bearer the-worker-token");
  const grpc::Status fail_status = workers->FailTask(&stop_ctx, stop, &stopped);
  ASSERT_TRUE(fail_status.ok()) << fail_status.error_message();

  v1::Task again;
  ASSERT_TRUE(second.Lease(&again, &available).ok());
  ASSERT_TRUE(available);
  ASSERT_EQ(again.task_id(), task.task_id());
  ASSERT_EQ(again.attempt(), 2);
  log.Info("logged by attempt 1 after attempt 2 began");  // group 1's tap is still the process's
  first.EndTask();

  v1::GetLogsResponse::TaskLog logs;
  ASSERT_NO_FATAL_FAILURE(TaskLogs(submitted.job_id(), task.task_id(), &logs));
  int found = 0;
  for (const v1::LogLine& line : logs.lines()) {
    if (line.text().find("logged by attempt 1") == std::string::npos) continue;
    ++found;
    EXPECT_EQ(line.attempt(), 1) << line.text();
  }
  EXPECT_EQ(found, 2);
}

// Polls `condition` every 20 ms until it holds or 30 s pass.
bool Eventually(const std::function<bool()>& condition) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return condition();
}

// Between LeaseTask's answer and BeginTask (the manifest's fetch, which takes a while for a large
// one) the heartbeats name the task. They named none, which the coordinator took for a group that
// had let go of its task: cancelled (a sibling failed, or the user) and retried meanwhile, it was
// leased to a second group while the first went on to train it. Now the cancel reaches the
// first group, stays through BeginTask, and the task waits for the first group to let go.
// GetManifest's time: rpc_timeout_s plus 1 ms per 8 KB, and the whole of it doubled for each
// fetch of the manifest in a row that ran out of time (a slow link restarted the download at
// every retried lease, for ever), up to 2^8 times.
TEST(ManifestFetchTest, TheAllowanceDoublesAfterEachFetchThatRanOutOfTime) {
  EXPECT_EQ(CoordinatorLink::ManifestFetchExtraMs(0, 10, 0), 0);
  EXPECT_EQ(CoordinatorLink::ManifestFetchExtraMs(80'000'000, 10, 0), 10'000);
  EXPECT_EQ(CoordinatorLink::ManifestFetchExtraMs(80'000'000, 10, 1), 30'000);  // 2 x 20 s, less the 10 s
  EXPECT_EQ(CoordinatorLink::ManifestFetchExtraMs(80'000'000, 10, 2), 70'000);
  EXPECT_EQ(CoordinatorLink::ManifestFetchExtraMs(0, 10, 3), 70'000);  // a busy coordinator: small ones too
  EXPECT_EQ(CoordinatorLink::ManifestFetchExtraMs(80'000'000, 10, 50), (int64_t{20'000} << 8) - 10'000);
  EXPECT_EQ(CoordinatorLink::ManifestFetchExtraMs(int64_t{1} << 36, 10, 50),
            ((int64_t{10'000} + (int64_t{1} << 36) / 8000) << 8) - 10'000);
}

// aviary_reports_buffered follows a task's dropped reports (a fenced or lost task's): an idle
// group kept showing the points it had dropped.
TEST_F(CoordinatorLinkTest, TheBufferedGaugeFollowsDroppedReports) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  link.Push(EpochEndReport(task.task_id(), 0, 10));  // no sender thread: it stays
  EXPECT_EQ(metrics_->Buffered(), 1);
  link.DropTask(task.task_id());
  EXPECT_EQ(metrics_->Buffered(), 0);
}

// aviary_fenced_writes_total (alert AviaryWritesFenced: "lost its lease") counts the writes a
// lost lease refused, not the cancelled task's last one: every `aviary cancel` fired the alert.
TEST_F(CoordinatorLinkTest, ACancelledTasksRefusedWriteIsNoFencedWrite) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  link.BeginTask(task.task_id(), task.attempt());
  link.StartThreads();
  const double before = metrics_->FencedWrites();
  v1::CancelJobRequest cancel;
  cancel.set_job_id(submitted.job_id());
  v1::CancelJobResponse cancelled;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
  EXPECT_TRUE(Eventually([&] { return link.Decide() == kCancelled; }));
  const absl::Status refused = link.CheckLease(root_ + "/last.pt");
  EXPECT_TRUE(common::IsLeaseRevoked(refused)) << refused;
  EXPECT_EQ(metrics_->FencedWrites(), before);
  link.EndTask();

  // A lease that ends otherwise (here the watchdog's revoke, as a lost group's) is counted.
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  bool available = false;
  ASSERT_TRUE(link.Lease(&task, &available).ok());
  ASSERT_TRUE(available);
  link.BeginTask(task.task_id(), task.attempt());
  link.RevokeLease("the stall watchdog failed the task");
  const absl::Status fenced = link.CheckLease(root_ + "/last.pt");
  EXPECT_TRUE(absl::IsAborted(fenced)) << fenced;
  EXPECT_FALSE(common::IsLeaseRevoked(fenced)) << fenced;
  EXPECT_EQ(metrics_->FencedWrites(), before + 1);
  link.EndTask();
  link.StopThreads();
}

TEST_F(CoordinatorLinkTest, HeartbeatsNameALeasedTaskBeforeItBegins) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink first(options_, metrics_.get(), OneRank());
  CoordinatorLink second(options_, metrics_.get(), OneRank());
  ASSERT_TRUE(second.Register().ok());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(first, &task));
  first.StartThreads();
  v1::CancelJobRequest cancel;
  cancel.set_job_id(submitted.job_id());
  v1::CancelJobResponse cancelled;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
  EXPECT_TRUE(Eventually([&] { return first.Decide() == kCancelled; }));
  first.BeginTask(task.task_id(), task.attempt());  // the fetch done: the cancel stays
  EXPECT_EQ(first.Decide(), kCancelled);
  EXPECT_FALSE(first.CheckLease(root_ + "/last.pt").ok());  // nor may it write
  v1::RetryJobRequest retry;
  retry.set_job_id(submitted.job_id());
  v1::JobInfo retried;
  ASSERT_TRUE(jobs_->RetryJob(Ctx().get(), retry, &retried).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(600));  // heartbeats naming the task
  v1::Task other;
  bool available = false;
  ASSERT_TRUE(second.Lease(&other, &available).ok());
  EXPECT_TRUE(!available || other.task_id() != task.task_id()) << other.task_id();
  first.EndTask();  // let go: the task is the second group's to lease
  EXPECT_TRUE(Eventually([&] {
    v1::Task again;
    bool leased = false;
    return second.Lease(&again, &leased).ok() && leased && again.task_id() == task.task_id();
  }));
  first.StopThreads();
}

// The coordinator forgot the group between a lease and the task's begin (here: LeaveGroup in its
// name; a reap after a partition): the group registers again without the task, so its
// heartbeats do not name it and it hears no cancel of a task that is not its own.
TEST_F(CoordinatorLinkTest, ARegistrationAgainForgetsATaskLeasedButNotBegun) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  const grpc::Status st = LeaveGroupFor(link.group_id());
  ASSERT_TRUE(st.ok()) << st.error_message();
  v1::Task again;
  bool available = false;
  EXPECT_FALSE(link.Lease(&again, &available).ok());
  ASSERT_TRUE(link.lost());
  ASSERT_TRUE(link.Register().ok());
  TappedLines cancels("cancelled task");
  link.StartThreads();
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));  // heartbeats every 200 ms
  link.StopThreads();
  EXPECT_EQ(link.Decide(), kNoStop);
  const auto heard = cancels.Lines();
  EXPECT_TRUE(heard.empty()) << heard[0].second;
}

// The task's outcome taken (SUCCEEDED) before the group's EndTask: heartbeats naming it meanwhile are
// answered "cancel" (the task is not leased to the group any more), which said "the coordinator
// cancelled task T; stopping it" at the end of every task whose drain outlasted a heartbeat.
TEST_F(CoordinatorLinkTest, HeartbeatsAfterTheOutcomeWasTakenStopNothing) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  link.BeginTask(task.task_id(), task.attempt());
  TappedLines cancels("cancelled task");
  link.StartThreads();
  fs::create_directories(task.out_dir());
  std::ofstream(task.out_dir() + "/best.pt") << "checkpoint";
  link.Push(EpochEndReport(task.task_id(), 0, 10));
  Report done;
  done.kind = Report::Kind::kComplete;
  done.task_id = task.task_id();
  done.path = task.out_dir() + "/best.pt";
  done.point = EpochEndReport(task.task_id(), 0, 10).point;
  link.Push(done);
  link.Drain(task.task_id(), 20, 5);
  v1::TaskInfo info;
  ASSERT_NO_FATAL_FAILURE(TaskInfoOf(submitted.job_id(), task.task_id(), &info));
  ASSERT_EQ(info.state(), v1::TASK_STATE_SUCCEEDED) << v1::TaskState_Name(info.state()) << " " << info.error();
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));  // heartbeats every 200 ms name it
  EXPECT_EQ(link.Decide(), kNoStop);
  const auto heard = cancels.Lines();
  EXPECT_TRUE(heard.empty()) << heard[0].second;
  link.EndTask();
  link.StopThreads();
}

// Text from outside (a clip's file name in Latin-1, a library's message) is not always UTF-8, and
// gRPC refuses a proto3 string that is not with INTERNAL, which the link takes for a transient
// failure: the lines and the task's failure were retried for ever and the task stayed leased.
// Both now arrive, invalid bytes as U+FFFD; a failure longer than FailTask takes arrives cut.
TEST_F(CoordinatorLinkTest, TextThatIsNotUtf8ArrivesAndALongFailureArrivesCut) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  link.StartThreads();
  link.BeginTask(task.task_id(), task.attempt());
  const common::Logger log("loader");
  log.Warn("skipped as corrupt: Rohrs\xE4nger.ogg");
  Report failure;
  failure.kind = Report::Kind::kFail;
  failure.task_id = task.task_id();
  failure.error = "cannot open Rohrs\xE4nger.ogg; " + std::string(100 * 1024, 'x');
  failure.retryable = false;
  link.Push(failure);
  link.Drain(task.task_id(), 30, 0);
  link.EndTask();
  link.StopThreads();

  const std::string shown = "Rohrs\xEF\xBF\xBDnger.ogg";  // U+FFFD
  v1::GetLogsResponse::TaskLog logs;
  ASSERT_NO_FATAL_FAILURE(TaskLogs(submitted.job_id(), task.task_id(), &logs));
  int found = 0;
  for (const v1::LogLine& line : logs.lines()) found += line.text().find("corrupt: " + shown) != std::string::npos;
  EXPECT_EQ(found, 1);

  v1::TaskInfo failed;
  ASSERT_NO_FATAL_FAILURE(TaskInfoOf(submitted.job_id(), task.task_id(), &failed));
  EXPECT_EQ(failed.state(), v1::TASK_STATE_FAILED);
  EXPECT_NE(failed.error().find("cannot open " + shown), std::string::npos) << failed.error().substr(0, 200);
  EXPECT_NE(failed.error().find("x [cut]"), std::string::npos);
  EXPECT_LT(failed.error().size(), 64u * 1024);
}

// Leaving with the task's outcome still buffered (the drain gave up on a signal's grace) sends it
// first: LeaveGroup put the task back to READY, and a finished task ran again (here a failure that
// is not retryable would have been retried).
TEST_F(CoordinatorLinkTest, LeavingSendsABufferedOutcomeFirst) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  // No sender thread: the report stays buffered, as after a drain that gave up.
  link.Push(EpochEndReport(task.task_id(), 0, 10));
  Report failure;
  failure.kind = Report::Kind::kFail;
  failure.task_id = task.task_id();
  failure.error = "bad data: no rows";
  failure.retryable = false;
  link.Push(failure);
  link.Leave("stopped by signal (SIGTERM)");
  v1::TaskInfo left;
  ASSERT_NO_FATAL_FAILURE(TaskInfoOf(submitted.job_id(), task.task_id(), &left));
  EXPECT_EQ(left.state(), v1::TASK_STATE_FAILED) << v1::TaskState_Name(left.state());
  EXPECT_NE(left.error().find("bad data: no rows"), std::string::npos) << left.error();
  std::vector<int> epochs;
  ASSERT_NO_FATAL_FAILURE(HistoryEpochs(submitted.job_id(), task.task_id(), &epochs));
  EXPECT_EQ(epochs, std::vector<int>{0});
}

// A signal another rank got (the ranks share it) bounds rank 0's drain as its own would: with
// the reports undeliverable (here: no sender thread) the drain waited for ever, and the group
// never reached LeaveGroup. (Without the bound this test does not end: ctest's timeout fails it.)
TEST_F(CoordinatorLinkTest, AnotherRanksSignalBoundsTheDrain) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  link.Push(EpochEndReport(task.task_id(), 0, 10));
  link.Drain(task.task_id(), -1, 0.2, /*group_signalled=*/true);
  std::vector<int> epochs;  // nothing was delivered: the drain gave up
  ASSERT_NO_FATAL_FAILURE(HistoryEpochs(submitted.job_id(), task.task_id(), &epochs));
  EXPECT_TRUE(epochs.empty());
}

// A manifest whose bytes are not the ones its hash names (here the stored copy replaced by other
// bytes of the same size) is refused: the coordinator checks what it loads and fails the task
// (the group checks what it receives too: the chunk checks saw only offsets and sizes).
TEST_F(CoordinatorLinkTest, AManifestThatDoesNotMatchItsHashIsRefused) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((fs::path(root_) / "aviary.db").c_str(), &db), SQLITE_OK);
  sqlite3_busy_timeout(db, 10000);
  std::vector<std::pair<std::string, int64_t>> manifests;
  sqlite3_stmt* select = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT hash, size FROM manifests", -1, &select, nullptr), SQLITE_OK);
  while (sqlite3_step(select) == SQLITE_ROW) {
    manifests.emplace_back(reinterpret_cast<const char*>(sqlite3_column_text(select, 0)), sqlite3_column_int64(select, 1));
  }
  sqlite3_finalize(select);
  ASSERT_FALSE(manifests.empty());
  for (const auto& [hash, size] : manifests) {
    const std::string other = coordinator::DeflateManifest(std::string(static_cast<size_t>(size), 'x'));
    sqlite3_stmt* update = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db, "UPDATE manifests SET data=?1 WHERE hash=?2", -1, &update, nullptr), SQLITE_OK);
    sqlite3_bind_blob(update, 1, other.data(), static_cast<int>(other.size()), SQLITE_TRANSIENT);
    sqlite3_bind_text(update, 2, hash.data(), static_cast<int>(hash.size()), SQLITE_TRANSIENT);
    EXPECT_EQ(sqlite3_step(update), SQLITE_DONE) << sqlite3_errmsg(db);
    sqlite3_finalize(update);
  }
  ASSERT_EQ(sqlite3_close(db), SQLITE_OK);
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  ASSERT_TRUE(link.Register().ok());
  v1::Task task;
  bool available = false;
  const absl::Status leased = link.Lease(&task, &available);
  EXPECT_TRUE(absl::IsDataLoss(leased)) << leased;
  EXPECT_NE(leased.message().find("bytes stored have SHA-256 "), std::string::npos) << leased;
  EXPECT_NE(leased.message().find("the task FAILED"), std::string::npos) << leased;
  EXPECT_FALSE(available);
}

// Holds the coordinator's manifest streams in its hook until Release (or `hold_s` pass).
// Shared: the coordinator's thread may leave the hook after the test.
struct ManifestGate {
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false, released = false;

  static std::shared_ptr<ManifestGate> Hold(coordinator::Coordinator* coordinator, int hold_s) {
    auto gate = std::make_shared<ManifestGate>();
    coordinator->scheduler()->SetManifestHookForTest([gate, hold_s] {
      std::unique_lock<std::mutex> lock(gate->mu);
      gate->entered = true;
      gate->cv.notify_all();
      gate->cv.wait_for(lock, std::chrono::seconds(hold_s), [&] { return gate->released; });
    });
    return gate;
  }
  // Whether a fetch reached the hook within `timeout_s`.
  bool WaitEntered(int timeout_s) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(timeout_s), [&] { return entered; });
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mu);
      released = true;
    }
    cv.notify_all();
  }
};

// A stop signal while the manifest is fetched cancels the fetch: it waited for the call's
// deadline (minutes for a large manifest on a slow link), and the launcher's SIGKILL came first.
// (Without the cancel, the fetch here ends when the slowed coordinator lets it, 5 s later, and
// succeeds.)
TEST_F(CoordinatorLinkTest, AStopSignalCancelsAManifestFetch) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  ASSERT_TRUE(link.Register().ok());
  auto gate = ManifestGate::Hold(coordinator_.get(), 5);
  absl::Status leased;
  v1::Task task;
  bool available = false;
  std::thread lease([&] { leased = link.Lease(&task, &available); });
  const bool entered = gate->WaitEntered(30);
  if (!entered) {  // the lease ended before its manifest's fetch: no fetch to stop
    lease.join();
    FAIL() << "no manifest fetch: " << leased << " (available " << available << ")";
  }
  SetStopSignalForTest(SIGUSR2);
  lease.join();
  SetStopSignalForTest(0);
  gate->Release();
  EXPECT_TRUE(absl::IsCancelled(leased)) << leased;
  EXPECT_NE(leased.message().find("stopped by a signal (SIGUSR2)"), std::string::npos) << leased;
}

// The group lost while its lease's manifest streams (the coordinator forgot it: here LeaveGroup
// in its name, heard by the heartbeats as NOT_FOUND): the task is not handed out to start (it
// may be another group's already, and its start tidies the run folder).
TEST_F(CoordinatorLinkTest, ATaskWhoseGroupWasLostDuringItsManifestFetchIsNotStarted) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  ASSERT_TRUE(link.Register().ok());
  auto gate = ManifestGate::Hold(coordinator_.get(), 20);
  link.StartThreads();
  absl::Status leased;
  v1::Task task;
  bool available = false;
  std::thread lease([&] { leased = link.Lease(&task, &available); });
  const bool entered = gate->WaitEntered(30);
  if (entered) {
    const grpc::Status st = LeaveGroupFor(link.group_id());
    EXPECT_TRUE(st.ok()) << st.error_message();
    for (int i = 0; i < 100 && !link.lost(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_TRUE(link.lost());
  }
  gate->Release();
  lease.join();
  link.StopThreads();
  ASSERT_TRUE(entered) << "no manifest fetch: " << leased;
  EXPECT_FALSE(leased.ok());
  EXPECT_FALSE(available);
  EXPECT_NE(leased.message().find("was lost while the task's manifest was fetched; not started"), std::string::npos)
      << leased;
}

// A worker token rotated while a group runs (docs/SERVICE.md, "Security model"): the coordinator
// refuses the old token, the link reads its token file again and goes on with the one there. The
// task's completion, refused meanwhile, is kept (it was dropped as refused for good), arrives once
// the file holds the new token, and the group is not lost.
TEST_F(CoordinatorLinkTest, ARotatedTokenIsReadAgainFromItsFileAndTheCompletionArrives) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  Write("group.token", "# the group's copy\nthe-worker-token\n");
  options_.token_file = root_ + "/group.token";
  options_.token_source = "--token-file";
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  link.StartThreads();
  link.BeginTask(task.task_id(), task.attempt());
  fs::create_directories(task.out_dir());
  const std::string best = task.out_dir() + "/best.pt";
  std::ofstream(best) << "checkpoint";

  // The coordinator now takes the new token only; the group's file still holds the old one.
  Write("worker.token", "the-new-worker-token\n");
  ASSERT_TRUE(coordinator_->ReloadTokens().ok());
  Report done;
  done.kind = Report::Kind::kComplete;
  done.task_id = task.task_id();
  done.path = best;
  done.point.set_epoch(0);
  link.Push(done);
  link.Drain(task.task_id(), 1.5, 0);  // refused for 1.5 s: kept
  auto state = [&] {
    v1::GetJobRequest get;
    get.set_job_id(submitted.job_id());
    v1::JobInfo job;
    const grpc::Status status = jobs_->GetJob(Ctx().get(), get, &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    for (const v1::TaskInfo& t : job.tasks()) {
      if (t.task_id() == task.task_id()) return t.state();
    }
    return v1::TASK_STATE_UNSPECIFIED;
  };
  EXPECT_EQ(state(), v1::TASK_STATE_LEASED);

  Write("group.token", "the-new-worker-token\n");  // the holders moved
  link.Drain(task.task_id(), 30, 0);
  EXPECT_EQ(state(), v1::TASK_STATE_SUCCEEDED);
  EXPECT_FALSE(link.lost());
  // Heartbeats go on with the new token: the group is still known (NOT_FOUND would mark it lost).
  link.EndTask();
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  EXPECT_FALSE(link.lost());
  bool available = true;
  v1::Task next;
  EXPECT_TRUE(link.Lease(&next, &available).ok());
  link.StopThreads();
}

// A task the user cancelled and then retried or deleted: the group's late reports are refused
// by the real coordinator, and dropped with a warning, as after a cancel alone; another group's
// task is an error.
TEST_F(CoordinatorLinkTest, ReportsRefusedAfterAUsersCancelRetryOrDeleteAreWarnings) {
  TappedLines dropped("dropped");
  for (const std::string then : {"cancel", "delete", "retry"}) {  // retry last: its task is READY again
    SCOPED_TRACE(then);
    v1::SubmitJobResponse submitted;
    ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
    CoordinatorLink link(options_, metrics_.get(), OneRank());
    v1::Task task;
    ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
    v1::CancelJobRequest cancel;
    cancel.set_job_id(submitted.job_id());
    v1::CancelJobResponse cancelled;
    ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
    if (then == "retry") {
      v1::RetryJobRequest retry;
      retry.set_job_id(submitted.job_id());
      v1::JobInfo retried;
      const grpc::Status st = jobs_->RetryJob(Ctx().get(), retry, &retried);
      ASSERT_TRUE(st.ok()) << st.error_message();
    } else if (then == "delete") {
      v1::DeleteJobRequest remove;
      remove.set_job_id(submitted.job_id());
      v1::DeleteJobResponse removed;
      const grpc::Status st = jobs_->DeleteJob(Ctx().get(), remove, &removed);
      ASSERT_TRUE(st.ok()) << st.error_message();
    }
    // Tapped here: a link's destructor (the last iteration's) removes the tap.
    dropped.Tap();
    dropped.Clear();
    Report failure;
    failure.kind = Report::Kind::kFail;
    failure.task_id = task.task_id();
    failure.error = "late";
    failure.retryable = true;
    link.Push(failure);
    link.StartThreads();
    link.Drain(task.task_id(), 30, 0);
    // The refusal is said before the report leaves the buffer, maybe after Drain saw it taken.
    const auto lines = dropped.Lines(absl::Seconds(10));
    link.StopThreads();
    ASSERT_EQ(lines.size(), 1u);
    EXPECT_EQ(lines[0].first, common::LogLevel::kWarning) << lines[0].second;
    EXPECT_TRUE(absl::StrContains(lines[0].second, "is not leased to group")) << lines[0].second;
  }
  EXPECT_FALSE(TakenAwayByAUser(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                             "task j1/finetune-f0 is not leased to group g2 (state RUNNING)")));
  EXPECT_FALSE(TakenAwayByAUser(grpc::Status(grpc::StatusCode::NOT_FOUND, "(state CANCELLED)")));
}

// A run of points of which the coordinator refuses one (INVALID_ARGUMENT: an epoch outside the
// task's plan) loses that point only: the epoch ends around it reach the history (the whole run
// was dropped with it).
TEST_F(CoordinatorLinkTest, ARefusedPointDropsOnlyItselfNotItsRun) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  auto point = [&](int epoch, int64_t step) { return EpochEndReport(task.task_id(), epoch, step); };
  // Pushed before the threads start: one run of three points.
  link.Push(point(0, 10));
  link.Push(point(99, 15));  // the plan has 3 epochs
  link.Push(point(1, 20));
  link.StartThreads();
  link.BeginTask(task.task_id(), task.attempt());
  link.Drain(task.task_id(), 30, 0);
  link.EndTask();
  link.StopThreads();

  std::vector<int> epochs;
  ASSERT_NO_FATAL_FAILURE(HistoryEpochs(submitted.job_id(), task.task_id(), &epochs));
  EXPECT_EQ(epochs, (std::vector<int>{0, 1}));
}

// The same through Leave's last try (the group stopping with a backlog): the refused point goes,
// not its run (Leave dropped the whole run: history rows lost at a SIGTERM).
TEST_F(CoordinatorLinkTest, LeaveDropsARefusedPointNotItsRun) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  auto point = [&](int epoch, int64_t step) { return EpochEndReport(task.task_id(), epoch, step); };
  link.BeginTask(task.task_id(), task.attempt());
  link.Push(point(0, 10));
  link.Push(point(99, 15));  // the plan has 3 epochs
  link.Push(point(1, 20));
  link.Leave("the test");  // no sender thread: Leave sends them

  std::vector<int> epochs;
  ASSERT_NO_FATAL_FAILURE(HistoryEpochs(submitted.job_id(), task.task_id(), &epochs));
  EXPECT_EQ(epochs, (std::vector<int>{0, 1}));
}

// A point whose step jumped ahead makes the next one look wrong ("less than the step before"):
// the refusal cannot say which is bad, so the run goes whole as before. Dropping the named point
// kept the one that jumped, and every later point of the task was refused behind it.
TEST_F(CoordinatorLinkTest, APointThatJumpedAheadDoesNotBlockTheLaterOnes) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  auto point = [&](int epoch, int64_t step) { return EpochEndReport(task.task_id(), epoch, step); };
  link.Push(point(0, 10));
  link.Push(point(1, 1000));  // jumped ahead
  link.Push(point(1, 20));
  link.StartThreads();
  link.BeginTask(task.task_id(), task.attempt());
  link.Drain(task.task_id(), 30, 0);
  link.Push(point(2, 30));
  link.Drain(task.task_id(), 30, 0);
  link.EndTask();
  link.StopThreads();

  std::vector<int> epochs;
  ASSERT_NO_FATAL_FAILURE(HistoryEpochs(submitted.job_id(), task.task_id(), &epochs));
  EXPECT_EQ(epochs, (std::vector<int>{2}));
}

// Step points dropped for the buffer's bound while the coordinator cannot take them (here it
// refuses the group's token) are said, with the count, instead of leaving a silent gap: the
// warning is in the task's log that `aviary logs` shows once the group gets through again.
TEST_F(CoordinatorLinkTest, StepPointsDroppedForTheBufferBoundAreSaid) {
  v1::SubmitJobResponse submitted;
  ASSERT_NO_FATAL_FAILURE(Submit(&submitted));
  Write("group.token", "the-worker-token\n");
  options_.token_file = root_ + "/group.token";
  options_.token_source = "--token-file";
  options_.max_buffered_points = 3;
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  v1::Task task;
  ASSERT_NO_FATAL_FAILURE(RegisterAndLease(link, &task));
  link.BeginTask(task.task_id(), task.attempt());
  Write("worker.token", "the-new-worker-token\n");  // the group's reports are refused from now
  ASSERT_TRUE(coordinator_->ReloadTokens().ok());
  // Pushed before the sender starts (none in flight): 3 kept, 7 dropped.
  for (int k = 1; k <= 10; ++k) {
    Report point;
    point.kind = Report::Kind::kPoint;
    point.task_id = task.task_id();
    point.point.set_step(k);
    link.Push(point);
  }
  link.StartThreads();
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // the sender's first retries
  Write("group.token", "the-new-worker-token\n");  // through again
  link.Drain(task.task_id(), 30, 0);
  link.EndTask();  // ships the task's lines
  link.StopThreads();
  v1::GetLogsResponse::TaskLog logs;
  ASSERT_NO_FATAL_FAILURE(TaskLogs(submitted.job_id(), task.task_id(), &logs));
  std::string said;
  for (const v1::LogLine& line : logs.lines()) {
    if (line.text().find("step point(s) dropped so far") != std::string::npos) said = line.text();
  }
  EXPECT_NE(said.find("reached their bound of 3 points"), std::string::npos) << "not said: '" << said << "'";
  EXPECT_EQ(said.rfind("[agent] 7 step point(s)", 0), 0u) << said;
}

// A group that starts (or registers again) after a rotation, with the old token read: the refused
// RegisterGroup reads the file again and registers with the token there. Given no file (the token
// itself, AVIARY_TOKEN), the refusal stands; so does one whose file holds the refused token.
TEST_F(CoordinatorLinkTest, RegisterGoesOnWithTheTokenNowInTheFile) {
  Write("group.token", "the-worker-token\n");
  options_.token = "the-old-worker-token";
  {
    CoordinatorLink given(options_, metrics_.get(), OneRank());
    EXPECT_TRUE(absl::IsUnauthenticated(given.Register()));
  }
  options_.token_file = root_ + "/group.token";
  options_.token_source = "AVIARY_TOKEN_FILE";
  {
    CoordinatorLink from_file(options_, metrics_.get(), OneRank());
    const absl::Status registered = from_file.Register();
    EXPECT_TRUE(registered.ok()) << registered;
  }
  Write("group.token", "the-old-worker-token\n");
  CoordinatorLink stale(options_, metrics_.get(), OneRank());
  const absl::Status refused = stale.Register();
  EXPECT_TRUE(absl::IsUnauthenticated(refused)) << refused;
}

// A group registering again (it was lost) while its token is refused: not an error at once, as
// at the start, but waited out like an outage, the file read again at each try, until it holds
// a token the coordinator takes.
TEST_F(CoordinatorLinkTest, RegisteringAgainWaitsUntilTheTokenFileIsFixed) {
  Write("group.token", "the-worker-token\n");
  options_.token_file = root_ + "/group.token";
  options_.token_source = "--token-file";
  CoordinatorLink link(options_, metrics_.get(), OneRank());
  ASSERT_TRUE(link.Register().ok());
  Write("worker.token", "the-new-worker-token\n");
  ASSERT_TRUE(coordinator_->ReloadTokens().ok());
  std::thread fix([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    const std::string next = root_ + "/group.token.next";
    std::ofstream(next) << "the-new-worker-token\n";
    fs::rename(next, root_ + "/group.token");
  });
  const absl::Status again = link.Register();
  fix.join();
  EXPECT_TRUE(again.ok()) << again;
}

}  // namespace
}  // namespace aviary::worker
