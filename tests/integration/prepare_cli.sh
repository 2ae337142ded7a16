#!/usr/bin/env bash
# `aviary prepare` on a synthetic corpus: decodes every file of both stages into the cache,
# counts the broken ones per reason, writes prepare_report.csv, decodes nothing on a second run,
# recovers from a lost shard, and refuses bad input with exit code 2; --dry-run predicts what a
# run decodes and writes, writing nothing; data.cache_max_seconds cuts the cache; under
# `mpirun -np 2` the two ranks split the files and write one cache.
# usage: prepare_cli.sh AVIARY_BIN MPIEXEC
set -uo pipefail
aviary=$1
mpiexec=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
check() {  # check "what" condition...
  local what=$1; shift
  if "$@"; then :; else echo "FAIL: $what"; fails=$((fails + 1)); fi
}

"$aviary" synth --out "$tmp/t" --layout 2024 --species 5 --recordings 30 --seed 5 --max-seconds 4 >/dev/null || exit 1
"$aviary" synth --out "$tmp/x" --layout xc --species 5 --recordings 30 --seed 6 --max-seconds 4 >/dev/null || exit 1
cat > "$tmp/p.yaml" <<YAML
data:
  duration: 5.0
  target: {layout: "2024", root: $tmp/t}
  pretrain_sources:
    - {layout: "xc", root: $tmp/x}
  cache_dir: $tmp/cache
folds: {pretrain_splits: 2, finetune_splits: 2}
YAML

# --dry-run: headers only, nothing written; its file count and cache size are what the real run
# then decodes and writes.
dry=$("$aviary" prepare --config "$tmp/p.yaml" --threads 2 --dry-run 2>&1); rc=$?
check "dry run exits 0 (rc=$rc): $dry" test $rc -eq 0
echo "$dry"
check "dry run writes nothing" test ! -e "$tmp/cache"
check "dry run: every file to decode" grep -qE "^dry run: cache $tmp/cache: ([0-9]+) files, 0 cached, \1 to decode" <<<"$dry"
check "dry run: hours of audio" grep -qE "^  audio to decode: [0-9]+\.[0-9]{2} hours$" <<<"$dry"
check "dry run: broken files by reason" grep -qE "^  not_audio +[1-9]" <<<"$dry"
dry_bytes=$(sed -nE 's/^  cache to write: .* \(([0-9]+) bytes of int16 samples\)$/\1/p' <<<"$dry")
check "dry run: cache size" test -n "$dry_bytes"

out=$("$aviary" prepare --config "$tmp/p.yaml" --threads 2 --shard-mb 0.5 2>"$tmp/err1"); rc=$?
check "first run exits 0 (rc=$rc): $(cat "$tmp/err1")" test $rc -eq 0
echo "$out"
check "first run decodes files" grep -qE "\(0 cached earlier, [1-9][0-9]* decoded now\)" <<<"$out"
for reason in ok empty not_audio truncated silent; do
  check "report row $reason" grep -qE "^$reason,[1-9]" "$tmp/cache/prepare_report.csv"
done
check "progress lines on a non-terminal" grep -q "^prepare: .* files" "$tmp/err1"
check "several shards" test "$(ls "$tmp/cache"/shard-*.index.csv | wc -l)" -ge 2
pcm_bytes() { cat "$1"/shard-*.pcm | wc -c; }
# indexed_bytes DIR [CUT_S]: the bytes the cache's files have at 32 kHz, from its index: the
# samples written, plus those of the silent files (found only by decoding: the dry run counts
# them, the cache stores them empty), cut at CUT_S seconds.
indexed_bytes() {
  python3 - "$@" <<'PY'
import csv, glob, sys
cut = round(float(sys.argv[2]) * 32000) if len(sys.argv) > 2 else None
total = 0
for index in glob.glob(sys.argv[1] + "/shard-*.index.csv"):
    for row in csv.DictReader(open(index)):
        n = int(row["frames"])
        if row["problem"] == "silent":
            n = round(int(row["source_frames"]) * 32000 / int(row["source_sample_rate"]))
            n = min(n, cut) if cut is not None else n
        total += 2 * n
print(total)
PY
}
# Within 1% (an mp3 header's length can be an estimate; wav, ogg and flac are exact).
near() { python3 -c "import sys; a, b = int(sys.argv[1]), int(sys.argv[2]); sys.exit(abs(a - b) > 0.01 * max(a, b))" "$1" "$2"; }
check "dry run's cache size ($dry_bytes) is what was written ($(indexed_bytes "$tmp/cache"))" \
  near "${dry_bytes:-0}" "$(indexed_bytes "$tmp/cache")"
