#include "common/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <sstream>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/files.h"
#include "common/layouts.h"
#include "common/model_shapes.h"
#include "common/status.h"
#include "common/utf8.h"
#include "common/yaml_util.h"
#include "yaml-cpp/eventhandler.h"
#include "yaml-cpp/yaml.h"

namespace aviary::common {
namespace {

// ---------------------------------------------------------------------------------------------
// Small helpers.

std::string JoinKey(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : absl::StrCat(prefix, ".", name);
}

// The shortest decimal text that reads back as exactly `value`, always with a dot so that the
// YAML shows a float field as a float.
std::string FormatDouble(double value) {
  if (std::isnan(value)) return ".nan";
  if (std::isinf(value)) return value > 0 ? ".inf" : "-.inf";
  if (value == std::floor(value) && std::fabs(value) < 1e15) {
    return absl::StrFormat("%.1f", value);
  }
  std::string text;
  for (int precision = 1; precision <= 17; ++precision) {
    text = absl::StrFormat("%.*g", precision, value);
    double parsed = 0;
    if (absl::SimpleAtod(text, &parsed) && parsed == value) break;
  }
  // "5e-06" -> "5.0e-06": YAML 1.1 readers (PyYAML) want a dot in the mantissa of a float.
  const size_t exponent = text.find('e');
  if (exponent != std::string::npos && text.find('.') == std::string::npos) {
    text.insert(exponent, ".0");
  }
  return text;
}

std::string Describe(const YAML::Node& node) { return DescribeYamlNode(node); }

// "<where>: key '<key>': <message>", or without the location when there is none.
absl::Status KeyError(const std::string& where, const std::string& key, absl::string_view message) {
  if (where.empty()) return absl::InvalidArgumentError(absl::StrCat("key '", key, "': ", message));
  return absl::InvalidArgumentError(absl::StrCat(where, ": key '", key, "': ", message));
}

std::string Quote(const std::string& value) { return absl::StrCat("'", value, "'"); }
std::string Show(int value) { return Quote(absl::StrCat(value)); }
std::string Show(uint32_t value) { return Quote(absl::StrCat(value)); }
std::string Show(double value) { return Quote(FormatDouble(value)); }
std::string Show(bool value) { return Quote(value ? "true" : "false"); }
std::string Show(const std::string& value) { return Quote(value); }

bool IsIndex(const std::string& text) {
  return !text.empty() && text.size() <= 9 &&
         std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isdigit(c); });
}

// ---------------------------------------------------------------------------------------------
// Origins: where each value came from.

// Where config values came from, for messages: the file and line of a YAML node, or the
// `--set` override that produced it. While converting, it also records per dotted key where the
// value was set, so that validation (which only sees the typed structs) can point back at it.
// One per parse; not thread-safe.
class Origins {
 public:
  explicit Origins(std::string source) : source_(std::move(source)) {}

  // `path` is the override's dotted key with list indexes normalised ("a.01" -> "a.1").
  void AddOverride(const std::string& text, std::string path) {
    overrides_.push_back({absl::StrCat("--set ", text), std::move(path)});
  }

  // Where the node found at dotted `key` came from: the last override that set the key or one
  // of its parents, else the node's line in the file, else the override that created the key
  // on its way to a deeper one, else just the file.
  std::string Where(const std::string& key, const YAML::Node& node) const {
    for (auto it = overrides_.rbegin(); it != overrides_.rend(); ++it) {
      if (key == it->path || absl::StartsWith(key, absl::StrCat(it->path, "."))) return it->label;
    }
    const YAML::Mark mark = node.Mark();
    if (mark.line >= 0 && !mark.is_null()) return absl::StrCat(source_, ":", mark.line + 1);
    for (auto it = overrides_.rbegin(); it != overrides_.rend(); ++it) {
      if (absl::StartsWith(it->path, absl::StrCat(key, "."))) return it->label;
    }
    return source_;
  }

  void Record(const std::string& key, std::string where) { set_at_[key] = std::move(where); }

  // Where `key` was set: a file line or an override; "" when it holds a default.
  std::string WhereSet(const std::string& key) const {
    auto it = set_at_.find(key);
    if (it == set_at_.end() || it->second == source_) return "";
    return it->second;
  }

 private:
  struct Override {
    std::string label;  // "--set key=value"
    std::string path;
  };
  std::string source_;
  std::vector<Override> overrides_;
  std::map<std::string, std::string> set_at_;
};

// Locates dotted keys for validation messages.
struct Locator {
  // The file line or override that set `key`; "" when not known.
  std::function<std::string(const std::string& key)> exact;
  // Used when neither the key nor a parent has a known location (the file name, or "").
  std::string fallback;

  // Where `key` or, when it holds a default, its closest located parent was set.
  std::string operator()(const std::string& key) const {
    std::string current = key;
    while (exact) {
      std::string where = exact(current);
      if (!where.empty()) return where;
      const size_t dot = current.rfind('.');
      if (dot == std::string::npos) break;
      current.resize(dot);
    }
    return fallback;
  }

  // For cross-field checks: the first of `keys` that was set explicitly, else as above for the
  // first key.
  std::string Any(const std::vector<std::string>& keys) const {
    for (const std::string& key : keys) {
      std::string where = exact ? exact(key) : std::string();
      if (!where.empty()) return where;
    }
    return (*this)(keys.front());
  }
};

absl::Status Expected(const Origins& origins, const std::string& key, const YAML::Node& node,
                      absl::string_view what) {
  return KeyError(origins.Where(key, node), key,
                  absl::StrCat("expected ", what, ", got ", Describe(node)));
}

// ---------------------------------------------------------------------------------------------
// The schema: one table of fields per struct drives reading, writing, comparing and checking.

template <typename T>
struct Field {
  std::string name;
  // Reads `node` (found at dotted `key`) into this field of `*out`.
  std::function<absl::Status(const YAML::Node& node, const std::string& key, Origins* origins,
                             T* out)>
      read;
  // Writes this field's value (the key is already written).
  std::function<void(YAML::Emitter* out, const T& value)> emit;
  std::function<bool(const T& a, const T& b)> equal;
  // Range/enum checks of this field (and of the fields of nested structs).
  std::function<absl::Status(const T& value, const std::string& key, const Locator& where)> check;
};

template <typename T>
const std::vector<Field<T>>& FieldsOf();
template <>
const std::vector<Field<SourceConfig>>& FieldsOf<SourceConfig>();
template <>
const std::vector<Field<DataConfig>>& FieldsOf<DataConfig>();
template <>
const std::vector<Field<FoldsConfig>>& FieldsOf<FoldsConfig>();
template <>
const std::vector<Field<SamplingConfig>>& FieldsOf<SamplingConfig>();
template <>
const std::vector<Field<FrontendConfig>>& FieldsOf<FrontendConfig>();
template <>
const std::vector<Field<AugmentConfig>>& FieldsOf<AugmentConfig>();
template <>
const std::vector<Field<ModelConfig>>& FieldsOf<ModelConfig>();
template <>
const std::vector<Field<TrainConfig>>& FieldsOf<TrainConfig>();
template <>
const std::vector<Field<StageConfig>>& FieldsOf<StageConfig>();
template <>
const std::vector<Field<CommConfig>>& FieldsOf<CommConfig>();
template <>
const std::vector<Field<PipelineConfig>>& FieldsOf<PipelineConfig>();

template <typename T>
std::vector<std::string> NamesOf(const std::vector<Field<T>>& fields) {
  std::vector<std::string> names;
  names.reserve(fields.size());
  for (const Field<T>& field : fields) names.push_back(field.name);
  return names;
}

template <typename T>
struct IsVector : std::false_type {};
template <typename T>
struct IsVector<std::vector<T>> : std::true_type {};
template <typename T>
constexpr bool kIsStruct = std::is_class_v<T> && !std::is_same_v<T, std::string>;

// All dotted keys of the default config, for "did you mean" across sections.
const std::vector<std::string>& AllKeys();

// "unknown key 'train.bach_size' (did you mean 'train.batch_size'?)"
absl::Status UnknownKey(const std::string& where, const std::string& prefix,
                        const std::string& name, const std::vector<std::string>& known,
                        absl::string_view what) {
  const std::string key = JoinKey(prefix, name);
  std::string hint;
  const std::string suggestion = DidYouMean(name, known);
  if (!suggestion.empty()) {
    hint = absl::StrCat(" (did you mean '", JoinKey(prefix, suggestion), "'?)");
  } else if (what == "key") {
    // A key that belongs to another section ("train.sample_rate" -> "data.sample_rate").
    for (const std::string& other : AllKeys()) {
      if (other == name || absl::EndsWith(other, absl::StrCat(".", name))) {
        hint = absl::StrCat(" (did you mean '", other, "'?)");
        break;
      }
    }
  }
  if (hint.empty()) {
    hint = absl::StrCat(" (expected one of ", absl::StrJoin(known, ", "), ")");
  }
  return absl::InvalidArgumentError(absl::StrCat(where, ": unknown ", what, " ", ShownYamlText(key), hint));
}

