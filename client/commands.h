// Subcommands of the `aviary` binary run in its own process (torch-free; `mel` and `predict`
// run aviary-worker: worker/tools/tools.h). Each takes the arguments after its name and returns the
// process exit code; errors are printed to stderr as "aviary <command>: <message>".
#ifndef AVIARY_CLIENT_COMMANDS_H_
#define AVIARY_CLIENT_COMMANDS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/status.h"

namespace aviary::cli {

using common::ExitCodeFor;  // common/status.h

// aviary synth --out DIR --layout L --species N --recordings M --seed S
int RunSynth(const std::vector<std::string>& args);
// aviary synth-soundscapes --out DIR --species N [--count M] [--seconds S] [--window W] [--seed S]
int RunSynthSoundscapes(const std::vector<std::string>& args);
// aviary dataset folds|train-list|summary ...
int RunDataset(const std::vector<std::string>& args);
// aviary score --solution S.csv --submission P.csv [--json]
int RunScore(const std::vector<std::string>& args);

// aviary prepare --config P.yaml [--stage S] [--threads N] [--shard-mb M] [--set k=v ...]
int RunPrepare(const std::vector<std::string>& args);

// The gRPC client (client/rpc_commands.cc): submit, status, list,
// watch, cancel, history. `global_args` are the flags given before the command
// (--coordinator, --token-file, --tls-ca, --timeout), `args` those after it. Errors print
// "aviary CMD: CODE_NAME: message"; exit 2 for caller errors, 1 otherwise (docs/SERVICE.md).
bool IsClientCommand(const std::string& command);
int RunClient(const std::string& command, const std::vector<std::string>& global_args,
              const std::vector<std::string>& args);

}  // namespace aviary::cli

#endif  // AVIARY_CLIENT_COMMANDS_H_
