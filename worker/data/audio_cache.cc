#include "worker/data/audio_cache.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <deque>
#include <cmath>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <random>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/cpus.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"

namespace aviary::worker {
namespace {

namespace fs = std::filesystem;

constexpr char kFormat[] = "aviary-audio-cache/1";
constexpr char kManifest[] = "manifest.txt";
constexpr char kLockFile[] = "LOCK";
constexpr char kManifestLockFile[] = "LOCK.manifest";
constexpr char kReportFile[] = "prepare_report.csv";
const std::vector<std::string>& IndexColumns() {
  static const std::vector<std::string> kColumns{"path",
                                                 "shard",
                                                 "offset",
                                                 "frames",
                                                 "sample_rate",
                                                 "problem",
                                                 "source_sample_rate",
                                                 "source_channels",
                                                 "source_frames",
                                                 "file_bytes",
                                                 "mtime_ns",
                                                 "message"};
  return kColumns;
}

common::Logger Log() { return common::Logger("cache"); }

std::string ShardName(int shard) { return absl::StrFormat("shard-%06d", shard); }
std::string PcmPath(const std::string& dir, int shard) {
  return (fs::path(dir) / (ShardName(shard) + ".pcm")).string();
}
std::string IndexPath(const std::string& dir, int shard) {
  return (fs::path(dir) / (ShardName(shard) + ".index.csv")).string();
}

// "shard-000012.pcm" -> 12 with suffix ".pcm"; nullopt for other names.
std::optional<int> ParseShardName(const std::string& name, absl::string_view suffix) {
  constexpr absl::string_view kPrefix = "shard-";
  absl::string_view view(name);
  if (view.size() <= kPrefix.size() + suffix.size()) return std::nullopt;
  if (view.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
  if (view.substr(view.size() - suffix.size()) != suffix) return std::nullopt;
  absl::string_view digits =
      view.substr(kPrefix.size(), view.size() - kPrefix.size() - suffix.size());
  if (digits.empty() || digits.size() > 9) return std::nullopt;
  int value = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + (c - '0');
  }
  return value;
}

struct Manifest {
  int sample_rate = 0;
  ChannelMode channels = ChannelMode::kFirst;
  double max_seconds = 0;  // > 0: each file holds at most its first max_seconds seconds
};

// The shortest text that reads back as `x` (1.25, 0.1, 1.2345678): the manifest is compared
// exactly, and messages show the value as written.
std::string ExactText(double x) {
  for (int digits = 6; digits < 17; ++digits) {
    std::string text = absl::StrFormat("%.*g", digits, x);
    double back = 0;
    if (absl::SimpleAtod(text, &back) && back == x) return text;
  }
  return absl::StrFormat("%.17g", x);
}

std::string ManifestText(const Manifest& m) {
  std::string text = absl::StrCat("format=", kFormat, "\nsample_rate=", m.sample_rate,
                                  "\nchannels=", ChannelModeName(m.channels), "\nsample_type=int16le\n");
  if (m.max_seconds > 0) absl::StrAppend(&text, "max_seconds=", ExactText(m.max_seconds), "\n");
  return text;
}

// "whole files" or "the first N s of each file".
std::string DescribeMaxSeconds(double max_seconds) {
  return max_seconds > 0 ? absl::StrCat("the first ", ExactText(max_seconds), " s of each file")
                         : "whole files";
}

// Reads manifest.txt. Every line is key=value, each key at most once (DATA_LOSS otherwise, as
// for a missing or malformed required key). A key this build does not know is refused
// (FAILED_PRECONDITION), not skipped: max_seconds was added to format 1 without a version bump,
// and builds from before it read a cut cache as whole files; a key is only ever added by a
// writer that older readers must not ignore. Another format or sample_type is
// FAILED_PRECONDITION (a cache this build does not read), checked first.
absl::StatusOr<Manifest> ReadManifest(const std::string& dir) {
  const std::string path = (fs::path(dir) / kManifest).string();
  auto text = common::ReadFileToString(path);
  if (!text.ok()) {
    if (absl::IsNotFound(text.status())) {
      return absl::NotFoundError(absl::StrCat(dir, ": not an aviary audio cache (no ", kManifest,
                                              "); `aviary prepare` writes one"));
    }
    return text.status();
  }
  std::map<std::string, std::string> values;
  std::string damage;  // the first duplicate key or line that is not key=value
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    ++line_number;
    if (line.empty()) continue;
    const size_t eq = line.find('=');
    if (eq == absl::string_view::npos || eq == 0) {
      if (damage.empty()) damage = absl::StrCat("line ", line_number, " is not key=value");
      continue;
    }
    const std::string key(line.substr(0, eq));
    if (!values.emplace(key, std::string(line.substr(eq + 1))).second && damage.empty()) {
      damage = absl::StrCat("key '", key, "' appears twice (line ", line_number, ")");
    }
  }
  // Another format first: its manifest may hold anything.
  auto format = values.find("format");
  if (format != values.end() && format->second != kFormat) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": format '", format->second, "', this build reads '", kFormat, "'"));
  }
  if (!damage.empty()) return absl::DataLossError(absl::StrCat(path, ": ", damage));
  for (const char* key : {"format", "sample_rate", "channels", "sample_type"}) {
    if (!values.count(key)) {
      return absl::DataLossError(absl::StrCat(
          path, ": incomplete manifest (no ", key, "; needs format, sample_rate, channels and sample_type)"));
    }
  }
  Manifest m;
  for (const auto& [key, value] : values) {
    if (key == "format") {
      // checked above
    } else if (key == "sample_type") {
      if (value != "int16le") {
        return absl::FailedPreconditionError(
            absl::StrCat(path, ": sample_type '", value, "', this build reads 'int16le'"));
      }
    } else if (key == "sample_rate") {
      if (!absl::SimpleAtoi(value, &m.sample_rate) || m.sample_rate <= 0) {
        return absl::DataLossError(absl::StrCat(path, ": bad sample_rate '", value, "'"));
      }
    } else if (key == "channels") {
      auto mode = ParseChannelMode(value);
      if (!mode.ok()) return absl::DataLossError(absl::StrCat(path, ": ", mode.status().message()));
      m.channels = *mode;
    } else if (key == "max_seconds") {
      if (!absl::SimpleAtod(value, &m.max_seconds) || !(m.max_seconds > 0)) {
        return absl::DataLossError(absl::StrCat(path, ": bad max_seconds '", value, "'"));
      }
    } else {
      return absl::FailedPreconditionError(absl::StrCat(
          path, ": unknown key '", key, "' (written by a newer aviary?); this build reads format, sample_rate, "
          "channels, sample_type and max_seconds, and does not guess what another key changes"));
    }
  }
  return m;
}

// The identity of a source file version: size and modification time; (-1, -1) when it cannot be
// stat'ed.
struct FileStamp {
  int64_t bytes = -1;
  int64_t mtime_ns = -1;
  bool operator==(const FileStamp& o) const { return bytes == o.bytes && mtime_ns == o.mtime_ns; }
};

