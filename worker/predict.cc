#include "worker/predict.h"

#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <dirent.h>
#include <sys/stat.h>
#include <torch/utils.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <system_error>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/config.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/data/audio.h"
#include "worker/checkpoint.h"
#include "worker/ema.h"
#include "worker/frontend.h"
#include "worker/models.h"

namespace aviary::worker {
namespace {

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

std::string Stem(const std::string& path) {
  size_t slash = path.rfind('/');
  std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  size_t dot = name.rfind('.');
  if (dot != std::string::npos && dot > 0) name.resize(dot);
  return name;
}

// `result`, its error prefixed with `context` (the checkpoint a setting came from).
template <typename T>
absl::StatusOr<T> WithPath(absl::StatusOr<T> result, absl::string_view context) {
  if (result.ok()) return result;
  return common::Annotate(result.status(), context);
}

bool SameFrontend(const common::FrontendConfig& a, const common::FrontendConfig& b) {
  return a == b;
}

// Shortest text that reads back as the same float ("0.123456789" -> "0.12345679").
void AppendFloat(std::string* out, float v) {
  char buf[32];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  if (ec != std::errc()) {
    out->append(absl::StrFormat("%.9g", v));
    return;
  }
  out->append(buf, end);
}

// A failed write of the CSV stream (`error`: errno after it, 0 when the stream said nothing):
// RESOURCE_EXHAUSTED for a full disk or quota, else INTERNAL; `what` starts "writing the CSV"
// (`aviary predict` puts its file's name there).
absl::Status CsvWriteError(absl::string_view what, int error) {
  return absl::Status(error == ENOSPC || error == EDQUOT ? absl::StatusCode::kResourceExhausted
                                                         : absl::StatusCode::kInternal,
                      absl::StrCat(what, ": ", error != 0 ? common::ErrnoText(error) : std::string("a stream error")));
}

// Decoded samples a file may have waiting for inference by default: 2^23 (32 MiB, 262 s at
// 32 kHz): the decoders reading ahead decode a BirdCLEF soundscape (240 s) whole, as before
// streaming, and an hours-long file up to that much.
constexpr int64_t kDefaultChunkSamples = int64_t{1} << 23;
// The longest file predict decodes: 2^40 samples (397 days at 32 kHz), a bound against a
// damaged header, not a memory limit: samples stream through (see RowStream).
constexpr int64_t kPredictMaxSamples = int64_t{1} << 40;

// One file between its decoder thread and inference: the decoder appends the samples as it
// decodes them (waiting while `chunk` samples are not taken), inference takes them as they come.
struct FileStream {
  std::vector<float> pending;  // decoded, not taken by inference yet
  bool unwanted = false;       // skipped whatever it holds: samples dropped, never waited for
  bool done = false;           // the decode ended; error and result say how
  absl::Status error;          // the decoder's own failure (a resampler refusing its rate)
  DecodeResult result;         // ok(), or a skippable problem; result.audio.samples stays empty
};

// Hands a decode's samples to its FileStream. A non-finite sample, or one past
// kMaxSampleMagnitude (the decoder's own test), stops the decode (the decoder then reports the
// file non_finite) before it reaches a model: only NaN and inf did, and a float file damaged at
// 5 s was inferred to its end, hours on a long one, before it was skipped.
class StreamSink : public SampleSink {
 public:
  StreamSink(FileStream* file, std::mutex* mu, std::condition_variable* cv, const bool* stop, size_t chunk)
      : file_(file), mu_(mu), cv_(cv), stop_(stop), chunk_(chunk) {}

  bool Consume(const float* samples, int64_t count) override {
    for (int64_t k = 0; k < count; ++k) {
      if (!(std::fabs(samples[k]) <= kMaxSampleMagnitude)) return false;  // NaN too
    }
    {
      std::unique_lock<std::mutex> lock(*mu_);
      cv_->wait(lock, [&] { return *stop_ || file_->unwanted || file_->pending.size() < chunk_; });
      if (*stop_) return false;
      if (!file_->unwanted) file_->pending.insert(file_->pending.end(), samples, samples + count);
    }
    cv_->notify_all();
    return true;
  }

