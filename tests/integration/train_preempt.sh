#!/usr/bin/env bash
# Issue 17's preemption check: `aviary-worker train` (one process, then `mpirun -np 2`) gets a
# real SIGTERM in the middle of an epoch (AVIARY_FAULT_INJECT=...,kind=sigterm raises it on one
# rank at a chosen step), writes last.pt at the current step and exits 143; the same command
# resumes from the next batch of that epoch, and its history.csv equals an uninterrupted run's
# (every column but samples_per_s). Also with gradient accumulation, clipping and EMA on.
# usage: train_preempt.sh BIN_DIR MPIEXEC
set -uo pipefail
bin=$1
mpiexec=${2:-mpirun}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
source "$(dirname "$0")/lib.sh"
w="$bin/aviary-worker"

small_cnn_recipe "$bin" 5 70 7 6 3 1 "comm: {timeout_s: 60}"
"$bin/aviary" prepare --config "$tmp/p.yaml" > "$tmp/prepare.log" 2>&1 || { cat "$tmp/prepare.log"; fail "prepare"; }

same_history() {  # A B: every column but samples_per_s
  /usr/bin/python3 - "$1/history.csv" "$2/history.csv" <<'PY'
import csv, sys
a = list(csv.DictReader(open(sys.argv[1])))
b = list(csv.DictReader(open(sys.argv[2])))
assert len(a) == len(b) == 3, f"{len(a)} and {len(b)} rows"
for ra, rb in zip(a, b):
    for k in ra:
        if k != "samples_per_s" and ra[k] != rb[k]:
            sys.exit(f"epoch {ra['epoch']} {k}: {ra[k]} uninterrupted, {rb[k]} preempted and resumed")
PY
}

# preempt NAME RANK LAUNCHER [--set ...]: the uninterrupted run, then one that RANK's SIGTERM
# stops at step 6 (4 steps per epoch: inside epoch 1), then the same command again.
preempt() {
  local name=$1 rank=$2 launcher=$3
  shift 3
  local args=(train --config "$tmp/p.yaml" --stage finetune --fold 0 --threads 1 "$@")
  $launcher "$w" "${args[@]}" --out "$tmp/$name.straight" > "$tmp/$name.straight.log" 2>&1 \
    || { cat "$tmp/$name.straight.log"; fail "$name: uninterrupted run"; return; }
  AVIARY_FAULT_INJECT="rank=$rank,step=5,kind=sigterm" $launcher "$w" "${args[@]}" --out "$tmp/$name" \
    > "$tmp/$name.1.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] || fail "$name: the preempted run exited 0"
  [ -n "$launcher" ] || [ $rc -eq 143 ] || fail "$name: the preempted run exited $rc, not 143"
  grep -q "stopped by .*: stopped at epoch 1 batch [0-9]* (step 6); .*/last.pt holds this step; run the same command again" \
    "$tmp/$name.1.log" || { cat "$tmp/$name.1.log"; fail "$name: no mid-epoch checkpoint reported"; }
  $launcher "$w" "${args[@]}" --out "$tmp/$name" > "$tmp/$name.2.log" 2>&1 \
    || { cat "$tmp/$name.2.log"; fail "$name: resume"; return; }
  grep -q "resuming $tmp/$name/last.pt after epoch 0 (step 6) mid-epoch: at batch [1-9][0-9]* of epoch 1" "$tmp/$name.2.log" \
    || { cat "$tmp/$name.2.log"; fail "$name: did not resume mid-epoch"; }
  if same_history "$tmp/$name.straight" "$tmp/$name"; then ok; else fail "$name: histories differ"; fi
}

preempt one 0 "" --set train.batch_size=16
preempt accum 0 "" --set train.batch_size=8 --set train.grad_accum_steps=2 --set train.grad_clip_norm=0.5 \
  --set train.ema_decay=0.9 --set train.ema_eval=true
# Two ranks: the signal reaches rank 1 only; the ranks agree to stop at the same step.
preempt two 1 "$mpiexec -np 2 --oversubscribe" --set train.batch_size=8

echo "train_preempt: $passes passed, $fails failed"
[ $fails -eq 0 ]
