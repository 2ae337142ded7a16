// The coordinator's configuration (configs/coordinator.yaml) and its command-line flags.
//
// Keys, defaults and meanings are docs/SERVICE.md's table. Loading reads the YAML file, applies
// `--set key=value` overrides and then the dedicated flags (`--listen`, ...), converts and
// validates. Every error is INVALID_ARGUMENT (NOT_FOUND for a missing file) naming the file and
// line, or the flag / override, and the key. Relative paths set in the file resolve against the
// file's folder; relative paths given by flags or `--set` resolve against the working directory.
//
// Plain value; no synchronisation.
#ifndef AVIARY_COORDINATOR_COORDINATOR_CONFIG_H_
#define AVIARY_COORDINATOR_COORDINATOR_CONFIG_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/logging.h"

namespace aviary::coordinator {

struct CoordinatorConfig {
  // Not coordinator.yaml keys (tests set them): SchedulerOptions::max_event_bytes_per_job and
  // max_logs_response_bytes.
  size_t max_event_bytes_per_job = 16 << 20;
  size_t max_logs_response_bytes = 16 << 20;
  std::string listen = "0.0.0.0:7070";
  std::string port_file;
  std::string metrics_listen = "0.0.0.0:9470";  // "" disables /metrics
  std::string metrics_port_file;
  // The web console and its JSON API (coordinator/console.h), HOST:PORT; "" (the default)
  // disables it. TLS and tokens as the gRPC port; with TLS the host must be a numeric IPv4
  // address (TlsFront binds it).
  std::string console_listen;
  std::string console_port_file;
  std::string console_grafana_url;  // the console links to this Grafana dashboard ("" = no link)
  std::string database = "aviary.db";
  std::string work_dir = "runs";
  // Folders a job's data paths (data roots, cache_dir, corrupt_files, pretrained_weights) must
  // lie in, realpath-resolved at load (each must exist and be a directory). Empty: every job is
  // refused. In YAML a list; from --set a comma-separated list.
  std::vector<std::string> data_roots;
  std::string token_file;         // client tokens: all of JobService
  std::string viewer_token_file;  // viewer tokens: the reads (docs/SERVICE.md, "Roles"; "" = none)
  std::string worker_token_file;  // worker-group tokens: WorkerService only
  bool allow_no_auth = false;
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;  // mutual TLS: WorkerService needs a client cert signed by this CA
  double heartbeat_interval_s = 2.0;  // [0.001, 3600]
  // <= 86400; less max(0.5, timeout / 10) (the lease fence's margin) >= 2 x heartbeat_interval_s
  double heartbeat_timeout_s = 20.0;
  int max_restarts = 3;               // >= 0
  double retention_days = 30;         // finished jobs keep step points and manifests this long; 0: for ever
  std::string log_level = "info";     // debug, info, warning, error

  std::string source_path;  // the file it was loaded from ("" = defaults only)
};

// One override from the command line: `--set key=value` or a dedicated flag.
struct ConfigOverride {
  std::string key;
  std::string value;
  std::string label;  // how it reads in messages: "--set listen=x" or "--listen x"
};

// Loads `path` ("" = no file, defaults) and applies `overrides` in order. Relative paths are
// made absolute (see the file comment).
absl::StatusOr<CoordinatorConfig> LoadCoordinatorConfig(const std::string& path,
                                                        const std::vector<ConfigOverride>& overrides);

// The same from YAML text; `source_name` names it in messages and `base_dir` is the folder
// relative paths in the text resolve against.
absl::StatusOr<CoordinatorConfig> ParseCoordinatorConfig(const std::string& yaml_text,
                                                         const std::string& source_name,
                                                         const std::string& base_dir,
                                                         const std::vector<ConfigOverride>& overrides);

// Parses "key=value" (as given to --set) into an override; INVALID_ARGUMENT without '='.
absl::StatusOr<ConfigOverride> ParseSetOverride(const std::string& text);

// The dedicated flags and the keys they set ("listen" -> "listen", "port-file" -> "port_file").
const std::vector<std::pair<std::string, std::string>>& CoordinatorFlagKeys();

// The key names, in file order.
const std::vector<std::string>& CoordinatorConfigKeys();

// Cross-field checks; errors name the key.
absl::Status ValidateCoordinatorConfig(const CoordinatorConfig& config);

// Reads a token file: every token line of `path` (common/tokens.h: one per line, blank and '#'
// lines ignored, a leading UTF-8 BOM dropped). INVALID_ARGUMENT naming the file when it holds
// none (unless `allow_empty` and the file has a '#' line: a zero-byte file is refused even
// then), or a token with a byte a gRPC header cannot carry (naming the token and the byte);
// NOT_FOUND when missing.
absl::StatusOr<std::vector<std::string>> ReadTokenFile(const std::string& path, bool allow_empty = false);

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_COORDINATOR_CONFIG_H_
