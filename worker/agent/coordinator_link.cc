#include "worker/agent/coordinator_link.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "common/content_hash.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/tokens.h"
#include "common/utf8.h"
#include "worker/agent/signals.h"

namespace aviary::worker {
namespace {

namespace v1 = ::aviary::v1;
using Clock = std::chrono::steady_clock;

const common::Logger& Log() {
  static const common::Logger logger("agent");
  return logger;
}

// Progress points per ReportProgress call, at most.
constexpr size_t kMaxPointsPerReport = 1000;

// Transport-level failures worth retrying (the coordinator is down, restarting or slow).
bool IsTransient(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::ABORTED:
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::UNKNOWN:
    case grpc::StatusCode::CANCELLED:
      return true;
    default:
      return false;
  }
}

std::string GrpcCodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

const char* RpcName(Report::Kind kind) {
  switch (kind) {
    case Report::Kind::kPoint: return "ReportProgress";
    case Report::Kind::kCheckpoint: return "ReportCheckpoint";
    case Report::Kind::kComplete: return "CompleteTask";
    case Report::Kind::kFail: return "FailTask";
  }
  return "?";
}

// A failure's message as FailTask takes it: not empty, at most 64 KiB, valid UTF-8. Refused, the
// report would be dropped and the task left leased to a group that has stopped it.
std::string FailureText(const std::string& error) {
  if (error.empty()) return "(no message)";
  constexpr size_t kMaxBytes = 60 * 1024;  // the coordinator takes 64 KiB
  const std::string valid = common::ValidUtf8(error);  // U+FFFD is 3 bytes: cut after
  std::string text(common::Utf8Prefix(valid, kMaxBytes));
  if (text.size() < valid.size()) text += " [cut]";
  return text;
}

// The point a refused ReportProgress names ("field 'points[i]...'", coordinator/service.cc and
// scheduler.cc), when it is one of the `n` sent and the fault is its own (a value out of range,
// an epoch outside the plan). Not for an epoch or step "less than" the one before: a point that
// jumped ahead makes the next one look wrong, and dropping that one would keep the bad point
// and have every later point refused.
std::optional<size_t> RefusedPoint(const std::string& message, size_t n) {
  if (absl::StrContains(message, " is less than the ")) return std::nullopt;
  constexpr absl::string_view kField = "field 'points[";
  const size_t at = absl::string_view(message).find(kField);
  if (at == std::string::npos) return std::nullopt;
  const size_t from = at + kField.size();
  const size_t close = message.find(']', from);
  size_t index = 0;
  if (close == std::string::npos || !absl::SimpleAtoi(absl::string_view(message).substr(from, close - from), &index) ||
      index >= n) {
    return std::nullopt;
  }
  return index;
}

}  // namespace

absl::StatusOr<std::string> ReadTokenFile(const AgentOptions& options) {
  auto text = common::ReadFileToString(options.token_file);
  if (!text.ok()) return common::Annotate(text.status(), options.token_source);
  return common::FirstToken(*text, options.token_file, options.token_source);
}

CoordinatorLink::CoordinatorLink(const AgentOptions& options, GroupMetrics* metrics,
                                 v1::RegisterGroupRequest registration)
    : options_(options), metrics_(metrics), registration_(std::move(registration)),
      buffer_(options.max_buffered_points), token_(options.token) {
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (options.tls_ca_pem.empty() && options.tls_cert_pem.empty()) {
    creds = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_ca_pem;  // "" = the system's roots
    ssl.pem_cert_chain = options.tls_cert_pem;  // mutual TLS (coordinator's tls_client_ca_file)
    ssl.pem_private_key = options.tls_key_pem;
    creds = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 1 << 30);  // tasks carry their manifest
  args.SetInt(GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, 1 << 30);
  // gRPC's own reconnect backoff grows to 120 s by default: keep it within ours (0.5 s to
  // 10 s), so that reports flow soon after the coordinator is back. (Not
  // GRPC_ARG_MIN_RECONNECT_BACKOFF_MS: gRPC takes it as the connect attempt's minimum timeout,
  // 20 s by default, and 0.5 s would fail a connect over a slow link or TLS handshake.)
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 500);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 10000);
  // Keepalive pings (every 15 s: the coordinator allows one per 10 s; dead after 5 s unanswered,
  // with or without calls in flight): a connection gone silently dead (a dropped conntrack entry,
  // a moved address, a partition of that path) was used for ever, every call ending in
  // DEADLINE_EXCEEDED, so the group never reconnected nor registered again once reaped.
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 15000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  channel_ = grpc::CreateCustomChannel(options.coordinator, creds, args);
  stub_ = v1::WorkerService::NewStub(channel_);
}

CoordinatorLink::~CoordinatorLink() {
  common::SetLogTap(nullptr);
  StopThreads();
}

