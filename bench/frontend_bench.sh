#!/usr/bin/env bash
# The mel front end on the CPU: aviary (bench/frontend_bench) vs torchaudio's MelSpectrogram +
# AmplitudeToDB + the notebook's normalisation (PYTHON, default /usr/bin/python3: its torch must
# be BUILD_DIR's libtorch version, else the script refuses; bench/reference_python.sh), same
# shapes, same machine, same invocation, torch intra-op threads 1 and 2. The two sides alternate
# for ROUNDS rounds (each a median of REPEATS batches); the best round of each side counts, so
# that a neighbour's burst of CPU use does not land on one side only.
# Usage: [PYTHON=PY] bench/frontend_bench.sh [BUILD_DIR] [BATCH] [SECONDS] [REPEATS] [ROUNDS]
#   e.g. PYTHON="$AVIARY_TORCH_VENV/bin/python" bench/frontend_bench.sh build-cuda 32 10 10 3
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
source bench/reference_python.sh
python=$(reference_python "$build") || exit 2
batch=${2:-32}
seconds=${3:-10}
repeats=${4:-10}
rounds=${5:-3}
ours=""
ref=""
for ((i = 0; i < rounds; i++)); do
  ours+=$("$build/bench/frontend_bench" "$batch" "$seconds" "$repeats" 1 2)$'\n'
  ref+=$("$python" bench/frontend_reference.py "$batch" "$seconds" "$repeats" 1 2)$'\n'
done
echo -n "$ours"
echo -n "$ref"
echo "load average after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
for t in 1 2; do
  a=$(sed -n "s/^device=cpu threads=$t .*aviary_clips_per_s=\([0-9.e+-]*\).*/\1/p" <<<"$ours" | sort -g | tail -1)
  r=$(sed -n "s/^device=cpu threads=$t .*reference_clips_per_s=\([0-9.e+-]*\).*/\1/p" <<<"$ref" | sort -g | tail -1)
  python3 -c "print(f'threads=$t: aviary {float($a):.1f} clips/s, torchaudio {float($r):.1f} clips/s, ratio {float($a)/float($r):.2f}x')"
done
