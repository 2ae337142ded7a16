#!/usr/bin/env bash
# Checkpoints cross between the two build configurations (Debian's libtorch 1.13 and PyPI's
# CUDA libtorch 2.x): a run of one configuration killed in its second epoch is resumed to the end
# by the other (model, optimizer state, history), in both directions, and each configuration's
# `aviary predict` reads the other's best.pt and predicts what the writer predicts (within float
# rounding across libtorch versions).
# usage: checkpoint_interop.sh BIN_DIR_A BIN_DIR_B
set -uo pipefail
bin_a=$1
bin_b=$2
source "$(dirname "$0")/lib.sh"

small_cnn_recipe "$bin_a" 6 90 3 12 2 2
"$bin_a/aviary" prepare --config "$tmp/p.yaml" > "$tmp/prepare.log" 2>&1 || { cat "$tmp/prepare.log"; fail "prepare"; }
"$bin_a/aviary" synth-soundscapes --out "$tmp/sc" --species 6 --count 1 --seconds 30 --seed 11 > "$tmp/sc.log" 2>&1 ||
  { cat "$tmp/sc.log"; fail "synth-soundscapes"; }

# The optimizer step to die at: the middle of the second epoch (last.pt then holds epoch 0).
"$bin_a/aviary" dataset train-list --config "$tmp/p.yaml" --stage finetune --fold 0 --out "$tmp/train.csv" > /dev/null ||
  fail "dataset train-list"
spe=$(( ($(wc -l < "$tmp/train.csv") - 1) / 16 ))
kill_step=$(( spe + spe / 2 ))

# resume_across WRITER READER NAME: the writer dies in epoch 1, the reader finishes the run.
resume_across() {
  local w=$1 r=$2 name=$3 run="$tmp/run_$3"
  AVIARY_FAULT_INJECT="rank=0,step=$kill_step,kind=throw" "$w/aviary-worker" train --config "$tmp/p.yaml" --stage finetune \
    --fold 0 --out "$run" --threads 2 > "$tmp/$name.killed.log" 2>&1
  grep -q "AVIARY_FAULT_INJECT" "$tmp/$name.killed.log" || { cat "$tmp/$name.killed.log"; fail "$name: the writer did not die as planned"; return; }
  [ -s "$run/last.pt" ] || { fail "$name: no last.pt after epoch 0"; return; }
  if "$r/aviary-worker" train --config "$tmp/p.yaml" --stage finetune --fold 0 --out "$run" --threads 2 > "$tmp/$name.resumed.log" 2>&1; then
    grep -q "resuming $run/last.pt after epoch 0" "$tmp/$name.resumed.log" || { cat "$tmp/$name.resumed.log"; fail "$name: the reader did not resume"; return; }
    [ "$(tail -n +2 "$run/history.csv" | wc -l)" -eq 2 ] || { cat "$run/history.csv"; fail "$name: history.csv lacks an epoch"; return; }
    ok
  else
    cat "$tmp/$name.resumed.log"; fail "$name: the reader could not resume the writer's last.pt"
  fi
}
resume_across "$bin_a" "$bin_b" a_to_b
resume_across "$bin_b" "$bin_a" b_to_a

# predict_across WRITER_RUN: both configurations predict from the same best.pt.
predict_across() {
  local run=$1 name=$2
  "$bin_a/aviary" predict --checkpoint "$run/best.pt" --audio "$tmp/sc/soundscapes" --out "$tmp/$name.a.csv" --threads 2 > "$tmp/$name.pa.log" 2>&1 ||
    { cat "$tmp/$name.pa.log"; fail "$name: predict (A)"; return; }
  "$bin_b/aviary" predict --checkpoint "$run/best.pt" --audio "$tmp/sc/soundscapes" --out "$tmp/$name.b.csv" --threads 2 > "$tmp/$name.pb.log" 2>&1 ||
    { cat "$tmp/$name.pb.log"; fail "$name: predict (B)"; return; }
  /usr/bin/python3 - "$tmp/$name.a.csv" "$tmp/$name.b.csv" <<'PY' && ok || fails=$((fails + 1))
import csv, sys
a = list(csv.reader(open(sys.argv[1]))); b = list(csv.reader(open(sys.argv[2])))
assert a[0] == b[0] and [r[0] for r in a] == [r[0] for r in b], "different rows or columns"
d = max(abs(float(x) - float(y)) for ra, rb in zip(a[1:], b[1:]) for x, y in zip(ra[1:], rb[1:]))
print(f"{sys.argv[1]}: max |diff| between the configurations' predictions {d:.3g}")
assert d < 1e-4, f"predictions differ by {d}"
PY
}
predict_across "$tmp/run_a_to_b" from_b
predict_across "$tmp/run_b_to_a" from_a

echo "checkpoint_interop: $passes passed, $fails failed"
[ $fails -eq 0 ]
