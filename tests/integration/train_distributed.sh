#!/usr/bin/env bash
# Issue 5's acceptance on CPU: `mpirun -np 2 aviary-worker train` on a synthetic corpus trains
# as well as one rank with the same global batch (2 x 8 = 1 x 16), rank 0 alone writes the run
# folder, and a failing rank (exception, NaN, hang) ends the whole group quickly with a non-zero
# exit and a message naming the rank; `comm.backend: nccl` is refused in a build without it.
# usage: train_distributed.sh BIN_DIR MPIEXEC
set -uo pipefail
bin=$1
mpiexec=${2:-mpirun}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
source "$(dirname "$0")/lib.sh"
mpi2() { "$mpiexec" -np 2 --oversubscribe "$@"; }

small_cnn_recipe "$bin" 8 160 5 10 8 1 "comm: {timeout_s: 60}"
"$bin/aviary" prepare --config "$tmp/p.yaml" > "$tmp/prepare.log" 2>&1 || { cat "$tmp/prepare.log"; fail "prepare"; }
w="$bin/aviary-worker"

start=$(date +%s)
"$w" train --config "$tmp/p.yaml" --stage finetune --fold 0 --out "$tmp/one" --threads 2 > "$tmp/one.log" 2>&1 || { cat "$tmp/one.log"; fail "1-rank train"; }
echo "1 rank: $(( $(date +%s) - start )) s"
start=$(date +%s)
if mpi2 "$w" train --config "$tmp/p.yaml" --set train.batch_size=8 --stage finetune --fold 0 --out "$tmp/two" > "$tmp/two.log" 2>&1; then
  echo "2 ranks: $(( $(date +%s) - start )) s"
  for f in history.csv best.pt last.pt config.yaml history.png; do
    [ -s "$tmp/two/$f" ] || fail "2-rank run folder lacks $f"
  done
  [ "$(grep -c '^done:' "$tmp/two.log")" = 1 ] || fail "the summary line was not printed exactly once"
  grep -q "rank 1 of 2 (mpi)" "$tmp/two.log" || fail "rank 1 did not report its backend"
  /usr/bin/python3 - "$tmp/one/history.csv" "$tmp/two/history.csv" <<'PY' || fails=$((fails + 1))
import csv, sys
one = list(csv.DictReader(open(sys.argv[1])))
two = list(csv.DictReader(open(sys.argv[2])))
assert len(two) == 8, f"2 ranks: {len(two)} history rows (written twice?)"
assert [r["step"] for r in one] == [r["step"] for r in two], "different step counts"
b1 = max(float(r["val_roc_auc"]) for r in one)
b2 = max(float(r["val_roc_auc"]) for r in two)
print(f"best validation macro ROC-AUC: 1 rank {b1:.4f}, 2 ranks {b2:.4f}")
if b2 < b1 - 0.05 or b2 < 0.8:
    sys.exit(f"FAIL: 2 ranks reached {b2:.4f}, 1 rank {b1:.4f}")
PY
else
  cat "$tmp/two.log"; fail "2-rank train"
fi

# Resume: a 2-rank run that dies in epoch 3 (rank 1 throws) and is started again resumes on
# both ranks from rank 0's last.pt and ends with the uninterrupted run's history.
if [ -s "$tmp/two/history.csv" ]; then
  k=$(awk -F, 'NR==3 {print $2 + 1}' "$tmp/two/history.csv")  # a step inside epoch 3
  AVIARY_FAULT_INJECT="rank=1,step=$k" timeout 120 "$mpiexec" -np 2 --oversubscribe "$w" train --config "$tmp/p.yaml" \
      --set train.batch_size=8 --stage finetune --fold 0 --out "$tmp/resumed" > "$tmp/resumed1.log" 2>&1 &&
    fail "the interrupted run did not fail"
  mpi2 "$w" train --config "$tmp/p.yaml" --set train.batch_size=8 --stage finetune --fold 0 --out "$tmp/resumed" > "$tmp/resumed2.log" 2>&1 || { cat "$tmp/resumed2.log"; fail "resume"; }
  [ "$(grep -c 'resuming .*after epoch 1' "$tmp/resumed2.log")" = 2 ] || fail "both ranks should resume after epoch 1"
  cmp -s <(cut -d, -f1-10 "$tmp/two/history.csv") <(cut -d, -f1-10 "$tmp/resumed/history.csv") ||
    fail "the resumed 2-rank history differs from the uninterrupted one"
fi

# One rank under mpirun runs the whole all-reduce path (reducer, MPI communicator): the history
# must equal a plain single-process run's.
"$w" train --config "$tmp/p.yaml" --set train.epochs=2 --stage finetune --fold 0 --out "$tmp/plain" --threads 1 > "$tmp/plain.log" 2>&1 || fail "plain 2-epoch run"
"$mpiexec" -np 1 "$w" train --config "$tmp/p.yaml" --set train.epochs=2 --stage finetune --fold 0 --out "$tmp/np1" --threads 1 > "$tmp/np1.log" 2>&1 || fail "mpirun -np 1 run"
grep -q "gradient all-reduce" "$tmp/np1.log" || fail "mpirun -np 1 did not use the all-reduce path"
cmp -s <(cut -d, -f1-10 "$tmp/plain/history.csv") <(cut -d, -f1-10 "$tmp/np1/history.csv") ||
  fail "mpirun -np 1 history differs from the single-process one"

