// The `aviary-coordinator` binary as a process: exit codes, SIGTERM, SIGHUP (token reload), and
// `kill -9` in the middle of a stream of acknowledged reports, then a restart on the same SQLite
// file; the fold cache's dataset versions across restarts.
#include <fcntl.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/csv.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "common/files.h"
#include "proto/aviary.grpc.pb.h"
#include "tests/coordinator/tiny_dataset.h"

namespace aviary::coordinator {
namespace {

namespace fs = std::filesystem;
using namespace aviary::v1;  // NOLINT: test brevity

bool Eventually(const std::function<bool()>& condition) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return condition();
}

class CoordinatorProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = absl::StrCat("/tmp/aviary_coordproc_", ::getpid(), "_XXXXXX");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    WriteTinyDataset(root_);
    std::ofstream(root_ + "/token") << "proc-token\n";
    std::ofstream(root_ + "/worker.token") << "proc-worker-token\n";
  }
  void TearDown() override {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    fs::remove_all(root_);
  }

  // BaseArgs() with `flag` set to `value`.
  std::vector<std::string> ArgsWith(const std::string& flag, const std::string& value) {
    std::vector<std::string> args = BaseArgs();
    for (size_t i = 0; i + 1 < args.size(); ++i) {
      if (args[i] == flag) {
        args[i + 1] = value;
        return args;
      }
    }
    args.insert(args.end(), {flag, value});
    return args;
  }

  std::vector<std::string> BaseArgs() {
    return {"--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--port-file",
            root_ + "/port", "--database", root_ + "/aviary.db", "--work-dir", root_ + "/runs",
            "--token-file", root_ + "/token", "--worker-token-file", root_ + "/worker.token",
            "--heartbeat-timeout-s", "30", "--log-level", "debug", "--set", "data_roots=" + root_};
  }

  // Starts the binary with `args`, stderr to `log`; with `file_size_limit`, under that
  // RLIMIT_FSIZE and SIGXFSZ ignored (a write past it fails with EFBIG: a full disk, nearly).
  pid_t Spawn(const std::vector<std::string>& args, const std::string& log, rlim_t file_size_limit = 0) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      if (file_size_limit > 0) {
        struct rlimit limit;
        limit.rlim_cur = limit.rlim_max = file_size_limit;
        if (std::signal(SIGXFSZ, SIG_IGN) == SIG_ERR || ::setrlimit(RLIMIT_FSIZE, &limit) != 0) ::_exit(126);
      }
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        ::dup2(fd, 2);
        ::dup2(fd, 1);
      }
      std::vector<char*> argv;
      std::string binary = AVIARY_COORDINATOR_BINARY;
      argv.push_back(binary.data());
      std::vector<std::string> copy = args;
      for (std::string& arg : copy) argv.push_back(arg.data());
      argv.push_back(nullptr);
      ::execv(binary.c_str(), argv.data());
      ::_exit(127);
    }
    return pid;
  }

  // Runs the binary to completion; its exit code.
  int RunToExit(const std::vector<std::string>& args, const std::string& log) {
    const pid_t pid = Spawn(args, log);
    int status = 0;
    ::waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  std::string Read(const std::string& path) {
    auto text = common::ReadFileToString(path);
    return text.ok() ? *text : "";
  }

  // Starts the coordinator and connects once its port file appears.
  void StartAndConnect(const std::string& log = "coordinator.log") {
    fs::remove(root_ + "/port");
    pid_ = Spawn(BaseArgs(), root_ + "/" + log);
    ASSERT_GT(pid_, 0);
    int port = 0;
    ASSERT_TRUE(Eventually([&] {
      return absl::SimpleAtoi(absl::StripAsciiWhitespace(Read(root_ + "/port")), &port) && port > 0;
    })) << Read(root_ + "/" + log);
    auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
    jobs_ = JobService::NewStub(channel);
    workers_ = WorkerService::NewStub(channel);
  }

  std::unique_ptr<grpc::ClientContext> Ctx(const std::string& token = "proc-token") {
    auto context = std::make_unique<grpc::ClientContext>();
    context->AddMetadata("authorization", "Bearer " + token);
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return context;
  }

  // Registers a one-rank group (its id in `*group_id`) and leases a task for it.
  LeaseTaskResponse RegisterAndLease(std::string* group_id = nullptr) {
    RegisterGroupRequest register_request;
    register_request.set_world_size(1);
    RegisterGroupResponse group;
    EXPECT_TRUE(workers_->RegisterGroup(Ctx("proc-worker-token").get(), register_request, &group).ok());
    if (group_id != nullptr) *group_id = group.group_id();
    LeaseTaskRequest lease_request;
    lease_request.set_group_id(group.group_id());
    LeaseTaskResponse lease;
    EXPECT_TRUE(workers_->LeaseTask(Ctx("proc-worker-token").get(), lease_request, &lease).ok());
    return lease;
  }

  std::string root_;
  pid_t pid_ = -1;
  std::unique_ptr<JobService::Stub> jobs_;
  std::unique_ptr<WorkerService::Stub> workers_;
};

