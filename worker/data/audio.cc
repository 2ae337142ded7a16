#include "worker/data/audio.h"

#include <sndfile.h>
#include <soxr.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <vector>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <system_error>
#include <numeric>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status.h"

namespace aviary::worker {
namespace {

// Source frames read per sf_readf_float call.
constexpr int64_t kBlockFrames = 16384;
// Source audio decoded before a window's first sample so that the resampler's filter is fully
// primed there: a window then equals the same samples of a whole-file decode. SOXR_HQ's filter
// is a few hundred taps long at our ratios; 20 ms of source is several times that (measured in
// audio_test: windows equal whole-file decodes to float rounding), and at least 1024 frames
// (20 ms of a 1-4 kHz source was too few: windows off by up to 1e-3).
constexpr double kResampleMarginSeconds = 0.02;
constexpr int64_t kMinResampleMarginFrames = 1024;

// Source sample rates the decoder accepts: [1000, 768000] Hz. Real recordings use 8 kHz and up
// (1 kHz leaves room for odd loggers); 768 kHz is the highest rate any converter offers. A header
// outside the range is corrupt, and trusting it is dangerous: 240,000 frames announced at 1 Hz
// resample to 7.68e9 samples at 32 kHz (std::bad_alloc, or the OOM killer).
constexpr int kMinSourceRate = 1000;
constexpr int kMaxSourceRate = 768000;

// Feeds a file's bytes into one end of a socket pair from a thread, so that libsndfile can read
// the file as a stream (sf_open_fd on the other end). libsndfile then treats it as a pipe: for
// MPEG it asks mpg123 for no length estimate (frames = SF_COUNT_MAX) and reads to the end of
// the stream, where on a regular file sf_readf_* stop at the estimated count.
class StreamFeeder {
 public:
  // The read end for sf_open_fd (libsndfile closes it), or -1 (errno set) on failure. The stream
  // starts `skip` bytes into the file (past an MPEG file's ID3v2 tags: read as a stream,
  // libsndfile refuses a header allocation for one of 50 KB or more, cover art).
  static std::unique_ptr<StreamFeeder> Start(const std::string& path, int* read_fd, off_t skip = 0) {
    *read_fd = -1;
    const int in = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (in < 0) return nullptr;
    if (skip > 0 && ::lseek(in, skip, SEEK_SET) != skip) {
      const int err = errno;
      ::close(in);
      errno = err;
      return nullptr;
    }
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
      ::close(in);
      return nullptr;
    }
    const int keep = ::fcntl(sv[0], F_DUPFD_CLOEXEC, 0);
    if (keep < 0) {
      ::close(in);
      ::close(sv[0]);
      ::close(sv[1]);
      return nullptr;
    }
    std::unique_ptr<StreamFeeder> feeder(new StreamFeeder(keep));
    auto feed = [in, out = sv[1], read_errno = &feeder->read_errno_] {
      char buffer[1 << 16];  // on the stack: nothing in this thread may throw
      for (;;) {
        ssize_t n = ::read(in, buffer, sizeof(buffer));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) read_errno->store(errno);  // recorded before the stream ends (close below)
        if (n <= 0) break;  // end of file, or a read error: the stream just ends
        for (const char* p = buffer; n > 0;) {
          ssize_t w = ::send(out, p, static_cast<size_t>(n), MSG_NOSIGNAL);
          if (w < 0 && errno == EINTR) continue;
          if (w <= 0) goto done;  // the reader is gone
          p += w;
          n -= w;
        }
      }
    done:
      ::close(out);
      ::close(in);
    };
    try {
      feeder->thread_ = std::thread(feed);
    } catch (const std::system_error& e) {  // no thread to be had: EAGAIN
      ::close(in);
      ::close(sv[0]);
      ::close(sv[1]);
      errno = e.code().value();
      return nullptr;  // the feeder closes `keep`
    }
    *read_fd = sv[0];
    return feeder;
  }
  StreamFeeder(const StreamFeeder&) = delete;
  StreamFeeder& operator=(const StreamFeeder&) = delete;
  ~StreamFeeder() {
    ::shutdown(keep_, SHUT_RDWR);  // unblocks a writer whose reader stopped early
    if (thread_.joinable()) thread_.join();
    ::close(keep_);
  }
  // The errno of a failed read of the file (0: none): the stream then ended early, and looked
  // like a normal end to the decoder.
  int read_errno() const { return read_errno_.load(); }

 private:
  explicit StreamFeeder(int keep) : keep_(keep) {}
  int keep_;  // a duplicate of the read end: shutdown() works whatever libsndfile did with its fd
  std::atomic<int> read_errno_{0};
  std::thread thread_;
};

// Owns an SNDFILE* (and the feeder of a streamed one). Close() returns sf_close's status; the
// destructor closes quietly (on paths that already report a problem).
class SndFile {
 public:
  SndFile() = default;
  SndFile(const SndFile&) = delete;
  SndFile& operator=(const SndFile&) = delete;
  ~SndFile() { Close(); }
  void reset(SNDFILE* file, std::unique_ptr<StreamFeeder> feeder = nullptr) {
    Close();
    file_ = file;
    feeder_ = std::move(feeder);
  }
  SNDFILE* get() const { return file_; }
  // A streamed file's failed read (StreamFeeder::read_errno); 0 otherwise.
  int stream_read_errno() const { return feeder_ != nullptr ? feeder_->read_errno() : 0; }
  int Close() {
    int rc = file_ != nullptr ? sf_close(file_) : 0;
    file_ = nullptr;
    feeder_.reset();  // after sf_close: the reader is gone, the writer stops
    return rc;
  }

 private:
  SNDFILE* file_ = nullptr;
  std::unique_ptr<StreamFeeder> feeder_;
};

// Owns a soxr_t streaming resampler for one mono stream.
class Resampler {
 public:
  static absl::StatusOr<std::unique_ptr<Resampler>> Create(int from_hz, int to_hz) {
    soxr_error_t error = nullptr;
    soxr_io_spec_t io = soxr_io_spec(SOXR_FLOAT32_I, SOXR_FLOAT32_I);
    soxr_quality_spec_t quality = soxr_quality_spec(SOXR_HQ, 0);
    soxr_runtime_spec_t runtime = soxr_runtime_spec(1);
    soxr_t soxr = soxr_create(from_hz, to_hz, 1, &error, &io, &quality, &runtime);
    if (soxr == nullptr || error != nullptr) {
      if (soxr != nullptr) soxr_delete(soxr);
      return absl::InternalError(
          absl::StrCat("soxr_create(", from_hz, " Hz -> ", to_hz,
                       " Hz, SOXR_HQ) failed: ", error != nullptr ? error : "no resampler"));
    }
    return std::unique_ptr<Resampler>(new Resampler(soxr, from_hz, to_hz));
  }
  Resampler(const Resampler&) = delete;
  Resampler& operator=(const Resampler&) = delete;
  ~Resampler() { soxr_delete(soxr_); }

