#include "worker/data/audio_cache.h"

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <chrono>
#include <limits>
#include <atomic>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/csv.h"
#include "gtest/gtest.h"
#include "tests/worker/audio_test_util.h"
#include "worker/data/audio.h"
#include "worker/data/clip_loader.h"

namespace aviary::worker {
namespace {

namespace fs = std::filesystem;
using testing::SharedCorpus;
using testing::Sine;
using testing::TempDir;
using testing::WriteAudio;
using testing::WriteBytes;

// Every corpus file (broken ones included).
std::vector<std::string> CorpusPaths() {
  const auto& corpus = SharedCorpus();
  std::vector<std::string> paths;
  for (const auto& f : corpus.ogg) paths.push_back(corpus.OggPath(f));
  for (const auto& f : corpus.mp3) paths.push_back(corpus.Mp3Path(f));
  return paths;
}

PrepareOptions Options(const std::string& dir, int threads = 2, int64_t shard_bytes = 1 << 20) {
  PrepareOptions options;
  options.cache_dir = dir;
  options.num_threads = threads;
  options.shard_bytes = shard_bytes;
  return options;
}

PrepareReport MustPrepare(const std::vector<std::string>& paths, const PrepareOptions& options) {
  auto report = PrepareAudioCache(paths, options);
  EXPECT_TRUE(report.ok()) << report.status();
  return report.ok() ? *report : PrepareReport{};
}

std::unique_ptr<AudioCache> MustOpen(const std::string& dir) {
  auto cache = AudioCache::Open(dir);
  EXPECT_TRUE(cache.ok()) << cache.status();
  return cache.ok() ? *std::move(cache) : nullptr;
}

std::vector<int> ShardNumbers(const std::string& dir, const std::string& suffix) {
  std::vector<int> shards;
  for (const auto& entry : fs::directory_iterator(dir)) {
    std::string name = entry.path().filename().string();
    if (name.rfind("shard-", 0) == 0 && name.size() > suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      shards.push_back(std::stoi(name.substr(6, 6)));
    }
  }
  std::sort(shards.begin(), shards.end());
  return shards;
}

std::string ShardFile(const std::string& dir, int shard, const std::string& suffix) {
  char name[32];
  std::snprintf(name, sizeof(name), "shard-%06d", shard);
  return dir + "/" + name + suffix;
}

// Sets the file's mtime (and atime) `seconds` back from now: a shard left by an interrupted run
// long ago, which prepare drops (a recent one may be being written: kept).
void Backdate(const std::string& path, int64_t seconds) {
  struct timespec now {};
  ASSERT_EQ(::clock_gettime(CLOCK_REALTIME, &now), 0);
  now.tv_sec -= static_cast<time_t>(seconds);
  const struct timespec times[2] = {now, now};
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, 0), 0) << path << ": " << std::strerror(errno);
}

// Every cached value equals the direct decode quantised to int16: |q / 32768 - x| <= 1/65536
// (round to nearest), except where x lies outside int16's range and is clamped.
void ExpectCacheMatchesDecode(const AudioCache& cache, const std::vector<std::string>& paths) {
  for (const std::string& path : paths) {
    const CacheEntry* entry = cache.Lookup(path);
    ASSERT_NE(entry, nullptr) << path;
    DecodeOptions options;
    auto decoded = DecodeAudio(path, options);
    ASSERT_TRUE(decoded.ok());
    EXPECT_EQ(entry->problem, decoded->failure.problem) << path;
    EXPECT_EQ(entry->message, decoded->failure.message) << path;
    if (!decoded->ok()) {
      EXPECT_EQ(entry->frames, 0);
      continue;
    }
    EXPECT_EQ(entry->sample_rate, 32000);
    EXPECT_EQ(entry->source_sample_rate, decoded->audio.source_sample_rate);
    EXPECT_EQ(entry->source_frames, decoded->audio.source_frames);
    absl::StatusOr<std::vector<int16_t>> read = cache.Samples(*entry);
    ASSERT_TRUE(read.ok()) << read.status();
    const std::vector<int16_t>& q = *read;
    const std::vector<float>& x = decoded->audio.samples;
    ASSERT_EQ(q.size(), x.size()) << path;
    for (size_t i = 0; i < x.size(); ++i) {
      const float clamped = std::min(std::max(x[i], -1.0f), 32767.0f / 32768.0f);
      ASSERT_LE(std::fabs(CacheSampleToFloat(q[i]) - clamped), 1.0f / 65536 + 1e-9f)
          << path << " sample " << i << ": " << x[i];
    }
  }
}

TEST(AudioCacheTest, RoundTripEqualsTheDirectDecodeQuantised) {
  TempDir tmp;
  std::vector<std::string> paths = CorpusPaths();
  const std::string stereo = tmp.Sub("stereo48k.wav");
  std::vector<float> lr(48000 * 2 * 2);
  for (size_t i = 0; i < lr.size(); ++i) lr[i] = static_cast<float>(0.3 * std::sin(i * 0.01));
  WriteAudio(stereo, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 48000, 2, lr);
  paths.push_back(stereo);
  paths.push_back(paths.front());  // duplicates are decoded once

  const std::string dir = tmp.Sub("cache");
  PrepareReport report = MustPrepare(paths, Options(dir));
  EXPECT_EQ(report.files_total, static_cast<int64_t>(paths.size()) - 1);
  EXPECT_EQ(report.files_decoded, report.files_total);
  EXPECT_EQ(report.files_cached, 0);
  EXPECT_GE(report.shards_written, 3);  // 1 MB shards
  EXPECT_TRUE(report.dropped_shards.empty());

  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(cache->sample_rate(), 32000);
  EXPECT_EQ(cache->channels(), ChannelMode::kFirst);
  EXPECT_EQ(static_cast<int64_t>(cache->size()), report.files_total);
  EXPECT_TRUE(cache->invalid_shards().empty());
  paths.pop_back();
  ExpectCacheMatchesDecode(*cache, paths);

  // Read(): floats of a range, and its errors.
  const CacheEntry* entry = cache->Lookup(stereo);
  ASSERT_NE(entry, nullptr);
  std::vector<float> out(100);
  ASSERT_TRUE(cache->Read(stereo, 5000, 100, out.data()).ok());
  absl::StatusOr<std::vector<int16_t>> q = cache->Samples(*entry);
  ASSERT_TRUE(q.ok()) << q.status();
  for (int i = 0; i < 100; ++i) EXPECT_EQ(out[i], CacheSampleToFloat((*q)[5000 + i]));
  EXPECT_EQ(cache->Read(stereo, entry->frames - 10, 11, out.data()).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache->Read(tmp.Sub("other.wav"), 0, 1, out.data()).code(),
            absl::StatusCode::kNotFound);
  std::string silent;
  for (const CacheEntry* e : cache->Entries()) {
    if (e->problem == AudioProblem::kSilent) silent = e->path;
  }
  ASSERT_FALSE(silent.empty());
  EXPECT_EQ(cache->Read(silent, 0, 1, out.data()).code(), absl::StatusCode::kFailedPrecondition);

  // Any spelling of a path finds its entry.
  const std::string odd = tmp.path() + "/./x/../stereo48k.wav";
  EXPECT_EQ(cache->Lookup(odd), entry);
  EXPECT_EQ(AudioCacheKey(odd), stereo);
}

TEST(AudioCacheTest, SecondRunDecodesNothing) {
  TempDir tmp;
  const std::vector<std::string> paths = CorpusPaths();
  const std::string dir = tmp.Sub("cache");
  PrepareReport first = MustPrepare(paths, Options(dir));
  PrepareReport second = MustPrepare(paths, Options(dir));
  EXPECT_EQ(second.files_decoded, 0);
  EXPECT_EQ(second.files_cached, first.files_total);
  EXPECT_EQ(second.shards_written, 0);
  EXPECT_EQ(second.counts, first.counts);
  EXPECT_NEAR(second.audio_seconds, first.audio_seconds, 1e-9);
  // A subset is all cached too; a new file is the only decode.
  const std::string extra = tmp.Sub("extra.wav");
  WriteAudio(extra, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 22050, 1, Sine(500, 22050, 22050));
  PrepareReport third = MustPrepare({paths[0], paths[5], extra}, Options(dir));
  EXPECT_EQ(third.files_total, 3);
  EXPECT_EQ(third.files_cached, 2);
  EXPECT_EQ(third.files_decoded, 1);
}

