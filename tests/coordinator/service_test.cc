// The coordinator end to end: a real gRPC server on 127.0.0.1:0 over a real SQLite file, driven
// through the generated stubs; the test plays the client and the worker groups.
#include "coordinator/service.h"

#include <arpa/inet.h>
#include <sqlite3.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/backbone_fit.h"
#include "common/config.h"
#include "common/model_shapes.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/manifest.h"
#include "common/utf8.h"
#include "coordinator/content_hash.h"
#include "coordinator/fold_cache.h"
#include "coordinator/metrics.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/aviary.grpc.pb.h"
#include "tests/coordinator/http_get.h"
#include "tests/coordinator/tiny_dataset.h"

namespace aviary::coordinator {
namespace {

namespace fs = std::filesystem;
using namespace aviary::v1;  // NOLINT: test brevity

// The value of the sample of `name` whose labels include every one of `labels` ("k=\"v\"").
bool FindSample(const std::string& exposition, const std::string& name,
                const std::vector<std::string>& labels, double* value) {
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (!absl::StartsWith(line, absl::StrCat(name, "{"))) continue;
    const size_t close = line.find('}');
    if (close == absl::string_view::npos) continue;
    const absl::string_view label_text = line.substr(name.size() + 1, close - name.size() - 1);
    bool all = true;
    for (const std::string& label : labels) all = all && absl::StrContains(label_text, label);
    if (all) return absl::SimpleAtod(line.substr(close + 1), value);
  }
  return false;
}

// The heartbeat timeout of the tests that wait for the reaper: short to wait for, but long
// enough that a loaded machine's fsyncs between one group's RPCs (each commit syncs) do not get
// the group reaped in the middle of a test (1 s could).
constexpr int kReapAfterS = 3;

// Polls `condition` every 20 ms until it holds or 30 s pass.
bool Eventually(const std::function<bool()>& condition) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return condition();
}

class CoordinatorServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = absl::StrCat("/tmp/aviary_coordsvc_", ::getpid(), "_XXXXXX");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    WriteDataset();
    Write("token", "the-token\n");
    Write("worker.token", "the-worker-token\n");
    config_ = LoopbackTestConfig(root_);
    config_.max_restarts = 3;
  }
  void TearDown() override {
    if (coordinator_) {
      EXPECT_TRUE(coordinator_->Shutdown().ok());
    }
    coordinator_.reset();
    fs::remove_all(root_);
  }

  void Write(const std::string& rel, const std::string& text) {
    const fs::path p = fs::path(root_) / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }

  void WriteDataset() { WriteTinyDataset(root_); }

  void Start() {
    auto secrets = LoadCoordinatorSecrets(config_);
    ASSERT_TRUE(secrets.ok()) << secrets.status();
    auto coordinator = Coordinator::Start(config_, *secrets);
    ASSERT_TRUE(coordinator.ok()) << coordinator.status();
    coordinator_ = std::move(*coordinator);
    Connect(grpc::InsecureChannelCredentials(), "127.0.0.1");
  }

  void Restart() {
    ASSERT_TRUE(coordinator_->Shutdown().ok());
    coordinator_.reset();
    Start();
  }

  void Connect(std::shared_ptr<grpc::ChannelCredentials> credentials, const std::string& host) {
    auto channel = grpc::CreateChannel(absl::StrCat(host, ":", coordinator_->grpc_port()), credentials);
    jobs_ = JobService::NewStub(channel);
    workers_ = WorkerService::NewStub(channel);
  }

  // A call context with the bearer token (`token` "" = none) and a deadline.
  std::unique_ptr<grpc::ClientContext> Ctx(const std::string& token = "the-token") {
    auto context = std::make_unique<grpc::ClientContext>();
    if (!token.empty()) context->AddMetadata("authorization", absl::StrCat("Bearer ", token));
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return context;
  }

  // The same with the worker groups' token.
  std::unique_ptr<grpc::ClientContext> WorkerCtx() { return Ctx("the-worker-token"); }

  std::string Submit(const std::vector<std::string>& overrides = {}) {
    SubmitJobRequest request;
    request.set_pipeline_yaml(kPipeline);
    request.set_source_path("pipe.yaml");
    request.set_working_dir(root_);
    request.set_name("test job");
    for (const std::string& o : overrides) request.add_overrides(o);
    SubmitJobResponse response;
    const grpc::Status status = jobs_->SubmitJob(Ctx().get(), request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.job_id();
  }

  // `aviary cancel JOB && aviary retry JOB`: the job as the retry left it.
  JobInfo CancelAndRetry(const std::string& job_id) {
    CancelJobRequest cancel;
    cancel.set_job_id(job_id);
    CancelJobResponse cancelled;
    grpc::Status status = jobs_->CancelJob(Ctx().get(), cancel, &cancelled);
    EXPECT_TRUE(status.ok()) << status.error_message();
    RetryJobRequest retry;
    retry.set_job_id(job_id);
    JobInfo retried;
    status = jobs_->RetryJob(Ctx().get(), retry, &retried);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return retried;
  }

  JobInfo GetJob(const std::string& job_id) {
    GetJobRequest request;
    request.set_job_id(job_id);
    JobInfo job;
    const grpc::Status status = jobs_->GetJob(Ctx().get(), request, &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }

  const TaskInfo* FindTask(const JobInfo& job, const std::string& task_id) {
    for (const TaskInfo& task : job.tasks()) {
      if (task.task_id() == task_id) return &task;
    }
    return nullptr;
  }

  std::string Register(int world_size = 2, const std::string& registration_id = "") {
    RegisterGroupRequest request;
    request.set_world_size(world_size);
    request.set_registration_id(registration_id);
    request.add_hosts("node1");
    request.set_backend("mpi");
    RegisterGroupResponse response;
    const grpc::Status status = workers_->RegisterGroup(WorkerCtx().get(), request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.heartbeat_interval_ms(), 200);
    // The group's lease fence counts on it (worker/agent/lease_clock.h).
    EXPECT_EQ(response.heartbeat_timeout_ms(), static_cast<int32_t>(std::llround(config_.heartbeat_timeout_s * 1000)));
    return response.group_id();
  }

  // GetManifest as `group_id`: the streamed bytes (checked to continue each other) and the status.
  grpc::Status FetchManifest(const std::string& group_id, const std::string& hash, std::string* bytes) {
    GetManifestRequest request;
    request.set_group_id(group_id);
    request.set_manifest_hash(hash);
    auto ctx = WorkerCtx();
    auto reader = workers_->GetManifest(ctx.get(), request);
    ManifestChunk chunk;
    bytes->clear();
    while (reader->Read(&chunk)) {
      EXPECT_EQ(chunk.offset(), static_cast<int64_t>(bytes->size()));
      *bytes += chunk.data();
      EXPECT_LE(static_cast<int64_t>(bytes->size()), chunk.total_size());
    }
    return reader->Finish();
  }
  // Rows of the database file (a read-only connection of its own): the first column of `sql`.
  int64_t CountRows(const std::string& sql, const std::string& bind = "") {
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open_v2(config_.database.c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
    if (!bind.empty()) sqlite3_bind_text(stmt, 1, bind.c_str(), -1, SQLITE_TRANSIENT);
    int64_t n = -1;
    if (sqlite3_step(stmt) == SQLITE_ROW) n = sqlite3_column_int64(stmt, 0);
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return n;
  }

  LeaseTaskResponse Lease(const std::string& group_id) {
    LeaseTaskRequest request;
    request.set_group_id(group_id);
    LeaseTaskResponse response;
    const grpc::Status status = workers_->LeaseTask(WorkerCtx().get(), request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  grpc::Status Heartbeat(const std::string& group_id, const std::string& task_id, bool* cancel) {
    HeartbeatRequest request;
    request.set_group_id(group_id);
    request.set_task_id(task_id);
    HeartbeatResponse response;
    grpc::Status status = workers_->Heartbeat(WorkerCtx().get(), request, &response);
    *cancel = response.cancel_task();
    return status;
  }

  static Metrics EpochEnd(int epoch, double val_auc) {
    Metrics m;
    m.set_epoch(epoch);
    m.set_step(10);
    m.set_epoch_end(true);
    m.set_lr(1e-3);
    m.set_train_loss(1.25);
    m.set_train_acc(0.4);
    m.set_val_loss(0.9);
    m.set_val_auc(val_auc);
    m.set_val_roc_auc(0.7);
    m.set_val_cmap(0.6);
    m.set_val_acc(0.5);
    m.set_samples_total(160);
    return m;
  }

  grpc::Status Report(const std::string& group_id, const std::string& task_id,
                      const std::vector<Metrics>& points, bool* cancel) {
    ReportProgressRequest request;
    request.set_group_id(group_id);
    request.set_task_id(task_id);
    request.set_steps_per_epoch(10);
    for (const Metrics& m : points) *request.add_points() = m;
    ReportProgressResponse response;
    grpc::Status status = workers_->ReportProgress(WorkerCtx().get(), request, &response);
    *cancel = response.cancel_task();
    return status;
  }

  // A retryable FailTask of `task_id` by `group_id` (a lost rank, say).
  grpc::Status FailRetryable(const std::string& group_id, const std::string& task_id, const std::string& error,
                             int attempt = 0) {
    FailTaskRequest request;
    request.set_group_id(group_id);
    request.set_task_id(task_id);
    request.set_error(error);
    request.set_retryable(true);
    request.set_attempt(attempt);
    FailTaskResponse response;
    return workers_->FailTask(WorkerCtx().get(), request, &response);
  }

  // A checkpoint file `name` written in the run folder of `task_id` (<job>/<stage>-f<k>); its path.
  std::string Checkpoint(const std::string& task_id, const std::string& name) {
    const size_t slash = task_id.find('/');
    const size_t f = task_id.rfind("-f");
    const std::string rel = absl::StrCat("runs/", task_id.substr(0, slash), "/",
                                         task_id.substr(slash + 1, f - slash - 1), "-fold",
                                         task_id.substr(f + 2), "/", name);
    Write(rel, "checkpoint");
    return root_ + "/" + rel;
  }

  grpc::Status Complete(const std::string& group_id, const std::string& task_id,
                        const std::string& best, int attempt = 0) {
    CompleteTaskRequest request;
    request.set_group_id(group_id);
    request.set_task_id(task_id);
    request.set_best_checkpoint(best);
    request.set_attempt(attempt);
    *request.mutable_best() = EpochEnd(0, 0.8);
    CompleteTaskResponse response;
    return workers_->CompleteTask(WorkerCtx().get(), request, &response);
  }

  std::string root_;
  CoordinatorConfig config_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<JobService::Stub> jobs_;
  std::unique_ptr<WorkerService::Stub> workers_;
};

TEST_F(CoordinatorServiceTest, PretrainThenFinetuneRunsToSuccess) {
  Start();
  const std::string job_id = Submit();
  ASSERT_EQ(job_id.size(), 13u);
  EXPECT_EQ(job_id[0], 'j');
  JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.state(), JOB_STATE_PENDING);
  EXPECT_EQ(job.name(), "test job");
  ASSERT_EQ(job.tasks_size(), 3);
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string ft0 = job_id + "/finetune-f0";
  const std::string ft1 = job_id + "/finetune-f1";
  EXPECT_EQ(job.tasks(0).task_id(), pretrain);
  EXPECT_EQ(job.tasks(0).state(), TASK_STATE_READY);
  EXPECT_EQ(job.tasks(0).epochs(), 3);
  EXPECT_EQ(job.tasks(0).out_dir(), root_ + "/runs/" + job_id + "/pretrain-fold0");
  EXPECT_EQ(job.tasks(1).task_id(), ft0);
  EXPECT_EQ(job.tasks(1).state(), TASK_STATE_BLOCKED);
  EXPECT_EQ(job.tasks(2).task_id(), ft1);

  const std::string a = Register();
  LeaseTaskResponse lease = Lease(a);
  ASSERT_TRUE(lease.available());
  EXPECT_EQ(lease.task().task_id(), pretrain);
  EXPECT_EQ(lease.task().attempt(), 1);
  EXPECT_EQ(lease.task().init_checkpoint(), "");
  // The lease names its manifest by content; the group fetches it.
  EXPECT_EQ(lease.task().manifest_csv(), "");
  std::string csv;
  ASSERT_TRUE(FetchManifest(a, lease.task().manifest_hash(), &csv).ok());
  EXPECT_EQ(static_cast<int64_t>(csv.size()), lease.task().manifest_size());
  EXPECT_EQ(Sha256Hex(csv), lease.task().manifest_hash());
  auto manifest = common::ParseManifestCsv(csv, "lease");
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->stage, "pretrain");
  EXPECT_FALSE(manifest->class_names.empty());
  EXPECT_FALSE(manifest->train.empty());
  auto resolved = common::ParsePipelineConfig(lease.task().pipeline_yaml(), "lease");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(resolved->data.target.root, root_ + "/t24");  // resolved against working_dir
  EXPECT_EQ(GetJob(job_id).state(), JOB_STATE_RUNNING);
  // A group holds one task: leasing again returns the same one.
  LeaseTaskResponse again = Lease(a);
  EXPECT_EQ(again.task().task_id(), pretrain);
  EXPECT_EQ(again.task().attempt(), 1);

  bool cancel = true;
  ASSERT_TRUE(Heartbeat(a, pretrain, &cancel).ok());
  EXPECT_FALSE(cancel);
  Metrics step;
  step.set_epoch(0);
  step.set_step(5);
  step.set_train_loss(2.5);
  step.set_lr(5e-4);
  ASSERT_TRUE(Report(a, pretrain, {step, EpochEnd(0, 0.61)}, &cancel).ok());
  EXPECT_FALSE(cancel);
  ReportCheckpointRequest checkpoint;
  checkpoint.set_group_id(a);
  checkpoint.set_task_id(pretrain);
  checkpoint.set_path(Checkpoint(pretrain, "best.pt"));
  checkpoint.set_epoch(0);
  checkpoint.set_best(true);
  ReportCheckpointResponse checkpoint_response;
  ASSERT_TRUE(workers_->ReportCheckpoint(WorkerCtx().get(), checkpoint, &checkpoint_response).ok());
  const int64_t submitted_ms = job.updated_unix_ms();
  job = GetJob(job_id);
  EXPECT_GE(job.updated_unix_ms(), submitted_ms);
  EXPECT_GE(job.updated_unix_ms(), job.tasks(0).updated_unix_ms());
  EXPECT_EQ(job.tasks(0).steps_per_epoch(), 10);
  EXPECT_DOUBLE_EQ(job.tasks(0).latest().val_auc(), 0.61);

  const std::string best = checkpoint.path();
  ASSERT_TRUE(Complete(a, pretrain, best).ok());
  // Sent again (its answer lost): taken once (AnOutcomeSentAgainAfterItsAnswerWasLostIsTakenOnce).
  EXPECT_TRUE(Complete(a, pretrain, best).ok());
  job = GetJob(job_id);
  EXPECT_EQ(job.tasks(0).state(), TASK_STATE_SUCCEEDED);
  EXPECT_EQ(job.tasks(0).best_checkpoint(), best);
  EXPECT_EQ(job.tasks(1).state(), TASK_STATE_READY);
  EXPECT_EQ(job.tasks(2).state(), TASK_STATE_READY);

  const std::string b = Register();
  LeaseTaskResponse lease_a = Lease(a);
  LeaseTaskResponse lease_b = Lease(b);
  ASSERT_TRUE(lease_a.available() && lease_b.available());
  EXPECT_EQ(lease_a.task().task_id(), ft0);
  EXPECT_EQ(lease_b.task().task_id(), ft1);
  EXPECT_EQ(lease_a.task().init_checkpoint(), best);
  EXPECT_EQ(lease_b.task().init_checkpoint(), best);
  EXPECT_EQ(lease_b.task().out_dir(), root_ + "/runs/" + job_id + "/finetune-fold1");
  // Nothing left for a third group.
  EXPECT_FALSE(Lease(Register()).available());

  ASSERT_TRUE(Report(a, ft0, {EpochEnd(0, 0.70), EpochEnd(1, 0.75)}, &cancel).ok());
  ASSERT_TRUE(Report(b, ft1, {EpochEnd(0, 0.55)}, &cancel).ok());

  ASSERT_GT(coordinator_->metrics_port(), 0);
  const std::string exposition = HttpGet(coordinator_->metrics_port(), "/metrics");
  // docs/SERVICE.md's coordinator table: every name with its type.
  for (const auto& [name, type] : std::vector<std::pair<std::string, std::string>>{
           {"aviary_train_loss", "gauge"}, {"aviary_train_accuracy", "gauge"},
           {"aviary_val_loss", "gauge"}, {"aviary_val_auc", "gauge"},
           {"aviary_val_roc_auc", "gauge"}, {"aviary_val_cmap", "gauge"},
           {"aviary_val_accuracy", "gauge"}, {"aviary_learning_rate", "gauge"},
           {"aviary_task_epoch", "gauge"}, {"aviary_task_running", "gauge"},
           {"aviary_task_last_progress_timestamp_seconds", "gauge"},
           {"aviary_task_restarts_total", "counter"}, {"aviary_jobs", "gauge"},
           {"aviary_worker_groups", "gauge"}, {"aviary_worker_groups_lost_total", "counter"},
           {"aviary_jobs_failed_total", "counter"}}) {
    EXPECT_NE(exposition.find(absl::StrCat("# TYPE ", name, " ", type, "\n")), std::string::npos)
        << name;
  }
  double value = 0;
  ASSERT_TRUE(FindSample(exposition, "aviary_train_loss",
                         {"job_id=\"" + job_id + "\"", "stage=\"finetune\"", "fold=\"0\""}, &value));
  EXPECT_DOUBLE_EQ(value, 1.25);
  ASSERT_TRUE(FindSample(exposition, "aviary_learning_rate",
                         {"job_id=\"" + job_id + "\"", "stage=\"pretrain\"", "fold=\"0\""}, &value));
  EXPECT_DOUBLE_EQ(value, 1e-3);
  EXPECT_NE(exposition.find("\naviary_worker_groups 3\n"), std::string::npos) << exposition;
  // Prometheus' own linter, when installed.
  if (std::system("command -v promtool >/dev/null 2>&1") == 0) {
    const std::string file = root_ + "/metrics.txt";
    std::ofstream(file) << exposition;
    const std::string lint = "promtool check metrics < " + file + " > " + root_ + "/lint.txt 2>&1";
    EXPECT_EQ(std::system(lint.c_str()), 0) << common::ReadFileToString(root_ + "/lint.txt").value_or("");
  }
  ASSERT_TRUE(FindSample(exposition, "aviary_val_auc",
                         {"job_id=\"" + job_id + "\"", "stage=\"finetune\"", "fold=\"0\""}, &value))
      << exposition;
  EXPECT_DOUBLE_EQ(value, 0.75);
  ASSERT_TRUE(FindSample(exposition, "aviary_val_auc",
                         {"job_id=\"" + job_id + "\"", "stage=\"finetune\"", "fold=\"1\""}, &value));
  EXPECT_DOUBLE_EQ(value, 0.55);
  ASSERT_TRUE(FindSample(exposition, "aviary_task_running",
                         {"job_id=\"" + job_id + "\"", "stage=\"pretrain\""}, &value));
  EXPECT_EQ(value, 0);
  ASSERT_TRUE(FindSample(exposition, "aviary_task_epoch",
                         {"job_id=\"" + job_id + "\"", "stage=\"finetune\"", "fold=\"0\""}, &value));
  EXPECT_EQ(value, 2);
  ASSERT_TRUE(FindSample(exposition, "aviary_jobs", {"state=\"running\""}, &value));
  EXPECT_EQ(value, 1);

  ASSERT_TRUE(Complete(a, ft0, Checkpoint(ft0, "best0.pt")).ok());
  EXPECT_EQ(GetJob(job_id).state(), JOB_STATE_RUNNING);
  ASSERT_TRUE(Complete(b, ft1, Checkpoint(ft1, "best1.pt")).ok());
  job = GetJob(job_id);
  EXPECT_EQ(job.state(), JOB_STATE_SUCCEEDED);

  GetHistoryRequest history_request;
  history_request.set_job_id(job_id);
  GetHistoryResponse history;
  ASSERT_TRUE(jobs_->GetHistory(Ctx().get(), history_request, &history).ok());
  ASSERT_EQ(history.rows_size(), 4);
  EXPECT_EQ(history.rows(0).task_id(), pretrain);
  EXPECT_EQ(history.rows(1).task_id(), ft0);
  EXPECT_EQ(history.rows(1).metrics().epoch(), 0);
  EXPECT_EQ(history.rows(2).task_id(), ft0);
  EXPECT_EQ(history.rows(2).metrics().epoch(), 1);
  EXPECT_DOUBLE_EQ(history.rows(2).metrics().val_auc(), 0.75);
  EXPECT_EQ(history.rows(3).task_id(), ft1);
  EXPECT_EQ(history.rows(3).stage(), "finetune");
  EXPECT_EQ(history.rows(3).fold(), 1);

  ListJobsRequest list_request;
  ListJobsResponse list;
  ASSERT_TRUE(jobs_->ListJobs(Ctx().get(), list_request, &list).ok());
  ASSERT_EQ(list.jobs_size(), 1);
  EXPECT_EQ(list.jobs(0).job_id(), job_id);

  const std::string after = HttpGet(coordinator_->metrics_port(), "/metrics");
  ASSERT_TRUE(FindSample(after, "aviary_jobs", {"state=\"succeeded\""}, &value)) << after;
  EXPECT_EQ(value, 1);
}

// The job list is bounded in bytes as well as in count (sweeps' jobs are hundreds of KB each):
// the newest jobs that fit, always at least one, and how many older ones were left out.
TEST_F(CoordinatorServiceTest, JobListIsBoundedInBytes) {
  Start();
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(Submit());
  Scheduler* scheduler = coordinator_->scheduler();
  const std::vector<JobInfo> all = scheduler->ListJobs(0);
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[0].job_id(), ids[2]);  // newest first
  const size_t one = all[0].ByteSizeLong();
  int omitted = -1;
  std::vector<JobInfo> listed = scheduler->ListJobs(0, 2 * one + one / 2, &omitted);
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_EQ(listed[1].job_id(), ids[1]);
  EXPECT_EQ(omitted, 1);
  listed = scheduler->ListJobs(0, 1, &omitted);  // the newest job alone is past the cap
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].job_id(), ids[2]);
  EXPECT_EQ(omitted, 2);
  listed = scheduler->ListJobs(2, 1, &omitted);  // only the jobs within the limit count
  EXPECT_EQ(omitted, 1);
  listed = scheduler->ListJobs(0, 0, &omitted);
  EXPECT_EQ(listed.size(), 3u);
  EXPECT_EQ(omitted, 0);
  // The RPC (a 64 MB cap) lists all three and says none was left out.
  ListJobsRequest request;
  ListJobsResponse response;
  ASSERT_TRUE(jobs_->ListJobs(Ctx().get(), request, &response).ok());
  EXPECT_EQ(response.jobs_size(), 3);
  EXPECT_EQ(response.omitted(), 0);
  EXPECT_EQ(response.beyond_limit(), 0);
  // Exactly as many jobs as the limit: none beyond it (the list and the console said "the
  // newest N" then); one fewer: one beyond.
  request.set_limit(3);
  response.Clear();
  ASSERT_TRUE(jobs_->ListJobs(Ctx().get(), request, &response).ok());
  EXPECT_EQ(response.jobs_size(), 3);
  EXPECT_EQ(response.beyond_limit(), 0);
  request.set_limit(2);
  response.Clear();
  ASSERT_TRUE(jobs_->ListJobs(Ctx().get(), request, &response).ok());
  EXPECT_EQ(response.jobs_size(), 2);
  EXPECT_EQ(response.jobs(1).job_id(), ids[1]);
  EXPECT_EQ(response.beyond_limit(), 1);
  EXPECT_EQ(response.omitted(), 0);
}

TEST_F(CoordinatorServiceTest, LostGroupsRestartTheTaskThenFailIt) {
  config_.heartbeat_timeout_s = kReapAfterS;
  config_.max_restarts = 1;
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string task_id = job_id + "/pretrain-f0";
  const std::string a = Register();
  LeaseTaskResponse first = Lease(a);
  ASSERT_TRUE(first.available());
  EXPECT_EQ(first.task().attempt(), 1);
  bool cancel = false;
  ASSERT_TRUE(Report(a, task_id, {EpochEnd(0, 0.3)}, &cancel).ok());
  ReportCheckpointRequest checkpoint;
  checkpoint.set_group_id(a);
  checkpoint.set_task_id(task_id);
  checkpoint.set_path(Checkpoint(task_id, "last.pt"));
  checkpoint.set_epoch(0);
  ReportCheckpointResponse checkpoint_response;
  ASSERT_TRUE(workers_->ReportCheckpoint(WorkerCtx().get(), checkpoint, &checkpoint_response).ok());

  // Group a stops heartbeating: the reaper removes it and the task is READY again.
  ASSERT_TRUE(Eventually([&] {
    const JobInfo job = GetJob(job_id);
    return job.tasks(0).state() == TASK_STATE_READY;
  }));
  JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.tasks(0).restarts(), 1);
  EXPECT_EQ(job.tasks(0).group_id(), "");
  EXPECT_EQ(job.tasks(0).out_dir(), first.task().out_dir());
  const grpc::Status gone = Heartbeat(a, task_id, &cancel);
  EXPECT_EQ(gone.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(gone.error_message().find("group " + a + " is not registered"), std::string::npos)
      << gone.error_message();

  const std::string b = Register();
  LeaseTaskResponse second = Lease(b);
  ASSERT_TRUE(second.available());
  EXPECT_EQ(second.task().task_id(), task_id);
  EXPECT_EQ(second.task().attempt(), 2);
  EXPECT_EQ(second.task().out_dir(), first.task().out_dir());
  EXPECT_EQ(second.task().resume_checkpoint(), checkpoint.path());
  // The same epoch again from the new attempt: history keeps the last report.
  ASSERT_TRUE(Report(b, task_id, {EpochEnd(0, 0.35)}, &cancel).ok());

  // b goes silent too: one restart more than max_restarts fails the task and the job.
  ASSERT_TRUE(Eventually([&] { return GetJob(job_id).state() == JOB_STATE_FAILED; }));
  job = GetJob(job_id);
  EXPECT_EQ(job.tasks(0).state(), TASK_STATE_FAILED);
  EXPECT_NE(job.tasks(0).error().find("lost group " + b), std::string::npos) << job.tasks(0).error();
  EXPECT_NE(job.tasks(0).error().find("max_restarts 1"), std::string::npos) << job.tasks(0).error();
  EXPECT_NE(job.error().find(task_id), std::string::npos) << job.error();
  EXPECT_EQ(Heartbeat(b, task_id, &cancel).error_code(), grpc::StatusCode::NOT_FOUND);

  GetHistoryRequest history_request;
  history_request.set_job_id(job_id);
  GetHistoryResponse history;
  ASSERT_TRUE(jobs_->GetHistory(Ctx().get(), history_request, &history).ok());
  ASSERT_EQ(history.rows_size(), 1);
  EXPECT_DOUBLE_EQ(history.rows(0).metrics().val_auc(), 0.35);
  EXPECT_EQ(history.rows(0).attempt(), 2);

  const std::string exposition = HttpGet(coordinator_->metrics_port(), "/metrics");
  double value = 0;
  ASSERT_TRUE(FindSample(exposition, "aviary_task_restarts_total",
                         {"job_id=\"" + job_id + "\"", "stage=\"pretrain\""}, &value))
      << exposition;
  EXPECT_EQ(value, 1);
  ASSERT_NE(exposition.find("aviary_worker_groups_lost_total 2"), std::string::npos) << exposition;
}

