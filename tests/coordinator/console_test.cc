// The web console's JSON API (coordinator/console.h) against a real coordinator: a real
// civetweb server on 127.0.0.1:0 over a real SQLite file, the groups played through the gRPC
// stubs, HTTP spoken over a plain socket. Auth (no token, wrong token, the worker's token, the
// viewer's cancel, the login cookie and its CSRF header), the JSON shapes of /api/jobs,
// /api/jobs/{id}, its history, a task's config and /api/groups, the job's event stream, and
// HTTPS with the gRPC port's certificate.
#include "coordinator/console.h"

#include <cmath>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <iterator>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/utf8.h"
#include "coordinator/service.h"
#include "coordinator/tls_front.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/aviary.grpc.pb.h"
#include "tests/coordinator/http_get.h"
#include "tests/coordinator/tiny_dataset.h"

namespace aviary::coordinator {
namespace {

namespace fs = std::filesystem;
using namespace aviary::v1;  // NOLINT: test brevity

struct HttpResponse {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
};

int Connect(int port, int timeout_s) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  timeval tv{timeout_s, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

std::string RequestText(const std::string& method, const std::string& path,
                        const std::vector<std::string>& headers, const std::string& body) {
  // "Host: 127.0.0.1" unless `headers` name one ("Host: x"), or drop it ("Host:").
  bool host = true;
  for (const std::string& h : headers) host = host && !absl::StartsWith(h, "Host:");
  std::string text = absl::StrCat(method, " ", path, " HTTP/1.1\r\n", host ? "Host: 127.0.0.1\r\n" : "",
                                  "Connection: close\r\n");
  for (const std::string& h : headers) {
    if (h != "Host:") absl::StrAppend(&text, h, "\r\n");
  }
  if (!body.empty() || method == "POST") absl::StrAppend(&text, "Content-Length: ", body.size(), "\r\n");
  absl::StrAppend(&text, "\r\n", body);
  return text;
}

HttpResponse Parse(const std::string& raw) {
  HttpResponse response;
  const size_t end = raw.find("\r\n\r\n");
  if (end == std::string::npos) return response;
  std::vector<std::string> lines = absl::StrSplit(raw.substr(0, end), "\r\n");
  std::vector<std::string> first = absl::StrSplit(lines[0], ' ');
  if (first.size() >= 2) (void)absl::SimpleAtoi(first[1], &response.status);
  for (size_t i = 1; i < lines.size(); ++i) {
    const size_t colon = lines[i].find(':');
    if (colon == std::string::npos) continue;
    std::string name = absl::AsciiStrToLower(lines[i].substr(0, colon));
    std::string value(absl::StripAsciiWhitespace(lines[i].substr(colon + 1)));
    response.headers[name] = response.headers.count(name) ? response.headers[name] + "\n" + value : value;
  }
  response.body = raw.substr(end + 4);
  return response;
}

// One HTTP/1.1 request over plain TCP; the whole answer (the server closes the connection).
HttpResponse Http(int port, const std::string& method, const std::string& path,
                  const std::vector<std::string>& headers = {}, const std::string& body = "") {
  const int fd = Connect(port, 30);
  if (fd < 0) return {};
  const std::string request = RequestText(method, path, headers, body);
  std::string raw;
  if (::send(fd, request.data(), request.size(), 0) == static_cast<ssize_t>(request.size())) {
    char buffer[8192];
    ssize_t n;
    while ((n = ::recv(fd, buffer, sizeof(buffer), 0)) > 0) raw.append(buffer, n);
  }
  ::close(fd);
  return Parse(raw);
}

// An event stream: reads until `done` holds for what arrived (or 30 s pass).
class EventStream {
 public:
  EventStream(int port, const std::string& path, const std::vector<std::string>& headers) {
    fd_ = Connect(port, 1);
    const std::string request = RequestText("GET", path, headers, "");
    if (fd_ >= 0) (void)::send(fd_, request.data(), request.size(), 0);
  }
  ~EventStream() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool ReadUntil(const std::function<bool(const std::string&)>& done, int timeout_s = 30) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
    char buffer[8192];
    while (fd_ >= 0 && !closed_ && !done(text_) && std::chrono::steady_clock::now() < deadline) {
      const ssize_t n = ::recv(fd_, buffer, sizeof(buffer), 0);
      if (n == 0) closed_ = true;
      if (n > 0) text_.append(buffer, n);
    }
    return done(text_);
  }
  // Reads until the server closes the stream (true) or `timeout_s` pass (false).
  bool ReadUntilClosed(int timeout_s) {
    ReadUntil([](const std::string&) { return false; }, timeout_s);
    return closed_;
  }
  const std::string& text() const { return text_; }

 private:
  int fd_ = -1;
  bool closed_ = false;
  std::string text_;
};

std::string Bearer(const std::string& token) { return absl::StrCat("Authorization: Bearer ", token); }

// A client that starts a TLS handshake and never finishes it: a record header that announces
// 512 bytes of ClientHello, then one byte every 200 ms, until the server closes the connection
// or Stop().
class Trickler {
 public:
  explicit Trickler(int port) : fd_(Connect(port, 1)) {
    thread_ = std::thread([this] { Run(); });
  }
  ~Trickler() { Stop(); }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // Waits until the server has closed the connection (true) or `timeout_s` pass (false).
  bool WaitClosed(int timeout_s) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
    while (!closed_ && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return closed_;
  }
  bool connected() const { return fd_ >= 0; }

 private:
  void Run() {
    if (fd_ < 0) return;
    const unsigned char header[] = {0x16, 0x03, 0x01, 0x02, 0x00};  // handshake record, 512 bytes
    if (::send(fd_, header, sizeof(header), MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof(header))) closed_ = true;
    while (!stop_ && !closed_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      char byte = 0;
      const ssize_t got = ::recv(fd_, &byte, 1, MSG_DONTWAIT);
      if (got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) closed_ = true;
      if (!closed_ && ::send(fd_, &byte, 1, MSG_NOSIGNAL) != 1) closed_ = true;
    }
  }

