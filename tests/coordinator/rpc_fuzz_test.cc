// A bounded fuzz test of the coordinator's RPC surface (issue 14): a real coordinator (in
// process, a real gRPC server on 127.0.0.1:0 over a real SQLite file) gets random and mutated
// requests for every RPC of JobService and WorkerService from a seeded generator, then its state
// is checked through the public surface:
//   - every reply was OK or an expected error (never UNKNOWN, INTERNAL, UNAVAILABLE, ...);
//   - the server still answers;
//   - every task's latest and best points are within its plan of epochs;
//   - every resume_checkpoint a lease carried, and every checkpoint stored for a task, is inside
//     that task's run folder; every init_checkpoint is inside the job's folder;
//   - no task SUCCEEDED with a best checkpoint that is missing or outside its run folder;
//   - /metrics gauges are in range (no negative epoch, AUCs in [0, 1] or NaN, counts >= 0).
//
// The seed is printed at start; AVIARY_FUZZ_SEED=<n> replays a run, AVIARY_FUZZ_SECONDS and
// AVIARY_FUZZ_CALLS bound it (defaults 25 s and 4000 calls; ctest's TIMEOUT is 60 s).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "common/logging.h"
#include "coordinator/content_hash.h"
#include "coordinator/path_policy.h"
#include "google/protobuf/stubs/logging.h"
#include "coordinator/service.h"
#include "coordinator/store.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/aviary.grpc.pb.h"
#include "tests/coordinator/http_get.h"
#include "tests/coordinator/tiny_dataset.h"

