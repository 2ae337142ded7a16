#include "worker/cuda_graph_step.h"
#include "worker/device_copy.h"

#include <exception>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

#if defined(AVIARY_WITH_CUDA_TORCH)
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace aviary::worker {
namespace {

absl::Status CheckSupported(const common::TrainConfig& train, const TrainStep& step,
                            const at::Tensor& features, const at::Tensor& targets) {
  if (step.reducer() != nullptr) {
    return absl::FailedPreconditionError(
        "CUDA graphs: a step with a gradient all-reduce (more than one rank) is not supported; its "
        "hooks wait on the collectives during backward");
  }
  if (train.grad_accum_steps != 1) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA graphs capture one micro-batch per step: train.grad_accum_steps is ",
                                                      train.grad_accum_steps, ", not 1"));
  }
  if (!GraphedModelStep::Built()) {
    return absl::FailedPreconditionError(
        "CUDA graphs: this aviary was built against a torch without CUDA (build with "
        "AVIARY_WITH_CUDA=ON against a CUDA libtorch; docs/DEPLOY.md)");
  }
  if (!features.is_cuda() || !targets.is_cuda()) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA graphs need the inputs on a CUDA device (features on ",
                                                      features.device().str(), ", targets on ",
                                                      targets.device().str(), ")"));
  }
  return absl::OkStatus();
}

}  // namespace

#if defined(AVIARY_WITH_CUDA_TORCH)
namespace {

// torch's error (c10::Error, CUDA's included) or another exception, naming the stage.
absl::Status TorchError(const char* stage, const std::exception& e) {
  const auto* torch_error = dynamic_cast<const c10::Error*>(&e);
  return absl::InternalError(
      absl::StrCat("CUDA graph ", stage, ": ", torch_error != nullptr ? torch_error->what_without_backtrace() : e.what()));
}

absl::Status SameShape(const char* name, const at::Tensor& given, const at::Tensor& captured) {
  if (given.sizes() == captured.sizes()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("CUDA graph replay: ", name, " have shape ", c10::str(given.sizes()),
                                                 ", the graph was captured for ", c10::str(captured.sizes())));
}

// `waiter` waits for the work queued on `on` so far.
void Order(const c10::cuda::CUDAStream& on, const c10::cuda::CUDAStream& waiter) {
  at::cuda::CUDAEvent event;
  event.record(on);
  event.block(waiter);
}

class CudaGraphModelStep final : public GraphedModelStep {
 public:
  CudaGraphModelStep(at::Tensor features, at::Tensor targets)
      : features_(std::move(features)), targets_(std::move(targets)) {}

