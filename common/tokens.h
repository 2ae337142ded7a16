// Token files (docs/SERVICE.md, "Authentication, roles and TLS"): one bearer token per line,
// surrounding whitespace removed; blank lines and lines starting with '#' are ignored. The
// coordinator accepts every token a role's file lists (rotation: add the new one, roll the
// holders, remove the old one); clients and worker groups send the first one.
//
// Header-only and stateless: usable from the torch-free coordinator and from the worker alike.
#ifndef AVIARY_COMMON_TOKENS_H_
#define AVIARY_COMMON_TOKENS_H_

#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace aviary::common {

// The token lines of a token file's text, in file order.
inline std::vector<std::string> ParseTokenLines(absl::string_view text) {
  std::vector<std::string> tokens;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    tokens.emplace_back(line);
  }
  return tokens;
}

}  // namespace aviary::common

#endif  // AVIARY_COMMON_TOKENS_H_