TEST_F(CoordinatorProcessTest, ConfigErrorsExitWithTwoBeforeListening) {
  std::vector<std::string> args = BaseArgs();
  args.insert(args.end(), {"--set", "bogus_key=1"});
  EXPECT_EQ(RunToExit(args, root_ + "/a.log"), 2);
  EXPECT_NE(Read(root_ + "/a.log").find("unknown key 'bogus_key'"), std::string::npos)
      << Read(root_ + "/a.log");
  EXPECT_FALSE(fs::exists(root_ + "/port"));

  std::ofstream(root_ + "/c.yaml") << "token_file: token\nmax_restarts: [1]\n";
  EXPECT_EQ(RunToExit({"--config", root_ + "/c.yaml"}, root_ + "/b.log"), 2);
  EXPECT_NE(Read(root_ + "/b.log").find(root_ + "/c.yaml:2: key 'max_restarts'"), std::string::npos)
      << Read(root_ + "/b.log");

  args = ArgsWith("--token-file", root_ + "/missing-token");
  EXPECT_EQ(RunToExit(args, root_ + "/c.log"), 2);
  EXPECT_NE(Read(root_ + "/c.log").find("missing-token"), std::string::npos) << Read(root_ + "/c.log");

  // A file of another program (not SQLite at all) is the user's to fix, as a SQLite file that is
  // not aviary's: exit 2 (it was 1, which systemd restarts every few seconds for ever), unchanged.
  const std::string other = "not sqlite at all, just text that is long enough to matter";
  std::ofstream(root_ + "/other.db") << other;
  args = ArgsWith("--database", root_ + "/other.db");
  EXPECT_EQ(RunToExit(args, root_ + "/d.log"), 2);
  EXPECT_NE(Read(root_ + "/d.log").find(root_ + "/other.db"), std::string::npos) << Read(root_ + "/d.log");
  EXPECT_NE(Read(root_ + "/d.log").find("not an SQLite file"), std::string::npos) << Read(root_ + "/d.log");
  EXPECT_EQ(Read(root_ + "/other.db"), other);
}

