#include "worker/tools/npy.h"

#include <cstring>
#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "common/csv.h"
#include "common/files.h"

namespace aviary::worker {

using common::ReadFileToString;
using common::WriteOutputFileAtomically;
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;
constexpr size_t kArrayAlign = 64;          // numpy.lib.format.ARRAY_ALIGN
constexpr size_t kGrowthAxisMaxDigits = 21;  // numpy.lib.format.GROWTH_AXIS_MAX_DIGITS

bool HostIsLittleEndian() {
  const uint16_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// Python's repr of a tuple of ints: "()", "(5,)", "(3, 128, 384)".
std::string ShapeRepr(const std::vector<int64_t>& shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

absl::Status Bad(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": not a float32 C-order .npy file: ", what));
}

// The value text after `'key':` in the header dict, up to the next top-level ',' or '}'.
absl::StatusOr<std::string> DictValue(const std::string& path, absl::string_view dict,
                                      absl::string_view key) {
  const std::string needle = absl::StrCat("'", key, "':");
  size_t at = dict.find(needle);
  if (at == absl::string_view::npos) return Bad(path, absl::StrCat("header lacks '", key, "'"));
  size_t i = at + needle.size();
  int depth = 0;
  size_t end = i;
  for (; end < dict.size(); ++end) {
    char c = dict[end];
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if (depth == 0 && (c == ',' || c == '}')) break;
    if (depth < 0) break;
  }
  return std::string(absl::StripAsciiWhitespace(dict.substr(i, end - i)));
}

}  // namespace

absl::StatusOr<std::string> NpyHeader(const std::vector<int64_t>& shape) {
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("npy: negative dimension in shape ", ShapeRepr(shape)));
    }
  }
  std::string dict = absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': ",
                                  ShapeRepr(shape), ", }");
  if (!shape.empty()) {
    const size_t digits = absl::StrCat(shape[0]).size();
    if (digits < kGrowthAxisMaxDigits) dict.append(kGrowthAxisMaxDigits - digits, ' ');
  }
  // numpy: padlen = ALIGN - ((magic + 2 + 2 + len(dict) + 1) % ALIGN), spaces, then '\n'.
  const size_t hlen = dict.size() + 1;
  const size_t padlen = kArrayAlign - ((kMagicLen + 2 + 2 + hlen) % kArrayAlign);
  const size_t total = hlen + padlen;
  if (total > 0xFFFF) {
    return absl::InvalidArgumentError(
        absl::StrCat("npy: header for shape ", ShapeRepr(shape), " too long for format 1.0"));
  }
  std::string out(kMagic, kMagicLen);
  out.push_back('\x01');
  out.push_back('\x00');
  out.push_back(static_cast<char>(total & 0xFF));
  out.push_back(static_cast<char>((total >> 8) & 0xFF));
  out += dict;
  out.append(padlen, ' ');
  out.push_back('\n');
  return out;
}

absl::Status WriteNpy(const std::string& path, const std::vector<int64_t>& shape,
                      const float* data, size_t num_values) {
  if (!HostIsLittleEndian()) return absl::UnimplementedError("npy: big-endian host");
  auto header = NpyHeader(shape);
  if (!header.ok()) return header.status();
  size_t expected = 1;
  for (int64_t d : shape) expected *= static_cast<size_t>(d);
  if (expected != num_values) {
    return absl::InvalidArgumentError(absl::StrCat("npy: shape ", ShapeRepr(shape), " holds ",
                                                   expected, " values, got ", num_values));
  }
  std::string bytes = std::move(*header);
  const size_t offset = bytes.size();
  bytes.resize(offset + num_values * sizeof(float));
  if (num_values > 0) std::memcpy(bytes.data() + offset, data, num_values * sizeof(float));
  return WriteOutputFileAtomically(path, bytes);
}

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) {
  if (!HostIsLittleEndian()) return absl::UnimplementedError("npy: big-endian host");
  auto bytes_or = ReadFileToString(path);
  if (!bytes_or.ok()) return bytes_or.status();
  const std::string& bytes = *bytes_or;
  if (bytes.size() < kMagicLen + 4 || bytes.compare(0, kMagicLen, kMagic, kMagicLen) != 0) {
    return Bad(path, "missing the \\x93NUMPY magic");
  }
  const auto major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0;
  size_t prefix = 0;
  auto byte = [&](size_t i) { return static_cast<size_t>(static_cast<unsigned char>(bytes[i])); };
  if (major == 1) {
    header_len = byte(8) | (byte(9) << 8);
    prefix = 10;
  } else if (major == 2 && bytes.size() >= 12) {
    header_len = byte(8) | (byte(9) << 8) | (byte(10) << 16) | (byte(11) << 24);
    prefix = 12;
  } else {
    return Bad(path, absl::StrCat("unsupported format version ", major));
  }
  if (bytes.size() < prefix + header_len) return Bad(path, "truncated header");
  const absl::string_view dict(bytes.data() + prefix, header_len);

  auto descr = DictValue(path, dict, "descr");
  if (!descr.ok()) return descr.status();
  if (*descr != "'<f4'") return Bad(path, absl::StrCat("dtype ", *descr, " (expected '<f4')"));
  auto fortran = DictValue(path, dict, "fortran_order");
  if (!fortran.ok()) return fortran.status();
  if (*fortran != "False") return Bad(path, absl::StrCat("fortran_order ", *fortran));
  auto shape_text = DictValue(path, dict, "shape");
  if (!shape_text.ok()) return shape_text.status();
  absl::string_view s = *shape_text;
  if (s.size() < 2 || s.front() != '(' || s.back() != ')') {
    return Bad(path, absl::StrCat("shape ", *shape_text));
  }
  NpyArray array;
  size_t count = 1;
  for (absl::string_view part : absl::StrSplit(s.substr(1, s.size() - 2), ',')) {
    part = absl::StripAsciiWhitespace(part);
    if (part.empty()) continue;  // "(5,)"
    int64_t d = 0;
    if (!absl::SimpleAtoi(part, &d) || d < 0) return Bad(path, absl::StrCat("shape ", *shape_text));
    array.shape.push_back(d);
    if (d != 0 && count > std::numeric_limits<size_t>::max() / sizeof(float) / static_cast<size_t>(d)) {
      return Bad(path, absl::StrCat("shape ", *shape_text, " is too large"));
    }
    count *= static_cast<size_t>(d);
  }
  const size_t data_at = prefix + header_len;
  if (bytes.size() - data_at != count * sizeof(float)) {
    return Bad(path, absl::StrCat("shape ", *shape_text, " needs ", count * sizeof(float),
                                  " data bytes, file has ", bytes.size() - data_at));
  }
  array.data.resize(count);
  if (count > 0) std::memcpy(array.data.data(), bytes.data() + data_at, count * sizeof(float));
  return array;
}

}  // namespace aviary::worker
