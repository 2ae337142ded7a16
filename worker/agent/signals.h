// The agent's stop signals: the first SIGTERM / SIGINT / SIGUSR2 sets a process-wide flag (every
// rank's task stops at the next step exchange, worker/agent/group_control.h); the handler is
// reset, so a second one ends the process. The flag is never cleared: a signal stops the agent
// for good. And the waits of the agent's loops, which heed the flag.
//
// SIGUSR2 is the launchers' stop (deploy/launch-group.sh, deploy/slurm): mpirun forwards it to
// every rank at once, and exits as soon as the ranks have. SIGTERM to mpirun itself is not
// forwarded: Open MPI 4.1's mpirun sends every rank SIGCONT at once and SIGTERM only
// odls_base_sigkill_timeout seconds later (then SIGKILL). So a SIGCONT from the parent process
// (mpirun or orted) to a rank that was not stopped counts as a stop too; a SIGCONT that continues
// a stopped rank (job control, a Slurm suspend: a watchdog thread did not tick for 1.5 s, or
// woke within the last 2 s to find such a gap) or
// comes from another process does not.
//
// Thread-safe: the flag is a lock-free atomic, read from every thread.
#ifndef AVIARY_WORKER_AGENT_SIGNALS_H_
#define AVIARY_WORKER_AGENT_SIGNALS_H_

#include <chrono>
#include <string>

namespace aviary::worker {

// Installs the SIGTERM / SIGINT / SIGUSR2 handlers (SA_RESETHAND | SA_RESTART), the SIGCONT
// handler and its watchdog thread. A handler that cannot be installed is logged: that signal then
// ends the group without a report.
void InstallStopSignalHandlers();

// Whether a stop signal arrived.
bool Signalled();

// Tests only: sets the flag as signal `sig` would (0 clears it).
void SetStopSignalForTest(int sig);
// The stop signal, for the log ("SIGTERM", ...); empty when none arrived.
std::string StopSignalName();

// Sleeps up to `seconds`, waking early on a signal. False when a signal arrived.
bool SleepUnlessSignalled(double seconds);

// Seconds elapsed since `since` (the agent's deadlines and report intervals).
double SecondsSince(std::chrono::steady_clock::time_point since);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_AGENT_SIGNALS_H_