FileStamp StampOf(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return {};
  return {static_cast<int64_t>(st.st_size),
          static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
}

absl::Status ParseEntry(const common::CsvTable& table, size_t row, CacheEntry* e) {
  const auto& r = table.row(row);
  auto bad = [&](const char* column) {
    return absl::DataLossError(
        absl::StrCat(table.source(), ":", table.line(row), ": bad ", column));
  };
  e->path = r[0];
  if (!absl::SimpleAtoi(r[1], &e->shard)) return bad("shard");
  if (!absl::SimpleAtoi(r[2], &e->offset) || e->offset < 0) return bad("offset");
  if (!absl::SimpleAtoi(r[3], &e->frames) || e->frames < 0) return bad("frames");
  if (!absl::SimpleAtoi(r[4], &e->sample_rate)) return bad("sample_rate");
  auto problem = ParseAudioProblem(r[5]);
  if (!problem.ok()) return bad("problem");
  e->problem = *problem;
  if (!absl::SimpleAtoi(r[6], &e->source_sample_rate)) return bad("source_sample_rate");
  if (!absl::SimpleAtoi(r[7], &e->source_channels)) return bad("source_channels");
  if (!absl::SimpleAtoi(r[8], &e->source_frames)) return bad("source_frames");
  if (!absl::SimpleAtoi(r[9], &e->file_bytes)) return bad("file_bytes");
  if (!absl::SimpleAtoi(r[10], &e->mtime_ns)) return bad("mtime_ns");
  e->message = r[11];
  if (e->path.empty()) return bad("path");
  return absl::OkStatus();
}

std::string IndexText(const std::vector<CacheEntry>& entries) {
  std::ostringstream out;
  common::WriteCsvRow(out, IndexColumns());
  for (const CacheEntry& e : entries) {
    common::WriteCsvRow(out, {e.path, absl::StrCat(e.shard), absl::StrCat(e.offset),
                              absl::StrCat(e.frames), absl::StrCat(e.sample_rate),
                              AudioProblemName(e.problem), absl::StrCat(e.source_sample_rate),
                              absl::StrCat(e.source_channels), absl::StrCat(e.source_frames),
                              absl::StrCat(e.file_bytes), absl::StrCat(e.mtime_ns), e.message});
  }
  return out.str();
}

// What a cache directory holds.
struct ShardScan {
  std::map<int, std::vector<CacheEntry>> valid;  // complete shards and their entries
  std::map<int, std::string> invalid;            // shard -> why it is not usable
  // Of `invalid`, the .pcm files without an index modified within the grace period: maybe
  // being written by a prepare whose lock this host does not see. Kept, not dropped.
  std::set<int> maybe_writing;
  std::vector<std::string> stray;                // leftover temporary files
  int max_shard = -1;                            // over every shard file seen
};

// How long a .pcm without an index is taken for one being written (kept) rather than an
// interrupted run's (dropped): twice the seal interval (a writer seals a shard at the latest that
// long after opening it, and writes into it throughout), and at least 10 min (a long file's
// decode between two writes, a slow fsync, clocks apart). The lock files keep a second prepare
// out only where flock works across hosts; this keeps one prepare from deleting another's open
// shard where it does not. A writer's seal_interval_s is not recorded: this run's stands in.
double OrphanGraceSeconds(double seal_interval_s) { return std::max(2 * seal_interval_s, 600.0); }

// Reads and checks every shard index in `dir` against its .pcm (`expected_rate` is the
// manifest's sample rate). A shard is invalid (and prepare drops it) for what its files hold:
// an index that does not parse or does not cover its .pcm, a file missing. A failure to read
// them (EIO, ESTALE or a timeout of a shared filesystem, a permission) is, for prepare
// (`read_errors_fatal`), an error naming the file: sealed shards were deleted and decoded again
// for a passing read error. A reader skips such a shard (invalid, said so) and decodes its files
// on the fly, as it did: one unreadable index must not fail every attempt of a training task.
// A .pcm without an index whose mtime is less than `orphan_grace_s` old (or in the future: a
// clock ahead) is in `maybe_writing`: see OrphanGraceSeconds.
// Whether `name` is a temporary file of this code's (an index, the manifest or a prepare report
// written through WriteFileAtomically: "<name>.tmp.<pid>.<random>"). Anything else with ".tmp."
// in its name is not ours: a cache_dir set to a folder with a user's "model.tmp.pt" lost it.
bool IsOwnTemporary(const std::string& name) {
  const size_t tmp = name.rfind(".tmp.");
  if (tmp == std::string::npos || !common::IsTemporarySuffix(absl::string_view(name).substr(tmp + 5))) return false;
  const std::string base = name.substr(0, tmp);
  return base == kManifest || ParseShardName(base, ".index.csv").has_value() ||
         (absl::StartsWith(base, "prepare_report") && absl::EndsWith(base, ".csv"));
}

absl::StatusOr<ShardScan> ScanShards(const std::string& dir, int expected_rate, bool read_errors_fatal,
                                     double orphan_grace_s) {
  auto unreadable = [](const std::string& what) {
    return absl::UnavailableError(absl::StrCat(
        what, " (no shard was dropped: run `aviary prepare` again when it can be read, or fix its permissions)"));
  };
  ShardScan scan;
  std::map<int, int64_t> pcm_bytes;
  std::vector<int> indexed;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (auto shard = ParseShardName(name, ".pcm")) {
      std::error_code size_ec;
      auto size = fs::file_size(it->path(), size_ec);
      if (size_ec && size_ec != std::errc::no_such_file_or_directory) {
        const std::string why = absl::StrCat(it->path().string(), ": cannot read its size: ", size_ec.message());
        if (read_errors_fatal) return unreadable(why);
        scan.invalid[*shard] = absl::StrCat(why, " (a read error, not damage)");
      }
      pcm_bytes[*shard] = size_ec ? -1 : static_cast<int64_t>(size);
      scan.max_shard = std::max(scan.max_shard, *shard);
    } else if (auto shard = ParseShardName(name, ".index.csv")) {
      indexed.push_back(*shard);
      scan.max_shard = std::max(scan.max_shard, *shard);
    } else if (IsOwnTemporary(name)) {
      scan.stray.push_back(it->path().string());
    }
  }
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot list: ", ec.message()));

  for (int shard : indexed) {
    if (scan.invalid.count(shard)) continue;  // its .pcm could not be read
    auto pcm = pcm_bytes.find(shard);
    if (pcm == pcm_bytes.end() || pcm->second < 0) {
      scan.invalid[shard] = "its .pcm is missing";
      continue;
    }
    auto table = common::CsvTable::ReadFile(IndexPath(dir, shard));
    if (!table.ok() && absl::IsInternal(table.status())) {  // open or read failed: errno's
      if (read_errors_fatal) return unreadable(std::string(table.status().message()));
      scan.invalid[shard] = absl::StrCat(table.status().message(), " (a read error, not damage)");
      continue;
    }
    if (!table.ok()) {
      scan.invalid[shard] = std::string(table.status().message());
      continue;
    }
    if (table->header() != IndexColumns()) {
      scan.invalid[shard] = "unexpected index columns";
      continue;
    }
    std::vector<CacheEntry> entries(table->num_rows());
    std::string reason;
    for (size_t i = 0; i < table->num_rows() && reason.empty(); ++i) {
      CacheEntry& e = entries[i];
      absl::Status st = ParseEntry(*table, i, &e);
      if (!st.ok()) {
        reason = std::string(st.message());
      } else if (e.shard != shard) {
        reason = absl::StrCat("row ", i + 1, " names shard ", e.shard);
      } else if (e.offset < 0 || e.frames < 0 || e.frames > pcm->second / 2 ||
                 e.offset > pcm->second / 2 - e.frames) {
        // Checked without adding them: a damaged offset near 2^63 wrapped the sum negative and
        // passed, and Samples() then pointed outside the mapping.
        reason = absl::StrCat("its .pcm holds ", pcm->second, " bytes, row ", i + 1, " needs frames ", e.offset,
                              " to ", e.offset, " + ", e.frames, " (2 bytes each)");
      } else if (e.problem == AudioProblem::kNone && e.sample_rate != expected_rate) {
        reason = absl::StrCat(e.path, " is indexed at ", e.sample_rate, " Hz, the cache holds ",
                              expected_rate, " Hz");
      }
    }
    // A sealed shard's rows lie end to end over its whole .pcm, without a gap or an overlap (the
    // writers take their places in turn): an index that stops short lost rows (cut at a row's end,
    // it parses), and one whose rows do not tile does not describe its samples.
    if (reason.empty()) {
      std::vector<std::pair<int64_t, int64_t>> spans;  // offset, frames of the rows with samples
      for (const CacheEntry& e : entries) {
        if (e.frames > 0) spans.emplace_back(e.offset, e.frames);
      }
      std::sort(spans.begin(), spans.end());
      int64_t covered = 0;
      for (const auto& [offset, frames] : spans) {
        if (offset != covered) {
          reason = absl::StrCat("its rows ", offset < covered ? "overlap" : "leave a gap", " at sample ",
                                std::min(offset, covered));
          break;
        }
        covered = offset + frames;
      }
      if (reason.empty() && covered * 2 != pcm->second) {
        reason = absl::StrCat("its index covers ", covered * 2, " of the .pcm's ", pcm->second,
                              " bytes (rows are missing)");
      }
    }
    if (!reason.empty()) {
      scan.invalid[shard] = reason;
      continue;
    }
    scan.valid[shard] = std::move(entries);
  }
  struct timespec now {};
  ::clock_gettime(CLOCK_REALTIME, &now);
  for (const auto& [shard, bytes] : pcm_bytes) {
    if (scan.valid.count(shard) || scan.invalid.count(shard)) continue;
    // A writer's .pcm has no index until it is sealed; its mtime moves with every write. One
    // that cannot be stat()ed now (removed meanwhile) is an interrupted run's, as before.
    struct stat st;
    if (::stat(PcmPath(dir, shard).c_str(), &st) == 0) {
      const double age_s = static_cast<double>(now.tv_sec - st.st_mtim.tv_sec) +
                           static_cast<double>(now.tv_nsec - st.st_mtim.tv_nsec) * 1e-9;
      // A little in the future: another host's clock a little ahead. Far in it: a wrong clock's,
      // which would keep the shard for as long.
      if (age_s < orphan_grace_s && age_s > -orphan_grace_s) {
        scan.maybe_writing.insert(shard);
        scan.invalid[shard] = absl::StrFormat(
            "no index yet, its .pcm was written %.0f s ago: possibly a prepare on another host writing it (kept "
            "until it is %.0f s old, then dropped as an interrupted run's)",
            age_s, orphan_grace_s);
        continue;
      }
    }
    scan.invalid[shard] = "no index (an interrupted run)";
  }
  return scan;
}

