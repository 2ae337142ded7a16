#include "client/synth.h"

#include <sndfile.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/csv.h"
#include "common/layouts.h"
#include "gtest/gtest.h"

namespace aviary::synth {

using common::CsvTable;
using common::LayoutSpec;
using common::ParsePythonStringList;
namespace {

namespace fs = std::filesystem;

// A fresh directory under the test temp dir, removed when the object goes away.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::path(::testing::TempDir()) / "synth_test_XXXXXX").string();
    char* made = ::mkdtemp(pattern.data());
    EXPECT_NE(made, nullptr) << pattern;
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string Sub(const std::string& name) const { return (fs::path(path_) / name).string(); }

 private:
  std::string path_;
};

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

struct Decoded {
  bool ok = false;
  int sample_rate = 0;
  int channels = 0;
  std::vector<float> samples;  // interleaved
};

Decoded Decode(const std::string& path) {
  Decoded d;
  SF_INFO info{};
  SNDFILE* file = sf_open(path.c_str(), SFM_READ, &info);
  if (file == nullptr) return d;
  d.sample_rate = info.samplerate;
  d.channels = info.channels;
  std::vector<float> buffer(4096 * static_cast<size_t>(info.channels));
  sf_count_t got;
  while ((got = sf_readf_float(file, buffer.data(), 4096)) > 0) {
    d.samples.insert(d.samples.end(), buffer.begin(),
                     buffer.begin() + got * static_cast<sf_count_t>(info.channels));
  }
  d.ok = sf_close(file) == 0;
  return d;
}

float PeakAbs(const std::vector<float>& samples) {
  float peak = 0;
  for (float s : samples) peak = std::max(peak, std::fabs(s));
  return peak;
}

SynthOptions SmallOptions(const std::string& out, Layout layout) {
  SynthOptions o;
  o.out_dir = out;
  o.layout = layout;
  o.species = 8;
  o.recordings = 40;
  o.seed = 7;
  o.max_seconds = 6;
  return o;
}

const std::vector<Layout> kAllLayouts{Layout::k2024, Layout::k2023, Layout::k2022,
                                      Layout::k2021, Layout::k2020, Layout::kXc};

bool IsMp3(Layout layout) { return layout == Layout::k2020 || layout == Layout::kXc; }

// Soundscape options for `out_dir`: `species` species, `count` files of `seconds` each.
SoundscapeOptions Scapes(const std::string& out_dir, int species, int count, double seconds) {
  SoundscapeOptions o;
  o.out_dir = out_dir;
  o.species = species;
  o.count = count;
  o.seconds = seconds;
  return o;
}

TEST(SynthTest, SpeciesCodesAreUniqueLowercaseAndSpread) {
  std::set<std::string> codes;
  std::set<char> first_letters;
  for (int i = 0; i < 999; ++i) {
    std::string code = SynthSpeciesCode(i);
    ASSERT_EQ(code.size(), 7u) << code;
    for (int k = 0; k < 6; ++k) EXPECT_TRUE(code[k] >= 'a' && code[k] <= 'z') << code;
    EXPECT_EQ(code.back(), '1') << code;
    EXPECT_TRUE(codes.insert(code).second) << "duplicate code " << code << " at " << i;
    if (i < 26) first_letters.insert(code[0]);
    EXPECT_EQ(SynthScientificName(i).find_first_of("_,"), std::string::npos);
    EXPECT_EQ(SynthCommonName(i).find_first_of("_,"), std::string::npos);
  }
  EXPECT_EQ(first_letters.size(), 26u);
  // The first two species already land on both sides of the xc A-M / N-Z split.
  EXPECT_LE(SynthSpeciesCode(0)[0], 'm');
  EXPECT_GE(SynthSpeciesCode(1)[0], 'n');
  EXPECT_EQ(SynthSpeciesCode(3), SynthSpeciesCode(3));
}

TEST(SynthTest, VoicesAreDistinctAndDependOnTheIndexOnly) {
  std::set<std::tuple<int, int, int>> signatures;
  for (int i = 0; i < 24; ++i) {
    SynthVoice v = SynthSpeciesVoice(i);
    SynthVoice again = SynthSpeciesVoice(i);
    EXPECT_EQ(v.base_hz, again.base_hz);
    EXPECT_GE(v.base_hz, 1000.0);
    EXPECT_LE(v.base_hz, 6000.0);
    EXPECT_GE(v.harmonics, 1);
    EXPECT_LE(v.harmonics, 3);
    EXPECT_LT(v.min_hz, v.max_hz);
    // Pitch in 8% bins, sweep shape and syllable rate in 1 Hz bins tell every species apart.
    int pitch_bin = static_cast<int>(std::log(v.base_hz) / std::log(1.08));
    EXPECT_TRUE(
        signatures
            .insert({pitch_bin, static_cast<int>(v.sweep), static_cast<int>(v.syllable_rate_hz)})
            .second)
        << "species " << i;
  }
}

TEST(SynthTest, WritesEveryLayout) {
  TempDir tmp;
  for (Layout layout : kAllLayouts) {
    SCOPED_TRACE(LayoutName(layout));
    const LayoutSpec& spec = GetLayoutSpec(layout);
    SynthOptions options = SmallOptions(tmp.Sub(LayoutName(layout)), layout);
    absl::StatusOr<SynthReport> report = WriteSyntheticCorpus(options);
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_EQ(report->rows, options.recordings);
    EXPECT_EQ(report->metadata_path, (fs::path(options.out_dir) / spec.metadata_file).string());
    ASSERT_EQ(report->classes.size(), 8u);
    EXPECT_TRUE(std::is_sorted(report->classes.begin(), report->classes.end()));
    EXPECT_EQ(report->audio_files + report->duplicate_rows, report->rows);
    EXPECT_GE(report->duplicate_rows, 1);
    EXPECT_EQ(report->broken_files, 4);  // one of each kind for 40 rows

    absl::StatusOr<CsvTable> table = CsvTable::ReadFile(report->metadata_path);
    ASSERT_TRUE(table.ok()) << table.status();
    EXPECT_EQ(table->header(), spec.columns);
    ASSERT_EQ(table->num_rows(), 40u);
    size_t label_col = *table->ColumnIndex(spec.label_column);
    size_t filename_col = *table->ColumnIndex("filename");
    size_t secondary_col = *table->ColumnIndex("secondary_labels");
    std::set<std::string> classes(report->classes.begin(), report->classes.end());
    std::map<std::string, int> per_class;
    int with_secondary = 0;
    for (size_t r = 0; r < table->num_rows(); ++r) {
      const std::vector<std::string>& row = table->row(r);
      const std::string& label = row[label_col];
      const std::string& filename = row[filename_col];
      EXPECT_TRUE(classes.count(label)) << label;
      ++per_class[label];
      std::string stem = fs::path(filename).stem().string();
      EXPECT_EQ(stem.rfind("XC", 0), 0u) << filename;
      if (spec.filename_has_label_dir) {
        EXPECT_EQ(filename, label + "/" + stem + ".ogg");
      } else {
        EXPECT_EQ(filename, stem + (IsMp3(layout) ? ".mp3" : ".ogg"));
      }
      EXPECT_TRUE(
          fs::exists(fs::path(options.out_dir) / RelativeAudioPath(layout, label, filename)))
          << filename;
      absl::StatusOr<std::vector<std::string>> secondary =
          ParsePythonStringList(row[secondary_col]);
      ASSERT_TRUE(secondary.ok()) << secondary.status();
      for (const std::string& s : *secondary) {
        EXPECT_TRUE(classes.count(s)) << s;
        EXPECT_NE(s, label);
      }
      if (!secondary->empty()) ++with_secondary;
      if (IsMp3(layout)) {
        const std::string& xc_id = row[*table->ColumnIndex("xc_id")];
        EXPECT_EQ(xc_id, stem);
        EXPECT_EQ(row[*table->ColumnIndex("file_type")], "mp3");
        const std::string& primary = row[*table->ColumnIndex("primary_label")];
        const std::string& sci = row[*table->ColumnIndex("sci_name")];
        const std::string& common = row[*table->ColumnIndex("species")];
        EXPECT_EQ(primary, sci + "_" + common);
        EXPECT_EQ(row[*table->ColumnIndex("url")], "https://xeno-canto.org/" + stem.substr(2));
      } else {
        EXPECT_EQ(row[*table->ColumnIndex("url")], "https://xeno-canto.org/" + stem.substr(2));
        const std::string& rating = row[*table->ColumnIndex("rating")];
        double value = std::stod(rating);
        EXPECT_GE(value, 0.0);
        EXPECT_LE(value, 5.0);
        EXPECT_EQ(std::fmod(value * 2, 1.0), 0.0) << rating;
      }
    }
    EXPECT_GE(with_secondary, 2);
    EXPECT_EQ(per_class.size(), 8u);  // every class has at least one row
    if (layout == Layout::kXc) {
      EXPECT_TRUE(fs::is_directory(fs::path(options.out_dir) / "A-M"));
      EXPECT_TRUE(fs::is_directory(fs::path(options.out_dir) / "N-Z"));
    }

    std::map<SynthFileKind, int> kinds;
    std::set<int> rates;
    for (const SynthFile& file : report->files) {
      SCOPED_TRACE(file.relative_path);
      const std::string path = (fs::path(options.out_dir) / file.relative_path).string();
      ++kinds[file.kind];
      ASSERT_TRUE(fs::exists(path));
      switch (file.kind) {
        case SynthFileKind::kGood: {
          Decoded d = Decode(path);
          ASSERT_TRUE(d.ok);
          EXPECT_EQ(d.sample_rate, file.sample_rate);
          EXPECT_EQ(d.channels, file.channels);
          EXPECT_EQ(static_cast<int64_t>(d.samples.size()), file.num_frames * file.channels);
          EXPECT_GT(PeakAbs(d.samples), 0.01f);
          rates.insert(d.sample_rate);
          break;
        }
        case SynthFileKind::kEmpty:
          EXPECT_EQ(fs::file_size(path), 0u);
          EXPECT_FALSE(Decode(path).ok);
          break;
        case SynthFileKind::kTruncated:
          EXPECT_EQ(fs::file_size(path), 100u);
          EXPECT_FALSE(Decode(path).ok);
          break;
        case SynthFileKind::kSilent: {
          Decoded d = Decode(path);
          ASSERT_TRUE(d.ok);
          EXPECT_EQ(d.sample_rate, file.sample_rate);
          EXPECT_FALSE(d.samples.empty());
          EXPECT_EQ(PeakAbs(d.samples), 0.0f);
          break;
        }
        case SynthFileKind::kNotAudio:
          EXPECT_EQ(Slurp(path).rfind("<html>", 0), 0u);
          EXPECT_FALSE(Decode(path).ok);
          break;
      }
    }
    EXPECT_EQ(kinds[SynthFileKind::kEmpty], 1);
    EXPECT_EQ(kinds[SynthFileKind::kTruncated], 1);
    EXPECT_EQ(kinds[SynthFileKind::kSilent], 1);
    EXPECT_EQ(kinds[SynthFileKind::kNotAudio], 1);
    EXPECT_TRUE(rates.count(32000));
  }
}

TEST(SynthTest, ClassDistributionIsLongTailed) {
  TempDir tmp;
  SynthOptions options;
  options.out_dir = tmp.Sub("c");
  options.layout = Layout::k2023;
  options.max_seconds = 2;  // the distribution does not depend on lengths; keep it fast
  absl::StatusOr<SynthReport> report = WriteSyntheticCorpus(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->broken_files, 12);  // 3 of each kind for 120 rows
  EXPECT_EQ(report->duplicate_rows, 2);
  absl::StatusOr<CsvTable> table = CsvTable::ReadFile(report->metadata_path);
  ASSERT_TRUE(table.ok()) << table.status();
  std::map<std::string, int> counts;
  for (size_t r = 0; r < table->num_rows(); ++r) ++counts[table->row(r)[0]];
  ASSERT_EQ(counts.size(), 12u);
  int small = 0, largest = 0;
  for (const auto& [label, n] : counts) {
    if (n < 5) ++small;
    largest = std::max(largest, n);
  }
  EXPECT_GE(small, 3);
  EXPECT_GE(largest, 25);
  // Every class keeps a valid file.
  std::set<std::string> with_good;
  std::map<std::string, int> sample_rates, channels;
  for (const SynthFile& file : report->files) {
    if (file.kind == SynthFileKind::kGood) with_good.insert(file.label);
    ++sample_rates[std::to_string(file.sample_rate)];
    ++channels[std::to_string(file.channels)];
  }
  EXPECT_EQ(with_good.size(), 12u);
  EXPECT_GE(sample_rates.size(), 3u);
  EXPECT_GT(sample_rates["32000"], report->audio_files / 2);
  EXPECT_GT(channels["2"], 0);
  EXPECT_GT(channels["1"], channels["2"]);
}

std::map<std::string, std::string> ReadTree(const std::string& root) {
  std::map<std::string, std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(root)) {
    if (entry.is_regular_file()) {
      files[fs::relative(entry.path(), root).string()] = Slurp(entry.path().string());
    }
  }
  return files;
}