// A COMMIT that fails in its I/O leaves the database unable to take writes until a restart reads
// it back: every write RPC failed from then on while the process lived on, heartbeats kept the
// groups and their tasks, and nothing restarted it. It exits 1 now (systemd restarts it), saying why.
TEST_F(CoordinatorProcessTest, ADatabaseThatCanTakeNoMoreWritesEndsTheProcessWithExitOne) {
  StartAndConnect("first.log");
  ASSERT_EQ(::kill(pid_, SIGTERM), 0);
  ASSERT_EQ(::waitpid(pid_, nullptr, 0), pid_);
  pid_ = -1;
  std::error_code ec;
  const uintmax_t size = fs::file_size(root_ + "/aviary.db", ec);
  ASSERT_FALSE(ec) << ec.message();
  // Each file may grow to the database's size and some 80 KB more (RLIMIT_FSIZE is per file):
  // the write-ahead log fills that within a few submits; the log file stays far below it.
  fs::remove(root_ + "/port");
  pid_ = Spawn(ArgsWith("--log-level", "info"), root_ + "/second.log", size + 48 * 1024 + 32 * 1024);
  int port = 0;
  ASSERT_TRUE(Eventually([&] {
    return absl::SimpleAtoi(absl::StripAsciiWhitespace(Read(root_ + "/port")), &port) && port > 0;
  })) << Read(root_ + "/second.log");
  jobs_ = JobService::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::Status refused;
  for (int i = 0; i < 200 && refused.ok(); ++i) {
    SubmitJobRequest request;
    request.set_pipeline_yaml(kPipeline);
    request.set_source_path("pipe.yaml");
    request.set_working_dir(root_);
    request.set_note(std::string(3000, 'n'));  // a page or so of its own
    SubmitJobResponse response;
    refused = jobs_->SubmitJob(Ctx().get(), request, &response);
  }
  ASSERT_FALSE(refused.ok()) << "every submit was stored";
  EXPECT_NE(refused.error_message().find("a COMMIT failed with an I/O error"), std::string::npos)
      << refused.error_message();
  int status = 0;
  ASSERT_TRUE(Eventually([&] { return ::waitpid(pid_, &status, WNOHANG) == pid_; }))
      << "still running: " << Read(root_ + "/second.log");
  pid_ = -1;
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 1);
  const std::string log = Read(root_ + "/second.log");
  EXPECT_NE(log.find("[error] [coordinator] database " + root_ + "/aviary.db: a COMMIT failed with an I/O error"),
            std::string::npos) << log;
  EXPECT_NE(log.find("shutting down: exit 1"), std::string::npos) << log;
}

TEST_F(CoordinatorProcessTest, SigtermShutsDownCleanly) {
  StartAndConnect();
  ListJobsRequest request;
  ListJobsResponse response;
  ASSERT_TRUE(jobs_->ListJobs(Ctx().get(), request, &response).ok());
  // The client's channel stays open: shutdown waits at most its grace period for it.
  ASSERT_EQ(::kill(pid_, SIGTERM), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(pid_, &status, 0), pid_);
  pid_ = -1;
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  const std::string log = Read(root_ + "/coordinator.log");
  EXPECT_NE(log.find("listening on 127.0.0.1:"), std::string::npos) << log;
  EXPECT_NE(log.find("(gRPC), metrics on 127.0.0.1:"), std::string::npos) << log;
}

