// Logging facade.
//
// This header exposes no spdlog (or fmt) type on purpose: translation units that include torch
// must not see spdlog, because libtorch 2.x bundles an fmt that breaks Debian's spdlog 1.10.
// Format messages with absl::StrCat / absl::StrFormat (or c10::str in torch code) and hand the
// finished string to a Logger.
#ifndef AVIARY_COMMON_LOGGING_H_
#define AVIARY_COMMON_LOGGING_H_

#include <functional>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"

namespace aviary::common {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kOff = 4 };

// Parses "debug", "info", "warning"/"warn", "error", "off".
absl::Status ParseLogLevel(absl::string_view text, LogLevel* level);

// Process-wide settings. The pattern carries the component and the MPI rank (-1 outside MPI).
// Thread-safe.
void SetLogLevel(LogLevel level);
void SetLogRank(int rank);

// A process-wide tap on every message that passes the level (after stderr): the worker group's
// rank 0 ships its lines of a task to the coordinator (aviary logs). `line` is the message with
// its "[component] " prefix; the rank (-1 before SetLogRank) is its own argument. Called on the
// logging thread; a message logged from inside the tap is not tapped again. Pass nullptr to
// remove. Thread-safe.
using LogTap = std::function<void(LogLevel level, int rank, absl::string_view line)>;
void SetLogTap(LogTap tap);
// "debug", "info", "warning", "error", "off".
const char* LogLevelName(LogLevel level);

// A named logger for one component ("catalog", "trainer", ...). Cheap to copy; thread-safe.
// Messages go to stderr so that stdout stays clean for command output.
class Logger {
 public:
  explicit Logger(std::string component);

  void Debug(absl::string_view message) const;
  void Info(absl::string_view message) const;
  void Warn(absl::string_view message) const;
  void Error(absl::string_view message) const;
  void Log(LogLevel level, absl::string_view message) const;
  bool Enabled(LogLevel level) const;

 private:
  std::string component_;
};

}  // namespace aviary::common

#endif  // AVIARY_COMMON_LOGGING_H_
