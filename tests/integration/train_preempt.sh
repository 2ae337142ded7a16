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

# Another number of ranks on resume (the coordinator may re-lease a task to a group of another
# size): stopped mid-epoch on one process at loader batch b (3 here, odd), resumed on two. Batch s of an epoch
# is rows [s*B*W, (s+1)*B*W) of its order, so two ranks resume at batch b/2 (b even: the same
# samples) or (b-1)/2 (b odd: one batch of the epoch again), and epoch 1 then takes the 2-rank
# epoch's steps less that batch. Before that, a group whose rank 1 sees only the epoch-end
# last.pt (node-local run folders) is refused: same epoch, another batch and optimizer step.
world_change() {
  local args=(train --config "$tmp/p.yaml" --stage finetune --fold 0 --threads 1 --set train.batch_size=8)
  AVIARY_FAULT_INJECT="rank=0,step=10,kind=sigterm" "$w" "${args[@]}" --out "$tmp/world" > "$tmp/world.1.log" 2>&1
  local line b k
  line=$(grep -o "stopped at epoch 1 batch [0-9]* (step [0-9]*)" "$tmp/world.1.log" | head -1)
  [ -n "$line" ] || { cat "$tmp/world.1.log"; fail "world: no mid-epoch stop in epoch 1"; return; }
  b=$(echo "$line" | sed 's/.*batch \([0-9]*\) .*/\1/')
  k=$(echo "$line" | sed 's/.*(step \([0-9]*\))/\1/')
  [ "$b" -ge 2 ] || { fail "world: stopped at batch $b, the test wants 2 or more"; return; }
  mkdir -p "$tmp/split/r0" "$tmp/split/r1"
  cp -r "$tmp/world" "$tmp/split/r0/run"
  cp -r "$tmp/world" "$tmp/split/r1/run"
  mv "$tmp/split/r1/run/last.prev.pt" "$tmp/split/r1/run/last.pt"
  # shellcheck disable=SC2016  # expanded by the rank's shell
  if $mpiexec -np 2 --oversubscribe bash -c 'cd "$0/r$OMPI_COMM_WORLD_RANK" && exec "$@"' "$tmp/split" \
       "$w" "${args[@]}" --out run > "$tmp/split.log" 2>&1; then
    fail "world: ranks that resume from different checkpoints were not refused"
  elif grep -q "resumes at epoch 1 batch [0-9]* step [0-9]* but the ranks range over batches 0\.\.$((b / 2)): every rank must see the same run/last.pt" "$tmp/split.log"; then
    ok
  else
    cat "$tmp/split.log"; fail "world: the refusal does not name the batches"
  fi
  $mpiexec -np 2 --oversubscribe "$w" "${args[@]}" --out "$tmp/world" > "$tmp/world.2.log" 2>&1 \
    || { cat "$tmp/world.2.log"; fail "world: resume on two ranks"; return; }
  grep -q "stopped at batch $b of epoch 1 on 1 rank; on 2 ranks that is batch $((b / 2)) " "$tmp/world.2.log" \
    || { cat "$tmp/world.2.log"; fail "world: the resume does not say where it resumes"; return; }
  # b odd: one per-rank batch is trained again, and the epoch's totals so far keep only the
  # batches before the resume point (else its samples count twice in train_loss/train_acc).
  if [ $((b % 2)) = 1 ]; then
    grep -q "epoch 1's running totals scaled from $((b * 8)) to the $(((b - 1) * 8)) samples before batch $((b / 2)) " \
      "$tmp/world.2.log" || { cat "$tmp/world.2.log"; fail "world: the totals were not cut to the resume point"; return; }
  elif grep -q "running totals scaled" "$tmp/world.2.log"; then
    fail "world: totals scaled although no batch is trained again"; return
  fi
  if /usr/bin/python3 - "$tmp/world/history.csv" "$k" "$((b / 2))" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
k, start = int(sys.argv[2]), int(sys.argv[3])
steps = [int(r["step"]) for r in rows]
assert len(steps) == 3, steps
full = steps[2] - steps[1]  # a whole epoch on two ranks
if steps[1] - k != full - start:
    sys.exit(f"epoch 1 took {steps[1] - k} steps after the resume at batch {start}; a 2-rank epoch has {full}")
PY
  then ok; else fail "world: epoch 1 did not train the rest of the epoch"; fi
}
world_change

# A rank whose resume fails (an I/O error on its host, out of memory copying the optimizer's
# moments to its GPU): every rank ends the task with that rank's cause, as a failed start does.
# That rank used to end the whole group alone (MPI_Abort: under a coordinator the group died with
# the task, and the other ranks never said why).
resume_fails() {
  local args=(train --config "$tmp/p.yaml" --stage finetune --fold 0 --threads 1 --set train.batch_size=8)
  AVIARY_FAULT_INJECT="rank=1,kind=fail_resume" timeout 300 $mpiexec -np 2 --oversubscribe "$w" "${args[@]}" \
    --out "$tmp/world" > "$tmp/resume_fails.log" 2>&1
  local rc=$?
  if [ $rc -eq 124 ]; then
    fail "resume_fails: the ranks did not end within 300 s of rank 1's failed resume"
  elif [ $rc -eq 0 ]; then
    fail "resume_fails: exited 0"
  elif [ "$(grep -c "rank 1: AVIARY_FAULT_INJECT: rank 1 cannot read its checkpoint" "$tmp/resume_fails.log")" -ge 2 ]; then
    ok  # both ranks name rank 1's cause
  else
    cat "$tmp/resume_fails.log"; fail "resume_fails: the ranks did not both end with rank 1's cause"
  fi
}
resume_fails

echo "train_preempt: $passes passed, $fails failed"
[ $fails -eq 0 ]