// Checks the keys of map `node` at `prefix`: scalar, known, not repeated.
absl::Status CheckKeys(const YAML::Node& node, const std::string& prefix, const Origins& origins,
                       const std::vector<std::string>& known, absl::string_view what) {
  std::map<std::string, std::string> seen;
  for (auto it = node.begin(); it != node.end(); ++it) {
    const YAML::Node key_node = it->first;
    if (!key_node.IsScalar()) {
      return absl::InvalidArgumentError(
          absl::StrCat(origins.Where(prefix, key_node), ": in '", prefix.empty() ? "<top>" : prefix,
                       "': expected a key name, got ", Describe(key_node)));
    }
    const std::string& name = key_node.Scalar();
    const std::string key = JoinKey(prefix, name);
    const std::string where = origins.Where(key, key_node);
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      return UnknownKey(where, prefix, name, known, what);
    }
    auto [previous, inserted] = seen.emplace(name, where);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": duplicate ", what, " '", key,
                                                     "' (first set at ", previous->second, ")"));
    }
  }
  return absl::OkStatus();
}

// Reads the keys present in map `node` into `*out`; absent keys keep their current values.
template <typename T>
absl::Status ReadStruct(const YAML::Node& node, const std::string& prefix, Origins* origins,
                        const std::vector<Field<T>>& fields, T* out) {
  if (node.IsNull()) return absl::OkStatus();  // an empty section keeps the defaults
  if (!node.IsMap()) return Expected(*origins, prefix, node, "a map");
  AVIARY_RETURN_IF_ERROR(CheckKeys(node, prefix, *origins, NamesOf(fields), "key"));
  for (const Field<T>& field : fields) {
    const YAML::Node value = node[field.name];
    if (!value.IsDefined()) continue;
    const std::string key = JoinKey(prefix, field.name);
    AVIARY_RETURN_IF_ERROR(field.read(value, key, origins, out));
    origins->Record(key, origins->Where(key, value));
  }
  return absl::OkStatus();
}

absl::Status ReadScalar(const YAML::Node& node, const std::string& key, Origins* origins,
                        int* out) {
  int64_t value = 0;
  if (!IsUntypedScalar(node)) return Expected(*origins, key, node, "an integer, not a quoted or tagged string");
  if (!node.IsScalar() || !absl::SimpleAtoi(node.Scalar(), &value)) {
    return Expected(*origins, key, node, "an integer");
  }
  if (HasLeadingZero(node.Scalar())) {
    return Expected(*origins, key, node, "an integer without a leading zero (YAML 1.1 reads 010 as octal 8)");
  }
  if (value < std::numeric_limits<int>::min() || value > std::numeric_limits<int>::max()) {
    return Expected(*origins, key, node,
                    absl::StrCat("an integer in [", std::numeric_limits<int>::min(), ", ",
                                 std::numeric_limits<int>::max(), "]"));
  }
  *out = static_cast<int>(value);
  return absl::OkStatus();
}

absl::Status ReadScalar(const YAML::Node& node, const std::string& key, Origins* origins,
                        uint32_t* out) {
  int64_t value = 0;
  if (!IsUntypedScalar(node)) return Expected(*origins, key, node, "an integer, not a quoted or tagged string");
  if (!node.IsScalar() || !absl::SimpleAtoi(node.Scalar(), &value) || value < 0 ||
      value > std::numeric_limits<uint32_t>::max()) {
    return Expected(*origins, key, node,
                    absl::StrCat("an integer in [0, ", std::numeric_limits<uint32_t>::max(), "]"));
  }
  if (HasLeadingZero(node.Scalar())) {
    return Expected(*origins, key, node, "an integer without a leading zero (YAML 1.1 reads 010 as octal 8)");
  }
  *out = static_cast<uint32_t>(value);
  return absl::OkStatus();
}

absl::Status ReadScalar(const YAML::Node& node, const std::string& key, Origins* origins,
                        double* out) {
  double value = 0;
  if (!IsUntypedScalar(node)) return Expected(*origins, key, node, "a number, not a quoted or tagged string");
  // Decimal as YAML 1.2 writes a number (SimpleAtod also took hex floats, 0x1p-3, a string to
  // PyYAML), and no leading zero on a whole number (YAML 1.1 reads 010 as octal 8). PyYAML itself
  // is stricter (1e-4 without a point is a string to it): that form stays a number here.
  if (!node.IsScalar() || !IsDecimalNumber(node.Scalar()) || !absl::SimpleAtod(node.Scalar(), &value) ||
      !std::isfinite(value)) {
    return Expected(*origins, key, node, "a finite decimal number");
  }
  if (HasLeadingZero(node.Scalar()) && node.Scalar().find_first_of(".eE") == std::string::npos) {
    return Expected(*origins, key, node, "a number without a leading zero (YAML 1.1 reads 010 as octal 8)");
  }
  *out = value;
  return absl::OkStatus();
}

absl::Status ReadScalar(const YAML::Node& node, const std::string& key, Origins* origins,
                        bool* out) {
  bool value = false;
  if (!ParseYamlBool(node, &value)) {
    return Expected(*origins, key, node,
                    IsUntypedScalar(node) ? "true or false" : "true or false, not a quoted or tagged string");
  }
  *out = value;
  return absl::OkStatus();
}

absl::Status ReadScalar(const YAML::Node& node, const std::string& key, Origins* origins,
                        std::string* out) {
  if (node.IsNull()) {  // `key:` or `key: ~` reads as the empty string
    out->clear();
    return absl::OkStatus();
  }
  if (!node.IsScalar()) return Expected(*origins, key, node, "a string");
  if (absl::Status bad = CheckYamlString(node.Scalar()); !bad.ok()) {
    return KeyError(origins->Where(key, node), key, std::string(bad.message()));
  }
  *out = node.Scalar();
  return absl::OkStatus();
}

// For a scalar of decimal digits (optionally signed) outside int's range: INT_MAX or INT_MIN
// by its sign; nullopt for anything else.
std::optional<int> SaturatedInt(const YAML::Node& node) {
  if (!node.IsScalar()) return std::nullopt;
  absl::string_view text = absl::StripAsciiWhitespace(node.Scalar());
  const bool negative = !text.empty() && text.front() == '-';
  if (!text.empty() && (text.front() == '-' || text.front() == '+')) text.remove_prefix(1);
  if (text.empty() || !std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isdigit(c); })) {
    return std::nullopt;
  }
  int64_t value = 0;
  if (absl::SimpleAtoi(text, &value) && value <= std::numeric_limits<int>::max()) {
    if (!negative || -value >= std::numeric_limits<int>::min()) return std::nullopt;  // fits
  }
  return negative ? std::numeric_limits<int>::min() : std::numeric_limits<int>::max();
}

template <typename V>
absl::Status ReadValue(const YAML::Node& node, const std::string& key, Origins* origins, V* out) {
  if constexpr (IsVector<V>::value) {
    using Item = typename V::value_type;
    if (!node.IsSequence()) {
      return Expected(*origins, key, node,
                      std::is_same_v<Item, int> ? "a list of integers" : "a list");
    }
    V values;
    for (size_t i = 0; i < node.size(); ++i) {
      const std::string item_key = absl::StrCat(key, ".", i);
      const YAML::Node item_node = node[i];
      Item item{};
      AVIARY_RETURN_IF_ERROR(ReadValue(item_node, item_key, origins, &item));
      origins->Record(item_key, origins->Where(item_key, item_node));
      values.push_back(std::move(item));
    }
    *out = std::move(values);
    return absl::OkStatus();
  } else if constexpr (kIsStruct<V>) {
    return ReadStruct(node, key, origins, FieldsOf<V>(), out);
  } else {
    return ReadScalar(node, key, origins, out);
  }
}

template <typename T>
void EmitStruct(YAML::Emitter* out, const std::vector<Field<T>>& fields, const T& value,
                bool flow) {
  if (flow) *out << YAML::Flow;
  *out << YAML::BeginMap;
  for (const Field<T>& field : fields) {
    *out << YAML::Key << field.name << YAML::Value;
    field.emit(out, value);
  }
  *out << YAML::EndMap;
}

template <typename V>
void EmitValue(YAML::Emitter* out, const V& value) {
  if constexpr (IsVector<V>::value) {
    using Item = typename V::value_type;
    // Lists of numbers on one line; lists of maps one item per line.
    if (!kIsStruct<Item> || value.empty()) *out << YAML::Flow;
    *out << YAML::BeginSeq;
    for (const Item& item : value) EmitValue(out, item);
    *out << YAML::EndSeq;
  } else if constexpr (kIsStruct<V>) {
    EmitStruct(out, FieldsOf<V>(), value, /*flow=*/true);
  } else if constexpr (std::is_same_v<V, std::string>) {
    *out << YAML::DoubleQuoted << value;
  } else if constexpr (std::is_same_v<V, double>) {
    *out << FormatDouble(value);
  } else {
    *out << value;
  }
}

template <typename V>
absl::Status ValidateValue(const V& value, const std::string& key, const Locator& where) {
  if constexpr (IsVector<V>::value) {
    for (size_t i = 0; i < value.size(); ++i) {
      AVIARY_RETURN_IF_ERROR(ValidateValue(value[i], absl::StrCat(key, ".", i), where));
    }
  } else if constexpr (kIsStruct<V>) {
    for (const Field<V>& field : FieldsOf<V>()) {
      AVIARY_RETURN_IF_ERROR(field.check(value, JoinKey(key, field.name), where));
    }
  }
  return absl::OkStatus();
}

// A range/enum check: "" when `value` is fine, else what was expected ("expected ...").
template <typename V>
using Check = std::function<std::string(const V& value)>;

template <typename V>
struct Identity {
  using type = V;
};