# A failing rank ends the group within a bounded time, naming itself and the cause.
expect_group_failure() {  # name, wanted text, env/args...
  local name=$1 want=$2; shift 2
  local t0=$(date +%s) rc
  timeout 120 env "$@" "$mpiexec" -np 2 --oversubscribe "$w" train --config "$tmp/p.yaml" --set train.batch_size=8 \
      --set comm.timeout_s=5 --stage finetune --fold 0 --out "$tmp/f_$name" > "$tmp/f_$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  # mpirun prints its MPI_ABORT banner (between two lines of dashes) into the ranks' output as it
  # reads it, in chunks: taken out, a rank's line it landed in is whole again. (A whole line
  # between the banner's two dash lines goes with it: the raw log is searched too.)
  perl -0pe 's/-{60,}\n.*?-{60,}\n//gs' "$tmp/f_$name.log" > "$tmp/f_$name.txt"
  cat "$tmp/f_$name.log" >> "$tmp/f_$name.txt"
  if [ $rc -eq 0 ] || [ $rc -eq 124 ] || ! grep -qE -- "$want" "$tmp/f_$name.txt"; then
    cat "$tmp/f_$name.log"; fail "$name: rc=$rc after ${took}s, wanted '$want'"
  else
    echo "$name: group ended with rc=$rc after ${took}s: $(grep -E -- "$want" "$tmp/f_$name.txt" | head -1 | cut -c1-200)"
  fi
}
expect_group_failure throw "rank 1 of 2 ends the group" AVIARY_FAULT_INJECT="rank=1,step=3"
grep -q "rank 1 throws at step 3" "$tmp/f_throw.txt" || fail "throw: the cause is not named"
# Both ranks end the group, each naming rank 1: rank 1 with its loss, rank 0 from the ranks' check.
expect_group_failure nan "non-finite loss (\(nan\) on rank 1|on rank\(s\) 1)" AVIARY_FAULT_INJECT="rank=1,step=2,kind=nan"
expect_group_failure hang "ranks that did not arrive: 1 \(no answer" AVIARY_FAULT_INJECT="rank=1,step=2,kind=hang"
# Rank 0 writing its files for longer than comm.timeout_s (a loaded shared filesystem) is no hang:
# the other ranks wait for its outcome longer (it used to end the group in the middle of the writes).
timeout 300 env AVIARY_FAULT_INJECT="rank=0,step=1,kind=slow_write,seconds=8" "$mpiexec" -np 2 --oversubscribe "$w" train \
    --config "$tmp/p.yaml" --set train.batch_size=8 --set train.epochs=2 --set comm.timeout_s=3 --stage finetune --fold 0 \
    --out "$tmp/slow_write" > "$tmp/slow_write.log" 2>&1 || { cat "$tmp/slow_write.log"; fail "a slow write of rank 0 ended the group"; }
grep -q "writes epoch 0's files 8.0 s late" "$tmp/slow_write.log" || { cat "$tmp/slow_write.log"; fail "slow_write: the fault did not run"; }
# A rank that never reaches the communicator's set-up (here its --config is a FIFO nobody writes:
# a read stuck on a hung share) no longer keeps the others in it for ever: they end the group
# after max(comm.timeout_s, 60 s), saying so. (AVIARY_COMM_SETUP_MIN_S, a test hook, makes the
# 60 s 15 s here.)
mkfifo "$tmp/stuck.yaml"
# shellcheck disable=SC2016  # expanded by the rank's shell
timeout 120 env AVIARY_COMM_SETUP_MIN_S=15 "$mpiexec" -np 2 --oversubscribe bash -c \
  'c=$0; [ "$OMPI_COMM_WORLD_RANK" = 1 ] && c=$1; exec "$2" train --config "$c" --set comm.timeout_s=3 --stage finetune --fold 0 --out "$3"' \
  "$tmp/p.yaml" "$tmp/stuck.yaml" "$w" "$tmp/stuck" > "$tmp/stuck.log" 2>&1
rc=$?
if [ $rc -eq 0 ] || [ $rc -eq 124 ]; then
  cat "$tmp/stuck.log"; fail "a rank stuck before the set-up: exit $rc (124: the group hung)"
elif ! grep -q "rank 0 of 2 ends the group: the communicator's set-up did not finish within 15 s (max(comm.timeout_s, 15 s))" "$tmp/stuck.log"; then
  cat "$tmp/stuck.log"; fail "a rank stuck before the set-up: the others did not say why they ended"
