#include "coordinator/path_policy.h"

#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/utf8.h"

namespace aviary::coordinator {
namespace {

namespace fs = std::filesystem;

// realpath(3); on failure the errno in *err.
bool RealPath(const std::string& path, std::string* out, int* err) {
  std::unique_ptr<char, decltype(&::free)> resolved(::realpath(path.c_str(), nullptr), &::free);
  if (resolved == nullptr) {
    *err = errno;
    return false;
  }
  *out = resolved.get();
  return true;
}

}  // namespace

namespace {

// ResolvePolicyPath of `path`, which is `original` with `links` dangling symbolic links replaced
// by their targets.
absl::StatusOr<std::string> Resolve(const std::string& label, const std::string& original, const std::string& path,
                                    int links) {
  const fs::path given(path);
  // Split into components; try the whole path, then ever shorter prefixes.
  std::vector<std::string> parts;
  for (const fs::path& part : given.relative_path()) {
    if (!part.empty()) parts.push_back(part.string());
  }
  for (size_t keep = parts.size() + 1; keep-- > 0;) {
    fs::path prefix = given.root_path();
    for (size_t i = 0; i < keep; ++i) prefix /= parts[i];
    std::string resolved;
    int err = 0;
    if (!RealPath(prefix.string(), &resolved, &err)) {
      if (err != ENOENT) {
        return absl::InvalidArgumentError(absl::StrCat(label, ": '", original, "': realpath of '",
                                                       prefix.string(), "': ", std::strerror(err)));
      }
      // Not there, or a symbolic link to something not there (yet): that one is followed, as
      // the workers will (it must not pass as a folder of the root that holds the link).
      struct stat st;
      if (::lstat(prefix.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) continue;
      if (links >= 40) {
        return absl::InvalidArgumentError(
            absl::StrCat(label, ": '", original, "': more than 40 symbolic links (a loop?) at '", prefix.string(), "'"));
      }
      std::error_code ec;
      const fs::path target = fs::read_symlink(prefix, ec);
      if (ec) {
        return absl::InvalidArgumentError(
            absl::StrCat(label, ": '", original, "': readlink of '", prefix.string(), "': ", ec.message()));
      }
      fs::path next = target.is_absolute() ? target : prefix.parent_path() / target;
      for (size_t i = keep; i < parts.size(); ++i) next /= parts[i];
      return Resolve(label, original, next.string(), links + 1);
    }
    fs::path result(resolved);
    for (size_t i = keep; i < parts.size(); ++i) {
      if (parts[i] == "..") {
        return absl::InvalidArgumentError(absl::StrCat(
            label, ": '", original, "': '..' after the existing part '", prefix.string(),
            "' (a path that does not exist yet may not climb out of it)"));
      }
      if (parts[i] == ".") continue;
      result /= parts[i];
    }
    return result.string();
  }
  return absl::InvalidArgumentError(absl::StrCat(label, ": '", original, "': nothing of it exists"));
}

}  // namespace

absl::StatusOr<std::string> ResolvePolicyPath(const std::string& label, const std::string& path) {
  if (path.empty() || !fs::path(path).is_absolute()) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": '", path, "' is not an absolute path"));
  }
  return Resolve(label, path, path, 0);
}

bool PathIsInside(const std::string& path, const std::string& root) {
  const fs::path p(path);
  const fs::path r(root);
  auto pi = p.begin();
  for (auto ri = r.begin(); ri != r.end(); ++ri) {
    if (ri->empty()) continue;  // a trailing separator
    if (pi == p.end() || *pi != *ri) return false;
    ++pi;
  }
  return true;
}

absl::StatusOr<std::vector<std::string>> ResolveDataRoots(const std::string& key,
                                                          const std::vector<std::string>& roots) {
  std::vector<std::string> resolved;
  // The first root not there now (UNAVAILABLE), said once every root is checked: a root that is
  // wrong whatever the mounts (INVALID_ARGUMENT) comes first, or a caller would wait for nothing.
  absl::Status unavailable;
  for (size_t i = 0; i < roots.size(); ++i) {
    const std::string label = absl::StrCat("key '", key, "' [", i, "]");
    if (roots[i].empty()) return absl::InvalidArgumentError(absl::StrCat(label, ": an empty path"));
    std::error_code ec;
    const fs::path absolute = fs::absolute(roots[i], ec);
    std::string real;
    int err = 0;
    if (ec || !RealPath(absolute.string(), &real, &err)) {
      // Not there, or not reachable now (a shared filesystem not mounted yet, a stale handle):
      // UNAVAILABLE, which waiting may fix; a path that cannot name a folder at all is refused.
      const bool transient = !ec && (err == ENOENT || err == ESTALE || err == EIO || err == ETIMEDOUT ||
                                     err == EHOSTDOWN || err == EHOSTUNREACH || err == ENOTCONN);
      absl::Status status(transient ? absl::StatusCode::kUnavailable : absl::StatusCode::kInvalidArgument,
                          absl::StrCat(label, ": '", roots[i], "': ", ec ? ec.message() : std::strerror(err),
                                       " (each data root must be an existing folder)"));
      if (!transient) return status;
      if (unavailable.ok()) unavailable = std::move(status);
      continue;
    }
    struct stat st;
    if (::stat(real.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": '", roots[i], "' (", real, ") is not a folder"));
    }
    resolved.push_back(real);
  }
  if (!unavailable.ok()) return unavailable;
  return resolved;
}

