// The commands of the `aviary` program. Each Add*Command registers its subcommand on the
// program's CLI11 app (client/main.cc) with its flags and help; when the command line names it,
// its callback stores in *run the function that runs it and returns the exit code. Errors are
// printed to stderr as "aviary <command>: <message>". All run in this process, torch-free;
// `mel` and `predict` run the aviary-worker program (client/main.cc, worker/tools/tools.h).
#ifndef AVIARY_CLIENT_COMMANDS_H_
#define AVIARY_CLIENT_COMMANDS_H_

#include <optional>
#include <string>
#include <vector>

#include "common/cli.h"
#include "common/status.h"

namespace aviary::cli {

using common::ExitCodeFor;  // common/status.h

using Runner = common::CommandRunner;

// The overview's groups (`aviary --help`).
inline constexpr char kClientGroup[] = "Client commands";
inline constexpr char kOfflineGroup[] = "Offline commands";
inline constexpr char kToolGroup[] = "Offline commands that need libtorch (run by aviary-worker)";
inline constexpr char kClientFooter[] =
    "Global flags, before the command: --coordinator H:P (else $AVIARY_COORDINATOR, else "
    "127.0.0.1:7070), --token-file F (else $AVIARY_TOKEN_FILE, else $AVIARY_TOKEN), --tls-ca F "
    "(else $AVIARY_TLS_CA), --timeout S (seconds per call, default 30).";

// The client's global flags (before the command); unset when not given.
struct GlobalOptions {
  std::optional<std::string> coordinator;
  std::optional<std::string> token_file;
  std::optional<std::string> tls_ca;
  std::optional<double> timeout_s;
};

// The flags of the gRPC commands (each uses its own).
struct ClientArgs {
  std::string target;  // submit: the pipeline YAML; status, watch, cancel, history: the job id
  std::vector<std::string> overrides;  // submit --set
  std::string name;                    // submit --name
  bool json = false;                   // status --json
  int limit = 0;                       // list --limit
  std::string plot;                    // history --plot
  bool csv = false;                    // history --csv
  double older_than_days = -1;         // prune --older-than (< 0: the coordinator's retention_days)
  bool dry_run = false;                // prune --dry-run
  std::vector<std::string> tags;       // submit --tag
  std::string note;                    // submit --note
  std::vector<std::string> sweeps;     // submit --sweep key=[v1,...]
  std::string task;                    // logs --task
  std::vector<std::string> tasks;      // history --task (repeatable)
  bool follow = false;                 // logs --follow
  int tail = 0;                        // logs --tail
  bool with_run_folders = false;       // delete --with-run-folders
};

// The gRPC client (client/rpc_commands.cc): submit, status, list, watch, cancel, history, logs,
// groups, retry, delete. A
// failed call prints "aviary CMD: CODE_NAME: message"; exit 2 for caller errors, 1 otherwise
// (docs/SERVICE.md).
void AddClientCommands(CLI::App* app, const GlobalOptions* global, Runner* run);

// aviary synth, aviary synth-soundscapes (client/synth_command.cc).
void AddSynthCommands(CLI::App* app, Runner* run);
// aviary dataset folds|train-list|summary (client/dataset_commands.cc).
void AddDatasetCommand(CLI::App* app, Runner* run);
// aviary score (client/score_command.cc).
void AddScoreCommand(CLI::App* app, Runner* run);
// aviary prepare (client/prepare_command.cc).
void AddPrepareCommand(CLI::App* app, Runner* run);

}  // namespace aviary::cli

#endif  // AVIARY_CLIENT_COMMANDS_H_