// Two groups of one job lost together: the first one's task is out of restarts, which fails
// the job and cancels the other task; the second one's task must stay CANCELLED (not be put back
// to READY by the same reaper pass).
TEST_F(CoordinatorServiceTest, GroupsLostTogetherLeaveNoReadyTaskInAFailedJob) {
  config_.heartbeat_timeout_s = kReapAfterS;
  config_.max_restarts = 1;
  Start();
  const std::string job_id = Submit({"stages.pretrain.enabled=false"});
  const std::string t0 = job_id + "/finetune-f0";
  const std::string t1 = job_id + "/finetune-f1";
  // A first group takes fold 0 and dies: fold 0 uses up its one restart.
  const std::string c = Register();
  ASSERT_EQ(Lease(c).task().task_id(), t0);
  ASSERT_TRUE(Eventually([&] {
    const JobInfo job = GetJob(job_id);
    const TaskInfo* t = FindTask(job, t0);
    return t != nullptr && t->state() == TASK_STATE_READY && t->restarts() == 1;
  }));
  // Two groups take both folds and die at the same moment.
  const std::string a = Register();
  const std::string b = Register();
  ASSERT_EQ(Lease(a).task().task_id(), t0);
  ASSERT_EQ(Lease(b).task().task_id(), t1);
  ASSERT_TRUE(Eventually([&] { return GetJob(job_id).state() == JOB_STATE_FAILED; }));
  // Let every reaper pass that could touch them run.
  std::this_thread::sleep_for(std::chrono::milliseconds(kReapAfterS * 1000 + 1500));
  const JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.state(), JOB_STATE_FAILED);
  ASSERT_NE(FindTask(job, t0), nullptr);
  ASSERT_NE(FindTask(job, t1), nullptr);
  EXPECT_EQ(FindTask(job, t0)->state(), TASK_STATE_FAILED);
  EXPECT_NE(FindTask(job, t1)->state(), TASK_STATE_READY) << FindTask(job, t1)->DebugString();
  EXPECT_NE(FindTask(job, t1)->state(), TASK_STATE_LEASED) << FindTask(job, t1)->DebugString();
  for (const TaskInfo& t : job.tasks()) {
    EXPECT_NE(t.state(), TASK_STATE_READY) << t.task_id();
  }
  // Nothing of the failed job is leased again.
  const std::string d = Register();
  EXPECT_FALSE(Lease(d).available());
}

// deploy/prometheus/alerts.yml: AviaryTaskNeverReported fires for a leased task without a
// last-progress timestamp, AviaryTaskStalled for one whose timestamp is old. A new attempt has
// reported nothing yet: the earlier attempt's timestamp must not stand for it.
TEST_F(CoordinatorServiceTest, ANewAttemptStartsWithoutTheLastAttemptsProgressTimestamp) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_TRUE(Lease(a).available());
  bool cancel = false;
  ASSERT_TRUE(Report(a, pretrain, {EpochEnd(0, 0.5)}, &cancel).ok());
  const std::vector<std::string> labels{"job_id=\"" + job_id + "\"", "stage=\"pretrain\""};
  auto sample = [&](const char* name, double* value) {
    return FindSample(HttpGet(coordinator_->metrics_port(), "/metrics"), name, labels, value);
  };
  double value = 0;
  ASSERT_TRUE(sample("aviary_task_last_progress_timestamp_seconds", &value));
  ASSERT_TRUE(FailRetryable(a, pretrain, "lost a rank").ok());
  ASSERT_EQ(Lease(a).task().attempt(), 2);
  ASSERT_TRUE(sample("aviary_task_running", &value));
  EXPECT_EQ(value, 1);
  EXPECT_FALSE(sample("aviary_task_last_progress_timestamp_seconds", &value)) << value;
  // Nor after a restart (it read the earlier attempt's points back).
  Restart();
  ASSERT_TRUE(sample("aviary_task_running", &value));
  EXPECT_EQ(value, 1);
  EXPECT_FALSE(sample("aviary_task_last_progress_timestamp_seconds", &value)) << value;
  ASSERT_TRUE(Report(a, pretrain, {EpochEnd(0, 0.6)}, &cancel).ok());
  EXPECT_TRUE(sample("aviary_task_last_progress_timestamp_seconds", &value));
}

// An older epoch end whose stored metrics are damaged is not read at a start (only each task's
// newest point is): the history leaves it out, says how many it left out, and names it once.
TEST_F(CoordinatorServiceTest, HistorySaysHowManyDamagedEpochRowsItLeftOut) {
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_TRUE(Lease(a).available());
  bool cancel = false;
  ASSERT_TRUE(Report(a, pretrain, {EpochEnd(0, 0.5), EpochEnd(1, 0.6), EpochEnd(2, 0.7)}, &cancel).ok());
  ASSERT_TRUE(coordinator_->Shutdown().ok());
  coordinator_.reset();
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(config_.database.c_str(), &db), SQLITE_OK);
    // 0xff starts a varint that never ends: no protobuf parser takes it.
    char* err = nullptr;
    ASSERT_EQ(sqlite3_exec(db, "UPDATE metric_points SET metrics=x'ff' WHERE epoch=0 AND epoch_end=1", nullptr,
                           nullptr, &err),
              SQLITE_OK)
        << err;
    EXPECT_EQ(sqlite3_changes(db), 1);
    sqlite3_close(db);
  }
  Start();
  for (int read = 0; read < 2; ++read) {  // every read says it, not only the first
    GetHistoryRequest request;
    request.set_job_id(job_id);
    GetHistoryResponse history;
    ASSERT_TRUE(jobs_->GetHistory(Ctx().get(), request, &history).ok());
    ASSERT_EQ(history.rows_size(), 2) << read;
    EXPECT_EQ(history.rows(0).metrics().epoch(), 1);
    EXPECT_EQ(history.damaged_points_skipped(), 1) << read;
  }
  // The client says so.
  const std::string command =
      absl::StrCat("env -u AVIARY_TOKEN_FILE -u AVIARY_TLS_CA AVIARY_TOKEN=the-token '" AVIARY_CLIENT_BINARY
                   "' --coordinator 127.0.0.1:", coordinator_->grpc_port(), " history ", job_id, " 2>&1");
  int status = -1;
  const std::string out = CommandOutput(command, &status);
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("warning: 1 epoch rows of this history are damaged"), std::string::npos) << out;
}

// A resumed attempt reports the epochs it restored from last.pt again, as history.csv holds them
// (6 significant digits): the history keeps the attempt that trained them. An epoch trained
// again (other values) is the new attempt's.
TEST_F(CoordinatorServiceTest, HistoryKeepsTheAttemptThatTrainedARestoredEpoch) {
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_TRUE(Lease(a).available());
  bool cancel = false;
  Metrics first = EpochEnd(0, 0.612345678901);
  first.set_train_loss(1.23456789012);
  Metrics second = EpochEnd(1, 0.7);
  second.set_step(20);
  ASSERT_TRUE(Report(a, pretrain, {first, second}, &cancel).ok());
  ASSERT_TRUE(FailRetryable(a, pretrain, "lost a rank").ok());
  ASSERT_EQ(Lease(a).task().attempt(), 2);
  // Attempt 2 restored epoch 0 only (last.prev.pt, say): epoch 0 repeated from the file, epoch 1
  // trained again.
  Metrics restored = first;
  restored.set_val_auc(0.612346);
  restored.set_train_loss(1.23457);
  restored.set_samples_total(0);
  Metrics retrained = EpochEnd(1, 0.71);
  retrained.set_step(20);
  ASSERT_TRUE(Report(a, pretrain, {restored, retrained}, &cancel).ok());
  GetHistoryRequest request;
  request.set_job_id(job_id);
  GetHistoryResponse history;
  ASSERT_TRUE(jobs_->GetHistory(Ctx().get(), request, &history).ok());
  ASSERT_EQ(history.rows_size(), 2);
  EXPECT_EQ(history.rows(0).metrics().epoch(), 0);
  EXPECT_EQ(history.rows(0).attempt(), 1);
  EXPECT_DOUBLE_EQ(history.rows(0).metrics().val_auc(), 0.612345678901);  // the first report's
  EXPECT_EQ(history.rows(1).metrics().epoch(), 1);
  EXPECT_EQ(history.rows(1).attempt(), 2);
  EXPECT_DOUBLE_EQ(history.rows(1).metrics().val_auc(), 0.71);
}

TEST_F(CoordinatorServiceTest, RetryableFailureCountsAsRestartNonRetryableFailsTheJob) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_TRUE(Lease(a).available());
  FailTaskRequest fail;
  fail.set_group_id(a);
  fail.set_task_id(pretrain);
  fail.set_error("stopped by signal");
  fail.set_retryable(true);
  FailTaskResponse fail_response;
  ASSERT_TRUE(workers_->FailTask(WorkerCtx().get(), fail, &fail_response).ok());
  JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.tasks(0).state(), TASK_STATE_READY);
  EXPECT_EQ(job.tasks(0).restarts(), 1);
  LeaseTaskResponse again = Lease(a);
  EXPECT_EQ(again.task().attempt(), 2);
  // A preempted group (SIGTERM from a Slurm time limit) gives the task back without a restart,
  // however often it happens.
  fail.set_preempted(true);
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(workers_->FailTask(WorkerCtx().get(), fail, &fail_response).ok());
    job = GetJob(job_id);
    EXPECT_EQ(job.tasks(0).state(), TASK_STATE_READY);
    EXPECT_EQ(job.tasks(0).restarts(), 1);
    EXPECT_EQ(job.state(), JOB_STATE_RUNNING);
    again = Lease(a);
    EXPECT_EQ(again.task().attempt(), 3 + i);
  }
  fail.set_preempted(false);
  fail.set_error("bad data: no rows");
  fail.set_retryable(false);
  ASSERT_TRUE(workers_->FailTask(WorkerCtx().get(), fail, &fail_response).ok());
  job = GetJob(job_id);
  EXPECT_EQ(job.state(), JOB_STATE_FAILED);
  EXPECT_EQ(job.tasks(0).state(), TASK_STATE_FAILED);
  EXPECT_EQ(job.tasks(1).state(), TASK_STATE_CANCELLED);
  EXPECT_NE(job.error().find("bad data: no rows"), std::string::npos) << job.error();
  EXPECT_FALSE(Lease(a).available());
}

// A group whose RegisterGroup answer was lost (a deadline during a slow commit, a restart right
// after it) sends the registration again with the same registration_id: it gets the group the
// first call registered, across a restart too, rather than a second group that would never
// heartbeat and be counted lost (aviary_worker_groups_lost_total, AviaryWorkerGroupLost).
TEST_F(CoordinatorServiceTest, ARegistrationSentAgainGetsTheGroupItRegistered) {
  Start();
  const std::string a = Register(2, "0123456789abcdef");
  EXPECT_EQ(Register(2, "0123456789abcdef"), a);
  const std::string b = Register(2, "fedcba9876543210");
  EXPECT_NE(b, a);
  EXPECT_NE(Register(), Register());  // without an id, every call is a group of its own
  Restart();
  EXPECT_EQ(Register(2, "0123456789abcdef"), a);
  EXPECT_EQ(CountRows("SELECT COUNT(*) FROM groups"), 4);
  // The same id with other details is another process's mistake, not a resend.
  RegisterGroupRequest other;
  other.set_world_size(4);
  other.set_registration_id("0123456789abcdef");
  RegisterGroupResponse other_response;
  const grpc::Status mismatch = workers_->RegisterGroup(WorkerCtx().get(), other, &other_response);
  EXPECT_EQ(mismatch.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(mismatch.error_message().find("registered group " + a + " with other details"), std::string::npos)
      << mismatch.error_message();
  RegisterGroupRequest bad;
  bad.set_world_size(1);
  bad.set_registration_id("a b");
  RegisterGroupResponse response;
  const grpc::Status status = workers_->RegisterGroup(WorkerCtx().get(), bad, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'registration_id': 'a b'"), std::string::npos)
      << status.error_message();
}

// The group could not heartbeat while its registration's answer was lost (it had no id): the
// registration sent again counts as hearing from it, or the reaper could remove it right after
// answering, before its first heartbeat.
TEST_F(CoordinatorServiceTest, ARegistrationSentAgainCountsAsHearingFromTheGroup) {
  // Slack of 3 s before the timeout for the second call, and 2 s past it (from the first call)
  // and 3 s within it (from the second) for the reap.
  config_.heartbeat_timeout_s = 8;
  Start();
  const std::string a = Register(1, "r-heard");
  std::this_thread::sleep_for(std::chrono::milliseconds(5000));
  ASSERT_EQ(Register(1, "r-heard"), a);
  std::this_thread::sleep_for(std::chrono::milliseconds(5000));  // 10 s after the first call
  coordinator_->scheduler()->ReapLostGroups();
  bool cancel = false;
  EXPECT_TRUE(Heartbeat(a, "", &cancel).ok());
}

// A coordinator restarted with a shorter heartbeat timeout reaps a group that registered before no
// sooner than the timeout that group was told (its write fence runs on it: reaped earlier, its
// task's next holder wrote beside it), until the group's heartbeat says it runs on the new one,
// which the answer tells it.
TEST_F(CoordinatorServiceTest, AShorterTimeoutAfterARestartWaitsForTheGroupsFence) {
  config_.heartbeat_timeout_s = 6;
  Start();
  const std::string a = Register();
  config_.heartbeat_timeout_s = 2;
  Restart();
  auto beat = [&](int64_t fence_ms, HeartbeatResponse* response) {
    HeartbeatRequest request;
    request.set_group_id(a);
    request.set_fence_timeout_ms(fence_ms);
    return workers_->Heartbeat(WorkerCtx().get(), request, response);
  };
  std::this_thread::sleep_for(std::chrono::milliseconds(3500));  // past 2 s, within 6 s
  HeartbeatResponse response;
  grpc::Status status = beat(6000, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.heartbeat_timeout_ms(), 2000);
  EXPECT_EQ(response.heartbeat_interval_ms(), 200);
  std::this_thread::sleep_for(std::chrono::milliseconds(3500));  // the fence it said: 6 s
  status = beat(2000, &response);  // now on the new timeout
  ASSERT_TRUE(status.ok()) << status.error_message();
  // The store's record of the longest fence follows it down (the reaper keeps it): restarted
  // again, the group is reaped after 2 s, not 6.
  coordinator_->scheduler()->ReapLostGroups();
  Restart();
  std::this_thread::sleep_for(std::chrono::milliseconds(4500));  // 2 s, and the reaper's period to spare
  status = beat(2000, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << status.error_message();
}

// A group whose CompleteTask or FailTask landed but whose answer was lost (a deadline, a
// coordinator restart right after the commit) sends it again: the same group's report for the
// attempt it ended is answered OK and changes nothing, across a restart too. Anything else is
// still refused: another group, another best checkpoint, the other outcome, and a report for an
// attempt that ended otherwise (cancelled under the group after it leased the task again).
TEST_F(CoordinatorServiceTest, AnOutcomeSentAgainAfterItsAnswerWasLostIsTakenOnce) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string ft0 = job_id + "/finetune-f0";
  const std::string a = Register();
  const std::string b = Register();
  auto fail = [&](const std::string& group, const std::string& task_id) {
    FailTaskRequest request;
    request.set_group_id(group);
    request.set_task_id(task_id);
    request.set_error("CUDA error: an illegal memory access");
    request.set_retryable(true);
    FailTaskResponse response;
    return workers_->FailTask(WorkerCtx().get(), request, &response).error_code();
  };
  ASSERT_EQ(Lease(a).task().task_id(), pretrain);
  ASSERT_EQ(fail(a, pretrain), grpc::StatusCode::OK);
  EXPECT_EQ(fail(a, pretrain), grpc::StatusCode::OK);
  EXPECT_EQ(fail(b, pretrain), grpc::StatusCode::FAILED_PRECONDITION);
  Restart();
  EXPECT_EQ(fail(a, pretrain), grpc::StatusCode::OK);
  JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.tasks(0).state(), TASK_STATE_READY);
  EXPECT_EQ(job.tasks(0).restarts(), 1);  // counted once
  EXPECT_EQ(job.tasks(0).ended_by_group(), a);
  EXPECT_EQ(job.tasks(0).ended_attempt(), 1);

  LeaseTaskResponse lease = Lease(b);
  ASSERT_EQ(lease.task().task_id(), pretrain);
  ASSERT_EQ(lease.task().attempt(), 2);
  EXPECT_EQ(fail(a, pretrain), grpc::StatusCode::FAILED_PRECONDITION);  // leased since
  const std::string best = Checkpoint(pretrain, "best.pt");
  ASSERT_TRUE(Complete(b, pretrain, best).ok());
  EXPECT_TRUE(Complete(b, pretrain, best).ok());
  Restart();
  EXPECT_TRUE(Complete(b, pretrain, best).ok());
  EXPECT_EQ(Complete(b, pretrain, Checkpoint(pretrain, "last.pt")).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Complete(a, pretrain, best).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(fail(b, pretrain), grpc::StatusCode::FAILED_PRECONDITION);  // it succeeded
  job = GetJob(job_id);
  EXPECT_EQ(job.tasks(0).state(), TASK_STATE_SUCCEEDED);
  EXPECT_EQ(job.tasks(0).restarts(), 1);
  EXPECT_EQ(job.tasks(1).state(), TASK_STATE_READY);

  // a fails attempt 1 of the fine-tuning task, leases it again, and attempt 2 is cancelled
  // under it: its FailTask for the cancelled attempt is refused as before.
  ASSERT_EQ(Lease(a).task().task_id(), ft0);
  ASSERT_EQ(fail(a, ft0), grpc::StatusCode::OK);
  lease = Lease(a);
  ASSERT_EQ(lease.task().task_id(), ft0);
  ASSERT_EQ(lease.task().attempt(), 2);
  CancelAndRetry(job_id);
  EXPECT_EQ(fail(a, ft0), grpc::StatusCode::FAILED_PRECONDITION);
}

// /metrics is not served (404) until Publish (the coordinator calls it after the scheduler's
// restore): a restarted coordinator served its stored counters as 0 for as long as the restore
// took, and Prometheus read 5 -> 0 -> 5 as a counter reset (AviaryJobFailed fired).
TEST(CoordinatorMetricsTest, ServesNoSeriesBeforePublish) {
  auto metrics = CoordinatorMetrics::Create("127.0.0.1:0");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  ASSERT_GT((*metrics)->port(), 0);
  (*metrics)->AddJobsFailed(5);
  EXPECT_FALSE(absl::StrContains(HttpGet((*metrics)->port(), "/metrics"), "aviary_jobs_failed_total"));
  (*metrics)->Publish();
  (*metrics)->Publish();  // once is enough; again does nothing
  EXPECT_TRUE(absl::StrContains(HttpGet((*metrics)->port(), "/metrics"), "\naviary_jobs_failed_total 5\n"));
}

// An epoch end's infinite value is exported as it is (the last finite one stayed, beside the new
// epoch count); NaN is a value the point does not carry, and the last one stays.
TEST(CoordinatorMetricsTest, AnInfiniteEpochValueIsShownAndAnAbsentOneKeepsTheLast) {
  auto metrics = CoordinatorMetrics::Create("");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  (*metrics)->Publish();
  TaskInfo task;
  task.set_job_id("j0123456789ab");
  task.set_stage("finetune");
  task.set_fold(0);
  aviary::v1::Metrics point;
  point.set_epoch_end(true);
  point.set_epoch(0);
  point.set_val_loss(1.5);
  point.set_val_auc(0.75);
  (*metrics)->ObservePoint(task, point, 1000);
  point.set_epoch(1);
  point.set_val_loss(std::numeric_limits<double>::infinity());
  point.set_val_auc(std::numeric_limits<double>::quiet_NaN());
  (*metrics)->ObservePoint(task, point, 2000);
  const std::string text = (*metrics)->Serialize();
  EXPECT_TRUE(absl::StrContains(text, "aviary_val_loss{fold=\"0\",job_id=\"j0123456789ab\",stage=\"finetune\"} +Inf"))
      << text;
  EXPECT_TRUE(absl::StrContains(text, "aviary_val_auc{fold=\"0\",job_id=\"j0123456789ab\",stage=\"finetune\"} 0.75"))
      << text;
  EXPECT_TRUE(absl::StrContains(text, "aviary_task_epoch{fold=\"0\",job_id=\"j0123456789ab\",stage=\"finetune\"} 2"))
      << text;
}

// The AviaryJobFailed alert watches aviary_jobs_failed_total: every transition to FAILED counts,
// a retried job failing again counts again, and the count neither drops when a failed job is
// deleted or retried (the aviary_jobs{state="failed"} gauge does: it cannot tell a new failure
// from a failed job deleted meanwhile) nor resets when the coordinator restarts. A cancel is not
// a failure.
TEST_F(CoordinatorServiceTest, EveryJobFailureIsCountedOnceAndStaysCounted) {
  Start();
  const std::string group = Register();
  auto lease_and_fail = [&](const std::string& holder, const std::string& job_id) {
    LeaseTaskResponse lease = Lease(holder);
    ASSERT_TRUE(lease.available());
    ASSERT_EQ(lease.task().job_id(), job_id);
    FailTaskRequest fail;
    fail.set_group_id(holder);
    fail.set_task_id(lease.task().task_id());
    fail.set_error("bad data: no rows");
    FailTaskResponse response;
    ASSERT_TRUE(workers_->FailTask(WorkerCtx().get(), fail, &response).ok());
    ASSERT_EQ(GetJob(job_id).state(), JOB_STATE_FAILED);
  };
  auto failed_total = [&]() {
    const std::string exposition = HttpGet(coordinator_->metrics_port(), "/metrics");
    for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
      if (absl::ConsumePrefix(&line, "aviary_jobs_failed_total ")) return std::string(line);
    }
    return std::string("absent");
  };
  EXPECT_EQ(failed_total(), "0");
  const std::string job_id = Submit();
  lease_and_fail(group, job_id);
  EXPECT_EQ(failed_total(), "1");
  RetryJobRequest retry;
  retry.set_job_id(job_id);
  JobInfo retried;
  ASSERT_TRUE(jobs_->RetryJob(Ctx().get(), retry, &retried).ok());
  EXPECT_EQ(failed_total(), "1");
  lease_and_fail(group, job_id);
  EXPECT_EQ(failed_total(), "2");
  // Deleted: the gauge goes down, the count stays.
  DeleteJobRequest remove;
  remove.set_job_id(job_id);
  DeleteJobResponse removed;
  ASSERT_TRUE(jobs_->DeleteJob(Ctx().get(), remove, &removed).ok());
  double failed_jobs = -1;
  const std::string exposition = HttpGet(coordinator_->metrics_port(), "/metrics");
  ASSERT_TRUE(FindSample(exposition, "aviary_jobs", {"state=\"failed\""}, &failed_jobs)) << exposition;
  EXPECT_EQ(failed_jobs, 0);
  EXPECT_EQ(failed_total(), "2");
  // Cancelled is not failed.
  const std::string cancelled_job = Submit();
  CancelJobRequest cancel;
  cancel.set_job_id(cancelled_job);
  CancelJobResponse cancelled;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
  EXPECT_EQ(failed_total(), "2");
  Restart();
  EXPECT_EQ(failed_total(), "2");
  lease_and_fail(Register(), Submit());
  EXPECT_EQ(failed_total(), "3");
}

// Issue 14 item 8: a group that ends normally leaves. It is removed at once, not counted as lost
// (the AviaryWorkerGroupLost alert watches aviary_worker_groups_lost_total), and the task it held
// is READY again without a restart.
TEST_F(CoordinatorServiceTest, LeaveGroupRemovesTheGroupWithoutCountingItLost) {
  config_.heartbeat_timeout_s = kReapAfterS;
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string a = Register();
  ASSERT_TRUE(Lease(a).available());
  LeaveGroupRequest leave;
  leave.set_group_id(a);
  leave.set_reason("stopped by signal (SIGTERM)");
  LeaveGroupResponse leave_response;
  ASSERT_TRUE(workers_->LeaveGroup(WorkerCtx().get(), leave, &leave_response).ok());
  JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.tasks(0).state(), TASK_STATE_READY);
  EXPECT_EQ(job.tasks(0).restarts(), 0);
  EXPECT_EQ(job.tasks(0).group_id(), "");
  bool cancel = false;
  EXPECT_EQ(Heartbeat(a, "", &cancel).error_code(), grpc::StatusCode::NOT_FOUND);
  const grpc::Status twice = workers_->LeaveGroup(WorkerCtx().get(), leave, &leave_response);
  EXPECT_EQ(twice.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(twice.error_message().find("group " + a + " is not registered"), std::string::npos)
      << twice.error_message();
  // An idle group leaves too; the reason is one line of text.
  const std::string b = Register();
  leave.set_group_id(b);
  leave.set_reason("served 1\ntask(s)");
  const grpc::Status bad = workers_->LeaveGroup(WorkerCtx().get(), leave, &leave_response);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bad.error_message().find("field 'reason'"), std::string::npos) << bad.error_message();
  leave.set_reason("served 1 task(s), --max-tasks 1");
  ASSERT_TRUE(workers_->LeaveGroup(WorkerCtx().get(), leave, &leave_response).ok());
  // Past the heartbeat timeout, nothing is left to reap and nothing was lost.
  std::this_thread::sleep_for(std::chrono::milliseconds(kReapAfterS * 1000 + 500));
  EXPECT_EQ(coordinator_->scheduler()->ReapLostGroups(), 0);
  const std::string exposition = HttpGet(coordinator_->metrics_port(), "/metrics");
  EXPECT_NE(exposition.find("aviary_worker_groups_lost_total 0"), std::string::npos) << exposition;
  EXPECT_NE(exposition.find("aviary_worker_groups 0"), std::string::npos) << exposition;
  // The task is leased to the next group as attempt 2.
  const std::string c = Register();
  LeaseTaskResponse again = Lease(c);
  ASSERT_TRUE(again.available());
  EXPECT_EQ(again.task().attempt(), 2);
}

TEST_F(CoordinatorServiceTest, CancelStopsTheHolderAndEndsWatchers) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_TRUE(Lease(a).available());

  std::vector<JobEvent> events;
  std::atomic<bool> watching{false};
  std::atomic<bool> saw_report{false};
  grpc::Status watch_status;
  auto watch_context = Ctx();
  std::thread watcher([&] {
    WatchJobRequest request;
    request.set_job_id(job_id);
    auto reader = jobs_->WatchJob(watch_context.get(), request);
    JobEvent event;
    while (reader->Read(&event)) {
      events.push_back(event);
      if (event.has_metrics() && event.metrics().val_auc() == 0.4) saw_report = true;
      watching = true;
    }
    watch_status = reader->Finish();
  });
  // A failed wait ends the watch before the test returns (a joinable thread would abort the
  // whole binary).
  auto stop_watching = [&] {
    watch_context->TryCancel();
    watcher.join();
  };
  // The first event (the job as it is) arrives before anything changes.
  if (!Eventually([&] { return watching.load(); })) {
    stop_watching();
    FAIL() << "no first event from WatchJob";
  }
  bool cancel = true;
  const bool reported = Report(a, pretrain, {EpochEnd(0, 0.4)}, &cancel).ok();
  // The watcher reads the report before the cancel: a finished job keeps only its final
  // change's events, so a watcher still behind then gets the state instead of the report.
  if (!reported || !Eventually([&] { return saw_report.load(); })) {
    stop_watching();
    FAIL() << (reported ? "the watcher never saw the report" : "Report failed");
  }
  EXPECT_FALSE(cancel);

  CancelJobRequest cancel_request;
  cancel_request.set_job_id(job_id);
  CancelJobResponse cancel_response;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel_request, &cancel_response).ok());
  EXPECT_EQ(cancel_response.job().state(), JOB_STATE_CANCELLED);
  watcher.join();
  EXPECT_TRUE(watch_status.ok()) << watch_status.error_message();
  ASSERT_GE(events.size(), 3u);  // the job, the report, the cancel
  EXPECT_EQ(events.front().job().job_id(), job_id);
  EXPECT_EQ(events.front().job().state(), JOB_STATE_RUNNING);
  bool saw_progress = false;
  for (const JobEvent& event : events) {
    if (event.has_metrics() && event.metrics().val_auc() == 0.4) saw_progress = true;
  }
  EXPECT_TRUE(saw_progress);
  EXPECT_EQ(events.back().job().state(), JOB_STATE_CANCELLED);

  ASSERT_TRUE(Heartbeat(a, pretrain, &cancel).ok());
  EXPECT_TRUE(cancel);
  ASSERT_TRUE(Report(a, pretrain, {EpochEnd(1, 0.5)}, &cancel).ok());
  EXPECT_TRUE(cancel);
  JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.state(), JOB_STATE_CANCELLED);
  for (const TaskInfo& task : job.tasks()) EXPECT_EQ(task.state(), TASK_STATE_CANCELLED);
  EXPECT_EQ(Complete(a, pretrain, Checkpoint(pretrain, "best.pt")).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // The ignored report did not move the task.
  EXPECT_EQ(job.tasks(0).latest().epoch(), 0);
  // A watch of a finished job sends its state and ends.
  WatchJobRequest request;
  request.set_job_id(job_id);
  auto context = Ctx();
  auto reader = jobs_->WatchJob(context.get(), request);
  JobEvent event;
  int count = 0;
  while (reader->Read(&event)) ++count;
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(count, 1);
}