 private:
  FileStream* file_;
  std::mutex* mu_;
  std::condition_variable* cv_;
  const bool* stop_;
  size_t chunk_;
};

}  // namespace

bool HasAudioExtension(const std::string& path) {
  static const char* const kAudio[] = {"ogg", "oga", "opus", "mp3", "flac", "wav",  "wave", "aif",  "aiff",
                                       "aifc", "au",  "snd",  "caf", "w64",  "rf64", "sph",  "nist", "voc",
                                       "ircam", "sf", "paf",  "pvf", "xi",   "htk",  "sd2",  "avr",  "wve",
                                       "mat",  "mat4", "mat5", "mpc", "svx",  "8svx", "iff"};
  const size_t slash = path.find_last_of('/');
  const size_t dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return false;
  const std::string ext = absl::AsciiStrToLower(absl::string_view(path).substr(dot + 1));
  for (const char* a : kAudio) {
    if (ext == a) return true;
  }
  return false;
}

namespace {

// `files` with each file not named as audio moved to right after the last audio-named file of
// its stem, if there is one; the order otherwise kept (Predictor::Run).
std::vector<std::string> AudioNamedFirst(const std::vector<std::string>& files) {
  std::map<std::string, size_t> last_audio;  // stem -> index of its last audio-named file
  for (size_t k = 0; k < files.size(); ++k) {
    if (HasAudioExtension(files[k])) last_audio[Stem(files[k])] = k;
  }
  std::map<size_t, std::vector<size_t>> after;  // an audio-named file -> its stem's others
  std::vector<bool> moved(files.size(), false);
  for (size_t k = 0; k < files.size(); ++k) {
    if (HasAudioExtension(files[k])) continue;
    auto audio = last_audio.find(Stem(files[k]));
    if (audio == last_audio.end()) continue;
    after[audio->second].push_back(k);
    moved[k] = true;
  }
  std::vector<std::string> ordered;
  ordered.reserve(files.size());
  for (size_t k = 0; k < files.size(); ++k) {
    if (moved[k]) continue;
    ordered.push_back(files[k]);
    if (auto others = after.find(k); others != after.end()) {
      for (size_t o : others->second) ordered.push_back(files[o]);
    }
  }
  return ordered;
}

}  // namespace


struct Predictor::Impl {
  PredictOptions options;
  std::vector<PredictModelInfo> infos;
  std::vector<std::string> class_names;
  std::vector<std::shared_ptr<ClassifierImpl>> models;
  std::vector<std::unique_ptr<MelFrontend>> frontends;  // unique settings
  std::vector<size_t> frontend_of;                      // per model
  c10::Device device = c10::Device(c10::kCPU);
  int sample_rate = 0;
  ChannelMode channels = ChannelMode::kFirst;
  int64_t window = 0;
  int batch = 0;
  int tta = 1;

  // [n, W] windows (CPU, float32) -> summed probabilities over models [n, C] (CPU).
  at::Tensor ForwardWindows(const at::Tensor& windows) {
    at::Tensor x = windows.to(device, /*non_blocking=*/false);
    std::vector<at::Tensor> mels(frontends.size());
    at::Tensor sum;
    for (size_t m = 0; m < models.size(); ++m) {
      at::Tensor& mel = mels[frontend_of[m]];
      if (!mel.defined()) mel = frontends[frontend_of[m]]->Forward(x, FrontendMode::kEval);
      at::Tensor p = models[m]->Probabilities(models[m]->forward(mel).to(at::kFloat));
      sum = sum.defined() ? sum.add_(p) : p;
    }
    return sum.cpu();
  }

  // CANCELLED when options.should_stop asks for a stop (before a batch, before a file).
  absl::Status CheckStop() const {
    if (options.should_stop && options.should_stop()) {
      return absl::CancelledError("stopped on request");
    }
    return absl::OkStatus();
  }

  class RowStream;
  // One whole waveform's rows (PredictWaveform).
  absl::StatusOr<std::vector<float>> Predict(const std::vector<float>& samples);
};

// The rows of one file computed as its samples arrive. Rows go through the models in blocks of
// `batch` from the file's start (rows [0, batch), [batch, 2 batch), ...), as a whole-file pass
// cuts them, and a block runs once every sample its views read is there (up to the block's end
// plus the largest TTA shift): the batches, hence the probabilities, are the whole-file ones
// however the samples are fed. Only the samples from the next block's first view on are kept,
// so a file of any length holds about one block of samples. Thread-compatible.
class Predictor::Impl::RowStream {
 public:
  explicit RowStream(Impl* impl)
      : impl_(impl), shifts_(TtaShifts(impl->tta, impl->window)) {
    for (int64_t s : shifts_) max_shift_ = std::max(max_shift_, std::abs(s));
  }

  // Appends `n` samples and runs the blocks they complete.
  absl::Status Feed(const float* samples, int64_t n) {
    return Guarded([&] { return FeedUnguarded(samples, n); });
  }

  // Samples the next block waits for (>= 1).
  int64_t Wanted() const {
    return std::max<int64_t>(1, (next_row_ + impl_->batch) * impl_->window + max_shift_ - fed_);
  }
  int64_t fed() const { return fed_; }
  int64_t rows_done() const { return next_row_; }
  int64_t peak_samples() const { return peak_; }

  // The file ended after the samples fed: its last rows (zeros past the end), then every row
  // averaged over views and models and smoothed: row-major [max(1, ceil(fed / W)), classes].
  absl::StatusOr<std::vector<float>> Finish() {
    std::vector<float> rows;
    AVIARY_RETURN_IF_ERROR(Guarded([&]() -> absl::Status {
      AVIARY_ASSIGN_OR_RETURN(rows, FinishUnguarded());
      return absl::OkStatus();
    }));
    return rows;
  }

