#include "worker/data/clip_loader.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/files.h"
#include "gtest/gtest.h"
#include "tests/worker/audio_test_util.h"
#include "worker/data/audio_cache.h"

namespace aviary::worker {
namespace {

namespace fs = std::filesystem;
using testing::SharedCorpus;
using testing::Sine;
using testing::TempDir;
using testing::WriteAudio;
using testing::WriteBytes;

ClipRequest Request(ClipMode mode, uint64_t seed, double duration_s = 2.0) {
  ClipRequest request;
  request.mode = mode;
  request.seed = seed;
  request.duration_s = duration_s;
  return request;
}

ClipResult MustLoad(const AudioCache* cache, const std::string& path, const ClipRequest& request) {
  auto result = LoadClip(cache, path, request);
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? *std::move(result) : ClipResult{};
}

std::unique_ptr<AudioCache> Prepare(const std::vector<std::string>& paths, const std::string& dir,
                                    int rate = 32000) {
  PrepareOptions options;
  options.cache_dir = dir;
  options.num_threads = 2;
  options.sample_rate = rate;
  auto report = PrepareAudioCache(paths, options);
  EXPECT_TRUE(report.ok()) << report.status();
  auto cache = AudioCache::Open(dir);
  EXPECT_TRUE(cache.ok()) << cache.status();
  return cache.ok() ? *std::move(cache) : nullptr;
}

// The cache and the on-the-fly decode cut the same clips (same plan for a seed) with the same
// samples up to the cache's int16 rounding (1/65536) and window-vs-whole float rounding.
TEST(LoadClipTest, CacheAndOnTheFlyAgree) {
  const auto& corpus = SharedCorpus();
  TempDir tmp;
  std::vector<std::string> paths;
  for (const auto& f : corpus.ogg) paths.push_back(corpus.OggPath(f));
  for (const auto& f : corpus.mp3) paths.push_back(corpus.Mp3Path(f));
  auto cache = Prepare(paths, tmp.Sub("cache"));
  ASSERT_NE(cache, nullptr);
  int compared = 0;
  for (const std::string& path : paths) {
    for (ClipMode mode : {ClipMode::kTrain, ClipMode::kValidation}) {
      for (uint64_t seed : {1ULL, 99ULL}) {
        ClipRequest request = Request(mode, seed);
        ClipResult cached = MustLoad(cache.get(), path, request);
        ClipResult fly = MustLoad(nullptr, path, request);
        EXPECT_TRUE(cached.from_cache);
        EXPECT_FALSE(fly.from_cache);
        ASSERT_EQ(cached.samples.size(), 64000u);
        ASSERT_EQ(fly.samples.size(), 64000u);
        EXPECT_EQ(cached.problem, fly.problem)
            << path << ": " << cached.message << " / " << fly.message;
        if (!cached.ok()) continue;
        EXPECT_EQ(cached.audio_samples, fly.audio_samples) << path;
        EXPECT_EQ(cached.plan.source_offset, fly.plan.source_offset) << path;
        EXPECT_EQ(cached.plan.pad_front, fly.plan.pad_front) << path;
        for (size_t i = 0; i < cached.samples.size(); ++i) {
          // The cache clamps to int16's range (the synthetic corpus overshoots 1.0 here and there).
          const float clamped = std::min(std::max(fly.samples[i], -1.0f), 32767.0f / 32768.0f);
          ASSERT_NEAR(cached.samples[i], clamped, 1.0 / 65536 + 2e-6) << path << " " << i;
        }
        ++compared;
      }
    }
  }
  EXPECT_GE(compared, 100);
}

// Audio below 16 bits' half step (about -100 dBFS; the cache stores it as zeros) is silent on
// both paths, and audio one 16-bit step loud is not, on either.
TEST(LoadClipTest, CacheAndOnTheFlyAgreeOnSilenceAtSixteenBits) {
  TempDir tmp;
  const std::string faint = tmp.Sub("faint.wav");
  std::vector<float> below = Sine(440, 32000, 32000 * 3);
  for (float& x : below) x *= 1.0e-5f;  // < 2^-16 = 1.53e-5
  WriteAudio(faint, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 32000, 1, below);
  const std::string quiet = tmp.Sub("quiet.wav");
  std::vector<float> above = Sine(440, 32000, 32000 * 3);
  for (float& x : above) x *= 4.0e-5f;  // rounds to +-1 at 16 bits
  WriteAudio(quiet, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 32000, 1, above);
  auto cache = Prepare({faint, quiet}, tmp.Sub("cache"));
  ASSERT_NE(cache, nullptr);
  for (ClipMode mode : {ClipMode::kTrain, ClipMode::kValidation}) {
    const ClipRequest request = Request(mode, 7);
    ClipResult cached = MustLoad(cache.get(), faint, request);
    ClipResult fly = MustLoad(nullptr, faint, request);
    EXPECT_TRUE(cached.from_cache);
    EXPECT_EQ(cached.problem, AudioProblem::kSilent) << cached.message;
    EXPECT_EQ(fly.problem, AudioProblem::kSilent) << fly.message;
    ClipResult cached_quiet = MustLoad(cache.get(), quiet, request);
    ClipResult fly_quiet = MustLoad(nullptr, quiet, request);
    EXPECT_TRUE(cached_quiet.ok()) << cached_quiet.message;
    EXPECT_TRUE(fly_quiet.ok()) << fly_quiet.message;
  }
}

TEST(LoadClipTest, ExactLengthCropAndPad) {
  TempDir tmp;
  const std::string shorter = tmp.Sub("short.wav");  // 0.05 s at 44.1 kHz -> 1600 samples
  WriteAudio(shorter, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 44100, 1, Sine(1000, 44100, 2205));
  const std::string longer = tmp.Sub("long.wav");  // 30 s
  WriteAudio(longer, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 32000, 1, Sine(321, 32000, 32000 * 30));

  ClipResult v = MustLoad(nullptr, shorter, Request(ClipMode::kValidation, 5, 10.0));
  ASSERT_TRUE(v.ok()) << v.message;
  ASSERT_EQ(v.samples.size(), 320000u);
  EXPECT_EQ(v.audio_samples, 1600);
  EXPECT_EQ(v.plan.pad_front, 0);
  EXPECT_EQ(v.plan.pad_back, 320000 - 1600);
  EXPECT_NE(v.samples[800], 0.0f);
  for (size_t i = 1600; i < v.samples.size(); ++i) ASSERT_EQ(v.samples[i], 0.0f);

  std::set<int64_t> fronts;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    ClipResult t = MustLoad(nullptr, shorter, Request(ClipMode::kTrain, seed, 10.0));
    ASSERT_TRUE(t.ok());
    ASSERT_EQ(t.samples.size(), 320000u);
    EXPECT_EQ(t.plan.pad_front + t.plan.pad_back, 320000 - 1600);
    fronts.insert(t.plan.pad_front);
    for (int64_t i = 0; i < t.plan.pad_front; ++i) ASSERT_EQ(t.samples[i], 0.0f);
  }
  EXPECT_GE(fronts.size(), 15u);

