#!/usr/bin/env bash
# Issue 6's fault tests with real processes on 127.0.0.1:
#   1. kill -9 of a worker group (its whole mpirun tree) mid-task: after the heartbeat timeout
#      the task is leased to another group and resumes from its last checkpoint (the epochs
#      continue; they do not start again from 0); restarts and attempts are counted.
#   2. kill -9 of the coordinator mid-job and a restart on the same SQLite file (same port): the
#      group reconnects, keeps its lease, and the job completes.
#   3. SIGTERM to a group's ranks mid-task: the task is given back as preempted (no restart
#      counted) and resumed by the next group.
#   4. A group of one rank whose training thread stops making progress (AVIARY_FAULT_INJECT
#      kind=hang_stderr: inside a log line, its stderr blocked) without failing: its watchdog
#      (--stall-timeout-s) fails the task as retryable and ends the group; the task is leased
#      again and completes on the next group.
#   5. One rank of a two-rank group fails before the first step (AVIARY_FAULT_INJECT
#      kind=fail_start: a data root missing on its host): every rank ends the task at once with
#      its cause, the group lives on, and the coordinator gets the cause with each attempt.
# usage: service_faults.sh BIN_DIR MPIEXEC
set -uo pipefail
bin=$1
mpiexec=${2:-mpirun}
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/service_lib.sh"

service_recipe 2 20 "[0]"
# 8 s: a healthy group on a loaded 2-core machine must not miss it (service_lifecycle.sh).
write_coordinator_config 8 2
start_coordinator || exit 1

# 1. A group dies mid-task.
start_group a 2
pid_a=$group_pid
job=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false | tail -n 1)
echo "job $job (20 epochs of fine-tuning); group a is $pid_a"
if wait_for 300 jq_status "$job" 'task("finetune").get("latest", {}).get("epoch", 0) >= 2 and task("finetune")["latest"].get("epoch_end", False)'; then
  done_epochs=$(jq_status "$job" 'task("finetune")["latest"]["epoch"] + 1')
  kill_session "$pid_a"
  echo "killed group a after $done_epochs epochs"
  jq_status "$job" 'j["state"] == "JOB_STATE_RUNNING"' || fail "the job was no longer running when group a was killed"
  start_group b 2
  if avt 600 watch "$job" > "$tmp/watch1.log" 2>&1; then ok; else
    fail "the job did not succeed after the group was killed"; tail -n 20 "$tmp/watch1.log"; tail -n 30 "$tmp/b.log"; tail -n 30 "$tmp/coordinator.log"
  fi
  jq_status "$job" 'task("finetune")["restarts"] == 1' || fail "restarts should be 1: $(jq_status "$job" 'task("finetune")')"
  jq_status "$job" 'task("finetune")["attempt"] == 2' || fail "attempt should be 2"
  grep -qE "resuming .*last.pt after epoch ([2-9])" "$tmp/b.log" ||
    fail "group b did not resume from the checkpoint of epoch >= 2: $(grep -m1 resuming "$tmp/b.log")"
  ft_dir=$(jq_status "$job" 'task("finetune")["out_dir"]')
  [ "$(cut -d, -f1 "$ft_dir/history.csv" | tail -n +2 | tr '\n' ' ')" = "$(seq -s ' ' 0 19) " ] ||
    fail "history.csv epochs are not 0..19 once each: $(cut -d, -f1 "$ft_dir/history.csv" | tr '\n' ' ')"
  m=$(curl -sf "http://127.0.0.1:$mport/metrics")
  grep -F "aviary_task_restarts_total{" <<<"$m" | grep -F "job_id=\"$job\"" | grep -qE ' 1$' ||
    fail "/metrics: aviary_task_restarts_total for $job is not 1"
  grep -qE '^aviary_worker_groups_lost_total 1' <<<"$m" || fail "/metrics: aviary_worker_groups_lost_total is not 1"
  n=$(av history "$job" --csv | tail -n +2 | wc -l)
  [ "$n" = 20 ] || fail "history --csv: expected 20 epoch rows, got $n"
else
  fail "group a made no progress"; tail -n 30 "$tmp/a.log"; tail -n 30 "$tmp/coordinator.log"
fi

