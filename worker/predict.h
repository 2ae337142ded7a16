// Soundscape inference (`aviary predict`): BirdCLEF submissions from trained checkpoints.
//
// Every audio file is decoded (first channel or mean, resampled to the checkpoints'
// data.sample_rate, as in training) and cut into consecutive windows of `window_s` seconds; the
// last window is zero-padded at the end. A file of N samples at rate R gives
// max(1, ceil(N / W)) rows, W = round(window_s * R), with
//
//   row_id = <file stem>_<end second of the window>      (BirdCLEF 2024: "<stem>_5" .. "_240")
//
// and one probability column per class, in the checkpoint's label order (class_names; the
// header is `row_id` followed by those names). Each window goes through the checkpoint's mel
// front end (eval mode: no SpecAugment) and model; probabilities come from the model's final
// activation (softmax or sigmoid); the weights are the ones the run validated (with
// train.ema_eval, a last.pt's EMA average: worker/ema.h UseValidatedWeights). Models trained on
// longer clips work on shorter windows: the classifiers pool globally over time.
//
// Test-time augmentation (tta = N >= 1): N views of each window, averaged: the window itself
// and N - 1 copies shifted in time by +d, -d, +2d, -2d, ... with d = W / (2N) samples (N = 2:
// 0 and +W/4; N = 3: 0, +W/6, -W/6; N = 4: 0, +W/8, -W/8, +W/4). Samples outside the recording
// read as zeros.
//
// Ensembles: several checkpoints with the same class names (same order), sample rate and channel
// mode; their probabilities are averaged with equal weights (after each model's own final
// activation). Front ends with identical settings are computed once per batch.
//
// Smoothing (optional): weights w_0 .. w_{2h} (an odd count) of a centered moving average over
// neighbouring windows of the same file, applied after TTA and ensembling:
//   p'[i] = sum_j w_j p[i + j - h] / sum_j w_j   (j over the windows inside the file)
// so each row stays a convex combination (softmax rows still sum to 1).
//
// Pipeline: `decode_threads` threads decode the files in order, at most `prefetch` ahead of the
// one in inference, and stream their samples to it (at most `chunk_samples` of a file waiting):
// a file's rows go through the models in batches of `batch` windows as soon as the samples they
// read are decoded, and only the samples the next batch reads are kept. A file of any length
// (hours of a field recorder) therefore holds about a chunk plus a batch of windows' samples,
// and its probabilities are the ones of a whole-file pass. A file's rows are written when its
// decode has ended well: a file found truncated or non-finite partway has no rows, though its
// earlier windows went through the models (an inference error there ends the run). torch uses
// `threads` intra-op threads. Rows are written in the order of the input files.
//
// Bad input: files that cannot be decoded (missing, a dangling link among them; empty, not
// audio, truncated, no samples, NaN samples: the decode stops at the first), a decoder error on
// one file (reason "error") and a file whose stem a predicted file already had
// ("duplicate_stem") are skipped and reported in PredictReport::skipped, never fatal; silent
// files are predicted (all-zero input). A failed write of the CSV (a full disk) ends the run at
// that file. Checkpoints are refused at Create with FAILED_PRECONDITION or
// INVALID_ARGUMENT naming the file: not a checkpoint, no class names, class names that do not
// match num_classes, ensemble members with different label sets, sample rates or channel modes.
//
// Thread-compatible: one Run at a time per Predictor.
#ifndef AVIARY_WORKER_PREDICT_H_
#define AVIARY_WORKER_PREDICT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace aviary::worker {

struct PredictOptions {
  std::vector<std::string> checkpoints;  // best.pt / last.pt of `aviary-worker train`, >= 1
  double window_s = 5.0;                 // seconds per row, > 0
  int batch_windows = 0;        // windows per forward pass; 0 = infer_bs x batch_size of the first
                                // checkpoint's stage
  int tta = 0;                  // views per window; 0 = train.tta of the first checkpoint's stage
  std::vector<double> smooth;   // centered moving-average weights (odd count); empty = off
  int threads = 0;              // torch intra-op threads; 0 leaves torch's setting
  int decode_threads = 1;       // >= 1
  int prefetch = 2;             // files decoding ahead of the one in inference, >= 1
  int64_t chunk_samples = 0;    // decoded samples a file may have waiting; 0 = 2^23 (262 s at
                                // 32 kHz: a BirdCLEF soundscape is read ahead whole)
  std::string device = "auto";  // "auto" (CUDA when available), "cpu" or "cuda"
  // Least seconds between two progress calls within a file (Run), >= 0.
  double progress_interval_s = 1.0;
  // Run the models on channels-last (NHWC) tensors: the same values, ~1.4-1.7x faster on the
  // CPU with libtorch 1.13's oneDNN convolutions (docs/BENCHMARKS.md).
  bool channels_last = true;
  // Asked before every batch of windows and every file (optional; `aviary predict` asks whether
  // SIGINT or SIGTERM arrived): true ends Run with CANCELLED, the rows of the whole files before
  // in the CSV (the last progress call counts them). Called from Run's thread.
  std::function<bool()> should_stop;
};

