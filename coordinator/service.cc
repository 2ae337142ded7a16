#include "coordinator/service.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/config.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"
#include "coordinator/content_hash.h"
#include "coordinator/tls_front.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/resource_quota.h"
#include "grpcpp/security/server_credentials.h"

namespace aviary::coordinator {
namespace {

namespace fs = std::filesystem;

// Sync-server threads are capped by this quota; WatchJob streams hold one each, so at most
// kMaxWatchers of them may be open: the rest of the threads stay for heartbeats and the
// other calls (a crowd of watchers must never cost a group its lease).
constexpr int kMaxServerThreads = 512;
constexpr int kMaxWatchers = 256;
// Of them, viewer tokens (dashboards, scripts that poll) hold at most this many: a viewer
// opening streams in a loop cannot take the clients' `aviary watch`.
constexpr int kMaxViewerWatchers = kMaxWatchers / 2;
constexpr int kMaxReceiveBytes = 64 << 20;  // progress batches of up to 100,000 points
constexpr size_t kMaxPointsPerReport = 100000;
constexpr size_t kMaxPipelineBytes = common::kMaxConfigBytes;
constexpr size_t kMaxTextBytes = 4096;
constexpr int kMaxOverrides = 1000;
// Percent-encoded on the wire (a byte outside printable ASCII takes 3): 6 KiB at most, under the
// 8 KiB of metadata a gRPC client accepts by default.
constexpr size_t kMaxStatusMessageBytes = 2048;
constexpr int kDefaultListLimit = 1000;  // ListJobs with limit 0
constexpr size_t kMaxListBytes = size_t{64} << 20;  // ListJobs' jobs, serialized

bool IsHex12(absl::string_view text) {
  if (text.size() != 12) return false;
  for (char c : text) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

std::string Shown(const std::string& value) {
  if (value.size() > 80) return absl::StrCat("'", value.substr(0, 80), "...'");
  return absl::StrCat("'", value, "'");
}

absl::Status CheckJobId(const std::string& field, const std::string& value) {
  if (value.size() == 13 && value[0] == 'j' && IsHex12(absl::string_view(value).substr(1))) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "field '", field, "': ", Shown(value), " is not a job id (j + 12 lowercase hex digits)"));
}

absl::Status CheckGroupId(const std::string& field, const std::string& value) {
  if (value.size() == 13 && value[0] == 'g' && IsHex12(absl::string_view(value).substr(1))) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "field '", field, "': ", Shown(value), " is not a group id (g + 12 lowercase hex digits)"));
}

bool IsNumber(absl::string_view text) {
  bool ok = !text.empty() && text.size() <= 6;
  for (char c : text) ok = ok && c >= '0' && c <= '9';
  return ok;
}

// <job_id>/(pretrain|finetune)-f<k>, with -p<point> for a sweep's tasks.
absl::Status CheckTaskId(const std::string& field, const std::string& value) {
  bool ok = value.size() > 14 && CheckJobId(field, value.substr(0, 13)).ok() && value[13] == '/';
  if (ok) {
    absl::string_view rest = absl::string_view(value).substr(14);
    if (absl::ConsumePrefix(&rest, "pretrain-f") || absl::ConsumePrefix(&rest, "finetune-f")) {
      const size_t point = rest.find("-p");
      ok = IsNumber(rest.substr(0, point)) && (point == absl::string_view::npos || IsNumber(rest.substr(point + 2)));
    } else {
      ok = false;
    }
  }
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("field '", field, "': ", Shown(value),
                                                 " is not a task id (<job_id>/<stage>-f<fold>[-p<point>])"));
}


absl::Status CheckText(const std::string& field, const std::string& value, bool required,
                       size_t max_bytes = kMaxTextBytes) {
  if (required && value.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("field '", field, "': must not be empty"));
  }
  if (value.size() > max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("field '", field, "': ", value.size(),
                                                   " bytes, at most ", max_bytes, " allowed"));
  }
  return absl::OkStatus();
}

// The first control character of `value` (a tab too unless `tab_ok`): INVALID_ARGUMENT naming
// `field`, the byte and where.
absl::Status CheckControlCharacters(const std::string& field, const std::string& value, bool tab_ok) {
  for (size_t i = 0; i < value.size(); ++i) {
    const auto c = static_cast<unsigned char>(value[i]);
    if ((c < 0x20 && !(tab_ok && c == '\t')) || c == 0x7f) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "field '%s': control character 0x%02x at byte %d (expected one line of printable text)", field, c, i));
    }
  }
  return absl::OkStatus();
}

// A job name is one line of text: control characters (a newline, ANSI escapes) would reach
// every terminal that lists the jobs.
absl::Status CheckName(const std::string& field, const std::string& value) {
  return CheckControlCharacters(field, value, /*tab_ok=*/false);
}

// A path or an override is one line: a NUL cut a path where the path policy read it (the task
// got the rest), a newline forged a line of the coordinator's log. A tab is a character of it,
// as the config's strings take it (common/config.cc).
absl::Status CheckOneLine(const std::string& field, const std::string& value) {
  return CheckControlCharacters(field, value, /*tab_ok=*/true);
}

// A tag is "key" or "key=value": the key 1..64 of [A-Za-z0-9_.-], the value one line of at most
// 256 bytes.
absl::Status CheckTag(const std::string& field, const std::string& tag) {
  const size_t eq = tag.find('=');
  const std::string key = tag.substr(0, eq);
  bool ok = !key.empty() && key.size() <= 64;
  for (char c : key) {
    ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                c == '.' || c == '-');
  }
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrCat("field '", field, "': ", Shown(tag),
                                                   ": a tag is KEY or KEY=VALUE, KEY 1 to 64 of [A-Za-z0-9_.-]"));
  }
  if (eq == std::string::npos) return absl::OkStatus();
  const std::string value = tag.substr(eq + 1);
  AVIARY_RETURN_IF_ERROR(CheckText(field, value, false, 256));
  for (size_t i = 0; i < value.size(); ++i) {
    const auto c = static_cast<unsigned char>(value[i]);
    if (c < 0x20 || c == 0x7f) {
      return absl::InvalidArgumentError(
          absl::StrFormat("field '%s': tag '%s': control character 0x%02x in its value", field, key, c));
    }
  }
  return absl::OkStatus();
}

