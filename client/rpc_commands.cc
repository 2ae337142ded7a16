// The `aviary` gRPC client: submit, status, list, watch, cancel, history, prune (docs/SERVICE.md,
// "Client").
//
// Global flags (before the command): --coordinator H:P (else $AVIARY_COORDINATOR, else
// 127.0.0.1:7070), --token-file F (else $AVIARY_TOKEN_FILE, else $AVIARY_TOKEN), --tls-ca F
// (else $AVIARY_TLS_CA) and --timeout S (the deadline of each call, default 30 s). Every unary
// call carries that deadline; `watch` bounds each (re)connection by it and then keeps the
// stream open for as long as the job runs. A failed call prints
// "aviary CMD: CODE_NAME: message" and exits 2 for caller errors, 1 otherwise.
//
// Torch-free on purpose: this file links only gRPC, protobuf, absl and aviary::common.
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/cli.h"
#include "common/config.h"
#include "common/files.h"
#include "common/plot.h"
#include "common/status.h"
#include "common/tokens.h"
#include "common/utf8.h"
#include "client/format.h"
#include "client/commands.h"
#include "client/output.h"
#include "proto/aviary.grpc.pb.h"
#include "proto/aviary.pb.h"

namespace aviary::cli {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr char kDefaultCoordinator[] = "127.0.0.1:7070";
constexpr double kDefaultTimeoutS = 30;
// `watch`: consecutive failed reconnection attempts before giving up (each bounded by
// --timeout), and the backoff between them.
constexpr int kMaxReconnects = 10;
// `watch`'s exit code when it gave up on a job it had been watching: its final state is not known
// (it may still be running). 1 is a FAILED or CANCELLED job.
constexpr int kWatchStateUnknownExit = 3;
constexpr double kFirstBackoffS = 0.5;
constexpr double kMaxBackoffS = 10;
// `watch` on a terminal redraws at most this often (progress reports arrive every 2 s per
// group, state changes at any time).
constexpr double kRedrawIntervalS = 0.2;
// `watch` without a terminal prints a task's step progress at most this often.
constexpr double kPlainStepIntervalS = 10;

struct ClientOptions {
  std::string coordinator;
  std::string token;   // empty: no authorization entry
  // The file the token came from and where it was named ("" when it was given itself): `watch`
  // and `logs --follow` read it again when the coordinator refuses the token (a rotation).
  std::string token_file;
  std::string token_source;
  std::string tls_ca;  // PEM; empty: plaintext
  double timeout_s = kDefaultTimeoutS;
};

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path, const std::string& what) {
  std::error_code ec;
  // Only a path that is not there "does not exist": one that cannot be looked up (a parent
  // folder of mode 700) is left to the read, which names errno's text.
  if (!fs::exists(path, ec) && !ec) {
    return absl::NotFoundError(absl::StrCat(what, " '", path, "' does not exist"));
  }
  if (fs::is_directory(path, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " '", path, "' is a directory, expected a file"));
  }
  // At most kMaxConfigBytes, the coordinator's cap on a submitted config: a token file, a CA
  // certificate or a recipe is a few KB; `--config /dev/zero` is refused, not read.
  absl::StatusOr<std::string> text = common::ReadFileToString(path, common::kMaxConfigBytes);
  if (!text.ok()) return absl::InvalidArgumentError(absl::StrCat(what, ": ", text.status().message()));
  return text;
}

// The token: the first token line of the file (common/tokens.h: blank lines and '#' lines
// skipped, surrounding whitespace removed), so a file listing several tokens works here too.
absl::StatusOr<std::string> ReadToken(const std::string& path, const std::string& source) {
  AVIARY_ASSIGN_OR_RETURN(std::string text, ReadWholeFile(path, absl::StrCat("token file (", source, ")")));
  return common::FirstToken(text, path, source);
}

absl::StatusOr<ClientOptions> ParseClientOptions(const GlobalOptions& global) {
  ClientOptions options;
  if (global.coordinator) {
    options.coordinator = *global.coordinator;
  } else if (std::string env = Env("AVIARY_COORDINATOR"); !env.empty()) {
    options.coordinator = env;
  } else {
    options.coordinator = kDefaultCoordinator;
  }
  // The coordinator listens on 7070 unless told otherwise.
  AVIARY_RETURN_IF_ERROR(
      common::CheckDialAddress(options.coordinator, global.coordinator ? "--coordinator" : "AVIARY_COORDINATOR"));
  options.timeout_s = global.timeout_s.value_or(kDefaultTimeoutS);
  if (!(options.timeout_s > 0) || options.timeout_s > 86400) {
    return absl::InvalidArgumentError(
        absl::StrCat("--timeout ", options.timeout_s, ": expected seconds in (0, 86400]"));
  }
  // A flag given with an empty value (a script's unset variable: --tls-ca "$CA") is refused, not
  // read as "not given": that skipped the environment's CA and dialed in plaintext, the bearer
  // token in clear.
  if (global.token_file && global.token_file->empty()) {
    return absl::InvalidArgumentError("--token-file is empty (expected a file whose first token line is the token)");
  }
  if (global.tls_ca && global.tls_ca->empty()) {
    return absl::InvalidArgumentError("--tls-ca is empty (expected the coordinator's CA certificate, PEM)");
  }
  if (global.token_file) {
    options.token_file = *global.token_file;
    options.token_source = "--token-file";
  } else if (std::string env = Env("AVIARY_TOKEN_FILE"); !env.empty()) {
    options.token_file = env;
    options.token_source = "AVIARY_TOKEN_FILE";
  }
  if (!options.token_file.empty()) {
    AVIARY_ASSIGN_OR_RETURN(options.token, ReadToken(options.token_file, options.token_source));
  } else {
    options.token = std::string(absl::StripAsciiWhitespace(Env("AVIARY_TOKEN")));
    if (const std::string problem = common::TokenByteProblem(options.token); !problem.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("AVIARY_TOKEN: ", problem));
    }
  }
  std::string ca_path;
  std::string ca_source;
  if (global.tls_ca) {
    ca_path = *global.tls_ca;
    ca_source = "--tls-ca";
  } else {
    ca_path = Env("AVIARY_TLS_CA");
    ca_source = "AVIARY_TLS_CA";
  }
  if (!ca_path.empty()) {
    AVIARY_ASSIGN_OR_RETURN(options.tls_ca,
                            ReadWholeFile(ca_path, absl::StrCat("CA certificate (", ca_source, ")")));
    if (options.tls_ca.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("CA certificate '", ca_path, "' (", ca_source, ") is empty"));
    }
    // gRPC would only fail the call later, with a handshake error that names neither.
    if (options.tls_ca.find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(ca_source, " ", ca_path,
                                                     ": holds no PEM certificate (no '-----BEGIN CERTIFICATE-----')"));
    }
  }
  return options;
}