  // Feeds `n` samples and appends whatever the resampler emits to `out` (cleared first).
  absl::Status Process(const float* in, size_t n, std::vector<float>* out) {
    out->clear();
    size_t consumed = 0;
    while (consumed < n) {
      size_t want =
          static_cast<size_t>(std::ceil(static_cast<double>(n - consumed) * to_hz_ / from_hz_)) +
          256;
      size_t base = out->size();
      out->resize(base + want);
      size_t idone = 0, odone = 0;
      soxr_error_t error = soxr_process(soxr_, in + consumed, n - consumed, &idone,
                                        out->data() + base, want, &odone);
      if (error != nullptr) {
        return absl::InternalError(
            absl::StrCat("soxr_process(", from_hz_, " Hz -> ", to_hz_, " Hz) failed: ", error));
      }
      out->resize(base + odone);
      consumed += idone;
      if (idone == 0 && odone == 0) {
        return absl::InternalError(absl::StrCat("soxr_process(", from_hz_, " Hz -> ", to_hz_,
                                                " Hz) made no progress with ", n - consumed,
                                                " samples left"));
      }
    }
    return absl::OkStatus();
  }

  // Signals the end of input and appends the resampler's tail to `out` (cleared first).
  absl::Status Flush(std::vector<float>* out) {
    out->clear();
    constexpr size_t kChunk = 4096;
    for (;;) {
      size_t base = out->size();
      out->resize(base + kChunk);
      size_t odone = 0;
      soxr_error_t error =
          soxr_process(soxr_, nullptr, 0, nullptr, out->data() + base, kChunk, &odone);
      if (error != nullptr) {
        return absl::InternalError(absl::StrCat("soxr_process(", from_hz_, " Hz -> ", to_hz_,
                                                " Hz, flush) failed: ", error));
      }
      out->resize(base + odone);
      if (odone == 0) return absl::OkStatus();
    }
  }

 private:
  Resampler(soxr_t soxr, int from_hz, int to_hz) : soxr_(soxr), from_hz_(from_hz), to_hz_(to_hz) {}
  soxr_t soxr_;
  int from_hz_;
  int to_hz_;
};

// The container a file's first bytes announce, or "" when none we know. Used to tell a broken
// audio file (truncated, malformed header) from something that is not audio at all, because
// libsndfile reports both as a failed sf_open (its error codes vary by format: the mp3 probe
// reports "File does not exist ..." for garbage).
std::string SniffContainer(const std::string& path, int* unreadable_errno) {
  unsigned char head[12] = {0};
  *unreadable_errno = 0;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    *unreadable_errno = errno != 0 ? errno : EIO;  // no verdict on the contents
    return "";
  }
  errno = 0;
  size_t n = std::fread(head, 1, sizeof(head), f);
  if (std::ferror(f)) *unreadable_errno = errno != 0 ? errno : EIO;
  std::fclose(f);
  auto starts = [&](const char* magic, size_t at = 0) {
    size_t len = std::strlen(magic);
    return n >= at + len && std::memcmp(head + at, magic, len) == 0;
  };
  if (starts("OggS")) return "Ogg";
  if (starts("fLaC")) return "FLAC";
  if (starts("ID3")) return "MPEG (ID3)";
  if (n >= 2 && head[0] == 0xFF && (head[1] & 0xE0) == 0xE0) return "MPEG";
  if ((starts("RIFF") || starts("RIFX") || starts("RF64")) && starts("WAVE", 8)) return "WAV";
  if (starts("FORM") && (starts("AIFF", 8) || starts("AIFC", 8))) return "AIFF";
  if (starts("caff")) return "CAF";
  if (starts(".snd")) return "AU";
  return "";
}

// Held around every sf_open/sf_open_fd and the read of its error: libsndfile keeps an open's
// error in one process-wide slot, which every open (a successful one too) overwrites.
std::mutex& SndfileOpenMutex() {
  static std::mutex mu;
  return mu;
}

bool IsOgg(const SF_INFO& info) { return (info.format & SF_FORMAT_TYPEMASK) == SF_FORMAT_OGG; }
bool IsMpeg(const SF_INFO& info) { return (info.format & SF_FORMAT_TYPEMASK) == SF_FORMAT_MPEG; }

// Whether an MPEG audio file states its length: a Xing/Info tag with a frame count in its first
// frame. libsndfile (mpg123) reports an exact frame count only then; without one (a VBRI tag,
// which libmpg123 does not read, `-write_xing 0`, many streams and cut files) it estimates the
// count from the file size
// and the first frame's bitrate, which for VBR is off either way (a 30 s file "of 9 s", a 12 s
// file "of 42 s"). Reads the first frame after any ID3v2 tags, which may be of any size (cover
// art: hundreds of KB); `*audio_start` gets where they end (0 without any).
bool MpegStatesLength(const std::string& path, off_t* audio_start) {
  *audio_start = 0;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  off_t start = 0;
  for (int tags = 0; tags < 64; ++tags) {  // ID3v2 tags (syncsafe sizes), each read where it starts
    unsigned char h[10];
    if (::pread(fd, h, sizeof(h), start) != static_cast<ssize_t>(sizeof(h)) || std::memcmp(h, "ID3", 3) != 0) break;
    const off_t size = (off_t{h[6]} & 0x7F) << 21 | (off_t{h[7]} & 0x7F) << 14 | (off_t{h[8]} & 0x7F) << 7 |
                       (off_t{h[9]} & 0x7F);
    start += 10 + size + ((h[5] & 0x10) ? 10 : 0);
  }
  *audio_start = start;
  std::string head(256 * 1024, '\0');
  const ssize_t got = ::pread(fd, head.data(), head.size(), start);
  ::close(fd);
  head.resize(got > 0 ? static_cast<size_t>(got) : 0);
  const auto* d = reinterpret_cast<const unsigned char*>(head.data());
  const size_t n = head.size();
  size_t pos = 0;
  // The first plausible frame header: sync, a version, Layer III, a bitrate, a sample rate.
  for (; pos + 4 <= n; ++pos) {
    if (d[pos] != 0xFF || (d[pos + 1] & 0xE0) != 0xE0) continue;
    const int version = (d[pos + 1] >> 3) & 3;  // 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5
    const int layer = (d[pos + 1] >> 1) & 3;     // 1: Layer III
    const int bitrate = d[pos + 2] >> 4;
    const int rate = (d[pos + 2] >> 2) & 3;
    if (version == 1 || layer == 0 || bitrate == 15 || rate == 3) continue;
    const bool mono = (d[pos + 3] >> 6) == 3;
    // The Xing/Info tag follows the side information: 32/17 bytes (MPEG-1 stereo/mono), 17/9
    // (MPEG-2 and 2.5).
    const size_t side = version == 3 ? (mono ? 17 : 32) : (mono ? 9 : 17);
    const size_t xing = pos + 4 + side;
    if (xing + 8 <= n &&
        (std::memcmp(d + xing, "Xing", 4) == 0 || std::memcmp(d + xing, "Info", 4) == 0)) {
      return (d[xing + 7] & 0x01) != 0;  // the frame-count field is present
    }
    return false;
  }
  return false;
}