absl::Status CoordinatorLink::Register() {
  Backoff backoff(0.5, 10);
  const auto start = Clock::now();
  // One id for this registration and its retries: a retry whose first answer was lost gets the
  // group that call registered (docs/SERVICE.md), not a second one left to be counted lost.
  std::random_device random;
  registration_.set_registration_id(absl::StrFormat("%08x%08x%08x%08x", random(), random(), random(), random()));
  while (true) {
    v1::RegisterGroupResponse response;
    grpc::ClientContext ctx;
    Prepare(&ctx);
    grpc::Status st = stub_->RegisterGroup(&ctx, registration_, &response);
    if (st.ok()) {
      const int heartbeat_ms = response.heartbeat_interval_ms() > 0 ? response.heartbeat_interval_ms() : 2000;
      {
        absl::MutexLock lock(&mu_);
        group_id_ = response.group_id();
        lost_ = false;  // with the id (Failed compares and sets both under mu_)
        heartbeat_ms_ = heartbeat_ms;
        heartbeat_timeout_ms_ = response.heartbeat_timeout_ms();
        // A task leased by the group the coordinator forgot, never begun (its manifest fetch was
        // answered NOT_FOUND): not this group's. Its heartbeats named it, and heard "cancel".
        if (leased_not_begun_) {
          task_id_.clear();
          leased_not_begun_ = false;
          lease_.End();
        }
      }
      lease_.SetTimeout(response.heartbeat_timeout_ms());
      if (response.heartbeat_timeout_ms() <= 0) {
        Log().Warn(absl::StrCat("the coordinator at ", options_.coordinator, " does not say its heartbeat timeout; "
                                "writes into run folders are not fenced"));
      }
      registered_before_ = true;
      metrics_->SetGroupId(response.group_id());
      Connected(true);
      Log().Info(absl::StrCat("registered with ", options_.coordinator, " as group ", response.group_id(),
                              " (", registration_.world_size(), " ranks, backend ", registration_.backend(),
                              ", heartbeat every ", heartbeat_ms, " ms",
                              registration_.metrics_address().empty()
                                  ? ""
                                  : absl::StrCat(", metrics on ", registration_.metrics_address()),
                              ")"));
      return absl::OkStatus();
    }
    Connected(false);
    const std::string what = absl::StrCat("RegisterGroup to ", options_.coordinator, ": ",
                                          GrpcCodeName(st.error_code()), ": ", st.error_message());
    // A refused token: tried again at once when the file now holds another one. At the first
    // registration a token that stays refused is an error (a wrong file fails the start); when
    // registering again (the group was lost, its task perhaps running on), it is waited out
    // like an outage, the file read again at each try (a rotation whose file is being fixed).
    const bool refused = st.error_code() == grpc::StatusCode::UNAUTHENTICATED;
    if (refused && RereadToken("RegisterGroup")) continue;
    if (!IsTransient(st.error_code()) && !(refused && registered_before_ && KeepsRefused(st))) {
      return absl::Status(static_cast<absl::StatusCode>(st.error_code()), what);
    }
    double delay = backoff.Next();
    if (refused) delay = std::max(delay, 1.0);  // each try reads the file again (RereadToken's pace)
    const double waited = SecondsSince(start);
    if (options_.connect_timeout_s > 0) {
      if (waited >= options_.connect_timeout_s) {
        return absl::UnavailableError(absl::StrFormat(
            "could not register with the coordinator at %s within --connect-timeout-s %g: %s",
            options_.coordinator, options_.connect_timeout_s, what));
      }
      delay = std::min(delay, options_.connect_timeout_s - waited);
    }
    Log().Warn(absl::StrFormat("%s; retrying in %.1f s", what, delay));
    if (!SleepUnlessSignalled(delay)) return absl::CancelledError("stopped by signal before registering");
  }
}

void CoordinatorLink::StartThreads() {
  {
    absl::MutexLock lock(&mu_);
    running_ = true;
  }
  {
    std::lock_guard<std::mutex> lock(sleep_mu_);
    stopping_ = false;
  }
  buffer_.Resume();  // a StopThreads before interrupted it for good
  heartbeat_ = std::thread([this] { HeartbeatLoop(); });
  shipper_ = std::thread([this] { ShipLoop(); });
  sender_ = std::thread([this] { SenderLoop(); });
}

void CoordinatorLink::StopThreads() {
  {
    absl::MutexLock lock(&mu_);
    if (!running_) return;
    running_ = false;
  }
  {
    std::lock_guard<std::mutex> lock(sleep_mu_);
    stopping_ = true;
  }
  sleep_cv_.notify_all();
  buffer_.Interrupt();
  if (heartbeat_.joinable()) heartbeat_.join();
  if (shipper_.joinable()) shipper_.join();
  if (sender_.joinable()) sender_.join();
}

absl::Status CoordinatorLink::Lease(v1::Task* task, bool* available) {
  *available = false;
  v1::LeaseTaskRequest request;
  request.set_group_id(group_id());
  v1::LeaseTaskResponse response;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  lease_asked_at_ = LeaseClock::Clock::now();
  grpc::Status st = stub_->LeaseTask(&ctx, request, &response);
  if (!st.ok()) return Failed("LeaseTask", st, request.group_id());
  Connected(true);
  {
    absl::MutexLock lock(&mu_);
    if (response.available()) {
      task_id_ = response.task().task_id();
      attempt_ = response.task().attempt();
      ++lease_generation_;
      cancel_ = false;
      outcome_pushed_ = false;
      leased_not_begun_ = true;
      lease_.Begin(task_id_, response.task().attempt(), lease_asked_at_);
    } else if (leased_not_begun_) {  // a task whose fetch failed is not ours any more
      task_id_.clear();
      leased_not_begun_ = false;
      lease_.End();
    }
  }
  if (response.available()) {
    *task = response.task();
    if (!task->manifest_hash().empty()) {
      // Fetched once per content: the tasks of one dataset version share their manifests. A
      // failed fetch is a failed lease; the retried LeaseTask hands the same task back.
      std::string csv;
      AVIARY_RETURN_IF_ERROR(FetchManifest(task->manifest_hash(), task->manifest_size(), request.group_id(), &csv));
      task->set_manifest_csv(std::move(csv));
    }
    // The group lost meanwhile (the coordinator forgot it while the manifest streamed: a reap, a
    // stop past the heartbeat timeout): the task may be another group's already. Not started
    // (it tidied that group's run folder); the registration again forgets it (leased_not_begun_).
    if (lost_) {
      return absl::UnavailableError(absl::StrCat("task ", task->task_id(), ": group ", request.group_id(),
                                                 " was lost while the task's manifest was fetched; not started"));
    }
    *available = true;
  }
  return absl::OkStatus();
}