  // Warms up on a side stream and captures there (the legacy default stream cannot capture).
  absl::Status WarmUpAndCapture(TrainStep* step, AdamOptimizer* optimizer, int warmup) {
    const c10::DeviceIndex index = features_.device().index();
    c10::cuda::CUDAGuard device_guard(index);
    const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream(index);
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index);
    Order(main, side);
    absl::Status status;
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      try {
        // The warm-up leaves no trace: no optimizer step, the buffers (BatchNorm's running
        // statistics and batch counts) put back as they were.
        std::vector<at::Tensor> buffers = step->model()->buffers();
        std::vector<at::Tensor> saved;
        saved.reserve(buffers.size());
        for (const at::Tensor& b : buffers) saved.push_back(b.detach().clone());
        for (int i = 0; i < warmup; ++i) {
          optimizer->ZeroGrad();
          step->ModelForward(features_, targets_).loss.backward();
        }
        {
          at::NoGradGuard no_grad;
          for (size_t i = 0; i < buffers.size(); ++i) buffers[i].detach().copy_(saved[i]);
        }
        optimizer->ZeroGrad();  // backward in the capture allocates the gradients the graph owns
        // The warm-up's memory back to the device, as torch.cuda.graph does before a capture:
        // the capture allocates from a private pool that cannot reuse blocks cached for the
        // side stream, and the allocator does not free cached blocks while a capture is under
        // way, so a batch using over half the free memory ran out of it at capture.
        side.synchronize();
        c10::cuda::CUDACachingAllocator::emptyCache();
      } catch (const std::exception& e) {
        status = TorchError("warm-up", e);
      }
      if (status.ok()) status = Capture(step);
    }
    Order(side, main);
    return status;
  }

  absl::StatusOr<at::Tensor> Replay(const at::Tensor& features, const at::Tensor& targets,
                                    uint64_t dropout_seed) override {
    if (absl::Status st = SameShape("features", features, features_); !st.ok()) return st;
    if (absl::Status st = SameShape("targets", targets, targets_); !st.ok()) return st;
    try {
      if (!features.is_same(features_)) features_.copy_(features, /*non_blocking=*/true);
      if (!targets.is_same(targets_)) targets_.copy_(targets, /*non_blocking=*/true);
      // An eager step in between (ZeroGrad()) may have dropped the graph's gradients.
      for (auto& [param, grad] : grads_) {
        if (!param.grad().is_same(grad)) param.mutable_grad() = grad;
      }
      // As TrainStep::ForwardFeatures: replay reads the generator's seed and offset.
      at::manual_seed(dropout_seed);
      graph_.replay();
    } catch (const std::exception& e) {
      return TorchError("replay", e);
    }
    return loss_;
  }

  const at::Tensor& logits() const override { return logits_; }
  const at::Tensor& static_features() const override { return features_; }
  const at::Tensor& static_targets() const override { return targets_; }

 private:
  absl::Status Capture(TrainStep* step) {
    const bool cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    absl::Status status;
    bool capturing = false;
    try {
      // Thread-local: another thread's CUDA calls (the loader pinning memory) do not end it.
      graph_.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      capturing = true;
      StepForward out = step->ModelForward(features_, targets_);
      out.loss.backward();
      capturing = false;
      graph_.capture_end();
      // Detached: the same memory, without the captured autograd graph (its accumulators would
      // pin an eager step's gradient accumulation to the capture's side stream).
      loss_ = out.loss.detach();
      logits_ = out.logits.detach();
      for (const at::Tensor& p : step->model()->parameters()) {
        if (p.grad().defined()) grads_.emplace_back(p, p.grad());
      }
    } catch (const std::exception& e) {
      status = TorchError("capture", e);
      if (capturing) {
        try {
          graph_.capture_end();  // ends the stream's capture; the graph is not used
        } catch (const std::exception&) {
        }
      }
    }
    at::autocast::set_autocast_cache_enabled(cache);
    return status;
  }

  at::Tensor features_;
  at::Tensor targets_;
  at::Tensor loss_;
  at::Tensor logits_;
  std::vector<std::pair<at::Tensor, at::Tensor>> grads_;  // (parameter, the graph's .grad)
  at::cuda::CUDAGraph graph_;
};

}  // namespace

bool GraphedModelStep::Built() { return true; }

int CudaComputeMajor(int index) {
  try {
    return at::cuda::getDeviceProperties(index < 0 ? at::cuda::current_device() : static_cast<c10::DeviceIndex>(index))->major;
  } catch (const std::exception&) {
    return -1;
  }
}

struct DeviceCopier::Stream {
  c10::cuda::CUDAStream stream;
};
struct DeviceCopier::Event {
  at::cuda::CUDAEvent event;
};

DeviceCopier::DeviceCopier(c10::Device device) : device_(device) {
  if (!device_.is_cuda()) return;
  // From the high-priority pool: never the stream a CUDA graph is captured on (the low-priority
  // pool's).
  stream_ = std::make_unique<Stream>(
      Stream{c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device_.index())});
}

DeviceCopier::~DeviceCopier() = default;

