// UTF-8 for protobuf string fields. A proto3 `string` must hold valid UTF-8: gRPC refuses a
// message that breaks this with INTERNAL, which a sender takes for a transient failure and
// retries for ever. Text from outside (a file name, a library's error message) is made valid
// before it goes into one.
#ifndef AVIARY_COMMON_UTF8_H_
#define AVIARY_COMMON_UTF8_H_

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace aviary::common {

// The length of the well-formed UTF-8 sequence that starts at byte `i` of `text` (1 for ASCII),
// or 0 when none does there (a stray continuation byte, a truncated sequence, an overlong form,
// a surrogate, a code point past U+10FFFF).
size_t Utf8SequenceLength(absl::string_view text, size_t i);

// `text` with each byte that does not start a well-formed sequence replaced by U+FFFD; valid
// text comes back unchanged.
std::string ValidUtf8(absl::string_view text);

// The offset of the first byte of `text` that starts no well-formed sequence; npos when `text`
// is valid UTF-8.
size_t FirstInvalidUtf8(absl::string_view text);

// The longest prefix of `text` of at most `max_bytes` bytes that does not end inside a
// character (`text` itself when it is short enough).
absl::string_view Utf8Prefix(absl::string_view text, size_t max_bytes);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_UTF8_H_