// A field bound to `member`, with an optional check of its value.
template <typename T, typename V>
Field<T> MakeField(const char* name, V T::*member,
                   typename Identity<Check<V>>::type check = nullptr) {
  Field<T> field;
  field.name = name;
  field.read = [member, check](const YAML::Node& node, const std::string& key, Origins* origins,
                               T* out) -> absl::Status {
    if constexpr (std::is_same_v<V, int>) {
      // An integer beyond int's range fails this field's own range, which is what the message
      // should name ("[1, 10000]", not int's).
      if (check) {
        if (std::optional<int> saturated = SaturatedInt(node)) {
          const std::string expected = check(*saturated);
          if (!expected.empty()) {
            return KeyError(origins->Where(key, node), key,
                            absl::StrCat(expected, ", got ", Describe(node)));
          }
        }
      }
    }
    return ReadValue(node, key, origins, &(out->*member));
  };
  field.emit = [member](YAML::Emitter* out, const T& value) { EmitValue(out, value.*member); };
  field.equal = [member](const T& a, const T& b) { return a.*member == b.*member; };
  field.check = [member, check](const T& value, const std::string& key,
                                const Locator& where) -> absl::Status {
    if constexpr (!IsVector<V>::value && !kIsStruct<V>) {
      if (check) {
        const std::string expected = check(value.*member);
        if (!expected.empty()) {
          return KeyError(where(key), key, absl::StrCat(expected, ", got ", Show(value.*member)));
        }
      }
    }
    return ValidateValue(value.*member, key, where);
  };
  return field;
}

// A top-level section: like MakeField, but written as a block map.
template <typename V>
Field<PipelineConfig> MakeSection(const char* name, V PipelineConfig::*member) {
  Field<PipelineConfig> field = MakeField(name, member);
  field.emit = [member](YAML::Emitter* out, const PipelineConfig& value) {
    EmitStruct(out, FieldsOf<V>(), value.*member, /*flow=*/false);
  };
  return field;
}

// The bound of the batches train.batch_size is multiplied into (x infer_bs for validation,
// x grad_accum_steps per optimizer step and rank): 2^20, which leaves the trainer's int global
// batch (x ranks) room for 2048 ranks.
constexpr int64_t kMaxBatchProduct = int64_t{1} << 20;

// An integer in [min, max]: the upper bounds keep a job from being absurd (a 2^31-epoch plan,
// a million loader threads); configs/pipeline.yaml's comments list them.
Check<int> IntIn(int min, int max) {
  return [min, max](const int& value) {
    if (value >= min && value <= max) return std::string();
    return absl::StrCat("expected an integer in [", min, ", ", max, "]");
  };
}

// A number in (0, max].
Check<double> PositiveAtMost(double max) {
  return [max](const double& value) {
    if (value > 0 && value <= max) return std::string();
    return absl::StrCat("expected a number in (0, ", max, "]");
  };
}

// The shortest text that reads back as `x` (a bound quoted in an error must be a value the
// check accepts: 1/1024 with 6 digits, 0.000976562, is just below it).
std::string BoundText(double x) {
  for (int digits = 6; digits < 17; ++digits) {
    std::string text = absl::StrFormat("%.*g", digits, x);
    if (std::strtod(text.c_str(), nullptr) == x) return text;
  }
  return absl::StrFormat("%.17g", x);
}

// A number in [min, max].
Check<double> NumberIn(double min, double max) {
  return [min, max](const double& value) {
    if (value >= min && value <= max) return std::string();
    return absl::StrCat("expected a number in [", BoundText(min), ", ", BoundText(max), "]");
  };
}

// A number in [0, max].
Check<double> NonNegativeAtMost(double max) {
  return [max](const double& value) {
    if (value >= 0 && value <= max) return std::string();
    return absl::StrCat("expected a number in [0, ", max, "]");
  };
}

Check<int> IntOneOf(std::vector<int> allowed) {
  return [allowed](const int& value) {
    if (std::find(allowed.begin(), allowed.end(), value) != allowed.end()) return std::string();
    return absl::StrCat("expected one of ", absl::StrJoin(allowed, ", "));
  };
}

Check<double> Positive() {
  return [](const double& value) {
    return value > 0 ? std::string() : std::string("expected a number > 0");
  };
}

Check<double> NonNegative() {
  return [](const double& value) {
    return value >= 0 ? std::string() : std::string("expected a number >= 0");
  };
}

Check<double> Probability() {
  return [](const double& value) {
    return value >= 0 && value <= 1 ? std::string()
                                    : std::string("expected a probability in [0, 1]");
  };
}

Check<double> UnitClosed() {
  return [](const double& value) {
    return value >= 0 && value <= 1 ? std::string() : std::string("expected a number in [0, 1]");
  };
}

Check<double> UnitHalfOpen() {
  return [](const double& value) {
    return value >= 0 && value < 1 ? std::string() : std::string("expected a number in [0, 1)");
  };
}

Check<double> DecayFactor() {
  return [](const double& value) {
    return value > 0 && value <= 1 ? std::string() : std::string("expected a number in (0, 1]");
  };
}

Check<std::string> OneOf(std::vector<std::string> allowed) {
  return [allowed](const std::string& value) {
    if (std::find(allowed.begin(), allowed.end(), value) != allowed.end()) return std::string();
    return absl::StrCat("expected one of ", absl::StrJoin(allowed, ", "));
  };
}

Check<std::string> NonEmpty() {
  return [](const std::string& value) {
    // A path of spaces names no file anyone meant (' ' passed, and was looked for as a file).
    return absl::StripAsciiWhitespace(value).empty() ? std::string("expected a non-empty path") : std::string();
  };
}

Check<std::string> IsLayout() {
  return [](const std::string& value) {
    if (ParseLayout(value).ok()) return std::string();
    return absl::StrCat("expected a layout, one of ", absl::StrJoin(LayoutNames(), ", "));
  };
}

// Reads `stages`: every stage starts as {enabled: true, train: <the top-level train>} and takes
// the keys the file gives it.
absl::Status ReadStages(const YAML::Node& node, Origins* origins, PipelineConfig* config) {
  config->stages.clear();
  for (const std::string& name : StageNames()) {
    config->stages[name] = StageConfig{true, config->train};
  }
  if (node.IsNull()) return absl::OkStatus();
  if (!node.IsMap()) {
    return Expected(*origins, "stages", node,
                    absl::StrCat("a map of stages (", absl::StrJoin(StageNames(), ", "), ")"));
  }
  AVIARY_RETURN_IF_ERROR(CheckKeys(node, "stages", *origins, StageNames(), "stage"));
  for (auto it = node.begin(); it != node.end(); ++it) {
    const std::string name = it->first.Scalar();
    const std::string prefix = absl::StrCat("stages.", name);
    const YAML::Node stage_node = it->second;
    if (stage_node.IsMap()) {
      const YAML::Node nested = stage_node["train"];
      if (nested.IsDefined()) {
        const std::string key = absl::StrCat(prefix, ".train");
        return KeyError(origins->Where(key, nested), key,
                        absl::StrCat("per-stage overrides of train.* go directly under the "
                                     "stage, e.g. '",
                                     prefix, ".epochs: 5'"));
      }
    }
    AVIARY_RETURN_IF_ERROR(
        ReadStruct(stage_node, prefix, origins, FieldsOf<StageConfig>(), &config->stages[name]));
    origins->Record(prefix, origins->Where(prefix, stage_node));
  }
  return absl::OkStatus();
}

absl::Status CheckStages(const PipelineConfig& config, const Locator& where) {
  for (const std::string& name : StageNames()) {
    if (config.stages.count(name) == 0) {
      return KeyError(where("stages"), "stages", absl::StrCat("missing stage '", name, "'"));
    }
  }
  const std::vector<std::string>& known = StageNames();
  for (const auto& [name, stage] : config.stages) {
    const std::string prefix = absl::StrCat("stages.", name);
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      return KeyError(
          where(prefix), prefix,
          absl::StrCat("unknown stage (expected one of ", absl::StrJoin(known, ", "), ")"));
    }
    AVIARY_RETURN_IF_ERROR(ValidateValue(stage, prefix, where));
  }
  return absl::OkStatus();
}

// Stages are written as `enabled` plus the train.* keys where the stage differs from `train`.
void EmitStages(YAML::Emitter* out, const PipelineConfig& config) {
  // Pipeline order first, then any unknown names (a hand-built config; Validate rejects them).
  std::vector<std::string> names = StageNames();
  for (const auto& entry : config.stages) {
    if (std::find(names.begin(), names.end(), entry.first) == names.end()) {
      names.push_back(entry.first);
    }
  }
  *out << YAML::BeginMap;
  for (const std::string& name : names) {
    auto it = config.stages.find(name);
    if (it == config.stages.end()) continue;
    const StageConfig& stage = it->second;
    *out << YAML::Key << name << YAML::Value << YAML::Flow << YAML::BeginMap;
    *out << YAML::Key << "enabled" << YAML::Value << stage.enabled;
    for (const Field<TrainConfig>& field : FieldsOf<TrainConfig>()) {
      if (field.equal(stage.train, config.train)) continue;
      *out << YAML::Key << field.name << YAML::Value;
      field.emit(out, stage.train);
    }
    *out << YAML::EndMap;
  }
  *out << YAML::EndMap;
}

template <>
const std::vector<Field<SourceConfig>>& FieldsOf<SourceConfig>() {
  static const auto* fields = new std::vector<Field<SourceConfig>>{
      MakeField("layout", &SourceConfig::layout, IsLayout()),
      MakeField("root", &SourceConfig::root, NonEmpty()),
  };
  return *fields;
}