// Token rotation without a restart: SIGHUP re-reads the token files; a file that does not load
// keeps the tokens in force.
TEST_F(CoordinatorProcessTest, SighupReloadsTheTokenFiles) {
  std::ofstream(root_ + "/token") << "# clients\nold-token\n";
  StartAndConnect();
  auto list = [&](const std::string& token) {
    ListJobsRequest request;
    ListJobsResponse response;
    return jobs_->ListJobs(Ctx(token).get(), request, &response).error_code();
  };
  // How often the log says `text` so far.
  auto logged = [&](const std::string& text) {
    const std::string log = Read(root_ + "/coordinator.log");
    int count = 0;
    for (size_t at = log.find(text); at != std::string::npos; at = log.find(text, at + 1)) ++count;
    return count;
  };
  ASSERT_EQ(list("old-token"), grpc::StatusCode::OK);
  ASSERT_EQ(list("new-token"), grpc::StatusCode::UNAUTHENTICATED);

  // Rotation, step 1: both tokens valid.
  std::ofstream(root_ + "/token") << "new-token\n\nold-token\n";
  ASSERT_EQ(::kill(pid_, SIGHUP), 0);
  ASSERT_TRUE(Eventually([&] { return logged("tokens reloaded: 2 client, 0 viewer, 1 worker") == 1; }))
      << Read(root_ + "/coordinator.log");
  EXPECT_EQ(list("old-token"), grpc::StatusCode::OK);
  EXPECT_EQ(list("new-token"), grpc::StatusCode::OK);

  // Step 2: the old one removed.
  std::ofstream(root_ + "/token") << "new-token\n";
  ASSERT_EQ(::kill(pid_, SIGHUP), 0);
  ASSERT_TRUE(Eventually([&] { return logged("tokens reloaded: 1 client, 0 viewer, 1 worker") == 1; }))
      << Read(root_ + "/coordinator.log");
  EXPECT_EQ(list("old-token"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(list("new-token"), grpc::StatusCode::OK);

  // The role's last token removed (a leaked one revoked): no client gets in, and tokens stay on
  // (an empty file is never "no authentication"); then a new one.
  std::ofstream(root_ + "/token") << "# revoked 2026-12-06\n";
  ASSERT_EQ(::kill(pid_, SIGHUP), 0);
  ASSERT_TRUE(Eventually([&] { return logged("tokens reloaded: 0 client, 0 viewer, 1 worker") == 1; }))
      << Read(root_ + "/coordinator.log");
  EXPECT_EQ(list("new-token"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(list(""), grpc::StatusCode::UNAUTHENTICATED);
  std::ofstream(root_ + "/token") << "new-token\n";
  ASSERT_EQ(::kill(pid_, SIGHUP), 0);
  ASSERT_TRUE(Eventually([&] { return logged("tokens reloaded: 1 client, 0 viewer, 1 worker") == 2; }))
      << Read(root_ + "/coordinator.log");
  EXPECT_EQ(list("new-token"), grpc::StatusCode::OK);

  // A broken file (the worker token also in the clients' file) keeps the current set.
  std::ofstream(root_ + "/token") << "other-token\nproc-worker-token\n";
  ASSERT_EQ(::kill(pid_, SIGHUP), 0);
  ASSERT_TRUE(Eventually([&] { return logged("token reload failed") == 1; }))
      << Read(root_ + "/coordinator.log");
  const std::string log = Read(root_ + "/coordinator.log");
  EXPECT_NE(log.find("key 'worker_token_file': " + root_ + "/worker.token lists a token that key 'token_file' (" +
                     root_ + "/token) lists too"),
            std::string::npos)
      << log;
  EXPECT_EQ(list("new-token"), grpc::StatusCode::OK);
  EXPECT_EQ(list("other-token"), grpc::StatusCode::UNAUTHENTICATED);
  // A missing file too; and the coordinator is still serving after all of it.
  fs::remove(root_ + "/worker.token");
  ASSERT_EQ(::kill(pid_, SIGHUP), 0);
  ASSERT_TRUE(Eventually([&] { return logged("token reload failed") == 2; }))
      << Read(root_ + "/coordinator.log");
  EXPECT_NE(Read(root_ + "/coordinator.log").find("key 'worker_token_file': "), std::string::npos);
  RegisterGroupRequest register_request;
  register_request.set_world_size(1);
  RegisterGroupResponse group;
  EXPECT_TRUE(workers_->RegisterGroup(Ctx("proc-worker-token").get(), register_request, &group).ok());
  EXPECT_EQ(list("new-token"), grpc::StatusCode::OK);
  EXPECT_EQ(logged("tokens reloaded"), 4);
}

TEST_F(CoordinatorProcessTest, SurvivesKill9WithEveryAcknowledgedReport) {
  StartAndConnect();
  SubmitJobRequest submit;
  submit.set_pipeline_yaml(kPipeline);
  // Room in the plan for every epoch the reporter below sends before the kill (epochs outside
  // the plan are refused); 10000 is the bound of train.epochs.
  submit.add_overrides("train.epochs=10000");
  submit.set_source_path("pipe.yaml");
  submit.set_working_dir(root_);
  SubmitJobResponse submitted;
  ASSERT_TRUE(jobs_->SubmitJob(Ctx().get(), submit, &submitted).ok());
  const std::string job_id = submitted.job_id();
  RegisterGroupResponse group;
  const LeaseTaskResponse lease = RegisterAndLease(group.mutable_group_id());
  ASSERT_TRUE(lease.available());
  const std::string task_id = lease.task().task_id();

  // One epoch end per call, as fast as the coordinator acknowledges them, until it dies.
  std::atomic<int> acknowledged{0};
  std::thread reporter([&] {
    for (int epoch = 0;; ++epoch) {
      ReportProgressRequest request;
      request.set_group_id(group.group_id());
      request.set_task_id(task_id);
      Metrics* point = request.add_points();
      point->set_epoch(epoch);
      point->set_epoch_end(true);
      point->set_val_auc(epoch / 1000.0);
      ReportProgressResponse response;
      auto context = Ctx("proc-worker-token");
      context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      if (!workers_->ReportProgress(context.get(), request, &response).ok()) return;
      acknowledged = epoch + 1;
    }
  });
  ASSERT_TRUE(Eventually([&] { return acknowledged >= 20; }));
  ASSERT_EQ(::kill(pid_, SIGKILL), 0);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
  reporter.join();
  const int acked = acknowledged;

  StartAndConnect();
  GetHistoryRequest history_request;
  history_request.set_job_id(job_id);
  GetHistoryResponse history;
  ASSERT_TRUE(jobs_->GetHistory(Ctx().get(), history_request, &history).ok());
  // Every acknowledged report is there (one more may have committed without its reply).
  ASSERT_GE(history.rows_size(), acked);
  ASSERT_LE(history.rows_size(), acked + 1);
  for (int i = 0; i < acked; ++i) EXPECT_EQ(history.rows(i).metrics().epoch(), i);

  // The lease survived and the group keeps it by heartbeating.
  HeartbeatRequest heartbeat;
  heartbeat.set_group_id(group.group_id());
  heartbeat.set_task_id(task_id);
  HeartbeatResponse beat;
  ASSERT_TRUE(workers_->Heartbeat(Ctx("proc-worker-token").get(), heartbeat, &beat).ok());
  EXPECT_FALSE(beat.cancel_task());
  CompleteTaskRequest complete;
  complete.set_group_id(group.group_id());
  complete.set_task_id(task_id);
  fs::create_directories(lease.task().out_dir());
  std::ofstream(lease.task().out_dir() + "/best.pt") << "checkpoint";
  complete.set_best_checkpoint(lease.task().out_dir() + "/best.pt");
  CompleteTaskResponse completed;
  ASSERT_TRUE(workers_->CompleteTask(Ctx("proc-worker-token").get(), complete, &completed).ok());
  GetJobRequest get;
  get.set_job_id(job_id);
  JobInfo job;
  ASSERT_TRUE(jobs_->GetJob(Ctx().get(), get, &job).ok());
  EXPECT_EQ(job.state(), JOB_STATE_RUNNING);
  EXPECT_EQ(job.tasks(0).state(), TASK_STATE_SUCCEEDED);
  EXPECT_EQ(job.tasks(1).state(), TASK_STATE_READY);
}

// The fold cache's dataset versions live in the database: after a restart (SIGTERM, or kill -9)
// a submit of the unchanged data reuses the stored manifests without reading the dataset; a
// file changed while the coordinator was down makes it build anew; deleting the jobs (the sweep
// deletes their manifests) deletes the versions that named them, and the next submit builds.
TEST_F(CoordinatorProcessTest, DatasetVersionsSurviveARestart) {
  auto submit = [&]() {
    SubmitJobRequest request;
    request.set_pipeline_yaml(kPipeline);
    request.set_source_path("pipe.yaml");
    request.set_working_dir(root_);
    SubmitJobResponse response;
    const grpc::Status status = jobs_->SubmitJob(Ctx().get(), request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.job_id();
  };
  auto stop = [&]() {  // SIGTERM: a clean stop, which also flushes the log
    ASSERT_EQ(::kill(pid_, SIGTERM), 0);
    int status = 0;
    ASSERT_EQ(::waitpid(pid_, &status, 0), pid_);
    pid_ = -1;
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  };
  auto count = [&](const std::string& sql) {
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open_v2((root_ + "/aviary.db").c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
    int64_t n = -1;
    if (sqlite3_step(stmt) == SQLITE_ROW) n = sqlite3_column_int64(stmt, 0);
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return n;
  };
  auto reused = [&](const std::string& log) {  // the stages whose manifests a submit reused
    std::vector<std::string> stages;
    for (const char* stage : {"pretrain", "finetune"}) {
      if (Read(root_ + "/" + log).find(absl::StrCat("stage ", stage, ": the dataset is unchanged since an earlier submit")) !=
          std::string::npos) {
        stages.push_back(stage);
      }
    }
    return stages;
  };
  const std::vector<std::string> none, both{"pretrain", "finetune"};

  // A dataset version whose folders changed within a second of its read is not kept (SetUp
  // wrote this one just now).
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  StartAndConnect("first.log");
  const std::string first = submit();
  stop();
  EXPECT_EQ(reused("first.log"), none);
  EXPECT_EQ(count("SELECT count(*) FROM dataset_versions"), 2);  // pretrain and finetune
  const int64_t manifests = count("SELECT count(*) FROM manifests");
  EXPECT_EQ(manifests, 3);  // pretrain-f0, finetune-f0, finetune-f1

  StartAndConnect("second.log");
  const std::string second = submit();
  stop();
  EXPECT_EQ(reused("second.log"), both) << Read(root_ + "/second.log");
  EXPECT_EQ(count("SELECT count(*) FROM manifests"), manifests);
  EXPECT_EQ(count("SELECT count(DISTINCT manifest_hash) FROM tasks"), manifests);  // the second job shares them

  // A killed coordinator keeps them too (they were committed with the first job).
  StartAndConnect("third.log");
  ASSERT_EQ(::kill(pid_, SIGKILL), 0);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
  // The target's metadata rewritten (same bytes, a new ctime) while the coordinator is down:
  // both stages read it, both are built anew.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past the file clock's tick
  const std::string metadata = root_ + "/t24/train_metadata.csv";
  const std::string text = Read(metadata);
  ASSERT_FALSE(text.empty());
  std::ofstream(metadata, std::ios::trunc) << text;
  StartAndConnect("fourth.log");
  submit();
  stop();
  EXPECT_EQ(reused("fourth.log"), none) << Read(root_ + "/fourth.log");
  EXPECT_EQ(count("SELECT count(*) FROM dataset_versions"), 2);  // replaced, same keys
  EXPECT_EQ(count("SELECT count(*) FROM manifests"), manifests);  // same content

  // Every job cancelled and deleted: their manifests are swept, and the versions naming them with them.
  StartAndConnect("fifth.log");
  ListJobsRequest list;
  ListJobsResponse jobs;
  ASSERT_TRUE(jobs_->ListJobs(Ctx().get(), list, &jobs).ok());
  ASSERT_EQ(jobs.jobs_size(), 3);
  for (const JobInfo& job : jobs.jobs()) {
    CancelJobRequest cancel;
    cancel.set_job_id(job.job_id());
    CancelJobResponse cancelled;
    ASSERT_TRUE(jobs_->CancelJob(Ctx().get(), cancel, &cancelled).ok());
    DeleteJobRequest request;
    request.set_job_id(job.job_id());
    DeleteJobResponse response;
    const grpc::Status status = jobs_->DeleteJob(Ctx().get(), request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  stop();
  EXPECT_EQ(count("SELECT count(*) FROM manifests"), 0);
  EXPECT_EQ(count("SELECT count(*) FROM dataset_versions"), 0);
  EXPECT_EQ(count("SELECT count(*) FROM dataset_version_manifests"), 0);
  StartAndConnect("sixth.log");
  const std::string after = submit();
  ASSERT_FALSE(after.empty());
  // Built anew and leasable with its manifest.
  const LeaseTaskResponse lease = RegisterAndLease();
  ASSERT_TRUE(lease.available());
  EXPECT_EQ(lease.task().task_id(), after + "/pretrain-f0");
  stop();
  EXPECT_EQ(reused("sixth.log"), none) << Read(root_ + "/sixth.log");
  EXPECT_EQ(count("SELECT count(*) FROM manifests"), manifests);
  EXPECT_EQ(count("SELECT count(*) FROM dataset_versions"), 2);
  (void)first;
  (void)second;
}

}  // namespace
}  // namespace aviary::coordinator