// Locks the cache directory against a concurrent prepare; released when the process exits.
// A whole-cache run holds LOCK exclusively; a part of a split run (PrepareOptions::part) holds
// LOCK shared and LOCK.part-R exclusively, so that parts run together but never beside a
// whole-cache run or a second copy of themselves.
//
// A lock file, created when missing; -1 and errno on failure. One a teammate created (0644
// under a umask of 022, in a group-writable cache folder) is opened read-only: flock needs no
// write access, and a read-only descriptor holds the lock as well.
int OpenLockFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd >= 0 || errno != EACCES) return fd;
  const int read_only = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (read_only < 0) errno = EACCES;  // the first refusal is the one to tell
  return read_only;
}

// Why flock() failed on a lock file, with what to do where a read-only descriptor cannot hold
// an exclusive lock (NFS emulates flock with POSIX locks, which need write access).
std::string LockFailure(int fd, int err) {
  std::string text = std::strerror(err);
  struct stat st;
  if (err == EBADF && (::fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDONLY && ::fstat(fd, &st) == 0) {
    absl::StrAppend(&text, " (the file is not writable by this user, and this filesystem locks only files open for "
                           "writing; its owner (uid ", st.st_uid, ", mode ", absl::StrFormat("%o", st.st_mode & 07777),
                           ") can make it group-writable: chmod g+w)");
  }
  return text;
}

class DirLock {
 public:
  static absl::StatusOr<std::unique_ptr<DirLock>> Acquire(const std::string& dir, const std::string& name,
                                                          bool exclusive, const std::string& who) {
    const std::string path = (fs::path(dir) / name).string();
    int fd = OpenLockFile(path);
    if (fd < 0) {
      return absl::InternalError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
    }
    if (::flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0) {
      const int err = errno;
      const std::string why = LockFailure(fd, err);
      ::close(fd);
      if (err == EWOULDBLOCK) {
        return absl::FailedPreconditionError(
            absl::StrCat(dir, ": ", who, " is writing this cache (", path, " is locked)"));
      }
      return absl::InternalError(absl::StrCat(path, ": flock failed: ", why));
    }
    return std::unique_ptr<DirLock>(new DirLock(fd));
  }
  ~DirLock() { ::close(fd_); }  // closing drops the lock
  DirLock(const DirLock&) = delete;
  DirLock& operator=(const DirLock&) = delete;

 private:
  explicit DirLock(int fd) : fd_(fd) {}
  int fd_;
};

// A part of a run split N ways holds LOCK.of-N shared, and no run split another way may hold its
// own: part R of N owns the shards s with s % N == R, so parts of two splits would write the same
// shard numbers. Each run takes its own lock before it looks for the others', so of two runs
// started together at least one sees the other.
absl::StatusOr<std::unique_ptr<DirLock>> LockSplitCount(const std::string& dir, const PrepareOptions& options) {
  const std::string prefix = absl::StrCat(kLockFile, ".of-");
  AVIARY_ASSIGN_OR_RETURN(std::unique_ptr<DirLock> mine,
                          DirLock::Acquire(dir, absl::StrCat(prefix, options.num_parts), false,
                                           "an `aviary prepare` split into another part count"));
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    int other = 0;
    if (name.rfind(prefix, 0) != 0 || !absl::SimpleAtoi(name.substr(prefix.size()), &other) ||
        other == options.num_parts) {
      continue;
    }
    // Every part of this run probes too, each holding the probe's lock for an instant: a busy
    // probe is tried again for a while (a run split `other` ways holds its lock throughout).
    auto probe = DirLock::Acquire(dir, name, true, "");
    std::minstd_rand jitter(static_cast<unsigned>(options.part) * 7919u + static_cast<unsigned>(::getpid()));
    for (int tries = 0; absl::IsFailedPrecondition(probe.status()) && tries < 40; ++tries) {
      std::this_thread::sleep_for(std::chrono::milliseconds(25 + jitter() % 50));
      probe = DirLock::Acquire(dir, name, true, "");
    }
    if (absl::IsFailedPrecondition(probe.status())) {
      return absl::FailedPreconditionError(absl::StrCat(
          dir, ": an `aviary prepare` split into ", other, " parts is writing this cache (", name,
          " is locked); this is part ", options.part, " of ", options.num_parts,
          ", and every part of a split run must use the same part count"));
    }
    if (!probe.ok()) return probe.status();
  }
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot list: ", ec.message()));
  return mine;
}

// Collects a decode as int16 cache samples.
class Int16Sink : public SampleSink {
 public:
  void Expect(int64_t samples) override {
    try {
      data_.reserve(data_.size() + static_cast<size_t>(samples));
    } catch (const std::exception&) {  // a hint: the vector grows as it would have
    }
  }
  bool Consume(const float* samples, int64_t count) override {
    size_t base = data_.size();
    data_.resize(base + static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) {
      float x = samples[i];
      clipped_ += x >= 1.0f || x < -1.0f;
      data_[base + i] = FloatToCacheSample(x);
      any_nonzero_ |= data_[base + i] != 0;
    }
    return true;
  }
  std::vector<int16_t>& data() { return data_; }
  int64_t clipped() const { return clipped_; }
  // Whether a sample is non-zero at 16 bits (the decoder's silence check sees exact zeros only).
  bool any_nonzero() const { return any_nonzero_; }

 private:
  std::vector<int16_t> data_;
  int64_t clipped_ = 0;
  bool any_nonzero_ = false;
};