template <>
const std::vector<Field<DataConfig>>& FieldsOf<DataConfig>() {
  static const auto* fields = new std::vector<Field<DataConfig>>{
      MakeField("sample_rate", &DataConfig::sample_rate, IntIn(1, 384000)),
      MakeField("duration", &DataConfig::duration, PositiveAtMost(600)),
      MakeField("target", &DataConfig::target),
      MakeField("pretrain_sources", &DataConfig::pretrain_sources),
      MakeField("corrupt_files", &DataConfig::corrupt_files),
      MakeField("channels", &DataConfig::channels, OneOf({"first", "mean"})),
      MakeField("cache_dir", &DataConfig::cache_dir),
      MakeField("cache_max_seconds", &DataConfig::cache_max_seconds, NonNegativeAtMost(86400)),
  };
  return *fields;
}

template <>
const std::vector<Field<FoldsConfig>>& FieldsOf<FoldsConfig>() {
  static const auto* fields = new std::vector<Field<FoldsConfig>>{
      MakeField("pretrain_splits", &FoldsConfig::pretrain_splits, IntIn(2, 1000)),
      MakeField("finetune_splits", &FoldsConfig::finetune_splits, IntIn(2, 1000)),
      MakeField("selected_folds", &FoldsConfig::selected_folds),
      MakeField("cv_filter", &FoldsConfig::cv_filter),
      MakeField("cv_filter_thr", &FoldsConfig::cv_filter_thr, IntIn(1, 1000000)),
  };
  return *fields;
}

template <>
const std::vector<Field<SamplingConfig>>& FieldsOf<SamplingConfig>() {
  static const auto* fields = new std::vector<Field<SamplingConfig>>{
      MakeField("upsample_thr", &SamplingConfig::upsample_thr, IntIn(0, 1000000)),
      MakeField("downsample_thr", &SamplingConfig::downsample_thr, IntIn(0, 1000000)),
  };
  return *fields;
}

template <>
const std::vector<Field<FrontendConfig>>& FieldsOf<FrontendConfig>() {
  static const auto* fields = new std::vector<Field<FrontendConfig>>{
      MakeField("n_fft", &FrontendConfig::n_fft, IntIn(2, 65536)),  // MelFrontend::Create refuses 1
      MakeField("hop_length", &FrontendConfig::hop_length, IntIn(1, 65536)),
      MakeField("n_mels", &FrontendConfig::n_mels, IntIn(1, 1024)),
      MakeField("fmin", &FrontendConfig::fmin, NonNegative()),
      MakeField("fmax", &FrontendConfig::fmax, Positive()),
      MakeField("top_db", &FrontendConfig::top_db, PositiveAtMost(1000)),
      MakeField("normalize", &FrontendConfig::normalize,
                OneOf({"per_sample", "per_batch", "none"})),
      MakeField("in_channels", &FrontendConfig::in_channels, IntOneOf({1, 3})),
  };
  return *fields;
}

template <>
const std::vector<Field<AugmentConfig>>& FieldsOf<AugmentConfig>() {
  static const auto* fields = new std::vector<Field<AugmentConfig>>{
      MakeField("audio_augment_prob", &AugmentConfig::audio_augment_prob, Probability()),
      MakeField("noise_prob", &AugmentConfig::noise_prob, Probability()),
      MakeField("noise_std_min", &AugmentConfig::noise_std_min, NonNegativeAtMost(100)),
      MakeField("noise_std_max", &AugmentConfig::noise_std_max, NonNegativeAtMost(100)),
      MakeField("timeshift_prob", &AugmentConfig::timeshift_prob, Probability()),
      MakeField("timeshift_max", &AugmentConfig::timeshift_max, UnitClosed()),
      MakeField("mixup_prob", &AugmentConfig::mixup_prob, Probability()),
      MakeField("mixup_alpha", &AugmentConfig::mixup_alpha, PositiveAtMost(1000)),
      MakeField("cutmix_prob", &AugmentConfig::cutmix_prob, Probability()),
      MakeField("cutmix_alpha", &AugmentConfig::cutmix_alpha, PositiveAtMost(1000)),
      MakeField("time_mask_prob", &AugmentConfig::time_mask_prob, Probability()),
      MakeField("num_time_masks", &AugmentConfig::num_time_masks, IntIn(0, 100)),
      MakeField("time_mask_param", &AugmentConfig::time_mask_param, IntIn(0, 100000)),
      MakeField("freq_mask_prob", &AugmentConfig::freq_mask_prob, Probability()),
      MakeField("num_freq_masks", &AugmentConfig::num_freq_masks, IntIn(0, 100)),
      MakeField("freq_mask_param", &AugmentConfig::freq_mask_param, IntIn(0, 1024)),
  };
  return *fields;
}

template <>
const std::vector<Field<ModelConfig>>& FieldsOf<ModelConfig>() {
  static const auto* fields = new std::vector<Field<ModelConfig>>{
      MakeField("name", &ModelConfig::name,
                OneOf({"efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
                       "small_cnn"})),
      MakeField("pretrain", &ModelConfig::pretrain, OneOf({"none", "imagenet"})),
      MakeField("pretrained_weights", &ModelConfig::pretrained_weights),
      MakeField("neck_features", &ModelConfig::neck_features, IntIn(0, 65536)),
      MakeField("final_act", &ModelConfig::final_act, OneOf({"softmax", "sigmoid"})),
      MakeField("dropout", &ModelConfig::dropout, UnitHalfOpen()),
  };
  return *fields;
}

template <>
const std::vector<Field<TrainConfig>>& FieldsOf<TrainConfig>() {
  static const auto* fields = new std::vector<Field<TrainConfig>>{
      MakeField("batch_size", &TrainConfig::batch_size, IntIn(1, 65536)),
      MakeField("epochs", &TrainConfig::epochs, IntIn(1, 10000)),
      MakeField("optimizer", &TrainConfig::optimizer, OneOf({"Adam", "AdamW"})),
      MakeField("lr", &TrainConfig::lr, PositiveAtMost(100)),
      MakeField("weight_decay", &TrainConfig::weight_decay, NonNegativeAtMost(100)),
      MakeField("scheduler", &TrainConfig::scheduler, OneOf({"cos", "exp", "step", "none"})),
      MakeField("lr_start", &TrainConfig::lr_start, NonNegativeAtMost(100)),
      MakeField("lr_max_per_sample", &TrainConfig::lr_max_per_sample, PositiveAtMost(100)),
      MakeField("lr_min", &TrainConfig::lr_min, NonNegativeAtMost(100)),
      MakeField("lr_ramp_epochs", &TrainConfig::lr_ramp_epochs, IntIn(0, 10000)),
      MakeField("lr_decay", &TrainConfig::lr_decay, DecayFactor()),
      MakeField("lr_step_epochs", &TrainConfig::lr_step_epochs, IntIn(1, 10000)),
      MakeField("lr_per_step", &TrainConfig::lr_per_step),
      MakeField("loss", &TrainConfig::loss, OneOf({"CCE", "BCE"})),
      MakeField("label_smoothing", &TrainConfig::label_smoothing, UnitHalfOpen()),
      MakeField("drop_remainder", &TrainConfig::drop_remainder),
      MakeField("monitor", &TrainConfig::monitor, OneOf({"auc", "roc_auc", "cmap", "acc", "loss"})),
      MakeField("precision", &TrainConfig::precision, OneOf({"auto", "fp32", "bf16"})),
      MakeField("infer_bs", &TrainConfig::infer_bs, IntIn(1, 65536)),
      MakeField("tta", &TrainConfig::tta, IntIn(1, 64)),
      MakeField("skip_nonfinite", &TrainConfig::skip_nonfinite),
      MakeField("num_workers", &TrainConfig::num_workers, IntIn(1, 256)),
      MakeField("deterministic", &TrainConfig::deterministic),
      MakeField("ema_decay", &TrainConfig::ema_decay, UnitHalfOpen()),
      MakeField("ema_warmup_steps", &TrainConfig::ema_warmup_steps, IntIn(0, 100000000)),
      MakeField("ema_eval", &TrainConfig::ema_eval),
      MakeField("grad_clip_norm", &TrainConfig::grad_clip_norm, NonNegativeAtMost(1e6)),
      MakeField("grad_accum_steps", &TrainConfig::grad_accum_steps, IntIn(1, 65536)),
      MakeField("cuda_graph", &TrainConfig::cuda_graph),
      MakeField("early_stop_patience", &TrainConfig::early_stop_patience, IntIn(0, 10000)),
      MakeField("early_stop_min_delta", &TrainConfig::early_stop_min_delta, NonNegativeAtMost(1e6)),
  };
  return *fields;
}

// A stage: `enabled` plus every train.* key, applied to the stage's copy of `train`.
template <>
const std::vector<Field<StageConfig>>& FieldsOf<StageConfig>() {
  static const auto* fields = [] {
    auto* result = new std::vector<Field<StageConfig>>{MakeField("enabled", &StageConfig::enabled)};
    for (const Field<TrainConfig>& train_field : FieldsOf<TrainConfig>()) {
      Field<StageConfig> field;
      field.name = train_field.name;
      field.read = [train_field](const YAML::Node& node, const std::string& key, Origins* origins,
                                 StageConfig* out) {
        return train_field.read(node, key, origins, &out->train);
      };
      field.emit = [train_field](YAML::Emitter* out, const StageConfig& value) {
        train_field.emit(out, value.train);
      };
      field.equal = [train_field](const StageConfig& a, const StageConfig& b) {
        return train_field.equal(a.train, b.train);
      };
      field.check = [train_field](const StageConfig& value, const std::string& key,
                                  const Locator& where) {
        return train_field.check(value.train, key, where);
      };
      result->push_back(std::move(field));
    }
    return result;
  }();
  return *fields;
}

