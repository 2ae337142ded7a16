// Helpers shared by the worker data-plane tests: temporary directories, audio files written
// with libsndfile, a small synthetic corpus, and running reference tools (ffmpeg, sox).
#ifndef AVIARY_TESTS_WORKER_AUDIO_TEST_UTIL_H_
#define AVIARY_TESTS_WORKER_AUDIO_TEST_UTIL_H_

#include <fcntl.h>
#include <sndfile.h>
#include <stdlib.h>
#include <sys/file.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "client/synth.h"
#include "gtest/gtest.h"

namespace aviary::worker::testing {

namespace fs = std::filesystem;

// A fresh directory under the test temp dir, removed when the object goes away.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "worker_test") {
    std::string pattern = (fs::path(::testing::TempDir()) / (prefix + "_XXXXXX")).string();
    char* made = ::mkdtemp(pattern.data());
    EXPECT_NE(made, nullptr) << pattern;
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return (fs::path(path_) / name).string(); }

 private:
  std::string path_;
};

// Writes interleaved float samples with libsndfile (format e.g. SF_FORMAT_WAV | SF_FORMAT_PCM_16).
inline void WriteAudio(const std::string& path, int format, int sample_rate, int channels,
                       const std::vector<float>& interleaved) {
  SF_INFO info{};
  info.samplerate = sample_rate;
  info.channels = channels;
  info.format = format;
  SNDFILE* file = sf_open(path.c_str(), SFM_WRITE, &info);
  ASSERT_NE(file, nullptr) << path << ": " << sf_strerror(nullptr);
  // Keep float data exact in float files and never clip-normalise integer files.
  sf_command(file, SFC_SET_CLIPPING, nullptr, SF_TRUE);
  const sf_count_t frames = static_cast<sf_count_t>(interleaved.size()) / channels;
  ASSERT_EQ(sf_writef_float(file, interleaved.data(), frames), frames) << sf_strerror(file);
  ASSERT_EQ(sf_close(file), 0) << path;
}

// A sine of `hz` at `sample_rate`, `frames` long, amplitude `amp`, phase 0 at frame `start`.
inline std::vector<float> Sine(double hz, int sample_rate, int64_t frames, double amp = 0.5,
                               int64_t start = 0) {
  std::vector<float> out(static_cast<size_t>(frames));
  for (int64_t i = 0; i < frames; ++i) {
    out[i] = static_cast<float>(amp * std::sin(2 * M_PI * hz * double(start + i) / sample_rate));
  }
  return out;
}

inline void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

inline std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A mono 16-bit WAV of `frames` frames of a tone whose fmt chunk then has its sample-rate (and
// byte-rate) fields patched to `header_rate`: a corrupt header that libsndfile opens as is.
inline void WriteWavWithHeaderRate(const std::string& path, int64_t frames, uint32_t header_rate) {
  std::vector<float> tone(static_cast<size_t>(frames));
  for (int64_t i = 0; i < frames; ++i) tone[i] = 0.5f * static_cast<float>(std::sin(0.05 * i));
  WriteAudio(path, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 16000, 1, tone);
  std::string bytes = ReadBytes(path);
  size_t fmt = bytes.find("fmt ");
  ASSERT_NE(fmt, std::string::npos) << path;
  auto put32 = [&](size_t at, uint32_t v) {
    for (int b = 0; b < 4; ++b) bytes[at + b] = static_cast<char>((v >> (8 * b)) & 0xFF);
  };
  put32(fmt + 12, header_rate);      // nSamplesPerSec
  put32(fmt + 16, header_rate * 2);  // nAvgBytesPerSec (mono, 16-bit)
  WriteBytes(path, bytes);
}

// The first `fraction` of a file's bytes, written to `out`.
inline void TruncateCopy(const std::string& in, const std::string& out, double fraction) {
  std::string bytes = ReadBytes(in);
  WriteBytes(out, bytes.substr(0, static_cast<size_t>(bytes.size() * fraction)));
}

// True when `tool` runs (`tool -version`/`--version` style probe via `command -v`).
inline bool HaveTool(const std::string& tool) {
  std::string cmd = "command -v " + tool + " >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

// Runs a shell command and returns its stdout; `ok` false when it exits non-zero.
inline std::string RunCapture(const std::string& command, bool* ok) {
  std::string out;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) {
    *ok = false;
    return out;
  }
  char buffer[1 << 16];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) out.append(buffer, n);
  int rc = ::pclose(pipe);
  *ok = rc == 0;
  return out;
}