struct PredictProgress {
  // Of the whole files done; a call within a file (a long one) repeats them.
  int64_t files_done = 0;  // predicted or skipped
  int64_t files_predicted = 0;
  int64_t files_total = 0;
  int64_t rows = 0;
  double audio_seconds = 0;  // of the predicted files
  double elapsed_s = 0;
  int64_t csv_bytes = -1;    // the CSV's length after these files' rows, flushed (-1: unknown)
  // Seconds of the file in inference whose windows went through the models; 0 in the call
  // after a file.
  double file_audio_seconds = 0;
};

struct SkippedFile {
  std::string path;
  std::string reason;  // AudioProblemName ("empty", "not_audio", ...), "error" or "duplicate_stem"
  std::string message;
};

struct PredictReport {
  int64_t files_total = 0;
  int64_t files_predicted = 0;
  int64_t silent_files = 0;  // predicted, though every sample is zero
  int64_t rows = 0;
  double audio_seconds = 0;
  double elapsed_s = 0;
  double decode_wait_s = 0;  // time inference waited for the decoder
  // The most decoded samples inference held for one file at once: about a batch of windows
  // (plus a chunk and the TTA shifts), whatever the files' lengths.
  int64_t peak_file_samples = 0;
  std::vector<SkippedFile> skipped;
};

// One checkpoint's settings as Predictor uses them (for messages and the CLI summary).
struct PredictModelInfo {
  std::string path;
  std::string model_name;
  std::string stage;
  int fold = 0;
  int epoch = -1;
  bool sigmoid = false;
  bool ema = false;  // the weights are the run's EMA average (ema_eval: best.pt, or last.pt's group)
};

class Predictor {
 public:
  // Loads and checks the checkpoints (see the file comment for the refusals), builds the
  // models in eval mode and their front ends on the chosen device.
  static absl::StatusOr<std::unique_ptr<Predictor>> Create(const PredictOptions& options);
  ~Predictor();
  Predictor(const Predictor&) = delete;
  Predictor& operator=(const Predictor&) = delete;

  // Probabilities of one decoded waveform (mono, at sample_rate()): row-major
  // [NumWindows(samples.size()), num_classes], TTA, ensemble and smoothing applied.
  absl::StatusOr<std::vector<float>> PredictWaveform(const std::vector<float>& samples);

  // Predicts `audio_files` in order and writes the CSV (header first) to `csv`. Undecodable
  // files are skipped and listed in the report. `progress` (may be empty) is called after each
  // file from the calling thread, and within a long file after a batch of its windows at most
  // every progress_interval_s (file_audio_seconds > 0). On an error (inference, or writing `csv`) the rows of the files
  // before it are in `csv` (the last progress call counts them).
  absl::StatusOr<PredictReport> Run(const std::vector<std::string>& audio_files, std::ostream& csv,
                                    const std::function<void(const PredictProgress&)>& progress);

  const std::vector<std::string>& class_names() const;
  const std::vector<PredictModelInfo>& models() const;
  int sample_rate() const;
  int64_t window_samples() const;
  int batch_windows() const;
  int tta() const;
  std::string device() const;
  // max(1, ceil(num_samples / window_samples())).
  int64_t NumWindows(int64_t num_samples) const;

 private:
  struct Impl;
  explicit Predictor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The files to predict: `path` itself when it is a file, else the regular files directly in the
// directory (not recursive; names starting with '.' left out), sorted by name. An entry that
// cannot be looked at (a dangling link, one stat(2) refuses) is listed too: Run reports it
// skipped ("missing") rather than leave its rows out without a word, and the other files are
// predicted. NOT_FOUND when `path` does not exist; the errno's code (PERMISSION_DENIED, ...)
// naming the folder when it cannot be read; INVALID_ARGUMENT for an empty directory or two audio
// files (by their extension: .ogg, .mp3, .flac, .wav, ...) with the same stem (their row ids
// would collide).
absl::StatusOr<std::vector<std::string>> ListAudioFiles(const std::string& path);

// Whether `path` ends in the extension of a format the decoder reads (libsndfile's and mp3:
// .ogg, .mp3, .flac, .wav, ...), any case.
bool HasAudioExtension(const std::string& path);

// "<stem of path>_<end_s>" with end_s printed without a fraction when it is whole ("XC1_5"),
// else with 6 decimals, trailing zeros trimmed ("XC1_2.5", "XC1_10001.25"; Python:
// f"{end_s:.6f}".rstrip("0").rstrip(".")): common::WindowEndText.
std::string RowId(const std::string& path, double end_s);

// Shifts in samples of the `tta` views of a `window` samples window (see the file comment).
std::vector<int64_t> TtaShifts(int tta, int64_t window);

// Centered moving average of row-major [rows, cols] `probs` with `weights` (odd count),
// renormalised at the edges. `weights` empty returns the input.
std::vector<float> SmoothRows(const std::vector<float>& probs, int64_t rows, int64_t cols,
                              const std::vector<double>& weights);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_PREDICT_H_