// Writes all of `data` at `offset` (pwrite: writers of one file at their own offsets).
absl::Status PWriteAll(int fd, const void* data, size_t num_bytes, off_t offset, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (num_bytes > 0) {
    ssize_t w = ::pwrite(fd, p, num_bytes, offset);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int error = errno;
      // A full disk or quota as WriteFileAtomically says it (RESOURCE_EXHAUSTED): what was
      // sealed stays, and a run with space resumes from there.
      return absl::Status(error == ENOSPC || error == EDQUOT ? absl::StatusCode::kResourceExhausted
                                                             : absl::StatusCode::kInternal,
                          absl::StrCat(path, ": write failed: ", common::ErrnoText(error),
                                       error == ENOSPC || error == EDQUOT
                                           ? "; the shards sealed so far are kept: free space and run again"
                                           : ""));
    }
    p += w;
    offset += w;
    num_bytes -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

// Appends decoded files to shards and seals them; thread-safe. A file's place in the open shard
// is taken under the writer's lock, and its samples are written there (pwrite) and the shard
// sealed (fsync, close, index) outside it: decoders do not wait for one another's writes, nor
// for a 256 MB fsync to a network filesystem. A shard is sealed by the thread whose write lands
// last once it is full (or open seal_interval_s).
class ShardWriter {
 public:
  // Shards first_shard, first_shard + stride, ... (a part of a split run writes its own residue).
  ShardWriter(std::string dir, int first_shard, int stride, int64_t shard_bytes, double seal_interval_s)
      : dir_(std::move(dir)),
        stride_(stride),
        shard_bytes_(shard_bytes),
        seal_interval_s_(seal_interval_s),
        next_shard_(first_shard) {}
  // Removes the .pcm of every shard this writer created but did not seal: there is one only when
  // the run failed (a full disk, a decode error), and at ~256 MB each they would hold the space
  // until the next prepare dropped them. Sealed shards stay: a run with space resumes from them.
  ~ShardWriter() {
    for (const auto& shard : shards_) {
      if (shard->fd >= 0) ::close(shard->fd);
      if (!shard->sealed) Discard(*shard);
    }
  }
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  absl::Status Append(CacheEntry entry, const std::vector<int16_t>& samples) {
    std::shared_ptr<Shard> shard;
    int64_t offset = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (open_ == nullptr) AVIARY_RETURN_IF_ERROR(OpenShard());
      shard = open_;
      offset = shard->samples;
      entry.shard = shard->number;
      entry.offset = offset;
      entry.frames = static_cast<int64_t>(samples.size());
      // The row first (it may throw): a place is never taken without its row.
      shard->entries.push_back(std::move(entry));
      shard->samples += static_cast<int64_t>(samples.size());
      ++shard->in_flight;
      const double open_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - shard->opened).count();
      if (shard->samples * 2 >= shard_bytes_ || (seal_interval_s_ > 0 && open_s >= seal_interval_s_)) {
        shard->full = true;
        open_.reset();  // the next file opens a new shard
      }
    }
    absl::Status written;
    try {
      if (!samples.empty()) {
        written = PWriteAll(shard->fd, samples.data(), samples.size() * sizeof(int16_t),
                            static_cast<off_t>(offset) * 2, PcmPath(dir_, shard->number));
      }
    } catch (...) {  // PcmPath's allocation: the shard must not wait for it forever
      written = absl::ResourceExhaustedError("out of memory writing a shard");
    }
    bool seal = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      --shard->in_flight;
      if (!written.ok()) shard->failed = true;
      seal = shard->full && shard->in_flight == 0 && !shard->failed;
    }
    AVIARY_RETURN_IF_ERROR(written);
    return seal ? Seal(shard.get()) : absl::OkStatus();
  }

  // Seals the shard still open; no Append may run.
  absl::Status Finish() {
    std::shared_ptr<Shard> shard;
    {
      std::lock_guard<std::mutex> lock(mu_);
      shard = std::move(open_);
    }
    return shard != nullptr && !shard->failed && shard->in_flight == 0 ? Seal(shard.get()) : absl::OkStatus();
  }

  // After Finish: what this run sealed.
  const std::vector<CacheEntry>& sealed() const { return sealed_; }
  int shards_written() const { return shards_written_; }

 private:
  struct Shard {
    int number = -1;
    int fd = -1;
    int64_t samples = 0;               // the places taken so far
    std::vector<CacheEntry> entries;   // in the order of their places
    int in_flight = 0;                 // writes under way
    bool full = false;                 // takes no more files
    bool failed = false;               // a write failed: never sealed
    bool sealed = false;               // its index is written
    bool identified = false;           // dev/ino hold the .pcm's identity (fstat after creating it)
    dev_t dev = 0;
    ino_t ino = 0;
    std::chrono::steady_clock::time_point opened;
  };

  // Makes a shard durable: fsync + close the .pcm, then write its index atomically. Without the
  // writer's lock (nothing else touches a full shard whose writes have landed).
  absl::Status Seal(Shard* shard) {
    const std::string pcm = PcmPath(dir_, shard->number);
    int sync_rc = ::fsync(shard->fd);
    int sync_errno = errno;
    int close_rc = ::close(shard->fd);
    int close_errno = errno;
    shard->fd = -1;
    if (sync_rc != 0 || close_rc != 0) {
      const int error = sync_rc != 0 ? sync_errno : close_errno;
      // A network filesystem reports a full disk here, at the flush.
      return absl::Status(error == ENOSPC || error == EDQUOT ? absl::StatusCode::kResourceExhausted
                                                             : absl::StatusCode::kInternal,
                          absl::StrCat(pcm, ": fsync/close failed: ", common::ErrnoText(error)));
    }
    AVIARY_RETURN_IF_ERROR(common::WriteFileAtomically(IndexPath(dir_, shard->number), IndexText(shard->entries)));
    std::lock_guard<std::mutex> lock(mu_);
    shard->sealed = true;
    for (CacheEntry& e : shard->entries) sealed_.push_back(std::move(e));
    shard->entries.clear();
    ++shards_written_;
    return absl::OkStatus();
  }

  absl::Status OpenShard() {
    // A new file, never one that exists: a second writer that the lock did not keep out (a
    // filesystem whose flock is local to a node) takes the next number instead of writing into
    // this one's shard.
    auto shard = std::make_shared<Shard>();
    for (int tries = 0;; ++tries) {
      shard->number = next_shard_;
      next_shard_ += stride_;
      const std::string pcm = PcmPath(dir_, shard->number);
      shard->fd = ::open(pcm.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      if (shard->fd >= 0) break;
      const int error = errno;
      if (error == EEXIST && tries < 1000) continue;
      return absl::InternalError(absl::StrCat(pcm, ": cannot create: ", common::ErrnoText(error),
                                              error == EEXIST ? " (and the next 1000 shard numbers exist)" : ""));
    }
    shard->opened = std::chrono::steady_clock::now();
    struct stat st;
    if (::fstat(shard->fd, &st) == 0) {
      shard->identified = true;
      shard->dev = st.st_dev;
      shard->ino = st.st_ino;
    }
    shards_.push_back(shard);
    open_ = std::move(shard);
    return absl::OkStatus();
  }

  // Unlinks an unsealed shard's .pcm, if the name still holds the file this writer created (not
  // one a run that took the number since made) and no index was written (a failure after the
  // rename: the shard may be whole). An unknown identity is left to the next run, as before.
  // Never throws (a destructor's).
  void Discard(const Shard& shard) const noexcept {
    try {
      const std::string pcm = PcmPath(dir_, shard.number);
      struct stat st;
      if (!shard.identified || ::stat(pcm.c_str(), &st) != 0 || st.st_dev != shard.dev || st.st_ino != shard.ino ||
          ::access(IndexPath(dir_, shard.number).c_str(), F_OK) == 0) {
        return;
      }
      if (::unlink(pcm.c_str()) != 0) {
        const int error = errno;
        Log().Warn(absl::StrCat(pcm, ": cannot remove this failed run's unsealed shard: ", common::ErrnoText(error),
                                " (the next prepare drops it)"));
        return;
      }
      Log().Info(absl::StrCat(pcm, ": removed this failed run's unsealed shard (", st.st_size, " bytes)"));
    } catch (...) {  // an allocation: the next prepare drops the shard
    }
  }

  const std::string dir_;
  const int stride_;
  const int64_t shard_bytes_;
  const double seal_interval_s_;
  std::mutex mu_;
  int next_shard_;                               // guarded by mu_
  std::shared_ptr<Shard> open_;                  // guarded by mu_; null: none open
  std::vector<std::shared_ptr<Shard>> shards_;   // every shard opened (their fds closed at the end)
  std::vector<CacheEntry> sealed_;               // guarded by mu_; written by this run
  int shards_written_ = 0;                       // guarded by mu_
};

void RemoveQuietly(const std::string& path) {
  std::error_code ec;
  fs::remove(path, ec);
  if (ec) Log().Warn(absl::StrCat("cannot remove ", path, ": ", ec.message()));
}

}  // namespace

std::string AudioCacheKey(absl::string_view path) {
  fs::path p{std::string(path)};
  if (p.is_relative()) {
    std::error_code ec;
    fs::path cwd = fs::current_path(ec);
    if (!ec) p = cwd / p;
  }
  return p.lexically_normal().string();
}

int16_t FloatToCacheSample(float x) {
  // NaN never reaches the cache (non_finite files are not stored); clamp before converting.
  float scaled = x * 32768.0f;
  if (!(scaled > -32768.0f)) return -32768;
  if (scaled >= 32767.0f) return 32767;
  return static_cast<int16_t>(std::lrint(scaled));
}

// ---------------------------------------------------------------------------------------------
// AudioCache

namespace {

// How many of `shards` shard files a cache keeps open: all while they fit in half the soft
// RLIMIT_NOFILE, which is raised towards the hard limit when they do not.
int64_t KeepOpenBudget(int64_t shards) {
  struct rlimit limit = {};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return std::min<int64_t>(shards, 256);
  const auto as_count = [](rlim_t v) {
    return v == RLIM_INFINITY ? std::numeric_limits<int64_t>::max() / 4 : static_cast<int64_t>(v);
  };
  if (shards > as_count(limit.rlim_cur) / 2 && limit.rlim_cur < limit.rlim_max) {
    struct rlimit raised = limit;
    raised.rlim_cur = static_cast<rlim_t>(std::min(as_count(limit.rlim_max), 2 * shards + 1024));
    if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) limit = raised;
  }
  return std::min(shards, as_count(limit.rlim_cur) / 2);
}

}  // namespace