 private:
  // An exception (std::bad_alloc of a buffer) as an error: it must not leave Run with decode
  // threads running.
  template <typename F>
  static absl::Status Guarded(F&& f) {
    try {
      return f();
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError("inference: out of memory (std::bad_alloc)");
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("inference: ", e.what()));
    }
  }

  absl::Status FeedUnguarded(const float* samples, int64_t n) {
    buffer_.insert(buffer_.end(), samples, samples + n);
    fed_ += n;
    peak_ = std::max(peak_, static_cast<int64_t>(buffer_.size()));
    const int64_t window = impl_->window, batch = impl_->batch;
    while (fed_ >= (next_row_ + batch) * window + max_shift_) {
      AVIARY_RETURN_IF_ERROR(impl_->CheckStop());
      AVIARY_RETURN_IF_ERROR(RunBlock(next_row_, next_row_ + batch));
      next_row_ += batch;
    }
    // The next block's views start at next_row_ * window - max_shift_.
    const int64_t keep_from = std::max<int64_t>(0, next_row_ * window - max_shift_);
    if (keep_from > buffer_start_) {
      buffer_.erase(buffer_.begin(), buffer_.begin() + (keep_from - buffer_start_));
      buffer_start_ = keep_from;
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<float>> FinishUnguarded() {
    const int64_t rows = std::max<int64_t>(1, (fed_ + impl_->window - 1) / impl_->window);
    while (next_row_ < rows) {
      const int64_t end = std::min<int64_t>(next_row_ + impl_->batch, rows);
      // Here too: a file of fewer windows than a batch (a soundscape's 48 against 64) runs whole
      // here, and a stop waited for it (and its views and models).
      AVIARY_RETURN_IF_ERROR(impl_->CheckStop());
      AVIARY_RETURN_IF_ERROR(RunBlock(next_row_, end));
      next_row_ = end;
    }
    buffer_.clear();
    buffer_.shrink_to_fit();
    const int64_t classes = static_cast<int64_t>(impl_->class_names.size());
    return SmoothRows(probs_, rows, classes, impl_->options.smooth);
  }

  // Rows [r0, r1): every view of every row through the models, summed over views in order and
  // divided by views x models, appended to probs_.
  absl::Status RunBlock(int64_t r0, int64_t r1) {
    const int64_t window = impl_->window;
    const int64_t count = r1 - r0;
    const int64_t classes = static_cast<int64_t>(impl_->class_names.size());
    try {
      c10::InferenceMode guard;
      // The file's samples [r0 W - M, r1 W + M), zeros outside the file.
      const int64_t lo = r0 * window - max_shift_;
      const int64_t len = count * window + 2 * max_shift_;
      at::Tensor segment = at::zeros({len}, at::kFloat);
      const int64_t from = std::max<int64_t>(lo, 0);
      const int64_t to = std::min<int64_t>(lo + len, fed_);
      if (to > from) {
        segment.narrow(0, from - lo, to - from)
            .copy_(at::from_blob(buffer_.data() + (from - buffer_start_), {to - from}, at::kFloat));
      }
      at::Tensor total = at::zeros({count, classes}, at::kFloat);
      for (int64_t shift : shifts_) {
        if (shift != shifts_.front()) AVIARY_RETURN_IF_ERROR(impl_->CheckStop());  // a batch x models each
        at::Tensor view = segment.as_strided({count, window}, {window, 1}, max_shift_ + shift);
        total.add_(impl_->ForwardWindows(view.contiguous()));
      }
      total.div_(static_cast<double>(shifts_.size() * impl_->models.size()));
      const float* p = total.data_ptr<float>();
      probs_.insert(probs_.end(), p, p + total.numel());
      return absl::OkStatus();
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("inference: ", e.what_without_backtrace()));
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("inference: ", e.what()));
    }
  }

  Impl* impl_;
  std::vector<int64_t> shifts_;
  int64_t max_shift_ = 0;
  std::vector<float> buffer_;  // the file's samples [buffer_start_, buffer_start_ + size)
  int64_t buffer_start_ = 0;
  int64_t fed_ = 0;
  int64_t next_row_ = 0;       // rows before it are in probs_
  int64_t peak_ = 0;
  std::vector<float> probs_;   // rows [0, next_row_) x classes
};

// Fed in pieces: only about a block's samples are copied.
absl::StatusOr<std::vector<float>> Predictor::Impl::Predict(const std::vector<float>& samples) {
  RowStream rows(this);
  constexpr int64_t kPiece = int64_t{1} << 20;
  const int64_t n = static_cast<int64_t>(samples.size());
  for (int64_t at = 0; at < n; at += kPiece) {
    AVIARY_RETURN_IF_ERROR(rows.Feed(samples.data() + at, std::min(kPiece, n - at)));
  }
  return rows.Finish();
}

Predictor::Predictor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Predictor::~Predictor() = default;