// The values of a progress point (docs/SERVICE.md, "What a worker group may report"): losses
// may be NaN or infinite (that is what the NaN alert is for); the AUCs and accuracies are NaN
// (undefined, e.g. no positive label) or in [0, 1]; lr and samples_per_s are finite and >= 0
// (samples_per_s NaN: not measured); step and samples_total at most 2^53.
absl::Status CheckPointValues(const std::string& field, const aviary::v1::Metrics& point) {
  constexpr int64_t kMaxCount = int64_t{1} << 53;
  auto bad = [&field](const char* name, double value, const char* rule) {
    return absl::InvalidArgumentError(absl::StrCat("field '", field, ".", name, "': ", value, " ", rule));
  };
  // The counts as the integers sent (as a double, 2^62 + 1 read "4.61169e+18").
  auto bad_count = [&field](const char* name, int64_t value) {
    return absl::InvalidArgumentError(absl::StrCat("field '", field, ".", name, "': ", value, " is more than 2^53"));
  };
  if (point.step() > kMaxCount) return bad_count("step", point.step());
  if (point.samples_total() > kMaxCount) return bad_count("samples_total", point.samples_total());
  if (!std::isfinite(point.lr()) || point.lr() < 0) return bad("lr", point.lr(), "must be finite and >= 0");
  if (std::isinf(point.samples_per_s()) || point.samples_per_s() < 0) {
    return bad("samples_per_s", point.samples_per_s(), "must be finite and >= 0, or NaN");
  }
  const std::pair<const char*, double> fractions[] = {{"train_acc", point.train_acc()},
                                                      {"val_auc", point.val_auc()},
                                                      {"val_roc_auc", point.val_roc_auc()},
                                                      {"val_cmap", point.val_cmap()},
                                                      {"val_acc", point.val_acc()}};
  for (const auto& [name, value] : fractions) {
    if (!std::isnan(value) && !(value >= 0 && value <= 1)) return bad(name, value, "must be in [0, 1], or NaN");
  }
  return absl::OkStatus();
}

// `field` names the point in the request ("points[3]", "best").
absl::Status CheckPoint(const std::string& field, const aviary::v1::Metrics& point) {
  if (point.epoch() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", field, ".epoch': ", point.epoch(), " must be >= 0"));
  }
  if (point.step() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", field, ".step': ", point.step(), " must be >= 0"));
  }
  if (point.samples_total() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("field '", field, ".samples_total': ",
                                                   point.samples_total(), " must be >= 0"));
  }
  return CheckPointValues(field, point);
}

// Runs `body` after the role check (`rpc` names the call, `allowed` its roles), mapping its
// status to gRPC's.
template <typename Body>
grpc::Status Serve(const grpc::ServerContext& context, const Authenticator& auth, const char* rpc,
                   RoleSet allowed, Body body) {
  absl::Status status = auth.Check(context, rpc, allowed);
  // A call whose caller gave up before it ran (its deadline passed while a busy server held it):
  // not run. Run late, a stale heartbeat or outcome acted on a lease that came after it.
  if (status.ok() && context.IsCancelled()) {
    status = absl::CancelledError(absl::StrCat(rpc, ": the caller gave up (deadline passed) before it ran"));
  }
  if (status.ok()) status = body();
  return ToGrpcStatus(status);
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // The message travels in the trailing metadata, which a client takes up to 8 KiB of (gRPC's
  // default): a longer one (an error quoting a 5,000-byte path twice) reached the user as
  // "RESOURCE_EXHAUSTED: received initial metadata size exceeds limit", the error itself lost.
  // Its start names the field and the problem; cut at a character's start (the rest of the
  // message is UTF-8 as the values it quotes).
  absl::string_view message = status.message();
  if (message.size() > kMaxStatusMessageBytes) {
    size_t cut = kMaxStatusMessageBytes;
    while (cut > 0 && (static_cast<unsigned char>(message[cut]) & 0xC0) == 0x80) --cut;
    return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                        absl::StrCat(message.substr(0, cut), "... (", message.size() - cut, " more bytes)"));
  }
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(message));
}

// ---------------------------------------------------------------------------------------------
// JobService.

