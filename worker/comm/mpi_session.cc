#include "worker/comm/mpi_session.h"

#include <mpi.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/logging.h"

namespace aviary::worker::comm {

bool LaunchedUnderMpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

std::string MpiErrorMessage(const char* call, int code, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) len = 0;
  int rank = -1, initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return absl::StrCat(call, " failed at ", file, ":", line, " on rank ", rank, ": ",
                      std::string(text, len), " (code ", code, ")");
}

absl::StatusOr<std::unique_ptr<MpiSession>> MpiSession::Create() {
  std::unique_ptr<MpiSession> s(new MpiSession());
  int initialized = 0, finalized = 0;
  AVIARY_MPI_CHECK(MPI_Initialized(&initialized));
  AVIARY_MPI_CHECK(MPI_Finalized(&finalized));
  if (finalized) return absl::FailedPreconditionError("MPI was already finalized in this process");
  int provided = MPI_THREAD_SINGLE;
  if (!initialized) {
    AVIARY_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided));
    s->owns_ = true;
  } else {
    AVIARY_MPI_CHECK(MPI_Query_thread(&provided));
  }
  if (provided < MPI_THREAD_SERIALIZED) {
    return absl::FailedPreconditionError(absl::StrCat(
        "MPI provides thread level ", provided, ", the gradient hooks need MPI_THREAD_SERIALIZED (",
        MPI_THREAD_SERIALIZED, ")"));
  }
  // Errors come back as codes (checked by AVIARY_MPI_CHECK) instead of aborting inside MPI.
  AVIARY_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  AVIARY_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &s->rank_));
  AVIARY_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &s->world_size_));
  MPI_Comm local;
  AVIARY_MPI_CHECK(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, s->rank_, MPI_INFO_NULL, &local));
  AVIARY_MPI_CHECK(MPI_Comm_rank(local, &s->local_rank_));
  AVIARY_MPI_CHECK(MPI_Comm_size(local, &s->local_size_));
  AVIARY_MPI_CHECK(MPI_Comm_free(&local));
  common::SetLogRank(s->rank_);
  return s;
}

MpiSession::~MpiSession() {
  if (!owns_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (const int rc = MPI_Finalize(); rc != MPI_SUCCESS) {
    common::WriteLineToStderr(
        absl::StrCat("aviary: rank ", rank_, ": ", MpiErrorMessage("MPI_Finalize", rc, __FILE__, __LINE__)));
  }
}

absl::Status MpiSession::AllRanksOk(const absl::Status& mine, int* first_failed) const {
  *first_failed = -1;
  if (world_size_ == 1) {
    if (!mine.ok()) *first_failed = rank_;
    return mine;
  }
  const int candidate = mine.ok() ? world_size_ : rank_;
  int lowest = world_size_;
  const int failed = mine.ok() ? 0 : 1;
  int failures = 0;
  AVIARY_MPI_CHECK(MPI_Allreduce(&candidate, &lowest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  AVIARY_MPI_CHECK(MPI_Allreduce(&failed, &failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD));
  if (failures == 0) return absl::OkStatus();
  *first_failed = lowest;
  if (!mine.ok()) return mine;
  return absl::FailedPreconditionError(absl::StrCat("rank ", lowest, failures > 1 ? absl::StrCat(" and ", failures - 1, " more") : "",
                                                    " of ", world_size_, " could not start (see its message)"));
}

void MpiSession::Abort(const std::string& message, int exit_code) const {
  // One write: mpirun's own banner for the abort must not cut the line (it did, in CI).
  common::WriteLineToStderr(absl::StrCat("aviary: rank ", rank_, " of ", world_size_, " ends the group: ", message));
  MPI_Abort(MPI_COMM_WORLD, exit_code == 0 ? 1 : exit_code);
  std::_Exit(exit_code == 0 ? 1 : exit_code);
}

}  // namespace aviary::worker::comm