dry2=$("$aviary" prepare --config "$tmp/p.yaml" --dry-run 2>&1)
check "dry run after prepare: nothing to decode" grep -qE " ([0-9]+) files, \1 cached, 0 to decode" <<<"$dry2"

# data.cache_max_seconds: only the first 1.5 s of each file, in its own cache.
cut=(--set data.duration=1 --set data.cache_max_seconds=1.5 --set data.cache_dir="$tmp/cut")
dry3=$("$aviary" prepare --config "$tmp/p.yaml" "${cut[@]}" --dry-run 2>&1)
check "dry run with a cut names it" grep -q "of it kept (data.cache_max_seconds 1.5)" <<<"$dry3"
cut_bytes=$(sed -nE 's/^  cache to write: .* \(([0-9]+) bytes of int16 samples\)$/\1/p' <<<"$dry3")
out_cut=$("$aviary" prepare --config "$tmp/p.yaml" "${cut[@]}" 2>/dev/null); rc=$?
check "cut run exits 0" test $rc -eq 0
files_ok=$(sed -nE 's/^ok,([0-9]+),.*/\1/p' "$tmp/cut/prepare_report.csv")
check "the cut cache holds at most 1.5 s a file" test "$(pcm_bytes "$tmp/cut")" -le $((files_ok * 48000 * 2))
check "the cut cache is smaller" test "$(pcm_bytes "$tmp/cut")" -lt "$(pcm_bytes "$tmp/cache")"
check "dry run's cut size ($cut_bytes) is what was written ($(indexed_bytes "$tmp/cut" 1.5))" \
  near "${cut_bytes:-0}" "$(indexed_bytes "$tmp/cut" 1.5)"
check "the manifest records the cut" grep -qx "max_seconds=1.5" "$tmp/cut/manifest.txt"

out2=$("$aviary" prepare --config "$tmp/p.yaml" 2>/dev/null); rc=$?
check "second run exits 0" test $rc -eq 0
check "second run decodes nothing" grep -q " 0 decoded now" <<<"$out2"
check "same report" diff <(sed -n '/reason/,$p' <<<"$out") <(sed -n '/reason/,$p' <<<"$out2")

last=$(ls "$tmp/cache"/shard-*.pcm | sort | tail -1)
rm "$last"
out3=$("$aviary" prepare --config "$tmp/p.yaml" 2>/dev/null); rc=$?
check "repair run exits 0" test $rc -eq 0
check "repair run redecodes" grep -qE "[1-9][0-9]* decoded now" <<<"$out3"
out4=$("$aviary" prepare --config "$tmp/p.yaml" 2>/dev/null)
check "after repair nothing to do" grep -q " 0 decoded now" <<<"$out4"
out5=$("$aviary" prepare --config "$tmp/p.yaml" --stage finetune 2>/dev/null); rc=$?
check "one stage exits 0" test $rc -eq 0
check "one stage lists only its samples" grep -q "^stage finetune: 30 samples" <<<"$out5"
check "one stage has no pretrain line" test -z "$(grep "^stage pretrain" <<<"$out5")"

