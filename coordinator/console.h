// The coordinator's web console and its JSON API (docs/SERVICE.md, "Web console"), served over
// HTTP by civetweb (the library prometheus-cpp's /metrics already runs on) on its own address,
// `console_listen`. With the gRPC port's certificate it serves HTTPS only: civetweb then listens
// on an ephemeral loopback port and a TlsFront (coordinator/tls_front.h) serves console_listen,
// because Debian 12's civetweb crashes on TLS connections itself.
//
// Pages: /jobs, /jobs/{id} (the task DAG, live per-epoch curves, config, checkpoints), /compare
// and /groups: one HTML shell whose script (console.js, embedded in the binary) renders them
// from /api and follows server-sent events; the charts are Debian's libjs-dygraphs, read from
// /usr/share/javascript at run time (nothing is fetched from the internet).
//
// Auth: the tokens and roles of the gRPC port (coordinator/auth.h). Reads need the client or
// the viewer role, cancel the client role. A call carries the token in `Authorization: Bearer`
// or in the `aviary_console` cookie that POST /login sets (HttpOnly, SameSite=Strict, Secure
// over HTTPS). The cookie holds a signed session, not the token: browsers send a cookie to every
// port of its host, so another service there (or a page it serves) would read a token kept in
// it. The session names its token by a hash prefix and is signed with the token (HMAC), so it
// outlives a coordinator restart and a SIGHUP reload that removes the token revokes it; POST
// /logout ends it, and it expires 12 hours after the login. A POST without an Authorization: Bearer header (the cookie's, log out, or any with
// authentication off) must also carry `X-Aviary-Console: 1`; with authentication off the Host
// header must name this machine (DNS rebinding). An event stream re-checks its token at least
// every second and ends once a reload has revoked it.
//
// Thread-safe: civetweb serves each request on one of its threads; the handlers only read the
// (thread-safe) scheduler, store and authenticator.
#ifndef AVIARY_COORDINATOR_CONSOLE_H_
#define AVIARY_COORDINATOR_CONSOLE_H_

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "coordinator/auth.h"
#include "coordinator/scheduler.h"
#include "coordinator/store.h"
#include "coordinator/tls_front.h"

struct mg_context;
struct mg_connection;

namespace aviary::coordinator {

// The HTTP status an error of the console's API is answered with (FAILED_PRECONDITION 409,
// DEADLINE_EXCEEDED 504, ...; INTERNAL, UNKNOWN and DATA_LOSS 500).
int HttpStatusFor(const absl::Status& status);

struct ConsoleOptions {
  std::string listen;        // HOST:PORT (an IPv4 address); port 0 picks one
  std::string tls_cert_pem;  // both set: HTTPS only
  std::string tls_key_pem;
  std::string grafana_url;   // "" = no link
  // Where Debian's libjs-dygraphs lives (dygraphs/dygraph.min.js under it).
  std::string javascript_dir = "/usr/share/javascript";
};

class Console {
 public:
  // Serves the console; the scheduler, store and authenticator must outlive it (or Shutdown).
  // UNAVAILABLE naming the address when it cannot listen there.
  static absl::StatusOr<std::unique_ptr<Console>> Start(const ConsoleOptions& options, Scheduler* scheduler,
                                                        Store* store, const Authenticator* auth);
  ~Console();
  Console(const Console&) = delete;
  Console& operator=(const Console&) = delete;

  // Ends the event streams and stops the server (waits for its threads). Idempotent.
  void Shutdown();

  int port() const { return port_; }
  bool tls() const { return !options_.tls_cert_pem.empty(); }
  // The login cookie's name: "aviary_console_<port>" ("__Host-" before it under TLS).
  const std::string& cookie_name() const { return cookie_name_; }

  // One request, for civetweb's callback (public only for it).
  int Handle(mg_connection* conn);

 private:
  Console(const ConsoleOptions& options, Scheduler* scheduler, Store* store, const Authenticator* auth)
      : options_(options), scheduler_(scheduler), store_(store), auth_(auth) {}