// Viewer tokens hold at most half of the WatchJob streams: a dashboard opening them in a loop
// is refused RESOURCE_EXHAUSTED at 128, and a client's `aviary watch` still gets one.
TEST_F(CoordinatorServiceTest, ViewersCannotTakeEveryWatchStream) {
  Write("viewer.token", "the-viewer-token\n");
  config_.viewer_token_file = root_ + "/viewer.token";
  Start();
  const std::string job_id = Submit();  // stays PENDING: no group
  WatchJobRequest request;
  request.set_job_id(job_id);
  JobEvent event;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<JobEvent>>> streams;
  for (int i = 0; i < 128; ++i) {
    contexts.push_back(Ctx("the-viewer-token"));
    streams.push_back(jobs_->WatchJob(contexts.back().get(), request));
    ASSERT_TRUE(streams.back()->Read(&event)) << "viewer stream " << i;
  }
  auto refused_context = Ctx("the-viewer-token");
  auto refused = jobs_->WatchJob(refused_context.get(), request);
  EXPECT_FALSE(refused->Read(&event));
  const grpc::Status full = refused->Finish();
  EXPECT_EQ(full.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << full.error_message();
  EXPECT_TRUE(absl::StrContains(full.error_message(), "viewer tokens hold 128 streams already"))
      << full.error_message();
  auto client_context = Ctx();
  auto client = jobs_->WatchJob(client_context.get(), request);
  ASSERT_TRUE(client->Read(&event));
  // The job ends: every stream sends the cancel and ends OK.
  CancelJobRequest cancel;
  cancel.set_job_id(job_id);
  CancelJobResponse cancelled_job;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled_job).ok());
  streams.push_back(std::move(client));
  for (auto& stream : streams) {
    while (stream->Read(&event)) {
    }
    EXPECT_TRUE(stream->Finish().ok());
  }
}

TEST_F(CoordinatorServiceTest, AReloadThatRevokesATokenEndsItsOpenWatch) {
  Write("viewer.token", "the-viewer-token\n");
  config_.viewer_token_file = root_ + "/viewer.token";
  Start();
  const std::string job_id = Submit();  // stays PENDING: no group
  WatchJobRequest request;
  request.set_job_id(job_id);
  auto viewer_context = Ctx("the-viewer-token");
  auto viewer = jobs_->WatchJob(viewer_context.get(), request);
  auto client_context = Ctx();
  auto client = jobs_->WatchJob(client_context.get(), request);
  JobEvent event;
  ASSERT_TRUE(viewer->Read(&event));
  ASSERT_TRUE(client->Read(&event));
  // SIGHUP's reload with another viewer token: the open stream of the old one ends.
  Write("viewer.token", "another-viewer-token\n");
  ASSERT_TRUE(coordinator_->ReloadTokens().ok());
  while (viewer->Read(&event)) {
  }
  // Ended by the reload (the call's 30 s deadline would end it DEADLINE_EXCEEDED).
  const grpc::Status ended = viewer->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAUTHENTICATED) << ended.error_message();
  EXPECT_TRUE(absl::StrContains(ended.error_message(), "after a token reload")) << ended.error_message();
  // The client's token stays: its stream goes on and sees the cancel.
  CancelJobRequest cancel;
  cancel.set_job_id(job_id);
  CancelJobResponse cancelled_job;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled_job).ok());
  bool cancelled = false;
  while (client->Read(&event)) cancelled = cancelled || event.job().state() == JOB_STATE_CANCELLED;
  EXPECT_TRUE(client->Finish().ok());
  EXPECT_TRUE(cancelled);
}

// `aviary watch` and `aviary logs --follow` reading their token from a file ride through a
// rotation: the reload that removes the old token refuses their next call (a watch's open stream
// ends UNAUTHENTICATED, above), they read the file again and go on with the new token to the
// job's end (they ended with the error before).
TEST_F(CoordinatorServiceTest, WatchAndLogsFollowRideThroughATokenRotationThroughTheirTokenFile) {
  Start();
  Write("client.token", "the-token\n");
  // Runs `subcommand JOB`, rotates the client token from `old_token` to `new_token` while it runs,
  // then cancels the job; returns what it printed and checks its exit code.
  auto ride = [&](const std::string& subcommand, const std::string& old_token, const std::string& new_token,
                  int want_exit) {
    SubmitJobRequest submit;
    submit.set_pipeline_yaml(kPipeline);
    submit.set_source_path("pipe.yaml");
    submit.set_working_dir(root_);
    SubmitJobResponse submitted;
    EXPECT_TRUE(jobs_->SubmitJob(Ctx(old_token).get(), submit, &submitted).ok());
    const std::string job_id = submitted.job_id();
    // A line in its log, so that both commands print something at their first answer.
    const std::string group = Register();
    ShipLogsRequest ship;
    ship.set_group_id(group);
    ship.set_task_id(Lease(group).task().task_id());
    LogLine* shipped = ship.add_lines();
    shipped->set_text("a line before the rotation");
    shipped->set_level("info");
    ShipLogsResponse ship_response;
    EXPECT_TRUE(workers_->ShipLogs(WorkerCtx().get(), ship, &ship_response).ok());
    const std::string command = absl::StrCat(
        "timeout 120 env -u AVIARY_TOKEN -u AVIARY_TLS_CA AVIARY_TOKEN_FILE='", root_, "/client.token' '" AVIARY_CLIENT_BINARY
        "' --coordinator 127.0.0.1:", coordinator_->grpc_port(), " ", subcommand, " ", job_id, " 2>&1");
    FILE* pipe = ::popen(command.c_str(), "r");
    if (pipe == nullptr) return std::string("popen failed");
    std::string out;
    char line[4096];
    if (std::fgets(line, sizeof(line), pipe) != nullptr) out += line;  // it has had its first answer
    // The rotation: both tokens, the holder moved, the old one removed.
    Write("token", absl::StrCat(old_token, "\n", new_token, "\n"));
    EXPECT_TRUE(coordinator_->ReloadTokens().ok());
    Write("client.token", new_token + "\n");
    Write("token", new_token + "\n");
    EXPECT_TRUE(coordinator_->ReloadTokens().ok());
    // The job is cancelled once the command says it goes on with the new token (or after 60 s,
    // so that one that does not ends too): a cancel it saw before would test nothing.
    std::atomic<bool> going_on{false};
    std::thread canceller([&] {
      for (int i = 0; i < 600 && !going_on; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      CancelJobRequest cancel;
      cancel.set_job_id(job_id);
      CancelJobResponse cancelled;
      EXPECT_TRUE(jobs_->CancelJob(Ctx(new_token).get(), cancel, &cancelled).ok());
    });
    while (std::fgets(line, sizeof(line), pipe) != nullptr) {
      out += line;
      if (absl::StrContains(line, "going on with the one now in")) going_on = true;
    }
    going_on = true;
    canceller.join();
    const int status = ::pclose(pipe);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == want_exit) << subcommand << ": " << status << "\n" << out;
    EXPECT_TRUE(absl::StrContains(out, "going on with the one now in " + root_ + "/client.token")) << out;
    EXPECT_TRUE(absl::StrContains(out, "job " + job_id + " CANCELLED")) << out;
    return out;
  };
  ride("watch", "the-token", "the-second-token", 1);  // 1: the job was cancelled
  ride("logs --follow", "the-second-token", "the-third-token", 0);
}

