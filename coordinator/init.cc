#include "coordinator/init.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/utf8.h"
#include "coordinator/path_policy.h"

namespace aviary::coordinator {
namespace {

namespace fs = std::filesystem;

absl::Status ErrnoError(const std::string& what, const std::string& path, int err) {
  const std::string message = absl::StrCat(what, " '", path, "': ", std::strerror(err));
  switch (err) {
    case EEXIST:
      return absl::FailedPreconditionError(
          absl::StrCat(message, " (init never overwrites: remove it, or start the coordinator with it)"));
    case EACCES:
    case EPERM:
    case EROFS:
      return absl::PermissionDeniedError(message);
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return absl::ResourceExhaustedError(message);
    default:
      return absl::InternalError(message);
  }
}

// Writes `text` to a new file `path` with `mode`; fails if it exists. A file it could not write
// whole is removed.
absl::Status WriteNewFile(const std::string& path, const std::string& text, mode_t mode) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) return ErrnoError("init: cannot create", path, errno);
  auto fail = [&](const char* what, int err) {
    ::close(fd);
    ::unlink(path.c_str());
    return ErrnoError(what, path, err);
  };
  // The umask may have narrowed the mode, never widened it; set it exactly.
  if (::fchmod(fd, mode) != 0) return fail("init: cannot chmod", errno);
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail("init: cannot write", n < 0 ? errno : EIO);
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) return fail("init: cannot write", errno);
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return ErrnoError("init: cannot write", path, err);
  }
  return absl::OkStatus();
}


constexpr char kConfig[] =
    "# aviary-coordinator configuration written by `aviary-coordinator init` (every key and its\n"
    "# default: docs/SERVICE.md, \"Coordinator configuration\", and configs/coordinator.yaml).\n"
    "# Relative paths resolve against this file's folder.\n"
    "listen: \"0.0.0.0:7070\"\n"
    "metrics_listen: \"0.0.0.0:9470\"\n"
    "database: \"aviary.db\"\n"
    "work_dir: \"runs\"\n"
    "# Bearer tokens, one role each (docs/SERVICE.md, \"Security model\"); every file may list\n"
    "# several tokens, one a line (rotation), and SIGHUP re-reads them.\n"
    "# Clients that submit and cancel (aviary --token-file, AVIARY_TOKEN_FILE):\n"
    "token_file: \"token\"\n"
    "# Read-only viewers (status, list, watch, history, groups, logs):\n"
    "viewer_token_file: \"viewer.token\"\n"
    "# Worker groups only (aviary-worker serve --token-file):\n"
    "worker_token_file: \"worker.token\"\n"
    "# The folders jobs may read data from and write caches to (docs/SERVICE.md, \"Paths,\n"
    "# checkpoints and reports\"); a job naming a path outside them is refused at submit.\n";

// `data_roots:` as a YAML flow list of double-quoted strings.
std::string DataRootsYaml(const std::vector<std::string>& roots) {
  std::string text = "data_roots: [";
  for (size_t i = 0; i < roots.size(); ++i) {
    if (i > 0) text += ", ";
    text += '"';
    for (char c : roots[i]) {
      if (c == '"' || c == '\\') text += '\\';
      text += c;
    }
    text += '"';
  }
  return text + "]\n";
}

}  // namespace

absl::StatusOr<InitResult> InitStateDir(const std::string& dir,
                                        const std::vector<std::string>& data_roots) {
  if (dir.empty()) return absl::InvalidArgumentError("init: expected a folder (aviary-coordinator init DIR)");
  auto roots = ResolveDataRoots("--data-root", data_roots);
  if (!roots.ok()) return absl::InvalidArgumentError(absl::StrCat("init: ", roots.status().message()));
  // The config is UTF-8 text (the coordinator refuses any other byte in it), and a control
  // character in a quoted YAML scalar does not read back as itself (a newline becomes a space).
  for (size_t i = 0; i < roots->size(); ++i) {
    const std::string& root_path = (*roots)[i];
    if (const size_t bad = common::FirstInvalidUtf8(root_path); bad != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "init: key '--data-root' [%d]: '%s' (%s): byte 0x%02x is not UTF-8 (the config is UTF-8 text; use a folder "
          "whose path is UTF-8)",
          i, common::ValidUtf8(data_roots[i]), common::ValidUtf8(root_path), static_cast<unsigned char>(root_path[bad])));
    }
    for (const char c : root_path) {
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "init: key '--data-root' [%d]: '%s': a control character (byte 0x%02x) in the path, which the config "
            "cannot hold; use a folder whose path has none",
            i, absl::CEscape(root_path), static_cast<unsigned char>(c)));
      }
    }
  }
  std::error_code ec;
  const fs::path root = fs::absolute(dir, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("init: '", dir, "': ", ec.message()));
  InitResult result;
  result.config_path = (root / "coordinator.yaml").string();
  result.token_path = (root / "token").string();
  result.viewer_token_path = (root / "viewer.token").string();
  result.worker_token_path = (root / "worker.token").string();
  result.work_dir = (root / "runs").string();
  // Refuse before writing anything when either file is there.
  for (const std::string& path :
       {result.config_path, result.token_path, result.viewer_token_path, result.worker_token_path}) {
    if (fs::exists(path, ec)) return ErrnoError("init: will not overwrite", path, EEXIST);
  }
  fs::create_directories(root / "runs", ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("init: cannot create '", (root / "runs").string(), "': ", ec.message()));
  }
  // All four files or none: a half-written state folder would refuse every later init.
  std::vector<std::string> written;
  auto undo = [&written](const absl::Status& st) {
    for (const std::string& path : written) ::unlink(path.c_str());
    return st;
  };
  for (const std::string& path : {result.token_path, result.viewer_token_path, result.worker_token_path}) {
    absl::StatusOr<std::string> token = RandomToken();  // 256 random bits each: distinct
    if (!token.ok()) return undo(token.status());
    if (absl::Status st = WriteNewFile(path, *token + "\n", 0600); !st.ok()) return undo(st);
    written.push_back(path);
  }
  if (absl::Status st = WriteNewFile(result.config_path, kConfig + DataRootsYaml(*roots), 0644); !st.ok()) {
    return undo(st);
  }
  return result;
}

absl::StatusOr<std::string> RandomToken() {
  std::ifstream in("/dev/urandom", std::ios::binary);
  unsigned char bytes[32];
  if (!in.read(reinterpret_cast<char*>(bytes), sizeof(bytes))) {
    return absl::InternalError("cannot read 32 bytes from /dev/urandom (a new token or session id)");
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string token;
  for (unsigned char b : bytes) {
    token += kHex[b >> 4];
    token += kHex[b & 15];
  }
  return token;
}

}  // namespace aviary::coordinator
