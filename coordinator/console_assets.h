// The web console's static files (coordinator/console/), compiled into the coordinator by
// cmake/embed_console_assets.cmake so that the console needs no files beside the binary (the
// charts' library, Debian's libjs-dygraphs, is read from /usr/share/javascript).
//
// Immutable; thread-safe.
#ifndef AVIARY_COORDINATOR_CONSOLE_ASSETS_H_
#define AVIARY_COORDINATOR_CONSOLE_ASSETS_H_

#include "absl/strings/string_view.h"

namespace aviary::coordinator {

struct ConsoleAsset {
  absl::string_view name;          // "console.js"
  const char* content_type;        // "text/javascript; charset=utf-8"
  absl::string_view body;
};

// The file called `name`, or nullptr.
const ConsoleAsset* FindConsoleAsset(absl::string_view name);

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_CONSOLE_ASSETS_H_
