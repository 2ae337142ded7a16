#include "worker/comm/reducer.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/version.h>

#include <chrono>
#include <new>
#include <string>

#include "absl/strings/str_cat.h"

namespace aviary::worker::comm {

struct Reducer::Bucket {
  std::vector<size_t> params;
  at::Tensor flat;
  std::vector<bool> ready;
  size_t pending = 0;
  bool filled = false;  // this backward's gradients copied into `flat`
  std::unique_ptr<Work> work;
};

// Called by a parameter's AccumulateGrad node after it has set the parameter's .grad (c10d's
// Reducer hooks the same node).
class Reducer::AccumulatedHook : public torch::autograd::FunctionPostHook {
 public:
  AccumulatedHook(Reducer* reducer, size_t param) : reducer_(reducer), param_(param) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    reducer_->OnGrad(param_);
    return outputs;
  }

 private:
  Reducer* reducer_;
  size_t param_;
};

std::vector<std::vector<size_t>> PlanBuckets(const std::vector<at::Tensor>& params,
                                             const ReducerOptions& options) {
  std::vector<std::vector<size_t>> plan;
  int64_t bytes = 0;
  for (size_t k = params.size(); k-- > 0;) {
    const at::Tensor& p = params[k];
    const int64_t cap = plan.size() == 1
                            ? std::min(options.first_bucket_bytes, options.bucket_bytes)
                            : options.bucket_bytes;
    const int64_t n = p.numel() * static_cast<int64_t>(p.element_size());
    bool start = plan.empty();
    if (!start) {
      const at::Tensor& prev = params[plan.back().back()];
      start = prev.scalar_type() != p.scalar_type() || prev.device() != p.device() ||
              (bytes > 0 && bytes + n > cap);
    }
    if (start) {
      plan.emplace_back();
      bytes = 0;
    }
    plan.back().push_back(k);
    bytes += n;
  }
  return plan;
}

namespace {

// The strides a parameter's gradient has in its bucket: its own when they are dense
// (channels_last convolution weights stay channels_last), else contiguous ones.
std::vector<int64_t> BucketStrides(const at::Tensor& p) {
  std::vector<int64_t> strides = p.strides().vec();
  if (!p.is_non_overlapping_and_dense()) {
    int64_t stride = 1;
    for (size_t d = strides.size(); d-- > 0;) {
      strides[d] = stride;
      stride *= std::max<int64_t>(p.size(static_cast<int64_t>(d)), 1);
    }
  }
  return strides;
}

// The bucket plan as 62 bits (FNV-1a over each bucket's parameters: index, shape, strides, dtype),
// for the ranks to compare: equal counts and totals passed {16, 32} against {32, 16}, and a bf16
// parameter against a float one of as many elements; the first all-reduce then went wrong. The
// strides too: a bucket holds each gradient in its parameter's layout, so a channels_last weight
// on one rank and a contiguous one on another were summed element by mismatched element.
int64_t PlanDigest(const std::vector<at::Tensor>& params, const std::vector<std::vector<size_t>>& plan) {
  uint64_t h = 1469598103934665603ull;
  const auto mix = [&h](uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= (v >> (8 * i)) & 0xff;
      h *= 1099511628211ull;
    }
  };
  for (const std::vector<size_t>& bucket : plan) {
    mix(bucket.size());
    for (size_t k : bucket) {
      mix(k);
      mix(static_cast<uint64_t>(params[k].dim()));
      for (int64_t size : params[k].sizes()) mix(static_cast<uint64_t>(size));
      // A size-1 dimension's stride addresses nothing (torch may choose any): mixed as 0, so that
      // equal layouts compare equal.
      const std::vector<int64_t> strides = BucketStrides(params[k]);
      for (size_t d = 0; d < strides.size(); ++d) {
        mix(params[k].size(static_cast<int64_t>(d)) == 1 ? 0 : static_cast<uint64_t>(strides[d]));
      }
      mix(static_cast<uint64_t>(params[k].scalar_type()));
    }
  }
  return static_cast<int64_t>(h >> 2);
}

}  // namespace

absl::Status BroadcastModuleState(Communicator& comm, torch::nn::Module& module, bool parameters) {
  if (comm.world_size() == 1) return absl::OkStatus();
  torch::NoGradGuard no_grad;
  auto send = [&comm](const at::Tensor& t) -> absl::Status {
    if (t.is_contiguous()) return comm.Broadcast(t, 0);
    at::Tensor c = t.contiguous();
    absl::Status st = comm.Broadcast(c, 0);
    if (st.ok()) t.copy_(c);
    return st;
  };
  if (parameters) {
    for (const auto& p : module.parameters()) {
      if (absl::Status st = send(p); !st.ok()) return st;
    }
  }
  for (const auto& b : module.buffers()) {
    if (absl::Status st = send(b); !st.ok()) return st;
  }
  return absl::OkStatus();
}

