// A command's graceful stop on a signal (`aviary predict`, `aviary prepare`): the first of the
// signals asked for is recorded (StopSignal) for the command to stop at its next safe point;
// the handlers then go back to the default, so that a second signal (of any of them) ends the
// process at once. A signal the process inherited as ignored (nohup's SIGHUP, a background job's
// SIGINT) stays ignored: the run outlives a logout as it was started to. SA_RESTART: a write or a
// lock wait in progress goes on. Not the serving agent's handlers (worker/agent/signals.h).
#ifndef AVIARY_COMMON_STOP_SIGNALS_H_
#define AVIARY_COMMON_STOP_SIGNALS_H_

#include <initializer_list>

namespace aviary::common {

// Installs the handlers for `signals` (at most 8), before other threads start. Once per process:
// a second call does nothing.
void InstallStopSignals(std::initializer_list<int> signals);
// The first signal received since InstallStopSignals; 0: none.
int StopSignal();
// "SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2" ("a signal" otherwise).
const char* StopSignalName(int signal);
// Ends the process by `signal` itself (its handler is the default again after the first): a shell
// running a loop of commands stops at a Ctrl-C only when the command died by it. Flushes stdio
// first. Returns 128 + signal only if the signal did not end the process.
int EndByStopSignal(int signal);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_STOP_SIGNALS_H_
