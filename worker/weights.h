// Loading parameter tensors by name into a module: PyTorch state dicts written by Python's
// `torch.save(model.state_dict(), path)` (read by common/tensor_index's own unpickler;
// worker/torch_pickle.h says why not torch's) and safetensors files. Used for
// `model.pretrain: imagenet` (torchvision/timm naming) and for initialising fine-tuning from a
// pretraining checkpoint.
//
// Thread-compatible; loading mutates the module under NoGradGuard.
#ifndef AVIARY_WORKER_WEIGHTS_H_
#define AVIARY_WORKER_WEIGHTS_H_

#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include "absl/status/statusor.h"
#include "common/tensor_index.h"

namespace aviary::worker {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Reads a state dict: safetensors when the file is one (by its header), else a torch.save
// archive. Non-tensor entries are ignored. NOT_FOUND / INVALID_ARGUMENT naming the path.
absl::StatusOr<NamedTensors> ReadStateDict(const std::string& path);

// Reads a safetensors file (F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL).
absl::StatusOr<NamedTensors> ReadSafetensors(const std::string& path);
// Writes one (tests and exports).
absl::Status WriteSafetensors(const NamedTensors& tensors, const std::string& path);

struct LoadReport {
  std::vector<std::string> loaded;
  std::vector<std::string> missing;      // in the module, not in the file
  std::vector<std::string> unexpected;   // in the file, not in the module
  std::vector<std::string> mismatched;   // "name: file [a, b] vs model [c, d]"
  // Counts, and the first 4 names of each list of what was not loaded ("..., ... (N more)").
  std::string Summary() const;
};

struct LoadOptions {
  // Skip tensors whose shapes differ (e.g. a new head) instead of failing.
  bool skip_mismatched = false;
  // Fail when the module has parameters/buffers the file lacks.
  bool require_all = true;
  // Ignore file tensors the module does not have (e.g. a checkpoint's optimizer-free extras).
  bool allow_unexpected = false;
  // Only module names with this prefix are expected (e.g. "features." for a backbone).
  std::string only_prefix;
};

// Copies matching tensors into `module`'s parameters and buffers (dtype converted, device
// kept). INVALID_ARGUMENT listing every missing, unexpected and mis-shaped tensor when the
// options do not allow them, or naming `source` and the name when `tensors` holds a name twice;
// on error the module is left unchanged.
absl::StatusOr<LoadReport> LoadIntoModule(const NamedTensors& tensors, torch::nn::Module& module,
                                          const LoadOptions& options, const std::string& source);

// The names, dtypes and shapes of `tensors` (what common::ReadTensorIndex reads from their file).
common::TensorIndex IndexOf(const NamedTensors& tensors);

// The backbone (`features.*` parameters, then buffers) of `module` as an index: what
// common::BackboneShapes holds for it (tests/worker/model_shapes_test.cc).
common::TensorIndex BackboneIndex(torch::nn::Module& module);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_WEIGHTS_H_
