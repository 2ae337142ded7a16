// Audio decoding for the data plane: libsndfile decode (ogg Vorbis, mp3, flac, wav), channel
// selection, soxr resampling, and a classification of files that cannot be used.
//
// Windows. A decode may ask for a window of the output (offset and duration at the target
// rate). The decoder seeks (sf_seek) to a little before the window instead of decoding what
// lies before it, feeds the resampler that margin so that its filter is fully primed, and stops
// reading once the window is complete: a window equals the same samples of a whole-file decode
// (to float rounding; tests/worker/audio_test.cc measures it) at the usual rates (8, 11.025, 16,
// 22.05, 24, 32, 44.1, 48, 88.2, 96, 192 kHz and 1-4 kHz). At a rate whose ratio to the target
// does not reduce to small numbers (12345 Hz, 47999 Hz) soxr approximates the phase, and a
// window drifts from the whole decode with its offset: about 1e-5 at 10 s, 7e-4 at 10 minutes.
//
// Lengths. A whole-file decode of F source frames at rate R yields round(F * T / R) samples at
// target rate T (exactly F when T == R).
//
// Torch-free. Thread-safe: every call opens its own file handle and resampler; no shared state.
#ifndef AVIARY_WORKER_DATA_AUDIO_H_
#define AVIARY_WORKER_DATA_AUDIO_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace aviary::worker {

// Why a file was skipped. Never fatal for a run: the data plane counts these per reason.
enum class AudioProblem {
  kNone = 0,
  kMissing,    // no such file, or it cannot be read now: open(2) fails (permission, too many
               // open files, ...), read(2) fails mid-stream (I/O error), or the decoder ran out
               // of memory; the message says why. Transient: the audio cache never stores this
               // verdict, so the next `aviary prepare` tries the file again
  kEmpty,      // zero bytes
  kNotAudio,   // libsndfile does not recognise it and it has no known audio signature
               // (text named .ogg, ...); or its header is implausible: a sample rate outside
               // [1000, 768000] Hz, or a length whose decode would deliver more than 2^29
               // samples (4.66 h at 32 kHz), which the decoder refuses rather than attempt
  kTruncated,  // a known container (Ogg, MPEG, FLAC, RIFF, ...) that libsndfile cannot open,
               // an Ogg stream without an end, fewer frames than the header says, or a
               // libsndfile error mid-stream
  kSilent,     // decodes, but every returned sample is exactly zero
  kTooShort,   // decodes to no samples at all (0 frames)
  kNonFinite,  // a sample is NaN, infinite or above 1e8 in magnitude (float WAV/FLAC can hold them)
};
inline constexpr int kNumAudioProblems = 8;
// "ok", "missing", "empty", "not_audio", "truncated", "silent", "too_short", "non_finite".
const char* AudioProblemName(AudioProblem problem);
// The inverse of AudioProblemName; INVALID_ARGUMENT for an unknown name.
absl::StatusOr<AudioProblem> ParseAudioProblem(absl::string_view name);

enum class ChannelMode { kFirst, kMean };  // the notebook takes the first channel
// "first" / "mean"; INVALID_ARGUMENT otherwise.
absl::StatusOr<ChannelMode> ParseChannelMode(absl::string_view name);
const char* ChannelModeName(ChannelMode mode);

// The most samples one decode may deliver: 2^29 (2 GiB as float, 1 GiB as int16; 4.66 hours at
// 32 kHz). A decode that would deliver more is refused as a problem file, not attempted
// (DecodeOptions::max_samples).
constexpr int64_t kMaxDecodeSamples = int64_t{1} << 29;

struct DecodeOptions {
  // Resample to this rate (soxr, SOXR_HQ); 0 keeps the source rate.
  int target_sample_rate = 32000;
  ChannelMode channels = ChannelMode::kFirst;
  // Window to return, in seconds at the target rate: output samples
  // [round(offset_s * T), round(offset_s * T) + round(duration_s * T)), clipped to the file's
  // end. duration_s <= 0 decodes to the end. The decoder seeks instead of decoding what lies
  // before `offset_s`.
  double offset_s = 0.0;
  double duration_s = 0.0;
  // The most samples the decode may deliver, >= 1: a file whose header gives more is refused
  // (kNotAudio, over_limit), a stream of unknown length that turns out longer too (kNotAudio).
  // A consumer that holds only a bounded part of a stream at a time (DecodeAudioTo with a sink
  // that passes samples on, as `aviary predict` does) may raise it.
  int64_t max_samples = kMaxDecodeSamples;
};