// The audio data's declared size against the file's, read from the header itself: WAV (RIFF,
// little-endian chunks: "data"), AIFF/AIFC (FORM, big-endian chunks: "SSND") and AU (".snd":
// its data size field). "" when the data fits, the size says "unknown" (a pipe's WAV: 0xFFFFFFFF,
// 0x7FFFF000, 0x7FFFFFFF; AU's 0xFFFFFFFF), for other formats or a header this does not follow
// (libsndfile's log is the other check). libsndfile shortens such a file's frame count without
// an error: a cut download decoded "fine" at half its length. (Its log says so for WAV only, and
// a log of many chunks before "data" passed its 2 KB and lost the line.)
std::string DeclaredDataBeyondFile(const std::string& path, int format) {
  const int type = format & SF_FORMAT_TYPEMASK;
  const bool wav = type == SF_FORMAT_WAV || type == SF_FORMAT_WAVEX;
  const bool aiff = type == SF_FORMAT_AIFF;
  const bool au = type == SF_FORMAT_AU;
  if (!wav && !aiff && !au) return "";
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "";
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st = {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return "";
  const int64_t file_bytes = st.st_size;
  unsigned char h[12];
  auto read_at = [&](int64_t at, size_t n) { return ::pread(fd, h, n, at) == static_cast<ssize_t>(n); };
  auto le32 = [&](int at) {
    return uint32_t{h[at]} | uint32_t{h[at + 1]} << 8 | uint32_t{h[at + 2]} << 16 | uint32_t{h[at + 3]} << 24;
  };
  auto be32 = [&](int at) {
    return uint32_t{h[at]} << 24 | uint32_t{h[at + 1]} << 16 | uint32_t{h[at + 2]} << 8 | uint32_t{h[at + 3]};
  };
  auto beyond = [&](const char* what, int64_t start, int64_t declared) {
    return absl::StrCat("the ", what, " is cut short (it declares ", declared, " bytes, the file holds ",
                        std::max<int64_t>(0, file_bytes - start), " from its start)");
  };
  if (au) {
    if (!read_at(0, 12) || std::memcmp(h, ".snd", 4) != 0) return "";
    const uint32_t offset = be32(4), size = be32(8);
    if (size == 0xFFFFFFFFu || offset + int64_t{size} <= file_bytes) return "";
    return beyond("data of the AU header", offset, size);
  }
  if (!read_at(0, 12)) return "";
  if (wav ? std::memcmp(h, "RIFF", 4) != 0 || std::memcmp(h + 8, "WAVE", 4) != 0
          : std::memcmp(h, "FORM", 4) != 0 || (std::memcmp(h + 8, "AIFF", 4) != 0 && std::memcmp(h + 8, "AIFC", 4) != 0)) {
    return "";
  }
  int64_t pos = 12;
  for (int chunks = 0; chunks < 100000 && pos + 8 <= file_bytes; ++chunks) {
    if (!read_at(pos, 8)) return "";
    const uint32_t size = wav ? le32(4) : be32(4);
    if (std::memcmp(h, wav ? "data" : "SSND", 4) == 0) {
      if (wav && (size == 0xFFFFFFFFu || size == 0x7FFFF000u || size == 0x7FFFFFFFu)) return "";
      // An AIFF written to a pipe: sox says 0x7F000008 (and may add to it), others 0xFFFFFFFF.
      if (!wav && size >= 0x7F000000u) return "";
      if (pos + 8 + int64_t{size} <= file_bytes) return "";
      return beyond(wav ? "data chunk" : "SSND chunk", pos + 8, size);
    }
    pos += 8 + int64_t{size} + (size & 1);
  }
  return "";
}

// libsndfile opens a WAV file whose data chunk is longer than the file (a cut download, an
// unfinished recording) without an error: it shortens the frame count to what is there and
// notes "data : <declared> (should be <present>)" in its log. Returns that log line for the
// RIFF family, "" otherwise.
std::string WavTruncationNote(SNDFILE* file, int format) {
  const int type = format & SF_FORMAT_TYPEMASK;
  if (type != SF_FORMAT_WAV && type != SF_FORMAT_WAVEX && type != SF_FORMAT_RF64 &&
      type != SF_FORMAT_W64) {
    return "";
  }
  char log[8192] = {0};
  sf_command(file, SFC_GET_LOG_INFO, log, sizeof(log));  // returns the length copied
  absl::string_view text(log);
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::StartsWith(line, "data :") && absl::StrContains(line, "(should be")) {
      // The sizes a WAV written to a pipe says for "length unknown", not a longer data chunk
      // (the file is whole): 0xFFFFFFFF (`ffmpeg ... -f wav -`, arecord), 0x7FFFF000 (sox), and
      // 0x7FFFFFFF.
      const absl::string_view declared = absl::StripLeadingAsciiWhitespace(line.substr(6));
      for (absl::string_view unknown : {"4294967295 ", "2147479552 ", "2147483647 "}) {
        if (absl::StartsWith(declared, unknown)) return "";
      }
      return std::string(line);
    }
  }
  return "";
}

