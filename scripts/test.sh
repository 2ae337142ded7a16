#!/usr/bin/env bash
# Installs what is missing, builds aviary and runs every test (ctest). `.ci/run` calls this.
#   scripts/test.sh            all tests
#   scripts/test.sh -L unit    ctest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
aviary_install_packages "${AVIARY_BUILD_PACKAGES[@]}" "${AVIARY_TEST_PACKAGES[@]}"
aviary_configure -DAVIARY_BUILD_TESTS=ON
aviary_build_targets
# mpirun refuses root unless told; CI runs as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# --timeout: the tests without a TIMEOUT of their own (the gtest cases, ~30 s at most) are killed
# at 5 minutes rather than hanging CI; --no-tests=error: a -R or -L that matches nothing fails.
ctest --test-dir "${AVIARY_BUILD_DIR:-build}" --output-on-failure -j 2 --timeout 300 --no-tests=error "$@"