struct DecodedAudio {
  std::vector<float> samples;  // mono, `sample_rate`, nominally in [-1, 1]
  int sample_rate = 0;         // the target rate (the source rate when target was 0)
  int64_t offset = 0;          // index of samples[0] in the whole-file output
  int source_sample_rate = 0;
  int source_channels = 0;
  // Whole file, as the header says; -1 when unknown: an MPEG stream without a Xing/Info/VBRI
  // tag, whose count libsndfile only estimates from the first frame's bitrate (a decode then
  // reads to the end of the stream, and a whole-file decode fills in the frames it read).
  int64_t source_frames = -1;
  // Samples of the whole file at `sample_rate` (round(source_frames * T / R)); -1 when unknown.
  int64_t total_samples = -1;
  int source_format = 0;  // libsndfile's SF_INFO::format
  int64_t file_bytes = -1;  // the file's size when it was opened
};

// A decode that failed for a reason the data plane skips and counts.
struct DecodeFailure {
  AudioProblem problem = AudioProblem::kNone;
  std::string message;  // names the path and libsndfile's error text
  // kMissing because the system could not read the file (not there, no permission, an I/O
  // error, too many open files, out of memory), not because a decoder failed on it.
  bool unreadable = false;
  // ... for a cause that may pass (an I/O error, too many open files, out of memory; not a file
  // that does not exist): worth reading again.
  bool retry = false;
  // kNotAudio because the header's length would deliver more than max_samples: audio, too
  // long to decode whole, whose windows decode (a training clip's): `aviary prepare` does not
  // cache the verdict. (A stream of unknown length found too long while decoding is not
  // flagged: its clips are decoded whole too, so it stays not_audio everywhere.)
  bool over_limit = false;
};

// The outcome of a decode: `audio` is meaningful when ok(); on a skippable problem `failure`
// says why (`audio` then holds what was learnt before the failure, e.g. the header). absl
// errors are reserved for misuse (bad options) and resource failures (out of memory in the
// resampler), never for file contents.
struct DecodeResult {
  DecodedAudio audio;
  DecodeFailure failure;  // problem == kNone on success
  bool ok() const { return failure.problem == AudioProblem::kNone; }
};
absl::StatusOr<DecodeResult> DecodeAudio(const std::string& path, const DecodeOptions& options);

// A float sample past this is damage, not audio: squared in the mel front end a 1e30 overflowed
// to infinity downstream, where a NaN or an infinity is caught. (Float files stored at integer
// scale, +-32768, are audio: libsndfile returns float samples as stored.) The decoder reports a
// file holding one as non_finite.
constexpr float kMaxSampleMagnitude = 1e8f;

// Streams a decode to `sink` block by block (16384 source frames per block, resampled) instead
// of materialising it: the same samples, window rules and classification as DecodeAudio (the
// silent and non-finite checks cover everything streamed), with `result->audio.samples` left
// empty. Consume() returning false stops the decode (the result is then ok() with what was
// streamed). The cache writer uses it to quantise to int16 as it goes (half the memory of a
// float decode on hour-long files).
class SampleSink {
 public:
  virtual ~SampleSink() = default;
  // Before the first Consume, when the header tells the length: about the samples the decode
  // will deliver (a hint, bounded; a truncated stream gives fewer). A sink that collects them
  // reserves that much once, best effort: growing by doubling held up to 3x a long recording's
  // samples at a reallocation.
  virtual void Expect(int64_t /*samples*/) {}
  virtual bool Consume(const float* samples, int64_t count) = 0;
};
absl::StatusOr<DecodeResult> DecodeAudioTo(const std::string& path, const DecodeOptions& options,
                                           SampleSink* sink);

// Just the header: sample rate, channels, frames, total_samples at `target_sample_rate`
// (0 = source rate). A failure is reported as in DecodeAudio (missing, empty, not_audio,
// truncated when the container is broken or an Ogg stream has no end, too_short for 0 frames).
absl::StatusOr<DecodeResult> ProbeAudio(const std::string& path, int target_sample_rate = 0);

// Resamples mono float audio with soxr (SOXR_HQ): round(in.size() * to / from) samples.
// from == to returns the input. INVALID_ARGUMENT for rates <= 0, INTERNAL for soxr errors.
absl::StatusOr<std::vector<float>> Resample(const std::vector<float>& in, int from_hz, int to_hz);

// Samples of a whole-file decode of `source_frames` frames at `from_hz` resampled to `to_hz`:
// round(source_frames * to / from) (exact integer arithmetic).
int64_t ResampledLength(int64_t source_frames, int from_hz, int to_hz);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_DATA_AUDIO_H_
