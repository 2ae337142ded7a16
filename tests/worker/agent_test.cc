// The worker agent's parts that need no coordinator: the report buffer (order, bound, what is
// dropped), the backoff schedules, the retryable classification, and the control protocol's
// messages and outcome verdict; the stop signals (in child processes); the stall watchdog (its
// checks driven with a made-up clock).
#include "worker/agent/agent.h"
#include "worker/agent/group_control.h"
#include "worker/agent/group_metrics.h"
#include "worker/agent/lease_clock.h"
#include "worker/agent/report_buffer.h"
#include "worker/agent/signals.h"
#include "worker/agent/stall_watchdog.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "gtest/gtest.h"

namespace aviary::worker {
namespace {

Report Point(const std::string& task, int64_t step, bool epoch_end = false) {
  Report r;
  r.kind = Report::Kind::kPoint;
  r.task_id = task;
  r.point.set_step(step);
  r.point.set_epoch_end(epoch_end);
  return r;
}

Report Checkpoint(const std::string& task, const std::string& path) {
  Report r;
  r.kind = Report::Kind::kCheckpoint;
  r.task_id = task;
  r.path = path;
  return r;
}

// Drains the buffer through Peek/Pop; "p<step>" / "e<step>" for points, "c:<path>", "done", "fail".
std::vector<std::string> Drain(ReportBuffer* buffer, size_t max_points, std::vector<size_t>* runs = nullptr) {
  std::vector<std::string> out;
  while (true) {
    std::vector<Report> run = buffer->Peek(max_points, 0);
    if (run.empty()) break;
    if (runs) runs->push_back(run.size());
    for (const Report& r : run) {
      switch (r.kind) {
        case Report::Kind::kPoint:
          out.push_back((r.point.epoch_end() ? "e" : "p") + std::to_string(r.point.step()));
          break;
        case Report::Kind::kCheckpoint: out.push_back("c:" + r.path); break;
        case Report::Kind::kComplete: out.push_back("done"); break;
        case Report::Kind::kFail: out.push_back("fail"); break;
      }
    }
    buffer->Pop();
  }
  return out;
}

TEST(ReportBufferTest, SendsEverythingInOrderInRunsOfOneTasksPoints) {
  ReportBuffer buffer(100);
  buffer.Push(Point("a", 1));
  buffer.Push(Point("a", 2));
  buffer.Push(Point("a", 3, true));
  buffer.Push(Checkpoint("a", "best.pt"));
  buffer.Push(Checkpoint("a", "last.pt"));
  buffer.Push(Point("a", 4));
  buffer.Push(Point("b", 5));
  Report done;
  done.kind = Report::Kind::kComplete;
  done.task_id = "b";
  buffer.Push(done);
  EXPECT_EQ(buffer.points(), 5u);
  std::vector<size_t> runs;
  EXPECT_EQ(Drain(&buffer, 2, &runs),
            (std::vector<std::string>{"p1", "p2", "e3", "c:best.pt", "c:last.pt", "p4", "p5", "done"}));
  // At most 2 points per run; a checkpoint, another task or an outcome ends a run.
  EXPECT_EQ(runs, (std::vector<size_t>{2, 1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(buffer.size(), 0u);
  EXPECT_EQ(buffer.points(), 0u);
}

TEST(ReportBufferTest, ARunThatFailedIsSentAgainFirst) {
  ReportBuffer buffer(100);
  buffer.Push(Point("a", 1));
  buffer.Push(Point("a", 2));
  std::vector<Report> first = buffer.Peek(10, 0);
  ASSERT_EQ(first.size(), 2u);
  buffer.Push(Point("a", 3));
  // While a run is in flight, nothing else is handed out.
  EXPECT_TRUE(buffer.Peek(10, 0).empty());
  buffer.Release();
  EXPECT_EQ(Drain(&buffer, 10), (std::vector<std::string>{"p1", "p2", "p3"}));
}

TEST(ReportBufferTest, TheBoundDropsTheOldestStepPointsAndKeepsEpochEnds) {
  ReportBuffer buffer(3);
  buffer.Push(Point("a", 1));
  buffer.Push(Point("a", 2, true));
  buffer.Push(Point("a", 3));
  buffer.Push(Checkpoint("a", "last.pt"));  // not a point: never counted, never dropped
  buffer.Push(Point("a", 4));               // drops p1
  buffer.Push(Point("a", 5, true));         // drops p3
  buffer.Push(Point("a", 6, true));         // drops p4
  EXPECT_EQ(buffer.points(), 3u);
  buffer.Push(Point("a", 7, true));         // only epoch ends left: kept beyond the bound
  buffer.Push(Point("a", 8));               // and a new step point is the one dropped
  EXPECT_EQ(buffer.points(), 4u);
  EXPECT_EQ(buffer.dropped_points(), 4);
  EXPECT_EQ(Drain(&buffer, 100), (std::vector<std::string>{"e2", "c:last.pt", "e5", "e6", "e7"}));
}

TEST(ReportBufferTest, PointsBeingSentAreNotDropped) {
  ReportBuffer buffer(2);
  buffer.Push(Point("a", 1));
  buffer.Push(Point("a", 2));
  ASSERT_EQ(buffer.Peek(10, 0).size(), 2u);  // in flight
  buffer.Push(Point("a", 3));                // nothing droppable: p3 goes
  EXPECT_EQ(buffer.dropped_points(), 1);
  buffer.Release();
  buffer.Push(Point("a", 4));                // now p1 goes
  EXPECT_EQ(Drain(&buffer, 10), (std::vector<std::string>{"p2", "p4"}));
}

TEST(ReportBufferTest, DropTaskRemovesOnlyThatTasksWaitingReports) {
  ReportBuffer buffer(100);
  buffer.Push(Point("a", 1));
  buffer.Push(Point("b", 2));
  buffer.Push(Checkpoint("a", "last.pt"));
  buffer.Push(Point("b", 3));
  ASSERT_EQ(buffer.Peek(10, 0).size(), 1u);  // p1 of task a in flight: kept
  buffer.DropTask("a");
  buffer.Release();
  EXPECT_EQ(buffer.points(), 3u);
  EXPECT_EQ(Drain(&buffer, 10), (std::vector<std::string>{"p1", "p2", "p3"}));
}

TEST(ReportBufferTest, WaitEmptySaysWhetherEverythingWasDelivered) {
  ReportBuffer buffer(100);
  EXPECT_TRUE(buffer.WaitEmpty(0));
  buffer.Push(Point("a", 1));
  EXPECT_FALSE(buffer.WaitEmpty(0));
  ASSERT_EQ(buffer.Peek(10, 0).size(), 1u);
  EXPECT_FALSE(buffer.WaitEmpty(0));  // in flight is not delivered
  buffer.Pop();
  EXPECT_TRUE(buffer.WaitEmpty(0));
  EXPECT_TRUE(buffer.Peek(10, 0).empty());
}

TEST(BackoffTest, DoublesFromInitialToMaxAndStartsOverOnReset) {
  Backoff rpc(0.5, 10);
  std::vector<double> got;
  for (int i = 0; i < 7; ++i) got.push_back(rpc.Next());
  EXPECT_EQ(got, (std::vector<double>{0.5, 1, 2, 4, 8, 10, 10}));
  rpc.Reset();
  EXPECT_EQ(rpc.Next(), 0.5);
  Backoff idle(1, 5);  // LeaseTask polling while idle
  got.clear();
  for (int i = 0; i < 5; ++i) got.push_back(idle.Next());
  EXPECT_EQ(got, (std::vector<double>{1, 2, 4, 5, 5}));
}

TEST(AgentTest, ConfigAndDataErrorsAreNotRetryable) {
  EXPECT_FALSE(IsRetryable(absl::InvalidArgumentError("train.lr")));
  EXPECT_FALSE(IsRetryable(absl::FailedPreconditionError("label set")));
  EXPECT_FALSE(IsRetryable(absl::DataLossError("non-finite loss")));
  EXPECT_TRUE(IsRetryable(absl::InternalError("CUDA error")));
  EXPECT_TRUE(IsRetryable(absl::NotFoundError("/shared/runs/j1/pretrain-fold0/best.pt")));
  EXPECT_TRUE(IsRetryable(absl::DeadlineExceededError("rank 1 did not arrive")));
  EXPECT_TRUE(IsRetryable(absl::UnavailableError("disk")));
  EXPECT_TRUE(IsRetryable(absl::ResourceExhaustedError("out of memory")));
}

// Rows of a T6 exchange: {kind, code, samples, 0} per rank.
std::vector<int64_t> Finished(const std::vector<absl::StatusCode>& codes) {
  std::vector<int64_t> rows;
  for (absl::StatusCode code : codes) rows.insert(rows.end(), {kExFinished, static_cast<int64_t>(code), 0, 0});
  return rows;
}

// An idle group shows (and sends with its heartbeats) no GPU memory: it kept the last task's.
TEST(GroupMetricsTest, TheEndOfATaskZeroesItsGpuMemory) {
  auto metrics = GroupMetrics::Create("");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  (*metrics)->SetGpuMemory("cuda:0", 3e9);
  (*metrics)->SetGpuMemory("cuda:1", 1e9);
  EXPECT_EQ((*metrics)->GpuMemoryBytes(), 4000000000);
  (*metrics)->EndTask();
  EXPECT_EQ((*metrics)->GpuMemoryBytes(), 0);
}

TEST(GroupControlTest, TheVerdictBlamesTheFirstRankWhoseErrorIsNotAConsequence) {
  using C = absl::StatusCode;
  Verdict ok = JudgeOutcome(Finished({C::kOk, C::kOk, C::kOk}), 3, /*training=*/true);
  EXPECT_EQ(ok.blamed, -1);
  EXPECT_TRUE(ok.agreed);
  // Rank 2 failed alone; rank 0 and 1 timed out in the collective that waited for it.
  Verdict alone = JudgeOutcome(Finished({C::kDeadlineExceeded, C::kDeadlineExceeded, C::kInternal}), 3, true);
  EXPECT_EQ(alone.blamed, 2);
  EXPECT_FALSE(alone.agreed);
  // Only consequences: the first failing rank.
  Verdict stopped = JudgeOutcome(Finished({C::kOk, C::kCancelled, C::kDeadlineExceeded}), 3, true);
  EXPECT_EQ(stopped.blamed, 1);
  // A stop every rank met agrees; at T2 differing codes do not count as a disagreement.
  EXPECT_TRUE(JudgeOutcome(Finished({C::kCancelled, C::kCancelled}), 2, true).agreed);
  EXPECT_TRUE(JudgeOutcome(Finished({C::kOk, C::kInvalidArgument}), 2, /*training=*/false).agreed);
}

// Interrupt (the link's threads stopped) ends the waits until Resume (started again): it was for
// good, and the sender's Peek and a drain's WaitEmpty returned at once, spinning a core.
TEST(ReportBufferTest, ResumeUndoesInterrupt) {
  ReportBuffer buffer(10);
  buffer.Push(Point("t", 1, false));
  buffer.Interrupt();
  EXPECT_FALSE(buffer.WaitEmpty(5));  // at once
  buffer.Resume();
  std::atomic<bool> emptied{false};
  std::thread sender([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    ASSERT_EQ(buffer.Peek(10, 0).size(), 1u);
    emptied = true;
    buffer.Pop();
  });
  EXPECT_TRUE(buffer.WaitEmpty(30));  // waited for the sender, not returned at once
  EXPECT_TRUE(emptied.load());
  sender.join();
  EXPECT_TRUE(buffer.Peek(10, 0).empty());
}

TEST(GroupControlTest, StopMessagesCarryTheStatus) {
  EXPECT_TRUE(ParseStopMessage(StopMessage(absl::OkStatus())).ok());
  const absl::Status refused = absl::PermissionDeniedError("token\nrefused");
  std::string msg = StopMessage(refused);
  EXPECT_EQ(msg[0], kMsgStop);
  EXPECT_EQ(ParseStopMessage(msg), refused);
  // A garbled one is an error, never OK (atoi's 0 made the other ranks exit 0).
  for (const std::string& garbled :
       {std::string(), std::string(1, kMsgStop), std::string(1, kMsgStop) + "x\nwhy", std::string(1, kMsgStop) + "99\n",
        std::string(1, kMsgStop) + "-3\n", std::string("T0\n")}) {
    const absl::Status st = ParseStopMessage(garbled);
    EXPECT_EQ(st.code(), absl::StatusCode::kInternal) << absl::CEscape(garbled);
    EXPECT_TRUE(absl::StrContains(st.message(), "rank 0's stop message is garbled")) << st;
  }
}

// The stop signals, in a child process that installs the handlers, says it is ready through a
// pipe, then waits up to 4 s for the flag: exit 10 when stopped by SIGCONT, 11 by SIGUSR2, 12 by
// another signal, 20 when never stopped. `act` does something to the child (its pid) meanwhile.
int ChildStop(const std::function<void(pid_t)>& act) {
  int fds[2];
  if (::pipe(fds) != 0) return -1;
  const pid_t child = ::fork();
  if (child < 0) return -1;
  if (child == 0) {
    ::close(fds[0]);
    InstallStopSignalHandlers();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the watchdog has ticked
    const char ready = 'r';
    if (::write(fds[1], &ready, 1) != 1) ::_exit(30);
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(4);
    while (!Signalled() && std::chrono::steady_clock::now() < end) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const std::string name = StopSignalName();
    ::_exit(name.empty() ? 20 : name.rfind("SIGCONT", 0) == 0 ? 10 : name == "SIGUSR2" ? 11 : 12);
  }
  ::close(fds[1]);
  char ready = 0;
  if (::read(fds[0], &ready, 1) != 1) return -2;
  ::close(fds[0]);
  act(child);
  int status = 0;
  if (::waitpid(child, &status, 0) != child) return -3;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
}

// mpirun ends a job on SIGTERM by sending the ranks SIGCONT at once, SIGTERM only
// odls_base_sigkill_timeout seconds later: a SIGCONT from the parent stops the group.
TEST(SignalsTest, SigcontFromTheParentStops) {
  EXPECT_EQ(ChildStop([](pid_t child) { ::kill(child, SIGCONT); }), 10);
}

// The launchers' stop (mpirun forwards SIGUSR2 at once).
TEST(SignalsTest, Sigusr2Stops) {
  EXPECT_EQ(ChildStop([](pid_t child) { ::kill(child, SIGUSR2); }), 11);
}

// Job control or a suspend: SIGSTOP, then SIGCONT 2 s later, continues the rank; no stop.
TEST(SignalsTest, SigcontThatContinuesAStoppedProcessDoesNotStop) {
  EXPECT_EQ(ChildStop([](pid_t child) {
              ::kill(child, SIGSTOP);
              std::this_thread::sleep_for(std::chrono::seconds(2));
              ::kill(child, SIGCONT);
            }),
            20);
}

// A SIGCONT from another process than the parent is no stop.
TEST(SignalsTest, SigcontFromAnotherProcessDoesNotStop) {
  EXPECT_EQ(ChildStop([](pid_t child) {
              const pid_t sender = ::fork();
              if (sender == 0) ::_exit(::kill(child, SIGCONT) == 0 ? 0 : 1);
              int status = 0;
              ::waitpid(sender, &status, 0);
            }),
            20);
}

}  // namespace
}  // namespace aviary::worker

// The lease fence (worker/agent/lease_clock.h), on a clock the test moves.
namespace aviary::worker {
namespace {

using std::chrono::milliseconds;

// The lease runs on CLOCK_BOOTTIME, which goes on through a suspend (steady_clock stops there:
// a hibernated host resumed with a lease it no longer had).
TEST(LeaseClockTest, RunsOnTheBootClock) {
  timespec before{}, after{};
  ASSERT_EQ(::clock_gettime(CLOCK_BOOTTIME, &before), 0);
  const int64_t now = LeaseClock::Clock::now().time_since_epoch().count();
  ASSERT_EQ(::clock_gettime(CLOCK_BOOTTIME, &after), 0);
  EXPECT_LE(before.tv_sec * int64_t{1000000000} + before.tv_nsec, now);
  EXPECT_LE(now, after.tv_sec * int64_t{1000000000} + after.tv_nsec);
  static_assert(LeaseClock::Clock::is_steady);
}

TEST(LeaseClockTest, ValidUntilTheLastAnsweredSendPlusTimeoutLessMargin) {
  LeaseClock lease;
  lease.SetTimeout(4000);  // margin max(500 ms, 400 ms) = 500 ms
  const auto t0 = LeaseClock::Clock::time_point{} + std::chrono::hours(1);
  lease.Begin("j1/finetune-f0", 2, t0);
  EXPECT_TRUE(lease.Check("/r/last.pt", t0 + milliseconds(3499)).ok());
  absl::Status expired = lease.Check("/r/last.pt", t0 + milliseconds(3500));
  ASSERT_TRUE(absl::IsAborted(expired)) << expired;
  EXPECT_NE(expired.message().find("lease for task j1/finetune-f0 attempt 2 expired"), std::string::npos) << expired;
  EXPECT_NE(expired.message().find("not writing /r/last.pt"), std::string::npos) << expired;
  // A heartbeat sent at t0 + 3 s and answered extends the lease to t0 + 6.5 s.
  lease.Renew("j1/finetune-f0", t0 + milliseconds(3000));
  EXPECT_TRUE(lease.Check("/r/last.pt", t0 + milliseconds(6400)).ok());
  EXPECT_FALSE(lease.Check("/r/last.pt", t0 + milliseconds(6500)).ok());
  // An older answer never shortens it; an answer about another task does not extend it.
  lease.Renew("j1/finetune-f0", t0);
  EXPECT_TRUE(lease.Check("/r/last.pt", t0 + milliseconds(6400)).ok());
  lease.Renew("j1/pretrain-f0", t0 + milliseconds(9000));
  EXPECT_FALSE(lease.Check("/r/last.pt", t0 + milliseconds(7000)).ok());
}

TEST(LeaseClockTest, RevokedAtOnceAndFreshForTheNextLease) {
  LeaseClock lease;
  lease.SetTimeout(20000);
  const auto t0 = LeaseClock::Clock::time_point{} + std::chrono::hours(1);
  lease.Begin("j1/pretrain-f0", 1, t0);
  lease.Revoke("the coordinator no longer knows group g1");
  absl::Status st = lease.Check("/r/best.pt", t0);
  ASSERT_TRUE(absl::IsAborted(st));
  EXPECT_NE(st.message().find("no longer knows group g1"), std::string::npos) << st;
  EXPECT_FALSE(common::IsLeaseRevoked(st)) << "a lost group is no cancel";
  lease.Revoke("a cancel heard later", /*by_cancel=*/true);  // the first reason stands
  EXPECT_FALSE(common::IsLeaseRevoked(lease.Check("/r/best.pt", t0)));
  lease.Renew("j1/pretrain-f0", t0 + milliseconds(1000));  // a late answer does not revive it
  EXPECT_FALSE(lease.Check("/r/best.pt", t0 + milliseconds(1000)).ok());
  lease.End();
  EXPECT_TRUE(lease.Check("/r/best.pt", t0 + std::chrono::hours(5)).ok());  // no lease: nothing to fence
  lease.Begin("j1/pretrain-f0", 2, t0 + milliseconds(2000));
  EXPECT_TRUE(lease.Check("/r/best.pt", t0 + milliseconds(2000)).ok());
  // Taken away by the coordinator (a cancel): the refusal is marked as the end of a cancel, and
  // the mark does not outlive the lease.
  lease.Revoke("the coordinator cancelled it or gave it to another group (Heartbeat)", /*by_cancel=*/true);
  st = lease.Check("/r/last.pt", t0 + milliseconds(2000));
  EXPECT_TRUE(absl::IsAborted(st)) << st;
  EXPECT_TRUE(common::IsLeaseRevoked(st)) << st;
  EXPECT_TRUE(common::IsLeaseRevoked(common::Annotate(st, "epoch 1's files")));
  lease.Begin("j1/pretrain-f0", 3, t0 + milliseconds(3000));
  lease.Revoke("the coordinator no longer knows group g1");
  EXPECT_FALSE(common::IsLeaseRevoked(lease.Check("/r/last.pt", t0 + milliseconds(3000))));
  // Expired, not revoked: no mark.
  lease.Begin("j1/pretrain-f0", 4, t0 + milliseconds(4000));
  EXPECT_FALSE(common::IsLeaseRevoked(lease.Check("/r/last.pt", t0 + std::chrono::hours(2))));
}

// A coordinator restarted with a shorter heartbeat timeout says so in a heartbeat's answer: the
// current lease runs from its last renewal with the new timeout (the coordinator reaps the group
// after the new one once told); a longer one lengthens it only from the next renewal.
TEST(LeaseClockTest, AShorterTimeoutShortensTheCurrentLease) {
  LeaseClock lease;
  lease.SetTimeout(20000);  // margin 2 s
  const auto t0 = LeaseClock::Clock::time_point{} + std::chrono::hours(1);
  lease.Begin("j1/finetune-f0", 1, t0);
  lease.Renew("j1/finetune-f0", t0 + milliseconds(1000));
  EXPECT_TRUE(lease.Check("/r/last.pt", t0 + milliseconds(18000)).ok());
  lease.SetTimeout(4000);  // margin 500 ms: from the renewal at 1 s, valid until 4.5 s
  EXPECT_EQ(lease.timeout_ms(), 4000);
  EXPECT_TRUE(lease.Check("/r/last.pt", t0 + milliseconds(4400)).ok());
  EXPECT_FALSE(lease.Check("/r/last.pt", t0 + milliseconds(4500)).ok());
  lease.SetTimeout(30000);  // longer: not until a renewal
  EXPECT_FALSE(lease.Check("/r/last.pt", t0 + milliseconds(4500)).ok());
  lease.Renew("j1/finetune-f0", t0 + milliseconds(2000));  // 2 s + 30 s - 3 s
  EXPECT_TRUE(lease.Check("/r/last.pt", t0 + milliseconds(28900)).ok());
  EXPECT_FALSE(lease.Check("/r/last.pt", t0 + milliseconds(29000)).ok());
}

TEST(LeaseClockTest, OffWhenTheCoordinatorDoesNotSayItsTimeout) {
  LeaseClock lease;
  const auto t0 = LeaseClock::Clock::time_point{} + std::chrono::hours(1);
  lease.Begin("j1/pretrain-f0", 1, t0);
  EXPECT_TRUE(lease.Check("/r/last.pt", t0 + std::chrono::hours(24)).ok());
  // A coordinator that says one (restarted, a newer one): the lease from its last renewal.
  lease.Renew("j1/pretrain-f0", t0 + milliseconds(1000));
  lease.SetTimeout(4000);
  EXPECT_TRUE(lease.Check("/r/last.pt", t0 + milliseconds(4400)).ok());
  EXPECT_FALSE(lease.Check("/r/last.pt", t0 + milliseconds(4500)).ok());
}

struct Stall {
  std::string task_id;
  double seconds = 0;
  std::string last;
};

// A watchdog without its thread: the test drives Check() with its own clock.
std::unique_ptr<StallWatchdog> Manual(double timeout_s, std::vector<Stall>* stalls) {
  return std::make_unique<StallWatchdog>(
      timeout_s, [stalls](const std::string& t, double s, const std::string& l) { stalls->push_back({t, s, l}); },
      /*start_thread=*/false);
}

TEST(StallWatchdogTest, FiresOnceAfterTheTimeoutWithoutProgress) {
  std::vector<Stall> stalls;
  auto watchdog = Manual(10, &stalls);
  StallWatchdog& w = *watchdog;
  w.Arm("job-1/finetune-f0", "the task's start");
  int64_t now = 1000000;
  for (int i = 0; i <= 10; ++i, now += 1000) EXPECT_FALSE(w.Check(now)) << i;  // 10 s idle: not yet
  w.Progress("a training step");
  for (int i = 0; i <= 10; ++i, now += 1000) EXPECT_FALSE(w.Check(now)) << "after progress " << i;
  EXPECT_TRUE(w.Check(now));  // 11 s without progress
  ASSERT_EQ(stalls.size(), 1u);
  EXPECT_EQ(stalls[0].task_id, "job-1/finetune-f0");
  EXPECT_DOUBLE_EQ(stalls[0].seconds, 11.0);
  EXPECT_EQ(stalls[0].last, "a training step");
  for (int i = 0; i < 30; ++i, now += 1000) EXPECT_FALSE(w.Check(now));  // once per lease
  EXPECT_EQ(stalls.size(), 1u);
  w.Arm("job-1/finetune-f1", "the task's start");  // the next task: watched again
  for (int i = 0; i <= 11; ++i, now += 1000) w.Check(now);
  ASSERT_EQ(stalls.size(), 2u);
  EXPECT_EQ(stalls[1].task_id, "job-1/finetune-f1");
  EXPECT_EQ(stalls[1].last, "the task's start");
}

TEST(StallWatchdogTest, QuietWhenDisarmedOrOff) {
  std::vector<Stall> stalls;
  auto watchdog = Manual(5, &stalls);
  StallWatchdog& w = *watchdog;
  int64_t now = 0;
  for (int i = 0; i < 20; ++i, now += 1000) EXPECT_FALSE(w.Check(now)) << "never armed";
  w.Arm("t", "the task's start");
  w.Disarm();
  for (int i = 0; i < 20; ++i, now += 1000) EXPECT_FALSE(w.Check(now)) << "disarmed";
  auto off = Manual(0, &stalls);
  off->Arm("t", "the task's start");
  for (int i = 0; i < 20; ++i, now += 1000) EXPECT_FALSE(off->Check(now)) << "timeout 0";
  EXPECT_TRUE(stalls.empty());
}

TEST(StallWatchdogTest, StoppedTimeDoesNotCount) {
  // A check that finds the previous one long ago (SIGSTOP, a suspended VM) counts at most
  // kMaxCountedGapMs: the hour a job-control stop lasted is not an hour without progress.
  std::vector<Stall> stalls;
  auto watchdog = Manual(30, &stalls);
  StallWatchdog& w = *watchdog;
  w.Arm("t", "the task's start");
  int64_t now = 0;
  EXPECT_FALSE(w.Check(now));
  now += 3600 * 1000;
  EXPECT_FALSE(w.Check(now));
  for (int i = 0; i < 25; ++i) EXPECT_FALSE(w.Check(now += 1000)) << i;  // 5 + 25 = 30 s counted
  EXPECT_TRUE(w.Check(now += 1000));
  ASSERT_EQ(stalls.size(), 1u);
  EXPECT_DOUBLE_EQ(stalls[0].seconds, 31.0);
}

TEST(StallWatchdogTest, ATaskMayNeedLongerNeverShorter) {
  // A task whose waits for a stuck peer last longer (2 x comm.timeout_s + 30 s) than the timeout.
  std::vector<Stall> stalls;
  auto watchdog = Manual(10, &stalls);
  watchdog->Arm("t", "the task's start");
  watchdog->AtLeast(20);
  watchdog->AtLeast(5);  // never shorter
  int64_t now = 0;
  for (int i = 0; i <= 20; ++i, now += 1000) EXPECT_FALSE(watchdog->Check(now)) << i;
  EXPECT_TRUE(watchdog->Check(now));
  watchdog->Arm("u", "the task's start");  // the next task starts from the constructor's again
  for (int i = 0; i <= 10; ++i, now += 1000) EXPECT_FALSE(watchdog->Check(now)) << i;
  EXPECT_TRUE(watchdog->Check(now));
  auto off = Manual(0, &stalls);
  off->Arm("t", "the task's start");
  off->AtLeast(20);  // off stays off
  for (int i = 0; i < 40; ++i, now += 1000) EXPECT_FALSE(off->Check(now));
  EXPECT_EQ(stalls.size(), 2u);
}

TEST(StallWatchdogTest, DisarmWaitsForAFiringUnderWay) {
  // on_stall ends the process; the main thread, finishing the task just then, must not report
  // its outcome meanwhile: Disarm returns only once on_stall has.
  absl::Mutex mu;
  bool in_stall = false, release = false;
  std::atomic<bool> disarmed{false};
  StallWatchdog w(
      1,
      [&](const std::string&, double, const std::string&) {
        absl::MutexLock lock(&mu);
        in_stall = true;
        mu.Await(absl::Condition(&release));
      },
      /*start_thread=*/false);
  w.Arm("t", "the task's start");
  std::thread checker([&] {
    int64_t now = 0;
    while (!w.Check(now)) now += 1000;
  });
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(&in_stall));
  }
  std::thread main_thread([&] {
    w.Disarm();
    disarmed = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(disarmed.load()) << "Disarm returned while on_stall ran";
  {
    absl::MutexLock lock(&mu);
    release = true;
  }
  checker.join();
  main_thread.join();
  EXPECT_TRUE(disarmed.load());
}

TEST(StallWatchdogTest, ItsThreadFiresWithoutProgress) {
  // The real thread and clock, at its smallest timeout: the firing itself, not its timing.
  absl::Mutex mu;
  std::vector<Stall> stalls;
  StallWatchdog w(0.5, [&](const std::string& t, double s, const std::string& l) {
    absl::MutexLock lock(&mu);
    stalls.push_back({t, s, l});
  });
  w.Arm("t", "the task's start");
  absl::MutexLock lock(&mu);
  auto fired = [&stalls]() { return !stalls.empty(); };
  mu.Await(absl::Condition(&fired));
  EXPECT_EQ(stalls[0].task_id, "t");
  EXPECT_GT(stalls[0].seconds, 0.5);
}

}  // namespace
}  // namespace aviary::worker
