#include "common/files.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"

namespace aviary::common {

namespace {

// open(2) of a file to read, with ReadFileToString's errors.
absl::StatusOr<int> OpenToRead(const std::string& path, int extra_flags = 0) {
  // A folder opens as a stream of nothing: say what it is rather than parse "".
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": is a directory, expected a file"));
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | extra_flags);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InternalError(absl::StrCat(path, ": cannot open: ", std::strerror(err)));
  }
  return fd;
}

absl::Status TooLarge(const std::string& path, size_t max_bytes) {
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": larger than ", max_bytes, " bytes, the most this file may hold"));
}

// The rest of `fd` after `out`'s first `used` bytes, which it fills first; closes `fd`. More
// than `max_bytes` in all is INVALID_ARGUMENT (a file that grew, or /dev/zero, which has no size).
absl::Status ReadToEnd(const std::string& path, int fd, std::string* out, size_t used,
                       size_t max_bytes = SIZE_MAX) {
  while (true) {
    char chunk[65536];
    // Into the string while it has room (its size was the file's), then to the end of a file
    // that has grown since or reported no size.
    const bool room = used < out->size();
    const ssize_t n = room ? ::read(fd, &(*out)[used], out->size() - used) : ::read(fd, chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": read error: ", std::strerror(err)));
    }
    if (n == 0) break;
    if (!room) out->append(chunk, static_cast<size_t>(n));
    used += static_cast<size_t>(n);
    if (used > max_bytes) {
      ::close(fd);
      return TooLarge(path, max_bytes);
    }
  }
  ::close(fd);
  out->resize(used);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  return ReadFileToString(path, SIZE_MAX);
}

namespace {

// The open `fd` of `path` read whole, at most `max_bytes`; closes it. read(2) into a string of
// the file's size: a stream copy grows its buffer step by step (a BirdCLEF-size metadata CSV is
// tens of MB and the submit path reads several). `regular_only`: anything but a regular file is
// INVALID_ARGUMENT.
absl::StatusOr<std::string> ReadOpenFile(const std::string& path, int fd, size_t max_bytes, bool regular_only) {
  struct stat st;
  const bool stated = ::fstat(fd, &st) == 0;
  if (regular_only && !(stated && S_ISREG(st.st_mode))) {
    const int err = errno;
    ::close(fd);
    return stated ? absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file (a pipe, a device or a socket)"))
                  : absl::InternalError(absl::StrCat(path, ": cannot stat: ", std::strerror(err)));
  }
  const size_t size = stated && st.st_size > 0 ? static_cast<size_t>(st.st_size) : 0;  // /proc files say 0
  if (size > max_bytes) {
    ::close(fd);
    return TooLarge(path, max_bytes);
  }
  std::string out(size, '\0');
  AVIARY_RETURN_IF_ERROR(ReadToEnd(path, fd, &out, 0, max_bytes));
  return out;
}

}  // namespace

absl::StatusOr<std::string> ReadFileToString(const std::string& path, size_t max_bytes) {
  AVIARY_ASSIGN_OR_RETURN(const int fd, OpenToRead(path));
  return ReadOpenFile(path, fd, max_bytes, /*regular_only=*/false);
}

absl::StatusOr<std::string> ReadRegularFile(const std::string& path, size_t max_bytes) {
  // O_NONBLOCK: a FIFO opens at once (and is refused) instead of waiting for a writer.
  AVIARY_ASSIGN_OR_RETURN(const int fd, OpenToRead(path, O_NONBLOCK));
  return ReadOpenFile(path, fd, max_bytes, /*regular_only=*/true);
}

