#include "worker/data/clip.h"

#include <algorithm>
#include <cstring>

namespace aviary::worker {

uint64_t UniformInt(std::mt19937_64& rng, uint64_t n) {
  if (n <= 1) return 0;
  // Accept draws below the largest multiple of n that fits in 2^64; the rejected share is
  // (2^64 mod n) / 2^64 < n / 2^64, so a second draw is practically never needed.
  const uint64_t rejected = (uint64_t{0} - n) % n;  // 2^64 mod n
  const uint64_t limit = ~uint64_t{0} - rejected;   // accept x <= limit
  for (;;) {
    uint64_t x = rng();
    if (x <= limit) return x % n;
  }
}

ClipPlan PlanClip(int64_t audio_samples, int64_t clip_samples, ClipMode mode,
                  std::mt19937_64& rng) {
  audio_samples = std::max<int64_t>(0, audio_samples);
  clip_samples = std::max<int64_t>(0, clip_samples);
  ClipPlan plan;
  plan.source_length = std::min(audio_samples, clip_samples);
  if (audio_samples > clip_samples) {
    if (mode == ClipMode::kTrain) {
      plan.source_offset = static_cast<int64_t>(
          UniformInt(rng, static_cast<uint64_t>(audio_samples - clip_samples) + 1));
    }
  } else if (audio_samples < clip_samples) {
    const int64_t pad = clip_samples - audio_samples;
    if (mode == ClipMode::kTrain) {
      plan.pad_front = static_cast<int64_t>(UniformInt(rng, static_cast<uint64_t>(pad) + 1));
    }
    plan.pad_back = pad - plan.pad_front;
  }
  return plan;
}

void FillClip(const ClipPlan& plan, const float* window, float* out) {
  std::fill(out, out + plan.pad_front, 0.0f);
  if (plan.source_length > 0) {
    std::memcpy(out + plan.pad_front, window, sizeof(float) * plan.source_length);
  }
  float* back = out + plan.pad_front + plan.source_length;
  std::fill(back, back + plan.pad_back, 0.0f);
}

std::vector<float> CropOrPad(const std::vector<float>& audio, int64_t clip_samples, ClipMode mode,
                             std::mt19937_64& rng) {
  ClipPlan plan = PlanClip(static_cast<int64_t>(audio.size()), clip_samples, mode, rng);
  std::vector<float> out(static_cast<size_t>(std::max<int64_t>(0, clip_samples)));
  FillClip(plan, audio.data() + plan.source_offset, out.data());
  return out;
}

}  // namespace aviary::worker
