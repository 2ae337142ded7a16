// The NCCL backend of Communicator (see communicator.h for the collective contract). Built only
// when NCCL is found and libtorch has CUDA (AVIARY_WITH_NCCL_BACKEND); the CPU build has no
// CUDA code.
//
// One ncclComm_t per worker group, created from an ncclUniqueId that rank 0 draws and broadcasts
// over MPI; one GPU per rank (NCCL refuses two ranks on one GPU: use the MPI backend there).
// Collectives run on the communicator's own stream (high priority, as c10d's), so that the
// reducer's all-reduce of a bucket runs while backward goes on in the training stream: each
// collective first makes its stream wait for what the current stream has queued (the kernels
// that produced the tensor), and its consumers run after Wait(), which returns once the
// collective is done. CPU tensors are copied to the device and back. Wait() polls a CUDA event and ncclCommGetAsyncError() with the comm.timeout_s
// deadline: an asynchronous NCCL error or a timeout aborts the communicator (ncclCommAbort) and
// is returned with the call, file:line, rank and NCCL's message; the caller then ends the group.
// NCCL cannot tell which ranks are missing: the timeout message says so (the MPI backend can).
//
// Thread safety: none (see communicator.h). The ncclComm_t is owned (destroyed, or aborted
// after an error) by this object.
#ifndef AVIARY_WORKER_COMM_NCCL_COMMUNICATOR_H_
#define AVIARY_WORKER_COMM_NCCL_COMMUNICATOR_H_

#ifdef AVIARY_WITH_NCCL_BACKEND

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <memory>
#include <string>

#include "worker/comm/communicator.h"

namespace aviary::worker::comm {

std::string NcclErrorMessage(const char* call, ncclResult_t code, ncclComm_t comm, const char* file,
                             int line);
std::string CudaErrorMessage(const char* call, cudaError_t code, const char* file, int line);

class NcclCommunicator final : public Communicator {
 public:
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> Create(const MpiSession& session,
                                                                  const at::Device& device,
                                                                  double timeout_s);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string backend() const override { return "nccl"; }
  absl::StatusOr<std::unique_ptr<Work>> AllReduceAsync(at::Tensor tensor, ReduceOp op) override;
  absl::Status Broadcast(at::Tensor tensor, int root) override;
  absl::StatusOr<at::Tensor> AllGather(const at::Tensor& tensor) override;
  absl::Status Barrier() override;
  void Discard() override { (void)Abort(absl::OkStatus()); }

  // Waits for `event` (recorded after collective `seq`) with the deadline; aborts on error.
  absl::Status WaitEvent(cudaEvent_t event, int64_t seq, const std::string& what);
  ncclComm_t comm() const { return comm_; }
  // The collectives' stream.
  cudaStream_t stream() const { return stream_; }

 private:
  NcclCommunicator(int rank, int world_size, at::Device device, double timeout_s)
      : rank_(rank), world_size_(world_size), device_(device) {
    timeout_s_ = timeout_s;
  }

  int rank_;
  int world_size_;
  at::Device device_;
  // The collectives' stream waits for the work queued so far on the current stream.
  absl::Status AfterProducers();
  // Aborts the communicator (once) and returns `why`: after an error a collective may be in
  // flight, which ncclCommDestroy would wait for without end (a peer gone); later waits return
  // at once.
  absl::Status Abort(absl::Status why);

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;  // torch's pool owns it
  bool aborted_ = false;
  int64_t seq_ = 0;
};

}  // namespace aviary::worker::comm

#define AVIARY_NCCL_CHECK(call, nccl_comm)                                 \
  do {                                                                     \
    ncclResult_t aviary_nccl_rc_ = (call);                                 \
    if (aviary_nccl_rc_ != ncclSuccess) {                                  \
      return absl::InternalError(::aviary::worker::comm::NcclErrorMessage( \
          #call, aviary_nccl_rc_, nccl_comm, __FILE__, __LINE__));         \
    }                                                                      \
  } while (0)

#define AVIARY_CUDA_CHECK(call)                                                                  \
  do {                                                                                           \
    cudaError_t aviary_cuda_rc_ = (call);                                                        \
    if (aviary_cuda_rc_ != cudaSuccess) {                                                        \
      return absl::InternalError(                                                                \
          ::aviary::worker::comm::CudaErrorMessage(#call, aviary_cuda_rc_, __FILE__, __LINE__)); \
    }                                                                                            \
  } while (0)

#endif  // AVIARY_WITH_NCCL_BACKEND
#endif  // AVIARY_WORKER_COMM_NCCL_COMMUNICATOR_H_