// The file's last 140 KB (a page is at most 65307 bytes: they hold the last two); "" when it
// cannot be read.
std::string OggTail(const std::string& path) {
  constexpr int64_t kTail = 140 * 1024;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "";
  struct stat st = {};
  std::string tail;
  if (::fstat(fd, &st) == 0 && st.st_size > 0) {
    const int64_t start = std::max<int64_t>(0, st.st_size - kTail);
    tail.resize(static_cast<size_t>(st.st_size - start));
    const ssize_t got = ::pread(fd, tail.data(), tail.size(), start);
    tail.resize(got > 0 ? static_cast<size_t>(got) : 0);
  }
  ::close(fd);
  return tail;
}

// Whether the file's last 140 KB hold an Ogg page marked end-of-stream (header type 0x04) that
// ends inside the file: the stream is whole, whatever follows it.
bool OggEndOfStreamInTail(const std::string& path) {
  const std::string tail = OggTail(path);
  const auto* data = reinterpret_cast<const unsigned char*>(tail.data());
  const size_t n = tail.size();
  for (size_t at = tail.find("OggS"); at != std::string::npos; at = tail.find("OggS", at + 1)) {
    if (n - at < 27 || data[at + 4] != 0 || (data[at + 5] & 0x04) == 0) continue;
    const size_t segments = data[at + 26];
    if (n - at < 27 + segments) continue;
    size_t body = 0;
    for (size_t i = 0; i < segments; ++i) body += data[at + 27 + i];
    if (n - at >= 27 + segments + body) return true;
  }
  return false;
}

// libsndfile 1.2's Ogg Vorbis seek lands at the wrong sample (hundreds to thousands of frames
// off) when a freshly opened file is asked for a frame inside the stream's final page; every
// frame before that page seeks exactly (measured on 56 files; cf. libsndfile issue #885). The
// decoder therefore never seeks past the start of the final page: it seeks to this limit and
// decodes forward. The limit is where the final page's samples begin, less a safety margin:
// `total_frames` (libsndfile's count, from the stream's first granule on) less the final page's
// frames (its granule position less the previous page's), found by walking the Ogg pages in the
// file's last 140 KB (a page is at most 65307 bytes, so that holds the last two). Measured from
// the end: a stream whose first granule is not 0 (cut from a live stream) counts its granules
// from there, and the absolute granule put the limit inside the final page. 0 when it cannot be
// found.
int64_t OggSeekLimit(const std::string& path, int64_t total_frames) {
  constexpr int64_t kMarginFrames = 8192;
  const std::string tail = OggTail(path);
  const auto* data = reinterpret_cast<const unsigned char*>(tail.data());
  const size_t n = tail.size();
  // Try each capture pattern as the start of a chain of pages that ends exactly at the end of
  // the file; the first chain that does is the real page sequence.
  for (size_t first = tail.find("OggS"); first != std::string::npos;
       first = tail.find("OggS", first + 1)) {
    std::vector<int64_t> granules;
    size_t pos = first;
    bool chain = true;
    while (pos < n) {
      if (n - pos < 27 || std::memcmp(data + pos, "OggS", 4) != 0 || data[pos + 4] != 0) {
        chain = false;
        break;
      }
      size_t segments = data[pos + 26];
      if (n - pos < 27 + segments) {
        chain = false;
        break;
      }
      size_t body = 0;
      for (size_t i = 0; i < segments; ++i) body += data[pos + 27 + i];
      int64_t granule = 0;
      for (int b = 7; b >= 0; --b) granule = (granule << 8) | data[pos + 6 + b];
      granules.push_back(granule);
      pos += 27 + segments + body;
    }
    if (!chain || pos != n) continue;
    // The last page with a granule position before the final page.
    for (size_t i = granules.size() - 1; i-- > 0;) {
      if (granules[i] >= 0 && granules.back() >= granules[i]) {
        return std::max<int64_t>(0, total_frames - (granules.back() - granules[i]) - kMarginFrames);
      }
    }
    return 0;
  }
  return 0;
}

DecodeFailure Failure(AudioProblem problem, std::string message) {
  return DecodeFailure{problem, std::move(message)};
}

// The file cannot be read now: kMissing, worth reading again (DecodeFailure::retry) unless `err`
// (0: not known) says it is not there or never readable by us.
DecodeFailure Unreadable(std::string message, int err = 0) {
  const bool lasting = err == ENOENT || err == ENOTDIR || err == EACCES || err == EPERM || err == ELOOP ||
                       err == ENAMETOOLONG || err == EISDIR || err == EINVAL;
  return DecodeFailure{AudioProblem::kMissing, std::move(message), /*unreadable=*/true, /*retry=*/!lasting};
}

