// aviary predict --checkpoint RUN/best.pt [--checkpoint ...] --audio DIR_OR_FILE --out sub.csv
//                [--window S] [--batch N] [--tta N] [--smooth w,w,w] [--threads N]
//                [--decode-threads N] [--device auto|cpu|cuda]
//                [--memory-format channels_last|contiguous]
//
// A BirdCLEF submission from trained checkpoints (worker/predict.h): one row per `window`
// seconds of every audio file, one probability column per class in label order. The CSV is
// written to a temporary file next to --out, fsynced and renamed when complete (a symbolic link
// as --out is written through: its target is replaced); after an error, or SIGINT / SIGTERM
// (checked between batches; then ended by that signal), the rows of the whole files written so far are kept
// as --out.partial. Undecodable files (a dangling link among them) are reported and skipped; the
// run ends with a summary on stdout (and exit 0 when at least one file was predicted, 2 when
// every file was skipped).
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/cpus.h"
#include "common/files.h"
#include "common/stop_signals.h"
#include "worker/tools/tools.h"
#include "worker/predict.h"

namespace aviary::cli {
namespace {

int Fail(const absl::Status& status) {
  std::cerr << "aviary predict: " << status.message() << "\n";
  return ExitCodeFor(status);
}

std::string Clock(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  int64_t s = static_cast<int64_t>(std::llround(seconds));
  if (s >= 3600) return absl::StrFormat("%d:%02d:%02d", s / 3600, (s / 60) % 60, s % 60);
  return absl::StrFormat("%d:%02d", s / 60, s % 60);
}

// A redrawn bar on a terminal, a line every 10 s otherwise (stderr).
class ProgressBar {
 public:
  ProgressBar() : tty_(::isatty(STDERR_FILENO) == 1) {}
  void Update(const worker::PredictProgress& p) {
    const bool last = p.files_done == p.files_total;
    // The end of a long file is drawn whatever the time: the bar would keep its in-file text.
    const bool file_ended = showing_in_file_ && p.file_audio_seconds == 0;
    if (!last && !file_ended && p.elapsed_s - last_s_ < (tty_ ? 0.2 : 10.0)) return;
    last_s_ = p.elapsed_s;
    showing_in_file_ = p.file_audio_seconds > 0;
    const double rate = p.elapsed_s > 0 ? p.files_done / p.elapsed_s : 0.0;
    const double eta = rate > 0 ? (p.files_total - p.files_done) / rate : -1.0;
    const double per_file = p.files_done > 0 ? p.elapsed_s / p.files_done : 0.0;
    // Within a long file: how much of it went through the model.
    const std::string in_file =
        p.file_audio_seconds > 0
            ? absl::StrCat(", file ", p.files_done + 1, ": ", Clock(p.file_audio_seconds), " of audio done")
            : std::string();
    if (tty_) {
      constexpr int kWidth = 30;
      int filled =
          p.files_total > 0 ? static_cast<int>(kWidth * p.files_done / p.files_total) : kWidth;
      std::string bar(static_cast<size_t>(filled), '#');
      bar.append(static_cast<size_t>(kWidth - filled), '.');
      std::fprintf(stderr, "\r\033[K[%s] %lld/%lld files  %.2f s/file  ETA %s%s", bar.c_str(),
                   static_cast<long long>(p.files_done), static_cast<long long>(p.files_total),
                   per_file, Clock(eta).c_str(), in_file.c_str());
      if (last) std::fprintf(stderr, "\n");
    } else {
      std::fprintf(stderr, "predict: %lld/%lld files, %.2f s/file, ETA %s%s\n",
                   static_cast<long long>(p.files_done), static_cast<long long>(p.files_total),
                   per_file, Clock(eta).c_str(), in_file.c_str());
    }
    std::fflush(stderr);
  }

 private:
  bool tty_;
  double last_s_ = -1e9;
  bool showing_in_file_ = false;  // the last line drawn was within a file
};

absl::StatusOr<std::vector<double>> ParseWeights(const std::string& text) {
  std::vector<double> weights;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    double w = 0;
    if (!absl::SimpleAtod(part, &w)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--smooth: expected comma-separated weights such as 0.25,0.5,0.25, got '", text, "'"));
    }
    weights.push_back(w);
  }
  return weights;
}

struct PredictArgs {
  worker::PredictOptions options;
  std::string audio;
  std::string out;       // as given
  std::string out_file;  // `out` through its symbolic links (common::ResolveOutputPath): written
  std::string smooth;
  bool smooth_given = false;
  std::string memory_format = "channels_last";
};

// The folder of `path` ("." for a bare name).
std::filesystem::path FolderOf(const std::string& path) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? std::filesystem::path(".") : parent;
}

