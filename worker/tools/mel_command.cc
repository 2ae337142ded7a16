// aviary mel --config P.yaml --audio F [--offset S] --out x.npy [--set k=v ...]
//
// The model input for one clip, as the trainer's validation path builds it: decode F (first
// channel or mean per data.channels, resampled to data.sample_rate), take the window
// [offset, offset + data.duration] (short windows zero-padded at the end, the validation rule),
// run the front end in eval mode (no SpecAugment) and write float32 [C, n_mels, frames] as .npy.
#include <algorithm>
#include <cmath>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/config.h"
#include "common/flags.h"
#include "common/npy.h"
#include "common/status.h"
#include "worker/tools/tools.h"
#include "worker/data/audio.h"
#include "worker/frontend.h"

namespace aviary::cli {
namespace {

struct MelResult {
  std::vector<int64_t> shape;
  double source_seconds = 0;
  int source_sample_rate = 0;
  int64_t window_samples = 0;
  int64_t decoded_samples = 0;
};

absl::StatusOr<MelResult> MakeMel(const common::Flags& flags) {
  AVIARY_ASSIGN_OR_RETURN(std::string config_path, flags.Require("config"));
  AVIARY_ASSIGN_OR_RETURN(std::string audio_path, flags.Require("audio"));
  AVIARY_ASSIGN_OR_RETURN(std::string out_path, flags.Require("out"));
  AVIARY_ASSIGN_OR_RETURN(double offset_s, flags.GetDouble("offset", 0.0));
  if (!(offset_s >= 0.0) || !std::isfinite(offset_s)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--offset: expected seconds >= 0, got ", *flags.Get("offset")));
  }
  AVIARY_ASSIGN_OR_RETURN(common::PipelineConfig config,
                          common::LoadPipelineConfig(config_path, flags.GetRepeated("set")));

  const int sample_rate = config.data.sample_rate;
  const auto window_samples = static_cast<int64_t>(std::llround(config.data.duration * sample_rate));
  AVIARY_ASSIGN_OR_RETURN(
      std::unique_ptr<worker::MelFrontend> frontend,
      worker::MelFrontend::Create(config.frontend, config.augment, sample_rate));
  if (window_samples < frontend->MinSamples()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data.duration: ", config.data.duration, " s is ", window_samples,
        " samples, fewer than the front end needs (", frontend->MinSamples(), " for n_fft ",
        config.frontend.n_fft, ")"));
  }

  worker::DecodeOptions options;
  options.target_sample_rate = sample_rate;
  options.channels =
      config.data.channels == "mean" ? worker::ChannelMode::kMean : worker::ChannelMode::kFirst;
  options.offset_s = offset_s;
  options.duration_s = config.data.duration;
  AVIARY_ASSIGN_OR_RETURN(worker::DecodeResult decoded, worker::DecodeAudio(audio_path, options));
  if (!decoded.ok()) {
    const std::string why = absl::StrCat(audio_path, ": ",
                                         worker::AudioProblemName(decoded.failure.problem), ": ",
                                         decoded.failure.message);
    return decoded.failure.problem == worker::AudioProblem::kMissing ? absl::NotFoundError(why)
                                                                      : absl::InvalidArgumentError(why);
  }
  MelResult result;
  result.source_sample_rate = decoded.audio.source_sample_rate;
  result.source_seconds = decoded.audio.source_sample_rate > 0
                              ? static_cast<double>(decoded.audio.source_frames) /
                                    decoded.audio.source_sample_rate
                              : 0.0;
  result.window_samples = window_samples;
  std::vector<float>& samples = decoded.audio.samples;
  result.decoded_samples = static_cast<int64_t>(samples.size());
  if (samples.empty()) {
    return absl::OutOfRangeError(absl::StrFormat(
        "--offset: %g s is past the end of %s (%.3f s long)", offset_s, audio_path,
        result.source_seconds));
  }
  // The validation window: the first `duration` seconds from the offset, zero-padded at the end.
  samples.resize(static_cast<size_t>(window_samples), 0.0f);

  try {
    at::Tensor wave = at::from_blob(samples.data(), {1, window_samples}, at::kFloat);
    at::Tensor mel = frontend->Forward(wave, worker::FrontendMode::kEval).squeeze(0).contiguous();
    result.shape.assign(mel.sizes().begin(), mel.sizes().end());
    AVIARY_RETURN_IF_ERROR(common::WriteNpy(out_path, result.shape, mel.data_ptr<float>(),
                                            static_cast<size_t>(mel.numel())));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("front end: ", e.what_without_backtrace()));
  }
  return result;
}

}  // namespace

int RunMel(const std::vector<std::string>& args) {
  auto fail = [](const absl::Status& st) {
    std::cerr << "aviary mel: " << st.message() << "\n";
    return ExitCodeFor(st);
  };
  common::Flags flags({"config", "audio", "offset", "out"}, {});
  if (absl::Status st = flags.Parse(args); !st.ok()) return fail(st);
  if (!flags.positional().empty()) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat("unexpected argument '", flags.positional()[0], "'")));
  }
  absl::StatusOr<MelResult> result = MakeMel(flags);
  if (!result.ok()) return fail(result.status());
  std::cout << "wrote " << *flags.Get("out") << ": float32 [" << absl::StrJoin(result->shape, ", ")
            << "] from " << result->decoded_samples << " samples (window " << result->window_samples
            << ", zero-padded at the end), source " << absl::StrFormat("%.3f", result->source_seconds)
            << " s at " << result->source_sample_rate << " Hz\n";
  return 0;
}

}  // namespace aviary::cli
