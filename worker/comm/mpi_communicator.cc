#include "worker/comm/mpi_communicator.h"

#include <chrono>
#include <limits>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/comm/mpi_session.h"

namespace aviary::worker::comm {
namespace {

const common::Logger& Log() {
  static const common::Logger logger("comm");
  return logger;
}

constexpr int kQueryTag = 17;
constexpr int kAnswerTag = 18;

using Clock = std::chrono::steady_clock;

// The wire type of `dtype` and whether the tensor must be staged as float32.
absl::StatusOr<MPI_Datatype> WireType(at::ScalarType dtype, bool* widen) {
  *widen = false;
  switch (dtype) {
    case at::kFloat:
      return MPI_FLOAT;
    case at::kDouble:
      return MPI_DOUBLE;
    case at::kInt:
      return MPI_INT32_T;
    case at::kLong:
      return MPI_INT64_T;
    case at::kBFloat16:
    case at::kHalf:
      *widen = true;
      return MPI_FLOAT;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("MPI backend: unsupported dtype ", c10::toString(dtype)));
  }
}

MPI_Op WireOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
    default:
      return MPI_SUM;
  }
}

// A host buffer for `tensor`: the tensor itself when MPI can use it directly, else a staged
// copy (float32 for bf16/fp16, pinned when the tensor lives on a GPU).
at::Tensor Stage(const at::Tensor& tensor, bool widen) {
  if (!tensor.is_cuda() && !widen && tensor.is_contiguous()) return tensor;
  at::TensorOptions o = at::TensorOptions().dtype(widen ? at::kFloat : tensor.scalar_type());
  if (tensor.is_cuda()) o = o.pinned_memory(true);
  at::Tensor staged = at::empty(tensor.sizes(), o);
  staged.copy_(tensor);
  return staged;
}

// Backs off from spinning so that an oversubscribed rank leaves the core to its neighbour.
class Backoff {
 public:
  void Pause() {
    if (++spins_ < 64) return;
    std::this_thread::sleep_for(std::chrono::microseconds(std::min<int64_t>(1000, spins_)));
  }

 private:
  int64_t spins_ = 0;
};

class MpiWork final : public Work {
 public:
  MpiWork(MpiCommunicator* comm, at::Tensor tensor, at::Tensor staged, int64_t seq,
          std::string what)
      : comm_(comm),
        tensor_(std::move(tensor)),
        staged_(std::move(staged)),
        seq_(seq),
        what_(std::move(what)) {}
  ~MpiWork() override {
    // Never started (an empty tensor, or a launch that failed and broke the communicator).
    if (done_ || request_ == MPI_REQUEST_NULL) return;
    absl::Status st = Wait();
    if (!st.ok()) Log().Error(st.message());
  }
  MPI_Request* request() { return &request_; }

  bool Poll() override {
    if (done_) return true;
    auto r = comm_->TestRequest(&request_);
    if (r.ok() && *r) {
      Finish();
      return true;
    }
    return false;
  }
  absl::Status Wait() override {
    if (done_) return absl::OkStatus();
    absl::Status st = comm_->WaitRequest(&request_, seq_, what_);
    if (st.ok()) {
      Finish();
    } else {
      done_ = true;  // the group is ending; do not wait again from the destructor
      // MPI may still write the buffer of a request that never completed: it outlives us.
      if (request_ != MPI_REQUEST_NULL) new at::Tensor(staged_);  // NOLINT: deliberately leaked
    }
    return st;
  }

 private:
  void Finish() {
    done_ = true;
    if (staged_.data_ptr() != tensor_.data_ptr()) tensor_.copy_(staged_);
  }

  MpiCommunicator* comm_;
  at::Tensor tensor_, staged_;
  int64_t seq_;
  std::string what_;
  MPI_Request request_ = MPI_REQUEST_NULL;
  bool done_ = false;
};

}  // namespace

absl::Status Communicator::AllReduce(at::Tensor tensor, ReduceOp op) {
  auto work = AllReduceAsync(std::move(tensor), op);
  if (!work.ok()) return work.status();
  return (*work)->Wait();
}

absl::StatusOr<std::unique_ptr<MpiCommunicator>> MpiCommunicator::Create(double timeout_s) {
  if (!(timeout_s > 0))
    return absl::InvalidArgumentError(absl::StrCat("comm.timeout_s must be > 0, got ", timeout_s));
  std::unique_ptr<MpiCommunicator> c(new MpiCommunicator());
  c->timeout_s_ = timeout_s;
  AVIARY_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &c->comm_));
  AVIARY_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &c->ctl_));
  AVIARY_MPI_CHECK(MPI_Comm_set_errhandler(c->comm_, MPI_ERRORS_RETURN));
  AVIARY_MPI_CHECK(MPI_Comm_set_errhandler(c->ctl_, MPI_ERRORS_RETURN));
  AVIARY_MPI_CHECK(MPI_Comm_rank(c->comm_, &c->rank_));
  AVIARY_MPI_CHECK(MPI_Comm_size(c->comm_, &c->world_size_));
  return c;
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  if (ctl_ != MPI_COMM_NULL) MPI_Comm_free(&ctl_);
}