Reducer::Reducer(std::vector<at::Tensor> params, Communicator* comm, ReducerOptions options)
    : params_(std::move(params)), comm_(comm), options_(options) {}

Reducer::~Reducer() {
  // A node something else still holds (a graph from an earlier forward) must not call into a
  // destroyed reducer.
  for (size_t i = 0; i < hook_keys_.size(); ++i) accumulators_[i]->del_post_hook(hook_keys_[i]);
}

absl::StatusOr<std::unique_ptr<Reducer>> Reducer::Create(std::vector<at::Tensor> params,
                                                         Communicator* comm,
                                                         ReducerOptions options) {
  if (comm == nullptr) return absl::InvalidArgumentError("Reducer: no communicator");
  if (options.bucket_bytes <= 0 || options.first_bucket_bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("Reducer: bucket sizes must be > 0, got ",
                                                   options.bucket_bytes, " and ",
                                                   options.first_bucket_bytes));
  }
  // Each rank builds its buckets and hooks first (memory a shared GPU may not have, a parameter
  // without a gradient), then the ranks agree: a failure on one rank after the agreement left the
  // others training on into their first gradient all-reduce, to wait there for a timeout.
  int64_t total = 0;
  for (const auto& p : params) total += p.numel();
  const int64_t count = static_cast<int64_t>(params.size());
  std::unique_ptr<Reducer> r(new Reducer(std::move(params), comm, options));
  absl::Status built;
  try {
    built = r->Build();
  } catch (const std::exception& e) {
    // Out of memory (c10's allocator on a GPU or the host, std::bad_alloc): RESOURCE_EXHAUSTED.
    const bool memory = dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr ||
                        dynamic_cast<const std::bad_alloc*>(&e) != nullptr ||
                        std::string(e.what()).find("can't allocate memory") != std::string::npos;
    built = memory ? absl::ResourceExhaustedError(absl::StrCat("Reducer: out of memory making the gradient buckets (",
                                                               total, " elements): ", e.what()))
                   : absl::InternalError(absl::StrCat("Reducer: cannot make the gradient buckets: ", e.what()));
  }
  // Every rank must bring the same parameters: compare the counts (max and -min in one call), and
  // the lowest rank whose buckets failed with its error's code: (world - rank) * 64 + code, the
  // highest for the lowest rank (0: none failed; codes are below 64).
  const int64_t world = comm->world_size();
  const int64_t failed = built.ok() ? 0 : (world - comm->rank()) * 64 + static_cast<int64_t>(built.code());
  const int64_t digest = built.ok() ? PlanDigest(r->params_, r->plan_) : 0;
  at::Tensor range = at::tensor({count, -count, total, -total, failed, digest, -digest}, at::kLong);
  if (absl::Status st = comm->AllReduce(range, ReduceOp::kMax); !st.ok()) return st;
  if (const int64_t first = range[4].item<int64_t>(); first != 0) {
    if (!built.ok()) return absl::Status(built.code(), absl::StrCat("rank ", comm->rank(), ": ", built.message()));
    return absl::Status(static_cast<absl::StatusCode>(first % 64),
                        absl::StrCat("rank ", comm->rank(), ": Reducer: rank ", world - first / 64,
                                     " could not make its gradient buckets (its log says why)"));
  }
  if (range[0].item<int64_t>() != -range[1].item<int64_t>() ||
      range[2].item<int64_t>() != -range[3].item<int64_t>()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Reducer: the replicas differ: rank ", comm->rank(), " has ", count,
        " parameters with ", total, " elements; across ranks the parameters range over ",
        -range[1].item<int64_t>(), "..", range[0].item<int64_t>(), " and the elements over ",
        -range[3].item<int64_t>(), "..", range[2].item<int64_t>()));
  }
  if (range[5].item<int64_t>() != -range[6].item<int64_t>()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Reducer: the replicas differ: rank ", comm->rank(), " has ", count, " parameters with ", total,
        " elements as the others do, but their sizes, order, memory layouts or dtypes differ (or the bucket sizes: ",
        options.first_bucket_bytes, " and ", options.bucket_bytes, " bytes here)"));
  }
  return r;
}

