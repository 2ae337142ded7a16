// Synthetic BirdCLEF-like corpora for demos and tests (`aviary synth`).
//
// WriteSyntheticCorpus() writes, under `out_dir`, the metadata CSV of a layout (exactly
// GetLayoutSpec(layout).columns, in order) and one audio file per distinct recording at the
// layout's path rule (RelativeAudioPath): ogg Vorbis for 2021-2024, mp3 for 2020 and xc.
//
// Species. Species i has the same code in every layout and corpus (SynthSpeciesCode: 6 lowercase
// letters + "1", e.g. "amecro1"-like), so corpora written with different --species overlap on
// their first species. First letters walk a..z with stride 15, so consecutive species mostly fall
// in different halves of the xc A-M / N-Z split (not all: m then b, y then n). Each species has a call (SynthSpeciesVoice) that
// depends on its index only: base pitch spread log-uniformly over 1-6 kHz by a golden-ratio
// sequence, one of four sweep shapes (up, down, up-down, trill), syllable rate and duty cycle,
// syllables per call and harmonics. A recording renders a few calls at random times over
// pink/brown background noise with a random level and gain.
//
// Class distribution. Row counts per class are Zipf-like over a seeded ranking of the species;
// every class has at least one row and, with 6 or more species, max(2, species/4) classes have
// 1-4 rows (they take at most half of the rows beyond one per class; the rest go to the head).
// Counts depend on (seed, species, recordings), not on the layout. The CSV is sorted by label,
// then filename, as the real files are.
//
// XC ids. Every row has an id "XC<n>" (filename stem; the 2020/xc `xc_id` column):
//   - shared ids, 100000 + 100*i + j: slot j of species i, j < round(count_i / 10) (at most 99).
//     They do not depend on the layout, so corpora of different layouts written with the same
//     seed, --species and --recordings hold the same shared rows (~10% of rows): same id, same
//     species, same author (the author of a shared slot depends on (i, j) only), and, with the
//     same --max-seconds, the same metadata values and waveform (drawn from (seed, id); the
//     codec follows the layout). This exercises the pool's dedup on (xc_id, primary_label, author)
//     and the exclusion of target xc_ids. Different --recordings keep the low slots in common.
//     Shared slots need a class of 5+ rows, so corpora with ~1 row per class share nothing.
//   - private ids, 100000 * (2 + layout index) + ((serial * 7919 + seed) mod 100000), layout
//     index 2024=0, 2023=1, 2022=2, 2021=3, 2020=4, xc=5: never shared between layouts.
//   - within one corpus, a couple of exact duplicate rows (when recordings >= 10: up to
//     max(1, recordings/60), at most one per class, in classes with 3+ rows and 2+ private
//     rows): a private metadata row repeated verbatim, pointing at the same file.
//
// Broken files (when broken_files): max(1, recordings/40) rows of each kind: an empty file, a
// truncated file (the first 100 bytes of a valid one), a valid file of digital silence, and a
// text file with the audio extension. They are ordinary metadata rows, taken only from private,
// non-duplicated rows, greedily from the classes with the most valid files per broken file; a
// class keeps at least one valid file and gives at most max(1, count/2), so fewer broken files
// are written when there is no room (e.g. one row per class).
//
// Determinism. The same options give byte-identical metadata and audio. Randomness comes from
// std::mt19937_64 (specified exactly by the standard) through our own distributions. libvorbis
// and LAME are deterministic for identical input, but libsndfile seeds the Ogg stream serial
// number from the clock; the writer rewrites it to a value derived from (seed, id) and
// recomputes the page checksums. Waveforms use libm (sin, pow): bytes are reproducible for a
// given libm, not necessarily across C libraries.
//
// Not thread-safe against concurrent writers of the same out_dir; otherwise no shared state.
#ifndef AVIARY_CLIENT_SYNTH_H_
#define AVIARY_CLIENT_SYNTH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/layouts.h"

