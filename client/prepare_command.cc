// aviary prepare --config P.yaml [--stage S] [--threads N] [--shard-mb M] [--part R/N] [--dry-run]
//                [--set k=v ...]
//
// Decodes every audio file of the stage(s) once into the decoded-audio cache at data.cache_dir
// (worker/data/audio_cache.h): resampled to data.sample_rate, mono per data.channels, cut to
// the first data.cache_max_seconds seconds when that is > 0. Resumable: files already cached
// are skipped. data.cache_dir must be set (training reads the cache from there; with it empty,
// training decodes on the fly). --dry-run reads only the files' headers and prints what a run
// would decode and write. Under mpirun (or with --part R/N on several hosts) each process
// decodes its share of the files into the same cache.
#include <unistd.h>

#include <fcntl.h>
#include <signal.h>

#include <chrono>
#include <cstdlib>
#include <utility>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <memory>
#include <set>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/catalog.h"
#include "common/config.h"
#include "common/cpus.h"
#include "common/status.h"
#include "common/stop_signals.h"
#include "client/commands.h"
#include "worker/data/audio.h"
#include "worker/data/audio_cache.h"

namespace aviary::cli {
namespace {

int Fail(const absl::Status& status) {
  std::cerr << "aviary prepare: " << status.message() << "\n";
  return ExitCodeFor(status);
}

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  int64_t s = static_cast<int64_t>(std::llround(seconds));
  if (s >= 3600) return absl::StrFormat("%d:%02d:%02d", s / 3600, (s / 60) % 60, s % 60);
  return absl::StrFormat("%d:%02d", s / 60, s % 60);
}

// Draws progress on stderr: a redrawn bar on a terminal, a line every 10 s otherwise.
class ProgressPrinter {
 public:
  explicit ProgressPrinter(std::string prefix) : tty_(::isatty(STDERR_FILENO) == 1), prefix_(std::move(prefix)) {}

  void Update(const worker::PrepareProgress& p) {
    const bool last = p.files_done == p.files_to_decode;
    const double since = p.elapsed_s - last_print_s_;
    if (!last && since < (tty_ ? 0.2 : 10.0)) return;
    last_print_s_ = p.elapsed_s;
    const double rate = p.elapsed_s > 0 ? p.files_done / p.elapsed_s : 0.0;
    const double eta = rate > 0 ? (p.files_to_decode - p.files_done) / rate : -1.0;
    const double audio_rate = p.elapsed_s > 0 ? p.audio_seconds / p.elapsed_s : 0.0;
    const int64_t done = p.files_cached + p.files_done;
    if (tty_) {
      constexpr int kWidth = 30;
      int filled = p.files_total > 0 ? static_cast<int>(kWidth * done / p.files_total) : kWidth;
      std::string bar(static_cast<size_t>(filled), '#');
      bar.append(static_cast<size_t>(kWidth - filled), '.');
      std::fprintf(stderr, "\r\033[K%s[%s] %lld/%lld files  %.1f files/s  %.2f audio-h/s  ETA %s",
                   prefix_.c_str(), bar.c_str(), static_cast<long long>(done), static_cast<long long>(p.files_total),
                   rate, audio_rate / 3600.0, FormatDuration(eta).c_str());
      open_line_ = !last;
      if (last) std::fprintf(stderr, "\n");
    } else {
      std::fprintf(stderr, "prepare: %s%lld/%lld files, %.1f files/s, %.2f audio-h/s, ETA %s\n",
                   prefix_.c_str(), static_cast<long long>(done), static_cast<long long>(p.files_total), rate,
                   audio_rate / 3600.0, FormatDuration(eta).c_str());
    }
    std::fflush(stderr);
  }

  // Ends a bar left drawn (a run that failed midway), so that its error starts a line of its own.
  void EndLine() {
    if (open_line_) std::fprintf(stderr, "\n");
    open_line_ = false;
  }

 private:
  bool open_line_ = false;
  bool tty_;
  std::string prefix_;
  double last_print_s_ = -1e9;
};

// Writes `text` to stdout in one piece, `prefix` before every line (the part of a split run, so
// that the ranks' reports can be told apart).
void WritePrefixed(const std::string& text, const std::string& prefix) {
  std::string all;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) absl::StrAppend(&all, prefix, line, "\n");
  std::cout << all << std::flush;
}