namespace {

constexpr char kStorageFaultUrl[] = "aviary.dev/storage-fault";

absl::Status ErrnoStatus(int error, const std::string& what) {
  const std::string message = absl::StrCat(what, ": ", ErrnoText(error));
  if (error == ENOSPC || error == EDQUOT) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

std::string DirOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Writes all of `contents` to a new `file` and fsyncs it; removes it on any failure.
absl::Status WriteNewFile(const std::string& file, absl::string_view contents, int* error) {
  *error = 0;
  int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    *error = errno;
    return ErrnoStatus(*error, absl::StrCat(file, ": cannot create"));
  }
  const char* p = contents.data();
  size_t left = contents.size();
  while (left > 0) {
    ssize_t w = ::write(fd, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      *error = errno;
      ::close(fd);
      ::unlink(file.c_str());
      return ErrnoStatus(*error, absl::StrCat(file, ": write failed after ", contents.size() - left, " of ",
                                              contents.size(), " bytes"));
    }
    p += w;
    left -= static_cast<size_t>(w);
  }
  int sync_rc = ::fsync(fd);
  int sync_errno = errno;
  int close_rc = ::close(fd);
  if (sync_rc != 0 || close_rc != 0) {
    *error = sync_rc != 0 ? sync_errno : errno;
    ::unlink(file.c_str());
    return ErrnoStatus(*error, absl::StrCat(file, sync_rc != 0 ? ": fsync failed" : ": close failed"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string ErrnoText(int error) {
  const char* name = ::strerrorname_np(error);
  return absl::StrCat(std::strerror(error), " (", name != nullptr ? name : absl::StrCat("errno ", error), ")");
}

absl::Status WithStorageFault(absl::Status status, const StorageFault& fault) {
  status.SetPayload(kStorageFaultUrl, absl::Cord(absl::StrCat(fault.num_bytes, "\n", fault.error, "\n", fault.dir,
                                                              "\n", fault.path)));
  return status;
}

std::optional<StorageFault> StorageFaultOf(const absl::Status& status) {
  auto payload = status.GetPayload(kStorageFaultUrl);
  if (!payload) return std::nullopt;
  std::vector<std::string> parts = absl::StrSplit(std::string(*payload), absl::MaxSplits('\n', 3));
  StorageFault fault;
  if (parts.size() != 4 || !absl::SimpleAtoi(parts[0], &fault.num_bytes) || !absl::SimpleAtoi(parts[1], &fault.error)) {
    return std::nullopt;
  }
  fault.dir = parts[2];
  fault.path = parts[3];
  return fault;
}

absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents) {
  return WriteFileAtomically(path, contents, AtomicWriteOptions{});
}

absl::Status WriteOutputFileAtomically(const std::string& path, absl::string_view contents) {
  AtomicWriteOptions options;
  options.follow_symlinks = true;
  return WriteFileAtomically(path, contents, options);
}

const std::string& TemporarySuffix() {
  static const std::string suffix = [] {
    uint64_t drawn = 0;
    try {
      std::random_device device;
      drawn = (static_cast<uint64_t>(device()) << 32) ^ device();
    } catch (const std::exception&) {  // no entropy source: the clock and an address
      timespec now{};
      ::clock_gettime(CLOCK_REALTIME, &now);
      drawn = static_cast<uint64_t>(now.tv_sec) * 1000000007ULL ^ static_cast<uint64_t>(now.tv_nsec) ^
              reinterpret_cast<uintptr_t>(&now);
    }
    return absl::StrCat(::getpid(), ".", drawn % 1000000000000ULL);
  }();
  return suffix;
}

bool IsTemporarySuffix(absl::string_view suffix) {
  const size_t dot = suffix.find('.');
  auto digits = [](absl::string_view s) {
    return !s.empty() && s.find_first_not_of("0123456789") == absl::string_view::npos;
  };
  if (dot == absl::string_view::npos) return digits(suffix);
  return digits(suffix.substr(0, dot)) && digits(suffix.substr(dot + 1));
}

namespace {

// `path` when it is not a symbolic link, else the file its chain of links ends at (a dangling
// link's target, as a shell's `>` would create it); INVALID_ARGUMENT for a loop.
absl::StatusOr<std::string> ThroughSymlinks(const std::string& path) {
  std::string at = path;
  for (int hops = 0; hops < 40; ++hops) {
    struct stat st = {};
    if (::lstat(at.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) return at;
    // The kernel's protected_symlinks rule, which a readlink-then-open would bypass: in a sticky
    // world-writable folder (/tmp) a link is followed only when it is ours or the folder owner's
    // (else `--port-file /tmp/p`, planted as a link by another user, wrote where it points).
    const std::string folder = DirOf(at);
    struct stat dir = {};
    if (::stat(folder.empty() ? "." : folder.c_str(), &dir) == 0 && (dir.st_mode & S_ISVTX) &&
        (dir.st_mode & S_IWOTH) && st.st_uid != ::geteuid() && st.st_uid != dir.st_uid) {
      return absl::PermissionDeniedError(absl::StrCat(
          path, ": a symbolic link of another user (uid ", st.st_uid, ") in the sticky world-writable folder ",
          folder.empty() ? "." : folder, " is not followed"));
    }
    std::error_code ec;
    const std::filesystem::path target = std::filesystem::read_symlink(at, ec);
    if (ec) return absl::InternalError(absl::StrCat(path, ": cannot read the symbolic link ", at, ": ", ec.message()));
    at = target.is_absolute() ? target.string() : (std::filesystem::path(at).parent_path() / target).string();
  }
  return absl::InvalidArgumentError(absl::StrCat(path, ": too many levels of symbolic links"));
}

// Whether `path` names a device or a process's descriptor (/dev/stdout, /proc/self/fd/1): a
// file a shell opened for this process (`> run.log`), or a pipe, which a rename would replace or
// cannot reach. /dev/shm holds ordinary files.
bool IsDescriptorOrDevicePath(const std::filesystem::path& path) {
  const std::string normal = path.lexically_normal().string();
  return (absl::StartsWith(normal, "/dev/") && !absl::StartsWith(normal, "/dev/shm/")) ||
         absl::StartsWith(normal, "/proc/");
}

}  // namespace

// A user's output resolved: refused when it is a FIFO, a device or a socket (`--out /dev/null`,
// a link to a pipe), or reached through /dev or /proc (`--out /dev/stdout` led to the file
// stdout was redirected to, which the rename replaced: `>> run.log` lost its earlier lines),
// which the rename of a new file would replace (a folder is the writers' own CheckOutputPath's
// to say, or the rename's).
absl::StatusOr<std::string> ResolveOutputPath(const std::string& path) {
  auto refuse = [&path](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", why,
                                                   ": the finished file is renamed into place, which would replace "
                                                   "it; write to a file"));
  };
  // Each name of its chain of links (ThroughSymlinks refuses a loop and the protected ones).
  std::filesystem::path at = std::filesystem::absolute(path);
  for (int links = 0; links <= 40; ++links) {
    if (IsDescriptorOrDevicePath(at)) return refuse(absl::StrCat("reaches ", at.string(), ", a device or a descriptor"));
    std::error_code ec;
    if (!std::filesystem::is_symlink(at, ec)) break;
    const std::filesystem::path target = std::filesystem::read_symlink(at, ec);
    if (ec) break;
    at = target.is_absolute() ? target : at.parent_path() / target;
  }
  AVIARY_ASSIGN_OR_RETURN(std::string resolved, ThroughSymlinks(path));
  struct stat st;
  if (::stat(resolved.c_str(), &st) == 0 && !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
    return refuse(absl::StrCat(resolved == path ? "" : absl::StrCat("(", resolved, ") "),
                               "not a regular file (a pipe, a device or a socket)"));
  }
  return resolved;
}

namespace {

// The paths this process is writing now. The temporary and staged names are per process (one
// suffix), so two threads writing one path would truncate each other's temporary file and one
// rename would find it gone: the second writer waits for the first (the last one wins, whole).
class PathsBeingWritten {
 public:
  class Hold {
   public:
    Hold(PathsBeingWritten* paths, std::string path) : paths_(paths), path_(std::move(path)) {
      absl::MutexLock lock(&paths_->mu_);
      while (paths_->writing_.contains(path_)) paths_->done_.Wait(&paths_->mu_);
      paths_->writing_.insert(path_);
    }
    ~Hold() {
      absl::MutexLock lock(&paths_->mu_);
      paths_->writing_.erase(path_);
      paths_->done_.SignalAll();
    }
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;

   private:
    PathsBeingWritten* const paths_;
    const std::string path_;
  };

 private:
  absl::Mutex mu_;
  absl::CondVar done_;
  absl::flat_hash_set<std::string> writing_ ABSL_GUARDED_BY(mu_);
};

PathsBeingWritten& WritersOfThisProcess() {
  static auto* paths = new PathsBeingWritten();
  return *paths;
}

}  // namespace

absl::Status WriteFileAtomically(const std::string& given_path, absl::string_view contents,
                                 const AtomicWriteOptions& options) {
  // An output a user named as a symbolic link is written through (its target replaced), as `cp`
  // or a shell's `>` would: the rename replaced the link itself with a file, and its target kept
  // the old contents. Not with a rotation (keep_previous_as names a file beside the given path).
  std::string path = given_path;
  if (options.follow_symlinks && options.keep_previous_as.empty()) {
    AVIARY_ASSIGN_OR_RETURN(path, ResolveOutputPath(given_path));
  }
  const PathsBeingWritten::Hold hold(&WritersOfThisProcess(), path);
  const std::string tmp = absl::StrCat(path, ".tmp.", TemporarySuffix());
  StorageFault fault;
  fault.path = path;
  fault.dir = DirOf(path);
  fault.num_bytes = static_cast<int64_t>(contents.size());
  absl::Status st = WriteNewFile(tmp, contents, &fault.error);
  if (!st.ok()) return WithStorageFault(st, fault);
  if (options.check) {
    st = options.check(path);
    if (!st.ok()) {
      ::unlink(tmp.c_str());
      return st;
    }
  }
  bool moved_previous = false;
  // With a rotation the new file is first renamed `<path>.ready.<suffix>`: complete and allowed out
  // by the check. A kill between the rotation's renames leaves it under that name, and only such
  // a file may be put in place later (a `.tmp.` one may have been refused by the check).
  std::string staged = tmp;
  if (!options.keep_previous_as.empty()) {
    staged = absl::StrCat(path, ".ready.", TemporarySuffix());
    if (::rename(tmp.c_str(), staged.c_str()) != 0) {
      fault.error = errno;
      ::unlink(tmp.c_str());
      return WithStorageFault(ErrnoStatus(fault.error, absl::StrCat("rename ", tmp, " -> ", staged, " failed")), fault);
    }
  }
  if (!options.keep_previous_as.empty() && ::access(path.c_str(), F_OK) == 0) {
    if (::rename(path.c_str(), options.keep_previous_as.c_str()) != 0) {
      fault.error = errno;
      ::unlink(staged.c_str());
      return WithStorageFault(
          ErrnoStatus(fault.error, absl::StrCat("rename ", path, " -> ", options.keep_previous_as, " failed")), fault);
    }
    moved_previous = true;
  }
  if (::rename(staged.c_str(), path.c_str()) != 0) {
    fault.error = errno;
    ::unlink(staged.c_str());
    if (moved_previous) ::rename(options.keep_previous_as.c_str(), path.c_str());
    return WithStorageFault(ErrnoStatus(fault.error, absl::StrCat("rename ", staged, " -> ", path, " failed")), fault);
  }
  absl::Status synced = SyncFolder(fault.dir, &fault.error);
  if (!synced.ok()) return WithStorageFault(synced, fault);
  return absl::OkStatus();
}

namespace {

FileVersion VersionOfStat(const struct stat& st) {
  FileVersion v;
  v.device = static_cast<uint64_t>(st.st_dev);
  v.inode = static_cast<uint64_t>(st.st_ino);
  v.size = static_cast<int64_t>(st.st_size);
  v.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return v;
}

}  // namespace

std::optional<FileVersion> VersionOf(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return VersionOfStat(st);
}

std::optional<FileVersion> VersionOfOpen(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return std::nullopt;
  return VersionOfStat(st);
}

absl::Status CheckUnchanged(const std::string& path, const std::optional<FileVersion>& before) {
  if (!before) return absl::OkStatus();
  const std::optional<FileVersion> now = VersionOf(path);
  if (now && *now == *before) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      path, ": ", now ? "replaced or changed" : "removed",
      " while it was read (a training run replaces its last.pt and best.pt as it goes); read it again"));
}

absl::Status SyncFolder(const std::string& dir, int* error) {
  const std::string folder = dir.empty() ? "." : dir;
  const int fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0 || ::fsync(fd) != 0) {
    const int failed = errno;
    if (fd >= 0) ::close(fd);
    if (error != nullptr) *error = failed;
    return ErrnoStatus(failed, absl::StrCat(folder, ": fsync of the folder failed"));
  }
  ::close(fd);
  return absl::OkStatus();
}