TEST(SynthTest, SameOptionsGiveIdenticalBytes) {
  TempDir tmp;
  for (Layout layout : {Layout::k2022, Layout::k2020}) {
    SCOPED_TRACE(LayoutName(layout));
    SynthOptions options = SmallOptions(tmp.Sub(LayoutName(layout) + "_a"), layout);
    options.recordings = 16;
    options.max_seconds = 3;
    ASSERT_TRUE(WriteSyntheticCorpus(options).ok());
    options.out_dir = tmp.Sub(LayoutName(layout) + "_b");
    ASSERT_TRUE(WriteSyntheticCorpus(options).ok());
    std::map<std::string, std::string> a = ReadTree(tmp.Sub(LayoutName(layout) + "_a"));
    std::map<std::string, std::string> b = ReadTree(tmp.Sub(LayoutName(layout) + "_b"));
    ASSERT_EQ(a.size(), b.size());
    for (const auto& [name, bytes] : a) {
      ASSERT_TRUE(b.count(name)) << name;
      EXPECT_TRUE(bytes == b[name]) << name << " differs between two runs";
      EXPECT_EQ(name.find(".tmp."), std::string::npos) << name << ": a staged file left behind";
    }
    // Written again over the first corpus, each file is replaced whole (written beside its name
    // and renamed), not written through what is there: here a link to a file of another corpus.
    const std::string audio = [&] {
      for (const auto& [name, bytes] : a) {
        if ((absl::EndsWith(name, ".ogg") || absl::EndsWith(name, ".mp3")) && bytes.size() > 100) return name;
      }
      return std::string();
    }();
    ASSERT_FALSE(audio.empty());
    const fs::path linked = fs::path(tmp.Sub(LayoutName(layout) + "_a")) / audio;
    const std::string outside = tmp.Sub(LayoutName(layout) + "_outside.ogg");
    { std::ofstream(outside) << "another corpus's file"; }
    fs::remove(linked);
    fs::create_symlink(outside, linked);
    options.out_dir = tmp.Sub(LayoutName(layout) + "_a");
    ASSERT_TRUE(WriteSyntheticCorpus(options).ok());
    EXPECT_EQ(Slurp(outside), "another corpus's file");
    EXPECT_FALSE(fs::is_symlink(linked));
    EXPECT_TRUE(Slurp(linked.string()) == b.at(audio));
    // Another seed gives another corpus.
    options.out_dir = tmp.Sub(LayoutName(layout) + "_c");
    options.seed = 8;
    absl::StatusOr<SynthReport> other = WriteSyntheticCorpus(options);
    ASSERT_TRUE(other.ok());
    EXPECT_NE(Slurp(other->metadata_path), a.at(GetLayoutSpec(layout).metadata_file));
  }
}

