#!/usr/bin/env bash
# Issue 14 item 8: normal exits of worker groups must not look like failures. Real processes on
# 127.0.0.1 (coordinator, `mpirun -np 2 --oversubscribe aviary-worker serve`), heartbeat timeout
# 6 s so that a group that did not leave would be reaped as lost within the test. (Not 3 s: a
# group's write fence then lapsed 2.5 s after its last answered heartbeat, which a loaded
# 2-core machine can stall past, and a healthy group abandoned its task.)
#   1. A group with --max-tasks 1 finishes its task and exits 0: the coordinator logs "group G
#      left", never "group G lost", and aviary_worker_groups_lost_total stays 0 after the
#      heartbeat timeout has passed.
#   2. SIGTERM to mpirun (not to the ranks) mid-task, with odls_base_sigkill_timeout 30: every
#      rank stops at the next step and exits well within those 30 s (mpirun only sends SIGTERM
#      then; the ranks used to train on until it), the task is READY again at once with no
#      restart counted (preempted), at most one more epoch was trained, and the group left
#      rather than being lost.
#   3. The same with SIGUSR2 to mpirun (the launchers' stop): mpirun exits 0 within seconds.
#   4. SIGTERM on rank 1 alone after the task's last step: the task succeeds and the group
#      leaves rather than leasing on.
# usage: service_lifecycle.sh BIN_DIR MPIEXEC
set -uo pipefail
bin=$1
mpiexec=${2:-mpirun}
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/service_lib.sh"

service_recipe 1 2 "[0]"
write_coordinator_config 6 2
start_coordinator || exit 1

# group_id NAME: the id the group registered as (from its log).
group_id() { grep -oE 'as group [^ ]+' "$tmp/$1.log" | tail -n 1 | awk '{print $3}'; }
# check_left NAME: the coordinator logged that the group left and never that it was lost.
check_left() {
  local gid
  gid=$(group_id "$1")
  if [ -z "$gid" ]; then fail "group $1 never registered"; tail -n 20 "$tmp/$1.log"; return; fi
  if grep -qF "group $gid left (" "$tmp/coordinator.log"; then ok; else
    fail "the coordinator did not log that group $1 ($gid) left"; grep -F "$gid" "$tmp/coordinator.log"
  fi
  if grep -qF "group $gid lost" "$tmp/coordinator.log"; then
    fail "group $1 ($gid) was counted as lost: $(grep -F "group $gid lost" "$tmp/coordinator.log")"
  else ok; fi
}
# check_not_lost: aviary_worker_groups_lost_total is 0 and no group is registered.
check_not_lost() {
  local m
  m=$(curl -sf "http://127.0.0.1:$mport/metrics")
  [ "$(metric "$m" aviary_worker_groups_lost_total "")" = 0 ] ||
    fail "$1: aviary_worker_groups_lost_total is $(metric "$m" aviary_worker_groups_lost_total "")"
  [ "$(metric "$m" aviary_worker_groups "")" = 0 ] ||
    fail "$1: aviary_worker_groups is $(metric "$m" aviary_worker_groups "") (the group was not removed)"
}

# 1. --max-tasks 1: the group finishes its task and leaves.
start_group a 2 --max-tasks 1
pid_a=$group_pid
job=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false | tail -n 1)
echo "job $job (2 epochs of fine-tuning) on group a (--max-tasks 1)"
if avt 300 watch "$job" > "$tmp/watch1.log" 2>&1; then ok; else
  fail "job 1 did not succeed"; tail -n 20 "$tmp/watch1.log"; tail -n 30 "$tmp/a.log"
fi
if wait_for 60 bash -c "! kill -0 $pid_a 2>/dev/null"; then
  wait "$pid_a"; rc=$?
  [ "$rc" = 0 ] || fail "group a exited with $rc after --max-tasks 1"
else
  fail "group a did not exit after --max-tasks 1"
fi
grep -q "left the coordinator as group" "$tmp/a.log" || fail "group a did not log that it left"
sleep 8  # past heartbeat_timeout_s (6 s): a group that did not leave is reaped as lost by now
check_left a
check_not_lost "after --max-tasks 1"
last_step=$(jq_status "$job" 'task("finetune")["latest"]["step"]')

# stop_mid_task NAME SIGNAL JOB: starts group NAME, waits until JOB's task trains epoch 1, sends
# SIGNAL to mpirun; sets t0 (when), before (the epoch then) and pid_g (mpirun's pid).
stop_mid_task() {
  start_group "$1" 2
  pid_g=$group_pid
  if ! wait_for 300 jq_status "$3" 'task("finetune").get("latest", {}).get("epoch", 0) >= 1'; then
    fail "$3 made no progress on group $1"; tail -n 30 "$tmp/$1.log"; return 1
  fi
  before=$(jq_status "$3" 'task("finetune")["latest"]["epoch"]')
  t0=$(date +%s.%N)
  kill "-$2" "$pid_g"
  echo "SIG$2 to mpirun (pid $pid_g, group $1) in epoch $before"
}
since() { /usr/bin/python3 -c "print(round($(date +%s.%N) - $1, 1))"; }
le() { /usr/bin/python3 -c "import sys; sys.exit(0 if $1 <= $2 else 1)"; }
# check_handed_back NAME JOB: the task is READY with no restart, no epoch was trained after the
# signal's, the group reported the preemption and left (not lost).
check_handed_back() {
  # The coordinator's log: mpirun no longer forwards the ranks' output once it is ending the job.
  local gid
  gid=$(group_id "$1")
  grep -qF "failed on group $gid (preempted): stopped by signal" "$tmp/coordinator.log" || {
    fail "group $1 ($gid) did not report the preemption"; tail -n 20 "$tmp/$1.log"; }
  jq_status "$2" 'task("finetune")["state"] == "TASK_STATE_READY"' ||
    fail "group $1: the task is not READY after the signal: $(jq_status "$2" 'task("finetune")["state"]')"
  jq_status "$2" 'task("finetune")["restarts"] == 0' || fail "group $1: the stop counted as a restart"
  local after
  after=$(jq_status "$2" 'task("finetune")["latest"]["epoch"]')
  [ "$after" -le $((before + 1)) ] || fail "group $1 trained on after the signal: epoch $before -> $after"
  sleep 7  # past heartbeat_timeout_s (6 s)
  check_left "$1"
  check_not_lost "after group $1's stop"
}