void MpiCommunicator::AnswerQueries() {
  // Any failure ends the loop: a query that cannot be received stays queued, and probing it
  // again for ever would keep the caller from its own timeout.
  while (true) {
    int flag = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kQueryTag, ctl_, &flag, &status) != MPI_SUCCESS || !flag) return;
    int64_t asked = 0;
    if (MPI_Recv(&asked, 1, MPI_INT64_T, status.MPI_SOURCE, kQueryTag, ctl_, MPI_STATUS_IGNORE) != MPI_SUCCESS) return;
    int64_t mine = seq_;
    if (MPI_Send(&mine, 1, MPI_INT64_T, status.MPI_SOURCE, kAnswerTag, ctl_) != MPI_SUCCESS) return;
  }
}

// MPI counts elements in an int: a larger tensor would be cut to its low 32 bits (replicas that
// drift apart silently) or go negative.
static absl::StatusOr<int> MpiCount(int64_t elements, absl::string_view what) {
  if (elements > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MPI backend: ", what, " of ", elements, " elements, more than MPI's count can hold (2^31 - 1): "
        "lower comm.bucket_mb, or use comm.backend nccl"));
  }
  return static_cast<int>(elements);
}

absl::StatusOr<bool> MpiCommunicator::TestRequest(MPI_Request* request) {
  if (!failed_.ok()) return failed_;
  int flag = 0;
  if (int rc = MPI_Test(request, &flag, MPI_STATUS_IGNORE); rc != MPI_SUCCESS) {
    // As WaitRequest: the request is not tested again (undefined after an error), and every
    // later wait says why.
    failed_ = absl::InternalError(MpiErrorMessage("MPI_Test", rc, __FILE__, __LINE__));
    return failed_;
  }
  if (!flag) AnswerQueries();
  return flag != 0;
}

std::string MpiCommunicator::NotArrived(int64_t seq) {
  for (int r = 0; r < world_size_; ++r) {
    if (r == rank_) continue;
    (void)MPI_Send(&seq, 1, MPI_INT64_T, r, kQueryTag, ctl_);  // a rank not asked shows as "no answer"
  }
  std::vector<int64_t> at(world_size_, -1);
  at[rank_] = seq;
  int answered = 1;
  const auto deadline = Clock::now() + std::chrono::milliseconds(2000);
  Backoff backoff;
  while (answered < world_size_ && Clock::now() < deadline) {
    AnswerQueries();
    int flag = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kAnswerTag, ctl_, &flag, &status) != MPI_SUCCESS) break;
    if (!flag) {
      backoff.Pause();
      continue;
    }
    int64_t theirs = 0;
    if (MPI_Recv(&theirs, 1, MPI_INT64_T, status.MPI_SOURCE, kAnswerTag, ctl_, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
      break;
    }
    if (at[status.MPI_SOURCE] < 0) ++answered;
    at[status.MPI_SOURCE] = theirs;
  }
  std::vector<std::string> missing;
  for (int r = 0; r < world_size_; ++r) {
    if (at[r] < 0) {
      missing.push_back(
          absl::StrCat(r, " (no answer: busy outside the group's collectives, hung or dead)"));
    } else if (at[r] < seq) {
      missing.push_back(absl::StrCat(r, " (waiting in collective #", at[r], ")"));
    }
  }
  return missing.empty() ? "none (all ranks are in it: a mismatch of collectives?)"
                         : absl::StrJoin(missing, ", ");
}