TEST_F(CoordinatorServiceTest, CallsWithoutTheTokenAreUnauthenticated) {
  Start();
  for (const std::string& token : {std::string(), std::string("wrong-token"), std::string("the-toke")}) {
    ListJobsRequest list_request;
    ListJobsResponse list;
    EXPECT_EQ(jobs_->ListJobs(Ctx(token).get(), list_request, &list).error_code(),
              grpc::StatusCode::UNAUTHENTICATED)
        << token;
    RegisterGroupRequest register_request;
    register_request.set_world_size(1);
    RegisterGroupResponse register_response;
    EXPECT_EQ(workers_->RegisterGroup(Ctx(token).get(), register_request, &register_response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED)
        << token;
    HeartbeatRequest heartbeat;
    heartbeat.set_group_id("g000000000000");
    HeartbeatResponse heartbeat_response;
    EXPECT_EQ(workers_->Heartbeat(Ctx(token).get(), heartbeat, &heartbeat_response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  ListJobsRequest list_request;
  ListJobsResponse list;
  EXPECT_TRUE(jobs_->ListJobs(Ctx().get(), list_request, &list).ok());
  // The scheme in any case (RFC 7235): "bearer <token>" was taken for no token at all.
  for (const char* scheme : {"bearer ", "BEARER "}) {
    grpc::ClientContext context;
    context.AddMetadata("authorization", absl::StrCat(scheme, "the-token"));
    const grpc::Status status = jobs_->ListJobs(&context, list_request, &list);
    EXPECT_TRUE(status.ok()) << scheme << ": " << status.error_message();
  }
}

// Issue 14: clients and worker groups shared one token, so any client could act as a worker.
// Each role's token now reaches only its RPCs; a known token of the wrong role is
// PERMISSION_DENIED naming the RPC, the token's role and the role needed.
TEST_F(CoordinatorServiceTest, EachRoleReachesOnlyItsRpcs) {
  Write("token", "# clients (two during a rotation)\nthe-token\n\n  second-client  \n");
  Write("viewer.token", "viewer-a\n# comment\nviewer-b\n");
  config_.viewer_token_file = root_ + "/viewer.token";
  Start();
  const std::string job_id = Submit();
  auto denied = [](const grpc::Status& status, const std::string& rpc, const std::string& role,
                   const std::string& needed) {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << rpc << ": " << status.error_message();
    EXPECT_NE(status.error_message().find(rpc), std::string::npos) << status.error_message();
    EXPECT_NE(status.error_message().find("role '" + role + "'"), std::string::npos) << status.error_message();
    EXPECT_NE(status.error_message().find("needs role '" + needed + "'"), std::string::npos)
        << status.error_message();
  };

  // A client token calling WorkerService (the reported bug), with both client tokens.
  for (const std::string token : {"the-token", "second-client"}) {
    RegisterGroupRequest register_request;
    register_request.set_world_size(1);
    RegisterGroupResponse register_response;
    denied(workers_->RegisterGroup(Ctx(token).get(), register_request, &register_response),
           "WorkerService.RegisterGroup", "client", "worker");
    HeartbeatRequest heartbeat;
    heartbeat.set_group_id("g000000000000");
    HeartbeatResponse heartbeat_response;
    denied(workers_->Heartbeat(Ctx(token).get(), heartbeat, &heartbeat_response), "WorkerService.Heartbeat",
           "client", "worker");
    LeaseTaskRequest lease;
    lease.set_group_id("g000000000000");
    LeaseTaskResponse lease_response;
    denied(workers_->LeaseTask(Ctx(token).get(), lease, &lease_response), "WorkerService.LeaseTask", "client",
           "worker");
    ReportProgressRequest progress;
    ReportProgressResponse progress_response;
    denied(workers_->ReportProgress(Ctx(token).get(), progress, &progress_response),
           "WorkerService.ReportProgress", "client", "worker");
    ReportCheckpointRequest checkpoint;
    ReportCheckpointResponse checkpoint_response;
    denied(workers_->ReportCheckpoint(Ctx(token).get(), checkpoint, &checkpoint_response),
           "WorkerService.ReportCheckpoint", "client", "worker");
    CompleteTaskRequest complete;
    CompleteTaskResponse complete_response;
    denied(workers_->CompleteTask(Ctx(token).get(), complete, &complete_response), "WorkerService.CompleteTask",
           "client", "worker");
    FailTaskRequest fail;
    FailTaskResponse fail_response;
    denied(workers_->FailTask(Ctx(token).get(), fail, &fail_response), "WorkerService.FailTask", "client",
           "worker");
  }

  // Viewers read, and only read.
  for (const std::string token : {"viewer-a", "viewer-b"}) {
    GetJobRequest get;
    get.set_job_id(job_id);
    JobInfo job;
    grpc::Status status = jobs_->GetJob(Ctx(token).get(), get, &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(job.job_id(), job_id);
    ListJobsRequest list;
    ListJobsResponse jobs;
    status = jobs_->ListJobs(Ctx(token).get(), list, &jobs);
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(jobs.jobs_size(), 1);
    GetHistoryRequest history;
    history.set_job_id(job_id);
    GetHistoryResponse history_response;
    status = jobs_->GetHistory(Ctx(token).get(), history, &history_response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    SubmitJobRequest submit;
    submit.set_pipeline_yaml(kPipeline);
    submit.set_working_dir(root_);
    SubmitJobResponse submitted;
    denied(jobs_->SubmitJob(Ctx(token).get(), submit, &submitted), "JobService.SubmitJob", "viewer", "client");
    CancelJobRequest cancel;
    cancel.set_job_id(job_id);
    CancelJobResponse cancelled;
    denied(jobs_->CancelJob(Ctx(token).get(), cancel, &cancelled), "JobService.CancelJob", "viewer", "client");
    // Issue 16: groups and logs are the viewer's; retry and delete are not.
    ListGroupsRequest groups;
    ListGroupsResponse groups_response;
    status = jobs_->ListGroups(Ctx(token).get(), groups, &groups_response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    GetLogsRequest logs;
    logs.set_job_id(job_id);
    GetLogsResponse logs_response;
    status = jobs_->GetLogs(Ctx(token).get(), logs, &logs_response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    RetryJobRequest retry;
    retry.set_job_id(job_id);
    JobInfo retried;
    denied(jobs_->RetryJob(Ctx(token).get(), retry, &retried), "JobService.RetryJob", "viewer", "client");
    DeleteJobRequest remove;
    remove.set_job_id(job_id);
    DeleteJobResponse removed;
    denied(jobs_->DeleteJob(Ctx(token).get(), remove, &removed), "JobService.DeleteJob", "viewer", "client");
    RegisterGroupRequest register_request;
    register_request.set_world_size(1);
    RegisterGroupResponse register_response;
    denied(workers_->RegisterGroup(Ctx(token).get(), register_request, &register_response),
           "WorkerService.RegisterGroup", "viewer", "worker");
  }
  {
    WatchJobRequest watch;
    watch.set_job_id(job_id);
    auto context = Ctx("viewer-a");
    auto reader = jobs_->WatchJob(context.get(), watch);
    JobEvent event;
    EXPECT_TRUE(reader->Read(&event));  // the job as it is now
    context->TryCancel();
    while (reader->Read(&event)) {
    }
    (void)reader->Finish();
  }

  // A worker token calls neither half of JobService.
  SubmitJobRequest submit;
  submit.set_pipeline_yaml(kPipeline);
  submit.set_working_dir(root_);
  SubmitJobResponse submitted;
  denied(jobs_->SubmitJob(WorkerCtx().get(), submit, &submitted), "JobService.SubmitJob", "worker", "client");
  GetJobRequest get;
  get.set_job_id(job_id);
  JobInfo job;
  denied(jobs_->GetJob(WorkerCtx().get(), get, &job), "JobService.GetJob", "worker", "client or viewer");
  ListJobsRequest list;
  ListJobsResponse jobs;
  denied(jobs_->ListJobs(WorkerCtx().get(), list, &jobs), "JobService.ListJobs", "worker", "client or viewer");

  // The second client token submits and cancels; the worker token registers.
  SubmitJobRequest second;
  second.set_pipeline_yaml(kPipeline);
  second.set_source_path("pipe.yaml");
  second.set_working_dir(root_);
  grpc::Status status = jobs_->SubmitJob(Ctx("second-client").get(), second, &submitted);
  EXPECT_TRUE(status.ok()) << status.error_message();
  CancelJobRequest cancel;
  cancel.set_job_id(submitted.job_id());
  CancelJobResponse cancelled;
  status = jobs_->CancelJob(Ctx("second-client").get(), cancel, &cancelled);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_FALSE(Register(1).empty());
}

// One token in two roles' files would make the role ambiguous: refused at start, naming both.
// The client and worker token files are required unless allow_no_auth.
TEST_F(CoordinatorServiceTest, AWorkDirThatIsNotUtf8IsRefusedAtStart) {
  // Its run folders would go into every task row and lease as proto strings, which protobuf
  // then refuses to read back: the database would not load again.
  config_.work_dir = root_ + "/runs_\xe9";
  auto secrets = LoadCoordinatorSecrets(config_);
  ASSERT_TRUE(secrets.ok()) << secrets.status();
  auto coordinator = Coordinator::Start(config_, *secrets);
  ASSERT_FALSE(coordinator.ok());
  EXPECT_EQ(coordinator.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(coordinator.status().message(), "key 'work_dir'")) << coordinator.status();
  EXPECT_TRUE(absl::StrContains(coordinator.status().message(), "0xe9")) << coordinator.status();
  EXPECT_EQ(common::FirstInvalidUtf8(coordinator.status().message()), std::string::npos);
}

// gRPC sets SO_REUSEPORT on Linux unless told not to: a second coordinator (another database)
// would then share the first one's port, and the kernel would split the clients and groups
// between them. It is refused, naming the address.
TEST_F(CoordinatorServiceTest, ASecondCoordinatorOnAPortInUseIsRefused) {
  Start();
  CoordinatorConfig second = config_;
  second.listen = absl::StrCat("127.0.0.1:", coordinator_->grpc_port());
  second.database = root_ + "/second.db";
  second.work_dir = root_ + "/second_runs";
  auto secrets = LoadCoordinatorSecrets(second);
  ASSERT_TRUE(secrets.ok()) << secrets.status();
  auto coordinator = Coordinator::Start(second, *secrets);
  ASSERT_FALSE(coordinator.ok()) << "a second coordinator serves port " << coordinator_->grpc_port();
  EXPECT_EQ(coordinator.status().code(), absl::StatusCode::kUnavailable) << coordinator.status();
  EXPECT_TRUE(absl::StrContains(coordinator.status().message(), second.listen)) << coordinator.status();
  EXPECT_TRUE(absl::StrContains(coordinator.status().message(), "address in use")) << coordinator.status();
}

// The port files are written once every listener is up, all or none: a start that fails
// leaves none naming a port nobody serves.
TEST_F(CoordinatorServiceTest, AFailedStartOrACleanStopLeavesNoPortFile) {
  config_.port_file = root_ + "/grpc.port";
  // A folder that is not there: the user's to fix (FAILED_PRECONDITION: exit 2), before anything
  // starts.
  config_.metrics_port_file = root_ + "/missing_folder/metrics.port";
  auto secrets = LoadCoordinatorSecrets(config_);
  ASSERT_TRUE(secrets.ok()) << secrets.status();
  auto coordinator = Coordinator::Start(config_, *secrets);
  ASSERT_FALSE(coordinator.ok());
  EXPECT_EQ(coordinator.status().code(), absl::StatusCode::kFailedPrecondition) << coordinator.status();
  EXPECT_TRUE(absl::StrContains(coordinator.status().message(), "key 'metrics_port_file'")) << coordinator.status();
  EXPECT_FALSE(fs::exists(config_.port_file)) << "a failed start left " << config_.port_file;
  // A write that fails once the listeners are up (here: a folder where the file goes): the port
  // file written before it is removed.
  config_.metrics_port_file = root_ + "/a_folder";
  fs::create_directories(config_.metrics_port_file);
  coordinator = Coordinator::Start(config_, *secrets);
  ASSERT_FALSE(coordinator.ok());
  EXPECT_TRUE(absl::StrContains(coordinator.status().message(), "key 'metrics_port_file'")) << coordinator.status();
  EXPECT_FALSE(fs::exists(config_.port_file)) << "a failed start left " << config_.port_file;
  config_.metrics_port_file = root_ + "/metrics.port";
  Start();
  EXPECT_EQ(*common::ReadFileToString(config_.port_file), absl::StrCat(coordinator_->grpc_port(), "\n"));
  EXPECT_EQ(*common::ReadFileToString(config_.metrics_port_file), absl::StrCat(coordinator_->metrics_port(), "\n"));
  // A clean stop removes them (they named ports nobody served, which a supervisor waiting for
  // the next start's file read), but not one that names another port by then.
  ASSERT_TRUE(common::WriteFileAtomically(config_.metrics_port_file, "1\n").ok());
  ASSERT_TRUE(coordinator_->Shutdown().ok());
  EXPECT_FALSE(fs::exists(config_.port_file)) << "a clean stop left " << config_.port_file;
  EXPECT_EQ(*common::ReadFileToString(config_.metrics_port_file), "1\n");
}

TEST_F(CoordinatorServiceTest, TokenFilesAreCheckedAtStart) {
  Write("viewer.token", "viewer-a\nthe-worker-token\n");
  config_.viewer_token_file = root_ + "/viewer.token";
  auto secrets = LoadCoordinatorSecrets(config_);
  ASSERT_FALSE(secrets.ok());
  EXPECT_EQ(secrets.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(secrets.status().message().find(root_ + "/viewer.token"), std::string::npos) << secrets.status();
  EXPECT_NE(secrets.status().message().find(root_ + "/worker.token"), std::string::npos) << secrets.status();

  Write("viewer.token", "# nothing but comments\n\n");
  secrets = LoadCoordinatorSecrets(config_);
  ASSERT_FALSE(secrets.ok());
  EXPECT_NE(secrets.status().message().find("key 'viewer_token_file'"), std::string::npos) << secrets.status();
  EXPECT_NE(secrets.status().message().find("holds no token"), std::string::npos) << secrets.status();

  config_.viewer_token_file.clear();
  config_.worker_token_file.clear();
  secrets = LoadCoordinatorSecrets(config_);
  ASSERT_FALSE(secrets.ok());
  EXPECT_NE(secrets.status().message().find("key 'worker_token_file'"), std::string::npos) << secrets.status();
  EXPECT_NE(secrets.status().message().find("aviary-coordinator init"), std::string::npos) << secrets.status();
  EXPECT_FALSE(ValidateCoordinatorConfig(config_).ok());
}

TEST_F(CoordinatorServiceTest, SecretFilesOthersCanReadAreNamedInTheLog) {
  fs::permissions(root_ + "/token", fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read |
                                        fs::perms::others_read);
  fs::permissions(root_ + "/worker.token", fs::perms::owner_read | fs::perms::owner_write);
  ::testing::internal::CaptureStderr();
  auto secrets = LoadCoordinatorSecrets(config_);
  const std::string log = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(secrets.ok()) << secrets.status();  // a warning, not a refusal
  EXPECT_TRUE(absl::StrContains(log, absl::StrCat("key 'token_file': ", root_, "/token holds secrets but is not "
                                                  "private (mode 0644: its group can read it); chmod 600 it")))
      << log;
  EXPECT_FALSE(absl::StrContains(log, "worker_token_file")) << log;
}

TEST_F(CoordinatorServiceTest, BadRequestsAreInvalidArgumentNamingTheField) {
  Start();
  SubmitJobRequest submit;
  submit.set_pipeline_yaml("seed: 42\ndata:\n  sample_rat: 32000\n");
  submit.set_source_path("pipe.yaml");
  submit.set_working_dir(root_);
  SubmitJobResponse submit_response;
  grpc::Status status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("pipe.yaml:3"), std::string::npos) << status.error_message();
  EXPECT_NE(status.error_message().find("data.sample_rat"), std::string::npos) << status.error_message();

  submit.set_pipeline_yaml(kPipeline);
  submit.add_overrides("train.epochs=zero");
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("train.epochs"), std::string::npos) << status.error_message();

  // Fine-tuning only, with no selected fold: a job of no task stayed PENDING for ever.
  submit.clear_overrides();
  submit.add_overrides("stages.pretrain.enabled=false");
  submit.add_overrides("folds.selected_folds=[]");
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("pipe.yaml: key 'folds.selected_folds': expected at least one fold while "
                                        "stages.finetune.enabled is true"),
            std::string::npos)
      << status.error_message();
  // With pretraining too: the job "succeeded" having pretrained only.
  submit.clear_overrides();
  submit.add_overrides("folds.selected_folds=[]");
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("; set stages.finetune.enabled=false to pretrain only"), std::string::npos)
      << status.error_message();

  // A dataset that cannot be read is refused at submit, naming the path.
  submit.clear_overrides();
  submit.add_overrides("data.target.root=missing");
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.error_message().find(root_ + "/missing"), std::string::npos) << status.error_message();

  // A name is one line of printable text (issue 14, item 5).
  submit.clear_overrides();
  submit.set_name("evil\n\x1b[31mred");
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'name': control character 0x0a at byte 4"), std::string::npos)
      << status.error_message();
  submit.clear_name();

  submit.set_working_dir("relative/dir");
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("working_dir"), std::string::npos) << status.error_message();
  // Paths are one line: a NUL cut the working folder where the path policy read it (the task's
  // config kept the rest), a newline forged a line of the coordinator's log.
  submit.set_working_dir(root_ + std::string("\0junk", 5));
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'working_dir': control character 0x00 at byte " +
                                        std::to_string(root_.size())),
            std::string::npos)
      << status.error_message();
  submit.set_working_dir(root_);
  submit.set_source_path("/srv/x\n[error] forged/p.yaml");
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'source_path': control character 0x0a"), std::string::npos)
      << status.error_message();
  submit.set_source_path("pipe.yaml");
  submit.add_overrides("train.lr=1e-3\n");
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'overrides[0]': control character 0x0a"), std::string::npos)
      << status.error_message();
  submit.clear_overrides();
  submit.add_overrides("name=a\tb");  // a tab is a character of a value, as --set takes it
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_message().find("control character"), std::string::npos) << status.error_message();
  // Every override is applied again for every sweep point: their number is bounded.
  submit.clear_overrides();
  for (int i = 0; i < 1001; ++i) submit.add_overrides("train.lr=1e-3");
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'overrides': 1001 overrides, at most 1000"), std::string::npos)
      << status.error_message();
  submit.clear_overrides();
  // An error quoting a long value reaches the client, cut (its whole text was over gRPC's 8 KiB
  // of metadata: the client saw RESOURCE_EXHAUSTED instead of it).
  submit.add_overrides("data.cache_dir=/" + std::string(2000, 'x') + "\xc3\xa9" + std::string(2000, 'y'));
  status = jobs_->SubmitJob(Ctx().get(), submit, &submit_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_NE(status.error_message().find("data.cache_dir"), std::string::npos) << status.error_message();
  EXPECT_NE(status.error_message().find(" more bytes)"), std::string::npos) << status.error_message();
  EXPECT_LE(status.error_message().size(), 2100u);
  submit.clear_overrides();

  GetJobRequest get;
  get.set_job_id("not-a-job");
  JobInfo job;
  status = jobs_->GetJob(Ctx().get(), get, &job);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("job_id"), std::string::npos) << status.error_message();
  EXPECT_NE(status.error_message().find("not-a-job"), std::string::npos) << status.error_message();
  get.set_job_id("j0123456789ab");
  EXPECT_EQ(jobs_->GetJob(Ctx().get(), get, &job).error_code(), grpc::StatusCode::NOT_FOUND);

  ListJobsRequest list;
  list.set_limit(10001);
  ListJobsResponse list_response;
  status = jobs_->ListJobs(Ctx().get(), list, &list_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("limit"), std::string::npos);

  RegisterGroupRequest register_request;
  register_request.set_world_size(0);
  RegisterGroupResponse register_response;
  status = workers_->RegisterGroup(WorkerCtx().get(), register_request, &register_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("world_size"), std::string::npos);

  const std::string group = Register();
  const std::string job_id = Submit();
  ASSERT_TRUE(Lease(group).available());
  Metrics bad;
  bad.set_epoch(0);
  bad.set_step(-1);
  bool cancel = false;
  status = Report(group, job_id + "/pretrain-f0", {bad}, &cancel);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("points[0].step"), std::string::npos) << status.error_message();
  // Progress stays within the plan and its values within their ranges (issue 14, item 3).
  const std::string task = job_id + "/pretrain-f0";
  auto refused = [&](const Metrics& point, const std::string& want) {
    bool cancelled = false;
    grpc::Status s = Report(group, task, {point}, &cancelled);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << want;
    EXPECT_NE(s.error_message().find(want), std::string::npos) << s.error_message();
  };
  Metrics point = EpochEnd(0, 0.5);
  point.set_epoch(2147483647);
  refused(point, "field 'points[0].epoch': 2147483647 is outside the task's plan of");
  point = EpochEnd(0, 0.5);
  point.set_step((int64_t{1} << 62) + 1);
  refused(point, "field 'points[0].step': 4611686018427387905 is more than 2^53");  // the integer sent
  point = EpochEnd(0, std::numeric_limits<double>::infinity());
  refused(point, "field 'points[0].val_auc': inf must be in [0, 1], or NaN");
  point = EpochEnd(0, 1.5);
  refused(point, "field 'points[0].val_auc'");
  point = EpochEnd(0, 0.5);
  point.set_lr(std::nan(""));
  refused(point, "field 'points[0].lr'");
  point = EpochEnd(0, 0.5);
  point.set_samples_per_s(-1);
  refused(point, "field 'points[0].samples_per_s'");
  // Undefined metrics (NaN) and a diverged loss (NaN, inf) are reported as they are.
  point = EpochEnd(0, std::nan(""));
  point.set_train_loss(std::nan(""));
  point.set_val_loss(std::numeric_limits<double>::infinity());
  point.set_samples_per_s(std::nan(""));
  EXPECT_TRUE(Report(group, task, {point}, &cancel).ok());

  status = Report(group, "j0123/oops", {}, &cancel);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("task_id"), std::string::npos);
  // An unknown task (deleted, say) is not the group's: told to stop, not NOT_FOUND (which says
  // the group is not registered).
  status = Report(group, "j0123456789ab/pretrain-f0", {}, &cancel);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(cancel);
  ReportCheckpointRequest checkpoint;
  checkpoint.set_group_id(group);
  checkpoint.set_task_id(job_id + "/pretrain-f0");
  ReportCheckpointResponse checkpoint_response;
  status = workers_->ReportCheckpoint(WorkerCtx().get(), checkpoint, &checkpoint_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("path"), std::string::npos);
  EXPECT_EQ(Complete(group, job_id + "/pretrain-f0", "").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // CompleteTask's `best` is named as such, not as a progress point.
  CompleteTaskRequest complete;
  complete.set_group_id(group);
  complete.set_task_id(task);
  complete.set_best_checkpoint(Checkpoint(task, "best.pt"));
  *complete.mutable_best() = EpochEnd(0, 0.8);
  complete.mutable_best()->set_epoch(-1);
  CompleteTaskResponse complete_response;
  status = workers_->CompleteTask(WorkerCtx().get(), complete, &complete_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'best.epoch': -1"), std::string::npos) << status.error_message();
  complete.mutable_best()->set_epoch(0);
  complete.mutable_best()->set_val_auc(7);
  status = workers_->CompleteTask(WorkerCtx().get(), complete, &complete_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'best.val_auc': 7"), std::string::npos) << status.error_message();
  EXPECT_EQ(Heartbeat("gnot-a-group", "", &cancel).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Heartbeat("g000000000000", "", &cancel).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(CoordinatorServiceTest, ServesTlsWithASelfSignedCertificate) {
  const std::string cert = root_ + "/cert.pem";
  const std::string key = root_ + "/key.pem";
  const std::string command = absl::StrCat(
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
      "-addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout ", key, " -out ", cert,
      " >/dev/null 2>&1");
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  config_.tls_cert_file = cert;
  config_.tls_key_file = key;
  Start();
  // A plaintext client cannot talk to a TLS-only server.
  ListJobsRequest request;
  ListJobsResponse response;
  auto plain = Ctx();
  plain->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  EXPECT_FALSE(jobs_->ListJobs(plain.get(), request, &response).ok());

  auto pem = common::ReadFileToString(cert);
  ASSERT_TRUE(pem.ok());
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = *pem;
  Connect(grpc::SslCredentials(options), "localhost");
  grpc::Status status = jobs_->ListJobs(Ctx().get(), request, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(jobs_->ListJobs(Ctx("nope").get(), request, &response).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  const std::string job_id = Submit();
  EXPECT_EQ(GetJob(job_id).job_id(), job_id);
}

// Mutual TLS for groups (tls_client_ca_file): WorkerService needs a client certificate the CA
// signed, on top of the worker token; clients stay token-only.
TEST_F(CoordinatorServiceTest, WorkerCallsNeedAClientCertificateWithTlsClientCa) {
  auto run = [](const std::string& command) {
    const std::string quiet = command + " >/dev/null 2>&1";
    EXPECT_EQ(std::system(quiet.c_str()), 0) << command;
  };
  const std::string d = root_ + "/pki";
  fs::create_directories(d);
  // The server's own self-signed certificate; a CA for the groups; a group certificate it signed;
  // and a certificate the CA did not sign.
  run(absl::StrCat("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
                   "-addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout ", d, "/server.key -out ", d,
                   "/server.pem"));
  run(absl::StrCat("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=aviary-groups-ca -keyout ", d,
                   "/ca.key -out ", d, "/ca.pem"));
  run(absl::StrCat("openssl req -newkey rsa:2048 -nodes -subj /CN=group1 -keyout ", d, "/group.key -out ", d,
                   "/group.csr"));
  run(absl::StrCat("openssl x509 -req -days 1 -in ", d, "/group.csr -CA ", d, "/ca.pem -CAkey ", d,
                   "/ca.key -CAcreateserial -out ", d, "/group.pem"));
  run(absl::StrCat("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=rogue -keyout ", d,
                   "/rogue.key -out ", d, "/rogue.pem"));
  config_.tls_cert_file = d + "/server.pem";
  config_.tls_key_file = d + "/server.key";
  config_.tls_client_ca_file = d + "/ca.pem";
  Start();
  auto read = [](const std::string& path) {
    auto text = common::ReadFileToString(path);
    EXPECT_TRUE(text.ok()) << text.status();
    return text.ok() ? *text : std::string();
  };
  auto connect = [&](const std::string& cert, const std::string& key) {
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = read(d + "/server.pem");
    if (!cert.empty()) {
      options.pem_cert_chain = read(cert);
      options.pem_private_key = read(key);
    }
    Connect(grpc::SslCredentials(options), "localhost");
  };
  auto register_group = [&]() {
    RegisterGroupRequest request;
    request.set_world_size(1);
    RegisterGroupResponse response;
    auto context = WorkerCtx();
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return workers_->RegisterGroup(context.get(), request, &response);
  };

  // No client certificate: a client works, a group with the right token does not.
  connect("", "");
  const std::string job_id = Submit();
  EXPECT_EQ(GetJob(job_id).job_id(), job_id);
  grpc::Status status = register_group();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  EXPECT_NE(status.error_message().find("WorkerService.RegisterGroup"), std::string::npos) << status.error_message();
  EXPECT_NE(status.error_message().find("tls_client_ca_file"), std::string::npos) << status.error_message();

  // A certificate the CA did not sign fails the handshake.
  connect(d + "/rogue.pem", d + "/rogue.key");
  EXPECT_FALSE(register_group().ok());

  // The CA's certificate: the group registers; the certificate does not stand in for the token.
  connect(d + "/group.pem", d + "/group.key");
  status = register_group();
  EXPECT_TRUE(status.ok()) << status.error_message();
  RegisterGroupRequest request;
  request.set_world_size(1);
  RegisterGroupResponse response;
  EXPECT_EQ(workers_->RegisterGroup(Ctx().get(), request, &response).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(workers_->RegisterGroup(Ctx("").get(), request, &response).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(CoordinatorServiceTest, RestartKeepsJobsLeasesAndHeartbeatingGroups) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_TRUE(Lease(a).available());
  bool cancel = false;
  ASSERT_TRUE(Report(a, pretrain, {EpochEnd(0, 0.42)}, &cancel).ok());
  Restart();

  JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.state(), JOB_STATE_RUNNING);
  ASSERT_EQ(job.tasks_size(), 3);
  EXPECT_EQ(job.tasks(0).state(), TASK_STATE_LEASED);
  EXPECT_EQ(job.tasks(0).group_id(), a);
  EXPECT_EQ(job.tasks(0).attempt(), 1);
  // Every heartbeat clock restarted with the coordinator: nothing is lost right away.
  EXPECT_EQ(coordinator_->scheduler()->ReapLostGroups(), 0);
  ASSERT_TRUE(Heartbeat(a, pretrain, &cancel).ok());
  EXPECT_FALSE(cancel);
  // Gauges come back from the store.
  double value = 0;
  const std::string exposition = HttpGet(coordinator_->metrics_port(), "/metrics");
  ASSERT_TRUE(FindSample(exposition, "aviary_val_auc",
                         {"job_id=\"" + job_id + "\"", "stage=\"pretrain\"", "fold=\"0\""}, &value))
      << exposition;
  EXPECT_DOUBLE_EQ(value, 0.42);
  ASSERT_TRUE(FindSample(exposition, "aviary_task_running",
                         {"job_id=\"" + job_id + "\"", "stage=\"pretrain\""}, &value));
  EXPECT_EQ(value, 1);
  // The group carries on.
  const std::string best = Checkpoint(pretrain, "best.pt");
  ASSERT_TRUE(Complete(a, pretrain, best).ok());
  EXPECT_EQ(GetJob(job_id).tasks(1).state(), TASK_STATE_READY);
  Restart();
  const std::string job2 = Submit();
  EXPECT_NE(job2, job_id);
  ListJobsRequest list_request;
  ListJobsResponse list;
  ASSERT_TRUE(jobs_->ListJobs(Ctx().get(), list_request, &list).ok());
  ASSERT_EQ(list.jobs_size(), 2);
  EXPECT_EQ(list.jobs(0).job_id(), job2);  // newest first
  // The earlier job's ready tasks are still leased first.
  LeaseTaskResponse lease = Lease(a);
  EXPECT_EQ(lease.task().task_id(), job_id + "/finetune-f0");
  EXPECT_EQ(lease.task().init_checkpoint(), best);
}

TEST_F(CoordinatorServiceTest, WatchEndsAfterSuccessAndAtShutdown) {
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string other_id = Submit();
  // Two watchers: one of the job that will succeed, one of a job that never finishes.
  struct Watch {
    std::unique_ptr<grpc::ClientContext> context;
    std::vector<JobEvent> events;
    std::atomic<bool> started{false};
    grpc::Status status;
    std::thread thread;
  };
  Watch done, pending;
  for (auto [watch, id] : {std::make_pair(&done, job_id), std::make_pair(&pending, other_id)}) {
    watch->context = Ctx();
    watch->thread = std::thread([this, watch, id] {
      WatchJobRequest request;
      request.set_job_id(id);
      auto reader = jobs_->WatchJob(watch->context.get(), request);
      JobEvent event;
      while (reader->Read(&event)) {
        watch->events.push_back(event);
        watch->started = true;
      }
      watch->status = reader->Finish();
    });
  }
  ASSERT_TRUE(Eventually([&] { return done.started && pending.started; }));
  const std::string a = Register();
  LeaseTaskResponse lease = Lease(a);
  ASSERT_EQ(lease.task().task_id(), job_id + "/pretrain-f0");
  bool cancel = false;
  ASSERT_TRUE(Report(a, lease.task().task_id(), {EpochEnd(0, 0.9)}, &cancel).ok());
  ASSERT_TRUE(Complete(a, lease.task().task_id(), Checkpoint(lease.task().task_id(), "best.pt")).ok());
  done.thread.join();
  EXPECT_TRUE(done.status.ok()) << done.status.error_message();
  ASSERT_GE(done.events.size(), 4u);  // as it was, leased, the epoch, succeeded
  EXPECT_EQ(done.events.back().job().state(), JOB_STATE_SUCCEEDED);
  // The stream ends with the job's own event, after the task's (both from the last change).
  EXPECT_EQ(done.events.back().message(), "job " + job_id + " SUCCEEDED");
  EXPECT_EQ(done.events[done.events.size() - 2].message(), "task " + job_id + "/pretrain-f0 SUCCEEDED");
  // Once an event shows the job SUCCEEDED, every later one does (nothing after the end).
  bool ended = false;
  for (const JobEvent& event : done.events) {
    if (ended) {
      EXPECT_EQ(event.job().state(), JOB_STATE_SUCCEEDED) << event.message();
    }
    ended = ended || event.job().state() == JOB_STATE_SUCCEEDED;
  }
  // The other job's watcher only heard about its own job, and ends when the coordinator stops.
  for (const JobEvent& event : pending.events) EXPECT_EQ(event.job().job_id(), other_id);
  ASSERT_TRUE(coordinator_->Shutdown().ok());
  pending.thread.join();
  EXPECT_EQ(pending.status.error_code(), grpc::StatusCode::UNAVAILABLE) << pending.status.error_message();
}

// 200 status pollers, 50 heartbeating groups and a few watchers at once: every call succeeds
// (the server's thread quota and pollers are sized for this).
TEST_F(CoordinatorServiceTest, ManyPollersAndGroupsAtOnce) {
  Start();
  const std::string job_id = Submit();
  std::vector<std::string> groups;
  for (int i = 0; i < 50; ++i) groups.push_back(Register(1));
  ASSERT_TRUE(Lease(groups[0]).available());
  std::atomic<int> failures{0};
  std::atomic<int> calls{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 200; ++i) {
    threads.emplace_back([&] {
      for (int k = 0; k < 10; ++k) {
        GetJobRequest request;
        request.set_job_id(job_id);
        JobInfo job;
        if (!jobs_->GetJob(Ctx().get(), request, &job).ok() || job.tasks_size() != 3) ++failures;
        ++calls;
      }
    });
  }
  for (int i = 0; i < 50; ++i) {
    threads.emplace_back([&, i] {
      for (int k = 0; k < 10; ++k) {
        bool cancel = true;
        const std::string task = i == 0 ? job_id + "/pretrain-f0" : "";
        if (!Heartbeat(groups[i], task, &cancel).ok() || cancel) ++failures;
        ++calls;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures, 0);
  EXPECT_EQ(calls, 2500);
  EXPECT_EQ(GetJob(job_id).tasks(0).state(), TASK_STATE_LEASED);
}


// --- Issue 14: the path policy and report validation.

// SubmitJob with `overrides`: the status.
grpc::Status SubmitStatus(JobService::Stub* jobs, const std::string& pipeline,
                          const std::string& working_dir, const std::vector<std::string>& overrides,
                          std::unique_ptr<grpc::ClientContext> context) {
  SubmitJobRequest request;
  request.set_pipeline_yaml(pipeline);
  request.set_source_path("pipe.yaml");
  request.set_working_dir(working_dir);
  for (const std::string& o : overrides) request.add_overrides(o);
  SubmitJobResponse response;
  return jobs->SubmitJob(context.get(), request, &response);
}

TEST_F(CoordinatorServiceTest, SubmitRefusesDataPathsOutsideTheDataRoots) {
  // A folder whose name starts with the root's (/data2 is not inside /data) and a symlink
  // inside the root that points out of it.
  const std::string sibling = root_ + "x";
  fs::create_directories(sibling);
  fs::create_symlink("/etc", root_ + "/etc-link");
  Start();
  const std::string roots = "(" + fs::canonical(root_).string() + ")";
  struct Case {
    std::string override_text;
    std::string key;
    std::string resolved;
  };
  const std::vector<Case> cases{
      {"data.cache_dir=/etc", "data.cache_dir", "/etc"},
      {"data.cache_dir=../../../../root", "data.cache_dir", "/root"},
      {"model.pretrained_weights=/etc/shadow", "model.pretrained_weights", "/etc/shadow"},
      {"data.corrupt_files=/etc/passwd", "data.corrupt_files", "/etc/passwd"},
      {"data.target.root=" + sibling, "data.target.root", fs::canonical(sibling).string()},
      {"data.cache_dir=" + root_ + "/etc-link/new-cache", "data.cache_dir", "/etc/new-cache"},
      {"data.pretrain_sources.0.root=/etc", "data.pretrain_sources.0.root", "/etc"},
  };
  for (const Case& c : cases) {
    const grpc::Status status = SubmitStatus(jobs_.get(), kPipeline, root_, {c.override_text}, Ctx());
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.override_text;
    const std::string& message = status.error_message();
    EXPECT_NE(message.find("key '" + c.key + "'"), std::string::npos) << message;
    EXPECT_NE(message.find("resolves to '" + c.resolved + "'"), std::string::npos) << message;
    EXPECT_NE(message.find(roots), std::string::npos) << message;
  }
  // A source's metadata file linked out of the root is refused as such: it was read, and the
  // missing-column error quoted the first line of /etc/passwd.
  fs::create_directories(root_ + "/linked");
  fs::create_symlink("/etc/passwd", root_ + "/linked/train_metadata.csv");
  {
    const grpc::Status linked = SubmitStatus(jobs_.get(), kPipeline, root_, {"data.target.root=linked"}, Ctx());
    EXPECT_EQ(linked.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(linked.error_message().find("key 'data.target.root (its train_metadata.csv)'"), std::string::npos)
        << linked.error_message();
    EXPECT_NE(linked.error_message().find("resolves to '/etc/passwd'"), std::string::npos) << linked.error_message();
    EXPECT_EQ(linked.error_message().find("root:"), std::string::npos) << linked.error_message();
  }
  // '..' below a part that does not exist yet cannot hide a climb out of the root.
  grpc::Status status = SubmitStatus(jobs_.get(), kPipeline, root_,
                                     {"data.cache_dir=" + root_ + "/new/../../../etc"}, Ctx());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // A weights file the run would not load (model.pretrain none) is refused.
  status = SubmitStatus(jobs_.get(), kPipeline, root_, {"model.pretrained_weights=weights/b0.safetensors"}, Ctx());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("key 'model.pretrained_weights': expected '' while model.pretrain is 'none'"),
            std::string::npos)
      << status.error_message();
  // Numeric keys have upper bounds at submit too.
  status = SubmitStatus(jobs_.get(), kPipeline, root_, {"train.epochs=2147483647"}, Ctx());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("key 'train.epochs': expected an integer in [1, 10000], got '2147483647'"),
            std::string::npos)
      << status.error_message();
  // Inside the root: accepted, also a cache folder that does not exist yet.
  EXPECT_EQ(Submit({"data.cache_dir=" + root_ + "/cache/new"}).size(), 13u);
  EXPECT_EQ(Submit({"data.cache_dir=cache2"}).size(), 13u);
}

TEST_F(CoordinatorServiceTest, NoDataRootsRefusesEveryJobSayingSo) {
  config_.data_roots.clear();
  Start();
  const grpc::Status status = SubmitStatus(jobs_.get(), kPipeline, root_, {}, Ctx());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("set `data_roots` in the coordinator config"), std::string::npos)
      << status.error_message();
}

// An outcome for an earlier attempt (a FailTask whose answer was lost and whose retry was taken,
// its first copy held up in a busy server) arriving while the group trains the task again: taken
// as the duplicate it is. It ended the attempt being trained (restarts counted twice, and the task
// leased to another group beside it).
TEST_F(CoordinatorServiceTest, AnOutcomeForAnEarlierAttemptEndsNothing) {
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string t = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_EQ(Lease(a).task().attempt(), 1);
  ASSERT_TRUE(FailRetryable(a, t, "nccl timeout", 1).ok());
  LeaseTaskResponse again = Lease(a);
  ASSERT_EQ(again.task().task_id(), t);
  ASSERT_EQ(again.task().attempt(), 2);
  EXPECT_TRUE(FailRetryable(a, t, "nccl timeout", 1).ok());  // the late copy
  EXPECT_TRUE(Complete(a, t, Checkpoint(t, "best.pt"), 1).ok());
  TaskInfo task = GetJob(job_id).tasks(0);
  EXPECT_EQ(task.state(), TASK_STATE_LEASED);
  EXPECT_EQ(task.restarts(), 1);
  EXPECT_EQ(task.attempt(), 2);
  // One past the current attempt: a state gone wrong somewhere, refused and said.
  const grpc::Status ahead = FailRetryable(a, t, "nccl timeout", 3);
  EXPECT_EQ(ahead.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << ahead.error_message();
  EXPECT_NE(ahead.error_message().find("field 'attempt': 3 of task " + t + " is past its current attempt 2"),
            std::string::npos)
      << ahead.error_message();
  EXPECT_EQ(GetJob(job_id).tasks(0).state(), TASK_STATE_LEASED);
  const std::string b = Register();
  EXPECT_FALSE(Lease(b).available());
  // The current attempt's outcome is taken.
  ASSERT_TRUE(FailRetryable(a, t, "out of memory", 2).ok());
  task = GetJob(job_id).tasks(0);
  EXPECT_EQ(task.state(), TASK_STATE_READY);
  EXPECT_EQ(task.restarts(), 2);
}

TEST_F(CoordinatorServiceTest, CheckpointsMustBeFilesInTheTasksRunFolder) {
  config_.heartbeat_timeout_s = kReapAfterS;
  config_.max_restarts = 6;  // the reap of group a, then each refused end below
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  LeaseTaskResponse lease = Lease(a);
  ASSERT_EQ(lease.task().task_id(), pretrain);
  const std::string out_dir = lease.task().out_dir();
  const std::string good = Checkpoint(pretrain, "last.pt");
  fs::create_symlink("/etc/passwd", out_dir + "/passwd.pt");
  const std::string other = Checkpoint(job_id + "/finetune-f0", "best.pt");  // another task's
  auto report = [&](const std::string& path) {
    ReportCheckpointRequest request;
    request.set_group_id(a);
    request.set_task_id(pretrain);
    request.set_path(path);
    request.set_epoch(0);
    ReportCheckpointResponse response;
    return workers_->ReportCheckpoint(WorkerCtx().get(), request, &response);
  };
  for (const std::string& bad : {std::string("/etc/passwd"), out_dir + "/missing.pt",
                                 out_dir + "/passwd.pt", other, out_dir,
                                 out_dir + "/../pretrain-fold0/../finetune-fold0/best.pt",
                                 std::string("last.pt")}) {
    const grpc::Status status = report(bad);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_NE(status.error_message().find("field 'path': '" + bad + "'"), std::string::npos)
        << status.error_message();
  }
  // A file of the run folder whose name holds a newline (or a NUL) is no checkpoint path: it
  // forged a line of the coordinator's log and reached the fine-tuning's init_checkpoint.
  const std::string forged = out_dir + "/best.pt\n[scheduler] task done";
  std::ofstream(forged) << "x";
  ASSERT_TRUE(fs::exists(forged));
  {
    const grpc::Status status = report(forged);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(status.error_message().find("field 'path': control character 0x0a at byte"), std::string::npos)
        << status.error_message();
    const grpc::Status nul = report(out_dir + std::string("/last.pt\0x", 10));
    EXPECT_NE(nul.error_message().find("field 'path': control character 0x00 at byte"), std::string::npos)
        << nul.error_message();
  }
  ASSERT_TRUE(report(good).ok());
  // The epoch of a checkpoint is within the task's plan (3 epochs: 0..2).
  {
    ReportCheckpointRequest request;
    request.set_group_id(a);
    request.set_task_id(pretrain);
    request.set_path(good);
    request.set_epoch(3);
    ReportCheckpointResponse response;
    const grpc::Status status = workers_->ReportCheckpoint(WorkerCtx().get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(status.error_message().find("field 'epoch': 3 is outside the task's plan of 3 epochs"),
              std::string::npos)
        << status.error_message();
  }
  // The next lease resumes from the good one, never from a refused path.
  bool cancel = false;
  ASSERT_TRUE(Eventually([&] { return GetJob(job_id).tasks(0).state() == TASK_STATE_READY; }));
  const std::string b = Register();
  lease = Lease(b);
  ASSERT_EQ(lease.task().task_id(), pretrain);
  EXPECT_EQ(lease.task().resume_checkpoint(), good);
  ASSERT_TRUE(Heartbeat(b, pretrain, &cancel).ok());
  // The holder's CompleteTask with a best checkpoint that does not exist or is outside, or a
  // best epoch outside the plan, and its FailTask without a message: each is refused, and the
  // task restarts (counted) rather than staying leased to a group that has stopped it (its
  // agent drops a refused report and leases again: it got the same task back, for ever).
  auto refused_end = [&](const std::function<grpc::Status()>& end, const std::string& want) {
    const int restarts = GetJob(job_id).tasks(0).restarts();
    const grpc::Status status = end();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << want;
    EXPECT_NE(status.error_message().find(want), std::string::npos) << status.error_message();
    EXPECT_NE(status.error_message().find("(task " + pretrain + " is READY now)"), std::string::npos)
        << status.error_message();
    const TaskInfo info = GetJob(job_id).tasks(0);
    EXPECT_EQ(info.state(), TASK_STATE_READY);
    EXPECT_EQ(info.restarts(), restarts + 1);
    // The group let go of it: it is leased again, as a new attempt.
    lease = Lease(b);
    EXPECT_EQ(lease.task().task_id(), pretrain);
    EXPECT_EQ(lease.task().attempt(), info.attempt() + 1);
  };
  for (const std::string& bad : {out_dir + "/best.pt", std::string("/etc/passwd")}) {
    refused_end([&] { return Complete(b, pretrain, bad); }, "field 'best_checkpoint': '" + bad + "'");
  }
  refused_end([&] { return Complete(b, pretrain, forged); }, "field 'best_checkpoint': control character 0x0a");
  refused_end(
      [&] {
        CompleteTaskRequest request;
        request.set_group_id(b);
        request.set_task_id(pretrain);
        request.set_best_checkpoint(good);
        *request.mutable_best() = EpochEnd(7, 0.8);
        CompleteTaskResponse response;
        return workers_->CompleteTask(WorkerCtx().get(), request, &response);
      },
      "field 'best.epoch': 7 is outside the task's plan of 3 epochs");
  // A FailTask whose message is refused still ends the task as its flags say (retryable: a
  // restart), with the refusal for its message.
  {
    const int restarts = GetJob(job_id).tasks(0).restarts();
    FailTaskRequest request;
    request.set_group_id(b);
    request.set_task_id(pretrain);
    request.set_retryable(true);
    FailTaskResponse response;
    const grpc::Status status = workers_->FailTask(WorkerCtx().get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(status.error_message().find("field 'error': must not be empty (the failure is taken without it)"),
              std::string::npos)
        << status.error_message();
    const TaskInfo info = GetJob(job_id).tasks(0);
    EXPECT_EQ(info.state(), TASK_STATE_READY);
    EXPECT_EQ(info.restarts(), restarts + 1);
    lease = Lease(b);
    EXPECT_EQ(lease.task().task_id(), pretrain);
  }
  // One that cannot be recorded either (a group the coordinator does not know): its status, not
  // the message's refusal (an agent registers again on NOT_FOUND and drops an INVALID_ARGUMENT).
  {
    FailTaskRequest request;
    request.set_group_id("g0123456789ab");
    request.set_task_id(pretrain);
    request.set_retryable(true);
    FailTaskResponse response;
    const grpc::Status status = workers_->FailTask(WorkerCtx().get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << status.error_message();
    EXPECT_NE(status.error_message().find("(and field 'error' was refused: field 'error': must not be empty)"),
              std::string::npos)
        << status.error_message();
  }
  EXPECT_EQ(GetJob(job_id).tasks(0).state(), TASK_STATE_LEASED);
  ASSERT_TRUE(Complete(b, pretrain, Checkpoint(pretrain, "best.pt")).ok());
  EXPECT_EQ(GetJob(job_id).tasks(0).state(), TASK_STATE_SUCCEEDED);
}

// A step point of `epoch` at `step`, as a group sends it: NaN for the values a step does not
// measure (the validation metrics).
Metrics StepPoint(int epoch, int64_t step) {
  Metrics m;
  m.set_epoch(epoch);
  m.set_step(step);
  m.set_lr(1e-3);
  const double absent = std::numeric_limits<double>::quiet_NaN();
  m.set_val_auc(absent);
  m.set_val_roc_auc(absent);
  m.set_val_cmap(absent);
  m.set_val_acc(absent);
  return m;
}

// `aviary retry` sets a task's restarts (max_restarts' count) back to 0; the counter
// aviary_task_restarts_total must not follow it, neither at once nor when a restart rebuilds it
// from the stored tasks (3 -> 1 is a counter reset to Prometheus, and AviaryTaskRestarted fired).
// Nor is a retry progress: a restart exported the retry's time as the last-progress timestamp of
// the earlier attempt's NaN loss, and AviaryLossNotFinite fired for half an hour.
TEST_F(CoordinatorServiceTest, ARetryNeitherTurnsTheRestartCounterBackNorCountsAsProgress) {
  config_.max_restarts = 5;
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::vector<std::string> labels{"job_id=\"" + job_id + "\"", "stage=\"pretrain\""};
  auto sample = [&](const char* name, double* value) {
    return FindSample(HttpGet(coordinator_->metrics_port(), "/metrics"), name, labels, value);
  };
  const std::string a = Register();
  for (int attempt = 1; attempt <= 2; ++attempt) {
    ASSERT_EQ(Lease(a).task().attempt(), attempt);
    ASSERT_TRUE(FailRetryable(a, pretrain, "lost a rank").ok());
  }
  ASSERT_EQ(Lease(a).task().attempt(), 3);
  Metrics diverged = StepPoint(0, 5);
  diverged.set_train_loss(std::numeric_limits<double>::quiet_NaN());
  const int64_t reported_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                  std::chrono::system_clock::now().time_since_epoch()).count();
  bool cancel = false;
  ASSERT_TRUE(Report(a, pretrain, {diverged}, &cancel).ok());
  FailTaskRequest fail;
  fail.set_group_id(a);
  fail.set_task_id(pretrain);
  fail.set_error("loss is NaN");
  fail.set_retryable(false);
  FailTaskResponse failed;
  ASSERT_TRUE(workers_->FailTask(WorkerCtx().get(), fail, &failed).ok());
  ASSERT_EQ(GetJob(job_id).state(), JOB_STATE_FAILED);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // the retry comes later
  const int64_t retried_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                 std::chrono::system_clock::now().time_since_epoch()).count();
  RetryJobRequest retry;
  retry.set_job_id(job_id);
  JobInfo retried;
  ASSERT_TRUE(jobs_->RetryJob(Ctx().get(), retry, &retried).ok());
  ASSERT_EQ(retried.tasks(0).restarts(), 0);
  EXPECT_EQ(retried.tasks(0).restarts_before_retry(), 2);
  double value = 0;
  ASSERT_TRUE(sample("aviary_task_restarts_total", &value));
  EXPECT_EQ(value, 2);
  Restart();
  ASSERT_TRUE(sample("aviary_task_restarts_total", &value));
  EXPECT_EQ(value, 2);
  ASSERT_TRUE(sample("aviary_task_last_progress_timestamp_seconds", &value));
  EXPECT_GE(value * 1000, reported_ms - 1);
  EXPECT_LT(value * 1000, retried_ms) << "the retry's time, not the report's";
  ASSERT_TRUE(sample("aviary_train_loss", &value));
  EXPECT_TRUE(std::isnan(value)) << value;
  // A restart of the retried task counts on from there, also after a restart of the coordinator.
  ASSERT_EQ(Lease(a).task().attempt(), 4);
  ASSERT_TRUE(FailRetryable(a, pretrain, "lost a rank").ok());
  ASSERT_TRUE(sample("aviary_task_restarts_total", &value));
  EXPECT_EQ(value, 3);
  Restart();
  ASSERT_TRUE(sample("aviary_task_restarts_total", &value));
  EXPECT_EQ(value, 3);
  EXPECT_EQ(GetJob(job_id).tasks(0).restarts(), 1);
}

TEST_F(CoordinatorServiceTest, StepsNeverGoBackWithinAnAttempt) {
  config_.heartbeat_timeout_s = kReapAfterS;
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string task_id = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_EQ(Lease(a).task().attempt(), 1);
  bool cancel = false;
  ASSERT_TRUE(Report(a, task_id, {StepPoint(0, 5), StepPoint(0, 10)}, &cancel).ok());
  // A step below the last accepted one, in a later report or within one.
  grpc::Status status = Report(a, task_id, {StepPoint(0, 9)}, &cancel);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'points[0].step': 9 is less than the step 10"),
            std::string::npos)
      << status.error_message();
  status = Report(a, task_id, {StepPoint(0, 12), StepPoint(1, 20), StepPoint(1, 19)}, &cancel);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'points[2].step': 19 is less than the step 20"),
            std::string::npos)
      << status.error_message();
  // The refused report was refused whole: step 12 is still allowed.
  ASSERT_TRUE(Report(a, task_id, {StepPoint(0, 12), StepPoint(1, 20)}, &cancel).ok());
  status = Report(a, task_id, {StepPoint(0, 30)}, &cancel);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'points[0].epoch': 0 is less than the epoch 1"),
            std::string::npos)
      << status.error_message();
  EXPECT_EQ(GetJob(job_id).tasks(0).latest().step(), 20);
  // After a coordinator restart the last stored point of the attempt still counts.
  Restart();
  status = Report(a, task_id, {StepPoint(1, 15)}, &cancel);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  ASSERT_TRUE(Report(a, task_id, {StepPoint(1, 21)}, &cancel).ok());
  // A new attempt (the group was lost) starts afresh: it resumes from an earlier checkpoint.
  ASSERT_TRUE(Eventually([&] { return GetJob(job_id).tasks(0).state() == TASK_STATE_READY; }));
  const std::string b = Register();
  ASSERT_EQ(Lease(b).task().attempt(), 2);
  ASSERT_TRUE(Report(b, task_id, {StepPoint(1, 10)}, &cancel).ok());
  EXPECT_EQ(Report(b, task_id, {StepPoint(1, 9)}, &cancel).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

// A ReportProgress whose answer was lost (a deadline, a network blip) is sent again by the
// group's sender, often with the points made meanwhile behind it: the points delivered before are
// taken once, the new ones (here an epoch end) are stored, and neither is refused.
TEST_F(CoordinatorServiceTest, AReportSentAgainWithNewPointsBehindItIsTakenOnce) {
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string task_id = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_EQ(Lease(a).task().attempt(), 1);
  bool cancel = false;
  ASSERT_TRUE(Report(a, task_id, {StepPoint(0, 5), StepPoint(0, 8)}, &cancel).ok());
  // The same run again, now with the epoch end behind it.
  Metrics end = EpochEnd(0, 0.625);
  grpc::Status status = Report(a, task_id, {StepPoint(0, 5), StepPoint(0, 8), end}, &cancel);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_FALSE(cancel);
  EXPECT_EQ(GetJob(job_id).tasks(0).latest().step(), 10);
  EXPECT_TRUE(GetJob(job_id).tasks(0).latest().epoch_end());
  // Sent once more, whole (its answer was lost too), also after a coordinator restart.
  status = Report(a, task_id, {StepPoint(0, 5), StepPoint(0, 8), end}, &cancel);
  ASSERT_TRUE(status.ok()) << status.error_message();
  Restart();
  status = Report(a, task_id, {StepPoint(0, 8), end, StepPoint(1, 12)}, &cancel);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(GetJob(job_id).tasks(0).latest().step(), 12);
  GetHistoryRequest history_request;
  history_request.set_job_id(job_id);
  GetHistoryResponse history;
  ASSERT_TRUE(jobs_->GetHistory(Ctx().get(), history_request, &history).ok());
  ASSERT_EQ(history.rows_size(), 1);
  EXPECT_EQ(history.rows(0).metrics().epoch(), 0);
  EXPECT_DOUBLE_EQ(history.rows(0).metrics().val_auc(), 0.625);
  // A point behind the last one that does not repeat a delivered run is still refused.
  status = Report(a, task_id, {StepPoint(1, 11), StepPoint(1, 13)}, &cancel);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_NE(status.error_message().find("field 'points[0].step': 11 is less than the step 12"), std::string::npos)
      << status.error_message();
}

// Retention (issue 15): a job finished longer ago than retention_days loses its step points and
// its tasks' manifests; its state and epoch history stay. Running jobs are left alone, and a job
// is pruned once.
TEST_F(CoordinatorServiceTest, RetentionPrunesOnlyJobsFinishedLongAgo) {
  // Five seconds: the "not yet" prune right after the job finished must come within them on a
  // loaded machine (one second held four fsynced commits before, and could run out).
  constexpr int kRetentionS = 5;
  config_.retention_days = static_cast<double>(kRetentionS) / 86400;
  Start();
  const std::string done = Submit({"stages.finetune.enabled=false"});
  const std::string running = Submit({"stages.finetune.enabled=false"});
  const std::string a = Register();
  LeaseTaskResponse lease = Lease(a);
  const std::string task = lease.task().task_id();
  ASSERT_EQ(task, done + "/pretrain-f0");
  Metrics step = EpochEnd(0, 0.9);
  step.set_epoch_end(false);
  step.set_step(4);
  bool cancel = false;
  ASSERT_TRUE(Report(a, task, {step, EpochEnd(0, 0.9)}, &cancel).ok());
  const std::string b = Register();
  ASSERT_EQ(Lease(b).task().task_id(), running + "/pretrain-f0");
  ASSERT_TRUE(Report(b, running + "/pretrain-f0", {step}, &cancel).ok());
  ASSERT_TRUE(Complete(a, task, Checkpoint(task, "best.pt")).ok());
  const auto finished = std::chrono::steady_clock::now();  // the job's end was stamped before
  // Counts in the database file: step points and non-empty manifests of a job.
  auto count = [&](const std::string& sql, const std::string& job_id) {
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open_v2(config_.database.c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
    sqlite3_bind_text(stmt, 1, job_id.c_str(), -1, SQLITE_TRANSIENT);
    int64_t n = -1;
    if (sqlite3_step(stmt) == SQLITE_ROW) n = sqlite3_column_int64(stmt, 0);
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return n;
  };
  const std::string steps = "SELECT count(*) FROM metric_points WHERE job_id=?1 AND epoch_end=0";
  const std::string manifests = "SELECT count(*) FROM tasks WHERE job_id=?1 AND manifest_hash != ''";
  ASSERT_EQ(count(steps, done), 1);
  ASSERT_EQ(count(manifests, done), 1);
  auto pruned = coordinator_->scheduler()->PruneFinishedJobs();
  ASSERT_TRUE(pruned.ok()) << pruned.status();
  EXPECT_EQ(*pruned, 0);  // finished less than kRetentionS ago
  std::this_thread::sleep_until(finished + std::chrono::milliseconds(kRetentionS * 1000 + 200));
  pruned = coordinator_->scheduler()->PruneFinishedJobs();
  ASSERT_TRUE(pruned.ok()) << pruned.status();
  EXPECT_EQ(*pruned, 1);
  EXPECT_EQ(count(steps, done), 0);
  EXPECT_EQ(count(manifests, done), 0);
  EXPECT_EQ(count(steps, running), 1);
  EXPECT_EQ(count(manifests, running), 1);
  EXPECT_EQ(GetJob(done).state(), JOB_STATE_SUCCEEDED);
  GetHistoryRequest history_request;
  history_request.set_job_id(done);
  GetHistoryResponse history;
  ASSERT_TRUE(jobs_->GetHistory(Ctx().get(), history_request, &history).ok());
  EXPECT_EQ(history.rows_size(), 1);  // the epoch end stays
  pruned = coordinator_->scheduler()->PruneFinishedJobs();
  ASSERT_TRUE(pruned.ok());
  EXPECT_EQ(*pruned, 0);  // once
  // Both jobs ran the same dataset version: one stored manifest, which the running job keeps.
  EXPECT_EQ(CountRows("SELECT count(*) FROM manifests"), 1);
  std::string csv;
  EXPECT_TRUE(FetchManifest(b, Lease(b).task().manifest_hash(), &csv).ok());
}

// Manifests are stored once per content and built once per dataset version: a second submit of
// the same data reuses the first one's manifests (the database gains no manifest), a lease carries
// the hash and the holder alone may fetch the manifest; a recording removed from the data makes
// the next submit build anew, without it.
TEST_F(CoordinatorServiceTest, ManifestsAreSharedPerDatasetVersionAndLeasedByReference) {
  Start();
  const std::string first = Submit();
  const int64_t stored = CountRows("SELECT count(*) FROM manifests");
  EXPECT_EQ(stored, 3);  // pretrain-f0, finetune-f0, finetune-f1
  const std::string second = Submit({"train.epochs=2"});  // training keys do not change manifests
  EXPECT_EQ(CountRows("SELECT count(*) FROM manifests"), stored);
  const std::string by_task = "SELECT manifest_hash FROM tasks WHERE task_id=?1";
  auto hash_of = [&](const std::string& task_id) {
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open_v2(config_.database.c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db, by_task.c_str(), -1, &stmt, nullptr), SQLITE_OK);
    sqlite3_bind_text(stmt, 1, task_id.c_str(), -1, SQLITE_TRANSIENT);
    std::string hash;
    if (sqlite3_step(stmt) == SQLITE_ROW) hash = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return hash;
  };
  for (const char* task : {"/pretrain-f0", "/finetune-f0", "/finetune-f1"}) {
    EXPECT_TRUE(IsSha256Hex(hash_of(first + task))) << task;
    EXPECT_EQ(hash_of(first + task), hash_of(second + task)) << task;
  }
  EXPECT_NE(hash_of(first + "/finetune-f0"), hash_of(first + "/finetune-f1"));

  // Only a group whose leased task refers to the manifest gets it.
  const std::string a = Register();
  const std::string idle = Register();
  LeaseTaskResponse lease = Lease(a);
  ASSERT_EQ(lease.task().task_id(), first + "/pretrain-f0");
  std::string csv;
  ASSERT_TRUE(FetchManifest(a, lease.task().manifest_hash(), &csv).ok());
  EXPECT_EQ(Sha256Hex(csv), lease.task().manifest_hash());
  {  // Fetches at once share one inflated copy on the coordinator; each gets the whole manifest.
    std::vector<std::thread> fetchers;
    std::vector<std::string> got(6);
    std::vector<grpc::Status> statuses(6);
    for (size_t i = 0; i < got.size(); ++i) {
      fetchers.emplace_back([&, i] { statuses[i] = FetchManifest(a, lease.task().manifest_hash(), &got[i]); });
    }
    for (auto& t : fetchers) t.join();
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_TRUE(statuses[i].ok()) << statuses[i].error_message();
      EXPECT_EQ(got[i], csv) << i;
    }
  }
  grpc::Status refused = FetchManifest(idle, lease.task().manifest_hash(), &csv);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(refused.error_message().find("holds no task whose manifest is " + lease.task().manifest_hash()),
            std::string::npos)
      << refused.error_message();
  EXPECT_TRUE(csv.empty());
  refused = FetchManifest(a, "not-a-hash", &csv);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(refused.error_message().find("field 'manifest_hash'"), std::string::npos) << refused.error_message();
  refused = FetchManifest(a, Sha256Hex("another"), &csv);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);

  // A recording of the target removed: the dataset version changed, the fine-tuning manifests
  // are built anew without it; the pretraining pool (which only excludes the target's ids) is too.
  const std::string gone = root_ + "/t24/train_audio/a/XC4.ogg";
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past the file clock's tick
  ASSERT_TRUE(fs::remove(gone));
  const std::string third = Submit();
  EXPECT_NE(hash_of(third + "/finetune-f0"), hash_of(first + "/finetune-f0"));
  EXPECT_EQ(hash_of(third + "/pretrain-f0"), hash_of(first + "/pretrain-f0"));  // its files did not change
  EXPECT_GT(CountRows("SELECT count(*) FROM manifests"), stored);

  // A whole audio tree missing at a submit (an archive not extracted yet): its rows are dropped.
  // Once it is back, the next submit builds the version anew; it reused the one without them,
  // since only the folders of kept rows were stamped.
  fs::rename(root_ + "/xc/N-Z", root_ + "/xc/N-Z.away");
  const std::string without = Submit();
  EXPECT_NE(hash_of(without + "/pretrain-f0"), hash_of(first + "/pretrain-f0"));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past the file clock's tick
  fs::rename(root_ + "/xc/N-Z.away", root_ + "/xc/N-Z");
  const std::string with = Submit();
  EXPECT_EQ(hash_of(with + "/pretrain-f0"), hash_of(first + "/pretrain-f0"));
}

// A dataset changing while a submit reads it (an archive still unpacking): the audio folders are
// stamped after their files were checked, so a file that appeared in between was in the stamp but
// not in the manifests, and every later submit reused them. Such a version is not kept; one whose
// folders are older than a second before the read is.
TEST_F(CoordinatorServiceTest, ADatasetChangingWhileItIsReadIsNotKeptForReuse) {
  Start();
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // SetUp wrote the dataset just now
  fs::last_write_time(root_ + "/t24/train_audio/a", fs::file_time_type::clock::now());
  ASSERT_FALSE(Submit().empty());
  EXPECT_EQ(CountRows("SELECT count(*) FROM dataset_versions"), 1);  // pretraining's (its folders are older)
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  ASSERT_FALSE(Submit().empty());
  EXPECT_EQ(CountRows("SELECT count(*) FROM dataset_versions"), 2);
}

// The versions outlive the coordinator (its database): a release that makes other tables or
// manifests from the same files must not reuse them, and its key says the rules' version.
TEST(FoldCacheTest, TheKeyNamesTheRulesVersion) {
  const common::PipelineConfig config;
  for (const char* stage : {"pretrain", "finetune"}) {
    EXPECT_TRUE(absl::StartsWith(FoldCache::Key(config, stage), absl::StrCat("rules=", kFoldRulesVersion, "\nstage=")))
        << FoldCache::Key(config, stage);
  }
}

// The fold cache drops a version whose files changed (content, size or a rewrite in place) and
// keeps at most its bound of versions.
// Single flight: a build of a version another build holds waits for its release (then looks the
// version up again); claims of other versions do not wait; all of a claim's keys are taken at
// once, so two builds that need two versions each cannot wait for each other.
TEST(FoldCacheTest, ASecondBuildOfTheSameVersionWaitsForTheFirst) {
  FoldCache cache(2);
  bool waited = true;
  FoldCache::BuildClaim first = cache.ClaimForBuild({"pretrain|a", "finetune|a", "pretrain|a"}, &waited);
  EXPECT_FALSE(waited);
  EXPECT_EQ(first.keys(), (std::vector<std::string>{"finetune|a", "pretrain|a"}));
  {
    FoldCache::BuildClaim other = cache.ClaimForBuild({"pretrain|b"}, &waited);
    EXPECT_FALSE(waited);  // another version
  }
  std::atomic<bool> claimed{false};
  bool second_waited = false;
  std::thread second([&] {
    FoldCache::BuildClaim claim = cache.ClaimForBuild({"finetune|a", "pretrain|c"}, &second_waited);
    claimed = true;
  });
  // Wait until the second is seen waiting (no sleep decides it).
  for (int i = 0; i < 3000 && cache.waiting_claims() == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(cache.waiting_claims(), 1);
  EXPECT_FALSE(claimed.load());  // still held by the first build
  FoldCache::BuildClaim moved = std::move(first);  // a move keeps the claim
  EXPECT_TRUE(first.keys().empty());
  EXPECT_EQ(cache.waiting_claims(), 1);
  EXPECT_FALSE(claimed.load());
  moved.Release();
  second.join();
  EXPECT_TRUE(claimed.load());
  EXPECT_TRUE(second_waited);
  // Released again by the second's destructor: free for the next.
  FoldCache::BuildClaim third = cache.ClaimForBuild({"finetune|a", "pretrain|c"}, &waited);
  EXPECT_FALSE(waited);

  // A waiter whose caller went away gives up (about a second after), with an empty claim, and
  // the holder keeps its keys.
  std::atomic<bool> gone{false};
  bool gave_up = false;
  std::thread quitter([&] {
    FoldCache::BuildClaim claim = cache.ClaimForBuild({"pretrain|c"}, &waited, [&] { return gone.load(); }, &gave_up);
    EXPECT_TRUE(claim.keys().empty());
  });
  for (int i = 0; i < 3000 && cache.waiting_claims() == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(cache.waiting_claims(), 1);
  gone = true;
  quitter.join();
  EXPECT_TRUE(gave_up);
  EXPECT_EQ(third.keys(), (std::vector<std::string>{"finetune|a", "pretrain|c"}));
  third.Release();
  FoldCache::BuildClaim fourth = cache.ClaimForBuild({"pretrain|c"}, &waited, [] { return true; }, &gave_up);
  EXPECT_FALSE(waited);  // nothing to wait for: a free key is claimed whatever give_up says
  EXPECT_FALSE(gave_up);
  EXPECT_EQ(fourth.keys(), (std::vector<std::string>{"pretrain|c"}));
}

TEST(FoldCacheTest, ChangedFilesDropTheVersionAndTheCacheIsBounded) {
  std::string tmpl = absl::StrCat("/tmp/aviary_fold_cache_", ::getpid(), "_XXXXXX");
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
  const std::string file = tmpl + "/metadata.csv";
  std::ofstream(file) << "a,b\n";
  FoldCache cache(2);
  ManifestRef ref{Sha256Hex("m"), 1};
  cache.Insert("k", {StampFile(file), StampFile(tmpl + "/absent")}, {{0, ref}});
  auto hit = cache.Lookup("k", {0});
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->at(0).hash, ref.hash);
  EXPECT_FALSE(cache.Lookup("k", {0, 1}).has_value());  // fold 1 was never built
  EXPECT_TRUE(cache.Lookup("k", {0}).has_value());       // ... which does not drop the version
  // File times tick with the kernel's coarse clock (a few ms): changes are made later than that.
  const auto tick = std::chrono::milliseconds(20);
  std::this_thread::sleep_for(tick);
  std::ofstream(file) << "a,c\n";  // same size, rewritten
  EXPECT_FALSE(cache.Lookup("k", {0}).has_value());
  EXPECT_EQ(cache.size(), 0u);
  cache.Insert("k", {StampFile(file)}, {{0, ref}});
  cache.Insert("k2", {StampFile(tmpl + "/other")}, {{0, ref}});
  std::ofstream(tmpl + "/other") << "";  // a file that appears changes its stamp too
  EXPECT_FALSE(cache.Lookup("k2", {0}).has_value());
  cache.Insert("k2", {}, {{0, ref}});
  cache.Insert("k3", {}, {{0, ref}});
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_FALSE(cache.Lookup("k", {0}).has_value());  // least recently used, gone
  EXPECT_TRUE(cache.Lookup("k2", {0}).has_value());
  fs::remove_all(tmpl);
}

// `aviary prune` (JobService.PruneJobs): a dry run counts exactly what a real run then removes
// and removes nothing; the real run drops the jobs' step points and manifest references and the
// Leases that arrive together are decided together and committed in one transaction (group
// commit): 12 groups (one of them asking twice at once) lease 3 READY tasks at the same instant;
// each task goes to exactly one group, each group gets at most one task, the repeated request
// gets the same answer, and the database agrees with the replies.
TEST_F(CoordinatorServiceTest, ConcurrentLeasesEachTaskToOneGroup) {
  Start();
  std::set<std::string> ready;
  for (int i = 0; i < 3; ++i) {
    ready.insert(Submit({"stages.finetune.enabled=false", absl::StrCat("seed=", 40 + i)}) + "/pretrain-f0");
  }
  std::vector<std::string> groups;
  for (int i = 0; i < 12; ++i) groups.push_back(Register());
  groups.push_back(groups.front());  // the first group asks twice
  std::vector<LeaseTaskResponse> replies(groups.size());
  std::atomic<int> arrived{0};
  std::vector<std::thread> threads;
  for (size_t i = 0; i < groups.size(); ++i) {
    threads.emplace_back([&, i] {
      ++arrived;
      while (arrived.load() < static_cast<int>(groups.size())) std::this_thread::yield();
      replies[i] = Lease(groups[i]);
    });
  }
  for (std::thread& t : threads) t.join();
  std::map<std::string, std::string> holder;  // task -> group
  for (size_t i = 0; i + 1 < groups.size(); ++i) {
    if (!replies[i].available()) continue;
    const std::string& task = replies[i].task().task_id();
    EXPECT_TRUE(ready.count(task)) << task;
    EXPECT_EQ(replies[i].task().attempt(), 1) << task;
    EXPECT_TRUE(holder.emplace(task, groups[i]).second) << task << " leased twice";
  }
  EXPECT_EQ(holder.size(), 3u);
  EXPECT_EQ(replies.back().available(), replies.front().available());
  EXPECT_EQ(replies.back().task().task_id(), replies.front().task().task_id());
  for (const auto& [task, group] : holder) {
    EXPECT_EQ(GetJob(task.substr(0, task.find('/'))).tasks(0).group_id(), group) << task;
    EXPECT_EQ(Lease(group).task().task_id(), task);  // a holder gets its task again
  }
  EXPECT_EQ(CountRows(absl::StrCat("SELECT count(*) FROM tasks WHERE state=", aviary::v1::TASK_STATE_LEASED)), 3);
  EXPECT_EQ(CountRows(absl::StrCat("SELECT count(DISTINCT group_id) FROM tasks WHERE state=",
                                   aviary::v1::TASK_STATE_LEASED)),
            3);
  EXPECT_EQ(CountRows("SELECT count(*) FROM groups WHERE task_id != ''"), 3);
  EXPECT_FALSE(Lease(Register()).available());
}

// manifests nobody refers to any more; state and history stay.
TEST_F(CoordinatorServiceTest, PruneJobsOnDemandWithDryRun) {
  config_.retention_days = 0;  // kept for ever unless pruned by hand
  Start();
  const std::string done = Submit({"stages.finetune.enabled=false"});
  const std::string a = Register();
  const std::string task = Lease(a).task().task_id();
  Metrics step = EpochEnd(0, 0.9);
  step.set_epoch_end(false);
  step.set_step(4);
  bool cancel = false;
  Metrics step2 = step;
  step2.set_step(5);
  ASSERT_TRUE(Report(a, task, {step, step2, EpochEnd(0, 0.9)}, &cancel).ok());
  ASSERT_TRUE(Complete(a, task, Checkpoint(task, "best.pt")).ok());
  const std::string other = Submit({"stages.finetune.enabled=false", "sampling.upsample_thr=1"});  // its own manifest
  ASSERT_EQ(CountRows("SELECT count(*) FROM manifests"), 2);
  auto prune = [&](double days, bool dry_run, PruneJobsResponse* response) {
    PruneJobsRequest request;
    request.set_older_than_days(days);
    request.set_dry_run(dry_run);
    return jobs_->PruneJobs(Ctx().get(), request, response);
  };
  PruneJobsResponse response;
  // Without an age the coordinator's retention_days applies; 0 keeps everything for ever, so it is
  // no age to prune at (it pruned every finished job).
  grpc::Status by_default = prune(-1, false, &response);
  EXPECT_EQ(by_default.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(by_default.error_message().find("retention_days is 0"), std::string::npos) << by_default.error_message();
  // Of the step points only the newest of the attempt is stored (step 5).
  EXPECT_EQ(CountRows("SELECT count(*) FROM metric_points WHERE job_id=?1 AND epoch_end=0", done), 1);
  EXPECT_EQ(CountRows("SELECT count(*) FROM metric_points WHERE job_id=?1 AND epoch_end=0 AND step=5", done), 1);
  EXPECT_EQ(CountRows("SELECT count(*) FROM manifests"), 2);
  ASSERT_TRUE(prune(1, false, &response).ok());  // finished less than a day ago
  EXPECT_EQ(response.jobs_size(), 0);
  EXPECT_EQ(response.manifests_deleted(), 0);
  response.Clear();
  ASSERT_TRUE(prune(0, true, &response).ok());
  EXPECT_TRUE(response.dry_run());
  ASSERT_EQ(response.jobs_size(), 1);
  EXPECT_EQ(response.jobs(0).job_id(), done);
  EXPECT_EQ(response.jobs(0).step_points(), 1);
  EXPECT_EQ(response.jobs(0).manifest_refs(), 1);
  EXPECT_EQ(response.manifests_deleted(), 1);
  EXPECT_GT(response.manifest_bytes_deleted(), 0);
  EXPECT_EQ(CountRows("SELECT count(*) FROM manifests"), 2);  // nothing removed
  EXPECT_EQ(CountRows("SELECT count(*) FROM metric_points WHERE job_id=?1 AND epoch_end=0", done), 1);
  PruneJobsResponse real;
  ASSERT_TRUE(prune(0, false, &real).ok());
  EXPECT_FALSE(real.dry_run());
  ASSERT_EQ(real.jobs_size(), 1);
  EXPECT_EQ(real.jobs(0).step_points(), 1);
  EXPECT_EQ(real.manifests_deleted(), response.manifests_deleted());
  EXPECT_EQ(real.manifest_bytes_deleted(), response.manifest_bytes_deleted());
  EXPECT_EQ(CountRows("SELECT count(*) FROM manifests"), 1);
  EXPECT_EQ(CountRows("SELECT count(*) FROM metric_points WHERE job_id=?1 AND epoch_end=0", done), 0);
  EXPECT_EQ(CountRows("SELECT count(*) FROM metric_points WHERE job_id=?1 AND epoch_end=1", done), 1);
  EXPECT_EQ(GetJob(done).state(), JOB_STATE_SUCCEEDED);
  EXPECT_EQ(GetJob(other).state(), JOB_STATE_PENDING);
  // A pruned job's series leave /metrics (they grew with every job ever run), after a restart too.
  EXPECT_FALSE(absl::StrContains(HttpGet(coordinator_->metrics_port(), "/metrics"), done));
  Restart();
  EXPECT_FALSE(absl::StrContains(HttpGet(coordinator_->metrics_port(), "/metrics"), done));
  EXPECT_TRUE(absl::StrContains(HttpGet(coordinator_->metrics_port(), "/metrics"), other));
  // The same data submitted again after its manifest was pruned: built and stored anew.
  const std::string again = Submit({"stages.finetune.enabled=false"});
  EXPECT_EQ(CountRows("SELECT count(*) FROM manifests"), 2);
  const std::string b = Register();
  LeaseTaskResponse lease = Lease(b);
  ASSERT_EQ(lease.task().task_id(), other + "/pretrain-f0");
  std::string csv;
  ASSERT_TRUE(FetchManifest(b, lease.task().manifest_hash(), &csv).ok());
  EXPECT_FALSE(csv.empty());
  (void)again;
  // Bad ages, and the client role only.
  PruneJobsRequest bad;
  bad.set_older_than_days(std::numeric_limits<double>::quiet_NaN());
  PruneJobsResponse ignored;
  grpc::Status status = jobs_->PruneJobs(Ctx().get(), bad, &ignored);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("field 'older_than_days'"), std::string::npos) << status.error_message();
  status = jobs_->PruneJobs(WorkerCtx().get(), PruneJobsRequest(), &ignored);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
}

// --- Issue 16: sweeps, tags and notes, retry, delete, logs, groups.

SubmitJobRequest SweepRequest(const std::string& root, const std::vector<std::pair<std::string, std::vector<std::string>>>& axes) {
  SubmitJobRequest request;
  request.set_pipeline_yaml(kPipeline);
  request.set_source_path("pipe.yaml");
  request.set_working_dir(root);
  for (const auto& [key, values] : axes) {
    SweepAxis* axis = request.add_sweep();
    axis->set_key(key);
    for (const std::string& v : values) axis->add_values(v);
  }
  return request;
}

TEST_F(CoordinatorServiceTest, SweepIsTheGridTimesTheFoldsWithOnePretrainingPerPretrainConfig) {
  Start();
  // train.lr_max_per_sample and model.dropout change what pretraining reads: a pretraining task
  // per point.
  SubmitJobRequest request =
      SweepRequest(root_, {{"train.lr_max_per_sample", {"1e-6", "5e-7"}}, {"model.dropout", {"0.2", "0.3"}}});
  request.add_tags("team=birds");
  request.add_tags("lr-search");
  request.set_note("first sweep");
  SubmitJobResponse response;
  ASSERT_TRUE(jobs_->SubmitJob(Ctx().get(), request, &response).ok());
  const std::string job_id = response.job_id();
  JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.tags().at("team"), "birds");
  EXPECT_EQ(job.tags().at("lr-search"), "");
  EXPECT_EQ(job.note(), "first sweep");
  EXPECT_EQ(job.monitor(), "auc");
  // The points are ranked by their final stage's monitor, a stage override included.
  SubmitJobRequest by_loss = SweepRequest(root_, {{"train.lr_max_per_sample", {"1e-6", "5e-7"}}});
  by_loss.add_overrides("stages.finetune.monitor=loss");
  SubmitJobResponse by_loss_response;
  ASSERT_TRUE(jobs_->SubmitJob(Ctx().get(), by_loss, &by_loss_response).ok());
  EXPECT_EQ(GetJob(by_loss_response.job_id()).monitor(), "loss");
  // train.lr is what a constant-rate run reads (scheduler none): a sweep over it is two points;
  // swept with the schedule, it is read at the 'none' points and kept (the 'cos' ones repeat).
  SubmitJobRequest constant = SweepRequest(root_, {{"train.lr", {"1e-3", "5e-4"}}});
  constant.add_overrides("train.scheduler=none");
  SubmitJobResponse constant_response;
  ASSERT_TRUE(jobs_->SubmitJob(Ctx().get(), constant, &constant_response).ok());
  EXPECT_EQ(GetJob(constant_response.job_id()).tasks_size(), 2 + 2 * 2);
  SubmitJobRequest mixed = SweepRequest(root_, {{"train.scheduler", {"cos", "none"}}, {"train.lr", {"1e-3", "5e-4"}}});
  SubmitJobResponse mixed_response;
  const grpc::Status mixed_status = jobs_->SubmitJob(Ctx().get(), mixed, &mixed_response);
  ASSERT_TRUE(mixed_status.ok()) << mixed_status.error_message();
  EXPECT_EQ(GetJob(mixed_response.job_id()).tasks_size(), 4 + 4 * 2);
  ASSERT_EQ(job.sweep_size(), 2);
  ASSERT_EQ(job.tasks_size(), 4 + 4 * 2);  // 4 pretraining tasks, 4 points x 2 folds
  std::map<std::string, const TaskInfo*> by_id;
  for (const TaskInfo& t : job.tasks()) by_id[t.task_id()] = &t;
  for (int p = 0; p < 4; ++p) {
    const TaskInfo* pre = by_id[absl::StrCat(job_id, "/pretrain-f0-p", p)];
    ASSERT_NE(pre, nullptr) << p;
    EXPECT_EQ(pre->sweep_point(), p);
    EXPECT_EQ(pre->state(), TASK_STATE_READY);
    EXPECT_EQ(pre->out_dir(), absl::StrCat(root_, "/runs/", job_id, "/pretrain-fold0-p", p));
    for (int f = 0; f < 2; ++f) {
      const TaskInfo* ft = by_id[absl::StrCat(job_id, "/finetune-f", f, "-p", p)];
      ASSERT_NE(ft, nullptr) << p << " " << f;
      EXPECT_EQ(ft->state(), TASK_STATE_BLOCKED);
      ASSERT_EQ(ft->sweep_overrides_size(), 2);
    }
  }
  EXPECT_EQ(by_id[job_id + "/finetune-f1-p3"]->sweep_overrides(0), "train.lr_max_per_sample=5e-7");
  EXPECT_EQ(by_id[job_id + "/finetune-f1-p3"]->sweep_overrides(1), "model.dropout=0.3");
  EXPECT_FALSE(job.has_sweep_best());

  // Each lease carries its point's config; a point's fine-tuning waits for its own pretraining.
  const std::string group = Register();
  std::map<int, double> dropout_of_point;
  for (int i = 0; i < 4; ++i) {
    LeaseTaskResponse lease = Lease(group);
    ASSERT_TRUE(lease.available());
    auto config = common::ParsePipelineConfig(lease.task().pipeline_yaml(), "lease");
    ASSERT_TRUE(config.ok()) << config.status();
    const int point = i;
    EXPECT_EQ(lease.task().task_id(), absl::StrCat(job_id, "/pretrain-f0-p", point));
    EXPECT_DOUBLE_EQ(config->stages.at("pretrain").train.lr_max_per_sample, point < 2 ? 1e-6 : 5e-7);
    EXPECT_DOUBLE_EQ(config->model.dropout, point % 2 == 0 ? 0.2 : 0.3);
    ASSERT_TRUE(Complete(group, lease.task().task_id(), Checkpoint(lease.task().task_id(), "best.pt")).ok());
  }
  // Fine-tuning: point 2 (lr_max_per_sample 5e-7, dropout 0.2) has the best mean val_auc.
  const std::map<int, double> auc{{0, 0.5}, {1, 0.55}, {2, 0.7}, {3, 0.6}};
  for (int i = 0; i < 8; ++i) {
    LeaseTaskResponse lease = Lease(group);
    ASSERT_TRUE(lease.available());
    const std::string id = lease.task().task_id();
    const int point = id.back() - '0';
    EXPECT_EQ(lease.task().init_checkpoint(), Checkpoint(absl::StrCat(job_id, "/pretrain-f0-p", point), "best.pt"));
    CompleteTaskRequest complete;
    complete.set_group_id(group);
    complete.set_task_id(id);
    complete.set_best_checkpoint(Checkpoint(id, "best.pt"));
    *complete.mutable_best() = EpochEnd(1, auc.at(point) + (id.find("-f1-") != std::string::npos ? 0.01 : 0));
    CompleteTaskResponse done;
    ASSERT_TRUE(workers_->CompleteTask(WorkerCtx().get(), complete, &done).ok());
  }
  job = GetJob(job_id);
  EXPECT_EQ(job.state(), JOB_STATE_SUCCEEDED);
  ASSERT_TRUE(job.has_sweep_best());
  EXPECT_EQ(job.sweep_best().point(), 2);
  EXPECT_EQ(job.sweep_best().metric(), "val_auc");
  EXPECT_NEAR(job.sweep_best().value(), 0.705, 1e-9);
  EXPECT_EQ(job.sweep_best().tasks(), 2);
  EXPECT_EQ(job.sweep_best().tasks_total(), 2);
  ASSERT_EQ(job.sweep_best().overrides_size(), 2);
  EXPECT_EQ(job.sweep_best().overrides(0), "train.lr_max_per_sample=5e-7");
  EXPECT_EQ(job.sweep_best().overrides(1), "model.dropout=0.2");
  // The points' series are apart on /metrics (label `point`).
  const std::string exposition = HttpGet(coordinator_->metrics_port(), "/metrics");
  double value = 0;
  for (int p = 0; p < 4; ++p) {
    EXPECT_TRUE(FindSample(exposition, "aviary_task_running",
                           {absl::StrCat("job_id=\"", job_id, "\""), "stage=\"finetune\"", absl::StrCat("point=\"", p, "\"")},
                           &value))
        << p;
  }
  // Kept across a restart (JobInfo is stored whole).
  Restart();
  job = GetJob(job_id);
  EXPECT_EQ(job.note(), "first sweep");
  EXPECT_EQ(job.sweep_best().point(), 2);
}

// A failed grid point ends only itself: its unfinished tasks are cancelled, the other points
// train on, and the job ends FAILED (naming the failed task) when its last task ends. The best
// point is the one with the most folds counted, then the best mean: the failed point's one good
// fold (0.9) does not win over a finished point (0.8 over both folds).
TEST_F(CoordinatorServiceTest, AFailedSweepPointEndsOnlyItself) {
  Start();
  SubmitJobRequest request = SweepRequest(root_, {{"stages.finetune.lr_max_per_sample", {"1e-6", "2e-7"}}});
  SubmitJobResponse response;
  ASSERT_TRUE(jobs_->SubmitJob(Ctx().get(), request, &response).ok());
  const std::string job_id = response.job_id();
  const std::string pretrain = job_id + "/pretrain-f0-p0";  // point 0's, shared by both points
  const std::string first = Register();
  LeaseTaskResponse lease = Lease(first);
  ASSERT_TRUE(lease.available());
  ASSERT_EQ(lease.task().task_id(), pretrain);
  ASSERT_TRUE(Complete(first, pretrain, Checkpoint(pretrain, "best.pt")).ok());
  // Each of the four fine-tuning tasks on a group of its own.
  std::map<std::string, std::string> group_of;
  group_of[Lease(first).task().task_id()] = first;
  for (int i = 0; i < 3; ++i) {
    const std::string group = Register();
    LeaseTaskResponse leased = Lease(group);
    ASSERT_TRUE(leased.available());
    group_of[leased.task().task_id()] = group;
  }
  ASSERT_EQ(group_of.size(), 4u);
  auto finish = [&](const std::string& task, double auc) {
    CompleteTaskRequest complete;
    complete.set_group_id(group_of.at(task));
    complete.set_task_id(task);
    complete.set_best_checkpoint(Checkpoint(task, "best.pt"));
    *complete.mutable_best() = EpochEnd(1, auc);
    CompleteTaskResponse done;
    ASSERT_TRUE(workers_->CompleteTask(WorkerCtx().get(), complete, &done).ok());
  };
  finish(job_id + "/finetune-f0-p0", 0.9);
  FailTaskRequest fail;
  fail.set_group_id(group_of.at(job_id + "/finetune-f1-p0"));
  fail.set_task_id(job_id + "/finetune-f1-p0");
  fail.set_error("out of memory");
  FailTaskResponse failed;
  ASSERT_TRUE(workers_->FailTask(WorkerCtx().get(), fail, &failed).ok());
  JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.state(), JOB_STATE_RUNNING);
  for (const TaskInfo& task : job.tasks()) {
    if (absl::EndsWith(task.task_id(), "-p1")) {
      EXPECT_EQ(task.state(), TASK_STATE_LEASED) << task.task_id();
    }
  }
  finish(job_id + "/finetune-f0-p1", 0.8);
  finish(job_id + "/finetune-f1-p1", 0.8);
  job = GetJob(job_id);
  EXPECT_EQ(job.state(), JOB_STATE_FAILED);
  EXPECT_TRUE(absl::StartsWith(job.error(), "task " + job_id + "/finetune-f1-p0 failed: ")) << job.error();
  EXPECT_TRUE(absl::StrContains(job.error(), "out of memory")) << job.error();
  ASSERT_TRUE(job.has_sweep_best());
  EXPECT_EQ(job.sweep_best().point(), 1);
  EXPECT_EQ(job.sweep_best().tasks(), 2);
  EXPECT_NEAR(job.sweep_best().value(), 0.8, 1e-12);
  // A shared pretraining that fails (point 0's task) ends every point that waits for it.
  SubmitJobResponse second;
  ASSERT_TRUE(jobs_->SubmitJob(Ctx().get(), request, &second).ok());
  const std::string group = Register();
  LeaseTaskResponse shared = Lease(group);
  ASSERT_EQ(shared.task().task_id(), second.job_id() + "/pretrain-f0-p0");
  fail.set_group_id(group);
  fail.set_task_id(shared.task().task_id());
  ASSERT_TRUE(workers_->FailTask(WorkerCtx().get(), fail, &failed).ok());
  job = GetJob(second.job_id());
  EXPECT_EQ(job.state(), JOB_STATE_FAILED);
  for (const TaskInfo& task : job.tasks()) {
    if (task.stage() == "finetune") {
      EXPECT_EQ(task.state(), TASK_STATE_CANCELLED) << task.task_id();
    }
  }
  EXPECT_TRUE(absl::StartsWith(job.error(), "task " + second.job_id() + "/pretrain-f0-p0 failed: ")) << job.error();
}

// Each task carries the monitor its best epoch is chosen by: its stage's (the console marks the
// best epoch of a running task by it).
TEST_F(CoordinatorServiceTest, EachTaskCarriesItsStagesMonitor) {
  Start();
  const std::string job_id = Submit({"stages.pretrain.monitor=loss"});
  const JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.monitor(), "auc");
  ASSERT_GE(job.tasks_size(), 2);
  for (const TaskInfo& task : job.tasks()) {
    EXPECT_EQ(task.monitor(), task.stage() == "pretrain" ? "loss" : "auc") << task.task_id();
  }
}

// A pretraining shared by points 0 and 1 fails: the event names both, the points of the other
// pretraining (2 and 3) go on.
TEST_F(CoordinatorServiceTest, AFailedSharedPretrainingNamesEveryPointItEnds) {
  Start();
  SubmitJobRequest request =
      SweepRequest(root_, {{"model.dropout", {"0.2", "0.3"}}, {"stages.finetune.lr_max_per_sample", {"1e-6", "2e-6"}}});
  SubmitJobResponse response;
  ASSERT_TRUE(jobs_->SubmitJob(Ctx().get(), request, &response).ok());
  const std::string job_id = response.job_id();
  std::vector<std::string> messages;
  std::atomic<bool> watching{false};
  std::atomic<bool> saw_failure{false};
  auto watch_context = Ctx();
  std::thread watcher([&] {
    WatchJobRequest watch;
    watch.set_job_id(job_id);
    auto reader = jobs_->WatchJob(watch_context.get(), watch);
    JobEvent event;
    while (reader->Read(&event)) {
      messages.push_back(event.message());
      if (absl::StrContains(event.message(), "FAILED")) saw_failure = true;
      watching = true;
    }
    (void)reader->Finish();
  });
  auto stop_watching = [&] {
    watch_context->TryCancel();
    watcher.join();
  };
  if (!Eventually([&] { return watching.load(); })) {
    stop_watching();
    FAIL() << "no first event from WatchJob";
  }
  const std::string group = Register();
  LeaseTaskResponse lease = Lease(group);
  if (!lease.available() || lease.task().task_id() != job_id + "/pretrain-f0-p0") {
    stop_watching();
    FAIL() << "expected pretrain-f0-p0 first, got " << lease.task().task_id();
  }
  FailTaskRequest fail;
  fail.set_group_id(group);
  fail.set_task_id(lease.task().task_id());
  fail.set_error("out of memory");
  FailTaskResponse failed;
  const bool ok = workers_->FailTask(WorkerCtx().get(), fail, &failed).ok();
  const bool seen = ok && Eventually([&] { return saw_failure.load(); });
  stop_watching();
  ASSERT_TRUE(ok);
  ASSERT_TRUE(seen) << "the watcher never saw the failure";
  bool named = false;
  for (const std::string& m : messages) {
    named = named || (absl::StrContains(m, "pretrain-f0-p0 FAILED: ") &&
                       absl::EndsWith(m, "out of memory (not retryable) (sweep points 0, 1; the other points go on)"));
  }
  EXPECT_TRUE(named) << absl::StrJoin(messages, "\n");
  EXPECT_EQ(GetJob(job_id).state(), JOB_STATE_RUNNING);
}

TEST_F(CoordinatorServiceTest, SweepOverFinetuneKeysSharesOnePretraining) {
  Start();
  SubmitJobRequest request = SweepRequest(root_, {{"stages.finetune.lr_max_per_sample", {"1e-6", "2e-7", "1e-7"}}});
  SubmitJobResponse response;
  ASSERT_TRUE(jobs_->SubmitJob(Ctx().get(), request, &response).ok());
  JobInfo job = GetJob(response.job_id());
  ASSERT_EQ(job.tasks_size(), 1 + 3 * 2);
  EXPECT_EQ(job.tasks(0).task_id(), response.job_id() + "/pretrain-f0-p0");
  for (int i = 1; i < job.tasks_size(); ++i) EXPECT_EQ(job.tasks(i).stage(), "finetune");
  const std::string group = Register();
  LeaseTaskResponse lease = Lease(group);
  ASSERT_EQ(lease.task().task_id(), job.tasks(0).task_id());
  const std::string best = Checkpoint(lease.task().task_id(), "best.pt");
  ASSERT_TRUE(Complete(group, lease.task().task_id(), best).ok());
  for (int i = 0; i < 6; ++i) {
    lease = Lease(group);
    ASSERT_TRUE(lease.available());
    EXPECT_EQ(lease.task().init_checkpoint(), best);  // every point fine-tunes the one pretraining
    auto config = common::ParsePipelineConfig(lease.task().pipeline_yaml(), "lease");
    ASSERT_TRUE(config.ok());
    const double want[] = {1e-6, 2e-7, 1e-7};
    EXPECT_DOUBLE_EQ(config->stages.at("finetune").train.lr_max_per_sample, want[lease.task().task_id().back() - '0']);
    ASSERT_TRUE(Complete(group, lease.task().task_id(), Checkpoint(lease.task().task_id(), "best.pt")).ok());
  }
  EXPECT_EQ(GetJob(response.job_id()).state(), JOB_STATE_SUCCEEDED);
}

TEST_F(CoordinatorServiceTest, SweepAndTagErrorsNameTheKeyAndValueBeforeAnyWork) {
  Start();
  auto refused = [&](const SubmitJobRequest& request, const std::vector<std::string>& says) {
    SubmitJobResponse response;
    const grpc::Status status = jobs_->SubmitJob(Ctx().get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    for (const std::string& text : says) EXPECT_TRUE(absl::StrContains(status.error_message(), text)) << status.error_message();
  };
  refused(SweepRequest(root_, {{"train.lrr", {"1e-3", "2e-3"}}}), {"train.lrr", "sweep point 0"});
  // One value is a --set: the checks that compare the points never saw a shared key in it.
  refused(SweepRequest(root_, {{"seed", {"7"}}}),
          {"field 'sweep[0]': key 'seed' has one value ('7'); a sweep needs two or more (give one value with --set)"});
  refused(SweepRequest(root_, {{"data.target.root", {"t24"}}, {"model.dropout", {"0.2", "0.3"}}}),
          {"field 'sweep[0]'", "one value"});
  refused(SweepRequest(root_, {{"model.dropout", {"0.2", "0.3"}}, {"train.monitor", {"loss"}}}),
          {"field 'sweep[1]'", "one value"});
  // Every task carries its point's overrides: a point's are at most 2 KiB.
  refused(SweepRequest(root_, {{"train.lr_min", {"1e-6", absl::StrCat("0.", std::string(1017, '0'), "1")}},
                               {"train.lr_start", {"5e-6", absl::StrCat("0.", std::string(1017, '0'), "5")}}}),
          {"field 'sweep[1]': key 'train.lr_start' brings a point's overrides to 2068 bytes, more than 2048"});
  refused(SweepRequest(root_, {{"train.lr", {"1e-3", "fast"}}}),
          {"sweep point 1 (train.lr=fast): ", "--sweep train.lr=fast: key 'train.lr'"});
  refused(SweepRequest(root_, {{"train.lr", {"1e-3", "-1"}}}), {"train.lr"});
  refused(SweepRequest(root_, {{"train.lr", {}}}), {"sweep[0]", "no values"});
  refused(SweepRequest(root_, {{"train.lr", {"1e-3", "2e-3"}}, {"train.lr", {"3e-3", "4e-3"}}}), {"swept twice"});
  refused(SweepRequest(root_, {{"train.lr", {"1e-3", "1e-3"}}}), {"twice"});
  refused(SweepRequest(root_, {{"train.lr_max_per_sample", {"1e-6", "2e-6", "0.000001"}}}),
          {"sweep points 0 (train.lr_max_per_sample=1e-6) and 2 (train.lr_max_per_sample=0.000001) train alike"});
  SubmitJobRequest disabled = SweepRequest(root_, {{"stages.pretrain.lr_max_per_sample", {"1e-6", "2e-6"}}});
  disabled.add_overrides("stages.pretrain.enabled=false");
  refused(disabled, {"sweep points 0 (stages.pretrain.lr_max_per_sample=1e-6) and 1 "
                     "(stages.pretrain.lr_max_per_sample=2e-6) train alike"});
  // Keys the run does not read: train.lr under the default 'cos' schedule (the notebook's CFG.lr,
  // which its LR callback replaces every epoch), the cosine's lr_min under 'step'.
  refused(SweepRequest(root_, {{"train.lr", {"1e-3", "2e-3"}}}),
          {"sweep key 'train.lr' changes nothing the tasks read (points 0 (train.lr=1e-3) and 1 (train.lr=2e-3) "
           "train alike)",
           "train.lr is read only with train.scheduler none"});
  SubmitJobRequest step = SweepRequest(root_, {{"model.dropout", {"0.2", "0.3"}}, {"train.lr_min", {"1e-6", "2e-6"}}});
  step.add_overrides("train.scheduler=step");
  refused(step, {"sweep key 'train.lr_min' changes nothing the tasks read (points 0 (model.dropout=0.2, "
                 "train.lr_min=1e-6) and 1 (model.dropout=0.2, train.lr_min=2e-6) train alike)"});
  // Augment keys behind a probability of 0 (the default timeshift_prob, a mixup_prob set to 0):
  // the per-sample draws are the same, so are the runs. With the probability above 0: accepted.
  refused(SweepRequest(root_, {{"augment.timeshift_max", {"0.25", "0.5"}}}),
          {"sweep key 'augment.timeshift_max' changes nothing the tasks read", "an augment key only when its probability"});
  SubmitJobRequest no_mixup = SweepRequest(root_, {{"augment.mixup_alpha", {"0.4", "0.5"}}});
  no_mixup.add_overrides("augment.mixup_prob=0");
  refused(no_mixup, {"sweep key 'augment.mixup_alpha' changes nothing the tasks read"});
  SubmitJobRequest no_audio = SweepRequest(root_, {{"augment.noise_std_max", {"0.02", "0.05"}}});
  no_audio.add_overrides("augment.audio_augment_prob=0");
  refused(no_audio, {"sweep key 'augment.noise_std_max' changes nothing the tasks read"});
  {
    SubmitJobRequest shifted = SweepRequest(root_, {{"augment.timeshift_max", {"0.25", "0.5"}}});
    shifted.add_overrides("augment.timeshift_prob=0.5");
    SubmitJobResponse accepted;
    const grpc::Status status = jobs_->SubmitJob(Ctx().get(), shifted, &accepted);
    EXPECT_TRUE(status.ok()) << status.error_message();
  }
  SubmitJobRequest overridden = SweepRequest(root_, {{"train.epochs", {"1", "2"}}});  // every stage sets its own
  overridden.add_overrides("stages.pretrain.epochs=3");
  overridden.add_overrides("stages.finetune.epochs=3");
  refused(overridden, {"sweep points 0 (train.epochs=1) and 1 (train.epochs=2) train alike"});
  refused(SweepRequest(root_, {{"seed", {"1", "2"}}}), {"sweep point 1 (seed=2) changes 'seed' from point 0 (seed=1)"});
  refused(SweepRequest(root_, {{"folds.selected_folds", {"[0]", "[1]"}}}), {"changes 'folds'"});
  refused(SweepRequest(root_, {{"train.monitor", {"auc", "loss"}}}), {"changes 'train.monitor'"});
  refused(SweepRequest(root_, {{"train.lr", {"1e-3", "2e-3\n"}}}), {"sweep[0].values[1]", "control character"});
  refused(SweepRequest(root_, {{"a", {"1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17"}},
                               {"b", {"1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"}}}),
          {"brings the grid to 272 points, more than 256"});
  // An axis longer than the grid may be is refused before its values are looked at (a request of
  // millions of values took seconds and hundreds of MB to be refused).
  std::vector<std::string> too_many(300, "1e-3");
  refused(SweepRequest(root_, {{"train.lr", too_many}}),
          {"field 'sweep[0]': key 'train.lr' brings the grid to 300 points, more than 256"});
  // 256 points of 16 fine-tuning tasks, sharing 1 pretraining: more tasks than one job may have.
  std::vector<std::string> lrs;
  for (int i = 1; i <= 256; ++i) lrs.push_back(absl::StrCat(i, "e-6"));
  SubmitJobRequest many = SweepRequest(root_, {{"stages.finetune.lr_max_per_sample", lrs}});
  many.add_overrides("folds.finetune_splits=16");
  many.add_overrides("folds.selected_folds=[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]");
  refused(many, {": 4097 tasks (1 pretraining + 256 sweep point(s) x 16 fold(s) of folds.selected_folds)",
                 "at most 4096"});
  SubmitJobRequest tag = SweepRequest(root_, {});
  tag.add_tags("bad key=1");
  refused(tag, {"tags[0]", "bad key=1"});
  SubmitJobRequest note = SweepRequest(root_, {});
  note.set_note("two\nlines");
  refused(note, {"note", "control character"});
  ListJobsRequest list_request;
  ListJobsResponse list;
  ASSERT_TRUE(jobs_->ListJobs(Ctx().get(), list_request, &list).ok());
  EXPECT_EQ(list.jobs_size(), 1);  // the time-shift sweep only
}

TEST_F(CoordinatorServiceTest, RetryRefusesAJobWhoseManifestsWerePruned) {
  config_.retention_days = 0;
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  CancelJobRequest cancel;
  cancel.set_job_id(job_id);
  CancelJobResponse cancelled;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(5));  // finished before the cutoff
  PruneJobsRequest prune;
  prune.set_older_than_days(0);
  PruneJobsResponse pruned;
  ASSERT_TRUE(jobs_->PruneJobs(Ctx().get(), prune, &pruned).ok());
  ASSERT_EQ(pruned.jobs_size(), 1);
  RetryJobRequest retry;
  retry.set_job_id(job_id);
  JobInfo retried;
  const grpc::Status status = jobs_->RetryJob(Ctx().get(), retry, &retried);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "was pruned")) << status.error_message();
  EXPECT_EQ(GetJob(job_id).state(), JOB_STATE_CANCELLED);  // unchanged: nothing leased without a manifest
  const std::string group = Register();
  EXPECT_FALSE(Lease(group).has_task());
}

TEST_F(CoordinatorServiceTest, RetryResumesFailedAndCancelledTasksFromTheirCheckpoints) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string group = Register();
  ASSERT_EQ(Lease(group).task().task_id(), pretrain);
  RetryJobRequest retry;
  retry.set_job_id(job_id);
  JobInfo retried;
  grpc::Status status = jobs_->RetryJob(Ctx().get(), retry, &retried);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "RUNNING")) << status.error_message();
  ReportCheckpointRequest checkpoint;
  checkpoint.set_group_id(group);
  checkpoint.set_task_id(pretrain);
  checkpoint.set_path(Checkpoint(pretrain, "last.pt"));
  checkpoint.set_epoch(1);
  ReportCheckpointResponse checkpoint_response;
  ASSERT_TRUE(workers_->ReportCheckpoint(WorkerCtx().get(), checkpoint, &checkpoint_response).ok());
  FailTaskRequest fail;
  fail.set_group_id(group);
  fail.set_task_id(pretrain);
  fail.set_error("out of memory");
  FailTaskResponse failed;
  ASSERT_TRUE(workers_->FailTask(WorkerCtx().get(), fail, &failed).ok());
  JobInfo job = GetJob(job_id);
  ASSERT_EQ(job.state(), JOB_STATE_FAILED);
  EXPECT_EQ(job.tasks(1).state(), TASK_STATE_CANCELLED);

  ASSERT_TRUE(jobs_->RetryJob(Ctx().get(), retry, &retried).ok());
  EXPECT_EQ(retried.state(), JOB_STATE_RUNNING);
  EXPECT_EQ(retried.error(), "");
  EXPECT_EQ(retried.tasks(0).state(), TASK_STATE_READY);
  EXPECT_EQ(retried.tasks(0).error(), "");
  EXPECT_EQ(retried.tasks(1).state(), TASK_STATE_BLOCKED);  // behind the pretraining again
  EXPECT_EQ(retried.tasks(2).state(), TASK_STATE_BLOCKED);
  Restart();  // durable
  EXPECT_EQ(GetJob(job_id).tasks(0).state(), TASK_STATE_READY);
  const std::string again = Register();
  LeaseTaskResponse lease = Lease(again);
  ASSERT_EQ(lease.task().task_id(), pretrain);
  EXPECT_EQ(lease.task().attempt(), 2);
  EXPECT_EQ(lease.task().resume_checkpoint(), checkpoint.path());
  ASSERT_TRUE(Complete(again, pretrain, checkpoint.path()).ok());
  EXPECT_EQ(GetJob(job_id).tasks(1).state(), TASK_STATE_READY);

  // A cancelled job runs again too; a succeeded one cannot be retried.
  CancelJobRequest cancel;
  cancel.set_job_id(job_id);
  CancelJobResponse cancelled;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
  ASSERT_TRUE(jobs_->RetryJob(Ctx().get(), retry, &retried).ok());
  EXPECT_EQ(retried.tasks(0).state(), TASK_STATE_SUCCEEDED);
  EXPECT_EQ(retried.tasks(1).state(), TASK_STATE_READY);
  EXPECT_EQ(retried.tasks(2).state(), TASK_STATE_READY);
  retry.set_job_id("j000000000000");
  EXPECT_EQ(jobs_->RetryJob(Ctx().get(), retry, &retried).error_code(), grpc::StatusCode::NOT_FOUND);
  retry.set_job_id("nope");
  EXPECT_EQ(jobs_->RetryJob(Ctx().get(), retry, &retried).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(CoordinatorServiceTest, DeleteRefusesARunningJobAndRemovesOnlyItsRunFolder) {
  Start();
  const std::string job_id = Submit();
  const std::string kept = Submit();
  const std::string group = Register();
  const std::string pretrain = Lease(group).task().task_id();
  ASSERT_EQ(pretrain, job_id + "/pretrain-f0");
  const std::string checkpoint = Checkpoint(pretrain, "last.pt");
  Write(absl::StrCat("runs/", kept, "/pretrain-fold0/last.pt"), "other job");
  bool stop = false;
  ASSERT_TRUE(Report(group, pretrain, {EpochEnd(0, 0.5)}, &stop).ok());
  const std::string labelled = absl::StrCat("job_id=\"", job_id, "\"");
  DeleteJobRequest request;
  request.set_job_id(job_id);
  request.set_with_run_folders(true);
  DeleteJobResponse response;
  grpc::Status status = jobs_->DeleteJob(Ctx().get(), request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "cancel it first")) << status.error_message();
  // A watcher of the job ends when it is deleted.
  WatchJobRequest watch_request;
  watch_request.set_job_id(job_id);
  grpc::ClientContext watch_context;
  watch_context.AddMetadata("authorization", "Bearer the-token");
  auto reader = jobs_->WatchJob(&watch_context, watch_request);
  JobEvent event;
  ASSERT_TRUE(reader->Read(&event));
  CancelJobRequest cancel;
  cancel.set_job_id(job_id);
  CancelJobResponse cancelled;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
  while (reader->Read(&event)) {
  }
  EXPECT_TRUE(reader->Finish().ok());  // the stream ends with the CANCELLED state
  double value = 0;
  ASSERT_TRUE(FindSample(HttpGet(coordinator_->metrics_port(), "/metrics"), "aviary_val_auc", {labelled}, &value));
  // The group stops the cancelled task and lets go of it (its heartbeats come without it), so
  // the run folder may go (DeleteWithRunFoldersWaitsForTheCancelledHolder).
  bool told = false;
  ASSERT_TRUE(Heartbeat(group, pretrain, &told).ok());
  EXPECT_TRUE(told);
  ASSERT_TRUE(Heartbeat(group, "", &told).ok());
  ASSERT_TRUE(jobs_->DeleteJob(Ctx().get(), request, &response).ok());
  // Its series leave /metrics with it (as after a restart), the other job's stay.
  const std::string exposition = HttpGet(coordinator_->metrics_port(), "/metrics");
  EXPECT_FALSE(absl::StrContains(exposition, labelled)) << exposition;
  EXPECT_TRUE(FindSample(exposition, "aviary_task_running", {absl::StrCat("job_id=\"", kept, "\"")}, &value))
      << exposition;
  ASSERT_EQ(response.removed_folders_size(), 1);
  EXPECT_EQ(response.removed_folders(0), fs::canonical(root_).string() + "/runs/" + job_id);
  EXPECT_FALSE(fs::exists(checkpoint));
  EXPECT_TRUE(fs::exists(absl::StrCat(root_, "/runs/", kept, "/pretrain-fold0/last.pt")));
  GetJobRequest get;
  get.set_job_id(job_id);
  JobInfo job;
  EXPECT_EQ(jobs_->GetJob(Ctx().get(), get, &job).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(jobs_->DeleteJob(Ctx().get(), request, &response).error_code(), grpc::StatusCode::NOT_FOUND);
  // The group that held the deleted task learns it on its next heartbeat, and leases on.
  bool cancel_task = false;
  const grpc::Status beat = Heartbeat(group, pretrain, &cancel_task);
  EXPECT_TRUE(!beat.ok() || cancel_task) << beat.error_message();
  EXPECT_EQ(Lease(group).task().task_id(), kept + "/pretrain-f0");
  Restart();
  EXPECT_EQ(jobs_->GetJob(Ctx().get(), get, &job).error_code(), grpc::StatusCode::NOT_FOUND);
  ListJobsRequest list_request;
  ListJobsResponse list;
  ASSERT_TRUE(jobs_->ListJobs(Ctx().get(), list_request, &list).ok());
  ASSERT_EQ(list.jobs_size(), 1);
  EXPECT_EQ(list.jobs(0).job_id(), kept);
  // Without --with-run-folders the folder stays.
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), [&] { CancelJobRequest c; c.set_job_id(kept); return c; }(), &cancelled).ok());
  request.set_job_id(kept);
  request.set_with_run_folders(false);
  ASSERT_TRUE(jobs_->DeleteJob(Ctx().get(), request, &response).ok());
  EXPECT_EQ(response.removed_folders_size(), 0);
  EXPECT_TRUE(fs::exists(absl::StrCat(root_, "/runs/", kept, "/pretrain-fold0/last.pt")));
}

