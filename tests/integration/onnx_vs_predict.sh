#!/usr/bin/env bash
# `aviary export --format onnx` against `aviary predict` (issue 17): for small_cnn and
# efficientnet_b0..b3 (1 and 3 input channels, with and without a neck, softmax and sigmoid),
# a checkpoint of random weights, biases and BatchNorm statistics (export_tool; one with the front
# end's normalize: none, one per_batch, the others per_sample; per_batch depends on the caller's
# batch by design: it is compared with the whole file as one batch on both sides, predict's
# batch of infer_bs x batch_size = 8 windows holding a file's 5), exported as ONNX and
# run by onnxruntime from PyPI (scripts/lib/deps.sh: aviary_onnxruntime, in the torch venv) on
# synthetic soundscapes (`aviary synth-soundscapes`, decoded by libsndfile into 16-bit WAV so that
# both sides read the same samples) and a silent file (a flat clip: the normalisation's guard),
# must give `aviary predict --tta 1`'s probabilities within
# 1e-4, with the whole file as one batch and one window at a time. Skipped (exit 77) where the
# venv has no onnxruntime: scripts/test-cuda.sh installs it.
# usage: onnx_vs_predict.sh BIN_DIR EXPORT_TOOL
set -uo pipefail
bin=$1
tool=$2
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/deps.sh"
py="${AVIARY_ONNX_PYTHON:-${AVIARY_TORCH_VENV}/bin/python}"
if ! import_error=$("$py" -c "import onnxruntime" 2>&1); then
  if [ "${AVIARY_REQUIRE_ONNX:-0}" = 1 ]; then  # scripts/test-cuda.sh installed it: a failure, not a skip
    echo "FAIL: onnxruntime does not import for $py: $import_error"
    exit 1
  fi
  echo "SKIP: no onnxruntime for $py (scripts/lib/deps.sh: aviary_onnxruntime)"
  exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
"$bin/aviary" synth-soundscapes --out "$tmp/sc" --species 4 --count 2 --seconds 22.5 --seed 7 > /dev/null || { echo "FAIL: synth-soundscapes"; exit 1; }
mkdir -p "$tmp/wav"
/usr/bin/python3 - "$tmp/sc/soundscapes" "$tmp/wav" <<'PY' || { echo "FAIL: wav conversion"; exit 1; }
import glob, os, sys
import soundfile as sf
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.ogg"))):
    x, sr = sf.read(p, dtype="float32", always_2d=True)
    sf.write(os.path.join(sys.argv[2], os.path.basename(p)[:-4] + ".wav"), x, sr, subtype="PCM_16")
sf.write(os.path.join(sys.argv[2], "silence.wav"), 0 * x[: int(7.5 * sr)], sr, subtype="PCM_16")
PY
i=0
for spec in "small_cnn 1 0 softmax" "small_cnn 3 16 sigmoid" "efficientnet_b0 3 0 softmax" \
            "efficientnet_b1 3 0 sigmoid" "efficientnet_b2 1 0 softmax" "efficientnet_b3 3 0 softmax" \
            "efficientnet_b0 3 24 sigmoid" "small_cnn 1 0 softmax none" "small_cnn 3 0 sigmoid per_batch"; do
  read -r model cin neck act normalize <<<"$spec"
  i=$((i + 1))
  d="$tmp/case$i"
  mkdir -p "$d"
  "$tool" "$model" 6 "$cin" "$neck" "$act" $((200 + i)) "$d/best.pt" $normalize || { echo "FAIL: export_tool $spec"; fails=$((fails + 1)); continue; }
  if ! "$bin/aviary" export "$d/best.pt" --format onnx --out "$d/model.onnx" > "$d/export.log" 2>&1; then
    echo "FAIL: aviary export --format onnx ($spec): $(cat "$d/export.log")"; fails=$((fails + 1)); continue
  fi
  "$bin/aviary" predict --checkpoint "$d/best.pt" --audio "$tmp/wav" --out "$d/predict.csv" --tta 1 --threads 2 \
    > "$d/predict.log" 2>&1 || { echo "FAIL: predict ($spec): $(cat "$d/predict.log")"; fails=$((fails + 1)); continue; }
  echo "$spec: $(head -1 "$d/export.log")"
  "$py" "$here/check_onnx.py" "$d/model.onnx" "$tmp/wav" "$d/predict.csv" 1e-4 || fails=$((fails + 1))
  if [ $i -le 3 ]; then
    "$py" "$here/check_onnx.py" "$d/model.onnx" "$tmp/wav" "$d/predict.csv" 1e-4 --batch 1 || fails=$((fails + 1))
  fi
done
if [ "$fails" -ne 0 ]; then
  echo "$fails check(s) failed"
  exit 1
fi
echo "all ONNX checks passed"
