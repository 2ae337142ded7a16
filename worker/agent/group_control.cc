#include "worker/agent/group_control.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <memory>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "worker/agent/signals.h"
#include "worker/comm/mpi_session.h"

namespace aviary::worker {

const char* ExchangeName(int64_t kind) {
  switch (kind) {
    case kExPrepared: return "prepared the task";
    case kExStep: return "training (step exchange)";
    case kExEpochEnd: return "training (epoch end)";
    case kExFinished: return "finished the task";
  }
  return "unknown";
}

std::string StopMessage(const absl::Status& st) {
  return absl::StrCat(std::string(1, kMsgStop), static_cast<int>(st.code()), "\n", st.message());
}

absl::Status ParseStopMessage(const std::string& msg) {
  // A garbled code ("Sx": atoi's 0) read as OK, and the other ranks exited 0 for a failed group.
  const size_t nl = msg.find('\n');
  int code = -1;
  if (msg.empty() || msg[0] != kMsgStop || nl == std::string::npos ||
      !absl::SimpleAtoi(absl::string_view(msg).substr(1, nl - 1), &code) || code < 0 ||
      code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    return absl::InternalError(absl::StrCat("rank 0's stop message is garbled: ",
                                            absl::CEscape(absl::string_view(msg).substr(0, 64))));
  }
  if (code == 0) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(code), msg.substr(nl + 1));
}

Verdict JudgeOutcome(const std::vector<int64_t>& rows, int world, bool training) {
  // The rank to blame: the first whose error is not a consequence of another rank's (a
  // collective that timed out waiting, a stop), else the first that failed at all.
  Verdict v;
  int first_cause = -1;
  for (int r = 0; r < world; ++r) {
    const int64_t code = rows[kExchangeRow * r + 1];
    if (training && code != rows[1]) v.agreed = false;
    if (code != 0 && v.blamed < 0) v.blamed = r;
    if (code != 0 && code != static_cast<int64_t>(absl::StatusCode::kDeadlineExceeded) &&
        code != static_cast<int64_t>(absl::StatusCode::kCancelled) && first_cause < 0) {
      first_cause = r;
    }
  }
  if (first_cause >= 0) v.blamed = first_cause;
  return v;
}

absl::StatusOr<std::unique_ptr<GroupControl>> GroupControl::Create() {
  auto c = std::unique_ptr<GroupControl>(new GroupControl());
  AVIARY_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &c->comm_));
  AVIARY_MPI_CHECK(MPI_Comm_rank(c->comm_, &c->rank_));
  AVIARY_MPI_CHECK(MPI_Comm_size(c->comm_, &c->world_));
  return c;
}

GroupControl::~GroupControl() {
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

// The buffers of a non-blocking collective live on the heap: when the wait times out the request
// is still pending (a late rank may complete it, and MPI then writes into them), so they are left
// to MPI (released, never freed) rather than freed under it; the group ends soon after anyway.
absl::Status GroupControl::Broadcast(std::string* bytes, int root, double max_sleep_s, double deadline_s) {
  // One deadline for both phases (the size, then the bytes): each its own made it twice as long.
  const auto start = std::chrono::steady_clock::now();
  auto size = std::make_unique<int64_t>(rank_ == root ? static_cast<int64_t>(bytes->size()) : 0);
  MPI_Request req;
  AVIARY_MPI_CHECK(MPI_Ibcast(size.get(), 1, MPI_INT64_T, root, comm_, &req));
  if (absl::Status waited = Wait(&req, max_sleep_s, deadline_s, "the control broadcast", start); !waited.ok()) {
    (void)size.release();  // still MPI's
    return waited;
  }
  const int64_t n = *size;
  if (n < 0 || n > std::numeric_limits<int>::max()) {
    return absl::InternalError(absl::StrCat("control broadcast from rank ", root, ": bad size ", n));
  }
  if (n == 0) {
    bytes->clear();
    return absl::OkStatus();
  }
  auto buffer = std::make_unique<std::string>(rank_ == root ? *bytes : std::string(static_cast<size_t>(n), '\0'));
  AVIARY_MPI_CHECK(MPI_Ibcast(buffer->data(), static_cast<int>(n), MPI_BYTE, root, comm_, &req));
  if (absl::Status waited = Wait(&req, 0.002, deadline_s, "the control broadcast", start); !waited.ok()) {
    (void)buffer.release();  // still MPI's
    return waited;
  }
  *bytes = std::move(*buffer);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> GroupControl::AllGather(const std::vector<int64_t>& mine, double max_sleep_s,
                                                             double deadline_s) {
  auto send = std::make_unique<std::vector<int64_t>>(mine);
  auto all = std::make_unique<std::vector<int64_t>>(mine.size() * static_cast<size_t>(world_));
  MPI_Request req;
  AVIARY_MPI_CHECK(MPI_Iallgather(send->data(), static_cast<int>(send->size()), MPI_INT64_T, all->data(),
                                  static_cast<int>(send->size()), MPI_INT64_T, comm_, &req));
  if (absl::Status waited = Wait(&req, max_sleep_s, deadline_s, "the control all-gather"); !waited.ok()) {
    (void)send.release();  // still MPI's
    (void)all.release();
    return waited;
  }
  return std::move(*all);
}

absl::StatusOr<std::vector<int64_t>> GroupControl::Exchange(int64_t kind, int64_t a, int64_t b, int64_t c,
                                                            double deadline_s, const absl::Status& mine) {
  const std::string own_error = mine.ok() ? "" : absl::StrCat(" (its error: ", mine.message(), ")");
  auto all = AllGather({kind, a, b, c}, kind == kExStep ? 0.0005 : 0.005, deadline_s);
  if (!all.ok()) {
    return absl::Status(all.status().code(), absl::StrCat("rank ", rank_, " ", ExchangeName(kind), own_error, ": ",
                                                          all.status().message()));
  }
  for (int r = 0; r < world_; ++r) {
    if ((*all)[kExchangeRow * r] != kind) {
      std::vector<std::string> where;
      for (int q = 0; q < world_; ++q) {
        where.push_back(absl::StrCat("rank ", q, " ", ExchangeName((*all)[kExchangeRow * q]),
                                     q == rank_ ? own_error : ""));
      }
      return absl::AbortedError(absl::StrCat("the ranks are out of step: ", absl::StrJoin(where, "; "),
                                             " (see the other ranks' logs for their errors)"));
    }
  }
  return all;
}

absl::Status GroupControl::Wait(MPI_Request* req, double max_sleep_s, double deadline_s, const char* what,
                                 std::chrono::steady_clock::time_point start) {
  double sleep_s = 20e-6;
  while (true) {
    int done = 0;
    AVIARY_MPI_CHECK(MPI_Test(req, &done, MPI_STATUS_IGNORE));
    if (done) return absl::OkStatus();
    if (deadline_s > 0 && SecondsSince(start) > deadline_s) {
      return absl::DeadlineExceededError(absl::StrFormat(
          "rank %d waited %g s for %s: another rank did not arrive", rank_, deadline_s, what));
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(sleep_s));
    sleep_s = std::min(sleep_s * 2, max_sleep_s);
  }
}

}  // namespace aviary::worker
