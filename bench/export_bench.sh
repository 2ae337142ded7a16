#!/usr/bin/env bash
# Exported models in a notebook against `aviary predict` (issue 17): COUNT synthetic 4-minute
# soundscapes (32 kHz ogg, 48 windows of 5 s, 182 classes), small_cnn and efficientnet_b0 with
# random weights (bench/predict_bench_model), `aviary export --format state_dict`, then
# docs/INFERENCE.md's notebook block (bench/notebook_inference.py: /usr/bin/python3, Debian's
# torch 1.13, torchaudio 0.13, torchvision 0.14, soundfile) and `aviary predict --tta 1` with
# THREADS torch threads each, alternating for ROUNDS rounds; the best round of each counts.
# Prints seconds per soundscape of the prediction loop, the wall time, and the largest
# difference between the two submissions.
# Usage: bench/export_bench.sh [BUILD_DIR] [COUNT] [ROUNDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
count=${2:-4}
rounds=${3:-3}
threads=${4:-2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$build/bin/aviary" synth-soundscapes --out "$tmp/sc" --species 182 --count "$count" --seconds 240 --seed 1 > /dev/null
echo "machine: $(nproc) CPU(s), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for model in small_cnn efficientnet_b0; do
  "$build/bench/predict_bench_model" "$model" "$tmp/sc/solution.csv" "$tmp/$model.pt" "$tmp/$model.safetensors" > /dev/null
  "$build/bin/aviary" export "$tmp/$model.pt" --format state_dict --out "$tmp/export_$model.pt"
  best_a=""; best_n=""
  for ((i = 0; i < rounds; i++)); do
    t0=$(date +%s.%N)
    out=$("$build/bin/aviary" predict --checkpoint "$tmp/$model.pt" --audio "$tmp/sc/soundscapes" --out "$tmp/a.csv" \
            --threads "$threads" --tta 1 2>/dev/null)
    t1=$(date +%s.%N)
    a=$(sed -n 's/.*(\([0-9.]*\) s per file.*/\1/p' <<<"$out")
    wa=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
    read -r n wn <<<"$(/usr/bin/python3 bench/notebook_inference.py docs/INFERENCE.md "$tmp/export_$model.pt" \
                        "$tmp/sc/soundscapes" "$tmp/n.csv" "$threads" | tail -1 | sed 's/per_file_s=//; s/wall_s=//')"
    echo "$model round=$i aviary_predict per_file_s=$a wall_s=$wa notebook per_file_s=$n wall_s=$wn"
    if [ -z "$best_a" ] || python3 -c "import sys; sys.exit(0 if $a < $best_a else 1)"; then best_a=$a; wall_a=$wa; fi
    if [ -z "$best_n" ] || python3 -c "import sys; sys.exit(0 if $n < $best_n else 1)"; then best_n=$n; wall_n=$wn; fi
  done
  diff=$(python3 - "$tmp/a.csv" "$tmp/n.csv" <<'PY'
import csv, sys
a = list(csv.reader(open(sys.argv[1])))
b = list(csv.reader(open(sys.argv[2])))
assert a[0] == b[0] and [r[0] for r in a] == [r[0] for r in b], "different headers or row ids"
print(max(abs(float(x) - float(y)) for ra, rb in zip(a[1:], b[1:]) for x, y in zip(ra[1:], rb[1:])))
PY
)
  echo "$model best: aviary predict $best_a s/soundscape (wall $wall_a s for $count files), notebook $best_n s/soundscape (wall $wall_n s), max |difference| $diff"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
