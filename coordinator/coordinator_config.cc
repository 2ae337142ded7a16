#include "coordinator/coordinator_config.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <tuple>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/config.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/status.h"
#include "common/tokens.h"
#include "common/utf8.h"
#include "common/yaml_util.h"
#include "coordinator/path_policy.h"
#include "yaml-cpp/yaml.h"

namespace aviary::coordinator {
namespace {

namespace fs = std::filesystem;

// Where a value came from: "file:line" or the override's label; plus the folder relative paths
// resolve against.
struct Origin {
  std::string where;
  std::string base_dir;
};

absl::Status KeyError(const Origin& origin, const std::string& key, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(origin.where, ": key '", key, "': ", message));
}

std::string Describe(const YAML::Node& node) { return common::DescribeYamlNode(node); }

using Reader =
    std::function<absl::Status(const YAML::Node&, const Origin&, const std::string&, CoordinatorConfig*)>;

Reader String(std::string CoordinatorConfig::*member, bool is_path) {
  return [member, is_path](const YAML::Node& node, const Origin& origin, const std::string& key,
                           CoordinatorConfig* out) -> absl::Status {
    if (node.IsNull()) {
      out->*member = "";
      return absl::OkStatus();
    }
    if (!node.IsScalar()) return KeyError(origin, key, absl::StrCat("expected a string, got ", Describe(node)));
    std::string value = node.Scalar();
    // As the pipeline config: a YAML escape ("\0") makes a character no path holds, and a NUL cut
    // the path the OS saw while messages showed the whole string.
    if (absl::Status bad = common::CheckYamlString(value); !bad.ok()) {
      return KeyError(origin, key, std::string(bad.message()));
    }
    if (is_path && !value.empty() && fs::path(value).is_relative() && !origin.base_dir.empty()) {
      value = (fs::path(origin.base_dir) / value).lexically_normal().string();
    }
    out->*member = value;
    return absl::OkStatus();
  };
}

Reader Bool(bool CoordinatorConfig::*member) {
  return [member](const YAML::Node& node, const Origin& origin, const std::string& key,
                  CoordinatorConfig* out) -> absl::Status {
    if (!common::ParseYamlBool(node, &(out->*member))) {
      return KeyError(origin, key, absl::StrCat("expected true or false",
                                                common::IsUntypedScalar(node) ? "" : " (not quoted or tagged)", ", got ",
                                                Describe(node)));
    }
    return absl::OkStatus();
  };
}

// A finite number of `unit` ("seconds", "days").
Reader Double(double CoordinatorConfig::*member, const char* unit) {
  return [member, unit](const YAML::Node& node, const Origin& origin, const std::string& key,
                        CoordinatorConfig* out) -> absl::Status {
    double value = 0;
    // Plain decimal text, as the pipeline config reads numbers (common/yaml_util.h): a quoted
    // "30" or a hex float is a string to other YAML readers.
    if (!node.IsScalar() || !common::IsUntypedScalar(node) || !common::IsDecimalNumber(node.Scalar()) ||
        !absl::SimpleAtod(node.Scalar(), &value) || !std::isfinite(value)) {
      return KeyError(origin, key, absl::StrCat("expected a number of ", unit,
                                                common::IsUntypedScalar(node) ? "" : " (not quoted or tagged)", ", got ",
                                                Describe(node)));
    }
    if (common::HasLeadingZero(node.Scalar()) && node.Scalar().find_first_of(".eE") == std::string::npos) {
      return KeyError(origin, key, absl::StrCat("expected a number without a leading zero (YAML 1.1 reads 010 as "
                                                "octal 8), got ", Describe(node)));
    }
    out->*member = value;
    return absl::OkStatus();
  };
}

// An integer in [min, max] (a huge one, beyond int, is refused by that range too).
Reader Int(int CoordinatorConfig::*member, int min, int max) {
  return [member, min, max](const YAML::Node& node, const Origin& origin, const std::string& key,
                            CoordinatorConfig* out) -> absl::Status {
    std::string text = node.IsScalar() ? std::string(absl::StripAsciiWhitespace(node.Scalar())) : "";
    const bool digits = !text.empty() && std::all_of(text.begin() + (text[0] == '-' || text[0] == '+'), text.end(),
                                                     [](char c) { return c >= '0' && c <= '9'; }) &&
                        text.size() > static_cast<size_t>(text[0] == '-' || text[0] == '+');
    int64_t value = 0;
    if (!digits || !common::IsUntypedScalar(node)) {
      return KeyError(origin, key, absl::StrCat("expected an integer", common::IsUntypedScalar(node) ? "" : " (not quoted or tagged)",
                                                ", got ", Describe(node)));
    }
    if (common::HasLeadingZero(text)) {
      return KeyError(origin, key, absl::StrCat("expected an integer without a leading zero (YAML 1.1 reads 010 as "
                                                "octal 8), got ", Describe(node)));
    }
    if (!absl::SimpleAtoi(text, &value) || value < min || value > max) {
      return KeyError(origin, key, absl::StrCat("expected an integer in ", min, "..", max, ", got ", Describe(node)));
    }
    out->*member = static_cast<int>(value);
    return absl::OkStatus();
  };
}

// A list of folders: a YAML sequence, or one string of comma-separated folders (as --set gives
// it). Relative ones resolve against the origin's folder. Each is realpath-resolved and must be
// an existing directory: checked once the flags are applied (ResolveDataRoots), so that a flag
// can stand in for a file's root that is not there (a share not mounted).
Reader PathList(std::vector<std::string> CoordinatorConfig::*member) {
  return [member](const YAML::Node& node, const Origin& origin, const std::string& key,
                  CoordinatorConfig* out) -> absl::Status {
    std::vector<std::string> items;
    if (node.IsNull()) {
      // An empty list.
    } else if (node.IsSequence()) {
      for (size_t i = 0; i < node.size(); ++i) {
        if (!node[i].IsScalar()) {
          return KeyError(origin, key, absl::StrCat("item ", i, ": expected a folder, got ", Describe(node[i])));
        }
        items.push_back(node[i].Scalar());
      }
    } else if (node.IsScalar()) {
      for (absl::string_view item : absl::StrSplit(node.Scalar(), ',')) {
        item = absl::StripAsciiWhitespace(item);
        if (!item.empty()) items.emplace_back(item);
      }
    } else {
      return KeyError(origin, key, absl::StrCat("expected a list of folders, got ", Describe(node)));
    }
    for (std::string& item : items) {
      if (!item.empty() && fs::path(item).is_relative() && !origin.base_dir.empty()) {
        item = (fs::path(origin.base_dir) / item).lexically_normal().string();
      }
    }
    out->*member = std::move(items);  // an empty one is ResolveDataRoots' to refuse
    return absl::OkStatus();
  };
}

struct Field {
  std::string name;
  Reader read;
  bool takes_list = false;  // a --set value "[a, b]" is read as a YAML sequence
};

const std::vector<Field>& Fields() {
  static const std::vector<Field> kFields{
      {"listen", String(&CoordinatorConfig::listen, false)},
      {"port_file", String(&CoordinatorConfig::port_file, true)},
      {"metrics_listen", String(&CoordinatorConfig::metrics_listen, false)},
      {"metrics_port_file", String(&CoordinatorConfig::metrics_port_file, true)},
      {"console_listen", String(&CoordinatorConfig::console_listen, false)},
      {"console_port_file", String(&CoordinatorConfig::console_port_file, true)},
      {"console_grafana_url", String(&CoordinatorConfig::console_grafana_url, false)},
      {"database", String(&CoordinatorConfig::database, true)},
      {"work_dir", String(&CoordinatorConfig::work_dir, true)},
      {"data_roots", PathList(&CoordinatorConfig::data_roots), true},
      {"token_file", String(&CoordinatorConfig::token_file, true)},
      {"viewer_token_file", String(&CoordinatorConfig::viewer_token_file, true)},
      {"worker_token_file", String(&CoordinatorConfig::worker_token_file, true)},
      {"allow_no_auth", Bool(&CoordinatorConfig::allow_no_auth)},
      {"tls_cert_file", String(&CoordinatorConfig::tls_cert_file, true)},
      {"tls_key_file", String(&CoordinatorConfig::tls_key_file, true)},
      {"tls_client_ca_file", String(&CoordinatorConfig::tls_client_ca_file, true)},
      {"heartbeat_interval_s", Double(&CoordinatorConfig::heartbeat_interval_s, "seconds")},
      {"heartbeat_timeout_s", Double(&CoordinatorConfig::heartbeat_timeout_s, "seconds")},
      {"max_restarts", Int(&CoordinatorConfig::max_restarts, 0, 1000)},
      {"retention_days", Double(&CoordinatorConfig::retention_days, "days")},
      {"log_level", String(&CoordinatorConfig::log_level, false)},
  };
  return kFields;
}

const Field* FindField(const std::string& name) {
  for (const Field& field : Fields()) {
    if (field.name == name) return &field;
  }
  return nullptr;
}

absl::Status UnknownKey(const std::string& where, const std::string& key) {
  std::string hint;
  const std::string suggestion = common::DidYouMean(key, CoordinatorConfigKeys());
  if (!suggestion.empty()) {
    hint = absl::StrCat(" (did you mean '", suggestion, "'?)");
  } else {
    hint = absl::StrCat(" (expected one of ", absl::StrJoin(CoordinatorConfigKeys(), ", "), ")");
  }
  return absl::InvalidArgumentError(absl::StrCat(where, ": unknown key ", common::ShownYamlText(key), hint));
}

// Checks that `address` is one HOST:PORT with a port of digits in 0..65535: no comma (civetweb
// would open a second listener for "127.0.0.1:0,0.0.0.0:0"), no sign, space or civetweb suffix
// in the port ("+0", "80s").
absl::Status CheckAddress(const std::string& key, const std::string& address, bool may_be_empty) {
  if (address.empty()) {
    if (may_be_empty) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("key '", key, "': the address is empty"));
  }
  if (address.find(',') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("key '", key, "': '", address, "' holds a comma: one HOST:PORT only"));
  }
  const size_t colon = address.rfind(':');
  const absl::string_view digits =
      colon == std::string::npos ? absl::string_view() : absl::string_view(address).substr(colon + 1);
  int port = -1;
  if (colon == std::string::npos || colon == 0 || digits.empty() || digits.size() > 5 ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      !absl::SimpleAtoi(digits, &port) || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("key '", key, "': '", address,
                                                   "' is not HOST:PORT with a port of digits in 0..65535"));
  }
  return absl::OkStatus();
}

