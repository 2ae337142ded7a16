// aviary dataset folds | train-list | summary.
#include <algorithm>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/catalog.h"
#include "common/config.h"
#include "common/files.h"
#include "common/layouts.h"
#include "common/plot.h"
#include "common/status.h"
#include "client/commands.h"

namespace aviary::cli {
namespace {

using common::PipelineConfig;
using common::StageTable;

int Fail(const std::string& command, const absl::Status& status) {
  std::cerr << "aviary dataset " << command << ": " << status.message() << "\n";
  return ExitCodeFor(status);
}

// The flags of the dataset subcommands (each uses its own).
struct DatasetArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string stage;
  int fold = 0;
  std::string out;
  std::string plot;
  bool all_classes = false;
};

// Output paths are checked before the (slow) table is built (common/files.h).
using common::CheckOutputPath;

absl::StatusOr<PipelineConfig> LoadConfig(const DatasetArgs& args) {
  return common::LoadPipelineConfig(args.config, args.overrides);
}

void PrintSourceReports(const StageTable& table) {
  std::cout << "stage " << table.stage << ": " << table.samples.size() << " samples, "
            << table.class_names.size() << " classes, " << table.n_splits << " folds\n";
  std::cout << "  " << std::left << std::setw(8) << "source" << std::right << std::setw(9)
            << "rows" << std::setw(11) << "duplicate" << std::setw(11) << "in-target"
            << std::setw(9) << "corrupt" << std::setw(9) << "missing" << std::setw(9)
            << "no-label" << std::setw(9) << "kept" << "  metadata\n";
  for (const auto& s : table.sources) {
    std::cout << "  " << std::left << std::setw(8) << s.layout << std::right << std::setw(9)
              << s.rows_read << std::setw(11) << s.duplicates_dropped << std::setw(11)
              << s.target_overlap_dropped << std::setw(9) << s.corrupt_dropped << std::setw(9)
              << s.missing_file_dropped << std::setw(9) << s.empty_label_dropped
              << std::setw(9) << s.kept << "  " << s.metadata_path << "\n";
  }
  if (table.unknown_secondary_labels > 0) {
    std::cout << "  " << table.unknown_secondary_labels
              << " secondary labels name classes outside the label map (ignored)\n";
  }
}

// A --out that is one of the files the command may read (the config, a source's metadata CSV,
// the target's (a pretraining table reads it to leave its rows out), the corrupt-file list: a
// slip of tab completion) would be replaced with exit 0: refused, naming both. Checked before
// anything is read or built, whichever stages are enabled.
absl::Status CheckOutIsNoInput(const std::string& flag, const std::string& out, const DatasetArgs& args,
                               const PipelineConfig& config) {
  AVIARY_RETURN_IF_ERROR(common::CheckNotTheInput(out, flag, args.config, "--config file"));
  if (!config.data.corrupt_files.empty()) {
    AVIARY_RETURN_IF_ERROR(
        common::CheckNotTheInput(out, flag, config.data.corrupt_files, "data.corrupt_files list"));
  }
  std::vector<common::SourceConfig> sources = config.data.pretrain_sources;
  sources.insert(sources.begin(), config.data.target);
  for (const common::SourceConfig& source : sources) {
    absl::StatusOr<common::Layout> layout = common::ParseLayout(source.layout);
    if (!layout.ok()) continue;  // the table's build names it
    const std::string metadata =
        (std::filesystem::path(source.root) / common::GetLayoutSpec(*layout).metadata_file).string();
    AVIARY_RETURN_IF_ERROR(common::CheckNotTheInput(out, flag, metadata, absl::StrCat(source.layout, " metadata")));
  }
  return absl::OkStatus();
}

int RunFolds(const DatasetArgs& args) {
  if (absl::Status st = CheckOutputPath("--out", args.out); !st.ok()) return Fail("folds", st);
  auto config = LoadConfig(args);
  if (!config.ok()) return Fail("folds", config.status());
  if (absl::Status st = CheckOutIsNoInput("--out", args.out, args, *config); !st.ok()) return Fail("folds", st);
  auto table = common::BuildStageTable(*config, args.stage);
  if (!table.ok()) return Fail("folds", table.status());
  absl::Status st = common::WriteFoldsCsv(*table, args.out);
  if (!st.ok()) return Fail("folds", st);
  PrintSourceReports(*table);
  std::cout << "wrote " << args.out << " (" << table->samples.size() << " rows)\n";
  return 0;
}

int RunTrainList(const DatasetArgs& args) {
  if (absl::Status st = CheckOutputPath("--out", args.out); !st.ok()) return Fail("train-list", st);
  auto config = LoadConfig(args);
  if (!config.ok()) return Fail("train-list", config.status());
  if (absl::Status st = CheckOutIsNoInput("--out", args.out, args, *config); !st.ok()) return Fail("train-list", st);
  auto table = common::BuildStageTable(*config, args.stage);
  if (!table.ok()) return Fail("train-list", table.status());
  auto list = common::BuildTrainList(*config, *table, args.fold);
  if (!list.ok()) return Fail("train-list", list.status());
  absl::Status st = common::WriteTrainListCsv(*table, list->train, args.out);
  if (!st.ok()) return Fail("train-list", st);
  PrintSourceReports(*table);
  std::cout << "fold " << args.fold << ": " << list->train.size() << " training rows (after "
            << (config->folds.cv_filter ? "cv_filter, " : "") << "upsample"
            << (args.stage == "pretrain" ? ", downsample" : "") << "), " << list->valid.size()
            << " validation rows\nwrote " << args.out << "\n";
  return 0;
}

void PrintClassCounts(const StageTable& table, const PipelineConfig& config, bool all) {
  std::map<std::string, int> counts;
  for (const auto& s : table.samples) ++counts[s.primary_label];
  std::vector<std::pair<std::string, int>> sorted(counts.begin(), counts.end());
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const auto& a, const auto& b) { return a.second > b.second; });
  int below_cv = 0, below_up = 0, above_down = 0;
  for (const auto& [label, n] : sorted) {
    below_cv += n < config.folds.cv_filter_thr;
    below_up += n < config.sampling.upsample_thr;
    above_down += n > config.sampling.downsample_thr;
  }
  // As BuildTrainList applies them: cv_filter only when on, a threshold of 0 is off, and only
  // pretraining downsamples.
  std::cout << "  classes: " << sorted.size() << "; ";
  if (config.folds.cv_filter) {
    std::cout << below_cv << " with fewer than " << config.folds.cv_filter_thr << " (cv=False, always trained on), ";
  } else {
    std::cout << "cv_filter off, ";
  }
  if (config.sampling.upsample_thr > 0) {
    std::cout << below_up << " below upsample_thr " << config.sampling.upsample_thr;
  } else {
    std::cout << "upsampling off (upsample_thr 0)";
  }
  if (table.stage == "pretrain") {
    if (config.sampling.downsample_thr > 0) {
      std::cout << ", " << above_down << " above downsample_thr " << config.sampling.downsample_thr;
    } else {
      std::cout << ", downsampling off (downsample_thr 0)";
    }
  }
  std::cout << "\n";
  const size_t kShown = 10;
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (!all && sorted.size() > 2 * kShown && i == kShown) {
      std::cout << "    ... " << sorted.size() - 2 * kShown
                << " more classes (--all-classes lists every one)\n";
      i = sorted.size() - kShown;
    }
    std::cout << "    " << std::left << std::setw(16) << sorted[i].first << std::right
              << std::setw(7) << sorted[i].second << "\n";
  }
}

