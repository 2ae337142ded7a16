#include "common/catalog.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <set>
#include <string_view>
#include <sstream>
#include <thread>
#include <unordered_set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/folds.h"
#include "common/logging.h"
#include "common/status.h"
#include "yaml-cpp/yaml.h"

namespace aviary::common {
namespace {

const Logger& Log() {
  static const Logger logger("catalog");
  return logger;
}

// The two all-zero recordings of BirdCLEF 2021 that the notebook drops by path.
const char* const kKnownAllZero2021[] = {"train_short_audio/houwre/XC590621.ogg",
                                         "train_short_audio/cogdov/XC579430.ogg"};

constexpr int kMaxMissingExamples = 5;

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}


std::string JoinPath(const std::string& root, const std::string& rel) {
  if (root.empty()) return rel;
  if (root.back() == '/') return root + rel;
  return absl::StrCat(root, "/", rel);
}

// notebook: filepath.split('/')[-1].split('.')[0]
std::string XcIdOf(const std::string& filepath) {
  size_t slash = filepath.rfind('/');
  std::string base = slash == std::string::npos ? filepath : filepath.substr(slash + 1);
  return base.substr(0, base.find('.'));
}

struct SourceRow {
  Sample sample;
  std::string relative_path;  // relative to the source root
};

// FileExists for every row, on several threads: on a network filesystem each stat is a round
// trip, and 150,000 of them one after another take minutes.
std::vector<char> FilesExist(const std::vector<SourceRow>& rows) {
  std::vector<char> exists(rows.size(), 0);
  const size_t threads = std::min<size_t>(16, std::max<size_t>(1, rows.size() / 2048));
  std::atomic<size_t> next{0};
  auto work = [&] {
    constexpr size_t kChunk = 256;
    for (size_t begin = next.fetch_add(kChunk); begin < rows.size(); begin = next.fetch_add(kChunk)) {
      for (size_t i = begin; i < std::min(rows.size(), begin + kChunk); ++i) exists[i] = FileExists(rows[i].sample.filepath);
    }
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  return exists;
}

absl::StatusOr<std::vector<SourceRow>> ReadSource(const SourceConfig& source,
                                                  const std::string& key,
                                                  SourceReport* report) {
  auto layout_or = ParseLayout(source.layout);
  if (!layout_or.ok()) return Annotate(layout_or.status(), absl::StrCat(key, ".layout"));
  const Layout layout = *layout_or;
  const LayoutSpec& spec = GetLayoutSpec(layout);
  report->layout = source.layout;
  report->root = source.root;
  report->metadata_path = JoinPath(source.root, spec.metadata_file);
  // Only the columns used: the xc metadata has 30-odd columns, of which five matter here.
  const std::vector<std::string> columns{spec.label_column, "filename", "secondary_labels", "author", "rating"};
  auto table_or = CsvTable::ReadFile(report->metadata_path, &columns);
  if (!table_or.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        key, " (layout ", source.layout, ", root '", source.root,
        "'): cannot read metadata: ", table_or.status().message()));
  }
  const CsvTable& table = *table_or;
  AVIARY_ASSIGN_OR_RETURN(size_t label_col, table.RequireColumn(spec.label_column));
  AVIARY_ASSIGN_OR_RETURN(size_t filename_col, table.RequireColumn("filename"));
  auto secondary_col = table.ColumnIndex("secondary_labels");
  auto author_col = table.ColumnIndex("author");
  auto rating_col = table.ColumnIndex("rating");

