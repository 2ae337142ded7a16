#include "worker/comm/nccl_communicator.h"

#ifdef AVIARY_WITH_NCCL_BACKEND

#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <mpi.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/comm/mpi_session.h"

namespace aviary::worker::comm {
namespace {

using Clock = std::chrono::steady_clock;

int WorldRank() {
  int rank = -1, initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

absl::StatusOr<ncclDataType_t> NcclType(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ncclFloat32;
    case at::kDouble:
      return ncclFloat64;
    case at::kHalf:
      return ncclFloat16;
    case at::kBFloat16:
      return ncclBfloat16;
    case at::kInt:
      return ncclInt32;
    case at::kLong:
      return ncclInt64;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("NCCL backend: unsupported dtype ", c10::toString(dtype)));
  }
}

ncclRedOp_t NcclOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
    default:
      return ncclSum;
  }
}

// A CUDA event recorded on the stream after a collective; waiting copies CPU results back.
class NcclWork final : public Work {
 public:
  NcclWork(NcclCommunicator* comm, at::Tensor user, at::Tensor device_tensor, int64_t seq,
           std::string what)
      : comm_(comm),
        user_(std::move(user)),
        device_(std::move(device_tensor)),
        seq_(seq),
        what_(std::move(what)) {}
  ~NcclWork() override {
    if (event_ != nullptr) {
      if (!done_) (void)Wait();
      cudaEventDestroy(event_);
    }
  }
  absl::Status Record() {
    AVIARY_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    AVIARY_CUDA_CHECK(cudaEventRecord(event_, comm_->stream()));
    return absl::OkStatus();
  }
  bool Poll() override {
    if (done_) return true;
    const cudaError_t q = cudaEventQuery(event_);
    if (q != cudaSuccess) {
      // "Not ready" is not an error, but the runtime may keep it as the thread's last error,
      // which a later launch check (on autograd's thread, between backward kernels) would
      // report: cleared, as torch's own queries do. Another error is Wait()'s to report.
      if (q == cudaErrorNotReady) (void)cudaGetLastError();
      return false;
    }
    Finish();
    return true;
  }
  absl::Status Wait() override {
    if (done_) return absl::OkStatus();
    absl::Status st = comm_->WaitEvent(event_, seq_, what_);
    done_ = true;
    if (st.ok()) Finish();
    return st;
  }

 private:
  void Finish() {
    done_ = true;
    if (user_.data_ptr() != device_.data_ptr()) user_.copy_(device_);
  }
  NcclCommunicator* comm_;
  at::Tensor user_, device_;
  int64_t seq_;
  std::string what_;
  cudaEvent_t event_ = nullptr;
  bool done_ = false;
};

}  // namespace

std::string NcclErrorMessage(const char* call, ncclResult_t code, ncclComm_t comm, const char* file,
                             int line) {
  std::string last;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
  if (comm != nullptr) last = ncclGetLastError(comm);
#endif
  int version = 0;
  ncclGetVersion(&version);
  return absl::StrCat(call, " failed at ", file, ":", line, " on rank ", WorldRank(), ": ",
                      ncclGetErrorString(code), last.empty() ? "" : absl::StrCat(" (", last, ")"),
                      " [NCCL ", version, "]");
}

std::string CudaErrorMessage(const char* call, cudaError_t code, const char* file, int line) {
  return absl::StrCat(call, " failed at ", file, ":", line, " on rank ", WorldRank(), ": ",
                      cudaGetErrorString(code));
}

// How long an abort is waited for (Abort).
constexpr int kAbortWaitS = 10;

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(
    const MpiSession& session, const at::Device& device, double timeout_s) {
  if (!device.is_cuda()) return absl::FailedPreconditionError("NCCL backend: needs a CUDA device");
  // With its index (a bare "cuda" is the current device): a tensor is used in place only on this
  // device (one on another GPU was handed to NCCL as it was: ncclInvalidArgument or an illegal
  // address), and that compares indexes.
  const at::Device indexed = device.has_index() ? device : at::Device(at::kCUDA, c10::cuda::current_device());
  std::unique_ptr<NcclCommunicator> c(
      new NcclCommunicator(session.rank(), session.world_size(), indexed, timeout_s));
  c10::cuda::CUDAGuard guard(indexed.index());
  // Rank 0's id, and whether it has one: a rank 0 that failed returned before the broadcast,
  // and the other ranks waited in it until the setup deadline killed the group, rank 0's error
  // unsaid to the coordinator.
  struct {
    int32_t ok = 0;
    ncclUniqueId id;
  } setup;
  ncclResult_t made = ncclSuccess;
  if (c->rank_ == 0) {
    made = ncclGetUniqueId(&setup.id);
    setup.ok = made == ncclSuccess ? 1 : 0;
  }
  AVIARY_MPI_CHECK(MPI_Bcast(&setup, sizeof(setup), MPI_BYTE, 0, MPI_COMM_WORLD));
  if (c->rank_ == 0) AVIARY_NCCL_CHECK(made, nullptr);
  if (setup.ok != 1) {
    return absl::InternalError(absl::StrCat("rank ", c->rank_, ": rank 0 could not make the NCCL id "
                                            "(ncclGetUniqueId failed there; its log says why)"));
  }
  AVIARY_NCCL_CHECK(ncclCommInitRank(&c->comm_, c->world_size_, setup.id, c->rank_), nullptr);
  c->stream_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, indexed.index()).stream();
  return c;
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ == nullptr || aborted_) return;
  // An error the waits did not see (a collective nobody waited for): abort, as destroy would
  // wait for it.
  ncclResult_t async = ncclSuccess;
  if (ncclCommGetAsyncError(comm_, &async) != ncclSuccess || async != ncclSuccess) {
    (void)Abort(absl::OkStatus());
    return;
  }
  const ncclResult_t rc = ncclCommDestroy(comm_);
  if (rc != ncclSuccess) {
    common::Logger("comm").Warn(absl::StrCat("rank ", rank_, ": ncclCommDestroy: ", ncclGetErrorString(rc)));
  }
}