// The notebook's distribution plots: samples per source, and the class long tail per stage.
absl::Status WriteSummaryPlot(const std::vector<StageTable>& tables, const std::string& path) {
  common::Figure figure;
  figure.title = "aviary dataset summary";
  common::Panel sources;
  sources.title = "Samples per source";
  sources.x_label = "source (first bar: the target)";
  sources.y_label = "samples";
  common::BarSeries source_bars;
  source_bars.rgb = common::PaletteColor(0);
  for (const StageTable& table : tables) {
    for (const auto& s : table.sources) {
      source_bars.labels.push_back(s.layout);
      source_bars.values.push_back(s.kept);
    }
  }
  sources.bars = source_bars;
  sources.legend = false;
  figure.panels.push_back(sources);
  int color = 1;
  for (const StageTable& table : tables) {
    std::map<std::string, int> counts;
    for (const auto& s : table.samples) ++counts[s.primary_label];
    std::vector<std::pair<std::string, int>> sorted(counts.begin(), counts.end());
    std::stable_sort(sorted.begin(), sorted.end(),
                     [](const auto& a, const auto& b) { return a.second > b.second; });
    common::Panel tail;
    tail.title = table.stage == "finetune" ? "Target classes" : "Pretraining classes";
    tail.x_label = absl::StrCat(sorted.size(), " classes, largest first");
    tail.y_label = "samples (log)";
    tail.log_y = true;
    tail.legend = false;
    common::BarSeries bars;
    bars.rgb = common::PaletteColor(color++);
    bars.show_values = false;
    for (const auto& [label, n] : sorted) {
      bars.labels.push_back(label);
      bars.values.push_back(n);
    }
    tail.bars = bars;
    figure.panels.push_back(tail);
  }
  figure.width = 600 * static_cast<int>(figure.panels.size());
  figure.height = 520;
  figure.text_scale = 2;
  return common::WritePng(figure, path);
}