// A job's run folder that is a symbolic link (here to another folder in the work dir): removing
// it would remove the link's target, so delete --with-run-folders refuses before deleting
// anything; without the flag the job goes and the folders stay.
TEST_F(CoordinatorServiceTest, DeleteRefusesARunFolderThatIsALinkAndDeletesNothing) {
  Start();
  const std::string job_id = Submit();
  Write("runs/elsewhere/keep.txt", "mine");
  fs::create_directories(root_ + "/runs");
  fs::create_directory_symlink(root_ + "/runs/elsewhere", root_ + "/runs/" + job_id);
  CancelJobRequest cancel;
  cancel.set_job_id(job_id);
  CancelJobResponse cancelled;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
  DeleteJobRequest request;
  request.set_job_id(job_id);
  request.set_with_run_folders(true);
  DeleteJobResponse response;
  grpc::Status status = jobs_->DeleteJob(Ctx().get(), request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "is a symbolic link")) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "nothing was deleted")) << status.error_message();
  GetJobRequest get;
  get.set_job_id(job_id);
  JobInfo job;
  EXPECT_TRUE(jobs_->GetJob(Ctx().get(), get, &job).ok());
  EXPECT_TRUE(fs::exists(root_ + "/runs/elsewhere/keep.txt"));
  request.set_with_run_folders(false);
  ASSERT_TRUE(jobs_->DeleteJob(Ctx().get(), request, &response).ok());
  EXPECT_TRUE(fs::exists(root_ + "/runs/elsewhere/keep.txt"));
  EXPECT_TRUE(fs::is_symlink(root_ + "/runs/" + job_id));
}