template <>
const std::vector<Field<CommConfig>>& FieldsOf<CommConfig>() {
  static const auto* fields = new std::vector<Field<CommConfig>>{
      MakeField("backend", &CommConfig::backend, OneOf({"auto", "nccl", "mpi"})),
      // At least 1 KiB: the reducer's bucket is bucket_mb x 2^20 bytes, which must not round to 0.
      MakeField("bucket_mb", &CommConfig::bucket_mb, NumberIn(1.0 / 1024, 4096)),
      // At least 1 s: it is the deadline of every collective, the per-step all-reduce included
      // (1 ms failed every attempt of a multi-rank group at the first skew between ranks).
      MakeField("timeout_s", &CommConfig::timeout_s, NumberIn(1, 86400)),
  };
  return *fields;
}

// Sections in file order; `train` comes before `stages`, which copy it.
template <>
const std::vector<Field<PipelineConfig>>& FieldsOf<PipelineConfig>() {
  static const auto* fields = [] {
    auto* result = new std::vector<Field<PipelineConfig>>{
        MakeField("seed", &PipelineConfig::seed),
        MakeField("debug", &PipelineConfig::debug),
        MakeSection("data", &PipelineConfig::data),
        MakeSection("folds", &PipelineConfig::folds),
        MakeSection("sampling", &PipelineConfig::sampling),
        MakeSection("frontend", &PipelineConfig::frontend),
        MakeSection("augment", &PipelineConfig::augment),
        MakeSection("model", &PipelineConfig::model),
        MakeSection("train", &PipelineConfig::train),
    };
    Field<PipelineConfig> stages;
    stages.name = "stages";
    stages.read = [](const YAML::Node& node, const std::string& key, Origins* origins,
                     PipelineConfig* out) { return ReadStages(node, origins, out); };
    stages.emit = [](YAML::Emitter* out, const PipelineConfig& value) { EmitStages(out, value); };
    stages.equal = [](const PipelineConfig& a, const PipelineConfig& b) {
      return a.stages == b.stages;
    };
    stages.check = [](const PipelineConfig& value, const std::string& key, const Locator& where) {
      return CheckStages(value, where);
    };
    result->push_back(std::move(stages));
    result->push_back(MakeSection("comm", &PipelineConfig::comm));
    return result;
  }();
  return *fields;
}

template <typename T>
bool FieldsEqual(const T& a, const T& b) {
  for (const Field<T>& field : FieldsOf<T>()) {
    if (!field.equal(a, b)) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// YAML loading and overrides.

// The same tree without source marks, so that nodes copied from it never claim a file line.
YAML::Node WithoutMarks(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar: return YAML::Node(node.Scalar());
    case YAML::NodeType::Sequence: {
      YAML::Node copy(YAML::NodeType::Sequence);
      for (const YAML::Node& item : node) copy.push_back(WithoutMarks(item));
      return copy;
    }
    case YAML::NodeType::Map: {
      YAML::Node copy(YAML::NodeType::Map);
      for (auto it = node.begin(); it != node.end(); ++it) {
        copy[it->first.Scalar()] = WithoutMarks(it->second);
      }
      return copy;
    }
    default: return YAML::Node(YAML::NodeType::Null);
  }
}

// The default config as a YAML tree (no marks).
YAML::Node DefaultTree() {
  return WithoutMarks(YAML::Load(PipelineConfigToYaml(PipelineConfig{})));
}

void CollectKeys(const YAML::Node& node, const std::string& prefix, std::vector<std::string>* out) {
  if (!node.IsMap()) return;
  for (auto it = node.begin(); it != node.end(); ++it) {
    const std::string key = JoinKey(prefix, it->first.Scalar());
    out->push_back(key);
    CollectKeys(it->second, key, out);
  }
}

const std::vector<std::string>& AllKeys() {
  static const auto* keys = [] {
    auto* result = new std::vector<std::string>;
    CollectKeys(DefaultTree(), "", result);
    return result;
  }();
  return *keys;
}

// Sets `value` at `parts[index..]` below `node` (a map or list). Missing maps on the way are
// taken from `defaults` (the default config) when it has them, else created empty, so that
// "--set data.pretrain_sources.0.root=/x" works on a file that does not list the sources.
// `path` receives the normalised dotted key.
absl::Status SetPath(YAML::Node node, const YAML::Node& defaults,
                     const std::vector<std::string>& parts, size_t index, const YAML::Node& value,
                     const std::string& label, std::vector<std::string>* path) {
  const std::string& part = parts[index];
  const bool last = index + 1 == parts.size();
  const std::string here = path->empty() ? std::string("<top>") : absl::StrJoin(*path, ".");
  if (node.IsSequence()) {
    if (!IsIndex(part)) {
      return absl::InvalidArgumentError(absl::StrCat(
          label, ": '", here, "' is a list; expected an item index, got '", part, "'"));
    }
    size_t item = 0;
    (void)absl::SimpleAtoi(part, &item);
    if (item >= node.size()) {
      return absl::InvalidArgumentError(absl::StrCat(label, ": index ", item, " out of range for '",
                                                     here, "' (a list of ", node.size(),
                                                     " items)"));
    }
    path->push_back(absl::StrCat(item));
    if (last) {
      node[item] = value;
      return absl::OkStatus();
    }
    YAML::Node default_item;
    if (defaults.IsSequence() && item < defaults.size()) default_item = defaults[item];
    return SetPath(node[item], default_item, parts, index + 1, value, label, path);
  }
  if (node.IsMap() || node.IsNull()) {
    path->push_back(part);
    if (last) {
      if (defaults.IsMap()) {
        const YAML::Node section = defaults[part];
        if (section.IsDefined() && section.IsMap()) {
          // A section set whole would drop (or revert to their defaults) the file's other keys in it.
          const std::string key = absl::StrJoin(*path, ".");
          return absl::InvalidArgumentError(absl::StrCat(label, ": '", key, "' is a section; set its keys one by one (",
                                                         key, ".KEY=VALUE)"));
        }
      }
      node[part] = value;
      return absl::OkStatus();
    }
    const YAML::Node& const_node = node;
    const YAML::Node child = const_node[part];
    YAML::Node default_child;
    if (defaults.IsMap()) {
      const YAML::Node found = defaults[part];
      if (found.IsDefined()) default_child = found;
    }
    if (!child.IsDefined() || child.IsNull()) {
      if (default_child.IsMap() || default_child.IsSequence()) {
        node[part] = WithoutMarks(default_child);  // a copy; YAML::Clone marks line 1
      } else {
        node[part] = YAML::Node(YAML::NodeType::Map);
      }
    }
    return SetPath(node[part], default_child, parts, index + 1, value, label, path);
  }
  return absl::InvalidArgumentError(absl::StrCat(label, ": '", here, "' is a single value (",
                                                 Describe(node), "), not a map or list"));
}

absl::Status ApplyOverride(YAML::Node root, const YAML::Node& defaults, const std::string& text,
                           Origins* origins) {
  const std::string label = absl::StrCat("--set ", text);
  const size_t eq = text.find('=');
  if (eq == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": expected dotted.key=value"));
  }
  const std::string key(absl::StripAsciiWhitespace(text.substr(0, eq)));
  const std::string value_text = text.substr(eq + 1);
  if (key.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": empty key (expected dotted.key=value)"));
  }
  const std::vector<std::string> parts = absl::StrSplit(key, '.');
  for (const std::string& part : parts) {
    if (part.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": empty component in key '", key, "'"));
    }
  }
  YAML::Node value;
  try {
    AVIARY_RETURN_IF_ERROR(CheckYamlText(value_text, label));
    value = YAML::Load(value_text);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": value '", value_text, "' is not valid YAML: ", e.msg));
  }
  std::vector<std::string> path;
  AVIARY_RETURN_IF_ERROR(SetPath(root, defaults, parts, 0, value, label, &path));
  origins->AddOverride(text, absl::StrJoin(path, "."));
  return absl::OkStatus();
}

