#!/usr/bin/env bash
# The CUDA configuration's build and tests, on a machine with or without a GPU: PyPI's torch
# wheel (CUDA libtorch, the version the GPU hosts run) in a virtualenv outside the tree
# (scripts/lib/deps.sh: AVIARY_TORCH_VENV, reused when present), everything else from Debian.
# Builds into build-cuda/ (Release) and runs the unit tests and the training, distributed,
# service and interop tests against it on the CPU, plus the GPU acceptance script's dry run.
# `.ci/run` calls it after scripts/test.sh, whose build/ (Debian's libtorch 1.13) the
# checkpoint interop test resumes against.
#   scripts/test-cuda.sh            that selection
#   scripts/test-cuda.sh -L unit    ctest arguments instead of the default selection
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
aviary_install_packages "${AVIARY_BUILD_PACKAGES[@]}" "${AVIARY_TEST_PACKAGES[@]}" "${AVIARY_CUDA_PACKAGES[@]}"
aviary_torch_venv
aviary_onnxruntime  # ctest integration.onnx_vs_predict runs onnxruntime from this venv
interop=()
if [ -x "${AVIARY_BUILD_DIR:-build}/bin/aviary-worker" ]; then
  interop=(-DAVIARY_INTEROP_BIN_DIR="$(cd "${AVIARY_BUILD_DIR:-build}/bin" && pwd)")
fi
aviary_configure_cuda -DAVIARY_BUILD_TESTS=ON "${interop[@]}"
AVIARY_BUILD_DIR=${AVIARY_CUDA_BUILD_DIR:-build-cuda} aviary_build_targets
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if [ $# -eq 0 ]; then
  # Everything but the parity tests, which compare the same code with Debian's references and
  # ran in scripts/test.sh (the CUDA configuration's own parity is the interop test); the tests
  # labelled torch-free (the coordinator, the store, common/, deploy/), whose programs link no
  # libtorch and are the same in both configurations (lint.torch_free checks it); and, by name,
  # the tests of the client's offline tools and errors, the documented flags, the coordinator's
  # init, and of the service's coordinator and agent side (roles and network namespaces between
  # hosts, the console in a browser, sweeps and the client's commands, normal exits, fencing),
  # whose worker side is the training that service_e2e, service_faults, service_storage and the
  # training tests run here.
  set -- -LE 'parity|torch-free' \
    -E '^integration\.(cli_docs|cli_errors|cli_signals|prepare_cli|coordinator_init|bash_completion|service_roles|service_netns|console_browser|service_experiments|service_lifecycle|service_fencing)$'
fi
# onnxruntime was installed above: the ONNX test fails, not skips, when it cannot import it.
export AVIARY_REQUIRE_ONNX=1
ctest --test-dir "${AVIARY_CUDA_BUILD_DIR:-build-cuda}" --output-on-failure -j 2 --timeout 300 --no-tests=error "$@"