// One channel to the coordinator and the helpers every command uses.
class Client {
 public:
  explicit Client(ClientOptions options) : options_(std::move(options)) {
    std::shared_ptr<grpc::ChannelCredentials> creds;
    if (options_.tls_ca.empty()) {
      creds = grpc::InsecureChannelCredentials();
    } else {
      grpc::SslCredentialsOptions ssl;
      ssl.pem_root_certs = options_.tls_ca;
      creds = grpc::SslCredentials(ssl);
    }
    grpc::ChannelArguments args;
    // Detects a vanished coordinator host (powered off, cut off: no FIN) under a quiet `watch`
    // stream within about 50 s. The coordinator lets a client ping every 10 s
    // (coordinator/service.cc); gRPC's own server default (5 min) would answer this with GOAWAY.
    // Pings without data, unbounded: gRPC stops after 2 by default on a stream with nothing sent.
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
    // Reconnecting (watch, logs --follow): gRPC tries the coordinator again after 1 s growing to
    // 5 s, not to its default 120 s, which noticed a restarted coordinator minutes late and let
    // the reconnection attempts run out meanwhile. (Not GRPC_ARG_MIN_RECONNECT_BACKOFF_MS: gRPC
    // takes it as the connect attempt's minimum timeout, 20 s by default.)
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 1000);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 5000);
    args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 256 << 20);
    channel_ = grpc::CreateCustomChannel(options_.coordinator, creds, args);
    stub_ = v1::JobService::NewStub(channel_);
  }

  const ClientOptions& options() const { return options_; }
  v1::JobService::Stub* stub() { return stub_.get(); }
  // The coordinator answered a call of this client (so TLS is not why a later one fails).
  void NoteAnswered() { answered_ = true; }

  // After an UNAUTHENTICATED answer: reads the token file again; true when it now holds another
  // token (used from here on), so that a long `watch` or `logs --follow` rides through a token
  // rotation; false when it holds the same one (revoked: the refusal stands) or the token was
  // not given in a file; the error when the file cannot be read now.
  absl::StatusOr<bool> RereadToken() {
    if (options_.token_file.empty()) return false;
    AVIARY_ASSIGN_OR_RETURN(std::string token, ReadToken(options_.token_file, options_.token_source));
    if (token == options_.token) return false;
    options_.token = std::move(token);
    return true;
  }

  // `refused` (UNAUTHENTICATED) once the token file was read again (RereadToken): OK when the
  // file now holds another token; else the refusal, with why the file did not help.
  absl::Status AfterRefusal(const absl::Status& refused) {
    absl::StatusOr<bool> changed = RereadToken();
    if (changed.ok() && *changed) return absl::OkStatus();
    if (!changed.ok()) {
      return common::Annotate(refused, absl::StrCat("reading the token file again: ", changed.status().message()));
    }
    return refused;
  }

  // A context with the deadline and the bearer token.
  void Prepare(grpc::ClientContext* context, bool with_deadline = true) const {
    if (with_deadline) {
      // gRPC takes system_clock deadlines only.
      context->set_deadline(std::chrono::system_clock::now() +
                            std::chrono::duration_cast<std::chrono::system_clock::duration>(
                                std::chrono::duration<double>(options_.timeout_s)));
    }
    if (!options_.token.empty()) context->AddMetadata("authorization", "Bearer " + options_.token);
  }

  // The call's status as absl::Status; transport failures name the RPC and the address.
  absl::Status ToStatus(const grpc::Status& status, const char* rpc) const {
    if (status.ok()) return absl::OkStatus();
    auto code = static_cast<absl::StatusCode>(status.error_code());
    std::string message = status.error_message();
    // The client cancels a call only where it says so itself (watch's first-message watchdog, a
    // finished watch): a CANCELLED that reaches here is the server ending the call, which a gRPC
    // server does to the calls in flight when it shuts down (a watch reconnecting to a coordinator
    // still stopping). That is UNAVAILABLE, retryable: before, watch gave up saying only
    // "CANCELLED: CANCELLED".
    if (code == absl::StatusCode::kCancelled) {
      code = absl::StatusCode::kUnavailable;
      message = absl::StrCat(rpc, " to coordinator ", options_.coordinator, ": the coordinator ended the call (",
                             message, "): it is shutting down or restarting");
      return absl::Status(code, message);
    }
    switch (code) {
      case absl::StatusCode::kUnavailable:
      case absl::StatusCode::kUnknown:
      case absl::StatusCode::kInternal:
      case absl::StatusCode::kUnimplemented:
        message = absl::StrCat(rpc, " to coordinator ", options_.coordinator, ": ", message);
        // A plaintext client closed on by a TLS server sees only "Socket closed" (from the
        // transport); an UNAVAILABLE the coordinator itself returned ("the coordinator is shutting
        // down") reached it, so TLS is not the cause.
        if (code == absl::StatusCode::kUnavailable && options_.tls_ca.empty() && !answered_ &&
            (message.find("Socket closed") != std::string::npos ||
             message.find("Connection reset") != std::string::npos ||
             message.find("failed to connect") != std::string::npos) &&
            message.find("Connection refused") == std::string::npos &&
            message.find("DNS resolution failed") == std::string::npos) {
          absl::StrAppend(&message, " (if the coordinator serves TLS, pass --tls-ca)");
        }
        break;
      case absl::StatusCode::kDeadlineExceeded:
        message = absl::StrCat(rpc, " to coordinator ", options_.coordinator,
                               ": no answer within --timeout ", options_.timeout_s, " s (",
                               message, ")");
        break;
      default:
        break;
    }
    return absl::Status(code, message);
  }

  template <typename Request, typename Response>
  // `wait_for_ready`: a coordinator that is not up is waited for (until the deadline) instead of
  // failing the call at once.
  absl::Status Call(const char* rpc,
                    grpc::Status (v1::JobService::Stub::*method)(grpc::ClientContext*,
                                                                 const Request&, Response*),
                    const Request& request, Response* response, bool wait_for_ready = false) {
    grpc::ClientContext context;
    Prepare(&context);
    if (wait_for_ready) context.set_wait_for_ready(true);
    const grpc::Status status = (stub_.get()->*method)(&context, request, response);
    if (status.ok()) answered_ = true;
    return ToStatus(status, rpc);
  }


 private:
  ClientOptions options_;
  bool answered_ = false;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::JobService::Stub> stub_;
};

absl::Status CheckJobId(const std::string& job_id) {
  if (job_id.empty()) return absl::InvalidArgumentError("the job id is empty");
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// submit P.yaml [--set k=v ...] [--name N]

// `text` (what `what` names) is UTF-8, as an RPC's text must be: gRPC would refuse the call with a
// bare INTERNAL. The error names the line and column of the first byte that is not.
absl::Status CheckUtf8(const std::string& what, const std::string& text) {
  const size_t at = common::FirstInvalidUtf8(text);
  if (at == std::string::npos) return absl::OkStatus();
  const absl::string_view before(text.data(), at);
  const size_t newline = before.rfind('\n');
  const size_t column = newline == absl::string_view::npos ? at + 1 : at - newline;
  const int64_t line = std::count(before.begin(), before.end(), '\n') + 1;
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s:%d:%d: byte 0x%02X is not UTF-8 (the coordinator takes UTF-8 text; save it as UTF-8)", what, line, column,
      static_cast<unsigned char>(text[at])));
}

// True when `status` (of a call that changes a job) may have come after the coordinator made the
// change: no answer within --timeout, or a connection lost after the call went out (not one never
// made).
bool AnswerLostAfterTheCall(const absl::Status& status) {
  const bool never_reached = absl::StrContains(status.message(), "failed to connect") ||
                             absl::StrContains(status.message(), "Connection refused") ||
                             absl::StrContains(status.message(), "DNS resolution failed");
  return status.code() == absl::StatusCode::kDeadlineExceeded ||
         (status.code() == absl::StatusCode::kUnavailable && !never_reached);
}