DeviceCopier::InFlight DeviceCopier::Start(const at::Tensor& host) {
  // A tensor already on a device is not copied: the copy stream would read it without waiting
  // for the stream that wrote it.
  if (stream_ == nullptr || !host.is_cpu()) return InFlight{host, nullptr};
  // From pageable memory the "non-blocking" copy blocks this thread for the whole copy (the
  // driver stages it): the loaders pin on CUDA, so this would be a new caller's mistake.
  if (!host.is_pinned()) {
    TORCH_WARN_ONCE("DeviceCopier: a host batch of ", host.nbytes(),
                    " bytes is not pinned; its copy blocks the host (pin it in the loader)");
  }
  c10::cuda::CUDAGuard device_guard(device_.index());
  InFlight out;
  {
    // The destination comes from the copy stream's pool; the copy reads the host tensor, which
    // the loader finished writing before handing it over (nothing on the device to wait for).
    c10::cuda::CUDAStreamGuard stream_guard(stream_->stream);
    out.tensor = host.to(device_, /*non_blocking=*/true);
    out.event = std::make_shared<Event>();
    out.event->event.record(stream_->stream);
  }
  return out;
}

at::Tensor DeviceCopier::Take(InFlight in_flight) {
  if (in_flight.event == nullptr) return std::move(in_flight.tensor);
  c10::cuda::CUDAGuard device_guard(device_.index());
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device_.index());
  in_flight.event->event.block(current);
  // Allocated on the copy stream, used on this one: its memory is not reused until this
  // stream's work queued so far (and from now on, until it is freed) is done.
  in_flight.tensor.record_stream(current);
  return std::move(in_flight.tensor);
}

std::shared_ptr<DeviceCopier::Event> DeviceCopier::Mark() {
  if (stream_ == nullptr) return nullptr;
  c10::cuda::CUDAGuard device_guard(device_.index());
  auto mark = std::make_shared<Event>();
  mark->event.record(c10::cuda::getCurrentCUDAStream(device_.index()));
  return mark;
}

void DeviceCopier::Await(const std::shared_ptr<Event>& mark) {
  if (mark != nullptr) mark->event.synchronize();
}

absl::StatusOr<std::unique_ptr<GraphedModelStep>> GraphedModelStep::Capture(
    const common::TrainConfig& train, TrainStep* step, AdamOptimizer* optimizer,
    const at::Tensor& features, const at::Tensor& targets, int warmup) {
  if (absl::Status st = CheckSupported(train, *step, features, targets); !st.ok()) return st;
  auto graphed = std::make_unique<CudaGraphModelStep>(features.clone(), targets.clone());
  if (absl::Status st = graphed->WarmUpAndCapture(step, optimizer, warmup); !st.ok()) return st;
  return graphed;
}

#else  // a torch without CUDA: CheckSupported refuses

bool GraphedModelStep::Built() { return false; }

int CudaComputeMajor(int /*index*/) { return -1; }

struct DeviceCopier::Stream {};
struct DeviceCopier::Event {};

DeviceCopier::DeviceCopier(c10::Device device) : device_(device) {}
DeviceCopier::~DeviceCopier() = default;
DeviceCopier::InFlight DeviceCopier::Start(const at::Tensor& host) { return InFlight{host, nullptr}; }
at::Tensor DeviceCopier::Take(InFlight in_flight) { return std::move(in_flight.tensor); }
std::shared_ptr<DeviceCopier::Event> DeviceCopier::Mark() { return nullptr; }
void DeviceCopier::Await(const std::shared_ptr<Event>& /*mark*/) {}

absl::StatusOr<std::unique_ptr<GraphedModelStep>> GraphedModelStep::Capture(
    const common::TrainConfig& train, TrainStep* step, AdamOptimizer* /*optimizer*/,
    const at::Tensor& features, const at::Tensor& targets, int /*warmup*/) {
  absl::Status st = CheckSupported(train, *step, features, targets);
  if (st.ok()) st = absl::InternalError("CUDA graphs: not built, yet the check passed");
  return st;
}

#endif

}  // namespace aviary::worker
