#include "worker/data/clip_loader.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"

namespace aviary::worker {
namespace {

// Whether every sample rounds to 0 in the cache's 16-bit format (|x| <= 2^-16, below -96 dBFS):
// the cache stores such audio as zeros, so both paths must call such a clip silent.
bool Inaudible(const float* samples, int64_t n) {
  constexpr float kHalfStep = 1.0f / 65536.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (!(std::fabs(samples[i]) <= kHalfStep)) return false;
  }
  return true;
}

// The problem, and zeros in the clip.
void SetProblem(ClipResult* result, absl::Span<float> out, AudioProblem problem, std::string message) {
  result->problem = problem;
  result->message = std::move(message);
  std::fill(out.begin(), out.end(), 0.0f);
}

void SetProblem(ClipResult* result, absl::Span<float> out, const DecodeFailure& failure) {
  SetProblem(result, out, failure.problem, failure.message);
  result->unreadable = failure.unreadable;
  result->retry = failure.retry;
}

absl::Status CheckRequest(const ClipRequest& request) {
  if (request.sample_rate <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("clip sample_rate ", request.sample_rate, ": must be > 0"));
  }
  if (!(request.duration_s > 0) || !std::isfinite(request.duration_s)) {
    return absl::InvalidArgumentError(
        absl::StrCat("clip duration_s ", request.duration_s, ": must be > 0"));
  }
  if (!(request.max_seconds >= 0) || !std::isfinite(request.max_seconds)) {
    return absl::InvalidArgumentError(
        absl::StrCat("clip max_seconds ", request.max_seconds, ": must be >= 0"));
  }
  return absl::OkStatus();
}

// A decoder's error that does not name the file (INTERNAL from soxr, say): named here, so that
// the loader's problem report ("error") says which file.
absl::Status NamingFile(const absl::Status& status, const std::string& path) {
  if (absl::StrContains(status.message(), path)) return status;
  return common::Annotate(status, path);
}

}  // namespace

int64_t ClipSamples(const ClipRequest& request) {
  return std::llround(request.duration_s * request.sample_rate);
}

namespace {

// The samples of the recording a request may use: round(max_seconds x rate), or -1 for all.
int64_t SampleLimit(const ClipRequest& request) {
  return request.max_seconds > 0 ? std::llround(request.max_seconds * request.sample_rate) : -1;
}
int64_t Limited(int64_t samples, int64_t limit) { return limit >= 0 ? std::min(samples, limit) : samples; }

}  // namespace

std::string CacheMismatch(const AudioCache& cache, const ClipRequest& request) {
  if (cache.sample_rate() != request.sample_rate || cache.channels() != request.channels) {
    return absl::StrCat(cache.dir(), " holds ", cache.sample_rate(), " Hz ", ChannelModeName(cache.channels()),
                        "-channel audio, the clips need ", request.sample_rate, " Hz ",
                        ChannelModeName(request.channels));
  }
  const double cut = cache.max_seconds();
  if (cut > 0 && !(request.max_seconds > 0 && request.max_seconds <= cut)) {
    return absl::StrCat(cache.dir(), " holds the first ", cut, " s of each file, the clips may come from ",
                        request.max_seconds > 0 ? absl::StrCat("the first ", request.max_seconds, " s")
                                                : std::string("the whole file"),
                        " (data.cache_max_seconds)");
  }
  return "";
}

absl::StatusOr<ClipResult> LoadClip(const AudioCache* cache, const std::string& path,
                                    const ClipRequest& request) {
  AVIARY_RETURN_IF_ERROR(CheckRequest(request));
  std::vector<float> samples(static_cast<size_t>(ClipSamples(request)));
  AVIARY_ASSIGN_OR_RETURN(ClipResult result, LoadClipInto(cache, path, request, absl::MakeSpan(samples)));
  result.samples = std::move(samples);
  return result;
}

