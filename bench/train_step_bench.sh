#!/usr/bin/env bash
# The training step: aviary (bench/train_step_bench, the trainer's own step code) against the same
# step in PyTorch (bench/train_step_reference.py: torchaudio + torchvision) on the same libtorch,
# same shapes, same thread count, alternating for ROUNDS rounds; each side's best round counts,
# so that a neighbour's burst of CPU use does not land on one side only.
#
# Usage: bench/train_step_bench.sh BUILD_DIR PYTHON [ROUNDS] [ARGS...]   (ROUNDS: 3 when left out)
#   BUILD_DIR  build (Debian's libtorch 1.13) or build-cuda (the PyTorch wheel's libtorch)
#   PYTHON     the python whose torch is that libtorch: /usr/bin/python3 for build, the venv's
#              for build-cuda (scripts/lib/deps.sh: ${AVIARY_TORCH_VENV}/bin/python)
#   ARGS       passed to both sides, e.g. --batch 16 --seconds 5 --threads 2 --steps 5
# Example (the CPU comparison in docs/BENCHMARKS.md):
#   bench/train_step_bench.sh build /usr/bin/python3 3 --batch 16 --seconds 5 --threads 2 --steps 5
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:?build folder}
# The python must run BUILD_DIR's libtorch version (bench/reference_python.sh): else the two
# sides would run different torch versions.
source bench/reference_python.sh
python=$(PYTHON=${2:?python} reference_python "$build") || exit 2
shift 2
rounds=3
if [[ ${1:-} =~ ^[0-9]+$ ]]; then  # ROUNDS may be left out
  rounds=$1
  shift
fi
if ((rounds < 1)); then
  echo "$(basename "$0"): ROUNDS must be at least 1, got $rounds" >&2
  exit 2
fi
ours=""
ref=""
for ((i = 0; i < rounds; i++)); do
  ours+=$("$build/bench/train_step_bench" "$@")$'\n'
  ref+=$("$python" bench/train_step_reference.py "$@")$'\n'
done
echo -n "$ours"
echo -n "$ref"
echo "load average after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
a=$(sed -n 's/.* aviary_samples_per_s=\([0-9.e+-]*\).*/\1/p' <<<"$ours" | sort -g | tail -1)
r=$(sed -n 's/.* reference_samples_per_s=\([0-9.e+-]*\).*/\1/p' <<<"$ref" | sort -g | tail -1)
python3 -c "print(f'aviary {float($a):.2f} samples/s, PyTorch {float($r):.2f} samples/s, ratio {float($a)/float($r):.3f}x')"
