// Small helpers shared by the YAML readers (common/config.cc, coordinator/coordinator_config.cc).
// Include only from translation units that already use yaml-cpp.
#ifndef AVIARY_COMMON_YAML_UTIL_H_
#define AVIARY_COMMON_YAML_UTIL_H_

#include <string>

#include "yaml-cpp/yaml.h"

namespace aviary::common {

// How a YAML node reads in an error message: "'abc'" for a scalar, else its kind ("a list").
std::string DescribeYamlNode(const YAML::Node& node);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_YAML_UTIL_H_
