// The `aviary` commands that need libtorch, run by aviary-worker: `aviary mel ...` and
// `aviary predict ...` exec `aviary-worker mel|predict ...` (client/main.cc). Their usage text
// is the client's (client/usage.cc); errors print "aviary <command>: <message>" as the client's
// offline commands do. Each takes the arguments after its name and returns the exit code.
#ifndef AVIARY_WORKER_TOOLS_TOOLS_H_
#define AVIARY_WORKER_TOOLS_TOOLS_H_

#include <string>
#include <vector>

#include "common/status.h"

namespace aviary::cli {

using common::ExitCodeFor;  // common/status.h

// aviary mel --config P.yaml --audio F [--offset S] --out x.npy [--set k=v ...]
int RunMel(const std::vector<std::string>& args);

// aviary predict --checkpoint RUN/best.pt [--checkpoint ...] --audio DIR_OR_FILE --out sub.csv
//                [--window S] [--batch N] [--tta N] [--smooth w,...] [--threads N]
//                [--decode-threads N] [--device auto|cpu|cuda]
//                [--memory-format channels_last|contiguous]
int RunPredict(const std::vector<std::string>& args);

}  // namespace aviary::cli

#endif  // AVIARY_WORKER_TOOLS_TOOLS_H_