// Range, enum and cross-field checks; `where` locates a dotted key for messages.
absl::Status Validate(const PipelineConfig& config, const Locator& where) {
  AVIARY_RETURN_IF_ERROR(ValidateValue(config, "", where));

  const FoldsConfig& folds = config.folds;
  for (size_t i = 0; i < folds.selected_folds.size(); ++i) {
    const std::string key = absl::StrCat("folds.selected_folds.", i);
    const int fold = folds.selected_folds[i];
    if (fold < 0 || fold >= folds.finetune_splits) {
      return KeyError(where.Any({key, "folds.selected_folds", "folds.finetune_splits"}), key,
                      absl::StrCat("expected a fold in [0, folds.finetune_splits) = [0, ",
                                   folds.finetune_splits, "), got ", Show(fold)));
    }
    for (size_t j = 0; j < i; ++j) {
      if (folds.selected_folds[j] == fold) {
        return KeyError(where.Any({key, "folds.selected_folds"}), key,
                        absl::StrCat("fold ", fold, " is already listed at index ", j));
      }
    }
  }

  const DataConfig& data = config.data;
  if (data.cache_max_seconds > 0 && data.cache_max_seconds < data.duration) {
    return KeyError(where.Any({"data.cache_max_seconds", "data.duration"}), "data.cache_max_seconds",
                    absl::StrCat("expected 0 (whole recordings) or >= data.duration (",
                                 FormatDouble(data.duration), "), got ", Show(data.cache_max_seconds)));
  }

  const SamplingConfig& sampling = config.sampling;
  if (sampling.upsample_thr > 0 && sampling.downsample_thr > 0 &&
      sampling.downsample_thr < sampling.upsample_thr) {
    return KeyError(where.Any({"sampling.downsample_thr", "sampling.upsample_thr"}),
                    "sampling.downsample_thr",
                    absl::StrCat("expected >= sampling.upsample_thr (", sampling.upsample_thr,
                                 ") when both are > 0, got ", Show(sampling.downsample_thr)));
  }

  const FrontendConfig& frontend = config.frontend;
  const double nyquist = config.data.sample_rate / 2.0;
  if (frontend.fmax > nyquist) {
    return KeyError(where.Any({"frontend.fmax", "data.sample_rate"}), "frontend.fmax",
                    absl::StrCat("expected <= data.sample_rate / 2 (", FormatDouble(nyquist),
                                 "), got ", Show(frontend.fmax)));
  }
  if (frontend.fmin >= frontend.fmax) {
    return KeyError(where.Any({"frontend.fmin", "frontend.fmax"}), "frontend.fmin",
                    absl::StrCat("expected < frontend.fmax (", FormatDouble(frontend.fmax),
                                 "), got ", Show(frontend.fmin)));
  }
  if (frontend.hop_length > frontend.n_fft) {
    return KeyError(where.Any({"frontend.hop_length", "frontend.n_fft"}), "frontend.hop_length",
                    absl::StrCat("expected <= frontend.n_fft (", frontend.n_fft, "), got ",
                                 Show(frontend.hop_length)));
  }
  // The STFT's reflect padding (center=True) needs a clip of more than n_fft / 2 samples; the
  // front end refuses shorter ones at the first batch (worker/frontend.h, MinSamples).
  const int64_t clip_samples = std::llround(data.duration * data.sample_rate);
  const int64_t min_samples = frontend.n_fft / 2 + 1;
  if (clip_samples < min_samples) {
    return KeyError(
        where.Any({"data.duration", "data.sample_rate", "frontend.n_fft"}), "data.duration",
        absl::StrCat("expected a clip of at least frontend.n_fft / 2 + 1 = ", min_samples,
                     " samples at data.sample_rate ", data.sample_rate, " (", FormatDouble(
                         static_cast<double>(min_samples) / data.sample_rate),
                     " s), got ", Show(data.duration), " (", clip_samples, " samples)"));
  }

  // small_cnn halves the mel image four times with 2x2 max-pools (worker/models.cc), and torch
  // refuses a pool whose output would be empty: it needs 16 mel bins and 16 frames (MelFrames,
  // as the front end's STFT with center=True makes them).
  if (config.model.name == "small_cnn") {
    const int kSmallCnnMinSize = MinModelFrames("small_cnn");
    if (frontend.n_mels < kSmallCnnMinSize) {
      return KeyError(where.Any({"frontend.n_mels", "model.name"}), "frontend.n_mels",
                      absl::StrCat("expected >= ", kSmallCnnMinSize,
                                   " for model.name small_cnn (four 2x2 max-pools), got ", Show(frontend.n_mels)));
    }
    const int64_t frames = MelFrames(clip_samples, frontend);
    if (frames < kSmallCnnMinSize) {
      return KeyError(
          where.Any({"data.duration", "frontend.hop_length", "data.sample_rate", "model.name"}), "data.duration",
          absl::StrCat("expected a clip of at least ", kSmallCnnMinSize,
                       " frames for model.name small_cnn (four 2x2 max-pools; frames = 1 + ",
                       frontend.n_fft % 2 ? "(samples - 1)" : "samples", " / frontend.hop_length ", frontend.hop_length,
                       frontend.n_fft % 2 ? " with an odd frontend.n_fft" : "", "), got ", Show(data.duration), " (", clip_samples, " samples, ", frames,
                       " frames)"));
    }
  }

  const AugmentConfig& augment = config.augment;
  if (augment.noise_std_min > augment.noise_std_max) {
    return KeyError(
        where.Any({"augment.noise_std_min", "augment.noise_std_max"}), "augment.noise_std_min",
        absl::StrCat("expected <= augment.noise_std_max (", FormatDouble(augment.noise_std_max),
                     "), got ", Show(augment.noise_std_min)));
  }

  if (config.model.pretrain == "imagenet" && config.model.pretrained_weights.empty()) {
    return KeyError(where.Any({"model.pretrained_weights", "model.pretrain"}),
                    "model.pretrained_weights",
                    "expected a weights file when model.pretrain is 'imagenet', got ''");
  }

  // train.ema_eval validates with the averaged weights: there must be an average.
  std::vector<std::pair<std::string, const TrainConfig*>> trains{{"train", &config.train}};
  for (const auto& [name, stage] : config.stages) trains.emplace_back("stages." + name, &stage.train);
  for (const auto& [prefix, train] : trains) {
    if (train->ema_eval && train->ema_decay <= 0) {
      const std::string key = prefix + ".ema_eval";
      return KeyError(where.Any({key, prefix + ".ema_decay", "train.ema_eval", "train.ema_decay"}), key,
                      "expected false while ema_decay is 0 (no average to validate), got true");
    }
    // A CUDA graph replays one captured micro-batch per optimizer step.
    if (train->cuda_graph && train->grad_accum_steps != 1) {
      const std::string key = prefix + ".cuda_graph";
      return KeyError(where.Any({key, prefix + ".grad_accum_steps", "train.cuda_graph", "train.grad_accum_steps"}), key,
                      absl::StrCat("expected false while grad_accum_steps is ", train->grad_accum_steps,
                                   " (a graph replays one micro-batch per optimizer step), got true"));
    }
    // The validation batch (batch_size x infer_bs) and the samples per optimizer step and rank
    // (batch_size x grad_accum_steps) are ints in the trainer and predict: keep them far from
    // overflowing (65536 x 65536 gave a validation batch of 0).
    for (const auto& [factor, value] : {std::pair<const char*, int>{"infer_bs", train->infer_bs},
                                        {"grad_accum_steps", train->grad_accum_steps}}) {
      const int64_t product = int64_t{train->batch_size} * value;
      if (product > kMaxBatchProduct) {
        const std::string key = absl::StrCat(prefix, ".", factor);
        return KeyError(where.Any({key, prefix + ".batch_size", absl::StrCat("train.", factor), "train.batch_size"}),
                        key,
                        absl::StrCat("expected batch_size x ", factor, " <= ", kMaxBatchProduct, " (batch_size is ",
                                     train->batch_size, "), got ", Show(value), " (", product, ")"));
      }
    }
  }

  // torch's BatchNorm refuses a training batch with one value per channel: a model that shrinks
  // the mel image to 1 x 1 (EfficientNet at most 32 x 32) cannot train on batches of one image.
  const int64_t mel_frames = MelFrames(clip_samples, frontend);
  AVIARY_ASSIGN_OR_RETURN(const int64_t norm_plane,
                          SmallestNormPlane(config.model.name, frontend.n_mels, mel_frames));
  for (const auto& [prefix, train] : trains) {
    if (int64_t{train->batch_size} * norm_plane < 2) {
      const std::string key = prefix + ".batch_size";
      return KeyError(
          where.Any({key, "train.batch_size", "model.name", "frontend.n_mels", "data.duration",
                     "frontend.hop_length"}),
          key,
          absl::StrCat("expected >= 2 for model.name ", config.model.name, " on a mel image of ",
                       frontend.n_mels, " x ", mel_frames,
                       " (frontend.n_mels x frames), which it shrinks to 1 x 1: BatchNorm cannot "
                       "train on one value per channel; got ",
                       Show(train->batch_size)));
    }
  }

  auto pretrain = config.stages.find("pretrain");
  if (pretrain != config.stages.end() && pretrain->second.enabled &&
      config.data.pretrain_sources.empty()) {
    return KeyError(where.Any({"data.pretrain_sources", "stages.pretrain.enabled"}),
                    "data.pretrain_sources",
                    "expected at least one source while stages.pretrain.enabled is true, got an "
                    "empty list");
  }
  return absl::OkStatus();
}

absl::StatusOr<PipelineConfig> ParseImpl(const std::string& yaml_text,
                                         const std::string& source_name,
                                         const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    if (absl::Status text = CheckYamlText(yaml_text, source_name); !text.ok()) return text;
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    std::string where = source_name;
    if (!e.mark.is_null() && e.mark.line >= 0) {
      // An error at the end of the input ("end of sequence flow not found") is marked one line
      // past the last one; report the last line instead.
      const int num_lines = static_cast<int>(std::count(yaml_text.begin(), yaml_text.end(), '\n')) +
                            (yaml_text.empty() || yaml_text.back() == '\n' ? 0 : 1);
      where = absl::StrCat(source_name, ":", std::max(1, std::min(e.mark.line + 1, num_lines)));
    }
    return absl::InvalidArgumentError(absl::StrCat(where, ": invalid YAML: ", e.msg));
  }
  if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);  // an empty file: all defaults
  Origins origins(source_name);
  if (!root.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(origins.Where("", root), ": expected a map of sections at the top level, got ",
                     Describe(root)));
  }
  if (!overrides.empty()) {
    const YAML::Node defaults = DefaultTree();
    for (const std::string& text : overrides) {
      AVIARY_RETURN_IF_ERROR(ApplyOverride(root, defaults, text, &origins));
    }
  }

  PipelineConfig config;
  config.source_path = source_name;
  AVIARY_RETURN_IF_ERROR(ReadStruct(root, "", &origins, FieldsOf<PipelineConfig>(), &config));
  const YAML::Node& const_root = root;
  if (!const_root["stages"].IsDefined()) {
    AVIARY_RETURN_IF_ERROR(ReadStages(YAML::Node(YAML::NodeType::Null), &origins, &config));
  }
  Locator locator;
  locator.exact = [&origins](const std::string& key) { return origins.WhereSet(key); };
  locator.fallback = source_name;
  AVIARY_RETURN_IF_ERROR(Validate(config, locator));
  return config;
}

}  // namespace

