#include "common/logging.h"

#include <atomic>
#include <mutex>
#include <string_view>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace aviary::common {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<int> g_rank{-1};
std::mutex g_tap_mu;
std::shared_ptr<const LogTap> g_tap;  // guarded by g_tap_mu
std::atomic<bool> g_has_tap{false};
thread_local bool t_in_tap = false;

spdlog::logger& Sink() {
  static std::shared_ptr<spdlog::logger> logger = [] {
    auto l = spdlog::stderr_color_mt("aviary");
    l->set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
    l->set_level(spdlog::level::trace);
    l->flush_on(spdlog::level::warn);
    return l;
  }();
  return *logger;
}

spdlog::level::level_enum ToSpd(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return spdlog::level::debug;
    case LogLevel::kInfo: return spdlog::level::info;
    case LogLevel::kWarning: return spdlog::level::warn;
    case LogLevel::kError: return spdlog::level::err;
    case LogLevel::kOff: return spdlog::level::off;
  }
  return spdlog::level::info;
}

}  // namespace

absl::Status ParseLogLevel(absl::string_view text, LogLevel* level) {
  std::string t = absl::AsciiStrToLower(text);
  if (t == "debug") *level = LogLevel::kDebug;
  else if (t == "info") *level = LogLevel::kInfo;
  else if (t == "warning" || t == "warn") *level = LogLevel::kWarning;
  else if (t == "error") *level = LogLevel::kError;
  else if (t == "off") *level = LogLevel::kOff;
  else
    return absl::InvalidArgumentError(
        absl::StrCat("unknown log level '", text, "' (expected debug, info, warning, error, off)"));
  return absl::OkStatus();
}

void SetLogTap(LogTap tap) {
  std::lock_guard<std::mutex> lock(g_tap_mu);
  g_tap = tap ? std::make_shared<const LogTap>(std::move(tap)) : nullptr;
  g_has_tap.store(g_tap != nullptr);
}

const char* LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
    case LogLevel::kOff: return "off";
  }
  return "info";
}

void SetLogLevel(LogLevel level) { g_level.store(static_cast<int>(level)); }
void SetLogRank(int rank) { g_rank.store(rank); }

Logger::Logger(std::string component) : component_(std::move(component)) {}

bool Logger::Enabled(LogLevel level) const {
  return level != LogLevel::kOff && static_cast<int>(level) >= g_level.load();
}

void Logger::Log(LogLevel level, absl::string_view message) const {
  if (!Enabled(level)) return;
  int rank = g_rank.load();
  std::string prefix = rank >= 0 ? absl::StrCat("[", component_, "] [rank ", rank, "] ")
                                 : absl::StrCat("[", component_, "] ");
  Sink().log(ToSpd(level), "{}{}", prefix, std::string_view(message.data(), message.size()));
  if (g_has_tap.load() && !t_in_tap) {
    std::shared_ptr<const LogTap> tap;
    {
      std::lock_guard<std::mutex> lock(g_tap_mu);
      tap = g_tap;
    }
    if (tap) {
      t_in_tap = true;
      // The rank goes as its own argument (a LogLine's rank field, which `aviary logs` shows):
      // not again in the text.
      (*tap)(level, rank, absl::StrCat("[", component_, "] ", message));
      t_in_tap = false;
    }
  }
}

void Logger::Debug(absl::string_view message) const { Log(LogLevel::kDebug, message); }
void Logger::Info(absl::string_view message) const { Log(LogLevel::kInfo, message); }
void Logger::Warn(absl::string_view message) const { Log(LogLevel::kWarning, message); }
void Logger::Error(absl::string_view message) const { Log(LogLevel::kError, message); }

}  // namespace aviary::common