void PrintReport(const worker::PrepareReport& r, const std::string& part) {
  std::ostringstream out;
  out << "cache " << r.cache_dir << ": " << r.files_total << " files (" << r.files_cached
            << " cached earlier, " << r.files_decoded << " decoded now) in "
            << absl::StrFormat("%.1f", r.elapsed_s) << " s, " << r.shards_written
            << " shard(s) written\n";
  for (const std::string& s : r.dropped_shards) {
    out << "  dropped incomplete " << s << " (its files were decoded again)\n";
  }
  for (const std::string& s : r.kept_shards) out << "  kept " << s << "\n";
  out << "  " << std::left << std::setw(11) << "reason" << std::right << std::setw(8)
            << "files"
            << "  detail\n";
  for (const auto& [problem, n] : r.counts) {
    out << "  " << std::left << std::setw(11) << worker::AudioProblemName(problem)
              << std::right << std::setw(8) << n << "  ";
    if (problem == worker::AudioProblem::kNone) {
      out << absl::StrFormat("%.2f hours of audio", r.audio_seconds / 3600.0);
    } else {
      auto it = r.examples.find(problem);
      if (it != r.examples.end()) out << "e.g. " << it->second;
    }
    out << "\n";
  }
  if (r.clipped_samples > 0) {
    out << "  " << r.clipped_samples << " samples clipped to int16's range\n";
  }
  WritePrefixed(out.str(), part);
}

void PrintPlan(const worker::PreparePlan& p, double max_seconds, const std::string& part) {
  std::ostringstream out;
  out << "dry run: cache " << p.cache_dir << ": " << p.files_total << " files, " << p.files_cached
            << " cached, " << p.files_to_decode << " to decode (headers read in "
            << absl::StrFormat("%.1f", p.elapsed_s) << " s; nothing written)\n";
  out << absl::StrFormat("  audio to decode: %.2f hours", p.source_seconds / 3600.0);
  if (max_seconds > 0) {
    out << absl::StrFormat(", %.2f hours of it kept (data.cache_max_seconds %g)", p.audio_seconds / 3600.0,
                                 max_seconds);
  }
  out << "\n";
  out << absl::StrFormat("  cache to write: %.2f GiB (%lld bytes of int16 samples)\n",
                               p.cache_bytes / double(int64_t{1} << 30), static_cast<long long>(p.cache_bytes));
  if (p.files_unknown_length > 0) {
    out << "  " << p.files_unknown_length
              << " file(s) whose header gives no length (not in the sums above; decoding will tell)\n";
  }
  for (const auto& [problem, n] : p.problems) {
    out << "  " << std::left << std::setw(11) << worker::AudioProblemName(problem) << std::right
              << std::setw(8) << n << "  e.g. " << p.examples.at(problem) << "\n";
  }
  if (p.invalid_shards > 0) {
    out << "  " << p.invalid_shards << " incomplete shard(s) would be dropped (their files are counted)\n";
  }
  WritePrefixed(out.str(), part);
}

struct PrepareArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string stage;  // empty: every enabled stage
  // The cores this process may use (affinity, a container's quota), shared with the other ranks
  // of a split run on its host.
  int threads = common::CoresPerRank(common::LocalRanksFromEnvironment());
  double shard_mb = worker::kDefaultShardBytes / double(1 << 20);
  bool dry_run = false;
  std::string part;  // "R/N"; empty: from mpirun's environment, else the whole cache
};

// Whether the process has a controlling terminal (an interactive shell's commands, nohup'ed ones
// too; not a launcher's tasks).
bool HasControllingTerminal() {
  const int fd = ::open("/dev/tty", O_RDONLY | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) return false;
  ::close(fd);
  return true;
}