  class Request;
  void Route(Request& request);
  void ServePage(Request& request, const std::string& page);
  void ServeLogin(Request& request);
  void ServeStatic(Request& request, const std::string& name);
  void ServeJobs(Request& request);
  void ServeJob(Request& request, const std::string& job_id);
  void ServeHistory(Request& request, const std::string& job_id);
  void ServeTaskConfig(Request& request, const std::string& task_id);
  void ServeGroups(Request& request);
  void ServeCancel(Request& request, const std::string& job_id);
  void StreamJob(Request& request, const std::string& job_id);
  void StreamOverview(Request& request);
  std::string JobsJson() const;
  std::string GroupsJson() const;
  // The /api/events payloads: JobsJson and GroupsJson, shared by every stream and rebuilt at
  // most every 500 ms (one build a tick, not one per open page).
  struct Overview {
    std::shared_ptr<const std::string> jobs;
    // What the list pages show of the jobs (JobsJson without the step-level fields: the step's
    // loss, rate and times): a stream sends `jobs` when this changes, not at every progress report.
    std::shared_ptr<const std::string> jobs_shown;
    std::shared_ptr<const std::string> groups;
  };
  Overview OverviewJson() ABSL_LOCKS_EXCLUDED(overview_mu_);

  const ConsoleOptions options_;
  Scheduler* const scheduler_;
  Store* const store_;
  const Authenticator* const auth_;
  common::Logger log_{"console"};
  mg_context* ctx_ = nullptr;
  std::unique_ptr<TlsFront> tls_front_;  // with TLS: serves `listen`, relays to civetweb on loopback
  int port_ = 0;
  std::string cookie_name_;
  std::atomic<bool> stopping_{false};
  // Open event streams (each holds a server thread), in all and per holder (a token, or the
  // peer's address without one): one holder cannot take every stream.
  friend class StreamSlot;
  absl::Mutex streams_mu_;
  int streams_ ABSL_GUARDED_BY(streams_mu_) = 0;
  std::map<std::string, int> streams_by_holder_ ABSL_GUARDED_BY(streams_mu_);
  std::vector<std::string> own_names_;  // with authentication off: the Host names accepted
  // Login sessions are kept by the browser: the cookie is "<expires>.<nonce>.<token id>.<mac>"
  // (Unix seconds; 16 random hex digits; the first 16 hex digits of the token's SHA-256; an
  // HMAC-SHA256 keyed by the token itself over the rest). It names no token and proves the login
  // to the coordinator alone; it outlives a restart, and a reload that removes its token makes
  // it fail. A new session's cookie for `token`:
  absl::StatusOr<std::string> StartSession(const std::string& token) const;
  // The token of the session `cookie` names; nullopt when it does not verify against a client or
  // viewer token now in force, has expired, or was logged out.
  std::optional<std::string> SessionToken(const std::string& cookie) ABSL_LOCKS_EXCLUDED(sessions_mu_);
  // Logs `cookie`'s session out: refused from now until it expires (in memory: a copy of a
  // logged-out cookie works again after a restart, until its expiry).
  void EndSession(const std::string& cookie) ABSL_LOCKS_EXCLUDED(sessions_mu_);
  absl::Mutex sessions_mu_;
  std::map<std::string, int64_t> ended_sessions_ ABSL_GUARDED_BY(sessions_mu_);  // mac -> expires
  // Once ended_sessions_ is full: token id -> the sessions of that token begun (expiry less the
  // lifetime) at or before this Unix second are logged out.
  std::map<std::string, int64_t> ended_before_ ABSL_GUARDED_BY(sessions_mu_);
  bool said_sessions_full_ ABSL_GUARDED_BY(sessions_mu_) = false;
  absl::Mutex overview_mu_;
  Overview overview_ ABSL_GUARDED_BY(overview_mu_);
  std::chrono::steady_clock::time_point overview_at_ ABSL_GUARDED_BY(overview_mu_);
};

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_CONSOLE_H_