grpc::Status JobServiceImpl::SubmitJob(grpc::ServerContext* context,
                                       const aviary::v1::SubmitJobRequest* request,
                                       aviary::v1::SubmitJobResponse* response) {
  return Serve(*context, *auth_, "JobService.SubmitJob", kClientOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckText("pipeline_yaml", request->pipeline_yaml(), true, kMaxPipelineBytes));
    AVIARY_RETURN_IF_ERROR(CheckText("name", request->name(), false, 256));
    AVIARY_RETURN_IF_ERROR(CheckName("name", request->name()));
    AVIARY_RETURN_IF_ERROR(CheckText("source_path", request->source_path(), false));
    AVIARY_RETURN_IF_ERROR(CheckOneLine("source_path", request->source_path()));
    AVIARY_RETURN_IF_ERROR(CheckText("working_dir", request->working_dir(), false));
    AVIARY_RETURN_IF_ERROR(CheckOneLine("working_dir", request->working_dir()));
    if (!request->working_dir().empty() && fs::path(request->working_dir()).is_relative()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "field 'working_dir': ", Shown(request->working_dir()), " is not an absolute path"));
    }
    // Each is applied again for every sweep point: 100,000 of them kept a core busy for minutes,
    // after the caller had gone.
    if (request->overrides_size() > kMaxOverrides) {
      return absl::InvalidArgumentError(
          absl::StrCat("field 'overrides': ", request->overrides_size(), " overrides, at most ", kMaxOverrides));
    }
    for (int i = 0; i < request->overrides_size(); ++i) {
      const std::string& text = request->overrides(i);
      const std::string field = absl::StrCat("overrides[", i, "]");
      AVIARY_RETURN_IF_ERROR(CheckText(field, text, true));
      AVIARY_RETURN_IF_ERROR(CheckOneLine(field, text));
      if (text.find('=') == std::string::npos || text[0] == '=') {
        return absl::InvalidArgumentError(
            absl::StrCat("field '", field, "': ", Shown(text), " is not dotted.key=value"));
      }
    }
    if (request->tags_size() > 32) {
      return absl::InvalidArgumentError(absl::StrCat("field 'tags': ", request->tags_size(), " tags, at most 32"));
    }
    for (int i = 0; i < request->tags_size(); ++i) {
      AVIARY_RETURN_IF_ERROR(CheckTag(absl::StrCat("tags[", i, "]"), request->tags(i)));
    }
    AVIARY_RETURN_IF_ERROR(CheckText("note", request->note(), false, 4096));
    AVIARY_RETURN_IF_ERROR(CheckName("note", request->note()));
    if (request->sweep_size() > 16) {
      return absl::InvalidArgumentError(absl::StrCat("field 'sweep': ", request->sweep_size(), " axes, at most 16"));
    }
    AVIARY_ASSIGN_OR_RETURN(std::string job_id,
                            scheduler_->SubmitJob(*request, [context] { return context->IsCancelled(); }));
    response->set_job_id(job_id);
    return absl::OkStatus();
  });
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext* context,
                                    const aviary::v1::GetJobRequest* request,
                                    aviary::v1::JobInfo* response) {
  return Serve(*context, *auth_, "JobService.GetJob", kClientOrViewer, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckJobId("job_id", request->job_id()));
    AVIARY_ASSIGN_OR_RETURN(*response, scheduler_->GetJob(request->job_id()));
    return absl::OkStatus();
  });
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext* context,
                                      const aviary::v1::ListJobsRequest* request,
                                      aviary::v1::ListJobsResponse* response) {
  return Serve(*context, *auth_, "JobService.ListJobs", kClientOrViewer, [&]() -> absl::Status {
    if (request->limit() < 0 || request->limit() > 10000) {
      return absl::InvalidArgumentError(
          absl::StrCat("field 'limit': ", request->limit(), " is outside 0..10000"));
    }
    // 0: the newest kDefaultListLimit (every job with every task grew without bound: after
    // weeks of sweeps, tens of MB a call, and past the client's message limit at last).
    const int limit = request->limit() == 0 ? kDefaultListLimit : request->limit();
    int omitted = 0;
    int beyond_limit = 0;
    for (aviary::v1::JobInfo& job : scheduler_->ListJobs(limit, kMaxListBytes, &omitted, &beyond_limit)) {
      *response->add_jobs() = std::move(job);
    }
    response->set_omitted(omitted);
    response->set_beyond_limit(beyond_limit);
    return absl::OkStatus();
  });
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext* context,
                                       const aviary::v1::CancelJobRequest* request,
                                       aviary::v1::CancelJobResponse* response) {
  return Serve(*context, *auth_, "JobService.CancelJob", kClientOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckJobId("job_id", request->job_id()));
    AVIARY_ASSIGN_OR_RETURN(*response->mutable_job(), scheduler_->CancelJob(request->job_id()));
    return absl::OkStatus();
  });
}

grpc::Status JobServiceImpl::WatchJob(grpc::ServerContext* context,
                                      const aviary::v1::WatchJobRequest* request,
                                      grpc::ServerWriter<aviary::v1::JobEvent>* writer) {
  return Serve(*context, *auth_, "JobService.WatchJob", kClientOrViewer, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckJobId("job_id", request->job_id()));
    if (watchers_.fetch_add(1) >= kMaxWatchers) {
      watchers_.fetch_sub(1);
      return absl::ResourceExhaustedError(absl::StrCat(
          "WatchJob: ", kMaxWatchers, " streams are open already; poll with GetJob (aviary status) "
          "or retry later"));
    }
    struct Release {
      std::atomic<int>* count;
      ~Release() {
        if (count != nullptr) count->fetch_sub(1);
      }
    } release{&watchers_}, release_viewer{nullptr};
    // A viewer: its token passes for WatchJob (above) but not for a client's calls.
    if (!auth_->Check(*context, "JobService.WatchJob", kClientOnly).ok()) {
      if (viewer_watchers_.fetch_add(1) >= kMaxViewerWatchers) {
        viewer_watchers_.fetch_sub(1);
        return absl::ResourceExhaustedError(absl::StrCat(
            "WatchJob: viewer tokens hold ", kMaxViewerWatchers, " streams already (the other ",
            kMaxWatchers - kMaxViewerWatchers, " are kept for client tokens); poll with GetJob or retry later"));
      }
      release_viewer.count = &viewer_watchers_;
    }
    // The token is checked again before each event and every idle half second: a SIGHUP reload
    // that removed it ends the stream (UNAUTHENTICATED), as it ends every later call; a watch
    // otherwise lasts as long as the job, days.
    absl::Status revoked;
    const auto still_allowed = [&] {
      if (revoked.ok()) revoked = auth_->Check(*context, "JobService.WatchJob", kClientOrViewer);
      return revoked.ok();
    };
    absl::Status status = scheduler_->WatchJob(
        request->job_id(),
        [&](const aviary::v1::JobEvent& event) { return still_allowed() && writer->Write(event); },
        [&] { return context->IsCancelled() || !still_allowed(); });
    if (!revoked.ok()) {
      return absl::Status(revoked.code(), absl::StrCat(revoked.message(), " (checked again on the open stream after "
                                                                          "a token reload)"));
    }
    return status;
  });
}

grpc::Status JobServiceImpl::GetHistory(grpc::ServerContext* context,
                                        const aviary::v1::GetHistoryRequest* request,
                                        aviary::v1::GetHistoryResponse* response) {
  return Serve(*context, *auth_, "JobService.GetHistory", kClientOrViewer, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckJobId("job_id", request->job_id()));
    // Each a task id, or a name within the job (as `aviary logs --task` takes it), of a task id's
    // shape; one the job does not have is the scheduler's NOT_FOUND.
    for (int i = 0; i < request->tasks_size(); ++i) {
      const std::string& task = request->tasks(i);
      const std::string id = absl::StrContains(task, '/') ? task : absl::StrCat(request->job_id(), "/", task);
      if (!CheckTaskId("tasks", id).ok()) {
        return absl::InvalidArgumentError(absl::StrCat("field 'tasks[", i, "]': ", Shown(task),
                                                       " is not a task (<stage>-f<fold>[-p<point>], or "
                                                       "<job_id>/<stage>-f<fold>[-p<point>])"));
      }
    }
    AVIARY_ASSIGN_OR_RETURN(*response, scheduler_->GetHistory(request->job_id(),
                                                              {request->tasks().begin(), request->tasks().end()}));
    return absl::OkStatus();
  });
}