  std::vector<SourceRow> rows;
  rows.reserve(table.num_rows());
  report->rows_read = static_cast<int>(table.num_rows());
  for (size_t i = 0; i < table.num_rows(); ++i) {
    const auto& r = table.row(i);
    SourceRow row;
    Sample& s = row.sample;
    s.primary_label = r[label_col];
    s.source = source.layout;
    s.metadata = absl::StrCat(report->metadata_path, ":", table.line(i));
    row.relative_path = RelativeAudioPath(layout, s.primary_label, r[filename_col]);
    s.filepath = JoinPath(source.root, row.relative_path);
    s.xc_id = XcIdOf(s.filepath);
    if (author_col) s.author = r[*author_col];
    if (rating_col) {
      char* end = nullptr;
      const std::string& text = r[*rating_col];
      double v = std::strtod(text.c_str(), &end);
      if (end != text.c_str()) s.rating = v;
    }
    if (secondary_col) {
      auto parsed = ParsePythonStringList(r[*secondary_col]);
      if (parsed.ok()) {
        s.secondary_labels = std::move(*parsed);
      } else {
        if (report->bad_secondary_labels == 0) {
          Log().Warn(absl::StrCat(s.metadata, ": secondary_labels ignored: ",
                                  parsed.status().message()));
        }
        ++report->bad_secondary_labels;
      }
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

// ReadSource of several sources at once, each on a thread of its own (the CSV parsing and row
// building of a BirdCLEF-size pool take most of a submit's time; the sources are independent).
// The results are in the order of `sources`.
struct SourceRead {
  absl::StatusOr<std::vector<SourceRow>> rows = std::vector<SourceRow>{};
  SourceReport report;
};
std::vector<SourceRead> ReadSources(const std::vector<std::pair<const SourceConfig*, std::string>>& sources) {
  std::vector<SourceRead> reads(sources.size());
  auto read = [&](size_t i) { reads[i].rows = ReadSource(*sources[i].first, sources[i].second, &reads[i].report); };
  std::vector<std::thread> threads;
  for (size_t i = 1; i < sources.size(); ++i) threads.emplace_back(read, i);
  if (!sources.empty()) read(0);
  for (std::thread& t : threads) t.join();
  return reads;
}

// The deduplication key (xc_id, primary_label, author) as views into a row that outlives it.
struct DedupKey {
  std::string_view xc_id, label, author;
  bool operator==(const DedupKey& o) const { return xc_id == o.xc_id && label == o.label && author == o.author; }
};
struct DedupKeyHash {
  size_t operator()(const DedupKey& k) const {
    const std::hash<std::string_view> h;
    size_t seed = h(k.xc_id);
    seed ^= h(k.label) + 0x9e3779b97f4a7c15ULL + (seed << 6) + (seed >> 2);
    seed ^= h(k.author) + 0x9e3779b97f4a7c15ULL + (seed << 6) + (seed >> 2);
    return seed;
  }
};

// Drops rows whose file is missing or whose label is empty, counting per source.
std::vector<Sample> DropUnusable(std::vector<SourceRow> rows,
                                 std::vector<SourceReport>& reports,
                                 const std::vector<int>& report_of_row) {
  const std::vector<char> exists = FilesExist(rows);
  std::vector<Sample> kept;
  kept.reserve(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    SourceReport& rep = reports[report_of_row[i]];
    Sample& s = rows[i].sample;
    if (s.primary_label.empty()) {
      ++rep.empty_label_dropped;
      Log().Warn(absl::StrCat(s.metadata, ": empty label, row dropped"));
      continue;
    }
    if (!exists[i]) {
      ++rep.missing_file_dropped;
      if (static_cast<int>(rep.missing_examples.size()) < kMaxMissingExamples) {
        rep.missing_examples.push_back(s.filepath);
      }
      continue;
    }
    ++rep.kept;
    kept.push_back(std::move(s));
  }
  for (const SourceReport& rep : reports) {
    if (rep.missing_file_dropped > 0) {
      std::string examples;
      for (const auto& p : rep.missing_examples) absl::StrAppend(&examples, "\n  ", p);
      Log().Warn(absl::StrCat(rep.metadata_path, ": ", rep.missing_file_dropped,
                              " rows dropped because their audio file does not exist, e.g.:",
                              examples));
    }
  }
  return kept;
}

absl::Status AssignLabelsAndFolds(const PipelineConfig& config, StageTable* table) {
  std::set<std::string> classes;
  for (const Sample& s : table->samples) classes.insert(s.primary_label);
  table->class_names.assign(classes.begin(), classes.end());
  for (size_t i = 0; i < table->class_names.size(); ++i) {
    table->name2label[table->class_names[i]] = static_cast<int>(i);
  }
  std::vector<std::string> labels;
  labels.reserve(table->samples.size());
  for (Sample& s : table->samples) {
    s.target = table->name2label.at(s.primary_label);
    for (const auto& sl : s.secondary_labels) {
      if (!table->name2label.count(sl)) ++table->unknown_secondary_labels;
    }
    labels.push_back(s.primary_label);
  }
  if (table->samples.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage '", table->stage, "': no usable samples (see the source reports)"));
  }
  auto folds_or = StratifiedKFoldAssign(labels, table->n_splits, config.seed, true);
  if (!folds_or.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stage '", table->stage, "': cannot make ", table->n_splits, " stratified folds of ",
        labels.size(), " samples: ", folds_or.status().message()));
  }
  table->fold_warning = folds_or->warning;
  if (!table->fold_warning.empty()) {
    Log().Warn(absl::StrCat("stage '", table->stage, "': ", table->fold_warning));
  }
  std::vector<bool> cv = CvFlags(labels, config.folds.cv_filter_thr);
  for (size_t i = 0; i < table->samples.size(); ++i) {
    table->samples[i].fold = folds_or->fold[i];
    table->samples[i].cv = config.folds.cv_filter ? static_cast<bool>(cv[i]) : true;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ReadCorruptFileList(const std::string& path) {
  AVIARY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  std::vector<std::string> out;
  try {
    YAML::Node node = YAML::Load(text);
    if (!node.IsSequence()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": data.corrupt_files must hold a JSON array of paths"));
    }
    for (size_t i = 0; i < node.size(); ++i) {
      if (!node[i].IsScalar()) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ":", node[i].Mark().line + 1, ": item ", i, " is not a path string"));
      }
      out.push_back(node[i].as<std::string>());
    }
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ":", e.mark.line + 1, ": not valid JSON: ", e.msg));
  }
  return out;
}

