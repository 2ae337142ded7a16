// Content addresses of stored manifests: the SHA-256 of the bytes, as 64 lowercase hex digits.
// The coordinator stores manifests under them; a worker group checks what it fetched against one.
//
// Thread-safe (pure functions).
#ifndef AVIARY_COMMON_CONTENT_HASH_H_
#define AVIARY_COMMON_CONTENT_HASH_H_

#include <string>

#include "absl/strings/string_view.h"

namespace aviary::common {

std::string Sha256Hex(absl::string_view bytes);

// Whether `text` has the form Sha256Hex returns (64 lowercase hex digits).
bool IsSha256Hex(absl::string_view text);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_CONTENT_HASH_H_
