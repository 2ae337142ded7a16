// common/stop_signals: the graceful stop of `aviary predict` and `aviary prepare`. Each case runs
// in a death test's child (the handlers are the process's for good).
#include "common/stop_signals.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

namespace aviary::common {
namespace {

// The first signal is recorded and the process goes on (to its next safe point).
TEST(StopSignalsDeathTest, TheFirstSignalIsRecorded) {
  EXPECT_EXIT(
      {
        InstallStopSignals({SIGINT, SIGTERM});
        ::raise(SIGTERM);
        ::_exit(StopSignal() == SIGTERM ? 3 : 4);
      },
      ::testing::ExitedWithCode(3), "");
}

// A second one, of any of them, ends the process at once.
TEST(StopSignalsDeathTest, ASecondSignalEndsTheProcess) {
  EXPECT_EXIT(
      {
        InstallStopSignals({SIGINT, SIGTERM, SIGHUP});
        ::raise(SIGTERM);
        ::raise(SIGINT);
        ::_exit(5);
      },
      ::testing::KilledBySignal(SIGINT), "");
}

// A signal the process inherited as ignored (nohup's SIGHUP) stays ignored: no stop is recorded.
TEST(StopSignalsDeathTest, AnInheritedIgnoredSignalStaysIgnored) {
  EXPECT_EXIT(
      {
        ::signal(SIGHUP, SIG_IGN);
        InstallStopSignals({SIGHUP, SIGTERM});
        ::raise(SIGHUP);
        ::_exit(StopSignal() == 0 ? 6 : 7);
      },
      ::testing::ExitedWithCode(6), "");
}

// The command ends by the signal that stopped it (a shell's loop stops at a Ctrl-C only then).
TEST(StopSignalsDeathTest, EndByStopSignalEndsTheProcessByIt) {
  EXPECT_EXIT(
      {
        InstallStopSignals({SIGINT, SIGTERM});
        ::raise(SIGINT);
        EndByStopSignal(StopSignal());
        ::_exit(8);
      },
      ::testing::KilledBySignal(SIGINT), "");
}

TEST(StopSignalsTest, NamesTheSignals) {
  EXPECT_STREQ(StopSignalName(SIGTERM), "SIGTERM");
  EXPECT_STREQ(StopSignalName(SIGHUP), "SIGHUP");
  EXPECT_STREQ(StopSignalName(SIGUSR2), "SIGUSR2");
  EXPECT_STREQ(StopSignalName(SIGQUIT), "a signal");
}

}  // namespace
}  // namespace aviary::common
