#include "worker/data/audio.h"

#include <fcntl.h>
#include <sndfile.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <new>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/worker/audio_test_util.h"

namespace aviary::worker {
namespace {

using testing::BytesToF32;
using testing::HaveTool;
using testing::RunCapture;
using testing::SharedCorpus;
using testing::ShellQuote;
using testing::Sine;
using testing::TempDir;
using testing::TruncateCopy;
using testing::WriteAudio;
using testing::WriteBytes;

DecodeResult Decode(const std::string& path, int target = 32000,
                    ChannelMode channels = ChannelMode::kFirst, double offset_s = 0,
                    double duration_s = 0) {
  DecodeOptions options;
  options.target_sample_rate = target;
  options.channels = channels;
  options.offset_s = offset_s;
  options.duration_s = duration_s;
  auto result = DecodeAudio(path, options);
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? *std::move(result) : DecodeResult{};
}

struct Diff {
  double max_abs = 0;
  double rel_rms = 0;  // sqrt(sum (a-b)^2 / sum b^2)
};
Diff Compare(const std::vector<float>& a, const std::vector<float>& b, size_t from = 0,
             size_t to = SIZE_MAX) {
  Diff d;
  double err = 0, ref = 0;
  to = std::min({to, a.size(), b.size()});
  for (size_t i = from; i < to; ++i) {
    double e = double(a[i]) - double(b[i]);
    d.max_abs = std::max(d.max_abs, std::fabs(e));
    err += e * e;
    ref += double(b[i]) * b[i];
  }
  d.rel_rms = ref > 0 ? std::sqrt(err / ref) : std::sqrt(err);
  return d;
}

// ffmpeg's decode at the source rate: the first channel or the mean of two channels (pan filter;
// ffmpeg's own -ac 1 downmix is not the mean).
std::vector<float> FfmpegDecode(const std::string& path, ChannelMode channels, bool* ok) {
  std::string cmd = "ffmpeg -nostdin -v error -i " + ShellQuote(path) +
                    (channels == ChannelMode::kFirst ? " -af 'pan=mono|c0=c0'"
                                                     : " -af 'pan=mono|c0=0.5*c0+0.5*c1'") +
                    " -f f32le -acodec pcm_f32le -";
  return BytesToF32(RunCapture(cmd, ok));
}

// --- Parity with ffmpeg ------------------------------------------------------------------------

// Ogg Vorbis: libsndfile (libvorbis) and ffmpeg's native Vorbis decoder agree to float rounding,
// at most ~2e-7 apart on this corpus, for the first channel and for the channel mean. Lengths:
// ours is always the final granule position (what the writer wrote); ffmpeg 5.1 drops the last
// 128 samples (one short block) of one short single-page file here, so we compare the common
// prefix and allow ffmpeg to be shorter by at most one short block.
TEST(AudioParityTest, OggMatchesFfmpegWithin1e6) {
  if (!HaveTool("ffmpeg")) GTEST_SKIP() << "ffmpeg is not installed";
  const auto& corpus = SharedCorpus();
  int compared = 0, stereo = 0;
  for (const auto& f : corpus.ogg) {
    if (f.kind != synth::SynthFileKind::kGood) continue;
    const std::string path = corpus.OggPath(f);
    for (ChannelMode mode : {ChannelMode::kFirst, ChannelMode::kMean}) {
      if (mode == ChannelMode::kMean && f.channels == 1) continue;
      DecodeResult ours = Decode(path, 0, mode);
      ASSERT_TRUE(ours.ok()) << ours.failure.message;
      bool ok = false;
      std::vector<float> ref = FfmpegDecode(path, mode, &ok);
      ASSERT_TRUE(ok) << path;
      ASSERT_EQ(static_cast<int64_t>(ours.audio.samples.size()), f.num_frames) << path;
      ASSERT_LE(ref.size(), ours.audio.samples.size()) << path;
      ASSERT_LE(ours.audio.samples.size() - ref.size(), 128u) << path;
      Diff d = Compare(ours.audio.samples, ref);
      EXPECT_LE(d.max_abs, 1e-6) << path << " (" << ChannelModeName(mode) << ")";
      ++compared;
      stereo += mode == ChannelMode::kMean;
    }
  }
  EXPECT_GE(compared, 15);
  EXPECT_GE(stereo, 1);
}

// MP3: libsndfile decodes with mpg123 (gapless, from LAME's Xing/Info tag), ffmpeg with its own
// mp3float decoder, which also trims the encoder delay and padding from that tag. Measured on
// this corpus: identical lengths and no sample offset (no priming/encoder-delay difference; the
// equal lengths and tiny differences leave no room for one), and at most 2.1e-6 apart (float
// rounding in two synthesis filterbanks). We assert 1e-5.
TEST(AudioParityTest, Mp3MatchesFfmpegWithin1e5) {
  if (!HaveTool("ffmpeg")) GTEST_SKIP() << "ffmpeg is not installed";
  const auto& corpus = SharedCorpus();
  int compared = 0;
  double worst = 0;
  for (const auto& f : corpus.mp3) {
    if (f.kind != synth::SynthFileKind::kGood) continue;
    const std::string path = corpus.Mp3Path(f);
    DecodeResult ours = Decode(path, 0);
    ASSERT_TRUE(ours.ok()) << ours.failure.message;
    EXPECT_EQ(ours.audio.source_frames, f.num_frames) << path;
    bool ok = false;
    std::vector<float> ref = FfmpegDecode(path, ChannelMode::kFirst, &ok);
    ASSERT_TRUE(ok) << path;
    ASSERT_EQ(ours.audio.samples.size(), ref.size()) << path;
    Diff d = Compare(ours.audio.samples, ref);
    EXPECT_LE(d.max_abs, 1e-5) << path;
    worst = std::max(worst, d.max_abs);
    ++compared;
  }
  EXPECT_GE(compared, 15);
  char text[32];
  std::snprintf(text, sizeof(text), "%.3g", worst);
  RecordProperty("max_abs_diff", text);
}

// Resampling: soxr (SOXR_HQ: 20-bit precision, passband to 91.3% of Nyquist) against SoX's own
// `rate` effect (default -h: passband to 95%), both on the same source samples. The filters
// differ only near the band edge, so the outputs agree to a small relative RMS error: measured at
// most 1.1e-4 over the corpus files at 16, 22.05 and 48 kHz and tones at 8, 22.05, 44.1 and
// 48 kHz; we assert 1e-3. The length rule round(F * 32000 / R) is checked exactly, and SoX
// produces the same length.
TEST(AudioParityTest, ResampleMatchesSox) {
  if (!HaveTool("sox")) GTEST_SKIP() << "sox is not installed";
  const auto& corpus = SharedCorpus();
  TempDir tmp("sox");
  std::vector<std::string> paths;
  for (const auto& f : corpus.ogg) {
    if (f.kind == synth::SynthFileKind::kGood && f.sample_rate != 32000)
      paths.push_back(corpus.OggPath(f));
  }
  // Our own files at the rates the real datasets have.
  for (int rate : {8000, 22050, 44100, 48000}) {
    std::vector<float> x = Sine(1234.5, rate, rate * 3, 0.3);
    std::vector<float> y = Sine(rate / 5.3, rate, rate * 3, 0.2);
    for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
    std::string path = tmp.Sub("tone_" + std::to_string(rate) + ".wav");
    WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_FLOAT, rate, 1, x);
    paths.push_back(path);
  }
  int compared = 0;
  double worst = 0;
  for (const std::string& path : paths) {
    DecodeResult source = Decode(path, 0);
    ASSERT_TRUE(source.ok()) << source.failure.message;
    DecodeResult ours = Decode(path, 32000);
    ASSERT_TRUE(ours.ok()) << ours.failure.message;
    const int rate = source.audio.source_sample_rate;
    const int64_t frames = static_cast<int64_t>(source.audio.samples.size());
    const int64_t expected = (frames * 32000 * 2 + rate) / (2 * rate);
    EXPECT_EQ(static_cast<int64_t>(ours.audio.samples.size()), expected) << path;
    EXPECT_EQ(ours.audio.total_samples, expected) << path;

    std::string in = tmp.Sub("in.wav");
    WriteAudio(in, SF_FORMAT_WAV | SF_FORMAT_FLOAT, rate, 1, source.audio.samples);
    bool ok = false;
    std::vector<float> ref = BytesToF32(RunCapture(
        "sox -D -V1 " + ShellQuote(in) + " -t raw -e floating-point -b 32 -c 1 - rate 32000", &ok));
    ASSERT_TRUE(ok) << path;
    EXPECT_EQ(ref.size(), ours.audio.samples.size()) << path << " (sox length)";
    Diff d = Compare(ours.audio.samples, ref);
    EXPECT_LE(d.rel_rms, 1e-3) << path << " from " << rate << " Hz";
    worst = std::max(worst, d.rel_rms);
    ++compared;
  }
  EXPECT_GE(compared, 8);
  char text[32];
  std::snprintf(text, sizeof(text), "%.3g", worst);
  RecordProperty("max_rel_rms", text);
}

// --- Windows, seeking, lengths -----------------------------------------------------------------

// A window decode seeks and primes the resampler with a margin: it equals the same samples of
// the whole-file decode: exactly at the source rate for Ogg Vorbis (the decoder is restarted at
// the page; mpg123 restarts a few frames early and its float state differs by ~1e-7), and to
// float rounding when resampled.
TEST(AudioWindowTest, WindowsEqualWholeFileDecode) {
  const auto& corpus = SharedCorpus();
  int compared = 0;
  for (int pass = 0; pass < 2; ++pass) {
    const auto& files = pass == 0 ? corpus.ogg : corpus.mp3;
    int used = 0;
    for (const auto& f : files) {
      if (f.kind != synth::SynthFileKind::kGood || f.num_frames < 3 * f.sample_rate) continue;
      if (++used > 5) break;
      const std::string path = pass == 0 ? corpus.OggPath(f) : corpus.Mp3Path(f);
      for (int target : {0, 32000}) {
        DecodeResult whole = Decode(path, target);
        ASSERT_TRUE(whole.ok()) << whole.failure.message;
        const double seconds = double(f.num_frames) / f.sample_rate;
        for (double offset : {0.0, 0.0137, 1.0, 1.23456, seconds - 0.4}) {
          DecodeResult window = Decode(path, target, ChannelMode::kFirst, offset, 1.0);
          ASSERT_TRUE(window.ok()) << window.failure.message;
          const int rate = whole.audio.sample_rate;
          const int64_t t0 = std::llround(offset * rate);
          EXPECT_EQ(window.audio.offset, t0);
          const int64_t expect_n =
              std::min<int64_t>(rate, static_cast<int64_t>(whole.audio.samples.size()) - t0);
          ASSERT_EQ(static_cast<int64_t>(window.audio.samples.size()), expect_n)
              << path << " at " << offset;
          std::vector<float> slice(whole.audio.samples.begin() + t0,
                                   whole.audio.samples.begin() + t0 + expect_n);
          Diff d = Compare(window.audio.samples, slice);
          if (target == 0 && pass == 0) {
            EXPECT_EQ(d.max_abs, 0.0) << path << " at " << offset << " s (source rate)";
          } else {
            EXPECT_LE(d.max_abs, 1e-6) << path << " at " << offset << " s";
          }
          ++compared;
        }
      }
    }
  }
  EXPECT_GE(compared, 60);
}

// Low source rates (1-4 kHz loggers): the resampler's margin before a window is at least 1024
// source frames; 20 ms of a 1 kHz source (20 frames) left windows of white noise up to 1e-3 off
// the whole decode.
TEST(AudioWindowTest, LowRateWindowsEqualWholeFileDecode) {
  TempDir tmp;
  for (int rate : {1000, 2000, 3000, 4000}) {
    std::vector<float> noise(static_cast<size_t>(8 * rate));
    uint32_t x = 12345;
    for (float& v : noise) {
      x = x * 1664525u + 1013904223u;
      v = static_cast<float>(static_cast<int32_t>(x >> 8) - (1 << 23)) / static_cast<float>(1 << 24);
    }
    const std::string path = tmp.Sub(absl::StrCat("noise", rate, ".wav"));
    WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_FLOAT, rate, 1, noise);
    DecodeResult whole = Decode(path, 32000);
    ASSERT_TRUE(whole.ok()) << whole.failure.message;
    for (double offset : {0.5, 3.3, 6.0}) {
      DecodeResult window = Decode(path, 32000, ChannelMode::kFirst, offset, 1.0);
      ASSERT_TRUE(window.ok()) << window.failure.message;
      const int64_t t0 = window.audio.offset;
      std::vector<float> slice(whole.audio.samples.begin() + t0,
                               whole.audio.samples.begin() + t0 + static_cast<int64_t>(window.audio.samples.size()));
      EXPECT_LE(Compare(window.audio.samples, slice).max_abs, 1e-6) << rate << " Hz at " << offset << " s";
    }
  }
}

