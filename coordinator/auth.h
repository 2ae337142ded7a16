// Who may call what (docs/SERVICE.md, "Authentication, roles and TLS" and "Security model").
//
// Three roles, each with its own token file: client (token_file: all of JobService), viewer
// (viewer_token_file: JobService's read-only RPCs) and worker (worker_token_file: WorkerService
// only). A call's bearer token is compared, in constant time, with every token of every role;
// none matching is UNAUTHENTICATED, a role the RPC does not admit is PERMISSION_DENIED naming the
// RPC, the token's role and the roles it needs. With tls_client_ca_file, WorkerService calls also
// need a client certificate the server verified against that CA (mutual TLS for groups).
//
// The token sets are replaced as a whole (SIGHUP: Coordinator::ReloadTokens); every call
// checks against one consistent set.
//
// Thread-safe.
#ifndef AVIARY_COORDINATOR_AUTH_H_
#define AVIARY_COORDINATOR_AUTH_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/coordinator_config.h"

namespace grpc {
class ServerContext;
}

namespace aviary::coordinator {

enum class Role : unsigned { kClient = 1, kViewer = 2, kWorker = 4 };

// The roles an RPC admits, as a mask of Role values.
using RoleSet = unsigned;
constexpr RoleSet kClientOnly = static_cast<RoleSet>(Role::kClient);
constexpr RoleSet kClientOrViewer = static_cast<RoleSet>(Role::kClient) | static_cast<RoleSet>(Role::kViewer);
constexpr RoleSet kWorkerOnly = static_cast<RoleSet>(Role::kWorker);

// "client", "viewer", "worker".
const char* RoleName(Role role);

// The tokens of each role; all three empty = authentication off (allow_no_auth, no files).
struct TokenSet {
  std::vector<std::string> client;
  std::vector<std::string> viewer;
  std::vector<std::string> worker;

  // Whether tokens are asked for at all: false only with allow_no_auth and no token file
  // configured, when every call is let in. A token file that holds no token (a reload after the
  // last one of a role was removed) lets no one of that role in; it never turns tokens off.
  bool enforced = false;
  bool no_auth() const { return !enforced; }
};

// Reads token_file, viewer_token_file and worker_token_file (common/tokens.h: one token per
// line, blank and '#' lines ignored). Errors name the key and the file: a missing file
// (NOT_FOUND, pointing at `aviary-coordinator init`), a file without a token, a required file
// not configured (token_file and worker_token_file unless allow_no_auth), and one token in two
// roles' files (INVALID_ARGUMENT naming both files).
// `reload`: a file that holds no token leaves its role without any (revoking a role's last
// token is removing its line and a SIGHUP); at start it is an error (a mistake, most likely).
absl::StatusOr<TokenSet> LoadTokenSet(const CoordinatorConfig& config, bool reload = false);

// Compares in time that depends only on the lengths, not on where the strings differ.
bool ConstantTimeEquals(const std::string& a, const std::string& b);

class Authenticator {
 public:
  // `require_worker_certificate`: WorkerService calls need a verified client certificate.
  Authenticator(TokenSet tokens, bool require_worker_certificate);

  // OK when the call's token has one of `allowed` roles (and, for worker calls with
  // require_worker_certificate, the peer presented a verified certificate). `rpc` names the
  // call in messages ("JobService.SubmitJob").
  absl::Status Check(const grpc::ServerContext& context, const char* rpc, RoleSet allowed) const
      ABSL_LOCKS_EXCLUDED(mu_);

  // The same check for a bearer token that came without gRPC (the web console's Authorization
  // header or login cookie, coordinator/console.h): UNAUTHENTICATED when it is none of the
  // tokens, PERMISSION_DENIED naming `what`, the token's role and the roles needed. `role`
  // (optional) gets the token's role; with authentication off every caller is a client.
  absl::Status CheckBearer(const std::string& token, const char* what, RoleSet allowed,
                           Role* role = nullptr) const ABSL_LOCKS_EXCLUDED(mu_);

  // Swaps in a new set; calls already past Check keep their answer.
  void Replace(TokenSet tokens) ABSL_LOCKS_EXCLUDED(mu_);

  // The current set (for counts and tests).
  std::shared_ptr<const TokenSet> tokens() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  absl::Status CheckToken(const grpc::ServerContext& context, const char* rpc, RoleSet allowed) const
      ABSL_LOCKS_EXCLUDED(mu_);

  const bool require_worker_certificate_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const TokenSet> tokens_ ABSL_GUARDED_BY(mu_);
};

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_AUTH_H_