# 2. The coordinator dies mid-job and comes back on the same SQLite file and port.
job2=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false --set stages.finetune.epochs=15 | tail -n 1)
echo "job $job2"
if wait_for 300 jq_status "$job2" 'task("finetune").get("latest", {}).get("epoch_end", False)'; then
  e=$(jq_status "$job2" 'task("finetune")["latest"]["epoch"]')
  kill -9 "$coord_pid"
  [ "$e" -lt 12 ] || fail "job 2 was nearly done (epoch $e of 15) when the coordinator was killed"
  echo "killed the coordinator (pid $coord_pid) after epoch $e of job $job2"
  wait "$coord_pid" 2>/dev/null
  start_coordinator --listen "127.0.0.1:$port" --heartbeat-timeout-s 30 || exit 1
  grep -c "listening on" "$tmp/coordinator.log" | grep -q 2 || fail "the coordinator did not log its second start"
  if avt 600 watch "$job2" > "$tmp/watch2.log" 2>&1; then ok; else
    fail "the job did not complete after the coordinator restart"; tail -n 20 "$tmp/watch2.log"; tail -n 30 "$tmp/b.log"; tail -n 30 "$tmp/coordinator.log"
  fi
  jq_status "$job2" 'task("finetune")["restarts"] == 0' || fail "the restart of the coordinator cost the task a restart"
  # The group registered under the 8 s timeout; the coordinator's heartbeat answers told it the new one.
  grep -q "the coordinator's heartbeat timeout is now 30.0 s (was 8.0 s)" "$tmp/b.log" ||
    fail "group b did not take the restarted coordinator's heartbeat timeout: $(grep -i "heartbeat timeout" "$tmp/b.log")"
  jq_status "$job" 'j["state"] == "JOB_STATE_SUCCEEDED"' || fail "the first job's state was lost"
  n=$(av history "$job2" --csv | tail -n +2 | wc -l)
  [ "$n" = 15 ] || fail "history of the second job: expected 15 epoch rows, got $n"
else
  fail "the second job made no progress"; tail -n 30 "$tmp/b.log"
fi

# 3. SIGTERM (a Slurm time limit, a preemption) to the ranks of the group mid-task: they stop at
#    the next step, rank 0 reports the task as preempted and the group exits 0; the task is
#    READY again at once (no heartbeat timeout) without counting a restart, and the next group
#    resumes it from its last.pt.
pid_b=$group_pid
job3=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false --set stages.finetune.epochs=15 | tail -n 1)
echo "job $job3"
if wait_for 300 jq_status "$job3" 'task("finetune").get("latest", {}).get("epoch", 0) >= 1'; then
  pkill -TERM -P "$pid_b"   # the ranks: mpirun's own forwarding kills them a second later
  if wait_for 60 bash -c "! kill -0 $pid_b 2>/dev/null"; then
    wait "$pid_b"; rc=$?
    [ "$rc" = 0 ] || fail "group b exited with $rc after SIGTERM"
  else
    fail "group b did not exit after SIGTERM"
  fi
  grep -q "stopped by signal; reported as preempted" "$tmp/b.log" || fail "group b did not report the preemption"
  wait_for 10 jq_status "$job3" 'task("finetune")["state"] == "TASK_STATE_READY"' ||
    fail "the preempted task is not READY at once: $(jq_status "$job3" 'task("finetune")["state"]')"
  jq_status "$job3" 'task("finetune")["restarts"] == 0' || fail "the preemption counted as a restart"
  start_group c 2
  if avt 600 watch "$job3" > "$tmp/watch3.log" 2>&1; then ok; else
    fail "the preempted job did not complete on group c"; tail -n 20 "$tmp/c.log"
  fi
  jq_status "$job3" 'task("finetune")["restarts"] == 0 and task("finetune")["attempt"] == 2' ||
    fail "after the preemption: restarts should be 0 and attempt 2"
  # SIGTERM lands in epoch 1 or later (the client sees epoch 1's first step within milliseconds),
  # so last.pt holds epoch 0 or a later one: any resume from it is right, a fresh start is not.
  grep -qE "resuming .*last.pt after epoch [0-9]+" "$tmp/c.log" ||
    fail "group c did not resume from the checkpoint: $(grep -m3 -E 'leased|resuming|epoch 1/' "$tmp/c.log")"
else
  fail "job 3 made no progress"; tail -n 30 "$tmp/b.log"
fi

