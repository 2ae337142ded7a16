// `aviary-coordinator`: the job scheduler service (docs/SERVICE.md).
//
// Exit codes: 0 after a clean shutdown (SIGTERM / SIGINT), 2 for config errors (before it
// listens), 1 otherwise.
#include <signal.h>

#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/flags.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/version.h"
#include "coordinator/init.h"
#include "coordinator/coordinator_config.h"
#include "coordinator/service.h"

namespace {

constexpr char kUsage[] =
    "usage: aviary-coordinator [--config configs/coordinator.yaml] [--set key=value ...]\n"
    "         [--listen HOST:PORT] [--port-file F] [--metrics-listen HOST:PORT]\n"
    "         [--metrics-port-file F] [--database F] [--work-dir D] [--token-file F]\n"
    "         [--heartbeat-timeout-s S] [--max-restarts N] [--log-level L]\n"
    "       aviary-coordinator init DIR\n"
    "       aviary-coordinator --version\n"
    "Serves JobService and WorkerService over gRPC and /metrics for Prometheus.\n"
    "Flags override the config's keys; SIGTERM / SIGINT shut it down cleanly.\n"
    "init DIR: a state folder for a first run: DIR/token (a new random bearer token, mode\n"
    "600), DIR/coordinator.yaml (database, work_dir and token_file in DIR) and DIR/runs/;\n"
    "then: aviary-coordinator --config DIR/coordinator.yaml. Never overwrites.\n";

// `aviary-coordinator init DIR`.
int RunInit(const std::vector<std::string>& args) {
  if (args.size() != 1 || args[0].empty() || args[0][0] == '-') {
    std::cerr << "aviary-coordinator init: expected one folder (aviary-coordinator init DIR)\n";
    return 2;
  }
  auto result = aviary::coordinator::InitStateDir(args[0]);
  if (!result.ok()) {
    std::cerr << "aviary-coordinator " << result.status().message() << "\n";
    return aviary::common::ExitCodeFor(result.status());
  }
  std::cout << "wrote " << result->token_path << " (a new bearer token, mode 600)\n"
            << "wrote " << result->config_path << " (database, work_dir and token_file in that folder)\n"
            << "start:   aviary-coordinator --config " << result->config_path << "\n"
            << "clients: export AVIARY_TOKEN_FILE=" << result->token_path << "\n";
  return 0;
}

int Fail(const std::string& what, const absl::Status& status, int code) {
  std::cerr << "aviary-coordinator: " << what << ": " << status.message() << "\n";
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  using aviary::coordinator::ConfigOverride;
  std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && args[0] == "--version") {
    std::cout << "aviary-coordinator " << aviary::common::Version() << " (git " << aviary::common::GitCommit()
              << "); no libtorch\n";
    return 0;
  }
  if (!args.empty() && args[0] == "init" && !aviary::common::HelpRequested(args)) {
    return RunInit(std::vector<std::string>(args.begin() + 1, args.end()));
  }
  for (const std::string& arg : args) {
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      return 0;
    }
  }
  std::set<std::string> value_flags{"config"};
  for (const auto& [flag, key] : aviary::coordinator::CoordinatorFlagKeys()) value_flags.insert(flag);
  aviary::common::Flags flags(value_flags, {});
  absl::Status parsed = flags.Parse(args);
  if (!parsed.ok()) {
    std::cerr << "aviary-coordinator: " << parsed.message() << "\n\n" << kUsage;
    return 2;
  }
  if (!flags.positional().empty()) {
    std::cerr << "aviary-coordinator: unexpected argument '" << flags.positional().front()
              << "'\n\n" << kUsage;
    return 2;
  }
  std::vector<ConfigOverride> overrides;
  for (const std::string& text : flags.GetRepeated("set")) {
    auto override_value = aviary::coordinator::ParseSetOverride(text);
    if (!override_value.ok()) return Fail("config", override_value.status(), 2);
    overrides.push_back(*override_value);
  }
  for (const auto& [flag, key] : aviary::coordinator::CoordinatorFlagKeys()) {
    if (auto value = flags.Get(flag)) {
      overrides.push_back({key, *value, absl::StrCat("--", flag, " ", *value)});
    }
  }
  auto config = aviary::coordinator::LoadCoordinatorConfig(flags.Get("config").value_or(""), overrides);
  if (!config.ok()) return Fail("config", config.status(), 2);
  aviary::common::LogLevel level = aviary::common::LogLevel::kInfo;
  (void)aviary::common::ParseLogLevel(config->log_level, &level);  // validated already
  aviary::common::SetLogLevel(level);
  auto secrets = aviary::coordinator::LoadCoordinatorSecrets(*config);
  if (!secrets.ok()) return Fail("config", secrets.status(), 2);

  // Block the shutdown signals in every thread (gRPC's and ours inherit the mask) and wait for
  // them here.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  aviary::common::Logger log("coordinator");
  auto coordinator = aviary::coordinator::Coordinator::Start(*config, *secrets);
  if (!coordinator.ok()) return Fail("cannot start", coordinator.status(), 1);

  int signal_number = 0;
  if (sigwait(&signals, &signal_number) != 0) {
    log.Error("sigwait failed; shutting down");
  } else {
    log.Info(absl::StrCat("received ", signal_number == SIGTERM ? "SIGTERM" : "SIGINT",
                          "; shutting down"));
  }
  absl::Status closed = (*coordinator)->Shutdown();
  coordinator->reset();
  if (!closed.ok()) return Fail("shutdown", closed, 1);
  log.Info("stopped");
  return 0;
}