struct RowKey {
  std::string xc_id, label, author;
  bool operator<(const RowKey& o) const {
    return std::tie(xc_id, label, author) < std::tie(o.xc_id, o.label, o.author);
  }
};

std::vector<RowKey> Keys(const SynthReport& report, Layout layout) {
  absl::StatusOr<CsvTable> table = CsvTable::ReadFile(report.metadata_path);
  EXPECT_TRUE(table.ok()) << table.status();
  std::vector<RowKey> keys;
  if (!table.ok()) return keys;
  const LayoutSpec& spec = GetLayoutSpec(layout);
  size_t label = *table->ColumnIndex(spec.label_column);
  size_t filename = *table->ColumnIndex("filename");
  size_t author = *table->ColumnIndex("author");
  for (size_t r = 0; r < table->num_rows(); ++r) {
    keys.push_back({fs::path(table->row(r)[filename]).stem().string(), table->row(r)[label],
                    table->row(r)[author]});
  }
  return keys;
}

TEST(SynthTest, SharesSomeXcIdsAcrossLayoutsAndRepeatsRowsWithin) {
  TempDir tmp;
  std::map<Layout, std::vector<RowKey>> keys;
  for (Layout layout : {Layout::k2024, Layout::k2021, Layout::kXc}) {
    SynthOptions options = SmallOptions(tmp.Sub(LayoutName(layout)), layout);
    options.species = 6;
    options.recordings = 60;
    options.max_seconds = 1.5;
    options.broken_files = false;
    absl::StatusOr<SynthReport> report = WriteSyntheticCorpus(options);
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_EQ(report->broken_files, 0);
    EXPECT_GE(report->shared_rows, 3);
    EXPECT_LE(report->shared_rows, 12);
    keys[layout] = Keys(*report, layout);
    // Exact duplicates within the corpus: same (xc_id, label, author) twice.
    std::map<RowKey, int> seen;
    for (const RowKey& k : keys[layout]) ++seen[k];
    int repeated = 0;
    for (const auto& [k, n] : seen) repeated += n - 1;
    EXPECT_EQ(repeated, report->duplicate_rows);
    EXPECT_GE(repeated, 1);
  }
  auto shared = [&](Layout a, Layout b) {
    std::set<RowKey> in_a(keys[a].begin(), keys[a].end());
    std::set<std::string> ids_b;
    std::set<RowKey> common;
    for (const RowKey& k : keys[b]) {
      ids_b.insert(k.xc_id);
      if (in_a.count(k)) common.insert(k);
    }
    // An id found in both corpora always means the same species and author.
    for (const RowKey& k : in_a) {
      if (ids_b.count(k.xc_id)) EXPECT_TRUE(common.count(k)) << k.xc_id;
    }
    return common.size();
  };
  EXPECT_GE(shared(Layout::k2024, Layout::k2021), 3u);
  EXPECT_GE(shared(Layout::k2021, Layout::kXc), 3u);
  EXPECT_LE(shared(Layout::k2024, Layout::kXc), 12u);
}