// An index row whose offset is damaged to near 2^63: offset + frames wrapped negative and passed
// the bounds check, and training read outside the shard's mapping. The shard is refused now.
TEST(AudioCacheTest, AnIndexOffsetPastItsShardIsRefusedWithoutOverflow) {
  TempDir tmp;
  const std::vector<std::string> paths = CorpusPaths();
  const std::string dir = tmp.Sub("cache");
  MustPrepare(paths, Options(dir, 2, 512 << 10));
  const int shard = ShardNumbers(dir, ".index.csv").front();
  std::vector<std::string> lines = absl::StrSplit(testing::ReadBytes(ShardFile(dir, shard, ".index.csv")), '\n',
                                                  absl::SkipEmpty());
  bool damaged = false;
  for (size_t i = 1; i < lines.size() && !damaged; ++i) {
    std::vector<std::string> cells = absl::StrSplit(lines[i], ',');
    ASSERT_GT(cells.size(), 3u) << lines[i];
    if (cells[3] == "0") continue;  // column 2: offset, 3: frames
    cells[2] = "9223372036854775000";
    lines[i] = absl::StrJoin(cells, ",");
    damaged = true;
  }
  ASSERT_TRUE(damaged);
  WriteBytes(ShardFile(dir, shard, ".index.csv"), absl::StrJoin(lines, "\n") + "\n");
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  ASSERT_EQ(cache->invalid_shards().size(), 1u);
  EXPECT_NE(cache->invalid_shards()[0].find("needs frames 9223372036854775000"), std::string::npos)
      << cache->invalid_shards()[0];
}

// An index whose rows do not tile its .pcm (two rows over the same samples, here; the largest
// end still equal to the file's size) does not describe its samples: the shard is refused.
TEST(AudioCacheTest, RowsThatOverlapAreRefused) {
  TempDir tmp;
  const std::vector<std::string> paths = CorpusPaths();
  const std::string dir = tmp.Sub("cache");
  MustPrepare(paths, Options(dir, 2, 4 << 20));
  const int shard = ShardNumbers(dir, ".index.csv").front();
  std::vector<std::string> lines = absl::StrSplit(testing::ReadBytes(ShardFile(dir, shard, ".index.csv")), '\n',
                                                  absl::SkipEmpty());
  std::vector<size_t> with_samples;
  for (size_t i = 1; i < lines.size(); ++i) {
    std::vector<std::string> cells = absl::StrSplit(lines[i], ',');
    ASSERT_GT(cells.size(), 3u) << lines[i];
    if (cells[3] != "0") with_samples.push_back(i);  // column 2: offset, 3: frames
  }
  ASSERT_GE(with_samples.size(), 3u);
  std::vector<std::string> first = absl::StrSplit(lines[with_samples[0]], ',');
  std::vector<std::string> second = absl::StrSplit(lines[with_samples[1]], ',');
  second[2] = first[2];  // the second row claims the first one's samples
  lines[with_samples[1]] = absl::StrJoin(second, ",");
  WriteBytes(ShardFile(dir, shard, ".index.csv"), absl::StrJoin(lines, "\n") + "\n");
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  ASSERT_EQ(cache->invalid_shards().size(), 1u);
  EXPECT_NE(cache->invalid_shards()[0].find("its rows overlap at sample"), std::string::npos)
      << cache->invalid_shards()[0];
}

// A kill loses at most the shard in progress: here, a shard whose .pcm is gone, a shard whose
// index was cut short, an orphan .pcm (killed before its index was written) and a temporary
// index file. Readers skip the broken shards; the next prepare removes them and decodes exactly
// their files again.
TEST(AudioCacheTest, RecoversFromAnInterruptedRun) {
  TempDir tmp;
  const std::vector<std::string> paths = CorpusPaths();
  const std::string dir = tmp.Sub("cache");
  PrepareReport first = MustPrepare(paths, Options(dir, 2, 512 << 10));
  std::vector<int> shards = ShardNumbers(dir, ".index.csv");
  ASSERT_GE(shards.size(), 4u);
  auto count_rows = [&](int shard) {
    auto table = common::CsvTable::ReadFile(ShardFile(dir, shard, ".index.csv"));
    EXPECT_TRUE(table.ok()) << table.status();
    return table.ok() ? static_cast<int64_t>(table->num_rows()) : 0;
  };
  const int last = shards.back();
  const int middle = shards[shards.size() / 2];
  const int64_t lost = count_rows(last) + count_rows(middle);
  fs::remove(ShardFile(dir, last, ".pcm"));
  // The middle shard's index loses its rows from the last one with samples on, cut at a row's
  // end: it still parses, but no longer covers the .pcm.
  std::vector<std::string> lines = absl::StrSplit(testing::ReadBytes(ShardFile(dir, middle, ".index.csv")), '\n',
                                                  absl::SkipEmpty());
  size_t keep = lines.size();
  for (size_t i = 1; i < lines.size(); ++i) {
    std::vector<std::string> cells = absl::StrSplit(lines[i], ',');
    ASSERT_GT(cells.size(), 3u) << lines[i];
    if (cells[3] != "0") keep = i;  // column 3: frames
  }
  ASSERT_LT(keep, lines.size()) << "no row with samples in shard " << middle;
  lines.resize(keep);
  WriteBytes(ShardFile(dir, middle, ".index.csv"), absl::StrJoin(lines, "\n") + "\n");
  WriteBytes(ShardFile(dir, 900, ".pcm"), std::string(1000, '\x7f'));
  Backdate(ShardFile(dir, 900, ".pcm"), 3600);
  WriteBytes(ShardFile(dir, 3, ".index.csv.tmp.12345"), "path,shard\n");
  Backdate(ShardFile(dir, 3, ".index.csv.tmp.12345"), 3600);
  // A recent temporary file may be a seal in progress on another host: left alone.
  WriteBytes(ShardFile(dir, 4, ".index.csv.tmp.777"), "path,shard\n");
  // Old files with ".tmp." in their names that are not this code's: a user's, in a cache_dir
  // that is also their folder (they were removed).
  WriteBytes(dir + "/manifest.txt.tmp.1.2", "x");
  Backdate(dir + "/manifest.txt.tmp.1.2", 3600);
  for (const std::string& theirs : {"notes.tmp.txt", "model.tmp.12.34", "shard-3.pcm.tmp.5"}) {
    WriteBytes(dir + "/" + theirs, "theirs");
    Backdate(dir + "/" + theirs, 3600);
  }

  {
    auto cache = MustOpen(dir);
    ASSERT_NE(cache, nullptr);
    EXPECT_EQ(cache->invalid_shards().size(), 3u);  // last, middle, the orphan
    EXPECT_EQ(static_cast<int64_t>(cache->size()), first.files_total - lost);
  }

  PrepareReport second = MustPrepare(paths, Options(dir, 2, 512 << 10));
  EXPECT_EQ(second.dropped_shards.size(), 3u);
  EXPECT_EQ(second.files_decoded, lost);
  EXPECT_EQ(second.files_cached, first.files_total - lost);
  EXPECT_EQ(second.counts, first.counts);
  EXPECT_FALSE(fs::exists(ShardFile(dir, 900, ".pcm")));
  EXPECT_FALSE(fs::exists(ShardFile(dir, 3, ".index.csv.tmp.12345")));
  EXPECT_TRUE(fs::exists(ShardFile(dir, 4, ".index.csv.tmp.777")));
  EXPECT_FALSE(fs::exists(dir + "/manifest.txt.tmp.1.2"));
  for (const std::string& theirs : {"notes.tmp.txt", "model.tmp.12.34", "shard-3.pcm.tmp.5"}) {
    EXPECT_TRUE(fs::exists(dir + "/" + theirs)) << theirs;
  }
  EXPECT_FALSE(fs::exists(ShardFile(dir, last, ".index.csv")));
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  EXPECT_TRUE(cache->invalid_shards().empty());
  EXPECT_EQ(static_cast<int64_t>(cache->size()), first.files_total);
  ExpectCacheMatchesDecode(*cache, paths);

  PrepareReport third = MustPrepare(paths, Options(dir, 2, 512 << 10));
  EXPECT_EQ(third.files_decoded, 0);
}

// A shard file that cannot be read now (here a link that loops: ELOOP, as an NFS timeout's EIO
// or an ESTALE would be) is not a damaged shard: prepare stops naming it and deletes nothing
// (sealed shards were deleted and decoded again); a reader skips that shard, saying why, and
// reads the others (one unreadable index must not fail every attempt of a training task).
TEST(AudioCacheTest, AReadErrorIsNotADamagedShard) {
  TempDir tmp;
  const std::vector<std::string> paths = CorpusPaths();
  const std::string dir = tmp.Sub("cache");
  PrepareReport first = MustPrepare(paths, Options(dir, 2, 512 << 10));
  const std::vector<int> shards = ShardNumbers(dir, ".index.csv");
  ASSERT_GE(shards.size(), 2u);
  for (const char* suffix : {".index.csv", ".pcm"}) {
    const std::string file = ShardFile(dir, shards[0], suffix);
    const std::string kept = file + ".kept";
    fs::rename(file, kept);
    fs::create_symlink(fs::path(file).filename(), file);  // a link to itself
    absl::StatusOr<PrepareReport> again = PrepareAudioCache(paths, Options(dir, 2, 512 << 10));
    EXPECT_EQ(again.status().code(), absl::StatusCode::kUnavailable) << suffix;
    EXPECT_NE(again.status().message().find(file), std::string::npos) << again.status();
    EXPECT_NE(again.status().message().find("no shard was dropped"), std::string::npos) << again.status();
    auto reader = AudioCache::Open(dir);
    ASSERT_TRUE(reader.ok()) << reader.status();
    ASSERT_EQ((*reader)->invalid_shards().size(), 1u) << suffix;
    EXPECT_NE((*reader)->invalid_shards()[0].find("a read error, not damage"), std::string::npos)
        << (*reader)->invalid_shards()[0];
    EXPECT_GT((*reader)->size(), 0u);
    fs::remove(file);
    fs::rename(kept, file);
    EXPECT_EQ(ShardNumbers(dir, ".index.csv"), shards);
    EXPECT_EQ(ShardNumbers(dir, ".pcm"), shards);
  }
  PrepareReport last = MustPrepare(paths, Options(dir, 2, 512 << 10));
  EXPECT_EQ(last.files_decoded, 0);
  EXPECT_EQ(last.files_cached, first.files_total);
}