# 4. A stuck task: nothing fails, nothing times out (one rank has no peer to notice), and the
#    link's thread keeps heartbeating, so only the watchdog can give the task back. It is stuck
#    inside a log line, its stderr a pipe nobody reads (kind=hang_stderr): the watchdog's own
#    log line waits behind it, so the report goes first and the process ends whatever blocks
#    (the watchdog used to block on its first log line, the lease renewed for ever).
kill -USR2 "$group_pid" 2>/dev/null   # group c: a clean stop, so that group d leases job 4
wait_for 60 bash -c "! kill -0 $group_pid 2>/dev/null" || fail "group c did not stop on SIGUSR2"
# 15 s: the start (the communicator, the trainer, the first batches) fits in it on a loaded
# machine; if it does not, the watchdog fires there instead, and the task goes on elsewhere all
# the same.
AVIARY_FAULT_INJECT="rank=0,step=4,kind=hang_stderr" start_group d 1 --stall-timeout-s 15
pid_d=$group_pid
job4=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false --set stages.finetune.epochs=3 | tail -n 1)
echo "job $job4 (group d hangs at step 4)"
if wait_for 180 bash -c "! kill -0 $pid_d 2>/dev/null"; then
  wait "$pid_d"; rc=$?
  [ "$rc" != 0 ] || fail "group d exited 0 after its watchdog ended it"
  grep -q "AVIARY_FAULT_INJECT: rank 0 blocks its stderr at step 4" "$tmp/d.log" ||
    fail "group d did not reach its fault: $(grep -m3 -E 'FAULT|progress|ends the group' "$tmp/d.log")"
  grep -q "task .* failed on group .* (retryable): task .*: no progress on rank 0 (or a rank it waits for) for [0-9]* s (the last sign: [^;]*; --stall-timeout-s 15)" "$tmp/coordinator.log" ||
    fail "the coordinator did not get the stall as a retryable failure: $(grep -m3 'failed on group' "$tmp/coordinator.log")"
  jq_status "$job4" 'task("finetune")["state"] == "TASK_STATE_READY" and task("finetune")["restarts"] == 1' ||
    fail "the stalled task is not READY with one restart: $(jq_status "$job4" 'task("finetune")')"
  start_group e 1
  if avt 600 watch "$job4" > "$tmp/watch4.log" 2>&1; then ok; else
    fail "the stalled job did not complete on group e"; tail -n 20 "$tmp/e.log"
  fi
else
  fail "group d did not end within 180 s of its stall"; tail -n 30 "$tmp/d.log"
fi

# 5. A rank that cannot start while the others can: they used to wait for it in the start's
#    barrier (1800 s), and the coordinator learnt only that a rank did not arrive.
kill -USR2 "$group_pid" 2>/dev/null   # group e
wait_for 60 bash -c "! kill -0 $group_pid 2>/dev/null" || fail "group e did not stop on SIGUSR2"
AVIARY_FAULT_INJECT="rank=1,kind=fail_start" start_group f 2
pid_f=$group_pid
job5=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false --set stages.finetune.epochs=2 | tail -n 1)
echo "job $job5 (rank 1 of group f cannot start)"
if wait_for 180 jq_status "$job5" 'j["state"] == "JOB_STATE_FAILED"'; then
  jq_status "$job5" '"rank 1: AVIARY_FAULT_INJECT: rank 1 cannot start" in j["error"] and task("finetune")["restarts"] == 2' ||
    fail "job 5 failed without rank 1's cause or with other restarts: $(jq_status "$job5" 'j["error"]'), $(jq_status "$job5" 'task("finetune")["restarts"]')"
  [ "$(grep -c "failed on group .* (retryable): rank 1: AVIARY_FAULT_INJECT" "$tmp/coordinator.log")" = 3 ] ||
    fail "the coordinator did not get rank 1's cause with each of the 3 attempts: $(grep -m3 'failed on group' "$tmp/coordinator.log")"
  kill -0 "$pid_f" 2>/dev/null || fail "group f ended: the ranks did not agree on the outcome"
else
  fail "job 5 did not fail within 180 s"; tail -n 30 "$tmp/f.log"; tail -n 20 "$tmp/coordinator.log"
fi

echo "service_faults: $passes checks passed, $fails failed"
[ "$fails" -eq 0 ]