// With TLS the console is served by TlsFront (coordinator/tls_front.h), which binds a numeric
// IPv4 address only.
absl::Status CheckTlsConsoleAddress(const std::string& address) {
  const std::string host = address.substr(0, address.rfind(':'));
  in_addr ignored{};
  if (::inet_pton(AF_INET, host.c_str(), &ignored) != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key 'console_listen': '", address, "': with TLS (tls_cert_file) the console listens on a numeric IPv4 "
        "address only, e.g. 0.0.0.0:8443 or 127.0.0.1:8443 ('", host, "' is not one)"));
  }
  return absl::OkStatus();
}

}  // namespace

const std::vector<std::string>& CoordinatorConfigKeys() {
  static const std::vector<std::string> kKeys = [] {
    std::vector<std::string> keys;
    for (const Field& field : Fields()) keys.push_back(field.name);
    return keys;
  }();
  return kKeys;
}

const std::vector<std::pair<std::string, std::string>>& CoordinatorFlagKeys() {
  static const std::vector<std::pair<std::string, std::string>> kFlags{
      {"listen", "listen"},
      {"port-file", "port_file"},
      {"metrics-listen", "metrics_listen"},
      {"metrics-port-file", "metrics_port_file"},
      {"console-listen", "console_listen"},
      {"console-port-file", "console_port_file"},
      {"database", "database"},
      {"work-dir", "work_dir"},
      {"token-file", "token_file"},
      {"viewer-token-file", "viewer_token_file"},
      {"worker-token-file", "worker_token_file"},
      {"heartbeat-timeout-s", "heartbeat_timeout_s"},
      {"max-restarts", "max_restarts"},
      {"log-level", "log_level"},
  };
  return kFlags;
}