// delete --with-run-folders renames the folder ".<job>.deleting" before its transaction and
// removes it after. A coordinator stopped in between finishes at its next start: the folder of a
// deleted job is removed, that of a job still in the store (the delete did not commit) goes back.
// Other dot-folders of the work dir are not touched.
TEST_F(CoordinatorServiceTest, AnInterruptedRunFolderRemovalIsFinishedAtTheNextStart) {
  Start();
  const std::string deleted = Submit();
  const std::string kept = Submit();
  for (const std::string& job_id : {deleted, kept}) {
    CancelJobRequest cancel;
    cancel.set_job_id(job_id);
    CancelJobResponse cancelled;
    ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
  }
  Write(absl::StrCat("runs/", deleted, "/pretrain-fold0/last.pt"), "deleted job's");
  Write(absl::StrCat("runs/", kept, "/pretrain-fold0/last.pt"), "kept job's");
  Write("runs/.jffffffffffff.deleting.not/keep.txt", "not ours");
  Write("runs/.notajob.deleting/keep.txt", "not ours");
  DeleteJobRequest request;
  request.set_job_id(deleted);
  request.set_with_run_folders(false);  // the job goes, its folder stays: as if stopped before removing it
  DeleteJobResponse response;
  ASSERT_TRUE(jobs_->DeleteJob(Ctx().get(), request, &response).ok());
  ASSERT_TRUE(coordinator_->Shutdown().ok());
  coordinator_.reset();
  const std::string runs = root_ + "/runs/";
  fs::rename(runs + deleted, runs + "." + deleted + ".deleting");
  fs::rename(runs + kept, runs + "." + kept + ".deleting");
  Start();
  EXPECT_FALSE(fs::exists(runs + "." + deleted + ".deleting"));
  EXPECT_FALSE(fs::exists(runs + deleted));
  EXPECT_FALSE(fs::exists(runs + "." + kept + ".deleting"));
  EXPECT_TRUE(fs::exists(runs + kept + "/pretrain-fold0/last.pt"));
  EXPECT_TRUE(fs::exists(runs + ".jffffffffffff.deleting.not/keep.txt"));
  EXPECT_TRUE(fs::exists(runs + ".notajob.deleting/keep.txt"));
  // A delete that completes leaves no renamed folder behind.
  request.set_job_id(kept);
  request.set_with_run_folders(true);
  ASSERT_TRUE(jobs_->DeleteJob(Ctx().get(), request, &response).ok());
  ASSERT_EQ(response.removed_folders_size(), 1);
  EXPECT_FALSE(fs::exists(runs + kept));
  EXPECT_FALSE(fs::exists(runs + "." + kept + ".deleting"));
}