absl::StatusOr<std::unique_ptr<Predictor>> Predictor::Create(const PredictOptions& options) {
  if (options.checkpoints.empty()) {
    return absl::InvalidArgumentError("no checkpoint given (--checkpoint RUN/best.pt)");
  }
  if (!(options.window_s > 0) || !std::isfinite(options.window_s)) {
    return absl::InvalidArgumentError(
        absl::StrCat("window: expected seconds > 0, got ", options.window_s));
  }
  if (options.batch_windows < 0 || options.tta < 0 || options.decode_threads < 1 ||
      options.prefetch < 1 || options.chunk_samples < 0 || !(options.progress_interval_s >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch ", options.batch_windows, ", tta ", options.tta, ", decode threads ",
                     options.decode_threads, ", prefetch ", options.prefetch, ", chunk samples ",
                     options.chunk_samples, ", progress interval ", options.progress_interval_s,
                     ": expected batch >= 0, tta >= 0, decode threads >= 1, prefetch >= 1, "
                     "chunk samples >= 0, progress interval >= 0"));
  }
  if (!options.smooth.empty()) {
    double sum = 0;
    for (double w : options.smooth) {
      if (!(w >= 0) || !std::isfinite(w)) {
        return absl::InvalidArgumentError(
            absl::StrCat("smooth: weights must be finite and >= 0, got ", w));
      }
      sum += w;
    }
    if (options.smooth.size() % 2 == 0 || !(sum > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("smooth: expected an odd number of weights with a positive sum, got ",
                       absl::StrJoin(options.smooth, ",")));
    }
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  if (options.device == "cuda" || (options.device == "auto" && at::hasCUDA())) {
    if (!at::hasCUDA()) {
      return absl::FailedPreconditionError(
          "--device cuda: this libtorch has no usable CUDA device");
    }
    impl->device = c10::Device(c10::kCUDA, 0);
    // float32 on the GPU as on the CPU and in ONNX: cuDNN's convolutions and cuBLAS's matmuls
    // default to TF32 on Ampere and later (10 mantissa bits), which moved probabilities by up to
    // 2.7e-3 (bench/gpu/acceptance.sh). Process-wide; the legacy setters exist in libtorch 1.13
    // and 2.x and keep 2.x's per-op precision flags consistent.
    at::globalContext().setAllowTF32CuBLAS(false);
    at::globalContext().setAllowTF32CuDNN(false);
  } else if (options.device != "cpu" && options.device != "auto") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device: expected auto, cpu or cuda, got '", options.device, "'"));
  }
  if (options.threads > 0) at::set_num_threads(options.threads);

  std::vector<common::PipelineConfig> configs;
  for (const std::string& path : options.checkpoints) {
    // The metadata, the tensors and the EMA group are read in three opens: of one file.
    const std::optional<common::FileVersion> version = common::VersionOf(path);
    AVIARY_ASSIGN_OR_RETURN(CheckpointMeta meta, ReadCheckpointMeta(path));
    if (meta.class_names.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          path,
          ": the checkpoint has no class names (label order), so its outputs cannot be "
          "named; use a checkpoint written by aviary-worker train"));
    }
    if (static_cast<int>(meta.class_names.size()) != meta.num_classes) {
      return absl::FailedPreconditionError(absl::StrCat(path, ": ", meta.class_names.size(),
                                                        " class names for ", meta.num_classes,
                                                        " model outputs"));
    }
    AVIARY_ASSIGN_OR_RETURN(
        common::PipelineConfig config,
        common::ParsePipelineConfig(meta.config_yaml, absl::StrCat(path, " (config_yaml)")));
    if (impl->class_names.empty()) {
      impl->class_names = meta.class_names;
      impl->sample_rate = config.data.sample_rate;
      AVIARY_ASSIGN_OR_RETURN(impl->channels,
                              WithPath(ParseChannelMode(config.data.channels), absl::StrCat(path, " (config_yaml)")));
    } else {
      const std::string& first = options.checkpoints[0];
      if (meta.class_names != impl->class_names) {
        size_t i = 0;
        while (i < meta.class_names.size() && i < impl->class_names.size() &&
               meta.class_names[i] == impl->class_names[i]) {
          ++i;
        }
        auto name_at = [](const std::vector<std::string>& v, size_t k) {
          return k < v.size() ? absl::StrCat("'", v[k], "'") : std::string("nothing");
        };
        return absl::FailedPreconditionError(
            absl::StrCat("ensemble checkpoints have different label sets: ", path, " has ",
                         meta.class_names.size(), " classes, ", first, " has ",
                         impl->class_names.size(), "; first difference at column ", i + 1, ": ",
                         name_at(meta.class_names, i), " vs ", name_at(impl->class_names, i)));
      }
      if (config.data.sample_rate != impl->sample_rate ||
          config.data.channels != configs[0].data.channels) {
        return absl::FailedPreconditionError(absl::StrCat(
            "ensemble checkpoints decode audio differently: ", path, " uses ",
            config.data.sample_rate, " Hz, channels ", config.data.channels, "; ", first, " uses ",
            impl->sample_rate, " Hz, channels ", configs[0].data.channels));
      }
    }
    AVIARY_ASSIGN_OR_RETURN(std::shared_ptr<ClassifierImpl> model,
                            WithPath(BuildClassifier(config.model, meta.in_channels, meta.num_classes), path));
    AVIARY_ASSIGN_OR_RETURN(CheckpointMeta restored, RestoreCheckpoint(path, *model, nullptr));
    (void)restored;
    common::TrainConfig stage_train = config.train;
    if (auto stage = common::GetStage(config, meta.stage); stage.ok()) stage_train = (*stage)->train;
    AVIARY_ASSIGN_OR_RETURN(const bool ema, UseValidatedWeights(path, stage_train, *model));
    AVIARY_RETURN_IF_ERROR(common::CheckUnchanged(path, version));
    model->eval();
    if (absl::Status st = PlaceModel(*model, impl->device, options.channels_last); !st.ok()) {
      return common::Annotate(st, path);
    }
    if (config.frontend.in_channels != meta.in_channels) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, ": frontend.in_channels ", config.frontend.in_channels,
                       " differs from the model's ", meta.in_channels, " input channels"));
    }
    size_t fe = impl->frontends.size();
    for (size_t k = 0; k < configs.size(); ++k) {
      if (SameFrontend(configs[k].frontend, config.frontend)) fe = impl->frontend_of[k];
    }
    if (fe == impl->frontends.size()) {
      AVIARY_ASSIGN_OR_RETURN(
          std::unique_ptr<MelFrontend> frontend,
          MelFrontend::Create(config.frontend, config.augment, config.data.sample_rate,
                              impl->device,
                              options.channels_last ? c10::MemoryFormat::ChannelsLast
                                                    : c10::MemoryFormat::Contiguous));
      impl->frontends.push_back(std::move(frontend));
    }
    impl->frontend_of.push_back(fe);
    PredictModelInfo info;
    info.path = path;
    info.model_name = meta.model_name;
    info.stage = meta.stage;
    info.fold = meta.fold;
    info.epoch = meta.epoch;
    info.sigmoid = model->sigmoid();
    info.ema = ema;
    if (!impl->infos.empty() && info.sigmoid != impl->infos[0].sigmoid) {
      // Softmax rows sum to 1, sigmoid ones do not: averaged, one model's scale decides the
      // ranking of every class.
      auto act = [](bool sigmoid) { return sigmoid ? "sigmoid (loss BCE)" : "softmax (loss CCE)"; };
      return absl::FailedPreconditionError(absl::StrCat(
          "ensemble checkpoints end in different activations: ", path, " in ", act(info.sigmoid), ", ",
          options.checkpoints[0], " in ", act(impl->infos[0].sigmoid),
          ": their probabilities do not average; predict them apart"));
    }
    impl->infos.push_back(info);
    impl->models.push_back(std::move(model));
    configs.push_back(std::move(config));
  }

  // Defaults from the first checkpoint's stage settings.
  const common::PipelineConfig& first = configs[0];
  common::TrainConfig train = first.train;
  if (auto stage = common::GetStage(first, impl->infos[0].stage); stage.ok()) {
    train = (*stage)->train;
  }
  impl->batch = options.batch_windows > 0 ? options.batch_windows
                                          : std::max(1, train.infer_bs * train.batch_size);
  impl->tta = options.tta > 0 ? options.tta : std::max(1, train.tta);
  AVIARY_RETURN_IF_ERROR(common::CheckWindowIsWholeSamples(options.window_s, impl->sample_rate, "window"));
  impl->window = static_cast<int64_t>(std::llround(options.window_s * impl->sample_rate));
  for (const auto& fe : impl->frontends) {
    if (impl->window < fe->MinSamples()) {
      return absl::InvalidArgumentError(
          absl::StrCat("window: ", options.window_s, " s is ", impl->window,
                       " samples, fewer than the front end needs (", fe->MinSamples(), ")"));
    }
  }
  // A small_cnn trained on longer clips cannot take a window of too few frames (its pools).
  for (size_t k = 0; k < configs.size(); ++k) {
    AVIARY_RETURN_IF_ERROR(common::Annotate(
        common::CheckWindowFitsModel(configs[k], impl->window, absl::StrCat("window: ", options.window_s, " s")),
        options.checkpoints[k]));
  }
  return std::unique_ptr<Predictor>(new Predictor(std::move(impl)));
}

