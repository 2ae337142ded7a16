// The decoded-audio cache: every file of a stage decoded once (resampled, mono), stored as int16
// PCM shards plus a CSV index, read by training with pread. `aviary prepare` writes it
// (PrepareAudioCache); the clip loader reads it (AudioCache) and decodes on the fly what it
// does not hold.
//
// Format (version 1), all in one directory:
//   manifest.txt               "format=aviary-audio-cache/1", "sample_rate=32000",
//                              "channels=first", "sample_type=int16le", and "max_seconds=N"
//                              when each file holds only its first N seconds
//                              (data.cache_max_seconds): one key=value per line, each key once.
//                              A cache holds one rate, one channel mode and one cut. Readers
//                              refuse a key they do not know (FAILED_PRECONDITION): a writer
//                              that adds one must also bump the format, since builds older
//                              than this check skip unknown keys.
//   shard-000000.pcm           int16 little-endian mono samples, files back to back (~256 MB).
//   shard-000000.index.csv     the shard's index, written atomically (temporary file, fsync,
//                              rename) once its .pcm is complete and fsynced. Columns:
//                              path,shard,offset,frames,sample_rate,problem,source_sample_rate,
//                              source_channels,source_frames,file_bytes,mtime_ns,message
//                              `path` is the absolute, lexically normalised audio path (the key);
//                              `offset`/`frames` count samples in the .pcm; `problem` is
//                              AudioProblemName (files with a problem have frames 0 and are
//                              listed so that they are not decoded again); file_bytes/mtime_ns
//                              identify the source file version that was decoded (size and
//                              mtime only: a file replaced by one of the same size whose mtime
//                              was carried over, by cp -p, rsync -t or tar, is taken for the
//                              one cached; `touch` such files. Not st_ino or st_ctime: they
//                              differ per copy, per fuse mount or after a chmod, and would make
//                              whole caches stale).
//   prepare_report.csv         the last prepare's counts per reason (see WritePrepareReportCsv);
//                              prepare_report.part-R-of-N.csv for part R of a split run.
//   LOCK, LOCK.part-R,         flock()ed by a running prepare (see PrepareOptions::part);
//   LOCK.of-N
//   LOCK.manifest              while one writes the manifest.
// A split prepare (several processes or hosts, e.g. the ranks of an mpirun) writes one cache:
// part R of N decodes the distinct files whose name hashes to R (PartOf in the .cc; not by their
// place in the list, which the parts may see differently) and numbers its shards R mod N, so the
// parts never write the same file; the shard indexes together are the cache's index. A part is
// refused while a run split into another number of parts writes the cache (LOCK.of-N).
// A shard whose index is missing (an interrupted run) or unreadable, or whose .pcm is shorter
// than its index says, is ignored by readers and deleted by the next prepare, which decodes its
// files again: a kill loses at most the shard in progress. A .pcm without an index written to
// within max(2 x seal_interval_s, 10 min) is kept instead (PrepareReport::kept_shards): it may be
// one that a prepare on another host is writing, where flock does not reach across hosts. A
// prepare that fails removes the unsealed shards it created. When a path appears in several
// shards (a file re-decoded because it changed), the highest shard number wins.
//
// Samples are stored as round(x * 32768) clamped to [-32768, 32767] and read back as q / 32768:
// within 1/65536 of the decode for -1 <= x < 32767/32768, within 1/32768 up to 1 (the top
// step saturates at 32767), and clipped at +-1 (counted as clipped from |x| >= 1).
#ifndef AVIARY_WORKER_DATA_AUDIO_CACHE_H_
#define AVIARY_WORKER_DATA_AUDIO_CACHE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "worker/data/audio.h"

namespace aviary::worker {

inline constexpr int64_t kDefaultShardBytes = int64_t{256} << 20;

// The cache key of an audio path: absolute (against the working directory) and lexically
// normalised ("a/./b/../c.ogg" -> "/cwd/a/c.ogg"). Does not touch the file system beyond getcwd.
std::string AudioCacheKey(absl::string_view path);

// One indexed file.
struct CacheEntry {
  std::string path;  // the key
  int shard = -1;
  int64_t offset = 0;  // first sample in the shard
  int64_t frames = 0;  // samples (0 when problem != kNone)
  int sample_rate = 0;
  AudioProblem problem = AudioProblem::kNone;
  std::string message;  // the problem's message ("" when ok)
  int source_sample_rate = 0;
  int source_channels = 0;
  int64_t source_frames = -1;
  int64_t file_bytes = -1;  // size of the source file when decoded
  int64_t mtime_ns = -1;    // its modification time
};

// A read-only cache, its shards open (as many as half the descriptor limit allows; the rest
// opened by each read) and read with pread (not mapped: a page that cannot be read
// on a shared filesystem, EIO or ESTALE once another host replaced the file, raised SIGBUS and
// killed the rank; a failed pread is an error the clip loader answers by decoding the file).
// Thread-safe: immutable after Open (but for LookupCurrent's per-entry freshness flags and the
// read-failure count, atomics); any number of threads may call Lookup/Read concurrently.
// Move-free: hold it in the unique_ptr Open returns.
class AudioCache {
 public:
  // Opens the cache in `dir`: reads manifest.txt (NOT_FOUND when absent, FAILED_PRECONDITION
  // for another format version, sample_type or an unknown key, DATA_LOSS when damaged: a key
  // twice, a required key missing or malformed; INTERNAL or INVALID_ARGUMENT when it cannot be
  // read), every readable shard index, and opens their .pcm files. Shards that are incomplete,
  // inconsistent or cannot be opened are skipped (see invalid_shards()); INTERNAL when
  // the folder cannot be listed.
  static absl::StatusOr<std::unique_ptr<AudioCache>> Open(const std::string& dir);
  ~AudioCache();
  AudioCache(const AudioCache&) = delete;
  AudioCache& operator=(const AudioCache&) = delete;

