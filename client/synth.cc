#include "client/synth.h"

#include <sndfile.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_join.h"
#include "common/config.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/status.h"

namespace aviary::synth {

using common::CsvTable;
using common::FormatPythonStringList;
using common::LayoutSpec;
using common::WriteCsvRow;
using common::WriteFileAtomically;
namespace {

namespace fs = std::filesystem;

constexpr double kPi = 3.14159265358979323846;
constexpr int kMaxSpecies = 999;
constexpr int kMaxRecordings = 99999;
constexpr double kMaxSeconds = 600;
constexpr int64_t kSharedIdBase = 100000;
constexpr int kMaxSharedSlots = 99;
constexpr int64_t kPrivateIdSpan = 100000;
constexpr size_t kTruncatedBytes = 100;

// ---------------------------------------------------------------------------------------------
// Randomness: mt19937_64 is specified bit-exactly by the standard; the std distributions are not,
// so these are built from raw bits.

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t Mix(uint64_t a, uint64_t b) {
  return SplitMix64(SplitMix64(a) ^ (b * 0xd6e8feb86659fd93ULL));
}

class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}
  uint64_t Bits() { return engine_(); }
  // [0, 1) with 53 random bits.
  double Uniform() { return static_cast<double>(Bits() >> 11) * 0x1.0p-53; }
  double Uniform(double lo, double hi) { return lo + (hi - lo) * Uniform(); }
  // [0, n), n >= 1.
  int UniformInt(int n) { return std::min(n - 1, static_cast<int>(Uniform() * n)); }
  bool Bernoulli(double p) { return Uniform() < p; }
  template <typename T>
  const T& Pick(const std::vector<T>& items) {
    return items[static_cast<size_t>(UniformInt(static_cast<int>(items.size())))];
  }

 private:
  std::mt19937_64 engine_;
};

double Frac(double x) { return x - std::floor(x); }

// ---------------------------------------------------------------------------------------------
// Vocabulary.

constexpr char kAlphabet[] = "abcdefghijklmnopqrstuvwxyz";
constexpr char kConsonants[] = "bcdfghklmnprstvwyz";  // 18
constexpr char kVowels[] = "aeiou";                   // 5
constexpr int kNumConsonants = 18;
constexpr int kNumVowels = 5;
constexpr int kTailCombos = kNumVowels * kNumConsonants * kNumConsonants * kNumVowels *
                            kNumConsonants;  // 145800, also C*V*C*V*C

bool IsVowel(char c) { return c == 'a' || c == 'e' || c == 'i' || c == 'o' || c == 'u'; }