absl::StatusOr<std::unique_ptr<AudioCache>> AudioCache::Open(const std::string& dir) {
  AVIARY_ASSIGN_OR_RETURN(Manifest manifest, ReadManifest(dir));
  AVIARY_ASSIGN_OR_RETURN(ShardScan scan, ScanShards(dir, manifest.sample_rate, /*read_errors_fatal=*/false,
                                                   OrphanGraceSeconds(PrepareOptions{}.seal_interval_s)));
  std::unique_ptr<AudioCache> cache(new AudioCache());
  cache->dir_ = dir;
  cache->sample_rate_ = manifest.sample_rate;
  cache->channels_ = manifest.channels;
  cache->max_seconds_ = manifest.max_seconds;
  for (const auto& [shard, reason] : scan.invalid) {
    cache->invalid_shards_.push_back(absl::StrCat(ShardName(shard), ": ", reason));
  }
  // A shard is kept open (one descriptor) while the process's limit leaves room; past half the
  // soft limit (raised towards the hard one first, as a full BirdCLEF cache holds thousands of
  // 256 MB shards and mpirun's ranks often start with 1024) each read opens its shard.
  const int64_t keep_open = KeepOpenBudget(static_cast<int64_t>(scan.valid.size()));
  for (auto& [shard, entries] : scan.valid) {  // ascending: later shards replace earlier entries
    const std::string pcm = PcmPath(dir, shard);
    // A shard that cannot be opened now (a permission, ESTALE) is skipped as an unreadable
    // index is: its files decode on the fly, and one shard must not fail every attempt of a
    // training task.
    auto skip = [&](const std::string& why) {
      cache->invalid_shards_.push_back(absl::StrCat(ShardName(shard), ": ", pcm, ": ", why, " (a read error, not damage)"));
    };
    int fd = ::open(pcm.c_str(), O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) {
      const int err = errno;
      // Out of descriptors (the process's or the system's): the shard is read by opening it
      // for each read, as one past the budget is, not skipped for the whole run.
      if ((err != EMFILE && err != ENFILE) || ::stat(pcm.c_str(), &st) != 0) {
        skip(absl::StrCat("cannot open: ", std::strerror(err)));
        continue;
      }
    } else if (::fstat(fd, &st) != 0) {
      int err = errno;
      ::close(fd);
      skip(absl::StrCat("fstat failed: ", std::strerror(err)));
      continue;
    }
    ShardFile file;
    file.fd = fd;
    file.num_bytes = static_cast<int64_t>(st.st_size);
    file.path = pcm;
    file.device = static_cast<uint64_t>(st.st_dev);
    file.inode = static_cast<uint64_t>(st.st_ino);
    if (fd >= 0 && static_cast<int64_t>(cache->shards_.size()) >= keep_open) {
      ::close(fd);
      file.fd = -1;
    }
    // The index was checked against the size the scan saw; the file opened must hold as much
    // (nothing truncates a shard; a shard shortened later is ReadSamples' DATA_LOSS).
    int64_t needed = 0;
    for (const CacheEntry& e : entries) needed = std::max(needed, (e.offset + e.frames) * 2);
    if (file.num_bytes < needed) {
      if (file.fd >= 0) ::close(file.fd);
      skip(absl::StrCat("holds ", file.num_bytes, " bytes now, its index needs ", needed));
      continue;
    }
    cache->shards_[shard] = std::move(file);
    for (CacheEntry& e : entries) {
      auto [it, inserted] = cache->by_path_.emplace(e.path, cache->entries_.size());
      if (inserted) {
        cache->entries_.push_back(std::move(e));
      } else {
        cache->entries_[it->second] = std::move(e);
      }
    }
  }
  for (const std::string& s : cache->invalid_shards_) {
    Log().Warn(absl::StrCat(dir, ": skipping ", s,
                            "; its files are decoded on the fly (run "
                            "`aviary prepare` to repair the cache)"));
  }
  cache->freshness_.reset(new std::atomic<int8_t>[cache->entries_.size()]);
  for (size_t i = 0; i < cache->entries_.size(); ++i) cache->freshness_[i].store(0);
  return cache;
}

AudioCache::~AudioCache() {
  for (auto& [shard, file] : shards_) {
    if (file.fd >= 0) ::close(file.fd);
  }
}

std::vector<const CacheEntry*> AudioCache::Entries() const {
  std::vector<const CacheEntry*> out;
  out.reserve(entries_.size());
  for (const CacheEntry& e : entries_) out.push_back(&e);
  return out;
}

const CacheEntry* AudioCache::Lookup(absl::string_view path) const {
  auto it = by_path_.find(AudioCacheKey(path));
  return it == by_path_.end() ? nullptr : &entries_[it->second];
}

const CacheEntry* AudioCache::LookupCurrent(absl::string_view path) const {
  auto it = by_path_.find(AudioCacheKey(path));
  if (it == by_path_.end()) return nullptr;
  const size_t i = it->second;
  // A "missing" verdict (cached by an older aviary; prepare tries such files again) says nothing
  // about the file now: decoded on the fly, as prepare would.
  if (entries_[i].problem == AudioProblem::kMissing) return nullptr;
  int8_t state = freshness_[i].load(std::memory_order_acquire);
  if (state == 0) {
    const CacheEntry& e = entries_[i];
    struct stat st;
    bool stale = false;
    std::string now;
    // A source that cannot be stat()ed (gone, unreachable) keeps its cached audio: there is no
    // newer version to prefer. An entry without a stamp (-1: prepare could not stat the file)
    // is stale when the file can be stat()ed now, as prepare judges it: nothing says the
    // cached audio is that file's. The caller's spelling is stat()ed, as prepare stat()ed the
    // one it was given: the key is lexically normalised, and "link/../a.ogg" is another file
    // than the key's "a.ogg" when `link` is a symbolic link to a folder elsewhere.
    if (::stat(std::string(path).c_str(), &st) == 0) {
      const FileStamp stamp{static_cast<int64_t>(st.st_size),
                            static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 +
                                st.st_mtim.tv_nsec};
      stale = !(stamp == FileStamp{e.file_bytes, e.mtime_ns});
      now = absl::StrCat(stamp.bytes, " bytes, mtime_ns ", stamp.mtime_ns);
    }
    int8_t expected = 0;
    if (freshness_[i].compare_exchange_strong(expected, stale ? 2 : 1) && stale) {
      // The first few by name; a rewritten corpus would otherwise log one line per file.
      constexpr int64_t kNamedStaleFiles = 10;
      const int64_t n = stale_files_.fetch_add(1) + 1;
      const std::string then = e.file_bytes < 0 ? std::string("cached without its size and mtime")
                                                 : absl::StrCat("then ", e.file_bytes, " bytes, mtime_ns ", e.mtime_ns);
      if (n <= kNamedStaleFiles) {
        Log().Warn(absl::StrCat(e.path, ": changed since `aviary prepare` cached it (", then, "; now ", now,
                                "): decoded on the fly instead of the cache ", dir_,
                                " (run `aviary prepare` again)"));
      }
      if (n == kNamedStaleFiles) {
        Log().Warn(absl::StrCat("more files than these ", kNamedStaleFiles, " may have changed since `aviary prepare` "
                                "cached them in ", dir_, ": they are decoded on the fly too, counted, not named"));
      }
    }
    state = freshness_[i].load(std::memory_order_acquire);
  }
  return state == 1 ? &entries_[i] : nullptr;
}

