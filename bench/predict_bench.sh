#!/usr/bin/env bash
# Soundscape inference on the CPU: `aviary predict` against the same work done by PyTorch from
# Python (bench/predict_reference.py: torchaudio decode + mel front end + the same model with the
# same weights; PYTHON, default /usr/bin/python3, whose torch must be BUILD_DIR's libtorch
# version, else the script refuses: bench/reference_python.sh), on COUNT synthetic 4-minute soundscapes
# (32 kHz ogg, 48 windows of 5 s, 182 classes like BirdCLEF 2024), for small_cnn and
# efficientnet_b0 (random weights: the time does not depend on them), torch threads THREADS, the
# same batch. The two sides alternate for ROUNDS rounds; the best round of each side counts.
# Both write a submission; the script prints the largest difference between them. Each side runs
# with contiguous (PyTorch's default) and channels-last (aviary's default) tensors.
# Usage: [PYTHON=PY] bench/predict_bench.sh [BUILD_DIR] [COUNT] [ROUNDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
source bench/reference_python.sh
python=$(reference_python "$build") || exit 2
count=${2:-4}
rounds=${3:-2}
threads=${4:-2}
batch=64  # the default of `aviary predict` for the recipe (infer_bs 2 x batch_size 32)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$build/bin/aviary" synth-soundscapes --out "$tmp/sc" --species 182 --count "$count" --seconds 240 --seed 1 > /dev/null
echo "machine: $(nproc) CPU(s), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
# One run of a side; prints "per_file_s wall_s".
run_side() {  # run_side SIDE MODEL FORMAT OUT.csv
  local t0 t1 out
  if [ "$1" = aviary ]; then
    t0=$(date +%s.%N)
    out=$("$build/bin/aviary" predict --checkpoint "$tmp/$2.pt" --audio "$tmp/sc/soundscapes" --out "$4" \
            --threads "$threads" --batch "$batch" --memory-format "$3" 2>"$tmp/stderr") ||
      { echo "aviary predict ($2, $3) failed:" >&2; cat "$tmp/stderr" >&2; return 1; }
    t1=$(date +%s.%N)
    echo "$(sed -n 's/.*(\([0-9.]*\) s per file.*/\1/p' <<<"$out") $(python3 -c "print(f'{$t1 - $t0:.2f}')")"
  else
    out=$("$python" bench/predict_reference.py "$2" "$tmp/$2.safetensors" "$tmp/sc/solution.csv" \
            "$tmp/sc/soundscapes" "$4" "$threads" "$batch" "$3") ||
      { echo "bench/predict_reference.py ($2, $3) failed" >&2; return 1; }
    echo "$(sed -n 's/.*per_file_s=\([0-9.]*\).*/\1/p' <<<"$out") $(sed -n 's/.*wall_s=\([0-9.]*\).*/\1/p' <<<"$out")"
  fi
}
maxdiff() {
  python3 - "$1" "$2" <<'PY'
import csv, sys
a = list(csv.reader(open(sys.argv[1])))
b = list(csv.reader(open(sys.argv[2])))
assert a[0] == b[0] and [r[0] for r in a] == [r[0] for r in b], "different headers or row ids"
print(max(abs(float(x) - float(y)) for ra, rb in zip(a[1:], b[1:]) for x, y in zip(ra[1:], rb[1:])))
PY
}
sides="aviary:channels_last aviary:contiguous python:contiguous python:channels_last"
for model in small_cnn efficientnet_b0; do
  "$build/bench/predict_bench_model" "$model" "$tmp/sc/solution.csv" "$tmp/$model.pt" "$tmp/$model.safetensors" > /dev/null
  declare -A best=() wall=()
  for ((i = 0; i < rounds; i++)); do
    for side in $sides; do
      # (A failure inside $(...) does not stop the script: a round without both numbers does.)
      read -r s w <<<"$(run_side "${side%%:*}" "$model" "${side##*:}" "$tmp/${side/:/_}.csv")"
      if [ -z "$s" ] || [ -z "${w:-}" ]; then
        echo "$side model=$model round=$i: no timing (the run failed, see above)" >&2
        exit 1
      fi
      echo "$side model=$model round=$i per_file_s=$s wall_s=$w"
      if [ -z "${best[$side]:-}" ] || python3 -c "import sys; sys.exit(0 if $s < ${best[$side]} else 1)"; then
        best[$side]=$s; wall[$side]=$w
      fi
    done
  done
  echo "$model: max |probability difference| aviary vs python: $(maxdiff "$tmp/aviary_channels_last.csv" "$tmp/python_contiguous.csv")"
  for side in $sides; do
    python3 -c "print(f'$model ${side%%:*} ${side##*:}: {${best[$side]}:.3f} s per 4-min soundscape (wall ${wall[$side]} s for $count files, start-up and model load included); vs python contiguous {${best[python:contiguous]} / ${best[$side]}:.2f}x, vs python channels_last {${best[python:channels_last]} / ${best[$side]}:.2f}x')"
  done
  unset best wall
done
echo "load average after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
