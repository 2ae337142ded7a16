// MPI for one process of a worker group: init (MPI_THREAD_SERIALIZED), the world's rank, size,
// local rank and local size, abort, and finalize. A worker group is one mpirun world; every
// rank is a replica.
//
// RAII: the session finalizes MPI only when it initialized it (a host program that called
// MPI_Init itself keeps ownership). Move-only. Not thread-safe: create and destroy it on the
// main thread. MPI calls from other threads must be serialized by the caller (autograd's device
// threads run the gradient hooks while the main thread waits in backward()).
#ifndef AVIARY_WORKER_COMM_MPI_SESSION_H_
#define AVIARY_WORKER_COMM_MPI_SESSION_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace aviary::worker::comm {

class MpiSession {
 public:
  // Initializes MPI unless it already is. FAILED_PRECONDITION when MPI offers less than
  // MPI_THREAD_SERIALIZED or was already finalized.
  static absl::StatusOr<std::unique_ptr<MpiSession>> Create();
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  bool owns_mpi() const { return owns_; }

  // Ends the whole group: logs `message` (which should name the cause) and calls MPI_Abort
  // on MPI_COMM_WORLD, which makes mpirun kill every rank and exit non-zero. Never returns.
  [[noreturn]] void Abort(const std::string& message, int exit_code) const;

  // Every rank passes its own outcome of a step that each rank does alone (reading its flags and
  // files): OK when every rank's is OK; else this rank's error when it failed, or
  // FAILED_PRECONDITION naming the lowest failing rank. `*first_failed` is that rank (-1: none,
  // or the agreement itself failed: INTERNAL with MPI's message). A collective on
  // MPI_COMM_WORLD: every rank must call it.
  absl::Status AllRanksOk(const absl::Status& mine, int* first_failed) const;
  // The same agreement, but every rank returns the lowest failing rank's own status (its code,
  // and its message with "rank R: " in front unless it starts so): a step of a task whose ranks
  // must fail alike (the agent ends the group when their codes differ). Collective, as above.
  absl::Status FirstFailure(const absl::Status& mine) const;

 private:
  MpiSession() = default;
  bool owns_ = false;
  int rank_ = 0;
  int world_size_ = 1;
  int local_rank_ = 0;
  int local_size_ = 1;
};

// True when this process was started by mpirun/srun (an MPI world exists to join).
bool LaunchedUnderMpi();

// A start-up step's collectives have no deadline of their own: a rank that never reaches them
// (hung reading its config or token file on a stuck share, a wedged GPU, dead after MPI_Init)
// kept every other rank in them for ever. While one lives, a thread ends the process (saying
// "rank R of W ends the group: <what> did not finish within S s (<why_s>): ...") once `seconds`
// have passed; destroying it disarms it. No MPI call from its thread (MPI_THREAD_SERIALIZED),
// so _Exit: a rank that exits before MPI_Finalize makes mpirun end the group. Under `serve`
// nothing reports it to the coordinator; the coordinator reaps the group after its heartbeat
// timeout, or it never registered.
class SetupDeadline {
 public:
  SetupDeadline(double seconds, int rank, int world, std::string what, std::string why_s);
  ~SetupDeadline();
  SetupDeadline(const SetupDeadline&) = delete;
  SetupDeadline& operator=(const SetupDeadline&) = delete;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// The least a start-up step waits for the other ranks: 60 s (ranks reach it after loading
// libtorch and their files, seconds apart on a loaded host), or AVIARY_COMM_SETUP_MIN_S when set
// to a positive number of seconds (a test hook, said once on stderr).
double MinSetupSeconds();

// "MPI_Allreduce(...) failed at file:line on rank R: <MPI error string>" for a failed call.
std::string MpiErrorMessage(const char* call, int code, const char* file, int line);

}  // namespace aviary::worker::comm

// Evaluates an MPI call; on failure returns INTERNAL with the call text, file:line, rank and
// MPI's own message from the enclosing function (which must return absl::Status or StatusOr).
#define AVIARY_MPI_CHECK(call)                                                                 \
  do {                                                                                         \
    int aviary_mpi_rc_ = (call);                                                               \
    if (aviary_mpi_rc_ != MPI_SUCCESS) {                                                       \
      return absl::InternalError(                                                              \
          ::aviary::worker::comm::MpiErrorMessage(#call, aviary_mpi_rc_, __FILE__, __LINE__)); \
    }                                                                                          \
  } while (0)

#endif  // AVIARY_WORKER_COMM_MPI_SESSION_H_