grpc::Status JobServiceImpl::PruneJobs(grpc::ServerContext* context,
                                       const aviary::v1::PruneJobsRequest* request,
                                       aviary::v1::PruneJobsResponse* response) {
  return Serve(*context, *auth_, "JobService.PruneJobs", kClientOnly, [&]() -> absl::Status {
    const double days = request->older_than_days();
    if (!std::isfinite(days) || days > 100000) {
      return absl::InvalidArgumentError(
          absl::StrCat("field 'older_than_days': ", days, " is not a number of days up to 100000 (< 0: retention_days)"));
    }
    AVIARY_ASSIGN_OR_RETURN(*response, scheduler_->PruneJobs(days < 0 ? -1.0 : days * 86400, request->dry_run()));
    return absl::OkStatus();
  });
}

grpc::Status JobServiceImpl::ListGroups(grpc::ServerContext* context,
                                        const aviary::v1::ListGroupsRequest* /*request*/,
                                        aviary::v1::ListGroupsResponse* response) {
  return Serve(*context, *auth_, "JobService.ListGroups", kClientOrViewer, [&]() -> absl::Status {
    for (aviary::v1::GroupInfo& group : scheduler_->ListGroups()) *response->add_groups() = std::move(group);
    response->set_answered_unix_ms(absl::ToUnixMillis(absl::Now()));
    return absl::OkStatus();
  });
}

grpc::Status JobServiceImpl::GetLogs(grpc::ServerContext* context, const aviary::v1::GetLogsRequest* request,
                                     aviary::v1::GetLogsResponse* response) {
  return Serve(*context, *auth_, "JobService.GetLogs", kClientOrViewer, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckJobId("job_id", request->job_id()));
    if (!request->task_id().empty()) {
      AVIARY_RETURN_IF_ERROR(CheckTaskId("task_id", request->task_id()));
      if (request->task_id().compare(0, 13, request->job_id()) != 0) {
        return absl::InvalidArgumentError(absl::StrCat("field 'task_id': ", Shown(request->task_id()),
                                                       " is not a task of job ", request->job_id()));
      }
    }
    if (request->after_seq() < 0) {
      return absl::InvalidArgumentError(absl::StrCat("field 'after_seq': ", request->after_seq(), " must be >= 0"));
    }
    if (request->limit() < 0 || request->limit() > 100000) {
      return absl::InvalidArgumentError(absl::StrCat("field 'limit': ", request->limit(), " is outside 0..100000"));
    }
    for (const auto& [task_id, after] : request->after_seq_by_task()) {
      if (after < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("field 'after_seq_by_task[", Shown(task_id), "]': ", after, " must be >= 0"));
      }
    }
    AVIARY_ASSIGN_OR_RETURN(*response, scheduler_->GetLogs(*request));
    return absl::OkStatus();
  });
}

grpc::Status JobServiceImpl::RetryJob(grpc::ServerContext* context, const aviary::v1::RetryJobRequest* request,
                                      aviary::v1::JobInfo* response) {
  return Serve(*context, *auth_, "JobService.RetryJob", kClientOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckJobId("job_id", request->job_id()));
    AVIARY_ASSIGN_OR_RETURN(*response, scheduler_->RetryJob(request->job_id()));
    return absl::OkStatus();
  });
}

grpc::Status JobServiceImpl::DeleteJob(grpc::ServerContext* context, const aviary::v1::DeleteJobRequest* request,
                                       aviary::v1::DeleteJobResponse* response) {
  return Serve(*context, *auth_, "JobService.DeleteJob", kClientOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckJobId("job_id", request->job_id()));
    AVIARY_ASSIGN_OR_RETURN(std::vector<std::string> removed,
                            scheduler_->DeleteJob(request->job_id(), request->with_run_folders()));
    for (std::string& folder : removed) response->add_removed_folders(std::move(folder));
    return absl::OkStatus();
  });
}

// ---------------------------------------------------------------------------------------------
// WorkerService.

grpc::Status WorkerServiceImpl::RegisterGroup(grpc::ServerContext* context,
                                              const aviary::v1::RegisterGroupRequest* request,
                                              aviary::v1::RegisterGroupResponse* response) {
  return Serve(*context, *auth_, "WorkerService.RegisterGroup", kWorkerOnly, [&]() -> absl::Status {
    if (request->world_size() < 1 || request->world_size() > 65536) {
      return absl::InvalidArgumentError(
          absl::StrCat("field 'world_size': ", request->world_size(), " is outside 1..65536"));
    }
    if (request->hosts_size() > request->world_size() ||
        request->devices_size() > request->world_size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "field '", request->hosts_size() > request->world_size() ? "hosts" : "devices", "': ",
          std::max(request->hosts_size(), request->devices_size()),
          " entries for world_size ", request->world_size()));
    }
    // One line each (they are logged and listed: a newline forged a log line).
    for (int i = 0; i < request->hosts_size(); ++i) {
      AVIARY_RETURN_IF_ERROR(CheckText(absl::StrCat("hosts[", i, "]"), request->hosts(i), false, 256));
      AVIARY_RETURN_IF_ERROR(CheckName(absl::StrCat("hosts[", i, "]"), request->hosts(i)));
    }
    for (int i = 0; i < request->devices_size(); ++i) {
      AVIARY_RETURN_IF_ERROR(CheckText(absl::StrCat("devices[", i, "]"), request->devices(i), false, 64));
      AVIARY_RETURN_IF_ERROR(CheckName(absl::StrCat("devices[", i, "]"), request->devices(i)));
    }
    for (const auto& [field, value, max] : {std::tuple<const char*, const std::string*, size_t>{"backend", &request->backend(), 64},
                                           {"version", &request->version(), 256},
                                           {"metrics_address", &request->metrics_address(), 256}}) {
      AVIARY_RETURN_IF_ERROR(CheckText(field, *value, false, max));
      AVIARY_RETURN_IF_ERROR(CheckName(field, *value));
    }
    if (const std::string& id = request->registration_id();
        id.size() > 64 || !std::all_of(id.begin(), id.end(), [](char c) {
          return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
        })) {
      return absl::InvalidArgumentError(absl::StrCat("field 'registration_id': ", Shown(absl::CHexEscape(id)),
                                                     " is not at most 64 of [A-Za-z0-9_-]"));
    }
    AVIARY_ASSIGN_OR_RETURN(*response, scheduler_->RegisterGroup(*request));
    return absl::OkStatus();
  });
}

