// absl::Mutex as a BasicLockable for std::condition_variable_any, whose waits run on the steady
// clock (libstdc++: pthread_cond_clockwait, CLOCK_MONOTONIC). This Abseil's own timed waits
// (Mutex::AwaitWithTimeout, CondVar::WaitWithTimeout) wait until a wall-clock time: a clock
// stepped back an hour made a one-second wait an hour and a second.
#ifndef AVIARY_COMMON_MUTEX_LOCKABLE_H_
#define AVIARY_COMMON_MUTEX_LOCKABLE_H_

#include "absl/synchronization/mutex.h"

namespace aviary::common {

// The wait unlocks the mutex and locks it again before it returns, inside the caller's
// MutexLock (this Abseil's Mutex has no lock()/unlock()).
struct MutexLockable {
  absl::Mutex* mu;
  void lock() ABSL_NO_THREAD_SAFETY_ANALYSIS { mu->Lock(); }
  void unlock() ABSL_NO_THREAD_SAFETY_ANALYSIS { mu->Unlock(); }
};

// The same inside a ReaderMutexLock (a shared hold).
struct ReaderMutexLockable {
  absl::Mutex* mu;
  void lock() ABSL_NO_THREAD_SAFETY_ANALYSIS { mu->ReaderLock(); }
  void unlock() ABSL_NO_THREAD_SAFETY_ANALYSIS { mu->ReaderUnlock(); }
};

}  // namespace aviary::common

#endif  // AVIARY_COMMON_MUTEX_LOCKABLE_H_