absl::StatusOr<std::vector<float>> Predictor::PredictWaveform(const std::vector<float>& samples) {
  return impl_->Predict(samples);
}

absl::StatusOr<PredictReport> Predictor::Run(
    const std::vector<std::string>& input_files, std::ostream& csv,
    const std::function<void(const PredictProgress&)>& progress) {
  const auto start = std::chrono::steady_clock::now();
  // A file not named as audio right after the audio-named file of its stem (XC1.bwf after
  // XC1.ogg, wherever it sorts): it is predicted under the stem only when that one gave no rows
  // (empty, corrupt), and skipped as a duplicate when it did. Decided before the audio file's
  // outcome, the stem got no rows at all when the audio file was the broken one.
  const std::vector<std::string> audio_files = AudioNamedFirst(input_files);
  PredictReport report;
  report.files_total = static_cast<int64_t>(audio_files.size());
  std::vector<std::string> header{"row_id"};
  header.insert(header.end(), impl_->class_names.begin(), impl_->class_names.end());
  errno = 0;
  common::WriteCsvRow(csv, header);
  csv.flush();  // a full disk is said before any file is decoded
  if (!csv) return CsvWriteError("writing the CSV failed at its header", errno);

  // Decoders take the files in order, at most `prefetch` ahead of the one in inference, and
  // stream each one's samples to it: a file of any length holds about a chunk and a batch of
  // windows' samples.
  const size_t n = audio_files.size();
  std::vector<FileStream> slots(n);
  std::mutex mu;
  std::condition_variable cv;
  size_t next_to_decode = 0;
  size_t consumed = 0;
  bool stop = false;
  DecodeOptions decode_options;
  decode_options.target_sample_rate = impl_->sample_rate;
  decode_options.channels = impl_->channels;
  decode_options.max_samples = kPredictMaxSamples;  // streamed: no whole file is held
  const size_t prefetch = static_cast<size_t>(impl_->options.prefetch);
  const int64_t chunk = impl_->options.chunk_samples > 0 ? impl_->options.chunk_samples : kDefaultChunkSamples;
  auto decoder = [&] {
    while (true) {
      size_t i;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] {
          return stop || next_to_decode >= n || next_to_decode < consumed + prefetch;
        });
        if (stop || next_to_decode >= n) return;
        i = next_to_decode++;
      }
      StreamSink sink(&slots[i], &mu, &cv, &stop, static_cast<size_t>(chunk));
      absl::StatusOr<DecodeResult> result = DecodeAudioTo(audio_files[i], decode_options, &sink);
      {
        std::lock_guard<std::mutex> lock(mu);
        if (result.ok()) {
          slots[i].result = std::move(*result);
        } else {
          slots[i].error = result.status();
        }
        slots[i].done = true;
      }
      cv.notify_all();
    }
  };
  std::vector<std::thread> threads;
  const int num_decoders =
      std::max(1, std::min<int>(impl_->options.decode_threads, static_cast<int>(n)));
  auto join = [&] {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    for (std::thread& t : threads) t.join();
    threads.clear();
  };
  // As many decoders as the system starts (EAGAIN under a thread limit): fewer are slower, none
  // is an error; a started thread must be joined before it goes, or the process ends.
  threads.reserve(static_cast<size_t>(num_decoders));  // no reallocation with threads started
  try {
    for (int t = 0; t < num_decoders && n > 0; ++t) threads.emplace_back(decoder);
  } catch (const std::system_error& e) {
    if (threads.empty()) {
      return absl::ResourceExhaustedError(absl::StrCat("predict: cannot start a decode thread: ", e.what()));
    }
    common::Logger("predict").Warn(absl::StrCat("started ", threads.size(), " of ", num_decoders,
                                                " decode threads (", e.what(), "); decoding is slower"));
  }

  absl::Status status;
  std::string text;
  std::map<std::string, std::string> predicted_stems;  // stem -> the file whose rows carry it
  int64_t csv_bytes = static_cast<int64_t>(csv.tellp());  // after the last whole file's rows
  std::vector<float> samples;  // taken from the decoder, fed to the rows
  PredictProgress whole_files;  // as of the last whole file
  whole_files.files_total = report.files_total;
  whole_files.csv_bytes = csv_bytes;
  double last_progress_s = 0;
  // An exception on the way (an allocation for a long file's rows, a stream set to throw, a
  // callback's) ends the run with a status, the decoders joined as after any failure: unwound
  // past them, their joinable threads ended the process (no status, no .partial).
  size_t at = 0;
  try {
    for (size_t i = 0; i < n; ++i) {
      at = i;
      if (absl::Status stop = impl_->CheckStop(); !stop.ok()) {
        status = absl::Status(stop.code(), absl::StrCat("before ", audio_files[i], ": ", stop.message()));
        break;
      }
      const std::string stem = Stem(audio_files[i]);
      // A file skipped for its stem if it decodes, said before its samples are looked at.
      std::string duplicate;
      if (auto seen = predicted_stems.find(stem); seen != predicted_stems.end()) {
        // Its stem's rows are written: an audio-named file's (this one not named as audio, beside
        // it: ListAudioFiles lets it through), or the first of two files that both decode.
        duplicate = HasAudioExtension(seen->second) && !HasAudioExtension(audio_files[i])
                        ? absl::StrCat(audio_files[i], ": the same stem '", stem, "' as ", seen->second,
                                       ", the audio file predicted under it")
                        : absl::StrCat(audio_files[i], ": the same stem '", stem, "' as ", seen->second,
                                       " (predicted): its row ids would repeat those");
      }
      {
        std::lock_guard<std::mutex> lock(mu);
        consumed = i + 1;
        if (!duplicate.empty()) {
          slots[i].unwanted = true;
          slots[i].pending.clear();
        }
      }
      cv.notify_all();
      Impl::RowStream rows(impl_.get());
      FileStream file;  // the decode's outcome once done
      while (!file.done) {
        // Asked at each piece too: a file skipped for its stem is decoded to its end (its
        // verdict decides the reason) without a block of inference to ask before.
        if (absl::Status stop = impl_->CheckStop(); !stop.ok()) {
          status = absl::Status(stop.code(), absl::StrCat(audio_files[i], ": ", stop.message()));
          break;
        }
        // Woken for a block's worth (at most a chunk) or the end.
        const size_t wanted = static_cast<size_t>(std::min(rows.Wanted(), chunk));
        samples.clear();
        {
          const auto wait_start = std::chrono::steady_clock::now();
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return slots[i].done || slots[i].pending.size() >= wanted; });
          samples.swap(slots[i].pending);  // the decoder fills the emptied buffer next
          if (slots[i].done) {
            file = std::move(slots[i]);
            file.done = true;
            slots[i] = FileStream();
          }
          report.decode_wait_s += Seconds(wait_start);
        }
        cv.notify_all();
        if (!samples.empty() && duplicate.empty()) {
          const int64_t rows_before = rows.rows_done();
          if (absl::Status fed = rows.Feed(samples.data(), static_cast<int64_t>(samples.size())); !fed.ok()) {
            status = absl::Status(fed.code(), absl::StrCat(audio_files[i], ": ", fed.message()));
            break;
          }
          if (progress && rows.rows_done() > rows_before && Seconds(start) - last_progress_s >= impl_->options.progress_interval_s) {
            PredictProgress p = whole_files;
            p.elapsed_s = last_progress_s = Seconds(start);
            p.file_audio_seconds = static_cast<double>(rows.rows_done() * impl_->window) / impl_->sample_rate;
            progress(p);
          }
        }
      }
      if (!status.ok()) break;
      report.peak_file_samples = std::max(report.peak_file_samples, rows.peak_samples());
      const DecodeResult& r = file.result;
      const bool silent = file.error.ok() && r.failure.problem == AudioProblem::kSilent;
      if (!file.error.ok()) {
        // The decoder's own failure on this file (a resampler refusing its rate): skipped and
        // said, as an undecodable file is; the others are still predicted.
        report.skipped.push_back({audio_files[i], "error", absl::StrCat(audio_files[i], ": ", file.error.message())});
      } else if (!r.ok() && !silent) {
        report.skipped.push_back(
            {audio_files[i], AudioProblemName(r.failure.problem), r.failure.message});
      } else if (!duplicate.empty()) {
        report.skipped.push_back({audio_files[i], "duplicate_stem", duplicate});
      } else {
        predicted_stems.emplace(stem, audio_files[i]);
        absl::StatusOr<std::vector<float>> probs = rows.Finish();
        if (!probs.ok()) {
          status = absl::Status(probs.status().code(),
                                absl::StrCat(audio_files[i], ": ", probs.status().message()));
          break;
        }
        const int64_t classes = static_cast<int64_t>(impl_->class_names.size());
        const int64_t num_rows = static_cast<int64_t>(probs->size()) / classes;
        text.clear();
        for (int64_t row = 0; row < num_rows; ++row) {
          // Quoted as the header is, when the name needs it (a comma, a quote).
          common::AppendCsvField(&text, RowId(audio_files[i], static_cast<double>(row + 1) * impl_->options.window_s));
          for (int64_t c = 0; c < classes; ++c) {
            text += ',';
            AppendFloat(&text, (*probs)[static_cast<size_t>(row * classes + c)]);
          }
          text += '\n';
        }
        errno = 0;
        csv << text;
        csv.flush();  // a full disk is seen at this file, and the rows before it are whole
        if (!csv) {  // a full disk: said now, not after the other files' hours
          const int error = errno;
          status = CsvWriteError(absl::StrCat("writing the CSV failed at the rows of ", audio_files[i]), error);
          break;
        }
        csv_bytes = static_cast<int64_t>(csv.tellp());
        ++report.files_predicted;
        if (silent) ++report.silent_files;
        report.rows += num_rows;
        report.audio_seconds += static_cast<double>(rows.fed()) / impl_->sample_rate;
      }
      whole_files.files_done = static_cast<int64_t>(i + 1);
      whole_files.files_predicted = report.files_predicted;
      whole_files.rows = report.rows;
      whole_files.audio_seconds = report.audio_seconds;
      whole_files.csv_bytes = csv_bytes;
      if (progress) {
        PredictProgress p = whole_files;
        p.elapsed_s = last_progress_s = Seconds(start);
        progress(p);
      }
    }
  } catch (const std::exception& e) {
    status = absl::InternalError(absl::StrCat(at < n ? audio_files[at] : std::string("predict"), ": ", e.what()));
  }
  join();
  if (!status.ok()) return status;
  errno = 0;
  csv.flush();
  if (!csv) return CsvWriteError("writing the CSV failed at its end", errno);
  report.elapsed_s = Seconds(start);
  return report;
}