grpc::Status WorkerServiceImpl::Heartbeat(grpc::ServerContext* context,
                                          const aviary::v1::HeartbeatRequest* request,
                                          aviary::v1::HeartbeatResponse* response) {
  return Serve(*context, *auth_, "WorkerService.Heartbeat", kWorkerOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckGroupId("group_id", request->group_id()));
    if (!request->task_id().empty()) AVIARY_RETURN_IF_ERROR(CheckTaskId("task_id", request->task_id()));
    constexpr int64_t kMaxDeviceBytes = int64_t{1} << 50;  // 1 PiB
    if (request->gpu_memory_bytes() < 0 || request->gpu_memory_bytes() > kMaxDeviceBytes) {
      return absl::InvalidArgumentError(absl::StrCat("field 'gpu_memory_bytes': ", request->gpu_memory_bytes(),
                                                     " is outside 0..", kMaxDeviceBytes));
    }
    // At most a day (as heartbeat_timeout_s may be): a larger one would keep a lost group forever.
    constexpr int64_t kMaxFenceMs = int64_t{24} * 3600 * 1000;
    if (request->fence_timeout_ms() < 0 || request->fence_timeout_ms() > kMaxFenceMs) {
      return absl::InvalidArgumentError(absl::StrCat("field 'fence_timeout_ms': ", request->fence_timeout_ms(),
                                                     " is outside 0..", kMaxFenceMs));
    }
    AVIARY_ASSIGN_OR_RETURN(bool cancel, scheduler_->Heartbeat(request->group_id(), request->task_id(),
                                                               request->gpu_memory_bytes(),
                                                               request->fence_timeout_ms()));
    response->set_cancel_task(cancel);
    response->set_heartbeat_interval_ms(scheduler_->heartbeat_interval_ms());
    response->set_heartbeat_timeout_ms(scheduler_->heartbeat_timeout_ms());
    return absl::OkStatus();
  });
}

grpc::Status WorkerServiceImpl::LeaseTask(grpc::ServerContext* context,
                                          const aviary::v1::LeaseTaskRequest* request,
                                          aviary::v1::LeaseTaskResponse* response) {
  return Serve(*context, *auth_, "WorkerService.LeaseTask", kWorkerOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckGroupId("group_id", request->group_id()));
    AVIARY_ASSIGN_OR_RETURN(*response, scheduler_->LeaseTask(request->group_id()));
    return absl::OkStatus();
  });
}

grpc::Status WorkerServiceImpl::ReportProgress(grpc::ServerContext* context,
                                               const aviary::v1::ReportProgressRequest* request,
                                               aviary::v1::ReportProgressResponse* response) {
  return Serve(*context, *auth_, "WorkerService.ReportProgress", kWorkerOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckGroupId("group_id", request->group_id()));
    AVIARY_RETURN_IF_ERROR(CheckTaskId("task_id", request->task_id()));
    absl::Status bad;
    if (request->steps_per_epoch() < 0) {
      bad = absl::InvalidArgumentError(absl::StrCat(
          "field 'steps_per_epoch': ", request->steps_per_epoch(), " must be >= 0"));
    } else if (static_cast<size_t>(request->points_size()) > kMaxPointsPerReport) {
      bad = absl::InvalidArgumentError(absl::StrCat("field 'points': ", request->points_size(),
                                                    " points, at most ", kMaxPointsPerReport));
    }
    for (int i = 0; bad.ok() && i < request->points_size(); ++i) {
      bad = CheckPoint(absl::StrCat("points[", i, "]"), request->points(i));
    }
    if (!bad.ok()) {
      // A group that no longer holds the task is told to stop, whatever its report says (as the
      // scheduler answers it): the refusal told it nothing, and it learnt of the cancel only at
      // its next heartbeat.
      AVIARY_ASSIGN_OR_RETURN(const bool holds, scheduler_->Holds(request->group_id(), request->task_id()));
      if (!holds) {
        response->set_cancel_task(true);
        return absl::OkStatus();
      }
      return bad;
    }
    AVIARY_ASSIGN_OR_RETURN(bool cancel, scheduler_->ReportProgress(*request));
    response->set_cancel_task(cancel);
    return absl::OkStatus();
  });
}

grpc::Status WorkerServiceImpl::ReportCheckpoint(grpc::ServerContext* context,
                                                 const aviary::v1::ReportCheckpointRequest* request,
                                                 aviary::v1::ReportCheckpointResponse* response) {
  return Serve(*context, *auth_, "WorkerService.ReportCheckpoint", kWorkerOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckGroupId("group_id", request->group_id()));
    AVIARY_RETURN_IF_ERROR(CheckTaskId("task_id", request->task_id()));
    AVIARY_RETURN_IF_ERROR(CheckText("path", request->path(), true));
    // One line: a run folder's file named "best.pt\n[scheduler] ..." forged a line of the log.
    AVIARY_RETURN_IF_ERROR(CheckOneLine("path", request->path()));
    if (request->epoch() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("field 'epoch': ", request->epoch(), " must be >= 0"));
    }
    return scheduler_->ReportCheckpoint(*request);
  });
}

grpc::Status WorkerServiceImpl::CompleteTask(grpc::ServerContext* context,
                                             const aviary::v1::CompleteTaskRequest* request,
                                             aviary::v1::CompleteTaskResponse* response) {
  return Serve(*context, *auth_, "WorkerService.CompleteTask", kWorkerOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckGroupId("group_id", request->group_id()));
    AVIARY_RETURN_IF_ERROR(CheckTaskId("task_id", request->task_id()));
    // A malformed outcome from the task's holder restarts the task (Scheduler::RefuseEndOfTask).
    absl::Status checked = CheckText("best_checkpoint", request->best_checkpoint(), true);
    if (checked.ok()) checked = CheckOneLine("best_checkpoint", request->best_checkpoint());
    if (checked.ok() && request->has_best()) checked = CheckPoint("best", request->best());
    if (!checked.ok()) {
      return scheduler_->RefuseEndOfTask(request->group_id(), request->task_id(), "CompleteTask", checked,
                                         request->attempt());
    }
    return scheduler_->CompleteTask(*request);
  });
}