absl::StatusOr<ClipResult> LoadClipInto(const AudioCache* cache, const std::string& path,
                                        const ClipRequest& request, absl::Span<float> out_clip) {
  AVIARY_RETURN_IF_ERROR(CheckRequest(request));
  const int64_t clip = ClipSamples(request);
  if (static_cast<int64_t>(out_clip.size()) != clip) {
    return absl::InvalidArgumentError(absl::StrCat("clip of ", path, ": the destination holds ", out_clip.size(),
                                                   " samples, the request's clip is ", clip));
  }
  const int64_t limit = SampleLimit(request);
  ClipResult result;
  std::mt19937_64 rng(request.seed);

  const CacheEntry* entry = nullptr;
  if (cache != nullptr && CacheMismatch(*cache, request).empty()) {
    entry = cache->LookupCurrent(path);  // nullptr too when the file changed since prepare
  }
  bool served = false;
  if (entry != nullptr) {
    result.from_cache = true;
    if (entry->problem != AudioProblem::kNone) {
      SetProblem(&result, out_clip, entry->problem, entry->message);
      return result;
    }
    result.audio_samples = Limited(entry->frames, limit);
    result.plan = PlanClip(result.audio_samples, clip, request.mode, rng);
    thread_local std::vector<int16_t> samples;  // a clip's, reused by this decode thread
    samples.resize(static_cast<size_t>(result.plan.source_length));
    absl::Status read = cache->ReadSamples(*entry, result.plan.source_offset, result.plan.source_length, samples.data());
    if (read.ok()) {
      float* front = out_clip.data();
      std::fill(front, front + result.plan.pad_front, 0.0f);
      float* out = front + result.plan.pad_front;
      for (int64_t i = 0; i < result.plan.source_length; ++i) out[i] = CacheSampleToFloat(samples[i]);
      std::fill(out + result.plan.source_length, out + result.plan.source_length + result.plan.pad_back, 0.0f);
      served = true;
    } else {
      // The cache's file cannot be read now (EIO, ESTALE on a share): the clip is decoded from
      // its audio file, the same clip (the same draws) within 2^-16 at the usual rates
      // (worker/data/audio.h, "Windows"). The first failures are
      // logged; AudioCache::read_failures() counts them all.
      if (const int64_t failures = cache->read_failures(); failures <= 3) {
        common::Logger("cache").Warn(absl::StrCat(read.message(), "; decoding ", path, " instead",
                                                  failures == 3 ? " (further read failures of the cache are not logged)" : ""));
      }
      result = ClipResult();
      rng.seed(request.seed);
    }
  }
  if (!served) {
    absl::StatusOr<DecodeResult> probed = ProbeAudio(path, request.sample_rate);
    if (!probed.ok()) return NamingFile(probed.status(), path);
    DecodeResult probe = *std::move(probed);
    if (!probe.ok()) {
      SetProblem(&result, out_clip, probe.failure);
      return result;
    }
    DecodeOptions options;
    options.target_sample_rate = request.sample_rate;
    options.channels = request.channels;
    std::vector<float> window;
    if (probe.audio.total_samples >= 0) {
      result.audio_samples = Limited(probe.audio.total_samples, limit);
      result.plan = PlanClip(result.audio_samples, clip, request.mode, rng);
      if (result.plan.source_length == 0) {
        SetProblem(&result, out_clip, AudioProblem::kTooShort, absl::StrCat(path, ": no samples"));
        return result;
      }
      // Exact: llround((k / rate) * rate) == k for every k below 2^52.
      options.offset_s = static_cast<double>(result.plan.source_offset) / request.sample_rate;
      options.duration_s = static_cast<double>(result.plan.source_length) / request.sample_rate;
      absl::StatusOr<DecodeResult> decoding = DecodeAudio(path, options);
      if (!decoding.ok()) return NamingFile(decoding.status(), path);
      DecodeResult decoded = *std::move(decoding);
      if (!decoded.ok()) {
        SetProblem(&result, out_clip, decoded.failure);
        return result;
      }
      window = std::move(decoded.audio.samples);
      if (static_cast<int64_t>(window.size()) != result.plan.source_length) {
        SetProblem(
            &result, out_clip, AudioProblem::kTruncated,
            absl::StrCat(path, ": decoded ", window.size(), " of the ", result.plan.source_length,
                         " samples the header promises at ", result.plan.source_offset));
        return result;
      }
    } else {
      // Length unknown from the header (an mp3 libsndfile could not scan): decode it all (or
      // the part max_seconds allows).
      options.duration_s = request.max_seconds;
      absl::StatusOr<DecodeResult> decoding = DecodeAudio(path, options);
      if (!decoding.ok()) return NamingFile(decoding.status(), path);
      DecodeResult decoded = *std::move(decoding);
      if (!decoded.ok()) {
        SetProblem(&result, out_clip, decoded.failure);
        return result;
      }
      result.audio_samples = Limited(static_cast<int64_t>(decoded.audio.samples.size()), limit);
      result.plan = PlanClip(result.audio_samples, clip, request.mode, rng);
      window.assign(
          decoded.audio.samples.begin() + result.plan.source_offset,
          decoded.audio.samples.begin() + result.plan.source_offset + result.plan.source_length);
    }
    FillClip(result.plan, window.data(), out_clip.data());
  }
  if (result.plan.source_length == 0) {
    SetProblem(&result, out_clip, AudioProblem::kTooShort, absl::StrCat(path, ": no samples"));
  } else if (Inaudible(out_clip.data() + result.plan.pad_front, result.plan.source_length)) {
    SetProblem(&result, out_clip, AudioProblem::kSilent,
               absl::StrCat(path, ": the ", result.plan.source_length, " samples at ",
                            result.plan.source_offset, " are all zero (at 16 bits)"));
  }
  return result;
}

absl::StatusOr<std::unique_ptr<AudioCache>> OpenConfiguredCache(const common::DataConfig& data) {
  if (data.cache_dir.empty()) return std::unique_ptr<AudioCache>();
  auto cache = AudioCache::Open(data.cache_dir);
  if (cache.ok()) return cache;
  if (!absl::IsNotFound(cache.status())) {
    common::Logger("cache").Warn(absl::StrCat(
        "not using the decoded-audio cache data.cache_dir ", data.cache_dir, ": ",
        absl::StatusCodeToString(cache.status().code()), ": ", cache.status().message(),
        "; every clip is decoded on the fly (`aviary prepare` with this config repairs the cache or says what to do)"));
  }
  return std::unique_ptr<AudioCache>();
}

}  // namespace aviary::worker
