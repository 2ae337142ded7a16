// The torch headers that aviary_worker's translation units and the tests and tools built on it
// share, precompiled once per build (CMake target_precompile_headers; AVIARY_PCH=OFF turns it
// off). Parsing them is most of each torch translation unit's compile time. Never add a header
// of spdlog here (DESIGN.md, "Known traps"); torch-free sources skip this header.
#include <ATen/ATen.h>
#include <torch/nn.h>
#include <torch/optim/adam.h>
#include <torch/serialize.h>
