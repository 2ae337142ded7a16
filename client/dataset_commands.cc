// aviary dataset folds | train-list | summary.
#include <algorithm>
#include <iomanip>
#include <iostream>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/catalog.h"
#include "common/config.h"
#include "common/flags.h"
#include "common/plot.h"
#include "common/status.h"
#include "client/commands.h"

namespace aviary::cli {
namespace {

using common::Flags;
using common::PipelineConfig;
using common::StageTable;

int Fail(const std::string& command, const absl::Status& status) {
  std::cerr << "aviary dataset " << command << ": " << status.message() << "\n";
  return ExitCodeFor(status);
}

absl::StatusOr<PipelineConfig> LoadConfig(const Flags& flags) {
  AVIARY_ASSIGN_OR_RETURN(std::string path, flags.Require("config"));
  return common::LoadPipelineConfig(path, flags.GetRepeated("set"));
}

absl::StatusOr<std::string> RequireStage(const Flags& flags) {
  AVIARY_ASSIGN_OR_RETURN(std::string stage, flags.Require("stage"));
  if (stage != "pretrain" && stage != "finetune") {
    return absl::InvalidArgumentError(
        absl::StrCat("--stage: unknown stage '", stage, "' (expected pretrain or finetune)"));
  }
  return stage;
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

int RunFolds(const std::vector<std::string>& args) {
  Flags flags({"config", "stage", "out"}, {});
  absl::Status st = flags.Parse(args);
  if (!st.ok()) return Fail("folds", st);
  auto config = LoadConfig(flags);
  if (!config.ok()) return Fail("folds", config.status());
  auto stage = RequireStage(flags);
  if (!stage.ok()) return Fail("folds", stage.status());
  auto out = flags.Require("out");
  if (!out.ok()) return Fail("folds", out.status());
  auto table = common::BuildStageTable(*config, *stage);
  if (!table.ok()) return Fail("folds", table.status());
  st = common::WriteFoldsCsv(*table, *out);
  if (!st.ok()) return Fail("folds", st);
  PrintSourceReports(*table);
  std::cout << "wrote " << *out << " (" << table->samples.size() << " rows)\n";
  return 0;
}

int RunTrainList(const std::vector<std::string>& args) {
  Flags flags({"config", "stage", "fold", "out"}, {});
  absl::Status st = flags.Parse(args);
  if (!st.ok()) return Fail("train-list", st);
  auto config = LoadConfig(flags);
  if (!config.ok()) return Fail("train-list", config.status());
  auto stage = RequireStage(flags);
  if (!stage.ok()) return Fail("train-list", stage.status());
  auto out = flags.Require("out");
  if (!out.ok()) return Fail("train-list", out.status());
  if (!flags.Has("fold")) return Fail("train-list", absl::InvalidArgumentError("missing required flag --fold"));
  auto fold = flags.GetInt("fold", 0, 0, 1000000);
  if (!fold.ok()) return Fail("train-list", fold.status());
  auto table = common::BuildStageTable(*config, *stage);
  if (!table.ok()) return Fail("train-list", table.status());
  auto list = common::BuildTrainList(*config, *table, static_cast<int>(*fold));
  if (!list.ok()) return Fail("train-list", list.status());
  st = common::WriteTrainListCsv(*table, list->train, *out);
  if (!st.ok()) return Fail("train-list", st);
  PrintSourceReports(*table);
  std::cout << "fold " << *fold << ": " << list->train.size() << " training rows (after "
            << (config->folds.cv_filter ? "cv_filter, " : "") << "upsample"
            << (*stage == "pretrain" ? ", downsample" : "") << "), " << list->valid.size()
            << " validation rows\nwrote " << *out << "\n";
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
  std::cout << "  classes: " << sorted.size() << "; " << below_cv << " with fewer than "
            << config.folds.cv_filter_thr << " (cv=False, always trained on), " << below_up
            << " below upsample_thr " << config.sampling.upsample_thr << ", " << above_down
            << " above downsample_thr " << config.sampling.downsample_thr << "\n";
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

int RunSummary(const std::vector<std::string>& args) {
  Flags flags({"config", "plot"}, {"all-classes"});
  absl::Status st = flags.Parse(args);
  if (!st.ok()) return Fail("summary", st);
  auto config = LoadConfig(flags);
  if (!config.ok()) return Fail("summary", config.status());
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
    PrintClassCounts(*table, *config, flags.GetBool("all-classes"));
    tables.push_back(std::move(*table));
  }
  if (auto plot = flags.Get("plot")) {
    st = WriteSummaryPlot(tables, *plot);
    if (!st.ok()) return Fail("summary", st);
    std::cout << "wrote " << *plot << "\n";
  }
  return 0;
}

}  // namespace

int RunDataset(const std::vector<std::string>& args) {
  if (args.empty()) {
    std::cerr << "aviary dataset: expected a subcommand: folds, train-list or summary\n";
    return 2;
  }
  std::vector<std::string> rest(args.begin() + 1, args.end());
  if (args[0] == "folds") return RunFolds(rest);
  if (args[0] == "train-list") return RunTrainList(rest);
  if (args[0] == "summary") return RunSummary(rest);
  std::cerr << "aviary dataset: unknown subcommand '" << args[0]
            << "' (expected folds, train-list or summary)\n";
  return 2;
}

}  // namespace aviary::cli