absl::Status CoordinatorLink::FetchManifest(const std::string& hash, int64_t size, const std::string& gid,
                                            std::string* csv) {
  for (auto it = manifests_.begin(); it != manifests_.end(); ++it) {
    if (it->first != hash) continue;
    *csv = it->second;
    manifests_.splice(manifests_.begin(), manifests_, it);
    ++manifest_hits_;
    Log().Info(absl::StrCat("manifest ", hash.substr(0, 12), " (", size, " bytes) from the cache"));
    return absl::OkStatus();
  }
  const auto started = Clock::now();
  v1::GetManifestRequest request;
  request.set_group_id(gid);
  request.set_manifest_hash(hash);
  grpc::ClientContext ctx;
  if (hash != slow_manifest_) {
    slow_manifest_ = hash;
    slow_fetches_ = 0;
  }
  const int64_t extra_ms = ManifestFetchExtraMs(size, options_.rpc_timeout_s, slow_fetches_);
  Prepare(&ctx, extra_ms);
  std::unique_ptr<grpc::ClientReader<v1::ManifestChunk>> reader = stub_->GetManifest(&ctx, request);
  std::string out;
  if (size > 0) out.reserve(static_cast<size_t>(size));
  v1::ManifestChunk chunk;
  bool bad = false;
  grpc::Status st;
  bool stopped = false;  // by a signal
  {
    // A stop signal during the fetch (its deadline grows to minutes for a large manifest on a slow
    // link) cancels it: the group leaves as on any signal. It waited for the deadline, and the
    // launcher's SIGKILL came first (the group counted lost, its task leased until the timeout).
    std::mutex watch_mu;
    std::condition_variable watch_cv;
    bool fetched = false;
    std::thread watcher([&] {
      std::unique_lock<std::mutex> lock(watch_mu);
      while (!watch_cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return fetched; })) {
        if (Signalled()) {
          stopped = true;
          ctx.TryCancel();
          return;
        }
      }
    });
    // Joined on every way out (a string that cannot grow throws: a joinable thread destroyed
    // would end the process).
    absl::Cleanup join_watcher = [&] {
      {
        std::lock_guard<std::mutex> lock(watch_mu);
        fetched = true;
      }
      watch_cv.notify_all();
      watcher.join();
    };
    while (reader->Read(&chunk)) {
      if (chunk.offset() != static_cast<int64_t>(out.size()) || chunk.total_size() != size ||
          static_cast<int64_t>(out.size() + chunk.data().size()) > size) {
        bad = true;
        ctx.TryCancel();
        break;
      }
      out += chunk.data();
    }
    st = reader->Finish();
  }
  if (stopped && !st.ok()) {
    return absl::CancelledError(absl::StrCat("GetManifest ", hash.substr(0, 12), " from ", options_.coordinator,
                                             ": stopped by a signal (", StopSignalName(), ")"));
  }
  if (bad) {
    return absl::DataLossError(absl::StrCat("GetManifest ", hash, " from ", options_.coordinator, ": a chunk at offset ",
                                            chunk.offset(), " of ", chunk.total_size(), " bytes does not continue the ",
                                            out.size(), " of ", size, " bytes read"));
  }
  if (st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    ++slow_fetches_;
    const absl::Status failed = Failed("GetManifest", st, gid);
    return absl::Status(failed.code(),
                        absl::StrFormat("%s (%d of %d bytes in %.0f s; the next try allows %.0f s)", failed.message(),
                                        out.size(), size, SecondsSince(started),
                                        options_.rpc_timeout_s + ManifestFetchExtraMs(size, options_.rpc_timeout_s, slow_fetches_) / 1000.0));
  }
  if (!st.ok()) return Failed("GetManifest", st, gid);
  if (static_cast<int64_t>(out.size()) != size) {
    return absl::DataLossError(absl::StrCat("GetManifest ", hash, " from ", options_.coordinator, ": got ", out.size(),
                                            " bytes, the lease said ", size));
  }
  // Its content address: what the coordinator sent is the manifest the lease named (the chunk
  // checks above see only offsets and the size; a store that served other bytes of that size,
  // or a proxy that changed them, trained the task on other files).
  if (const std::string got = common::Sha256Hex(out); got != hash) {
    return absl::DataLossError(absl::StrCat("GetManifest ", hash, " from ", options_.coordinator, ": the ", size,
                                            " bytes received have SHA-256 ", got));
  }
  ++manifest_fetches_;
  slow_fetches_ = 0;
  Log().Info(absl::StrFormat("manifest %s (%d bytes) fetched in %.0f ms", hash.substr(0, 12), size,
                             1000 * SecondsSince(started)));
  manifests_.emplace_front(hash, out);
  while (manifests_.size() > kCachedManifests) manifests_.pop_back();
  *csv = std::move(out);
  return absl::OkStatus();
}

int64_t CoordinatorLink::ManifestFetchExtraMs(int64_t size, double rpc_timeout_s, int slow_fetches) {
  const int64_t rpc_ms = static_cast<int64_t>(rpc_timeout_s * 1000);
  const int64_t allowed = rpc_ms + std::max<int64_t>(size, 0) / 8000;
  // A manifest is at most 2^36 bytes (2^23 ms here), shifted by 8 at most: no overflow.
  return (allowed << std::min(std::max(slow_fetches, 0), 8)) - rpc_ms;
}

void CoordinatorLink::BeginTask(const std::string& task_id, int attempt) {
  {
    absl::MutexLock logs(&logs_->mu);
    logs_->task_id = task_id;
    logs_->attempt = attempt;
    logs_->lines.clear();
    logs_->dropped = 0;
  }
  // Every line rank 0 logs from here to EndTask is kept for the coordinator.
  common::SetLogTap([buffer = logs_](common::LogLevel level, int rank, absl::string_view line) {
    const int64_t now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                               std::chrono::system_clock::now().time_since_epoch())
                               .count();
    absl::MutexLock logs(&buffer->mu);
    if (buffer->task_id.empty()) return;
    v1::LogLine out;
    out.set_time_unix_ms(now_ms);
    out.set_rank(std::max(rank, 0));
    out.set_level(common::LogLevelName(level));
    // Valid UTF-8 (a file name of another encoding would make the coordinator refuse the call).
    out.set_text(common::ValidUtf8(common::Utf8Prefix(line, 4096)));
    out.set_seq(++buffer->last_seq);
    out.set_attempt(buffer->attempt);
    buffer->lines.push_back(std::move(out));
    while (buffer->lines.size() > kMaxBufferedLogLines) {
      buffer->lines.pop_front();
      ++buffer->dropped;
    }
  });
  absl::MutexLock lock(&mu_);
  if (!leased_not_begun_ || task_id_ != task_id) {
    task_id_ = task_id;
    attempt_ = attempt;
    ++lease_generation_;
    cancel_ = false;
    outcome_pushed_ = false;
    lease_.Begin(task_id, attempt, lease_asked_at_);
  }
  leased_not_begun_ = false;
}