  ClipResult first = MustLoad(nullptr, longer, Request(ClipMode::kValidation, 5, 10.0));
  EXPECT_EQ(first.plan.source_offset, 0);
  std::vector<float> expected = Sine(321, 32000, 320000);
  for (size_t i = 0; i < expected.size(); ++i) ASSERT_NEAR(first.samples[i], expected[i], 1e-6);
  std::set<int64_t> starts;
  for (uint64_t seed = 0; seed < 10; ++seed) {
    ClipResult crop = MustLoad(nullptr, longer, Request(ClipMode::kTrain, seed, 10.0));
    ASSERT_EQ(crop.samples.size(), 320000u);
    EXPECT_LE(crop.plan.source_offset, 32000 * 20);
    starts.insert(crop.plan.source_offset);
    std::vector<float> want = Sine(321, 32000, 320000, 0.5, crop.plan.source_offset);
    for (size_t i = 0; i < want.size(); i += 997) ASSERT_NEAR(crop.samples[i], want[i], 1e-5);
  }
  EXPECT_EQ(starts.size(), 10u);
}

// LoadClipInto (the loader's: straight into a batch row) writes what LoadClip returns, pads
// included, whatever the row held before (a NaN-filled row here), cached or decoded on the fly.
TEST(LoadClipTest, IntoARowWritesWhatLoadClipReturns) {
  TempDir tmp;
  const std::string shorter = tmp.Sub("short.wav");  // 1 s, shorter than the clip: padded
  WriteAudio(shorter, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(700, 32000, 32000));
  const std::string longer = tmp.Sub("long.wav");  // 5 s: cropped
  WriteAudio(longer, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(321, 32000, 5 * 32000));
  const std::string text = tmp.Sub("text.ogg");  // a problem: zeros
  WriteBytes(text, "not audio at all\n");
  auto cache = Prepare({shorter, longer, text}, tmp.Sub("cache"));
  ASSERT_NE(cache, nullptr);
  for (const AudioCache* c : std::vector<const AudioCache*>{nullptr, cache.get()}) {
    for (const std::string& path : {shorter, longer, text}) {
      for (ClipMode mode : {ClipMode::kTrain, ClipMode::kValidation}) {
        const ClipRequest request = Request(mode, 11);
        ClipResult whole = MustLoad(c, path, request);
        std::vector<float> row(whole.samples.size(), std::nanf(""));
        auto into = LoadClipInto(c, path, request, absl::MakeSpan(row));
        ASSERT_TRUE(into.ok()) << into.status();
        EXPECT_TRUE(into->samples.empty());
        EXPECT_EQ(into->problem, whole.problem) << path;
        EXPECT_EQ(into->from_cache, whole.from_cache) << path;
        EXPECT_EQ(into->plan.pad_front, whole.plan.pad_front) << path;
        ASSERT_EQ(row, whole.samples) << path << (c ? " (cache)" : "");
      }
    }
  }
  std::vector<float> wrong(100);
  auto bad = LoadClipInto(nullptr, longer, Request(ClipMode::kTrain, 1), absl::MakeSpan(wrong));
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("the destination holds 100 samples, the request's clip is 64000"),
            std::string::npos)
      << bad.status();
}