// --out among the files to predict: an earlier run's CSV (or its .partial, or a run's temporary
// `.tmp.<suffix>` file) in the --audio folder is left out, by the name given and by the name its
// links lead to; an --out named as audio, or the --audio file itself, is refused (it would be
// replaced). Compared by name within the folder, and by inode for the one file given.
absl::Status LeaveOutTheOutput(const PredictArgs& args, std::vector<std::string>* files) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(args.audio, ec)) {
    AVIARY_RETURN_IF_ERROR(common::CheckNotTheInput(args.out, "--out", args.audio, "audio file"));
    return common::CheckNotTheInput(args.out_file, "--out", args.audio, "audio file");
  }
  std::vector<std::string> out_names;  // of --out and its target, in the --audio folder
  for (const std::string& out : {args.out, args.out_file}) {
    if (!fs::equivalent(FolderOf(out), args.audio, ec) || ec) continue;
    const std::string out_name = fs::path(out).filename().string();
    if (worker::HasAudioExtension(out_name)) {
      return absl::InvalidArgumentError(absl::StrCat("--out ", args.out, ": in the --audio folder ", args.audio,
                                                     " with an audio file's name: write elsewhere (it would be "
                                                     "replaced, or read as audio by the next run)"));
    }
    out_names.push_back(out_name);
  }
  if (out_names.empty()) return absl::OkStatus();
  auto is_output = [&](const std::string& f) {
    const std::string name = fs::path(f).filename().string();
    for (const std::string& out_name : out_names) {
      if (name == out_name || name == out_name + ".partial") return true;
      const std::string tmp = out_name + ".tmp.";
      if (absl::StartsWith(name, tmp) && common::IsTemporarySuffix(absl::string_view(name).substr(tmp.size()))) {
        return true;
      }
    }
    return false;
  };
  files->erase(std::remove_if(files->begin(), files->end(), is_output), files->end());
  if (files->empty()) {
    return absl::InvalidArgumentError(absl::StrCat(args.audio, ": no files to predict besides --out"));
  }
  return absl::OkStatus();
}

// The CSV's bytes on disk before the rename publishes it (as WriteFileAtomically does).
absl::Status SyncFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::InternalError(absl::StrCat("open ", path, ": ", common::ErrnoText(errno)));
  const int rc = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (rc != 0) return absl::InternalError(absl::StrCat("fsync ", path, ": ", common::ErrnoText(error)));
  return absl::OkStatus();
}

// After a failed or stopped run: the rows of the whole files in `tmp` (as `last` counts them; a
// failed write may have left part of a row) kept as `partial`, else `tmp` removed. Says which.
void KeepWholeFilesRows(const std::string& tmp, const std::string& partial, const std::string& out,
                        const worker::PredictProgress& last, const char* before_what) {
  if (last.rows > 0 && last.csv_bytes > 0 && ::truncate(tmp.c_str(), last.csv_bytes) == 0) {
    // On disk before it is said to be there, as the finished CSV is (a crash after the message
    // left an empty or missing .partial); as far as the filesystem syncs at all: the rows are
    // kept either way.
    SyncFile(tmp).IgnoreError();
    if (std::rename(tmp.c_str(), partial.c_str()) == 0) {
      common::SyncFolder(std::filesystem::path(partial).parent_path().string()).IgnoreError();
      common::WriteLineToStderr(absl::StrCat("aviary predict: the rows of the ", last.files_predicted,
                                             " file(s) predicted before the ", before_what, " (", last.rows,
                                             " rows; ", last.files_done, " of ", last.files_total,
                                             " files done) are in ", partial, "; ", out, " not written"));
      return;
    }
  }
  std::remove(tmp.c_str());
}