absl::StatusOr<StageTable> BuildStageTable(const PipelineConfig& config,
                                           const std::string& stage) {
  StageTable table;
  table.stage = stage;
  if (stage == "finetune") {
    table.n_splits = config.folds.finetune_splits;
    table.sources.emplace_back();
    AVIARY_ASSIGN_OR_RETURN(auto rows,
                            ReadSource(config.data.target, "data.target", &table.sources[0]));
    std::vector<int> report_of_row(rows.size(), 0);
    table.samples = DropUnusable(std::move(rows), table.sources, report_of_row);
  } else if (stage == "pretrain") {
    table.n_splits = config.folds.pretrain_splits;
    if (config.data.pretrain_sources.empty()) {
      return absl::InvalidArgumentError(
          "stage 'pretrain' needs data.pretrain_sources, which is empty");
    }
    // The target and every source, read at once; errors reported in this order.
    std::vector<std::pair<const SourceConfig*, std::string>> to_read{{&config.data.target, "data.target"}};
    for (size_t i = 0; i < config.data.pretrain_sources.size(); ++i) {
      to_read.emplace_back(&config.data.pretrain_sources[i], absl::StrCat("data.pretrain_sources.", i));
    }
    std::vector<SourceRead> reads = ReadSources(to_read);
    // Target xc_ids, for the exclusion of recordings the fine-tuning set also holds.
    AVIARY_RETURN_IF_ERROR(reads[0].rows.status());
    std::unordered_set<std::string> target_ids;
    for (const auto& r : *reads[0].rows) target_ids.insert(r.sample.xc_id);

    // Corrupt-file list: match the full path, or a path that ends with the row's
    // source-relative path (lists written on another machine, e.g. /kaggle/input/...).
    std::unordered_set<std::string> corrupt_exact, corrupt_suffix;
    if (!config.data.corrupt_files.empty()) {
      AVIARY_ASSIGN_OR_RETURN(auto corrupt, ReadCorruptFileList(config.data.corrupt_files));
      for (const auto& p : corrupt) {
        corrupt_exact.insert(p);
        for (size_t pos = p.find('/'); pos != std::string::npos; pos = p.find('/', pos + 1)) {
          corrupt_suffix.insert(p.substr(pos + 1));
        }
      }
    }

    size_t pool_size = 0;
    for (size_t i = 1; i < reads.size(); ++i) {
      AVIARY_RETURN_IF_ERROR(reads[i].rows.status());
      pool_size += reads[i].rows->size();
    }
    std::vector<SourceRow> pool;
    std::vector<int> report_of_row;
    pool.reserve(pool_size);
    report_of_row.reserve(pool_size);
    for (size_t i = 0; i < config.data.pretrain_sources.size(); ++i) {
      const SourceConfig& src = config.data.pretrain_sources[i];
      table.sources.push_back(std::move(reads[i + 1].report));
      SourceReport& rep = table.sources.back();
      std::vector<SourceRow> rows = *std::move(reads[i + 1].rows);
      for (auto& r : rows) {
        if (src.layout == "2021" &&
            std::any_of(std::begin(kKnownAllZero2021), std::end(kKnownAllZero2021),
                        [&](const char* p) { return r.relative_path == p; })) {
          ++rep.corrupt_dropped;
          continue;
        }
        pool.push_back(std::move(r));
        report_of_row.push_back(static_cast<int>(i));
      }
    }
    // Deduplicate on (xc_id, primary_label, author), keep first; then the target and corrupt
    // exclusions, in the notebook's order.
    // Views into `pool`, whose rows do not move before the set is gone.
    std::vector<char> duplicate(pool.size(), 0);
    {
      std::unordered_set<DedupKey, DedupKeyHash> seen;
      seen.reserve(pool.size());
      for (size_t i = 0; i < pool.size(); ++i) {
        const Sample& s = pool[i].sample;
        duplicate[i] = !seen.insert(DedupKey{s.xc_id, s.primary_label, s.author}).second;
      }
    }
    std::vector<SourceRow> filtered;
    std::vector<int> filtered_report;
    filtered.reserve(pool.size());
    filtered_report.reserve(pool.size());
    for (size_t i = 0; i < pool.size(); ++i) {
      Sample& s = pool[i].sample;
      SourceReport& rep = table.sources[report_of_row[i]];
      if (duplicate[i]) {
        ++rep.duplicates_dropped;
        continue;
      }
      if (target_ids.count(s.xc_id)) {
        ++rep.target_overlap_dropped;
        continue;
      }
      if (corrupt_exact.count(s.filepath) || corrupt_exact.count(pool[i].relative_path) ||
          corrupt_suffix.count(pool[i].relative_path)) {
        ++rep.corrupt_dropped;
        continue;
      }
      filtered.push_back(std::move(pool[i]));
      filtered_report.push_back(report_of_row[i]);
    }
    table.samples = DropUnusable(std::move(filtered), table.sources, filtered_report);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown stage '", stage, "' (expected pretrain or finetune)"));
  }
  AVIARY_RETURN_IF_ERROR(AssignLabelsAndFolds(config, &table));
  return table;
}

