#!/usr/bin/env bash
# Folds + resampling on a 150,000-row long-tailed pool: aviary vs the notebook's pandas/sklearn
# code, same labels, same machine, same invocation. Usage: bench/folds_bench.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
/usr/bin/python3 bench/folds_reference.py --make 150000 1200 "$tmp/labels.csv"
ours=$("$build/bench/folds_bench" "$tmp/labels.csv" 5)
ref=$(/usr/bin/python3 bench/folds_reference.py "$tmp/labels.csv" 3)
echo "aviary:    $ours"
echo "reference: $ref"
a=$(sed -n 's/.*aviary_ms=\([0-9.e+-]*\).*/\1/p' <<<"$ours")
r=$(sed -n 's/.*reference_ms=\([0-9.e+-]*\).*/\1/p' <<<"$ref")
python3 -c "print(f'speedup (reference / aviary): {float($r)/float($a):.1f}x')"