// Opens `path` for reading and classifies what can be told from the file system and the header.
// On a problem fills `failure` and returns false; `audio` gets the header fields it could read.
bool OpenAudio(const std::string& path, int target_sample_rate, SndFile* file, SF_INFO* info,
               DecodedAudio* audio, DecodeFailure* failure) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    int err = errno;
    const bool absent = err == ENOENT || err == ENOTDIR;
    *failure = Unreadable(absl::StrCat(path, ": ", absent ? "no such file" : std::strerror(err)), err);
    return false;
  }
  if (S_ISDIR(st.st_mode)) {
    *failure = Failure(AudioProblem::kNotAudio, absl::StrCat(path, ": is a directory"));
    return false;
  }
  {
    // A file that cannot be opened now (permission, too many open files, an I/O error) is
    // missing for this run, not "not audio": the verdict must not outlive the cause.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
      const int err = errno;
      *failure = Unreadable(absl::StrCat(path, ": cannot open for reading: ", std::strerror(err)), err);
      return false;
    }
    // The bytes sf_open reads under the lock below (the header at the start; Ogg's length from its
    // last pages) read here first, in parallel with the other threads: on a cold network
    // filesystem each read under the lock is a round trip that every decoder waited for in turn.
    // Errors are left to libsndfile's own reads.
    if (S_ISREG(st.st_mode) && st.st_size > 0) {
      constexpr off_t kEdge = 64 << 10;
      static thread_local std::vector<char> scratch(static_cast<size_t>(kEdge));
      (void)!::pread(fd, scratch.data(), scratch.size(), 0);
      if (st.st_size > kEdge) (void)!::pread(fd, scratch.data(), scratch.size(), std::max<off_t>(kEdge, st.st_size - kEdge));
    }
    ::close(fd);
  }
  if (st.st_size == 0) {
    *failure = Failure(AudioProblem::kEmpty, absl::StrCat(path, ": empty file (0 bytes)"));
    return false;
  }
  audio->file_bytes = static_cast<int64_t>(st.st_size);
  *info = SF_INFO{};
  SNDFILE* handle = nullptr;
  std::string error;
  bool system = false;  // SF_ERR_SYSTEM: an open(2), read(2) or allocation failed
  {
    // libsndfile reports open failures through a process-wide error slot that every sf_open
    // (a successful one too) overwrites: open and read it under one lock, so that the text is
    // this file's. Reading frames stays parallel.
    std::lock_guard<std::mutex> lock(SndfileOpenMutex());
    handle = sf_open(path.c_str(), SFM_READ, info);
    if (handle == nullptr) {
      error = sf_strerror(nullptr);
      system = sf_error(nullptr) == SF_ERR_SYSTEM;
    }
  }
  if (handle == nullptr) {
    int unreadable = 0;
    std::string container = system ? std::string() : SniffContainer(path, &unreadable);
    if (system || unreadable != 0) {
      // The system failed (too many open files, out of memory, an I/O error), not the file:
      // missing for this run, as a failed open above. (Only an open's failure says so: a read
      // error within libsndfile's header parsing reads as a malformed file, and is cached so.)
      *failure = Unreadable(
          absl::StrCat(path, ": cannot open for reading: ", system ? error : std::strerror(unreadable)),
          system ? 0 : unreadable);
    } else if (container.empty()) {
      // libsndfile says "File does not exist or is not a regular file (possibly a pipe?)" of a
      // file with an .mp3 name that is not MPEG: it exists (stat above), so that is left out.
      const bool misleading = absl::StrContains(error, "does not exist");
      *failure = Failure(AudioProblem::kNotAudio,
                         absl::StrCat(path, ": not audio (", st.st_size, " bytes, no known audio signature)",
                                      misleading ? "" : absl::StrCat("; libsndfile: ", error)));
    } else {
      *failure = Failure(AudioProblem::kTruncated,
                         absl::StrCat(path, ": ", container, " file of ", st.st_size,
                                      " bytes that libsndfile cannot open (truncated or "
                                      "malformed): ",
                                      error));
    }
    return false;
  }
  file->reset(handle);
  audio->source_sample_rate = info->samplerate;
  audio->source_channels = info->channels;
  audio->source_format = info->format;
  audio->sample_rate = target_sample_rate > 0 ? target_sample_rate : info->samplerate;
  if (info->samplerate <= 0 || info->channels <= 0) {
    *failure = Failure(AudioProblem::kNotAudio,
                       absl::StrCat(path, ": libsndfile reports ", info->samplerate, " Hz and ",
                                    info->channels, " channels"));
    return false;
  }
  if (info->samplerate < kMinSourceRate || info->samplerate > kMaxSourceRate) {
    *failure = Failure(AudioProblem::kNotAudio,
                       absl::StrCat(path, ": the header's sample rate ", info->samplerate,
                                    " Hz is implausible (accepted: ", kMinSourceRate, " to ",
                                    kMaxSourceRate, " Hz): a corrupt header"));
    return false;
  }
  off_t audio_start = 0;
  if (IsMpeg(*info) && !MpegStatesLength(path, &audio_start)) {
    // MPEG without a Xing/Info/VBRI tag: libsndfile's count is an estimate (far off either way
    // for VBR), and sf_readf_* stop at it. Reopen the file as a stream: the length is then
    // unknown (SF_COUNT_MAX) and a decode reads to the end of the stream, where a stream that
    // ends is no truncation.
    int fd = -1;
    std::unique_ptr<StreamFeeder> feeder = StreamFeeder::Start(path, &fd, audio_start);
    if (feeder == nullptr) {
      const int err = errno;
      file->reset(nullptr);
      *failure = Unreadable(absl::StrCat(path, ": cannot open to stream: ", std::strerror(err)), err);
      return false;
    }
    SF_INFO streamed{};
    SNDFILE* again = nullptr;
    {
      std::lock_guard<std::mutex> lock(SndfileOpenMutex());  // libsndfile's error slot is process-wide
      again = sf_open_fd(fd, SFM_READ, &streamed, SF_TRUE);
      if (again == nullptr) error = sf_strerror(nullptr);
    }
    if (again == nullptr) {
      file->reset(nullptr);
      *failure = Failure(AudioProblem::kTruncated,
                         absl::StrCat(path, ": MPEG file that libsndfile opens but cannot read as "
                                            "a stream: ",
                                      error));
      return false;
    }
    file->reset(again, std::move(feeder));
    streamed.frames = SF_COUNT_MAX;
    *info = streamed;
  }
  const bool known = info->frames >= 0 && info->frames != SF_COUNT_MAX;
  if (known) {
    audio->source_frames = info->frames;
    audio->total_samples = ResampledLength(info->frames, info->samplerate, audio->sample_rate);
  }
  if (!known && IsOgg(*info) && !OggEndOfStreamInTail(path)) {
    // libsndfile finds an Ogg stream's length in its last page's granule position; a stream cut
    // short has no final page, so its length is unknown. A whole stream followed by other bytes
    // (an ID3v1 tag a tagger appended, a stray byte) has one, its end-of-stream page, though
    // libsndfile then finds no length: decoded to its end as an MPEG file of unknown length is
    // (it was called truncated, and prepare cached that).
    *failure = Failure(AudioProblem::kTruncated,
                       absl::StrCat(path,
                                    ": Ogg stream without an end (libsndfile finds no final "
                                    "granule position): truncated"));
    return false;
  }
  if (known && info->frames == 0) {
    *failure = Failure(AudioProblem::kTooShort, absl::StrCat(path, ": 0 frames"));
    return false;
  }
  if (std::string what = DeclaredDataBeyondFile(path, info->format); !what.empty()) {
    *failure = Failure(AudioProblem::kTruncated, absl::StrCat(path, ": ", what));
    return false;
  }
  if (std::string line = WavTruncationNote(file->get(), info->format); !line.empty()) {
    *failure =
        Failure(AudioProblem::kTruncated,
                absl::StrCat(path, ": the data chunk is cut short (libsndfile: '", line, "')"));
    return false;
  }
  return true;
}