absl::StatusOr<TrainList> BuildTrainList(const PipelineConfig& config, const StageTable& table,
                                         int fold) {
  if (fold < 0 || fold >= table.n_splits) {
    return absl::InvalidArgumentError(absl::StrCat("fold ", fold, " is out of range for stage '",
                                                   table.stage, "' with ", table.n_splits,
                                                   " splits (expected 0..", table.n_splits - 1,
                                                   ")"));
  }
  std::vector<int> folds;
  std::vector<bool> cv;
  std::vector<std::string> labels;
  for (const Sample& s : table.samples) {
    folds.push_back(s.fold);
    cv.push_back(s.cv);
    labels.push_back(s.primary_label);
  }
  FoldSplit split = SplitFold(folds, cv, fold, config.folds.cv_filter);
  TrainList list;
  list.valid = std::move(split.valid);
  list.train = Upsample(labels, split.train, config.sampling.upsample_thr, config.seed);
  if (table.stage == "pretrain") {
    list.train = Downsample(labels, list.train, config.sampling.downsample_thr, config.seed);
  }
  return list;
}

absl::Status WriteFoldsCsv(const StageTable& table, const std::string& path) {
  std::ostringstream out;
  WriteCsvRow(out, {"filename", "primary_label", "fold", "cv"});
  for (const Sample& s : table.samples) {
    WriteCsvRow(out, {s.filepath, s.primary_label, std::to_string(s.fold),
                      s.cv ? "True" : "False"});
  }
  return WriteFileAtomically(path, out.str());
}

absl::Status WriteTrainListCsv(const StageTable& table, const std::vector<size_t>& rows,
                               const std::string& path) {
  std::ostringstream out;
  WriteCsvRow(out, {"filename", "primary_label", "target"});
  for (size_t r : rows) {
    const Sample& s = table.samples[r];
    WriteCsvRow(out, {s.filepath, s.primary_label, std::to_string(s.target)});
  }
  return WriteFileAtomically(path, out.str());
}

}  // namespace aviary::common
