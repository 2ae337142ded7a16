// Is a FLAC-compressed decoded-audio cache worth its decode cost? (issue 15; docs/BENCHMARKS.md,
// "Cache format: int16 or FLAC")
//
// Reads a cache written by `aviary prepare` (its shard indexes and .pcm files), then per
// recording: encodes its int16 samples to FLAC with libsndfile (in memory, one file per
// recording, the natural layout of a FLAC cache), and measures on one core
//   - the bytes: int16 (2 per sample) against FLAC;
//   - a whole-recording read: copy from the int16 shard against FLAC decode;
//   - training clips of --clip-s seconds at random offsets (the loader's access): a copy out of
//     the int16 shard against sf_seek + sf_readf_short of the FLAC file.
// Decoded FLAC is compared sample for sample with the int16 source (lossless).
//
// usage: cache_format_bench CACHE_DIR [--clips N] [--clip-s S] [--max-files N]
#include <sndfile.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// An in-memory file for sf_open_virtual.
struct MemFile {
  std::string bytes;
  sf_count_t pos = 0;
};
sf_count_t VLen(void* user) { return static_cast<sf_count_t>(static_cast<MemFile*>(user)->bytes.size()); }
sf_count_t VSeek(sf_count_t offset, int whence, void* user) {
  auto* f = static_cast<MemFile*>(user);
  sf_count_t base = whence == SEEK_SET ? 0 : whence == SEEK_CUR ? f->pos : static_cast<sf_count_t>(f->bytes.size());
  f->pos = std::max<sf_count_t>(0, base + offset);
  return f->pos;
}
sf_count_t VRead(void* ptr, sf_count_t count, void* user) {
  auto* f = static_cast<MemFile*>(user);
  const sf_count_t n = std::max<sf_count_t>(0, std::min<sf_count_t>(count, static_cast<sf_count_t>(f->bytes.size()) - f->pos));
  std::memcpy(ptr, f->bytes.data() + f->pos, static_cast<size_t>(n));
  f->pos += n;
  return n;
}
sf_count_t VWrite(const void* ptr, sf_count_t count, void* user) {
  auto* f = static_cast<MemFile*>(user);
  if (static_cast<size_t>(f->pos + count) > f->bytes.size()) f->bytes.resize(static_cast<size_t>(f->pos + count));
  std::memcpy(f->bytes.data() + f->pos, ptr, static_cast<size_t>(count));
  f->pos += count;
  return count;
}
sf_count_t VTell(void* user) { return static_cast<MemFile*>(user)->pos; }
SF_VIRTUAL_IO kIo{VLen, VSeek, VRead, VWrite, VTell};

struct Entry {
  std::vector<int16_t> samples;
  int rate = 0;
  MemFile flac;
};

double Seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: cache_format_bench CACHE_DIR [--clips N] [--clip-s S] [--max-files N]\n";
    return 2;
  }
  const std::string dir = argv[1];
  int clips = 2000, max_files = 1 << 30;
  double clip_s = 10;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--clips") clips = std::stoi(argv[i + 1]);
    else if (flag == "--clip-s") clip_s = std::stod(argv[i + 1]);
    else if (flag == "--max-files") max_files = std::stoi(argv[i + 1]);
    else {
      std::cerr << "cache_format_bench: unknown flag " << flag << "\n";
      return 2;
    }
  }
  // The shard indexes: path,shard,offset,frames,sample_rate,problem,...
  std::vector<Entry> entries;
  std::map<int, std::string> pcm;
  for (const auto& item : fs::directory_iterator(dir)) {
    const std::string name = item.path().filename().string();
    if (name.rfind("shard-", 0) == 0 && name.size() > 10 && name.substr(name.size() - 4) == ".pcm") {
      std::ifstream in(item.path(), std::ios::binary);
      pcm[std::stoi(name.substr(6, 6))] = std::string(std::istreambuf_iterator<char>(in), {});
    }
  }
  for (const auto& item : fs::directory_iterator(dir)) {
    const std::string name = item.path().filename().string();
    if (name.rfind("shard-", 0) != 0 || name.find(".index.csv") == std::string::npos) continue;
    std::ifstream in(item.path());
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line) && static_cast<int>(entries.size()) < max_files) {
      // The path may be quoted; the numeric fields follow it.
      size_t start = 0;
      if (!line.empty() && line[0] == '"') start = line.find("\",", 1) + 1; else start = line.find(',');
      std::stringstream rest(line.substr(start + 1));
      std::string shard, offset, frames, rate;
      std::getline(rest, shard, ',');
      std::getline(rest, offset, ',');
      std::getline(rest, frames, ',');
      std::getline(rest, rate, ',');
      if (std::stoll(frames) == 0) continue;
      const std::string& data = pcm.at(std::stoi(shard));
      Entry e;
      e.rate = std::stoi(rate);
      e.samples.resize(static_cast<size_t>(std::stoll(frames)));
      std::memcpy(e.samples.data(), data.data() + 2 * std::stoll(offset), 2 * e.samples.size());
      entries.push_back(std::move(e));
    }
  }
  pcm.clear();
  if (entries.empty()) {
    std::cerr << "cache_format_bench: no decoded recordings in " << dir << "\n";
    return 1;
  }
  // Encode (FLAC, 16 bit, libsndfile's default compression level).
  int64_t raw_bytes = 0, flac_bytes = 0, total_samples = 0;
  auto t0 = Clock::now();
  for (Entry& e : entries) {
    SF_INFO info{};
    info.samplerate = e.rate;
    info.channels = 1;
    info.format = SF_FORMAT_FLAC | SF_FORMAT_PCM_16;
    SNDFILE* f = sf_open_virtual(&kIo, SFM_WRITE, &info, &e.flac);
    if (f == nullptr) {
      std::cerr << "cache_format_bench: sf_open_virtual(FLAC, write): " << sf_strerror(nullptr) << "\n";
      return 1;
    }
    if (sf_writef_short(f, e.samples.data(), static_cast<sf_count_t>(e.samples.size())) !=
        static_cast<sf_count_t>(e.samples.size())) {
      std::cerr << "cache_format_bench: FLAC write: " << sf_strerror(f) << "\n";
      return 1;
    }
    sf_close(f);
    raw_bytes += 2 * static_cast<int64_t>(e.samples.size());
    flac_bytes += static_cast<int64_t>(e.flac.bytes.size());
    total_samples += static_cast<int64_t>(e.samples.size());
  }
  const double encode_s = Seconds(t0);
  const double audio_s = static_cast<double>(total_samples) / entries[0].rate;
  // Whole recordings.
  std::vector<int16_t> buffer;
  int64_t checksum = 0;
  t0 = Clock::now();
  for (const Entry& e : entries) {
    buffer.assign(e.samples.begin(), e.samples.end());
    checksum += buffer[buffer.size() / 2];
  }
  const double int16_whole_s = Seconds(t0);
  t0 = Clock::now();
  for (Entry& e : entries) {
    e.flac.pos = 0;
    SF_INFO info{};
    SNDFILE* f = sf_open_virtual(&kIo, SFM_READ, &info, &e.flac);
    if (f == nullptr) {
      std::cerr << "cache_format_bench: FLAC read: " << sf_strerror(nullptr) << "\n";
      return 1;
    }
    buffer.resize(e.samples.size());
    const sf_count_t got = sf_readf_short(f, buffer.data(), static_cast<sf_count_t>(buffer.size()));
    sf_close(f);
    if (got != static_cast<sf_count_t>(e.samples.size()) || buffer != e.samples) {
      std::cerr << "cache_format_bench: FLAC did not decode to the int16 samples it was made from\n";
      return 1;
    }
    checksum += buffer[buffer.size() / 2];
  }
  const double flac_whole_s = Seconds(t0);
  // Random clips.
  std::mt19937_64 rng(7);
  const int64_t clip = static_cast<int64_t>(clip_s * entries[0].rate);
  std::vector<std::pair<size_t, int64_t>> picks;
  for (int i = 0; i < clips; ++i) {
    const size_t k = rng() % entries.size();
    const int64_t n = static_cast<int64_t>(entries[k].samples.size());
    picks.emplace_back(k, n > clip ? static_cast<int64_t>(rng() % static_cast<uint64_t>(n - clip)) : 0);
  }
  buffer.assign(static_cast<size_t>(clip), 0);
  t0 = Clock::now();
  for (const auto& [k, start] : picks) {
    const Entry& e = entries[k];
    const int64_t n = std::min<int64_t>(clip, static_cast<int64_t>(e.samples.size()) - start);
    std::memcpy(buffer.data(), e.samples.data() + start, 2 * static_cast<size_t>(n));
    checksum += buffer[0];
  }
  const double int16_clip_s = Seconds(t0);
  t0 = Clock::now();
  for (const auto& [k, start] : picks) {
    Entry& e = entries[k];
    e.flac.pos = 0;
    SF_INFO info{};
    SNDFILE* f = sf_open_virtual(&kIo, SFM_READ, &info, &e.flac);
    if (f == nullptr || sf_seek(f, start, SEEK_SET) != start) {
      std::cerr << "cache_format_bench: FLAC seek: " << sf_strerror(f) << "\n";
      return 1;
    }
    const int64_t n = std::min<int64_t>(clip, static_cast<int64_t>(e.samples.size()) - start);
    if (sf_readf_short(f, buffer.data(), n) != n ||
        std::memcmp(buffer.data(), e.samples.data() + start, 2 * static_cast<size_t>(n)) != 0) {
      std::cerr << "cache_format_bench: a FLAC clip differs from the int16 samples\n";
      return 1;
    }
    sf_close(f);
    checksum += buffer[0];
  }
  const double flac_clip_s = Seconds(t0);
  std::printf("{\"recordings\":%zu,\"audio_hours\":%.3f,\"sample_rate\":%d,\"int16_bytes\":%lld,\"flac_bytes\":%lld,"
              "\"flac_ratio\":%.4f,\"flac_encode_audio_s_per_s\":%.1f,"
              "\"whole_int16_audio_s_per_s\":%.1f,\"whole_flac_audio_s_per_s\":%.1f,"
              "\"clips\":%d,\"clip_s\":%.1f,\"int16_clips_per_s\":%.1f,\"flac_clips_per_s\":%.1f,\"checksum\":%lld}\n",
              entries.size(), audio_s / 3600, entries[0].rate, static_cast<long long>(raw_bytes),
              static_cast<long long>(flac_bytes), static_cast<double>(flac_bytes) / raw_bytes, audio_s / encode_s,
              audio_s / int16_whole_s, audio_s / flac_whole_s, clips, clip_s, clips / int16_clip_s,
              clips / flac_clip_s, static_cast<long long>(checksum));
  std::printf("%zu recordings, %.2f h of audio at %d Hz; FLAC %.1f%% of the int16 bytes (%.1f of %.1f MiB), "
              "encoded at %.0f s audio/s\n",
              entries.size(), audio_s / 3600, entries[0].rate, 100.0 * flac_bytes / raw_bytes, flac_bytes / 1048576.0,
              raw_bytes / 1048576.0, audio_s / encode_s);
  std::printf("whole recordings, one core: int16 copy %.0f s audio/s, FLAC decode %.0f s audio/s (%.0fx slower)\n",
              audio_s / int16_whole_s, audio_s / flac_whole_s, flac_whole_s / int16_whole_s);
  std::printf("%.0f s clips at random offsets, one core: int16 %.0f clips/s, FLAC (seek + decode) %.0f clips/s "
              "(%.0fx slower)\n",
              clip_s, clips / int16_clip_s, clips / flac_clip_s, flac_clip_s / int16_clip_s);
  return 0;
}
