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
// Control plane (MPI, on a communicator of its own, never from two threads at once): rank 0
// broadcasts each task (the serialized Task proto) or "stop" to every rank; the other ranks wait
// for it with a non-blocking broadcast polled with sleeps, so an idle group uses no CPU. During a
// task every rank exchanges one small all-reduce per step (TrainOptions::should_stop): rank 0's
// stop decision (cancel_task, a NOT_FOUND for the group, a signal), any rank's signal flag, and
// the samples each rank trained since the last exchange (the group's samples_total), so that
// every rank stops at the same step.
//
// Failure policy (no rank is left waiting):
//   1. Preparation (parse the task's config and manifest, create the run folder and the
//      communicator) ends with an agreement on every rank: an all-gather of the status codes on
//      the control communicator and a broadcast of the first failing rank's message. When any
//      rank failed, every rank skips the task; rank 0 reports that rank's error (FailTask).
//   2. Training (Trainer::Create + Run) ends with the same exchange, polled with a deadline of
//      2 x comm.timeout_s + 30 s. Errors that every rank meets at the same point (a cancel or a
//      signal, a non-finite loss, which the trainer shares, a config or data error) complete it
//      at once: rank 0 reports the outcome and the group leases the next task. A rank that failed
//      alone while its peers wait in a training collective completes it too once their
//      collective times out (comm.timeout_s, DEADLINE_EXCEEDED). When the ranks ended with
//      different codes, the group is not trusted any more: rank 0 reports the first failing rank's
//      error (retryable) and waits a little for it to be delivered, then the group ends
//      (MPI_Abort, exit code 1), as `aviary-worker train` does. If the exchange does not complete
//      by its deadline, the rank that waits ends the group the same way (rank 0 reports first).
//   Every control exchange of a task (prepared, each step, each epoch end, finished) is the same
//   all-gather of {kind, 3 values}, so a rank that left training alone while its peers are at a
//   step or epoch exchange is seen as "out of step" (never as a mismatched collective): rank 0
//   reports a retryable failure naming where each rank was, and the group ends.
//   Retryable: every error except INVALID_ARGUMENT, FAILED_PRECONDITION and DATA_LOSS (bad
//   config or bad data, which another attempt would meet again). NOT_FOUND is retryable: the
//   coordinator read the dataset at submit, so a missing file is usually this node's view.
//   A cancel_task answer stops the task without a report (the coordinator already decided); a
//   NOT_FOUND for the group stops it too, and rank 0 registers anew. SIGTERM / SIGINT (on any
//   rank during a task; on rank 0 while idle) stop the task at the next step; rank 0 reports
//   FailTask(retryable, "stopped by signal"), waits up to 30 s for the reports to be delivered,
//   and every rank returns OK (exit 0). A second signal ends the process at once. (mpirun
//   forwards SIGTERM to the ranks but may SIGKILL them soon after: launchers should give
//   `--mca odls_base_sigkill_timeout` some seconds.)
//
// Metrics: rank 0 serves them; the step, all-reduce, loader and GPU memory series are rank 0's
// own view, aviary_samples_total counts every rank's samples (exchanged each step).
//
// Thread safety: ServeAgent runs on the main thread; ReportBuffer is thread-safe; Backoff is not.
#ifndef AVIARY_WORKER_AGENT_AGENT_H_
#define AVIARY_WORKER_AGENT_AGENT_H_

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "worker/agent/report_buffer.h"

namespace aviary::worker {
namespace comm {
class MpiSession;
}

struct AgentOptions {
  std::string coordinator;                  // HOST:PORT (required)
  std::string token;                        // bearer token; empty: no authorization entry
  std::string tls_ca_pem;                   // PEM to trust; empty: an insecure channel
  std::string metrics_listen = "0.0.0.0:9471";  // "" disables the group's /metrics
  std::string metrics_port_file;            // the chosen metrics port, written atomically
  std::string device = "auto";              // auto, cpu or cuda
  int threads = 0;                          // torch intra-op threads per rank; 0: cores / local ranks
  int max_tasks = 0;                        // return after this many tasks; 0: serve forever
  double connect_timeout_s = 0;             // give up registering after this long; 0: never
  double rpc_timeout_s = 10;                // the deadline of each call
  double report_interval_s = 2;             // step points at most this often
  size_t max_buffered_points = 100000;      // ReportBuffer bound (SERVICE.md)
};

// Runs the agent on every rank of the session's world until max_tasks tasks were handled, a
// signal arrived (OK), or registration failed for good (UNAVAILABLE after connect_timeout_s,
// UNAUTHENTICATED / PERMISSION_DENIED / INVALID_ARGUMENT from the coordinator; the other ranks
// are told to stop and return the same code). `session` must outlive the call.
absl::Status ServeAgent(const AgentOptions& options, comm::MpiSession& session);

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