// Every reason is counted, in the report and in prepare_report.csv.
TEST(AudioCacheTest, ReportCountsEveryReason) {
  TempDir tmp;
  std::vector<std::string> paths = CorpusPaths();
  const auto& corpus = SharedCorpus();
  std::map<std::string, int64_t> expected;
  for (const auto& f : corpus.ogg) {
    ++expected[f.kind == synth::SynthFileKind::kGood ? "ok" : synth::SynthFileKindName(f.kind)];
  }
  for (const auto& f : corpus.mp3) {
    ++expected[f.kind == synth::SynthFileKind::kGood ? "ok" : synth::SynthFileKindName(f.kind)];
  }
  paths.push_back(tmp.Sub("missing.ogg"));
  ++expected["missing"];
  WriteAudio(tmp.Sub("none.wav"), SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, {});
  paths.push_back(tmp.Sub("none.wav"));
  ++expected["too_short"];
  std::vector<float> nan = Sine(440, 16000, 16000);
  nan[100] = std::nanf("");
  WriteAudio(tmp.Sub("nan.wav"), SF_FORMAT_WAV | SF_FORMAT_FLOAT, 16000, 1, nan);
  paths.push_back(tmp.Sub("nan.wav"));
  ++expected["non_finite"];
  // Not exactly zero, but below 16 bits: the cache holds zeros, every clip of it is silent.
  std::vector<float> hush = Sine(440, 32000, 32000);
  for (float& x : hush) x *= 1e-5f;
  WriteAudio(tmp.Sub("hush.wav"), SF_FORMAT_WAV | SF_FORMAT_FLOAT, 32000, 1, hush);
  paths.push_back(tmp.Sub("hush.wav"));
  ++expected["silent"];

  const std::string dir = tmp.Sub("cache");
  PrepareReport report = MustPrepare(paths, Options(dir));
  std::map<std::string, int64_t> got;
  for (const auto& [problem, n] : report.counts) got[AudioProblemName(problem)] = n;
  EXPECT_EQ(got, expected);
  for (const auto& [problem, message] : report.examples) {
    EXPECT_NE(problem, AudioProblem::kNone);
    EXPECT_FALSE(message.empty());
  }

  auto table = common::CsvTable::ReadFile(dir + "/prepare_report.csv");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->header(), (std::vector<std::string>{"reason", "files", "seconds", "example"}));
  std::map<std::string, int64_t> from_csv;
  for (size_t i = 0; i < table->num_rows(); ++i) {
    from_csv[table->row(i)[0]] = std::stoll(table->row(i)[1]);
  }
  EXPECT_EQ(from_csv, expected);
  EXPECT_EQ(table->row(0)[0], "ok");
  EXPECT_NEAR(std::stod(table->row(0)[2]), report.audio_seconds, 1e-3);

  // The counts cover files cached by earlier runs too.
  PrepareReport again = MustPrepare(paths, Options(dir));
  EXPECT_EQ(again.counts, report.counts);
}

// A WAV whose header announces 1 or 3 Hz is counted as not_audio; prepare neither resamples it
// into billions of samples nor dies of std::bad_alloc in a decode thread.
TEST(AudioCacheTest, ImplausibleSampleRateIsCountedNotFatal) {
  TempDir tmp;
  const std::string good = tmp.Sub("good.wav");
  WriteAudio(good, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 32000));
  std::vector<std::string> paths = {good};
  for (uint32_t rate : {1u, 3u}) {
    paths.push_back(tmp.Sub("rate" + std::to_string(rate) + ".wav"));
    testing::WriteWavWithHeaderRate(paths.back(), 4800, rate);
  }
  const std::string dir = tmp.Sub("cache");
  auto report = PrepareAudioCache(paths, Options(dir));
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->counts[AudioProblem::kNone], 1);
  EXPECT_EQ(report->counts[AudioProblem::kNotAudio], 2);
  EXPECT_NE(report->examples[AudioProblem::kNotAudio].find("Hz is implausible"), std::string::npos)
      << report->examples[AudioProblem::kNotAudio];
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  const CacheEntry* entry = cache->Lookup(paths[1]);
  ASSERT_NE(entry, nullptr);
  EXPECT_EQ(entry->problem, AudioProblem::kNotAudio);
  EXPECT_EQ(entry->frames, 0);
}

// Runs `body` in a child process that cannot read `path`: as root (chmod cannot deny root) the
// child drops to uid/gid 65534 (nobody) and `path` is made 0600 root's; otherwise `path` is
// made 0000. Returns the child's exit status (0: `body` returned true), or -1 when it could not
// run. `path` gets its mode back.
int RunWithoutReadAccess(const std::string& path, const std::function<bool()>& body) {
  const bool root = ::geteuid() == 0;
  if (::chmod(path.c_str(), root ? 0600 : 0000) != 0) return -1;
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (root && (::setgroups(0, nullptr) != 0 || ::setresgid(65534, 65534, 65534) != 0 ||
                 ::setresuid(65534, 65534, 65534) != 0)) {
      std::fprintf(stderr, "cannot drop to nobody: %s\n", std::strerror(errno));
      ::_exit(2);
    }
    ::_exit(body() ? 0 : 1);
  }
  int status = 0;
  const bool waited = pid > 0 && ::waitpid(pid, &status, 0) == pid;
  ::chmod(path.c_str(), 0644);
  return waited && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// A file that cannot be opened now (EACCES) is classed missing, naming the path and the errno's
// text; prepare counts it but does not cache the verdict, so that once the file is readable the
// next prepare decodes it (it used to be cached as not_audio with the file's size and mtime, and
// never tried again: chmod changes neither).
TEST(AudioCacheTest, UnreadableFileIsMissingAndNotCached) {
  TempDir tmp;
  ASSERT_EQ(::chmod(tmp.path().c_str(), 0755), 0);
  const std::string path = tmp.Sub("locked.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 32000));
  const std::string dir = tmp.Sub("cache");
  ASSERT_TRUE(std::filesystem::create_directories(dir));
  ASSERT_EQ(::chmod(dir.c_str(), 0777), 0);
  const int status = RunWithoutReadAccess(path, [&] {
    auto decoded = DecodeAudio(path, DecodeOptions{});
    if (!decoded.ok() || decoded->failure.problem != AudioProblem::kMissing ||
        decoded->failure.message.find(path) == std::string::npos ||
        decoded->failure.message.find("Permission denied") == std::string::npos) {
      std::fprintf(stderr, "decode: %s\n",
                   decoded.ok() ? (std::string(AudioProblemName(decoded->failure.problem)) +
                                   ": " + decoded->failure.message)
                                      .c_str()
                                : std::string(decoded.status().message()).c_str());
      return false;
    }
    auto report = PrepareAudioCache({path}, Options(dir));
    if (!report.ok()) {
      std::fprintf(stderr, "prepare: %s\n", std::string(report.status().message()).c_str());
      return false;
    }
    std::map<AudioProblem, int64_t> want = {{AudioProblem::kMissing, 1}};
    if (report->counts != want || report->files_decoded != 1) {
      for (const auto& [p, n] : report->counts) {
        std::fprintf(stderr, "prepare counted %s: %lld\n", AudioProblemName(p),
                     static_cast<long long>(n));
      }
      return false;
    }
    return true;
  });
  if (status == 2) GTEST_SKIP() << "cannot switch to uid 65534 to deny read access";
  ASSERT_EQ(status, 0) << "the unreadable file was not reported missing (see stderr)";
  // Readable again (mode back, or we are root): the next run decodes it.
  PrepareReport again = MustPrepare({path}, Options(dir));
  EXPECT_EQ(again.files_cached, 0);
  EXPECT_EQ(again.files_decoded, 1);
  EXPECT_EQ(again.counts[AudioProblem::kNone], 1);
  EXPECT_EQ(again.counts.count(AudioProblem::kMissing), 0u);
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  const CacheEntry* entry = cache->Lookup(path);
  ASSERT_NE(entry, nullptr);
  EXPECT_EQ(entry->problem, AudioProblem::kNone);
  EXPECT_EQ(entry->frames, 32000);
}

// A shard that cannot be opened now (a permission here; ESTALE or EMFILE
// elsewhere) is skipped as an unreadable index is, naming it, and the cache opens with the
// other shards' files: training decodes that shard's files on the fly instead of failing every
// attempt. Once readable, it is used again.
TEST(AudioCacheTest, AShardThatCannotBeOpenedIsSkippedNotFatal) {
  TempDir tmp;
  ASSERT_EQ(::chmod(tmp.path().c_str(), 0755), 0);
  const std::vector<std::string> paths = {tmp.Sub("a.wav"), tmp.Sub("b.wav")};
  for (const std::string& path : paths) {
    WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 32000));
  }
  const std::string dir = tmp.Sub("cache");
  PrepareOptions options = Options(dir, 1, 16 << 10);  // one file per shard
  MustPrepare(paths, options);
  ASSERT_EQ(ShardNumbers(dir, ".index.csv").size(), 2u);
  const std::string first = ShardFile(dir, 0, ".pcm");
  const int status = RunWithoutReadAccess(first, [&] {
    auto cache = AudioCache::Open(dir);
    if (!cache.ok()) {
      std::fprintf(stderr, "open: %s\n", std::string(cache.status().message()).c_str());
      return false;
    }
    const std::vector<std::string>& skipped = (*cache)->invalid_shards();
    if (skipped.size() != 1 || skipped[0].rfind("shard-000000: " + first + ": cannot open: Permission denied", 0) != 0 ||
        (*cache)->size() != 1) {
      std::fprintf(stderr, "skipped %zu shard(s): %s; %zu entries\n", skipped.size(),
                   skipped.empty() ? "" : skipped[0].c_str(), (*cache)->size());
      return false;
    }
    return true;
  });
  if (status == 2) GTEST_SKIP() << "cannot switch to uid 65534 to deny read access";
  ASSERT_EQ(status, 0) << "the unreadable shard was not skipped (see stderr)";
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  EXPECT_TRUE(cache->invalid_shards().empty());
  EXPECT_EQ(cache->size(), 2u);
}

