// Status helpers shared by every aviary library.
//
// aviary uses absl::Status / absl::StatusOr (gRPC's canonical codes) inside the code base;
// foreign error codes are wrapped where they are produced and turned into gRPC statuses once,
// at the RPC edge.
#ifndef AVIARY_COMMON_STATUS_H_
#define AVIARY_COMMON_STATUS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

#define AVIARY_STATUS_CONCAT_INNER_(a, b) a##b
#define AVIARY_STATUS_CONCAT_(a, b) AVIARY_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define AVIARY_RETURN_IF_ERROR(expr)                  \
  do {                                                \
    ::absl::Status _aviary_status = (expr);           \
    if (!_aviary_status.ok()) return _aviary_status;  \
  } while (0)

// `AVIARY_ASSIGN_OR_RETURN(auto x, Foo());` assigns the value of an absl::StatusOr or returns
// its error from the enclosing function.
#define AVIARY_ASSIGN_OR_RETURN(lhs, rexpr) \
  AVIARY_ASSIGN_OR_RETURN_IMPL_(AVIARY_STATUS_CONCAT_(_aviary_statusor_, __LINE__), lhs, rexpr)
#define AVIARY_ASSIGN_OR_RETURN_IMPL_(var, lhs, rexpr) \
  auto var = (rexpr);                                  \
  if (!var.ok()) return std::move(var).status();       \
  lhs = std::move(var).value()

namespace aviary::common {

// The process exit code for a status code: 0 for OK, 2 for errors in what the user gave (bad
// flags, config, paths, preconditions, credentials), 1 for everything else.
inline int ExitCodeFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
      return 0;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kAlreadyExists:
      return 2;
    default:
      return 1;
  }
}
// The process exit code for a command's final status (see above).
inline int ExitCodeFor(const absl::Status& status) { return ExitCodeFor(status.code()); }

// Prepends `context` to the message of `status`, keeping its code and payloads (a storage
// fault, a revoked lease): "context: message".
inline absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  absl::Status annotated(status.code(), absl::StrCat(context, ": ", status.message()));
  status.ForEachPayload([&annotated](absl::string_view url, const absl::Cord& payload) {
    annotated.SetPayload(url, payload);
  });
  return annotated;
}

// A write the lease fence refused because the coordinator took the task's lease away (a user's
// cancel, the task given to another group): the expected end of a cancel, which a group logs as
// a warning, not as its own failure. Marked on the status as a payload.
inline constexpr absl::string_view kLeaseRevokedUrl = "type.aviary/lease-revoked";
inline absl::Status MarkLeaseRevoked(absl::Status status) {
  if (!status.ok()) status.SetPayload(kLeaseRevokedUrl, absl::Cord("1"));
  return status;
}
inline bool IsLeaseRevoked(const absl::Status& status) {
  return !status.ok() && status.GetPayload(kLeaseRevokedUrl).has_value();
}

}  // namespace aviary::common

#endif  // AVIARY_COMMON_STATUS_H_