// The buckets, each parameter's gradient in its bucket's memory, and the hooks: this rank's part
// of Create.
absl::Status Reducer::Build() {
  // One device: autograd runs a CUDA parameter's hook on the device's thread and a CPU one's on
  // the caller's, and two hooks at once would race on the buckets and call MPI concurrently.
  for (size_t p = 1; p < params_.size(); ++p) {
    if (params_[p].device() != params_[0].device()) {
      return absl::InvalidArgumentError(absl::StrCat("Reducer: parameter ", p, " is on ", params_[p].device().str(),
                                                     ", parameter 0 on ", params_[0].device().str(),
                                                     ": the parameters must share one device"));
    }
  }
  plan_ = PlanBuckets(params_, options_);
  bucket_of_.resize(params_.size());
  offset_of_.resize(params_.size());
  for (size_t b = 0; b < plan_.size(); ++b) {
    auto bucket = std::make_unique<Bucket>();
    bucket->params = plan_[b];
    // Offsets aligned to 16 elements (64 bytes in float32): the gradients are the optimizer's
    // inputs, and the fused kernels load vectors only from aligned tensors. The gaps stay zero.
    constexpr int64_t kAlign = 16;
    int64_t total = 0;
    for (size_t p : bucket->params) {
      bucket_of_[p] = b;
      offset_of_[p] = total;
      total += (params_[p].numel() + kAlign - 1) / kAlign * kAlign;
    }
    const at::Tensor& first = params_[bucket->params.front()];
    bucket->flat = at::zeros({total}, first.options().requires_grad(false));
    bucket->ready.assign(bucket->params.size(), false);
    buckets_.push_back(std::move(bucket));
  }
  // Each parameter's gradient in its bucket's memory, in the parameter's own strides when it is
  // dense (channels_last convolution weights stay channels_last), so that the bucket's copy keeps
  // the layout and Finish hands the tensor itself out as the gradient. Made with set_, not as a
  // view: autograd refuses detach_() on views, and optimizers' zero_grad may detach_ a .grad.
  grad_of_.resize(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i];
    const at::Tensor& flat = buckets_[bucket_of_[i]]->flat;
    grad_of_[i] = at::empty({0}, flat.options())
                      .set_(flat.storage(), flat.storage_offset() + offset_of_[i], p.sizes(), BucketStrides(p));
  }
  Reducer* self = this;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!params_[i].requires_grad()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Reducer: parameter ", i, " does not require grad"));
    }
    // The node lives as long as something holds it: the reducer does, or each backward would
    // make a new one without the hook.
    std::shared_ptr<torch::autograd::Node> accumulator = torch::autograd::impl::grad_accumulator(params_[i]);
    if (accumulator == nullptr) {
      return absl::InternalError(absl::StrCat("Reducer: parameter ", i, " has no gradient accumulator"));
    }
    accumulators_.push_back(accumulator);  // first: the destructor unhooks each of hook_keys_
    hook_keys_.push_back(accumulator->add_post_hook(std::make_unique<AccumulatedHook>(self, i)));
  }
  return absl::OkStatus();
}

void Reducer::Prepare() {
  // Every .grad goes: autograd then sets each parameter's .grad to this backward's gradient alone
  // (no accumulation across backward calls), and the buckets' memory Finish handed out is not
  // written while the bucket copies read from it.
  for (at::Tensor& p : params_) {
    if (p.grad().defined()) p.mutable_grad().reset();
  }
  for (auto& b : buckets_) {
    std::fill(b->ready.begin(), b->ready.end(), false);
    b->pending = b->params.size();
    b->filled = false;
    b->work.reset();
  }
  next_launch_ = 0;
  launched_in_backward_ = 0;
  error_ = absl::OkStatus();
  armed_ = true;
}

