#!/usr/bin/env bash
# BirdCLEF-scale data (issue 15): a ~140,000-row pretraining pool and a 24,459-row target made
# from synthetic templates with hard-linked audio (bench/scale/make_corpus.py), then
# `aviary dataset folds` against the seed's pandas/scikit-learn code on the same files, and
# `aviary submit` of the full pipeline to a coordinator (time of the first submit and of the
# later ones, which reuse the dataset version's manifests; coordinator memory; SQLite growth),
# and the scheduler load test (bench/status_bench: 64 groups, LeaseTask / GetManifest / status).
# Usage: bench/scale_bench.sh [BUILD_DIR] [scale_bench.py flags: --scale F --repeats N --jobs N
#        --load-jobs N --load-seconds S (0 skips the load test; default 60)
#        --json OUT --keep DIR]   (after scripts/test.sh has built BUILD_DIR, default build/)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift $(( $# > 0 ? 1 : 0 ))
echo "machine: $(nproc) cores, $(uname -srm), $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
/usr/bin/python3 bench/scale/scale_bench.py "$build" "$@"
