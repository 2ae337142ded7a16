// npy_tool: the .npy writer and reader for check_npy.py.
//   npy_tool write OUT.npy D0 [D1 ...]   writes value i = 0.25 * i - 3 at flat index i
//   npy_tool read IN.npy                 prints "shape D0 D1 ...\nsum S\n" (S to 9 digits)
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "worker/tools/npy.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() >= 2 && args[0] == "write") {
    std::vector<int64_t> shape;
    size_t n = 1;
    for (size_t i = 2; i < args.size(); ++i) {
      int64_t d = 0;
      if (!absl::SimpleAtoi(args[i], &d)) {
        std::cerr << "npy_tool: bad dimension '" << args[i] << "'\n";
        return 2;
      }
      shape.push_back(d);
      n *= static_cast<size_t>(d < 0 ? 0 : d);
    }
    std::vector<float> data(n);
    for (size_t i = 0; i < n; ++i) data[i] = 0.25f * static_cast<float>(i) - 3.0f;
    absl::Status st = aviary::worker::WriteNpy(args[1], shape, data);
    if (!st.ok()) {
      std::cerr << "npy_tool: " << st.message() << "\n";
      return 2;
    }
    return 0;
  }
  if (args.size() == 2 && args[0] == "read") {
    auto array = aviary::worker::ReadNpy(args[1]);
    if (!array.ok()) {
      std::cerr << "npy_tool: " << array.status().message() << "\n";
      return 2;
    }
    std::cout << "shape";
    for (int64_t d : array->shape) std::cout << " " << d;
    double sum = 0;
    for (float v : array->data) sum += v;
    std::printf("\nsum %.9g\n", sum);
    return 0;
  }
  std::cerr << "usage: npy_tool write OUT.npy D0 [D1 ...] | npy_tool read IN.npy\n";
  return 2;
}
