// For tests/parity/check_tensor_index.py: the torch-free reader and rule of common/ on files that
// Python's torch wrote.
//   tensor_index_tool index FILE                   one line per tensor: name dtype d0,d1,...
//   tensor_index_tool fit FILE MODEL IN_CHANNELS   "fits: <summary>" (exit 0) or the error (exit 1)
#include <iostream>
#include <string>

#include "absl/strings/str_join.h"
#include "common/backbone_fit.h"
#include "common/tensor_index.h"

int main(int argc, char** argv) {
  using namespace aviary::common;  // NOLINT: a test tool
  const std::string mode = argc > 2 ? argv[1] : "";
  if (mode == "index" && argc == 3) {
    auto index = ReadTensorIndex(argv[2]);
    if (!index.ok()) {
      std::cout << index.status().message() << "\n";
      return 1;
    }
    for (const TensorEntry& e : *index) std::cout << e.name << " " << e.dtype << " " << absl::StrJoin(e.shape, ",") << "\n";
    return 0;
  }
  if (mode == "fit" && argc == 5) {
    const absl::Status fit = CheckWeightsFile(argv[2], argv[3], std::stoi(argv[4]));
    std::cout << (fit.ok() ? "fits" : std::string(fit.message())) << "\n";
    return fit.ok() ? 0 : 1;
  }
  std::cerr << "usage: tensor_index_tool index FILE | fit FILE MODEL IN_CHANNELS\n";
  return 2;
}