absl::Status AudioCache::ReadSamples(const CacheEntry& entry, int64_t offset, int64_t count, int16_t* out) const {
  // Without adding them: offset + count can pass INT64_MAX.
  if (offset < 0 || count < 0 || offset > entry.frames || count > entry.frames - offset) {
    return absl::OutOfRangeError(absl::StrCat(entry.path, ": ", count, " samples from sample ", offset,
                                              " are not all inside the cached ", entry.frames));
  }
  if (count == 0) return absl::OkStatus();
  auto it = shards_.find(entry.shard);
  if (it == shards_.end()) {  // Open keeps only entries of the shards it opened
    return absl::InternalError(absl::StrCat(entry.path, ": its shard ", entry.shard, " is not open"));
  }
  const ShardFile& file = it->second;
  // A shard past the descriptors kept open (KeepOpenBudget): opened for this read.
  int fd = file.fd;
  if (fd < 0) {
    fd = ::open(file.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      read_failures_.fetch_add(1);
      return absl::UnavailableError(absl::StrCat(file.path, " (", entry.path, "): cannot open: ", std::strerror(err)));
    }
  }
  struct CloseOpened {
    int fd;
    bool opened;
    ~CloseOpened() {
      if (opened) ::close(fd);
    }
  } close_opened{fd, file.fd < 0};
  if (file.fd < 0) {
    struct stat st = {};
    if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_dev) != file.device ||
        static_cast<uint64_t>(st.st_ino) != file.inode) {
      read_failures_.fetch_add(1);
      return absl::UnavailableError(absl::StrCat(file.path, " (", entry.path,
                                                 "): not the shard file the cache opened (prepared again since?)"));
    }
  }
  char* to = reinterpret_cast<char*>(out);
  const int64_t first = (entry.offset + offset) * 2;
  int64_t done = 0;
  const int64_t bytes = count * 2;
  while (done < bytes) {
    const ssize_t n = ::pread(fd, to + done, static_cast<size_t>(bytes - done), static_cast<off_t>(first + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : 0;
      read_failures_.fetch_add(1);
      const std::string where = absl::StrCat(file.path, " (", entry.path, ", bytes ", first, " to ", first + bytes, ")");
      if (err == 0) {
        return absl::DataLossError(absl::StrCat(where, ": the file ends at byte ", first + done,
                                                " (shortened since the cache was opened)"));
      }
      return absl::UnavailableError(absl::StrCat(where, ": read failed: ", std::strerror(err)));
    }
    done += n;
  }
  // The cache is little-endian int16 (manifest sample_type=int16le), as this host is.
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the cache's int16le samples are read as they are");
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int16_t>> AudioCache::Samples(const CacheEntry& entry) const {
  std::vector<int16_t> out(static_cast<size_t>(entry.frames));
  AVIARY_RETURN_IF_ERROR(ReadSamples(entry, 0, entry.frames, out.data()));
  return out;
}

absl::Status AudioCache::Read(absl::string_view path, int64_t offset, int64_t num_frames,
                              float* out) const {
  const CacheEntry* entry = LookupCurrent(path);
  if (entry == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(path, ": not in the audio cache ", dir_, ", or changed since `aviary prepare` cached it"));
  }
  if (entry->problem != AudioProblem::kNone) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": cached as ", AudioProblemName(entry->problem), ": ", entry->message));
  }
  // Without adding them: offset + num_frames can pass INT64_MAX.
  if (offset < 0 || num_frames < 0 || offset > entry->frames || num_frames > entry->frames - offset) {
    return absl::OutOfRangeError(absl::StrCat(path, ": ", num_frames, " samples from sample ", offset,
                                              " are not all inside the cached ", entry->frames));
  }
  std::vector<int16_t> samples(static_cast<size_t>(num_frames));
  AVIARY_RETURN_IF_ERROR(ReadSamples(*entry, offset, num_frames, samples.data()));
  for (int64_t i = 0; i < num_frames; ++i) out[i] = CacheSampleToFloat(samples[i]);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// PrepareAudioCache

namespace {

absl::Status CheckPrepareOptions(const PrepareOptions& options) {
  if (options.cache_dir.empty()) return absl::InvalidArgumentError("cache_dir is empty");
  if (options.sample_rate <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sample_rate ", options.sample_rate, ": must be > 0"));
  }
  if (options.shard_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard_bytes ", options.shard_bytes, ": must be > 0"));
  }
  if (options.num_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_threads ", options.num_threads, ": must be >= 0"));
  }
  if (!(options.max_seconds >= 0) || !std::isfinite(options.max_seconds)) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_seconds ", options.max_seconds, ": must be >= 0"));
  }
  if (options.num_parts < 1 || options.part < 0 || options.part >= options.num_parts) {
    return absl::InvalidArgumentError(
        absl::StrCat("part ", options.part, " of ", options.num_parts, ": expected 0 <= part < num_parts"));
  }
  return absl::OkStatus();
}

// Whether a shard number belongs to this run's part (every shard, for a whole-cache run).
bool OwnsShard(int shard, const PrepareOptions& options) { return shard % options.num_parts == options.part; }

// Whether a leftover temporary file is this part's to remove: a shard's (by its number), or any
// for a whole-cache run.
bool OwnsStray(const std::string& path, const PrepareOptions& options) {
  if (options.num_parts == 1) return true;
  const std::string name = fs::path(path).filename().string();
  // The digits up to the first '.': shard numbers grow past 6 digits (a run split 100 ways
  // numbers its shards R, R + 100, ...), and 6 of 7 name another shard.
  if (name.rfind("shard-", 0) != 0) return false;
  const size_t dot = name.find('.', 6);
  if (dot == std::string::npos) return false;
  const std::optional<int> shard = ParseShardName(name.substr(0, dot) + ".x", ".x");
  return shard.has_value() && OwnsShard(*shard, options);
}

// Whether `dir` holds a shard's samples or index (sealed or not); true when it cannot be listed.
bool HoldsAnyShard(const std::string& dir) {
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (ParseShardName(name, ".pcm") || ParseShardName(name, ".index.csv")) return true;
  }
  return static_cast<bool>(ec);
}

// FAILED_PRECONDITION unless the cache in `dir` holds what this run asks for.
absl::Status CheckManifestMatches(const std::string& dir, const Manifest& have, const Manifest& wanted) {
  if (have.sample_rate != wanted.sample_rate || have.channels != wanted.channels) {
    return absl::FailedPreconditionError(absl::StrCat(
        dir, " holds ", have.sample_rate, " Hz ", ChannelModeName(have.channels),
        "-channel audio; this run asks for ", wanted.sample_rate, " Hz ", ChannelModeName(wanted.channels),
        ": use another cache directory"));
  }
  if (have.max_seconds != wanted.max_seconds) {
    return absl::FailedPreconditionError(absl::StrCat(
        dir, " holds ", DescribeMaxSeconds(have.max_seconds), "; this run asks for ",
        DescribeMaxSeconds(wanted.max_seconds), " (data.cache_max_seconds): use another cache directory"));
  }
  return absl::OkStatus();
}

// Runs work(i) for every i in [0, n) on `threads` threads. An exception thrown by work(i)
// (std::bad_alloc) would terminate the process from a thread: it is caught, the remaining work
// is skipped, and the first one comes back as an INTERNAL error naming `what(i)`.
absl::Status ParallelFor(size_t n, int threads, const std::function<void(size_t)>& work,
                         const std::function<std::string(size_t)>& what) {
  std::atomic<size_t> next{0};
  std::mutex mu;
  absl::Status error;
  auto loop = [&]() {
    for (size_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      try {
        work(i);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> guard(mu);
        next = n;  // stop handing out work
        try {
          if (error.ok()) error = absl::InternalError(absl::StrCat(what(i), ": ", e.what()));
        } catch (...) {  // the message's allocation failed too
          if (error.ok()) error = absl::ResourceExhaustedError("out of memory");
        }
      }
    }
  };
  // The calling thread works too; a thread that cannot be started (a container's pids.max, ulimit
  // -u) leaves the work to those that could, rather than ending the process.
  std::vector<std::thread> pool;
  try {
    pool.reserve(static_cast<size_t>(std::max(0, threads - 1)));
    for (int t = 1; t < threads; ++t) pool.emplace_back(loop);
  } catch (const std::exception& e) {
    try {
      Log().Warn(absl::StrCat("started ", pool.size() + 1, " of ", threads, " threads: ", e.what()));
    } catch (...) {
    }
  }
  loop();
  for (std::thread& t : pool) t.join();
  return error;
}

// The asked-for files, distinct, in order of first appearance: those whose cached version is
// current (same size and mtime) and those to decode.
struct PendingFiles {
  struct Item {
    std::string path;  // as given (for messages)
    std::string key;
    FileStamp stamp;
  };
  std::vector<Item> todo;
  std::vector<const CacheEntry*> current;  // cached entries of files not decoded again
  int64_t files_total = 0;
};
// The part of a split run that decodes the file of `key`: by a hash (64-bit FNV-1a) of its file
// name, not by its place in the list. The parts' lists may differ (a file one host does not see
// yet, metadata edited between the parts' starts): by place, every file after the difference
// moved to another part, some were decoded twice and others by no part, and every part said it
// was done. By name, every file any part sees is some part's, the same wherever the pool is
// mounted; thousands of names split about evenly.
int PartOf(const std::string& key, int num_parts) {
  uint64_t hash = 14695981039346656037ull;
  for (unsigned char c : fs::path(key).filename().string()) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return static_cast<int>(hash % static_cast<uint64_t>(num_parts));
}