// A running job keeps its latest events for a watcher that falls behind (at most 128, and at most
// max_event_bytes_per_job of job snapshots: each report's commit makes a new one, a sweep's holds
// every task). One behind the retained events gets the current state first, then what is kept.
TEST_F(CoordinatorServiceTest, AWatcherBehindTheRetainedEventsGetsTheCurrentStateFirst) {
  // 16 MiB: every report's event kept; 1: each commit keeps its own events only; two snapshots
  // and a half (measured in the first round): the last two reports' events kept, and the
  // watcher, behind them, must not be sent the older one (it would go back in time).
  size_t snapshot_bytes = 0;
  for (const int round : {0, 1, 2}) {
    const size_t budget = round == 0 ? size_t{16} << 20 : round == 1 ? size_t{1} : snapshot_bytes * 5 / 2;
    SCOPED_TRACE(budget);
    config_.max_event_bytes_per_job = budget;
    Start();
    const std::string job_id = Submit();
    const std::string group = Register();
    const std::string task = Lease(group).task().task_id();
    std::vector<JobEvent> got;
    auto send = [&](const JobEvent& event) {
      got.push_back(event);
      if (got.size() == 1) {  // the watcher is busy: three reports commit meanwhile
        for (int step = 1; step <= 3; ++step) {
          Metrics point;
          point.set_step(step);
          bool cancel = false;
          EXPECT_TRUE(Report(group, task, {point}, &cancel).ok());
        }
      }
      return got.size() < (round == 0 ? 4u : 3u);  // what each budget sends, then the watcher leaves
    };
    const absl::Status watched = coordinator_->scheduler()->WatchJob(job_id, send, [] { return false; });
    EXPECT_TRUE(absl::IsCancelled(watched)) << watched;
    ASSERT_GE(got.size(), 2u);
    if (round == 0) snapshot_bytes = got.back().job().ByteSizeLong();
    if (round > 0) {
      EXPECT_TRUE(absl::StrContains(got[1].message(), "events were dropped for a slow watcher")) << got[1].message();
      EXPECT_EQ(got[1].job().tasks(0).latest().step(), 3);  // the current state
      ASSERT_EQ(got.size(), 3u);  // then the last report's event, kept
      EXPECT_EQ(got[2].metrics().step(), 3);
      EXPECT_EQ(got[2].job().tasks(0).latest().step(), 3);  // not the second report's, retained too
    } else {
      ASSERT_EQ(got.size(), 4u);  // every report's event, in order, each with the job after it
      for (int i = 1; i <= 3; ++i) {
        EXPECT_EQ(got[i].metrics().step(), i);
        EXPECT_EQ(got[i].job().tasks(0).latest().step(), i);
      }
    }
    ASSERT_TRUE(coordinator_->Shutdown().ok());
    coordinator_.reset();
  }
}

