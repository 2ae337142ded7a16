#include "common/manifest.h"

#include <charconv>
#include <cstdint>
#include <string>
#include <system_error>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/csv.h"
#include "common/status.h"

namespace aviary::common {

absl::StatusOr<TaskManifest> BuildTaskManifest(const PipelineConfig& config, const StageTable& table,
                                               int fold) {
  AVIARY_ASSIGN_OR_RETURN(TrainList list, BuildTrainList(config, table, fold));
  TaskManifest m;
  m.stage = table.stage;
  m.fold = fold;
  m.class_names = table.class_names;
  m.train.reserve(list.train.size());
  for (size_t r : list.train) m.train.push_back({table.samples[r].filepath, table.samples[r].target});
  m.valid.reserve(list.valid.size());
  for (size_t r : list.valid) m.valid.push_back({table.samples[r].filepath, table.samples[r].target});
  return m;
}

namespace {

// One field as WriteCsvRow writes it (CsvEscape's rule), appended without a copy.
void AppendRow(std::string* out, absl::string_view split, absl::string_view path, int64_t number) {
  AppendCsvField(out, split);
  out->push_back(',');
  AppendCsvField(out, path);
  out->push_back(',');
  char digits[24];
  const std::to_chars_result end = std::to_chars(digits, digits + sizeof(digits), number);
  out->append(digits, end.ptr);
  out->push_back('\n');
}

// A target as ManifestToCsv writes it: an optional '-' and decimal digits, nothing else. (SimpleAtoi
// also takes spaces around it and a '+': a manifest edited by hand or by another tool should
// say what it means.)
bool ParseManifestInt(absl::string_view text, int* value) {
  if (text.empty() || text.front() == '+') return false;
  const std::from_chars_result end = std::from_chars(text.data(), text.data() + text.size(), *value);
  return end.ec == std::errc() && end.ptr == text.data() + text.size();
}

}  // namespace

// Appends to one string instead of a stream of WriteCsvRow calls (each of which copied its
// fields): a pool manifest has ~140,000 rows. The bytes are the same.
std::string ManifestToCsv(const TaskManifest& manifest) {
  size_t bytes = 64 + manifest.stage.size();
  for (const std::string& name : manifest.class_names) bytes += name.size() + 16;
  for (const auto& item : manifest.train) bytes += item.path.size() + 16;
  for (const auto& item : manifest.valid) bytes += item.path.size() + 16;
  std::string out;
  out.reserve(bytes);
  out.append("split,path,target\n");
  AppendCsvField(&out, "stage");
  out.push_back(',');
  AppendCsvField(&out, manifest.stage);
  out.append(",\n");
  AppendRow(&out, "fold", "", manifest.fold);
  for (size_t i = 0; i < manifest.class_names.size(); ++i) {
    AppendRow(&out, "class", manifest.class_names[i], static_cast<int64_t>(i));
  }
  for (const auto& item : manifest.train) AppendRow(&out, "train", item.path, item.target);
  for (const auto& item : manifest.valid) AppendRow(&out, "valid", item.path, item.target);
  return out;
}

absl::StatusOr<TaskManifest> ParseManifestCsv(absl::string_view text, const std::string& source) {
  AVIARY_ASSIGN_OR_RETURN(CsvTable table, CsvTable::Parse(text, source));
  if (table.header() != std::vector<std::string>{"split", "path", "target"}) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": not a task manifest (expected the header split,path,target)"));
  }
  TaskManifest m;
  bool have_stage = false, have_fold = false;
  absl::flat_hash_map<std::string, int> class_index;
  for (size_t i = 0; i < table.num_rows(); ++i) {
    const auto& row = table.row(i);
    const std::string where = absl::StrCat(source, ":", table.line(i));
    const std::string& split = row[0];
    int target = -1;
    if (split != "stage" && !ParseManifestInt(row[2], &target)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": target '", row[2], "' is not an integer"));
    }
    if (split == "stage") {
      if (have_stage) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": a second stage row ('", row[1], "' after '",
                                                       m.stage, "')"));
      }
      m.stage = row[1];
      have_stage = true;
    } else if (split == "fold") {
      if (have_fold) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": a second fold row (", target, " after ", m.fold, ")"));
      }
      m.fold = target;
      have_fold = true;
    } else if (split == "class") {
      if (target != static_cast<int>(m.class_names.size())) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": class '", row[1], "' has index ", target,
                                                       ", expected ", m.class_names.size()));
      }
      if (row[1].empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": class ", target, " has no name"));
      if (auto [it, inserted] = class_index.emplace(row[1], target); !inserted) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": class '", row[1], "' at index ", target,
                                                       " is already class ", it->second));
      }
      m.class_names.push_back(row[1]);
    } else if (split == "train" || split == "valid") {
      if (target < 0 || target >= static_cast<int>(m.class_names.size())) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": target ", target, " of '", row[1],
                                                       "' is outside the ", m.class_names.size(), " classes"));
      }
      if (row[1].empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": empty path"));
      (split == "train" ? m.train : m.valid).push_back({row[1], target});
    } else {
      return absl::InvalidArgumentError(absl::StrCat(where, ": unknown split '", split,
                                                     "' (expected stage, fold, class, train or valid)"));
    }
  }
  if (!have_stage || !have_fold) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": the manifest names no ",
                                                   have_stage ? "fold" : "stage"));
  }
  if (m.class_names.empty()) return absl::InvalidArgumentError(absl::StrCat(source, ": the manifest has no classes"));
  if (m.train.empty()) return absl::InvalidArgumentError(absl::StrCat(source, ": the manifest has no training rows"));
  return m;
}

}  // namespace aviary::common