void CoordinatorLink::EndTask() {
  {
    // First: heartbeats name the task no more (one naming it after its CompleteTask would be
    // answered "cancel", and stop nothing but a warning in the task's log).
    absl::MutexLock lock(&mu_);
    task_id_.clear();
    leased_not_begun_ = false;
    lease_.End();
  }
  // The task's last lines (its result, after CompleteTask / FailTask); not while the coordinator
  // is unreachable (a partition would hold the next lease up for a whole rpc_timeout_s). After an
  // outage the buffer may hold more than one call takes; its newest lines are the result.
  if (!lost_ && connected_) {
    for (int calls = 0; calls < 5 && ShipLogs(); ++calls) {
    }
  }
  size_t unshipped = 0;
  std::string task_id;
  {
    absl::MutexLock logs(&logs_->mu);
    unshipped = logs_->lines.size();
    task_id = logs_->task_id;
    logs_->task_id.clear();
    logs_->lines.clear();
  }
  if (unshipped > 0) {  // after the tap stopped keeping lines: this one only goes to stderr
    Log().Warn(absl::StrCat(unshipped, " log line(s) of task ", task_id,
                            " were not shipped to the coordinator (they are in this log)"));
  }
}

bool CoordinatorLink::ShipLogs() {
  absl::MutexLock ship(&ship_mu_);
  v1::ShipLogsRequest request;
  request.set_group_id(group_id());
  if (request.group_id().empty()) return false;
  int64_t dropped = 0;
  int attempt = 0;
  {
    absl::MutexLock logs(&logs_->mu);
    if (logs_->task_id.empty() || logs_->lines.empty()) return false;
    request.set_task_id(logs_->task_id);
    attempt = logs_->attempt;
    dropped = logs_->dropped;
    logs_->dropped = 0;
    if (dropped > 0) {
      // In the place of the dropped lines, numbered as the last of them.
      v1::LogLine* note = request.add_lines();
      note->set_time_unix_ms(logs_->lines.front().time_unix_ms());
      note->set_level("warning");
      note->set_text(absl::StrCat("[agent] ", dropped, " log lines were dropped before they could be shipped"));
      note->set_seq(std::max<int64_t>(logs_->lines.front().seq() - 1, 0));
      note->set_attempt(logs_->attempt);
    }
    const size_t n = std::min<size_t>(logs_->lines.size(), 2000);
    for (size_t i = 0; i < n; ++i) *request.add_lines() = logs_->lines[i];
  }
  v1::ShipLogsResponse response;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  const grpc::Status st = stub_->ShipLogs(&ctx, request, &response);
  const bool transient = !st.ok() && (IsTransient(st.error_code()) || KeepsRefused(st));
  if (!st.ok() && st.error_code() == grpc::StatusCode::UNAUTHENTICATED) RereadToken("ShipLogs");
  {
    absl::MutexLock logs(&logs_->mu);
    // Another lease's buffer by now (the same task again, after EndTask could not ship): its
    // lines and counts are not this call's.
    if (logs_->task_id != request.task_id() || logs_->attempt != attempt) return false;
    if (transient) {
      logs_->dropped += dropped;  // said again with the next call
      return false;
    }
    if (!st.ok()) {
      // Refused for good: stop keeping this task's lines (the warning below is not kept either).
      logs_->task_id.clear();
      logs_->lines.clear();
    }
  }
  if (!st.ok()) {
    Log().Warn(absl::StrCat("ShipLogs for ", request.task_id(), " refused: ", GrpcCodeName(st.error_code()), ": ",
                            st.error_message(), "; its log lines are no longer shipped"));
    return false;
  }
  // By number: lines dropped from the front while the call was in flight were not sent.
  absl::MutexLock logs(&logs_->mu);
  const int64_t last_sent = request.lines(request.lines_size() - 1).seq();
  while (!logs_->lines.empty() && logs_->lines.front().seq() <= last_sent) logs_->lines.pop_front();
  return !logs_->lines.empty();
}

absl::Status CoordinatorLink::CheckLease(const std::string& path) {
  absl::Status st = lease_.Check(path);
  if (st.ok()) return st;
  if (common::IsLeaseRevoked(st)) {
    // A cancel's (the user's, a failed task of the job, a delete): the stopping task's last
    // write is expected to be refused, and is neither a warning nor a fenced write (an alert
    // says the group lost its lease).
    Log().Info(std::string(st.message()));
    return st;
  }
  metrics_->AddFencedWrite();
  Log().Warn(std::string(st.message()));
  return st;
}

StopReason CoordinatorLink::Decide() const {
  if (lost_) return kGroupLost;
  if (cancel_) return kCancelled;
  if (Signalled()) return kSignal;
  return kNoStop;
}

void CoordinatorLink::Push(Report r) {
  if (r.kind == Report::Kind::kComplete || r.kind == Report::Kind::kFail) {
    absl::MutexLock lock(&mu_);
    if (r.task_id == task_id_) {
      outcome_pushed_ = true;
      if (r.attempt == 0) r.attempt = attempt_;  // the coordinator tells a late copy from it
    }
  }
  buffer_.Push(std::move(r));
  metrics_->SetBuffered(buffer_.points());
}