absl::Status NcclCommunicator::Abort(absl::Status why) {
  if (!aborted_) {
    aborted_ = true;
    // ncclCommAbort may wait for the other ranks of this node to abort too (NCCL >= 2.16), and a
    // hung one never does: it runs on a thread of its own, waited for a while, so that the error
    // still reaches the caller (which ends the group) instead of hanging here.
    if (!why.ok()) common::Logger("comm").Error(absl::StrCat("rank ", rank_, ": aborting NCCL: ", why.message()));
    struct Outcome {
      std::mutex mu;
      std::condition_variable cv;
      bool done = false;
      ncclResult_t rc = ncclSuccess;
    };
    auto outcome = std::make_shared<Outcome>();
    std::thread([comm = comm_, outcome] {
      const ncclResult_t rc = ncclCommAbort(comm);
      std::lock_guard<std::mutex> lock(outcome->mu);
      outcome->rc = rc;
      outcome->done = true;
      outcome->cv.notify_all();
    }).detach();
    std::unique_lock<std::mutex> lock(outcome->mu);
    if (!outcome->cv.wait_for(lock, std::chrono::seconds(kAbortWaitS), [&] { return outcome->done; })) {
      common::Logger("comm").Warn(absl::StrCat("rank ", rank_, ": ncclCommAbort has not returned after ", kAbortWaitS,
                                               " s (another rank of this node has not aborted); going on without it"));
    } else if (outcome->rc != ncclSuccess) {
      common::Logger("comm").Warn(absl::StrCat("rank ", rank_, ": ncclCommAbort: ", ncclGetErrorString(outcome->rc)));
    }
  }
  return why;
}

absl::Status NcclCommunicator::AfterProducers() {
  cudaEvent_t produced = nullptr;
  AVIARY_CUDA_CHECK(cudaEventCreateWithFlags(&produced, cudaEventDisableTiming));
  cudaError_t rc = cudaEventRecord(produced, c10::cuda::getCurrentCUDAStream(device_.index()).stream());
  if (rc == cudaSuccess) rc = cudaStreamWaitEvent(stream_, produced, 0);
  // Destroying an event that is still pending is allowed: CUDA frees it when it completes.
  const cudaError_t destroyed = cudaEventDestroy(produced);
  AVIARY_CUDA_CHECK(rc);
  AVIARY_CUDA_CHECK(destroyed);
  return absl::OkStatus();
}

