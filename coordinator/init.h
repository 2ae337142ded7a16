// `aviary-coordinator init DIR`: a state folder for a first run, so that the README's two
// commands work without hand-made files and without weakening authentication:
//   DIR/token             a new random bearer token, mode 600 (created exclusively)
//   DIR/coordinator.yaml  listen/metrics defaults; database, work_dir and token_file relative
//                         to DIR (relative paths in a config resolve against its folder)
//   DIR/runs/             the run folders
// An existing token or coordinator.yaml is never overwritten (FAILED_PRECONDITION naming it).
#ifndef AVIARY_COORDINATOR_INIT_H_
#define AVIARY_COORDINATOR_INIT_H_

#include <string>

#include "absl/status/statusor.h"

namespace aviary::coordinator {

struct InitResult {
  std::string config_path;  // absolute
  std::string token_path;   // absolute
  std::string work_dir;     // absolute
};

absl::StatusOr<InitResult> InitStateDir(const std::string& dir);

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_INIT_H_