namespace {

// Removes the entry `name` of the folder `dir_fd` (`shown` names it in errors).
absl::Status RemoveEntryAt(int dir_fd, const std::string& name, const std::string& shown, int depth,
                           int64_t* removed) {
  if (depth > 256) return absl::FailedPreconditionError(absl::StrCat(shown, ": nested more than 256 folders deep"));
  const int fd = ::openat(dir_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    // Not a folder (a file, or a link, which O_NOFOLLOW refuses with ELOOP or ENOTDIR): unlinked.
    const int error = errno;
    if (error != ENOTDIR && error != ELOOP) return ErrnoStatus(error, absl::StrCat("open ", shown));
    if (::unlinkat(dir_fd, name.c_str(), 0) != 0) {
      const int unlink_error = errno;
      return ErrnoStatus(unlink_error, absl::StrCat("remove ", shown));
    }
    ++*removed;
    return absl::OkStatus();
  }
  DIR* dir = ::fdopendir(fd);
  if (dir == nullptr) {
    const int error = errno;
    ::close(fd);
    return ErrnoStatus(error, absl::StrCat("read ", shown));
  }
  std::vector<std::string> entries;
  while (true) {
    errno = 0;
    struct dirent* e = ::readdir(dir);
    if (e == nullptr) break;
    const std::string entry = e->d_name;
    if (entry != "." && entry != "..") entries.push_back(entry);
  }
  const int read_error = errno;
  absl::Status status = read_error != 0 ? ErrnoStatus(read_error, absl::StrCat("read ", shown)) : absl::OkStatus();
  for (const std::string& entry : entries) {
    if (!status.ok()) break;
    status = RemoveEntryAt(::dirfd(dir), entry, absl::StrCat(shown, "/", entry), depth + 1, removed);
  }
  ::closedir(dir);
  if (!status.ok()) return status;
  if (::unlinkat(dir_fd, name.c_str(), AT_REMOVEDIR) != 0) {
    const int error = errno;
    return ErrnoStatus(error, absl::StrCat("remove ", shown));
  }
  ++*removed;
  return absl::OkStatus();
}

}  // namespace

