#include "common/flags.h"

#include <cerrno>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace aviary::common {

Flags::Flags(std::set<std::string> value_flags, std::set<std::string> bool_flags,
             std::set<std::string> repeated_flags)
    : value_flags_(std::move(value_flags)),
      bool_flags_(std::move(bool_flags)),
      repeated_flags_(std::move(repeated_flags)) {}

absl::Status Flags::Parse(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::optional<std::string> value;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (bool_flags_.count(name)) {
      if (value) {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " takes no value (got '",
                                                       *value, "')"));
      }
      bools_.insert(name);
      continue;
    }
    bool repeated = repeated_flags_.count(name) > 0;
    if (!repeated && !value_flags_.count(name)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
    if (!value) {
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
      }
      value = args[++i];
    }
    if (repeated) {
      repeated_[name].push_back(*value);
    } else {
      if (values_.count(name)) {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " given twice"));
      }
      values_[name] = *value;
    }
  }
  return absl::OkStatus();
}

bool Flags::Has(const std::string& name) const {
  return values_.count(name) || bools_.count(name) || repeated_.count(name);
}

bool Flags::GetBool(const std::string& name) const { return bools_.count(name) > 0; }

std::optional<std::string> Flags::Get(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<std::string> Flags::Require(const std::string& name) const {
  auto v = Get(name);
  if (!v) return absl::InvalidArgumentError(absl::StrCat("missing required flag --", name));
  return *v;
}

absl::StatusOr<long long> Flags::GetInt(const std::string& name, long long fallback,
                                        long long min, long long max) const {
  auto v = Get(name);
  if (!v) return fallback;
  errno = 0;
  char* end = nullptr;
  long long x = std::strtoll(v->c_str(), &end, 10);
  if (v->empty() || *end != '\0' || errno == ERANGE) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --", name, ": expected an integer, got '", *v, "'"));
  }
  if (x < min || x > max) {
    return absl::InvalidArgumentError(absl::StrCat("flag --", name, ": ", x,
                                                   " is out of range [", min, ", ", max, "]"));
  }
  return x;
}

absl::StatusOr<double> Flags::GetDouble(const std::string& name, double fallback) const {
  auto v = Get(name);
  if (!v) return fallback;
  char* end = nullptr;
  double x = std::strtod(v->c_str(), &end);
  if (v->empty() || *end != '\0') {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --", name, ": expected a number, got '", *v, "'"));
  }
  return x;
}

std::vector<std::string> Flags::GetRepeated(const std::string& name) const {
  auto it = repeated_.find(name);
  return it == repeated_.end() ? std::vector<std::string>{} : it->second;
}

bool HelpRequested(const std::vector<std::string>& args) {
  for (const std::string& arg : args) {
    if (arg == "-h" || arg == "--help") return true;
  }
  return false;
}

}  // namespace aviary::common