absl::StatusOr<ConfigOverride> ParseSetOverride(const std::string& text) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--set ", text, ": expected key=value (e.g. --set listen=0.0.0.0:7070)"));
  }
  return ConfigOverride{text.substr(0, eq), text.substr(eq + 1), absl::StrCat("--set ", text)};
}

absl::StatusOr<CoordinatorConfig> ParseCoordinatorConfig(const std::string& yaml_text,
                                                         const std::string& source_name,
                                                         const std::string& base_dir,
                                                         const std::vector<ConfigOverride>& overrides) {
  CoordinatorConfig config;
  config.source_path = source_name;
  std::map<std::string, std::string> set_at;  // key -> where its value came from
  YAML::Node root;
  try {
    if (absl::Status text = common::CheckYamlText(yaml_text, source_name); !text.ok()) return text;
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    std::string where = source_name;
    if (!e.mark.is_null() && e.mark.line >= 0) {
      // An error at the end of the input ("end of sequence flow not found") is marked one line
      // past the last one; name the last line instead (as the pipeline config does).
      const int num_lines = static_cast<int>(std::count(yaml_text.begin(), yaml_text.end(), '\n')) +
                            (yaml_text.empty() || yaml_text.back() == '\n' ? 0 : 1);
      where = absl::StrCat(source_name, ":", std::max(1, std::min(e.mark.line + 1, num_lines)));
    }
    return absl::InvalidArgumentError(absl::StrCat(where, ": YAML syntax error: ", e.msg));
  }
  if (root.IsDefined() && !root.IsNull()) {
    if (!root.IsMap()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source_name, ": expected a map of keys at the top, got ", Describe(root)));
    }
    std::map<std::string, std::string> seen;
    for (auto it = root.begin(); it != root.end(); ++it) {
      const YAML::Node key_node = it->first;
      const std::string where = absl::StrCat(source_name, ":", key_node.Mark().line + 1);
      if (!key_node.IsScalar()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": expected a key name, got ", Describe(key_node)));
      }
      const std::string& name = key_node.Scalar();
      const Field* field = FindField(name);
      if (field == nullptr) return UnknownKey(where, name);
      auto [previous, inserted] = seen.emplace(name, where);
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": duplicate key '", name,
                                                       "' (first set at ", previous->second, ")"));
      }
      const YAML::Node value = it->second;
      const Origin origin{absl::StrCat(source_name, ":", value.Mark().line + 1), base_dir};
      AVIARY_RETURN_IF_ERROR(field->read(value, origin, name, &config));
      set_at[name] = origin.where;
    }
  }
  const std::string cwd = fs::current_path().string();
  for (const ConfigOverride& override_value : overrides) {
    const Field* field = FindField(override_value.key);
    if (field == nullptr) return UnknownKey(override_value.label, override_value.key);
    // The text as typed, a scalar: "[::]:7070", "/srv/a: b" and "@x.db" are a listen address and
    // paths, not YAML (and YAML would read "on" as a bool). Only a list key's "[a, b]" is YAML.
    YAML::Node value(YAML::NodeType::Null);
    const std::string& text = override_value.value;
    if (const size_t bad = common::FirstInvalidUtf8(text); bad != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: key '%s': byte 0x%02x is not UTF-8", override_value.label,
                                                        override_value.key, static_cast<unsigned char>(text[bad])));
    }
    if (field->takes_list && absl::StartsWith(absl::StripLeadingAsciiWhitespace(text), "[")) {
      try {
        AVIARY_RETURN_IF_ERROR(common::CheckYamlText(text, override_value.label));
        value = YAML::Load(text);
      } catch (const YAML::Exception& e) {
        return absl::InvalidArgumentError(absl::StrCat(override_value.label, ": key '", override_value.key,
                                                       "': the list does not parse as YAML: ", e.msg));
      }
    } else if (!text.empty()) {
      value = YAML::Node(text);
    }
    const Origin origin{override_value.label, cwd};
    AVIARY_RETURN_IF_ERROR(field->read(value, origin, override_value.key, &config));
    set_at[override_value.key] = origin.where;
  }
  // A root not there now (UNAVAILABLE: a share not mounted yet) is said after every other
  // error: a caller may wait for it (the coordinator exits 1, which systemd restarts), never for
  // a config that is wrong as well.
  absl::Status roots_unavailable;
  if (!config.data_roots.empty()) {
    auto resolved = ResolveDataRoots("data_roots", config.data_roots);
    if (absl::IsUnavailable(resolved.status())) {
      roots_unavailable = common::Annotate(resolved.status(), set_at["data_roots"]);
    } else if (!resolved.ok()) {
      return common::Annotate(resolved.status(), set_at["data_roots"]);
    } else {
      config.data_roots = std::move(*resolved);
    }
  }
  absl::Status valid = ValidateCoordinatorConfig(config);
  if (!valid.ok()) {
    // Point at the file line or flag that set the key the message starts with.
    absl::string_view message = valid.message();
    std::string where = source_name;
    if (absl::ConsumePrefix(&message, "key '")) {
      const std::string key(message.substr(0, message.find('\'')));
      auto it = set_at.find(key);
      if (it != set_at.end()) {
        where = it->second;
      } else if (key == "heartbeat_timeout_s" && set_at.count("heartbeat_interval_s") != 0) {
        // The timeout left at its default, too short for the interval set: the line that set
        // the interval is the one to look at.
        const absl::Status hinted(valid.code(), absl::StrCat(valid.message(),
                                                             " (heartbeat_timeout_s is not set: its default is ",
                                                             CoordinatorConfig().heartbeat_timeout_s,
                                                             " s; set it with heartbeat_interval_s)"));
        return common::Annotate(hinted, set_at["heartbeat_interval_s"]);
      }
    }
    return where.empty() ? valid : common::Annotate(valid, where);
  }
  if (!roots_unavailable.ok()) return roots_unavailable;
  return config;
}