// Delivers output samples to a sink, dropping the first `skip` and stopping after `want`;
// checks for zeros and non-finite values on the way.
class Emitter {
 public:
  Emitter(SampleSink* sink, int64_t skip, int64_t want) : sink_(sink), skip_(skip), want_(want) {}

  // False once the window is complete or the sink asked to stop.
  bool Emit(const float* samples, int64_t n) {
    if (done()) return false;
    int64_t drop = std::min(skip_, n);
    skip_ -= drop;
    samples += drop;
    n -= drop;
    n = std::min(n, want_ - emitted_);
    if (n <= 0) return !done();
    for (int64_t i = 0; i < n; ++i) {
      float x = samples[i];
      any_nonzero_ |= x != 0.0f;
      all_finite_ &= std::fabs(x) <= kMaxSampleMagnitude;  // false for NaN too
    }
    emitted_ += n;
    if (!sink_->Consume(samples, n)) stopped_ = true;
    return !done();
  }
  bool done() const { return stopped_ || emitted_ >= want_; }
  int64_t emitted() const { return emitted_; }
  bool any_nonzero() const { return any_nonzero_; }
  bool all_finite() const { return all_finite_; }

 private:
  SampleSink* sink_;
  int64_t skip_;
  int64_t want_;
  int64_t emitted_ = 0;
  bool any_nonzero_ = false;
  bool all_finite_ = true;
  bool stopped_ = false;
};

class VectorSink : public SampleSink {
 public:
  explicit VectorSink(std::vector<float>* out) : out_(out) {}
  void Expect(int64_t samples) override {
    try {
      out_->reserve(out_->size() + static_cast<size_t>(samples));
    } catch (const std::exception&) {  // a hint: the vector grows as it would have
    }
  }
  bool Consume(const float* samples, int64_t count) override {
    out_->insert(out_->end(), samples, samples + count);
    return true;
  }

 private:
  std::vector<float>* out_;
};

absl::Status ValidateOptions(const DecodeOptions& options) {
  if (options.target_sample_rate < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("target_sample_rate ", options.target_sample_rate, ": must be >= 0"));
  }
  if (!std::isfinite(options.offset_s) || options.offset_s < 0 || options.offset_s > 1e9) {
    return absl::InvalidArgumentError(
        absl::StrCat("offset_s ", options.offset_s, ": must be in [0, 1e9]"));
  }
  if (!std::isfinite(options.duration_s) || options.duration_s > 1e9) {
    return absl::InvalidArgumentError(
        absl::StrCat("duration_s ", options.duration_s, ": must be finite and <= 1e9"));
  }
  if (options.max_samples < 1 || options.max_samples > (int64_t{1} << 62)) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_samples ", options.max_samples, ": must be in [1, 2^62]"));
  }
  return absl::OkStatus();
}

}  // namespace

const char* AudioProblemName(AudioProblem problem) {
  switch (problem) {
    case AudioProblem::kNone:
      return "ok";
    case AudioProblem::kMissing:
      return "missing";
    case AudioProblem::kEmpty:
      return "empty";
    case AudioProblem::kNotAudio:
      return "not_audio";
    case AudioProblem::kTruncated:
      return "truncated";
    case AudioProblem::kSilent:
      return "silent";
    case AudioProblem::kTooShort:
      return "too_short";
    case AudioProblem::kNonFinite:
      return "non_finite";
  }
  return "unknown";
}

absl::StatusOr<AudioProblem> ParseAudioProblem(absl::string_view name) {
  for (int i = 0; i < kNumAudioProblems; ++i) {
    auto problem = static_cast<AudioProblem>(i);
    if (name == AudioProblemName(problem)) return problem;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown audio problem '", name,
      "' (expected ok, missing, empty, not_audio, truncated, silent, too_short or non_finite)"));
}

absl::StatusOr<ChannelMode> ParseChannelMode(absl::string_view name) {
  if (name == "first") return ChannelMode::kFirst;
  if (name == "mean") return ChannelMode::kMean;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown channel mode '", name, "' (expected first or mean)"));
}

const char* ChannelModeName(ChannelMode mode) {
  return mode == ChannelMode::kMean ? "mean" : "first";
}

int64_t ResampledLength(int64_t source_frames, int from_hz, int to_hz) {
  if (from_hz == to_hz || source_frames <= 0) return std::max<int64_t>(source_frames, 0);
  // round(frames * to / from) without overflow: frames < 2^63 / to is not guaranteed, so split.
  __int128 num = static_cast<__int128>(source_frames) * to_hz * 2 + from_hz;
  const __int128 samples = num / (2 * static_cast<__int128>(from_hz));
  // Saturated: a bogus length in a header (an Ogg granule near 2^62, upsampled) wrapped to a
  // negative or tiny count, and the file passed as decoded; INT64_MAX fails the size limit.
  return samples > std::numeric_limits<int64_t>::max() ? std::numeric_limits<int64_t>::max()
                                                        : static_cast<int64_t>(samples);
}