namespace aviary::coordinator {
namespace {

namespace fs = std::filesystem;
using namespace aviary::v1;  // NOLINT: test brevity

constexpr uint64_t kDefaultSeed = 20261203;

// --- Credentials: the one place that knows how calls authenticate. Each role has its own token
// file (clients: JobService; viewers: JobService reads; worker groups: WorkerService).
constexpr char kClientToken[] = "fuzz-client-token";
constexpr char kViewerToken[] = "fuzz-viewer-token";
constexpr char kWorkerToken[] = "fuzz-worker-token";
enum class Service { kJob, kWorker };
void WriteTokenFiles(const std::string& root, CoordinatorConfig* config) {
  std::ofstream(root + "/token") << kClientToken << "\n";
  std::ofstream(root + "/viewer.token") << kViewerToken << "\n";
  std::ofstream(root + "/worker.token") << kWorkerToken << "\n";
  config->token_file = root + "/token";
  config->viewer_token_file = root + "/viewer.token";
  config->worker_token_file = root + "/worker.token";
}
void AddToken(const char* token, grpc::ClientContext* context) {
  context->AddMetadata("authorization", absl::StrCat("Bearer ", token));
}
void AddCredentials(Service service, grpc::ClientContext* context) {
  AddToken(service == Service::kJob ? kClientToken : kWorkerToken, context);
}

uint64_t EnvNumber(const char* name, uint64_t fallback) {
  const char* text = std::getenv(name);
  uint64_t value = 0;
  if (text == nullptr || !absl::SimpleAtoi(text, &value)) return fallback;
  return value;
}

// A task the fuzzer saw leased.
struct Leased {
  std::string group_id;
  std::string task_id;
  std::string job_id;
  std::string out_dir;
  std::string manifest_hash;
  int64_t manifest_size = 0;
};

class RpcFuzzTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = absl::StrCat("/tmp/aviary_rpcfuzz_", ::getpid(), "_XXXXXX");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = fs::canonical(tmpl).string();
    WriteTinyDataset(root_);
    fs::create_directories(root_ + "/outside");
    std::ofstream(root_ + "/outside/secret.pt") << "not a checkpoint of any task";
    config_.listen = "127.0.0.1:0";
    config_.metrics_listen = "127.0.0.1:0";
    config_.database = root_ + "/aviary.db";
    config_.work_dir = root_ + "/runs";
    config_.data_roots = {root_};
    config_.heartbeat_interval_s = 0.5;
    config_.heartbeat_timeout_s = 3;
    config_.max_restarts = 50;
    WriteTokenFiles(root_, &config_);
    auto secrets = LoadCoordinatorSecrets(config_);
    ASSERT_TRUE(secrets.ok()) << secrets.status();
    auto coordinator = Coordinator::Start(config_, *secrets);
    ASSERT_TRUE(coordinator.ok()) << coordinator.status();
    coordinator_ = std::move(*coordinator);
    auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", coordinator_->grpc_port()),
                                       grpc::InsecureChannelCredentials());
    jobs_ = JobService::NewStub(channel);
    workers_ = WorkerService::NewStub(channel);
  }
  void TearDown() override {
    if (coordinator_) {
      EXPECT_TRUE(coordinator_->Shutdown().ok());
    }
    coordinator_.reset();
    if (!HasFailure()) fs::remove_all(root_);
  }

  std::unique_ptr<grpc::ClientContext> Ctx(Service service, int deadline_ms = 10000) {
    auto context = std::make_unique<grpc::ClientContext>();
    AddCredentials(service, context.get());
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
    return context;
  }

  // --- Random pieces.
  uint64_t Below(uint64_t n) { return n == 0 ? 0 : rng_() % n; }
  bool Chance(double p) { return std::uniform_real_distribution<double>(0, 1)(rng_) < p; }
  template <typename T>
  const T& Pick(const std::vector<T>& items) { return items[Below(items.size())]; }

  // Random text: ASCII (control characters included) and some multi-byte characters, always
  // valid UTF-8 (gRPC refuses a proto3 string with invalid UTF-8 itself, with INTERNAL, before
  // the coordinator sees the request).
  std::string RandomBytes(size_t max_size) {
    static const std::vector<std::string> kWide{"\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x90\xa6", "\xef\xbf\xbf"};
    const size_t size = Below(max_size + 1);
    std::string text;
    while (text.size() < size) {
      if (Chance(0.1)) {
        text += Pick(kWide);
      } else {
        text += static_cast<char>(Below(128));
      }
    }
    return text;
  }
  std::string RandomId(char prefix) {
    static constexpr char kHex[] = "0123456789abcdef";
    std::string id(1, prefix);
    for (int i = 0; i < 12; ++i) id += kHex[Below(16)];
    return id;
  }
  double RandomDouble() {
    switch (Below(8)) {
      case 0: return std::numeric_limits<double>::quiet_NaN();
      case 1: return std::numeric_limits<double>::infinity();
      case 2: return -std::numeric_limits<double>::infinity();
      case 3: return -1.0 * static_cast<double>(Below(1000));
      case 4: return 1e300;
      default: return std::uniform_real_distribution<double>(0, 1)(rng_);
    }
  }
  int64_t RandomInt() {
    switch (Below(6)) {
      case 0: return -static_cast<int64_t>(Below(1000)) - 1;
      case 1: return std::numeric_limits<int64_t>::max();
      case 2: return std::numeric_limits<int32_t>::max();
      case 3: return static_cast<int64_t>(Below(1000000));
      default: return static_cast<int64_t>(Below(20));
    }
  }
  std::string JobId() {
    if (!job_ids_.empty() && Chance(0.85)) return Pick(job_ids_);
    return Chance(0.5) ? RandomId('j') : RandomBytes(20);
  }
  std::string GroupId() {
    if (!group_ids_.empty() && Chance(0.85)) return Pick(group_ids_);
    return Chance(0.5) ? RandomId('g') : RandomBytes(20);
  }
  // A task: mostly one that was leased (with its group), else any known or made-up one.
  Leased Task() {
    if (!leased_.empty() && Chance(0.8)) return Pick(leased_);
    Leased task;
    task.group_id = GroupId();
    task.job_id = JobId();
    task.task_id = Chance(0.8) ? absl::StrCat(task.job_id, "/", Chance(0.5) ? "pretrain" : "finetune",
                                              "-f", Below(3))
                               : RandomBytes(30);
    task.out_dir = absl::StrCat(config_.work_dir, "/", task.job_id, "/pretrain-fold0");
    return task;
  }
  // A checkpoint path for `task`: a real file in its run folder, or one of the paths the policy
  // must refuse.
  std::string CheckpointPath(const Leased& task) {
    switch (Below(10)) {
      case 0: return "/etc/passwd";
      case 1: return task.out_dir + "/missing.pt";
      case 2: return root_ + "/outside/secret.pt";
      case 3: {
        std::error_code ec;
        fs::create_directories(task.out_dir, ec);
        fs::create_symlink("/etc/passwd", task.out_dir + "/link.pt", ec);
        return task.out_dir + "/link.pt";
      }
      case 4: {  // another task's file
        const std::string other = absl::StrCat(config_.work_dir, "/", task.job_id, "/finetune-fold1");
        std::error_code ec;
        fs::create_directories(other, ec);
        std::ofstream(other + "/best.pt") << "another task's checkpoint";
        return task.out_dir + "/../finetune-fold1/best.pt";
      }
      case 5: return RandomBytes(40);
      default: {
        std::error_code ec;
        fs::create_directories(task.out_dir, ec);
        const std::string path = absl::StrCat(task.out_dir, "/ckpt", Below(3), ".pt");
        std::ofstream(path) << "checkpoint";
        return path;
      }
    }
  }
  Metrics Point() {
    Metrics m;
    m.set_epoch(static_cast<int32_t>(Chance(0.7) ? Below(5) : RandomInt()));
    m.set_step(Chance(0.7) ? static_cast<int64_t>(Below(100)) : RandomInt());
    m.set_epoch_end(Chance(0.3));
    m.set_lr(Chance(0.8) ? 1e-3 : RandomDouble());
    m.set_train_loss(RandomDouble());
    m.set_train_acc(Chance(0.8) ? 0.5 : RandomDouble());
    m.set_val_loss(RandomDouble());
    m.set_val_auc(Chance(0.8) ? 0.7 : RandomDouble());
    m.set_val_roc_auc(Chance(0.8) ? 0.6 : RandomDouble());
    m.set_val_cmap(Chance(0.8) ? 0.5 : RandomDouble());
    m.set_val_acc(Chance(0.8) ? 0.4 : RandomDouble());
    m.set_samples_total(Chance(0.8) ? static_cast<int64_t>(Below(1000)) : RandomInt());
    m.set_samples_per_s(Chance(0.8) ? 10.0 : RandomDouble());
    return m;
  }
  // Flips, inserts or drops a few bytes of the serialized `message` and parses it back (unknown
  // fields and odd values included); keeps `message` when the bytes no longer parse.
  template <typename M>
  void Mutate(M* message) {
    std::string bytes = message->SerializeAsString();
    const int edits = 1 + static_cast<int>(Below(4));
    for (int i = 0; i < edits; ++i) {
      const size_t at = Below(bytes.size() + 1);
      switch (Below(3)) {
        case 0:
          if (at < bytes.size()) bytes[at] = static_cast<char>(Below(256));
          break;
        case 1: bytes.insert(at, 1, static_cast<char>(Below(256))); break;
        default:
          if (at < bytes.size()) bytes.erase(at, 1);
      }
    }
    M mutated;
    if (mutated.ParseFromString(bytes) && ValidUtf8(mutated)) *message = mutated;
  }
  // Whether every string field of `message` (nested ones included) is valid UTF-8.
  static bool ValidUtf8(const google::protobuf::Message& message) {
    const google::protobuf::Reflection* reflection = message.GetReflection();
    std::vector<const google::protobuf::FieldDescriptor*> fields;
    reflection->ListFields(message, &fields);
    for (const google::protobuf::FieldDescriptor* field : fields) {
      const int n = field->is_repeated() ? reflection->FieldSize(message, field) : 1;
      for (int i = 0; i < n; ++i) {
        if (field->type() == google::protobuf::FieldDescriptor::TYPE_STRING) {
          const std::string text = field->is_repeated() ? reflection->GetRepeatedString(message, field, i)
                                                        : reflection->GetString(message, field);
          if (!IsUtf8(text)) return false;
        } else if (field->type() == google::protobuf::FieldDescriptor::TYPE_MESSAGE) {
          const google::protobuf::Message& nested = field->is_repeated()
                                                        ? reflection->GetRepeatedMessage(message, field, i)
                                                        : reflection->GetMessage(message, field);
          if (!ValidUtf8(nested)) return false;
        }
      }
    }
    return true;
  }
  static bool IsUtf8(const std::string& text) {
    size_t i = 0;
    while (i < text.size()) {
      const auto c = static_cast<unsigned char>(text[i]);
      size_t extra = 0;
      uint32_t code = 0;
      if (c < 0x80) {
        ++i;
        continue;
      } else if ((c & 0xe0) == 0xc0) {
        extra = 1;
        code = c & 0x1f;
      } else if ((c & 0xf0) == 0xe0) {
        extra = 2;
        code = c & 0x0f;
      } else if ((c & 0xf8) == 0xf0) {
        extra = 3;
        code = c & 0x07;
      } else {
        return false;
      }
      if (i + extra >= text.size()) return false;  // cut short
      for (size_t k = 1; k <= extra; ++k) {
        const auto d = static_cast<unsigned char>(text[i + k]);
        if ((d & 0xc0) != 0x80) return false;
        code = (code << 6) | (d & 0x3f);
      }
      static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
      if (code < kMin[extra] || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) return false;
      i += extra + 1;
    }
    return true;
  }

  // Records the code of one call; a code outside `allowed` is a finding.
  void Record(const std::string& rpc, const grpc::Status& status,
              const std::set<grpc::StatusCode>& extra = {}) {
    ++calls_;
    ++codes_[status.error_code()];
    static const std::set<grpc::StatusCode> kExpected{
        grpc::StatusCode::OK, grpc::StatusCode::INVALID_ARGUMENT, grpc::StatusCode::NOT_FOUND,
        grpc::StatusCode::FAILED_PRECONDITION, grpc::StatusCode::RESOURCE_EXHAUSTED};
    if (kExpected.count(status.error_code()) == 0 && extra.count(status.error_code()) == 0) {
      ADD_FAILURE() << rpc << " returned code " << status.error_code() << ": "
                    << status.error_message() << " (replay: AVIARY_FUZZ_SEED=" << seed_ << ")";
    }
  }

  // --- One call of each RPC.
  void SubmitJob() {
    SubmitJobRequest request;
    request.set_pipeline_yaml(Chance(0.9) ? kPipeline : RandomBytes(200));
    request.set_source_path("fuzz.yaml");
    request.set_working_dir(Chance(0.9) ? root_ : (Chance(0.5) ? "relative" : "/"));
    request.set_name(Chance(0.8) ? "fuzz" : RandomBytes(40));
    static const std::vector<std::string> kOverrides{
        "stages.finetune.enabled=false", "stages.pretrain.enabled=false", "train.epochs=2",
        "train.epochs=2147483647", "data.cache_dir=/etc", "data.cache_dir=../../../../root",
        "model.pretrained_weights=/etc/shadow", "data.corrupt_files=/etc/passwd",
        "data.cache_dir=cache", "folds.selected_folds=[0]", "train.batch_size=0",
        "data.target.root=/", "=", "no-equals"};
    const int n = static_cast<int>(Below(3));
    for (int i = 0; i < n; ++i) {
      request.add_overrides(Chance(0.9) ? Pick(kOverrides) : RandomBytes(30));
    }
    // Tags, a note and a sweep (issue 16), valid and not.
    static const std::vector<std::string> kTags{"team=birds", "lr-test", "k=", "=v", "bad key", "x=\n"};
    const int tags = static_cast<int>(Below(3));
    for (int i = 0; i < tags; ++i) request.add_tags(Chance(0.9) ? Pick(kTags) : RandomBytes(20));
    if (Chance(0.3)) request.set_note(Chance(0.8) ? "a fuzz note" : RandomBytes(60));
    if (Chance(0.2)) {
      static const std::vector<std::string> kKeys{"train.lr", "model.dropout", "stages.finetune.lr", "seed",
                                                  "train.nope", "", "folds.selected_folds"};
      static const std::vector<std::string> kValues{"1e-3", "5e-4", "0.2", "0.3", "-1", "abc", "", "[0]"};
      SweepAxis* axis = request.add_sweep();
      axis->set_key(Pick(kKeys));
      const int values = static_cast<int>(Below(4));
      for (int i = 0; i < values; ++i) axis->add_values(Pick(kValues));
    }
    if (Chance(0.1)) Mutate(&request);
    SubmitJobResponse response;
    const grpc::Status status = jobs_->SubmitJob(Ctx(Service::kJob).get(), request, &response);
    Record("SubmitJob", status);
    if (status.ok()) job_ids_.push_back(response.job_id());
  }
  void GetJob() {
    GetJobRequest request;
    request.set_job_id(JobId());
    if (Chance(0.1)) Mutate(&request);
    JobInfo response;
    Record("GetJob", jobs_->GetJob(Ctx(Service::kJob).get(), request, &response));
  }
  void ListJobs() {
    ListJobsRequest request;
    request.set_limit(static_cast<int32_t>(Chance(0.7) ? Below(10) : RandomInt()));
    ListJobsResponse response;
    Record("ListJobs", jobs_->ListJobs(Ctx(Service::kJob).get(), request, &response));
  }
  void CancelJob() {
    if (Chance(0.7)) return;  // rarer: a cancelled job stops the fuzzing of its tasks
    CancelJobRequest request;
    request.set_job_id(JobId());
    CancelJobResponse response;
    Record("CancelJob", jobs_->CancelJob(Ctx(Service::kJob).get(), request, &response));
  }
  void WatchJob() {
    WatchJobRequest request;
    request.set_job_id(JobId());
    auto context = Ctx(Service::kJob, 100);
    auto reader = jobs_->WatchJob(context.get(), request);
    JobEvent event;
    for (int i = 0; i < 3 && reader->Read(&event); ++i) {
    }
    context->TryCancel();
    Record("WatchJob", reader->Finish(),
           {grpc::StatusCode::CANCELLED, grpc::StatusCode::DEADLINE_EXCEEDED});
  }
  void GetHistory() {
    GetHistoryRequest request;
    request.set_job_id(JobId());
    GetHistoryResponse response;
    Record("GetHistory", jobs_->GetHistory(Ctx(Service::kJob).get(), request, &response));
  }
  void ListGroups() {
    ListGroupsRequest request;
    ListGroupsResponse response;
    Record("ListGroups", jobs_->ListGroups(Ctx(Service::kJob).get(), request, &response));
  }
  void GetLogs() {
    GetLogsRequest request;
    request.set_job_id(JobId());
    if (Chance(0.6)) request.set_task_id(Chance(0.8) ? Task().task_id : RandomBytes(30));
    request.set_after_seq(Chance(0.8) ? static_cast<int64_t>(Below(5)) : static_cast<int64_t>(RandomInt()));
    request.set_limit(static_cast<int32_t>(Chance(0.8) ? Below(10) : RandomInt()));
    GetLogsResponse response;
    Record("GetLogs", jobs_->GetLogs(Ctx(Service::kJob).get(), request, &response));
  }
  void RetryJob() {
    RetryJobRequest request;
    request.set_job_id(JobId());
    JobInfo response;
    Record("RetryJob", jobs_->RetryJob(Ctx(Service::kJob).get(), request, &response));
  }
  void DeleteJob() {
    if (Chance(0.7)) return;  // rarer: a deleted job stops the fuzzing of its tasks
    DeleteJobRequest request;
    request.set_job_id(JobId());
    request.set_with_run_folders(Chance(0.5));
    DeleteJobResponse response;
    const grpc::Status status = jobs_->DeleteJob(Ctx(Service::kJob).get(), request, &response);
    Record("DeleteJob", status);
    if (status.ok()) {
      job_ids_.erase(std::remove(job_ids_.begin(), job_ids_.end(), request.job_id()), job_ids_.end());
      for (const std::string& folder : response.removed_folders()) {
        EXPECT_TRUE(PathIsInside(folder, fs::canonical(config_.work_dir).string()))
            << "DeleteJob removed " << folder << " outside the work dir (replay: AVIARY_FUZZ_SEED=" << seed_ << ")";
      }
    }
  }
  void ShipLogs() {
    ShipLogsRequest request;
    const Leased task = Task();
    request.set_group_id(task.group_id);
    request.set_task_id(task.task_id);
    const int n = static_cast<int>(Below(4));
    for (int i = 0; i < n; ++i) {
      LogLine* line = request.add_lines();
      line->set_text(Chance(0.8) ? "epoch 1: loss 0.5" : RandomBytes(Chance(0.5) ? 50 : 5000));
      line->set_level(Chance(0.9) ? "info" : RandomBytes(20));
      line->set_rank(static_cast<int32_t>(Chance(0.9) ? Below(2) : RandomInt()));
      if (Chance(0.5)) line->set_seq(Chance(0.9) ? static_cast<int64_t>(Below(8)) : static_cast<int64_t>(RandomInt()));
    }
    if (Chance(0.1)) Mutate(&request);
    ShipLogsResponse response;
    Record("ShipLogs", workers_->ShipLogs(Ctx(Service::kWorker).get(), request, &response));
  }
  void RegisterGroup() {
    RegisterGroupRequest request;
    request.set_world_size(static_cast<int32_t>(Chance(0.8) ? 1 + Below(4) : RandomInt()));
    const int hosts = static_cast<int>(Below(3));
    for (int i = 0; i < hosts; ++i) request.add_hosts(Chance(0.8) ? "node" : RandomBytes(300));
    request.set_backend(Chance(0.8) ? "mpi" : RandomBytes(80));
    if (Chance(0.5)) request.set_registration_id(Chance(0.8) ? absl::StrCat("r", Below(4)) : RandomBytes(80));
    if (Chance(0.1)) Mutate(&request);
    RegisterGroupResponse response;
    const grpc::Status status = workers_->RegisterGroup(Ctx(Service::kWorker).get(), request, &response);
    Record("RegisterGroup", status);
    if (status.ok()) group_ids_.push_back(response.group_id());
  }
  void Heartbeat() {
    HeartbeatRequest request;
    const Leased task = Task();
    request.set_group_id(task.group_id);
    if (Chance(0.8)) request.set_task_id(task.task_id);
    HeartbeatResponse response;
    Record("Heartbeat", workers_->Heartbeat(Ctx(Service::kWorker).get(), request, &response));
  }
  void LeaseTask() {
    LeaseTaskRequest request;
    request.set_group_id(GroupId());
    LeaseTaskResponse response;
    const grpc::Status status = workers_->LeaseTask(Ctx(Service::kWorker).get(), request, &response);
    Record("LeaseTask", status);
    if (status.ok() && response.available()) Saw(request.group_id(), response.task());
  }
  void ReportProgress() {
    ReportProgressRequest request;
    const Leased task = Task();
    request.set_group_id(task.group_id);
    request.set_task_id(task.task_id);
    request.set_steps_per_epoch(Chance(0.8) ? 10 : RandomInt());
    const int n = static_cast<int>(Below(4));
    for (int i = 0; i < n; ++i) *request.add_points() = Point();
    if (Chance(0.1)) Mutate(&request);
    ReportProgressResponse response;
    Record("ReportProgress", workers_->ReportProgress(Ctx(Service::kWorker).get(), request, &response));
  }
  void ReportCheckpoint() {
    ReportCheckpointRequest request;
    const Leased task = Task();
    request.set_group_id(task.group_id);
    request.set_task_id(task.task_id);
    request.set_path(CheckpointPath(task));
    request.set_epoch(static_cast<int32_t>(Chance(0.8) ? Below(3) : RandomInt()));
    request.set_best(Chance(0.5));
    if (Chance(0.1)) Mutate(&request);
    ReportCheckpointResponse response;
    Record("ReportCheckpoint", workers_->ReportCheckpoint(Ctx(Service::kWorker).get(), request, &response));
  }
  void CompleteTask() {
    CompleteTaskRequest request;
    const Leased task = Task();
    request.set_group_id(task.group_id);
    request.set_task_id(task.task_id);
    request.set_best_checkpoint(CheckpointPath(task));
    if (Chance(0.8)) *request.mutable_best() = Point();
    if (Chance(0.1)) Mutate(&request);
    CompleteTaskResponse response;
    Record("CompleteTask", workers_->CompleteTask(Ctx(Service::kWorker).get(), request, &response));
  }
  void FailTask() {
    FailTaskRequest request;
    const Leased task = Task();
    request.set_group_id(task.group_id);
    request.set_task_id(task.task_id);
    request.set_error(Chance(0.9) ? "fuzz failure" : RandomBytes(100));
    request.set_retryable(Chance(0.8));
    request.set_preempted(Chance(0.3));
    if (Chance(0.1)) Mutate(&request);
    FailTaskResponse response;
    Record("FailTask", workers_->FailTask(Ctx(Service::kWorker).get(), request, &response));
  }
  void LeaveGroup() {
    LeaveGroupRequest request;
    request.set_group_id(Chance(0.9) ? GroupId() : RandomBytes(40));
    request.set_reason(Chance(0.8) ? "stopped by signal (SIGTERM)" : RandomBytes(100));
    if (Chance(0.1)) Mutate(&request);
    LeaveGroupResponse response;
    const grpc::Status status = workers_->LeaveGroup(Ctx(Service::kWorker).get(), request, &response);
    Record("LeaveGroup", status);
    if (status.ok()) {
      group_ids_.erase(std::remove(group_ids_.begin(), group_ids_.end(), request.group_id()), group_ids_.end());
    }
  }
  // GetManifest of a lease seen (its group may have lost it since), of another group's lease, or
  // of a made-up hash; what streams back must be the whole manifest with that hash.
  void GetManifest() {
    GetManifestRequest request;
    const Leased task = Task();
    request.set_group_id(Chance(0.8) ? task.group_id : GroupId());
    request.set_manifest_hash(Chance(0.8) ? task.manifest_hash : (Chance(0.5) ? Sha256Hex(RandomBytes(8)) : RandomBytes(64)));
    if (Chance(0.1)) Mutate(&request);
    auto context = Ctx(Service::kWorker);
    auto reader = workers_->GetManifest(context.get(), request);
    std::string bytes;
    ManifestChunk chunk;
    int64_t total = -1;
    while (reader->Read(&chunk)) {
      EXPECT_EQ(chunk.offset(), static_cast<int64_t>(bytes.size()));
      EXPECT_LE(chunk.data().size(), size_t{1} << 20);
      total = chunk.total_size();
      bytes += chunk.data();
    }
    const grpc::Status status = reader->Finish();
    Record("GetManifest", status);
    if (status.ok()) {
      EXPECT_EQ(static_cast<int64_t>(bytes.size()), total);
      EXPECT_EQ(Sha256Hex(bytes), request.manifest_hash()) << "GetManifest streamed other bytes than its hash names"
                                                           << " (replay: AVIARY_FUZZ_SEED=" << seed_ << ")";
      if (request.manifest_hash() == task.manifest_hash) {
        EXPECT_EQ(static_cast<int64_t>(bytes.size()), task.manifest_size);
      }
    }
  }
  void PruneJobs() {
    if (Chance(0.7)) return;  // rarer: a pruned job's manifests are gone
    PruneJobsRequest request;
    request.set_older_than_days(Chance(0.8) ? (Chance(0.5) ? -1.0 : Below(3) / 86400.0) : RandomDouble());
    request.set_dry_run(Chance(0.5));
    if (Chance(0.1)) Mutate(&request);
    PruneJobsResponse response;
    Record("PruneJobs", jobs_->PruneJobs(Ctx(Service::kJob).get(), request, &response));
  }
  // A valid-looking call with another role's token: always PERMISSION_DENIED, before any check
  // of the request (a client or viewer never acts as a worker, a worker or viewer never submits).
  void WrongRole() {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Status status;
    std::string rpc;
    switch (Below(10)) {
      case 8: {
        AddToken(Chance(0.5) ? kClientToken : kViewerToken, context.get());
        GetManifestRequest request;
        const Leased task = Task();
        request.set_group_id(task.group_id);
        request.set_manifest_hash(task.manifest_hash);
        rpc = "GetManifest";
        auto reader = workers_->GetManifest(context.get(), request);
        ManifestChunk chunk;
        while (reader->Read(&chunk)) {
        }
        status = reader->Finish();
        break;
      }
      case 9: {
        AddToken(Chance(0.5) ? kWorkerToken : kViewerToken, context.get());
        PruneJobsRequest request;
        request.set_older_than_days(0);
        PruneJobsResponse response;
        rpc = "PruneJobs";
        status = jobs_->PruneJobs(context.get(), request, &response);
        break;
      }
      case 0: {
        AddToken(Chance(0.5) ? kClientToken : kViewerToken, context.get());
        ReportCheckpointRequest request;
        const Leased task = Task();
        request.set_group_id(task.group_id);
        request.set_task_id(task.task_id);
        request.set_path("/etc/passwd");
        ReportCheckpointResponse response;
        rpc = "ReportCheckpoint";
        status = workers_->ReportCheckpoint(context.get(), request, &response);
        break;
      }
      case 1: {
        AddToken(Chance(0.5) ? kClientToken : kViewerToken, context.get());
        LeaseTaskRequest request;
        request.set_group_id(GroupId());
        LeaseTaskResponse response;
        rpc = "LeaseTask";
        status = workers_->LeaseTask(context.get(), request, &response);
        break;
      }
      case 2: {
        AddToken(Chance(0.5) ? kWorkerToken : kViewerToken, context.get());
        SubmitJobRequest request;
        request.set_pipeline_yaml(kPipeline);
        request.set_source_path("fuzz.yaml");
        request.set_working_dir(root_);
        SubmitJobResponse response;
        rpc = "SubmitJob";
        status = jobs_->SubmitJob(context.get(), request, &response);
        break;
      }
      case 4: {
        AddToken(Chance(0.5) ? kClientToken : kViewerToken, context.get());
        ShipLogsRequest request;
        const Leased task = Task();
        request.set_group_id(task.group_id);
        request.set_task_id(task.task_id);
        request.add_lines()->set_text("forged");
        ShipLogsResponse response;
        rpc = "ShipLogs";
        status = workers_->ShipLogs(context.get(), request, &response);
        break;
      }
      case 5: {
        AddToken(Chance(0.5) ? kWorkerToken : kViewerToken, context.get());
        RetryJobRequest request;
        request.set_job_id(JobId());
        JobInfo response;
        rpc = "RetryJob";
        status = jobs_->RetryJob(context.get(), request, &response);
        break;
      }
      case 6: {
        AddToken(Chance(0.5) ? kWorkerToken : kViewerToken, context.get());
        DeleteJobRequest request;
        request.set_job_id(JobId());
        DeleteJobResponse response;
        rpc = "DeleteJob";
        status = jobs_->DeleteJob(context.get(), request, &response);
        break;
      }
      case 7: {
        AddToken(kWorkerToken, context.get());
        if (Chance(0.5)) {
          ListGroupsRequest request;
          ListGroupsResponse response;
          rpc = "ListGroups";
          status = jobs_->ListGroups(context.get(), request, &response);
        } else {
          GetLogsRequest request;
          request.set_job_id(JobId());
          GetLogsResponse response;
          rpc = "GetLogs";
          status = jobs_->GetLogs(context.get(), request, &response);
        }
        break;
      }
      default: {
        AddToken(kWorkerToken, context.get());
        ListJobsRequest request;
        ListJobsResponse response;
        rpc = "ListJobs";
        status = jobs_->ListJobs(context.get(), request, &response);
        break;
      }
    }
    ++calls_;
    ++codes_[status.error_code()];
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED)
        << rpc << " with another role's token: " << status.error_message() << " (replay: AVIARY_FUZZ_SEED="
        << seed_ << ")";
  }

  // A lease seen: its checkpoints must lie inside the task's folders.
  void Saw(const std::string& group_id, const aviary::v1::Task& task) {
    leased_.push_back(
        {group_id, task.task_id(), task.job_id(), task.out_dir(), task.manifest_hash(), task.manifest_size()});
    EXPECT_TRUE(task.manifest_csv().empty()) << "lease of " << task.task_id() << " carried its manifest, not its hash";
    EXPECT_TRUE(IsSha256Hex(task.manifest_hash())) << "lease of " << task.task_id() << ": manifest_hash '"
                                                   << task.manifest_hash() << "' (replay: AVIARY_FUZZ_SEED=" << seed_ << ")";
    if (!task.resume_checkpoint().empty()) {
      EXPECT_TRUE(InsideReal(task.resume_checkpoint(), task.out_dir()))
          << "lease of " << task.task_id() << " carried resume_checkpoint " << task.resume_checkpoint()
          << " outside its run folder " << task.out_dir() << " (replay: AVIARY_FUZZ_SEED=" << seed_ << ")";
    }
    if (!task.init_checkpoint().empty()) {
      EXPECT_TRUE(InsideReal(task.init_checkpoint(), config_.work_dir + "/" + task.job_id()))
          << "lease of " << task.task_id() << " carried init_checkpoint " << task.init_checkpoint()
          << " outside its job's folder (replay: AVIARY_FUZZ_SEED=" << seed_ << ")";
    }
  }
  // Whether `path` exists and its realpath is inside the realpath of `dir`.
  static bool InsideReal(const std::string& path, const std::string& dir) {
    std::error_code ec;
    const fs::path real = fs::canonical(path, ec);
    if (ec) return false;
    const fs::path real_dir = fs::canonical(dir, ec);
    if (ec) return false;
    return PathIsInside(real.string(), real_dir.string()) && real != real_dir;
  }

  std::string root_;
  CoordinatorConfig config_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<JobService::Stub> jobs_;
  std::unique_ptr<WorkerService::Stub> workers_;
  uint64_t seed_ = kDefaultSeed;
  std::mt19937_64 rng_;
  std::vector<std::string> job_ids_;
  std::vector<std::string> group_ids_;
  std::vector<Leased> leased_;
  int calls_ = 0;
  std::map<grpc::StatusCode, int> codes_;
};