// This process's part of a split prepare: --part R/N, else the rank and size mpirun (Open MPI,
// or a PMI launcher) or an srun step gives it, else 0 of 1. (Slurm's batch script is one task:
// SLURM_STEP_NUM_TASKS is srun's, not the allocation's SLURM_NTASKS, so `aviary prepare` run
// from an sbatch script still prepares the whole cache; nor is an interactive `srun -n 16 --pty
// bash` (SLURM_PTY_PORT set, and a controlling terminal: a step srun starts from that shell
// inherits the variable, not the terminal; stdin is not asked, nohup replaces it) a split: its
// shell is task 0 of 16, and prepared a 16th.) `*from`
// names the variables a split was taken from ("" otherwise).
absl::Status ResolvePart(const std::string& flag, int* part, int* num_parts, std::string* from) {
  from->clear();
  *part = 0;
  *num_parts = 1;
  if (!flag.empty()) {
    std::vector<std::string> pieces = absl::StrSplit(flag, '/');
    if (pieces.size() != 2 || !absl::SimpleAtoi(pieces[0], part) || !absl::SimpleAtoi(pieces[1], num_parts) ||
        *num_parts < 1 || *num_parts > 100000 || *part < 0 || *part >= *num_parts) {
      return absl::InvalidArgumentError(
          absl::StrCat("--part: expected R/N with 0 <= R < N <= 100000, got '", flag, "'"));
    }
    return absl::OkStatus();
  }
  for (const auto& [rank_var, size_var] : {std::pair<const char*, const char*>{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"},
                                           {"PMI_RANK", "PMI_SIZE"},
                                           {"SLURM_PROCID", "SLURM_STEP_NUM_TASKS"}}) {
    const char* rank = std::getenv(rank_var);
    const char* size = std::getenv(size_var);
    if (rank == nullptr || size == nullptr) continue;
    if (absl::string_view(rank_var) == "SLURM_PROCID" && std::getenv("SLURM_PTY_PORT") != nullptr &&
        HasControllingTerminal()) {
      continue;
    }
    if (!absl::SimpleAtoi(rank, part) || !absl::SimpleAtoi(size, num_parts) || *num_parts < 1 || *part < 0 ||
        *part >= *num_parts) {
      return absl::InvalidArgumentError(
          absl::StrCat(rank_var, "='", rank, "', ", size_var, "='", size, "': not a rank and a size"));
    }
    if (*num_parts > 1) *from = absl::StrCat(rank_var, "=", rank, " and ", size_var, "=", size);
    return absl::OkStatus();
  }
  return absl::OkStatus();
}

int RunPrepare(const PrepareArgs& args) {
  int part = 0, num_parts = 1;
  std::string split_from;
  if (absl::Status st = ResolvePart(args.part, &part, &num_parts, &split_from); !st.ok()) return Fail(st);
  if (!split_from.empty()) {
    // Said, so that a shell that inherited a launcher's variables is not a silent 1/N.
    std::cerr << "aviary prepare: part " << part << " of " << num_parts << " (from " << split_from
              << "); --part 0/1 prepares the whole cache\n";
  }
  const std::string part_prefix = num_parts == 1 ? "" : absl::StrCat("part ", part, " of ", num_parts, ": ");
  auto config = common::LoadPipelineConfig(args.config, args.overrides);
  if (!config.ok()) return Fail(config.status());
  if (config->data.cache_dir.empty()) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat(args.config,
                     ": data.cache_dir is empty: set it in the config or with --set "
                     "data.cache_dir=DIR (training reads the cache from there)")));
  }
  std::vector<std::string> stages;
  if (!args.stage.empty()) {
    stages.push_back(args.stage);
  } else {
    for (const std::string& stage : common::StageNames()) {
      if (!config->stages.at(stage).enabled) continue;
      if (stage == "pretrain" && config->data.pretrain_sources.empty()) continue;
      stages.push_back(stage);
    }
    // Nothing to prepare: an empty cache would be made, its manifest fixing the sample rate
    // and channels for later runs, and exit 0.
    if (stages.empty()) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          args.config.empty() ? std::string("the config") : args.config,
          ": no stage to prepare: stages.pretrain.enabled and stages.finetune.enabled are false (or pretraining "
          "has no data.pretrain_sources); enable one, or name it with --stage")));
    }
  }
  auto channels = worker::ParseChannelMode(config->data.channels);
  if (!channels.ok()) return Fail(channels.status());

  std::vector<std::string> paths;
  // Both stages read the target's metadata and check its files: once (BuildStageTables).
  std::vector<absl::StatusOr<common::StageTable>> tables = common::BuildStageTables(*config, stages);
  for (size_t i = 0; i < stages.size(); ++i) {
    if (!tables[i].ok()) return Fail(tables[i].status());
    std::cout << part_prefix << "stage " << stages[i] << ": " << tables[i]->samples.size() << " samples" << std::endl;
    for (const common::Sample& s : tables[i]->samples) paths.push_back(s.filepath);
  }

  ProgressPrinter printer(part_prefix);
  worker::PrepareOptions options;
  options.cache_dir = config->data.cache_dir;
  options.sample_rate = config->data.sample_rate;
  options.channels = *channels;
  options.max_seconds = config->data.cache_max_seconds;
  options.num_threads = args.threads;
  options.part = part;
  options.num_parts = num_parts;
  options.shard_bytes = static_cast<int64_t>(args.shard_mb * (1 << 20));
  options.progress = [&printer](const worker::PrepareProgress& p) { printer.Update(p); };

  if (args.dry_run) {
    auto plan = worker::PlanAudioCache(paths, options);
    if (!plan.ok()) return Fail(plan.status());
    PrintPlan(*plan, options.max_seconds, part_prefix);
    return 0;
  }
  // SIGINT, SIGTERM (mpirun ending the other ranks when one fails, scancel) and SIGHUP stop the
  // run at the next file, so that the shard being written is removed rather than left for a
  // later run to keep as "maybe another host's" for minutes; then the process ends by that
  // signal. A second signal ends it at once; an inherited ignored one (nohup) stays ignored.
  common::InstallStopSignals({SIGINT, SIGTERM, SIGHUP});
  options.should_stop = [] { return common::StopSignal() != 0; };
  auto report = worker::PrepareAudioCache(paths, options);
  if (!report.ok()) {
    printer.EndLine();
    if (const int signal = common::StopSignal(); absl::IsCancelled(report.status()) && signal != 0) {
      Fail(report.status());
      return common::EndByStopSignal(signal);
    }
    return Fail(report.status());
  }
  PrintReport(*report, part_prefix);
  std::cout << part_prefix << "wrote " << config->data.cache_dir << "/" << worker::PrepareReportName(options) << "\n";
  if (auto unread = report->counts.find(worker::AudioProblem::kMissing); unread != report->counts.end()) {
    // Not broken, not cached: training decodes them on the fly until a run reads them.
    auto example = report->examples.find(worker::AudioProblem::kMissing);
    std::cerr << "aviary prepare: " << part_prefix << unread->second
              << " file(s) could not be read and are not cached"
              << (example != report->examples.end() ? absl::StrCat(" (e.g. ", example->second, ")") : "")
              << "; training decodes them on the fly. Once they can be read (a permission fixed, the "
                 "filesystem answering), run `aviary prepare` again\n";
  }
  // A signal that came once every file was decoded: the run is whole and said, and the process
  // still ends by the signal (a shell's loop of prepares stops at a Ctrl-C).
  if (const int signal = common::StopSignal(); signal != 0) return common::EndByStopSignal(signal);
  return 0;
}

}  // namespace

