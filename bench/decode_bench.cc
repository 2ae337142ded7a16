// Decode + resample throughput, cache preparation and clip reads, on one core (see
// bench/decode_bench.sh, which runs ffmpeg on the same files for the ratios in
// docs/BENCHMARKS.md).
//
//   decode_bench decode LIST             decode every file of LIST (one path per line) to 32 kHz,
//                                        first channel, on one thread
//   decode_bench prepare LIST DIR T      aviary prepare's cache writer with T threads
//   decode_bench clips LIST DIR N SECONDS CLIPS_OUT
//                                        N random training clips of SECONDS from the cache and
//                                        on the fly (one thread each); writes "path offset_s"
//                                        lines for the ffmpeg reference
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "worker/data/audio.h"
#include "worker/data/audio_cache.h"
#include "worker/data/clip_loader.h"

namespace {

using aviary::worker::AudioCache;
using Clock = std::chrono::steady_clock;

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::vector<std::string> ReadList(const std::string& path) {
  std::vector<std::string> out;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(line);
  }
  return out;
}

int Decode(const std::vector<std::string>& files) {
  aviary::worker::DecodeOptions options;
  double audio_s = 0;
  int problems = 0;
  auto start = Clock::now();
  for (const std::string& f : files) {
    auto r = aviary::worker::DecodeAudio(f, options);
    if (!r.ok()) {
      std::cerr << r.status() << "\n";
      return 1;
    }
    problems += !r->ok();
    audio_s += r->audio.samples.size() / 32000.0;
  }
  double wall = Since(start);
  std::printf(
      "decode files=%zu problems=%d audio_s=%.3f wall_s=%.4f audio_s_per_s=%.1f files_per_s=%.2f\n",
      files.size(), problems, audio_s, wall, audio_s / wall, files.size() / wall);
  return 0;
}

int Prepare(const std::vector<std::string>& files, const std::string& dir, int threads) {
  aviary::worker::PrepareOptions options;
  options.cache_dir = dir;
  options.num_threads = threads;
  auto start = Clock::now();
  auto report = aviary::worker::PrepareAudioCache(files, options);
  double wall = Since(start);
  if (!report.ok()) {
    std::cerr << report.status() << "\n";
    return 1;
  }
  std::printf(
      "prepare files=%lld threads=%d audio_s=%.3f wall_s=%.4f audio_s_per_s=%.1f "
      "files_per_s=%.2f\n",
      static_cast<long long>(report->files_total), threads, report->audio_seconds, wall,
      report->audio_seconds / wall, report->files_total / wall);
  return 0;
}

int Clips(const std::vector<std::string>& files, const std::string& dir, int n, double seconds,
          const std::string& clips_out) {
  auto cache = AudioCache::Open(dir);
  if (!cache.ok()) {
    std::cerr << cache.status() << "\n";
    return 1;
  }
  std::mt19937_64 pick(7);
  std::vector<std::string> chosen;
  for (int i = 0; i < n; ++i) chosen.push_back(files[pick() % files.size()]);
  aviary::worker::ClipRequest request;
  request.duration_s = seconds;
  request.mode = aviary::worker::ClipMode::kTrain;
  std::ofstream out(clips_out);
  for (int pass = 0; pass < 2; ++pass) {
    const AudioCache* source = pass == 0 ? cache->get() : nullptr;
    int problems = 0;
    auto start = Clock::now();
    for (int i = 0; i < n; ++i) {
      request.seed = static_cast<uint64_t>(i);
      auto clip = aviary::worker::LoadClip(source, chosen[i], request);
      if (!clip.ok()) {
        std::cerr << clip.status() << "\n";
        return 1;
      }
      problems += !clip->ok();
      if (pass == 0) {
        out << chosen[i] << "\t" << clip->plan.source_offset / 32000.0 << "\n";
      }
    }
    double wall = Since(start);
    std::printf("clips source=%s n=%d seconds=%.1f problems=%d wall_s=%.4f clips_per_s=%.1f\n",
                pass == 0 ? "cache" : "decode", n, seconds, problems, wall, n / wall);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() == 2 && args[0] == "decode") return Decode(ReadList(args[1]));
  if (args.size() == 4 && args[0] == "prepare") {
    return Prepare(ReadList(args[1]), args[2], std::stoi(args[3]));
  }
  if (args.size() == 6 && args[0] == "clips") {
    return Clips(ReadList(args[1]), args[2], std::stoi(args[3]), std::stod(args[4]), args[5]);
  }
  std::fprintf(stderr,
               "usage: decode_bench decode LIST | prepare LIST DIR THREADS | "
               "clips LIST DIR N SECONDS CLIPS_OUT\n");
  return 2;
}
