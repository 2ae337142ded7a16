// aviary mel --config P.yaml --audio F [--offset S] --out x.npy [--set k=v ...]
//
// The model input for one clip, as the trainer's validation path builds it: decode F (first
// channel or mean per data.channels, resampled to data.sample_rate), take the window
// [offset, offset + data.duration] (short windows zero-padded at the end, the validation rule),
// run the front end in eval mode (no SpecAugment) and write float32 [C, n_mels, frames] as .npy.
#include <algorithm>
#include <cmath>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/config.h"
#include "worker/tools/npy.h"
#include "common/status.h"
#include "worker/tools/tools.h"
#include "worker/data/audio.h"
#include "worker/frontend.h"

namespace aviary::cli {
namespace {

struct MelResult {
  std::vector<int64_t> shape;
  double source_seconds = 0;  // -1 when unknown (an mp3 without a length tag, decoded in part)
  int source_sample_rate = 0;
  int64_t window_samples = 0;
  int64_t decoded_samples = 0;
};

struct MelArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string audio;
  double offset_s = 0;
  std::string out;
};

absl::StatusOr<MelResult> MakeMel(const MelArgs& args) {
  const std::string& audio_path = args.audio;
  const std::string& out_path = args.out;
  const double offset_s = args.offset_s;
  AVIARY_RETURN_IF_ERROR(CheckOutputPath("--out", out_path));
  AVIARY_RETURN_IF_ERROR(common::CheckNotTheInput(out_path, "--out", audio_path, "--audio file"));
  AVIARY_RETURN_IF_ERROR(common::CheckNotTheInput(out_path, "--out", args.config, "--config file"));
  AVIARY_ASSIGN_OR_RETURN(common::PipelineConfig config, common::LoadPipelineConfig(args.config, args.overrides));

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
  // source_frames is -1 when the header cannot tell (an mp3 without a Xing/Info tag).
  result.source_seconds = decoded.audio.source_sample_rate > 0 && decoded.audio.source_frames >= 0
                              ? static_cast<double>(decoded.audio.source_frames) /
                                    decoded.audio.source_sample_rate
                              : -1.0;
  result.window_samples = window_samples;
  std::vector<float>& samples = decoded.audio.samples;
  result.decoded_samples = static_cast<int64_t>(samples.size());
  if (samples.empty()) {
    return absl::OutOfRangeError(absl::StrFormat(
        "--offset: %g s is past the end of %s (%s)", offset_s, audio_path,
        result.source_seconds >= 0 ? absl::StrFormat("%.3f s long", result.source_seconds)
                                   : std::string("its header does not tell its length")));
  }
  // The validation window: the first `duration` seconds from the offset, zero-padded at the end.
  samples.resize(static_cast<size_t>(window_samples), 0.0f);

  try {
    at::Tensor wave = at::from_blob(samples.data(), {1, window_samples}, at::kFloat);
    at::Tensor mel = frontend->Forward(wave, worker::FrontendMode::kEval).squeeze(0).contiguous();
    result.shape.assign(mel.sizes().begin(), mel.sizes().end());
    AVIARY_RETURN_IF_ERROR(worker::WriteNpy(out_path, result.shape, mel.data_ptr<float>(),
                                            static_cast<size_t>(mel.numel())));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("front end: ", e.what_without_backtrace()));
  }
  return result;
}

int RunMel(const MelArgs& args) {
  absl::StatusOr<MelResult> result = MakeMel(args);
  if (!result.ok()) {
    std::cerr << "aviary mel: " << result.status().message() << "\n";
    return ExitCodeFor(result.status());
  }
  std::cout << "wrote " << args.out << ": float32 [" << absl::StrJoin(result->shape, ", ")
            << "] from " << result->decoded_samples << " samples (window " << result->window_samples
            << (result->decoded_samples < result->window_samples ? ", zero-padded at the end" : "")
            << "), source "
            << (result->source_seconds >= 0 ? absl::StrFormat("%.3f s", result->source_seconds)
                                            : std::string("of unknown length (an mp3 without a "
                                                          "length tag)"))
            << " at " << result->source_sample_rate << " Hz\n";
  return 0;
}

}  // namespace

void AddMelCommand(CLI::App* app, common::CommandRunner* run) {
  auto args = std::make_shared<MelArgs>();
  CLI::App* mel = common::AddCommand(
      app, "mel", "the model input of one clip as .npy",
      "The data.duration window from --offset (zero-padded at the end where the file ends first), resampled to "
      "data.sample_rate, through the front end in evaluation mode; float32 [in_channels, n_mels, frames].");
  mel->add_option("--config", args->config, "the pipeline YAML")
      ->type_name("P.yaml")
      ->required()
      ->check(common::NonEmpty("a file"));
  mel->add_option("--audio", args->audio, "an audio file")->type_name("F")->required()->check(common::NonEmpty("a file"));
  common::AddNumber(mel, "--offset", &args->offset_s, "S", "start of the window, seconds", 0.0, 1e9)
      ->capture_default_str();
  mel->add_option("--out", args->out, "the .npy to write")->type_name("x.npy")->required()->check(common::NonEmpty("a path"));
  common::AddSetOption(mel, &args->overrides);
  mel->callback([run, args] { *run = [args] { return RunMel(*args); }; });
}

}  // namespace aviary::cli