void CoordinatorLink::Drain(const std::string& task_id, double max_wait_s, double signal_wait_s,
                            bool group_signalled) {
  Clock::time_point signalled_at{};
  const auto start = Clock::now();
  while (!buffer_.WaitEmpty(0.2)) {
    bool sending = false;
    {
      absl::MutexLock lock(&mu_);
      sending = running_;
    }
    if (!sending) {  // no sender to wait for (and WaitEmpty returns at once: the wait spun)
      Log().Warn(absl::StrCat(buffer_.size(), " report(s) not delivered to ", options_.coordinator,
                              " (the link's threads are stopped)"));
      return;
    }
    if (lost_) DropTask(task_id);
    if (max_wait_s >= 0 && SecondsSince(start) > max_wait_s) {
      Log().Warn(absl::StrCat(buffer_.size(), " report(s) not delivered to ", options_.coordinator));
      return;
    }
    if (group_signalled || Signalled()) {
      if (signalled_at == Clock::time_point{}) signalled_at = Clock::now();
      if (SecondsSince(signalled_at) > signal_wait_s) {
        Log().Warn(absl::StrCat(buffer_.size(), " report(s) not delivered to ", options_.coordinator,
                                " (stopping on a signal)"));
        return;
      }
    }
  }
}

void CoordinatorLink::DropTask(const std::string& task_id) {
  buffer_.DropTask(task_id);
  metrics_->SetBuffered(buffer_.points());  // an idle group kept showing the dropped points
}

void CoordinatorLink::Leave(const std::string& reason) {
  const std::string gid = group_id();
  if (gid.empty() || lost_) return;
  // What the drain gave up on (a signal's grace): one more try, in order, before leaving.
  // LeaveGroup puts the group's task back to READY without a restart: a CompleteTask still
  // buffered here ran the finished task again, a FailTask gave a failure a free retry.
  // (Each epoch leaves a run of points and a checkpoint report: up to 256 runs, so that an
  // outcome behind a backlog of epochs is reached; each is one RPC to a coordinator that answers.)
  for (int runs = 0; runs < 256 && buffer_.size() > 0 && !lost_; ++runs) {
    std::vector<Report> run = buffer_.Peek(kMaxPointsPerReport, 0);
    if (run.empty()) break;
    const grpc::Status st = Send(run, gid);
    if (!st.ok() && (IsTransient(st.error_code()) || KeepsRefused(st))) {
      buffer_.Release();
      break;
    }
    if (st.error_code() == grpc::StatusCode::INVALID_ARGUMENT && run.size() > 1 &&
        RefusedPoint(st.error_message(), run.size()).has_value()) {
      // As the sender does: the refused point goes, not its run (history rows lost at a stop).
      if (ResendWithoutRefusedPoints(run, st, gid).kept) {
        buffer_.Release();
        break;
      }
      buffer_.Pop();
      continue;
    }
    // Sent, or refused for good (a point out of range, a task the coordinator moved on): the
    // reports behind it go on, as the sender's loop does.
    // (Failed() on NOT_FOUND marks the group lost: nothing more is sent, and it does not leave.)
    if (!st.ok()) Log().Warn(absl::StrCat(Failed(RpcName(run.front().kind), st, gid).message(), "; dropped"));
    buffer_.Pop();
  }
  if (lost_) return;
  if (const size_t left = buffer_.size(); left > 0) {
    Log().Warn(absl::StrCat(left, " report(s) not delivered to ", options_.coordinator, " before leaving"));
  }
  v1::LeaveGroupRequest request;
  request.set_group_id(gid);
  // The coordinator takes one line of at most 1,024 bytes of UTF-8 (an error's message may be
  // longer, or name a file in another encoding).
  std::string line(common::Utf8Prefix(common::ValidUtf8(reason), 1000));  // U+FFFD is 3 bytes: cut after
  for (char& c : line) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = ' ';
  }
  request.set_reason(line);
  v1::LeaveGroupResponse response;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  grpc::Status st = stub_->LeaveGroup(&ctx, request, &response);
  if (!st.ok()) {
    Log().Warn(absl::StrCat("LeaveGroup(", gid, ") to ", options_.coordinator, ": ", GrpcCodeName(st.error_code()),
                            ": ", st.error_message(), "; the coordinator will remove the group as lost after its "
                            "heartbeat timeout"));
    return;
  }
  Log().Info(absl::StrCat("left the coordinator as group ", gid, " (", reason, ")"));
}

std::string CoordinatorLink::group_id() const {
  absl::MutexLock lock(&mu_);
  return group_id_;
}

void CoordinatorLink::Prepare(grpc::ClientContext* ctx, int64_t extra_ms) const {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(options_.rpc_timeout_s * 1000) + extra_ms));
  if (const std::string token = CurrentToken(); !token.empty()) {
    ctx->AddMetadata("authorization", absl::StrCat("Bearer ", token));
  }
}

std::string CoordinatorLink::CurrentToken() const {
  absl::MutexLock lock(&token_mu_);
  return token_;
}

bool CoordinatorLink::KeepsRefused(const grpc::Status& st) const {
  return st.error_code() == grpc::StatusCode::UNAUTHENTICATED && !options_.token_file.empty();
}

