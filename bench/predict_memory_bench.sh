#!/usr/bin/env bash
# Memory of `aviary predict` against the length of a recording: one synthetic soundscape of 4
# minutes (BirdCLEF's length, the reference) and one of SECONDS (default 3600), 32 kHz ogg, 182
# classes, small_cnn with random weights, batch 64, THREADS torch threads. For each: the peak
# resident memory of the predict process and its wall time; the script prints the long file's
# peak over the short one's (1.0: memory does not grow with the length). With OLD_BIN (a folder
# holding the `aviary` and `aviary-worker` of another build, an earlier aviary say) the same two
# runs with it, and the largest difference between the two builds' submissions of the long file
# (0 when both use the same libtorch; an earlier aviary refuses a file past 2^29 samples, 16777 s
# at 32 kHz: its run is then reported as failed).
# Usage: bench/predict_memory_bench.sh [BUILD_DIR] [SECONDS] [THREADS] [OLD_BIN]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
seconds=${2:-3600}
threads=${3:-2}
old=${4:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "machine: $(nproc) CPU(s), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$build/bin/aviary" synth-soundscapes --out "$tmp/short" --species 182 --count 1 --seconds 240 --seed 1 > /dev/null
"$build/bin/aviary" synth-soundscapes --out "$tmp/long" --species 182 --count 1 --seconds "$seconds" --seed 2 > /dev/null
"$build/bench/predict_bench_model" small_cnn "$tmp/short/solution.csv" "$tmp/model.pt" "$tmp/model.safetensors" > /dev/null

# Prints "peak_rss_mib wall_s" of one predict run (the process's own peak: `aviary` execs
# aviary-worker, so the child waited for is the predict process), or "failed" and the reason on
# stderr.
measure() {  # measure BIN_DIR AUDIO_DIR OUT.csv
  python3 - "$1/aviary" "$2" "$3" "$threads" <<'PY'
import resource, subprocess, sys, time
aviary, audio, out, threads = sys.argv[1:]
t0 = time.monotonic()
run = subprocess.run([aviary, "predict", "--checkpoint", audio + "/../../model.pt", "--audio", audio,
                      "--out", out, "--threads", threads, "--batch", "64"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.monotonic() - t0
if run.returncode != 0:
    print(f"{aviary} predict {audio} failed ({run.returncode}): {run.stderr[-2000:]}", file=sys.stderr)
    print("failed")
    sys.exit(0)
print(f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} {wall:.2f}")
PY
}
report() {  # report NAME BIN_DIR
  local short long
  short=$(measure "$2" "$tmp/short/soundscapes" "$tmp/$1_short.csv")
  long=$(measure "$2" "$tmp/long/soundscapes" "$tmp/$1_long.csv")
  read -r sr sw <<<"$short"
  read -r lr lw <<<"$long"
  if [ "$sr" = failed ] || [ "$lr" = failed ]; then
    echo "$1: 240 s file: $short; $seconds s file: $long"
    return 0
  fi
  python3 -c "print(f'$1: 240 s file: peak {$sr} MiB, {$sw} s; $seconds s file: peak {$lr} MiB, {$lw} s; long/short peak {$lr / $sr:.2f}x')"
}
report new "$build/bin"
if [ -n "$old" ]; then
  report old "$old"
  python3 - "$tmp/new_long.csv" "$tmp/old_long.csv" <<'PY'
import csv, os, sys
if not os.path.exists(sys.argv[1]) or not os.path.exists(sys.argv[2]):
    print("no comparison: a build wrote no submission for the long file")
    sys.exit(0)
a = list(csv.reader(open(sys.argv[1])))
b = list(csv.reader(open(sys.argv[2])))
assert a[0] == b[0] and [r[0] for r in a] == [r[0] for r in b], "different headers or row ids"
d = max(abs(float(x) - float(y)) for ra, rb in zip(a[1:], b[1:]) for x, y in zip(ra[1:], rb[1:]))
print(f"long file, new vs old: {len(a) - 1} rows, max |probability difference| {d}")
PY
fi
echo "load average after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