inline std::vector<float> BytesToF32(const std::string& bytes) {
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

inline std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

// A small synthetic corpus (ogg Vorbis for 2024, mp3 for xc; several rates, mono and stereo,
// plus the writer's broken files). Written once per build tree into AVIARY_WORKER_CORPUS_DIR
// (under an flock, with the file list saved next to it) and reused by every test process, since
// ctest runs each test case in its own process.
struct Corpus {
  std::string root;
  std::vector<synth::SynthFile> ogg;  // layout 2024 under root/ogg
  std::vector<synth::SynthFile> mp3;  // layout xc under root/mp3
  std::string OggPath(const synth::SynthFile& f) const { return root + "/ogg/" + f.relative_path; }
  std::string Mp3Path(const synth::SynthFile& f) const { return root + "/mp3/" + f.relative_path; }
};

inline const Corpus& SharedCorpus() {
  static const Corpus* corpus = [] {
    auto* c = new Corpus();
    const std::string key = "v1 species=4 recordings=24 seed=11 max_seconds=8";
    c->root = AVIARY_WORKER_CORPUS_DIR;
    fs::create_directories(c->root);
    int lock = ::open((c->root + "/.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    EXPECT_GE(lock, 0);
    EXPECT_EQ(::flock(lock, LOCK_EX), 0);
    const std::string list = c->root + "/files.csv";
    std::ifstream in(list);
    std::string line;
    if (!std::getline(in, line) || line != key) {
      in.close();
      std::string text = key + "\n";
      for (common::Layout layout : {common::Layout::k2024, common::Layout::kXc}) {
        synth::SynthOptions options;
        options.species = 4;
        options.recordings = 24;
        options.seed = 11;
        options.max_seconds = 8;
        options.layout = layout;
        const char* sub = layout == common::Layout::kXc ? "mp3" : "ogg";
        options.out_dir = c->root + "/" + sub;
        auto report = synth::WriteSyntheticCorpus(options);
        EXPECT_TRUE(report.ok()) << report.status();
        if (!report.ok()) break;
        for (const synth::SynthFile& f : report->files) {
          text += std::string(sub) + "," + f.relative_path + "," +
                  std::to_string(static_cast<int>(f.kind)) + "," + std::to_string(f.sample_rate) +
                  "," + std::to_string(f.channels) + "," + std::to_string(f.num_frames) + "\n";
        }
      }
      std::ofstream out(list + ".tmp", std::ios::trunc);
      out << text;
      out.close();
      fs::rename(list + ".tmp", list);
      in.open(list);
      std::getline(in, line);
    }
    while (std::getline(in, line)) {
      std::vector<std::string> fields;
      size_t pos = 0;
      for (size_t comma; (comma = line.find(',', pos)) != std::string::npos; pos = comma + 1) {
        fields.push_back(line.substr(pos, comma - pos));
      }
      fields.push_back(line.substr(pos));
      if (fields.size() != 6) continue;
      synth::SynthFile f;
      f.relative_path = fields[1];
      f.kind = static_cast<synth::SynthFileKind>(std::stoi(fields[2]));
      f.sample_rate = std::stoi(fields[3]);
      f.channels = std::stoi(fields[4]);
      f.num_frames = std::stoll(fields[5]);
      (fields[0] == "mp3" ? c->mp3 : c->ogg).push_back(f);
    }
    ::close(lock);  // drops the flock
    EXPECT_FALSE(c->ogg.empty());
    EXPECT_FALSE(c->mp3.empty());
    return c;
  }();
  return *corpus;
}

}  // namespace aviary::worker::testing

#endif  // AVIARY_TESTS_WORKER_AUDIO_TEST_UTIL_H_