absl::StatusOr<PipelineConfig> LoadPipelineConfig(const std::string& path,
                                                  const std::vector<std::string>& overrides) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  if (error && status.type() != std::filesystem::file_type::not_found) {
    // A folder on the way that may not be searched (EACCES) is not a missing file.
    return absl::InvalidArgumentError(absl::StrCat("config file '", path, "': ", error.message()));
  }
  if (!std::filesystem::exists(status)) {
    return absl::NotFoundError(absl::StrCat("config file '", path, "' not found"));
  }
  if (std::filesystem::is_directory(status)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config file '", path, "' is a directory, expected a YAML file"));
  }
  absl::StatusOr<std::string> text = ReadFileToString(path, kMaxConfigBytes);
  if (!text.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("config file: ", text.status().message()));
  }
  return ParsePipelineConfig(*text, path, overrides);
}

absl::StatusOr<PipelineConfig> ParsePipelineConfig(const std::string& yaml_text,
                                                   const std::string& source_name,
                                                   const std::vector<std::string>& overrides) {
  try {
    return ParseImpl(yaml_text, source_name, overrides);
  } catch (const YAML::Exception& e) {
    // Not expected: every node access above checks the node's kind first.
    return absl::InvalidArgumentError(absl::StrCat(source_name, ": YAML error: ", e.what()));
  }
}

absl::Status CheckLossMatchesActivation(const PipelineConfig& config, const std::string& source_name,
                                        const std::string& stage) {
  // The stages that train (a disabled one, or train.* that every stage overrides, trains nothing:
  // `stages: {pretrain: {loss: BCE}, finetune: {loss: BCE}}` with sigmoids was refused for the
  // top level's CCE). A stage's loss as train.* gave it is named so.
  std::vector<std::pair<std::string, const TrainConfig*>> trains;
  for (const std::string& name : StageNames()) {
    auto it = config.stages.find(name);
    if (it == config.stages.end() || (stage.empty() ? !it->second.enabled : name != stage)) continue;
    const bool inherited = it->second.train.loss == config.train.loss;
    trains.emplace_back(inherited ? "train" : "stages." + name, &it->second.train);
  }
  if (trains.empty()) trains.emplace_back("train", &config.train);
  for (const auto& [prefix, train] : trains) {
    const std::string act = train->loss == "BCE" ? "sigmoid" : "softmax";
    if (config.model.final_act == act) continue;
    return absl::InvalidArgumentError(absl::StrCat(
        source_name, ": key '", prefix, ".loss': expected ", train->loss == "BCE" ? "CCE" : "BCE",
        " while model.final_act is ", config.model.final_act,
        " (BCE trains sigmoids, CCE a softmax; validation and predict apply model.final_act), got ", train->loss));
  }
  return absl::OkStatus();
}

int64_t MelFrames(int64_t samples, const FrontendConfig& frontend) {
  return 1 + (samples - frontend.n_fft % 2) / frontend.hop_length;
}

int MinModelFrames(const std::string& model_name) { return model_name == "small_cnn" ? 16 : 1; }

absl::Status CheckWindowIsWholeSamples(double window_s, int sample_rate, const std::string& what) {
  const double samples = window_s * sample_rate;
  const double whole = std::round(samples);
  // Within a millionth of a sample, not of the window (5.000004 s, 160000.128 samples, passed;
  // its rows' ids drifted from the windows by 4 us each).
  if (std::abs(samples - whole) <= 1e-6) return absl::OkStatus();
  // The nearest windows of whole samples below and above, in seconds.
  const double below = std::floor(samples) / sample_rate, above = std::ceil(samples) / sample_rate;
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s: %.17g s is %.6f samples at %d Hz, not a whole number (the windows and the row ids, which count "
      "whole windows, would drift apart): take %.17g s (%.0f samples) or %.17g s (%.0f samples)",
      what, window_s, samples, sample_rate, below, std::floor(samples), above, std::ceil(samples)));
}

absl::Status CheckWindowFitsModel(const PipelineConfig& config, int64_t samples, const std::string& what) {
  const int min_frames = MinModelFrames(config.model.name);
  const int64_t frames = MelFrames(samples, config.frontend);
  if (frames >= min_frames) return absl::OkStatus();
  const int odd = config.frontend.n_fft % 2;
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s: %d samples make %d frames (1 + %s / frontend.hop_length %d%s), fewer than model %s takes (%d: "
      "at least %g s at %d Hz)",
      what, samples, frames, odd ? "(samples - 1)" : "samples", config.frontend.hop_length,
      odd ? " with an odd frontend.n_fft" : "",
      config.model.name, min_frames,
      static_cast<double>((min_frames - 1) * int64_t{config.frontend.hop_length} + odd) / config.data.sample_rate,
      config.data.sample_rate));
}

absl::Status CheckBeforeRun(const PipelineConfig& config, const std::string& source_name, const std::string& stage) {
  if (const std::vector<std::string>& names = StageNames();
      !stage.empty() && std::find(names.begin(), names.end(), stage) == names.end()) {
    // Checked the top level's train.* instead, as if no stage had been named.
    return absl::InvalidArgumentError(absl::StrCat(source_name, ": unknown stage '", stage, "' (expected one of ",
                                                   absl::StrJoin(StageNames(), ", "), ")"));
  }
  AVIARY_RETURN_IF_ERROR(CheckLossMatchesActivation(config, source_name, stage));
  if (config.model.pretrain == "none" && !config.model.pretrained_weights.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source_name, ": key 'model.pretrained_weights': expected '' while model.pretrain is 'none' (the file "
        "would not be loaded), got ", Quote(config.model.pretrained_weights),
        "; set model.pretrain=imagenet to start from it"));
  }
  return absl::OkStatus();
}

TrainConfig WithoutUnreadKeys(const TrainConfig& train) {
  const TrainConfig defaults;
  TrainConfig out = train;
  const std::string& scheduler = train.scheduler;
  if (scheduler != "none") out.lr = defaults.lr;
  if (scheduler == "none") {
    out.lr_start = defaults.lr_start;
    out.lr_max_per_sample = defaults.lr_max_per_sample;
    out.lr_ramp_epochs = defaults.lr_ramp_epochs;
    out.lr_per_step = defaults.lr_per_step;
  }
  if (scheduler != "cos" && scheduler != "exp") out.lr_min = defaults.lr_min;
  if (scheduler != "exp" && scheduler != "step") out.lr_decay = defaults.lr_decay;
  if (scheduler != "step") out.lr_step_epochs = defaults.lr_step_epochs;
  if (train.early_stop_patience == 0) out.early_stop_min_delta = defaults.early_stop_min_delta;
  if (train.ema_decay <= 0) out.ema_warmup_steps = defaults.ema_warmup_steps;
  return out;
}

absl::Status ValidatePipelineConfig(const PipelineConfig& config) {
  Locator locator;
  locator.fallback = config.source_path;
  return Validate(config, locator);
}

std::string PipelineConfigToYaml(const PipelineConfig& config) {
  YAML::Emitter out;
  out.SetIndent(2);
  out << YAML::BeginMap;
  for (const Field<PipelineConfig>& field : FieldsOf<PipelineConfig>()) {
    out << YAML::Key << field.name << YAML::Value;
    field.emit(&out, config);
  }
  out << YAML::EndMap;
  return absl::StrCat(out.c_str(), "\n");
}

namespace {

// Scalars and lists by dotted key ("train.lr", "stages.finetune.epochs"), as flow YAML text.
void FlattenYaml(const YAML::Node& node, const std::string& prefix, std::map<std::string, std::string>* out) {
  if (node.IsMap()) {
    for (const auto& kv : node) {
      const std::string key = kv.first.as<std::string>();
      FlattenYaml(kv.second, prefix.empty() ? key : absl::StrCat(prefix, ".", key), out);
    }
    return;
  }
  YAML::Emitter e;
  e << YAML::Flow << node;
  (*out)[prefix] = e.c_str();
}

}  // namespace

std::vector<ConfigDifference> DiffPipelineConfigs(const PipelineConfig& before, const PipelineConfig& after) {
  std::map<std::string, std::string> a, b;
  FlattenYaml(YAML::Load(PipelineConfigToYaml(before)), "", &a);
  FlattenYaml(YAML::Load(PipelineConfigToYaml(after)), "", &b);
  std::vector<ConfigDifference> out;
  for (const auto& [key, value] : a) {
    auto it = b.find(key);
    if (it == b.end()) {
      out.push_back({key, value, "(absent)"});
    } else if (it->second != value) {
      out.push_back({key, value, it->second});
    }
  }
  for (const auto& [key, value] : b) {
    if (a.count(key) == 0) out.push_back({key, "(absent)", value});
  }
  std::sort(out.begin(), out.end(),
            [](const ConfigDifference& x, const ConfigDifference& y) { return x.key < y.key; });
  return out;
}