absl::Status RemoveTreeNoFollow(const std::string& parent, const std::string& name, int64_t* removed) {
  int64_t count = 0;
  if (removed == nullptr) removed = &count;
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("RemoveTreeNoFollow: '", name, "' is not one path component"));
  }
  const int dir_fd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) {
    const int error = errno;
    return ErrnoStatus(error, absl::StrCat("open ", parent));
  }
  absl::Status status = RemoveEntryAt(dir_fd, name, absl::StrCat(parent, "/", name), 0, removed);
  ::close(dir_fd);
  return status;
}

absl::Status ProbeWritable(const std::string& dir, int64_t num_bytes) {
  struct statvfs vfs;
  if (::statvfs(dir.c_str(), &vfs) != 0) return ErrnoStatus(errno, absl::StrCat(dir, ": statvfs failed"));
  const int64_t free_bytes = static_cast<int64_t>(vfs.f_bavail) * static_cast<int64_t>(vfs.f_frsize);
  if (free_bytes < num_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(dir, ": ", free_bytes, " bytes free, ", num_bytes,
                                                     " needed"));
  }
  const std::string probe = absl::StrCat(dir, "/.aviary-probe.", ::getpid());
  const std::string bytes(static_cast<size_t>(std::min<int64_t>(num_bytes, 1 << 20)), '\0');
  int error = 0;
  absl::Status written = WriteNewFile(probe, bytes, &error);
  if (!written.ok()) return written;
  if (::unlink(probe.c_str()) != 0) return ErrnoStatus(errno, absl::StrCat(probe, ": cannot remove"));
  return absl::OkStatus();
}