grpc::Status WorkerServiceImpl::FailTask(grpc::ServerContext* context,
                                         const aviary::v1::FailTaskRequest* request,
                                         aviary::v1::FailTaskResponse* response) {
  return Serve(*context, *auth_, "WorkerService.FailTask", kWorkerOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckGroupId("group_id", request->group_id()));
    AVIARY_RETURN_IF_ERROR(CheckTaskId("task_id", request->task_id()));
    absl::Status checked = CheckText("error", request->error(), true, 64 * 1024);
    if (!checked.ok()) {
      // The failure still ends the task as its flags say (preempted, retryable or not), with the
      // refusal for its message: an agent drops a refused report, and the task would stay leased
      // to a group that has stopped it.
      aviary::v1::FailTaskRequest recorded = *request;
      recorded.set_error(absl::StrCat("(its message was refused: ", checked.message(), ")"));
      // Not recorded (not registered, not the holder, a commit that failed): that status, which
      // the agent acts on (registers again, lets go, retries), with the refusal added.
      if (absl::Status failed = scheduler_->FailTask(recorded); !failed.ok()) {
        return absl::Status(failed.code(), absl::StrCat(failed.message(), " (and field 'error' was refused: ",
                                                        checked.message(), ")"));
      }
      return absl::Status(checked.code(), absl::StrCat(checked.message(), " (the failure is taken without it)"));
    }
    return scheduler_->FailTask(*request);
  });
}

grpc::Status WorkerServiceImpl::LeaveGroup(grpc::ServerContext* context,
                                           const aviary::v1::LeaveGroupRequest* request,
                                           aviary::v1::LeaveGroupResponse* response) {
  return Serve(*context, *auth_, "WorkerService.LeaveGroup", kWorkerOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckGroupId("group_id", request->group_id()));
    // The reason goes to the log: one line of printable text.
    AVIARY_RETURN_IF_ERROR(CheckText("reason", request->reason(), false, 1024));
    AVIARY_RETURN_IF_ERROR(CheckName("reason", request->reason()));
    return scheduler_->LeaveGroup(request->group_id(), request->reason());
  });
}

grpc::Status WorkerServiceImpl::GetManifest(grpc::ServerContext* context,
                                            const aviary::v1::GetManifestRequest* request,
                                            grpc::ServerWriter<aviary::v1::ManifestChunk>* writer) {
  return Serve(*context, *auth_, "WorkerService.GetManifest", kWorkerOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckGroupId("group_id", request->group_id()));
    if (!IsSha256Hex(request->manifest_hash())) {
      return absl::InvalidArgumentError(absl::StrCat("field 'manifest_hash': ", Shown(request->manifest_hash()),
                                                     " is not a SHA-256 (64 lowercase hex digits)"));
    }
    return scheduler_->GetManifest(request->group_id(), request->manifest_hash(),
                                   [&](const aviary::v1::ManifestChunk& chunk) { return writer->Write(chunk); });
  });
}

grpc::Status WorkerServiceImpl::ShipLogs(grpc::ServerContext* context, const aviary::v1::ShipLogsRequest* request,
                                         aviary::v1::ShipLogsResponse* /*response*/) {
  return Serve(*context, *auth_, "WorkerService.ShipLogs", kWorkerOnly, [&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(CheckGroupId("group_id", request->group_id()));
    AVIARY_RETURN_IF_ERROR(CheckTaskId("task_id", request->task_id()));
    if (request->lines_size() > 10000) {
      return absl::InvalidArgumentError(absl::StrCat("field 'lines': ", request->lines_size(), " lines, at most 10000"));
    }
    for (int i = 0; i < request->lines_size(); ++i) {
      const aviary::v1::LogLine& line = request->lines(i);
      AVIARY_RETURN_IF_ERROR(CheckText(absl::StrCat("lines[", i, "].text"), line.text(), false, 64 * 1024));
      AVIARY_RETURN_IF_ERROR(CheckText(absl::StrCat("lines[", i, "].level"), line.level(), false, 16));
      AVIARY_RETURN_IF_ERROR(CheckName(absl::StrCat("lines[", i, "].level"), line.level()));
      if (line.seq() < 0) {
        return absl::InvalidArgumentError(absl::StrCat("field 'lines[", i, "].seq': ", line.seq(), " is negative"));
      }
      if (line.rank() < 0 || line.rank() > 65535) {
        return absl::InvalidArgumentError(absl::StrCat("field 'lines[", i, "].rank': ", line.rank(), " is outside 0..65535"));
      }
    }
    return scheduler_->ShipLogs(*request);
  });
}

// ---------------------------------------------------------------------------------------------
// Coordinator.

namespace {

// A secret file that others than its owner may read or write: said in the log (the coordinator
// still starts: a shared read-only mount may leave no choice), naming the key, file and mode.
void WarnIfNotPrivate(const char* key, const std::string& path) {
  struct stat info;
  if (path.empty() || ::stat(path.c_str(), &info) != 0) return;  // a missing file is refused elsewhere
  const mode_t open_to = info.st_mode & 077;
  std::string problem;
  if (open_to != 0) {
    problem = absl::StrFormat("mode %04o: %s can %s it", info.st_mode & 07777, (open_to & 070) != 0 ? "its group" : "others",
                              (open_to & 022) != 0 ? "write" : "read");
  } else if (info.st_uid != ::geteuid()) {
    problem = absl::StrCat("owned by uid ", info.st_uid, ", not this coordinator's ", ::geteuid());
  }
  if (problem.empty()) return;
  static const common::Logger log("coordinator");
  log.Warn(absl::StrCat("key '", key, "': ", path, " holds secrets but is not private (", problem, "); chmod 600 it"));
}

}  // namespace

