// Crop/pad rules of the recipe (DESIGN.md, "The recipe": Audio), as pure functions.
//
//   train:      audio longer than the clip  -> a window starting uniformly in
//                                              [0, audio - clip] (every window equally likely;
//                                              the notebook's tf.random.uniform(maxval=diff)
//                                              never picks the last one);
//               audio shorter than the clip -> zero padding split at random: pad_front uniform
//                                              in [0, clip - audio], pad_back the rest.
//   validation: the first window; shorter audio is zero-padded at the end. No draws.
//
// Randomness is explicit: callers pass a std::mt19937_64 (its output sequence is fixed by the
// C++ standard) and the draws go through UniformInt below, not through std distributions,
// whose algorithms differ between standard libraries. A given seed gives the same clips on
// every platform. Pure functions; thread-safe as long as each thread has its own engine.
#ifndef AVIARY_WORKER_DATA_CLIP_H_
#define AVIARY_WORKER_DATA_CLIP_H_

#include <cstdint>
#include <random>
#include <vector>

namespace aviary::worker {

enum class ClipMode { kTrain, kValidation };

// Uniform in [0, n) for n >= 1 (0 when n <= 1, without drawing), by rejection sampling on raw
// 64-bit draws: exact, and portable because it only uses the engine's output.
uint64_t UniformInt(std::mt19937_64& rng, uint64_t n);

// Where the samples of a clip come from.
struct ClipPlan {
  int64_t source_offset = 0;  // first audio sample taken
  int64_t source_length = 0;  // audio samples taken: min(audio, clip)
  int64_t pad_front = 0;      // zeros before them
  int64_t pad_back = 0;       // zeros after; pad_front + source_length + pad_back == clip
};

// The plan for `audio_samples` of audio and a clip of `clip_samples` (both >= 0). Draws from
// `rng` only in train mode and only when the lengths differ (one draw, or more on rejection).
ClipPlan PlanClip(int64_t audio_samples, int64_t clip_samples, ClipMode mode, std::mt19937_64& rng);

// Writes the clip into `out` (clip_samples = pad_front + source_length + pad_back floats) from
// `window`, which holds the plan's source_length samples (the audio from source_offset on).
void FillClip(const ClipPlan& plan, const float* window, float* out);

// PlanClip + FillClip on a whole decoded signal.
std::vector<float> CropOrPad(const std::vector<float>& audio, int64_t clip_samples, ClipMode mode,
                             std::mt19937_64& rng);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_DATA_CLIP_H_
