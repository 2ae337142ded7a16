// The worker group's agent: `mpirun -np N aviary-worker serve --coordinator HOST:PORT`
// (docs/SERVICE.md, "Worker groups").
//
// Rank 0 talks to the coordinator's WorkerService: it registers the group (world size, hosts,
// devices, backend, version, its /metrics address), heartbeats from a thread, polls LeaseTask
// (1 s, backing off to 5 s while idle), and sends reports from a buffer on a second thread:
// step points every 2 s, epoch ends at once, ReportCheckpoint for best.pt / last.pt after each
// epoch, and the task's outcome (CompleteTask / FailTask), all in the order they were made.
// While the coordinator does not answer, training goes on, reports wait in the buffer and calls
// are retried with exponential backoff (0.5 s to 10 s).
//
// Every rank trains each task; rank 0 leads them over MPI. The control protocol, step by step,
// and what happens on a cancel, a failure, a lost coordinator or SIGTERM:
// worker/agent/group_control.h. Retryable: every error except INVALID_ARGUMENT,
// FAILED_PRECONDITION and DATA_LOSS (bad config or bad data, which another attempt would meet
// again). NOT_FOUND is retryable: the coordinator read the dataset at submit, so a missing file is
// usually this node's view.
//
// The room (target aviary_agent, linked by aviary-worker only):
//   agent.{h,cc}             ServeAgent and the Agent: the serve loops and a task's steps
//   group_control.{h,cc}     the control protocol and its MPI communicator
//   coordinator_link.{h,cc}  rank 0's WorkerService client and its two threads
//   report_buffer.{h,cc}     the reports waiting for the coordinator
//   group_metrics.{h,cc}     the group's Prometheus series; metrics_server.{h,cc} serves them
//   signals.{h,cc}           SIGTERM / SIGINT / SIGUSR2 / mpirun's SIGCONT and the waits that heed them
//
// Thread safety: ServeAgent runs on the main thread; ReportBuffer is thread-safe; Backoff is not.
#ifndef AVIARY_WORKER_AGENT_AGENT_H_
#define AVIARY_WORKER_AGENT_AGENT_H_

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/agent/report_buffer.h"

namespace aviary::worker {
namespace comm {
class MpiSession;
}

struct AgentOptions {
  std::string coordinator;                  // HOST:PORT (required)
  std::string token;                        // bearer token; empty: no authorization entry
  // The file the token came from ("" when it was given itself: AVIARY_TOKEN) and where that was
  // said ("--token-file", "AVIARY_TOKEN_FILE"). Rank 0 reads it again when the coordinator
  // refuses the token (UNAUTHENTICATED), so that a rotation reaches running groups through the
  // file (docs/SERVICE.md); meanwhile their reports are kept, not dropped.
  std::string token_file;
  std::string token_source;
  std::string tls_ca_pem;                   // PEM to trust; empty: an insecure channel
  std::string tls_cert_pem;                 // client certificate for mutual TLS ("" = none)
  std::string tls_key_pem;                  // its private key
  std::string metrics_listen = "0.0.0.0:9471";  // "" disables the group's /metrics
  std::string metrics_port_file;            // the chosen metrics port, written atomically
  std::string device = "auto";              // auto, cpu or cuda
  int threads = 0;                          // torch intra-op threads per rank; 0: cores / local ranks
  int max_tasks = 0;                        // return after this many tasks; 0: serve forever
  double connect_timeout_s = 0;             // give up registering after this long; 0: never
  double rpc_timeout_s = 10;                // the deadline of each call
  double report_interval_s = 2;             // step points at most this often
  // Rank 0 ends the group when its task made no progress (no step, validation batch or epoch
  // end) for this long, after failing it as retryable (stall_watchdog.h); 0: off.
  double stall_timeout_s = 3600;
  size_t max_buffered_points = 100000;      // ReportBuffer bound (SERVICE.md)
};

// The token in options.token_file (common::FirstToken); errors name the file and token_source.
absl::StatusOr<std::string> ReadTokenFile(const AgentOptions& options);

// Runs the agent on every rank of the session's world until max_tasks tasks were handled, a
// signal arrived (OK), or registration failed for good (UNAVAILABLE after connect_timeout_s,
// UNAUTHENTICATED / PERMISSION_DENIED / INVALID_ARGUMENT from the coordinator; the other ranks
// are told to stop and return the same code). `session` must outlive the call.
absl::Status ServeAgent(const AgentOptions& options, comm::MpiSession& session);

// The options ServeAgent refuses before it starts (INVALID_ARGUMENT / FAILED_PRECONDITION naming
// the flag): each rank checks its own (--device cuda on a host without a GPU).
absl::Status CheckAgentOptions(const AgentOptions& options);

// Exponential backoff: Next() returns initial_s, then doubles each call up to max_s; Reset()
// starts over. Not thread-safe.
class Backoff {
 public:
  Backoff(double initial_s, double max_s) : initial_s_(initial_s), max_s_(max_s), next_s_(initial_s) {}
  double Next();
  void Reset() { next_s_ = initial_s_; }

 private:
  double initial_s_, max_s_, next_s_;
};

// Whether a task that ended with `status` may be leased again (SERVICE.md: errors of the device,
// the communicator or the filesystem are; config and data errors are not).
bool IsRetryable(const absl::Status& status);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_AGENT_AGENT_H_
