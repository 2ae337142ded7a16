#include "worker/agent/signals.h"

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace aviary::worker {
namespace {

using Clock = std::chrono::steady_clock;

const common::Logger& Log() {
  static const common::Logger logger("agent");
  return logger;
}

// Read from every thread: a lock-free atomic, which a signal handler may store to.
std::atomic<int> g_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal flag must be lock-free");

extern "C" void OnStopSignal(int sig) { g_signal.store(sig, std::memory_order_relaxed); }

}  // namespace

void InstallStopSignalHandlers() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = OnStopSignal;
  // SA_RESTART: a read or write in a loader thread is restarted, not failed with EINTR (which
  // would be reported as an I/O error rather than "stopped by signal").
  sa.sa_flags = SA_RESETHAND | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGINT}) {
    if (::sigaction(sig, &sa, nullptr) != 0) {
      Log().Warn(absl::StrCat("sigaction(", ::strsignal(sig), "): ", std::strerror(errno),
                              "; this signal will end the group without a report"));
    }
  }
}

bool Signalled() { return g_signal.load(std::memory_order_relaxed) != 0; }

bool SleepUnlessSignalled(double seconds) {
  const auto end = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < end) {
    if (Signalled()) return false;
    std::this_thread::sleep_for(std::min<Clock::duration>(
        std::chrono::milliseconds(50), std::chrono::duration_cast<Clock::duration>(end - Clock::now())));
  }
  return !Signalled();
}

double SecondsSince(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

}  // namespace aviary::worker