int RunSummary(const DatasetArgs& args) {
  if (!args.plot.empty()) {
    if (absl::Status st = CheckOutputPath("--plot", args.plot); !st.ok()) return Fail("summary", st);
  }
  auto config = LoadConfig(args);
  if (!config.ok()) return Fail("summary", config.status());
  if (!args.plot.empty()) {
    if (absl::Status st = CheckOutIsNoInput("--plot", args.plot, args, *config); !st.ok()) return Fail("summary", st);
  }
  std::vector<StageTable> tables;
  for (const std::string& stage : {std::string("finetune"), std::string("pretrain")}) {
    // A disabled stage's sources are not read (they may not exist on this machine).
    if (!config->stages.at(stage).enabled) {
      std::cout << stage << ": disabled (stages." << stage << ".enabled: false); its sources are not read\n";
      continue;
    }
    if (stage == "pretrain" && config->data.pretrain_sources.empty()) continue;
    auto table = common::BuildStageTable(*config, stage);
    if (!table.ok()) return Fail("summary", table.status());
    PrintSourceReports(*table);
    PrintClassCounts(*table, *config, args.all_classes);
    tables.push_back(std::move(*table));
  }
  if (const std::string* plot = args.plot.empty() ? nullptr : &args.plot) {
    absl::Status st = WriteSummaryPlot(tables, *plot);
    if (!st.ok()) return Fail("summary", st);
    std::cout << "wrote " << *plot << "\n";
  }
  return 0;
}

}  // namespace

void AddDatasetCommand(CLI::App* app, Runner* run) {
  CLI::App* dataset = app->add_subcommand("dataset", "the stratified folds, a fold's training list, a summary");
  dataset->group(kOfflineGroup);
  dataset->require_subcommand(1);
  auto args = std::make_shared<DatasetArgs>();
  auto config_flags = [args](CLI::App* sub) {
    sub->add_option("--config", args->config, "the pipeline YAML")->type_name("P.yaml")->required();
    common::AddSetOption(sub, &args->overrides);
  };
  auto stage_flag = [args](CLI::App* sub) {
    sub->add_option("--stage", args->stage, "pretrain or finetune")
        ->type_name("S")
        ->required()
        ->check(common::OneOf({"pretrain", "finetune"}));
  };
  CLI::App* folds = dataset->add_subcommand("folds", "write the stage's samples with their fold (folds.csv)");
  config_flags(folds);
  stage_flag(folds);
  folds->add_option("--out", args->out, "the CSV to write")->type_name("folds.csv")->required()->check(common::NonEmpty("a path"));
  folds->callback([run, args] { *run = [args] { return RunFolds(*args); }; });

  CLI::App* train_list =
      dataset->add_subcommand("train-list", "write one fold's training rows (cv_filter, upsample, downsample)");
  config_flags(train_list);
  stage_flag(train_list);
  common::AddNumber(train_list, "--fold", &args->fold, "K", "the validation fold", 0, 1000000)->required();
  train_list->add_option("--out", args->out, "the CSV to write")
      ->type_name("train.csv")
      ->required()
      ->check(common::NonEmpty("a path"));
  train_list->callback([run, args] { *run = [args] { return RunTrainList(*args); }; });

  CLI::App* summary = dataset->add_subcommand("summary", "the enabled stages' sources, rows dropped and classes");
  config_flags(summary);
  summary->add_option("--plot", args->plot, "also draw the class counts to a PNG")
      ->type_name("out.png")
      ->check(common::NonEmpty("a path"));
  summary->add_flag("--all-classes", args->all_classes, "every class, not only the largest and smallest");
  summary->callback([run, args] { *run = [args] { return RunSummary(*args); }; });
}

}  // namespace aviary::cli
