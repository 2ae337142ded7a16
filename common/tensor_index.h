// The names, dtypes and shapes of the tensors in a weights file, read without the tensor data
// and without libtorch (the coordinator checks `model.pretrained_weights` at submit with it).
// Reads what the worker's ReadStateDict (worker/weights.h) reads, and names the tensors as it
// does:
//   - safetensors: 8-byte little-endian header length, then a JSON header;
//   - torch.save zip archives (PyTorch >= 1.6, what Python's `torch.save(state_dict, f)`,
//     `aviary weights import` and `aviary export --format state_dict` write): the archive's
//     `*/data.pkl` run through a small pickle machine that knows what state dicts hold (dicts,
//     collections.OrderedDict, tuples, lists, strings, numbers, persistent-id storages,
//     torch._utils._rebuild_tensor_v2 and _rebuild_parameter). Nested mappings flatten with '.'
//     ({"state_dict": {...}} -> "state_dict.x"); non-tensor values are skipped (other globals
//     become opaque values, as in the worker's reader). Two tensors of one flattened name
//     ({"a": {"b": t}} beside "a.b") are an error naming the file and the name.
// Every length taken from the file is bounded by the file's size and by fixed caps, so a corrupt
// header cannot make a huge allocation.
//
// Thread-compatible; no global state.
#ifndef AVIARY_COMMON_TENSOR_INDEX_H_
#define AVIARY_COMMON_TENSOR_INDEX_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

// The weights files' readers and writers (this index, worker/torch_pickle, worker/weights,
// worker/onnx_export) copy tensor bytes and header integers in host order: every format they
// speak is little-endian, and so must the host be.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "aviary reads and writes little-endian weights files in host order: a big-endian host is not supported");

namespace aviary::common {

struct TensorEntry {
  std::string name;
  std::string dtype;           // safetensors' names: F32, F64, F16, BF16, I64, I32, I16, I8, U8, BOOL
  std::vector<int64_t> shape;  // [] for a scalar
  // Where a torch.save tensor's values lie (what worker/torch_pickle.cc reads them by; empty
  // and 0 for safetensors): the archive's record data/<storage>, a storage of storage_numel
  // elements of `dtype`, viewed from element storage_offset with `stride`.
  std::string storage = {};
  int64_t storage_numel = 0;
  int64_t storage_offset = 0;
  std::vector<int64_t> stride = {};
  // The file offset of the values: a safetensors tensor's first byte, or a torch.save storage
  // record's (stored, uncompressed). The tensors' byte ranges (safetensors) and the storage
  // records (torch.save) are checked to lie in the file without overlapping: a file cannot
  // claim its bytes many times over.
  uint64_t data_offset = 0;

  // Name, dtype and shape: what a file says to a model.
  bool operator==(const TensorEntry& o) const {
    return name == o.name && dtype == o.dtype && shape == o.shape;
  }
};
using TensorIndex = std::vector<TensorEntry>;

// The file's tensors in file order. NOT_FOUND / PERMISSION_DENIED (errno's text) when the file
// cannot be opened; INVALID_ARGUMENT naming the path and the byte offset, opcode or entry for
// anything it cannot read (a truncated file, a legacy non-zip torch.save, a compressed entry,
// an unknown pickle opcode, a top level that is not a mapping).
absl::StatusOr<TensorIndex> ReadTensorIndex(const std::string& path);
// The same for a file known to be a torch.save archive (the worker reads the values by it).
absl::StatusOr<TensorIndex> ReadTorchSaveIndex(const std::string& path);

// "[32, 3, 3, 3]".
std::string ShapeText(const std::vector<int64_t>& shape);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_TENSOR_INDEX_H_
