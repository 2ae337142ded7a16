// Content addresses of stored manifests: the SHA-256 of the bytes, as 64 lowercase hex digits.
//
// Thread-safe (pure functions).
#ifndef AVIARY_COORDINATOR_CONTENT_HASH_H_
#define AVIARY_COORDINATOR_CONTENT_HASH_H_

#include <string>

#include "absl/strings/string_view.h"

namespace aviary::coordinator {

std::string Sha256Hex(absl::string_view bytes);

// Whether `text` has the form Sha256Hex returns (64 lowercase hex digits).
bool IsSha256Hex(absl::string_view text);

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_CONTENT_HASH_H_
