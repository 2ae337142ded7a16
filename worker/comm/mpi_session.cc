#include "worker/comm/mpi_session.h"

#include <mpi.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/logging.h"

namespace aviary::worker::comm {

constexpr double kMinSetupS = 60;

double MinSetupSeconds() {
  const char* env = std::getenv("AVIARY_COMM_SETUP_MIN_S");
  double seconds = 0;
  if (env != nullptr && absl::SimpleAtod(env, &seconds) && seconds > 0 && std::isfinite(seconds)) {
    static const bool said = [seconds] {
      common::WriteLineToStderr(absl::StrCat("aviary: AVIARY_COMM_SETUP_MIN_S=", seconds, " (a test hook) replaces the ",
                                             kMinSetupS, " s minimum of the start-up deadlines"));
      return true;
    }();
    (void)said;
    return seconds;
  }
  return kMinSetupS;
}

struct SetupDeadline::State {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread thread;
};

SetupDeadline::SetupDeadline(double seconds, int rank, int world, std::string what, std::string why_s)
    : state_(std::make_unique<State>()) {
  State* state = state_.get();
  state->thread = std::thread([state, seconds, rank, world, what = std::move(what), why_s = std::move(why_s)] {
    using Clock = std::chrono::steady_clock;
    const auto deadline =
        Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
    std::unique_lock<std::mutex> lock(state->mu);
    if (state->cv.wait_until(lock, deadline, [state] { return state->done; })) return;
    common::WriteLineToStderr(absl::StrCat(
        "aviary: rank ", rank, " of ", world, " ends the group: ", what, " did not finish within ", seconds, " s (",
        why_s, "): this rank or another did not get there (hung or dead before it, e.g. reading its config or files "
        "on a stuck share; see the other ranks' logs)"));
    std::_Exit(1);
  });
}

SetupDeadline::~SetupDeadline() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->done = true;
  }
  state_->cv.notify_all();
  state_->thread.join();
}

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
  // One collective (with two, a rank whose first failed would leave the others in the second).
  const int failed = mine.ok() ? 0 : 1;
  std::vector<int> all(static_cast<size_t>(world_size_), 0);
  AVIARY_MPI_CHECK(MPI_Allgather(&failed, 1, MPI_INT, all.data(), 1, MPI_INT, MPI_COMM_WORLD));
  int lowest = world_size_;
  int failures = 0;
  for (int r = world_size_ - 1; r >= 0; --r) {
    if (all[static_cast<size_t>(r)] != 0) {
      lowest = r;
      ++failures;
    }
  }
  if (failures == 0) return absl::OkStatus();
  *first_failed = lowest;
  if (!mine.ok()) return mine;
  return absl::FailedPreconditionError(absl::StrCat("rank ", lowest, failures > 1 ? absl::StrCat(" and ", failures - 1, " more") : "",
                                                    " of ", world_size_, " could not start (see its message)"));
}

absl::Status MpiSession::FirstFailure(const absl::Status& mine) const {
  int first = -1;
  const absl::Status agreed = AllRanksOk(mine, &first);
  if (agreed.ok() || first < 0 || world_size_ == 1) return agreed;  // first < 0: the agreement failed
  // The failing rank's code and message, from it to every rank (the length first).
  std::string text = rank_ == first ? std::string(mine.message()) : std::string();
  if (rank_ == first && !absl::StartsWith(text, "rank ")) text = absl::StrCat("rank ", rank_, ": ", text);
  int64_t head[2] = {static_cast<int64_t>(mine.code()), static_cast<int64_t>(text.size())};
  AVIARY_MPI_CHECK(MPI_Bcast(head, 2, MPI_INT64_T, first, MPI_COMM_WORLD));
  if (head[1] < 0 || head[1] > (int64_t{1} << 20)) {
    return absl::InternalError(absl::StrCat("rank ", first, " failed; its message's length ", head[1], " is refused"));
  }
  text.resize(static_cast<size_t>(head[1]));
  if (head[1] > 0) AVIARY_MPI_CHECK(MPI_Bcast(text.data(), static_cast<int>(head[1]), MPI_CHAR, first, MPI_COMM_WORLD));
  const auto code = static_cast<absl::StatusCode>(head[0]);
  return absl::Status(code == absl::StatusCode::kOk ? absl::StatusCode::kUnknown : code, text);
}

void MpiSession::Abort(const std::string& message, int exit_code) const {
  // One write: mpirun's own banner for the abort must not cut the line (it did, in CI).
  common::WriteLineToStderr(absl::StrCat("aviary: rank ", rank_, " of ", world_size_, " ends the group: ", message));
  MPI_Abort(MPI_COMM_WORLD, exit_code == 0 ? 1 : exit_code);
  std::_Exit(exit_code == 0 ? 1 : exit_code);
}

}  // namespace aviary::worker::comm