const std::vector<std::string>& Predictor::class_names() const { return impl_->class_names; }
const std::vector<PredictModelInfo>& Predictor::models() const { return impl_->infos; }
int Predictor::sample_rate() const { return impl_->sample_rate; }
int64_t Predictor::window_samples() const { return impl_->window; }
int Predictor::batch_windows() const { return impl_->batch; }
int Predictor::tta() const { return impl_->tta; }
std::string Predictor::device() const { return impl_->device.str(); }
int64_t Predictor::NumWindows(int64_t num_samples) const {
  return std::max<int64_t>(1, (num_samples + impl_->window - 1) / impl_->window);
}

absl::StatusOr<std::vector<std::string>> ListAudioFiles(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    const int error = errno;
    if (error == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
    return absl::Status(absl::ErrnoToStatusCode(error), absl::StrCat(path, ": cannot stat: ", common::ErrnoText(error)));
  }
  if (!S_ISDIR(st.st_mode)) return std::vector<std::string>{path};
  DIR* dir = ::opendir(path.c_str());
  if (dir == nullptr) {
    const int error = errno;
    return absl::Status(absl::ErrnoToStatusCode(error),  // EACCES: PERMISSION_DENIED
                        absl::StrCat(path, ": cannot open the folder: ", common::ErrnoText(error)));
  }
  std::vector<std::string> files;
  std::set<std::string> unseen;  // listed but not there to look at (stat failed)
  // A file that cannot be looked at (a dangling link, no permission) is listed, not left out:
  // its decode fails and Run reports it skipped ("missing"), where the submission would lack its
  // rows without a word, and the other files are predicted. Folders are not descended.
  absl::Status listed;
  while (listed.ok()) {
    errno = 0;
    struct dirent* e = ::readdir(dir);
    if (e == nullptr) {
      if (errno != 0) listed = absl::InternalError(absl::StrCat(path, ": readdir: ", common::ErrnoText(errno)));
      break;
    }
    std::string name = e->d_name;
    if (name.empty() || name[0] == '.') continue;
    std::string full = path.back() == '/' ? path + name : absl::StrCat(path, "/", name);
    struct stat fst;
    if (::stat(full.c_str(), &fst) != 0) {
      unseen.insert(full);
      files.push_back(full);
    } else if (S_ISREG(fst.st_mode)) {
      files.push_back(full);
    }
  }
  ::closedir(dir);
  AVIARY_RETURN_IF_ERROR(listed);
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no files to predict"));
  }
  // Two audio files of one stem (XC1.ogg and XC1.mp3) would give the same row ids: refused now.
  // Other files (XC1.txt beside XC1.ogg) are tried and skipped when not audio (Run skips one
  // that decodes with a stem already predicted), and so is one that is not there (a dangling
  // XC1.ogg beside XC1.wav: skipped as missing, it gives no rows).
  std::map<std::string, std::string> by_stem;
  for (const std::string& f : files) {
    if (!HasAudioExtension(f) || unseen.count(f)) continue;
    auto [it, inserted] = by_stem.emplace(Stem(f), f);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(it->second, " and ", f,
                                                     " have the same stem '", it->first,
                                                     "': their row ids would collide"));
    }
  }
  return files;
}