// The loudest 20 ms of a recording is a call; its zero-crossing rate estimates the fundamental,
// which must lie in the species' range.
TEST(SynthTest, CallsCarryTheSpeciesPitch) {
  TempDir tmp;
  SynthOptions options = SmallOptions(tmp.Sub("p"), Layout::k2023);
  options.species = 10;
  options.recordings = 50;
  options.max_seconds = 3;
  absl::StatusOr<SynthReport> report = WriteSyntheticCorpus(options);
  ASSERT_TRUE(report.ok()) << report.status();
  std::map<std::string, int> species_of;
  for (int i = 0; i < options.species; ++i) species_of[SynthSpeciesCode(i)] = i;
  int checked = 0, in_range = 0;
  for (const SynthFile& file : report->files) {
    if (file.kind != SynthFileKind::kGood || file.sample_rate != 32000 || file.channels != 1 ||
        file.num_frames < 16000) {
      continue;
    }
    Decoded d = Decode((fs::path(options.out_dir) / file.relative_path).string());
    ASSERT_TRUE(d.ok);
    const size_t window = 640, hop = 160;
    size_t best = 0;
    double best_energy = -1;
    for (size_t start = 0; start + window <= d.samples.size(); start += hop) {
      double energy = 0;
      for (size_t n = start; n < start + window; ++n) energy += d.samples[n] * d.samples[n];
      if (energy > best_energy) {
        best_energy = energy;
        best = start;
      }
    }
    int crossings = 0;
    for (size_t n = best + 1; n < best + window; ++n) {
      if ((d.samples[n - 1] < 0) != (d.samples[n] < 0)) ++crossings;
    }
    double hz = crossings / (2.0 * window / 32000.0);
    SynthVoice voice = SynthSpeciesVoice(species_of.at(file.label));
    ++checked;
    if (hz > 0.8 * voice.min_hz && hz < 1.25 * voice.max_hz) ++in_range;
  }
  ASSERT_GE(checked, 10);
  EXPECT_GE(in_range, checked * 8 / 10) << in_range << " of " << checked;
}

