// Subcommands of the `aviary` binary. Each takes the arguments after its name and returns the
// process exit code; errors are printed to stderr as "aviary <command>: <message>".
#ifndef AVIARY_COORDINATOR_CLI_COMMANDS_H_
#define AVIARY_COORDINATOR_CLI_COMMANDS_H_

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

// aviary mel --config P.yaml --audio F [--offset S] --out x.npy [--set k=v ...]
// (coordinator/cli/mel_command.cc; links aviary::worker, i.e. torch and the decoder)
int RunMel(const std::vector<std::string>& args);

// aviary prepare --config P.yaml [--stage S] [--threads N] [--shard-mb M] [--set k=v ...]
int RunPrepare(const std::vector<std::string>& args);

// aviary predict --checkpoint RUN/best.pt [--checkpoint ...] --audio DIR_OR_FILE --out sub.csv
//                [--window S] [--batch N] [--tta N] [--smooth w,...] [--threads N]
//                [--decode-threads N] [--device auto|cpu|cuda]
int RunPredict(const std::vector<std::string>& args);

// The gRPC client (coordinator/cli/client_commands.cc; torch-free): submit, status, list,
// watch, cancel, history. `global_args` are the flags given before the command
// (--coordinator, --token-file, --tls-ca, --timeout), `args` those after it. Errors print
// "aviary CMD: CODE_NAME: message"; exit 2 for caller errors, 1 otherwise (docs/SERVICE.md).
bool IsClientCommand(const std::string& command);
int RunClient(const std::string& command, const std::vector<std::string>& global_args,
              const std::vector<std::string>& args);

}  // namespace aviary::cli

#endif  // AVIARY_COORDINATOR_CLI_COMMANDS_H_