std::string RowId(const std::string& path, double end_s) {
  return absl::StrCat(Stem(path), "_", common::WindowEndText(end_s));
}

std::vector<int64_t> TtaShifts(int tta, int64_t window) {
  std::vector<int64_t> shifts{0};
  const double d = static_cast<double>(window) / (2.0 * std::max(1, tta));
  for (int k = 1; k < tta; ++k) {
    const int j = (k + 1) / 2;
    const double sign = k % 2 == 1 ? 1.0 : -1.0;
    shifts.push_back(static_cast<int64_t>(std::llround(sign * j * d)));
  }
  return shifts;
}

std::vector<float> SmoothRows(const std::vector<float>& probs, int64_t rows, int64_t cols,
                              const std::vector<double>& weights) {
  if (weights.empty() || rows <= 1) return probs;
  const int64_t half = static_cast<int64_t>(weights.size()) / 2;
  std::vector<float> out(probs.size(), 0.0f);
  std::vector<double> acc(static_cast<size_t>(cols));
  for (int64_t i = 0; i < rows; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0);
    double wsum = 0;
    for (int64_t j = -half; j <= half; ++j) {
      const int64_t r = i + j;
      if (r < 0 || r >= rows) continue;
      const double w = weights[static_cast<size_t>(j + half)];
      wsum += w;
      for (int64_t c = 0; c < cols; ++c)
        acc[static_cast<size_t>(c)] += w * probs[static_cast<size_t>(r * cols + c)];
    }
    for (int64_t c = 0; c < cols; ++c) {
      out[static_cast<size_t>(i * cols + c)] =
          wsum > 0 ? static_cast<float>(acc[static_cast<size_t>(c)] / wsum)
                   : probs[static_cast<size_t>(i * cols + c)];
    }
  }
  return out;
}

}  // namespace aviary::worker