TEST(LoadClipTest, DeterministicForASeed) {
  const auto& corpus = SharedCorpus();
  std::string path;
  for (const auto& f : corpus.ogg) {
    if (f.kind == synth::SynthFileKind::kGood && f.num_frames > 5 * f.sample_rate)
      path = corpus.OggPath(f);
  }
  ASSERT_FALSE(path.empty());
  ClipResult a = MustLoad(nullptr, path, Request(ClipMode::kTrain, 1234));
  ClipResult b = MustLoad(nullptr, path, Request(ClipMode::kTrain, 1234));
  ClipResult c = MustLoad(nullptr, path, Request(ClipMode::kTrain, 1235));
  EXPECT_EQ(a.samples, b.samples);
  EXPECT_EQ(a.plan.source_offset, b.plan.source_offset);
  EXPECT_NE(a.plan.source_offset, c.plan.source_offset);
}

void ExpectZerosAndProblem(const ClipResult& r, AudioProblem problem, const std::string& what) {
  EXPECT_EQ(r.problem, problem) << what << ": " << AudioProblemName(r.problem) << " " << r.message;
  EXPECT_FALSE(r.message.empty()) << what;
  ASSERT_EQ(r.samples.size(), 64000u) << what;
  for (float x : r.samples) {
    ASSERT_TRUE(std::isfinite(x)) << what;
    ASSERT_EQ(x, 0.0f) << what;
  }
}