TEST(SynthTest, RefusesBadOptions) {
  TempDir tmp;
  auto error_of = [](const SynthOptions& options) {
    absl::StatusOr<SynthReport> report = WriteSyntheticCorpus(options);
    EXPECT_FALSE(report.ok());
    return report.status();
  };
  SynthOptions base = SmallOptions(tmp.Sub("bad"), Layout::k2024);

  SynthOptions o = base;
  o.species = 0;
  absl::Status s = error_of(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("--species 0"), absl::string_view::npos) << s;

  o = base;
  o.recordings = 5;
  s = error_of(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("--recordings 5"), absl::string_view::npos) << s;

  o = base;
  o.max_seconds = 1;
  s = error_of(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("--max-seconds 1"), absl::string_view::npos) << s;

  o = base;
  o.max_seconds = std::nan("");
  EXPECT_EQ(error_of(o).code(), absl::StatusCode::kInvalidArgument);

  o = base;
  o.out_dir = "";
  s = error_of(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("--out"), absl::string_view::npos) << s;

  // A regular file in the way: as the directory itself, and as a parent.
  std::string file = tmp.Sub("plain_file");
  std::ofstream(file) << "x";
  o = base;
  o.out_dir = file;
  s = error_of(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find(file), absl::string_view::npos) << s;
  // A folder that cannot be made is the user's path too (exit 2, as the README says).
  o.out_dir = file + "/corpus";
  s = error_of(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find(o.out_dir), absl::string_view::npos) << s;

  EXPECT_FALSE(fs::exists(base.out_dir));  // nothing written for refused options
}