bool CoordinatorLink::RereadToken(const char* rpc) {
  if (options_.token_file.empty()) return false;
  // Once a second at most: the heartbeat, log and report threads may all be refused at once.
  // The slot is claimed under the lock; the file is read (it may sit on a slow shared
  // filesystem) and the outcome logged without it, so that no call waits for the read.
  const auto now = Clock::now();
  std::string current;
  {
    absl::MutexLock lock(&token_mu_);
    if (token_read_at_ != Clock::time_point{} && now - token_read_at_ < std::chrono::seconds(1)) return false;
    token_read_at_ = now;
    current = token_;
  }
  absl::StatusOr<std::string> token = ReadTokenFile(options_);
  const bool changed = token.ok() && *token != current;
  if (!changed) {
    // Said once a minute: every heartbeat is refused meanwhile.
    {
      absl::MutexLock lock(&token_mu_);
      if (token_said_at_ != Clock::time_point{} && now - token_said_at_ < std::chrono::seconds(60)) return false;
      token_said_at_ = now;
    }
    if (!token.ok()) {
      Log().Error(absl::StrCat("the coordinator refused the group's token (", rpc,
                               ", UNAUTHENTICATED) and reading it again failed: ", token.status().message()));
    } else {
      Log().Error(absl::StrCat("the coordinator refused the group's token (", rpc, ", UNAUTHENTICATED); ",
                               options_.token_file, " (", options_.token_source,
                               ") still holds it: put a token the coordinator's worker_token_file lists there "
                               "(it is read again at the next refusal)"));
    }
    return false;
  }
  {
    absl::MutexLock lock(&token_mu_);
    token_ = *std::move(token);
    token_said_at_ = Clock::time_point{};
  }
  Log().Info(absl::StrCat("the coordinator refused the group's token (", rpc, "); using the one now in ",
                          options_.token_file, " (", options_.token_source, ")"));
  return true;
}

void CoordinatorLink::Connected(bool c) {
  connected_ = c;
  metrics_->SetConnected(c);
}

absl::Status CoordinatorLink::Failed(const char* rpc, const grpc::Status& st, const std::string& gid) {
  const std::string what = absl::StrCat(rpc, " to ", options_.coordinator, ": ", GrpcCodeName(st.error_code()),
                                        ": ", st.error_message());
  if (st.error_code() == grpc::StatusCode::NOT_FOUND) {
    Connected(true);
    bool newly_lost = false;
    {
      // The group's id and the flag under one lock, as Register sets them: a call for the old
      // group answered after the registration again marked the new group lost.
      absl::MutexLock lock(&mu_);
      if (gid == group_id_ && !lost_) {
        lost_ = true;
        newly_lost = true;
      }
    }
    if (newly_lost) {
      lease_.Revoke(absl::StrCat("the coordinator no longer knows group ", gid));
      Log().Warn(absl::StrCat(what, "; the group registers again"));
    }
  } else if (IsTransient(st.error_code())) {
    Connected(false);
  } else if (st.error_code() == grpc::StatusCode::UNAUTHENTICATED) {
    RereadToken(rpc);
  }
  return absl::Status(static_cast<absl::StatusCode>(st.error_code()), what);
}

void CoordinatorLink::HeartbeatLoop() {
  int64_t heartbeat_failures = 0;
  auto last_sent = LeaseClock::Clock::now();
  while (true) {
    LeaseClock::Clock::duration wait;
    int64_t deadline_ms = 0;
    {
      absl::MutexLock lock(&mu_);
      // A heartbeat waits at most two intervals, and at most half the coordinator's timeout: with
      // the RPC timeout (10 s) one stuck heartbeat outlasted a short lease (heartbeat_timeout_s
      // 6), and the group was reaped while the next one would have got through.
      int64_t cap = static_cast<int64_t>(options_.rpc_timeout_s * 1000);
      if (heartbeat_timeout_ms_ > 0) cap = std::min<int64_t>(cap, heartbeat_timeout_ms_ / 2);
      deadline_ms = std::max<int64_t>(1000, std::min<int64_t>(cap, 2 * static_cast<int64_t>(heartbeat_ms_)));
      // From the previous send: an answer that took most of the interval does not delay the next.
      // At least a quarter interval after the previous answer, though: a coordinator slower than
      // the interval gets no back-to-back heartbeats.
      const auto interval = std::chrono::milliseconds(heartbeat_ms_);
      wait = std::max<LeaseClock::Clock::duration>(last_sent + interval - LeaseClock::Clock::now(), interval / 4);
    }
    if (!SleepUnlessStopped(wait)) return;
    last_sent = LeaseClock::Clock::now();
    if (lost_) continue;
    v1::HeartbeatRequest request;
    int64_t generation = 0;
    {
      absl::MutexLock lock(&mu_);
      if (group_id_.empty()) continue;
      request.set_group_id(group_id_);
      request.set_task_id(task_id_);
      generation = lease_generation_;
    }
    request.set_gpu_memory_bytes(metrics_->GpuMemoryBytes());
    request.set_fence_timeout_ms(lease_.timeout_ms());  // the coordinator reaps the group no sooner
    v1::HeartbeatResponse response;
    grpc::ClientContext ctx;
    Prepare(&ctx);
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
    const auto sent_at = LeaseClock::Clock::now();
    grpc::Status st = stub_->Heartbeat(&ctx, request, &response);
    if (!st.ok()) {
      absl::Status failed = Failed("Heartbeat", st, request.group_id());
      // NOT_FOUND is logged once by Failed; others at the first failure, then every 20th.
      if (!absl::IsNotFound(failed) && heartbeat_failures++ % 20 == 0) {
        Log().Warn(absl::StrCat(failed.message(), " (", heartbeat_failures, " in a row)"));
      }
      continue;
    }
    if (heartbeat_failures > 0) {
      Log().Info(absl::StrCat("Heartbeat to ", options_.coordinator, " answered again after ", heartbeat_failures,
                              " failure(s)"));
      heartbeat_failures = 0;
    }
    Connected(true);
    AdoptHeartbeatValues(response);
    if (response.cancel_task()) {
      CancelIfCurrent(request.task_id(), generation, "Heartbeat");
    } else {
      lease_.Renew(request.task_id(), sent_at);
    }
  }
}