  const std::string& dir() const { return dir_; }
  int sample_rate() const { return sample_rate_; }
  ChannelMode channels() const { return channels_; }
  // > 0: each file holds at most its first max_seconds() seconds; 0: whole files.
  double max_seconds() const { return max_seconds_; }
  size_t size() const { return entries_.size(); }
  // Shards skipped by Open, each "shard-000003: reason".
  const std::vector<std::string>& invalid_shards() const { return invalid_shards_; }
  // Every entry, in no particular order.
  std::vector<const CacheEntry*> Entries() const;

  // The entry for `path` (any spelling that AudioCacheKey maps to the same key), or nullptr.
  const CacheEntry* Lookup(absl::string_view path) const;
  // Lookup, for a reader about to use the entry: nullptr also when the source file changed
  // since prepare cached it (its size or mtime differ from the entry's file_bytes/mtime_ns),
  // so that the caller decodes the new version instead of serving stale audio. The source is
  // stat()ed once per entry, on first use, under the spelling `path` gives (the first caller's
  // for a key several spellings share; a file changed later is not noticed); a stale entry
  // is counted in stale_files(), and the first 10 are logged by name (then one line says the
  // rest are counted). A source that cannot be stat()ed (gone) keeps
  // its cached entry; an entry without a stamp (file_bytes -1) is stale once the file can be
  // stat()ed, and a "missing" entry (older caches) is never served (as prepare judges them).
  const CacheEntry* LookupCurrent(absl::string_view path) const;
  // Entries found stale by LookupCurrent so far.
  int64_t stale_files() const { return stale_files_.load(); }
  // Reads samples [offset, offset + count) of `entry` into `out` (count int16). OUT_OF_RANGE
  // when the range is not inside [0, entry.frames); UNAVAILABLE naming the .pcm file when the
  // read fails (EIO, ESTALE) and DATA_LOSS when the file ends early (shortened since Open); each
  // failure is counted in read_failures().
  absl::Status ReadSamples(const CacheEntry& entry, int64_t offset, int64_t count, int16_t* out) const;
  // The entry's samples, all of them (empty for a problem entry); ReadSamples' errors.
  absl::StatusOr<std::vector<int16_t>> Samples(const CacheEntry& entry) const;
  // ReadSamples calls that failed so far.
  int64_t read_failures() const { return read_failures_.load(); }
  // Copies samples [offset, offset + num_frames) of `path` to `out` as floats (q / 32768).
  // NOT_FOUND when LookupCurrent finds no entry (not cached, changed since prepare cached it,
  // or a "missing" verdict), FAILED_PRECONDITION when it was cached with a problem,
  // OUT_OF_RANGE when the range is not inside [0, frames).
  absl::Status Read(absl::string_view path, int64_t offset, int64_t num_frames, float* out) const;

 private:
  struct ShardFile {
    int fd = -1;  // -1: past the descriptors kept open, opened by each read
    int64_t num_bytes = 0;
    std::string path;
    // The file Open checked: a read that opens its path must find the same one (a cache
    // prepared again under the same folder numbers its shards from 0 again).
    uint64_t device = 0, inode = 0;
  };
  AudioCache() = default;

