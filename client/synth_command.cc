// aviary synth and aviary synth-soundscapes: the synthetic corpus writer (client/synth.h).
#include <memory>
#include <iostream>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/layouts.h"
#include "client/synth.h"
#include "client/commands.h"

namespace aviary::cli {

namespace {

int RunSynth(const synth::SynthOptions& options) {
  auto fail = [](const absl::Status& st) {
    std::cerr << "aviary synth: " << st.message() << "\n";
    return ExitCodeFor(st);
  };
  auto report = synth::WriteSyntheticCorpus(options);
  if (!report.ok()) return fail(report.status());
  std::map<std::string, int> kinds;
  for (const auto& f : report->files) ++kinds[synth::SynthFileKindName(f.kind)];
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
  // Which ones, so that a prepare or training report can be checked against them (and a
  // data.corrupt_files list written from them).
  if (report->broken_files > 0) std::cout << "broken files (under " << options.out_dir << "):\n";
  for (const synth::SynthFile& f : report->files) {
    if (f.kind != synth::SynthFileKind::kGood) {
      std::cout << "  " << synth::SynthFileKindName(f.kind) << "\t" << f.relative_path << "\n";
    }
  }
  return 0;
}

int RunSynthSoundscapes(const synth::SoundscapeOptions& options) {
  auto fail = [](const absl::Status& st) {
    std::cerr << "aviary synth-soundscapes: " << st.message() << "\n";
    return ExitCodeFor(st);
  };
  auto report = synth::WriteSyntheticSoundscapes(options);
  if (!report.ok()) return fail(report.status());
  std::cout << "wrote " << report->files.size() << " soundscape(s) to " << options.out_dir
            << "/soundscapes and " << report->solution_path << ": " << report->rows << " rows, "
            << report->classes.size() << " classes, " << report->calls << " calls";
  if (report->removed > 0) {
    std::cout << "; removed " << report->removed << " file(s) of an earlier run that this solution.csv does not list";
  }
  std::cout << "\n";
  return 0;
}

}  // namespace

void AddSynthCommands(CLI::App* app, Runner* run) {
  auto corpus = std::make_shared<synth::SynthOptions>();
  auto layout = std::make_shared<std::string>();
  auto no_broken = std::make_shared<bool>(false);
  CLI::App* synth = common::AddCommand(
      app, "synth", "write a synthetic corpus in one layout",
      "Real ogg/mp3 files and the metadata CSV of the layout; a few broken files (empty, truncated, "
      "silent, not audio) unless --no-broken.");
  synth->group(kOfflineGroup);
  synth->add_option("--out", corpus->out_dir, "the corpus folder")->type_name("DIR")->required()->check(common::NonEmpty("a folder"));
  synth->add_option("--layout", *layout, "the metadata layout: 2024, 2023, 2022, 2021, 2020 or xc")
      ->type_name("L")
      ->required();
  common::AddNumber(synth, "--species", &corpus->species, "N", "classes", 1, 999)->capture_default_str();
  common::AddNumber(synth, "--recordings", &corpus->recordings, "M", "rows", 1, 99999)->capture_default_str();
  common::AddNumber<uint32_t>(synth, "--seed", &corpus->seed, "S", "random seed", 0, 4294967295u)
      ->capture_default_str();
  common::AddNumber(synth, "--max-seconds", &corpus->max_seconds, "X", "longest recording, seconds (> 1, <= 600)")
      ->capture_default_str();
  synth->add_flag("--no-broken", *no_broken, "no broken audio files (by default a few are written, and listed)");
  synth->callback([run, corpus, layout, no_broken] {
    *run = [corpus, layout, no_broken] {
      auto parsed = common::ParseLayout(*layout);
      if (!parsed.ok()) {
        std::cerr << "aviary synth: --layout: " << parsed.status().message() << "\n";
        return 2;
      }
      synth::SynthOptions options = *corpus;
      options.layout = *parsed;
      options.broken_files = !*no_broken;
      return RunSynth(options);
    };
  });

  auto scapes = std::make_shared<synth::SoundscapeOptions>();
  CLI::App* soundscapes = common::AddCommand(
      app, "synth-soundscapes", "long recordings of known calls and their solution.csv",
      "DIR/soundscapes/ holds 32 kHz ogg recordings of the synthetic species' calls at known windows (0, "
      "1 or 2 species per window) over background noise; DIR/solution.csv their truth in BirdCLEF "
      "solution format. Run again into the same DIR, the recordings an earlier run wrote (DIR/.synth-soundscapes "
      "lists them) are replaced or removed, so the folder holds what the new solution.csv lists; any other file "
      "there is refused.");
  soundscapes->group(kOfflineGroup);
  soundscapes->add_option("--out", scapes->out_dir, "the output folder")
      ->type_name("DIR")
      ->required()
      ->check(common::NonEmpty("a folder"));
  common::AddNumber(soundscapes, "--species", &scapes->species, "N", "classes", 1, 999)->capture_default_str();
  common::AddNumber(soundscapes, "--count", &scapes->count, "M", "soundscapes", 1, 9999)->capture_default_str();
  common::AddNumber(soundscapes, "--seconds", &scapes->seconds, "S", "length of each, seconds (1..3600)")
      ->capture_default_str();
  common::AddNumber(soundscapes, "--window", &scapes->window_s, "W", "window of the solution rows, seconds")
      ->capture_default_str();
  common::AddNumber<uint32_t>(soundscapes, "--seed", &scapes->seed, "S", "random seed", 0, 4294967295u)
      ->capture_default_str();
  soundscapes->callback([run, scapes] { *run = [scapes] { return RunSynthSoundscapes(*scapes); }; });
}

}  // namespace aviary::cli
