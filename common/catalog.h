// The dataset catalog: reads the metadata of every configured source, applies the seed's data
// rules and produces a stage's sample table with its label map and folds.
//
//   finetune: the target (2024) table, name2label = its sorted classes, finetune_splits folds.
//   pretrain: concat(pretrain_sources) in config order; xc_id = file stem; drop duplicates on
//             (xc_id, primary_label, author) keeping the first; drop rows whose xc_id is in the
//             target; drop the corrupt-file list and known all-zero files; name2label2 = its
//             sorted classes, pretrain_splits folds.
// Rows whose audio file does not exist, or whose label is empty, are dropped after those rules
// and counted per source (never silently). Folds are computed on the final table, in order.
//
// Thread-compatible: a built StageTable is an immutable value.
#ifndef AVIARY_COMMON_CATALOG_H_
#define AVIARY_COMMON_CATALOG_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/config.h"
#include "common/layouts.h"

namespace aviary::common {

struct Sample {
  std::string filepath;        // source root joined with the layout's audio path rule
  std::string primary_label;
  std::vector<std::string> secondary_labels;
  std::string author;
  std::string xc_id;           // the file stem ("XC123")
  std::string source;          // layout name of the source: "2021", "xc", ...
  std::string metadata;        // "metadata.csv:line" the row came from
  double rating = 0.0;
  int target = -1;             // index in the stage's label map
  int fold = -1;               // validation fold
  bool cv = true;              // filter_data: false when the class has < cv_filter_thr rows
};

// What happened to the rows of one source.
struct SourceReport {
  std::string layout;
  std::string root;
  std::string metadata_path;
  int rows_read = 0;
  int duplicates_dropped = 0;      // (xc_id, primary_label, author) seen before
  int target_overlap_dropped = 0;  // xc_id also in the target set
  int corrupt_dropped = 0;         // on the corrupt-file list or a known all-zero file
  int missing_file_dropped = 0;    // audio file does not exist
  int empty_label_dropped = 0;
  int bad_secondary_labels = 0;    // unparsable secondary_labels text (treated as [])
  int kept = 0;
  std::vector<std::string> missing_examples;  // the first few missing paths
  // The folders of every missing file, each once: what the coordinator's fold cache watches for
  // those files to appear (coordinator/fold_cache.h).
  std::vector<std::string> missing_folders;
};

struct StageTable {
  std::string stage;                    // "pretrain" or "finetune"
  int n_splits = 0;
  std::vector<Sample> samples;          // pool order
  std::vector<std::string> class_names; // sorted; index = target
  std::map<std::string, int> name2label;
  std::vector<SourceReport> sources;
  int unknown_secondary_labels = 0;     // secondary labels not in the label map (ignored)
  std::string fold_warning;             // scikit-learn's small-class warning, if any
};

// Builds the stage's table (see the file comment). INVALID_ARGUMENT for an unknown stage, a
// missing metadata file or column (naming the file), an empty pretraining source list, or
// folds that cannot be made (every class smaller than n_splits).
absl::StatusOr<StageTable> BuildStageTable(const PipelineConfig& config, const std::string& stage);
// The tables of several stages (in the order of `stages`, each with its own outcome), built at
// once from one read of each file: both stages read the target.
std::vector<absl::StatusOr<StageTable>> BuildStageTables(const PipelineConfig& config,
                                                         const std::vector<std::string>& stages);

// The fold's training rows (indices into table.samples) after cv_filter, upsample and (for
// pretraining) downsample, before shuffling; and its validation rows.
struct TrainList {
  std::vector<size_t> train;
  std::vector<size_t> valid;
};
absl::StatusOr<TrainList> BuildTrainList(const PipelineConfig& config, const StageTable& table,
                                         int fold);

// Reads the corrupt-file list: a JSON array of path strings. INVALID_ARGUMENT naming the file
// otherwise.
absl::StatusOr<std::vector<std::string>> ReadCorruptFileList(const std::string& path);

// Writes `aviary dataset folds` output: filename,primary_label,fold,cv.
absl::Status WriteFoldsCsv(const StageTable& table, const std::string& path);
// Writes `aviary dataset train-list` output: filename,primary_label,target.
absl::Status WriteTrainListCsv(const StageTable& table, const std::vector<size_t>& rows,
                               const std::string& path);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_CATALOG_H_