// Windows of 0.25 s every 73.1 ms over the last 1.5 s of `path` (`seconds` long), at the source
// rate, each equal to `whole`'s samples there: how many were compared (0 after a failure).
int CompareFinalWindows(const std::string& path, const DecodeResult& whole, double seconds) {
  int compared = 0;
  for (double back = 1.5; back > 0.01; back -= 0.0731) {
    DecodeResult window = Decode(path, 0, ChannelMode::kFirst, std::max(0.0, seconds - back), 0.25);
    if (!window.ok()) {
      ADD_FAILURE() << window.failure.message;
      return 0;
    }
    const int64_t t0 = window.audio.offset;
    for (size_t i = 0; i < window.audio.samples.size(); ++i) {
      if (window.audio.samples[i] != whole.audio.samples[t0 + i]) {
        ADD_FAILURE() << path << " window at frame " << t0 << ", sample " << i << ": "
                      << window.audio.samples[i] << " != " << whole.audio.samples[t0 + i];
        return 0;
      }
    }
    ++compared;
  }
  return compared;
}

// libsndfile 1.2 mis-seeks inside an Ogg Vorbis stream's final page on a fresh handle (by up to
// thousands of frames); the decoder works around it (worker/audio.cc, OggSeekLimit). Every
// window in the last 1.5 s of every file, at the source rate, must equal the whole decode.
TEST(AudioWindowTest, OggWindowsInTheFinalPageAreExact) {
  const auto& corpus = SharedCorpus();
  int compared = 0;
  for (const auto& f : corpus.ogg) {
    if (f.kind != synth::SynthFileKind::kGood) continue;
    const std::string path = corpus.OggPath(f);
    DecodeResult whole = Decode(path, 0);
    ASSERT_TRUE(whole.ok()) << whole.failure.message;
    const double seconds = double(f.num_frames) / f.sample_rate;
    compared += CompareFinalWindows(path, whole, seconds);
  }
  EXPECT_GE(compared, 200);
}

// The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, not reflected, initial 0), over the
// page with its checksum field zeroed.
uint32_t OggCrc(const unsigned char* page, size_t n) {
  uint32_t crc = 0;
  for (size_t i = 0; i < n; ++i) {
    crc ^= static_cast<uint32_t>(page[i]) << 24;
    for (int b = 0; b < 8; ++b) crc = (crc & 0x80000000u) ? (crc << 1) ^ 0x04C11DB7u : crc << 1;
  }
  return crc;
}