absl::StatusOr<CoordinatorConfig> LoadCoordinatorConfig(const std::string& path,
                                                        const std::vector<ConfigOverride>& overrides) {
  if (path.empty()) {
    return ParseCoordinatorConfig("", "", fs::current_path().string(), overrides);
  }
  AVIARY_ASSIGN_OR_RETURN(std::string text, common::ReadFileToString(path, common::kMaxConfigBytes));
  std::error_code ec;
  fs::path absolute = fs::absolute(path, ec);
  const std::string base = ec ? fs::path(path).parent_path().string()
                              : absolute.parent_path().string();
  return ParseCoordinatorConfig(text, path, base, overrides);
}

absl::Status ValidateCoordinatorConfig(const CoordinatorConfig& config) {
  AVIARY_RETURN_IF_ERROR(CheckAddress("listen", config.listen, false));
  AVIARY_RETURN_IF_ERROR(CheckAddress("metrics_listen", config.metrics_listen, true));
  AVIARY_RETURN_IF_ERROR(CheckAddress("console_listen", config.console_listen, true));
  if (!config.console_grafana_url.empty() && !absl::StartsWith(config.console_grafana_url, "http://") &&
      !absl::StartsWith(config.console_grafana_url, "https://")) {
    return absl::InvalidArgumentError(absl::StrCat("key 'console_grafana_url': '", config.console_grafana_url,
                                                   "' is not an http:// or https:// URL"));
  }
  // What belongs to a listener that is off would be ignored: a script waiting for the port file
  // would wait for ever.
  for (const auto& [key, value, listener] :
       {std::tuple<const char*, const std::string&, const std::string&>{"metrics_port_file", config.metrics_port_file,
                                                                        config.metrics_listen},
        {"console_port_file", config.console_port_file, config.console_listen},
        {"console_grafana_url", config.console_grafana_url, config.console_listen}}) {
    if (!value.empty() && listener.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "key '", key, "': '", value, "' is set, but ", absl::StartsWith(key, "metrics") ? "metrics_listen" : "console_listen",
          " is empty (that listener is off); set both, or neither"));
    }
  }
  if (config.database.empty()) return absl::InvalidArgumentError("key 'database': the path is empty");
  if (config.work_dir.empty()) return absl::InvalidArgumentError("key 'work_dir': the path is empty");
  // Checked again after it is made absolute (coordinator/scheduler.cc); here, so that a bad flag
  // is a config error (exit 2, which systemd does not restart) rather than a failed start.
  if (const size_t bad = common::FirstInvalidUtf8(config.work_dir); bad != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key 'work_dir': '", common::ValidUtf8(config.work_dir), "' is not UTF-8 (byte ", bad,
        "); run folders are sent to worker groups as UTF-8 text: use a folder whose path is UTF-8"));
  }
  if (config.tls_cert_file.empty() != config.tls_key_file.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key '", config.tls_cert_file.empty() ? "tls_cert_file" : "tls_key_file",
        "': TLS needs both tls_cert_file and tls_key_file"));
  }
  if (!config.console_listen.empty() && !config.tls_cert_file.empty()) {
    AVIARY_RETURN_IF_ERROR(CheckTlsConsoleAddress(config.console_listen));
  }
  if (!config.tls_client_ca_file.empty() && config.tls_cert_file.empty()) {
    return absl::InvalidArgumentError(
        "key 'tls_client_ca_file': client certificates need TLS: set tls_cert_file and tls_key_file too");
  }
  for (const auto& [key, path] : {std::pair<const char*, const std::string&>{"token_file", config.token_file},
                                  {"worker_token_file", config.worker_token_file}}) {
    if (path.empty() && !config.allow_no_auth) {
      return absl::InvalidArgumentError(absl::StrCat(
          "key '", key, "': no token file; set token_file (clients) and worker_token_file (worker "
          "groups), which `aviary-coordinator init DIR` writes, or allow_no_auth: true to serve "
          "without authentication"));
    }
  }
  // Groups are told the interval in whole milliseconds (RegisterGroupResponse), and take 0 as
  // "not said" (their default, 2 s).
  if (!(config.heartbeat_interval_s >= 0.001) || config.heartbeat_interval_s > 3600) {
    return absl::InvalidArgumentError(absl::StrCat("key 'heartbeat_interval_s': ",
                                                   config.heartbeat_interval_s,
                                                   ": expected a value in [0.001, 3600]"));
  }
  // The least timeout the lease check below allows: one bound in both messages (a value under
  // the interval was told "more than the interval", then one just over it "at least" this).
  const double min_timeout_s =
      std::max(2 * config.heartbeat_interval_s + 0.5, 2 * config.heartbeat_interval_s / 0.9);
  if (!(config.heartbeat_timeout_s > config.heartbeat_interval_s) ||
      config.heartbeat_timeout_s > 86400) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key 'heartbeat_timeout_s': ", config.heartbeat_timeout_s, ": expected at least ", min_timeout_s,
        " (a group's lease must span two heartbeats of heartbeat_interval_s ", config.heartbeat_interval_s,
        ") and at most 86400"));
  }
  // A group's lease lasts the timeout less a margin of max(0.5 s, timeout / 10) after the send
  // of its last answered heartbeat (worker/agent/lease_clock.h). Unless that spans two heartbeat
  // intervals, the lease runs out between healthy heartbeats (or at the first late one) and the
  // group's checkpoint writes are fenced: the task is abandoned and re-leased, over and over.
  const double lease_s = config.heartbeat_timeout_s - std::max(0.5, config.heartbeat_timeout_s / 10);
  if (lease_s < 2 * config.heartbeat_interval_s) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key 'heartbeat_timeout_s': ", config.heartbeat_timeout_s,
        ": too short for heartbeat_interval_s ", config.heartbeat_interval_s,
        ": a group's lease (the timeout less a margin of max(0.5 s, timeout / 10), here ", lease_s,
        " s) must span two heartbeat intervals (", 2 * config.heartbeat_interval_s,
        " s), or healthy groups have their checkpoint writes fenced; expected at least ", min_timeout_s));
  }
  if (config.max_restarts < 0 || config.max_restarts > 1000) {
    return absl::InvalidArgumentError(absl::StrCat("key 'max_restarts': ", config.max_restarts,
                                                   ": expected 0..1000"));
  }
  if (!(config.retention_days >= 0) || config.retention_days > 36500) {
    return absl::InvalidArgumentError(absl::StrCat("key 'retention_days': ", config.retention_days,
                                                   ": expected 0 (keep for ever) to 36500"));
  }
  common::LogLevel level;
  if (!common::ParseLogLevel(config.log_level, &level).ok() ||
      level == common::LogLevel::kOff) {
    return absl::InvalidArgumentError(absl::StrCat("key 'log_level': '", config.log_level,
                                                   "': expected debug, info, warning or error"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ReadTokenFile(const std::string& path, bool allow_empty) {
  AVIARY_ASSIGN_OR_RETURN(std::string text, common::ReadFileToString(path, common::kMaxConfigBytes));
  std::vector<std::string> tokens = common::ParseTokenLines(text);
  // An empty role only from a file that says so with a '#' line: a zero-byte file is more
  // likely caught in the middle of a rewrite (truncated, not yet written) than meant.
  const bool says_none = text.find('#') != std::string::npos;
  if (tokens.empty() && !(allow_empty && says_none)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token file ", path, ": holds no token (only blank or '#' lines; an empty token is refused)",
        allow_empty ? "; to leave the role without any, keep a '#' line (e.g. '# revoked')" : ""));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (const std::string problem = common::TokenByteProblem(tokens[i]); !problem.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("token file ", path, ": token ", i + 1, ": ", problem));
    }
  }
  return tokens;
}

}  // namespace aviary::coordinator