namespace {

absl::StatusOr<DecodeResult> DecodeAudioUnguarded(const std::string& path,
                                                  const DecodeOptions& options, SampleSink* sink) {
  AVIARY_RETURN_IF_ERROR(ValidateOptions(options));
  DecodeResult result;
  DecodedAudio& audio = result.audio;
  SndFile file;
  SF_INFO info;
  if (!OpenAudio(path, options.target_sample_rate, &file, &info, &audio, &result.failure)) {
    return result;
  }
  const int from_hz = info.samplerate;
  const int to_hz = audio.sample_rate;
  const bool resample = from_hz != to_hz;
  const bool known = audio.source_frames >= 0;

  // The window at the target rate.
  const int64_t t0 = std::llround(options.offset_s * to_hz);
  int64_t want = options.duration_s > 0 ? std::llround(options.duration_s * to_hz)
                                        : std::numeric_limits<int64_t>::max();
  audio.offset = t0;
  if (known) want = std::max<int64_t>(0, std::min(want, audio.total_samples - t0));
  if (want == 0) {
    // A window past the end: nothing to decode. At the start, a file too short to give one
    // sample at the target rate (a single frame at 96 kHz, say).
    if (t0 == 0 && known && audio.total_samples == 0) {
      result.failure = Failure(AudioProblem::kTooShort,
                               absl::StrCat(path, ": ", audio.source_frames, " frames at ", from_hz,
                                            " Hz give no sample at ", to_hz, " Hz"));
    }
    return result;
  }
  const int64_t limit = options.max_samples;
  if (known && want > limit) {
    result.failure = Failure(
        AudioProblem::kNotAudio,
        absl::StrCat(path, ": the decode would deliver ", want, " samples at ", to_hz, " Hz (",
                     audio.source_frames, " frames at ", from_hz,
                     " Hz in the header), more than the decoder's limit of ", limit,
                     ": refused"));
    result.failure.over_limit = true;
    return result;
  }
  // Unknown length: one sample past the limit tells a stream that is too long.
  if (!known) want = std::min(want, limit + 1);
  // Reserved up to what the file's bytes can hold (64 samples a byte covers 8 kbit/s speech
  // resampled from 16 to 32 kHz) and 2^26 samples (35 minutes at 32 kHz; longer ones grow): a
  // damaged header's claim of 2^29 samples must not reserve 2 GiB per decoder.
  constexpr int64_t kMaxExpected = int64_t{1} << 26;
  if (known) sink->Expect(std::min({want, kMaxExpected, std::max<int64_t>(0, audio.file_bytes) * 64}));

  // Where to start reading: the window's first source frame less the resampler margin, rounded
  // down to a frame that falls exactly on an output sample (a multiple of from / gcd).
  int64_t source_start = t0;
  int64_t skip = 0;
  if (resample) {
    const int64_t g = std::gcd(from_hz, to_hz);
    const int64_t q = from_hz / g, p = to_hz / g;
    const int64_t margin =
        std::max(kMinResampleMarginFrames, static_cast<int64_t>(std::ceil(kResampleMarginSeconds * from_hz)));
    int64_t pos = static_cast<int64_t>(static_cast<__int128>(t0) * from_hz / to_hz) - margin;
    pos = std::max<int64_t>(0, pos);
    source_start = pos / q * q;
    skip = t0 - source_start / q * p;
  }
  if (known && source_start >= audio.source_frames) return result;
  const int channels = info.channels;
  std::vector<float> interleaved(static_cast<size_t>(kBlockFrames) * channels);
  if (source_start > 0) {
    // Unknown length (an MPEG stream whose count libsndfile estimates): sf_seek refuses frames
    // past the estimate, so decode forward from the start.
    const int64_t seek_to = !known       ? 0
                            : IsOgg(info) ? std::min(source_start, OggSeekLimit(path, audio.source_frames))
                                          : source_start;
    if (seek_to > 0) {
      sf_count_t got = sf_seek(file.get(), seek_to, SEEK_SET);
      if (got != seek_to) {
        result.failure = Failure(AudioProblem::kTruncated,
                                 absl::StrCat(path, ": sf_seek to frame ", seek_to, " returned ",
                                              got, ": ", sf_strerror(file.get())));
        return result;
      }
    }
    for (int64_t at = seek_to; at < source_start;) {  // decode forward to the start
      sf_count_t n = sf_readf_float(file.get(), interleaved.data(),
                                    std::min<int64_t>(kBlockFrames, source_start - at));
      if (const int err = file.stream_read_errno(); n <= 0 && err != 0) {
        result.failure =
            Unreadable(absl::StrCat(path, ": reading failed after ", at, " frames: ", std::strerror(err)), err);
        return result;
      }
      if (n == 0 && !known && sf_error(file.get()) == SF_ERR_NO_ERROR) {
        // The stream ends before the window: a window past the end, nothing to decode.
        audio.source_frames = at;
        audio.total_samples = ResampledLength(at, from_hz, to_hz);
        return result;
      }
      if (n <= 0 || sf_error(file.get()) != SF_ERR_NO_ERROR) {
        result.failure = Failure(
            AudioProblem::kTruncated,
            absl::StrCat(path, ": the stream ends or fails at frame ", at, " before the window at ",
                         source_start, ": ", sf_strerror(file.get())));
        return result;
      }
      at += n;
    }
  }

  std::unique_ptr<Resampler> resampler;
  if (resample) {
    AVIARY_ASSIGN_OR_RETURN(resampler, Resampler::Create(from_hz, to_hz));
  }
  Emitter emitter(sink, skip, want);
  std::vector<float> mono(channels == 1 ? 0 : kBlockFrames);
  std::vector<float> out;
  int64_t read_total = 0;
  const int64_t read_limit =
      known ? audio.source_frames - source_start : std::numeric_limits<int64_t>::max();
  bool at_end = false;
  while (!emitter.done()) {
    int64_t ask = std::min<int64_t>(kBlockFrames, read_limit - read_total);
    if (ask <= 0) {
      at_end = true;
      break;
    }
    sf_count_t n = sf_readf_float(file.get(), interleaved.data(), ask);
    if (n < 0 || sf_error(file.get()) != SF_ERR_NO_ERROR) {
      // SF_ERR_SYSTEM: read(2) failed (EIO, ...): the file could not be read now, which says
      // nothing about its contents.
      // A streamed file whose read failed ends mid-frame: the decoder's error follows from it.
      const bool system = sf_error(file.get()) == SF_ERR_SYSTEM || file.stream_read_errno() != 0;
      result.failure =
          Failure(system ? AudioProblem::kMissing : AudioProblem::kTruncated,
                  absl::StrCat(path, ": libsndfile error after ", source_start + read_total,
                               known ? absl::StrCat(" of ", audio.source_frames) : std::string(),
                               " frames: ", sf_strerror(file.get())));
      result.failure.unreadable = system;
      result.failure.retry = system;
      return result;
    }
    if (n == 0) {
      if (const int err = file.stream_read_errno(); err != 0) {
        // Not the stream's end: reading the file failed (EIO on a network filesystem, say). It
        // cannot be read now, which is no verdict on its contents (the cache does not keep it).
        result.failure = Unreadable(
            absl::StrCat(path, ": reading failed after ", source_start + read_total, " frames: ", std::strerror(err)),
            err);
        return result;
      }
      at_end = true;
      break;
    }
    read_total += n;
    const float* block = interleaved.data();
    if (channels > 1) {
      if (options.channels == ChannelMode::kFirst) {
        for (sf_count_t i = 0; i < n; ++i) mono[i] = interleaved[i * channels];
      } else {
        const float scale = 1.0f / static_cast<float>(channels);
        for (sf_count_t i = 0; i < n; ++i) {
          float sum = 0.0f;
          for (int c = 0; c < channels; ++c) sum += interleaved[i * channels + c];
          mono[i] = sum * scale;
        }
      }
      block = mono.data();
    }
    if (resample) {
      AVIARY_RETURN_IF_ERROR(resampler->Process(block, static_cast<size_t>(n), &out));
      emitter.Emit(out.data(), static_cast<int64_t>(out.size()));
    } else {
      emitter.Emit(block, n);
    }
  }
  if (at_end) {
    if (known && source_start + read_total < audio.source_frames) {
      result.failure =
          Failure(AudioProblem::kTruncated,
                  absl::StrCat(path, ": the stream ends after ", source_start + read_total, " of ",
                               audio.source_frames, " frames the header announces"));
      return result;
    }
    if (resample && !emitter.done()) {
      AVIARY_RETURN_IF_ERROR(resampler->Flush(&out));
      emitter.Emit(out.data(), static_cast<int64_t>(out.size()));
      if (known && !emitter.done()) {
        // soxr's flushed tail ends at round(F * T / R) for every ratio we tested; should a
        // version stop a sample short, pad so that the length contract holds.
        std::vector<float> zeros(
            static_cast<size_t>(std::min<int64_t>(want - emitter.emitted(), 64)));
        emitter.Emit(zeros.data(), static_cast<int64_t>(zeros.size()));
      }
    }
    if (!known) {
      audio.source_frames = source_start + read_total;
      audio.total_samples = ResampledLength(audio.source_frames, from_hz, to_hz);
    }
  }
  if (emitter.emitted() > limit) {
    result.failure = Failure(
        AudioProblem::kNotAudio,
        absl::StrCat(path, ": the stream decodes to more than the decoder's limit of ",
                     limit, " samples at ", to_hz, " Hz: refused"));
    return result;
  }
  if (emitter.emitted() == 0) {
    if (t0 == 0) {
      result.failure =
          Failure(AudioProblem::kTooShort, absl::StrCat(path, ": decodes to no samples"));
    }
    return result;
  }
  if (!emitter.all_finite()) {
    result.failure =
        Failure(AudioProblem::kNonFinite,
                absl::StrCat(path, ": NaN, infinite or absurd samples (above 1e8 in magnitude)"));
    return result;
  }
  if (!emitter.any_nonzero()) {
    bool whole = t0 == 0 && (at_end || emitter.emitted() == audio.total_samples);
    result.failure =
        Failure(AudioProblem::kSilent,
                whole ? absl::StrCat(path, ": all ", emitter.emitted(), " samples are zero")
                      : absl::StrCat(path, ": all ", emitter.emitted(),
                                     " samples of the window at ", t0, " are zero"));
    return result;
  }
  if (int rc = file.Close(); rc != 0) {
    result.failure = Failure(AudioProblem::kTruncated,
                             absl::StrCat(path, ": sf_close failed: ", sf_error_number(rc)));
  }
  return result;
}

}  // namespace

