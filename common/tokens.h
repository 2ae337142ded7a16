// Token files (docs/SERVICE.md, "Authentication, roles and TLS"): one bearer token per line,
// surrounding whitespace removed; blank lines and lines starting with '#' are ignored, and so is
// a UTF-8 byte order mark at the start of the file (editors on Windows write one). A token goes
// in a gRPC (HTTP/2) header, so it is printable ASCII (TokenByteProblem). The
// coordinator accepts every token a role's file lists (rotation: add the new one, roll the
// holders, remove the old one); clients and worker groups send the first one.
//
// Header-only and stateless: usable from the torch-free coordinator and from the worker alike.
#ifndef AVIARY_COMMON_TOKENS_H_
#define AVIARY_COMMON_TOKENS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace aviary::common {

// The token lines of a token file's text, in file order (a leading UTF-8 BOM dropped).
inline std::vector<std::string> ParseTokenLines(absl::string_view text) {
  absl::ConsumePrefix(&text, "\xEF\xBB\xBF");
  std::vector<std::string> tokens;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    tokens.emplace_back(line);
  }
  return tokens;
}

// "" when every byte of `token` can go in a gRPC metadata (HTTP/2 header) value: 0x20..0x7e;
// else which byte cannot ("byte 0x01 at position 4 (1-based) is not printable ASCII ..."), for
// a message that also names where the token came from. gRPC asserts (aborts the process) on
// such a value rather than failing the call.
inline std::string TokenByteProblem(absl::string_view token) {
  for (size_t i = 0; i < token.size(); ++i) {
    const auto c = static_cast<unsigned char>(token[i]);
    if (c >= 0x20 && c <= 0x7e) continue;
    constexpr char kHex[] = "0123456789abcdef";
    return absl::StrCat("byte 0x", std::string(1, kHex[c >> 4]), std::string(1, kHex[c & 15]), " at position ",
                        i + 1, " (1-based) of the token is not printable ASCII, which a gRPC header cannot carry");
  }
  return "";
}

// The token a client or worker group sends from the text of the token file `path`: its first
// token line, checked by TokenByteProblem. `source` says where the file was named
// ("--token-file", "AVIARY_TOKEN_FILE"); errors name both ("token file 'F' (--token-file) holds
// no token ...", "--token-file F: byte 0x01 at position 4 ...").
inline absl::StatusOr<std::string> FirstToken(absl::string_view text, absl::string_view path,
                                              absl::string_view source) {
  std::vector<std::string> tokens = ParseTokenLines(text);
  if (tokens.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("token file '", path, "' (", source, ") holds no token (only blank or '#' lines)"));
  }
  if (const std::string problem = TokenByteProblem(tokens.front()); !problem.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source, " ", path, ": ", problem));
  }
  return tokens.front();
}

}  // namespace aviary::common

#endif  // AVIARY_COMMON_TOKENS_H_
