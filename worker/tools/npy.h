// NumPy .npy files (format version 1.0), float32 only: what `aviary mel` writes and tests read.
//
// The writer produces the bytes numpy 1.24's `numpy.save` writes for a C-order little-endian
// float32 array: the magic "\x93NUMPY", version 1.0, a little-endian uint16 header length, the
// header dict `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 128, 384), }` followed by
// numpy's spare spaces for growing the first axis, padded with spaces and a final '\n' so that
// the data starts on a 64-byte boundary, then the raw values. Torch-free; thread-compatible.
#ifndef AVIARY_WORKER_TOOLS_NPY_H_
#define AVIARY_WORKER_TOOLS_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace aviary::worker {

// Everything before the data: magic, version, header length and the padded header dict.
// INVALID_ARGUMENT for a negative dimension or a header longer than version 1.0 allows.
absl::StatusOr<std::string> NpyHeader(const std::vector<int64_t>& shape);

// Writes `data` (C order, product(shape) values) to `path` through a temporary file renamed into
// place, so a reader never sees half a file. INVALID_ARGUMENT when data.size() does not match
// the shape; INTERNAL naming the path and errno text on I/O errors.
absl::Status WriteNpy(const std::string& path, const std::vector<int64_t>& shape,
                      const float* data, size_t num_values);
inline absl::Status WriteNpy(const std::string& path, const std::vector<int64_t>& shape,
                             const std::vector<float>& data) {
  return WriteNpy(path, shape, data.data(), data.size());
}

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;  // C order
};

// Reads a version 1.0/2.0 .npy file holding little-endian float32 ('<f4') in C order (what
// WriteNpy and numpy.save(float32 array) write). Anything else is INVALID_ARGUMENT naming the
// path and what it found (dtype, fortran_order, a truncated file); NOT_FOUND when missing.
absl::StatusOr<NpyArray> ReadNpy(const std::string& path);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_TOOLS_NPY_H_