// `status`, saying that the job may have been `done` all the same when the answer was lost.
absl::Status MayHaveHappened(const absl::Status& status, const std::string& job_id, const std::string& done) {
  if (!AnswerLostAfterTheCall(status)) return status;
  return absl::Status(status.code(), absl::StrCat(status.message(), "; job ", job_id, " may have been ", done,
                                                  " all the same: check `aviary status ", job_id, "`"));
}

absl::Status Submit(Client& client, const ClientArgs& args) {
  const std::string& path = args.target;
  AVIARY_ASSIGN_OR_RETURN(std::string yaml, ReadWholeFile(path, "pipeline config"));
  AVIARY_RETURN_IF_ERROR(CheckUtf8(path, yaml));
  std::error_code ec;
  fs::path cwd = fs::current_path(ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot read the current directory: ", ec.message()));
  }
  fs::path absolute = fs::absolute(path, ec);
  v1::SubmitJobRequest request;
  request.set_pipeline_yaml(yaml);
  for (const std::string& o : args.overrides) request.add_overrides(o);  // checked by --set
  request.set_name(args.name);
  request.set_source_path(ec ? path : absolute.lexically_normal().string());
  request.set_working_dir(cwd.string());
  for (const std::string& tag : args.tags) request.add_tags(tag);
  request.set_note(args.note);
  for (const std::string& sweep : args.sweeps) {
    AVIARY_RETURN_IF_ERROR(ParseSweepFlag(sweep, request.add_sweep()));
  }
  for (const std::string& o : args.overrides) AVIARY_RETURN_IF_ERROR(CheckUtf8(absl::StrCat("--set ", o), o));
  for (const std::string& t : args.tags) AVIARY_RETURN_IF_ERROR(CheckUtf8(absl::StrCat("--tag ", t), t));
  for (const std::string& w : args.sweeps) AVIARY_RETURN_IF_ERROR(CheckUtf8(absl::StrCat("--sweep ", w), w));
  AVIARY_RETURN_IF_ERROR(CheckUtf8("--name", args.name));
  AVIARY_RETURN_IF_ERROR(CheckUtf8("--note", args.note));
  AVIARY_RETURN_IF_ERROR(CheckUtf8("the config's path", request.source_path()));
  AVIARY_RETURN_IF_ERROR(CheckUtf8("the current directory", request.working_dir()));
  v1::SubmitJobResponse response;
  absl::Status submitted = client.Call("SubmitJob", &v1::JobService::Stub::SubmitJob, request, &response);
  if (AnswerLostAfterTheCall(submitted) && !absl::StrContains(submitted.message(), "was not recorded")) {
    // The coordinator may have recorded the job before the answer was lost (it drops a submit
    // whose caller has gone only up to its commit): a second submit would run it twice.
    return absl::Status(
        submitted.code(),
        absl::StrCat(submitted.message(), "; the job may have been created all the same: check `aviary list` "
                     "before submitting again",
                     submitted.code() == absl::StatusCode::kDeadlineExceeded
                         ? " (a dataset read at submit may take longer than --timeout: give it more)"
                         : ""));
  }
  AVIARY_RETURN_IF_ERROR(submitted);
  std::cerr << "submitted " << request.source_path() << " to " << client.options().coordinator
            << "; follow it with: aviary watch " << response.job_id() << "\n";
  std::cout << response.job_id() << "\n";
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// status JOB [--json]

absl::Status Status(Client& client, const ClientArgs& args) {
  v1::GetJobRequest request;
  request.set_job_id(args.target);
  AVIARY_RETURN_IF_ERROR(CheckJobId(request.job_id()));
  v1::JobInfo job;
  AVIARY_RETURN_IF_ERROR(client.Call("GetJob", &v1::JobService::Stub::GetJob, request, &job));
  if (args.json) {
    AVIARY_ASSIGN_OR_RETURN(const std::string json, ToJson(job));
    std::cout << json;
    return absl::OkStatus();
  }
  std::cout << FormatJobStatus(job);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// list [--limit N]

absl::Status List(Client& client, const ClientArgs& args) {
  v1::ListJobsRequest request;
  request.set_limit(args.limit);
  v1::ListJobsResponse response;
  AVIARY_RETURN_IF_ERROR(
      client.Call("ListJobs", &v1::JobService::Stub::ListJobs, request, &response));
  if (args.json) {  // the ListJobsResponse: {"jobs": [JobInfo, ...]}, newest first
    AVIARY_ASSIGN_OR_RETURN(const std::string json, ToJson(response));
    std::cout << json;
    return absl::OkStatus();
  }
  std::vector<const v1::JobInfo*> jobs;
  for (const auto& j : response.jobs()) jobs.push_back(&j);
  // Newest first (the coordinator's order already; kept stable for equal times).
  std::stable_sort(jobs.begin(), jobs.end(), [](const v1::JobInfo* a, const v1::JobInfo* b) {
    return a->created_unix_ms() > b->created_unix_ms();
  });
  if (jobs.empty()) {
    std::cerr << "no jobs on " << client.options().coordinator << "\n";
    return absl::OkStatus();
  }
  std::cout << JobLineHeader() << "\n";
  for (const v1::JobInfo* j : jobs) std::cout << FormatJobLine(*j) << "\n";
  // Both when both: older jobs within the limit left out for the size, and more past the limit.
  if (response.omitted() > 0) {
    std::cerr << "(the newest " << jobs.size() << " jobs: " << response.omitted()
              << " older ones left out to keep the answer under 64 MB; aviary delete JOB removes a finished one)\n";
  }
  if (response.beyond_limit() > 0) {
    std::cerr << "(the newest " << jobs.size() << " jobs; " << response.beyond_limit()
              << " older ones: --limit N lists up to 10000)\n";
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// cancel JOB

absl::Status Cancel(Client& client, const ClientArgs& args) {
  v1::CancelJobRequest request;
  request.set_job_id(args.target);
  AVIARY_RETURN_IF_ERROR(CheckJobId(request.job_id()));
  v1::CancelJobResponse response;
  AVIARY_RETURN_IF_ERROR(
      client.Call("CancelJob", &v1::JobService::Stub::CancelJob, request, &response));
  const v1::JobState state = response.job().state();
  if (state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED) {
    // Exit 0 all the same (the job is not running, as asked), but not as if this cancelled it.
    std::cout << "job " << response.job().job_id() << " had already ended (" << JobStateName(state)
              << "): nothing to cancel\n";
  } else {
    std::cout << "job " << response.job().job_id() << " is " << JobStateName(state) << "\n";
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// prune [--older-than DAYS] [--dry-run]

absl::Status Prune(Client& client, const ClientArgs& args) {
  v1::PruneJobsRequest request;
  request.set_older_than_days(args.older_than_days);
  request.set_dry_run(args.dry_run);
  v1::PruneJobsResponse response;
  AVIARY_RETURN_IF_ERROR(client.Call("PruneJobs", &v1::JobService::Stub::PruneJobs, request, &response));
  const char* verb = response.dry_run() ? "would remove" : "removed";
  for (const v1::PrunedJob& job : response.jobs()) {
    std::cout << "job " << job.job_id() << ": " << verb << " " << job.step_points() << " step points, "
              << job.manifest_refs() << " task manifest references\n";
  }
  std::cout << absl::StrFormat("%s %d job(s) finished more than %g days ago; %s %d stored manifests (%.1f MiB) "
                               "no task refers to%s\n",
                               response.dry_run() ? "dry run:" : "pruned", response.jobs_size(),
                               response.older_than_days(), verb, response.manifests_deleted(),
                               response.manifest_bytes_deleted() / 1048576.0,
                               response.dry_run() ? "; nothing was removed" : "");
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// groups [--json]

absl::Status Groups(Client& client, const ClientArgs& args) {
  v1::ListGroupsRequest request;
  v1::ListGroupsResponse response;
  AVIARY_RETURN_IF_ERROR(client.Call("ListGroups", &v1::JobService::Stub::ListGroups, request, &response));
  if (args.json) {
    AVIARY_ASSIGN_OR_RETURN(const std::string json, ToJson(response));
    std::cout << json;
    return absl::OkStatus();
  }
  if (response.groups().empty()) {
    std::cerr << "no worker groups registered on " << client.options().coordinator << "\n";
    return absl::OkStatus();
  }
  // The heartbeats' age by the coordinator's clock (this host's may be off by minutes).
  const int64_t now = response.answered_unix_ms() > 0
                          ? response.answered_unix_ms()
                          : std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::system_clock::now().time_since_epoch())
                                .count();
  std::cout << FormatGroups({response.groups().begin(), response.groups().end()}, now);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// retry JOB / delete JOB [--with-run-folders]

absl::Status Retry(Client& client, const ClientArgs& args) {
  v1::RetryJobRequest request;
  request.set_job_id(args.target);
  v1::JobInfo job;
  AVIARY_RETURN_IF_ERROR(
      MayHaveHappened(client.Call("RetryJob", &v1::JobService::Stub::RetryJob, request, &job), args.target, "retried"));
  int again = 0;
  for (const auto& t : job.tasks()) {
    again += t.state() == v1::TASK_STATE_READY || t.state() == v1::TASK_STATE_BLOCKED;
  }
  std::cout << "job " << job.job_id() << " is " << JobStateName(job.state()) << ": " << again
            << " tasks to run again, each from its last checkpoint\n";
  return absl::OkStatus();
}

absl::Status Delete(Client& client, const ClientArgs& args) {
  v1::DeleteJobRequest request;
  request.set_job_id(args.target);
  request.set_with_run_folders(args.with_run_folders);
  v1::DeleteJobResponse response;
  AVIARY_RETURN_IF_ERROR(MayHaveHappened(
      client.Call("DeleteJob", &v1::JobService::Stub::DeleteJob, request, &response), args.target, "deleted"));
  std::cout << "job " << request.job_id() << " deleted\n";
  for (const std::string& folder : response.removed_folders()) std::cout << "removed " << folder << "\n";
  if (args.with_run_folders && response.removed_folders().empty()) {
    std::cout << "no run folder to remove\n";
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// logs JOB [--task T] [--follow] [--tail N]

// --follow: how often to ask for new lines. After the job's end the polls go on until
// kLogEndQuietS pass without a new line (at most kLogEndMaxS): groups send a task's last lines
// after it ends, and hear of a cancel only at their next heartbeat.
constexpr double kLogPollS = 1.0;
constexpr double kLogEndQuietS = 4.0;
constexpr double kLogEndMaxS = 20.0;

absl::Status Logs(Client& client, const ClientArgs& args) {
  using Clock = std::chrono::steady_clock;
  std::string only_task;
  if (!args.task.empty()) {
    // A task named without its job ("finetune-f0") is the job's.
    only_task = args.task.find('/') == std::string::npos ? absl::StrCat(args.target, "/", args.task) : args.task;
  }
  std::map<std::string, int64_t> after;    // per task: the last seq printed
  std::map<std::string, int64_t> log_ids;  // per task: the coordinator's log it came from
  std::set<std::string> dropped_said;      // tasks whose lines no longer kept were said
  bool answered = false;                    // a GetLogs answered (a follower rides out errors after)
  int failures = 0;
  double backoff_s = kFirstBackoffS;
  bool first = true;
  std::optional<Clock::time_point> ended_at;
  Clock::time_point last_line_at;
  // `logs --follow | grep -m1 X` ends with grep, not at the next line.
  std::optional<ClosedPipeWatcher> pipe_watcher;
  if (args.follow) pipe_watcher.emplace();
  while (true) {
    // One call for every task (or the one), each from its last seq.
    v1::GetLogsRequest request;
    request.set_job_id(args.target);
    request.set_task_id(only_task);
    request.set_limit(first ? args.tail : 0);
    for (const auto& [task, seq] : after) (*request.mutable_after_seq_by_task())[task] = seq;
    v1::GetLogsResponse response;
    // After the first answer a follower waits for a coordinator that is restarting (up to
    // --timeout a call), as watch does, rather than failing at once.
    const absl::Status status = client.Call("GetLogs", &v1::JobService::Stub::GetLogs, request, &response,
                                            /*wait_for_ready=*/args.follow && answered);
    bool new_lines = false;
    bool again = false;  // a task's log started afresh: ask again from its start at once
    if (status.ok()) {
      for (const auto& log : response.tasks()) {
        int64_t& seen = after[log.task_id()];
        int64_t& log_id = log_ids[log.task_id()];
        // A coordinator restart or an evicted log starts the task's log afresh (logs are kept in
        // memory), numbered from 1 again: another log_id (an older coordinator sends none, and
        // then a last_seq below what was printed says so).
        const bool afresh = (log.log_id() != 0 && log_id != 0 && log.log_id() != log_id) || log.last_seq() < seen;
        if (log.log_id() != 0) log_id = log.log_id();
        if (afresh) {
          const bool cut = seen > 0;  // this answer left out its lines up to the old seq
          seen = 0;
          if (cut) {
            again = true;
            continue;
          }
        }
        // Said before the task's first lines (an answer cut before them brings them next).
        if (first && log.dropped() > 0 && args.tail == 0 && (log.lines_size() > 0 || !response.more()) &&
            dropped_said.insert(log.task_id()).second) {
          std::cout << "(" << log.task_id() << ": " << log.dropped() << " earlier lines are no longer kept)\n";
        }
        for (const v1::LogLine& line : log.lines()) {
          if (line.seq() <= seen) continue;
          // Lines the coordinator let go (its per-task budget) between two polls of a follower.
          if (!first && seen > 0 && line.seq() > seen + 1) {
            std::cout << "(" << log.task_id() << ": " << line.seq() - seen - 1
                      << " lines were no longer kept when asked for)\n";
          }
          std::cout << FormatLogLine(only_task.empty() ? log.task_id() : "", line) << "\n";
          seen = line.seq();
          new_lines = true;
        }
      }
    }
    std::cout.flush();
    // A failed write stops --follow (main() reports it: client/output.h).
    if (StdoutFailed()) return absl::OkStatus();
    if (!status.ok() && status.code() == absl::StatusCode::kUnauthenticated && args.follow && answered) {
      const absl::Status still = client.AfterRefusal(status);
      if (!still.ok()) return still;
      std::cerr << "aviary logs: the coordinator refused the token; going on with the one now in "
                << client.options().token_file << "\n";
      continue;
    }
    if (!status.ok()) {
      const bool retryable = status.code() == absl::StatusCode::kUnavailable ||
                             status.code() == absl::StatusCode::kDeadlineExceeded;
      if (!args.follow || !answered || !retryable) return status;
      if (++failures > kMaxReconnects) {
        return common::Annotate(status, absl::StrCat("gave up after ", kMaxReconnects, " attempts"));
      }
      std::cerr << "aviary logs: " << status.message() << "; retrying in " << backoff_s << " s\n";
      std::this_thread::sleep_for(std::chrono::duration<double>(backoff_s));
      backoff_s = std::min(kMaxBackoffS, backoff_s * 2);
      continue;
    }
    failures = 0;
    backoff_s = kFirstBackoffS;
    answered = true;
    // An answer cut at its size bound: the rest at once, still as the first pass (--tail).
    if (response.more() && (new_lines || again)) continue;
    first = false;
    if (!args.follow) return absl::OkStatus();
    const Clock::time_point now = Clock::now();
    if (new_lines) last_line_at = now;
    if (IsTerminal(response.job().state()) && !again) {  // a log to read again first
      if (!ended_at) ended_at = now;
      const auto quiet = now - std::max(*ended_at, last_line_at);
      if (quiet >= std::chrono::duration<double>(kLogEndQuietS) ||
          now - *ended_at >= std::chrono::duration<double>(kLogEndMaxS)) {
        std::cerr << "job " << args.target << " " << JobStateName(response.job().state()) << "\n";
        return absl::OkStatus();
      }
    } else if (!IsTerminal(response.job().state())) {
      ended_at.reset();  // retried while its last lines were awaited: its end is a later one
    }
    if (!again) std::this_thread::sleep_for(std::chrono::duration<double>(kLogPollS));
  }
}

// ---------------------------------------------------------------------------------------------
// history JOB [--task T ...] [--plot out.png] [--csv]

absl::Status PlotHistory(const std::string& job_id, const std::vector<v1::HistoryRow>& rows,
                         const std::string& path) {
  // One series per task (in the order the coordinator sends: task then epoch).
  std::vector<std::string> order;
  std::map<std::string, std::vector<const v1::HistoryRow*>> by_task;
  for (const auto& r : rows) {
    if (!by_task.count(r.task_id())) order.push_back(r.task_id());
    by_task[r.task_id()].push_back(&r);
  }
  common::Panel loss, auc, lr;
  loss.title = "loss (train solid, val dashed)";
  loss.x_label = auc.x_label = lr.x_label = "epoch";
  loss.y_label = "loss";
  auc.title = "val AUC (micro PR-AUC)";
  auc.y_label = "AUC";
  lr.title = "learning rate";
  lr.y_label = "lr";
  bool lr_positive = true;
  for (size_t i = 0; i < order.size(); ++i) {
    const std::string& task = order[i];
    std::string name = task.substr(task.find('/') == std::string::npos ? 0 : task.find('/') + 1);
    const uint32_t color = common::PaletteColor(static_cast<int>(i));
    common::Series train_loss, val_loss, val_auc, rate;
    train_loss.name = name;
    val_loss.name = "";  // one legend entry per task: the solid line's
    val_auc.name = rate.name = name;
    train_loss.rgb = val_loss.rgb = val_auc.rgb = rate.rgb = color;
    val_loss.dashed = true;
    int best = -1;
    for (const v1::HistoryRow* r : by_task[task]) {
      const v1::Metrics& m = r->metrics();
      const double x = m.epoch();
      for (auto* s : {&train_loss, &val_loss, &val_auc, &rate}) s->x.push_back(x);
      train_loss.y.push_back(m.train_loss());
      val_loss.y.push_back(m.val_loss());
      val_auc.y.push_back(m.val_auc());
      rate.y.push_back(m.lr());
      if (std::isfinite(m.lr()) && m.lr() <= 0) lr_positive = false;
      if (std::isfinite(m.val_auc()) &&
          (best < 0 || m.val_auc() > val_auc.y[static_cast<size_t>(best)])) {
        best = static_cast<int>(val_auc.y.size()) - 1;
      }
    }
    if (best >= 0) {
      val_auc.marker_index = best;
      val_auc.marker_label = absl::StrFormat("%.4f", val_auc.y[static_cast<size_t>(best)]);
    }
    loss.lines.push_back(train_loss);
    loss.lines.push_back(val_loss);
    auc.lines.push_back(val_auc);
    lr.lines.push_back(rate);
  }
  lr.log_y = lr_positive;
  common::Figure figure;
  figure.width = 1800;
  figure.height = 560;
  figure.title = absl::StrCat("job ", job_id);
  figure.panels = {loss, auc, lr};
  figure.columns = 3;
  return common::WritePng(figure, path);
}

absl::Status History(Client& client, const ClientArgs& args) {
  v1::GetHistoryRequest request;
  request.set_job_id(args.target);
  AVIARY_RETURN_IF_ERROR(CheckJobId(request.job_id()));
  for (const std::string& task : args.tasks) {
    AVIARY_RETURN_IF_ERROR(CheckUtf8("--task", task));
    request.add_tasks(task);
  }
  if (!args.plot.empty()) {
    // Before the call: a plot that cannot be written is bad input (exit 2), not a failed write.
    std::error_code ec;
    const fs::path parent = fs::path(args.plot).parent_path();
    if (fs::is_directory(args.plot, ec)) {
      return absl::InvalidArgumentError(absl::StrCat("--plot ", args.plot, ": is a directory, expected a file path"));
    }
    if (!parent.empty() && !fs::is_directory(parent, ec)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--plot ", args.plot, ": the folder ", parent.string(), " does not exist"));
    }
  }
  v1::GetHistoryResponse response;
  AVIARY_RETURN_IF_ERROR(
      client.Call("GetHistory", &v1::JobService::Stub::GetHistory, request, &response));
  std::vector<v1::HistoryRow> rows(response.rows().begin(), response.rows().end());
  if (response.damaged_points_skipped() > 0) {
    std::cerr << "warning: " << response.damaged_points_skipped()
              << " epoch rows of this history are damaged in the coordinator's database and left out (its log "
                 "names them)\n";
  }
  // --csv: the header alone on stdout, and the notice on stderr as without it.
  if (args.csv) std::cout << FormatHistoryCsv(rows);
  if (rows.empty()) {
    // "yet" only while the job may still train: a finished job (cancelled before its first epoch
    // end) will not get any. When its state cannot be read, the neutral wording.
    v1::GetJobRequest job_request;
    job_request.set_job_id(request.job_id());
    v1::JobInfo job;
    const absl::Status got = client.Call("GetJob", &v1::JobService::Stub::GetJob, job_request, &job);
    std::string why = " has no finished epochs";
    if (!args.tasks.empty()) {
      // --task: the tasks named have none (the job's other tasks may).
      why = absl::StrCat(": ", absl::StrJoin(args.tasks, ", "), args.tasks.size() == 1 ? " has" : " have",
                         " no finished epochs");
      if (got.ok() && IsTerminal(job.state())) {
        absl::StrAppend(&why, " (the job is ", JobStateName(job.state()), ")");
      } else if (got.ok()) {
        why += " yet";
      }
    } else if (got.ok() && IsTerminal(job.state())) {
      why = absl::StrCat(" is ", JobStateName(job.state()), " and has no finished epochs");
    } else if (got.ok()) {
      why += " yet";
    }
    std::cerr << "job " << request.job_id() << why << "\n";
  } else if (!args.csv) {
    std::cout << FormatHistoryTable(rows);
  }
  if (const std::string* plot = args.plot.empty() ? nullptr : &args.plot) {
    if (rows.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--plot ", *plot, ": job ", request.job_id(), args.tasks.empty() ? "" : absl::StrCat(" (", absl::StrJoin(args.tasks, ", "), ")"),
          " has no finished epochs to plot"));
    }
    AVIARY_RETURN_IF_ERROR(
        common::Annotate(PlotHistory(request.job_id(), rows, *plot), absl::StrCat("--plot ", *plot)));
    std::cerr << "wrote " << *plot << "\n";
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// watch JOB

// Draws the job as events arrive: on a terminal a block of one line per task redrawn in place
// (messages scroll above it), otherwise plain log lines. Not thread-safe.
class WatchView {
 public:
  explicit WatchView(bool tty) : tty_(tty), start_(Clock::now()) {}

  // `snapshot`: the stream's first event, the job as it stands (its message only repeats the
  // state): the first one is shown as the job's header line, a reconnect's as the task states
  // that changed while the stream was down.
  void OnEvent(const v1::JobEvent& event, bool snapshot) {
    const double now = Now();
    const bool first = !has_job_;
    const std::string message = snapshot ? "" : PrintableLines(event.message(), " / ");
    const v1::JobInfo& job = event.job();
    std::map<std::string, v1::TaskState> previous = states_;
    job_ = job;
    has_job_ = true;
    for (const auto& t : job.tasks()) {
      eta_.Observe(t, now);
      states_[t.task_id()] = t.state();
    }
    std::vector<std::string> lines;  // lines that scroll (messages, epoch ends)
    if (first && message.empty()) {
      lines.push_back(absl::StrCat("job ", job.job_id(), " ", JobStateName(job.state()),
                                   job.name().empty() ? "" : " (" + PrintableText(job.name()) + ")", ", ",
                                   job.tasks_size(), " tasks",
                                   job.tags().empty() ? "" : absl::StrCat("  [", FormatTags(job), "]"),
                                   job.note().empty() ? "" : absl::StrCat("  note: ", PrintableText(job.note()))));
    }
    const bool progress = event.has_metrics();
    if (progress && event.metrics().epoch_end()) {
      const v1::Metrics& m = event.metrics();
      if (std::isfinite(m.val_auc())) epoch_auc_[event.task_id()] = m.val_auc();
      lines.push_back(absl::StrFormat(
          "%s epoch %d: loss %s  val_loss %s  val_auc %s  val_roc_auc %s  val_acc %s  lr %s",
          PrintableText(event.task_id()), m.epoch(), FormatMetric(m.train_loss()), FormatMetric(m.val_loss()),
          FormatMetric(m.val_auc()), FormatMetric(m.val_roc_auc()), FormatMetric(m.val_acc()),
          FormatSmall(m.lr())));
    } else if (!progress && !message.empty()) {
      lines.push_back(message);  // a worker's error text among them: one line, escaped
    } else if (!progress && !first) {
      // A state change without a message: say which task changed.
      for (const auto& t : job.tasks()) {
        auto it = previous.find(t.task_id());
        if (it != previous.end() && it->second != t.state()) {
          lines.push_back(absl::StrCat(t.task_id(), ": ", TaskStateName(it->second), " -> ",
                                       TaskStateName(t.state())));
        }
      }
    }
    if (tty_) {
      const bool changed = !lines.empty() || previous != states_;
      if (changed || now - last_draw_s_ >= kRedrawIntervalS || IsTerminal(job.state())) {
        Redraw(lines);
        last_draw_s_ = now;
      }
      return;
    }
    for (const std::string& l : lines) std::cout << Stamp() << l << "\n";
    // Plain output: a task's line on state changes and, for step progress, every few seconds.
    for (const auto& t : job.tasks()) {
      auto it = previous.find(t.task_id());
      const bool state_changed = it == previous.end() || it->second != t.state();
      const bool step_due = progress && event.task_id() == t.task_id() &&
                            !event.metrics().epoch_end() &&
                            now - last_plain_[t.task_id()] >= kPlainStepIntervalS;
      if (state_changed || step_due) {
        std::cout << Stamp() << FormatTaskLine(t, eta_.SecondsLeft(t), EpochAuc(t.task_id())) << "\n";
        last_plain_[t.task_id()] = now;
      }
    }
    std::cout.flush();
  }

  // A line outside the live block (reconnects, errors).
  void Note(const std::string& line) {
    if (tty_) {
      Redraw({line});
    } else {
      std::cout << Stamp() << line << "\n";
      std::cout.flush();
    }
  }

  // Final redraw so the block shows the last state.
  void Finish() {
    if (tty_ && has_job_) Redraw({});
  }

  bool has_job() const { return has_job_; }
  const v1::JobInfo& job() const { return job_; }

 private:
  static size_t TerminalColumns() {
    struct winsize ws {};
    if (::ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
    return 0;  // unknown: no cut
  }

  // The task rows the block may have: the terminal's height less the job line, a line for the
  // cursor and one for a note; a block taller than the screen cannot be redrawn in place (the
  // cursor stops at the top row and the next redraw lands over the old one).
  int MaxTaskRows() const {
    struct winsize ws {};
    if (::ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_row > 0) return std::max(2, ws.ws_row - 3);
    return job_.tasks_size();  // unknown: every task
  }

  double EpochAuc(const std::string& task_id) const {
    auto it = epoch_auc_.find(task_id);
    return it == epoch_auc_.end() ? std::nan("") : it->second;
  }

  double Now() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

  static std::string Stamp() {
    const auto now = std::chrono::system_clock::now();
    const int64_t ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
    return FormatUnixMs(ms).substr(11) + "  ";
  }

  // Moves up over the block, prints `scroll` lines, then the block again.
  void Redraw(const std::vector<std::string>& scroll) {
    std::string out;
    // Up over the block, and everything from there down cleared: a scrolled line wider than
    // the terminal wraps onto a second row, which its own \x1b[2K did not clear (an old block
    // row's tail stayed on screen).
    if (drawn_ > 0) absl::StrAppend(&out, "\x1b[", drawn_, "A\r\x1b[J");
    for (const std::string& l : scroll) absl::StrAppend(&out, "\r\x1b[2K", Stamp(), l, "\n");
    drawn_ = 0;
    if (has_job_) {
      // Block lines are cut to the terminal's width: a wrapped line would break the cursor-up
      // count of the next redraw.
      const size_t width = TerminalColumns();
      // Cut by bytes at a character boundary, never inside a character (a stray lead byte is
      // drawn as a replacement character): a UTF-8 character has at least as many bytes as the
      // columns it fills, so the cut line still fits.
      auto fit = [width](std::string line) {
        if (width > 1 && line.size() >= width) line = std::string(common::Utf8Prefix(line, width - 1));
        return line;
      };
      absl::StrAppend(&out, "\r\x1b[2K", fit(absl::StrCat(job_.job_id(), "  ", JobStateName(job_.state()))), "\n");
      ++drawn_;
      std::string more;
      for (int i : WatchRows(job_, MaxTaskRows(), &more)) {
        const v1::TaskInfo& t = job_.tasks(i);
        absl::StrAppend(&out, "\r\x1b[2K",
                        fit("  " + FormatTaskLine(t, eta_.SecondsLeft(t), EpochAuc(t.task_id()))),
                        "\n");
        ++drawn_;
      }
      if (!more.empty()) {
        absl::StrAppend(&out, "\r\x1b[2K", fit("  " + more), "\n");
        ++drawn_;
      }
    }
    // Clears what an earlier, taller block left below.
    absl::StrAppend(&out, "\x1b[J");
    std::cout << out;
    std::cout.flush();
  }

  const bool tty_;
  const Clock::time_point start_;
  bool has_job_ = false;
  v1::JobInfo job_;
  std::map<std::string, v1::TaskState> states_;
  std::map<std::string, double> last_plain_;
  std::map<std::string, double> epoch_auc_;  // val_auc of each task's last epoch end seen
  EtaTracker eta_;
  int drawn_ = 0;
  double last_draw_s_ = -1e9;
};

// Cancels `context` unless Disarm() is called within `timeout_s`: bounds the wait for the
// first message of a stream, which has no deadline of its own (a job may run for days).
class FirstMessageWatchdog {
 public:
  FirstMessageWatchdog(grpc::ClientContext* context, double timeout_s)
      : thread_([this, context, timeout_s] {
          std::unique_lock<std::mutex> lock(mu_);
          if (!cv_.wait_for(lock, std::chrono::duration<double>(timeout_s),
                            [this] { return disarmed_; })) {
            fired_ = true;
            context->TryCancel();
          }
        }) {}
  ~FirstMessageWatchdog() {
    Disarm();
    thread_.join();
  }
  FirstMessageWatchdog(const FirstMessageWatchdog&) = delete;
  FirstMessageWatchdog& operator=(const FirstMessageWatchdog&) = delete;

  void Disarm() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      disarmed_ = true;
    }
    cv_.notify_all();
  }
  bool fired() {
    std::lock_guard<std::mutex> lock(mu_);
    return fired_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool disarmed_ = false;
  bool fired_ = false;
  std::thread thread_;  // last: starts after the members it uses
};

absl::StatusOr<int> Watch(Client& client, const ClientArgs& args) {
  const std::string& job_id = args.target;
  AVIARY_RETURN_IF_ERROR(CheckJobId(job_id));
  const char* term = std::getenv("TERM");
  const bool tty = ::isatty(STDOUT_FILENO) && !(term && std::string(term) == "dumb");
  WatchView view(tty);
  const ClosedPipeWatcher pipe_watcher;  // `watch JOB | head -1` ends with head, not at the next event
  v1::WatchJobRequest request;
  request.set_job_id(job_id);
  int failures = 0;
  double backoff_s = kFirstBackoffS;
  bool connected_once = false;
  while (true) {
    grpc::ClientContext context;
    client.Prepare(&context, /*with_deadline=*/false);
    // After a break, wait for the coordinator to come back (bounded by the watchdog).
    if (connected_once) context.set_wait_for_ready(true);
    bool got_message = false;
    bool terminal = false;
    grpc::Status status;
    bool watchdog_fired = false;
    {
      FirstMessageWatchdog watchdog(&context, client.options().timeout_s);
      std::unique_ptr<grpc::ClientReader<v1::JobEvent>> reader =
          client.stub()->WatchJob(&context, request);
      v1::JobEvent event;
      while (reader->Read(&event)) {
        const bool snapshot = !got_message;
        if (!got_message) {
          got_message = true;
          watchdog.Disarm();
        }
        view.OnEvent(event, snapshot);
        if (StdoutFailed()) {
          // Nobody sees the progress any more (a full disk under `watch > file`): stop rather
          // than watch on for days; main() reports the failed write (client/output.h).
          context.TryCancel();
          break;
        }
        if (IsTerminal(event.job().state())) {
          // The coordinator ends the stream after this change; do not wait for it. The change's
          // other events say only "job J STATE", which the summary below says.
          terminal = true;
          context.TryCancel();
          break;
        }
      }
      status = reader->Finish();
      watchdog_fired = watchdog.fired();
    }
    if (StdoutFailed()) return 1;
    if (terminal) break;
    if (got_message) {
      connected_once = true;
      client.NoteAnswered();
      failures = 0;
      backoff_s = kFirstBackoffS;
    }
    absl::Status error;
    if (watchdog_fired) {
      error = absl::DeadlineExceededError(
          absl::StrCat("WatchJob to coordinator ", client.options().coordinator,
                       ": no answer within --timeout ", client.options().timeout_s, " s"));
    } else if (status.ok()) {
      // The stream ended before the job did (e.g. the coordinator shut down cleanly).
      error = absl::UnavailableError(
          absl::StrCat("WatchJob to coordinator ", client.options().coordinator,
                       ": the stream ended before job ", job_id, " finished"));
    } else {
      error = client.ToStatus(status, "WatchJob");
    }
    // RESOURCE_EXHAUSTED: the coordinator's watcher slots are full ("retry later"; the slot of
    // this client's own broken stream may be among them for a while).
    const bool retryable = error.code() == absl::StatusCode::kUnavailable ||
                           error.code() == absl::StatusCode::kDeadlineExceeded ||
                           (connected_once && error.code() == absl::StatusCode::kResourceExhausted);
    // A coordinator that was never reached is an error right away, like every other command;
    // but not exit 1 (a failed job): the job's state is not known (3), unless the caller erred (2).
    if (!connected_once) {
      view.Finish();
      if (ClientExitCode(error.code()) != 1) return error;
      std::cerr << FormatClientError("watch", error) << "\n"
                << "aviary watch: job " << job_id << " not seen; its state is not known (see `aviary status "
                << job_id << "` later)\n";
      return kWatchStateUnknownExit;
    }
    // A rotated token (the reload ends the old one's stream): again at once with the file's new one.
    if (error.code() == absl::StatusCode::kUnauthenticated) {
      error = client.AfterRefusal(error);
      if (error.ok()) {
        view.Note(absl::StrCat("the coordinator refused the token; going on with the one now in ",
                               client.options().token_file));
        continue;
      }
    }
    const bool give_up = !retryable || ++failures > kMaxReconnects;
    if (give_up && ClientExitCode(error.code()) != 1) {  // a caller error: the job deleted, the token revoked
      view.Finish();
      return error;
    }
    if (give_up) {
      // Not a failed job: its final state is unknown, and it may be running on (exit 3).
      view.Finish();
      const std::string why =
          retryable ? absl::StrCat("gave up after ", kMaxReconnects, " reconnection attempts") : std::string();
      std::cerr << FormatClientError("watch", retryable ? common::Annotate(error, why) : error) << "\n"
                << "aviary watch: job " << job_id << " was " << JobStateName(view.job().state())
                << " when last seen; it may be running on (see `aviary status " << job_id << "` later)\n";
      return kWatchStateUnknownExit;
    }
    view.Note(absl::StrFormat("connection lost (%s: %s); reconnecting in %.1f s (attempt %d/%d)",
                              absl::StatusCodeToString(error.code()),
                              PrintableLines(std::string(error.message()), " / "), backoff_s,
                              failures, kMaxReconnects));
    std::this_thread::sleep_for(std::chrono::duration<double>(backoff_s));
    backoff_s = std::min(kMaxBackoffS, backoff_s * 2);
  }
  view.Finish();
  const v1::JobInfo& job = view.job();
  std::cout << "\njob " << job.job_id() << " " << JobStateName(job.state()) << "\n";
  if (!job.error().empty()) std::cout << "error: " << PrintableLines(job.error(), "\n       ") << "\n";
  std::cout << FormatBestTable(job);
  if (const std::string best = FormatSweepBest(job); !best.empty()) std::cout << "best sweep " << best << "\n";
  return job.state() == v1::JOB_STATE_SUCCEEDED ? 0 : 1;
}

int RunClient(const std::string& command, const GlobalOptions& global, const ClientArgs& args) {
  absl::StatusOr<ClientOptions> options = ParseClientOptions(global);
  if (!options.ok()) {
    std::cerr << FormatClientError(command, options.status()) << "\n";
    return ClientExitCode(options.status().code());
  }
  if (command != "submit" && command != "list" && command != "prune" && command != "groups") {
    absl::Status st = CheckJobId(args.target);
    if (st.ok()) st = CheckUtf8("JOB", args.target);
    if (st.ok()) st = CheckUtf8("--task", args.task);
    if (!st.ok()) {
      std::cerr << FormatClientError(command, st) << "\n";
      return ClientExitCode(st.code());
    }
  }
  Client client(*std::move(options));
  absl::StatusOr<int> code = 0;
  absl::Status status;
  if (command == "submit") {
    status = Submit(client, args);
  } else if (command == "status") {
    status = Status(client, args);
  } else if (command == "list") {
    status = List(client, args);
  } else if (command == "cancel") {
    status = Cancel(client, args);
  } else if (command == "history") {
    status = History(client, args);
  } else if (command == "prune") {
    status = Prune(client, args);
  } else if (command == "groups") {
    status = Groups(client, args);
  } else if (command == "logs") {
    status = Logs(client, args);
  } else if (command == "retry") {
    status = Retry(client, args);
  } else if (command == "delete") {
    status = Delete(client, args);
  } else if (command == "watch") {
    code = Watch(client, args);
    status = code.status();
  } else {
    status = absl::InvalidArgumentError(absl::StrCat("unknown client command '", command, "'"));
  }
  std::cout.flush();
  if (!status.ok()) {
    std::cerr << FormatClientError(command, status) << "\n";
    return ClientExitCode(status.code());
  }
  return code.ok() ? *code : 0;
}

}  // namespace

void AddClientCommands(CLI::App* app, const GlobalOptions* global, Runner* run) {
  struct Command {
    const char* name;
    const char* positional;  // nullptr: none
    const char* description;
  };
  const Command commands[] = {
      {"submit", "P.yaml", "submit a pipeline; prints the job id last"},
      {"status", "JOB", "the job and its tasks"},
      {"list", nullptr, "jobs, newest first"},
      {"watch", "JOB", "live progress; exit 0 when the job succeeds, 1 when it fails or is cancelled, 3 when its end "
                       "was not seen (the coordinator not reached, or lost)"},
      {"cancel", "JOB", "cancel a job: its running tasks stop at their next step"},
      {"history", "JOB", "epoch rows of every task (or --task T's); --plot: loss, val AUC and lr per task"},
      {"prune", nullptr, "retention now: finished jobs lose step points and manifests (state and history stay)"},
      {"logs", "JOB", "the log lines the worker groups shipped for the job's tasks"},
      {"groups", nullptr, "registered worker groups and what they run"},
      {"retry", "JOB", "run a failed or cancelled job's unfinished tasks again, from their checkpoints"},
      {"delete", "JOB", "remove a finished job (cancel a running one first)"},
  };
  for (const Command& c : commands) {
    auto args = std::make_shared<ClientArgs>();
    CLI::App* sub = app->add_subcommand(c.name, c.description)->group(kClientGroup);
    sub->footer(common::WrapText(kClientFooter) + "\n");
    const std::string name = c.name;
    if (c.positional != nullptr) {
      sub->add_option(c.positional, args->target,
                      name == "submit" ? "the pipeline YAML file" : "the job id")
          ->required();
    }
    if (name == "submit") {
      common::AddSetOption(sub, &args->overrides, "override a key of the pipeline (repeatable)");
      sub->add_option("--name", args->name, "a name for the job (shown by list)")->type_name("N");
      common::AddRepeatedOption(sub, "--tag", &args->tags, "K[=V]", "a tag for the job (repeatable; shown by list, status)");
      sub->add_option("--note", args->note, "a note for the job (one line; shown by status)")->type_name("TEXT");
      common::AddRepeatedOption(sub, "--sweep", &args->sweeps, "KEY=[V1,V2,...]",
                                "sweep a key over values (repeatable: the grid of all --sweep)");
    } else if (name == "logs") {
      sub->add_option("--task", args->task, "one task (e.g. finetune-f0, or JOB/finetune-f0)")
          ->type_name("T")
          ->check(common::NonEmpty("a task"));
      sub->add_flag("--follow", args->follow, "keep printing new lines until the job ends");
      common::AddNumber(sub, "--tail", &args->tail, "N", "only the last N lines of each task first (0: all kept)",
                        0, 100000);
    } else if (name == "groups") {
      sub->add_flag("--json", args->json, "the ListGroupsResponse as JSON (proto field names)");
    } else if (name == "delete") {
      sub->add_flag("--with-run-folders", args->with_run_folders,
                    "also delete the tasks' run folders (checkpoints, history) under the coordinator's work dir");
    } else if (name == "status") {
      sub->add_flag("--json", args->json, "the JobInfo message as JSON (proto field names)");
    } else if (name == "list") {
      common::AddNumber(sub, "--limit", &args->limit, "N", "at most N jobs (0: the coordinator's limit)", 0,
                        10000);
      sub->add_flag("--json", args->json, "the ListJobsResponse as JSON (proto field names)");
    } else if (name == "history") {
      sub->add_option("--task", args->tasks, "only this task's rows (repeatable; e.g. finetune-f0, or JOB/finetune-f0)")
          ->type_name("T")
          ->check(common::NonEmpty("a task"));
      sub->add_option("--plot", args->plot, "also draw loss, val AUC and learning rate to a PNG")
          ->type_name("out.png")
          ->check(common::NonEmpty("a path"));
      sub->add_flag("--csv", args->csv, "CSV instead of the table");
    } else if (name == "prune") {
      common::AddNumber(sub, "--older-than", &args->older_than_days, "DAYS",
                        "jobs finished more than DAYS ago (default: the coordinator's retention_days)", 0.0, 100000.0);
      sub->add_flag("--dry-run", args->dry_run, "print what would be removed, remove nothing");
    }
    sub->callback([run, global, args, name] {
      *run = [global, args, name] { return RunClient(name, *global, *args); };
    });
  }
}

}  // namespace aviary::cli