absl::StatusOr<DecodeResult> DecodeAudioTo(const std::string& path, const DecodeOptions& options,
                                           SampleSink* sink) {
  // An exception (std::bad_alloc above all) must not escape into a decode thread, where it
  // would terminate the process: it becomes this file's problem, classed kMissing (it cannot
  // be read now; not a verdict on the file's contents, so the cache does not keep it).
  try {
    return DecodeAudioUnguarded(path, options, sink);
  } catch (const std::bad_alloc&) {
    DecodeResult result;
    result.failure = Unreadable(absl::StrCat(path, ": out of memory while decoding (std::bad_alloc)"));
    return result;
  } catch (const std::exception& e) {
    DecodeResult result;
    result.failure = Failure(AudioProblem::kMissing, absl::StrCat(path, ": the decode failed: ", e.what()));
    return result;
  }
}

absl::StatusOr<DecodeResult> DecodeAudio(const std::string& path, const DecodeOptions& options) {
  std::vector<float> samples;
  VectorSink sink(&samples);
  AVIARY_ASSIGN_OR_RETURN(DecodeResult result, DecodeAudioTo(path, options, &sink));
  result.audio.samples = std::move(samples);
  return result;
}

absl::StatusOr<DecodeResult> ProbeAudio(const std::string& path, int target_sample_rate) {
  if (target_sample_rate < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("target_sample_rate ", target_sample_rate, ": must be >= 0"));
  }
  DecodeResult result;
  // As DecodeAudioTo: an exception (std::bad_alloc in the open's buffers) is this file's problem
  // now, not one of a decode thread (the loader would fail the epoch without naming the file).
  try {
    SndFile file;
    SF_INFO info;
    OpenAudio(path, target_sample_rate, &file, &info, &result.audio, &result.failure);
  } catch (const std::bad_alloc&) {
    result = DecodeResult();
    result.failure = Unreadable(absl::StrCat(path, ": out of memory while opening (std::bad_alloc)"));
  } catch (const std::exception& e) {
    result = DecodeResult();
    result.failure = Failure(AudioProblem::kMissing, absl::StrCat(path, ": the open failed: ", e.what()));
  }
  return result;
}

absl::StatusOr<std::vector<float>> Resample(const std::vector<float>& in, int from_hz, int to_hz) {
  if (from_hz <= 0 || to_hz <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Resample: rates must be > 0, got ", from_hz, " -> ", to_hz));
  }
  if (from_hz == to_hz) return in;
  const int64_t total = ResampledLength(static_cast<int64_t>(in.size()), from_hz, to_hz);
  AVIARY_ASSIGN_OR_RETURN(std::unique_ptr<Resampler> resampler, Resampler::Create(from_hz, to_hz));
  std::vector<float> result;
  result.reserve(static_cast<size_t>(total));
  std::vector<float> out;
  VectorSink sink(&result);
  Emitter emitter(&sink, 0, total);
  for (size_t pos = 0; pos < in.size() && !emitter.done(); pos += kBlockFrames) {
    size_t n = std::min<size_t>(kBlockFrames, in.size() - pos);
    AVIARY_RETURN_IF_ERROR(resampler->Process(in.data() + pos, n, &out));
    emitter.Emit(out.data(), static_cast<int64_t>(out.size()));
  }
  if (!emitter.done()) {
    AVIARY_RETURN_IF_ERROR(resampler->Flush(&out));
    emitter.Emit(out.data(), static_cast<int64_t>(out.size()));
  }
  // soxr's flushed tail has round(n * to / from) samples for the ratios we tested; pad with
  // zeros should a version emit fewer, so the length contract holds.
  result.resize(static_cast<size_t>(total), 0.0f);
  return result;
}

}  // namespace aviary::worker