  int fd_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> closed_{false};
  std::thread thread_;
};

// A self-signed certificate for 127.0.0.1 in `dir`; false when openssl cannot make one.
bool MakeCertificate(const std::string& dir, std::string* cert, std::string* key) {
  *key = dir + "/tls.key";
  *cert = dir + "/tls.crt";
  const std::string make = absl::StrCat("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
                                        "-addext subjectAltName=IP:127.0.0.1 -keyout ", *key, " -out ", *cert,
                                        " > /dev/null 2>&1");
  return std::system(make.c_str()) == 0;
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

class ConsoleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = absl::StrCat("/tmp/aviary_console_", ::getpid(), "_XXXXXX");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    WriteTinyDataset(root_);
    Write("token", "the-token\n");
    Write("viewer.token", "the-viewer-token\n");
    Write("worker.token", "the-worker-token\n");
    config_ = LoopbackTestConfig(root_);
    config_.metrics_listen = "";
    config_.console_listen = "127.0.0.1:0";
    config_.viewer_token_file = root_ + "/viewer.token";
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

  // Logs in with `token` by the login form; the Cookie header its answer's cookie makes.
  std::string LoginCookie(const std::string& token) {
    HttpResponse login = Http(port_, "POST", "/login", {"Content-Type: application/x-www-form-urlencoded"},
                              "token=" + token + "&next=%2Fjobs");
    EXPECT_EQ(login.status, 303) << login.body;
    const std::string cookie = login.headers["set-cookie"];
    EXPECT_TRUE(absl::StartsWith(cookie, CookieName() + "=")) << cookie;
    return absl::StrCat("Cookie: ", cookie.substr(0, cookie.find(';')));
  }
  // The login cookie's name: the console's port in it.
  std::string CookieName() const { return absl::StrCat("aviary_console_", port_); }

  void Start() {
    auto secrets = LoadCoordinatorSecrets(config_);
    ASSERT_TRUE(secrets.ok()) << secrets.status();
    auto coordinator = Coordinator::Start(config_, *secrets);
    ASSERT_TRUE(coordinator.ok()) << coordinator.status();
    coordinator_ = std::move(*coordinator);
    port_ = coordinator_->console_port();
    ASSERT_GT(port_, 0);
    std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
    if (!config_.tls_cert_file.empty()) {
      grpc::SslCredentialsOptions ssl;
      std::ifstream in(config_.tls_cert_file);
      ssl.pem_root_certs.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
      credentials = grpc::SslCredentials(ssl);
    }
    auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", coordinator_->grpc_port()), credentials);
    jobs_ = JobService::NewStub(channel);
    workers_ = WorkerService::NewStub(channel);
  }

  std::unique_ptr<grpc::ClientContext> Ctx(const std::string& token) {
    auto context = std::make_unique<grpc::ClientContext>();
    context->AddMetadata("authorization", absl::StrCat("Bearer ", token));
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return context;
  }

  std::string Submit(const std::vector<std::string>& overrides = {}) {
    SubmitJobRequest request;
    request.set_pipeline_yaml(kPipeline);
    request.set_working_dir(root_);
    request.set_name("console job");
    for (const std::string& o : overrides) request.add_overrides(o);
    SubmitJobResponse response;
    const grpc::Status status = jobs_->SubmitJob(Ctx("the-token").get(), request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.job_id();
  }

  // A group that leases the job's first task and reports `epochs` epoch ends and a checkpoint.
  std::string RunEpochs(int epochs, std::string* task_id) {
    RegisterGroupRequest reg;
    reg.set_world_size(2);
    reg.add_hosts("node1");
    reg.add_hosts("node1");
    reg.add_devices("cpu");
    reg.add_devices("cpu");
    reg.set_backend("mpi");
    RegisterGroupResponse registered;
    EXPECT_TRUE(workers_->RegisterGroup(Ctx("the-worker-token").get(), reg, &registered).ok());
    LeaseTaskRequest lease;
    lease.set_group_id(registered.group_id());
    LeaseTaskResponse leased;
    EXPECT_TRUE(workers_->LeaseTask(Ctx("the-worker-token").get(), lease, &leased).ok());
    EXPECT_TRUE(leased.available());
    *task_id = leased.task().task_id();
    group_id_ = registered.group_id();
    Report(0, epochs);
    if (epochs == 0) return registered.group_id();
    const std::string out = leased.task().out_dir();
    fs::create_directories(out);
    std::ofstream(out + "/best.pt") << "checkpoint";
    ReportCheckpointRequest ckpt;
    ckpt.set_group_id(group_id_);
    ckpt.set_task_id(*task_id);
    ckpt.set_path(out + "/best.pt");
    ckpt.set_epoch(epochs - 1);
    ckpt.set_best(true);
    ReportCheckpointResponse ignored;
    EXPECT_TRUE(workers_->ReportCheckpoint(Ctx("the-worker-token").get(), ckpt, &ignored).ok());
    return registered.group_id();
  }

  void Report(int from_epoch, int to_epoch) {
    ReportProgressRequest request;
    request.set_group_id(group_id_);
    request.set_task_id(task_id_);
    request.set_steps_per_epoch(10);
    for (int e = from_epoch; e < to_epoch; ++e) {
      Metrics* m = request.add_points();
      m->set_epoch(e);
      m->set_step(10 * (e + 1));
      m->set_epoch_end(true);
      m->set_lr(1e-3);
      m->set_train_loss(2.0 - 0.1 * e);
      m->set_val_loss(1.5);
      m->set_val_auc(0.5 + 0.1 * e);
      m->set_val_roc_auc(0.7);
      m->set_val_cmap(0.6);
      m->set_val_acc(0.5);
      m->set_samples_per_s(123.5);
    }
    ReportProgressResponse response;
    const grpc::Status status = workers_->ReportProgress(Ctx("the-worker-token").get(), request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
  }

  std::string root_;
  CoordinatorConfig config_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<JobService::Stub> jobs_;
  std::unique_ptr<WorkerService::Stub> workers_;
  int port_ = 0;
  std::string group_id_;
  std::string task_id_;
};

TEST_F(ConsoleTest, RefusesCallsWithoutAClientOrViewerToken) {
  Start();
  HttpResponse none = Http(port_, "GET", "/api/jobs");
  EXPECT_EQ(none.status, 401);
  EXPECT_EQ(none.headers["content-type"], "application/json; charset=utf-8");
  EXPECT_TRUE(absl::StrContains(none.body, "\"code\":\"UNAUTHENTICATED\"")) << none.body;
  EXPECT_TRUE(absl::StrContains(none.body, "log in at /login")) << none.body;
  HttpResponse wrong = Http(port_, "GET", "/api/jobs", {Bearer("nope")});
  EXPECT_EQ(wrong.status, 401);
  EXPECT_TRUE(absl::StrContains(wrong.body, "not one of this coordinator's tokens")) << wrong.body;
  HttpResponse worker = Http(port_, "GET", "/api/groups", {Bearer("the-worker-token")});
  EXPECT_EQ(worker.status, 403);
  EXPECT_TRUE(absl::StrContains(worker.body, "role 'worker'")) << worker.body;
  // A page without a token sends the browser to the login form, keeping where it was going.
  HttpResponse page = Http(port_, "GET", "/groups");
  EXPECT_EQ(page.status, 303);
  EXPECT_EQ(page.headers["location"], "/login?next=%2fgroups");
  HttpResponse login = Http(port_, "GET", "/login?next=%2fgroups");
  EXPECT_EQ(login.status, 200);
  EXPECT_TRUE(absl::StrContains(login.body, "name=\"next\" value=\"/groups\"")) << login.body;
  EXPECT_TRUE(absl::StrContains(login.headers["content-security-policy"], "script-src 'self'"));
  // Static files need no token; unknown paths are 404.
  EXPECT_EQ(Http(port_, "GET", "/static/console.js").status, 200);
  EXPECT_EQ(Http(port_, "GET", "/static/nope.js").status, 404);
  EXPECT_EQ(Http(port_, "GET", "/api/nope", {Bearer("the-token")}).status, 404);
}

TEST_F(ConsoleTest, ServesJobsHistoryConfigCheckpointsAndGroups) {
  config_.console_grafana_url = "https://grafana.example/d/aviary";
  Start();
  const std::string job_id = Submit();
  const std::string group = RunEpochs(0, &task_id_);
  Report(0, 2);

  HttpResponse jobs = Http(port_, "GET", "/api/jobs", {Bearer("the-viewer-token")});
  ASSERT_EQ(jobs.status, 200) << jobs.body;
  EXPECT_TRUE(absl::StartsWith(jobs.body, "{\"jobs\":[{\"job_id\":\"" + job_id + "\"")) << jobs.body;
  EXPECT_TRUE(absl::StrContains(jobs.body, "\"state\":\"JOB_STATE_RUNNING\"")) << jobs.body;
  EXPECT_TRUE(absl::StrContains(jobs.body, "\"name\":\"console job\"")) << jobs.body;

  HttpResponse job = Http(port_, "GET", "/api/jobs/" + job_id, {Bearer("the-viewer-token")});
  ASSERT_EQ(job.status, 200) << job.body;
  EXPECT_TRUE(absl::StrContains(job.body, "\"task_id\":\"" + task_id_ + "\"")) << job.body;
  EXPECT_TRUE(absl::StrContains(job.body, "\"state\":\"TASK_STATE_LEASED\"")) << job.body;
  EXPECT_TRUE(absl::StrContains(job.body, "\"checkpoints\":{\"" + task_id_ + "\":[]")) << job.body;
  // ?checkpoints=0: the job without them (the finished page's watch for a retry).
  HttpResponse bare = Http(port_, "GET", "/api/jobs/" + job_id + "?checkpoints=0", {Bearer("the-viewer-token")});
  ASSERT_EQ(bare.status, 200) << bare.body;
  EXPECT_TRUE(absl::StrContains(bare.body, "\"task_id\":\"" + task_id_ + "\"")) << bare.body;
  EXPECT_FALSE(absl::StrContains(bare.body, "\"checkpoints\"")) << bare.body;

  HttpResponse history = Http(port_, "GET", "/api/jobs/" + job_id + "/history", {Bearer("the-viewer-token")});
  ASSERT_EQ(history.status, 200) << history.body;
  EXPECT_TRUE(absl::StrContains(history.body, "\"val_auc\":0.5,")) << history.body;
  EXPECT_TRUE(absl::StrContains(history.body, "\"val_auc\":0.6")) << history.body;
  EXPECT_EQ(std::count(history.body.begin(), history.body.end(), '{') - 1, 2 * 2)  // 2 rows, each with metrics
      << history.body;

  // ?tasks=: those tasks' rows only, named by id or by name within the job; a task without epoch
  // ends has none; a task the job does not have is 404, named.
  const std::string task_name = task_id_.substr(task_id_.find('/') + 1);
  GetJobRequest get;
  get.set_job_id(job_id);
  JobInfo info;
  ASSERT_TRUE(jobs_->GetJob(Ctx("the-token").get(), get, &info).ok());
  ASSERT_GE(info.tasks_size(), 2);
  const std::string other = info.tasks(0).task_id() == task_id_ ? info.tasks(1).task_id() : info.tasks(0).task_id();
  for (const std::string& which : {task_name, task_id_, other + "," + task_name}) {
    HttpResponse only = Http(port_, "GET", "/api/jobs/" + job_id + "/history?tasks=" + which, {Bearer("the-token")});
    ASSERT_EQ(only.status, 200) << which << ": " << only.body;
    EXPECT_EQ(only.body, history.body) << which;
  }
  HttpResponse none = Http(port_, "GET", "/api/jobs/" + job_id + "/history?tasks=" + other, {Bearer("the-token")});
  ASSERT_EQ(none.status, 200) << none.body;
  EXPECT_EQ(none.body, "{\"rows\":[],\"damaged_points_skipped\":\"0\"}");
  for (const char* empty : {"?tasks=", "?tasks=,"}) {  // no task, not every task
    HttpResponse no_task = Http(port_, "GET", "/api/jobs/" + job_id + "/history" + empty, {Bearer("the-token")});
    ASSERT_EQ(no_task.status, 200) << no_task.body;
    EXPECT_EQ(no_task.body, "{\"rows\":[]}") << empty;
  }
  HttpResponse no_such_task =
      Http(port_, "GET", "/api/jobs/" + job_id + "/history?tasks=" + task_name + ",finetune-f9", {Bearer("the-token")});
  EXPECT_EQ(no_such_task.status, 404) << no_such_task.body;
  EXPECT_TRUE(absl::StrContains(no_such_task.body, "job " + job_id + " has no task 'finetune-f9'")) << no_such_task.body;

  HttpResponse config = Http(port_, "GET", absl::StrCat("/api/jobs/", job_id, "/tasks/", task_name, "/config"),
                             {Bearer("the-token")});
  ASSERT_EQ(config.status, 200) << config.body;
  EXPECT_TRUE(absl::StrContains(config.body, "\"flat\":{")) << config.body;
  EXPECT_TRUE(absl::StrContains(config.body, "\"train.epochs\":\"3\"")) << config.body;
  EXPECT_TRUE(absl::StrContains(config.body, "\"folds.selected_folds.1\":\"1\"")) << config.body;

  HttpResponse groups = Http(port_, "GET", "/api/groups", {Bearer("the-viewer-token")});
  ASSERT_EQ(groups.status, 200) << groups.body;
  EXPECT_TRUE(absl::StrContains(groups.body, "\"group_id\":\"" + group + "\",\"world_size\":2,\"hosts\":[\"node1\",\"node1\"],"
                                             "\"devices\":[\"cpu\",\"cpu\"],\"backend\":\"mpi\""))
      << groups.body;
  EXPECT_TRUE(absl::StrContains(groups.body, "\"task_id\":\"" + task_id_ + "\",\"epoch\":1,\"epochs\":3")) << groups.body;
  EXPECT_TRUE(absl::StrContains(groups.body, "\"samples_per_s\":123.5")) << groups.body;
  // A CPU group reports no device memory: null (the page says "not reported").
  EXPECT_TRUE(absl::StrContains(groups.body, "\"gpu_memory_bytes\":null}")) << groups.body;

  HttpResponse session = Http(port_, "GET", "/api/session", {Bearer("the-viewer-token")});
  EXPECT_EQ(session.body, "{\"role\":\"viewer\",\"auth\":true,\"grafana_url\":\"https://grafana.example/d/aviary\"}");

  // Bad and unknown ids.
  EXPECT_EQ(Http(port_, "GET", "/api/jobs/x", {Bearer("the-token")}).status, 400);
  // Another method than the path's: 405, saying the one it takes (the cancel's GET was a 404,
  // "no such API path"; a POST to a reading path a 400).
  HttpResponse get_cancel = Http(port_, "GET", "/api/jobs/j0123456789ab/cancel", {Bearer("the-token")});
  EXPECT_EQ(get_cancel.status, 405) << get_cancel.body;
  EXPECT_EQ(get_cancel.headers["allow"], "POST");
  HttpResponse post_jobs = Http(port_, "POST", "/api/jobs", {Bearer("the-token")});
  EXPECT_EQ(post_jobs.status, 405) << post_jobs.body;
  EXPECT_EQ(post_jobs.headers["allow"], "GET, HEAD");
  EXPECT_TRUE(absl::StrContains(post_jobs.body, "not a method of this path (it takes GET)")) << post_jobs.body;
  HttpResponse unknown = Http(port_, "GET", "/api/jobs/jffffffffffff", {Bearer("the-token")});
  EXPECT_EQ(unknown.status, 404);
  EXPECT_TRUE(absl::StrContains(unknown.body, "no such job")) << unknown.body;
  EXPECT_EQ(Http(port_, "GET", absl::StrCat("/api/jobs/", job_id, "/tasks/nope-f9/config"), {Bearer("the-token")}).status,
            404);
}

TEST_F(ConsoleTest, CheckpointsAppearOnTheJob) {
  Start();
  const std::string job_id = Submit();
  RunEpochs(2, &task_id_);
  HttpResponse job = Http(port_, "GET", "/api/jobs/" + job_id, {Bearer("the-token")});
  ASSERT_EQ(job.status, 200);
  EXPECT_TRUE(absl::StrContains(job.body, "best.pt\",\"epoch\":1,\"best\":true,\"attempt\":1}")) << job.body;
  // ?task=: that task's rows alone (the page's refresh after its epoch ends), not the job.
  HttpResponse one = Http(port_, "GET", "/api/jobs/" + job_id + "?task=" + task_id_, {Bearer("the-token")});
  ASSERT_EQ(one.status, 200) << one.body;
  EXPECT_TRUE(absl::StartsWith(one.body, "{\"checkpoints\":{\"" + task_id_ + "\":[{\"path\":")) << one.body;
  EXPECT_TRUE(absl::StrContains(one.body, "best.pt\",\"epoch\":1,\"best\":true,\"attempt\":1}")) << one.body;
  EXPECT_FALSE(absl::StrContains(one.body, "\"tasks\"")) << one.body;
  HttpResponse other = Http(port_, "GET", "/api/jobs/" + job_id + "?task=" + job_id + "/nope", {Bearer("the-token")});
  EXPECT_EQ(other.status, 404) << other.body;
  EXPECT_TRUE(absl::StrContains(other.body, "has no task '" + job_id + "/nope'")) << other.body;
}

// A token may hold any printable byte; its cookie must carry all of it. civetweb's encoder left
// ';' and ',' as they are: the cookie ended at the ';' and the login let nobody in.
TEST_F(ConsoleTest, ATokenWithCookieSeparatorsLogsIn) {
  Write("token", "semi;colon,x=+y$(z)\n");
  Start();
  HttpResponse login = Http(port_, "POST", "/login", {"Content-Type: application/x-www-form-urlencoded"},
                            "token=semi%3Bcolon%2Cx%3D%2By%24%28z%29&next=%2Fgroups");
  ASSERT_EQ(login.status, 303) << login.body;
  EXPECT_EQ(login.headers["location"], "/groups");
  const std::string cookie = login.headers["set-cookie"];
  const std::string cookie_header = absl::StrCat("Cookie: ", cookie.substr(0, cookie.find(';')));
  HttpResponse page = Http(port_, "GET", "/groups", {cookie_header});
  EXPECT_EQ(page.status, 200) << page.headers["location"];
}

// The cookie holds a signed session, not the token: a browser sends it to every port of the host
// (another service there would read a token kept in it). It outlives a coordinator restart (an
// open console page goes on); logging out ends it, and its event streams; a copy of the cookie
// kept from before is refused, and so is one whose signature does not verify.
TEST_F(ConsoleTest, TheCookieHoldsASessionThatLoggingOutEnds) {
  Start();
  HttpResponse login = Http(port_, "POST", "/login", {"Content-Type: application/x-www-form-urlencoded"},
                            "token=the-viewer-token&next=%2Fjobs");
  ASSERT_EQ(login.status, 303) << login.body;
  const std::string cookie = login.headers["set-cookie"];
  EXPECT_FALSE(absl::StrContains(cookie, "the-viewer-token")) << cookie;
  EXPECT_TRUE(absl::StrContains(cookie, "; Max-Age=43200;")) << cookie;
  const std::string name = CookieName() + "=";
  ASSERT_TRUE(absl::StartsWith(cookie, name)) << cookie;
  const std::string id = cookie.substr(name.size(), cookie.find(';') - name.size());
  const std::vector<std::string> parts = absl::StrSplit(id, '.');
  ASSERT_EQ(parts.size(), 4u) << cookie;
  EXPECT_EQ(parts[3].size(), 64u) << cookie;
  EXPECT_EQ(id.find_first_not_of("0123456789abcdef."), std::string::npos) << cookie;
  std::string session = "Cookie: " + name + id;
  // Two logins, two sessions.
  EXPECT_NE(LoginCookie("the-viewer-token"), session);
  EXPECT_EQ(Http(port_, "GET", "/api/jobs", {session}).status, 200);
  // Its signature covers every part: another expiry, nonce or token id with the same mac fails.
  for (size_t changed = 0; changed < 3; ++changed) {
    std::vector<std::string> forged_parts = parts;
    forged_parts[changed].back() = forged_parts[changed].back() == '1' ? '2' : '1';
    EXPECT_EQ(Http(port_, "GET", "/api/jobs", {"Cookie: " + name + absl::StrJoin(forged_parts, ".")}).status,
              401)
        << changed;
  }
  // A restart keeps it (at the same port, so under the same name: port 0 here picks another).
  ASSERT_TRUE(coordinator_->Shutdown().ok());
  coordinator_.reset();
  Start();
  session = absl::StrCat("Cookie: ", CookieName(), "=", id);
  EXPECT_EQ(Http(port_, "GET", "/api/jobs", {session}).status, 200);
  EventStream stream(port_, "/api/events", {session});
  ASSERT_TRUE(stream.ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: jobs\ndata: {"); }))
      << stream.text();
  // The token itself in the cookie (as it once was) is not a session.
  HttpResponse forged = Http(port_, "GET", "/api/jobs", {absl::StrCat("Cookie: ", CookieName(), "=the-viewer-token")});
  EXPECT_EQ(forged.status, 401) << forged.body;

  HttpResponse out = Http(port_, "POST", "/logout", {session, "X-Aviary-Console: 1"});
  EXPECT_EQ(out.status, 303);
  EXPECT_TRUE(absl::StrContains(out.headers["set-cookie"], "Max-Age=0")) << out.headers["set-cookie"];
  EXPECT_TRUE(stream.ReadUntilClosed(15)) << stream.text();
  HttpResponse after = Http(port_, "GET", "/api/jobs", {session});
  EXPECT_EQ(after.status, 401) << after.body;
  EXPECT_TRUE(absl::StrContains(after.body, "the login session has ended")) << after.body;
  // A page goes to the login without "that token is wrong".
  EXPECT_EQ(Http(port_, "GET", "/groups", {session}).headers["location"], "/login?next=%2fgroups");
}

// The Bearer scheme in any case (RFC 7235), here as on the gRPC port; a POST it carries needs no
// console header (a script's, not a browser's).
TEST_F(ConsoleTest, TheBearerSchemeIsMatchedInAnyCase) {
  Start();
  const std::string job_id = Submit();
  HttpResponse jobs = Http(port_, "GET", "/api/jobs", {"Authorization: bearer the-viewer-token"});
  EXPECT_EQ(jobs.status, 200) << jobs.body;
  HttpResponse cancelled = Http(port_, "POST", "/api/jobs/" + job_id + "/cancel", {"Authorization: BEARER the-token"});
  EXPECT_EQ(cancelled.status, 200) << cancelled.body;
}

TEST_F(ConsoleTest, AViewerCannotCancelAClientCanWithTheCsrfHeader) {
  Start();
  const std::string job_id = Submit();
  const std::string path = "/api/jobs/" + job_id + "/cancel";
  HttpResponse viewer = Http(port_, "POST", path, {Bearer("the-viewer-token")});
  EXPECT_EQ(viewer.status, 403);
  EXPECT_TRUE(absl::StrContains(viewer.body, "the token has role 'viewer' (viewer_token_file); this call needs role "
                                             "'client'"))
      << viewer.body;
  EXPECT_EQ(Http(port_, "POST", path, {"X-Aviary-Console: 1"}).status, 401);
  EXPECT_EQ(Http(port_, "POST", path).status, 403);  // no header: refused before the token is looked at

  // The login cookie: HttpOnly, SameSite=Strict; a POST it authenticates needs the header.
  HttpResponse refused = Http(port_, "POST", "/login", {"Content-Type: application/x-www-form-urlencoded"},
                              "token=wrong&next=%2Fjobs");
  EXPECT_EQ(refused.status, 303);
  EXPECT_TRUE(absl::StartsWith(refused.headers["location"], "/login?error=1")) << refused.headers["location"];
  EXPECT_EQ(refused.headers.count("set-cookie"), 0u);
  HttpResponse login = Http(port_, "POST", "/login", {"Content-Type: application/x-www-form-urlencoded"},
                            "token=the-token&next=%2Fjobs%2F" + job_id);
  ASSERT_EQ(login.status, 303);
  EXPECT_EQ(login.headers["location"], "/jobs/" + job_id);
  const std::string cookie = login.headers["set-cookie"];
  EXPECT_TRUE(absl::StrContains(cookie, "HttpOnly")) << cookie;
  EXPECT_TRUE(absl::StrContains(cookie, "SameSite=Strict")) << cookie;
  const std::string cookie_header = absl::StrCat("Cookie: ", cookie.substr(0, cookie.find(';')));
  EXPECT_EQ(Http(port_, "GET", "/jobs/" + job_id, {cookie_header}).status, 200);
  HttpResponse no_csrf = Http(port_, "POST", path, {cookie_header});
  EXPECT_EQ(no_csrf.status, 403);
  EXPECT_TRUE(absl::StrContains(no_csrf.body, "X-Aviary-Console")) << no_csrf.body;
  HttpResponse cancelled = Http(port_, "POST", path, {cookie_header, "X-Aviary-Console: 1"});
  EXPECT_EQ(cancelled.status, 200) << cancelled.body;
  EXPECT_TRUE(absl::StrContains(cancelled.body, "\"state\":\"JOB_STATE_CANCELLED\"")) << cancelled.body;
  // An open redirect is not possible: "next" stays on this site.
  HttpResponse away = Http(port_, "POST", "/login", {"Content-Type: application/x-www-form-urlencoded"},
                           "token=the-token&next=%2F%2Fevil.example");
  EXPECT_EQ(away.headers["location"], "/jobs");
  // Nor a login from another site's page (login CSRF: its author's token in this browser's
  // cookie), said by its Origin or by Sec-Fetch-Site; this console's own form logs in.
  for (const std::string& from : {std::string("Origin: http://evil.example"), std::string("Origin: null"),
                                  std::string("Sec-Fetch-Site: cross-site"), std::string("Sec-Fetch-Site: same-site")}) {
    HttpResponse csrf =
        Http(port_, "POST", "/login", {"Content-Type: application/x-www-form-urlencoded", from}, "token=the-token");
    EXPECT_EQ(csrf.status, 403) << from;
    EXPECT_EQ(csrf.headers.count("set-cookie"), 0u) << from;
  }
  HttpResponse own = Http(port_, "POST", "/login",
                          {"Content-Type: application/x-www-form-urlencoded", "Origin: http://127.0.0.1",
                           "Sec-Fetch-Site: same-origin"},
                          "token=the-token");
  EXPECT_EQ(own.status, 303);
  EXPECT_EQ(own.headers.count("set-cookie"), 1u);
  // A browser that sends no Sec-Fetch-Site (plain HTTP to another host than localhost): its
  // Origin against the Host it asked for, port included, or a reverse proxy's X-Forwarded-Host.
  const std::string here = absl::StrCat("127.0.0.1:", port_);
  for (const std::vector<std::string>& headers :
       {std::vector<std::string>{"Host: " + here, "Origin: http://" + here},
        std::vector<std::string>{"Host: backend:8080", "X-Forwarded-Host: " + here, "Origin: http://" + here}}) {
    std::vector<std::string> with = headers;
    with.push_back("Content-Type: application/x-www-form-urlencoded");
    HttpResponse origin_only = Http(port_, "POST", "/login", with, "token=the-token");
    EXPECT_EQ(origin_only.status, 303) << headers[0];
  }
  HttpResponse other_port = Http(port_, "POST", "/login",
                                 {"Host: " + here, "Origin: http://127.0.0.1:1",
                                  "Content-Type: application/x-www-form-urlencoded"},
                                 "token=the-token");
  EXPECT_EQ(other_port.status, 403);
}

TEST_F(ConsoleTest, APostWithoutAnAuthorizationHeaderNeedsTheConsolesHeader) {
  Start();
  const std::string job_id = Submit();
  // Log out is a POST too: a form on another site must not be able to send it.
  HttpResponse logout = Http(port_, "POST", "/logout");
  EXPECT_EQ(logout.status, 403);
  EXPECT_TRUE(absl::StrContains(logout.body, "X-Aviary-Console")) << logout.body;
  HttpResponse out = Http(port_, "POST", "/logout", {"X-Aviary-Console: 1"});
  EXPECT_EQ(out.status, 303);
  EXPECT_TRUE(absl::StrContains(out.headers["set-cookie"], "Max-Age=0")) << out.headers["set-cookie"];
  // A bearer token (a script) needs no header: no browser sends it on its own.
  HttpResponse cancelled = Http(port_, "POST", "/api/jobs/" + job_id + "/cancel", {Bearer("the-token")});
  EXPECT_EQ(cancelled.status, 200) << cancelled.body;
}

TEST_F(ConsoleTest, WithoutAuthenticationAPostNeedsTheHeaderAndTheHostMustBeThisMachine) {
  config_.token_file.clear();
  config_.viewer_token_file.clear();
  config_.worker_token_file.clear();
  config_.allow_no_auth = true;
  Start();
  const std::string job_id = Submit();
  const std::string path = "/api/jobs/" + job_id + "/cancel";
  // A cross-site form: no header (it used to pass, since no cookie authenticated it).
  HttpResponse form = Http(port_, "POST", path, {"Origin: http://evil.example"});
  EXPECT_EQ(form.status, 403);
  EXPECT_TRUE(absl::StrContains(form.body, "X-Aviary-Console")) << form.body;
  // The same with the Basic credentials a browser adds by itself (a proxy's login in front).
  EXPECT_EQ(Http(port_, "POST", path, {"Authorization: Basic dXNlcjpwYXNz"}).status, 403);
  // DNS rebinding: a page of evil.example whose name now points here. Refused by its Host.
  HttpResponse rebound = Http(port_, "GET", "/api/jobs", {"Host: evil.example:" + std::to_string(port_)});
  EXPECT_EQ(rebound.status, 403);
  EXPECT_TRUE(absl::StrContains(rebound.body, "Host 'evil.example:")) << rebound.body;
  EXPECT_TRUE(absl::StrContains(rebound.body, "DNS rebinding")) << rebound.body;
  EXPECT_FALSE(absl::StrContains(rebound.body, job_id)) << rebound.body;
  EXPECT_EQ(Http(port_, "POST", path, {"Host: evil.example", "X-Aviary-Console: 1"}).status, 403);
  // Addresses, localhost and this machine's own name are served.
  char name[256] = {};
  ASSERT_EQ(::gethostname(name, sizeof(name) - 1), 0);
  for (const std::string& host : {std::string("127.0.0.1"), absl::StrCat("127.0.0.1:", port_), std::string("[::1]:8470"), std::string("[fe80::1%25eth0]:8470"),
                                  absl::StrCat("localhost:", port_), std::string("LOCALHOST."), std::string(name),
                                  std::string("Host:")}) {
    const std::string header = host == "Host:" ? host : "Host: " + host;  // "Host:": none (HTTP/1.0 style)
    HttpResponse jobs = Http(port_, "GET", "/api/jobs", {header});
    EXPECT_EQ(jobs.status, 200) << host << ": " << jobs.body;
  }
  HttpResponse cancelled = Http(port_, "POST", path, {"X-Aviary-Console: 1"});
  EXPECT_EQ(cancelled.status, 200) << cancelled.body;
}

TEST_F(ConsoleTest, ErrorsAreValidJsonAndHeadOpensNoStream) {
  Start();
  // A path that is not UTF-8, with U+2028, echoed in the error: valid UTF-8, both escaped.
  HttpResponse bad = Http(port_, "GET", "/api/%ff%e2%80%a8x", {Bearer("the-token")});
  EXPECT_EQ(bad.status, 404);
  EXPECT_EQ(common::FirstInvalidUtf8(bad.body), std::string::npos) << bad.body;
  EXPECT_TRUE(absl::StrContains(bad.body, "/api/\\ufffd\\u2028x")) << bad.body;
  // HEAD on an event stream: the headers and no events (it used to send the stream's events and
  // keep the connection).
  HttpResponse head = Http(port_, "HEAD", "/api/events", {Bearer("the-token")});
  EXPECT_EQ(head.status, 200);
  EXPECT_EQ(head.headers["content-type"], "text/event-stream");
  EXPECT_EQ(head.body, "");
  // The job list says how many it shows at most.
  EXPECT_TRUE(absl::StrContains(Http(port_, "GET", "/api/jobs", {Bearer("the-token")}).body, "\"limit\":200,\"omitted\":0,\"beyond_limit\":0}"));
}

TEST_F(ConsoleTest, LoginNextRefusesControlCharactersAndOtherHosts) {
  Start();
  auto login = [&](const std::string& next) {
    return Http(port_, "POST", "/login", {"Content-Type: application/x-www-form-urlencoded"},
                "token=the-token&next=" + next);
  };
  // Browsers drop a tab from a URL: "/\t/evil.example" would be "//evil.example".
  for (const char* next : {"%2F%09%2Fevil.example", "%2F%0A%2Fevil.example", "%2F%0D%2Fevil.example",
                           "%2F%5C%2Fevil.example", "%2Fjobs%2F%2Fevil.example", "https%3A%2F%2Fevil.example",
                           "%2Fa%20b", "%2Fa%22b", "%2Fa%00b"}) {
    HttpResponse away = login(next);
    EXPECT_EQ(away.status, 303) << next;
    EXPECT_EQ(away.headers["location"], "/jobs") << next;
  }
  // CR LF in `next` would start a header of its own.
  HttpResponse injected = login("%2Fx%0D%0AX-Injected:%201");
  EXPECT_EQ(injected.status, 303);
  EXPECT_EQ(injected.headers["location"], "/jobs");
  EXPECT_EQ(injected.headers.count("x-injected"), 0u);
  EXPECT_TRUE(absl::StartsWith(injected.headers["set-cookie"], CookieName() + "=")) << injected.headers["set-cookie"];
  // The form's hidden field gets the same check.
  HttpResponse form = Http(port_, "GET", "/login?next=%2F%09%2Fevil.example");
  EXPECT_EQ(form.status, 200);
  EXPECT_TRUE(absl::StrContains(form.body, "name=\"next\" value=\"/jobs\"")) << form.body;
  EXPECT_FALSE(absl::StrContains(form.body, "evil.example")) << form.body;
  // A refused login keeps a safe `next` and drops an unsafe one.
  HttpResponse refused = Http(port_, "POST", "/login", {"Content-Type: application/x-www-form-urlencoded"},
                              "token=wrong&next=%2Fx%0D%0AX-Injected:%201");
  EXPECT_EQ(refused.headers["location"], "/login?error=1&next=%2fjobs");
  EXPECT_EQ(refused.headers.count("x-injected"), 0u);
  // A path of this site with a query still goes through.
  EXPECT_EQ(login("%2Fcompare%3Fjobs%3Dj000000000001%2Cj000000000002").headers["location"],
            "/compare?jobs=j000000000001,j000000000002");
}

TEST_F(ConsoleTest, ThePageRedirectToLoginKeepsTheQuery) {
  Start();
  HttpResponse page = Http(port_, "GET", "/compare?jobs=j000000000001,j000000000002");
  EXPECT_EQ(page.status, 303);
  const std::string location = page.headers["location"];
  EXPECT_EQ(location, "/login?next=%2fcompare%3fjobs%3dj000000000001,j000000000002");
  // The form carries it, and the login goes back to it.
  HttpResponse form = Http(port_, "GET", location);
  EXPECT_EQ(form.status, 200);
  EXPECT_TRUE(absl::StrContains(form.body, "name=\"next\" value=\"/compare?jobs=j000000000001,j000000000002\""))
      << form.body;
  HttpResponse login = Http(port_, "POST", "/login", {"Content-Type: application/x-www-form-urlencoded"},
                            "token=the-token&next=%2Fcompare%3Fjobs%3Dj000000000001%2Cj000000000002");
  EXPECT_EQ(login.headers["location"], "/compare?jobs=j000000000001,j000000000002");
  // Without a query the target is the path alone.
  EXPECT_EQ(Http(port_, "GET", "/jobs").headers["location"], "/login?next=%2fjobs");
}

TEST_F(ConsoleTest, StreamsEndWhenAReloadRevokesTheirToken) {
  Start();
  const std::string job_id = Submit();
  EventStream job_stream(port_, "/api/jobs/" + job_id + "/events", {Bearer("the-viewer-token")});
  ASSERT_TRUE(job_stream.ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: job\ndata: {"); }))
      << job_stream.text();
  EventStream overview(port_, "/api/events", {LoginCookie("the-viewer-token")});
  ASSERT_TRUE(overview.ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: jobs\ndata: {"); }))
      << overview.text();
  // A stream whose token stays keeps going.
  EventStream kept(port_, "/api/events", {Bearer("the-token")});
  ASSERT_TRUE(kept.ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: jobs\ndata: {"); }))
      << kept.text();
  // SIGHUP's reload with another viewer token: the old one no longer authenticates.
  Write("viewer.token", "another-viewer-token\n");
  ASSERT_TRUE(coordinator_->ReloadTokens().ok());
  EXPECT_TRUE(job_stream.ReadUntilClosed(15)) << job_stream.text();
  EXPECT_TRUE(overview.ReadUntilClosed(15)) << overview.text();
  EXPECT_FALSE(kept.ReadUntilClosed(2)) << kept.text();
}

// One token holds at most 16 event streams (of the console's 48): the 17th is refused with 429
// naming the limit, and another token still gets one.
// A browser keeps cookies per host, not per port: two consoles on one host (or two `ssh -L`
// tunnels to localhost) took one cookie name, and a login at one logged the other out. Another
// service on the host may also set a cookie of the name for a longer path, which the browser
// sends first: the session is found among them.
TEST_F(ConsoleTest, EachConsolesLoginCookieIsItsOwn) {
  Start();
  const std::string mine = LoginCookie("the-viewer-token");
  const std::string value = mine.substr(mine.find('=') + 1);
  // The same session under another console's name is no login here.
  const std::string other = absl::StrCat("Cookie: aviary_console_", port_ + 1, "=", value);
  EXPECT_EQ(Http(port_, "GET", "/api/jobs", {other}).status, 401);
  // Shadowed by a cookie of the same name set for /api by someone else: still this login.
  const std::string shadowed = absl::StrCat("Cookie: ", CookieName(), "=junk; ", mine.substr(strlen("Cookie: ")));
  EXPECT_EQ(Http(port_, "GET", "/api/jobs", {shadowed}).status, 200);
  // A logout ends it however it came.
  HttpResponse out = Http(port_, "POST", "/logout", {shadowed, "X-Aviary-Console: 1"});
  EXPECT_EQ(out.status, 303);
  EXPECT_TRUE(absl::StartsWith(out.headers["set-cookie"], CookieName() + "=; ")) << out.headers["set-cookie"];
  EXPECT_EQ(Http(port_, "GET", "/api/jobs", {mine}).status, 401);
}

// Logged-out sessions are remembered until they expire, at most 4,096: anyone with a token
// could log in and out 4,096 times until another user's logout was forgotten, and a copy of that
// cookie taken before worked again. Past the bound a logout ends every session of its token
// begun before it, and none is forgotten early.
TEST_F(ConsoleTest, LoggingOutManyTimesForgetsNoOtherLogout) {
  Start();
  const std::string victim = LoginCookie("the-token");
  ASSERT_EQ(Http(port_, "POST", "/logout", {victim, "X-Aviary-Console: 1"}).status, 303);
  ASSERT_EQ(Http(port_, "GET", "/api/jobs", {victim}).status, 401);
  const std::string kept = LoginCookie("the-token");  // the victim's login after the logout
  for (int i = 0; i < 4100; ++i) {
    const std::string own = LoginCookie("the-viewer-token");
    ASSERT_EQ(Http(port_, "POST", "/logout", {own, "X-Aviary-Console: 1"}).status, 303) << i;
  }
  EXPECT_EQ(Http(port_, "GET", "/api/jobs", {victim}).status, 401);
  EXPECT_EQ(Http(port_, "GET", "/api/jobs", {kept}).status, 200);  // another token's: untouched
  // Past the bound, the viewer token's sessions begun before its latest logout (to the second)
  // are ended too; a login after it is not.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  const std::string later = LoginCookie("the-viewer-token");
  EXPECT_EQ(Http(port_, "GET", "/api/jobs", {later}).status, 200);
}

// The per-holder stream limit counts a login, not its token: one viewer token pasted by a whole
// team (as `aviary-coordinator init` writes one) is many browsers. A token has twice that over
// its logins: logging in again and again is no way to every stream.
TEST_F(ConsoleTest, AStreamLimitPerLoginNotPerToken) {
  Start();
  std::vector<std::unique_ptr<EventStream>> streams;
  for (const char* who : {"first", "colleague"}) {
    const std::string login = LoginCookie("the-viewer-token");
    for (int i = 0; i < 16; ++i) {
      streams.push_back(std::make_unique<EventStream>(port_, "/api/events", std::vector<std::string>{login}));
      ASSERT_TRUE(streams.back()->ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: jobs\ndata: {"); }))
          << who << " " << i << ": " << streams.back()->text();
    }
    HttpResponse refused = Http(port_, "GET", "/api/events", {login});
    EXPECT_EQ(refused.status, 429) << refused.body;
    EXPECT_TRUE(absl::StrContains(refused.body, "this login has 16 event streams open already")) << refused.body;
  }
  HttpResponse third = Http(port_, "GET", "/api/events", {LoginCookie("the-viewer-token")});
  EXPECT_EQ(third.status, 429) << third.body;
  EXPECT_TRUE(absl::StrContains(third.body, "this token has 32 event streams open already")) << third.body;
  EventStream client(port_, "/api/events", {LoginCookie("the-token")});  // another token's
  EXPECT_TRUE(client.ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: jobs\ndata: {"); }))
      << client.text();
}

TEST_F(ConsoleTest, OneTokenCannotTakeEveryEventStream) {
  Start();
  std::vector<std::unique_ptr<EventStream>> streams;
  for (int i = 0; i < 16; ++i) {
    streams.push_back(std::make_unique<EventStream>(port_, "/api/events", std::vector<std::string>{Bearer("the-token")}));
    ASSERT_TRUE(streams.back()->ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: jobs\ndata: {"); }))
        << i << ": " << streams.back()->text();
  }
  HttpResponse refused = Http(port_, "GET", "/api/events", {Bearer("the-token")});
  EXPECT_EQ(refused.status, 429) << refused.body;
  EXPECT_TRUE(absl::StrContains(refused.body, "this token has 16 event streams open already")) << refused.body;
  EventStream other(port_, "/api/events", {Bearer("the-viewer-token")});
  EXPECT_TRUE(other.ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: jobs\ndata: {"); }))
      << other.text();
}

// Without authentication any token passes, so streams are counted by address: a new made-up
// token per stream is no way around the limit.
TEST_F(ConsoleTest, WithoutAuthenticationStreamsAreCountedByAddress) {
  config_.token_file.clear();
  config_.viewer_token_file.clear();
  config_.worker_token_file.clear();
  config_.allow_no_auth = true;
  Start();
  std::vector<std::unique_ptr<EventStream>> streams;
  for (int i = 0; i < 16; ++i) {
    streams.push_back(std::make_unique<EventStream>(port_, "/api/events",
                                                    std::vector<std::string>{Bearer(absl::StrCat("made-up-", i))}));
    ASSERT_TRUE(streams.back()->ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: jobs\ndata: {"); }))
        << i << ": " << streams.back()->text();
  }
  HttpResponse refused = Http(port_, "GET", "/api/events", {Bearer("made-up-16")});
  EXPECT_EQ(refused.status, 429) << refused.body;
}

TEST_F(ConsoleTest, TheJobStreamSendsEachEpochAsItArrives) {
  Start();
  const std::string job_id = Submit();
  RunEpochs(0, &task_id_);
  EventStream stream(port_, "/api/jobs/" + job_id + "/events", {Bearer("the-viewer-token")});
  ASSERT_TRUE(stream.ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: job\ndata: {"); }))
      << stream.text();
  EXPECT_TRUE(absl::StrContains(stream.text(), "Content-Type: text/event-stream")) << stream.text();
  EXPECT_FALSE(absl::StrContains(stream.text(), "\"epoch_end\":true"));
  Report(0, 1);
  ASSERT_TRUE(stream.ReadUntil([&](const std::string& t) {
    return absl::StrContains(t, "\"task_id\":\"" + task_id_ + "\",\"metrics\":{\"epoch\":0");
  })) << stream.text();
  EXPECT_TRUE(absl::StrContains(stream.text(), "\"epoch_end\":true")) << stream.text();
  // The overview stream: jobs and groups.
  EventStream overview(port_, "/api/events", {Bearer("the-token")});
  EXPECT_TRUE(overview.ReadUntil([&](const std::string& t) {
    return absl::StrContains(t, "event: jobs\ndata: {\"jobs\":[{\"job_id\":\"" + job_id) &&
           absl::StrContains(t, "event: groups\ndata: {\"groups\":[{");
  })) << overview.text();
  // The groups page's: groups only (a tick writes jobs before groups, so none came).
  EventStream groups(port_, "/api/events?topics=groups", {Bearer("the-token")});
  EXPECT_TRUE(groups.ReadUntil([&](const std::string& t) { return absl::StrContains(t, "event: groups\ndata: {"); }))
      << groups.text();
  EXPECT_FALSE(absl::StrContains(groups.text(), "event: jobs")) << groups.text();
  HttpResponse unknown = Http(port_, "GET", "/api/events?topics=groups,gpus", {Bearer("the-token")});
  EXPECT_EQ(unknown.status, 400) << unknown.body;
  EXPECT_TRUE(absl::StrContains(unknown.body, "'gpus' is not jobs or groups")) << unknown.body;
  // A quiet stream says it is alive with a `ping` event (3 s), which the page's script sees (a
  // comment line would not reach it).
  EXPECT_TRUE(stream.ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: ping\ndata: {}\n\n"); }))
      << stream.text();
}

// Step points in quick succession reach a job's stream at most once a second, the last one
// included (each event carries the whole job: a sweep's reports made megabytes a minute per
// page); an epoch end goes at once.
TEST_F(ConsoleTest, TheJobStreamHoldsBackStepPointsThatComeFast) {
  Start();
  const std::string job_id = Submit();
  RunEpochs(0, &task_id_);
  Report(0, 1);
  EventStream stream(port_, "/api/jobs/" + job_id + "/events", {Bearer("the-viewer-token")});
  ASSERT_TRUE(stream.ReadUntil([](const std::string& t) { return absl::StrContains(t, "event: job\ndata: {"); }))
      << stream.text();
  for (int step = 11; step <= 19; ++step) {  // epoch 1 ends at step 20
    ReportProgressRequest request;
    request.set_group_id(group_id_);
    request.set_task_id(task_id_);
    request.set_steps_per_epoch(10);
    Metrics* m = request.add_points();
    m->set_epoch(1);
    m->set_step(step);
    m->set_lr(1e-3);
    m->set_train_loss(1.0);
    for (auto set : {&Metrics::set_train_acc, &Metrics::set_val_loss, &Metrics::set_val_auc, &Metrics::set_val_roc_auc,
                     &Metrics::set_val_cmap, &Metrics::set_val_acc, &Metrics::set_samples_per_s}) {
      (m->*set)(std::nan(""));
    }
    ReportProgressResponse response;
    ASSERT_TRUE(workers_->ReportProgress(Ctx("the-worker-token").get(), request, &response).ok());
  }
  // The last step point arrives (held back, then sent by a tick).
  ASSERT_TRUE(stream.ReadUntil([](const std::string& t) { return absl::StrContains(t, "\"step\":\"19\""); }))
      << stream.text();
  const std::string text = stream.text();
  size_t events = 0;
  for (size_t at = text.find("event: job\n"); at != std::string::npos; at = text.find("event: job\n", at + 1)) ++events;
  EXPECT_LE(events, 5u) << "9 step points in quick succession: " << events << " events (one more: the first)";
  Report(1, 2);
  EXPECT_TRUE(stream.ReadUntil([&](const std::string& t) {
    return absl::StrContains(t, "\"task_id\":\"" + task_id_ + "\",\"metrics\":{\"epoch\":1");
  })) << stream.text();
}

// Behind a proxy with its own Basic login (nginx auth_basic forwards the header), the console's
// cookie decides: the header of another scheme is not a token.
TEST_F(ConsoleTest, AProxysBasicCredentialsLeaveTheCallToTheCookie) {
  Start();
  const std::vector<std::string> headers = {"Authorization: Basic dXNlcjpwYXNz", LoginCookie("the-viewer-token")};
  HttpResponse jobs = Http(port_, "GET", "/api/jobs", headers);
  EXPECT_EQ(jobs.status, 200) << jobs.body;
  HttpResponse bare = Http(port_, "GET", "/api/jobs", {"Authorization: Basic dXNlcjpwYXNz"});
  EXPECT_EQ(bare.status, 401) << bare.body;
  EXPECT_EQ(bare.headers["www-authenticate"], "Bearer realm=\"aviary\"");  // RFC 9110: a 401 says how
  // A page: the login form, without "that token is not ours" (no token of ours was sent); a bearer
  // token that fails says so.
  EXPECT_EQ(Http(port_, "GET", "/jobs", {"Authorization: Basic dXNlcjpwYXNz"}).headers["location"],
            "/login?next=%2fjobs");
  EXPECT_EQ(Http(port_, "GET", "/jobs", {Bearer("not-a-token")}).headers["location"], "/login?next=%2fjobs&error=1");
}

TEST_F(ConsoleTest, CancellingAJobThatHasEndedAnswersItsState) {
  // The page's confirm dialog was open while the job failed: the answer says FAILED (the page
  // says "had already ended"), and nothing is cancelled.
  Start();
  const std::string job_id = Submit();
  RunEpochs(1, &task_id_);
  FailTaskRequest fail;
  fail.set_group_id(group_id_);
  fail.set_task_id(task_id_);
  fail.set_error("out of memory");
  FailTaskResponse failed;
  ASSERT_TRUE(workers_->FailTask(Ctx("the-worker-token").get(), fail, &failed).ok());
  HttpResponse cancel = Http(port_, "POST", "/api/jobs/" + job_id + "/cancel", {Bearer("the-token")});
  EXPECT_EQ(cancel.status, 200) << cancel.body;
  EXPECT_TRUE(absl::StrContains(cancel.body, "\"state\":\"JOB_STATE_FAILED\"")) << cancel.body;
}

TEST_F(ConsoleTest, StatusCodesFollowTheErrorsKind) {
  Start();
  HttpResponse put = Http(port_, "PUT", "/login");
  EXPECT_EQ(put.status, 405) << put.body;
  EXPECT_EQ(put.headers["allow"], "GET, HEAD, POST");
  EXPECT_TRUE(absl::StrContains(put.body, "/login: PUT is not GET or POST")) << put.body;
  EXPECT_EQ(HttpStatusFor(absl::AlreadyExistsError("x")), 409);
  EXPECT_EQ(HttpStatusFor(absl::AbortedError("x")), 409);
  EXPECT_EQ(HttpStatusFor(absl::OutOfRangeError("x")), 400);
  EXPECT_EQ(HttpStatusFor(absl::DeadlineExceededError("x")), 504);
  EXPECT_EQ(HttpStatusFor(absl::UnimplementedError("x")), 501);
  EXPECT_EQ(HttpStatusFor(absl::InternalError("x")), 500);
  EXPECT_EQ(HttpStatusFor(absl::UnknownError("x")), 500);
}

TEST_F(ConsoleTest, ServesHttpsWithTheCoordinatorsCertificate) {
  const std::string key = root_ + "/tls.key", cert = root_ + "/tls.crt";
  const std::string make = absl::StrCat("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
                                        "-addext subjectAltName=IP:127.0.0.1 -keyout ", key, " -out ", cert,
                                        " > /dev/null 2>&1");
  ASSERT_EQ(std::system(make.c_str()), 0) << "openssl could not make a certificate";
  config_.tls_cert_file = cert;
  config_.tls_key_file = key;
  Start();
  const std::string job_id = Submit();
  RunEpochs(0, &task_id_);
  // curl (a real TLS client) trusts the self-signed certificate; the answer, the login cookie
  // (Secure over HTTPS) and an event stream come through the TLS front.
  auto curl = [&](const std::string& args) {
    return CommandOutput(absl::StrCat("curl -s -i --max-time 20 --cacert ", cert, " ", args));
  };
  const std::string base = absl::StrCat("https://127.0.0.1:", port_);
  const std::string jobs = curl(absl::StrCat("-H 'Authorization: Bearer the-viewer-token' ", base, "/api/jobs"));
  EXPECT_TRUE(absl::StartsWith(jobs, "HTTP/1.1 200")) << jobs;
  EXPECT_TRUE(absl::StrContains(jobs, "{\"jobs\":[{\"job_id\":\"" + job_id + "\"")) << jobs;
  const std::string login = curl(absl::StrCat("-d token=the-viewer-token -d next=/jobs ", base, "/login"));
  EXPECT_TRUE(absl::StrContains(login, "; Path=/; Max-Age=43200; HttpOnly; SameSite=Strict; Secure")) << login;
  // "__Host-": a cookie no sibling host and no plain-HTTP page can set (nor one for a path).
  EXPECT_TRUE(absl::StrContains(login, absl::StrCat("Set-Cookie: __Host-aviary_console_", port_, "="))) << login;
  // The stream stays open (the job runs): curl's start, the TLS handshake and the first event
  // must come within --max-time, on a loaded machine too.
  const std::string stream = curl(absl::StrCat("--max-time 8 -H 'Authorization: Bearer the-token' ", base, "/api/jobs/",
                                               job_id, "/events"));
  EXPECT_TRUE(absl::StrContains(stream, "event: job\ndata: {\"job\":{\"job_id\":\"" + job_id)) << stream;
  // Plain HTTP on the console's port gets no answer.
  EXPECT_EQ(Http(port_, "GET", "/api/jobs", {Bearer("the-viewer-token")}).status, 0);
}

// A client that trickles its handshake a byte at a time is cut off at the handshake deadline
// (not kept while each read brings a byte), and Stop() does not wait for it.
TEST_F(ConsoleTest, TheTlsFrontCutsATricklingHandshakeAtItsDeadline) {
  std::string cert, key;
  ASSERT_TRUE(MakeCertificate(root_, &cert, &key)) << "openssl could not make a certificate";
  auto front = TlsFront::Start("127.0.0.1:0", 1, ReadText(cert), ReadText(key), /*handshake_timeout_ms=*/1000);
  ASSERT_TRUE(front.ok()) << front.status();
  Trickler trickler((*front)->port());
  ASSERT_TRUE(trickler.connected());
  EXPECT_TRUE(trickler.WaitClosed(15)) << "the server kept a handshake that trickled for 15 s (deadline 1 s)";
  trickler.Stop();

  auto front2 = TlsFront::Start("127.0.0.1:0", 1, ReadText(cert), ReadText(key));  // the 10 s default
  ASSERT_TRUE(front2.ok()) << front2.status();
  Trickler held((*front2)->port());
  ASSERT_TRUE(held.connected());
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the server is inside SSL_accept
  auto stopped = std::async(std::launch::async, [&] { (*front2)->Stop(); });
  EXPECT_EQ(stopped.wait_for(std::chrono::seconds(5)), std::future_status::ready)
      << "TlsFront::Stop waited for a trickling handshake";
  EXPECT_TRUE(held.WaitClosed(5));
  held.Stop();
  stopped.wait();
}

// The same through the coordinator: with a handshake trickling into the console, Shutdown
// returns promptly (SIGTERM).
TEST_F(ConsoleTest, ShutdownDoesNotWaitForATricklingTlsHandshake) {
  std::string cert, key;
  ASSERT_TRUE(MakeCertificate(root_, &cert, &key)) << "openssl could not make a certificate";
  config_.tls_cert_file = cert;
  config_.tls_key_file = key;
  Start();
  Trickler trickler(port_);
  ASSERT_TRUE(trickler.connected());
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  auto shutdown = std::async(std::launch::async, [&] { return coordinator_->Shutdown(); });
  EXPECT_EQ(shutdown.wait_for(std::chrono::seconds(8)), std::future_status::ready)
      << "Coordinator::Shutdown waited for a trickling TLS handshake";
  trickler.Stop();
  EXPECT_TRUE(shutdown.get().ok());
  coordinator_.reset();
}

TEST_F(ConsoleTest, ConfigKeysAreChecked) {
  config_.console_listen = "nowhere";
  EXPECT_TRUE(absl::StrContains(ValidateCoordinatorConfig(config_).message(),
                                "key 'console_listen': 'nowhere' is not HOST:PORT"));
  config_.console_listen = "127.0.0.1:0";
  config_.console_grafana_url = "grafana:3000";
  EXPECT_TRUE(absl::StrContains(ValidateCoordinatorConfig(config_).message(),
                                "key 'console_grafana_url': 'grafana:3000' is not an http:// or https:// URL"));
}

}  // namespace
}  // namespace aviary::coordinator
