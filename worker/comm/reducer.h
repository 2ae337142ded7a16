// Bucketed gradient all-reduce for data-parallel training (c10d's Reducer, reduced to what a
// replica here needs).
//
// Buckets: parameters in reverse registration order (roughly the order backward produces their
// gradients), cut at `bucket_bytes` (comm.bucket_mb) and at every change of dtype or device; the
// first bucket is capped at `first_bucket_bytes` (1 MB by default) so that communication starts
// early in backward.
//
// Overlap: a hook on each parameter's AccumulateGrad node (as c10d's; autograd calls it once per
// backward, after it has set the parameter's .grad to the whole gradient) marks the parameter
// ready; when all of a bucket's parameters are, their gradients are copied into the bucket's
// flat buffer in one batch (at::_foreach_copy_ on torch 2.x: a few kernels a bucket rather than
// one per parameter) and the bucket is launched as an asynchronous all-reduce while backward
// goes on. Buckets launch strictly in bucket order (a bucket that is ready early waits for the
// ones before it), so every rank issues the same collectives in the same order whatever the
// order its hooks fire in. Each hook also polls the buckets in flight, which drives MPI's
// progress engine.
//
// Finish(), after backward and before optimizer.step(): launches the buckets whose parameters
// received no gradient (zeros), waits for every bucket (comm.timeout_s applies), divides by the
// world size and makes each parameter's .grad a tensor over its part of the bucket (in the
// parameter's strides when the parameter is dense; as c10d's gradient_as_bucket_view hands them
// out, without its memory saving), replacing what was there: nothing is copied back. Prepare()
// drops every .grad, so there is no gradient accumulation across backward calls. The next
// backward writes into the buckets' memory, so a .grad kept past the next Prepare() must be
// cloned (TrainStep's accumulation clones).
//
// The hooks are tied to the parameters' AccumulateGrad nodes as they are when the reducer is
// made: moving a parameter to another dtype or device afterwards (set_data) makes Finish fail
// by name rather than reduce zeros. Destruction removes the hooks.
//
// Thread safety: Prepare/Finish on the training thread; the hooks run on autograd's thread
// while the training thread is blocked in backward(). One Reducer per model.
#ifndef AVIARY_WORKER_COMM_REDUCER_H_
#define AVIARY_WORKER_COMM_REDUCER_H_

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/comm/communicator.h"

namespace torch::autograd {
struct Node;
}  // namespace torch::autograd

namespace aviary::worker::comm {

struct ReducerOptions {
  int64_t bucket_bytes = 25 << 20;
  int64_t first_bucket_bytes = 1 << 20;
};

// The bucket plan: parameter indices per bucket, in launch order. Exposed for tests.
std::vector<std::vector<size_t>> PlanBuckets(const std::vector<at::Tensor>& params,
                                             const ReducerOptions& options);

// Rank 0's buffers (BatchNorm running statistics and the like), and its parameters when
// `parameters`, copied into `module` on every rank. Collective; the modules must have the same
// structure on every rank.
absl::Status BroadcastModuleState(Communicator& comm, torch::nn::Module& module, bool parameters);

class Reducer {
 public:
  // `params`: the model's trainable parameters, identical in shape and order on every rank.
  // `comm` must outlive the reducer.
  static absl::StatusOr<std::unique_ptr<Reducer>> Create(std::vector<at::Tensor> params,
                                                         Communicator* comm,
                                                         ReducerOptions options);
  ~Reducer();
  Reducer(const Reducer&) = delete;
  Reducer& operator=(const Reducer&) = delete;

  // Arms the hooks for the next backward().
  void Prepare();
  // Completes the all-reduce (see the file comment). On error the group must end.
  absl::Status Finish();

  const std::vector<std::vector<size_t>>& buckets() const { return plan_; }
  // Buckets launched from inside backward (before Finish) in the last step: overlap evidence.
  int launched_during_backward() const { return launched_in_backward_; }
  // Seconds spent in Finish() (communication not hidden behind backward, plus averaging; on a
  // GPU counted from the end of backward's kernels) and in the hooks' bucket copies, since the
  // last ResetTimers().
  double finish_seconds() const { return finish_seconds_; }
  double hook_seconds() const { return hook_seconds_; }
  void ResetTimers() { finish_seconds_ = hook_seconds_ = 0; }

 private:
  struct Bucket;
  class AccumulatedHook;
  Reducer(std::vector<at::Tensor> params, Communicator* comm, ReducerOptions options);
  absl::Status Build();
  void OnGrad(size_t param);
  // Copies the bucket's gradients (.grad of the ready parameters; zeros for the others) into it.
  void Fill(Bucket& b);
  void LaunchReady();

  std::vector<at::Tensor> params_;
  Communicator* comm_;
  ReducerOptions options_;
  std::vector<std::vector<size_t>> plan_;
  std::vector<std::unique_ptr<Bucket>> buckets_;
  std::vector<size_t> bucket_of_;   // param -> bucket
  std::vector<int64_t> offset_of_;  // param -> element offset in its bucket
  std::vector<at::Tensor> grad_of_;  // param -> its gradient, in its bucket's memory
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;  // param -> its AccumulateGrad (hooked)
  std::vector<uintptr_t> hook_keys_;                                  // param -> its hook's key there
  size_t next_launch_ = 0;
  bool armed_ = false;
  int launched_in_backward_ = 0;
  double finish_seconds_ = 0;
  double hook_seconds_ = 0;
  absl::Status error_;
};

}  // namespace aviary::worker::comm

#endif  // AVIARY_WORKER_COMM_REDUCER_H_