// With several parts, part R takes the distinct files whose PartOf is R (the same split in every
// part, whatever the cache holds when each starts).
absl::StatusOr<PendingFiles> SplitPaths(const std::vector<std::string>& paths,
                        const std::unordered_map<std::string, CacheEntry>& cached, const PrepareOptions& options) {
  PendingFiles pending;
  std::unordered_map<std::string, bool> seen;
  std::vector<std::pair<const std::string*, std::string>> mine;  // path, key
  for (const std::string& path : paths) {
    std::string key = AudioCacheKey(path);
    if (!seen.emplace(key, true).second) continue;
    if (options.num_parts > 1 && PartOf(key, options.num_parts) != options.part) continue;
    mine.emplace_back(&path, std::move(key));
  }
  // One stat per file, 32 at a time: on a network filesystem a stat is a round trip, and a
  // BirdCLEF pool is 150,000-250,000 files (minutes one by one).
  std::vector<FileStamp> stamps(mine.size());
  AVIARY_RETURN_IF_ERROR(ParallelFor(mine.size(), static_cast<int>(std::min<size_t>(32, std::max<size_t>(1, mine.size()))),
                                     [&](size_t i) { stamps[i] = StampOf(*mine[i].first); },
                                     [&](size_t i) { return absl::StrCat("stat ", *mine[i].first); }));
  for (size_t i = 0; i < mine.size(); ++i) {
    const std::string& path = *mine[i].first;
    std::string& key = mine[i].second;
    ++pending.files_total;
    const FileStamp& stamp = stamps[i];
    auto it = cached.find(key);
    // A missing verdict (cached by an older version) is never current: the file is tried again.
    if (it != cached.end() && it->second.problem != AudioProblem::kMissing &&
        FileStamp{it->second.file_bytes, it->second.mtime_ns} == stamp) {
      pending.current.push_back(&it->second);
    } else {
      pending.todo.push_back({path, std::move(key), stamp});
    }
  }
  return pending;
}

// Every entry of the valid shards, keyed by path (later shards win).
std::unordered_map<std::string, CacheEntry> CachedEntries(ShardScan* scan) {
  std::unordered_map<std::string, CacheEntry> cached;
  for (auto& [shard, entries] : scan->valid) {
    for (CacheEntry& e : entries) cached[e.path] = std::move(e);
  }
  return cached;
}

int DecodeThreads(const PrepareOptions& options, size_t files) {
  const int threads =
      options.num_threads > 0 ? options.num_threads : common::CoresPerRank(common::LocalRanksFromEnvironment());
  return std::max(1, std::min<int>(threads, static_cast<int>(std::min<size_t>(files, 1 << 20))));
}

}  // namespace

absl::StatusOr<PreparePlan> PlanAudioCache(const std::vector<std::string>& paths,
                                           const PrepareOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  AVIARY_RETURN_IF_ERROR(CheckPrepareOptions(options));
  const std::string& dir = options.cache_dir;
  PreparePlan plan;
  plan.cache_dir = dir;
  std::unordered_map<std::string, CacheEntry> cached;
  auto manifest = ReadManifest(dir);
  if (manifest.ok()) {
    AVIARY_RETURN_IF_ERROR(
        CheckManifestMatches(dir, *manifest, Manifest{options.sample_rate, options.channels, options.max_seconds}));
    AVIARY_ASSIGN_OR_RETURN(ShardScan scan, ScanShards(dir, manifest->sample_rate, /*read_errors_fatal=*/true,
                                                              OrphanGraceSeconds(options.seal_interval_s)));
    for (const auto& [shard, reason] : scan.invalid) {
      plan.invalid_shards += OwnsShard(shard, options) && !scan.maybe_writing.count(shard) ? 1 : 0;
    }
    cached = CachedEntries(&scan);
  } else if (!absl::IsNotFound(manifest.status())) {
    return manifest.status();
  }
  AVIARY_ASSIGN_OR_RETURN(const PendingFiles pending, SplitPaths(paths, cached, options));
  plan.files_total = pending.files_total;
  plan.files_cached = static_cast<int64_t>(pending.current.size());
  plan.files_to_decode = static_cast<int64_t>(pending.todo.size());
  const int64_t limit =
      options.max_seconds > 0 ? std::llround(options.max_seconds * options.sample_rate) : -1;
  std::mutex mu;
  absl::Status error;
  absl::Status thrown = ParallelFor(pending.todo.size(), DecodeThreads(options, pending.todo.size()), [&](size_t i) {
    auto probe = ProbeAudio(pending.todo[i].path, options.sample_rate);
    std::lock_guard<std::mutex> guard(mu);
    if (!probe.ok()) {
      if (error.ok()) error = common::Annotate(probe.status(), pending.todo[i].path);
      return;
    }
    if (!probe->ok()) {
      if (plan.problems[probe->failure.problem]++ == 0) {
        plan.examples[probe->failure.problem] = probe->failure.message;
      }
      return;
    }
    const int64_t total = probe->audio.total_samples;
    if (total < 0) {
      ++plan.files_unknown_length;
      return;
    }
    const int64_t kept = limit >= 0 ? std::min(total, limit) : total;
    if (kept > kMaxDecodeSamples) {  // reported and left out of the cache, as prepare does
      if (plan.problems[AudioProblem::kNotAudio]++ == 0) {
        plan.examples[AudioProblem::kNotAudio] = absl::StrCat(
            pending.todo[i].path, ": ", total, " samples at ", options.sample_rate, " Hz, more than the decoder's limit of ",
            kMaxDecodeSamples, " (not cached: training decodes its clips' windows from the file)");
      }
      return;
    }
    plan.source_seconds += static_cast<double>(total) / options.sample_rate;
    plan.audio_seconds += static_cast<double>(kept) / options.sample_rate;
    plan.cache_bytes += kept * static_cast<int64_t>(sizeof(int16_t));
  }, [&](size_t i) { return pending.todo[i].path; });
  AVIARY_RETURN_IF_ERROR(error);
  AVIARY_RETURN_IF_ERROR(thrown);
  plan.elapsed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return plan;
}