// The lock files of a cache folder shared by a group, created by a teammate (0644 under a umask
// of 022): a prepare that may not write them still locks them (flock needs no write access)
// instead of failing "LOCK: cannot open: Permission denied". (As root, as CI runs, the child is
// another user; run by its owner, the files are writable and the case is not reached.)
TEST(AudioCacheTest, LockFilesATeammateCreatedStillLock) {
  TempDir tmp;
  ASSERT_EQ(::chmod(tmp.path().c_str(), 0755), 0);
  const std::string path = tmp.Sub("a.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 32000));
  const std::string dir = tmp.Sub("cache");
  ASSERT_TRUE(std::filesystem::create_directories(dir));
  ASSERT_EQ(::chmod(dir.c_str(), 0777), 0);
  MustPrepare({path}, Options(dir));
  ASSERT_TRUE(fs::exists(dir + "/LOCK"));
  const std::string other = tmp.Sub("unrelated");
  WriteBytes(other, "x");
  const int status = RunWithoutReadAccess(other, [&] {
    auto report = PrepareAudioCache({path}, Options(dir));
    if (!report.ok() || report->files_cached != 1) {
      std::fprintf(stderr, "prepare: %s\n", report.ok() ? "did not find the file cached"
                                                         : std::string(report.status().message()).c_str());
      return false;
    }
    return true;
  });
  if (status == 2) GTEST_SKIP() << "cannot switch to uid 65534";
  EXPECT_EQ(status, 0) << "see stderr";
}

// A file whose whole decode passes the decoder's limit (2^29 samples: 4.66 h at 32 kHz; here a
// 1 kHz file cached at 768 kHz, refused from its header) is reported but not cached as
// not_audio: training, which reads only its clips' windows, decodes them from the file as it
// does without a cache.
TEST(AudioCacheTest, AFileTooLongToDecodeWholeIsReportedNotCached) {
  TempDir tmp;
  const std::string long_path = tmp.Sub("long.wav"), short_path = tmp.Sub("short.wav");
  WriteAudio(long_path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 1000, 1, Sine(50, 1000, 700000));
  WriteAudio(short_path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 1000, 1, Sine(50, 1000, 1000));
  const std::string dir = tmp.Sub("cache");
  PrepareOptions options = Options(dir);
  options.sample_rate = 768000;
  // The dry run says the same and counts no bytes for it.
  auto plan = PlanAudioCache({long_path, short_path}, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->problems[AudioProblem::kNotAudio], 1);
  EXPECT_NE(plan->examples[AudioProblem::kNotAudio].find("not cached"), std::string::npos);
  EXPECT_EQ(plan->cache_bytes, int64_t{768000} * 2);  // the short file's second at 768 kHz
  PrepareReport report = MustPrepare({long_path, short_path}, options);
  EXPECT_EQ(report.files_decoded, 2);
  EXPECT_EQ(report.counts[AudioProblem::kNotAudio], 1);
  EXPECT_EQ(report.counts[AudioProblem::kNone], 1);
  EXPECT_NE(report.examples[AudioProblem::kNotAudio].find("not cached"), std::string::npos)
      << report.examples[AudioProblem::kNotAudio];
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(cache->Lookup(long_path), nullptr);
  EXPECT_NE(cache->Lookup(short_path), nullptr);
  ClipRequest request;
  request.sample_rate = 768000;
  request.duration_s = 0.01;
  auto clip = LoadClip(cache.get(), long_path, request);
  ASSERT_TRUE(clip.ok()) << clip.status();
  EXPECT_TRUE(clip->ok()) << clip->message;
  EXPECT_FALSE(clip->from_cache);
  // The next run decodes it again (nothing recorded) and finds the other cached.
  PrepareReport again = MustPrepare({long_path, short_path}, options);
  EXPECT_EQ(again.files_cached, 1);
  EXPECT_EQ(again.files_decoded, 1);
}

TEST(AudioCacheTest, ChangedFileIsDecodedAgainAndTheNewestShardWins) {
  TempDir tmp;
  const std::string path = tmp.Sub("a.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 32000));
  const std::string dir = tmp.Sub("cache");
  MustPrepare({path}, Options(dir));
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(880, 32000, 48000));
  PrepareReport second = MustPrepare({path}, Options(dir));
  EXPECT_EQ(second.files_decoded, 1);
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(cache->size(), 1u);
  const CacheEntry* entry = cache->Lookup(path);
  ASSERT_NE(entry, nullptr);
  EXPECT_EQ(entry->frames, 48000);
  EXPECT_EQ(entry->shard, 1);
}

// A shard file that appears while a run writes (another node's writer, which a node-local flock
// did not keep out) is never opened for writing: the run takes the next number, and both stay.
TEST(AudioCacheTest, AShardFileThatAppearsMeanwhileIsNotWrittenInto) {
  TempDir tmp;
  const std::string a = tmp.Sub("a.wav"), b = tmp.Sub("b.wav");
  WriteAudio(a, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 16000));
  WriteAudio(b, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(880, 32000, 16000));
  const std::string dir = tmp.Sub("cache");
  PrepareOptions options = Options(dir, /*threads=*/1, /*shard_bytes=*/1);  // a shard a file
  const std::string theirs = ShardFile(dir, 1, ".pcm");
  options.progress = [&](const PrepareProgress& p) {
    if (p.files_done == 1) WriteBytes(theirs, "another writer's samples");
  };
  PrepareReport report = MustPrepare({a, b}, options);
  EXPECT_EQ(report.files_decoded, 2);
  std::ifstream in(theirs, std::ios::binary);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), "another writer's samples");
  EXPECT_EQ(ShardNumbers(dir, ".index.csv"), (std::vector<int>{0, 2}));
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  const CacheEntry* first = cache->Lookup(a);
  const CacheEntry* second = cache->Lookup(b);
  ASSERT_NE(first, nullptr);
  ASSERT_NE(second, nullptr);
  EXPECT_EQ(first->shard, 0);
  EXPECT_EQ(second->shard, 2);
  EXPECT_EQ(second->frames, 16000);
}

// Files that cannot be read (a share gone: each open timing out) still move the progress's time
// on: the printer throttles by it, and printed nothing for as long, then rates over a stale time.
TEST(AudioCacheTest, UnreadableFilesMoveTheProgressTimeOn) {
  TempDir tmp;
  const std::string dir = tmp.Sub("cache");
  PrepareOptions options = Options(dir, /*threads=*/1, /*shard_bytes=*/1 << 20);
  std::vector<double> elapsed;
  options.progress = [&](const PrepareProgress& p) {
    elapsed.push_back(p.elapsed_s);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  };
  PrepareReport report = MustPrepare({tmp.Sub("gone1.wav"), tmp.Sub("gone2.wav")}, options);
  EXPECT_EQ(report.counts[AudioProblem::kMissing], 2);
  ASSERT_EQ(elapsed.size(), 2u);
  EXPECT_GT(elapsed[1], elapsed[0]);  // both 0 before (a clock read, not a measurement)
}