void CoordinatorLink::AdoptHeartbeatValues(const v1::HeartbeatResponse& response) {
  const int64_t timeout_ms = response.heartbeat_timeout_ms();
  const int64_t interval_ms = response.heartbeat_interval_ms();
  int64_t was_timeout = 0, was_interval = 0;
  {
    absl::MutexLock lock(&mu_);
    was_timeout = heartbeat_timeout_ms_;
    was_interval = heartbeat_ms_;
    if (timeout_ms > 0) heartbeat_timeout_ms_ = timeout_ms;
    if (interval_ms > 0) heartbeat_ms_ = static_cast<int>(interval_ms);
  }
  if (timeout_ms > 0 && timeout_ms != was_timeout) {
    lease_.SetTimeout(timeout_ms);
    Log().Info(absl::StrFormat("the coordinator's heartbeat timeout is now %.1f s (was %.1f s): the write fence "
                               "follows it", timeout_ms / 1000.0, was_timeout / 1000.0));
  }
  if (interval_ms > 0 && interval_ms != was_interval) {
    Log().Info(absl::StrFormat("the coordinator's heartbeat interval is now %.1f s (was %.1f s)", interval_ms / 1000.0,
                               was_interval / 1000.0));
  }
}

bool CoordinatorLink::SleepUnlessStopped(std::chrono::steady_clock::duration d) {
  std::unique_lock<std::mutex> lock(sleep_mu_);
  // wait_for runs on the steady clock (libstdc++: pthread_cond_clockwait, CLOCK_MONOTONIC).
  return !sleep_cv_.wait_for(lock, d, [this] { return stopping_; });
}

bool TakenAwayByAUser(const grpc::Status& refused) {
  // coordinator/scheduler.cc RequireHolder: "task T is not leased to group G (state S)", or
  // "(task_id 'T': no such task; its job was deleted)". CANCELLED: a cancel; READY or BLOCKED:
  // a cancel and then `aviary retry` (a group the coordinator reaped is refused NOT_FOUND).
  if (refused.error_code() != grpc::StatusCode::FAILED_PRECONDITION) return false;
  const std::string& text = refused.error_message();
  if (!absl::StrContains(text, " is not leased to group ")) return false;
  for (const char* moved : {"(state CANCELLED)", "(state READY)", "(state BLOCKED)", "no such task; its job was deleted"}) {
    if (absl::StrContains(text, moved)) return true;
  }
  return false;
}

void CoordinatorLink::ShipLoop() {
  while (true) {
    int interval_ms;
    {
      absl::MutexLock lock(&mu_);
      interval_ms = heartbeat_ms_;
    }
    if (!SleepUnlessStopped(std::chrono::milliseconds(interval_ms))) return;
    if (!lost_) ShipLogs();
  }
}

void CoordinatorLink::CancelIfCurrent(const std::string& task_id, int64_t generation, const char* rpc) {
  {
    absl::MutexLock lock(&mu_);
    if (task_id.empty() || task_id != task_id_ || cancel_) return;
    if (generation >= 0 && generation != lease_generation_) return;
    // The outcome is on its way or taken (the coordinator answers "cancel" for a task it has done with): the
    // task stopped by itself. A user's cancel meanwhile refuses the outcome, and that is said.
    if (outcome_pushed_) return;
    cancel_ = true;
    lease_.Revoke(absl::StrCat("the coordinator cancelled it or gave it to another group (", rpc, ")"),
                  /*by_cancel=*/true);
  }
  // Said outside mu_: a log line blocked on a stuck stderr held it, and with it Push (the stall
  // watchdog's failure report, queued before any log line for that reason) and group_id().
  Log().Warn(absl::StrCat("the coordinator cancelled task ", task_id, " (", rpc, "); stopping it"));
}

grpc::Status CoordinatorLink::Send(const std::vector<Report>& run, const std::string& group_id) {
  const Report& first = run.front();
  grpc::ClientContext ctx;
  Prepare(&ctx);
  switch (first.kind) {
    case Report::Kind::kPoint: {
      v1::ReportProgressRequest request;
      request.set_group_id(group_id);
      request.set_task_id(first.task_id);
      int32_t spe = 0;
      for (const Report& r : run) {
        *request.add_points() = r.point;
        spe = std::max(spe, r.steps_per_epoch);
      }
      request.set_steps_per_epoch(spe);
      v1::ReportProgressResponse response;
      grpc::Status st = stub_->ReportProgress(&ctx, request, &response);
      if (st.ok() && response.cancel_task()) CancelIfCurrent(first.task_id, -1, "ReportProgress");
      return st;
    }
    case Report::Kind::kCheckpoint: {
      v1::ReportCheckpointRequest request;
      request.set_group_id(group_id);
      request.set_task_id(first.task_id);
      request.set_path(first.path);
      request.set_epoch(first.epoch);
      request.set_best(first.best);
      v1::ReportCheckpointResponse response;
      return stub_->ReportCheckpoint(&ctx, request, &response);
    }
    case Report::Kind::kComplete: {
      v1::CompleteTaskRequest request;
      request.set_group_id(group_id);
      request.set_task_id(first.task_id);
      request.set_best_checkpoint(first.path);
      *request.mutable_best() = first.point;
      request.set_attempt(first.attempt);
      v1::CompleteTaskResponse response;
      return stub_->CompleteTask(&ctx, request, &response);
    }
    case Report::Kind::kFail: {
      v1::FailTaskRequest request;
      request.set_group_id(group_id);
      request.set_task_id(first.task_id);
      request.set_error(FailureText(first.error));
      request.set_retryable(first.retryable);
      request.set_preempted(first.preempted);
      request.set_attempt(first.attempt);
      v1::FailTaskResponse response;
      return stub_->FailTask(&ctx, request, &response);
    }
  }
  return grpc::Status(grpc::StatusCode::INTERNAL, "unknown report kind");
}