// A VBR mp3 without a Xing/Info tag (`-write_xing 0`), whose frame count libsndfile estimates
// at about 9 s for 30 s of audio: crops come from the decoded length, from the cache and on the
// fly, and the two agree (clips from the last 20 s used to be impossible, or "truncated").
TEST(LoadClipTest, Mp3WithoutXingTagUsesTheDecodedLength) {
  if (!testing::HaveTool("ffmpeg")) GTEST_SKIP() << "ffmpeg is not installed (needed to encode)";
  TempDir tmp;
  const int rate = 44100;
  std::vector<float> noise(static_cast<size_t>(30 * rate));
  uint32_t state = 7;
  for (auto& v : noise) {
    state = state * 1664525u + 1013904223u;
    v = static_cast<float>(state >> 8) / float(1 << 24) - 0.5f;
  }
  const std::string wav = tmp.Sub("noise.wav");
  const std::string mp3 = tmp.Sub("noise.mp3");
  WriteAudio(wav, SF_FORMAT_WAV | SF_FORMAT_PCM_16, rate, 1, noise);
  bool ok = false;
  testing::RunCapture("ffmpeg -nostdin -v error -y -i " + testing::ShellQuote(wav) +
                          " -c:a libmp3lame -q:a 4 -write_xing 0 " + testing::ShellQuote(mp3),
                      &ok);
  ASSERT_TRUE(ok) << "ffmpeg could not encode " << mp3;
  DecodeOptions options;
  auto whole = DecodeAudio(mp3, options);
  ASSERT_TRUE(whole.ok() && whole->ok()) << mp3;
  const int64_t total = static_cast<int64_t>(whole->audio.samples.size());
  EXPECT_GT(total, 29 * 32000);
  auto cache = Prepare({mp3}, tmp.Sub("cache"));
  ASSERT_NE(cache, nullptr);
  const CacheEntry* entry = cache->Lookup(mp3);
  ASSERT_NE(entry, nullptr);
  EXPECT_EQ(entry->problem, AudioProblem::kNone) << entry->message;
  EXPECT_EQ(entry->frames, total);
  for (uint64_t seed = 1; seed <= 6; ++seed) {
    ClipRequest request = Request(ClipMode::kTrain, seed, 5.0);
    ClipResult fly = MustLoad(nullptr, mp3, request);
    ClipResult cached = MustLoad(cache.get(), mp3, request);
    EXPECT_EQ(fly.problem, AudioProblem::kNone) << fly.message;
    EXPECT_EQ(cached.problem, AudioProblem::kNone) << cached.message;
    EXPECT_EQ(fly.audio_samples, total);
    EXPECT_EQ(cached.audio_samples, total);
    EXPECT_EQ(fly.plan.source_offset, cached.plan.source_offset);
  }
}

