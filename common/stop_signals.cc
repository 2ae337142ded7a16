#include "common/stop_signals.h"

#include <signal.h>

#include <atomic>
#include <cstdio>
#include <iostream>

namespace aviary::common {
namespace {

constexpr int kMaxSignals = 8;
std::atomic<int> g_stop_signal{0};
// The signals whose handlers are ours (not inherited as ignored); read by the handler.
int g_installed[kMaxSignals] = {};
std::atomic<int> g_num_installed{0};
static_assert(std::atomic<int>::is_always_lock_free, "read and written in a signal handler");

void OnStopSignal(int signal) {
  int none = 0;
  g_stop_signal.compare_exchange_strong(none, signal);  // the first signal is the one said
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(signal, &dfl, nullptr);  // this one in any case (async-signal-safe)
  const int n = g_num_installed.load();
  for (int i = 0; i < n; ++i) sigaction(g_installed[i], &dfl, nullptr);
}

}  // namespace

void InstallStopSignals(std::initializer_list<int> signals) {
  if (g_num_installed.load() != 0) return;  // once: a second list would leave handlers behind
  // Held off while the handlers go in: one arriving halfway reset those in place, and the rest
  // were installed after it.
  sigset_t held, before;
  sigemptyset(&held);
  for (const int s : signals) sigaddset(&held, s);
  pthread_sigmask(SIG_BLOCK, &held, &before);
  struct sigaction action {};
  action.sa_handler = OnStopSignal;
  action.sa_flags = SA_RESTART;
  sigemptyset(&action.sa_mask);
  for (const int s : signals) sigaddset(&action.sa_mask, s);
  int n = 0;
  for (const int s : signals) {
    struct sigaction old {};
    if (n == kMaxSignals || sigaction(s, nullptr, &old) != 0) continue;
    if (old.sa_handler == SIG_IGN) continue;  // nohup's SIGHUP, a background job's SIGINT
    g_installed[n++] = s;
  }
  g_num_installed.store(n);
  for (int i = 0; i < n; ++i) sigaction(g_installed[i], &action, nullptr);
  pthread_sigmask(SIG_SETMASK, &before, nullptr);
}

int StopSignal() { return g_stop_signal.load(); }

const char* StopSignalName(int signal) {
  switch (signal) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    case SIGHUP: return "SIGHUP";
    case SIGUSR1: return "SIGUSR1";
    case SIGUSR2: return "SIGUSR2";
    default: return "a signal";
  }
}

int EndByStopSignal(int signal) {
  std::cout.flush();
  std::fflush(nullptr);
  ::raise(signal);
  return 128 + signal;  // (not reached)
}

}  // namespace aviary::common
