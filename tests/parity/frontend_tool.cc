// frontend_tool: runs worker::MelFrontend on raw float32 waveforms so that check_frontend.py can
// compare it with torchaudio on the very same samples (decoding stays out of the comparison).
//
//   frontend_tool --out X.npy [--normalize per_sample|per_batch|none] [--channels C]
//                 [--sample-rate 32000] [--dtype float32|bfloat16] [--train --seed S]
//                 [--filterbank FB.npy] CLIP.f32 [CLIP.f32 ...]
//
// Every CLIP.f32 is raw little-endian float32 mono samples, all of the same length; they form
// one batch. X.npy gets [B, C, n_mels, frames]; FB.npy the [n_freqs, n_mels] filterbank.
// Exit code 2 with the front end's message when it refuses the input.
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include "absl/strings/str_cat.h"
#include "common/config.h"
#include "common/csv.h"
#include "common/cli.h"
#include "common/files.h"
#include "worker/tools/npy.h"
#include "worker/frontend.h"

namespace {

int Fail(const std::string& message, int code = 2) {
  std::cerr << "frontend_tool: " << message << "\n";
  return code;
}

absl::Status WriteTensor(const std::string& path, const at::Tensor& t) {
  at::Tensor c = t.to(at::kFloat).contiguous();
  std::vector<int64_t> shape(c.sizes().begin(), c.sizes().end());
  return aviary::worker::WriteNpy(path, shape, c.data_ptr<float>(), static_cast<size_t>(c.numel()));
}

}  // namespace

int main(int argc, char** argv) {
  aviary::common::FrontendConfig frontend;
  aviary::common::AugmentConfig augment;
  CLI::App app("frontend_tool: the mel front end of raw float32 clips, for the parity tests", "frontend_tool");
  aviary::common::ConfigureApp(&app);
  std::string out, filterbank, dtype = "float32";
  std::vector<std::string> clips_paths;
  int sample_rate = 32000;
  int64_t seed = 0;
  bool train = false;
  app.add_option("clips", clips_paths, "raw float32 clips of equal length")->required();
  app.add_option("--out", out, "the output tensor")->required();
  app.add_option("--normalize", frontend.normalize, "frontend.normalize");
  aviary::common::AddNumber(&app, "--channels", &frontend.in_channels, "N", "frontend.in_channels", 1, 16);
  aviary::common::AddNumber(&app, "--sample-rate", &sample_rate, "HZ", "sample rate", 1, 1000000);
  aviary::common::AddNumber<int64_t>(&app, "--seed", &seed, "S", "augmentation seed", 0, int64_t{1} << 62);
  app.add_option("--dtype", dtype, "input dtype")->check(aviary::common::OneOf({"float32", "bfloat16"}));
  app.add_option("--filterbank", filterbank, "also write the mel filterbank here");
  app.add_flag("--train", train, "training mode (SpecAugment)");
  if (std::optional<int> code = aviary::common::ParseCommandLine(&app, {argv + 1, argv + argc})) return *code;

  auto fe = aviary::worker::MelFrontend::Create(frontend, augment, sample_rate);
  if (!fe.ok()) return Fail(std::string(fe.status().message()));

  std::vector<at::Tensor> clips;
  std::vector<std::vector<float>> storage;
  for (const std::string& path : clips_paths) {
    auto bytes = aviary::common::ReadFileToString(path);
    if (!bytes.ok()) return Fail(std::string(bytes.status().message()));
    if (bytes->size() % sizeof(float) != 0) return Fail(path + ": not raw float32");
    storage.emplace_back(bytes->size() / sizeof(float));
    if (!bytes->empty()) std::memcpy(storage.back().data(), bytes->data(), bytes->size());
    clips.push_back(at::from_blob(storage.back().data(),
                                  {static_cast<int64_t>(storage.back().size())}, at::kFloat));
    if (clips.back().size(0) != clips.front().size(0)) {
      return Fail(absl::StrCat(path, ": ", clips.back().size(0), " samples, but ",
                               clips_paths[0], " has ", clips.front().size(0)));
    }
  }
  try {
    at::Tensor batch = at::stack(clips);
    if (dtype == "bfloat16") batch = batch.to(at::kBFloat16);
    at::Tensor result;
    if (train) {
      at::Generator gen = at::detail::createCPUGenerator(static_cast<uint64_t>(seed));
      result = (*fe)->Forward(batch, aviary::worker::FrontendMode::kTrain, gen);
    } else {
      result = (*fe)->Forward(batch);
    }
    if (absl::Status st = WriteTensor(out, result); !st.ok()) {
      return Fail(std::string(st.message()), 1);
    }
    if (!filterbank.empty()) {
      if (absl::Status st = WriteTensor(filterbank, (*fe)->mel_filterbank()); !st.ok()) {
        return Fail(std::string(st.message()), 1);
      }
    }
  } catch (const c10::Error& e) {
    return Fail(e.what_without_backtrace());
  }
  return 0;
}