# Split over the ranks of an mpirun: each decodes its share into the same cache (one report
# each), together every file once; the cache then has nothing left to decode.
out_mpi=$("$mpiexec" -np 2 --oversubscribe "$aviary" prepare --config "$tmp/p.yaml" --threads 1 --shard-mb 0.2 \
  --set data.cache_dir="$tmp/dist" 2>"$tmp/err_mpi"); rc=$?
check "mpirun -np 2 prepare exits 0 (rc=$rc): $(tail -5 "$tmp/err_mpi")" test $rc -eq 0
echo "$out_mpi"
n0=$(sed -nE 's/^part 0 of 2: cache .*: ([0-9]+) files \(0 cached earlier, \1 decoded now\).*/\1/p' <<<"$out_mpi")
n1=$(sed -nE 's/^part 1 of 2: cache .*: ([0-9]+) files \(0 cached earlier, \1 decoded now\).*/\1/p' <<<"$out_mpi")
total=$(sed -nE 's/^cache .*: ([0-9]+) files .*/\1/p' <<<"$out" | head -1)
check "both ranks decoded a share (${n0:-?} + ${n1:-?} of ${total:-?})" test -n "$n0" -a -n "$n1"
check "the shares add up to every file" test "$((${n0:-0} + ${n1:-0}))" = "${total:-x}"
check "each rank wrote its report" test -s "$tmp/dist/prepare_report.part-0-of-2.csv" -a -s "$tmp/dist/prepare_report.part-1-of-2.csv"
check "shards of both ranks" test "$(ls "$tmp/dist"/shard-00000[0-9].index.csv | wc -l)" -ge 2
check "the split cache holds what the single run wrote" test "$(pcm_bytes "$tmp/dist")" = "$(pcm_bytes "$tmp/cache")"
after=$("$aviary" prepare --config "$tmp/p.yaml" --set data.cache_dir="$tmp/dist" 2>/dev/null)
check "after the split run nothing is left to decode" grep -q " 0 decoded now" <<<"$after"
# --part R/3 one after another: each its share (the files whose name hashes to R), every file once.
third=()
for r in 0 1 2; do
  outp=$("$aviary" prepare --config "$tmp/p.yaml" --set data.cache_dir="$tmp/dist2" --part "$r/3" 2>/dev/null); rc=$?
  check "--part $r/3 exits 0" test $rc -eq 0
  third[r]=$(sed -nE "s/^part $r of 3: cache .*: ([0-9]+) files .*/\1/p" <<<"$outp")
done
check "--part 0/3, 1/3, 2/3 decode shares (${third[*]}) that add up to every file (${total:-?})" \
  test "$((${third[0]:-0} + ${third[1]:-0} + ${third[2]:-0}))" = "${total:-x}" -a "${third[1]:-0}" -gt 0
# A task of an srun step takes its share as an mpirun rank does; an sbatch script (the
# allocation's SLURM_NTASKS, no step) prepares the whole cache.
outs=$(env SLURM_PROCID=1 SLURM_STEP_NUM_TASKS=3 "$aviary" prepare --config "$tmp/p.yaml" --set data.cache_dir="$tmp/dist3" 2>"$tmp/err_srun"); rc=$?
check "srun step task 1 of 3 exits 0" test $rc -eq 0
check "an srun step's task decodes the share of --part 1/3 (${third[1]:-?} files)" \
  grep -qE "^part 1 of 3: cache .*: ${third[1]:-x} files" <<<"$outs"
check "the split says where it came from: $(head -3 "$tmp/err_srun")" \
  grep -qF "aviary prepare: part 1 of 3 (from SLURM_PROCID=1 and SLURM_STEP_NUM_TASKS=3); --part 0/1 prepares the whole cache" "$tmp/err_srun"
