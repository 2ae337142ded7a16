#include "worker/agent/signals.h"

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>

#include <unistd.h>

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
// CLOCK_MONOTONIC in ms at the watchdog's last tick (every kTickMs): a SIGCONT that finds it
// older than kStoppedMs continues a stopped process (job control, a Slurm suspend) and is no
// stop notice.
std::atomic<int64_t> g_tick_ms{0};
static_assert(std::atomic<int64_t>::is_always_lock_free, "the watchdog tick must be lock-free");
// CLOCK_MONOTONIC in ms when the watchdog last woke to find its previous tick older than
// kStoppedMs: the process had been stopped. After a SIGCONT the kernel may run the woken watchdog
// before the handler (it did on a loaded 2-core CI machine), so a fresh tick alone does not prove
// the process was running: a resume seen within kResumedMs also marks the SIGCONT as a resume.
std::atomic<int64_t> g_resumed_ms{INT64_MIN / 2};
constexpr int64_t kTickMs = 100;
constexpr int64_t kStoppedMs = 1500;
constexpr int64_t kResumedMs = 2000;

int64_t MonotonicMs() {
  struct timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);  // async-signal-safe
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

extern "C" void OnStopSignal(int sig) { g_signal.store(sig, std::memory_order_relaxed); }

// Open MPI's mpirun (and orted) ends a job on SIGTERM by sending each rank SIGCONT at once and
// SIGTERM only odls_base_sigkill_timeout seconds later (measured with 4.1.4). The SIGCONT from
// the parent to a rank that was not stopped is the only prompt notice, so it counts as a stop.
extern "C" void OnContinue(int, siginfo_t* info, void*) {
  if (info == nullptr || info->si_code != SI_USER || info->si_pid != ::getppid()) return;
  // The tick is read first: a watchdog tick that is seen was stored after its resume mark.
  const int64_t tick = g_tick_ms.load();
  const int64_t now = MonotonicMs();
  if (now - tick > kStoppedMs) return;                   // resumed; the watchdog has not woken yet
  if (now - g_resumed_ms.load() <= kResumedMs) return;  // resumed; the watchdog woke first
  int expected = 0;
  g_signal.compare_exchange_strong(expected, SIGCONT, std::memory_order_relaxed);
}

}  // namespace

void InstallStopSignalHandlers() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = OnStopSignal;
  // SA_RESTART: a read or write in a loader thread is restarted, not failed with EINTR (which
  // would be reported as an I/O error rather than "stopped by signal").
  sa.sa_flags = SA_RESETHAND | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGINT, SIGUSR2}) {
    if (::sigaction(sig, &sa, nullptr) != 0) {
      Log().Warn(absl::StrCat("sigaction(", ::strsignal(sig), "): ", std::strerror(errno),
                              "; this signal will end the group without a report"));
    }
  }
  // Once mpirun is ending the job it no longer forwards the ranks' output (seen with 4.1.4) and
  // may close the pipes: a log line must not kill a rank (SIGPIPE) before it has reported.
  struct sigaction ignore;
  std::memset(&ignore, 0, sizeof(ignore));
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  if (::sigaction(SIGPIPE, &ignore, nullptr) != 0) {
    Log().Warn(absl::StrCat("sigaction(SIGPIPE): ", std::strerror(errno)));
  }
  // The watchdog that tells a continued process from a running one (OnContinue).
  g_tick_ms.store(MonotonicMs());
  std::thread([] {
    int64_t last = MonotonicMs();
    while (true) {
      const int64_t now = MonotonicMs();
      if (now - last > kStoppedMs) g_resumed_ms.store(now);  // before the tick (OnContinue)
      g_tick_ms.store(now);
      last = now;
      std::this_thread::sleep_for(std::chrono::milliseconds(kTickMs));
    }
  }).detach();
  struct sigaction cont;
  std::memset(&cont, 0, sizeof(cont));
  cont.sa_sigaction = OnContinue;
  cont.sa_flags = SA_SIGINFO | SA_RESTART;  // kept: SIGCONT's default action only continues
  sigemptyset(&cont.sa_mask);
  if (::sigaction(SIGCONT, &cont, nullptr) != 0) {
    Log().Warn(absl::StrCat("sigaction(SIGCONT): ", std::strerror(errno),
                            "; SIGTERM to mpirun will stop the group only when mpirun forwards SIGTERM "
                            "(odls_base_sigkill_timeout seconds later)"));
  }
}

bool Signalled() { return g_signal.load(std::memory_order_relaxed) != 0; }

void SetStopSignalForTest(int sig) { g_signal.store(sig, std::memory_order_relaxed); }

std::string StopSignalName() {
  const int sig = g_signal.load(std::memory_order_relaxed);
  switch (sig) {
    case 0: return "";
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGUSR2: return "SIGUSR2";
    case SIGCONT: return "SIGCONT from the launcher, which is ending the group";
    default: return absl::StrCat("signal ", sig);
  }
}

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