  std::string dir_;
  int sample_rate_ = 0;
  ChannelMode channels_ = ChannelMode::kFirst;
  double max_seconds_ = 0;
  std::vector<CacheEntry> entries_;
  std::unordered_map<std::string, size_t> by_path_;
  std::map<int, ShardFile> shards_;  // shard -> its open .pcm
  std::vector<std::string> invalid_shards_;
  // Per entry, whether its source file is unchanged: 0 not checked yet, 1 current, 2 stale.
  std::unique_ptr<std::atomic<int8_t>[]> freshness_;
  mutable std::atomic<int64_t> stale_files_{0};
  mutable std::atomic<int64_t> read_failures_{0};
};

// Converts a cached sample to float.
inline float CacheSampleToFloat(int16_t q) { return static_cast<float>(q) * (1.0f / 32768.0f); }
// round(x * 32768) clamped to int16.
int16_t FloatToCacheSample(float x);

// Progress of a prepare run, handed to PrepareOptions::progress.
struct PrepareProgress {
  int64_t files_total = 0;      // distinct files asked for
  int64_t files_cached = 0;     // already in the cache when the run started
  int64_t files_done = 0;       // decoded (or classified) by this run so far
  int64_t files_to_decode = 0;  // files_total - files_cached
  double audio_seconds = 0;     // output audio written by this run
  double elapsed_s = 0;
};

struct PrepareOptions {
  std::string cache_dir;  // created when missing
  int sample_rate = 32000;
  ChannelMode channels = ChannelMode::kFirst;
  // > 0: decode and store only the first max_seconds seconds of each file (decoding stops
  // there); 0: whole files. A cache keeps the value it was made with.
  double max_seconds = 0;
  int num_threads = 0;  // decode threads (probe threads for PlanAudioCache); 0 = every core
  // This process's share of a split run: part `part` of `num_parts` (see the file comment).
  // Parts of one run must agree on num_parts (their lists may differ: a file is the part its
  // name hashes to).
  int part = 0;
  int num_parts = 1;
  int64_t shard_bytes = kDefaultShardBytes;  // a shard is sealed once it holds this much
  // A shard is also sealed when it has been open this long (so that a kill loses at most this
  // much work on slow corpora); <= 0 disables.
  double seal_interval_s = 120.0;
  // Called after every file, serialised (never concurrently), from the decode threads.
  std::function<void(const PrepareProgress&)> progress;
  // Asked before every file (from the decode threads, concurrently): true ends the run with
  // CANCELLED once the files being decoded are done; the shards sealed so far stay, the one
  // being written is removed (a SIGTERM from mpirun, a Ctrl-C, a scancel).
  std::function<bool()> should_stop;
};

struct PrepareReport {
  std::string cache_dir;
  int64_t files_total = 0;    // distinct files asked for
  int64_t files_cached = 0;   // found in the cache (same size and mtime): not decoded again
  int64_t files_decoded = 0;  // decoded by this run (problems included)
  // Every asked-for file by outcome (kNone = usable audio), whether cached earlier or now.
  std::map<AudioProblem, int64_t> counts;
  std::map<AudioProblem, std::string> examples;  // the first message per problem
  double audio_seconds = 0;     // usable audio in the cache for the asked-for files
  int64_t clipped_samples = 0;  // samples of this run clamped to int16's range
  int shards_written = 0;
  std::vector<std::string> dropped_shards;  // incomplete shards removed at the start
  // Shards without an index written to recently, left alone: possibly being written by a
  // prepare on another host (see the file comment), "shard-000007: reason".
  std::vector<std::string> kept_shards;
  double elapsed_s = 0;
};

// Decodes every path not yet in the cache (see the file comment) with `num_threads` threads and
// writes the report to <cache_dir>/prepare_report.csv. Problem files are recorded and counted,
// never fatal. FAILED_PRECONDITION when the cache holds another sample rate, channel mode or
// max_seconds, or
// another prepare holds its lock; INVALID_ARGUMENT for bad options; INTERNAL for I/O failures.
absl::StatusOr<PrepareReport> PrepareAudioCache(const std::vector<std::string>& paths,
                                                const PrepareOptions& options);

// What PrepareAudioCache would do, from the cache's index and the files' headers only (nothing
// is decoded or written): `aviary prepare --dry-run`.
struct PreparePlan {
  std::string cache_dir;
  int64_t files_total = 0;      // distinct files asked for
  int64_t files_cached = 0;     // current in the cache: not decoded again
  int64_t files_to_decode = 0;  // the rest (the problems below included)
  // Problems the header shows (missing, empty, not_audio, truncated, too_short); decoding can
  // find more (silent, non_finite, a truncation past the header).
  std::map<AudioProblem, int64_t> problems;
  std::map<AudioProblem, std::string> examples;
  int64_t files_unknown_length = 0;  // headers without a length (some mp3s): not in the sums
  double source_seconds = 0;  // audio of the files to decode, at full length
  double audio_seconds = 0;   // what the cache would hold of them (after max_seconds)
  int64_t cache_bytes = 0;    // int16 samples to write: audio_seconds x sample_rate x 2
  int invalid_shards = 0;     // incomplete shards a prepare would drop (their files are counted;
                              // recent ones without an index, which it keeps, are not)
  double elapsed_s = 0;
};
// FAILED_PRECONDITION when the cache holds another rate, channel mode or cut, as for
// PrepareAudioCache; INVALID_ARGUMENT for bad options. A missing cache directory is an empty
// cache.
absl::StatusOr<PreparePlan> PlanAudioCache(const std::vector<std::string>& paths,
                                           const PrepareOptions& options);

// "prepare_report.csv", or "prepare_report.part-R-of-N.csv" for a part of a split run.
std::string PrepareReportName(const PrepareOptions& options);

// reason,files,seconds,example: one row per outcome ("ok" first, then each problem seen).
absl::Status WritePrepareReportCsv(const PrepareReport& report, const std::string& path);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_DATA_AUDIO_CACHE_H_