TEST_F(RpcFuzzTest, RandomAndMutatedCallsKeepTheInvariants) {
  seed_ = EnvNumber("AVIARY_FUZZ_SEED", kDefaultSeed);
  const uint64_t max_seconds = EnvNumber("AVIARY_FUZZ_SECONDS", 25);
  const uint64_t max_calls = EnvNumber("AVIARY_FUZZ_CALLS", 4000);
  // Quiet: protobuf's notes on the invalid UTF-8 that Mutate() drops, the coordinator's info lines.
  google::protobuf::SetLogHandler(nullptr);
  common::SetLogLevel(common::LogLevel::kWarning);
  std::cout << "rpc_fuzz: AVIARY_FUZZ_SEED=" << seed_ << " (at most " << max_seconds << " s, "
            << max_calls << " calls)" << std::endl;
  rng_.seed(seed_);
  const std::vector<std::pair<int, std::function<void()>>> rpcs{
      {4, [&] { SubmitJob(); }},        {3, [&] { GetJob(); }},
      {1, [&] { ListJobs(); }},         {1, [&] { CancelJob(); }},
      {1, [&] { WatchJob(); }},         {2, [&] { GetHistory(); }},
      {3, [&] { RegisterGroup(); }},    {4, [&] { Heartbeat(); }},
      {6, [&] { LeaseTask(); }},        {6, [&] { ReportProgress(); }},
      {6, [&] { ReportCheckpoint(); }}, {4, [&] { CompleteTask(); }},
      {3, [&] { FailTask(); }},         {1, [&] { LeaveGroup(); }},
      {3, [&] { GetManifest(); }},      {1, [&] { PruneJobs(); }},
      {1, [&] { WrongRole(); }},
      {1, [&] { ListGroups(); }},       {2, [&] { GetLogs(); }},
      {1, [&] { RetryJob(); }},         {1, [&] { DeleteJob(); }},
      {3, [&] { ShipLogs(); }},         {2, [&] { WrongRole(); }},
  };
  int total_weight = 0;
  for (const auto& [weight, call] : rpcs) total_weight += weight;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(max_seconds);
  while (static_cast<uint64_t>(calls_) < max_calls && std::chrono::steady_clock::now() < deadline &&
         !HasFailure()) {
    int pick = static_cast<int>(Below(static_cast<uint64_t>(total_weight)));
    for (const auto& [weight, call] : rpcs) {
      if (pick < weight) {
        call();
        break;
      }
      pick -= weight;
    }
  }
  std::string summary;
  for (const auto& [code, count] : codes_) absl::StrAppend(&summary, " code ", code, ": ", count, ";");
  std::cout << "rpc_fuzz: " << calls_ << " calls," << summary << " " << job_ids_.size() << " jobs, "
            << leased_.size() << " leases" << std::endl;

  // Lease whatever is READY now (fresh groups), so that every task's resume_checkpoint is seen.
  for (int i = 0; i < 40; ++i) {
    RegisterGroupRequest request;
    request.set_world_size(1);
    RegisterGroupResponse group;
    ASSERT_TRUE(workers_->RegisterGroup(Ctx(Service::kWorker).get(), request, &group).ok());
    LeaseTaskRequest lease_request;
    lease_request.set_group_id(group.group_id());
    LeaseTaskResponse lease;
    ASSERT_TRUE(workers_->LeaseTask(Ctx(Service::kWorker).get(), lease_request, &lease).ok());
    if (!lease.available()) break;
    Saw(group.group_id(), lease.task());
  }

  // The server still answers, and every job is consistent.
  ListJobsRequest list_request;
  ListJobsResponse list;
  const grpc::Status listed = jobs_->ListJobs(Ctx(Service::kJob).get(), list_request, &list);
  ASSERT_TRUE(listed.ok()) << listed.error_message();
  EXPECT_EQ(list.jobs_size(), static_cast<int>(job_ids_.size()));
  for (const JobInfo& job : list.jobs()) {
    for (const TaskInfo& task : job.tasks()) {
      const std::string replay = absl::StrCat(" (task ", task.task_id(), "; replay: AVIARY_FUZZ_SEED=", seed_, ")");
      if (task.has_latest()) {
        EXPECT_GE(task.latest().epoch(), 0) << replay;
        EXPECT_LT(task.latest().epoch(), task.epochs()) << replay;
        EXPECT_GE(task.latest().step(), 0) << replay;
      }
      if (task.has_best()) {
        EXPECT_GE(task.best().epoch(), 0) << replay;
        EXPECT_LT(task.best().epoch(), task.epochs()) << replay;
      }
      if (task.state() == TASK_STATE_SUCCEEDED) {
        EXPECT_TRUE(InsideReal(task.best_checkpoint(), task.out_dir()))
            << "SUCCEEDED with best checkpoint '" << task.best_checkpoint()
            << "' missing or outside " << task.out_dir() << replay;
      }
    }
  }

  // /metrics: gauges in range.
  const std::string exposition = HttpGet(coordinator_->metrics_port(), "/metrics");
  ASSERT_FALSE(exposition.empty());
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    double value = 0;
    if (space == absl::string_view::npos || !absl::SimpleAtod(line.substr(space + 1), &value)) continue;
    const bool fraction = absl::StartsWith(line, "aviary_val_auc") || absl::StartsWith(line, "aviary_val_roc_auc") ||
                          absl::StartsWith(line, "aviary_val_cmap") || absl::StartsWith(line, "aviary_val_accuracy") ||
                          absl::StartsWith(line, "aviary_train_accuracy");
    const bool count = absl::StartsWith(line, "aviary_task_epoch") || absl::StartsWith(line, "aviary_jobs") ||
                       absl::StartsWith(line, "aviary_task_restarts_total") ||
                       absl::StartsWith(line, "aviary_task_running") || absl::StartsWith(line, "aviary_worker_groups") ||
                       absl::StartsWith(line, "aviary_learning_rate");
    if (fraction) {
      EXPECT_TRUE(std::isnan(value) || (value >= 0 && value <= 1)) << line;
    }
    if (count) {
      EXPECT_TRUE(std::isfinite(value) && value >= 0) << line;
    }
  }

  // Every checkpoint the store kept for a task is inside that task's run folder.
  ASSERT_TRUE(coordinator_->Shutdown().ok());
  coordinator_.reset();
  auto store = Store::Open(config_.database);
  ASSERT_TRUE(store.ok()) << store.status();
  auto tasks = (*store)->LoadTasks();
  ASSERT_TRUE(tasks.ok()) << tasks.status();
  for (const TaskRow& task : *tasks) {
    auto checkpoints = (*store)->LoadCheckpoints(task.info.task_id());
    ASSERT_TRUE(checkpoints.ok()) << checkpoints.status();
    for (const Store::CheckpointRow& checkpoint : *checkpoints) {
      EXPECT_TRUE(InsideReal(checkpoint.path, task.info.out_dir()))
          << "stored checkpoint " << checkpoint.path << " of " << task.info.task_id()
          << " outside its run folder (replay: AVIARY_FUZZ_SEED=" << seed_ << ")";
    }
    if (!task.resume_checkpoint.empty()) {
      EXPECT_TRUE(InsideReal(task.resume_checkpoint, task.info.out_dir()))
          << "resume_checkpoint " << task.resume_checkpoint << " of " << task.info.task_id();
    }
    // No task refers to a manifest that pruning deleted.
    if (!task.manifest_hash.empty()) {
      auto stored = (*store)->HasManifest(task.manifest_hash);
      ASSERT_TRUE(stored.ok()) << stored.status();
      EXPECT_TRUE(*stored) << task.info.task_id() << " refers to manifest " << task.manifest_hash
                           << ", which is not stored (replay: AVIARY_FUZZ_SEED=" << seed_ << ")";
    }
  }
  EXPECT_TRUE((*store)->Close().ok());
}

}  // namespace
}  // namespace aviary::coordinator