// A job cancelled under its group: the group may train the task, and write its run folder, until
// it learns of the cancel. Deleting the run folder meanwhile raced those writes; it waits until
// the group lets go (or is removed as lost). Deleting without the folders is not held up.
TEST_F(CoordinatorServiceTest, DeleteWithRunFoldersWaitsForTheCancelledHolder) {
  Start();
  const std::string job_id = Submit();
  const std::string group = Register();
  const std::string pretrain = Lease(group).task().task_id();
  ASSERT_EQ(pretrain, job_id + "/pretrain-f0");
  const std::string checkpoint = Checkpoint(pretrain, "last.pt");
  CancelJobRequest cancel;
  cancel.set_job_id(job_id);
  CancelJobResponse cancelled;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
  DeleteJobRequest request;
  request.set_job_id(job_id);
  request.set_with_run_folders(true);
  DeleteJobResponse response;
  grpc::Status status = jobs_->DeleteJob(Ctx().get(), request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(),
                                absl::StrCat("group ", group, " has not stopped task ", pretrain)))
      << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "/runs/" + job_id + "/pretrain-fold0"))
      << status.error_message();
  EXPECT_TRUE(fs::exists(checkpoint));
  // Told to stop (a cancel answer alone may be lost: still refused), then it lets go.
  bool told = false;
  ASSERT_TRUE(Heartbeat(group, pretrain, &told).ok());
  EXPECT_TRUE(told);
  EXPECT_EQ(jobs_->DeleteJob(Ctx().get(), request, &response).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // Across a coordinator restart too (the holder is in the group's row).
  Restart();
  EXPECT_EQ(jobs_->DeleteJob(Ctx().get(), request, &response).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(Heartbeat(group, "", &told).ok());
  status = jobs_->DeleteJob(Ctx().get(), request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.removed_folders_size(), 1);
  EXPECT_FALSE(fs::exists(checkpoint));
  // Without the run folders a job goes at once, its holder told at its next heartbeat.
  const std::string other = Submit();
  const std::string other_task = Lease(group).task().task_id();
  cancel.set_job_id(other);
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
  request.set_job_id(other);
  request.set_with_run_folders(false);
  ASSERT_TRUE(jobs_->DeleteJob(Ctx().get(), request, &response).ok());
  ASSERT_TRUE(Heartbeat(group, other_task, &told).ok());
  EXPECT_TRUE(told);
}

// A group numbers its lines (LogLine.seq in ShipLogs); a ShipLogs sent again after its answer was
// lost, possibly with newer lines behind, stores each line once. Another group's numbers are its
// own, and unnumbered lines (seq 0) are always stored. Only the group that runs the task or ran
// it last writes its log (any group could write any task's), each line under its own lease's
// attempt.
TEST_F(CoordinatorServiceTest, ALogLineShippedAgainIsStoredOnce) {
  Start();
  const std::string job_id = Submit();
  const std::string a = Register();
  const std::string b = Register();
  const std::string c = Register();
  const std::string pretrain = Lease(a).task().task_id();
  auto ship = [&](const std::string& gid, const std::vector<std::pair<int64_t, std::string>>& lines) {
    ShipLogsRequest request;
    request.set_group_id(gid);
    request.set_task_id(pretrain);
    for (const auto& [seq, text] : lines) {
      LogLine* line = request.add_lines();
      line->set_seq(seq);
      line->set_text(text);
      line->set_level("info");
    }
    ShipLogsResponse response;
    return workers_->ShipLogs(WorkerCtx().get(), request, &response);
  };
  ASSERT_TRUE(ship(a, {{1, "one"}, {2, "two"}}).ok());
  ASSERT_TRUE(ship(a, {{1, "one"}, {2, "two"}, {3, "three"}}).ok());
  ASSERT_TRUE(ship(a, {{3, "three"}}).ok());
  EXPECT_EQ(ship(b, {{1, "b one"}}).error_code(), grpc::StatusCode::FAILED_PRECONDITION);  // not b's yet
  ASSERT_TRUE(FailRetryable(a, pretrain, "lost a rank").ok());
  ASSERT_EQ(Lease(b).task().attempt(), 2);
  ASSERT_TRUE(ship(b, {{1, "b one"}, {0, "b unnumbered"}}).ok());
  ASSERT_TRUE(ship(b, {{1, "b one"}, {0, "b unnumbered"}}).ok());
  ASSERT_TRUE(ship(a, {{4, "four"}}).ok());  // a ran it last: its late lines
  EXPECT_EQ(ship(c, {{1, "c"}}).error_code(), grpc::StatusCode::FAILED_PRECONDITION);  // never c's
  EXPECT_EQ(ship(a, {{-1, "x"}}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  GetLogsRequest request;
  request.set_job_id(job_id);
  request.set_task_id(pretrain);
  GetLogsResponse response;
  ASSERT_TRUE(jobs_->GetLogs(Ctx().get(), request, &response).ok());
  std::vector<std::string> texts;
  for (const LogLine& line : response.tasks(0).lines()) texts.push_back(line.text());
  EXPECT_EQ(texts, (std::vector<std::string>{"one", "two", "three", "b one", "b unnumbered", "b unnumbered", "four"}));
  EXPECT_EQ(response.tasks(0).lines(6).seq(), 7);  // numbered by the coordinator
  EXPECT_EQ(response.tasks(0).lines(3).attempt(), 2);  // b's lease
  EXPECT_EQ(response.tasks(0).lines(6).attempt(), 1);  // a's, though the task is at attempt 2
}

// A job's logs in one answer could pass the client's message limit (a sweep: 1024 tasks x 512
// KiB): the answer stops at max_logs_response_bytes of lines, says `more`, and the next request
// (from each task's last seq) brings the rest, each line once, in order.
TEST_F(CoordinatorServiceTest, ABigLogsAnswerIsCutAndTheRestComesNext) {
  config_.max_logs_response_bytes = 300;
  Start();
  const std::string job_id = Submit();
  const std::string group = Register();
  const std::string pretrain = Lease(group).task().task_id();
  ShipLogsRequest ship;
  ship.set_group_id(group);
  ship.set_task_id(pretrain);
  std::vector<std::string> shipped;
  for (int i = 0; i < 40; ++i) {
    shipped.push_back(absl::StrCat("epoch ", i, ": a line of about forty bytes"));
    LogLine* line = ship.add_lines();
    line->set_text(shipped.back());
    line->set_level("info");
  }
  ShipLogsResponse shipped_response;
  ASSERT_TRUE(workers_->ShipLogs(WorkerCtx().get(), ship, &shipped_response).ok());
  std::vector<std::string> got;
  std::map<std::string, int64_t> after;
  int answers = 0;
  for (bool more = true; more && answers < 100; ++answers) {
    GetLogsRequest request;
    request.set_job_id(job_id);  // every task: the others come without lines
    for (const auto& [task, seq] : after) (*request.mutable_after_seq_by_task())[task] = seq;
    GetLogsResponse response;
    const grpc::Status status = jobs_->GetLogs(Ctx().get(), request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    size_t bytes = 0;
    for (const auto& log : response.tasks()) {
      for (const LogLine& line : log.lines()) {
        got.push_back(line.text());
        after[log.task_id()] = line.seq();
        bytes += line.ByteSizeLong();
      }
    }
    EXPECT_LE(bytes, 300u);
    more = response.more();
  }
  EXPECT_GT(answers, 3);
  EXPECT_EQ(got, shipped);

  // `aviary logs` asks again while an answer says `more`: every line once, in order; with
  // --tail, the last lines only.
  auto client = [&](const std::string& args) {
    const std::string command =
        absl::StrCat("env -u AVIARY_TOKEN_FILE -u AVIARY_TLS_CA AVIARY_TOKEN=the-token '" AVIARY_CLIENT_BINARY
                     "' --coordinator 127.0.0.1:", coordinator_->grpc_port(), " logs ", args, " 2>&1");
    int status = -1;
    const std::string out = CommandOutput(command, &status);
    EXPECT_EQ(status, 0) << command << "\n" << out;
    return out;
  };
  auto printed = [](const std::string& out) {
    std::vector<std::string> texts;
    for (absl::string_view line : absl::StrSplit(out, '\n')) {
      const size_t at = line.find("epoch ");
      if (at != absl::string_view::npos) texts.emplace_back(line.substr(at));
    }
    return texts;
  };
  EXPECT_EQ(printed(client(job_id)), shipped);
  EXPECT_EQ(printed(client(absl::StrCat(job_id, " --tail 3"))),
            std::vector<std::string>(shipped.end() - 3, shipped.end()));
}

TEST_F(CoordinatorServiceTest, LogsAreShippedNumberedAndBoundedPerTask) {
  Start();
  const std::string job_id = Submit();
  const std::string other_job = Submit();
  const std::string group = Register();
  const std::string pretrain = Lease(group).task().task_id();
  auto ship = [&](const std::string& gid, const std::string& task, const std::vector<std::string>& texts) {
    ShipLogsRequest request;
    request.set_group_id(gid);
    request.set_task_id(task);
    for (const std::string& text : texts) {
      LogLine* line = request.add_lines();
      line->set_text(text);
      line->set_level("info");
      line->set_time_unix_ms(1700000000000);
    }
    ShipLogsResponse response;
    return workers_->ShipLogs(WorkerCtx().get(), request, &response);
  };
  auto logs = [&](const std::string& task, int64_t after, int limit) {
    GetLogsRequest request;
    request.set_job_id(job_id);
    request.set_task_id(task);
    request.set_after_seq(after);
    request.set_limit(limit);
    GetLogsResponse response;
    const grpc::Status status = jobs_->GetLogs(Ctx().get(), request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  };
  ASSERT_TRUE(ship(group, pretrain, {"epoch 0", "epoch 1", "epoch 2"}).ok());
  GetLogsResponse got = logs(pretrain, 0, 0);
  ASSERT_EQ(got.tasks_size(), 1);
  ASSERT_EQ(got.tasks(0).lines_size(), 3);
  EXPECT_EQ(got.tasks(0).lines(0).seq(), 1);
  EXPECT_EQ(got.tasks(0).lines(2).text(), "epoch 2");
  EXPECT_EQ(got.tasks(0).lines(2).attempt(), 1);
  EXPECT_EQ(got.job().job_id(), job_id);
  EXPECT_EQ(logs(pretrain, 2, 0).tasks(0).lines_size(), 1);
  EXPECT_EQ(logs(pretrain, 0, 2).tasks(0).lines(0).text(), "epoch 1");  // the last 2
  got = logs("", 0, 0);  // every task of the job, those without lines too
  ASSERT_EQ(got.tasks_size(), 3);
  EXPECT_EQ(got.tasks(1).lines_size(), 0);

  // Errors: an unknown group, a task of another job, bad fields, the wrong role.
  EXPECT_EQ(ship("g000000000000", pretrain, {"x"}).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ship(group, other_job + "/pretrain-f9", {"x"}).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(ship(group, "bogus", {"x"}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  GetLogsRequest bad;
  bad.set_job_id(job_id);
  bad.set_task_id(other_job + "/pretrain-f0");
  GetLogsResponse bad_response;
  grpc::Status status = jobs_->GetLogs(Ctx().get(), bad, &bad_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "is not a task of job")) << status.error_message();
  bad.set_task_id(job_id + "/finetune-f7");
  EXPECT_EQ(jobs_->GetLogs(Ctx().get(), bad, &bad_response).error_code(), grpc::StatusCode::NOT_FOUND);
  ShipLogsRequest forged;
  forged.set_group_id(group);
  forged.set_task_id(pretrain);
  ShipLogsResponse forged_response;
  EXPECT_EQ(workers_->ShipLogs(Ctx().get(), forged, &forged_response).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);

  // Bounded: long lines are cut (at a character: a 3-byte one straddles the cut here), old lines
  // dropped past the per-task budget.
  std::string long_line = "x";
  while (long_line.size() < 10000) long_line += "\xe2\x82\xac";  // U+20AC
  ASSERT_TRUE(ship(group, pretrain, {long_line}).ok());
  got = logs(pretrain, 3, 0);
  ASSERT_EQ(got.tasks(0).lines_size(), 1);
  EXPECT_LE(got.tasks(0).lines(0).text().size(), Scheduler::kMaxLogLineBytes + 16);
  EXPECT_TRUE(absl::EndsWith(got.tasks(0).lines(0).text(), "\xe2\x82\xac [cut]")) << got.tasks(0).lines(0).text().substr(2030);
  for (int i = 0; i < 300; ++i) ASSERT_TRUE(ship(group, pretrain, {std::string(2000, 'y')}).ok());
  got = logs(pretrain, 0, 0);
  EXPECT_GT(got.tasks(0).dropped(), 0);
  size_t bytes = 0;  // counted as the coordinator does: each line's text and overhead
  for (const LogLine& line : got.tasks(0).lines()) bytes += line.text().size() + Scheduler::kLogLineOverheadBytes;
  EXPECT_LE(bytes, Scheduler::kMaxLogBytesPerTask);
  EXPECT_GT(bytes + 2000 + Scheduler::kLogLineOverheadBytes, Scheduler::kMaxLogBytesPerTask);  // full
  EXPECT_EQ(got.tasks(0).last_seq(), 3 + 1 + 300);
  EXPECT_EQ(got.tasks(0).lines(got.tasks(0).lines_size() - 1).seq(), 304);

  // One poll for every task, each from its own seq (aviary logs --follow). A task's log is its
  // holder's: the fine-tuning's once the group is leased it.
  const std::string finetune = got.job().tasks(1).task_id();
  EXPECT_EQ(ship(group, finetune, {"f zero"}).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(Complete(group, pretrain, Checkpoint(pretrain, "best.pt")).ok());
  ASSERT_EQ(Lease(group).task().task_id(), finetune);
  ASSERT_TRUE(ship(group, finetune, {"f one", "f two"}).ok());
  GetLogsRequest each;
  each.set_job_id(job_id);
  (*each.mutable_after_seq_by_task())[pretrain] = 302;
  (*each.mutable_after_seq_by_task())[finetune] = 1;
  GetLogsResponse both;
  ASSERT_TRUE(jobs_->GetLogs(Ctx().get(), each, &both).ok());
  ASSERT_EQ(both.tasks_size(), 3);
  ASSERT_EQ(both.tasks(0).lines_size(), 2);
  EXPECT_EQ(both.tasks(0).lines(0).seq(), 303);
  ASSERT_EQ(both.tasks(1).lines_size(), 1);
  EXPECT_EQ(both.tasks(1).lines(0).text(), "f two");
  (*each.mutable_after_seq_by_task())[finetune] = -1;
  status = jobs_->GetLogs(Ctx().get(), each, &both);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "after_seq_by_task")) << status.error_message();

  // Each task's log has an id; a restart starts the logs afresh (in memory), numbered from 1
  // again, under a new, larger id: a follower knows to read them from their start.
  const int64_t before = logs(pretrain, 0, 0).tasks(0).log_id();
  EXPECT_GT(before, 0);
  EXPECT_NE(logs(finetune, 0, 0).tasks(0).log_id(), before);
  EXPECT_EQ(logs(got.job().tasks(2).task_id(), 0, 0).tasks(0).log_id(), 0);  // no line yet
  Restart();
  ASSERT_TRUE(ship(group, finetune, {"after the restart"}).ok());
  got = logs(finetune, 0, 0);
  ASSERT_EQ(got.tasks(0).lines_size(), 1);
  EXPECT_EQ(got.tasks(0).lines(0).seq(), 1);
  EXPECT_GT(got.tasks(0).log_id(), before);
  // A task held across the restart and ended since: its last lines (the agent ships them after
  // CompleteTask) are still its group's to ship.
  ASSERT_TRUE(Complete(group, finetune, Checkpoint(finetune, "best.pt")).ok());
  ASSERT_TRUE(ship(group, finetune, {"the result"}).ok());
  // And across a restart between the task's CompleteTask and its last lines: the group holds
  // no task then, and was refused ("neither runs it nor ran it last") for good.
  Restart();
  ASSERT_TRUE(ship(group, finetune, {"the result, after the restart"}).ok());
  got = logs(finetune, 0, 0);
  ASSERT_EQ(got.tasks(0).lines_size(), 1);
  EXPECT_EQ(got.tasks(0).lines(0).attempt(), 1);
  EXPECT_EQ(ship(group, pretrain, {"x"}).error_code(), grpc::StatusCode::FAILED_PRECONDITION);  // not the last
}

TEST_F(CoordinatorServiceTest, ListGroupsShowsEachGroupAndItsTask) {
  auto unix_ms = [] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch()).count();
  };
  // The coordinator converts its steady clock to wall time: allow its millisecond rounding.
  constexpr int64_t kRoundingMs = 2;
  const int64_t started = unix_ms();
  Start();
  const std::string job_id = Submit();
  const std::string busy = Register(2);
  const std::string idle = Register(1);
  const std::string task = Lease(busy).task().task_id();
  bool cancel = false;
  Metrics step;
  step.set_epoch(0);
  step.set_step(3);
  step.set_samples_per_s(42.5);
  ASSERT_TRUE(Report(busy, task, {step}, &cancel).ok());
  // A CUDA group's heartbeat carries rank 0's device memory; out of range is refused by field.
  HeartbeatRequest beat;
  beat.set_group_id(busy);
  beat.set_task_id(task);
  beat.set_gpu_memory_bytes(int64_t{3} << 30);
  HeartbeatResponse beat_response;
  ASSERT_TRUE(workers_->Heartbeat(WorkerCtx().get(), beat, &beat_response).ok());
  beat.set_gpu_memory_bytes(-1);
  const grpc::Status negative = workers_->Heartbeat(WorkerCtx().get(), beat, &beat_response);
  EXPECT_EQ(negative.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(negative.error_message().find("gpu_memory_bytes"), std::string::npos) << negative.error_message();
  // So is a fence timeout below 0 or above a day (a group would keep itself from the reaper).
  beat.set_gpu_memory_bytes(0);
  for (const int64_t fence_ms : {int64_t{-1}, int64_t{24} * 3600 * 1000 + 1}) {
    beat.set_fence_timeout_ms(fence_ms);
    const grpc::Status refused = workers_->Heartbeat(WorkerCtx().get(), beat, &beat_response);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << fence_ms;
    EXPECT_NE(refused.error_message().find("field 'fence_timeout_ms': " + std::to_string(fence_ms)), std::string::npos)
        << refused.error_message();
  }
  beat.set_fence_timeout_ms(0);
  ListGroupsRequest request;
  ListGroupsResponse response;
  ASSERT_TRUE(jobs_->ListGroups(Ctx().get(), request, &response).ok());
  ASSERT_EQ(response.groups_size(), 2);
  const int64_t answered = unix_ms();
  for (const GroupInfo& g : response.groups()) {
    EXPECT_EQ(g.backend(), "mpi");
    ASSERT_EQ(g.hosts_size(), 1);
    EXPECT_EQ(g.hosts(0), "node1");
    // The last heartbeat lies within the test: after it started, before the answer.
    EXPECT_GE(g.last_heartbeat_unix_ms(), started - kRoundingMs);
    EXPECT_LE(g.last_heartbeat_unix_ms(), answered + kRoundingMs);
    // And the answer's own clock after it (a client's age of a heartbeat is their difference).
    EXPECT_GE(response.answered_unix_ms(), g.last_heartbeat_unix_ms());
    EXPECT_LE(response.answered_unix_ms(), answered + kRoundingMs);
    EXPECT_GT(g.registered_unix_ms(), 0);
    if (g.group_id() == busy) {
      EXPECT_EQ(g.world_size(), 2);
      EXPECT_EQ(g.task_id(), task);
      EXPECT_EQ(g.job_id(), job_id);
      EXPECT_EQ(g.stage(), "pretrain");
      EXPECT_DOUBLE_EQ(g.latest().samples_per_s(), 42.5);
      EXPECT_EQ(g.gpu_memory_bytes(), int64_t{3} << 30);
    } else {
      EXPECT_EQ(g.group_id(), idle);
      EXPECT_EQ(g.task_id(), "");
    }
  }
  // Workers may not list groups.
  EXPECT_EQ(jobs_->ListGroups(WorkerCtx().get(), request, &response).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
}

// Writes `tensors` as a safetensors file of zeros (the shapes are what the check reads).
void WriteSafetensors(const std::string& path, const common::TensorIndex& tensors) {
  std::string header = "{";
  uint64_t offset = 0;
  for (const common::TensorEntry& t : tensors) {
    uint64_t n = t.dtype == "I64" ? 8 : 4;
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
    absl::StrAppend(&header, header.size() > 1 ? "," : "", "\"", t.name, "\":{\"dtype\":\"", t.dtype,
                    "\",\"shape\":", common::ShapeText(t.shape), ",\"data_offsets\":[", offset, ",", offset + n,
                    "]}");
    offset += n;
  }
  header += "}";
  std::string bytes(8, '\0');
  const uint64_t len = header.size();
  std::memcpy(bytes.data(), &len, 8);
  bytes += header;
  bytes.append(offset, '\0');
  ASSERT_TRUE(common::WriteFileAtomically(path, bytes).ok());
}

// model.pretrained_weights is checked against the model's backbone at submit when the
// coordinator can read it: another variant's file or no weights file at all is refused before any
// task exists, naming the key, the path and the model; a fitting file (also with a stem for
// another channel count and the ImageNet classifier) is accepted, and so is a path the
// coordinator cannot open (the trainer checks it).
TEST_F(CoordinatorServiceTest, SubmitRefusesPretrainedWeightsThatDoNotFitTheModel) {
  auto b0 = common::BackboneShapes("efficientnet_b0", 3);
  auto b3 = common::BackboneShapes("efficientnet_b3", 3);
  ASSERT_TRUE(b0.ok() && b3.ok());
  common::TensorIndex imagenet = *b0;
  imagenet.push_back({"classifier.1.weight", "F32", {1000, 1280}});
  imagenet.push_back({"classifier.1.bias", "F32", {1000}});
  fs::create_directories(root_ + "/weights");
  ASSERT_NO_FATAL_FAILURE(WriteSafetensors(root_ + "/weights/b0.safetensors", imagenet));
  ASSERT_NO_FATAL_FAILURE(WriteSafetensors(root_ + "/weights/b3.safetensors", *b3));
  common::TensorIndex partial(b0->begin(), b0->end() - 40);
  size_t partial_missing = 0;  // BatchNorm's num_batches_tracked may be absent (as for PyTorch)
  for (auto it = b0->end() - 40; it != b0->end(); ++it) partial_missing += !common::OptionalStateTensor(it->name);
  ASSERT_LT(partial_missing, 40u);
  ASSERT_NO_FATAL_FAILURE(WriteSafetensors(root_ + "/weights/partial.safetensors", partial));
  Start();
  const std::vector<std::string> b0_model{"model.name=efficientnet_b0", "model.pretrain=imagenet",
                                         "frontend.in_channels=1"};
  struct Case {
    std::string file;
    std::string expect;
  };
  const std::vector<Case> refused{
      {"weights/b3.safetensors", "mismatched: features.0.0.weight: file [40, 3, 3, 3] vs model [32, 1, 3, 3]"},
      {"weights/partial.safetensors", std::to_string(partial_missing) + " missing: "},
      {"t24/train_metadata.csv", "not a torch.save zip archive"},
  };
  for (const Case& c : refused) {
    std::vector<std::string> overrides = b0_model;
    overrides.push_back("model.pretrained_weights=" + c.file);
    const grpc::Status status = SubmitStatus(jobs_.get(), kPipeline, root_, overrides, Ctx());
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.file;
    const std::string& message = status.error_message();
    EXPECT_NE(message.find("key 'model.pretrained_weights'"), std::string::npos) << message;
    EXPECT_NE(message.find(root_ + "/" + c.file), std::string::npos) << message;
    EXPECT_NE(message.find(c.expect), std::string::npos) << message;
    if (c.file != "t24/train_metadata.csv") {
      EXPECT_NE(message.find("does not fit model efficientnet_b0 (frontend.in_channels 1)"), std::string::npos)
          << message;
    }
  }
  EXPECT_EQ(CountRows("SELECT COUNT(*) FROM tasks"), 0);
  EXPECT_EQ(CountRows("SELECT COUNT(*) FROM jobs"), 0);
  // Fits: B0's backbone for a one-channel front end, for B3 its own file; not checkable here.
  std::vector<std::string> ok = b0_model;
  ok.push_back("model.pretrained_weights=weights/b0.safetensors");
  EXPECT_EQ(Submit(ok).size(), 13u);
  EXPECT_EQ(Submit({"model.name=efficientnet_b3", "model.pretrain=imagenet", "frontend.in_channels=3",
                    "model.pretrained_weights=weights/b3.safetensors"})
                .size(),
            13u);
  ok.back() = "model.pretrained_weights=weights/only-on-the-workers.pt";
  EXPECT_EQ(Submit(ok).size(), 13u);
  EXPECT_EQ(CountRows("SELECT COUNT(*) FROM jobs"), 3);
}

// A lease whose group row is damaged (skipped at the restart) is put back, but not leased to
// another group before that group's fence runs out: it may still be training the task and
// writing its run folder (it was leased at once: two writers of one folder).
TEST_F(CoordinatorServiceTest, ALeaseWhoseGroupRowIsDamagedWaitsOutTheFenceAfterARestart) {
  config_.heartbeat_timeout_s = 2 * kReapAfterS;  // the fence: room for the first lease below
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string a = Register();
  ASSERT_TRUE(Lease(a).available());
  ASSERT_TRUE(coordinator_->Shutdown().ok());
  coordinator_.reset();
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(config_.database.c_str(), &db), SQLITE_OK);
    char* err = nullptr;
    ASSERT_EQ(sqlite3_exec(db, "UPDATE groups SET info=x'ff'", nullptr, nullptr, &err), SQLITE_OK) << err;
    sqlite3_close(db);
  }
  Start();
  const std::string b = Register();
  EXPECT_FALSE(Lease(b).available()) << "leased at once, while group " << a << " may still write its run folder";
  EXPECT_EQ(GetJob(job_id).tasks(0).state(), TASK_STATE_READY);
  // Once the fence has run out it is leased (group b heartbeats meanwhile, as an agent does).
  LeaseTaskResponse after;
  ASSERT_TRUE(Eventually([&] {
    bool cancel = false;
    EXPECT_TRUE(Heartbeat(b, "", &cancel).ok());
    LeaseTaskRequest request;
    request.set_group_id(b);
    after.Clear();
    return workers_->LeaseTask(WorkerCtx().get(), request, &after).ok() && after.available();
  }));
  EXPECT_EQ(after.task().attempt(), 2);
}

// A refused CompleteTask quotes where the checkpoint's link resolves to: a name that is not UTF-8
// made the task's and the job's error a string no client could parse (ListJobs and GetJob of the
// job failed for good, watchers' streams too). It is stored as valid UTF-8.
TEST_F(CoordinatorServiceTest, ARefusalThatQuotesANonUtf8PathLeavesTheJobReadable) {
  config_.max_restarts = 0;
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  const std::string out_dir = Lease(a).task().out_dir();
  Write("outside/\xff\xfe.pt", "checkpoint");
  fs::create_directories(out_dir);
  fs::create_symlink(root_ + "/outside/\xff\xfe.pt", out_dir + "/best.pt");
  EXPECT_FALSE(Complete(a, pretrain, out_dir + "/best.pt").ok());
  const JobInfo job = GetJob(job_id);  // parses
  EXPECT_EQ(job.state(), JOB_STATE_FAILED);
  EXPECT_NE(job.error().find("outside the task's run folder"), std::string::npos) << job.error();
  EXPECT_EQ(common::FirstInvalidUtf8(job.error()), std::string::npos);
  ListJobsRequest list_request;
  ListJobsResponse list;
  EXPECT_TRUE(jobs_->ListJobs(Ctx().get(), list_request, &list).ok());
}

// Registration strings are one line each: they are logged and listed (a newline in a host name
// forged a coordinator log line).
TEST_F(CoordinatorServiceTest, RegistrationStringsAreOneLineEach) {
  Start();
  for (const auto& [field, set] :
       std::vector<std::pair<std::string, std::function<void(RegisterGroupRequest*)>>>{
           {"hosts[0]", [](RegisterGroupRequest* r) { r->add_hosts("h\n[coordinator] group g lost"); }},
           {"devices[0]", [](RegisterGroupRequest* r) { r->add_devices("cuda:0\x1b[2J"); }},
           {"backend", [](RegisterGroupRequest* r) { r->set_backend("mpi\r"); }},
           {"version", [](RegisterGroupRequest* r) { r->set_version("1\n2"); }}}) {
    RegisterGroupRequest request;
    request.set_world_size(2);
    set(&request);
    RegisterGroupResponse response;
    const grpc::Status status = workers_->RegisterGroup(WorkerCtx().get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << field;
    EXPECT_NE(status.error_message().find("field '" + field + "': control character"), std::string::npos)
        << status.error_message();
  }
  // A device name with spaces is fine.
  RegisterGroupRequest request;
  request.set_world_size(1);
  request.add_devices("NVIDIA H100 80GB HBM3");
  RegisterGroupResponse response;
  EXPECT_TRUE(workers_->RegisterGroup(WorkerCtx().get(), request, &response).ok());
}

// A report of thousands of one epoch's ends (a resumed run's repeats) is one event, not one job
// snapshot per point for every watcher.
TEST_F(CoordinatorServiceTest, RepeatedEpochEndsInOneReportAreOneEvent) {
  Start();
  const std::string job_id = Submit({"stages.finetune.enabled=false"});
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_TRUE(Lease(a).available());
  grpc::ClientContext watch_context;
  watch_context.AddMetadata("authorization", "Bearer the-token");
  WatchJobRequest watch_request;
  watch_request.set_job_id(job_id);
  auto stream = jobs_->WatchJob(&watch_context, watch_request);
  JobEvent event;
  ASSERT_TRUE(stream->Read(&event));  // the snapshot
  bool cancel = false;
  // The repeats alone, and between ordinary points of the epoch.
  std::vector<Metrics> points(1000, EpochEnd(0, 0.5));
  for (int i = 0; i < 500; ++i) {
    Metrics step = EpochEnd(0, 0.5);
    step.set_epoch_end(false);
    points.push_back(step);
    points.push_back(EpochEnd(0, 0.5));
  }
  ASSERT_TRUE(Report(a, pretrain, points, &cancel).ok());
  ASSERT_TRUE(Report(a, pretrain, {EpochEnd(1, 0.6)}, &cancel).ok());
  int epoch_events = 0;
  while (stream->Read(&event)) {
    if (event.message().find("epoch ") != std::string::npos) ++epoch_events;
    if (event.message().find("epoch 2 of") != std::string::npos) break;
  }
  EXPECT_EQ(epoch_events, 2);
  watch_context.TryCancel();
}

// A stored manifest that does not inflate (DATA_LOSS) fails the leased task, naming it, instead of
// handing the same task and error to every retried LeaseTask for ever; the job fails as with any
// failed task.
TEST_F(CoordinatorServiceTest, ALeaseWhosePayloadCannotBeLoadedFailsTheTask) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  ASSERT_TRUE(coordinator_->Shutdown().ok());
  coordinator_.reset();
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(config_.database.c_str(), &db), SQLITE_OK);
    // The compressed-manifest header (AVZ1, 10 bytes claimed), then no valid zlib stream.
    const std::string sql =
        "UPDATE tasks SET manifest_csv=x'41565a310a000000000000007801' WHERE task_id='" + pretrain + "'";
    char* err = nullptr;
    ASSERT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err), SQLITE_OK) << err;
    sqlite3_close(db);
  }
  Start();
  const std::string a = Register();
  LeaseTaskRequest request;
  request.set_group_id(a);
  LeaseTaskResponse response;
  grpc::Status status = workers_->LeaseTask(WorkerCtx().get(), request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DATA_LOSS) << status.error_message();
  EXPECT_NE(status.error_message().find(pretrain), std::string::npos) << status.error_message();
  EXPECT_NE(status.error_message().find("does not inflate"), std::string::npos) << status.error_message();
  // The retried lease has nothing to do: the task failed, and its job with it.
  status = workers_->LeaseTask(WorkerCtx().get(), request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_FALSE(response.available());
  JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.state(), JOB_STATE_FAILED);
  const TaskInfo* task = FindTask(job, pretrain);
  ASSERT_NE(task, nullptr);
  EXPECT_EQ(task->state(), TASK_STATE_FAILED);
  EXPECT_EQ(task->group_id(), "");
  EXPECT_NE(task->error().find(pretrain), std::string::npos) << task->error();
  EXPECT_NE(task->error().find("does not inflate"), std::string::npos) << task->error();
  EXPECT_NE(job.error().find(pretrain), std::string::npos) << job.error();
  for (const TaskInfo& other : job.tasks()) {
    if (other.task_id() != pretrain) {
      EXPECT_EQ(other.state(), TASK_STATE_CANCELLED) << other.task_id();
    }
  }
  bool cancel = false;
  ASSERT_TRUE(Heartbeat(a, "", &cancel).ok());  // the group is still registered
}

// The same for a manifest that does not inflate when GetManifest streams it.
TEST_F(CoordinatorServiceTest, AManifestThatCannotBeLoadedFailsTheTaskThatFetchesIt) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  ASSERT_TRUE(coordinator_->Shutdown().ok());
  coordinator_.reset();
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(config_.database.c_str(), &db), SQLITE_OK);
    const std::string sql = "UPDATE manifests SET data=x'41565a310a000000000000007801'";
    char* err = nullptr;
    ASSERT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err), SQLITE_OK) << err;
    sqlite3_close(db);
  }
  Start();
  const std::string a = Register();
  LeaseTaskResponse lease = Lease(a);
  ASSERT_EQ(lease.task().task_id(), pretrain);
  std::string bytes;
  grpc::Status status = FetchManifest(a, lease.task().manifest_hash(), &bytes);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DATA_LOSS) << status.error_message();
  EXPECT_NE(status.error_message().find(pretrain), std::string::npos) << status.error_message();
  EXPECT_FALSE(Lease(a).available());
  JobInfo job = GetJob(job_id);
  EXPECT_EQ(job.state(), JOB_STATE_FAILED);
  const TaskInfo* task = FindTask(job, pretrain);
  ASSERT_NE(task, nullptr);
  EXPECT_EQ(task->state(), TASK_STATE_FAILED);
  EXPECT_NE(task->error().find(pretrain), std::string::npos) << task->error();
  EXPECT_NE(task->error().find("does not inflate"), std::string::npos) << task->error();
}

// A cancelled job retried at once: its task is READY again, but another group cannot lease it
// while the previous holder has not learnt of the cancel (never two writers of one run folder).
TEST_F(CoordinatorServiceTest, ARetriedTaskWaitsUntilItsCancelledHolderLetsGo) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_EQ(Lease(a).task().task_id(), pretrain);
  bool cancel = false;
  ASSERT_TRUE(Heartbeat(a, pretrain, &cancel).ok());
  ASSERT_FALSE(cancel);
  const JobInfo retried = CancelAndRetry(job_id);
  EXPECT_EQ(FindTask(retried, pretrain)->state(), TASK_STATE_READY);
  const std::string b = Register();
  EXPECT_FALSE(Lease(b).available());  // A is still training it, as far as anyone knows
  Restart();  // the fence is durable
  EXPECT_FALSE(Lease(b).available());
  // A's next heartbeat tells it to stop; until A says it runs no task (the answer may be lost on
  // its way), the task waits.
  ASSERT_TRUE(Heartbeat(a, pretrain, &cancel).ok());
  EXPECT_TRUE(cancel);
  EXPECT_FALSE(Lease(b).available());
  ASSERT_TRUE(Heartbeat(a, "", &cancel).ok());  // stopped: it lets go
  EXPECT_FALSE(cancel);
  LeaseTaskResponse lease = Lease(b);
  ASSERT_TRUE(lease.available());
  EXPECT_EQ(lease.task().task_id(), pretrain);
  EXPECT_EQ(lease.task().attempt(), 2);
}

// The holder itself may lease its retried task again (it has let go: it asks for work), and a
// holder that reports FailTask for the cancelled task lets go too.
TEST_F(CoordinatorServiceTest, ACancelledHolderLetsGoByLeasingOrFailing) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_EQ(Lease(a).task().task_id(), pretrain);
  CancelAndRetry(job_id);
  LeaseTaskResponse lease = Lease(a);
  ASSERT_TRUE(lease.available());
  EXPECT_EQ(lease.task().task_id(), pretrain);
  EXPECT_EQ(lease.task().attempt(), 2);

  CancelAndRetry(job_id);
  const std::string b = Register();
  EXPECT_FALSE(Lease(b).available());
  FailTaskRequest fail;
  fail.set_group_id(a);
  fail.set_task_id(pretrain);
  fail.set_error("stopped");
  FailTaskResponse failed;
  EXPECT_EQ(workers_->FailTask(WorkerCtx().get(), fail, &failed).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  lease = Lease(b);
  ASSERT_TRUE(lease.available());
  EXPECT_EQ(lease.task().task_id(), pretrain);
}

// A heartbeat without a task, sent after a cancel and answered only after the group leased the
// task again and that lease was cancelled too, lets go of the first lease only: the group may be
// training the second, and nobody else leases the task until its next heartbeat says it stopped.
TEST_F(CoordinatorServiceTest, ALateHeartbeatDoesNotLetGoOfALaterLease) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_EQ(Lease(a).task().attempt(), 1);
  CancelAndRetry(job_id);
  // Between the heartbeat's read of the cancelled lease 1 and its write: A leases attempt 2,
  // which is cancelled and retried.
  int hooked = 0;
  coordinator_->scheduler()->SetLetGoHookForTest([&] {
    if (hooked++ > 0) return;
    LeaseTaskResponse lease = Lease(a);
    EXPECT_EQ(lease.task().task_id(), pretrain);
    EXPECT_EQ(lease.task().attempt(), 2);
    CancelAndRetry(job_id);
  });
  bool cancel = true;
  ASSERT_TRUE(Heartbeat(a, "", &cancel).ok());
  EXPECT_FALSE(cancel);
  ASSERT_EQ(hooked, 1);
  const std::string b = Register();
  EXPECT_FALSE(Lease(b).available());  // A may be training attempt 2
  ASSERT_TRUE(Heartbeat(a, "", &cancel).ok());  // now it says so: it lets go
  LeaseTaskResponse lease = Lease(b);
  ASSERT_TRUE(lease.available());
  EXPECT_EQ(lease.task().task_id(), pretrain);
  EXPECT_EQ(lease.task().attempt(), 3);
  coordinator_->scheduler()->SetLetGoHookForTest(nullptr);
}

// A report refused for its points (a negative lr) from a group that no longer holds the task is
// answered cancel_task, as any report of a task it lost (it was INVALID_ARGUMENT, and the group
// learnt of the cancel at its next heartbeat); from the holder it is refused naming the field.
TEST_F(CoordinatorServiceTest, AMalformedReportFromALostHolderIsToldToStop) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_EQ(Lease(a).task().task_id(), pretrain);
  Metrics bad = EpochEnd(0, 0.5);
  bad.set_lr(-1);
  bool cancel = false;
  grpc::Status status = Report(a, pretrain, {bad}, &cancel);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("points[0].lr"), std::string::npos) << status.error_message();
  CancelAndRetry(job_id);
  status = Report(a, pretrain, {bad}, &cancel);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(cancel);
}

// After an outage longer than the heartbeat timeout the group abandoned its task; the restarted
// coordinator hands the same task and attempt back, and the resumed run's reports (steps from
// the checkpoint, the restored epochs sent again) are accepted; a re-sent epoch is not stored twice.
TEST_F(CoordinatorServiceTest, AHeldTaskLeasedAgainRestartsItsPointOrdering) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_EQ(Lease(a).task().attempt(), 1);
  Metrics step = EpochEnd(1, 0.5);
  step.set_epoch_end(false);
  step.set_step(15);
  bool cancel = false;
  ASSERT_TRUE(Report(a, pretrain, {EpochEnd(0, 0.5), step}, &cancel).ok());
  Restart();
  LeaseTaskResponse again = Lease(a);
  ASSERT_EQ(again.task().task_id(), pretrain);
  EXPECT_EQ(again.task().attempt(), 1);
  // Resumed from last.pt written after epoch 0 (step 10): epoch 0 sent again, then epoch 1 from step 11.
  step.set_step(11);
  Metrics end = EpochEnd(1, 0.6);
  end.set_step(20);
  grpc::Status status = Report(a, pretrain, {EpochEnd(0, 0.55), step, end}, &cancel);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_FALSE(cancel);
  GetHistoryRequest history_request;
  history_request.set_job_id(job_id);
  GetHistoryResponse history;
  ASSERT_TRUE(jobs_->GetHistory(Ctx().get(), history_request, &history).ok());
  ASSERT_EQ(history.rows_size(), 2);
  EXPECT_EQ(history.rows(0).metrics().epoch(), 0);
  EXPECT_DOUBLE_EQ(history.rows(0).metrics().val_auc(), 0.55);
  EXPECT_EQ(history.rows(1).metrics().epoch(), 1);
  EXPECT_EQ(history.rows(1).metrics().step(), 20);
  EXPECT_EQ(CountRows("SELECT count(*) FROM metric_points WHERE task_id=?1 AND epoch_end=1 AND epoch=0", pretrain), 1);
  // Within the resumed run the ordering holds again.
  step.set_step(12);
  EXPECT_EQ(Report(a, pretrain, {step}, &cancel).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

// The held task's ordering starts afresh in the store too: a coordinator restarted after the
// group asked again, before its first report, restored the ordering from the old points and
// refused the resumed run's (steps behind them) as "steps never go back".
TEST_F(CoordinatorServiceTest, AHeldTaskLeasedAgainKeepsItsFreshOrderingOverARestart) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_EQ(Lease(a).task().attempt(), 1);
  Metrics step = EpochEnd(1, 0.5);
  step.set_epoch_end(false);
  step.set_step(15);
  bool cancel = false;
  ASSERT_TRUE(Report(a, pretrain, {EpochEnd(0, 0.5), step}, &cancel).ok());
  LeaseTaskResponse again = Lease(a);  // dropped it (its fence ran out), asks again
  ASSERT_EQ(again.task().task_id(), pretrain);
  EXPECT_EQ(again.task().attempt(), 1);
  Restart();
  step.set_step(11);  // resumed from last.pt after epoch 0 (step 10)
  grpc::Status status = Report(a, pretrain, {step}, &cancel);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_FALSE(cancel);
  step.set_step(10);  // within the resumed run the ordering holds again, also after the restart
  EXPECT_EQ(Report(a, pretrain, {step}, &cancel).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

// A task deleted under its holder: the holder is told to stop (ReportProgress), or refused with
// FAILED_PRECONDITION naming the task; never NOT_FOUND, which tells a group it is not registered.
TEST_F(CoordinatorServiceTest, ADeletedTaskIsNotNotFoundForItsHolder) {
  Start();
  const std::string job_id = Submit();
  const std::string pretrain = job_id + "/pretrain-f0";
  const std::string a = Register();
  ASSERT_EQ(Lease(a).task().task_id(), pretrain);
  const std::string last = Checkpoint(pretrain, "last.pt");
  CancelJobRequest cancel;
  cancel.set_job_id(job_id);
  CancelJobResponse cancelled;
  ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
  DeleteJobRequest del;
  del.set_job_id(job_id);
  DeleteJobResponse deleted;
  ASSERT_TRUE(jobs_->DeleteJob(Ctx().get(), del, &deleted).ok());
  bool cancel_task = false;
  Metrics m = EpochEnd(0, 0.5);
  m.set_epoch_end(false);
  grpc::Status status = Report(a, pretrain, {m}, &cancel_task);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(cancel_task);
  auto refused = [&](const grpc::Status& s, const std::string& rpc) {
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << rpc << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(pretrain), std::string::npos) << rpc << ": " << s.error_message();
  };
  FailTaskRequest fail;
  fail.set_group_id(a);
  fail.set_task_id(pretrain);
  fail.set_error("x");
  FailTaskResponse failed;
  refused(workers_->FailTask(WorkerCtx().get(), fail, &failed), "FailTask");
  refused(Complete(a, pretrain, last), "CompleteTask");
  ReportCheckpointRequest checkpoint;
  checkpoint.set_group_id(a);
  checkpoint.set_task_id(pretrain);
  checkpoint.set_path(last);
  ReportCheckpointResponse checkpoint_response;
  refused(workers_->ReportCheckpoint(WorkerCtx().get(), checkpoint, &checkpoint_response), "ReportCheckpoint");
  ShipLogsRequest ship;
  ship.set_group_id(a);
  ship.set_task_id(pretrain);
  ship.add_lines()->set_text("x");
  ShipLogsResponse shipped;
  refused(workers_->ShipLogs(WorkerCtx().get(), ship, &shipped), "ShipLogs");
  ASSERT_TRUE(Heartbeat(a, pretrain, &cancel_task).ok());
  EXPECT_TRUE(cancel_task);
}

}  // namespace
}  // namespace aviary::coordinator
