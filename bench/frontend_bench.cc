// Benchmark: the mel front end on the CPU (not a test; see docs/BENCHMARKS.md).
//
//   frontend_bench [--device cpu|cuda] [BATCH] [SECONDS] [REPEATS] [THREADS...]
// Times MelFrontend::Forward (eval mode, the default config: 32 kHz, n_fft 2028, hop 835,
// 128 mels, per_sample, 3 channels) on BATCH clips of SECONDS seconds (default 32 x 10 s),
// for each torch intra-op thread count (default 1 2). Prints one line per thread count:
// "threads=<n> aviary_ms=<median ms per batch> aviary_clips_per_s=<x>", plus the stage split.
// On CUDA the input is on the device and each timing ends with a synchronization.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "common/config.h"
#include "worker/frontend.h"

namespace {

double Ms(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

bool g_cuda = false;

// Waits for the device: its current stream, where the front end's kernels run (no copy; a host
// read of one element made a contiguous copy of the channels-last output in the timed region).
// Device-generic, so it builds against a CPU-only libtorch too (as worker/comm/reducer.cc).
void Sync(const at::Tensor& t) {
  if (g_cuda && t.defined()) c10::impl::getDeviceGuardImpl(t.device().type())->getStream(t.device()).synchronize();
}

template <typename F>
double MedianMs(int repeats, F&& f) {
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    Sync(f());
    ms.push_back(Ms(t0, std::chrono::steady_clock::now()));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() >= 2 && args[0] == "--device") {
    g_cuda = args[1] == "cuda";
    if (!g_cuda && args[1] != "cpu") {
      std::cerr << "--device: expected cpu or cuda, got '" << args[1] << "'\n";
      return 2;
    }
    args.erase(args.begin(), args.begin() + 2);
  }
  if (g_cuda && !at::hasCUDA()) {
    std::cerr << "--device cuda: torch sees no CUDA device\n";
    return 2;
  }
  const int64_t batch = args.size() > 0 ? std::atoi(args[0].c_str()) : 32;
  const double seconds = args.size() > 1 ? std::atof(args[1].c_str()) : 10.0;
  const int repeats = args.size() > 2 ? std::atoi(args[2].c_str()) : 10;
  std::vector<int> threads;
  for (size_t i = 3; i < args.size(); ++i) threads.push_back(std::atoi(args[i].c_str()));
  if (threads.empty()) threads = {1, 2};

  aviary::common::FrontendConfig frontend;
  const c10::Device device = g_cuda ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  // The trainer's output layout on the GPU (channels_last models).
  auto fe = aviary::worker::MelFrontend::Create(
      frontend, {}, 32000, device, g_cuda ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous);
  if (!fe.ok()) {
    std::cerr << fe.status().message() << "\n";
    return 1;
  }
  const auto samples = static_cast<int64_t>(seconds * 32000);
  at::Generator gen = at::detail::createCPUGenerator(0);
  at::Tensor x = at::randn({batch, samples}, gen, at::kFloat).mul_(0.05);
  x.add_(at::sin(at::arange(samples, at::kFloat).mul_(2 * M_PI * 2000.0 / 32000)).mul_(0.3));
  x = x.to(device);

  for (int t : threads) {
    at::set_num_threads(t);
    for (int w = 0; w < 2; ++w) Sync((*fe)->Forward(x));
    const double total = MedianMs(repeats, [&] { return (*fe)->Forward(x); });
    at::Tensor mel, db, norm;
    const double mel_ms = MedianMs(repeats, [&] { return mel = (*fe)->MelPower(x); });
    const double db_ms = MedianMs(repeats, [&] { return db = (*fe)->PowerToDb(mel); });
    const double norm_ms = MedianMs(repeats, [&] { return norm = (*fe)->Normalize(db); });
    const double tile_ms = MedianMs(repeats, [&] { return (*fe)->Tile(norm); });
    std::cout << "device=" << device.str() << " threads=" << t << " batch=" << batch << " seconds=" << seconds
              << " aviary_ms=" << total << " aviary_clips_per_s=" << batch * 1000.0 / total
              << " (stft+mel " << mel_ms << " ms, dB " << db_ms << " ms, normalize " << norm_ms
              << " ms, tile " << tile_ms << " ms)\n";
  }
  return 0;
}