# The shell of an interactive `srun -n 3 --pty bash` is task 0 of 3 (SLURM_PTY_PORT set, a terminal
# on stdin: script(1) gives it one): no split. A step srun starts from that shell inherits the
# variable but not the terminal: a split as any step's.
if SHELL=/bin/sh script -qec true /dev/null </dev/null >/dev/null 2>&1; then
  outp=$(env SHELL=/bin/sh SLURM_PROCID=0 SLURM_STEP_NUM_TASKS=3 SLURM_PTY_PORT=40000 script -qec \
    "'$aviary' prepare --config '$tmp/p.yaml' --set data.cache_dir='$tmp/dist5' 2>/dev/null" /dev/null | tr -d '\r'); rc=$?
  check "an srun --pty shell's prepare exits 0" test $rc -eq 0
  check "an srun --pty shell's prepare takes every file: $(grep -E 'cache .* files' <<<"$outp")" \
    grep -qE "^cache .*: ${total:-x} files" <<<"$outp"
else
  echo "SKIP: script(1) cannot open a terminal here (no /dev/pts): the srun --pty case is not checked"
fi
outq=$(env SLURM_PROCID=1 SLURM_STEP_NUM_TASKS=3 SLURM_PTY_PORT=40000 setsid "$aviary" prepare --config "$tmp/p.yaml" \
  --set data.cache_dir="$tmp/dist6" </dev/null 2>/dev/null); rc=$?
check "a step started from an srun --pty shell exits 0" test $rc -eq 0
check "a step started from an srun --pty shell takes its share (${third[1]:-?} files)" \
  grep -qE "^part 1 of 3: cache .*: ${third[1]:-x} files" <<<"$outq"
outb=$(env SLURM_PROCID=0 SLURM_NTASKS=8 "$aviary" prepare --config "$tmp/p.yaml" --set data.cache_dir="$tmp/dist4" 2>/dev/null); rc=$?
check "an sbatch script's prepare exits 0" test $rc -eq 0
check "an sbatch script's prepare takes every file" grep -qE "^cache .*: ${total:-x} files" <<<"$outb"

expect2() {  # expect2 "substring" args...
  local want=$1; shift
  local msg rc
  msg=$("$aviary" prepare "$@" 2>&1); rc=$?
  if [ $rc -ne 2 ] || ! grep -qF -- "$want" <<<"$msg"; then
    echo "FAIL: prepare $* -> rc=$rc, wanted '$want' in: $msg"; fails=$((fails + 1))
  fi
}
expect2 "data.cache_dir is empty" --config "$tmp/p.yaml" --set data.cache_dir=
expect2 "--stage: expected one of pretrain, finetune, got 'train'" --config "$tmp/p.yaml" --stage train
expect2 "--config is required"
expect2 "holds 32000 Hz" --config "$tmp/p.yaml" --set data.sample_rate=16000 --set frontend.fmax=8000
expect2 "--threads" --config "$tmp/p.yaml" --threads 0
expect2 "--part: expected R/N with 0 <= R < N <= 100000, got '2/2'" --config "$tmp/p.yaml" --part 2/2
expect2 "holds the first 1.5 s of each file; this run asks for whole files" --config "$tmp/p.yaml" \
  --set data.cache_dir="$tmp/cut"
expect2 "holds the first 1.5 s of each file; this run asks for whole files" --config "$tmp/p.yaml" \
  --set data.cache_dir="$tmp/cut" --dry-run
expect2 "key 'data.cache_max_seconds': expected 0 (whole recordings) or >= data.duration" --config "$tmp/p.yaml" \
  --set data.cache_max_seconds=2
# No stage to prepare: an empty cache was made (its manifest fixing the rate for later runs), exit 0.
expect2 "no stage to prepare" --config "$tmp/p.yaml" --set data.cache_dir="$tmp/nostage" \
  --set stages.pretrain.enabled=false --set stages.finetune.enabled=false
check "no cache is made without a stage" test ! -e "$tmp/nostage"

if [ $fails -ne 0 ]; then echo "$fails check(s) failed"; exit 1; fi
echo "all prepare CLI checks passed"