// A collective this rank could not start: the others started theirs, so this rank is out of
// step with them from here on, and every later collective fails (Broken) naming this one.
#define AVIARY_MPI_LAUNCH(call)                                                       \
  do {                                                                                \
    int aviary_mpi_rc_ = (call);                                                      \
    if (aviary_mpi_rc_ != MPI_SUCCESS) {                                              \
      failed_ = absl::InternalError(MpiErrorMessage(#call, aviary_mpi_rc_, __FILE__, __LINE__)); \
      return failed_;                                                                 \
    }                                                                                 \
  } while (0)

absl::Status MpiCommunicator::WaitRequest(MPI_Request* request, int64_t seq,
                                          const std::string& what) {
  if (!failed_.ok()) return Broken(seq, what);
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(timeout_s_));
  Backoff backoff;
  while (true) {
    int flag = 0;
    if (int rc = MPI_Test(request, &flag, MPI_STATUS_IGNORE); rc != MPI_SUCCESS) {
      failed_ = absl::InternalError(MpiErrorMessage("MPI_Test", rc, __FILE__, __LINE__));
      return failed_;
    }
    if (flag) return absl::OkStatus();
    AnswerQueries();
    if (Clock::now() > deadline) {
      failed_ = absl::DeadlineExceededError(
          absl::StrCat("rank ", rank_, ": collective #", seq, " (", what,
                       ") waited longer than ", TimeoutText(), "; ranks that did not arrive: ", NotArrived(seq)));
      return failed_;
    }
    backoff.Pause();
  }
}

absl::Status MpiCommunicator::Broken(int64_t seq, const std::string& what) const {
  return absl::AbortedError(absl::StrCat("rank ", rank_, ": collective #", seq, " (", what,
                                         ") not waited for: an earlier one failed (", failed_.message(), ")"));
}

absl::StatusOr<std::unique_ptr<Work>> MpiCommunicator::AllReduceAsync(at::Tensor tensor,
                                                                      ReduceOp op) {
  if (!failed_.ok()) return Broken(seq_ + 1, "all-reduce");
  bool widen = false;
  auto type = WireType(tensor.scalar_type(), &widen);
  if (!type.ok()) return type.status();
  if (!tensor.is_contiguous()) {
    return absl::InvalidArgumentError("MPI backend: AllReduce needs a contiguous tensor");
  }
  AVIARY_ASSIGN_OR_RETURN(const int count, MpiCount(tensor.numel(), "all-reduce"));
  at::Tensor staged = Stage(tensor, widen);
  const int64_t seq = ++seq_;
  auto work = std::make_unique<MpiWork>(
      this, tensor, staged, seq,
      absl::StrCat("all-reduce of ", tensor.numel(), " ", c10::toString(tensor.scalar_type())));
  if (tensor.numel() > 0) {
    AVIARY_MPI_LAUNCH(MPI_Iallreduce(MPI_IN_PLACE, staged.data_ptr(), count, *type, WireOp(op), comm_,
                                    work->request()));
  }
  return std::unique_ptr<Work>(std::move(work));
}

absl::Status MpiCommunicator::Broadcast(at::Tensor tensor, int root) {
  if (!failed_.ok()) return Broken(seq_ + 1, "broadcast");
  bool widen = false;
  auto type = WireType(tensor.scalar_type(), &widen);
  if (!type.ok()) return type.status();
  if (!tensor.is_contiguous())
    return absl::InvalidArgumentError("MPI backend: Broadcast needs a contiguous tensor");
  AVIARY_ASSIGN_OR_RETURN(const int count, MpiCount(tensor.numel(), "broadcast"));
  at::Tensor staged = Stage(tensor, widen);
  const int64_t seq = ++seq_;
  MpiWork work(this, tensor, staged, seq,
               absl::StrCat("broadcast of ", tensor.numel(), " from rank ", root));
  if (tensor.numel() > 0) {
    AVIARY_MPI_LAUNCH(MPI_Ibcast(staged.data_ptr(), count, *type, root, comm_, work.request()));
  }
  return work.Wait();
}

absl::StatusOr<at::Tensor> MpiCommunicator::AllGather(const at::Tensor& tensor) {
  if (!failed_.ok()) return Broken(seq_ + 1, "all-gather");
  bool widen = false;
  auto type = WireType(tensor.scalar_type(), &widen);
  if (!type.ok()) return type.status();
  AVIARY_ASSIGN_OR_RETURN(const int count, MpiCount(tensor.numel(), "all-gather"));
  at::Tensor staged = Stage(tensor.contiguous(), widen);
  std::vector<int64_t> shape = tensor.sizes().vec();
  if (shape.empty()) shape.push_back(1);
  shape[0] *= world_size_;
  at::Tensor gathered = at::empty(shape, staged.options());
  const int64_t seq = ++seq_;
  MpiWork work(this, gathered, gathered, seq, absl::StrCat("all-gather of ", tensor.numel()));
  AVIARY_MPI_LAUNCH(MPI_Iallgather(staged.data_ptr(), count, *type, gathered.data_ptr(), count, *type, comm_,
                                  work.request()));
  absl::Status st = work.Wait();
  if (!st.ok()) {
    // MPI may still read `staged` (a late rank): kept for ever, also when it is the caller's own
    // tensor (contiguous, of a wire type), whose memory the caller may free or reuse on return.
    new at::Tensor(staged);  // NOLINT: leaked on purpose
    return st;
  }
  return gathered.to(tensor.device(), tensor.scalar_type());
}

absl::Status MpiCommunicator::Barrier() {
  if (!failed_.ok()) return Broken(seq_ + 1, "barrier");
  const int64_t seq = ++seq_;
  MPI_Request request = MPI_REQUEST_NULL;
  AVIARY_MPI_LAUNCH(MPI_Ibarrier(comm_, &request));
  return WaitRequest(&request, seq, "barrier");
}

bool NcclBackendBuilt() {
#ifdef AVIARY_WITH_NCCL_BACKEND
  return true;
#else
  return false;
#endif
}

}  // namespace aviary::worker::comm