absl::Status CheckDataPath(const std::string& key, const std::string& path,
                           const std::vector<std::string>& roots) {
  if (path.empty()) return absl::OkStatus();
  if (roots.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key '", key, "': '", path,
        "': the coordinator has no data roots, so it refuses every data path; set `data_roots` "
        "in the coordinator config (the folders jobs may read data from and write caches to)"));
  }
  auto resolved = ResolvePolicyPath(absl::StrCat("key '", key, "'"), path);
  if (!resolved.ok()) return resolved.status();
  for (const std::string& root : roots) {
    if (PathIsInside(*resolved, root)) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("key '", key, "': '", path, "' resolves to '",
                                                 *resolved, "', outside the data roots (",
                                                 absl::StrJoin(roots, ", "),
                                                 "): jobs read and write only inside the coordinator's "
                                                 "data_roots (its config)"));
}

bool TransientFilesystemErrno(int err) {
  switch (err) {
    case EIO:
    case ESTALE:
    case ETIMEDOUT:
    case EINTR:
    case EAGAIN:
    case ENOMEM:
    case ENFILE:
    case EMFILE:
    case ENOLCK:
      return true;
    default:
      return false;
  }
}

namespace {

// `path` made lexically normal, without a trailing separator ("/a/b/" is "/a/b").
fs::path NormalPath(const std::string& path) {
  fs::path normal = fs::path(path).lexically_normal();
  if (!normal.has_filename() && normal.has_relative_path()) normal = normal.parent_path();
  return normal;
}

}  // namespace

absl::Status CheckCheckpointPath(const std::string& field, const std::string& path, const std::string& out_dir,
                                 const std::string& work_dir) {
  const std::string label = absl::StrCat("field '", field, "'");
  if (!fs::path(path).is_absolute()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": '", path, "' is not an absolute path"));
  }
  // As the group writes it: the run folder's path, then the file's below it. (A path that only
  // resolved into the run folder, through a link, could be pointed elsewhere after the check.)
  const fs::path below = NormalPath(path).lexically_relative(NormalPath(out_dir));
  if (below.empty() || below == "." || *below.begin() == "..") {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": '", path, "' is not inside the task's run folder '", out_dir, "'"));
  }
  // The run folder first: when the filesystem fails there (a stale mount), the coordinator can
  // say nothing about the group's file. (A folder it does not find is refused: it may never have
  // been made, and an unmounted work_dir looks the same.)
  std::string real_out;
  int err = 0;
  if (!RealPath(out_dir, &real_out, &err)) {
    const std::string what = absl::StrCat(label, ": '", path, "': the task's run folder '", out_dir, "': ",
                                          std::strerror(err), " (the coordinator must see work_dir at the groups' path)");
    if (TransientFilesystemErrno(err)) return absl::UnavailableError(what);
    return absl::InvalidArgumentError(what);
  }
  // The run folder is the coordinator's, made under work_dir: one a group replaced by a symbolic
  // link (to /etc) moved the boundary below with it.
  std::string real_work;
  const fs::path out_below = NormalPath(out_dir).lexically_relative(NormalPath(work_dir));
  if (!work_dir.empty() && !out_below.empty() && *out_below.begin() != ".." && RealPath(work_dir, &real_work, &err)) {
    const std::string expected = (fs::path(real_work) / out_below).lexically_normal().string();
    if (real_out != expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          label, ": '", path, "': the task's run folder '", out_dir, "' resolves to '", common::ValidUtf8(real_out),
          "', not '", expected, "': a symbolic link stands in its path (run folders are real folders under work_dir)"));
    }
  }
  std::string real;
  if (!RealPath(path, &real, &err)) {
    const std::string what = absl::StrCat(label, ": '", path, "': ", std::strerror(err));
    if (TransientFilesystemErrno(err)) return absl::UnavailableError(what);
    return absl::InvalidArgumentError(absl::StrCat(what, " (a checkpoint must exist)"));
  }
  struct stat st;
  if (::stat(real.c_str(), &st) != 0) {
    const int stat_err = errno;
    const std::string what = absl::StrCat(label, ": '", path, "': ", std::strerror(stat_err));
    if (TransientFilesystemErrno(stat_err)) return absl::UnavailableError(what);
    return absl::InvalidArgumentError(what);
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": '", path, "' is not a regular file"));
  }
  if (!PathIsInside(real, real_out) || real == real_out) {
    // The target as valid UTF-8: this message becomes a task's error (a string field).
    return absl::InvalidArgumentError(absl::StrCat(label, ": '", path, "' resolves to '", common::ValidUtf8(real),
                                                   "', outside the task's run folder '", out_dir,
                                                   "'"));
  }
  // No link below the run folder either: re-pointed after this check, the path stored would
  // name another file at the next lease (resume_checkpoint) or in a fine-tuning task's
  // init_checkpoint.
  if (const std::string expected = (fs::path(real_out) / below).lexically_normal().string(); real != expected) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": '", path, "' resolves to '", common::ValidUtf8(real),
                                                   "' through a symbolic link (a checkpoint is a regular file of "
                                                   "the task's run folder, named by its own path)"));
  }
  return absl::OkStatus();
}

}  // namespace aviary::coordinator
