// `aviary-coordinator`: the job scheduler service (docs/SERVICE.md).
//
// Exit codes: 0 after a clean shutdown (SIGTERM / SIGINT), 2 for config errors (before it
// listens), 1 otherwise, including a data root that does not exist or cannot be reached at
// start (a shared filesystem not mounted yet: waiting may fix it, so systemd's unit, which
// does not restart after exit 2, tries again). SIGHUP re-reads the token files
// (Coordinator::ReloadTokens).
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <optional>
#include <utility>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/cli.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/version.h"
#include "coordinator/init.h"
#include "coordinator/coordinator_config.h"
#include "coordinator/service.h"

namespace {

constexpr char kDescription[] =
    "aviary-coordinator: serves JobService and WorkerService over gRPC, /metrics for Prometheus and\n"
    "(with --console-listen) the web console.\n"
    "Flags override the config's keys; SIGTERM / SIGINT shut it down cleanly; SIGHUP re-reads the\n"
    "token files (token_file, viewer_token_file, worker_token_file).";

// The value shown for each key flag in --help.
const char* FlagTypeName(const std::string& flag) {
  if (flag == "listen" || flag == "metrics-listen" || flag == "console-listen") return "HOST:PORT";
  if (flag == "work-dir") return "D";
  if (flag == "heartbeat-timeout-s") return "S";
  if (flag == "max-restarts") return "N";
  if (flag == "log-level") return "L";
  return "F";
}

// `aviary-coordinator init DIR`.
int RunInit(const std::string& dir, const std::vector<std::string>& data_roots) {
  auto result = aviary::coordinator::InitStateDir(dir, data_roots);
  if (!result.ok()) {
    std::cerr << "aviary-coordinator " << result.status().message() << "\n";
    return aviary::common::ExitCodeFor(result.status());
  }
  std::cout << "wrote " << result->token_path << " (client token, mode 600: for `aviary` users who submit and cancel)\n"
            << "wrote " << result->viewer_token_path
            << " (viewer token, mode 600: status, list, watch, history, groups, logs only)\n"
            << "wrote " << result->worker_token_path
            << " (worker token, mode 600: only for the hosts that run `aviary-worker serve`)\n"
            << "wrote " << result->config_path
            << " (database, work_dir, token_file, viewer_token_file and worker_token_file in that folder)\n"
            << "start:   aviary-coordinator --config " << result->config_path << "\n"
            << "clients: export AVIARY_TOKEN_FILE=" << result->token_path << "\n"
            << "viewers: export AVIARY_TOKEN_FILE=" << result->viewer_token_path << "\n"
            << "groups:  aviary-worker serve --token-file " << result->worker_token_path << " ...\n";
  return 0;
}

int Fail(const std::string& what, const absl::Status& status, int code) {
  std::cerr << "aviary-coordinator: " << what << ": " << status.message() << "\n";
  return code;
}

}  // namespace

