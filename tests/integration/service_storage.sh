#!/usr/bin/env bash
# Issue 14 item 1, with real processes: the run folder on a small tmpfs (private to this test:
# `unshare -m`, then `mount -t tmpfs`) that the test fills up mid-task.
#   - the save fails on rank 0 without aborting it; no temporary file is left; the previous
#     last.pt stays (the next attempt resumes from it);
#   - the coordinator gets a retryable FailTask at once (well before the heartbeat timeout)
#     naming the path and the errno (ENOSPC); no rank aborts or lingers, the group stays up;
#   - the group waits until its node can write again; once the filler is deleted it leases the
#     task again and trains it to completion; history.csv has every epoch once.
# usage: service_storage.sh BIN_DIR MPIEXEC. Exit 77 (skipped) when a mount namespace or a
# tmpfs mount is not permitted here.
set -uo pipefail
if [ -z "${AVIARY_STORAGE_TEST_NS:-}" ]; then
  if ! unshare -m --propagation private true 2>/dev/null; then
    echo "SKIP: unshare -m is not permitted here (needs root or CAP_SYS_ADMIN)"; exit 77
  fi
  AVIARY_STORAGE_TEST_NS=1 exec unshare -m --propagation private "$0" "$@"
fi
bin=$1
mpiexec=${2:-mpirun}
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/service_lib.sh"
runs=$tmp/runs
cleanup_storage() {
  local p
  for p in "${pids[@]}"; do kill_session "$p"; done
  wait 2>/dev/null
  umount "$runs" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup_storage EXIT
mkdir -p "$runs"
if ! mount -t tmpfs -o size=24m tmpfs "$runs"; then
  echo "SKIP: mount -t tmpfs is not permitted here"; exit 77
fi

service_recipe 2 12 "[0]"
write_coordinator_config 60 2   # a heartbeat timeout far above what "at once" means here
start_coordinator || exit 1
start_group a 2
pid_a=$group_pid
job=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false | tail -n 1)
echo "job $job (12 epochs of fine-tuning); group a is $pid_a"
if ! wait_for 300 jq_status "$job" 'task("finetune").get("latest", {}).get("epoch", 0) >= 1 and task("finetune")["latest"].get("epoch_end", False)'; then
  fail "group a made no progress"; tail -n 30 "$tmp/a.log"; exit 1
fi
ft_dir=$(jq_status "$job" 'task("finetune")["out_dir"]')
ckpt_bytes=$(stat -c %s "$ft_dir/last.pt")
echo "last.pt is $ckpt_bytes bytes; filling $runs"
dd if=/dev/zero of="$runs/filler" bs=64k 2>/dev/null
filled_at=$(date +%s)
df -k "$runs" | tail -n 1

# The next epoch's save fails: a retryable FailTask reaches the coordinator at once.
if wait_for 120 grep -q "No space left on device (ENOSPC)" "$tmp/coordinator.log"; then
  echo "the coordinator heard of the full disk after $(( $(date +%s) - filled_at )) s"
  grep -E "failed on group g[0-9a-f]+ \(retryable\): rank 0: $ft_dir/[a-z.]+[0-9.]*: write failed .*No space left on device \(ENOSPC\)" "$tmp/coordinator.log" >/dev/null ||
    fail "the FailTask does not name the run folder's file and ENOSPC as retryable: $(grep -m1 ENOSPC "$tmp/coordinator.log")"
  wait_for 10 jq_status "$job" 'task("finetune")["state"] == "TASK_STATE_READY" and task("finetune")["restarts"] == 1' ||
    fail "the task is not READY with 1 restart after the storage fault: $(jq_status "$job" 'task("finetune")')"
else
  fail "no FailTask naming ENOSPC reached the coordinator"; tail -n 40 "$tmp/a.log"; tail -n 20 "$tmp/coordinator.log"
fi
grep -q "lost (no heartbeat" "$tmp/coordinator.log" && fail "the coordinator timed the group out instead of hearing the failure"
left=$(find "$runs" -name '*.tmp.*')
[ -z "$left" ] || fail "temporary files left on the full disk: $left"
grep -qiE "MPI_ABORT|terminate called|Aborted|ended differently" "$tmp/a.log" && fail "a rank aborted: $(grep -m3 -iE 'MPI_ABORT|terminate called|Aborted|ended differently' "$tmp/a.log")"
kill -0 "$pid_a" 2>/dev/null || fail "group a ended after the storage fault"
[ "$(pgrep -P "$pid_a" -c)" = 2 ] || fail "group a does not have its 2 ranks any more: $(pgrep -P "$pid_a" -c)"
# The group keeps its node out of service while the disk is full.
wait_for 30 grep -q "node not usable for tasks: $ft_dir" "$tmp/a.log" ||
  fail "group a did not say that its node is not usable: $(grep -m3 -E 'usable|ENOSPC' "$tmp/a.log")"
sleep 3
jq_status "$job" 'task("finetune")["state"] == "TASK_STATE_READY"' ||
  fail "the task was leased again while the disk was full: $(jq_status "$job" 'task("finetune")["state"]')"

# Space again: the same group leases the task, resumes from the previous last.pt and finishes.
rm -f "$runs/filler"
if avt 600 watch "$job" > "$tmp/watch.log" 2>&1; then ok; else
  fail "the job did not succeed once the disk had space again"; tail -n 20 "$tmp/watch.log"; tail -n 30 "$tmp/a.log"
fi
grep -q "is writable again" "$tmp/a.log" || fail "group a did not log that its node is usable again"
grep -qE "resuming .*last.pt after epoch [0-9]+" "$tmp/a.log" || fail "the second attempt did not resume from last.pt"
jq_status "$job" 'task("finetune")["attempt"] == 2 and task("finetune")["restarts"] == 1' ||
  fail "expected attempt 2 and 1 restart: $(jq_status "$job" 'task("finetune")')"
[ "$(cut -d, -f1 "$ft_dir/history.csv" | tail -n +2 | tr '\n' ' ')" = "$(seq -s ' ' 0 11) " ] ||
  fail "history.csv epochs are not 0..11 once each: $(cut -d, -f1 "$ft_dir/history.csv" | tr '\n' ' ')"
grep -aq "attempt: 2" "$ft_dir/last.pt" || fail "last.pt was not written by attempt 2"
kill -0 "$pid_a" 2>/dev/null || fail "group a ended"
m=$(curl -sf "http://127.0.0.1:$(cat "$tmp/a.mport")/metrics")
grep -qE '^aviary_storage_faults_total 1' <<<"$m" || fail "group /metrics: aviary_storage_faults_total is not 1"

echo "service_storage: $passes checks passed, $fails failed"
[ "$fails" -eq 0 ]
