// aviary synth --out DIR --layout L --species N --recordings M --seed S
#include <iostream>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/flags.h"
#include "common/layouts.h"
#include "common/synth.h"
#include "client/commands.h"

namespace aviary::cli {

int RunSynth(const std::vector<std::string>& args) {
  auto fail = [](const absl::Status& st) {
    std::cerr << "aviary synth: " << st.message() << "\n";
    return ExitCodeFor(st);
  };
  common::Flags flags({"out", "layout", "species", "recordings", "seed", "max-seconds"},
                      {"no-broken"}, {});
  if (absl::Status st = flags.Parse(args); !st.ok()) return fail(st);
  if (!flags.positional().empty()) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat("unexpected argument '", flags.positional()[0], "'")));
  }
  common::SynthOptions options;
  auto out = flags.Require("out");
  if (!out.ok()) return fail(out.status());
  options.out_dir = *out;
  auto layout_name = flags.Require("layout");
  if (!layout_name.ok()) return fail(layout_name.status());
  auto layout = common::ParseLayout(*layout_name);
  if (!layout.ok()) return fail(absl::InvalidArgumentError(absl::StrCat("--layout: ", layout.status().message())));
  options.layout = *layout;
  auto species = flags.GetInt("species", options.species, 1, 999);
  if (!species.ok()) return fail(species.status());
  auto recordings = flags.GetInt("recordings", options.recordings, 1, 99999);
  if (!recordings.ok()) return fail(recordings.status());
  auto seed = flags.GetInt("seed", options.seed, 0, 4294967295LL);
  if (!seed.ok()) return fail(seed.status());
  auto max_seconds = flags.GetDouble("max-seconds", options.max_seconds);
  if (!max_seconds.ok()) return fail(max_seconds.status());
  options.species = static_cast<int>(*species);
  options.recordings = static_cast<int>(*recordings);
  options.seed = static_cast<uint32_t>(*seed);
  options.max_seconds = *max_seconds;
  options.broken_files = !flags.GetBool("no-broken");

  auto report = common::WriteSyntheticCorpus(options);
  if (!report.ok()) return fail(report.status());
  std::map<std::string, int> kinds;
  for (const auto& f : report->files) ++kinds[common::SynthFileKindName(f.kind)];
  std::cout << "wrote " << report->metadata_path << ": " << report->rows << " rows, "
            << report->classes.size() << " classes, " << report->audio_files << " audio files";
  if (report->broken_files > 0) {
    std::cout << " (" << report->broken_files << " broken:";
    for (const auto& [kind, n] : kinds) {
      if (kind != "good") std::cout << " " << n << " " << kind;
    }
    std::cout << ")";
  } else {
    std::cout << " (none broken)";
  }
  std::cout << ", " << report->duplicate_rows << " duplicate rows, " << report->shared_rows
            << " rows with cross-layout xc_ids\n";
  return 0;
}

int RunSynthSoundscapes(const std::vector<std::string>& args) {
  auto fail = [](const absl::Status& st) {
    std::cerr << "aviary synth-soundscapes: " << st.message() << "\n";
    return ExitCodeFor(st);
  };
  common::Flags flags({"out", "species", "count", "seconds", "window", "seed"}, {}, {});
  if (absl::Status st = flags.Parse(args); !st.ok()) return fail(st);
  if (!flags.positional().empty()) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat("unexpected argument '", flags.positional()[0], "'")));
  }
  common::SoundscapeOptions options;
  auto out = flags.Require("out");
  if (!out.ok()) return fail(out.status());
  options.out_dir = *out;
  auto species = flags.GetInt("species", options.species, 1, 999);
  if (!species.ok()) return fail(species.status());
  auto count = flags.GetInt("count", options.count, 1, 9999);
  if (!count.ok()) return fail(count.status());
  auto seconds = flags.GetDouble("seconds", options.seconds);
  if (!seconds.ok()) return fail(seconds.status());
  auto window = flags.GetDouble("window", options.window_s);
  if (!window.ok()) return fail(window.status());
  auto seed = flags.GetInt("seed", options.seed, 0, 4294967295LL);
  if (!seed.ok()) return fail(seed.status());
  options.species = static_cast<int>(*species);
  options.count = static_cast<int>(*count);
  options.seconds = *seconds;
  options.window_s = *window;
  options.seed = static_cast<uint32_t>(*seed);
  auto report = common::WriteSyntheticSoundscapes(options);
  if (!report.ok()) return fail(report.status());
  std::cout << "wrote " << report->files.size() << " soundscape(s) to " << options.out_dir
            << "/soundscapes and " << report->solution_path << ": " << report->rows << " rows, "
            << report->classes.size() << " classes, " << report->calls << " calls\n";
  return 0;
}

}  // namespace aviary::cli
