// The six dataset layouts aviary reads (and `aviary synth` writes): metadata file, columns and
// the rule that turns a metadata row into an audio path. See DESIGN.md, "The recipe".
#ifndef AVIARY_COMMON_LAYOUTS_H_
#define AVIARY_COMMON_LAYOUTS_H_

#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"

namespace aviary::common {

enum class Layout { k2024, k2023, k2022, k2021, k2020, kXc };

// Parses "2024", "2023", "2022", "2021", "2020", "xc"; INVALID_ARGUMENT listing them otherwise.
absl::StatusOr<Layout> ParseLayout(absl::string_view name);
std::string LayoutName(Layout layout);
const std::vector<std::string>& LayoutNames();

// Static description of a layout.
struct LayoutSpec {
  Layout layout;
  std::string metadata_file;              // relative to the root, e.g. "train_metadata.csv"
  std::vector<std::string> columns;       // the real dataset's columns, in its order
  std::string label_column;               // "primary_label" or "ebird_code"
  std::string default_extension;          // ".ogg" or ".mp3"
  bool filename_has_label_dir;            // 2022-2024: filename = "label/XC123.ogg"
};
const LayoutSpec& GetLayoutSpec(Layout layout);

// The audio file of a metadata row, relative to the source root:
//   2022/2023/2024: train_audio/<filename>
//   2021:           train_short_audio/<primary_label>/<filename>
//   2020:           train_audio/<ebird_code>/<filename>
//   xc:             A-M/<ebird_code>/<filename> or N-Z/<ebird_code>/<filename>, by the first
//                   letter of the code (a..m -> A-M).
std::string RelativeAudioPath(Layout layout, absl::string_view label, absl::string_view filename);
// The same, appended to `out` (a path built in one string).
void AppendRelativeAudioPath(Layout layout, absl::string_view label, absl::string_view filename, std::string* out);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_LAYOUTS_H_