// A stop asked for midway (a signal: mpirun ending the other ranks, a Ctrl-C) ends the run with
// CANCELLED at the next file: the shard sealed before stays, the one being written is removed
// (a killed run left it, kept by the next run as "maybe another host's" for minutes).
TEST(AudioCacheTest, AStopRemovesTheShardBeingWrittenAndKeepsTheSealedOnes) {
  TempDir tmp;
  std::vector<std::string> paths;
  for (int i = 0; i < 6; ++i) {
    paths.push_back(tmp.Sub(absl::StrCat("f", i, ".wav")));
    WriteAudio(paths.back(), SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440 + 10 * i, 32000, 32000));
  }
  const std::string dir = tmp.Sub("cache");
  // 1 s of int16 at 32 kHz is 64,000 bytes: a shard of 100,000 bytes is sealed at its 2nd file.
  PrepareOptions options = Options(dir, /*threads=*/1, /*shard_bytes=*/100000);
  std::atomic<int> done{0};
  options.progress = [&](const PrepareProgress& p) { done = static_cast<int>(p.files_done); };
  options.should_stop = [&] { return done.load() >= 3; };
  auto stopped = PrepareAudioCache(paths, options);
  EXPECT_EQ(stopped.status().code(), absl::StatusCode::kCancelled) << stopped.status();
  EXPECT_TRUE(absl::StrContains(stopped.status().message(), "stopped after 3 of 6 files to decode"))
      << stopped.status();
  EXPECT_EQ(ShardNumbers(dir, ".index.csv"), (std::vector<int>{0}));
  EXPECT_EQ(ShardNumbers(dir, ".pcm"), (std::vector<int>{0}));  // the 3rd file's shard 1 removed
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(cache->size(), 2u);
  EXPECT_TRUE(cache->invalid_shards().empty());
  // The next run decodes the rest.
  options.should_stop = nullptr;
  PrepareReport rest = MustPrepare(paths, options);
  EXPECT_EQ(rest.files_cached, 2);
  EXPECT_EQ(rest.files_decoded, 4);
}

// More shards than half the descriptor limit (a full BirdCLEF cache holds thousands; mpirun's
// ranks often start with 1024): the cache keeps that many open and opens the others for each
// read, and every entry reads as it does with all of them open. Kept open, the shards past the
// limit failed to open and were skipped, their clips decoded on the fly. In a child: the limit
// is lowered for good there.
TEST(AudioCacheTest, MoreShardsThanDescriptorsStillReadEveryEntry) {
  TempDir tmp;
  std::vector<std::string> paths;
  for (int i = 0; i < 40; ++i) {
    paths.push_back(tmp.Sub(absl::StrCat("f", i, ".wav")));
    WriteAudio(paths.back(), SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(200 + 10 * i, 32000, 800));
  }
  const std::string dir = tmp.Sub("cache");
  MustPrepare(paths, Options(dir, /*threads=*/1, /*shard_bytes=*/1));  // a shard a file
  std::vector<std::vector<int16_t>> expected;
  {
    auto cache = MustOpen(dir);
    ASSERT_NE(cache, nullptr);
    for (const std::string& path : paths) {
      ASSERT_NE(cache->Lookup(path), nullptr) << path;
      auto q = cache->Samples(*cache->Lookup(path));
      ASSERT_TRUE(q.ok()) << q.status();
      expected.push_back(*q);
    }
  }
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        struct rlimit limit;
        limit.rlim_cur = limit.rlim_max = 32;
        if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) std::_Exit(2);
        auto cache = AudioCache::Open(dir);
        if (!cache.ok()) std::_Exit(3);
        if (!(*cache)->invalid_shards().empty()) {
          std::fprintf(stderr, "skipped: %s\n", (*cache)->invalid_shards()[0].c_str());
          std::_Exit(4);
        }
        for (size_t i = 0; i < paths.size(); ++i) {
          const CacheEntry* entry = (*cache)->Lookup(paths[i]);
          if (entry == nullptr) std::_Exit(5);
          auto q = (*cache)->Samples(*entry);
          if (!q.ok() || *q != expected[i]) std::_Exit(6);
        }
        std::fprintf(stderr, "all %zu read\n", paths.size());
        // A shard opened per read that is another file now (the cache prepared again under the
        // same folder numbers its shards from 0): refused, not read as the entry's samples.
        const CacheEntry* last = nullptr;
        for (const std::string& path : paths) {
          const CacheEntry* e = (*cache)->Lookup(path);
          if (last == nullptr || e->shard > last->shard) last = e;
        }
        const std::string pcm = absl::StrCat(dir, "/shard-", std::string(6 - std::to_string(last->shard).size(), '0'),
                                              last->shard, ".pcm");
        std::error_code ec;
        std::filesystem::copy_file(pcm, pcm + ".copy", ec);
        if (ec || ::rename((pcm + ".copy").c_str(), pcm.c_str()) != 0) std::_Exit(7);
        auto replaced = (*cache)->Samples(*last);
        if (replaced.ok() || replaced.status().code() != absl::StatusCode::kUnavailable) std::_Exit(8);
        std::fprintf(stderr, "replaced: %s\n", std::string(replaced.status().message()).c_str());
        std::_Exit(0);
      },
      ::testing::ExitedWithCode(0), "all 40 read\nreplaced: .*not the shard file the cache opened");
}