# long_job: a job that does not finish during the test (400 epochs).
long_job() { av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false --set stages.finetune.epochs=400 | tail -n 1; }

# 2. SIGTERM to mpirun mid-task. Open MPI 4.1's mpirun does not forward it: it sends the ranks
#    SIGCONT at once and SIGTERM only odls_base_sigkill_timeout (30 s here) later. The ranks take
#    the SIGCONT as a stop: every rank has stopped, reported and exited well within those 30 s
#    (before the fix they trained on until the SIGTERM). mpirun itself exits about 2 x 30 s
#    after the signal whatever the ranks do (measured with 20 s: 2 x 20), so its exit is only
#    waited for.
export OMPI_MCA_odls_base_sigkill_timeout=30
job2=$(long_job)
if stop_mid_task b TERM "$job2"; then
  # Exited: zombies (mpirun reaps them only at its end) count as gone.
  if wait_for 25 bash -c "! ps -o stat= --ppid $pid_g | grep -qv '^Z'"; then
    echo "group b's ranks exited $(since "$t0") s after SIGTERM to mpirun"; ok
  else
    fail "group b's ranks still ran 25 s after SIGTERM to mpirun (odls_base_sigkill_timeout 30): $(ps -o pid=,stat=,comm= --ppid "$pid_g")"
  fi
  check_handed_back b "$job2"
  if wait_for 90 bash -c "! kill -0 $pid_g 2>/dev/null"; then
    echo "mpirun exited $(since "$t0") s after SIGTERM"; wait "$pid_g"
  else
    fail "mpirun still ran 90 s after SIGTERM"
  fi
fi
unset OMPI_MCA_odls_base_sigkill_timeout
avt 30 cancel "$job2" >/dev/null 2>&1 || fail "cancel $job2"

# 3. SIGUSR2 to mpirun (what deploy/launch-group.sh sends on SIGTERM): forwarded to the ranks at
#    once; the group stops at the next step, hands the task back, leaves, and mpirun exits 0
#    within seconds.
job3=$(long_job)
if stop_mid_task c USR2 "$job3"; then
  if wait_for 30 bash -c "! kill -0 $pid_g 2>/dev/null"; then
    took=$(since "$t0")
    wait "$pid_g"; rc=$?
    echo "mpirun exited with $rc $took s after SIGUSR2"
    [ "$rc" = 0 ] || fail "mpirun exited with $rc after SIGUSR2"
  else
    fail "mpirun still ran 30 s after SIGUSR2"; tail -n 20 "$tmp/c.log"
  fi
  check_handed_back c "$job3"
fi
avt 30 cancel "$job3" >/dev/null 2>&1 || fail "cancel $job3"  # READY again: the next group would lease it

# 4. A signal on rank 1 alone after the task's last step (during its last validation: no step
#    exchange follows, only the epoch's end and the finish): the task still succeeds, and the
#    group leases nothing more and leaves (it used to lease on, rank 1's stop unheard, and
#    waited idle for ever).
job4=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false | tail -n 1)
AVIARY_FAULT_INJECT="rank=1,step=$((last_step - 1)),kind=sigterm" start_group d 2
pid_d=$group_pid
echo "job $job4 on group d: SIGTERM on rank 1 in the last step ($((last_step - 1)))"
if avt 300 watch "$job4" > "$tmp/watch4.log" 2>&1; then ok; else
  fail "job 4 did not succeed"; tail -n 20 "$tmp/watch4.log"; tail -n 30 "$tmp/d.log"
fi
grep -q "AVIARY_FAULT_INJECT: rank 1 raises SIGTERM" "$tmp/d.log" || fail "rank 1 raised no SIGTERM"
if wait_for 60 bash -c "! kill -0 $pid_d 2>/dev/null"; then
  wait "$pid_d"; rc=$?
  [ "$rc" = 0 ] || fail "group d exited with $rc after rank 1's SIGTERM"
  grep -q "a rank was stopped by a signal" "$tmp/d.log" || fail "group d did not say why it left"
else
  fail "group d still runs 60 s after its task, rank 1 stopped by a signal"; tail -n 20 "$tmp/d.log"
fi
check_left d

echo "service_lifecycle: $passes checks passed, $fails failed"
[ "$fails" -eq 0 ]