// After a run's refusal that names one of its points (RefusedPoint): that point goes, the rest
// is sent again, one request as before; at most kMaxRefusedPoints times (a refusal of every point
// drops the run). `kept`: a transient failure meanwhile (the whole run to be sent again later);
// `unknown`: the coordinator no longer knows the task's group.
CoordinatorLink::RefusedRun CoordinatorLink::ResendWithoutRefusedPoints(const std::vector<Report>& run,
                                                                       const grpc::Status& st,
                                                                       const std::string& gid) {
  constexpr int kMaxRefusedPoints = 8;
  std::vector<Report> rest = run;
  grpc::Status now = st;
  bool kept = false, unknown = false;
  for (int dropped = 0;; ++dropped) {
    const std::optional<size_t> bad =
        dropped < kMaxRefusedPoints ? RefusedPoint(now.error_message(), rest.size()) : std::nullopt;
    if (!bad.has_value()) {
      Log().Error(absl::StrCat(Failed(RpcName(Report::Kind::kPoint), now, gid).message(), "; ", rest.size(),
                               " point(s) of task ", run.front().task_id, " dropped"));
      break;
    }
    const Report& refused = rest[*bad];
    Log().Error(absl::StrCat(Failed(RpcName(Report::Kind::kPoint), now, gid).message(), "; that point (epoch ",
                             refused.point.epoch(), ", step ", refused.point.step(), ") of task ",
                             refused.task_id, " dropped, the run's other ", rest.size() - 1, " sent again"));
    rest.erase(rest.begin() + static_cast<std::ptrdiff_t>(*bad));
    if (rest.empty()) break;
    now = Send(rest, gid);
    if (now.ok()) break;
    if (IsTransient(now.error_code()) || KeepsRefused(now)) {
      // The whole run again later: its refused point goes again, the rest is recognised
      // where it was taken (ReportProgress skips a resent run's points).
      Log().Warn(absl::StrCat(Failed(RpcName(Report::Kind::kPoint), now, gid).message(), "; the run is kept (",
                              buffer_.size(), " report(s) buffered)"));
      kept = true;
      break;
    }
    if (now.error_code() != grpc::StatusCode::INVALID_ARGUMENT) {
      Log().Error(absl::StrCat(Failed(RpcName(Report::Kind::kPoint), now, gid).message(), "; ", rest.size(),
                               " point(s) of task ", run.front().task_id, " dropped"));
      unknown = now.error_code() == grpc::StatusCode::NOT_FOUND;
      break;
    }
  }
  return {kept, unknown};
}

void CoordinatorLink::SenderLoop() {
  Backoff backoff(0.5, 10);
  int64_t dropped_said = 0;  // step points said dropped so far
  Clock::time_point dropped_said_at;
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (!running_) return;
    }
    // Step points dropped for the buffer's bound (a coordinator away for long): said when it
    // starts, then at most once a minute, with the count so far.
    if (const int64_t dropped = buffer_.dropped_points();
        dropped > dropped_said && (dropped_said == 0 || Clock::now() - dropped_said_at >= std::chrono::minutes(1))) {
      Log().Warn(absl::StrCat(dropped, " step point(s) dropped so far: the reports waiting for the coordinator ",
                              "reached their bound of ", options_.max_buffered_points,
                              " points, and the oldest step points go first (epoch ends, checkpoints and outcomes "
                              "are kept); the tasks' step curves have a gap there"));
      dropped_said = dropped;
      dropped_said_at = Clock::now();
    }
    std::vector<Report> run = buffer_.Peek(kMaxPointsPerReport, 0.5);
    if (run.empty()) continue;
    const std::string gid = group_id();
    if (lost_ || gid.empty()) {  // the main thread registers again
      buffer_.Release();
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    grpc::Status st = Send(run, gid);
    if (st.ok()) {
      Connected(true);
      backoff.Reset();
      buffer_.Pop();
    } else if (IsTransient(st.error_code()) || KeepsRefused(st)) {
      // A refused token is kept at too (the token file may be fixed, RereadToken in Failed): a
      // task's completion must not be lost to a rotation.
      buffer_.Release();
      const double delay = backoff.Next();
      Log().Warn(absl::StrFormat("%s; %zu report(s) buffered, retrying in %.1f s",
                                 Failed(RpcName(run.front().kind), st, gid).message(), buffer_.size(), delay));
      SleepUnlessStopped(std::chrono::duration_cast<std::chrono::steady_clock::duration>(
          std::chrono::duration<double>(delay)));
    } else if (st.error_code() == grpc::StatusCode::NOT_FOUND) {
      (void)Failed(RpcName(run.front().kind), st, gid);
      buffer_.Pop();
      DropTask(run.front().task_id);
    } else if (st.error_code() == grpc::StatusCode::INVALID_ARGUMENT && run.size() > 1 &&
               RefusedPoint(st.error_message(), run.size()).has_value()) {
      // One point of the run refused (a value out of range, an epoch outside the task's plan):
      // the whole run went with it, epoch ends and all (history rows lost). The refusal names
      // the point ("field 'points[i]...'"): it goes, the rest is sent again, one request as
      // before; at most kMaxRefusedPoints times (a refusal of every point drops the run).
      const RefusedRun resent = ResendWithoutRefusedPoints(run, st, gid);
      const bool kept = resent.kept, unknown = resent.unknown;
      if (kept) {
        buffer_.Release();
        SleepUnlessStopped(std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(backoff.Next())));
      } else {
        Connected(true);
        backoff.Reset();
        buffer_.Pop();
        if (unknown) DropTask(run.front().task_id);  // as NOT_FOUND above: it registers again
      }
    } else {
      // Refused for good (e.g. FAILED_PRECONDITION: the task is no longer ours): a retry would
      // get the same answer. A task the user cancelled (and maybe retried or deleted since) is
      // the expected case: a warning.
      const std::string line = absl::StrCat(Failed(RpcName(run.front().kind), st, gid).message(), "; ", run.size(),
                                            " report(s) of task ", run.front().task_id, " dropped");
      if (TakenAwayByAUser(st)) {
        Log().Warn(line);
      } else {
        Log().Error(line);
      }
      buffer_.Pop();
    }
    metrics_->SetBuffered(buffer_.points());
  }
}

}  // namespace aviary::worker
