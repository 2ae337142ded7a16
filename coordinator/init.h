// `aviary-coordinator init DIR`: a state folder for a first run, so that the README's two
// commands work without hand-made files and without weakening authentication:
//   DIR/token             a new random client token, mode 600 (created exclusively)
//   DIR/viewer.token      a new random viewer token (read-only JobService), mode 600
//   DIR/worker.token      a new random worker-group token (WorkerService only), mode 600
//   DIR/coordinator.yaml  listen/metrics defaults; database, work_dir and the three token files
//                         relative to DIR (relative paths in a config resolve against its folder)
//   DIR/runs/             the run folders
// `data_roots` (init's repeatable --data-root) are written as the config's data_roots, made
// absolute and resolved with realpath (each must be an existing folder); none leaves the key
// an empty list, and the coordinator then refuses every job until it is set.
// An existing token file or coordinator.yaml is never overwritten (FAILED_PRECONDITION naming it).
#ifndef AVIARY_COORDINATOR_INIT_H_
#define AVIARY_COORDINATOR_INIT_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace aviary::coordinator {

struct InitResult {
  std::string config_path;  // absolute
  std::string token_path;         // absolute; the client token
  std::string viewer_token_path;  // absolute
  std::string worker_token_path;  // absolute
  std::string work_dir;     // absolute
};

// 32 bytes of /dev/urandom as 64 lowercase hex digits (a token; the console's session ids).
absl::StatusOr<std::string> RandomToken();

absl::StatusOr<InitResult> InitStateDir(const std::string& dir,
                                        const std::vector<std::string>& data_roots = {});

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_INIT_H_
