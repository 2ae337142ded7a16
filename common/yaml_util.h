// Small helpers shared by the YAML readers (common/config.cc, coordinator/coordinator_config.cc).
// Include only from translation units that already use yaml-cpp.
#ifndef AVIARY_COMMON_YAML_UTIL_H_
#define AVIARY_COMMON_YAML_UTIL_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

#include "yaml-cpp/yaml.h"

namespace aviary::common {

// A text as an error message shows it: quoted, control characters escaped, at most 200 bytes
// (then "...' (N bytes)").
std::string ShownYamlText(const std::string& text);

// How a YAML node reads in an error message: "'abc'" for a scalar, else its kind ("a list").
std::string DescribeYamlNode(const YAML::Node& node);

// A YAML boolean, the same in the pipeline and coordinator configs: true/false, yes/no, on/off in
// lower, Title or UPPER case (what PyYAML reads as booleans). yaml-cpp's y/n are not, nor "tRuE"
// (PyYAML reads them as strings: `cv_filter: n` would mean one thing here and another to a script
// reading the same file).
bool ParseYamlBool(const YAML::Node& node, bool* out);

// Whether a scalar may be read as a number or a boolean: written plain or tagged !!int, !!float
// or !!bool. A quoted scalar ("32", 'false') or one tagged !!str or !local is a string, to
// PyYAML as to the YAML spec: read as a number it would mean one thing here and another to a
// script reading the same file.
bool IsUntypedScalar(const YAML::Node& node);

// A string value's text as the configs take it, INVALID_ARGUMENT saying what is wrong otherwise
// (the caller names the key): no control characters (C0 but tab, DEL, C1, U+2028/9: what YAML
// escapes such as \0, \n and \N make) and UTF-8 (yaml-cpp writes \N as a lone 0x85 byte).
absl::Status CheckYamlString(const std::string& text);

// Whether `text` is a decimal number as YAML 1.2 writes one: [-+]digits[.digits][e[-+]digits]
// (a digit on either side of the point). Not hex, not "inf"/"nan", no spaces.
bool IsDecimalNumber(absl::string_view text);

// Whether an integer's text has a leading zero ("010", "-07"; not "0"): YAML 1.1 readers (PyYAML,
// yaml-cpp's as<int>) take it for octal, 8, where a decimal reading says 10. The configs refuse it.
bool HasLeadingZero(const std::string& text);

// What a config's YAML text must be before it is loaded, INVALID_ARGUMENT naming `source`, the
// line (and column) otherwise: UTF-8 (yaml-cpp writes other bytes back as U+FFFD, so a path
// would not read back as itself), one document (YAML::Load ignores the rest), no aliases (a node
// shared by every place its alias stands: a --set through one changes them all). A syntax error
// passes here, for YAML::Load to report.
absl::Status CheckYamlText(const std::string& text, const std::string& source);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_YAML_UTIL_H_
