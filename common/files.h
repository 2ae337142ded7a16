// Whole-file reads and atomic writes, with errors that name the path and errno's text.
#ifndef AVIARY_COMMON_FILES_H_
#define AVIARY_COMMON_FILES_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace aviary::common {

// Reads a whole file; NOT_FOUND or INTERNAL naming the path and errno text; INVALID_ARGUMENT
// for a directory.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);
// Writes `contents` to `path` through a temporary file, fsync and rename.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_FILES_H_
