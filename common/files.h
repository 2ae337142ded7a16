// Whole-file reads and atomic writes, with errors that name the path and errno's text.
#ifndef AVIARY_COMMON_FILES_H_
#define AVIARY_COMMON_FILES_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace aviary::common {

// Reads a whole file; NOT_FOUND or INTERNAL naming the path and errno text; INVALID_ARGUMENT
// for a directory.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);
// The same, INVALID_ARGUMENT naming the path when the file holds more than `max_bytes` (read
// stops there: `--config /dev/zero` is refused, not read until memory runs out).
absl::StatusOr<std::string> ReadFileToString(const std::string& path, size_t max_bytes);
// Writes `contents` to `path` through a temporary file, fsync and rename.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents);
// The same for an output a user names (`--out F`): a symbolic link there is written through
// (AtomicWriteOptions::follow_symlinks).
absl::Status WriteOutputFileAtomically(const std::string& path, absl::string_view contents);
// The file an output a user names (`--out F`) is written to, as WriteOutputFileAtomically finds
// it: `path` itself, or when it is a symbolic link the file its chain of links ends at (a dangling
// link's target, which a shell's `>` would create), under the same protected_symlinks rule.
// PERMISSION_DENIED for another user's link in a sticky world-writable folder, INVALID_ARGUMENT
// for a loop. A writer that names its own temporary, staged or sibling files (`aviary predict`'s
// `.tmp.` and `.partial`, `aviary export`'s sidecar) resolves --out once and names them from the
// result, so that the rename replaces the link's target and not the link.
absl::StatusOr<std::string> ResolveOutputPath(const std::string& path);

// This process's suffix of temporary file names, "<pid>.<a random number drawn once>": two
// processes of one pid (rank 0 of two groups in two containers, a stale group and the task's new
// holder writing one run folder) never share a temporary file. Within a process,
// WriteFileAtomically lets one thread at a time write a given path (a second waits).
const std::string& TemporarySuffix();
// Whether `suffix` is one TemporarySuffix() gives (digits '.' digits), or the bare pid that
// earlier versions used.
bool IsTemporarySuffix(absl::string_view suffix);

// fsync of the folder `dir` ("" is "."): the renames and removals in it made durable. The error
// names the folder and errno's text and name (as WriteFileAtomically's); `*error` (may be null)
// gets errno.
absl::Status SyncFolder(const std::string& dir, int* error = nullptr);

// What a file is at a moment: device, inode, size and modification time. A read in several
// opens (a checkpoint's metadata, tensors and EMA group) compares it before and after, so that a
// file replaced by rename in between (a training run's last.pt, every epoch) is not taken as one.
struct FileVersion {
  uint64_t device = 0;
  uint64_t inode = 0;
  int64_t size = 0;
  int64_t mtime_ns = 0;
  bool operator==(const FileVersion& o) const {
    return device == o.device && inode == o.inode && size == o.size && mtime_ns == o.mtime_ns;
  }
  bool operator!=(const FileVersion& o) const { return !(*this == o); }
};
// The file's version now; nullopt when stat(2) fails (the read that follows names why).
std::optional<FileVersion> VersionOf(const std::string& path);
// The version of the file open as `fd` (fstat(2)); nullopt when it fails.
std::optional<FileVersion> VersionOfOpen(int fd);
// UNAVAILABLE naming `path` when it is no longer the `before` version (replaced, rewritten or
// removed since); OK when `before` is nullopt (nothing to compare).
absl::Status CheckUnchanged(const std::string& path, const std::optional<FileVersion>& before);

// A whole file a user names as data (a metadata CSV, the corrupt-file list), read into memory:
// not mapped (a mapped file truncated while it is read raises SIGBUS, and the coordinator that
// read it for a submit died of it), and refused unless a regular file (a FIFO blocked the reader
// for good, /dev/zero filled memory) or when larger than `max_bytes`. Errors name the path, as
// ReadFileToString's do.
absl::StatusOr<std::string> ReadRegularFile(const std::string& path, size_t max_bytes);