// An Ogg stream whose granule positions start past 0 (cut from a live stream, remuxed with its
// timestamps): libsndfile counts frames from the first granule, and the final-page limit taken
// as an absolute granule fell inside the final page, where libsndfile 1.2 mis-seeks: windows at
// the end came back as other audio (up to 1.3 off), reported fine.
TEST(AudioWindowTest, OggWindowsInTheFinalPageAreExactWhenGranulesStartPastZero) {
  const auto& corpus = SharedCorpus();
  const synth::SynthFile* good = nullptr;
  for (const auto& f : corpus.ogg) {
    if (f.kind == synth::SynthFileKind::kGood && f.num_frames > 5 * f.sample_rate) good = &f;
  }
  ASSERT_NE(good, nullptr);
  std::string bytes;
  {
    std::ifstream in(corpus.OggPath(*good), std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  // Every audio page's granule (the headers' are 0) shifted by 10,000,000, checksums redone.
  constexpr int64_t kShift = 10000000;
  int shifted = 0;
  for (size_t pos = 0; pos + 27 <= bytes.size();) {
    auto* page = reinterpret_cast<unsigned char*>(&bytes[pos]);
    ASSERT_EQ(std::memcmp(page, "OggS", 4), 0) << "at byte " << pos;
    const size_t segments = page[26];
    size_t body = 0;
    for (size_t i = 0; i < segments; ++i) body += page[27 + i];
    const size_t length = 27 + segments + body;
    int64_t granule = 0;
    for (int b = 7; b >= 0; --b) granule = (granule << 8) | page[6 + b];
    if (granule > 0) {
      granule += kShift;
      for (int b = 0; b < 8; ++b) page[6 + b] = static_cast<unsigned char>(granule >> (8 * b));
      ++shifted;
    }
    std::memset(page + 22, 0, 4);
    const uint32_t crc = OggCrc(page, length);
    for (int b = 0; b < 4; ++b) page[22 + b] = static_cast<unsigned char>(crc >> (8 * b));
    pos += length;
  }
  ASSERT_GE(shifted, 3);
  TempDir tmp;
  const std::string path = tmp.Sub("live.ogg");
  WriteBytes(path, bytes);
  DecodeResult whole = Decode(path, 0);
  ASSERT_TRUE(whole.ok()) << whole.failure.message;
  const double seconds = double(whole.audio.source_frames) / good->sample_rate;
  EXPECT_GE(CompareFinalWindows(path, whole, seconds), 20);
}

TEST(AudioWindowTest, LengthsFollowTheRoundingRule) {
  const auto& corpus = SharedCorpus();
  for (const auto& f : corpus.ogg) {
    if (f.kind != synth::SynthFileKind::kGood) continue;
    DecodeResult r = Decode(corpus.OggPath(f), 32000);
    ASSERT_TRUE(r.ok()) << r.failure.message;
    EXPECT_EQ(r.audio.source_frames, f.num_frames);
    EXPECT_EQ(r.audio.source_sample_rate, f.sample_rate);
    EXPECT_EQ(r.audio.source_channels, f.channels);
    EXPECT_EQ(r.audio.total_samples, ResampledLength(f.num_frames, f.sample_rate, 32000));
    EXPECT_EQ(static_cast<int64_t>(r.audio.samples.size()), r.audio.total_samples);
  }
  EXPECT_EQ(ResampledLength(2205, 44100, 32000), 1600);
  EXPECT_EQ(ResampledLength(3, 48000, 32000), 2);
  EXPECT_EQ(ResampledLength(1, 44100, 32000), 1);  // 0.7256 rounds up
  EXPECT_EQ(ResampledLength(100, 32000, 32000), 100);
  EXPECT_EQ(ResampledLength(int64_t{1} << 40, 44100, 32000), 797831566640);  // no overflow
  // A bogus header length (an Ogg granule near 2^62) upsampled past int64: saturated, never
  // wrapped to a negative or small count that passed as a decoded file.
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(ResampledLength(int64_t{1} << 62, 16000, 32000), kMax);
  EXPECT_EQ(ResampledLength((int64_t{1} << 62) + 1, 8000, 32000), kMax);
  EXPECT_EQ(ResampledLength(kMax, 44100, 32000), 6692696262570358862);  // fits: downsampled
}

TEST(AudioWindowTest, WindowPastTheEndIsEmptyAndOk) {
  TempDir tmp;
  std::string path = tmp.Sub("a.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 16000, 1, Sine(440, 16000, 16000));
  DecodeResult r = Decode(path, 32000, ChannelMode::kFirst, 5.0, 1.0);
  EXPECT_TRUE(r.ok()) << r.failure.message;
  EXPECT_TRUE(r.audio.samples.empty());
  r = Decode(path, 32000, ChannelMode::kFirst, 0.75, 1.0);  // clipped at the end
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.audio.samples.size(), 8000u);
}

// A length the header tells is reserved once (Expect): the samples take their own size, where
// growing by doubling held up to 3x a long recording's samples during a reallocation.
TEST(AudioWindowTest, AKnownLengthIsReservedOnce) {
  TempDir tmp;
  std::string path = tmp.Sub("long.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 16000, 1, Sine(440, 16000, 16000 * 7 + 123));
  for (int rate : {16000, 32000}) {
    DecodeResult r = Decode(path, rate, ChannelMode::kFirst, 0.0, 0.0);
    ASSERT_TRUE(r.ok()) << r.failure.message;
    EXPECT_EQ(r.audio.samples.size(), static_cast<size_t>(r.audio.total_samples)) << rate;
    EXPECT_EQ(r.audio.samples.capacity(), r.audio.samples.size()) << rate;
  }
}

// A one-hour file (8 kHz WAV, written in a second): decoding a 10 s window 50 minutes in must
// return exactly those samples, at the source rate and resampled. The signal identifies its
// position: a 101.3 Hz tone plus a component with a 4-hour period, increasing over the hour.
TEST(AudioWindowTest, OneHourFileWindowSeeks) {
  TempDir tmp;
  const int rate = 8000;
  const int64_t frames = int64_t{3600} * rate;
  auto signal = [](double t) {
    return 0.45 * std::sin(2 * M_PI * 101.3 * t) + 0.45 * std::sin(2 * M_PI * t / 14400.0);
  };
  const std::string path = tmp.Sub("hour.wav");
  {
    SF_INFO info{};
    info.samplerate = rate;
    info.channels = 1;
    info.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
    SNDFILE* f = sf_open(path.c_str(), SFM_WRITE, &info);
    ASSERT_NE(f, nullptr) << sf_strerror(nullptr);
    std::vector<short> block(1 << 20);
    for (int64_t pos = 0; pos < frames; pos += static_cast<int64_t>(block.size())) {
      int64_t n = std::min<int64_t>(static_cast<int64_t>(block.size()), frames - pos);
      for (int64_t i = 0; i < n; ++i) {
        block[i] = static_cast<short>(std::lrint(32767 * signal(double(pos + i) / rate)));
      }
      ASSERT_EQ(sf_writef_short(f, block.data(), n), n);
    }
    ASSERT_EQ(sf_close(f), 0);
  }
  const double offset = 3000.0;
  DecodeResult src = Decode(path, 0, ChannelMode::kFirst, offset, 10.0);
  ASSERT_TRUE(src.ok()) << src.failure.message;
  EXPECT_EQ(src.audio.source_frames, frames);
  ASSERT_EQ(src.audio.samples.size(), size_t{10} * rate);
  double worst = 0;
  for (size_t i = 0; i < src.audio.samples.size(); ++i) {
    double t = offset + double(i) / rate;
    worst = std::max(worst, std::fabs(src.audio.samples[i] - signal(t)));
  }
  EXPECT_LE(worst, 2.0 / 32768);  // written as lrint(32767 x), read back as q / 32768

  DecodeResult res = Decode(path, 32000, ChannelMode::kFirst, offset, 10.0);
  ASSERT_TRUE(res.ok()) << res.failure.message;
  EXPECT_EQ(res.audio.total_samples, int64_t{3600} * 32000);
  ASSERT_EQ(res.audio.samples.size(), size_t{320000});
  worst = 0;
  for (size_t i = 0; i < res.audio.samples.size(); ++i) {
    double t = offset + double(i) / 32000;
    worst = std::max(worst, std::fabs(res.audio.samples[i] - signal(t)));
  }
  EXPECT_LE(worst, 1e-3);
}

// FLAC seeks too (libFLAC's seek table / bisection): a window 9 minutes into a 10-minute file.
TEST(AudioWindowTest, FlacWindowSeeks) {
  TempDir tmp;
  const int rate = 8000;
  const int64_t frames = int64_t{600} * rate;
  std::vector<float> x(static_cast<size_t>(frames));
  for (int64_t i = 0; i < frames; ++i) {
    double t = double(i) / rate;
    x[i] = static_cast<float>(0.4 * std::sin(2 * M_PI * 97.7 * t) +
                              0.4 * std::sin(2 * M_PI * t / 2400));
  }
  const std::string path = tmp.Sub("long.flac");
  WriteAudio(path, SF_FORMAT_FLAC | SF_FORMAT_PCM_16, rate, 1, x);
  DecodeResult whole = Decode(path, 0);
  ASSERT_TRUE(whole.ok()) << whole.failure.message;
  DecodeResult window = Decode(path, 0, ChannelMode::kFirst, 540.0, 5.0);
  ASSERT_TRUE(window.ok()) << window.failure.message;
  ASSERT_EQ(window.audio.samples.size(), size_t{5} * rate);
  for (size_t i = 0; i < window.audio.samples.size(); ++i) {
    ASSERT_EQ(window.audio.samples[i], whole.audio.samples[540 * rate + i]) << i;
  }
}

// --- Channels and rates ------------------------------------------------------------------------

TEST(AudioChannelsTest, FirstChannelAndMean) {
  TempDir tmp;
  const int rate = 32000;
  std::vector<float> left = Sine(440, rate, rate, 0.5);
  std::vector<float> right = Sine(1000, rate, rate, 0.3);
  std::vector<float> stereo(left.size() * 2);
  for (size_t i = 0; i < left.size(); ++i) {
    stereo[2 * i] = left[i];
    stereo[2 * i + 1] = right[i];
  }
  const std::string path = tmp.Sub("stereo.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_FLOAT, rate, 2, stereo);
  DecodeResult first = Decode(path, 32000, ChannelMode::kFirst);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first.audio.source_channels, 2);
  EXPECT_EQ(first.audio.samples, left);
  DecodeResult mean = Decode(path, 32000, ChannelMode::kMean);
  ASSERT_TRUE(mean.ok());
  ASSERT_EQ(mean.audio.samples.size(), left.size());
  for (size_t i = 0; i < left.size(); ++i) {
    EXPECT_NEAR(mean.audio.samples[i], 0.5f * (left[i] + right[i]), 1e-7);
  }
}

// 8, 16, 22.05, 44.1 and 48 kHz files of the same 1 kHz tone all resample to that tone at 32 kHz.
TEST(AudioRatesTest, EveryRateResamplesToTheSameTone) {
  TempDir tmp;
  for (int rate : {8000, 16000, 22050, 44100, 48000}) {
    const std::string path = tmp.Sub("tone" + std::to_string(rate) + ".wav");
    WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_FLOAT, rate, 1, Sine(1000, rate, 2 * rate));
    DecodeResult r = Decode(path, 32000);
    ASSERT_TRUE(r.ok()) << r.failure.message;
    ASSERT_EQ(r.audio.samples.size(), 64000u) << rate;
    std::vector<float> expected = Sine(1000, 32000, 64000);
    // Away from the edges (the signal starts and stops abruptly there).
    Diff d = Compare(r.audio.samples, expected, 1600, 64000 - 1600);
    EXPECT_LE(d.max_abs, 1e-4) << rate << " Hz";
  }
}

TEST(AudioRatesTest, ClipOf50Milliseconds) {
  TempDir tmp;
  const std::string path = tmp.Sub("short.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 44100, 1, Sine(2000, 44100, 2205));
  DecodeResult r = Decode(path, 32000);
  ASSERT_TRUE(r.ok()) << r.failure.message;
  EXPECT_EQ(r.audio.source_frames, 2205);
  EXPECT_EQ(r.audio.samples.size(), 1600u);
}

// --- MP3 without a Xing/Info tag -------------------------------------------------------------

// Deterministic white noise in [-0.5, 0.5).
std::vector<float> Noise(int64_t n, uint32_t seed) {
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) {
    seed = seed * 1664525u + 1013904223u;
    v = static_cast<float>(seed >> 8) / float(1 << 24) - 0.5f;
  }
  return x;
}

// libsndfile's frame count, as sf_open reports it (an estimate for these files).
int64_t SndfileFrames(const std::string& path) {
  SF_INFO info{};
  SNDFILE* f = sf_open(path.c_str(), SFM_READ, &info);
  if (f == nullptr) return -1;
  sf_close(f);
  return info.frames;
}

// VBR mp3 without a Xing/Info tag (`-write_xing 0`): libsndfile estimates the frame count from
// the file size and the first frame's bitrate. For 30 s of noise at -q:a 4 the estimate is far
// too low (the decoder used to stop there: "30 s" decoded as 9 s); for 2 s of silence then 10 s
// of noise at -q:a 0 it is far too high (the decoder used to call the file truncated). Both must
// decode to the end of the stream: as many samples as ffmpeg decodes from the same mp3, within
// one mp3 frame (1152 samples: the decoders may differ by the decoder delay/padding they trim
// without a tag), and no problem reported.
// A VBRI tag (Fraunhofer's encoders) was taken for a stated length, as a Xing tag with a frame
// count is; but libmpg123 does not read VBRI, so libsndfile's count was the bitrate estimate, and
// the decode stopped there: 25 of 30 s lost, without a word. Such a file decodes as a stream now.
TEST(AudioMp3Test, AVbriTagIsNoStatedLength) {
  if (!HaveTool("ffmpeg")) GTEST_SKIP() << "ffmpeg is not installed (needed to encode the mp3)";
  TempDir tmp;
  const int rate = 44100;
  const std::string wav = tmp.Sub("low.wav");
  const std::string plain = tmp.Sub("plain.mp3");
  WriteAudio(wav, SF_FORMAT_WAV | SF_FORMAT_PCM_16, rate, 1, Noise(int64_t{30} * rate, 1));
  bool ok = false;
  RunCapture("ffmpeg -nostdin -v error -y -i " + ShellQuote(wav) + " -c:a libmp3lame -q:a 4 -write_xing 0 " +
                 ShellQuote(plain),
             &ok);
  ASSERT_TRUE(ok) << "ffmpeg could not encode " << plain;
  std::string bytes;
  {
    std::ifstream in(plain, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  size_t pos = 0;
  if (bytes.compare(0, 3, "ID3") == 0 && bytes.size() > 10) {  // ffmpeg's ID3v2 tag first
    const auto b = [&](size_t i) { return static_cast<size_t>(static_cast<unsigned char>(bytes[i]) & 0x7F); };
    pos = 10 + (b(6) << 21 | b(7) << 14 | b(8) << 7 | b(9));
  }
  while (pos + 64 < bytes.size() &&
         !(static_cast<unsigned char>(bytes[pos]) == 0xFF && (static_cast<unsigned char>(bytes[pos + 1]) & 0xE0) == 0xE0)) {
    ++pos;
  }
  ASSERT_LT(pos + 64, bytes.size()) << "no frame header in " << plain;
  // "VBRI", version 1, delay, quality, bytes, frames: 32 bytes after the first frame's header.
  const int64_t frames = int64_t{30} * rate / 1152;
  std::string vbri("VBRI\x00\x01\x00\x00\x00\x4b", 10);
  for (int64_t v : {static_cast<int64_t>(bytes.size()), frames}) {
    for (int shift = 24; shift >= 0; shift -= 8) vbri.push_back(static_cast<char>((v >> shift) & 0xFF));
  }
  bytes.replace(pos + 4 + 32, vbri.size(), vbri);
  const std::string tagged = tmp.Sub("vbri.mp3");
  std::ofstream(tagged, std::ios::binary) << bytes;
  // The scenario holds: libsndfile's count is the estimate, far short of the 30 s.
  EXPECT_LT(SndfileFrames(tagged), int64_t{25} * rate) << tagged;
  DecodeResult ours = Decode(tagged, 0);
  ASSERT_TRUE(ours.ok()) << AudioProblemName(ours.failure.problem) << ": " << ours.failure.message;
  const int64_t got = static_cast<int64_t>(ours.audio.samples.size());
  EXPECT_GE(got, int64_t{30} * rate - 2 * 1152) << tagged;
  EXPECT_LE(got, int64_t{30} * rate + 2 * 1152) << tagged;
  auto probe = ProbeAudio(tagged, 32000);
  ASSERT_TRUE(probe.ok());
  EXPECT_EQ(probe->audio.total_samples, -1) << "a length the header cannot tell: " << tagged;
}

TEST(AudioMp3Test, WithoutXingTagDecodesToTheEndOfTheStream) {
  if (!HaveTool("ffmpeg")) GTEST_SKIP() << "ffmpeg is not installed (needed to encode the mp3s)";
  TempDir tmp;
  const int rate = 44100;
  std::vector<float> low = Noise(int64_t{30} * rate, 1);
  std::vector<float> high(static_cast<size_t>(12 * rate), 0.0f);
  std::vector<float> tail = Noise(int64_t{10} * rate, 2);
  std::copy(tail.begin(), tail.end(), high.begin() + 2 * rate);
  struct Case {
    std::string name;
    const std::vector<float>* signal;
    std::string quality;
    bool estimate_low;
  };
  for (const Case& c : {Case{"low", &low, "4", true}, Case{"high", &high, "0", false}}) {
    const std::string wav = tmp.Sub(c.name + ".wav");
    const std::string mp3 = tmp.Sub(c.name + ".mp3");
    WriteAudio(wav, SF_FORMAT_WAV | SF_FORMAT_PCM_16, rate, 1, *c.signal);
    bool ok = false;
    RunCapture("ffmpeg -nostdin -v error -y -i " + ShellQuote(wav) +
                   " -c:a libmp3lame -q:a " + c.quality + " -write_xing 0 " + ShellQuote(mp3),
               &ok);
    ASSERT_TRUE(ok) << "ffmpeg could not encode " << mp3;
    std::vector<float> ref = FfmpegDecode(mp3, ChannelMode::kFirst, &ok);
    ASSERT_TRUE(ok) << mp3;
    const int64_t want = static_cast<int64_t>(ref.size());
    // The scenario holds: libsndfile's estimate is off by far more than a frame, either way.
    const int64_t estimate = SndfileFrames(mp3);
    if (c.estimate_low) {
      EXPECT_LT(estimate, want - 5 * rate) << mp3;
    } else {
      EXPECT_GT(estimate, want + 5 * rate) << mp3;
    }

    DecodeResult ours = Decode(mp3, 0);
    EXPECT_TRUE(ours.ok()) << AudioProblemName(ours.failure.problem) << ": "
                           << ours.failure.message;
    const int64_t got = static_cast<int64_t>(ours.audio.samples.size());
    EXPECT_LE(std::abs(got - want), 1152) << mp3 << ": ours " << got << ", ffmpeg " << want;
    EXPECT_EQ(ours.audio.source_frames, got) << mp3;
    EXPECT_EQ(ours.audio.total_samples, got) << mp3;
    // The header cannot tell the length: the probe says unknown.
    auto probe = ProbeAudio(mp3, 32000);
    ASSERT_TRUE(probe.ok());
    EXPECT_TRUE(probe->ok()) << probe->failure.message;
    EXPECT_EQ(probe->audio.total_samples, -1) << mp3;
    // At 32 kHz: the rounding rule on the frames decoded.
    DecodeResult at32 = Decode(mp3, 32000);
    EXPECT_TRUE(at32.ok()) << at32.failure.message;
    EXPECT_EQ(static_cast<int64_t>(at32.audio.samples.size()), ResampledLength(got, rate, 32000));
    // A window beyond the estimate (the low case) and near the end decodes and equals the
    // whole-file decode there.
    const double offset = static_cast<double>(got) / rate - 1.5;
    DecodeResult window = Decode(mp3, 32000, ChannelMode::kFirst, offset, 1.0);
    EXPECT_TRUE(window.ok()) << window.failure.message;
    ASSERT_EQ(window.audio.samples.size(), 32000u) << mp3;
    const int64_t t0 = std::llround(offset * 32000);
    std::vector<float> same(at32.audio.samples.begin() + t0,
                            at32.audio.samples.begin() + t0 + 32000);
    EXPECT_LE(Compare(window.audio.samples, same).max_abs, 1e-6) << mp3;
    // A window past the end is empty, not truncated.
    DecodeResult past = Decode(mp3, 32000, ChannelMode::kFirst, 60.0, 1.0);
    EXPECT_TRUE(past.ok()) << past.failure.message;
    EXPECT_TRUE(past.audio.samples.empty());
  }
}

// An ID3v2 tag of hundreds of KB (cover art) before the audio: an mp3 without a length tag was
// called truncated (libsndfile, reading it as a stream, refused a header allocation of that size),
// and one with a Xing tag was too when its first frame lay past the 256 KB looked at. Both decode
// to the samples of the same file without the tag.
TEST(AudioMp3Test, LargeId3TagsDecodeAsWithout) {
  if (!HaveTool("ffmpeg")) GTEST_SKIP() << "ffmpeg is not installed (needed to encode the mp3s)";
  TempDir tmp;
  const int rate = 44100;
  const std::string wav = tmp.Sub("noise.wav");
  WriteAudio(wav, SF_FORMAT_WAV | SF_FORMAT_PCM_16, rate, 1, Noise(int64_t{3} * rate, 5));
  for (const std::string xing : {"0", "1"}) {
    const std::string mp3 = tmp.Sub("plain" + xing + ".mp3");
    bool ok = false;
    RunCapture("ffmpeg -nostdin -v error -y -i " + ShellQuote(wav) + " -c:a libmp3lame -q:a 4 -id3v2_version 0 -write_xing " +
                   xing + " " + ShellQuote(mp3),
               &ok);
    ASSERT_TRUE(ok) << "ffmpeg could not encode " << mp3;
    std::string bytes;
    {
      std::ifstream in(mp3, std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    // ID3v2.3, no flags, a 300,000-byte body of padding (zeros), its size syncsafe.
    const uint32_t body = 300000;
    std::string tag = {'I', 'D', '3', 3, 0, 0, static_cast<char>((body >> 21) & 0x7F), static_cast<char>((body >> 14) & 0x7F),
                       static_cast<char>((body >> 7) & 0x7F), static_cast<char>(body & 0x7F)};
    tag.append(body, '\0');
    const std::string tagged = tmp.Sub("tagged" + xing + ".mp3");
    std::ofstream(tagged, std::ios::binary) << tag << bytes;
    DecodeResult want = Decode(mp3, 32000);
    ASSERT_TRUE(want.ok()) << want.failure.message;
    DecodeResult got = Decode(tagged, 32000);
    ASSERT_TRUE(got.ok()) << xing << ": " << AudioProblemName(got.failure.problem) << ": " << got.failure.message;
    EXPECT_EQ(got.audio.samples, want.audio.samples) << xing;
  }
}

// --- Problems ----------------------------------------------------------------------------------

void ExpectProblem(const std::string& path, AudioProblem problem,
                   const std::string& fragment = "") {
  DecodeResult r = Decode(path);
  EXPECT_EQ(r.failure.problem, problem)
      << path << ": got " << AudioProblemName(r.failure.problem) << ": " << r.failure.message;
  if (problem == AudioProblem::kNone) return;
  EXPECT_NE(r.failure.message.find(path), std::string::npos) << r.failure.message;
  if (!fragment.empty()) {
    EXPECT_NE(r.failure.message.find(fragment), std::string::npos) << r.failure.message;
  }
  auto probe = ProbeAudio(path, 32000);
  ASSERT_TRUE(probe.ok());
  if (problem == AudioProblem::kMissing || problem == AudioProblem::kEmpty ||
      problem == AudioProblem::kNotAudio) {
    EXPECT_EQ(probe->failure.problem, problem) << path;
  }
}

TEST(AudioProblemTest, MissingEmptyAndNotAudio) {
  TempDir tmp;
  ExpectProblem(tmp.Sub("nope.ogg"), AudioProblem::kMissing, "no such file");
  WriteBytes(tmp.Sub("empty.ogg"), "");
  ExpectProblem(tmp.Sub("empty.ogg"), AudioProblem::kEmpty, "0 bytes");
  WriteBytes(tmp.Sub("text.ogg"), "this is not an ogg file\nreally\n");
  ExpectProblem(tmp.Sub("text.ogg"), AudioProblem::kNotAudio, "not audio");
  WriteBytes(tmp.Sub("text.mp3"), "ID");  // shorter than any signature
  ExpectProblem(tmp.Sub("text.mp3"), AudioProblem::kNotAudio);
  // An HTML page saved under an .mp3 name (a failed download): libsndfile says it "does not
  // exist", which it does; the message leaves that out.
  WriteBytes(tmp.Sub("page.mp3"), "<html><body>404 Not Found</body></html>\n");
  ExpectProblem(tmp.Sub("page.mp3"), AudioProblem::kNotAudio, "not audio (");
  EXPECT_EQ(Decode(tmp.Sub("page.mp3")).failure.message.find("does not exist"), std::string::npos)
      << Decode(tmp.Sub("page.mp3")).failure.message;
  std::filesystem::create_directories(tmp.Sub("dir.ogg"));
  ExpectProblem(tmp.Sub("dir.ogg"), AudioProblem::kNotAudio, "directory");
}

// A header whose sample rate is implausible (a corrupt fmt chunk) is refused as not_audio by
// name and rate, not resampled: 4,800 frames announced at 1 Hz would be 153.6e6 samples at
// 32 kHz (the reviewer's 240,000-frame file, 7.68e9: std::bad_alloc).
TEST(AudioProblemTest, ImplausibleSampleRateIsRefused) {
  TempDir tmp;
  for (uint32_t rate : {1u, 3u, 999u, 768001u}) {
    const std::string path = tmp.Sub("rate" + std::to_string(rate) + ".wav");
    testing::WriteWavWithHeaderRate(path, 4800, rate);
    DecodeResult r = Decode(path);
    EXPECT_EQ(r.failure.problem, AudioProblem::kNotAudio)
        << path << ": " << AudioProblemName(r.failure.problem) << " " << r.audio.samples.size();
    EXPECT_NE(r.failure.message.find(path), std::string::npos) << r.failure.message;
    EXPECT_NE(r.failure.message.find("sample rate " + std::to_string(rate) + " Hz"),
              std::string::npos)
        << r.failure.message;
    EXPECT_TRUE(r.audio.samples.empty());
    auto probe = ProbeAudio(path, 32000);
    ASSERT_TRUE(probe.ok());
    EXPECT_EQ(probe->failure.problem, AudioProblem::kNotAudio) << probe->failure.message;
  }
  // The ends of the accepted range decode.
  for (uint32_t rate : {1000u, 768000u}) {
    const std::string path = tmp.Sub("edge" + std::to_string(rate) + ".wav");
    testing::WriteWavWithHeaderRate(path, 4800, rate);
    DecodeResult r = Decode(path);
    EXPECT_TRUE(r.ok()) << r.failure.message;
    EXPECT_EQ(static_cast<int64_t>(r.audio.samples.size()), ResampledLength(4800, rate, 32000));
  }
}

// An exception inside a decode (std::bad_alloc from a sink, the resampler, libsndfile's buffers)
// becomes the file's problem, naming the path, instead of escaping into a decode thread (where
// it terminated the process).
TEST(AudioProblemTest, ExceptionInADecodeIsTheFilesProblem) {
  TempDir tmp;
  const std::string path = tmp.Sub("tone.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 16000, 1, Sine(440, 16000, 16000));
  class ThrowingSink : public SampleSink {
   public:
    bool Consume(const float*, int64_t) override { throw std::bad_alloc(); }
  } sink;
  DecodeOptions options;
  absl::StatusOr<DecodeResult> r = DecodeAudioTo(path, options, &sink);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->failure.problem, AudioProblem::kMissing);
  EXPECT_NE(r->failure.message.find(path), std::string::npos) << r->failure.message;
  EXPECT_NE(r->failure.message.find("out of memory"), std::string::npos) << r->failure.message;
  EXPECT_TRUE(r->failure.retry);  // memory may be there for the next read
}

// kMissing says whether the cause may pass (DecodeFailure::retry, read again by the loader): a
// file that is not there does not come back, a process out of file descriptors (EMFILE, as
// under a heavy loader or an NFS server's hiccup: a real failed open here) may read it next time.
TEST(AudioProblemTest, AFailedOpenMayPassAMissingFileDoesNot) {
  TempDir tmp;
  DecodeResult absent = Decode(tmp.Sub("nope.ogg"));
  EXPECT_EQ(absent.failure.problem, AudioProblem::kMissing);
  EXPECT_TRUE(absent.failure.unreadable);
  EXPECT_FALSE(absent.failure.retry) << absent.failure.message;
  const std::string path = tmp.Sub("tone.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 16000, 1, Sine(440, 16000, 1600));
  DecodeResult ok = Decode(path);
  ASSERT_TRUE(ok.ok()) << ok.failure.message;
  EXPECT_FALSE(ok.failure.retry);
  // No descriptor left: the soft limit at the lowest one free.
  const int lowest_free = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(lowest_free, 0);
  ::close(lowest_free);
  struct rlimit saved;
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  struct rlimit tight = saved;
  tight.rlim_cur = static_cast<rlim_t>(lowest_free);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &tight), 0);
  DecodeResult starved = Decode(path);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &saved), 0);
  EXPECT_EQ(starved.failure.problem, AudioProblem::kMissing) << starved.failure.message;
  EXPECT_TRUE(starved.failure.unreadable);
  EXPECT_TRUE(starved.failure.retry) << starved.failure.message;
  EXPECT_NE(starved.failure.message.find("Too many open files"), std::string::npos) << starved.failure.message;
  EXPECT_TRUE(Decode(path).ok());  // and it reads again once descriptors are back
}

// A decode that would deliver more than 2^29 samples is refused before any is decoded: 700,000
// frames at 1 kHz resampled to 768 kHz would be 5.376e8 > 2^29 = 5.369e8.
TEST(AudioProblemTest, DecodeBeyondTheLengthLimitIsRefused) {
  TempDir tmp;
  const std::string path = tmp.Sub("long.wav");
  testing::WriteWavWithHeaderRate(path, 700000, 1000);
  DecodeResult r = Decode(path, 768000);
  EXPECT_EQ(r.failure.problem, AudioProblem::kNotAudio) << r.failure.message;
  EXPECT_NE(r.failure.message.find(path), std::string::npos) << r.failure.message;
  EXPECT_NE(r.failure.message.find("limit of 536870912"), std::string::npos) << r.failure.message;
  EXPECT_TRUE(r.audio.samples.empty());
  // A window of it is fine.
  DecodeResult w = Decode(path, 768000, ChannelMode::kFirst, 10.0, 1.0);
  EXPECT_TRUE(w.ok()) << w.failure.message;
  EXPECT_EQ(w.audio.samples.size(), 768000u);
}

TEST(AudioProblemTest, TruncatedFilesOfEveryFormat) {
  const auto& corpus = SharedCorpus();
  TempDir tmp;
  const synth::SynthFile* ogg = nullptr;
  const synth::SynthFile* mp3 = nullptr;
  for (const auto& f : corpus.ogg) {
    if (f.kind == synth::SynthFileKind::kGood && f.num_frames > 3 * f.sample_rate) ogg = &f;
  }
  for (const auto& f : corpus.mp3) {
    if (f.kind == synth::SynthFileKind::kGood && f.num_frames > 3 * f.sample_rate) mp3 = &f;
  }
  ASSERT_NE(ogg, nullptr);
  ASSERT_NE(mp3, nullptr);
  for (int percent : {50, 95}) {
    std::string cut = tmp.Sub("cut" + std::to_string(percent) + ".ogg");
    const double fraction = percent / 100.0;
    TruncateCopy(corpus.OggPath(*ogg), cut, fraction);
    ExpectProblem(cut, AudioProblem::kTruncated, "without an end");
    cut = tmp.Sub("cut" + std::to_string(percent) + ".mp3");
    TruncateCopy(corpus.Mp3Path(*mp3), cut, fraction);
    ExpectProblem(cut, AudioProblem::kTruncated, "frames the header announces");
  }
  // A stub: the first 100 bytes (the header is cut) cannot even be opened.
  std::string stub = tmp.Sub("stub.ogg");
  TruncateCopy(corpus.OggPath(*ogg), stub, 100.0 / testing::ReadBytes(corpus.OggPath(*ogg)).size());
  ExpectProblem(stub, AudioProblem::kTruncated, "Ogg file of 100 bytes");
  // A whole Ogg stream with bytes after it (an ID3v1 tag a tagger appended; one stray byte):
  // libsndfile finds no length, but the end-of-stream page is there: it decodes whole, as the
  // file without them (it was "truncated", and prepare cached that).
  DecodeResult clean = Decode(corpus.OggPath(*ogg), 32000);
  ASSERT_TRUE(clean.ok()) << clean.failure.message;
  for (const std::string& extra : {std::string("TAG") + std::string(125, ' '), std::string(1, '\0')}) {
    const std::string tagged = tmp.Sub("tagged.ogg");
    testing::WriteBytes(tagged, testing::ReadBytes(corpus.OggPath(*ogg)) + extra);
    DecodeResult decoded = Decode(tagged, 32000);
    ASSERT_TRUE(decoded.ok()) << extra.size() << " bytes after: " << decoded.failure.message;
    EXPECT_EQ(decoded.audio.samples, clean.audio.samples) << extra.size() << " bytes after";
  }
  // FLAC: libFLAC loses sync at the cut (a libsndfile error mid-stream). WAV: a data chunk
  // longer than the file (libsndfile opens it and shortens the frame count; its log says so).
  std::vector<float> tone = Sine(300, 16000, 16000 * 3);
  for (const std::string name : {"a.flac", "a.wav"}) {
    const std::string full = tmp.Sub(name);
    WriteAudio(full, (name == "a.flac" ? SF_FORMAT_FLAC : SF_FORMAT_WAV) | SF_FORMAT_PCM_16, 16000,
               1, tone);
    ExpectProblem(full, AudioProblem::kNone);
    const std::string cut = tmp.Sub("cut_" + name);
    TruncateCopy(full, cut, 0.5);
    ExpectProblem(cut, AudioProblem::kTruncated,
                  name == "a.flac" ? "flac decoder lost sync" : "data chunk is cut short");
  }
  // A WAV written to a pipe says "length unknown" for its RIFF and data sizes: 0xFFFFFFFF
  // (`ffmpeg ... -f wav -`), 0x7FFFF000 and 0x7FFFF024 (sox): whole, not cut short (it was called
  // truncated, and every clip of it skipped).
  for (const auto& [riff_size, data_size] : std::vector<std::pair<std::string, std::string>>{
           {"\xff\xff\xff\xff", "\xff\xff\xff\xff"},
           {std::string("\x24\xf0\xff\x7f", 4), std::string("\x00\xf0\xff\x7f", 4)}}) {
    const std::string whole = tmp.Sub("a.wav");
    std::string bytes;
    {
      std::ifstream in(whole, std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    const size_t data = bytes.find("data");
    ASSERT_NE(data, std::string::npos);
    ASSERT_EQ(riff_size.size(), 4u);
    ASSERT_EQ(data_size.size(), 4u);
    bytes.replace(4, 4, riff_size);
    bytes.replace(data + 4, 4, data_size);
    const std::string piped = tmp.Sub("piped.wav");
    std::ofstream(piped, std::ios::binary) << bytes;
    ExpectProblem(piped, AudioProblem::kNone);
    DecodeResult decoded = Decode(piped, 16000, ChannelMode::kFirst, 0.0, 0.0);
    ASSERT_TRUE(decoded.ok()) << decoded.failure.message;
    EXPECT_EQ(decoded.audio.samples.size(), tone.size());
  }
  // AIFF and AU cut in half (libsndfile shortens their frame count and logs nothing), and a WAV
  // whose chunks before "data" fill libsndfile's 2 KB log (the line that told it cut was lost):
  // truncated, from the header's declared size. They decoded "fine" at half their length.
  for (const auto& [name, format] : std::vector<std::pair<std::string, int>>{
           {"a.aiff", SF_FORMAT_AIFF | SF_FORMAT_PCM_16}, {"a.au", SF_FORMAT_AU | SF_FORMAT_PCM_16}}) {
    const std::string full = tmp.Sub(name);
    WriteAudio(full, format, 16000, 1, tone);
    ExpectProblem(full, AudioProblem::kNone);
    const std::string cut_copy = tmp.Sub("cut_" + name);
    TruncateCopy(full, cut_copy, 0.5);
    ExpectProblem(cut_copy, AudioProblem::kTruncated, name == "a.au" ? "the data of the AU header is cut short"
                                                                     : "the SSND chunk is cut short");
  }
  {
    // An AIFF written to a pipe says "length unknown" in its SSND size (sox: 0x7F000008): whole.
    std::string bytes = testing::ReadBytes(tmp.Sub("a.aiff"));
    const size_t ssnd = bytes.find("SSND");
    ASSERT_NE(ssnd, std::string::npos);
    bytes.replace(ssnd + 4, 4, std::string("\x7f\x00\x00\x08", 4));
    const std::string piped = tmp.Sub("piped.aiff");
    testing::WriteBytes(piped, bytes);
    ExpectProblem(piped, AudioProblem::kNone);
  }
  {
    std::string bytes = testing::ReadBytes(tmp.Sub("a.wav"));
    const size_t data = bytes.find("data");
    ASSERT_NE(data, std::string::npos);
    std::string junk;
    for (int i = 0; i < 100; ++i) junk += std::string("JUNK\x08\x00\x00\x00", 8) + "metadata";
    bytes.insert(data, junk);
    const uint32_t riff = static_cast<uint32_t>(bytes.size() - 8);
    for (int b = 0; b < 4; ++b) bytes[4 + b] = static_cast<char>(riff >> (8 * b));
    const std::string many = tmp.Sub("many_chunks.wav");
    testing::WriteBytes(many, bytes);
    ExpectProblem(many, AudioProblem::kNone);
    const std::string cut_many = tmp.Sub("cut_many_chunks.wav");
    TruncateCopy(many, cut_many, 0.6);
    ExpectProblem(cut_many, AudioProblem::kTruncated, "the data chunk is cut short");
  }
  // A window before the cut still decodes: only what is decoded can be judged on the fly.
  std::string cut = tmp.Sub("cut50.mp3");
  DecodeResult early = Decode(cut, 32000, ChannelMode::kFirst, 0.0, 0.5);
  EXPECT_TRUE(early.ok()) << early.failure.message;
}

TEST(AudioProblemTest, SilentFilesAreClassifiedAndNeverNaN) {
  TempDir tmp;
  const std::string wav = tmp.Sub("zeros.wav");
  WriteAudio(wav, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 22050, 2,
             std::vector<float>(22050 * 2 * 3, 0.0f));
  ExpectProblem(wav, AudioProblem::kSilent, "all 96000 samples are zero");
  const std::string ogg = tmp.Sub("zeros.ogg");
  WriteAudio(ogg, SF_FORMAT_OGG | SF_FORMAT_VORBIS, 32000, 1, std::vector<float>(32000 * 2, 0.0f));
  ExpectProblem(ogg, AudioProblem::kSilent);
  DecodeResult r = Decode(wav);
  for (float x : r.audio.samples) ASSERT_EQ(x, 0.0f);
}

TEST(AudioProblemTest, ZeroFramesAndNonFinite) {
  TempDir tmp;
  const std::string none = tmp.Sub("none.wav");
  WriteAudio(none, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, {});
  ExpectProblem(none, AudioProblem::kTooShort, "0 frames");
  // One frame at 96 kHz is no sample at 32 kHz (it used to decode "fine" to nothing).
  const std::string one = tmp.Sub("one.wav");
  WriteAudio(one, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 96000, 1, {0.5f});
  ExpectProblem(one, AudioProblem::kTooShort, "1 frames at 96000 Hz give no sample at 32000 Hz");
  const std::string nan = tmp.Sub("nan.wav");
  std::vector<float> x = Sine(440, 32000, 32000);
  x[12345] = std::nanf("");
  WriteAudio(nan, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 32000, 1, x);
  ExpectProblem(nan, AudioProblem::kNonFinite);
  // A finite but absurd sample (1e30: squared in the front end, an infinity) is damage too; a
  // float file stored at integer scale (32767) is audio.
  const std::string huge = tmp.Sub("huge.wav");
  x[12345] = 1e30f;
  WriteAudio(huge, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 32000, 1, x);
  ExpectProblem(huge, AudioProblem::kNonFinite, "above 1e8 in magnitude");
  const std::string loud = tmp.Sub("loud.wav");  // a float file at integer scale
  x[12345] = 32767.0f;
  WriteAudio(loud, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 32000, 1, x);
  ExpectProblem(loud, AudioProblem::kNone);
}

// DecodeOptions::max_samples bounds what a decode delivers (kMaxDecodeSamples by default): a
// header announcing more is refused before any decoding (over_limit); a consumer that streams
// (aviary predict) raises it.
TEST(AudioProblemTest, MaxSamplesBoundsADecodeFromTheHeader) {
  TempDir tmp;
  const std::string wav = tmp.Sub("second.wav");
  WriteAudio(wav, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 32000, 1, Sine(440, 32000, 32000));
  DecodeOptions options;
  options.max_samples = 31999;
  auto refused = DecodeAudio(wav, options);
  ASSERT_TRUE(refused.ok()) << refused.status();
  EXPECT_EQ(refused->failure.problem, AudioProblem::kNotAudio);
  EXPECT_TRUE(refused->failure.over_limit);
  EXPECT_NE(refused->failure.message.find("more than the decoder's limit of 31999"), std::string::npos)
      << refused->failure.message;
  EXPECT_TRUE(refused->audio.samples.empty());
  options.max_samples = 32000;
  auto decoded = DecodeAudio(wav, options);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(decoded->ok()) << decoded->failure.message;
  EXPECT_EQ(decoded->audio.samples.size(), 32000u);
  options.max_samples = 0;
  EXPECT_EQ(DecodeAudio(wav, options).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeOptions().max_samples, kMaxDecodeSamples);
}

// The synthetic corpus writer's broken files are classified as what it wrote.
TEST(AudioProblemTest, SynthBrokenFilesClassifiedAsWritten) {
  const auto& corpus = SharedCorpus();
  std::map<std::string, int> seen;
  for (int pass = 0; pass < 2; ++pass) {
    for (const auto& f : pass == 0 ? corpus.ogg : corpus.mp3) {
      const std::string path = pass == 0 ? corpus.OggPath(f) : corpus.Mp3Path(f);
      DecodeResult r = Decode(path);
      const std::string want =
          f.kind == synth::SynthFileKind::kGood ? "ok" : synth::SynthFileKindName(f.kind);
      EXPECT_EQ(AudioProblemName(r.failure.problem), want) << path << ": " << r.failure.message;
      ++seen[want];
    }
  }
  for (const char* kind : {"empty", "truncated", "silent", "not_audio"}) {
    EXPECT_GE(seen[kind], 2) << kind;
  }
}

TEST(AudioProblemTest, NamesRoundTrip) {
  for (int i = 0; i < kNumAudioProblems; ++i) {
    auto problem = static_cast<AudioProblem>(i);
    auto parsed = ParseAudioProblem(AudioProblemName(problem));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, problem);
  }
  EXPECT_FALSE(ParseAudioProblem("corrupt").ok());
  EXPECT_EQ(*ParseChannelMode("mean"), ChannelMode::kMean);
  EXPECT_FALSE(ParseChannelMode("left").ok());
}

// --- Resample and options ----------------------------------------------------------------------

TEST(ResampleTest, LengthsAndIdentity) {
  std::vector<float> x = Sine(300, 44100, 44100 + 17);
  auto same = Resample(x, 44100, 44100);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(*same, x);
  for (int n : {0, 1, 2, 3, 441, 1000, 44117}) {
    std::vector<float> in(x.begin(), x.begin() + n);
    auto out = Resample(in, 44100, 32000);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(static_cast<int64_t>(out->size()), ResampledLength(n, 44100, 32000)) << n;
  }
  EXPECT_FALSE(Resample(x, 0, 32000).ok());
  EXPECT_FALSE(Resample(x, 44100, -1).ok());
}

// Resample() and a resampling decode run the same streaming resampler: identical samples.
TEST(ResampleTest, EqualsResamplingDecode) {
  TempDir tmp;
  const std::string path = tmp.Sub("a.wav");
  std::vector<float> x = Sine(700, 22050, 22050 * 4, 0.4);
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 22050, 1, x);
  auto ours = Resample(x, 22050, 32000);
  ASSERT_TRUE(ours.ok());
  DecodeResult decoded = Decode(path, 32000);
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(*ours, decoded.audio.samples);
}

TEST(DecodeOptionsTest, BadOptionsAreErrors) {
  TempDir tmp;
  const std::string path = tmp.Sub("a.wav");
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 16000, 1, Sine(440, 16000, 1600));
  DecodeOptions options;
  options.target_sample_rate = -5;
  EXPECT_EQ(DecodeAudio(path, options).status().code(), absl::StatusCode::kInvalidArgument);
  options = DecodeOptions();
  options.offset_s = -1;
  EXPECT_EQ(DecodeAudio(path, options).status().code(), absl::StatusCode::kInvalidArgument);
  options.offset_s = std::nan("");
  EXPECT_EQ(DecodeAudio(path, options).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ProbeAudio(path, -1).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace aviary::worker