absl::Status NcclCommunicator::WaitEvent(cudaEvent_t event, int64_t seq, const std::string& what) {
  // After an abort the communicator is gone: a later wait (the reducer's other buckets, from
  // destructors) must neither query it nor wait out another timeout.
  if (aborted_) {
    return absl::AbortedError(absl::StrCat("rank ", rank_, ": collective #", seq, " (", what,
                                           ") not waited for: the NCCL communicator was aborted after an error"));
  }
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(timeout_s_));
  int spins = 0;
  while (true) {
    cudaError_t q = cudaEventQuery(event);
    if (q == cudaSuccess) return absl::OkStatus();
    if (q == cudaErrorNotReady) (void)cudaGetLastError();  // as in Poll
    if (q != cudaErrorNotReady) {
      return Abort(absl::InternalError(CudaErrorMessage("cudaEventQuery", q, __FILE__, __LINE__)));
    }
    ncclResult_t async = ncclSuccess;
    const ncclResult_t got = ncclCommGetAsyncError(comm_, &async);
    if (got != ncclSuccess) {
      return Abort(absl::InternalError(NcclErrorMessage("ncclCommGetAsyncError", got, comm_, __FILE__, __LINE__)));
    }
    if (async != ncclSuccess) {
      std::string msg = NcclErrorMessage(what.c_str(), async, comm_, __FILE__, __LINE__);
      return Abort(absl::InternalError(
          absl::StrCat("asynchronous NCCL error in collective #", seq, ": ", msg)));
    }
    if (Clock::now() > deadline) {
      return Abort(absl::DeadlineExceededError(absl::StrCat(
          "rank ", rank_, ": collective #", seq, " (", what,
          ") waited longer than ", TimeoutText(), "; NCCL cannot tell which ranks did not arrive (the communicator was aborted)")));
    }
    if (++spins > 64) std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// A collective this rank could not enqueue (its producers' event, NCCL's own check): the other
// ranks enqueued theirs, so this communicator is out of step with them from here on (the next
// collective would pair with their pending one): aborted, as after an error in flight.
#define AVIARY_NCCL_LAUNCH(call)                                                                            \
  do {                                                                                                      \
    ncclResult_t aviary_nccl_rc_ = (call);                                                                  \
    if (aviary_nccl_rc_ != ncclSuccess) {                                                                   \
      return Abort(absl::InternalError(NcclErrorMessage(#call, aviary_nccl_rc_, comm_, __FILE__, __LINE__))); \
    }                                                                                                       \
  } while (0)

absl::StatusOr<std::unique_ptr<Work>> NcclCommunicator::AllReduceAsync(at::Tensor tensor,
                                                                       ReduceOp op) {
  if (aborted_)
    return absl::AbortedError(absl::StrCat("rank ", rank_, ": NCCL communicator was aborted after an error"));
  auto type = NcclType(tensor.scalar_type());
  if (!type.ok()) return type.status();
  c10::cuda::CUDAGuard guard(device_.index());
  at::Tensor dev =
      tensor.device() == device_ && tensor.is_contiguous() ? tensor : tensor.to(device_).contiguous();
  const int64_t seq = ++seq_;
  auto work = std::make_unique<NcclWork>(this, tensor, dev, seq,
                                         absl::StrCat("all-reduce of ", tensor.numel()));
  if (absl::Status st = AfterProducers(); !st.ok()) return Abort(st);
  AVIARY_NCCL_LAUNCH(ncclAllReduce(dev.data_ptr(), dev.data_ptr(), dev.numel(), *type, NcclOp(op), comm_, stream()));
  // Enqueued: a failure to record its event leaves it in flight with nothing to wait for it.
  if (absl::Status recorded = work->Record(); !recorded.ok()) return Abort(recorded);
  return std::unique_ptr<Work>(std::move(work));
}

absl::Status NcclCommunicator::Broadcast(at::Tensor tensor, int root) {
  if (aborted_)
    return absl::AbortedError(absl::StrCat("rank ", rank_, ": NCCL communicator was aborted after an error"));
  auto type = NcclType(tensor.scalar_type());
  if (!type.ok()) return type.status();
  c10::cuda::CUDAGuard guard(device_.index());
  at::Tensor dev =
      tensor.device() == device_ && tensor.is_contiguous() ? tensor : tensor.to(device_).contiguous();
  const int64_t seq = ++seq_;
  NcclWork work(this, tensor, dev, seq,
                absl::StrCat("broadcast of ", tensor.numel(), " from rank ", root));
  if (absl::Status st = AfterProducers(); !st.ok()) return Abort(st);
  AVIARY_NCCL_LAUNCH(ncclBroadcast(dev.data_ptr(), dev.data_ptr(), dev.numel(), *type, root, comm_, stream()));
  if (absl::Status recorded = work.Record(); !recorded.ok()) return Abort(recorded);
  return work.Wait();
}

absl::StatusOr<at::Tensor> NcclCommunicator::AllGather(const at::Tensor& tensor) {
  if (aborted_)
    return absl::AbortedError(absl::StrCat("rank ", rank_, ": NCCL communicator was aborted after an error"));
  auto type = NcclType(tensor.scalar_type());
  if (!type.ok()) return type.status();
  c10::cuda::CUDAGuard guard(device_.index());
  at::Tensor dev = tensor.to(device_).contiguous();
  std::vector<int64_t> shape = tensor.sizes().vec();
  if (shape.empty()) shape.push_back(1);
  shape[0] *= world_size_;
  at::Tensor out = at::empty(shape, dev.options());
  const int64_t seq = ++seq_;
  NcclWork work(this, out, out, seq, absl::StrCat("all-gather of ", tensor.numel()));
  if (absl::Status st = AfterProducers(); !st.ok()) return Abort(st);
  AVIARY_NCCL_LAUNCH(ncclAllGather(dev.data_ptr(), out.data_ptr(), dev.numel(), *type, comm_, stream()));
  if (absl::Status recorded = work.Record(); !recorded.ok()) return Abort(recorded);
  AVIARY_RETURN_IF_ERROR(work.Wait());
  return out.to(tensor.device());
}

absl::Status NcclCommunicator::Barrier() {
  at::Tensor one = at::ones({1}, at::TensorOptions().device(device_));
  return AllReduce(one);
}

}  // namespace aviary::worker::comm

#endif  // AVIARY_WITH_NCCL_BACKEND
