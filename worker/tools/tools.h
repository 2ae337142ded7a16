// The `aviary` commands that need libtorch, run by aviary-worker: `aviary mel ...`,
// `aviary predict ...`, `aviary export ...` and `aviary weights ...` exec
// `aviary-worker mel|predict|export|weights ...` with argv[0] "aviary" (client/main.cc),
// so their help reads "aviary mel"; their flags are defined here only. Errors print
// "aviary <command>: <message>" as the client's offline commands do.
#ifndef AVIARY_WORKER_TOOLS_TOOLS_H_
#define AVIARY_WORKER_TOOLS_TOOLS_H_

#include <string>
#include <vector>

#include "common/cli.h"
#include "common/files.h"
#include "common/status.h"

namespace aviary::cli {

using common::ExitCodeFor;  // common/status.h

using common::CheckOutputPath;  // common/files.h

// Registers `mel` on `app` (aviary-worker's): the model input of one clip as .npy. When the
// command line names it, *run is set to the function that runs it.
void AddMelCommand(CLI::App* app, common::CommandRunner* run);

// Registers `predict`: a BirdCLEF submission from one checkpoint or an ensemble.
void AddPredictCommand(CLI::App* app, common::CommandRunner* run);

// Registers `export` (a checkpoint as a state dict or safetensors file with a JSON sidecar) and
// `weights import` (a torchvision/timm EfficientNet checkpoint as model.pretrained_weights).
void AddExportCommands(CLI::App* app, common::CommandRunner* run);

}  // namespace aviary::cli

#endif  // AVIARY_WORKER_TOOLS_TOOLS_H_
