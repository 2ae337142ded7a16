#!/usr/bin/env bash
# Does the loader keep up with a tiny model's training step on this machine? Writes a synthetic
# 12-species corpus, prepares its cache, and runs loader_bench (small CNN, 5 s clips, batch 16,
# 1 loader thread + 1 torch thread: the two cores). The corpus has no broken files (--no-broken):
# the synthetic-input step substitutes no clip, so the loader's rates must not time substitutions
# either. Usage: bench/loader_bench.sh [BUILD_DIR] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
steps=${2:-40}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$build/bin/aviary" synth --out "$tmp/t" --layout 2024 --species 12 --recordings 240 --seed 3 --max-seconds 12 --no-broken >/dev/null
cat > "$tmp/p.yaml" <<YAML
data: {duration: 5.0, target: {layout: "2024", root: $tmp/t}, pretrain_sources: [], cache_dir: $tmp/cache}
folds: {finetune_splits: 4}
sampling: {upsample_thr: 10}
model: {name: small_cnn}
train: {batch_size: 16, num_workers: 1}
stages: {pretrain: {enabled: false}}
YAML
"$build/bin/aviary" prepare --config "$tmp/p.yaml" >/dev/null 2>&1
OMP_NUM_THREADS=1 "$build/bench/loader_bench" "$tmp/p.yaml" "$steps" 2>/dev/null