absl::StatusOr<CoordinatorSecrets> LoadCoordinatorSecrets(const CoordinatorConfig& config) {
  CoordinatorSecrets secrets;
  AVIARY_ASSIGN_OR_RETURN(secrets.tokens, LoadTokenSet(config));
  WarnIfNotPrivate("token_file", config.token_file);
  WarnIfNotPrivate("viewer_token_file", config.viewer_token_file);
  WarnIfNotPrivate("worker_token_file", config.worker_token_file);
  WarnIfNotPrivate("tls_key_file", config.tls_key_file);
  if (!config.tls_cert_file.empty()) {
    auto cert = common::ReadFileToString(config.tls_cert_file);
    if (!cert.ok()) return common::Annotate(cert.status(), "key 'tls_cert_file'");
    auto key = common::ReadFileToString(config.tls_key_file);
    if (!key.ok()) return common::Annotate(key.status(), "key 'tls_key_file'");
    // Refused here by key and file: gRPC and the console would fail later, naming the address.
    AVIARY_RETURN_IF_ERROR(CheckTlsPem(*cert, *key, absl::StrCat("key 'tls_cert_file': ", config.tls_cert_file),
                                       absl::StrCat("key 'tls_key_file': ", config.tls_key_file)));
    secrets.tls_cert_pem = std::move(*cert);
    secrets.tls_key_pem = std::move(*key);
  }
  if (!config.tls_client_ca_file.empty()) {
    auto ca = common::ReadFileToString(config.tls_client_ca_file);
    if (!ca.ok()) return common::Annotate(ca.status(), "key 'tls_client_ca_file'");
    AVIARY_RETURN_IF_ERROR(CheckTlsCaPem(*ca, absl::StrCat("key 'tls_client_ca_file': ", config.tls_client_ca_file)));
    secrets.tls_client_ca_pem = std::move(*ca);
  }
  return secrets;
}

namespace {

// "HOST:PORT" with the port replaced by the bound one.
std::string WithPort(const std::string& address, int port) {
  const size_t colon = address.rfind(':');
  return absl::StrCat(address.substr(0, colon), ":", port);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Start(const CoordinatorConfig& config,
                                                                 const CoordinatorSecrets& secrets) {
  std::unique_ptr<Coordinator> c(new Coordinator());
  if (secrets.tokens.no_auth()) {
    c->log_.Warn(
        "serving WITHOUT authentication (allow_no_auth: true): anyone who can reach the port "
        "can submit and cancel jobs and impersonate worker groups");
  }
  c->config_ = config;
  // A port file's folder that is not there is the user's to fix (exit 2), found before anything
  // starts; one that fails later (a full disk) is not.
  for (const auto& [key, path] : {std::pair<const char*, const std::string&>{"port_file", config.port_file},
                                  {"metrics_port_file", config.metrics_port_file},
                                  {"console_port_file", config.console_port_file}}) {
    if (path.empty()) continue;
    const std::filesystem::path folder = std::filesystem::absolute(path).parent_path();
    std::error_code ec;
    if (!std::filesystem::is_directory(folder, ec)) {
      return absl::FailedPreconditionError(absl::StrCat("key '", key, "': ", path, ": the folder ", folder.string(),
                                                        " is not there (or not a folder)"));
    }
  }
  c->auth_ = std::make_unique<Authenticator>(secrets.tokens, !secrets.tls_client_ca_pem.empty());
  AVIARY_ASSIGN_OR_RETURN(c->store_, Store::Open(config.database));
  if (c->store_->upgraded_from() != 0) {
    c->log_.Warn(absl::StrCat("database ", config.database, ": schema upgraded from version ",
                              c->store_->upgraded_from(), " to ", kStoreSchemaVersion,
                              " (one way: the coordinator that wrote it reads version ", c->store_->upgraded_from(),
                              " only); the file from before the upgrade is kept at ", c->store_->upgrade_backup()));
  }
  AVIARY_ASSIGN_OR_RETURN(c->metrics_, CoordinatorMetrics::Create(config.metrics_listen));
  SchedulerOptions options;
  options.work_dir = config.work_dir;
  options.heartbeat_interval_s = config.heartbeat_interval_s;
  options.heartbeat_timeout_s = config.heartbeat_timeout_s;
  options.max_restarts = config.max_restarts;
  options.retention_s = config.retention_days * 86400.0;
  options.data_roots = config.data_roots;
  options.max_event_bytes_per_job = config.max_event_bytes_per_job;
  options.max_logs_response_bytes = config.max_logs_response_bytes;
  AVIARY_ASSIGN_OR_RETURN(c->scheduler_,
                          Scheduler::Create(options, c->store_.get(), c->metrics_.get()));
  c->metrics_->Publish();  // after the restore: the stored counters, never 0 first
  c->job_service_ = std::make_unique<JobServiceImpl>(c->scheduler_.get(), c->auth_.get());
  c->worker_service_ = std::make_unique<WorkerServiceImpl>(c->scheduler_.get(), c->auth_.get());

  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (!secrets.tls_cert_pem.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({secrets.tls_key_pem, secrets.tls_cert_pem});
    if (!secrets.tls_client_ca_pem.empty()) {
      // Mutual TLS for groups: a presented certificate must verify against the CA; clients
      // (token only) may present none, and Authenticator refuses WorkerService calls without.
      ssl.pem_root_certs = secrets.tls_client_ca_pem;
      ssl.client_certificate_request = GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY;
    }
    credentials = grpc::SslServerCredentials(ssl);
  } else {
    credentials = grpc::InsecureServerCredentials();
  }
  // gRPC sets SO_REUSEPORT on Linux by default: a second coordinator of the same user (another
  // database) would bind the same port, and the kernel would split clients and groups between
  // the two. Without it the bind fails: "address in use" below.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(config.listen, credentials, &c->grpc_port_);
  grpc::ResourceQuota quota("aviary-coordinator");
  quota.SetMaxThreads(kMaxServerThreads);
  builder.SetResourceQuota(quota);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::NUM_CQS, 2);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 1);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, 2);
  builder.SetMaxReceiveMessageSize(kMaxReceiveBytes);
  builder.SetMaxSendMessageSize(-1);
  // Find dead watchers and idle clients: ping every 60 s, allow clients' pings every 10 s.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 60000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.RegisterService(c->job_service_.get());
  builder.RegisterService(c->worker_service_.get());
  c->server_ = builder.BuildAndStart();
  if (c->server_ == nullptr || c->grpc_port_ == 0) {
    return absl::UnavailableError(absl::StrCat("listen ", config.listen,
                                               ": cannot serve gRPC there (address in use, or "
                                               "not an address of this host?)"));
  }
  if (!config.console_listen.empty()) {
    ConsoleOptions console;
    console.listen = config.console_listen;
    console.tls_cert_pem = secrets.tls_cert_pem;
    console.tls_key_pem = secrets.tls_key_pem;
    console.grafana_url = config.console_grafana_url;
    AVIARY_ASSIGN_OR_RETURN(c->console_, Console::Start(console, c->scheduler_.get(), c->store_.get(), c->auth_.get()));
    c->log_.Info(absl::StrCat("console on ", c->console_->tls() ? "https://" : "http://",
                              WithPort(config.console_listen, c->console_port()), "/"));
  }
  // The port files once every listener is up, all or none: a start that fails leaves no file
  // naming a port nobody serves (which another process may take later).
  struct PortFile {
    const char* key;
    const std::string& path;
    int port;
  };
  const PortFile port_files[] = {
      {"console_port_file", config.console_port_file, c->console_ ? c->console_port() : 0},
      {"port_file", config.port_file, c->grpc_port_},
      {"metrics_port_file", config.metrics_port_file, c->metrics_port()},
  };
  for (const PortFile& file : port_files) {
    if (file.path.empty() || file.port == 0) continue;
    const std::string contents = absl::StrCat(file.port, "\n");
    absl::Status wrote = common::WriteFileAtomically(file.path, contents);
    if (!wrote.ok()) {
      c->RemovePortFiles();
      return common::Annotate(wrote, absl::StrCat("key '", file.key, "'"));
    }
    c->port_files_.emplace_back(file.path, contents);
  }
  c->log_.Info(absl::StrCat(
      "listening on ", WithPort(config.listen, c->grpc_port_), " (gRPC",
      secrets.tls_cert_pem.empty() ? "" : ", TLS",
      secrets.tls_client_ca_pem.empty() ? "" : ", client certificates for worker groups", "), metrics on ",
      config.metrics_listen.empty() ? std::string("(disabled)")
                                    : WithPort(config.metrics_listen, c->metrics_port())));
  if (!secrets.tokens.no_auth()) {
    c->log_.Info(absl::StrCat("tokens: ", secrets.tokens.client.size(), " client, ", secrets.tokens.viewer.size(),
                              " viewer, ", secrets.tokens.worker.size(), " worker"));
  }
  return c;
}

