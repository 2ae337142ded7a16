#include "coordinator/auth.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/status.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/security/auth_context.h"

namespace aviary::coordinator {
namespace {

struct RoleFile {
  Role role;
  const char* key;
  const std::string* path;
  std::vector<std::string>* tokens;
  bool required;
};

std::string RoleNames(RoleSet roles) {
  std::vector<std::string> names;
  for (Role role : {Role::kClient, Role::kViewer, Role::kWorker}) {
    if ((roles & static_cast<RoleSet>(role)) != 0) names.push_back(RoleName(role));
  }
  return absl::StrJoin(names, " or ");
}

const char* RoleKey(Role role) {
  switch (role) {
    case Role::kClient:
      return "token_file";
    case Role::kViewer:
      return "viewer_token_file";
    case Role::kWorker:
      return "worker_token_file";
  }
  return "?";
}

// Whether the peer presented a client certificate the TLS handshake verified (with
// GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY, a presented certificate that does not verify
// fails the handshake; an absent one leaves the peer unauthenticated).
bool HasVerifiedClientCertificate(const grpc::ServerContext& context) {
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return false;
  return !auth->FindPropertyValues(GRPC_X509_PEM_CERT_PROPERTY_NAME).empty();
}

}  // namespace

const char* RoleName(Role role) {
  switch (role) {
    case Role::kClient:
      return "client";
    case Role::kViewer:
      return "viewer";
    case Role::kWorker:
      return "worker";
  }
  return "?";
}

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

absl::StatusOr<TokenSet> LoadTokenSet(const CoordinatorConfig& config, bool reload) {
  TokenSet set;
  const RoleFile files[] = {
      {Role::kClient, "token_file", &config.token_file, &set.client, !config.allow_no_auth},
      {Role::kViewer, "viewer_token_file", &config.viewer_token_file, &set.viewer, false},
      {Role::kWorker, "worker_token_file", &config.worker_token_file, &set.worker, !config.allow_no_auth},
  };
  std::map<std::string, const RoleFile*> owner;  // token -> the file that lists it
  for (const RoleFile& file : files) {
    if (file.path->empty()) {
      if (!file.required) continue;
      return absl::InvalidArgumentError(absl::StrCat(
          "key '", file.key, "': not set and allow_no_auth is false (`aviary-coordinator init DIR` "
          "writes the client, viewer and worker token files and a config naming them)"));
    }
    set.enforced = true;
    auto tokens = ReadTokenFile(*file.path, /*allow_empty=*/reload);
    if (!tokens.ok()) {
      absl::Status st = common::Annotate(tokens.status(), absl::StrCat("key '", file.key, "'"));
      if (st.code() == absl::StatusCode::kNotFound) {
        // The first run: say how to get the files rather than how to weaken auth.
        st = absl::Status(st.code(), absl::StrCat(st.message(), " (for a first run, `aviary-coordinator init DIR` "
                                                               "writes the token files, mode 600, and a config "
                                                               "that uses them)"));
      }
      return st;
    }
    for (const std::string& token : *tokens) {
      auto [it, inserted] = owner.emplace(token, &file);
      if (!inserted && it->second != &file) {
        return absl::InvalidArgumentError(absl::StrCat(
            "key '", file.key, "': ", *file.path, " lists a token that key '", it->second->key, "' (",
            *it->second->path, ") lists too; each role needs its own tokens"));
      }
      if (inserted) file.tokens->push_back(token);
    }
  }
  return set;
}

Authenticator::Authenticator(TokenSet tokens, bool require_worker_certificate)
    : require_worker_certificate_(require_worker_certificate),
      tokens_(std::make_shared<const TokenSet>(std::move(tokens))) {}

std::shared_ptr<const TokenSet> Authenticator::tokens() const {
  absl::MutexLock lock(&mu_);
  return tokens_;
}

void Authenticator::Replace(TokenSet tokens) {
  auto next = std::make_shared<const TokenSet>(std::move(tokens));
  absl::MutexLock lock(&mu_);
  tokens_ = std::move(next);
}

absl::Status Authenticator::Check(const grpc::ServerContext& context, const char* rpc,
                                  RoleSet allowed) const {
  AVIARY_RETURN_IF_ERROR(CheckToken(context, rpc, allowed));
  if (require_worker_certificate_ && (allowed & kWorkerOnly) != 0 &&
      !HasVerifiedClientCertificate(context)) {
    return absl::PermissionDeniedError(absl::StrCat(
        rpc, ": needs a client certificate signed by the coordinator's tls_client_ca_file "
             "(aviary-worker serve --tls-cert F --tls-key F)"));
  }
  return absl::OkStatus();
}

absl::Status Authenticator::CheckToken(const grpc::ServerContext& context, const char* rpc,
                                       RoleSet allowed) const {
  const std::shared_ptr<const TokenSet> set = tokens();
  if (set->no_auth()) return absl::OkStatus();  // allow_no_auth
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return absl::UnauthenticatedError(absl::StrCat(
        rpc, ": missing 'authorization: Bearer <token>' metadata (give the client --token-file)"));
  }
  // "Bearer <token>"; anything else matches no token.
  constexpr absl::string_view kScheme = "Bearer ";
  const absl::string_view header(it->second.data(), it->second.size());
  // The scheme in any case (RFC 7235); "bearer" was once taken for no token at all.
  const std::string value(absl::StartsWithIgnoreCase(header, kScheme) ? header.substr(kScheme.size())
                                                                      : absl::string_view());
  return CheckBearer(value, rpc, allowed);
}

absl::Status Authenticator::CheckBearer(const std::string& value, const char* what, RoleSet allowed,
                                        Role* role) const {
  const std::shared_ptr<const TokenSet> set = tokens();
  if (set->no_auth()) {  // allow_no_auth
    if (role != nullptr) *role = Role::kClient;
    return absl::OkStatus();
  }
  // Every token is compared, so the time does not say which role (if any) matched.
  unsigned matched = 0;
  for (Role r : {Role::kClient, Role::kViewer, Role::kWorker}) {
    const std::vector<std::string>& tokens =
        r == Role::kClient ? set->client : r == Role::kViewer ? set->viewer : set->worker;
    for (const std::string& token : tokens) {
      if (ConstantTimeEquals(value, token)) matched |= static_cast<unsigned>(r);
    }
  }
  if (matched == 0) {
    return absl::UnauthenticatedError(
        absl::StrCat(what, ": the bearer token is not one of this coordinator's tokens"));
  }
  const Role has = static_cast<Role>(matched);  // one role: LoadTokenSet refuses shared tokens
  if (role != nullptr) *role = has;
  if ((matched & allowed) != 0) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      what, ": the token has role '", RoleName(has), "' (", RoleKey(has), "); this call needs role '",
      RoleNames(allowed), "'"));
}

}  // namespace aviary::coordinator
