#include "common/layouts.h"

#include <cctype>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace aviary::common {
namespace {

const std::vector<std::string> k2024Columns{
    "primary_label", "secondary_labels", "type", "latitude", "longitude", "scientific_name",
    "common_name", "author", "license", "rating", "url", "filename"};
const std::vector<std::string> k2022Columns{
    "primary_label", "secondary_labels", "type", "latitude", "longitude", "scientific_name",
    "common_name", "author", "license", "rating", "time", "url", "filename"};
const std::vector<std::string> k2021Columns{
    "primary_label", "secondary_labels", "type", "latitude", "longitude", "scientific_name",
    "common_name", "author", "date", "filename", "license", "rating", "time", "url"};
// The 2020 birdsong-recognition train.csv schema, shared by the Xeno-Canto extended set.
const std::vector<std::string> k2020Columns{
    "rating", "playback_used", "ebird_code", "channels", "date", "pitch", "duration",
    "filename", "speed", "species", "number_of_notes", "title", "secondary_labels",
    "bird_seen", "sci_name", "location", "latitude", "sampling_rate", "type", "elevation",
    "description", "bitrate_of_mp3", "file_type", "volume", "background", "xc_id", "url",
    "country", "author", "primary_label", "longitude", "length", "time", "recordist", "license"};

}  // namespace

const std::vector<std::string>& LayoutNames() {
  static const std::vector<std::string> kNames{"2024", "2023", "2022", "2021", "2020", "xc"};
  return kNames;
}

absl::StatusOr<Layout> ParseLayout(absl::string_view name) {
  if (name == "2024") return Layout::k2024;
  if (name == "2023") return Layout::k2023;
  if (name == "2022") return Layout::k2022;
  if (name == "2021") return Layout::k2021;
  if (name == "2020") return Layout::k2020;
  if (name == "xc") return Layout::kXc;
  return absl::InvalidArgumentError(absl::StrCat("unknown layout '", name, "' (expected one of ",
                                                 absl::StrJoin(LayoutNames(), ", "), ")"));
}

std::string LayoutName(Layout layout) {
  switch (layout) {
    case Layout::k2024: return "2024";
    case Layout::k2023: return "2023";
    case Layout::k2022: return "2022";
    case Layout::k2021: return "2021";
    case Layout::k2020: return "2020";
    case Layout::kXc: return "xc";
  }
  return "?";
}

const LayoutSpec& GetLayoutSpec(Layout layout) {
  static const LayoutSpec k2024{Layout::k2024, "train_metadata.csv", k2024Columns,
                                "primary_label", ".ogg", true};
  static const LayoutSpec k2023{Layout::k2023, "train_metadata.csv", k2024Columns,
                                "primary_label", ".ogg", true};
  static const LayoutSpec k2022{Layout::k2022, "train_metadata.csv", k2022Columns,
                                "primary_label", ".ogg", true};
  static const LayoutSpec k2021{Layout::k2021, "train_metadata.csv", k2021Columns,
                                "primary_label", ".ogg", false};
  static const LayoutSpec k2020{Layout::k2020, "train.csv", k2020Columns, "ebird_code", ".mp3",
                                false};
  static const LayoutSpec kXc{Layout::kXc, "train_extended.csv", k2020Columns, "ebird_code",
                              ".mp3", false};
  switch (layout) {
    case Layout::k2024: return k2024;
    case Layout::k2023: return k2023;
    case Layout::k2022: return k2022;
    case Layout::k2021: return k2021;
    case Layout::k2020: return k2020;
    case Layout::kXc: return kXc;
  }
  return k2024;
}

void AppendRelativeAudioPath(Layout layout, absl::string_view label, absl::string_view filename, std::string* out) {
  switch (layout) {
    case Layout::k2024:
    case Layout::k2023:
    case Layout::k2022:
      absl::StrAppend(out, "train_audio/", filename);
      return;
    case Layout::k2021:
      absl::StrAppend(out, "train_short_audio/", label, "/", filename);
      return;
    case Layout::k2020:
      absl::StrAppend(out, "train_audio/", label, "/", filename);
      return;
    case Layout::kXc: {
      char first = label.empty() ? 'a' : static_cast<char>(std::tolower(
                                             static_cast<unsigned char>(label[0])));
      const char* half = (first >= 'n' && first <= 'z') ? "N-Z" : "A-M";
      absl::StrAppend(out, half, "/", label, "/", filename);
      return;
    }
  }
  absl::StrAppend(out, filename);
}

std::string RelativeAudioPath(Layout layout, absl::string_view label, absl::string_view filename) {
  std::string out;
  AppendRelativeAudioPath(layout, label, filename, &out);
  return out;
}

}  // namespace aviary::common