namespace {
double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

void Reducer::OnGrad(size_t param) {
  if (!armed_ || !error_.ok()) return;
  const auto t0 = std::chrono::steady_clock::now();
  Bucket& b = *buckets_[bucket_of_[param]];
  size_t slot = 0;
  while (b.params[slot] != param) ++slot;
  if (b.ready[slot]) {
    error_ = absl::FailedPreconditionError(
        absl::StrCat("Reducer: parameter ", param, " received a second gradient in one backward"));
    return;
  }
  b.ready[slot] = true;
  --b.pending;
  if (b.pending == 0) Fill(b);
  const size_t before = next_launch_;
  LaunchReady();
  launched_in_backward_ += static_cast<int>(next_launch_ - before);
  for (size_t k = 0; k < next_launch_; ++k) {
    if (buckets_[k]->work) buckets_[k]->work->Poll();
  }
  hook_seconds_ += Since(t0);
}

void Reducer::Fill(Bucket& b) {
  // The gradients autograd set (one batched copy on torch 2.x: a few kernels for the bucket, not
  // one per parameter); the parameters that received none are zeros.
  std::vector<at::Tensor> dst, src;
  dst.reserve(b.params.size());
  src.reserve(b.params.size());
  for (size_t slot = 0; slot < b.params.size(); ++slot) {
    const size_t p = b.params[slot];
    const at::Tensor& g = params_[p].grad();
    if (b.ready[slot] && g.defined() && g.layout() != at::kStrided) {
      // A sparse gradient (an embedding's sparse=true): the dense copy threw inside backward(),
      // naming neither the parameter nor the layout. Neither backend reduces sparse tensors.
      if (error_.ok()) {
        error_ = absl::InvalidArgumentError(absl::StrCat(
            "Reducer: parameter ", p, " has a ", c10::str(g.layout()), " gradient; the all-reduce takes dense "
            "gradients only (an embedding's sparse=true)"));
      }
      grad_of_[p].zero_();
    } else if (b.ready[slot] && g.defined()) {
      dst.push_back(grad_of_[p]);
      src.push_back(g);
    } else if (!b.ready[slot] && g.defined() && error_.ok()) {
      // Prepare dropped it, so autograd set it in this backward without calling the hook: the
      // parameter's AccumulateGrad node is not the hooked one (set_data to another dtype or
      // device after the reducer was made gives it a new node).
      error_ = absl::FailedPreconditionError(absl::StrCat(
          "Reducer: parameter ", p, " received a gradient its hook did not see (was it moved to another "
          "dtype or device after the reducer was made?)"));
    } else {
      grad_of_[p].zero_();
    }
  }
  if (!dst.empty()) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)  // _foreach_copy_
    at::_foreach_copy_(dst, src);
#else
    for (size_t k = 0; k < dst.size(); ++k) dst[k].copy_(src[k]);
#endif
  }
  b.filled = true;
}

void Reducer::LaunchReady() {
  while (error_.ok() && next_launch_ < buckets_.size() && buckets_[next_launch_]->pending == 0) {
    Bucket& b = *buckets_[next_launch_];
    // fp16 is averaged before the sum (as c10d's pre-divide): two ranks' 40000 summed to inf
    // (fp16 ends at 65504) before the division. Other dtypes after it (bf16 and float32 have
    // the range, and keep the rounding of a sum then one division).
    if (b.flat.scalar_type() == at::kHalf && comm_->world_size() > 1) b.flat.mul_(1.0 / comm_->world_size());
    auto work = comm_->AllReduceAsync(b.flat, ReduceOp::kSum);
    if (!work.ok()) {
      error_ = work.status();
      return;
    }
    b.work = std::move(*work);
    ++next_launch_;
  }
}

absl::Status Reducer::Finish() {
  if (!armed_) return absl::FailedPreconditionError("Reducer::Finish without Prepare");
  armed_ = false;
  // On a GPU backward() returns with its kernels still queued on the current stream: wait for
  // them before the clock starts, so that finish_seconds counts the all-reduce backward did not
  // hide, not backward's own device time (the host waits for them below in any case: the last
  // bucket follows them).
  if (!buckets_.empty() && buckets_.front()->flat.is_cuda()) {
    const c10::Device device = buckets_.front()->flat.device();
    c10::impl::getDeviceGuardImpl(device.type())->getStream(device).synchronize();
  }
  const auto t0 = std::chrono::steady_clock::now();
  struct AddTime {
    double* total;
    std::chrono::steady_clock::time_point t0;
    ~AddTime() { *total += Since(t0); }
  } add_time{&finish_seconds_, t0};
  if (!error_.ok()) return error_;
  // Parameters that took no part in this backward contribute zeros.
  for (auto& b : buckets_) {
    if (b->filled) continue;
    Fill(*b);
    std::fill(b->ready.begin(), b->ready.end(), true);
    b->pending = 0;
  }
  LaunchReady();
  if (!error_.ok()) return error_;
  const int world = comm_->world_size();
  for (auto& b : buckets_) {
    absl::Status st = b->work->Wait();
    if (!st.ok()) return st;
    // One rank: the sum is the average; fp16 was divided before the sum (LaunchReady).
    if (world > 1 && b->flat.scalar_type() != at::kHalf) b->flat.mul_(1.0 / world);
    // The averages are the gradients: no copy back. (As c10d's gradient_as_bucket_view hands
    // them out; unlike it, autograd still allocates each gradient before the bucket's copy.)
    for (size_t p : b->params) {
      at::Tensor& g = params_[p].mutable_grad();
      if (!g.defined() || !g.is_same(grad_of_[p])) g = grad_of_[p];
    }
    b->work.reset();
  }
  return absl::OkStatus();
}

}  // namespace aviary::worker::comm