std::string Capitalize(std::string s) {
  if (!s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = static_cast<char>(s[0] - 'a' + 'A');
  return s;
}

const std::vector<std::string>& Authors() {
  static const std::vector<std::string> kAuthors{
      "Ana Souza",       "Jonas Berg",   "Mei Tanaka",    "Paddy O'Brien",
      "Lucia Romero",    "Tomasz Nowak", "Amina Diallo",  "Rahul Iyer",
      "Sofia Lindqvist", "Kwame Mensah", "Elena Petrova", "Diego Hernandez"};
  return kAuthors;
}

const std::vector<std::string>& Licenses() {
  static const std::vector<std::string> kLicenses{
      "Creative Commons Attribution-NonCommercial-ShareAlike 4.0",
      "Creative Commons Attribution-NonCommercial-ShareAlike 3.0",
      "Creative Commons Attribution-ShareAlike 4.0"};
  return kLicenses;
}

const std::vector<std::string>& Countries() {
  static const std::vector<std::string> kCountries{"Brazil", "Canada", "India",  "Kenya",
                                                   "Peru",   "Spain",  "Sweden", "United States"};
  return kCountries;
}

int LayoutIndex(Layout layout) {
  switch (layout) {
    case Layout::k2024:
      return 0;
    case Layout::k2023:
      return 1;
    case Layout::k2022:
      return 2;
    case Layout::k2021:
      return 3;
    case Layout::k2020:
      return 4;
    case Layout::kXc:
      return 5;
  }
  return 0;
}

bool IsMp3Layout(Layout layout) { return layout == Layout::k2020 || layout == Layout::kXc; }

// ---------------------------------------------------------------------------------------------
// Class counts: Zipf-like over a seeded ranking; see the header.

std::vector<int> ClassCounts(int species, int recordings, uint32_t seed) {
  Rng rng(Mix(seed, 0x636f756e7473ULL));  // "counts"
  std::vector<int> species_at_rank(static_cast<size_t>(species));
  std::iota(species_at_rank.begin(), species_at_rank.end(), 0);
  for (int k = species - 1; k > 0; --k) {
    std::swap(species_at_rank[static_cast<size_t>(k)],
              species_at_rank[static_cast<size_t>(rng.UniformInt(k + 1))]);
  }
  std::vector<int> by_rank(static_cast<size_t>(species), 1);
  int extra = recordings - species;
  int tail = species >= 6 ? std::max(2, species / 4) : 0;
  int head = species - tail;
  // The tail gets at most half of the extra rows, so that the head stays larger.
  int tail_budget = extra / 2;
  for (int k = 0; k < tail; ++k) {
    int add = std::min(k % 4, tail_budget);
    tail_budget -= add;
    by_rank[static_cast<size_t>(head + k)] += add;
    extra -= add;
  }
  if (extra > 0) {
    std::vector<double> weights(static_cast<size_t>(head));
    double total = 0;
    for (int k = 0; k < head; ++k) {
      weights[static_cast<size_t>(k)] = 1.0 / std::pow(k + 1.0, 1.1);
      total += weights[static_cast<size_t>(k)];
    }
    std::vector<std::pair<double, int>> remainders;
    int given = 0;
    for (int k = 0; k < head; ++k) {
      double share = extra * weights[static_cast<size_t>(k)] / total;
      int whole = static_cast<int>(std::floor(share));
      by_rank[static_cast<size_t>(k)] += whole;
      given += whole;
      remainders.emplace_back(share - whole, k);
    }
    std::stable_sort(remainders.begin(), remainders.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    for (int r = 0; given < extra; ++r, ++given) {
      by_rank[static_cast<size_t>(remainders[static_cast<size_t>(r) % remainders.size()].second)]++;
    }
  }
  std::vector<int> counts(static_cast<size_t>(species));
  for (int k = 0; k < species; ++k) {
    counts[static_cast<size_t>(species_at_rank[static_cast<size_t>(k)])] =
        by_rank[static_cast<size_t>(k)];
  }
  return counts;
}

// ---------------------------------------------------------------------------------------------
// Audio.

// Adds one call of `voice` starting at `start_s` to `call` (mono, `sample_rate`): the call's
// syllables with a sin^2 envelope, the fundamental swept per the voice and scaled by `pitch`,
// syllables `1 / rate_hz` apart, `amp` the peak amplitude before the 1/h^1.5 harmonic weights.
void AddCall(const SynthVoice& voice, int sample_rate, double pitch, double rate_hz,
             double start_s, double amp, std::vector<float>* call) {
  const double sr = sample_rate;
  const int64_t frames = static_cast<int64_t>(call->size());
  const double max_hz = 0.45 * sr;
  const double period = 1.0 / rate_hz;
  const double sounding = voice.duty * period;
  std::array<double, 3> harmonic_weight{0, 0, 0};
  for (int h = 1; h <= voice.harmonics && h <= 3; ++h) {
    harmonic_weight[static_cast<size_t>(h - 1)] = 1.0 / std::pow(h, 1.5);
  }
  for (int s = 0; s < voice.syllables_per_call; ++s) {
    double t0 = start_s + s * period;
    int64_t n0 = static_cast<int64_t>(std::ceil(t0 * sr));
    int64_t n1 = std::min(frames, static_cast<int64_t>(std::floor((t0 + sounding) * sr)));
    std::array<double, 3> phase{0, 0, 0};
    for (int64_t n = n0; n < n1; ++n) {
      double t = n / sr - t0;
      double x = t / sounding;
      double octaves = 0;
      switch (voice.sweep) {
        case SynthSweep::kUp:
          octaves = voice.sweep_octaves * x;
          break;
        case SynthSweep::kDown:
          octaves = voice.sweep_octaves * (1 - x);
          break;
        case SynthSweep::kUpDown:
          octaves = voice.sweep_octaves * std::sin(kPi * x);
          break;
        case SynthSweep::kTrill:
          octaves = voice.sweep_octaves * std::sin(2 * kPi * voice.trill_hz * t);
          break;
      }
      double f = std::min(max_hz, voice.base_hz * pitch * std::exp2(octaves));
      double env = std::sin(kPi * x);
      env *= env;
      double v = 0;
      for (int h = 1; h <= voice.harmonics && h <= 3; ++h) {
        const size_t k = static_cast<size_t>(h - 1);
        phase[k] += 2 * kPi * h * f / sr;
        if (h * f < max_hz) v += harmonic_weight[k] * std::sin(phase[k]);
      }
      (*call)[static_cast<size_t>(n)] += static_cast<float>(amp * env * v);
    }
  }
}

// Sum of the harmonic weights of a voice (calls are scaled by its inverse).
double HarmonicSum(const SynthVoice& voice) {
  double sum = 0;
  for (int h = 1; h <= voice.harmonics && h <= 3; ++h) sum += 1.0 / std::pow(h, 1.5);
  return sum;
}

// Pink (Paul Kellet's economy filter) and brown (leaky integrator) noise from white, mixed by
// `pink_share`; returns the sum of squares through `sum_sq`.
std::vector<double> BackgroundNoise(Rng& rng, int64_t frames, double pink_share, double* sum_sq) {
  std::vector<double> noise(static_cast<size_t>(frames));
  double b0 = 0, b1 = 0, b2 = 0, brown = 0;
  *sum_sq = 0;
  for (int64_t n = 0; n < frames; ++n) {
    double w = rng.Uniform(-1.0, 1.0);
    b0 = 0.99765 * b0 + w * 0.0990460;
    b1 = 0.96300 * b1 + w * 0.2965164;
    b2 = 0.57000 * b2 + w * 1.0526913;
    double pink = b0 + b1 + b2 + w * 0.1848;
    brown = 0.995 * brown + w * 0.1;
    double v = pink_share * pink + (1 - pink_share) * brown * 3;
    noise[static_cast<size_t>(n)] = v;
    *sum_sq += v * v;
  }
  return noise;
}

std::vector<float> RenderRecording(const SynthVoice& voice, int sample_rate, int channels,
                                   int64_t frames, uint64_t seed) {
  Rng rng(seed);
  const double sr = sample_rate;
  const double seconds = static_cast<double>(frames) / sr;
  const double pitch = rng.Uniform(0.96, 1.04);
  const double rate = voice.syllable_rate_hz * rng.Uniform(0.95, 1.05);
  const double gain = rng.Uniform(0.25, 0.8);
  const double noise_rms = std::pow(10.0, rng.Uniform(-45.0, -22.0) / 20.0);
  const double pink_share = rng.Uniform();

  std::vector<float> call(static_cast<size_t>(frames), 0.0f);
  const double period = 1.0 / rate;
  const double call_seconds = voice.syllables_per_call * period;
  const int num_calls =
      std::max(1, static_cast<int>(std::lround(seconds * rng.Uniform(0.15, 0.4))));
  const double harmonic_sum = HarmonicSum(voice);
  for (int c = 0; c < num_calls; ++c) {
    double start = rng.Uniform(0.0, std::max(0.0, seconds - call_seconds));
    double amp = gain * rng.Uniform(0.6, 1.0) / harmonic_sum;
    AddCall(voice, sample_rate, pitch, rate, start, amp, &call);
  }

  std::vector<float> out(static_cast<size_t>(frames * channels));
  for (int ch = 0; ch < channels; ++ch) {
    double channel_gain = ch == 0 ? 1.0 : rng.Uniform(0.6, 1.0);
    double sum_sq = 0;
    std::vector<double> noise = BackgroundNoise(rng, frames, pink_share, &sum_sq);
    double scale = sum_sq > 0 ? noise_rms / std::sqrt(sum_sq / std::max<int64_t>(1, frames)) : 0;
    for (int64_t n = 0; n < frames; ++n) {
      double v =
          channel_gain * call[static_cast<size_t>(n)] + scale * noise[static_cast<size_t>(n)];
      out[static_cast<size_t>(n * channels + ch)] = static_cast<float>(std::clamp(v, -0.99, 0.99));
    }
  }
  return out;
}

uint32_t OggCrc(const unsigned char* data, size_t size) {
  static const std::array<uint32_t, 256> kTable = [] {
    std::array<uint32_t, 256> table{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t r = i << 24;
      for (int k = 0; k < 8; ++k) r = (r & 0x80000000u) ? (r << 1) ^ 0x04c11db7u : (r << 1);
      table[i] = r;
    }
    return table;
  }();
  uint32_t crc = 0;
  for (size_t i = 0; i < size; ++i) crc = (crc << 8) ^ kTable[((crc >> 24) & 0xff) ^ data[i]];
  return crc;
}

absl::StatusOr<std::string> ReadBinary(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InternalError(absl::StrCat(path, ": cannot open for reading"));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return absl::InternalError(absl::StrCat(path, ": read failed"));
  return buffer.str();
}

absl::Status WriteBinary(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::InternalError(absl::StrCat(path, ": cannot create"));
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

// libsndfile seeds the Ogg serial number from the clock: set every page's serial to `serial` and
// recompute the page CRCs so that the file only depends on its samples.
absl::Status NormalizeOggSerial(const std::string& path, uint32_t serial) {
  AVIARY_ASSIGN_OR_RETURN(std::string bytes, ReadBinary(path));
  auto* data = reinterpret_cast<unsigned char*>(bytes.data());
  size_t pos = 0;
  while (pos < bytes.size()) {
    if (bytes.size() - pos < 27 || bytes.compare(pos, 4, "OggS") != 0) {
      return absl::InternalError(
          absl::StrCat(path, ": no Ogg page at byte ", pos, " of ", bytes.size()));
    }
    size_t segments = data[pos + 26];
    if (bytes.size() - pos < 27 + segments) {
      return absl::InternalError(absl::StrCat(path, ": short Ogg page header at byte ", pos));
    }
    size_t body = 0;
    for (size_t s = 0; s < segments; ++s) body += data[pos + 27 + s];
    size_t page = 27 + segments + body;
    if (bytes.size() - pos < page) {
      return absl::InternalError(absl::StrCat(path, ": short Ogg page at byte ", pos));
    }
    for (int k = 0; k < 4; ++k) {
      data[pos + 14 + k] = static_cast<unsigned char>(serial >> (8 * k));
      data[pos + 22 + k] = 0;
    }
    uint32_t crc = OggCrc(data + pos, page);
    for (int k = 0; k < 4; ++k) data[pos + 22 + k] = static_cast<unsigned char>(crc >> (8 * k));
    pos += page;
  }
  return WriteBinary(path, bytes);
}

absl::Status WriteAudioFile(const std::string& path, bool mp3, int sample_rate, int channels,
                            const std::vector<float>& interleaved, uint32_t ogg_serial) {
  SF_INFO info{};
  info.samplerate = sample_rate;
  info.channels = channels;
  info.format =
      mp3 ? (SF_FORMAT_MPEG | SF_FORMAT_MPEG_LAYER_III) : (SF_FORMAT_OGG | SF_FORMAT_VORBIS);
  const char* format_name = mp3 ? "mp3" : "ogg/vorbis";
  SNDFILE* file = sf_open(path.c_str(), SFM_WRITE, &info);
  if (file == nullptr) {
    return absl::InternalError(absl::StrCat("sf_open(", path, ", write ", format_name, ", ",
                                            sample_rate, " Hz, ", channels,
                                            " ch) failed: ", sf_strerror(nullptr)));
  }
  sf_count_t frames = static_cast<sf_count_t>(interleaved.size() / static_cast<size_t>(channels));
  // Write in blocks of 1M frames: libvorbis' first analysis call allocas a float per buffered
  // frame (_preextrapolate_helper), so handing it a minute of 48 kHz audio at once overflows an
  // 8 MB stack (SIGSEGV in vorbis_analysis_wrote). Ogg page boundaries follow the write sizes,
  // so the block stays large: files of up to 1M frames are still written in one call.
  constexpr sf_count_t kBlockFrames = sf_count_t{1} << 20;
  for (sf_count_t done = 0; done < frames;) {
    sf_count_t n = std::min(kBlockFrames, frames - done);
    sf_count_t written = sf_writef_float(file, interleaved.data() + done * channels, n);
    if (written != n) {
      std::string error = sf_strerror(file);
      sf_close(file);
      return absl::InternalError(absl::StrCat("sf_writef_float(", path, ") wrote ", done + written,
                                              " of ", frames, " frames: ", error));
    }
    done += n;
  }
  int rc = sf_close(file);
  if (rc != 0) {
    return absl::InternalError(absl::StrCat("sf_close(", path, ") failed: ", sf_error_number(rc)));
  }
  if (!mp3) AVIARY_RETURN_IF_ERROR(NormalizeOggSerial(path, ogg_serial));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Rows.

struct RowPlan {
  int species = 0;
  int slot = 0;
  bool shared = false;
  int64_t id = 0;
  int duplicate_of = -1;  // index of the planned row this one repeats
  SynthFileKind kind = SynthFileKind::kGood;
};

// Everything drawn for one recording; a function of (seed, id, species, options).
struct RowDraw {
  int sample_rate = 32000;
  int channels = 1;
  int64_t frames = 0;
  double seconds = 0;
  std::string author;
  std::string rating;
  std::string latitude;
  std::string longitude;
  int type_index = 0;
  std::vector<std::string> secondary;
  std::string license;
  std::string date;
  std::string time;
  bool playback_used = false;
  bool bird_seen = true;
  std::string country;
  int elevation_m = 0;
  uint64_t audio_seed = 0;
};

RowDraw DrawRow(const SynthOptions& options, const RowPlan& plan) {
  Rng rng(Mix(options.seed, static_cast<uint64_t>(plan.id)));
  RowDraw d;
  double u = rng.Uniform();
  if (u < 0.70) {
    d.sample_rate = 32000;
  } else {
    static const int kOtherRates[] = {16000, 22050, 44100, 48000};
    d.sample_rate = kOtherRates[rng.UniformInt(4)];
  }
  d.channels = rng.Bernoulli(0.15) ? 2 : 1;
  double length_kind = rng.Uniform();
  double x = rng.Uniform();
  const double max_s = options.max_seconds;
  if (length_kind < 0.10) {
    d.seconds = 0.3 + 0.7 * x;
  } else if (length_kind < 0.90 || max_s <= 15) {
    double lo = std::min(3.0, max_s), hi = std::min(15.0, max_s);
    d.seconds = lo + (hi - lo) * x;
  } else {
    d.seconds = 15 + (max_s - 15) * x;
  }
  d.frames = std::max<int64_t>(1, std::llround(d.seconds * d.sample_rate));
  d.seconds = static_cast<double>(d.frames) / d.sample_rate;
  const std::vector<std::string>& authors = Authors();
  int author_draw = rng.UniformInt(static_cast<int>(authors.size()));
  if (plan.shared) {
    author_draw = static_cast<int>(
        SplitMix64(static_cast<uint64_t>(plan.species) * 1000 + static_cast<uint64_t>(plan.slot)) %
        authors.size());
  }
  d.author = authors[static_cast<size_t>(author_draw)];
  d.rating = absl::StrFormat("%.1f", rng.UniformInt(11) / 2.0);
  d.latitude = absl::StrFormat("%.4f", rng.Uniform(-45.0, 60.0));
  d.longitude = absl::StrFormat("%.4f", rng.Uniform(-125.0, 150.0));
  double t = rng.Uniform();
  d.type_index = t < 0.6 ? 0 : (t < 0.85 ? 1 : 2);
  if (options.species > 1 && rng.Bernoulli(0.2)) {
    int n = std::min(options.species - 1, 1 + rng.UniformInt(2));
    std::vector<int> picked;
    while (static_cast<int>(picked.size()) < n) {
      int s = rng.UniformInt(options.species);
      if (s == plan.species || std::find(picked.begin(), picked.end(), s) != picked.end()) continue;
      picked.push_back(s);
    }
    for (int s : picked) d.secondary.push_back(SynthSpeciesCode(s));
  }
  d.license = rng.Pick(Licenses());
  d.date = absl::StrFormat("%04d-%02d-%02d", 2005 + rng.UniformInt(18), 1 + rng.UniformInt(12),
                           1 + rng.UniformInt(28));
  d.time = absl::StrFormat("%02d:%02d", 4 + rng.UniformInt(16), rng.UniformInt(60));
  d.playback_used = rng.Bernoulli(0.1);
  d.bird_seen = rng.Bernoulli(0.7);
  d.country = rng.Pick(Countries());
  d.elevation_m = 50 * rng.UniformInt(50);
  d.audio_seed = rng.Bits();
  return d;
}

std::string XcId(int64_t id) { return absl::StrCat("XC", id); }

// The metadata fields of a row, by column name.
std::map<std::string, std::string> RowFields(Layout layout, const RowPlan& plan, const RowDraw& d) {
  const std::string code = SynthSpeciesCode(plan.species);
  const std::string sci = SynthScientificName(plan.species);
  const std::string common = SynthCommonName(plan.species);
  const std::string xc = XcId(plan.id);
  const std::string url = absl::StrCat("https://xeno-canto.org/", plan.id);
  std::map<std::string, std::string> f;
  if (IsMp3Layout(layout)) {
    static const char* kTypes[] = {"call", "song", "call, song"};
    f["rating"] = d.rating;
    f["playback_used"] = d.playback_used ? "yes" : "no";
    f["ebird_code"] = code;
    f["channels"] = d.channels == 1 ? "1 (mono)" : "2 (stereo)";
    f["date"] = d.date;
    f["pitch"] = "Not specified";
    f["duration"] = absl::StrCat(std::llround(d.seconds));
    f["filename"] = absl::StrCat(xc, ".mp3");
    f["speed"] = "Not specified";
    f["species"] = common;
    f["number_of_notes"] = "Not specified";
    f["title"] = absl::StrCat(xc, " ", common, " (", sci, ")");
    f["secondary_labels"] = FormatPythonStringList(d.secondary);
    f["bird_seen"] = d.bird_seen ? "yes" : "no";
    f["sci_name"] = sci;
    f["location"] = absl::StrCat("Synthetic site, ", d.country);
    f["latitude"] = d.latitude;
    f["sampling_rate"] = absl::StrCat(d.sample_rate, " (Hz)");
    f["type"] = kTypes[d.type_index];
    f["elevation"] = absl::StrCat("~ ", d.elevation_m, " m");
    f["description"] = "Synthetic recording written by aviary synth.";
    f["bitrate_of_mp3"] = "128000 (bps)";
    f["file_type"] = "mp3";
    f["volume"] = "Not specified";
    f["background"] = "";
    f["xc_id"] = xc;
    f["url"] = url;
    f["country"] = d.country;
    f["author"] = d.author;
    f["primary_label"] = absl::StrCat(sci, "_", common);
    f["longitude"] = d.longitude;
    f["length"] = "Not specified";
    f["time"] = d.time;
    f["recordist"] = d.author;
    f["license"] = d.license;
  } else {
    static const char* kTypes[] = {"['call']", "['song']", "['call', 'song']"};
    f["primary_label"] = code;
    f["secondary_labels"] = FormatPythonStringList(d.secondary);
    f["type"] = kTypes[d.type_index];
    f["latitude"] = d.latitude;
    f["longitude"] = d.longitude;
    f["scientific_name"] = sci;
    f["common_name"] = common;
    f["author"] = d.author;
    f["license"] = d.license;
    f["rating"] = d.rating;
    f["url"] = url;
    f["date"] = d.date;
    f["time"] = d.time;
    f["filename"] =
        layout == Layout::k2021 ? absl::StrCat(xc, ".ogg") : absl::StrCat(code, "/", xc, ".ogg");
  }
  return f;
}

absl::Status PrepareOutDir(const std::string& out_dir) {
  std::error_code ec;
  if (fs::exists(out_dir, ec) && !fs::is_directory(out_dir, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--out ", out_dir, ": exists and is not a directory"));
  }
  // A folder the user named that cannot be made or written is bad input (exit 2), as one that is
  // a file is.
  fs::create_directories(out_dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("--out ", out_dir, ": cannot create directory: ", ec.message()));
  }
  if (::access(out_dir.c_str(), W_OK | X_OK) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--out ", out_dir, ": directory is not writable: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateSynthOptions(const SynthOptions& options) {
  if (options.out_dir.empty()) return absl::InvalidArgumentError("--out: must not be empty");
  if (options.species < 1 || options.species > kMaxSpecies) {
    return absl::InvalidArgumentError(
        absl::StrCat("--species ", options.species, ": must be in [1, ", kMaxSpecies, "]"));
  }
  if (options.recordings < options.species || options.recordings > kMaxRecordings) {
    return absl::InvalidArgumentError(absl::StrCat("--recordings ", options.recordings,
                                                   ": must be in [--species (", options.species,
                                                   "), ", kMaxRecordings, "]"));
  }
  if (!(options.max_seconds > 1) || !(options.max_seconds <= kMaxSeconds)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-seconds ", options.max_seconds, ": must be > 1 and <= ", kMaxSeconds));
  }
  return absl::OkStatus();
}

std::string SynthFileKindName(SynthFileKind kind) {
  switch (kind) {
    case SynthFileKind::kGood:
      return "good";
    case SynthFileKind::kEmpty:
      return "empty";
    case SynthFileKind::kTruncated:
      return "truncated";
    case SynthFileKind::kSilent:
      return "silent";
    case SynthFileKind::kNotAudio:
      return "not_audio";
  }
  return "?";
}

std::string SynthSpeciesCode(int index) {
  // First letter: stride 15 over a..z (a, p, e, t, i, x, m, b, ...). The five other letters
  // encode index / 26 through a bijection of [0, kTailCombos) offset by index % 26, so codes are
  // unique; they alternate consonants and vowels like the first letters of two words.
  const int r = index % 26;
  const int64_t q = index / 26;
  const char first = kAlphabet[(r * 15) % 26];
  int64_t t = (q * 7919 + (static_cast<int64_t>(r) * 104729 + 12345)) % kTailCombos;
  std::string code(1, first);
  const bool vowel_first = IsVowel(first);
  // Patterns after the first letter: V C | C V C (consonant first) or C V | C V C (vowel first).
  const bool pattern_vowel[5] = {!vowel_first, vowel_first, false, true, false};
  for (bool vowel : pattern_vowel) {
    int radix = vowel ? kNumVowels : kNumConsonants;
    int digit = static_cast<int>(t % radix);
    t /= radix;
    code.push_back(vowel ? kVowels[digit] : kConsonants[digit]);
  }
  code.push_back('1');
  return code;
}

std::string SynthScientificName(int index) {
  static const char* kGenus[] = {"ornis", "ica", "ura", "aptera", "icola", "ella"};
  static const char* kEpithet[] = {"us", "ensis", "ata", "ii", "ina", "oides"};
  std::string code = SynthSpeciesCode(index);
  return absl::StrCat(Capitalize(code.substr(0, 3)), kGenus[index % 6], " ", code.substr(3, 3),
                      kEpithet[(index / 6) % 6]);
}

std::string SynthCommonName(int index) {
  static const char* kAdjective[] = {"ish", "ed", "y", "an"};
  static const char* kKind[] = {"warbler", "thrush",  "finch",      "sparrow",
                                "wren",    "tanager", "flycatcher", "dove"};
  std::string code = SynthSpeciesCode(index);
  return absl::StrCat(Capitalize(code.substr(0, 3)), kAdjective[index % 4], " ",
                      Capitalize(code.substr(3, 3)), kKind[(index / 4) % 8]);
}

SynthVoice SynthSpeciesVoice(int index) {
  const double i = index;
  SynthVoice v;
  v.base_hz = 1000.0 * std::pow(6.0, Frac(0.5 + i * 0.6180339887498949));
  v.sweep = static_cast<SynthSweep>(static_cast<int>(4 * Frac(0.2 + i * 0.4142135623730951)));
  v.syllable_rate_hz = 3.0 + 9.0 * Frac(0.1 + i * 0.5698402909980532);
  v.duty = 0.3 + 0.45 * Frac(0.7 + i * 0.3247179572447460);
  v.syllables_per_call = 2 + (index * 5 + 3) % 6;
  v.harmonics = 1 + (index + index / 4) % 3;
  if (v.sweep == SynthSweep::kTrill) {
    v.sweep_octaves = 0.08 + 0.1 * Frac(0.3 + i * 0.7548776662466927);
    v.trill_hz = 25.0 + 30.0 * Frac(0.2 + i * 0.2360679774997897);
    v.min_hz = v.base_hz * std::pow(2.0, -v.sweep_octaves);
    v.max_hz = v.base_hz * std::pow(2.0, v.sweep_octaves);
  } else {
    v.sweep_octaves = 0.25 + 0.5 * Frac(0.3 + i * 0.7548776662466927);
    v.min_hz = v.base_hz;
    v.max_hz = v.base_hz * std::pow(2.0, v.sweep_octaves);
  }
  return v;
}

namespace {

// The rows of the corpus, class by class: their ids (shared across layouts for the first few of
// each class, private otherwise), `counts` recordings per class.
std::vector<RowPlan> PlanRows(const SynthOptions& options, const std::vector<int>& counts,
                              std::vector<std::vector<int>>* rows_of) {
  std::vector<RowPlan> plan;
  rows_of->assign(static_cast<size_t>(options.species), {});
  int64_t serial = 0;
  const int64_t private_base = kPrivateIdSpan * (2 + LayoutIndex(options.layout));
  for (int i = 0; i < options.species; ++i) {
    int count = counts[static_cast<size_t>(i)];
    int shared = std::min(kMaxSharedSlots, (count + 5) / 10);
    for (int j = 0; j < count; ++j) {
      RowPlan row;
      row.species = i;
      row.slot = j;
      row.shared = j < shared;
      row.id = row.shared ? kSharedIdBase + 100 * i + j
                          : private_base + (serial++ * 7919 + options.seed) % kPrivateIdSpan;
      (*rows_of)[static_cast<size_t>(i)].push_back(static_cast<int>(plan.size()));
      plan.push_back(row);
    }
  }
  return plan;
}

// The private rows of class `i`.
std::vector<int> PrivateRows(const std::vector<RowPlan>& plan, const std::vector<int>& rows) {
  std::vector<int> out;
  for (int r : rows) {
    if (!plan[static_cast<size_t>(r)].shared) out.push_back(r);
  }
  return out;
}

// Duplicate rows (the same recording listed twice), in the largest classes first; returns which
// rows are the source of a duplicate.
std::vector<bool> AssignDuplicates(const SynthOptions& options, const std::vector<int>& counts,
                                   const std::vector<int>& by_count,
                                   const std::vector<std::vector<int>>& rows_of, std::vector<RowPlan>* plan) {
  std::vector<bool> is_duplicate_source(plan->size(), false);
  int duplicates_wanted = options.recordings >= 10 ? std::max(1, options.recordings / 60) : 0;
  for (int i : by_count) {
    if (duplicates_wanted == 0) break;
    std::vector<int> own = PrivateRows(*plan, rows_of[static_cast<size_t>(i)]);
    if (counts[static_cast<size_t>(i)] < 3 || own.size() < 2) continue;
    RowPlan& copy = (*plan)[static_cast<size_t>(own.back())];
    copy.duplicate_of = own.front();
    copy.id = (*plan)[static_cast<size_t>(own.front())].id;
    is_duplicate_source[static_cast<size_t>(own.front())] = true;
    --duplicates_wanted;
  }
  return is_duplicate_source;
}

// Greedy: the next broken file goes to the class with the most valid files per broken file
// already taken (ties: more rows first), never below one valid file and never more than
// max(1, count / 2) per class.
void AssignBrokenFiles(const SynthOptions& options, const std::vector<int>& counts,
                       const std::vector<int>& by_count, const std::vector<std::vector<int>>& rows_of,
                       const std::vector<bool>& is_duplicate_source, std::vector<RowPlan>* plan) {
  struct Candidates {
    std::vector<int> rows;  // private, not duplicated, last first
    int valid_files = 0;
    int taken = 0;
    int limit = 0;
  };
  std::vector<Candidates> classes;
  for (int i : by_count) {
    Candidates c;
    std::vector<int> all = PrivateRows(*plan, rows_of[static_cast<size_t>(i)]);
    for (auto it = all.rbegin(); it != all.rend(); ++it) {
      if ((*plan)[static_cast<size_t>(*it)].duplicate_of < 0 &&
          !is_duplicate_source[static_cast<size_t>(*it)]) {
        c.rows.push_back(*it);
      }
    }
    for (int r : rows_of[static_cast<size_t>(i)]) {
      if ((*plan)[static_cast<size_t>(r)].duplicate_of < 0) ++c.valid_files;
    }
    c.limit = std::max(1, counts[static_cast<size_t>(i)] / 2);
    classes.push_back(std::move(c));
  }
  static const SynthFileKind kKinds[] = {SynthFileKind::kEmpty, SynthFileKind::kTruncated,
                                         SynthFileKind::kSilent, SynthFileKind::kNotAudio};
  const int wanted = 4 * std::max(1, options.recordings / 40);
  for (int assigned = 0; assigned < wanted; ++assigned) {
    Candidates* best = nullptr;
    for (Candidates& c : classes) {
      if (c.taken >= c.limit || c.taken >= static_cast<int>(c.rows.size()) || c.valid_files < 2) {
        continue;
      }
      // valid / (1 + taken) > best.valid / (1 + best.taken), in integers.
      if (best == nullptr ||
          c.valid_files * (1 + best->taken) > best->valid_files * (1 + c.taken)) {
        best = &c;
      }
    }
    if (best == nullptr) break;
    (*plan)[static_cast<size_t>(best->rows[static_cast<size_t>(best->taken)])].kind = kKinds[assigned % 4];
    ++best->taken;
    --best->valid_files;
  }
}

// Draws, renders and writes the recording of one (non-duplicate) row; its metadata fields go to
// `*fields`.
absl::StatusOr<SynthFile> WriteRow(const SynthOptions& options, const RowPlan& row,
                                   std::map<std::string, std::string>* fields) {
  const Layout layout = options.layout;
  const bool mp3 = IsMp3Layout(layout);
  RowDraw draw = DrawRow(options, row);
  *fields = RowFields(layout, row, draw);
  const std::string label = SynthSpeciesCode(row.species);
  const std::string relative = RelativeAudioPath(layout, label, fields->at("filename"));
  const std::string final_path = (fs::path(options.out_dir) / relative).string();
  std::error_code ec;
  fs::create_directories(fs::path(final_path).parent_path(), ec);
  if (ec) {
    return absl::InternalError(absl::StrCat(fs::path(final_path).parent_path().string(),
                                            ": cannot create directory: ", ec.message()));
  }
  // Written beside its name and renamed into place: a run stopped midway leaves no half-written
  // file under the name (and a rerun over an earlier corpus replaces each file whole).
  const std::string path = absl::StrCat(final_path, ".tmp.", common::TemporarySuffix());
  const uint32_t ogg_serial =
      static_cast<uint32_t>(Mix(options.seed, static_cast<uint64_t>(row.id)) & 0x7fffffff);
  const absl::Status wrote = [&]() -> absl::Status {
    switch (row.kind) {
      case SynthFileKind::kEmpty:
        AVIARY_RETURN_IF_ERROR(WriteBinary(path, ""));
        break;
      case SynthFileKind::kNotAudio:
        AVIARY_RETURN_IF_ERROR(WriteBinary(
            path, absl::StrCat("<html><body>404 Not Found: ", XcId(row.id),
                               " (broken file written by aviary synth)</body></html>\n")));
        break;
      case SynthFileKind::kSilent:
        AVIARY_RETURN_IF_ERROR(WriteAudioFile(
            path, mp3, draw.sample_rate, draw.channels,
            std::vector<float>(static_cast<size_t>(draw.frames * draw.channels), 0.0f), ogg_serial));
        break;
      case SynthFileKind::kGood:
      case SynthFileKind::kTruncated: {
        std::vector<float> audio = RenderRecording(SynthSpeciesVoice(row.species), draw.sample_rate,
                                                   draw.channels, draw.frames, draw.audio_seed);
        AVIARY_RETURN_IF_ERROR(WriteAudioFile(path, mp3, draw.sample_rate, draw.channels, audio, ogg_serial));
        if (row.kind == SynthFileKind::kTruncated) {
          AVIARY_ASSIGN_OR_RETURN(std::string bytes, ReadBinary(path));
          bytes.resize(std::min(bytes.size(), kTruncatedBytes));
          AVIARY_RETURN_IF_ERROR(WriteBinary(path, bytes));
        }
        break;
      }
    }
    return absl::OkStatus();
  }();
  if (!wrote.ok()) {
    ::unlink(path.c_str());
    return wrote;
  }
  if (::rename(path.c_str(), final_path.c_str()) != 0) {
    const int error = errno;
    ::unlink(path.c_str());
    return absl::InternalError(absl::StrCat("rename ", path, " -> ", final_path, ": ", std::strerror(error)));
  }
  SynthFile file;
  file.relative_path = relative;
  file.label = label;
  file.xc_id = XcId(row.id);
  file.author = draw.author;
  file.kind = row.kind;
  file.shared_xc_id = row.shared;
  file.sample_rate = draw.sample_rate;
  file.channels = draw.channels;
  file.num_frames = draw.frames;
  return file;
}

// The metadata CSV, sorted as the real files are (label, then filename; duplicates stay next to
// their original), and the report's counts.
absl::Status WriteMetadata(const SynthOptions& options, const std::vector<RowPlan>& plan,
                           const std::vector<std::map<std::string, std::string>>& fields,
                           const std::vector<SynthFile>& file_of, SynthReport* report) {
  const LayoutSpec& spec = GetLayoutSpec(options.layout);
  std::vector<size_t> order(plan.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const std::string& la = fields[a].at(spec.label_column);
    const std::string& lb = fields[b].at(spec.label_column);
    if (la != lb) return la < lb;
    return fields[a].at("filename") < fields[b].at("filename");
  });
  std::ostringstream csv;
  WriteCsvRow(csv, spec.columns);
  std::vector<std::string> values(spec.columns.size());
  for (size_t r : order) {
    for (size_t c = 0; c < spec.columns.size(); ++c) {
      auto it = fields[r].find(spec.columns[c]);
      if (it == fields[r].end()) {
        return absl::InternalError(absl::StrCat("synth: no value for column '", spec.columns[c],
                                                "' of layout ", LayoutName(options.layout)));
      }
      values[c] = it->second;
    }
    WriteCsvRow(csv, values);
    const RowPlan& row = plan[r];
    ++report->rows;
    if (row.duplicate_of >= 0) {
      ++report->duplicate_rows;
    } else {
      report->files.push_back(file_of[r]);
      ++report->audio_files;
      if (row.kind != SynthFileKind::kGood) ++report->broken_files;
    }
    if (row.shared) ++report->shared_rows;
  }
  report->metadata_path = (fs::path(options.out_dir) / spec.metadata_file).string();
  return WriteFileAtomically(report->metadata_path, csv.str());
}

}  // namespace

absl::StatusOr<SynthReport> WriteSyntheticCorpus(const SynthOptions& options) {
  AVIARY_RETURN_IF_ERROR(ValidateSynthOptions(options));
  AVIARY_RETURN_IF_ERROR(PrepareOutDir(options.out_dir));
  const int species = options.species;

  // Plan the rows: ids, duplicates, broken files.
  const std::vector<int> counts = ClassCounts(species, options.recordings, options.seed);
  std::vector<std::vector<int>> rows_of;
  std::vector<RowPlan> plan = PlanRows(options, counts, &rows_of);
  std::vector<int> by_count(static_cast<size_t>(species));
  std::iota(by_count.begin(), by_count.end(), 0);
  std::stable_sort(by_count.begin(), by_count.end(), [&](int a, int b) {
    return counts[static_cast<size_t>(a)] > counts[static_cast<size_t>(b)];
  });
  const std::vector<bool> is_duplicate_source = AssignDuplicates(options, counts, by_count, rows_of, &plan);
  if (options.broken_files) AssignBrokenFiles(options, counts, by_count, rows_of, is_duplicate_source, &plan);

  // Draw, render and write every distinct recording; collect the metadata rows.
  std::vector<std::map<std::string, std::string>> fields(plan.size());
  std::vector<SynthFile> file_of(plan.size());
  for (size_t r = 0; r < plan.size(); ++r) {
    if (plan[r].duplicate_of >= 0) continue;
    AVIARY_ASSIGN_OR_RETURN(file_of[r], WriteRow(options, plan[r], &fields[r]));
  }
  for (size_t r = 0; r < plan.size(); ++r) {
    if (plan[r].duplicate_of >= 0) fields[r] = fields[static_cast<size_t>(plan[r].duplicate_of)];
  }

  SynthReport report;
  AVIARY_RETURN_IF_ERROR(WriteMetadata(options, plan, fields, file_of, &report));
  for (int i = 0; i < species; ++i) report.classes.push_back(SynthSpeciesCode(i));
  std::sort(report.classes.begin(), report.classes.end());
  return report;
}

absl::StatusOr<SoundscapeReport> WriteSyntheticSoundscapes(const SoundscapeOptions& options) {
  if (options.species < 1 || options.species > kMaxSpecies) {
    return absl::InvalidArgumentError(
        absl::StrCat("--species ", options.species, ": must be in [1, ", kMaxSpecies, "]"));
  }
  if (options.count < 1 || options.count > 9999) {
    return absl::InvalidArgumentError(
        absl::StrCat("--count ", options.count, ": must be in [1, 9999]"));
  }
  if (!(options.seconds >= 1.0) || options.seconds > 3600) {
    return absl::InvalidArgumentError(
        absl::StrCat("--seconds ", options.seconds, ": must be in [1, 3600]"));
  }
  if (!(options.window_s > 0) || options.window_s > options.seconds) {
    return absl::InvalidArgumentError(absl::StrCat("--window ", options.window_s,
                                                   ": must be > 0 and <= --seconds"));
  }
  if (options.sample_rate < 8000 || options.sample_rate > 192000) {
    return absl::InvalidArgumentError(
        absl::StrCat("sample rate ", options.sample_rate, ": must be in [8000, 192000]"));
  }
  // The truth is a dense windows x species table: a tiny window would ask for gigabytes (and a
  // window under a sample holds no audio).
  if (options.window_s * options.sample_rate < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--window ", options.window_s, ": shorter than one sample at ",
                                                   options.sample_rate, " Hz"));
  }
  // As `aviary predict --window` takes it (a set written for 0.1234567 s could not be scored with
  // its own window).
  AVIARY_RETURN_IF_ERROR(common::CheckWindowIsWholeSamples(options.window_s, options.sample_rate, "--window"));
  if (const double cells = std::ceil(options.seconds / options.window_s) * options.species; cells > 2e7) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--window ", options.window_s, ": ", std::ceil(options.seconds / options.window_s), " windows of ",
        options.species, " species per soundscape (", cells, " solution cells, at most 20,000,000): a longer "
        "--window or fewer --species"));
  }
  // A --out that is a file or cannot be made is bad input (exit 2), as for `aviary synth`.
  AVIARY_RETURN_IF_ERROR(PrepareOutDir(options.out_dir));
  const std::string audio_dir = absl::StrCat(options.out_dir, "/soundscapes");
  std::error_code ec;
  fs::create_directories(audio_dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat("--out ", options.out_dir, ": cannot create ", audio_dir, ": ",
                                                   ec.message()));
  }
  // What an earlier run left: the recordings its list DIR/.synth-soundscapes names (replaced or
  // removed below, so that the folder holds what the new solution.csv lists) and a stopped run's
  // staged files. Anything else is refused before any work (`aviary predict --audio` would read
  // it, and `aviary score` refuse its rows). Not by name or by a solution.csv: BirdCLEF's own
  // soundscapes have ten-digit names and a solution.csv of this format.
  const std::string marker = absl::StrCat(options.out_dir, "/.synth-soundscapes");
  std::set<std::string> ours;
  if (fs::exists(marker, ec)) {
    AVIARY_ASSIGN_OR_RETURN(const std::string listed, common::ReadFileToString(marker));
    for (absl::string_view name : absl::StrSplit(listed, '\n', absl::SkipEmpty())) ours.emplace(name);
  }
  std::vector<std::string> earlier;
  for (fs::directory_iterator it(audio_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const size_t tmp = name.find(".ogg.tmp.");
    const bool staged = tmp == 10 && std::all_of(name.begin(), name.begin() + 10, [](char c) { return c >= '0' && c <= '9'; }) &&
                        common::IsTemporarySuffix(absl::string_view(name).substr(tmp + 9));
    if (!(staged || ours.count(name)) || !it->is_regular_file()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--out ", options.out_dir, ": ", it->path().string(), " is not a recording an earlier synth-soundscapes "
          "run wrote (", marker, " lists those): the soundscapes/ folder must hold only those (aviary predict "
          "--audio reads every file there); use an empty --out or remove it"));
    }
    earlier.push_back(it->path().string());
  }
  if (ec) return absl::InternalError(absl::StrCat("cannot list ", audio_dir, ": ", ec.message()));
  SoundscapeReport report;
  std::vector<int> by_name(static_cast<size_t>(options.species));
  std::iota(by_name.begin(), by_name.end(), 0);
  std::sort(by_name.begin(), by_name.end(),
            [](int a, int b) { return SynthSpeciesCode(a) < SynthSpeciesCode(b); });
  std::vector<int> column_of(static_cast<size_t>(options.species));
  for (size_t c = 0; c < by_name.size(); ++c) {
    report.classes.push_back(SynthSpeciesCode(by_name[c]));
    column_of[static_cast<size_t>(by_name[c])] = static_cast<int>(c);
  }
  std::ostringstream solution;
  std::vector<std::string> header{"row_id"};
  header.insert(header.end(), report.classes.begin(), report.classes.end());
  WriteCsvRow(solution, header);

  const int sr = options.sample_rate;
  const int64_t frames = static_cast<int64_t>(std::llround(options.seconds * sr));
  // The rows `aviary predict` makes of the written file: ceil(frames / window) with the window
  // in whole samples (worker/predict.cc), not ceil(seconds / window) (10.00001 s in 5 s windows:
  // 3 rows here, 2 there).
  const int64_t window = std::max<int64_t>(1, std::llround(options.window_s * sr));
  const int64_t rows = std::max<int64_t>(1, (frames + window - 1) / window);
  // This run's names join the list before the first is written: a run stopped midway leaves
  // only listed recordings, which the next run replaces or removes.
  // 10^4 ids a seed (--count goes to 9999: with 10^3 a seed, seed 7's 1000th was seed 8's first).
  const auto id_of = [&options](int k) { return 1000000000LL + static_cast<int64_t>(options.seed % 100000) * 10000 + k; };
  std::set<std::string> mine;
  for (int k = 0; k < options.count; ++k) mine.insert(absl::StrCat(id_of(k), ".ogg"));
  {
    std::set<std::string> both = ours;
    both.insert(mine.begin(), mine.end());
    AVIARY_RETURN_IF_ERROR(WriteFileAtomically(marker, absl::StrCat(absl::StrJoin(both, "\n"), "\n")));
  }
  // An earlier run's solution.csv goes before the first recording is replaced: a run stopped
  // midway (another --species, the same names) left it beside recordings it does not describe,
  // and `aviary score` gave wrong numbers without an error. The new one is written at the end.
  report.solution_path = absl::StrCat(options.out_dir, "/solution.csv");
  if (::unlink(report.solution_path.c_str()) != 0 && errno != ENOENT) {
    return absl::InternalError(absl::StrCat("cannot remove ", report.solution_path, " (an earlier run's): ",
                                            std::strerror(errno)));
  }
  for (int k = 0; k < options.count; ++k) {
    const int64_t id = id_of(k);
    Rng rng(Mix(Mix(options.seed, 0x50c5ca9e), static_cast<uint64_t>(k)));
    std::vector<float> call(static_cast<size_t>(frames), 0.0f);
    std::vector<std::vector<int>> truth(static_cast<size_t>(rows),
                                        std::vector<int>(static_cast<size_t>(options.species), 0));
    for (int64_t w = 0; w < rows; ++w) {
      const double w0 = w * options.window_s;
      const double w1 = std::min(options.seconds, w0 + options.window_s);
      const double u = rng.Uniform();
      const int calls = u < options.empty_share ? 0 : (u < 1.0 - options.pair_share ? 1 : 2);
      int first = -1;
      for (int c = 0; c < calls; ++c) {
        int sp = rng.UniformInt(options.species);
        if (sp == first) sp = (sp + 1) % options.species;
        if (sp == first) break;  // one species only
        const SynthVoice voice = SynthSpeciesVoice(sp);
        const double pitch = rng.Uniform(0.96, 1.04);
        const double rate = voice.syllable_rate_hz * rng.Uniform(0.95, 1.05);
        const double amp = rng.Uniform(0.25, 0.8) * rng.Uniform(0.6, 1.0) / HarmonicSum(voice);
        const double call_seconds = voice.syllables_per_call / rate;
        const double margin = 0.05;
        if (w1 - w0 < call_seconds + 2 * margin) continue;  // no room in a short last window
        const double start = rng.Uniform(w0 + margin, w1 - margin - call_seconds);
        AddCall(voice, sr, pitch, rate, start, amp, &call);
        truth[static_cast<size_t>(w)][static_cast<size_t>(sp)] = 1;
        ++report.calls;
        first = sp;
      }
    }
    const double noise_rms = std::pow(10.0, rng.Uniform(-40.0, -25.0) / 20.0);
    double sum_sq = 0;
    std::vector<double> noise = BackgroundNoise(rng, frames, rng.Uniform(), &sum_sq);
    const double scale =
        sum_sq > 0 ? noise_rms / std::sqrt(sum_sq / std::max<int64_t>(1, frames)) : 0;
    std::vector<float> audio(static_cast<size_t>(frames));
    for (int64_t n = 0; n < frames; ++n) {
      const size_t i = static_cast<size_t>(n);
      audio[i] = static_cast<float>(std::clamp(call[i] + scale * noise[i], -0.99, 0.99));
    }
    const std::string stem = absl::StrCat(id);
    const std::string path = absl::StrCat(audio_dir, "/", stem, ".ogg");
    // Beside its name, then renamed into place: a run stopped midway leaves no half-written
    // recording under the name.
    const std::string staged = absl::StrCat(path, ".tmp.", common::TemporarySuffix());
    if (absl::Status wrote = WriteAudioFile(staged, /*mp3=*/false, sr, 1, audio,
                                            static_cast<uint32_t>(Mix(options.seed, id)));
        !wrote.ok()) {
      ::unlink(staged.c_str());
      return wrote;
    }
    if (::rename(staged.c_str(), path.c_str()) != 0) {
      const int error = errno;
      ::unlink(staged.c_str());
      return absl::InternalError(absl::StrCat("rename ", staged, " -> ", path, ": ", std::strerror(error)));
    }
    report.files.push_back(path);
    for (int64_t w = 0; w < rows; ++w) {
      // The nominal end of the window, as `aviary predict` writes it (worker/predict.h RowId).
      const double end = static_cast<double>(w + 1) * options.window_s;
      std::vector<std::string> fields{absl::StrCat(stem, "_", common::WindowEndText(end))};
      std::vector<std::string> cells(static_cast<size_t>(options.species));
      for (int sp = 0; sp < options.species; ++sp) {
        cells[static_cast<size_t>(column_of[static_cast<size_t>(sp)])] =
            truth[static_cast<size_t>(w)][static_cast<size_t>(sp)] ? "1" : "0";
      }
      fields.insert(fields.end(), cells.begin(), cells.end());
      WriteCsvRow(solution, fields);
      ++report.rows;
    }
  }
  for (const std::string& path : earlier) {
    if (std::find(report.files.begin(), report.files.end(), path) != report.files.end()) continue;
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return absl::InternalError(absl::StrCat("cannot remove ", path, " (an earlier run's, not in this run's "
                                              "solution.csv): ", std::strerror(errno)));
    }
    ++report.removed;
  }
  AVIARY_RETURN_IF_ERROR(WriteFileAtomically(report.solution_path, solution.str()));
  AVIARY_RETURN_IF_ERROR(WriteFileAtomically(marker, absl::StrCat(absl::StrJoin(mine, "\n"), "\n")));
  return report;
}

}  // namespace aviary::synth