// A file replaced after prepare (other content, other size) is not served from the cache: the
// loader notices on first use (size/mtime differ from the entry's), decodes the new version on
// the fly, and counts it; an unchanged file is still served from the cache.
TEST(LoadClipTest, FileChangedSincePrepareIsDecodedOnTheFly) {
  TempDir tmp;
  const std::string changed = tmp.Sub("changed.wav");
  const std::string same = tmp.Sub("same.wav");
  WriteAudio(changed, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 3 * 32000));
  WriteAudio(same, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 3 * 32000));
  const std::string dir = tmp.Sub("cache");
  ASSERT_NE(Prepare({changed, same}, dir), nullptr);
  // Replaced: 5 s of another tone.
  WriteAudio(changed, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(880, 32000, 5 * 32000));
  auto opened = AudioCache::Open(dir);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const AudioCache& cache = **opened;
  const ClipRequest request = Request(ClipMode::kValidation, 1);
  ClipResult fresh = MustLoad(&cache, changed, request);
  ClipResult fly = MustLoad(nullptr, changed, request);
  EXPECT_FALSE(fresh.from_cache);
  EXPECT_EQ(fresh.problem, AudioProblem::kNone) << fresh.message;
  EXPECT_EQ(fresh.audio_samples, 5 * 32000);
  EXPECT_EQ(fresh.samples, fly.samples);
  EXPECT_EQ(cache.stale_files(), 1);
  // Asked again: the verdict holds, counted once.
  EXPECT_FALSE(MustLoad(&cache, changed, request).from_cache);
  EXPECT_EQ(cache.stale_files(), 1);
  ClipResult kept = MustLoad(&cache, same, request);
  EXPECT_TRUE(kept.from_cache);
  EXPECT_EQ(kept.audio_samples, 3 * 32000);
  EXPECT_EQ(cache.stale_files(), 1);
  // An entry without a stamp (prepare could not stat the file then): nothing says the audio is
  // the file's, which can be stat()ed now; decoded on the fly, as prepare would decode it again.
  const std::string index = dir + "/shard-000000.index.csv";
  auto text = common::ReadFileToString(index);
  ASSERT_TRUE(text.ok()) << text.status();
  std::vector<std::string> lines = absl::StrSplit(*text, '\n');
  bool edited = false;
  for (std::string& line : lines) {
    if (!absl::StartsWith(line, AudioCacheKey(same) + ",")) continue;
    std::vector<std::string> cols = absl::StrSplit(line, ',');
    ASSERT_GE(cols.size(), 11u) << line;
    cols[9] = "-1";   // file_bytes
    cols[10] = "-1";  // mtime_ns
    line = absl::StrJoin(cols, ",");
    edited = true;
  }
  ASSERT_TRUE(edited) << *text;
  ASSERT_TRUE(common::WriteFileAtomically(index, absl::StrJoin(lines, "\n")).ok());
  auto unstamped = AudioCache::Open(dir);
  ASSERT_TRUE(unstamped.ok()) << unstamped.status();
  ASSERT_NE((*unstamped)->Lookup(same), nullptr);
  EXPECT_EQ((*unstamped)->Lookup(same)->file_bytes, -1);
  EXPECT_FALSE(MustLoad(unstamped->get(), same, request).from_cache);
  EXPECT_EQ((*unstamped)->stale_files(), 1);
}

