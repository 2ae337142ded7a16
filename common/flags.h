// A small command-line parser shared by the aviary binaries.
//
// Accepts positional arguments, `--name value`, `--name=value`, boolean `--name`, and repeated
// flags (`--set a=1 --set b=2`). Unknown flags, missing values and bad numbers are errors that
// name the flag and the value. Not thread-safe; parse once in main().
#ifndef AVIARY_COMMON_FLAGS_H_
#define AVIARY_COMMON_FLAGS_H_

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace aviary::common {

class Flags {
 public:
  // `value_flags` take a value, `bool_flags` do not, `repeated_flags` take a value and may
  // repeat (names without the leading dashes).
  Flags(std::set<std::string> value_flags, std::set<std::string> bool_flags,
        std::set<std::string> repeated_flags = {"set"});

  absl::Status Parse(const std::vector<std::string>& args);

  const std::vector<std::string>& positional() const { return positional_; }
  bool Has(const std::string& name) const;
  bool GetBool(const std::string& name) const;
  std::optional<std::string> Get(const std::string& name) const;
  // INVALID_ARGUMENT "missing required flag --name" when absent.
  absl::StatusOr<std::string> Require(const std::string& name) const;
  // Integer/float values; INVALID_ARGUMENT naming the flag and the text when not a number or
  // outside [min, max]. Absent flags give `fallback`.
  absl::StatusOr<long long> GetInt(const std::string& name, long long fallback, long long min,
                                   long long max) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double fallback) const;
  std::vector<std::string> GetRepeated(const std::string& name) const;

 private:
  std::set<std::string> value_flags_, bool_flags_, repeated_flags_;
  std::map<std::string, std::string> values_;
  std::map<std::string, std::vector<std::string>> repeated_;
  std::set<std::string> bools_;
  std::vector<std::string> positional_;
};

// True when `args` hold -h or --help: the programs print the command's usage and exit 0 instead
// of parsing them.
bool HelpRequested(const std::vector<std::string>& args);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_FLAGS_H_
