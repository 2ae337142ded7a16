#!/usr/bin/env bash
# Exported models in a notebook against `aviary predict` (issue 17): COUNT synthetic 4-minute
# soundscapes (32 kHz ogg, 48 windows of 5 s, 182 classes), small_cnn and efficientnet_b0 with
# random weights (tests/parity/export_tool; 3 channels, softmax, the pipeline's front end),
# `aviary export --format state_dict`, then docs/INFERENCE.md's notebook block
# (bench/notebook_inference.py: /usr/bin/python3, Debian's torch 1.13, torchaudio 0.13,
# torchvision 0.14, soundfile) and `aviary predict --tta 1` with THREADS torch threads each
# (batches of 16 windows on both sides: the notebook block's), and `aviary export --format onnx`
# run by onnxruntime (bench/onnx_inference.py, the torch venv's python, which has no soundfile:
# on 16-bit WAV copies of the soundscapes; skipped without onnxruntime), alternating for ROUNDS
# rounds; the best round of each counts. aviary predict and the notebook decode the ogg files;
# onnxruntime's input needs no decoding, so `aviary predict` is also timed on the same WAVs
# (the column to compare onnxruntime with) and its submission is the one onnxruntime's is
# compared with. Prints seconds per soundscape of the prediction loop, the wall time, and the
# largest difference between the submissions.
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
source scripts/lib/deps.sh
py_ort="${AVIARY_TORCH_VENV}/bin/python"
"$py_ort" -c "import onnxruntime" 2>/dev/null || py_ort=""
mkdir -p "$tmp/wav"
/usr/bin/python3 - "$tmp/sc/soundscapes" "$tmp/wav" <<'PY'
import glob, os, sys
import soundfile as sf
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.ogg"))):
    x, sr = sf.read(p, dtype="float32", always_2d=True)
    sf.write(os.path.join(sys.argv[2], os.path.basename(p)[:-4] + ".wav"), x, sr, subtype="PCM_16")
PY
echo "machine: $(nproc) CPU(s), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for model in small_cnn efficientnet_b0; do
  "$build/tests/export_tool" "$model" 182 3 0 softmax 1 "$tmp/$model.pt"
  "$build/bin/aviary" export "$tmp/$model.pt" --format state_dict --out "$tmp/export_$model.pt"
  "$build/bin/aviary" export "$tmp/$model.pt" --format onnx --out "$tmp/export_$model.onnx"
  best_a=""; best_n=""; best_o=""; wall_o=""; best_w=""; wall_w=""; od=""
  for ((i = 0; i < rounds; i++)); do
    t0=$(date +%s.%N)
    out=$("$build/bin/aviary" predict --checkpoint "$tmp/$model.pt" --audio "$tmp/sc/soundscapes" --out "$tmp/a.csv" \
            --threads "$threads" --tta 1 --batch 16 2>"$tmp/predict.err") ||
      { echo "aviary predict failed (round $i):" >&2; cat "$tmp/predict.err" >&2; exit 1; }
    t1=$(date +%s.%N)
    a=$(sed -n 's/.*(\([0-9.]*\) s per file.*/\1/p' <<<"$out")
    wa=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
    # Each side's line in a variable first: a failed run stops the script (set -e, pipefail)
    # rather than leaving its numbers empty.
    line=$(/usr/bin/python3 bench/notebook_inference.py docs/INFERENCE.md "$tmp/export_$model.pt" \
             "$tmp/sc/soundscapes" "$tmp/n.csv" "$threads" | tail -1 | sed 's/per_file_s=//; s/wall_s=//')
    read -r n wn <<<"$line"
    o=""; wo=""; aw=""; waw=""
    if [ -n "$py_ort" ]; then
      line=$("$py_ort" bench/onnx_inference.py "$tmp/export_$model.onnx" "$tmp/wav" "$tmp/o.csv" "$threads" \
               | tail -1 | sed 's/per_file_s=//; s/wall_s=//')
      read -r o wo <<<"$line"
      if [ -z "$o" ] || [ -z "${wo:-}" ]; then echo "onnxruntime round $i: no timing in '$line'" >&2; exit 1; fi
      if [ -z "$best_o" ] || python3 -c "import sys; sys.exit(0 if $o < $best_o else 1)"; then best_o=$o; wall_o=$wo; fi
      # aviary predict on the same WAVs: onnxruntime's column without the ogg decode on one side only.
      t0=$(date +%s.%N)
      out=$("$build/bin/aviary" predict --checkpoint "$tmp/$model.pt" --audio "$tmp/wav" --out "$tmp/aw.csv" \
              --threads "$threads" --tta 1 --batch 16 2>"$tmp/predict.err") ||
        { echo "aviary predict on the WAVs failed (round $i):" >&2; cat "$tmp/predict.err" >&2; exit 1; }
      t1=$(date +%s.%N)
      aw=$(sed -n 's/.*(\([0-9.]*\) s per file.*/\1/p' <<<"$out")
      waw=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
      if [ -z "$aw" ]; then echo "aviary predict on the WAVs, round $i: no timing in '$out'" >&2; exit 1; fi
      if [ -z "$best_w" ] || python3 -c "import sys; sys.exit(0 if $aw < $best_w else 1)"; then best_w=$aw; wall_w=$waw; fi
    fi
    if [ -z "$a" ] || [ -z "$n" ] || [ -z "${wn:-}" ]; then
      echo "$model round $i: no timing (aviary '$a', notebook '$n $wn')" >&2
      exit 1
    fi
    echo "$model round=$i aviary_predict per_file_s=$a wall_s=$wa notebook per_file_s=$n wall_s=$wn onnxruntime per_file_s=$o wall_s=$wo aviary_predict_wav per_file_s=$aw wall_s=$waw"
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
  if [ -n "$py_ort" ]; then
    od=$(python3 - "$tmp/aw.csv" "$tmp/o.csv" <<'PY'
import csv, sys
a = list(csv.reader(open(sys.argv[1])))
b = list(csv.reader(open(sys.argv[2])))
assert a[0] == b[0] and [r[0] for r in a] == [r[0] for r in b], "different headers or row ids"
print(max(abs(float(x) - float(y)) for ra, rb in zip(a[1:], b[1:]) for x, y in zip(ra[1:], rb[1:])))
PY
)
  fi
  echo "$model best: aviary predict $best_a s/soundscape (wall $wall_a s for $count files), notebook $best_n s/soundscape (wall $wall_n s), max |difference| $diff; onnxruntime on the WAVs ${best_o:-n/a} s/soundscape (wall ${wall_o:-n/a} s) against aviary predict on the same WAVs ${best_w:-n/a} s/soundscape (wall ${wall_w:-n/a} s), max |difference| ${od:-n/a}"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