// A first run that sealed nothing (every file unreadable, or stopped early) binds no settings:
// the corrected run writes its own manifest rather than being told to use another folder. A
// split run's part still refuses (another part may be writing under the first manifest).
TEST(AudioCacheTest, AManifestWithoutShardsIsRewrittenByAWholeCacheRun) {
  TempDir tmp;
  const std::string dir = tmp.Sub("cache");
  MustPrepare({tmp.Sub("gone.wav")}, Options(dir));
  ASSERT_TRUE(fs::exists(dir + "/manifest.txt"));
  const std::string path = tmp.Sub("a.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 16000, 1, Sine(440, 16000, 3200));
  PrepareOptions split = Options(dir);
  split.sample_rate = 16000;
  split.num_parts = 2;
  EXPECT_EQ(PrepareAudioCache({path}, split).status().code(), absl::StatusCode::kFailedPrecondition);
  PrepareOptions other = Options(dir);
  other.sample_rate = 16000;
  PrepareReport report = MustPrepare({path}, other);
  EXPECT_EQ(report.files_cached + report.files_decoded, 1);
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  ASSERT_NE(cache->Lookup(path), nullptr);
  // Now that it holds a shard, another rate is refused as before.
  other.sample_rate = 32000;
  EXPECT_EQ(PrepareAudioCache({path}, other).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(AudioCacheTest, RefusesAnotherRateModeOrAConcurrentRun) {
  TempDir tmp;
  const std::string path = tmp.Sub("a.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 3200));
  const std::string dir = tmp.Sub("cache");
  MustPrepare({path}, Options(dir));
  PrepareOptions other = Options(dir);
  other.sample_rate = 16000;
  auto refused = PrepareAudioCache({path}, other);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("holds 32000 Hz first-channel audio"),
            std::string::npos)
      << refused.status();
  other = Options(dir);
  other.channels = ChannelMode::kMean;
  EXPECT_EQ(PrepareAudioCache({path}, other).status().code(),
            absl::StatusCode::kFailedPrecondition);

  int fd = ::open((dir + "/LOCK").c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);
  auto locked = PrepareAudioCache({path}, Options(dir));
  EXPECT_EQ(locked.status().code(), absl::StatusCode::kFailedPrecondition) << locked.status();
  ::close(fd);
  EXPECT_TRUE(PrepareAudioCache({path}, Options(dir)).ok());

  PrepareOptions bad = Options("");
  EXPECT_EQ(PrepareAudioCache({path}, bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = Options(dir);
  bad.shard_bytes = 0;
  EXPECT_EQ(PrepareAudioCache({path}, bad).status().code(), absl::StatusCode::kInvalidArgument);
}

// data.cache_max_seconds: only each file's first N seconds are decoded and stored, the manifest
// records the cut, and a run asking for another cut (or none) is refused by name.
TEST(AudioCacheTest, MaxSecondsStoresTheFirstSecondsAndIsKept) {
  TempDir tmp;
  const std::string long_file = tmp.Sub("long.wav");    // 3 s at 44.1 kHz
  const std::string short_file = tmp.Sub("short.wav");  // 0.5 s at 32 kHz
  WriteAudio(long_file, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 44100, 1, Sine(440, 44100, 44100 * 3));
  WriteAudio(short_file, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(300, 32000, 16000));
  const std::string dir = tmp.Sub("cache");
  PrepareOptions options = Options(dir);
  options.max_seconds = 1.25;
  PrepareReport report = MustPrepare({long_file, short_file}, options);
  EXPECT_NEAR(report.audio_seconds, 1.25 + 0.5, 1e-9);
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(cache->max_seconds(), 1.25);
  const CacheEntry* cut = cache->Lookup(long_file);
  ASSERT_NE(cut, nullptr);
  EXPECT_EQ(cut->frames, 40000);  // round(1.25 x 32000)
  EXPECT_EQ(cut->source_frames, 44100 * 3);
  // The stored samples are the whole-file decode's first 40,000 (quantised).
  auto whole = DecodeAudio(long_file, DecodeOptions{});
  ASSERT_TRUE(whole.ok() && whole->ok());
  absl::StatusOr<std::vector<int16_t>> read = cache->Samples(*cut);
  ASSERT_TRUE(read.ok()) << read.status();
  const std::vector<int16_t>& q = *read;
  for (size_t i = 0; i < q.size(); i += 97) {
    ASSERT_NEAR(CacheSampleToFloat(q[i]), whole->audio.samples[i], 1.0 / 65536 + 2e-6) << i;
  }
  EXPECT_EQ(cache->Lookup(short_file)->frames, 16000);
  std::string manifest;
  {
    std::ifstream in(dir + "/manifest.txt");
    manifest.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  EXPECT_NE(manifest.find("max_seconds=1.25\n"), std::string::npos) << manifest;

  PrepareOptions whole_files = Options(dir);
  auto refused = PrepareAudioCache({long_file}, whole_files);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find(
                "holds the first 1.25 s of each file; this run asks for whole files (data.cache_max_seconds)"),
            std::string::npos)
      << refused.status();
  PrepareOptions other = Options(dir);
  other.max_seconds = 2;
  EXPECT_EQ(PrepareAudioCache({long_file}, other).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(PlanAudioCache({long_file}, other).status().code(), absl::StatusCode::kFailedPrecondition);
  // Without a cut the manifest has no max_seconds line (the format older caches have).
  MustPrepare({short_file}, Options(tmp.Sub("whole")));
  EXPECT_EQ(MustOpen(tmp.Sub("whole"))->max_seconds(), 0);
  other.max_seconds = -1;
  EXPECT_EQ(PrepareAudioCache({long_file}, other).status().code(), absl::StatusCode::kInvalidArgument);
  // A cut of more than 6 significant digits is kept whole: the same config prepares again (the
  // manifest used to round it, and refused its own config from then on).
  PrepareOptions fine = Options(tmp.Sub("fine"));
  fine.max_seconds = 1.2345678;
  MustPrepare({long_file}, fine);
  MustPrepare({long_file, short_file}, fine);
  EXPECT_EQ(MustOpen(tmp.Sub("fine"))->max_seconds(), 1.2345678);
}

// The dry run predicts, from the headers only, the files a prepare decodes and the bytes it
// writes, and writes nothing.
TEST(AudioCacheTest, PlanPredictsWhatPrepareWrites) {
  TempDir tmp;
  std::vector<std::string> paths;
  for (int i = 0; i < 6; ++i) {
    const std::string path = tmp.Sub("f" + std::to_string(i) + ".wav");
    const int rate = i % 2 == 0 ? 44100 : 22050;
    WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, rate, 1 + i % 2,
               Sine(200 + 50 * i, rate, rate / 2 + 3001 * i * (1 + i % 2)));
    paths.push_back(path);
  }
  WriteBytes(tmp.Sub("junk.wav"), "not audio at all");
  paths.push_back(tmp.Sub("junk.wav"));
  paths.push_back(tmp.Sub("missing.wav"));
  paths.push_back(paths[0]);  // listed twice: counted once
  const std::string dir = tmp.Sub("cache");
  for (double max_seconds : {0.0, 0.4}) {
    const std::string cut_dir = dir + std::to_string(static_cast<int>(max_seconds * 10));
    PrepareOptions options = Options(cut_dir);
    options.max_seconds = max_seconds;
    auto plan = PlanAudioCache(paths, options);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_FALSE(fs::exists(cut_dir)) << "the dry run wrote " << cut_dir;
    EXPECT_EQ(plan->files_total, 8);
    EXPECT_EQ(plan->files_cached, 0);
    EXPECT_EQ(plan->files_to_decode, 8);
    EXPECT_EQ(plan->problems[AudioProblem::kNotAudio], 1);
    EXPECT_EQ(plan->problems[AudioProblem::kMissing], 1);
    EXPECT_EQ(plan->files_unknown_length, 0);
    PrepareReport report = MustPrepare(paths, options);
    int64_t pcm_bytes = 0;
    for (int shard : ShardNumbers(cut_dir, ".pcm")) pcm_bytes += fs::file_size(ShardFile(cut_dir, shard, ".pcm"));
    EXPECT_EQ(plan->cache_bytes, pcm_bytes) << "max_seconds " << max_seconds;
    EXPECT_NEAR(plan->audio_seconds, report.audio_seconds, 1e-6);
    if (max_seconds > 0) {
      EXPECT_GT(plan->source_seconds, plan->audio_seconds + 1);
    }
    // Planned again: everything is cached, nothing to write; but the missing file, whose
    // verdict is never cached, is looked at again.
    auto again = PlanAudioCache(paths, options);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->files_cached, 7);
    EXPECT_EQ(again->files_to_decode, 1);
    EXPECT_EQ(again->problems[AudioProblem::kMissing], 1);
    EXPECT_EQ(again->cache_bytes, 0);
  }
}

// A split run: parts 0 and 1 of 2, at the same time, write one cache holding every file once,
// equal to the direct decode; each part numbers its shards by its residue and writes its own
// report; a later whole-cache run decodes nothing. Locks keep a part from running twice and
// from running beside a whole-cache run.
TEST(AudioCacheTest, PartsOfASplitRunWriteOneCache) {
  TempDir tmp;
  const std::vector<std::string> paths = CorpusPaths();
  const std::string dir = tmp.Sub("cache");
  std::vector<PrepareReport> reports(2);
  std::vector<absl::Status> errors(2);
  {
    std::vector<std::thread> parts;
    for (int part = 0; part < 2; ++part) {
      parts.emplace_back([&, part] {
        PrepareOptions options = Options(dir, 1, 64 << 10);
        options.part = part;
        options.num_parts = 2;
        auto report = PrepareAudioCache(paths, options);
        if (report.ok()) {
          reports[part] = *report;
        } else {
          errors[part] = report.status();
        }
      });
    }
    for (std::thread& t : parts) t.join();
  }
  ASSERT_TRUE(errors[0].ok()) << errors[0].ToString();
  ASSERT_TRUE(errors[1].ok()) << errors[1].ToString();
  std::set<std::string> distinct;
  for (const std::string& path : paths) distinct.insert(AudioCacheKey(path));
  EXPECT_EQ(reports[0].files_total + reports[1].files_total, static_cast<int64_t>(distinct.size()));
  EXPECT_GT(reports[1].files_decoded, 0);
  for (int part = 0; part < 2; ++part) {
    EXPECT_TRUE(fs::exists(dir + "/prepare_report.part-" + std::to_string(part) + "-of-2.csv"));
  }
  std::map<int, int> residues;
  for (int shard : ShardNumbers(dir, ".index.csv")) ++residues[shard % 2];
  EXPECT_GE(residues[0], 2);
  EXPECT_GE(residues[1], 2);
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(cache->size(), distinct.size());
  EXPECT_TRUE(cache->invalid_shards().empty());
  ExpectCacheMatchesDecode(*cache, paths);
  PrepareReport whole = MustPrepare(paths, Options(dir));
  EXPECT_EQ(whole.files_decoded, 0);
  EXPECT_EQ(whole.files_cached, static_cast<int64_t>(distinct.size()));

  PrepareOptions part1 = Options(dir);
  part1.part = 1;
  part1.num_parts = 2;
  {
    int fd = ::open((dir + "/LOCK.part-1").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::flock(fd, LOCK_EX), 0);
    auto refused = PrepareAudioCache(paths, part1);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(refused.status().message().find("another `aviary prepare` of part 1 is writing this cache"),
              std::string::npos)
        << refused.status();
    ::close(fd);
  }
  {
    int fd = ::open((dir + "/LOCK").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::flock(fd, LOCK_SH), 0);  // a part running
    EXPECT_EQ(PrepareAudioCache(paths, Options(dir)).status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_TRUE(PrepareAudioCache(paths, part1).ok());  // parts run beside each other
    ASSERT_EQ(::flock(fd, LOCK_EX), 0);  // a whole-cache run
    EXPECT_EQ(PrepareAudioCache(paths, part1).status().code(), absl::StatusCode::kFailedPrecondition);
    ::close(fd);
  }
  {
    // A part of a run split 3 ways while one split 2 ways writes: part 1 of 2 owns shards 1, 3, 5,
    // part 0 of 3 shards 0, 3, 6: both would write shard 3.
    int fd = ::open((dir + "/LOCK.of-3").c_str(), O_RDWR | O_CREAT, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::flock(fd, LOCK_SH), 0);
    auto refused = PrepareAudioCache(paths, part1);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(refused.status().message().find("an `aviary prepare` split into 3 parts is writing this cache "
                                              "(LOCK.of-3 is locked); this is part 1 of 2"),
              std::string::npos)
        << refused.status();
    ::close(fd);
    EXPECT_TRUE(PrepareAudioCache(paths, part1).ok());  // the other split is done
  }
  {
    // A sibling part probing the old LOCK.of-3 at the same instant holds it exclusively for a
    // moment: not a run split 3 ways, and this part waits for the probe instead of refusing.
    int fd = ::open((dir + "/LOCK.of-3").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::flock(fd, LOCK_EX), 0);
    std::thread release([fd] {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      ::close(fd);
    });
    auto waited = PrepareAudioCache(paths, part1);
    release.join();
    EXPECT_TRUE(waited.ok()) << waited.status();
  }
  part1.part = 2;
  EXPECT_EQ(PrepareAudioCache(paths, part1).status().code(), absl::StatusCode::kInvalidArgument);
}

// Parts whose lists differ (a file part 1's host does not see, listed first): every file part 0
// sees is decoded by one part or the other. By place in the list every later file moved to the
// other part: some were decoded twice, others by no part, and both parts said they were done.
TEST(AudioCacheTest, PartsWhoseListsDifferStillDecodeEveryFile) {
  TempDir tmp;
  const std::vector<std::string> paths = CorpusPaths();
  ASSERT_GE(paths.size(), 4u);
  const std::string dir = tmp.Sub("cache");
  PrepareOptions options = Options(dir);
  options.num_parts = 2;
  options.part = 0;
  const PrepareReport first = MustPrepare(paths, options);
  options.part = 1;
  const PrepareReport second = MustPrepare(std::vector<std::string>(paths.begin() + 1, paths.end()), options);
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  std::set<std::string> distinct;
  for (const std::string& path : paths) distinct.insert(AudioCacheKey(path));
  for (size_t i = 1; i < paths.size(); ++i) {
    EXPECT_NE(cache->Lookup(paths[i]), nullptr) << paths[i] << " was decoded by neither part";
  }
  // No file decoded by both: the two parts' files together are the distinct files, once each
  // (the first file is part 0's, or nobody's when it hashes to part 1, whose host lacks it).
  const int64_t total = first.files_total + second.files_total;
  EXPECT_TRUE(total == static_cast<int64_t>(distinct.size()) || total == static_cast<int64_t>(distinct.size()) - 1)
      << first.files_total << " + " << second.files_total << " of " << distinct.size();
}

// A part drops only its own incomplete shards: another part's may be being written.
TEST(AudioCacheTest, APartLeavesTheOtherPartsShards) {
  TempDir tmp;
  const std::vector<std::string> paths = CorpusPaths();
  const std::string dir = tmp.Sub("cache");
  MustPrepare({paths[0]}, Options(dir));
  WriteBytes(ShardFile(dir, 5, ".pcm"), "in progress");   // part 1's (odd)
  WriteBytes(ShardFile(dir, 6, ".pcm"), "interrupted");   // part 0's (even)
  Backdate(ShardFile(dir, 6, ".pcm"), 3600);
  // Temporary indexes of shards past 6 digits (a run split many ways numbers them so): by the
  // whole number, not its first 6 digits (123456, even, for both).
  const std::string odd_tmp = dir + "/shard-1234567.index.csv.tmp.1.2";
  const std::string even_tmp = dir + "/shard-1234568.index.csv.tmp.1.2";
  WriteBytes(odd_tmp, "part 1's, being sealed");
  WriteBytes(even_tmp, "part 0's, left by a kill");
  Backdate(even_tmp, 3600);  // a recent one may be another host's seal in progress
  PrepareOptions part0 = Options(dir);
  part0.num_parts = 2;
  PrepareReport report = MustPrepare(paths, part0);
  EXPECT_TRUE(fs::exists(ShardFile(dir, 5, ".pcm")));
  EXPECT_FALSE(fs::exists(ShardFile(dir, 6, ".pcm")));
  EXPECT_TRUE(fs::exists(odd_tmp));
  EXPECT_FALSE(fs::exists(even_tmp));
  ASSERT_EQ(report.dropped_shards.size(), 1u);
  EXPECT_EQ(report.dropped_shards[0].rfind("shard-000006", 0), 0u) << report.dropped_shards[0];
  for (int shard : ShardNumbers(dir, ".index.csv")) {
    if (shard > 0) {
      EXPECT_EQ(shard % 2, 0) << shard;
    }
  }
}

TEST(AudioCacheTest, OpenWithoutACache) {
  TempDir tmp;
  EXPECT_EQ(AudioCache::Open(tmp.Sub("none")).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(AudioCache::Open(tmp.path()).status().code(), absl::StatusCode::kNotFound);
  WriteBytes(tmp.Sub("manifest.txt"),
             "format=aviary-audio-cache/9\nsample_rate=1\nchannels=first\n");
  EXPECT_EQ(AudioCache::Open(tmp.path()).status().code(), absl::StatusCode::kFailedPrecondition);
}

// The manifest's keys are checked, not skipped: sample_type must be int16le (another is a cache
// this build does not read), a key twice or a line that is not key=value is damage naming the
// file, and an unknown key is refused (max_seconds was once such a key: builds before it read a
// cut cache as whole files). Another format is said first, whatever else its manifest holds.
// Prepare refuses them all; a valid manifest still opens.
TEST(AudioCacheTest, ManifestKeysAreCheckedStrictly) {
  TempDir tmp;
  const std::string good = "format=aviary-audio-cache/1\nsample_rate=32000\nchannels=first\nsample_type=int16le\n";
  struct Case {
    std::string manifest;
    absl::StatusCode code;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"format=aviary-audio-cache/1\nsample_rate=32000\nchannels=first\n", absl::StatusCode::kDataLoss,
       "no sample_type"},
      {good + "sample_type=float32le\n", absl::StatusCode::kDataLoss, "'sample_type' appears twice"},
      {"format=aviary-audio-cache/1\nsample_rate=32000\nchannels=first\nsample_type=float32le\n",
       absl::StatusCode::kFailedPrecondition, "sample_type 'float32le'"},
      {good + "sample_rate=48000\n", absl::StatusCode::kDataLoss, "'sample_rate' appears twice (line 5)"},
      {good + "max_seconds=60\nmax_seconds=60\n", absl::StatusCode::kDataLoss, "'max_seconds' appears twice"},
      {good + "compression=flac\n", absl::StatusCode::kFailedPrecondition, "unknown key 'compression'"},
      {good + "garbage\n", absl::StatusCode::kDataLoss, "line 5 is not key=value"},
      {"format=aviary-audio-cache/2\nformat=aviary-audio-cache/2\ncompression=flac\n",
       absl::StatusCode::kFailedPrecondition, "format 'aviary-audio-cache/2'"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string dir = tmp.Sub("c" + std::to_string(i));
    fs::create_directories(dir);
    WriteBytes(dir + "/manifest.txt", cases[i].manifest);
    auto opened = AudioCache::Open(dir);
    EXPECT_EQ(opened.status().code(), cases[i].code) << i << ": " << opened.status();
    EXPECT_NE(opened.status().message().find(dir + "/manifest.txt"), std::string::npos) << opened.status();
    EXPECT_NE(opened.status().message().find(cases[i].says), std::string::npos) << opened.status();
    auto prepared = PrepareAudioCache({}, Options(dir));
    EXPECT_EQ(prepared.status().code(), cases[i].code) << i << ": " << prepared.status();
  }
  const std::string dir = tmp.Sub("good");
  fs::create_directories(dir);
  WriteBytes(dir + "/manifest.txt", good + "max_seconds=60\n");
  auto opened = AudioCache::Open(dir);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ((*opened)->max_seconds(), 60);
}

// A .pcm without an index is only an interrupted run's when nobody has written to it for a while:
// where flock does not reach across hosts, a prepare on another host may be writing it. Prepare
// keeps one written within max(2 x seal_interval_s, 10 min), saying so (and the plan does not
// count it), and drops it once it is older.
TEST(AudioCacheTest, AShardWithoutAnIndexIsDroppedOnlyOnceItIsOld) {
  TempDir tmp;
  const std::string path = tmp.Sub("a.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 32000));
  const std::string dir = tmp.Sub("cache");
  MustPrepare({path}, Options(dir));
  const std::string orphan = ShardFile(dir, 900, ".pcm");
  WriteBytes(orphan, std::string(4000, '\x11'));

  PrepareReport fresh = MustPrepare({path}, Options(dir));
  EXPECT_TRUE(fs::exists(orphan));
  EXPECT_TRUE(fresh.dropped_shards.empty());
  ASSERT_EQ(fresh.kept_shards.size(), 1u);
  EXPECT_EQ(fresh.kept_shards[0].rfind("shard-000900: no index yet", 0), 0u) << fresh.kept_shards[0];
  EXPECT_NE(fresh.kept_shards[0].find("possibly a prepare on another host"), std::string::npos);
  auto plan = PlanAudioCache({path}, Options(dir));
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->invalid_shards, 0);
  {
    auto cache = MustOpen(dir);
    ASSERT_NE(cache, nullptr);
    ASSERT_EQ(cache->invalid_shards().size(), 1u);  // readers skip it either way
    EXPECT_EQ(cache->size(), 1u);
  }

  // An hour old: still within twice a seal interval of an hour.
  Backdate(orphan, 3600);
  PrepareOptions slow_seals = Options(dir);
  slow_seals.seal_interval_s = 3600;
  EXPECT_EQ(MustPrepare({path}, slow_seals).kept_shards.size(), 1u);
  EXPECT_TRUE(fs::exists(orphan));
  // Past max(2 x 120 s, 10 min): an interrupted run's.
  plan = PlanAudioCache({path}, Options(dir));
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->invalid_shards, 1);
  PrepareReport old = MustPrepare({path}, Options(dir));
  EXPECT_FALSE(fs::exists(orphan));
  EXPECT_TRUE(old.kept_shards.empty());
  ASSERT_EQ(old.dropped_shards.size(), 1u);
  EXPECT_EQ(old.dropped_shards[0], "shard-000900: no index (an interrupted run)");
  // Stamped a day in the future (a wrong clock): not kept for a day.
  WriteBytes(orphan, std::string(4000, '\x11'));
  Backdate(orphan, -86400);
  PrepareReport future = MustPrepare({path}, Options(dir));
  EXPECT_FALSE(fs::exists(orphan));
  EXPECT_TRUE(future.kept_shards.empty());
}

// A prepare that fails part-way (here a write past RLIMIT_FSIZE, EFBIG, as ENOSPC would be on a
// full disk) removes the unsealed shard it was writing: nothing of it is left taking space until
// the next prepare. The shards it sealed stay, and the next run decodes only what is missing.
TEST(AudioCacheTest, AFailedPrepareRemovesItsUnsealedShards) {
  TempDir tmp;
  std::vector<std::string> paths;
  for (int i = 0; i < 8; ++i) {  // 64,000 bytes of samples each: 4 to a shard of 250,000
    paths.push_back(tmp.Sub("short" + std::to_string(i) + ".wav"));
    WriteAudio(paths.back(), SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(220 + 10 * i, 32000, 32000));
  }
  const std::string long_file = tmp.Sub("long.wav");  // 1.9 MB of samples: past the 1 MB limit
  WriteAudio(long_file, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 30 * 32000));
  paths.push_back(long_file);
  const std::string dir = tmp.Sub("cache");
  PrepareOptions options = Options(dir, /*threads=*/1, /*shard_bytes=*/250000);
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    struct rlimit limit {};
    limit.rlim_cur = limit.rlim_max = 1 << 20;
    if (::signal(SIGXFSZ, SIG_IGN) == SIG_ERR || ::setrlimit(RLIMIT_FSIZE, &limit) != 0) ::_exit(2);
    auto report = PrepareAudioCache(paths, options);
    const bool as_expected = !report.ok() && report.status().message().find("shard-000002.pcm: write failed") !=
                                                 std::string::npos;
    if (!as_expected) {
      std::fprintf(stderr, "prepare: %s\n", report.ok() ? "ok" : report.status().ToString().c_str());
    }
    ::_exit(as_expected ? 0 : 1);
  }
  int status = 0;
  ASSERT_GT(pid, 0);
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0) << "prepare did not fail writing a shard (see stderr)";
  EXPECT_EQ(ShardNumbers(dir, ".index.csv"), (std::vector<int>{0, 1}));
  EXPECT_EQ(ShardNumbers(dir, ".pcm"), (std::vector<int>{0, 1}));  // shard 2's is gone

  PrepareReport again = MustPrepare(paths, options);
  EXPECT_EQ(again.files_cached, 8);
  EXPECT_EQ(again.files_decoded, 1);
  EXPECT_TRUE(again.dropped_shards.empty());
}

// Read() serves what LookupCurrent serves (not a file changed since prepare), and checks its
// range without adding offset and count, whose sum can pass INT64_MAX.
TEST(AudioCacheTest, ReadChecksItsRangeWithoutOverflowAndSkipsChangedFiles) {
  TempDir tmp;
  const std::string path = tmp.Sub("a.wav");
  const std::string changed = tmp.Sub("b.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 32000));
  WriteAudio(changed, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 32000));
  const std::string dir = tmp.Sub("cache");
  MustPrepare({path, changed}, Options(dir));
  WriteAudio(changed, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(880, 32000, 2 * 32000));
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  const CacheEntry* entry = cache->Lookup(path);
  ASSERT_NE(entry, nullptr);
  ASSERT_EQ(entry->frames, 32000);
  std::vector<float> out(16);
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(cache->Read(path, 10, kMax, out.data()).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache->Read(path, kMax, 16, out.data()).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache->Read(path, kMax, kMax, out.data()).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache->Read(path, 32001, 0, out.data()).code(), absl::StatusCode::kOutOfRange);
  EXPECT_TRUE(cache->Read(path, 32000, 0, out.data()).ok());
  EXPECT_TRUE(cache->Read(path, 32000 - 16, 16, out.data()).ok());
  ASSERT_NE(cache->Lookup(changed), nullptr);
  EXPECT_EQ(cache->Read(changed, 0, 16, out.data()).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache->stale_files(), 1);
}

// LookupCurrent stat()s the path as the caller spells it, as prepare did, not the normalised key:
// through a symbolic link to a folder, "link/../a.wav" is the link target's sibling, while the
// key says "a.wav" beside the link, here another file.
TEST(AudioCacheTest, LookupCurrentStatsThePathAsGiven) {
  TempDir tmp;
  fs::create_directories(tmp.Sub("real/sub"));
  fs::create_directory_symlink(tmp.Sub("real/sub"), tmp.Sub("link"));
  const std::string through_link = tmp.Sub("link/../a.wav");  // real/a.wav to the kernel
  WriteAudio(tmp.Sub("real/a.wav"), SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 32000));
  WriteAudio(tmp.Sub("a.wav"), SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(880, 32000, 3 * 32000));
  ASSERT_EQ(AudioCacheKey(through_link), tmp.Sub("a.wav"));
  const std::string dir = tmp.Sub("cache");
  MustPrepare({through_link}, Options(dir));
  auto cache = MustOpen(dir);
  ASSERT_NE(cache, nullptr);
  const CacheEntry* entry = cache->LookupCurrent(through_link);
  ASSERT_NE(entry, nullptr) << "the cached file, unchanged, was taken for changed";
  EXPECT_EQ(entry->frames, 32000);
  EXPECT_EQ(cache->stale_files(), 0);
}

TEST(AudioCacheTest, ThreadCountDoesNotChangeTheData) {
  TempDir tmp;
  const std::vector<std::string> paths = CorpusPaths();
  MustPrepare(paths, Options(tmp.Sub("one"), 1));
  // Eight writers on two cores and shards of 64 KiB: most shards fill while other files' writes
  // into them are still under way, and are sealed by the thread whose write lands last.
  PrepareReport many = MustPrepare(paths, Options(tmp.Sub("two"), 8, 64 << 10));
  EXPECT_GT(many.shards_written, 8);
  EXPECT_EQ(ShardNumbers(tmp.Sub("two"), ".index.csv").size(), static_cast<size_t>(many.shards_written));
  auto one = MustOpen(tmp.Sub("one"));
  auto two = MustOpen(tmp.Sub("two"));
  ASSERT_TRUE(one && two);
  EXPECT_TRUE(two->invalid_shards().empty());
  ASSERT_EQ(one->size(), two->size());
  for (const std::string& path : paths) {
    const CacheEntry* a = one->Lookup(path);
    const CacheEntry* b = two->Lookup(path);
    ASSERT_TRUE(a && b) << path;
    EXPECT_EQ(a->problem, b->problem);
    absl::StatusOr<std::vector<int16_t>> qa = one->Samples(*a), qb = two->Samples(*b);
    ASSERT_TRUE(qa.ok() && qb.ok()) << path;
    ASSERT_EQ(*qa, *qb) << path;
  }
}

TEST(AudioCacheTest, QuantisationRule) {
  EXPECT_EQ(FloatToCacheSample(0.0f), 0);
  EXPECT_EQ(FloatToCacheSample(0.5f), 16384);
  EXPECT_EQ(FloatToCacheSample(-1.0f), -32768);
  EXPECT_EQ(FloatToCacheSample(1.0f), 32767);
  EXPECT_EQ(FloatToCacheSample(3.0f), 32767);
  EXPECT_EQ(FloatToCacheSample(-3.0f), -32768);
  EXPECT_EQ(FloatToCacheSample(std::nanf("")), -32768);
  EXPECT_EQ(FloatToCacheSample(1.6f / 32768), 2);
  EXPECT_EQ(FloatToCacheSample(-1.4f / 32768), -1);
  EXPECT_EQ(CacheSampleToFloat(-32768), -1.0f);
}

}  // namespace
}  // namespace aviary::worker
