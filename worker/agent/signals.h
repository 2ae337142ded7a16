// The agent's stop signals: the first SIGTERM / SIGINT sets a process-wide flag (every rank's
// task stops at the next step exchange, worker/agent/group_control.h); the handler is reset, so
// a second one ends the process. The flag is never cleared: a signal stops the agent for good.
// And the waits of the agent's loops, which heed the flag.
//
// Thread-safe: the flag is a lock-free atomic, read from every thread.
#ifndef AVIARY_WORKER_AGENT_SIGNALS_H_
#define AVIARY_WORKER_AGENT_SIGNALS_H_

#include <chrono>

namespace aviary::worker {

// Installs the SIGTERM / SIGINT handlers (SA_RESETHAND | SA_RESTART). A handler that cannot be
// installed is logged: that signal then ends the group without a report.
void InstallStopSignalHandlers();

// Whether a stop signal arrived.
bool Signalled();

// Sleeps up to `seconds`, waking early on a signal. False when a signal arrived.
bool SleepUnlessSignalled(double seconds);

// Seconds elapsed since `since` (the agent's deadlines and report intervals).
double SecondsSince(std::chrono::steady_clock::time_point since);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_AGENT_SIGNALS_H_