// A window so short that the dense truth table would take gigabytes (or under one sample) is
// refused naming --window, before anything is written (it ended in std::bad_alloc).
TEST(SynthTest, SoundscapesRefuseAWindowTooShort) {
  TempDir tmp;
  SoundscapeOptions o = Scapes(tmp.Sub("tiny_window"), 999, 1, 3600);
  for (const double window : {0.001, 1e-6}) {
    o.window_s = window;
    auto report = WriteSyntheticSoundscapes(o);
    ASSERT_FALSE(report.ok()) << window;
    EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(report.status().message().find(absl::StrCat("--window ", window)), std::string::npos)
        << report.status();
  }
  EXPECT_FALSE(fs::exists(o.out_dir));
}

// solution.csv has the rows `aviary predict` makes of each file: ceil(frames / window samples),
// ids as predict writes them. It used ceil(seconds / window) (10.00001 s in 5 s windows: a
// third row predict never makes) and "%.6g" ids (0.333333 s windows: 1.99999... as "2").
TEST(SynthTest, SoundscapeRowsAreThoseAviaryPredictMakes) {
  TempDir tmp;
  for (const auto& [seconds, window, want] :
       {std::tuple{10.00001, 5.0, std::vector<std::string>{"_5", "_10"}},
        // 10667 samples at 32 kHz: six windows cover 64000 samples (the last short), ids to six decimals.
        std::tuple{2.0, 0.33334375, std::vector<std::string>{"_0.333344", "_0.666687", "_1.000031", "_1.333375",
                                                             "_1.666719", "_2.000062"}}}) {
    SoundscapeOptions o = Scapes(tmp.Sub(absl::StrCat("scape_", window)), 3, 1, seconds);
    o.window_s = window;
    auto report = WriteSyntheticSoundscapes(o);
    ASSERT_TRUE(report.ok()) << report.status();
    ASSERT_EQ(report->rows, static_cast<int>(want.size())) << window;
    auto solution = common::CsvTable::ReadFile(report->solution_path);
    ASSERT_TRUE(solution.ok()) << solution.status();
    ASSERT_EQ(solution->num_rows(), want.size());
    const std::string stem = fs::path(report->files[0]).stem().string();
    for (size_t r = 0; r < want.size(); ++r) EXPECT_EQ(solution->row(r)[0], stem + want[r]) << window;
  }
  EXPECT_EQ(common::WindowEndText(10000.05), "10000.05");
  EXPECT_EQ(common::WindowEndText(10000.0), "10000");
  EXPECT_EQ(common::WindowEndText(2.5), "2.5");
}