// A check made right before the rename that publishes a file (the worker's lease fence): an
// error stops the write; the temporary file is removed and the previous file stays.
using CommitCheck = std::function<absl::Status(const std::string& path)>;

struct AtomicWriteOptions {
  CommitCheck check;     // optional
  // When set and `path` exists, `path` is renamed to this name just before the new file is
  // renamed into place (last.pt -> last.prev.pt), so the previous version survives a new one
  // that turns out unreadable. The new file goes `<path>.tmp.<suffix>` -> (the check) ->
  // `<path>.ready.<suffix>` -> (the rotation) -> `path` (TemporarySuffix()): a kill between the
  // rotation's renames leaves the newest version as `<path>.ready.<suffix>`, one the check
  // allowed.
  std::string keep_previous_as;
  // A symbolic link at `path` is written through (its target replaced, as `cp` or a shell's `>`
  // would), following the kernel's protected_symlinks rule in sticky world-writable folders;
  // else the link itself is replaced. Not with keep_previous_as. For a file a user names on a
  // command line (WriteOutputFileAtomically), not the files of a run folder or a port file.
  bool follow_symlinks = false;
};

// As above, with `options`. Every failure before the rename (open, write, fsync, close, the
// check, the rename itself) removes the new file (`<path>.tmp.<suffix>`, or `<path>.ready.<suffix>`
// once staged) and leaves the previous `path` as it was; a failure of the folder's fsync after
// the rename is reported with the new file in place (not yet durable). Errors name the
// path and errno's text and name ("No space left on device (ENOSPC)"); ENOSPC and EDQUOT are
// RESOURCE_EXHAUSTED, other errno values INTERNAL, the check's error is returned as it is.
// Errors of the filesystem carry a storage-fault payload (StorageFaultOf).
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents,
                                 const AtomicWriteOptions& options);

// A write that failed for the filesystem's sake, as WriteFileAtomically reports it.
struct StorageFault {
  std::string path;       // the file being written
  std::string dir;        // its folder (where space must be found again)
  int64_t num_bytes = 0;  // the size of what was being written
  int error = 0;          // errno
};
// Marks `status` (not OK) as a storage fault.
absl::Status WithStorageFault(absl::Status status, const StorageFault& fault);
std::optional<StorageFault> StorageFaultOf(const absl::Status& status);

// "No space left on device (ENOSPC)".
std::string ErrnoText(int error);

// Whether `dir` can take a file of `num_bytes` now: statvfs's free space for unprivileged
// users, then a test write of min(num_bytes, 1 MiB) that is fsynced and removed. The error
// names the folder, the space needed and found, or the failing call and errno.
absl::Status ProbeWritable(const std::string& dir, int64_t num_bytes);

// Removes `parent`/`name` and everything under it without following a symbolic link anywhere
// (a link is removed, never its target): each folder is opened relative to the one above it with
// O_NOFOLLOW, so a folder swapped for a link while the removal runs is not descended into.
// `name` must be one path component. Counts the entries removed in `*removed` (may be null);
// the first failure ends it, naming the path and errno's text (what was removed stays removed).
absl::Status RemoveTreeNoFollow(const std::string& parent, const std::string& name, int64_t* removed = nullptr);

// A command's output file (`flag` names it in the error) must be a file path in an existing
// folder: checked before any work and said with the flag (INVALID_ARGUMENT, exit 2), where the
// atomic write would fail late, naming its temporary file.
absl::Status CheckOutputPath(const std::string& flag, const std::string& path);
// An output (`out_flag` `out`) that is the input file `in` itself, by its path or through a link,
// would replace what the command reads: INVALID_ARGUMENT naming both, checked before any work.
absl::Status CheckNotTheInput(const std::string& out, const std::string& out_flag, const std::string& in,
                              const std::string& in_what);

// Writes `line` and a newline to standard error in one write(2) (more only when the kernel takes
// part of it). A rank under mpirun shares its stderr with mpirun's own messages, and a line written
// in pieces, as std::cerr's unbuffered `<<` chain does, can come out cut by them. Errors are
// ignored: there is nowhere left to report them.
void WriteLineToStderr(absl::string_view line);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_FILES_H_
