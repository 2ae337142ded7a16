#include "common/catalog.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <string_view>
#include <system_error>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/folds.h"
#include "common/logging.h"
#include "common/status.h"
#include "yaml-cpp/yaml.h"

namespace aviary::common {
namespace {

// The most a source's metadata CSV may hold (BirdCLEF's largest, Xeno-Canto's extended, is a few
// hundred MB); the corrupt-file list's. A sparse file of a terabyte was read into memory whole.
constexpr size_t kMaxMetadataBytes = size_t{4} << 30;
constexpr size_t kMaxCorruptListBytes = size_t{256} << 20;

// Whether pandas' read_csv (default na_values, keep_default_na) reads `field` as NaN.
bool IsPandasNa(absl::string_view field) {
  static constexpr absl::string_view kNa[] = {"",     "#N/A", "#N/A N/A", "#NA",  "-1.#IND", "-1.#QNAN", "-NaN",
                                              "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",     "NA",       "NULL",
                                              "NaN",  "None", "n/a",      "nan",  "null"};
  for (absl::string_view na : kNa) {
    if (field == na) return true;
  }
  return false;
}

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

std::string JoinPath(const std::string& root, absl::string_view rel) {
  if (root.empty()) return std::string(rel);
  if (root.back() == '/') return absl::StrCat(root, rel);
  return absl::StrCat(root, "/", rel);
}

// notebook: filepath.split('/')[-1].split('.')[0]
std::string XcIdOf(const std::string& filepath) {
  size_t slash = filepath.rfind('/');
  absl::string_view base = filepath;
  if (slash != std::string::npos) base.remove_prefix(slash + 1);
  return std::string(base.substr(0, base.find('.')));
}

struct SourceRow {
  Sample sample;
  uint32_t relative_from = 0;  // where the path relative to the source root starts in filepath
  absl::string_view relative_path() const { return absl::string_view(sample.filepath).substr(relative_from); }
};

// Folders with fewer wanted files than this are checked by stat, the others by one listing.
constexpr size_t kListFolderFrom = 8;

// FileExists of `paths[i]` for every i, answered a folder at a time: one listing of a folder
// replaces a stat (a path walk in the kernel) per file, and the folders are read on several
// threads (on a network filesystem each call is a round trip). A name the listing shows as a
// regular file exists; a link or an entry of unknown type, and a name the listing lacks (a
// case-insensitive filesystem), are asked of stat, so the answer is always stat's.
std::vector<char> FilesExist(const std::vector<const std::string*>& paths) {
  std::vector<char> exists(paths.size(), 0);
  struct Folder {
    std::string path;
    std::vector<uint32_t> files;  // indices into `paths`
  };
  std::vector<Folder> folders;
  std::vector<uint32_t> name_from(paths.size());  // where each path's file name starts
  {
    absl::flat_hash_map<std::string_view, size_t> index_of;  // views into `paths`
    std::string_view last_folder;
    size_t last_index = 0;
    for (size_t i = 0; i < paths.size(); ++i) {
      const std::string_view p = *paths[i];
      const size_t slash = p.rfind('/');
      name_from[i] = slash == std::string_view::npos ? 0 : static_cast<uint32_t>(slash + 1);
      const std::string_view folder = slash == std::string_view::npos ? std::string_view(".")
                                      : slash == 0                    ? std::string_view("/")
                                                                      : p.substr(0, slash);
      if (i == 0 || folder != last_folder) {  // rows come grouped by folder: one lookup a run
        auto [it, added] = index_of.emplace(folder, folders.size());
        if (added) folders.push_back(Folder{std::string(folder), {}});
        last_folder = folder;
        last_index = it->second;
      }
      folders[last_index].files.push_back(static_cast<uint32_t>(i));
    }
  }
  auto check_folder = [&](const Folder& folder) {
    DIR* dir = folder.files.size() < kListFolderFrom ? nullptr : ::opendir(folder.path.c_str());
    if (dir == nullptr) {  // few files, or a folder that cannot be listed (stat may still answer)
      for (uint32_t i : folder.files) exists[i] = FileExists(*paths[i]);
      return;
    }
    // The listing: its names in one buffer, then a map from each name to its type.
    std::string names;
    std::vector<std::pair<size_t, unsigned char>> entries;  // end of the name in `names`, d_type
    while (const dirent* entry = ::readdir(dir)) {
      names.append(entry->d_name);
      entries.emplace_back(names.size(), entry->d_type);
    }
    ::closedir(dir);
    absl::flat_hash_map<absl::string_view, unsigned char> listed;  // views into `names`, now fixed
    listed.reserve(entries.size());
    size_t begin = 0;
    for (const auto& [end, type] : entries) {
      listed.emplace(absl::string_view(names).substr(begin, end - begin), type);
      begin = end;
    }
    for (uint32_t i : folder.files) {
      const auto it = listed.find(absl::string_view(*paths[i]).substr(name_from[i]));
      if (it != listed.end() && it->second == DT_REG) {
        exists[i] = 1;
      } else if (it == listed.end() || it->second == DT_LNK || it->second == DT_UNKNOWN) {
        exists[i] = FileExists(*paths[i]);
      }
    }
  };
  const size_t threads = std::min<size_t>(16, std::max<size_t>(1, folders.size() / 4));
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t f = next.fetch_add(1); f < folders.size(); f = next.fetch_add(1)) check_folder(folders[f]);
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
  auto cannot_read = [&](const absl::Status& status) {
    // A relative root resolves against the current folder, not the config's: said, with it.
    std::string relative;
    if (!source.root.empty() && source.root[0] != '/') {
      std::error_code ec;
      const std::filesystem::path here = std::filesystem::current_path(ec);
      relative = absl::StrCat(", relative to the current folder ", ec ? std::string("(unknown)") : here.string());
    }
    return absl::InvalidArgumentError(absl::StrCat(key, " (layout ", source.layout, ", root '", source.root, "'",
                                                   relative, "): cannot read metadata: ", status.message()));
  };
  absl::StatusOr<std::string> file = ReadRegularFile(report->metadata_path, kMaxMetadataBytes);
  if (!file.ok()) return cannot_read(file.status());
  const absl::string_view text = *file;
  // Rows are read as views into the file (no table of strings): the xc metadata has 30-odd
  // columns, of which five matter here.
  absl::StatusOr<CsvRowReader> reader = CsvRowReader::Open(text, report->metadata_path);
  if (!reader.ok()) return cannot_read(reader.status());
  AVIARY_ASSIGN_OR_RETURN(size_t label_col, reader->RequireColumn(spec.label_column));
  AVIARY_ASSIGN_OR_RETURN(size_t filename_col, reader->RequireColumn("filename"));
  auto secondary_col = reader->ColumnIndex("secondary_labels");
  auto author_col = reader->ColumnIndex("author");
  auto rating_col = reader->ColumnIndex("rating");

