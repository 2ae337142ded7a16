// The usage text of `aviary`, written once: the overview (`aviary --help`) is assembled from the
// same per-command entries that `aviary CMD --help` prints.
#ifndef AVIARY_CLIENT_USAGE_H_
#define AVIARY_CLIENT_USAGE_H_

#include <string>

#include "absl/strings/string_view.h"

namespace aviary::cli {

// How a command runs: in this process (gRPC client or a torch-free offline tool), or in the
// sibling `aviary-worker` program, which links libtorch (client/main.cc, RunTool).
enum class CommandKind { kClient, kOffline, kTool };

struct CommandUsage {
  absl::string_view name;
  CommandKind kind;
  // "  name args...\n" lines, then the description indented to column 33.
  absl::string_view text;
};

// Every command, in the order of the overview; nullptr when `name` is not one.
const CommandUsage* FindCommand(absl::string_view name);

// `aviary --help`.
std::string Usage();

// `aviary CMD --help`: "usage: aviary [global flags] CMD ..." with the command's entry.
std::string CommandHelp(const CommandUsage& command);

}  // namespace aviary::cli

#endif  // AVIARY_CLIENT_USAGE_H_