absl::Status CheckOutputPath(const std::string& flag, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": is a directory, expected a file path"));
  }
  // Where the write goes: through a link to its target (a dangling link's folder may be missing),
  // refused for a device, a pipe or a descriptor.
  absl::StatusOr<std::string> resolved = ResolveOutputPath(path);
  if (!resolved.ok()) return absl::Status(resolved.status().code(), absl::StrCat(flag, " ", resolved.status().message()));
  const std::string via = *resolved == path ? "" : absl::StrCat(" (a link to ", *resolved, ")");
  if (fs::is_directory(*resolved, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, via, ": is a directory, expected a file path"));
  }
  const fs::path parent = fs::path(*resolved).parent_path();
  if (!parent.empty() && !fs::is_directory(parent, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, via, ": the folder ", parent.string(), " does not exist"));
  }
  // The temporary file beside it must be creatable: said now, not after the work naming it.
  const std::string folder = parent.empty() ? std::string(".") : parent.string();
  if (::access(folder.c_str(), W_OK | X_OK) != 0) {
    const int error = errno;
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, via, ": the folder ", folder,
                                                   " is not writable by this user (", std::strerror(error), ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckNotTheInput(const std::string& out, const std::string& out_flag, const std::string& in,
                              const std::string& in_what) {
  std::error_code ec;
  if (std::filesystem::equivalent(out, in, ec) && !ec) {
    return absl::InvalidArgumentError(absl::StrCat(out_flag, " ", out, ": is the ", in_what, " ", in,
                                                   " itself; write elsewhere (it would be replaced)"));
  }
  return absl::OkStatus();
}

void WriteLineToStderr(absl::string_view line) {
  const std::string text = absl::StrCat(line, "\n");
  const char* p = text.data();
  size_t left = text.size();
  while (left > 0) {
    const ssize_t w = ::write(STDERR_FILENO, p, left);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    p += w;
    left -= static_cast<size_t>(w);
  }
}

}  // namespace aviary::common