namespace aviary::synth {

using common::Layout;

// Options of `aviary synth`; see ValidateSynthOptions for the accepted ranges.
struct SynthOptions {
  std::string out_dir;  // created when missing
  Layout layout = Layout::k2024;
  int species = 12;      // 1..999
  int recordings = 120;  // metadata rows, species..99999
  uint32_t seed = 42;
  double max_seconds = 40;   // longest recording, > 1 and <= 600
  bool broken_files = true;  // write the broken-file rows described above
};

// INVALID_ARGUMENT naming the option and its value ("--species 0: must be >= 1").
absl::Status ValidateSynthOptions(const SynthOptions& options);

// What a written file is.
enum class SynthFileKind { kGood, kEmpty, kTruncated, kSilent, kNotAudio };
// "good", "empty", "truncated", "silent", "not_audio".
std::string SynthFileKindName(SynthFileKind kind);

// One audio file written (duplicate rows share one entry).
struct SynthFile {
  std::string relative_path;  // under out_dir, RelativeAudioPath of the row
  std::string label;          // species code
  std::string xc_id;          // "XC123456"
  std::string author;
  SynthFileKind kind = SynthFileKind::kGood;
  bool shared_xc_id = false;  // id from the cross-layout shared range
  int sample_rate = 0;        // intended (what a valid file decodes to)
  int channels = 0;
  int64_t num_frames = 0;
};

struct SynthReport {
  int rows = 0;                      // metadata rows (== options.recordings)
  int audio_files = 0;               // distinct files written, broken ones included
  int broken_files = 0;              // files of a kind other than kGood
  int duplicate_rows = 0;            // rows repeating an earlier row verbatim
  int shared_rows = 0;               // rows with a cross-layout shared xc_id
  std::vector<std::string> classes;  // species codes, sorted
  std::string metadata_path;         // out_dir/<metadata file>
  std::vector<SynthFile> files;      // in metadata order
};

// Code of species `index` (>= 0): 6 lowercase letters + "1", unique per index.
std::string SynthSpeciesCode(int index);
// Scientific and common name of species `index` (ASCII, no '_' or ',').
std::string SynthScientificName(int index);
std::string SynthCommonName(int index);

enum class SynthSweep { kUp, kDown, kUpDown, kTrill };

// The call of a species; a function of the index only.
struct SynthVoice {
  double base_hz = 0;        // fundamental at the start of the sweep (kUp, kUpDown, kTrill)
  double sweep_octaves = 0;  // sweep span (kTrill: modulation depth either side)
  SynthSweep sweep = SynthSweep::kUp;
  double trill_hz = 0;          // kTrill only
  double syllable_rate_hz = 0;  // syllables per second within a call
  double duty = 0;              // sounding fraction of a syllable period
  int syllables_per_call = 0;
  int harmonics = 0;  // 1..3, amplitude 1/h^1.5
  double min_hz = 0;  // range of the fundamental before per-recording jitter (+-4%)
  double max_hz = 0;
};
SynthVoice SynthSpeciesVoice(int index);

// Writes the corpus. INVALID_ARGUMENT for bad options, INTERNAL naming the path for I/O and
// libsndfile failures (with sf_strerror).
absl::StatusOr<SynthReport> WriteSyntheticCorpus(const SynthOptions& options);

// Synthetic soundscapes for inference tests and benchmarks (`aviary synth-soundscapes`): long
// mono recordings of known calls at known windows, and their truth in BirdCLEF solution format.
//
// Each file is cut into windows of `window_s` seconds (the last one shorter when `seconds` is
// not a multiple). A window holds no call (probability empty_share), one call, or calls of two
// different species (pair_share); a call's species is drawn uniformly from species
// 0..species-1, with the species' voice (SynthSpeciesVoice, so a model trained on a corpus of
// `aviary synth --species N` knows them), a random pitch and tempo jitter and level as in the
// corpus, and lies entirely inside its window (a short last window without room stays empty).
// Pink/brown background noise covers the whole file. Files are 32 kHz ogg Vorbis named
// `<id>.ogg` (numeric stems like BirdCLEF's, id = 10^9 + 10^4 (seed mod 10^5) + k) in
// out_dir/soundscapes; out_dir/solution.csv has `row_id` (`<id>_<end second>`) and one 0/1
// column per species code, sorted by name (the label order of a training run). Deterministic.
struct SoundscapeOptions {
  std::string out_dir;
  int species = 12;        // 1..999
  int count = 2;           // files, 1..9999
  double seconds = 240;    // per file, 1..3600
  double window_s = 5;     // row length
  uint32_t seed = 7;
  int sample_rate = 32000;
  double empty_share = 0.3;  // windows without a call
  double pair_share = 0.2;   // windows with two species
};

struct SoundscapeReport {
  std::vector<std::string> files;    // audio paths, in id order
  std::vector<std::string> classes;  // solution columns after row_id
  std::string solution_path;
  int rows = 0;
  int calls = 0;
  // Recordings of an earlier run in DIR/soundscapes/ that this run's solution.csv does not list
  // (another --seed or a larger --count), removed; and staged files of a stopped run.
  int removed = 0;
};

// INVALID_ARGUMENT naming the option for bad values, or DIR/soundscapes/ holding a file this
// command does not write (`aviary predict --audio` reads every file there); INTERNAL for I/O
// failures. Each recording is written beside its name and renamed into place.
absl::StatusOr<SoundscapeReport> WriteSyntheticSoundscapes(const SoundscapeOptions& options);

}  // namespace aviary::synth

#endif  // AVIARY_CLIENT_SYNTH_H_
