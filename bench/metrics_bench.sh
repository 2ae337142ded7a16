#!/usr/bin/env bash
# Evaluation metrics on a 100,000 x 180 validation matrix: aviary's ComputeEvalMetrics vs
# scikit-learn on the same truth and float32 scores, same machine, same invocation, best of 3 runs
# on each side.
# Usage: bench/metrics_bench.sh [BUILD_DIR] [ROWS] [CLASSES]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
rows=${2:-100000}
classes=${3:-180}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ours=$("$build/bench/metrics_bench" "$rows" "$classes" float "$tmp/m")
ref=$(/usr/bin/python3 bench/metrics_reference.py "$tmp/m" "$rows" "$classes" float)
echo "aviary:    $ours"
echo "reference: $ref"
a=$(sed -n 's/.*aviary_ms=\([0-9.e+-]*\).*/\1/p' <<<"$ours")
r=$(sed -n 's/.*reference_ms=\([0-9.e+-]*\).*/\1/p' <<<"$ref")
python3 -c "print(f'speedup (reference / aviary): {float($r)/float($a):.1f}x')"