// A second run into the same --out leaves the recordings its solution.csv lists and no others
// (the first run's stayed, and `aviary predict --audio` then `aviary score` failed on their
// rows), nor a stopped run's staged file; a file this command does not write is refused before
// any work.
TEST(SynthTest, SoundscapesOfAnEarlierRunDoNotStayBehind) {
  TempDir tmp;
  SoundscapeOptions o = Scapes(tmp.Sub("scapes"), 3, 3, 5);
  o.seed = 1;
  auto first = WriteSyntheticSoundscapes(o);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->files.size(), 3u);
  EXPECT_EQ(first->removed, 0);
  const std::string audio_dir = o.out_dir + "/soundscapes";
  std::ofstream(first->files[0] + ".tmp.123.456") << "half";  // as a run killed while writing leaves it
  o.count = 1;
  o.seed = 2;
  auto second = WriteSyntheticSoundscapes(o);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->removed, 4);
  std::vector<std::string> left;
  for (const auto& entry : fs::directory_iterator(audio_dir)) left.push_back(entry.path().string());
  EXPECT_EQ(left, second->files);
  // A recording named like one (BirdCLEF's soundscapes have ten-digit names too) that no run
  // listed is the user's: refused, not removed; and any other file.
  for (const std::string name : {"1000170626.ogg", "notes.txt"}) {
    std::ofstream(audio_dir + "/" + name) << "mine";
    auto refused = WriteSyntheticSoundscapes(o);
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(refused.status().message().find(audio_dir + "/" + name + " is not a recording an earlier "
                                              "synth-soundscapes run wrote"),
              std::string::npos)
        << refused.status();
    EXPECT_TRUE(fs::exists(audio_dir + "/" + name));
    EXPECT_TRUE(fs::exists(second->files[0]));
    fs::remove(audio_dir + "/" + name);
  }
  // A run stopped midway (its names already listed, one written, solution.csv not yet): the
  // next run takes its recording as an earlier run's.
  std::ofstream(o.out_dir + "/.synth-soundscapes", std::ios::app) << "1000009000.ogg\n";
  std::ofstream(audio_dir + "/1000009000.ogg") << "partial run";
  auto after_stop = WriteSyntheticSoundscapes(o);
  ASSERT_TRUE(after_stop.ok()) << after_stop.status();
  EXPECT_FALSE(fs::exists(audio_dir + "/1000009000.ogg"));
  // BirdCLEF's own layout (a solution.csv of this format, ten-digit recordings) is not taken
  // for an earlier run's.
  const std::string birdclef = tmp.Sub("birdclef");
  fs::create_directories(birdclef + "/soundscapes");
  std::ofstream(birdclef + "/solution.csv") << "row_id,sp000\n1000170626_5,1\n";
  std::ofstream(birdclef + "/soundscapes/1000170626.ogg") << "a real recording";
  o.out_dir = birdclef;
  EXPECT_FALSE(WriteSyntheticSoundscapes(o).ok());
  EXPECT_TRUE(fs::exists(birdclef + "/soundscapes/1000170626.ogg"));
  EXPECT_TRUE(fs::exists(birdclef + "/solution.csv"));
}

