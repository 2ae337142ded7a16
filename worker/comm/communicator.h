// The collective interface of a worker group, on at::Tensor, with two backends:
//   - MPI (always built): CPU tensors directly; GPU tensors staged through pinned host memory.
//     For hosts where NCCL cannot be used, e.g. several ranks on one GPU (NCCL refuses them:
//     "Duplicate GPU detected").
//   - NCCL (built when NCCL is found and torch has CUDA, AVIARY_WITH_NCCL_BACKEND): one
//     communicator per group, the ncclUniqueId broadcast over MPI, on a stream of its own
//     that waits for the training stream's producers (so that all-reduce overlaps backward).
//
// Collective contract: every rank calls the same collectives, in the same order, with tensors
// of the same dtype and element count (AllGather: the same shape). Tensors are reduced in
// place. A collective that is not complete after `timeout_s` returns DEADLINE_EXCEEDED naming
// the ranks that did not arrive (the caller then ends the group: see MpiSession::Abort).
//
// Thread safety: none; calls must be serialized (the reducer calls from autograd's hook
// thread while the main thread waits in backward()).
#ifndef AVIARY_WORKER_COMM_COMMUNICATOR_H_
#define AVIARY_WORKER_COMM_COMMUNICATOR_H_

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/config.h"

namespace aviary::worker::comm {

class MpiSession;

enum class ReduceOp { kSum, kMax, kMin };

// One collective in flight. Wait() completes it (or times out); Poll() advances it without
// blocking and says whether it is complete. Destroying a Work that was not waited for waits
// for it (errors are logged).
class Work {
 public:
  virtual ~Work() = default;
  virtual bool Poll() = 0;
  virtual absl::Status Wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string backend() const = 0;

  // Starts an in-place all-reduce of `tensor` (contiguous; float32, float64, bf16, fp16,
  // int32 or int64). The tensor must stay alive and untouched until the Work completes.
  virtual absl::StatusOr<std::unique_ptr<Work>> AllReduceAsync(at::Tensor tensor,
                                                               ReduceOp op = ReduceOp::kSum) = 0;
  // Blocking forms.
  absl::Status AllReduce(at::Tensor tensor, ReduceOp op = ReduceOp::kSum);
  // `tensor` (contiguous) takes root's values on every rank.
  virtual absl::Status Broadcast(at::Tensor tensor, int root) = 0;
  // Concatenation along dim 0 of every rank's `tensor` (same shape on all ranks), rank order.
  virtual absl::StatusOr<at::Tensor> AllGather(const at::Tensor& tensor) = 0;
  virtual absl::Status Barrier() = 0;

  // Gives the communicator up after an error that the other ranks may not share (they may wait
  // in a collective still): NCCL's is aborted (ncclCommDestroy waits for the peers' collectives,
  // for ever when they wait for this rank); MPI's needs nothing. Later collectives fail at once.
  virtual void Discard() {}

  // The collectives' deadline (comm.timeout_s).
  double timeout_s() const { return timeout_s_; }

  // Raises the deadline to at least `seconds` for its scope, `why` naming it in timeout errors:
  // for collectives that wait on one rank's slow work rather than a hang (the other ranks wait
  // for rank 0's checkpoint writes and fsyncs, which a loaded shared filesystem can stretch past
  // comm.timeout_s: their timeout then aborted rank 0 in the middle of its writes).
  class LongerTimeout {
   public:
    LongerTimeout(Communicator* comm, double seconds, std::string why) : comm_(comm) {
      if (comm_ == nullptr || seconds <= comm_->timeout_s_) {
        comm_ = nullptr;
        return;
      }
      before_ = comm_->timeout_s_;
      before_why_ = std::move(comm_->timeout_why_);
      comm_->timeout_s_ = seconds;
      comm_->timeout_why_ = std::move(why);
    }
    ~LongerTimeout() {
      if (comm_ == nullptr) return;
      comm_->timeout_s_ = before_;
      comm_->timeout_why_ = std::move(before_why_);
    }
    LongerTimeout(const LongerTimeout&) = delete;
    LongerTimeout& operator=(const LongerTimeout&) = delete;

   private:
    Communicator* comm_;
    double before_ = 0;
    std::string before_why_;
  };

 protected:
  // How timeout errors name the deadline: "comm.timeout_s = 300 s", or the raised one's.
  std::string TimeoutText() const;

  double timeout_s_ = 300.0;
  std::string timeout_why_;  // "" : comm.timeout_s
};

// Builds the communicator config.comm.backend asks for: "mpi", "nccl", or "auto" (NCCL when
// built, `device` is CUDA and every local rank has its own GPU; MPI otherwise). "nccl" in a
// build without the NCCL backend, or on a CPU device, is FAILED_PRECONDITION naming why.
absl::StatusOr<std::unique_ptr<Communicator>> CreateCommunicator(const common::CommConfig& config,
                                                                 const MpiSession& session,
                                                                 const at::Device& device);

// Concatenation along dim 0 of every rank's `rows` in rank order, where the number of rows may
// differ between ranks (the other dimensions and the dtype may not). Collective.
absl::StatusOr<at::Tensor> AllGatherRows(Communicator& comm, const at::Tensor& rows);

// What rank 0 alone did (its writes of the run folder), on every rank: the code of rank 0's
// `mine` (the others pass OK) and whether it was a write refused because the coordinator took
// the task's lease away (common::IsLeaseRevoked: a cancel, not a failure). Collective.
struct RootOutcome {
  absl::StatusCode code = absl::StatusCode::kOk;
  bool lease_revoked = false;
};
absl::StatusOr<RootOutcome> ShareRootOutcome(Communicator& comm, const absl::Status& mine);

// True when this build has the NCCL backend.
bool NcclBackendBuilt();

}  // namespace aviary::worker::comm

#endif  // AVIARY_WORKER_COMM_COMMUNICATOR_H_