Coordinator::~Coordinator() { (void)Shutdown(); }

void Coordinator::OnStoreBroken(std::function<void(const absl::Status&)> on_broken) {
  store_->SetOnBroken(std::move(on_broken));
}

absl::Status Coordinator::ReloadTokens() {
  if (auth_ == nullptr) return absl::FailedPreconditionError("ReloadTokens: the coordinator is not running");
  absl::StatusOr<TokenSet> tokens = LoadTokenSet(config_, /*reload=*/true);
  if (!tokens.ok()) {
    log_.Error(absl::StrCat("token reload failed, the current tokens stay: ", tokens.status().message()));
    return tokens.status();
  }
  if (tokens->no_auth() != auth_->tokens()->no_auth()) {
    // Turning authentication on or off is a restart, not a reload.
    absl::Status st = absl::FailedPreconditionError(
        "token reload: the config had no token files at start (allow_no_auth); restart to turn authentication on");
    log_.Error(absl::StrCat("token reload failed, the current tokens stay: ", st.message()));
    return st;
  }
  const std::string counts = absl::StrCat(tokens->client.size(), " client, ", tokens->viewer.size(), " viewer, ",
                                          tokens->worker.size(), " worker");
  const bool role_emptied = (tokens->client.empty() && !auth_->tokens()->client.empty()) ||
                            (tokens->viewer.empty() && !auth_->tokens()->viewer.empty()) ||
                            (tokens->worker.empty() && !auth_->tokens()->worker.empty());
  auth_->Replace(std::move(*tokens));
  // A rotation writes a new file (a temporary one renamed over): its mode is the writer's umask's.
  WarnIfNotPrivate("token_file", config_.token_file);
  WarnIfNotPrivate("viewer_token_file", config_.viewer_token_file);
  WarnIfNotPrivate("worker_token_file", config_.worker_token_file);
  if (role_emptied) {
    log_.Warn(absl::StrCat("tokens reloaded: ", counts, " (a role's file lists no token now: nobody gets that role)"));
  } else {
    log_.Info(absl::StrCat("tokens reloaded: ", counts));
  }
  return absl::OkStatus();
}

void Coordinator::RemovePortFiles() {
  for (const auto& [path, contents] : port_files_) {
    // Not when it names another port now (a coordinator started since, given the same file).
    absl::StatusOr<std::string> now = common::ReadFileToString(path, 64);
    if (now.ok() && *now == contents && ::unlink(path.c_str()) != 0 && errno != ENOENT) {
      log_.Warn(absl::StrCat(path, ": cannot remove the port file: ", std::strerror(errno)));
    }
  }
  port_files_.clear();
}

absl::Status Coordinator::Shutdown(std::chrono::milliseconds grace) {
  if (shut_down_) return absl::OkStatus();
  shut_down_ = true;
  // First, so that a supervisor waiting for the next start's file never reads a port about to
  // close (a clean stop left the files naming ports nobody served).
  RemovePortFiles();
  // Watchers end first so that Shutdown's wait is for short calls only.
  if (scheduler_) scheduler_->Shutdown();
  if (console_) console_->Shutdown();
  console_.reset();
  if (server_) server_->Shutdown(std::chrono::system_clock::now() + grace);
  if (server_) server_->Wait();
  log_.Debug("gRPC server stopped");
  server_.reset();
  scheduler_.reset();
  metrics_.reset();
  log_.Debug("metrics endpoint stopped");
  absl::Status status = store_ ? store_->Close() : absl::OkStatus();
  store_.reset();
  return status;
}

}  // namespace aviary::coordinator