fi
# So for `serve`: a rank hung reading its token file (a FIFO here) kept rank 0 in the ranks'
# agreement for ever, before any registration (no coordinator to notice it, mpirun never ended).
mkfifo "$tmp/stuck.token"
echo "t0ken-for-a-stuck-serve" > "$tmp/serve.token"
# shellcheck disable=SC2016  # expanded by the rank's shell
timeout 120 env AVIARY_COMM_SETUP_MIN_S=15 "$mpiexec" -np 2 --oversubscribe bash -c \
  't=$0; [ "$OMPI_COMM_WORLD_RANK" = 1 ] && t=$1; exec "$2" serve --coordinator 127.0.0.1:1 --token-file "$t" --metrics-listen ""' \
  "$tmp/serve.token" "$tmp/stuck.token" "$w" > "$tmp/stuck_serve.log" 2>&1
rc=$?
if [ $rc -eq 0 ] || [ $rc -eq 124 ]; then
  cat "$tmp/stuck_serve.log"; fail "serve with a rank stuck at its start: exit $rc (124: the group hung)"
elif ! grep -q "rank 0 of 2 ends the group: serve's start did not finish within 15 s (reading each rank's flags and files)" "$tmp/stuck_serve.log"; then
  cat "$tmp/stuck_serve.log"; fail "serve with a rank stuck at its start: rank 0 did not say why it ended"
fi
# On a CPU device NCCL is refused (not built, or no CUDA device for it).
out=$(mpi2 "$w" train --config "$tmp/p.yaml" --set comm.backend=nccl --device cpu --stage finetune --fold 0 --out "$tmp/nccl" 2>&1)
rc=$?
{ [ $rc -ne 0 ] && grep -q "comm.backend: nccl" <<<"$out"; } || fail "comm.backend nccl: rc=$rc: $out"

# serve: a rank that cannot start (its --token-file is missing on its host) ends every rank at
# once with a message naming it, instead of leaving rank 0 in the group's first collective.
echo "a-token" > "$tmp/token"
# shellcheck disable=SC2016  # expanded by the rank's shell
timeout 120 "$mpiexec" -np 2 --oversubscribe bash -c \
  'f=$0; [ "$OMPI_COMM_WORLD_RANK" = 1 ] && f=$0.absent; exec "$1" serve --coordinator 127.0.0.1:1 --token-file "$f" --connect-timeout-s 5' \
  "$tmp/token" "$w" > "$tmp/serve_rank1.log" 2>&1
rc=$?
if [ $rc -eq 0 ] || [ $rc -eq 124 ]; then
  cat "$tmp/serve_rank1.log"; fail "serve with rank 1 unable to start: exit $rc (124: it hung)"
elif ! grep -q "aviary-worker serve: rank 1: --token-file: .*$tmp/token.absent" "$tmp/serve_rank1.log"; then
  cat "$tmp/serve_rank1.log"; fail "serve with rank 1 unable to start: rank 1 and its token file are not named"
fi

# Ranks that see different dataset files (rank 1's copy lacks one recording) are refused before
# the first step, instead of shuffling different item lists.
cp -r "$tmp/t24" "$tmp/t24-rank1"
rm -f "$(find "$tmp/t24-rank1/train_audio" -type f | sort | head -1)"
# shellcheck disable=SC2016  # expanded by the rank's shell
if mpi2 bash -c 'r=$0; [ "$OMPI_COMM_WORLD_RANK" = 1 ] && r=$0-rank1; exec "$1" train --config "$2" --set data.target.root="$r" --set train.batch_size=8 --stage finetune --fold 0 --out "$3"' \
     "$tmp/t24" "$w" "$tmp/p.yaml" "$tmp/items" > "$tmp/items.log" 2>&1; then
  fail "ranks with different dataset files were not refused"
elif ! grep -q "the ranks' training items differ" "$tmp/items.log"; then
  cat "$tmp/items.log"; fail "ranks with different dataset files: the refusal does not say so"
fi

# Ranks started with different configs (a stale copy of the config on one node: here another
# batch size, whose all-reduces would not match) are refused before the first step.
# shellcheck disable=SC2016  # expanded by the rank's shell
if mpi2 bash -c 'b=8; [ "$OMPI_COMM_WORLD_RANK" = 1 ] && b=4; exec "$0" train --config "$1" --set train.batch_size=$b --set comm.timeout_s=30 --stage finetune --fold 0 --out "$2"' \
     "$w" "$tmp/p.yaml" "$tmp/configs" > "$tmp/configs.log" 2>&1; then
  fail "ranks with different configs were not refused"
elif ! grep -q "the ranks' runs differ" "$tmp/configs.log"; then
  cat "$tmp/configs.log"; fail "ranks with different configs: the refusal does not say so"
fi

# A token byte that a gRPC header cannot carry is refused by its source (gRPC would abort).
printf 'tok\001en\n' > "$tmp/bad-token"
"$w" serve --coordinator 127.0.0.1:1 --token-file "$tmp/bad-token" --connect-timeout-s 5 > "$tmp/bad-token.log" 2>&1
rc=$?
{ [ $rc -eq 2 ] && grep -q -- "--token-file $tmp/bad-token: byte 0x01 at position 4" "$tmp/bad-token.log"; } \
  || { cat "$tmp/bad-token.log"; fail "serve with a control byte in its token: exit $rc"; }

echo "train_distributed: $fails failed"
[ $fails -eq 0 ]