void AddPrepareCommand(CLI::App* app, Runner* run) {
  auto args = std::make_shared<PrepareArgs>();
  CLI::App* prepare = common::AddCommand(
      app, "prepare", "decode the stages' audio into the cache (resumable)",
      "Every file of the stage (default: every enabled stage) decoded once to data.sample_rate int16 "
      "shards in data.cache_dir, which training then reads; files that cannot be decoded are reported.");
  prepare->group(kOfflineGroup);
  prepare->add_option("--config", args->config, "the pipeline YAML")->type_name("P.yaml")->required();
  prepare->add_option("--stage", args->stage, "pretrain or finetune (default: every enabled stage)")
      ->type_name("S")
      ->check(common::OneOf({"pretrain", "finetune"}));
  common::AddNumber(prepare, "--threads", &args->threads, "N", "decoders (default: the cores this process may use, shared among the ranks of its host)", 1, 1024);
  common::AddNumber(prepare, "--shard-mb", &args->shard_mb, "M", "size of a cache shard, MiB", 0.001, 1e6)
      ->capture_default_str();
  prepare->add_option("--part", args->part,
                      "decode part R of N of the files into the same cache (several hosts; under mpirun the "
                      "rank and size are used)")
      ->type_name("R/N");
  prepare->add_flag("--dry-run", args->dry_run,
                    "read the files' headers only and print the file count, audio hours and cache size a run "
                    "would write");
  common::AddSetOption(prepare, &args->overrides);
  prepare->callback([run, args] { *run = [args] { return RunPrepare(*args); }; });
}

}  // namespace aviary::cli