int RunPredict(const PredictArgs& args) {
  worker::PredictOptions options = args.options;
  const std::string& memory_format = args.memory_format;
  if (args.smooth_given) {
    auto weights = ParseWeights(args.smooth);
    if (!weights.ok()) return Fail(weights.status());
    options.smooth = *weights;
  }
  options.channels_last = memory_format == "channels_last";
  options.should_stop = [] { return common::StopSignal() != 0; };  // the handlers are installed before Run

  // A folder (or a missing one) as --out is said now, not after the run when the rename fails.
  if (absl::Status out = common::CheckOutputPath("--out", args.out); !out.ok()) return Fail(out);
  // A symbolic link as --out is written through, as a shell's `>` would: the temporary file, the
  // .partial and the rename are beside its target, which the rename replaces (a rename onto the
  // link replaced the link with a file, and its target kept the old rows).
  PredictArgs resolved = args;
  absl::StatusOr<std::string> out_file = common::ResolveOutputPath(args.out);
  if (!out_file.ok()) return Fail(common::Annotate(out_file.status(), "--out"));
  resolved.out_file = *out_file;
  const std::string& out = resolved.out_file;
  if (out != args.out) {
    if (absl::Status target = common::CheckOutputPath(absl::StrCat("--out ", args.out, ": its link's target"), out);
        !target.ok()) {
      return Fail(target);
    }
  }
  for (const std::string& checkpoint : options.checkpoints) {
    for (const std::string& path : {args.out, out}) {
      if (absl::Status in = common::CheckNotTheInput(path, "--out", checkpoint, "checkpoint"); !in.ok()) {
        return Fail(in);
      }
    }
  }
  auto files = worker::ListAudioFiles(args.audio);
  if (!files.ok()) return Fail(files.status());
  if (absl::Status in = LeaveOutTheOutput(resolved, &*files); !in.ok()) return Fail(in);
  auto predictor = worker::Predictor::Create(options);
  if (!predictor.ok()) return Fail(predictor.status());
  const worker::Predictor& p = **predictor;
  for (const worker::PredictModelInfo& m : p.models()) {
    std::cout << "checkpoint " << m.path << ": " << m.model_name << ", stage " << m.stage
              << " fold " << m.fold << ", "  // epochs from 0, as history.csv
              << (m.epoch >= 0 ? absl::StrCat("after epoch ", m.epoch) : std::string("within epoch 0"))
              << ", "
              << (m.sigmoid ? "sigmoid" : "softmax") << (m.ema ? ", EMA weights (ema_eval)" : "") << "\n";
  }
  std::cout << files->size() << " file(s), " << p.class_names().size() << " classes, window "
            << options.window_s << " s (" << p.window_samples() << " samples at " << p.sample_rate()
            << " Hz), batch " << p.batch_windows() << ", tta " << p.tta() << ", smoothing "
            << (options.smooth.empty() ? "off" : args.smooth) << ", device " << p.device()
            << ", " << options.threads << " thread(s), " << memory_format << std::endl;

  // SIGINT / SIGTERM (and SIGUSR2, as for train) stop the run between batches: the whole files'
  // rows become --out.partial. A second signal ends the process at once.
  // SIGINT, SIGTERM, SIGUSR2 (Slurm's --signal): the first stops the run between batches, its
  // rows of whole files kept as .partial, then the process ends by that signal; a second one
  // ends it at once (its rows are left in the .tmp. file).
  common::InstallStopSignals({SIGINT, SIGTERM, SIGUSR2});
  // Named by this process (TemporarySuffix, as export's staged files): two runs to one --out
  // never share a temporary file.
  const std::string tmp = absl::StrCat(out, ".tmp.", common::TemporarySuffix());
  std::ofstream csv(tmp, std::ios::binary | std::ios::trunc);
  if (!csv) {
    const int error = errno;
    return Fail(absl::Status(absl::ErrnoToStatusCode(error),
                             absl::StrCat("--out ", args.out, ": cannot write ", tmp, ": ", common::ErrnoText(error))));
  }
  ProgressBar bar;
  worker::PredictProgress last;  // the files done so far (their rows are in the CSV)
  auto report = (*predictor)->Run(*files, csv, [&bar, &last](const worker::PredictProgress& progress) {
    last = progress;
    bar.Update(progress);
  });
  errno = 0;
  csv.close();
  if (report.ok() && !csv) {  // a network filesystem tells a full disk at the last flush
    const int error = errno;
    report = absl::Status(error == ENOSPC || error == EDQUOT ? absl::StatusCode::kResourceExhausted
                                                             : absl::StatusCode::kInternal,
                          absl::StrCat("writing ", tmp, " failed: ", common::ErrnoText(error)));
  }
  if (!report.ok() && absl::StartsWith(report.status().message(), "writing the CSV")) {
    // Run's write errors, with the file they were writing.
    report = absl::Status(report.status().code(),
                          absl::StrCat("writing ", tmp, report.status().message().substr(strlen("writing the CSV"))));
  }
  if (report.ok() && report->files_predicted > 0) {
    if (absl::Status synced = SyncFile(tmp); !synced.ok()) report = synced;
  }
  if (!report.ok()) {
    // The rows written so far are kept (hours of inference on a CPU), apart from --out.
    const std::string partial = absl::StrCat(out, ".partial");
    if (const int signal = common::StopSignal(); absl::IsCancelled(report.status()) && signal != 0) {
      KeepWholeFilesRows(tmp, partial, args.out, last, "stop");
      common::WriteLineToStderr(absl::StrCat("aviary predict: stopped by ", common::StopSignalName(signal), " (",
                                             report.status().message(), "); ", args.out, " not written"));
      return common::EndByStopSignal(signal);
    }
    KeepWholeFilesRows(tmp, partial, args.out, last, "error");
    return Fail(report.status());
  }
  if (report->files_predicted == 0) std::remove(tmp.c_str());  // no submission without rows
  if (report->files_predicted > 0 && std::rename(tmp.c_str(), out.c_str()) != 0) {
    // The complete CSV stays under its temporary name: nothing to predict again.
    return Fail(absl::InternalError(absl::StrCat("rename ", tmp, " -> ", out, ": ", common::ErrnoText(errno),
                                                 "; the complete CSV is kept as ", tmp)));
  }
  if (report->files_predicted > 0) {
    if (absl::Status synced = common::SyncFolder(std::filesystem::path(out).parent_path().string()); !synced.ok()) {
      return Fail(synced);
    }
  }

  const worker::PredictReport& r = *report;
  std::cout << (r.files_predicted > 0 ? "wrote " : "did not write ") << args.out << ": " << r.rows
            << " rows from " << r.files_predicted << " of " << r.files_total << " file(s)"
            << (r.silent_files > 0 ? absl::StrCat(" (", r.silent_files, " silent)") : "")
            << absl::StrFormat(", %.1f min of audio in %.2f s (%.3f s per file, %.0fx real time)",
                               r.audio_seconds / 60.0, r.elapsed_s,
                               r.files_predicted > 0 ? r.elapsed_s / r.files_predicted : 0.0,
                               r.elapsed_s > 0 ? r.audio_seconds / r.elapsed_s : 0.0)
            << "\n";
  if (!r.skipped.empty()) {
    std::map<std::string, int> counts;
    for (const auto& s : r.skipped) ++counts[s.reason];
    std::cout << "skipped " << r.skipped.size() << " file(s) (no rows):";
    for (const auto& [reason, count] : counts) std::cout << " " << count << " " << reason;
    std::cout << "\n";
    for (const auto& s : r.skipped) std::cout << "  " << s.reason << ": " << s.message << "\n";
  }
  if (r.files_predicted == 0) {
    std::cerr << "aviary predict: no file could be predicted; " << args.out << " not written\n";
    return 2;
  }
  return 0;
}

}  // namespace