// A cache file that cannot be read when a clip is asked for (here shortened after the cache was
// opened; EIO or ESTALE on a share alike): the clip is decoded from its audio file, the same
// clip with the same draws, and the failure counted. The cache was memory-mapped: the read past
// the file's end raised SIGBUS, which killed the rank.
TEST(LoadClipTest, ACacheFileThatCannotBeReadIsDecodedInstead) {
  TempDir tmp;
  const std::string path = tmp.Sub("a.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 5 * 32000));
  const std::string dir = tmp.Sub("cache");
  auto cache = Prepare({path}, dir);
  ASSERT_NE(cache, nullptr);
  ASSERT_TRUE(MustLoad(cache.get(), path, Request(ClipMode::kTrain, 5)).from_cache);
  ASSERT_EQ(::truncate((dir + "/shard-000000.pcm").c_str(), 1000), 0);
  for (ClipMode mode : {ClipMode::kTrain, ClipMode::kValidation}) {
    const ClipRequest request = Request(mode, 5);
    ClipResult read = MustLoad(cache.get(), path, request);
    ClipResult fly = MustLoad(nullptr, path, request);
    EXPECT_FALSE(read.from_cache);
    EXPECT_TRUE(read.ok()) << read.message;
    EXPECT_EQ(read.plan.source_offset, fly.plan.source_offset);
    EXPECT_EQ(read.samples, fly.samples);
  }
  EXPECT_EQ(cache->read_failures(), 2);
  std::vector<float> out(10);
  absl::Status st = cache->Read(path, 20000, 10, out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_TRUE(absl::StrContains(st.message(), dir + "/shard-000000.pcm (")) << st;
  EXPECT_TRUE(absl::StrContains(st.message(), "shortened since the cache was opened")) << st;
}

// A corpus rewritten after prepare: the first 10 changed files are named in the log, then one
// line says the rest are counted, not named (a line per file flooded the log); all are counted.
TEST(LoadClipTest, ChangedFilesAreNamedUpToTenThenCounted) {
  TempDir tmp;
  std::vector<std::string> files;
  for (int i = 0; i < 13; ++i) {
    files.push_back(tmp.Sub(absl::StrCat("f", i, ".wav")));
    WriteAudio(files.back(), SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 32000));
  }
  const std::string dir = tmp.Sub("cache");
  ASSERT_NE(Prepare(files, dir), nullptr);
  for (const std::string& f : files) {
    WriteAudio(f, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(880, 32000, 2 * 32000));
  }
  auto opened = AudioCache::Open(dir);
  ASSERT_TRUE(opened.ok()) << opened.status();
  absl::Mutex mu;
  std::vector<std::string> warnings;
  common::SetLogTap([&](common::LogLevel level, int, absl::string_view line) {
    absl::MutexLock lock(&mu);
    if (level == common::LogLevel::kWarning) warnings.emplace_back(line);
  });
  for (const std::string& f : files) EXPECT_FALSE(MustLoad(opened->get(), f, Request(ClipMode::kValidation, 1)).from_cache);
  common::SetLogTap(nullptr);
  EXPECT_EQ((*opened)->stale_files(), 13);
  int named = 0, counted = 0;
  for (const std::string& line : warnings) {
    named += absl::StrContains(line, ": changed since `aviary prepare` cached it (");
    counted += absl::StrContains(line, "counted, not named");
  }
  EXPECT_EQ(named, 10);
  EXPECT_EQ(counted, 1);
}

// Broken files give a clip of zeros and the problem, from the cache and on the fly; never NaN.
TEST(LoadClipTest, ProblemsGiveZerosNeverNaN) {
  TempDir tmp;
  const std::string silent = tmp.Sub("silent.wav");
  WriteAudio(silent, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1,
             std::vector<float>(5 * 32000, 0.0f));
  const std::string empty = tmp.Sub("empty.ogg");
  WriteBytes(empty, "");
  const std::string text = tmp.Sub("text.ogg");
  WriteBytes(text, "not audio at all\n");
  const std::string missing = tmp.Sub("missing.mp3");
  std::vector<float> x = Sine(440, 32000, 32000);
  x[10] = std::nanf("");
  const std::string nan = tmp.Sub("nan.wav");
  WriteAudio(nan, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 32000, 1, x);
  const std::vector<std::pair<std::string, AudioProblem>> cases = {
      {silent, AudioProblem::kSilent},
      {empty, AudioProblem::kEmpty},
      {text, AudioProblem::kNotAudio},
      {missing, AudioProblem::kMissing},
      {nan, AudioProblem::kNonFinite}};
  std::vector<std::string> paths;
  for (const auto& [path, problem] : cases) paths.push_back(path);
  auto cache = Prepare(paths, tmp.Sub("cache"));
  ASSERT_NE(cache, nullptr);
  for (const auto& [path, problem] : cases) {
    for (ClipMode mode : {ClipMode::kTrain, ClipMode::kValidation}) {
      ExpectZerosAndProblem(MustLoad(nullptr, path, Request(mode, 3)), problem, path);
      ClipResult cached = MustLoad(cache.get(), path, Request(mode, 3));
      // A missing file is not cached (the verdict is transient): it is looked at again.
      EXPECT_EQ(cached.from_cache, problem != AudioProblem::kMissing) << path;
      ExpectZerosAndProblem(cached, problem, path + " (cache)");
    }
  }
}

// A window of digital silence in a file that is not silent: both paths report it silent, so that
// cached and on-the-fly training skip the same clips.
TEST(LoadClipTest, SilentWindowOfANonSilentFile) {
  TempDir tmp;
  std::vector<float> x(32000 * 6, 0.0f);
  std::vector<float> tone = Sine(440, 32000, 32000 * 3);
  std::copy(tone.begin(), tone.end(), x.begin() + 32000 * 3);
  const std::string path = tmp.Sub("half.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 32000, 1, x);
  auto cache = Prepare({path}, tmp.Sub("cache"));
  ASSERT_NE(cache, nullptr);
  ASSERT_EQ(cache->Lookup(path)->problem, AudioProblem::kNone);
  ClipRequest first = Request(ClipMode::kValidation, 0, 2.0);
  ExpectZerosAndProblem(MustLoad(nullptr, path, first), AudioProblem::kSilent, "on the fly");
  ExpectZerosAndProblem(MustLoad(cache.get(), path, first), AudioProblem::kSilent, "cache");
}

TEST(LoadClipTest, CacheOfAnotherRateOrModeIsNotUsed) {
  TempDir tmp;
  const std::string path = tmp.Sub("a.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 44100, 1, Sine(440, 44100, 44100 * 3));
  auto cache = Prepare({path}, tmp.Sub("cache"), 16000);
  ASSERT_NE(cache, nullptr);
  ClipResult r = MustLoad(cache.get(), path, Request(ClipMode::kValidation, 0));
  EXPECT_FALSE(r.from_cache);
  EXPECT_TRUE(r.ok());
  ClipRequest at16k = Request(ClipMode::kValidation, 0);
  at16k.sample_rate = 16000;
  EXPECT_TRUE(MustLoad(cache.get(), path, at16k).from_cache);
  at16k.channels = ChannelMode::kMean;
  EXPECT_FALSE(MustLoad(cache.get(), path, at16k).from_cache);
}

// data.cache_max_seconds: clips come from the first max_seconds only, from a cache cut there
// and on the fly alike; a cache cut shorter than the request (or cut when the request is not)
// is not used, and says why.
TEST(LoadClipTest, MaxSecondsCutsTheRecordingCachedOrNot) {
  TempDir tmp;
  const std::string path = tmp.Sub("a.wav");  // 4 s: a tone for 1.5 s, then a louder one
  std::vector<float> samples = Sine(440, 32000, 32000 * 4);
  for (size_t i = 48000; i < samples.size(); ++i) samples[i] *= 4;
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 32000, 1, samples);
  PrepareOptions options;
  options.cache_dir = tmp.Sub("cut");
  options.max_seconds = 1.5;
  ASSERT_TRUE(PrepareAudioCache({path}, options).ok());
  auto cut = AudioCache::Open(options.cache_dir);
  ASSERT_TRUE(cut.ok()) << cut.status();
  auto whole = Prepare({path}, tmp.Sub("whole"));
  ASSERT_NE(whole, nullptr);
  for (uint64_t seed = 0; seed < 20; ++seed) {
    ClipRequest request = Request(ClipMode::kTrain, seed, 1.0);
    request.max_seconds = 1.5;
    ClipResult fly = MustLoad(nullptr, path, request);
    ClipResult from_cut = MustLoad(cut->get(), path, request);
    ClipResult from_whole = MustLoad(whole.get(), path, request);
    EXPECT_TRUE(from_cut.from_cache);
    EXPECT_TRUE(from_whole.from_cache);
    for (const ClipResult* r : {&fly, &from_cut, &from_whole}) {
      ASSERT_TRUE(r->ok()) << r->message;
      EXPECT_EQ(r->audio_samples, 48000);
      EXPECT_LE(r->plan.source_offset + r->plan.source_length, 48000);
      EXPECT_EQ(r->plan.source_offset, fly.plan.source_offset);
      // Nothing from after the cut: the louder tone never shows.
      for (float x : r->samples) ASSERT_LE(std::fabs(x), 1.01f);
    }
  }
  ClipRequest uncut = Request(ClipMode::kValidation, 0, 1.0);
  EXPECT_EQ(MustLoad(nullptr, path, uncut).audio_samples, 128000);
  EXPECT_FALSE(MustLoad(cut->get(), path, uncut).from_cache);
  EXPECT_NE(CacheMismatch(**cut, uncut).find("holds the first 1.5 s of each file, the clips may come from the whole file"),
            std::string::npos)
      << CacheMismatch(**cut, uncut);
  uncut.max_seconds = 2;
  EXPECT_FALSE(MustLoad(cut->get(), path, uncut).from_cache);
  uncut.max_seconds = 1;
  EXPECT_TRUE(MustLoad(cut->get(), path, uncut).from_cache);
  EXPECT_EQ(CacheMismatch(**cut, uncut), "");
  uncut.max_seconds = -1;
  EXPECT_EQ(LoadClip(nullptr, path, uncut).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LoadClipTest, BadRequestsAndConfiguredCache) {
  ClipRequest bad = Request(ClipMode::kTrain, 0);
  bad.sample_rate = 0;
  EXPECT_EQ(LoadClip(nullptr, "x.ogg", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = Request(ClipMode::kTrain, 0, 0.0);
  EXPECT_EQ(LoadClip(nullptr, "x.ogg", bad).status().code(), absl::StatusCode::kInvalidArgument);

  TempDir tmp;
  common::DataConfig data;
  auto none = OpenConfiguredCache(data);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, nullptr);
  data.cache_dir = tmp.Sub("not-yet");
  none = OpenConfiguredCache(data);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, nullptr);
  const std::string path = tmp.Sub("a.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 32000, 1, Sine(440, 32000, 3200));
  Prepare({path}, data.cache_dir);
  auto some = OpenConfiguredCache(data);
  ASSERT_TRUE(some.ok());
  ASSERT_NE(*some, nullptr);
  EXPECT_EQ((*some)->size(), 1u);
}

// A configured cache that cannot be opened (another format version, a damaged manifest, one
// that cannot be read now) is not used, with a warning naming the manifest and the reason, as a
// cache of another rate is: training decodes on the fly instead of failing every attempt.
TEST(LoadClipTest, ConfiguredCacheThatCannotBeOpenedIsWarnedAboutNotFatal) {
  TempDir tmp;
  struct Case {
    std::string name;
    std::string manifest;  // "": manifest.txt is a link to itself (ELOOP, as EIO or ESTALE)
    std::string says;
  };
  const std::string good = "format=aviary-audio-cache/1\nsample_rate=32000\nchannels=first\nsample_type=int16le\n";
  const std::vector<Case> cases = {
      {"newer", "format=aviary-audio-cache/2\nsample_rate=32000\n", "FAILED_PRECONDITION: "},
      {"damaged", good + "sample_rate=16000\n", "DATA_LOSS: "},
      {"truncated", "format=aviary-audio-cache/1\nsample_ra", "DATA_LOSS: "},
      {"unreadable", "", "INTERNAL: "},
  };
  for (const Case& c : cases) {
    common::DataConfig data;
    data.cache_dir = tmp.Sub(c.name);
    fs::create_directories(data.cache_dir);
    const std::string manifest = data.cache_dir + "/manifest.txt";
    if (c.manifest.empty()) {
      fs::create_symlink("manifest.txt", manifest);
    } else {
      WriteBytes(manifest, c.manifest);
    }
    absl::Mutex mu;
    std::vector<std::string> warnings;
    common::SetLogTap([&](common::LogLevel level, int, absl::string_view line) {
      absl::MutexLock lock(&mu);
      if (level == common::LogLevel::kWarning) warnings.emplace_back(line);
    });
    auto opened = OpenConfiguredCache(data);
    common::SetLogTap(nullptr);
    ASSERT_TRUE(opened.ok()) << c.name << ": " << opened.status();
    EXPECT_EQ(*opened, nullptr) << c.name;
    ASSERT_EQ(warnings.size(), 1u) << c.name;
    EXPECT_TRUE(absl::StrContains(warnings[0], "not using the decoded-audio cache data.cache_dir " + data.cache_dir))
        << warnings[0];
    EXPECT_TRUE(absl::StrContains(warnings[0], c.says + manifest)) << warnings[0];
    EXPECT_TRUE(absl::StrContains(warnings[0], "decoded on the fly")) << warnings[0];
  }
}

}  // namespace
}  // namespace aviary::worker
