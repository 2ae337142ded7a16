// The coordinator's path policy (docs/SERVICE.md, "Security model"): the data paths a job may
// name lie inside the configured data roots, and the checkpoints a group reports lie inside the
// task's own run folder. Paths are compared after realpath (symlinks resolved), component by
// component (/data2 is not inside /data).
//
// Pure functions over the filesystem; thread-safe.
#ifndef AVIARY_COORDINATOR_PATH_POLICY_H_
#define AVIARY_COORDINATOR_PATH_POLICY_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace aviary::coordinator {

// `path` (absolute) resolved like realpath(3), also for a path that does not exist yet: the
// realpath of its deepest existing ancestor, then the remaining components, which may not be
// "..". INVALID_ARGUMENT naming `label` and the path for a relative path, a ".." after the
// existing part, or an ancestor realpath cannot read (the errno text).
absl::StatusOr<std::string> ResolvePolicyPath(const std::string& label, const std::string& path);

// Whether `path` is `root` or lies below it, component by component (both already resolved).
bool PathIsInside(const std::string& path, const std::string& root);

// Each root made absolute and resolved with realpath; it must exist and be a directory.
// INVALID_ARGUMENT naming `key` and the root; UNAVAILABLE for one that is not there or not
// reachable now (ENOENT, ESTALE, EIO, ...: a share not mounted yet), said only when no other
// root is invalid.
absl::StatusOr<std::vector<std::string>> ResolveDataRoots(const std::string& key,
                                                          const std::vector<std::string>& roots);

// A job's data path: OK when `path` ("" = unset: OK) resolves inside one of `roots` (resolved
// by ResolveDataRoots). INVALID_ARGUMENT naming `key`, the path, what it resolved to and the
// roots; with no roots, every path is refused with a message that says to set data_roots.
absl::Status CheckDataPath(const std::string& key, const std::string& path,
                           const std::vector<std::string>& roots);

// Whether a filesystem call's errno says nothing about the file (EIO, ESTALE, ETIMEDOUT, EINTR,
// EAGAIN, ENOMEM, ENFILE, EMFILE, ENOLCK): a retry may see it.
bool TransientFilesystemErrno(int err);

// A checkpoint reported by a group: `path` must exist as a regular file and resolve inside the
// realpath of `out_dir` (the task's run folder). INVALID_ARGUMENT naming `field` and the path
// when it does not; UNAVAILABLE when the filesystem failed (EIO, ESTALE, ETIMEDOUT, ...: the
// coordinator cannot tell), which the group retries rather than drops.
// `path` must name it by the run folder's own path, with no symbolic link below the run folder;
// with `work_dir` (the coordinator's, holding the run folders), none below work_dir either.
absl::Status CheckCheckpointPath(const std::string& field, const std::string& path, const std::string& out_dir,
                                 const std::string& work_dir = "");

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_PATH_POLICY_H_