  std::vector<SourceRow> rows;
  rows.reserve(static_cast<size_t>(std::count(text.begin(), text.end(), '\n')));
  const std::string metadata_prefix = absl::StrCat(report->metadata_path, ":");
  const std::string root_prefix = JoinPath(source.root, "");  // "" or the root with one '/' after it
  std::vector<absl::string_view> fields;
  int line = 0;
  while (true) {
    absl::StatusOr<bool> more = reader->Next(&fields, &line);
    if (!more.ok()) return cannot_read(more.status());
    if (!*more) break;
    SourceRow& row = rows.emplace_back();
    Sample& s = row.sample;
    s.primary_label = std::string(fields[label_col]);
    s.source = source.layout;
    s.metadata = absl::StrCat(metadata_prefix, line);
    // JoinPath(root, RelativeAudioPath(...)) in one string.
    s.filepath.reserve(root_prefix.size() + 32 + s.primary_label.size() + fields[filename_col].size());
    s.filepath = root_prefix;
    row.relative_from = static_cast<uint32_t>(root_prefix.size());
    AppendRelativeAudioPath(layout, s.primary_label, fields[filename_col], &s.filepath);
    s.xc_id = XcIdOf(s.filepath);
    if (author_col && !IsPandasNa(fields[*author_col])) s.author = std::string(fields[*author_col]);
    if (rating_col && !fields[*rating_col].empty()) {
      // strtod needs a terminated string; ratings are short.
      const std::string text_value(fields[*rating_col]);
      char* end = nullptr;
      double v = std::strtod(text_value.c_str(), &end);
      if (end != text_value.c_str()) s.rating = v;
    }
    if (secondary_col && fields[*secondary_col] != "[]") {  // "[]", the common case, at once
      auto parsed = ParsePythonStringList(fields[*secondary_col]);
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
  }
  report->rows_read = static_cast<int>(rows.size());
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
// An author that pandas' read_csv reads as NaN ("", "NA", "None", "null", ...) is "": the
// notebook's drop_duplicates takes NaN for equal to NaN, whatever the text was.
struct DedupKey {
  absl::string_view xc_id, label, author;
  bool operator==(const DedupKey& o) const { return xc_id == o.xc_id && label == o.label && author == o.author; }
  template <typename H>
  friend H AbslHashValue(H h, const DedupKey& k) {
    return H::combine(std::move(h), k.xc_id, k.label, k.author);
  }
};

// A row of one of the sources' row lists.
struct RowRef {
  uint32_t source;
  uint32_t row;
};

// The samples of `candidates` (rows in `sources`, in order) that have a label and an existing
// file, moved out of `sources`; the others are counted (and the missing files named) in
// `reports[source]`.
std::vector<Sample> DropUnusable(std::vector<std::vector<SourceRow>>& sources, const std::vector<RowRef>& candidates,
                                 std::vector<SourceReport>& reports) {
  std::vector<RowRef> labelled;
  std::vector<const std::string*> paths;
  labelled.reserve(candidates.size());
  paths.reserve(candidates.size());
  for (const RowRef& ref : candidates) {
    const Sample& s = sources[ref.source][ref.row].sample;
    if (s.primary_label.empty()) {
      ++reports[ref.source].empty_label_dropped;
      Log().Warn(absl::StrCat(s.metadata, ": empty label, row dropped"));
      continue;
    }
    labelled.push_back(ref);
    paths.push_back(&s.filepath);
  }
  const std::vector<char> exists = FilesExist(paths);
  std::vector<Sample> kept;
  kept.reserve(static_cast<size_t>(std::count(exists.begin(), exists.end(), 1)));
  std::vector<absl::flat_hash_set<std::string>> missing_folders(reports.size());
  for (size_t i = 0; i < labelled.size(); ++i) {
    SourceReport& rep = reports[labelled[i].source];
    Sample& s = sources[labelled[i].source][labelled[i].row].sample;
    if (!exists[i]) {
      ++rep.missing_file_dropped;
      if (static_cast<int>(rep.missing_examples.size()) < kMaxMissingExamples) {
        rep.missing_examples.push_back(s.filepath);
      }
      const size_t slash = s.filepath.rfind('/');
      if (slash != std::string::npos && slash > 0) {
        std::string folder = s.filepath.substr(0, slash);
        if (missing_folders[labelled[i].source].insert(folder).second) rep.missing_folders.push_back(std::move(folder));
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
  // The classes, sorted (byte order, as Python sorts str): counted in a hash map, then sorted.
  absl::flat_hash_map<absl::string_view, int> index_of;  // views into the samples
  for (const Sample& s : table->samples) index_of.emplace(s.primary_label, 0);
  for (const auto& [name, index] : index_of) table->class_names.emplace_back(name);
  std::sort(table->class_names.begin(), table->class_names.end());
  for (size_t i = 0; i < table->class_names.size(); ++i) {
    table->name2label.emplace_hint(table->name2label.end(), table->class_names[i], static_cast<int>(i));
    index_of[table->class_names[i]] = static_cast<int>(i);
  }
  std::vector<std::string> labels;
  labels.reserve(table->samples.size());
  for (Sample& s : table->samples) {
    s.target = index_of.at(s.primary_label);
    for (const auto& sl : s.secondary_labels) {
      if (!index_of.contains(sl)) ++table->unknown_secondary_labels;
    }
    labels.push_back(s.primary_label);
  }
  if (table->samples.empty()) {
    // What became of each source's rows: the caller prints the reports only for a table built.
    std::vector<std::string> sources;
    for (const SourceReport& r : table->sources) {
      sources.push_back(absl::StrCat(r.layout, " ", r.metadata_path, ": ", r.rows_read, " rows read, ",
                                     r.duplicates_dropped, " duplicate, ", r.target_overlap_dropped, " in the target, ",
                                     r.corrupt_dropped, " corrupt, ", r.missing_file_dropped, " missing audio, ",
                                     r.empty_label_dropped, " without a label"));
    }
    return absl::InvalidArgumentError(absl::StrCat("stage '", table->stage, "': no usable samples (",
                                                   sources.empty() ? "no source" : absl::StrJoin(sources, "; "), ")"));
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
  AVIARY_ASSIGN_OR_RETURN(std::string text, ReadRegularFile(path, kMaxCorruptListBytes));
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

namespace {

// The last component of a folder path ("/a/birdclef-2023/" -> "birdclef-2023"; "" for "/").
std::string LastComponent(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// The pretraining table from the sources' rows (`target_ids`: the target's xc_ids).
absl::StatusOr<StageTable> BuildPretrainTable(const PipelineConfig& config, std::vector<SourceRead> reads,
                                              const absl::flat_hash_set<std::string>& target_ids) {
  StageTable table;
  table.stage = "pretrain";
  table.n_splits = config.folds.pretrain_splits;
  // Corrupt-file list: match the full path, or a path that ends with the row's
  // source-relative path (lists written on another machine, e.g. /kaggle/input/...). Such a
  // path names one source when the folder before that part is named as a source's root is
  // ("/kaggle/input/birdclef-2023/train_audio/x/XC1.ogg" and a root ".../birdclef-2023"): then it
  // drops that source's row only (2022 and 2023 share the relative layout, and the notebook
  // compares whole paths); else any source's row with that relative path.
  absl::flat_hash_set<std::string> corrupt_exact;
  absl::flat_hash_map<std::string, std::vector<std::string>> corrupt_suffix;  // suffix -> folders before it
  std::vector<std::string> root_names;  // per source, its root's last component
  absl::flat_hash_set<std::string> root_name_set;
  for (const SourceConfig& source : config.data.pretrain_sources) {
    root_names.push_back(LastComponent(source.root));
    root_name_set.insert(root_names.back());
  }
  if (!config.data.corrupt_files.empty()) {
    AVIARY_ASSIGN_OR_RETURN(auto corrupt, ReadCorruptFileList(config.data.corrupt_files));
    for (const auto& p : corrupt) {
      corrupt_exact.insert(p);
      for (size_t pos = p.find('/'); pos != std::string::npos; pos = p.find('/', pos + 1)) {
        corrupt_suffix[p.substr(pos + 1)].push_back(LastComponent(p.substr(0, pos)));
      }
    }
  }
  // Whether a list path ending with source i's row path `relative` names that row.
  auto listed_suffix = [&](size_t i, absl::string_view relative) {
    auto it = corrupt_suffix.find(relative);
    if (it == corrupt_suffix.end()) return false;
    for (const std::string& folder : it->second) {
      if (!root_name_set.contains(folder) || folder == root_names[i]) return true;
    }
    return false;
  };

  // The pool is concat(sources) in config order, walked in place (no copy of its rows):
  // the known all-zero files of 2021; the deduplication on (xc_id, primary_label, author),
  // keeping the first; then the target and corrupt-list exclusions, in the notebook's order.
  std::vector<std::vector<SourceRow>> sources;
  size_t pool_size = 0;
  for (SourceRead& read : reads) {
    AVIARY_RETURN_IF_ERROR(read.rows.status());
    table.sources.push_back(std::move(read.report));
    sources.push_back(*std::move(read.rows));
    pool_size += sources.back().size();
  }
  std::vector<RowRef> candidates;
  candidates.reserve(pool_size);
  {
    // Views into `sources`, whose rows do not move before the set is gone.
    absl::flat_hash_set<DedupKey> seen;
    seen.reserve(pool_size);
    for (size_t i = 0; i < sources.size(); ++i) {
      const bool is_2021 = config.data.pretrain_sources[i].layout == "2021";
      SourceReport& rep = table.sources[i];
      for (size_t r = 0; r < sources[i].size(); ++r) {
        const SourceRow& row = sources[i][r];
        const Sample& s = row.sample;
        if (is_2021 && std::any_of(std::begin(kKnownAllZero2021), std::end(kKnownAllZero2021),
                                   [&](const char* p) { return row.relative_path() == p; })) {
          ++rep.corrupt_dropped;
          continue;
        }
        if (!seen.insert(DedupKey{s.xc_id, s.primary_label, s.author}).second) {
          ++rep.duplicates_dropped;
          continue;
        }
        if (target_ids.contains(s.xc_id)) {
          ++rep.target_overlap_dropped;
          continue;
        }
        if (!corrupt_exact.empty() &&
            (corrupt_exact.contains(s.filepath) || corrupt_exact.contains(row.relative_path()) ||
             listed_suffix(i, row.relative_path()))) {
          ++rep.corrupt_dropped;
          continue;
        }
        candidates.push_back(RowRef{static_cast<uint32_t>(i), static_cast<uint32_t>(r)});
      }
    }
  }
  table.samples = DropUnusable(sources, candidates, table.sources);
  AVIARY_RETURN_IF_ERROR(AssignLabelsAndFolds(config, &table));
  return table;
}

// The fine-tuning table from the target's rows.
absl::StatusOr<StageTable> BuildFinetuneTable(const PipelineConfig& config, SourceRead read) {
  StageTable table;
  table.stage = "finetune";
  table.n_splits = config.folds.finetune_splits;
  AVIARY_RETURN_IF_ERROR(read.rows.status());
  table.sources.push_back(std::move(read.report));
  std::vector<std::vector<SourceRow>> rows;
  rows.push_back(*std::move(read.rows));
  std::vector<RowRef> all(rows[0].size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = RowRef{0, static_cast<uint32_t>(i)};
  table.samples = DropUnusable(rows, all, table.sources);
  AVIARY_RETURN_IF_ERROR(AssignLabelsAndFolds(config, &table));
  return table;
}

}  // namespace

std::vector<absl::StatusOr<StageTable>> BuildStageTables(const PipelineConfig& config,
                                                         const std::vector<std::string>& stages) {
  std::vector<absl::StatusOr<StageTable>> out(stages.size(), absl::UnknownError("not built"));
  int pretrain = -1, finetune = -1;
  for (size_t i = 0; i < stages.size(); ++i) {
    if (stages[i] == "pretrain" && pretrain < 0) {
      pretrain = static_cast<int>(i);
    } else if (stages[i] == "finetune" && finetune < 0) {
      finetune = static_cast<int>(i);
    } else if (stages[i] == "pretrain" || stages[i] == "finetune") {
      out[i] = absl::InvalidArgumentError(absl::StrCat("stage '", stages[i], "' is asked for twice"));
    } else {
      out[i] = absl::InvalidArgumentError(absl::StrCat("unknown stage '", stages[i], "' (expected pretrain or finetune)"));
    }
  }
  if (pretrain >= 0 && config.data.pretrain_sources.empty()) {
    out[pretrain] = absl::InvalidArgumentError("stage 'pretrain' needs data.pretrain_sources, which is empty");
    pretrain = -1;
  }
  if (pretrain < 0 && finetune < 0) return out;
  // The target and (for pretraining) every source, read at once; errors reported in this order.
  std::vector<std::pair<const SourceConfig*, std::string>> to_read{{&config.data.target, "data.target"}};
  if (pretrain >= 0) {
    for (size_t i = 0; i < config.data.pretrain_sources.size(); ++i) {
      to_read.emplace_back(&config.data.pretrain_sources[i], absl::StrCat("data.pretrain_sources.", i));
    }
  }
  std::vector<SourceRead> reads = ReadSources(to_read);
  if (!reads[0].rows.ok()) {
    if (pretrain >= 0) out[pretrain] = reads[0].rows.status();
    if (finetune >= 0) out[finetune] = reads[0].rows.status();
    return out;
  }
  SourceRead target = std::move(reads[0]);
  reads.erase(reads.begin());
  // Target xc_ids (of every row, as the notebook takes them), for the exclusion of recordings
  // the fine-tuning set also holds; then both stages at once.
  absl::flat_hash_set<std::string> target_ids;
  if (pretrain >= 0) {
    target_ids.reserve(target.rows->size());
    for (const SourceRow& r : *target.rows) target_ids.insert(r.sample.xc_id);
  }
  std::thread finetune_builder;
  if (finetune >= 0) {
    finetune_builder = std::thread([&] { out[finetune] = BuildFinetuneTable(config, std::move(target)); });
  }
  if (pretrain >= 0) out[pretrain] = BuildPretrainTable(config, std::move(reads), target_ids);
  if (finetune_builder.joinable()) finetune_builder.join();
  return out;
}

absl::StatusOr<StageTable> BuildStageTable(const PipelineConfig& config, const std::string& stage) {
  return std::move(BuildStageTables(config, {stage})[0]);
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
  // One string, not a stream of rows: a pool has ~140,000.
  std::string out = "filename,primary_label,fold,cv\n";
  out.reserve(table.samples.size() * 96);
  for (const Sample& s : table.samples) {
    AppendCsvField(&out, s.filepath);
    out.push_back(',');
    AppendCsvField(&out, s.primary_label);
    absl::StrAppend(&out, ",", s.fold, s.cv ? ",True\n" : ",False\n");
  }
  return WriteOutputFileAtomically(path, out);
}

absl::Status WriteTrainListCsv(const StageTable& table, const std::vector<size_t>& rows,
                               const std::string& path) {
  std::string out = "filename,primary_label,target\n";
  out.reserve(rows.size() * 96);
  for (size_t r : rows) {
    const Sample& s = table.samples[r];
    AppendCsvField(&out, s.filepath);
    out.push_back(',');
    AppendCsvField(&out, s.primary_label);
    absl::StrAppend(&out, ",", s.target, "\n");
  }
  return WriteOutputFileAtomically(path, out);
}

}  // namespace aviary::common