absl::StatusOr<PrepareReport> PrepareAudioCache(const std::vector<std::string>& paths,
                                                const PrepareOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  AVIARY_RETURN_IF_ERROR(CheckPrepareOptions(options));
  const std::string& dir = options.cache_dir;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot create: ", ec.message()));
  std::unique_ptr<DirLock> lock, part_lock, split_lock;
  if (options.num_parts == 1) {
    AVIARY_ASSIGN_OR_RETURN(lock, DirLock::Acquire(dir, kLockFile, true, "another `aviary prepare`"));
  } else {
    AVIARY_ASSIGN_OR_RETURN(lock, DirLock::Acquire(dir, kLockFile, false, "an `aviary prepare` of the whole cache"));
    AVIARY_ASSIGN_OR_RETURN(part_lock, DirLock::Acquire(dir, absl::StrCat(kLockFile, ".part-", options.part), true,
                                                        absl::StrCat("another `aviary prepare` of part ", options.part)));
    AVIARY_ASSIGN_OR_RETURN(split_lock, LockSplitCount(dir, options));
  }

  Manifest wanted{options.sample_rate, options.channels, options.max_seconds};
  {
    // The parts of a split run may all find no manifest: one writes it, the others then read it.
    const std::string guard_path = (fs::path(dir) / kManifestLockFile).string();
    const int guard = OpenLockFile(guard_path);
    if (guard < 0 || ::flock(guard, LOCK_EX) != 0) {
      const int err = errno;
      const std::string why = guard >= 0 ? LockFailure(guard, err) : std::string(std::strerror(err));
      if (guard >= 0) ::close(guard);
      return absl::InternalError(absl::StrCat(guard_path, ": cannot lock: ", why));
    }
    auto manifest = ReadManifest(dir);
    absl::Status st;
    if (manifest.ok()) {
      st = CheckManifestMatches(dir, *manifest, wanted);
      if (!st.ok() && options.num_parts == 1 && !HoldsAnyShard(dir)) {
        // Nothing was ever sealed under the manifest (a first run stopped early, or one that found
        // no file readable): it binds nothing, and this whole-cache run (LOCK held exclusively)
        // writes its own. Refused, the corrected run was told to use another folder.
        Log().Info(absl::StrCat(dir, ": holds no shard; its manifest is rewritten for this run (", st.message(), ")"));
        st = common::WriteFileAtomically((fs::path(dir) / kManifest).string(), ManifestText(wanted));
      }
    } else if (absl::IsNotFound(manifest.status())) {
      st = common::WriteFileAtomically((fs::path(dir) / kManifest).string(), ManifestText(wanted));
    } else {
      st = manifest.status();
    }
    ::close(guard);  // drops the lock
    AVIARY_RETURN_IF_ERROR(st);
  }

  PrepareReport report;
  report.cache_dir = dir;
  AVIARY_ASSIGN_OR_RETURN(ShardScan scan, ScanShards(dir, wanted.sample_rate, /*read_errors_fatal=*/true,
                                                   OrphanGraceSeconds(options.seal_interval_s)));
  for (const std::string& stray : scan.stray) {
    // A recent temporary file may be a prepare's on another host (an index being sealed), where
    // flock does not reach: left for a later run, as a recent shard without an index is.
    struct stat st;
    struct timespec now {};
    ::clock_gettime(CLOCK_REALTIME, &now);
    const double grace_s = OrphanGraceSeconds(options.seal_interval_s);
    if (::stat(stray.c_str(), &st) == 0) {
      const double age_s = static_cast<double>(now.tv_sec - st.st_mtim.tv_sec);
      if (age_s < grace_s && age_s > -grace_s) continue;
    }
    if (OwnsStray(stray, options)) RemoveQuietly(stray);
  }
  for (const auto& [shard, reason] : scan.invalid) {
    if (!OwnsShard(shard, options)) continue;  // another part's, maybe being written now
    if (scan.maybe_writing.count(shard)) {
      Log().Warn(absl::StrCat(dir, ": keeping ", ShardName(shard), " (", reason, ")"));
      report.kept_shards.push_back(absl::StrCat(ShardName(shard), ": ", reason));
      continue;
    }
    Log().Warn(absl::StrCat(dir, ": dropping ", ShardName(shard), " (", reason,
                            "); its files are decoded again"));
    report.dropped_shards.push_back(absl::StrCat(ShardName(shard), ": ", reason));
    RemoveQuietly(IndexPath(dir, shard));
    RemoveQuietly(PcmPath(dir, shard));
  }
  const std::unordered_map<std::string, CacheEntry> cached = CachedEntries(&scan);
  AVIARY_ASSIGN_OR_RETURN(const PendingFiles pending, SplitPaths(paths, cached, options));
  const std::vector<PendingFiles::Item>& todo = pending.todo;
  std::vector<const CacheEntry*> outcomes = pending.current;
  report.files_total = pending.files_total;
  report.files_cached = static_cast<int64_t>(pending.current.size());

  DecodeOptions decode;
  decode.target_sample_rate = options.sample_rate;
  decode.channels = options.channels;
  decode.duration_s = options.max_seconds;  // 0: to the end; else the first max_seconds only

  std::mutex mu;  // guards progress, error, clipped, transient (the writer has its own lock)
  int first_shard = scan.max_shard + 1;
  while (!OwnsShard(first_shard, options)) ++first_shard;
  ShardWriter writer(dir, first_shard, options.num_parts, options.shard_bytes, options.seal_interval_s);
  PrepareProgress progress;
  progress.files_total = report.files_total;
  progress.files_cached = report.files_cached;
  progress.files_to_decode = static_cast<int64_t>(todo.size());
  absl::Status error;
  int64_t clipped = 0;
  std::deque<CacheEntry> transient;  // kMissing and over-limit outcomes: reported, not cached
  std::atomic<bool> failed{false};
  // Asked once before the decoding too: a stop during the listing and the scan (minutes on a
  // large cache over a network filesystem) came to nothing.
  if (options.should_stop && options.should_stop()) {
    return absl::CancelledError(absl::StrCat(dir, ": stopped before decoding (", todo.size(),
                                             " files to decode); no file was decoded"));
  }
  absl::Status thrown = ParallelFor(todo.size(), DecodeThreads(options, todo.size()), [&](size_t i) {
    if (failed.load()) return;
    if (options.should_stop && options.should_stop()) {
      std::lock_guard<std::mutex> guard(mu);
      if (error.ok()) {
        error = absl::CancelledError(absl::StrCat(
            dir, ": stopped after ", progress.files_done, " of ", todo.size(),
            " files to decode; the shards sealed so far stay, the one being written is removed; run it again to "
            "decode the rest"));
      }
      failed = true;
      return;
    }
    const PendingFiles::Item& item = todo[i];
    Int16Sink sink;
    auto result = DecodeAudioTo(item.path, decode, &sink);
    CacheEntry entry;
    entry.path = item.key;
    entry.file_bytes = item.stamp.bytes;
    entry.mtime_ns = item.stamp.mtime_ns;
    entry.sample_rate = options.sample_rate;
    if (result.ok()) {
      const DecodedAudio& audio = result->audio;
      entry.problem = result->failure.problem;
      entry.message = result->failure.message;
      entry.source_sample_rate = audio.source_sample_rate;
      entry.source_channels = audio.source_channels;
      entry.source_frames = audio.source_frames;
      if (entry.problem == AudioProblem::kNone && !sink.data().empty() && !sink.any_nonzero()) {
        // Audible to the decoder, silent in the cache: every clip of it would be skipped as
        // silent (the loader's check), so the report counts it as silent, not ok.
        entry.problem = AudioProblem::kSilent;
        entry.message = absl::StrCat(item.path, ": all ", sink.data().size(),
                                     " samples are zero at 16 bits (none reaches 2^-16)");
      }
      if (entry.problem != AudioProblem::kNone) sink.data().clear();
      if (result->failure.over_limit) {
        absl::StrAppend(&entry.message, " (not cached: training decodes its clips' windows from the file; "
                                        "data.cache_max_seconds caches the first seconds of every file)");
      }
    }
    std::unique_lock<std::mutex> guard(mu);
    if (!result.ok()) {
      if (error.ok()) error = common::Annotate(result.status(), item.path);
      failed = true;
      return;
    }
    if (entry.problem == AudioProblem::kMissing || result->failure.over_limit) {
      // Not a verdict on the file (it could not be read now: permission, too many open files,
      // an I/O error): counted in the report, never cached, so the next run tries again. Nor is
      // a file too long to decode whole: cached as not_audio, training would skip the file whose
      // windows it decodes when there is no cache.
      transient.push_back(std::move(entry));
      ++progress.files_done;
      // The time too: a stretch of unreadable files (a share gone) printed nothing for as long
      // (the printer throttles by it), then rates over a stale time.
      progress.elapsed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (options.progress) options.progress(progress);
      return;
    }
    clipped += sink.clipped();
    guard.unlock();  // the samples are written beside the other decoders' (ShardWriter)
    absl::Status st = writer.Append(std::move(entry), sink.data());
    guard.lock();
    if (!st.ok()) {
      if (error.ok()) error = st;
      failed = true;
      return;
    }
    ++progress.files_done;
    progress.audio_seconds += static_cast<double>(sink.data().size()) / options.sample_rate;
    progress.elapsed_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (options.progress) options.progress(progress);
  }, [&](size_t i) { return todo[i].path; });
  AVIARY_RETURN_IF_ERROR(error);
  AVIARY_RETURN_IF_ERROR(thrown);
  AVIARY_RETURN_IF_ERROR(writer.Finish());

  report.files_decoded = static_cast<int64_t>(writer.sealed().size() + transient.size());
  report.clipped_samples = clipped;
  report.shards_written = writer.shards_written();
  for (const CacheEntry& e : writer.sealed()) outcomes.push_back(&e);
  for (const CacheEntry& e : transient) outcomes.push_back(&e);
  for (const CacheEntry* e : outcomes) {
    ++report.counts[e->problem];
    if (e->problem == AudioProblem::kNone) {
      report.audio_seconds += static_cast<double>(e->frames) / e->sample_rate;
    } else if (!report.examples.count(e->problem)) {
      report.examples[e->problem] = e->message;
    }
  }
  report.elapsed_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  AVIARY_RETURN_IF_ERROR(WritePrepareReportCsv(report, (fs::path(dir) / PrepareReportName(options)).string()));
  return report;
}

std::string PrepareReportName(const PrepareOptions& options) {
  if (options.num_parts == 1) return kReportFile;
  return absl::StrCat("prepare_report.part-", options.part, "-of-", options.num_parts, ".csv");
}

absl::Status WritePrepareReportCsv(const PrepareReport& report, const std::string& path) {
  std::ostringstream out;
  common::WriteCsvRow(out, {"reason", "files", "seconds", "example"});
  auto row = [&](AudioProblem problem) {
    auto it = report.counts.find(problem);
    int64_t n = it == report.counts.end() ? 0 : it->second;
    auto example = report.examples.find(problem);
    common::WriteCsvRow(
        out, {AudioProblemName(problem), absl::StrCat(n),
              problem == AudioProblem::kNone ? absl::StrFormat("%.3f", report.audio_seconds) : "",
              example == report.examples.end() ? "" : example->second});
  };
  row(AudioProblem::kNone);
  for (const auto& [problem, n] : report.counts) {
    if (problem != AudioProblem::kNone) row(problem);
  }
  return common::WriteFileAtomically(path, out.str());
}

}  // namespace aviary::worker