absl::StatusOr<const StageConfig*> GetStage(const PipelineConfig& config,
                                            const std::string& stage) {
  auto it = config.stages.find(stage);
  if (it == config.stages.end()) {
    return absl::InvalidArgumentError(absl::StrCat("unknown stage '", stage, "' (expected one of ",
                                                   absl::StrJoin(StageNames(), ", "), ")"));
  }
  return &it->second;
}

size_t EditDistance(const std::string& a, const std::string& b) {
  // Two rows.
  std::vector<size_t> previous(b.size() + 1), current(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) previous[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    current[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t substitution = previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      current[j] = std::min({previous[j] + 1, current[j - 1] + 1, substitution});
    }
    std::swap(previous, current);
  }
  return previous[b.size()];
}

std::string DidYouMean(const std::string& key, const std::vector<std::string>& candidates) {
  const size_t max_distance = std::max<size_t>(2, key.size() / 3);
  std::string best;
  size_t best_distance = max_distance + 1;
  for (const std::string& candidate : candidates) {
    const size_t distance = EditDistance(key, candidate);
    if (distance < best_distance) {
      best_distance = distance;
      best = candidate;
    }
  }
  return best;
}

bool operator==(const SourceConfig& a, const SourceConfig& b) { return FieldsEqual(a, b); }
bool operator==(const DataConfig& a, const DataConfig& b) { return FieldsEqual(a, b); }
bool operator==(const FoldsConfig& a, const FoldsConfig& b) { return FieldsEqual(a, b); }
bool operator==(const SamplingConfig& a, const SamplingConfig& b) { return FieldsEqual(a, b); }
bool operator==(const FrontendConfig& a, const FrontendConfig& b) { return FieldsEqual(a, b); }
bool operator==(const AugmentConfig& a, const AugmentConfig& b) { return FieldsEqual(a, b); }
bool operator==(const ModelConfig& a, const ModelConfig& b) { return FieldsEqual(a, b); }
bool operator==(const TrainConfig& a, const TrainConfig& b) { return FieldsEqual(a, b); }
bool operator==(const StageConfig& a, const StageConfig& b) { return FieldsEqual(a, b); }
bool operator==(const CommConfig& a, const CommConfig& b) { return FieldsEqual(a, b); }
bool operator==(const PipelineConfig& a, const PipelineConfig& b) { return FieldsEqual(a, b); }

namespace {

// Finds what CheckYamlText refuses among the parser's events: aliases and a second document.
class YamlShapeCheck : public YAML::EventHandler {
 public:
  void OnDocumentStart(const YAML::Mark& mark) override {
    if (++documents_ == 2) second_ = mark;
  }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark& mark, YAML::anchor_t) override {
    if (!alias_) alias_ = mark;
  }
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
  void OnMapEnd() override {}

  int documents_ = 0;
  YAML::Mark second_;
  std::optional<YAML::Mark> alias_;
};

}  // namespace

absl::Status CheckYamlText(const std::string& text, const std::string& source) {
  if (const size_t bad = FirstInvalidUtf8(text); bad != std::string::npos) {
    const size_t line_start = text.rfind('\n', bad == 0 ? 0 : bad - 1);
    const size_t column = bad - (line_start == std::string::npos || bad == 0 ? 0 : line_start + 1) + 1;
    const int64_t line = std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(bad), '\n') + 1;
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s:%d:%d: byte 0x%02x is not UTF-8 (paths and values are kept as UTF-8 text: in checkpoints, config.yaml "
        "and the service's messages)",
        source, line, column, static_cast<unsigned char>(text[bad])));
  }
  YamlShapeCheck check;
  try {
    std::istringstream in(text);
    YAML::Parser parser(in);
    while (parser.HandleNextDocument(check)) {
    }
  } catch (const YAML::Exception&) {
    // A syntax error: YAML::Load says what is wrong, with its line; unless it lies in a second
    // document, which YAML::Load would not even read.
    if (check.documents_ < 2) return absl::OkStatus();
  }
  if (check.documents_ > 1) {
    return absl::InvalidArgumentError(absl::StrCat(source, ":", check.second_.line + 1,
                                                   ": a second YAML document ('---'); a config is one document, "
                                                   "and the rest would be ignored"));
  }
  if (check.alias_) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ":", check.alias_->line + 1,
        ": a YAML alias (*name); not supported in a config: a --set through it would change every place the "
        "anchor's value stands (write the value out)"));
  }
  return absl::OkStatus();
}

bool IsUntypedScalar(const YAML::Node& node) {
  const std::string& tag = node.Tag();
  // "" for a node made in code (a coordinator flag's value, as typed), "?" for a plain scalar;
  // of the explicit tags only those of numbers and booleans (!!null 5 or !!binary 32 is no number).
  return tag.empty() || tag == "?" || tag == "tag:yaml.org,2002:int" || tag == "tag:yaml.org,2002:float" ||
         tag == "tag:yaml.org,2002:bool";
}

absl::Status CheckYamlString(const std::string& text) {
  // YAML's escapes ("\0", "\x07") make characters no file name or label holds: a NUL cut every
  // path at it (the path policy checked "/data/c" of "/data/c\0x"), while messages and the stored
  // config carried the whole string. DEL, the C1 controls (U+0080-U+009F) and the line and
  // paragraph separators (U+2028, U+2029) break a log or a CSV line as a newline does.
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    const auto next = [&](size_t k) { return i + k < text.size() ? static_cast<unsigned char>(text[i + k]) : 0; };
    const bool control = (c < 0x20 && c != '\t') || c == 0x7f || (c == 0xc2 && next(1) >= 0x80 && next(1) <= 0x9f) ||
                         (c == 0xe2 && next(1) == 0x80 && (next(2) == 0xa8 || next(2) == 0xa9));
    if (!control) continue;
    return absl::InvalidArgumentError(
        absl::StrCat("expected a string without control characters (a YAML escape such as \\0, \\n or \\N), got '",
                     absl::CHexEscape(text.substr(0, 200)), "'"));
  }
  // yaml-cpp writes "\N" as the lone byte 0x85, not as U+0085: no UTF-8 reader takes it back.
  if (const size_t bad = FirstInvalidUtf8(text); bad != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "expected UTF-8 text, got byte 0x%02x at %d (a YAML escape such as \\N)", static_cast<unsigned char>(text[bad]), bad));
  }
  return absl::OkStatus();
}

bool IsDecimalNumber(absl::string_view text) {
  size_t i = 0;
  auto digits = [&] {
    const size_t start = i;
    while (i < text.size() && absl::ascii_isdigit(static_cast<unsigned char>(text[i]))) ++i;
    return i - start;
  };
  if (i < text.size() && (text[i] == '-' || text[i] == '+')) ++i;
  size_t mantissa = digits();
  if (i < text.size() && text[i] == '.') {
    ++i;
    mantissa += digits();
  }
  if (mantissa == 0) return false;
  if (i < text.size() && (text[i] == 'e' || text[i] == 'E')) {
    ++i;
    if (i < text.size() && (text[i] == '-' || text[i] == '+')) ++i;
    if (digits() == 0) return false;
  }
  return i == text.size();
}

bool HasLeadingZero(const std::string& text) {
  absl::string_view digits = absl::StripAsciiWhitespace(text);
  if (!digits.empty() && (digits[0] == '-' || digits[0] == '+')) digits.remove_prefix(1);
  return digits.size() > 1 && digits[0] == '0';
}

bool ParseYamlBool(const YAML::Node& node, bool* out) {
  // "false" quoted is a string (truthy to a Python reader of the same file).
  if (!node.IsScalar() || !IsUntypedScalar(node)) return false;
  const std::string& text = node.Scalar();
  // PyYAML's forms: all lower, Title or all UPPER ("tRuE" is a string to it).
  const std::string lower = absl::AsciiStrToLower(text);
  std::string title = lower;
  if (!title.empty()) title[0] = absl::ascii_toupper(static_cast<unsigned char>(title[0]));
  if (text != lower && text != title && text != absl::AsciiStrToUpper(text)) return false;
  if (lower == "true" || lower == "yes" || lower == "on") {
    *out = true;
  } else if (lower == "false" || lower == "no" || lower == "off") {
    *out = false;
  } else {
    return false;
  }
  return true;
}

// At most 200 bytes (at a character's start) of a long value: a message goes back to a client in
// a gRPC status, whose metadata has a size limit. Control characters are shown escaped (an ESC
// from a YAML "\e" reached the terminal).
std::string ShownYamlText(const std::string& text) {
  constexpr size_t kShown = 200;
  size_t cut = std::min(kShown, text.size());
  while (cut > 0 && cut < text.size() && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  std::string shown;
  for (size_t i = 0; i < cut; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f) {
      absl::StrAppend(&shown, absl::CHexEscape(absl::string_view(&text[i], 1)));
    } else {
      shown.push_back(text[i]);
    }
  }
  if (cut == text.size()) return absl::StrCat("'", shown, "'");
  return absl::StrCat("'", shown, "...' (", text.size(), " bytes)");
}

std::string DescribeYamlNode(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar: return ShownYamlText(node.Scalar());
    case YAML::NodeType::Null: return "an empty value";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a map";
    case YAML::NodeType::Undefined: break;
  }
  return "nothing";
}

}  // namespace aviary::common