int main(int argc, char** argv) {
#ifdef __GLIBC__
  // Two malloc arenas instead of one per core: a submit reads the whole dataset (hundreds of MB)
  // on whichever gRPC thread serves it, and with an arena per thread the freed memory stays
  // spread over many arenas (90 MiB after 12 BirdCLEF-sized submits; 57 after 30 with two;
  // docs/BENCHMARKS.md). An environment MALLOC_ARENA_MAX still wins.
  if (std::getenv("MALLOC_ARENA_MAX") == nullptr) ::mallopt(M_ARENA_MAX, 2);
#endif
  using aviary::coordinator::ConfigOverride;
  std::vector<std::string> args(argv + 1, argv + argc);
  CLI::App app(kDescription, "aviary-coordinator");
  aviary::common::ConfigureApp(&app);
  app.require_subcommand(0, 1);
  std::string config_path;
  std::vector<std::string> sets;
  bool version = false;
  app.add_option("--config", config_path, "the coordinator's YAML (configs/coordinator.yaml)")->type_name("F");
  aviary::common::AddSetOption(&app, &sets, "override a key of the config (repeatable)");
  std::vector<std::pair<std::string, CLI::Option*>> key_flags;  // key, its flag
  std::vector<std::string> values(aviary::coordinator::CoordinatorFlagKeys().size());
  for (size_t i = 0; i < values.size(); ++i) {
    const auto& [flag, key] = aviary::coordinator::CoordinatorFlagKeys()[i];
    key_flags.emplace_back(key, app.add_option("--" + flag, values[i], "the config key " + key)
                                    ->type_name(FlagTypeName(flag)));
  }
  app.add_flag("--version", version, "the version and git commit");
  std::string init_dir;
  CLI::App* init = aviary::common::AddCommand(
      &app, "init", "write a state folder for a first run",
      "DIR/token, DIR/viewer.token and DIR/worker.token (new random bearer tokens for clients, viewers "
      "and worker groups, mode 600), DIR/coordinator.yaml (database, work_dir and the three token files "
      "in DIR, data_roots from --data-root) and DIR/runs/; then: aviary-coordinator --config "
      "DIR/coordinator.yaml. Never overwrites.");
  init->add_option("DIR", init_dir, "the state folder")->type_name("")->required();
  std::vector<std::string> init_data_roots;
  aviary::common::AddRepeatedOption(
      init, "--data-root", &init_data_roots, "D",
      "a folder jobs may read data from and write caches to, written into the config's data_roots "
      "(repeatable; none: every job is refused until data_roots is set)");
  if (std::optional<int> code = aviary::common::ParseCommandLine(&app, args)) return *code;
  if (version) {
    std::cout << "aviary-coordinator " << aviary::common::Version() << " (git " << aviary::common::GitCommit()
              << "); no libtorch\n";
    return 0;
  }
  if (init->parsed()) {
    // The server's flags mean nothing to init, which writes its own DIR/coordinator.yaml: refuse
    // them rather than drop them silently (`aviary-coordinator --database D init DIR`).
    std::vector<const CLI::Option*> server_flags{app.get_option("--config"), app.get_option("--set")};
    for (const auto& [key, option] : key_flags) server_flags.push_back(option);
    for (const CLI::Option* option : server_flags) {
      if (option->count() > 0) {
        std::cerr << "aviary-coordinator init: " << option->get_name()
                  << " is a flag of the coordinator itself, not of init (init writes DIR/coordinator.yaml: "
                     "edit that file, or give the flag when starting: aviary-coordinator --config "
                     "DIR/coordinator.yaml "
                  << option->get_name() << " ...)\n";
        return 2;
      }
    }
    return RunInit(init_dir, init_data_roots);
  }
  std::vector<ConfigOverride> overrides;
  for (const std::string& text : sets) {
    auto override_value = aviary::coordinator::ParseSetOverride(text);
    if (!override_value.ok()) return Fail("config", override_value.status(), 2);
    overrides.push_back(*override_value);
  }
  // A flag and a `--set` of its key: refused, whatever their order (the flag won, silently).
  for (size_t i = 0; i < key_flags.size(); ++i) {
    const auto& [key, option] = key_flags[i];
    if (option->count() == 0) continue;
    for (const ConfigOverride& set : overrides) {
      if (set.key == key) {
        return Fail("config",
                    absl::InvalidArgumentError(absl::StrCat(option->get_name(), " and ", set.label, " both set key '",
                                                            key, "': give one")),
                    2);
      }
    }
  }
  for (size_t i = 0; i < key_flags.size(); ++i) {
    const auto& [key, option] = key_flags[i];
    if (option->count() > 0) {
      overrides.push_back({key, values[i], absl::StrCat(option->get_name(), " ", values[i])});
    }
  }
  // An empty --config (an unset variable) read as "no file": the defaults' errors hid it.
  if (app.get_option("--config")->count() > 0 && config_path.empty()) {
    return Fail("config", absl::InvalidArgumentError("--config is empty (leave the flag out for the built-in defaults)"),
                2);
  }
  // SIGHUP (a `systemctl reload` just after the start) ends a process that has not blocked it,
  // and systemd restarts no process a SIGHUP ended: blocked from here on; one that arrives before
  // the start is done waits, and reloads the tokens once the coordinator serves.
  sigset_t hangup;
  sigemptyset(&hangup);
  sigaddset(&hangup, SIGHUP);
  if (int err = pthread_sigmask(SIG_BLOCK, &hangup, nullptr); err != 0) {
    return Fail("cannot start", absl::InternalError(absl::StrCat("pthread_sigmask: error ", err)), 1);
  }
  auto config = aviary::coordinator::LoadCoordinatorConfig(config_path, overrides);
  if (absl::IsUnavailable(config.status())) {
    // A data root not there now (LoadCoordinatorConfig says it only when nothing else in the
    // config is wrong): exit 1, which systemd's unit restarts (not 2, which it does not: a config
    // error), once the secrets read too (a missing token file must not wait for a mount).
    std::vector<aviary::coordinator::ConfigOverride> without_roots = overrides;
    without_roots.push_back({"data_roots", "", "(data_roots left out to check the rest)"});
    auto rest = aviary::coordinator::LoadCoordinatorConfig(config_path, without_roots);
    if (!rest.ok()) return Fail("config", rest.status(), 2);
    if (auto secrets = aviary::coordinator::LoadCoordinatorSecrets(*rest); !secrets.ok()) {
      return Fail("config", secrets.status(), 2);
    }
    return Fail("config",
                absl::UnavailableError(absl::StrCat(config.status().message(),
                                                    "; exit 1, not 2: a data root that is not there may be on a shared "
                                                    "filesystem not mounted yet, which a restart waits for")),
                1);
  }
  if (!config.ok()) return Fail("config", config.status(), 2);
  aviary::common::LogLevel level = aviary::common::LogLevel::kInfo;
  (void)aviary::common::ParseLogLevel(config->log_level, &level);  // validated already
  aviary::common::SetLogLevel(level);
  auto secrets = aviary::coordinator::LoadCoordinatorSecrets(*config);
  if (!secrets.ok()) return Fail("config", secrets.status(), 2);

  // Block the shutdown and reload signals in every thread (gRPC's and ours inherit the mask) and
  // wait for them here: no work happens in a signal handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  sigaddset(&signals, SIGUSR1);  // the store broke (below)
  if (int err = pthread_sigmask(SIG_BLOCK, &signals, nullptr); err != 0) {
    return Fail("cannot start", absl::InternalError(absl::StrCat("pthread_sigmask: error ", err)), 1);
  }

  aviary::common::Logger log("coordinator");
  auto coordinator = aviary::coordinator::Coordinator::Start(*config, *secrets);
  // A database that is not aviary's or not writable (its folder's permissions too), a folder
  // named as the database, a database's or a port file's missing folder: the user's to fix, exit 2 (systemd does not restart it in vain). An
  // address or database in use, or an internal error: exit 1, which a restart may outlive.
  // A damaged database file (DATA_LOSS: a page that does not read) is the user's to restore
  // from a backup: exit 2 too (a restart reads the same page).
  if (!coordinator.ok()) {
    return Fail("cannot start", coordinator.status(),
                absl::IsDataLoss(coordinator.status()) ? 2 : aviary::common::ExitCodeFor(coordinator.status()));
  }

  // A database that can take no more writes (a COMMIT failed in its I/O): every write RPC fails
  // from then on, while heartbeats (no writes) keep the groups and their tasks. The process exits
  // 1, which the service manager restarts; the restart reads the file back, or says what is wrong.
  static absl::Mutex broken_mu;
  static absl::Status* broken = new absl::Status();
  (*coordinator)->OnStoreBroken([](const absl::Status& why) {
    {
      absl::MutexLock lock(&broken_mu);
      *broken = why;
    }
    ::kill(::getpid(), SIGUSR1);
  });
  int exit_code = 0;
  while (true) {
    int signal_number = 0;
    if (int err = sigwait(&signals, &signal_number); err != 0) {
      log.Error(absl::StrCat("sigwait failed (error ", err, "); shutting down"));
      break;
    }
    if (signal_number == SIGUSR1) {
      absl::MutexLock lock(&broken_mu);
      if (broken->ok()) continue;  // not ours
      log.Error(absl::StrCat(broken->message(), "; shutting down: exit 1, for the service manager to restart it"));
      exit_code = 1;
      break;
    }
    if (signal_number == SIGHUP) {
      log.Info("received SIGHUP; reloading the token files");
      (void)(*coordinator)->ReloadTokens();  // logs the outcome; an error keeps the current tokens
      continue;
    }
    log.Info(absl::StrCat("received ", signal_number == SIGTERM ? "SIGTERM" : "SIGINT", "; shutting down"));
    break;
  }
  absl::Status closed = (*coordinator)->Shutdown();
  coordinator->reset();
  if (!closed.ok()) return Fail("shutdown", closed, 1);
  log.Info("stopped");
  return exit_code;
}
