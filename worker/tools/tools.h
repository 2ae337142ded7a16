// The `aviary` commands that need libtorch, run by aviary-worker: `aviary mel ...`,
// `aviary predict ...`, `aviary export ...` and `aviary weights ...` exec
// `aviary-worker mel|predict|export|weights ...` with argv[0] "aviary" (client/main.cc),
// so their help reads "aviary mel"; their flags are defined here only. Errors print
// "aviary <command>: <message>" as the client's offline commands do.
#ifndef AVIARY_WORKER_TOOLS_TOOLS_H_
#define AVIARY_WORKER_TOOLS_TOOLS_H_

#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/cli.h"
#include "common/status.h"

namespace aviary::cli {

using common::ExitCodeFor;  // common/status.h

// An output file's path must name a file in an existing folder: checked before any work and
// said with the flag (INVALID_ARGUMENT, exit 2), where the atomic write would fail later naming
// its temporary file (exit 1). As the client's dataset commands check theirs.
inline absl::Status CheckOutputPath(const std::string& flag, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": is a directory, expected a file path"));
  }
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty() && !fs::is_directory(parent, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, ": the folder ", parent.string(), " does not exist"));
  }
  return absl::OkStatus();
}

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