// A rerun stopped after its first recording replaced one of the same name (another --species):
// the earlier run's solution.csv is gone, not left beside recordings it does not describe
// (`aviary score` gave wrong numbers without an error).
TEST(SynthTest, AStoppedRerunLeavesNoEarlierSolution) {
  TempDir tmp;
  // 24 recordings: seconds of writing after the first, so a loaded machine still stops it midway.
  SoundscapeOptions o = Scapes(tmp.Sub("scapes"), 3, 24, 10);
  auto first = WriteSyntheticSoundscapes(o);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string solution = first->solution_path;
  ASSERT_TRUE(fs::exists(solution));
  struct stat before {};
  ASSERT_EQ(::stat(first->files[0].c_str(), &before), 0);
  o.species = 5;
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    (void)WriteSyntheticSoundscapes(o);
    ::_exit(0);
  }
  // Stopped once the first recording is replaced (a new inode under its name).
  bool replaced = false;
  for (int i = 0; i < 60000 && !replaced; ++i) {
    struct stat now {};
    replaced = ::stat(first->files[0].c_str(), &now) == 0 && now.st_ino != before.st_ino;
    if (!replaced) ::usleep(1000);
  }
  ::kill(child, SIGKILL);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(replaced);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the rerun ended before it was stopped: " << status;
  EXPECT_FALSE(fs::exists(solution)) << "the 3-species solution.csv stayed beside 5-species recordings";
  // The next run completes the set.
  auto again = WriteSyntheticSoundscapes(o);
  ASSERT_TRUE(again.ok()) << again.status();
  std::ifstream in(solution);
  std::string header;
  std::getline(in, header);
  EXPECT_EQ(std::count(header.begin(), header.end(), ','), 5) << header;
}

// A window that is not whole samples is refused as `aviary predict --window` refuses it; names
// of two seeds do not meet (seed 7's 1000th recording was seed 8's first).
TEST(SynthTest, SoundscapeWindowsAndNamesAcrossSeeds) {
  TempDir tmp;
  SoundscapeOptions o = Scapes(tmp.Sub("w"), 2, 1, 2);
  o.window_s = 0.1234567;
  auto refused = WriteSyntheticSoundscapes(o);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("--window: 0.1234567 s is 3950.614400 samples at 32000 Hz, not a whole"),
            std::string::npos)
      << refused.status();
  o.window_s = 1;
  o.seed = 7;
  o.count = 1001;
  o.seconds = 1;
  o.sample_rate = 8000;
  o.out_dir = tmp.Sub("seed7");
  auto seven = WriteSyntheticSoundscapes(o);
  ASSERT_TRUE(seven.ok()) << seven.status();
  o.seed = 8;
  o.count = 1;
  o.out_dir = tmp.Sub("seed8");
  auto eight = WriteSyntheticSoundscapes(o);
  ASSERT_TRUE(eight.ok()) << eight.status();
  std::set<std::string> names;
  for (const std::string& path : seven->files) names.insert(fs::path(path).filename().string());
  EXPECT_EQ(names.count(fs::path(eight->files[0]).filename().string()), 0u) << eight->files[0];
}

}  // namespace
}  // namespace aviary::synth
