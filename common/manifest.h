// A task's manifest: what one training task needs from the dataset, computed once by the
// coordinator (catalog + folds + train list) and shipped to the worker group with the task.
//
// CSV text, columns `split,path,target`:
//   class,<name>,<index>     one row per class, index = position in the label map (0..n-1)
//   train,<audio path>,<t>   the fold's training rows after cv_filter / upsample / downsample,
//                            in train-list order (repeated rows are upsampled copies)
//   valid,<audio path>,<t>   the fold's validation rows, in pool order
// plus two header comments carried as rows: `stage,<name>,` and `fold,,<k>`.
//
// Plain values; no synchronisation.
#ifndef AVIARY_COMMON_MANIFEST_H_
#define AVIARY_COMMON_MANIFEST_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/catalog.h"
#include "common/config.h"

namespace aviary::common {

struct ManifestItem {
  std::string path;
  int target = -1;
};

struct TaskManifest {
  std::string stage;
  int fold = 0;
  std::vector<std::string> class_names;  // index = target
  std::vector<ManifestItem> train;
  std::vector<ManifestItem> valid;
};

// The manifest of `fold` of an already built stage table (BuildTrainList's rows).
absl::StatusOr<TaskManifest> BuildTaskManifest(const PipelineConfig& config, const StageTable& table,
                                               int fold);

// Serialises / parses the CSV described above. Parse errors name `source`:line and the field.
std::string ManifestToCsv(const TaskManifest& manifest);
absl::StatusOr<TaskManifest> ParseManifestCsv(absl::string_view text, const std::string& source);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_MANIFEST_H_
