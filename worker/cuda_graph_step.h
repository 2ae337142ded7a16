// The model step (forward under autocast, the loss, backward) captured once into a CUDA graph and
// replayed every step: one graph launch instead of a few thousand kernel launches from the CPU
// (issue 12). Experimental: only bench/train_step_bench.cc (--cuda-graph) uses it, and it has
// not yet run on a GPU (the GPU acceptance script times it and checks it against the eager step).
//
//   Capture:  `warmup` eager steps on a side stream (cuDNN/cuBLAS lazy state, autograd's
//             gradient accumulators; each one an optimizer step, as in training), then the
//             gradients set to none and forward + loss + backward captured on that stream from
//             static input buffers, with autocast's weight cache off (torch's rule for graphs).
//   Replay:   the batch copied into the static buffers, the device generator seeded as
//             TrainStep::ForwardFeatures seeds it (dropout and stochastic depth draw the same
//             numbers as the eager step: torch's graph-safe Philox), the graph launched on the
//             current stream. The parameters' .grad are then this batch's gradients, in memory
//             that belongs to the graph.
//   Update:   the caller's, outside the graph: read the loss, clip (ClipGradNorm) and
//             AdamOptimizer::Step(). Never ZeroGrad() a graphed model: the graph writes the same
//             gradient tensors on every replay, and a parameter whose .grad was dropped would
//             no longer see them.
//
// Not supported (FAILED_PRECONDITION at Capture): a CPU device or a build without CUDA torch,
// train.grad_accum_steps > 1, a gradient all-reduce (the reducer's hooks synchronize with the
// host during backward; a graphed multi-rank step would all-reduce after the replay).
//
// Capture uses torch's default mode (cudaStreamCaptureModeGlobal): no other thread may make an
// unsafe CUDA call meanwhile. A trainer whose loader threads pin memory would capture with
// cudaStreamCaptureModeThreadLocal.
//
// Not thread-safe; one per model replica. The static inputs, the loss and the gradients are
// the graph's: valid until the next Replay().
#ifndef AVIARY_WORKER_CUDA_GRAPH_STEP_H_
#define AVIARY_WORKER_CUDA_GRAPH_STEP_H_

#include <cstdint>
#include <memory>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "worker/train_step.h"

namespace aviary::worker {

class GraphedModelStep {
 public:
  // True when aviary was built against a CUDA torch (the graph code is compiled in).
  static bool Built();

  // Warms up and captures (see the file comment). `features` [B, C, n_mels, frames] and
  // `targets` [B, num_classes] are on the CUDA device with the shapes and layout every replay
  // will have. INTERNAL, with torch's message, when the capture fails.
  static absl::StatusOr<std::unique_ptr<GraphedModelStep>> Capture(
      const common::TrainConfig& train, TrainStep* step, AdamOptimizer* optimizer,
      const at::Tensor& features, const at::Tensor& targets, int warmup);

  virtual ~GraphedModelStep() = default;

  // One replay on this batch (same shapes as at capture; copied unless they are the static
  // buffers themselves). The loss is the graph's float32 scalar, overwritten by the next replay.
  // INTERNAL, with torch's message, when the copy or the launch fails.
  virtual absl::StatusOr<at::Tensor> Replay(const at::Tensor& features, const at::Tensor& targets,
                                            uint64_t dropout_seed) = 0;

  // The static input buffers (a caller may write its batch into them and pass them back).
  virtual const at::Tensor& static_features() const = 0;
  virtual const at::Tensor& static_targets() const = 0;
};

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_CUDA_GRAPH_STEP_H_
