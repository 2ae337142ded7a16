// The version of this build and the git commit it was built from (cmake/version.cmake writes
// the definitions at build time; target aviary_version). `--version` of the three programs.
#ifndef AVIARY_COMMON_VERSION_H_
#define AVIARY_COMMON_VERSION_H_

namespace aviary::common {

const char* Version();    // the project's version, e.g. "0.1.0"
const char* GitCommit();  // e.g. "2dde31d0a1b2", "2dde31d0a1b2-dirty" or "unknown"

}  // namespace aviary::common

#endif  // AVIARY_COMMON_VERSION_H_
