// The model step (forward under autocast, the loss, backward) captured once into a CUDA graph and
// replayed every step: one graph launch instead of a few thousand kernel launches from the CPU
// (issue 12). The trainer uses it in one-rank groups on CUDA with train.cuda_graph (the first
// GPU acceptance run, docs/BENCHMARKS.md, found the graphed step's gradients, losses and weights
// identical to the eager step's, and the step 1.11x faster); bench/train_step_bench.cc times it.
//
//   Capture:  `warmup` forward + backward passes on a side stream (cuDNN/cuBLAS lazy state,
//             cuDNN's benchmark choice, autograd's gradient accumulators) that leave no trace:
//             no optimizer step, and the model's buffers (BatchNorm's running statistics)
//             restored afterwards. Then the gradients set to none and forward + loss + backward
//             captured on that stream from static input buffers, with autocast's weight cache
//             off (torch's rule for graphs), in cudaStreamCaptureModeThreadLocal (the loader's
//             threads may pin memory meanwhile). Nothing runs during the capture: the batch it
//             was given is computed by the first Replay().
//   Replay:   the batch copied into the static buffers, the device generator seeded as
//             TrainStep::ForwardFeatures seeds it (dropout and stochastic depth draw the same
//             numbers as the eager step: torch's graph-safe Philox), the graph launched on the
//             current stream. The parameters' .grad are then this batch's gradients, in memory
//             that belongs to the graph (re-attached first if an eager step in between dropped
//             them: ZeroGrad() sets them to none).
//   Update:   the caller's, outside the graph: read the loss, clip (ClipGradNorm) and
//             AdamOptimizer::Step().
//
// Not supported (FAILED_PRECONDITION at Capture): a CPU device or a build without CUDA torch,
// train.grad_accum_steps > 1, a gradient all-reduce (the reducer's hooks synchronize with the
// host during backward; a graphed multi-rank step would all-reduce after the replay).
//
// Not thread-safe; one per model replica. The static inputs, the loss, the logits and the
// gradients are the graph's: valid until the next Replay().
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

  // Warms up and captures (see the file comment). The model's weights and buffers and the
  // optimizer's state are left as they were; .grad becomes the graph's (meaningless until the
  // first Replay()). `features` [B, C, n_mels, frames] and `targets` [B, num_classes] are on the
  // CUDA device with the shapes and layout every replay will have. INTERNAL, with torch's
  // message, when the capture fails.
  static absl::StatusOr<std::unique_ptr<GraphedModelStep>> Capture(
      const common::TrainConfig& train, TrainStep* step, AdamOptimizer* optimizer,
      const at::Tensor& features, const at::Tensor& targets, int warmup);

  virtual ~GraphedModelStep() = default;

  // One replay on this batch (same shapes as at capture; copied unless they are the static
  // buffers themselves). The loss is the graph's float32 scalar, overwritten by the next replay.
  // INTERNAL, with torch's message, when the copy or the launch fails.
  virtual absl::StatusOr<at::Tensor> Replay(const at::Tensor& features, const at::Tensor& targets,
                                            uint64_t dropout_seed) = 0;

  // The logits [B, num_classes] of the last replay (the autocast dtype).
  virtual const at::Tensor& logits() const = 0;

  // The static input buffers (a caller may write its batch into them and pass them back).
  virtual const at::Tensor& static_features() const = 0;
  virtual const at::Tensor& static_targets() const = 0;
};

// The major version of CUDA device `index`'s compute capability (8 from Ampere on; -1: the
// current device), or -1 in a build against a torch without CUDA. (Here: this file is the
// worker's one translation unit built with CUDA torch's headers.)
int CudaComputeMajor(int index);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_CUDA_GRAPH_STEP_H_
