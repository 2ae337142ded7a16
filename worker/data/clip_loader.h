// The one call the training data loader makes per sample: a clip of exactly
// round(duration_s * sample_rate) float samples, cropped/padded by the recipe's rules
// (worker/data/clip.h), read from the decoded-audio cache when it holds the file and decoded on the
// fly (seeking to the window) when it does not, or when the file changed since `aviary prepare`
// cached it (AudioCache::LookupCurrent: one stat per file, on first use; logged once).
//
// Problems. A file the cache recorded with a problem, or one whose on-the-fly probe/decode
// fails, yields a clip of zeros and the problem: never NaN, never an error. A clip whose audio
// samples (before padding) are all zero at 16 bits (|x| <= 2^-16: what the cache stores as 0)
// is reported kSilent, both from the cache and on the fly, so the two paths skip the same clips. On the fly, a problem is only seen where the
// decode looks: the header and the window (a truncation past the window goes unnoticed until
// `aviary prepare` decodes the whole file).
//
// Thread-safe: LoadClip keeps no state; `cache` is read-only and may be shared.
#ifndef AVIARY_WORKER_DATA_CLIP_LOADER_H_
#define AVIARY_WORKER_DATA_CLIP_LOADER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/config.h"
#include "worker/data/audio.h"
#include "worker/data/audio_cache.h"
#include "worker/data/clip.h"

namespace aviary::worker {

struct ClipRequest {
  int sample_rate = 32000;
  double duration_s = 10.0;
  ChannelMode channels = ChannelMode::kFirst;
  // > 0: the recording is its first max_seconds seconds (data.cache_max_seconds), cached or
  // decoded on the fly alike; 0: the whole recording.
  double max_seconds = 0;
  ClipMode mode = ClipMode::kTrain;
  // Seeds the crop/pad draws: std::mt19937_64(seed). Derive it from (run seed, epoch, sample) so
  // that clips do not depend on thread scheduling.
  uint64_t seed = 0;
};

struct ClipResult {
  std::vector<float> samples;  // exactly ClipSamples(request); zeros on a problem (LoadClipInto: empty)
  AudioProblem problem = AudioProblem::kNone;
  std::string message;
  bool unreadable = false;    // DecodeFailure::unreadable: the system could not read the file
  bool retry = false;         // DecodeFailure::retry: ... now, for a cause that may pass
  ClipPlan plan;              // how the clip was cut (meaningful when ok())
  int64_t audio_samples = 0;  // length of the file at the request's rate (after max_seconds)
  bool from_cache = false;
  bool ok() const { return problem == AudioProblem::kNone; }
};

// round(duration_s * sample_rate).
int64_t ClipSamples(const ClipRequest& request);

// See the file comment. `cache` may be null; it is used when it holds the request's sample rate
// and channel mode, and whole files or a cut at least as long as the request's max_seconds. INVALID_ARGUMENT for a bad request (rate <= 0, duration <= 0), INTERNAL for
// resampler failures; file problems are never errors.
absl::StatusOr<ClipResult> LoadClip(const AudioCache* cache, const std::string& path,
                                    const ClipRequest& request);
// LoadClip writing the clip into `out` (exactly ClipSamples(request) floats; zeros on a problem)
// rather than into ClipResult::samples, which stays empty: the loader decodes each clip straight
// into its row of the batch. INVALID_ARGUMENT, too, when `out` has another size.
absl::StatusOr<ClipResult> LoadClipInto(const AudioCache* cache, const std::string& path,
                                        const ClipRequest& request, absl::Span<float> out);

// Why `cache` cannot serve `request` (another rate or channel mode, or a shorter cut than the
// request may use), naming both; "" when it can.
std::string CacheMismatch(const AudioCache& cache, const ClipRequest& request);

// The cache named by `data.cache_dir`: nullptr when the key is empty or the directory holds no
// cache yet (training then decodes on the fly). A cache that cannot be opened is also nullptr,
// with a warning naming the folder and the reason: one of another format version, sample type or
// unknown manifest key, a damaged manifest, or one that cannot be read now (a permission, EIO,
// ESTALE), as a cache of another rate or channel mode is not used but warned about. The cache only
// saves decoding, which gives the same clips (within 2^-16); failing would fail every attempt of
// every task that names it, and `aviary prepare` (strict) says what is wrong. A permission error
// too: a shard that cannot be opened is already skipped, not fatal, and for the same reason. No
// error comes back today; the StatusOr leaves room for one. Relative paths are relative to the
// working directory, like the data roots.
absl::StatusOr<std::unique_ptr<AudioCache>> OpenConfiguredCache(const common::DataConfig& data);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_DATA_CLIP_LOADER_H_
