// Reads the tensors of a `torch.save` archive (the zip format PyTorch writes since 1.6) without
// Python: the pickle through common/tensor_index.h's small unpickler for what state dicts
// contain (dicts, OrderedDicts, tuples, lists, strings, numbers, persistent-id storages,
// torch._utils._rebuild_tensor_v2 and _rebuild_parameter), the one the coordinator checks
// files with, and the storages' bytes where that index found them (stored records, checked to
// lie in the file without overlapping). torch's own C++ pickle_load maps OrderedDict to None,
// which loses every state_dict() that Python writes, hence this reader.
//
// Thread-compatible; no global state.
#ifndef AVIARY_WORKER_TORCH_PICKLE_H_
#define AVIARY_WORKER_TORCH_PICKLE_H_

#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"

namespace aviary::worker {

// The top-level mapping's (name, tensor) pairs in file order; nested mappings are flattened
// with '.' (e.g. {"model": {...}} -> "model.x"). INVALID_ARGUMENT naming the path and the
// unsupported construct for anything else (legacy non-zip files, unknown globals at the top),
// or naming the path and the name when two tensors flatten to one name.
absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> ReadTorchSaveTensors(
    const std::string& path);

// The tensors of a weights file: common::ReadTensorIndex's index (safetensors or torch.save; only
// torch.save with `torch_save_only`), then each tensor's bytes read by the offsets it found: one
// allocation per tensor (or shared storage), no copy of the file. A file replaced or changed
// between the index and the values (its device, inode, size or mtime) is UNAVAILABLE naming it
// (read it again); INVALID_ARGUMENT naming the path and the tensor when a read fails or torch
// refuses the allocation.
absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> ReadWeightsFile(const std::string& path,
                                                                                bool torch_save_only);

// Writes `tensors` as Python's `torch.save(state_dict, path)` does: a zip archive (data.pkl,
// data/<key>, byteorder, version) whose pickle holds a collections.OrderedDict of
// torch._utils._rebuild_tensor_v2 tensors over typed storages, so that
// `torch.load(path, weights_only=True)` reads it. Tensors are written contiguous, on the CPU,
// one storage each; names must be unique. INVALID_ARGUMENT for a dtype without a storage type;
// the errors of common::WriteFileAtomically.
absl::Status WriteTorchSaveTensors(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                   const std::string& path);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_TORCH_PICKLE_H_
