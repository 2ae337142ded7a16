// The MPI backend of Communicator (see communicator.h for the collective contract).
//
// Tensors travel as contiguous host buffers: CPU float32/float64/int32/int64 tensors directly;
// bf16/fp16 are staged as float32 (summed in float32, rounded once on the way back); CUDA
// tensors are staged through pinned host memory. Collectives are nonblocking MPI calls on a
// duplicate of MPI_COMM_WORLD, completed by polling MPI_Test with a deadline (comm.timeout_s).
//
// Arrival reports: while a rank polls, it answers "which collective are you in?" queries on a
// second duplicate communicator. A rank whose collective times out asks every other rank; the
// ranks that answer with an earlier collective, or do not answer (busy outside the group's
// collectives: hung, computing, or dead), are named in the DEADLINE_EXCEEDED status.
//
// Thread safety: none (see communicator.h). Move-less; owned through unique_ptr.
#ifndef AVIARY_WORKER_COMM_MPI_COMMUNICATOR_H_
#define AVIARY_WORKER_COMM_MPI_COMMUNICATOR_H_

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>

#include "worker/comm/communicator.h"

namespace aviary::worker::comm {

class MpiCommunicator final : public Communicator {
 public:
  // Collective over MPI_COMM_WORLD (duplicates it twice). timeout_s > 0.
  static absl::StatusOr<std::unique_ptr<MpiCommunicator>> Create(double timeout_s);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string backend() const override { return "mpi"; }
  absl::StatusOr<std::unique_ptr<Work>> AllReduceAsync(at::Tensor tensor, ReduceOp op) override;
  absl::Status Broadcast(at::Tensor tensor, int root) override;
  absl::StatusOr<at::Tensor> AllGather(const at::Tensor& tensor) override;
  absl::Status Barrier() override;

  // Completes `request` (collective number `seq`, described by `what`) or times out. Used by
  // this backend's Work objects.
  absl::Status WaitRequest(MPI_Request* request, int64_t seq, const std::string& what);
  // One MPI_Test of `request`, answering pending arrival queries.
  absl::StatusOr<bool> TestRequest(MPI_Request* request);

 private:
  MpiCommunicator() = default;
  void AnswerQueries();
  std::string NotArrived(int64_t seq);
  // ABORTED for collective `seq` (`what`) once an earlier one failed: a group whose collective
  // timed out or failed is ending, and waiting on its other collectives (the reducer's later
  // buckets, from destructors) would cost comm.timeout_s each before the error reaches the
  // coordinator.
  absl::Status Broken(int64_t seq, const std::string& what) const;

  MPI_Comm comm_ = MPI_COMM_NULL;  // the collectives
  MPI_Comm ctl_ = MPI_COMM_NULL;   // arrival queries and answers
  int rank_ = 0;
  int world_size_ = 1;
  int64_t seq_ = 0;  // collectives started so far on this rank
  absl::Status failed_;  // the first collective that failed or timed out
};

}  // namespace aviary::worker::comm

#endif  // AVIARY_WORKER_COMM_MPI_COMMUNICATOR_H_