void AddPredictCommand(CLI::App* app, common::CommandRunner* run) {
  auto args = std::make_shared<PredictArgs>();
  worker::PredictOptions& o = args->options;
  o.threads = common::UsableCores();  // affinity and a container's quota, not the host's cores
  o.decode_threads = 1;
  o.device = "auto";
  CLI::App* predict = common::AddCommand(
      app, "predict", "a BirdCLEF submission from a checkpoint or an ensemble",
      "One row per window of every file (row_id = <file stem>_<end second>), one probability column per "
      "class; several --checkpoint are averaged with equal weights.");
  common::AddRepeatedOption(predict, "--checkpoint", &o.checkpoints, "RUN/best.pt",
                            "a trained model (repeat for an ensemble)")
      ->required()
      ->check(common::NonEmpty("a checkpoint"));
  predict->add_option("--audio", args->audio, "an audio file, or a folder of them")
      ->type_name("DIR_OR_FILE")
      ->required()
      ->check(common::NonEmpty("a file or folder"));
  predict->add_option("--out", args->out, "the submission CSV to write")
      ->type_name("sub.csv")
      ->required()
      ->check(common::NonEmpty("a path"));
  common::AddNumber(predict, "--window", &o.window_s, "S", "window, seconds", 0.01, 3600.0)->capture_default_str();
  common::AddNumber(predict, "--batch", &o.batch_windows, "N",
                    "windows per forward pass (default: the stage's infer_bs x batch_size)", 1, 1 << 20);
  common::AddNumber(predict, "--tta", &o.tta, "N", "views per window averaged (default: train.tta)", 1, 64);
  CLI::Option* smooth = predict->add_option(
      "--smooth", args->smooth, "centered moving average over neighbouring windows (an odd number of weights)");
  smooth->type_name("w,w,w");
  common::AddNumber(predict, "--threads", &o.threads, "N", "torch threads (default: the cores this process may use)", 1, 1024);
  common::AddNumber(predict, "--decode-threads", &o.decode_threads, "N", "decoders reading ahead", 1, 64)
      ->capture_default_str();
  predict->add_option("--device", o.device, "auto uses the GPU when libtorch has CUDA")
      ->type_name("auto|cpu|cuda")
      ->check(common::OneOf({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  predict->add_option("--memory-format", args->memory_format, "the model's activations' layout")
      ->type_name("channels_last|contiguous")
      ->check(common::OneOf({"channels_last", "contiguous"}))
      ->capture_default_str();
  predict->callback([run, args, smooth] {
    args->smooth_given = smooth->count() > 0;  // --smooth "" is refused, not taken as off
    *run = [args] { return RunPredict(*args); };
  });
}

}  // namespace aviary::cli
