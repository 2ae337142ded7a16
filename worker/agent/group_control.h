// The worker group's control protocol: how rank 0 leads every rank through each task. It runs
// over MPI on a communicator of its own (GroupControl: MPI_COMM_WORLD duplicated), apart from the
// trainer's gradient communicator. As in Horovod's controller, rank 0 decides and the other ranks
// follow; what travels here is tasks, stop decisions and outcomes, never tensors. The steps below
// are the Agent's (worker/agent/agent.cc); rank 0's side of the coordinator (register, lease,
// heartbeats, reports) is its CoordinatorLink (worker/agent/coordinator_link.h).
//
// Two collectives carry everything. Both are non-blocking and polled with growing sleeps
// (OpenMPI's blocking collectives busy-poll a core), from the main thread only:
//   Broadcast  bytes from one root. Rank 0's messages start with a kind byte: kMsgTask and the
//              serialized v1::Task, or kMsgStop and a status (StopMessage).
//   Exchange   an all-gather of one row {kind, a, b, c} per rank. Every exchange of a task has
//              this shape, so ranks at different exchanges still complete the collective and
//              see that they are out of step, instead of waiting in unlike collectives.
//
// Start (ServeAgent, every rank):
//   S1. Duplicate MPI_COMM_WORLD (GroupControl::Create). Install the SIGTERM / SIGINT / SIGUSR2
//       and SIGCONT handlers (worker/agent/signals.h); set torch's intra-op threads.
//   S2. Rank 0 opens its /metrics endpoint and writes --metrics-port-file. Broadcast from rank 0:
//       empty, or kMsgStop with the error, which every rank then returns (a bad --metrics-listen
//       stops every rank with one message).
//   S3. All-gather of every rank's "host<TAB>device" (2 KiB per rank): rank 0's registration
//       (world size, hosts, devices, backend, version, metrics address).
//   S4. Rank 0 registers with the coordinator (transient failures retried with backoff) and
//       starts its two threads (heartbeats, the report sender), then R1; the other ranks go to W1.
//
// Between tasks, rank 0 (Agent::ServeRank0) loops until a signal, --max-tasks or a fatal error:
//   R1. After a NOT_FOUND for the group (the coordinator forgot it), register anew.
//   R2. LeaseTask; nothing to do: again after 1 s, backing off to 5 s; an error: 0.5 s to 10 s.
//   R3. Broadcast kMsgTask and the task; run it as every rank does (T1 to T6).
//   R4. Queue the task's outcome (T6) and wait until the reports are delivered (a fenced task's
//       reports are dropped). Then: the ranks disagreed: end the group; a signal or --max-tasks
//       reached: R5; the task ended on a storage fault: wait until the folder that failed can be
//       written again (Agent::WaitUntilWritable; heartbeats go on, no lease), then R1; else R1.
//   R5. When the loop ends: broadcast kMsgStop with its status (OK: --max-tasks or a signal; else
//       the error that ends the agent, e.g. a refused registration) and stop the threads.
//   R6. LeaveGroup with the reason (--max-tasks reached, the signal, the error), unless the group
//       never registered or the coordinator forgot it: the coordinator removes the group now
//       instead of counting it as lost after heartbeat_timeout_s. A failure is logged only.
//       Not after EndGroup (MPI_Abort) or a crash: such a group is lost, and that is an alert.
// The other ranks (Agent::ServeOther) loop:
//   W1. Wait for rank 0's broadcast (sleeps up to 20 ms: an idle group uses no CPU).
//   W2. kMsgStop: return its status (an error as "rank 0: ..."). kMsgTask: run it (T1 to T6),
//       then W1. An unreadable message ends the group.
//
// One task, on every rank (Agent::RunTask):
//   T1. Prepare, without a collective: parse the task's config and manifest, create the run
//       folder.
//   T2. Exchange kExPrepared, then the outcome agreement (below). When a rank failed, every rank
//       skips the task: rank 0 reports the blamed rank's error (FailTask, retryable as
//       IsRetryable says) and the group leases the next task.
//   T3. Train: the trainer's communicator and Trainer::Create (rank 0 reports the epochs restored
//       from last.pt again: the coordinator keeps the last report of each epoch), then Run, with:
//   T4. Before each step (TrainOptions::should_stop): Exchange kExStep {rank 0's stop decision
//       (StopReason), the rank's signal flag, its samples since the last exchange}. Every rank
//       stops at this step (CANCELLED) when rank 0 decided so or any rank was signalled. Rank 0
//       adds every rank's samples to the group's (aviary_samples_total, samples_total). After
//       each step (TrainOptions::on_step, no collective) rank 0 queues a step point at most every
//       report_interval_s.
//   T5. At each epoch's end rank 0 writes the epoch's files (each rename after a lease check,
//       TrainOptions::commit_check) and the trainer shares the outcome with every rank (one
//       all-reduce of rank 0's code): a failed write ends the run on every rank with the same
//       code, so T6 agrees. Then (TrainOptions::on_epoch): Exchange
//       kExEpochEnd {0, signal flag, samples}; rank 0 queues the epoch's
//       point, then ReportCheckpoint for best.pt (when the epoch is the best) and last.pt.
//   T6. Exchange kExFinished {code, samples, signal flag}, then the outcome agreement. Rank 0 reports OK as
//       CompleteTask (best.pt, or last.pt when no epoch was best, with that epoch's metrics);
//       CANCELLED on every rank as nothing after a cancel or a lost group, else (a signal) as
//       FailTask(retryable, preempted, "stopped by signal"); another error as FailTask,
//       retryable when IsRetryable says so or the ranks disagreed.
//
// Outcome agreement (Agent::Agree, after T2 and T6): from the exchanged codes every rank reaches
// the same verdict (JudgeOutcome). The rank to blame is the first whose error is not a
// consequence of another rank's (DEADLINE_EXCEEDED from a collective that waited, CANCELLED from
// a stop), else the first that failed; it broadcasts its message, which becomes the task's status
// on every rank ("rank N: ..."). At T6 ranks that ended with different codes disagree.
//
// Deadlines: T2's exchange and broadcast 600 s; T4 to T6 2 x comm.timeout_s + 30 s, except T6
// after one of the rank's own training collectives timed out (DEADLINE_EXCEEDED): 10 s, since
// its peers are then either at T6 already or unreachable (a cut between hosts: the group ends
// about comm.timeout_s + 10 s after the cut instead of 3 x comm.timeout_s + 30 s); the
// broadcasts between tasks wait as long as it takes.
//
// When things go wrong:
//   Cancel. A cancel_task answer (Heartbeat, ReportProgress) for the task being trained makes rank
//     0's decision kCancelled: every rank stops at the next T4. No report (the coordinator
//     decided); the group leases again.
//   Coordinator lost. Training goes on; reports wait in rank 0's buffer (worker/agent/
//     report_buffer.h) and calls are retried with backoff (0.5 s to 10 s). A NOT_FOUND for the
//     group makes the decision kGroupLost: every rank stops at the next T4, rank 0 drops the
//     task's reports, registers anew (R1) and leases again.
//   SIGTERM / SIGINT / SIGUSR2, or SIGCONT from mpirun (signals.h). On rank 0 the decision
//     becomes kSignal; any rank's flag counts at its next T4 (a rank signalled while idle: at the
//     next task's first step). A flag seen at T2, T5 or T6 only (a signal after the last step, or
//     at the step a cancel stopped) ends nothing: the task ends as it would have, then rank 0
//     leases no more and leaves. Every rank stops; rank 0 reports FailTask(retryable, preempted),
//     waits up to 30 s for delivery, broadcasts kMsgStop with OK, leaves (R6), and every rank
//     returns OK (exit 0). A signal on rank 0 while idle ends its loop (R5). A second signal ends
//     the process. (mpirun forwards SIGUSR2 at once; SIGTERM to mpirun reaches the ranks as
//     SIGCONT at once and as SIGTERM only odls_base_sigkill_timeout seconds later, followed by
//     SIGKILL after as long again: launchers send SIGUSR2, and give that timeout some seconds.)
//   Storage fault. A write of rank 0 fails (a full disk: ENOSPC): T5's shared outcome ends the
//     run on every rank; rank 0 reports FailTask(retryable) naming the path and errno at once
//     and the group waits at R4 until the folder has room again. No rank aborts.
//   Fence. A lease check fails (the lease ran out without an answered heartbeat, or was
//     cancelled or the group removed): nothing is renamed; every rank ends the task (ABORTED)
//     at T5; rank 0 reports nothing (the coordinator re-leases the task), drops the task's
//     reports and goes on at R1.
//   Disagreement. Errors that every rank meets at the same point (a stop, a non-finite loss,
//     which the trainer shares, a config or data error) end only the task. A rank that fails
//     alone while its peers are in a training collective reaches T6 first; they follow once the
//     collective times out (comm.timeout_s, DEADLINE_EXCEEDED). The codes differ: rank 0 reports
//     the blamed rank's error as retryable, waits up to 15 s for delivery and ends the group
//     (MPI_Abort, exit 1, as `aviary-worker train` does); the other ranks give it 60 s, then
//     end the group themselves.
//   Out of step. An exchange whose rows name different kinds (a rank left training alone while
//     its peers are at T4 or T5), or that does not complete by its deadline (a rank hangs): rank
//     0 reports FailTask(retryable) naming where each rank was, waits up to 15 s for delivery
//     and ends the group; the other ranks give it 30 s, then end it themselves. A control
//     broadcast that fails ends the group as well.
//
// Thread safety: GroupControl is used from the main thread only; the rest is stateless.
#ifndef AVIARY_WORKER_AGENT_GROUP_CONTROL_H_
#define AVIARY_WORKER_AGENT_GROUP_CONTROL_H_

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace aviary::worker {

// Rank 0's stop decision for the current task: the first value of its T4 row.
enum StopReason : int64_t { kNoStop = 0, kCancelled = 1, kGroupLost = 2, kSignal = 3 };

// The exchanges of a task; each rank's row is {kind, a, b, c}.
constexpr int64_t kExPrepared = 1;   // T2: {code, 0, signal flag}
constexpr int64_t kExStep = 2;       // T4: {stop decision, signal flag, samples}
constexpr int64_t kExEpochEnd = 3;   // T5: {0, signal flag, samples}
constexpr int64_t kExFinished = 4;   // T6: {code, samples, signal flag}
constexpr int kExchangeRow = 4;      // values per rank

// Where a rank is at an exchange of `kind` ("training (step exchange)").
const char* ExchangeName(int64_t kind);

// Rank 0's broadcasts: the first byte says what follows.
constexpr char kMsgTask = 'T';  // then the serialized v1::Task
constexpr char kMsgStop = 'S';  // then the status code (decimal), '\n' and the message

std::string StopMessage(const absl::Status& st);
absl::Status ParseStopMessage(const std::string& msg);

// The outcome agreement's verdict on the rows of a T2 or T6 exchange ({kind, code, ...} per
// rank, rank-major), the same on every rank.
struct Verdict {
  int blamed = -1;     // the rank whose error the task ends with; -1: every rank succeeded
  bool agreed = true;  // `training` (T6): every rank ended with rank 0's code
};
Verdict JudgeOutcome(const std::vector<int64_t>& rows, int world, bool training);

// The control communicator. Main thread only.
class GroupControl {
 public:
  // Duplicates MPI_COMM_WORLD (a collective).
  static absl::StatusOr<std::unique_ptr<GroupControl>> Create();
  ~GroupControl();
  GroupControl(const GroupControl&) = delete;
  GroupControl& operator=(const GroupControl&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }

  // `*bytes` takes root's value on every rank. `max_sleep_s` bounds the polling sleeps;
  // DEADLINE_EXCEEDED after `deadline_s` (0: none).
  absl::Status Broadcast(std::string* bytes, int root, double max_sleep_s, double deadline_s);

  // Every rank's `mine` (the same length everywhere), in rank order.
  absl::StatusOr<std::vector<int64_t>> AllGather(const std::vector<int64_t>& mine, double max_sleep_s,
                                                 double deadline_s);

  // Every rank's row {kind, a, b, c}, rank-major. An error when the all-gather failed or did not
  // complete by `deadline_s`, or when a rank is at another exchange ("the ranks are out of
  // step: ..."); its message says where each rank was, with `mine`'s error for this rank.
  absl::StatusOr<std::vector<int64_t>> Exchange(int64_t kind, int64_t a, int64_t b, int64_t c, double deadline_s,
                                                const absl::Status& mine);

 private:
  GroupControl() = default;

  // Polls `req` with sleeps growing to `max_sleep_s`; DEADLINE_EXCEEDED after `deadline_s` (> 0).
  // DEADLINE_EXCEEDED once `deadline_s` have passed since `start` (0: never).
  absl::Status Wait(MPI_Request* req, double max_sleep_s, double deadline_s, const char* what,
                    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now());

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int world_ = 1;
};

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_AGENT_GROUP_CONTROL_H_
