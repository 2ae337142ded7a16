#!/usr/bin/env bash
# Issue 14 item 9, with real processes on 127.0.0.1: a group cut off from the coordinator but
# not from the run folder (a network partition: group a reaches the coordinator through a TCP
# relay that the test stops with SIGSTOP) keeps training, but its lease runs out before the
# coordinator leases the task again (heartbeat timeout), and from then on it writes nothing into
# the run folder: the next group's attempt is the only writer.
#   - group a logs "lease for task T attempt 1 expired ...; not writing PATH" and abandons the
#     task (no epoch of it is written after that; aviary_fenced_writes_total counts it);
#   - group b resumes from the last checkpoint group a wrote within its lease and completes;
#   - last.pt records task T attempt 2; history.csv has every epoch once;
#   - healed, group a hears NOT_FOUND, registers again and stays up.
# usage: service_fencing.sh BIN_DIR MPIEXEC
set -uo pipefail
bin=$1
mpiexec=${2:-mpirun}
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/service_lib.sh"

service_recipe 2 16 "[0]"
write_coordinator_config 6 2
start_coordinator || exit 1
/usr/bin/python3 "$(dirname "$0")/tcp_proxy.py" "$tmp/proxy.port" "$port" > "$tmp/proxy.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
wait_for 20 test -s "$tmp/proxy.port" || { fail "the relay did not start"; exit 1; }
pport=$(cat "$tmp/proxy.port")
# Group a dials the coordinator through the relay.
setsid "$mpiexec" -np 2 --oversubscribe "$bin/aviary-worker" serve --coordinator "127.0.0.1:$pport" \
  --token-file "$tmp/worker.token" --metrics-listen 127.0.0.1:0 --metrics-port-file "$tmp/a.mport" \
  --threads 1 > "$tmp/a.log" 2>&1 &
pid_a=$!
pids+=("$pid_a")
job=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false | tail -n 1)
task="$job/finetune-f0"
echo "job $job (16 epochs of fine-tuning); group a is $pid_a behind the relay on port $pport"
if ! wait_for 300 jq_status "$job" 'task("finetune").get("latest", {}).get("epoch", 0) >= 1 and task("finetune")["latest"].get("epoch_end", False)'; then
  fail "group a made no progress"; tail -n 30 "$tmp/a.log"; exit 1
fi
ft_dir=$(jq_status "$job" 'task("finetune")["out_dir"]')

# The partition.
kill -STOP "$proxy_pid"
echo "partitioned group a from the coordinator"
if ! wait_for 60 grep -q "lease for task $task attempt 1 expired" "$tmp/a.log"; then
  fail "group a did not stop writing when its lease ran out"; tail -n 30 "$tmp/a.log"
fi
grep -qE "lease for task $task attempt 1 expired .*; not writing $ft_dir/" "$tmp/a.log" ||
  fail "the fence line does not name the task, attempt and path: $(grep -m1 'lease for task' "$tmp/a.log")"
wait_for 20 grep -q "task $task attempt 1 abandoned" "$tmp/a.log" || fail "group a did not abandon the task"
# The trainer's epoch lines say "epoch N/15:" (0-based, of 16). Group a ended epoch 1 at least.
epochs_a=$(grep -cE "epoch [0-9]+/15:" "$tmp/a.log")
[ "$epochs_a" -ge 2 ] || fail "group a's log has $epochs_a epoch lines (wanted 2 or more): the check below would prove nothing"
wait_for 60 grep -q "lost (no heartbeat" "$tmp/coordinator.log" || fail "the coordinator did not time group a out"

# Group b, on the coordinator directly, takes the task over.
start_group b 2
if avt 600 watch "$job" > "$tmp/watch.log" 2>&1; then ok; else
  fail "the job did not succeed on group b"; tail -n 20 "$tmp/watch.log"; tail -n 30 "$tmp/b.log"
fi
grep -qE "resuming .*last.pt after epoch [0-9]+ \(step [0-9]+, written by task $task attempt 1\)" "$tmp/b.log" ||
  fail "group b did not resume from group a's last checkpoint: $(grep -m1 resuming "$tmp/b.log")"
[ "$(grep -cE "epoch [0-9]+/15:" "$tmp/a.log")" = "$epochs_a" ] ||
  fail "group a wrote epochs after its lease ran out"
jq_status "$job" 'task("finetune")["attempt"] == 2 and task("finetune")["restarts"] == 1' ||
  fail "expected attempt 2 and 1 restart: $(jq_status "$job" 'task("finetune")')"
grep -aq "task_id: $task" "$ft_dir/last.pt" && grep -aq "attempt: 2" "$ft_dir/last.pt" ||
  fail "last.pt does not record task $task attempt 2"
[ "$(cut -d, -f1 "$ft_dir/history.csv" | tail -n +2 | tr '\n' ' ')" = "$(seq -s ' ' 0 15) " ] ||
  fail "history.csv epochs are not 0..15 once each: $(cut -d, -f1 "$ft_dir/history.csv" | tr '\n' ' ')"
[ -z "$(find "$ft_dir" -name '*.tmp.*')" ] || fail "temporary files left: $(find "$ft_dir" -name '*.tmp.*')"
m=$(curl -sf "http://127.0.0.1:$(cat "$tmp/a.mport")/metrics")
v=$(grep -E '^aviary_fenced_writes_total ' <<<"$m" | awk '{print $NF}')
[ -n "$v" ] && [ "${v%.*}" -ge 1 ] || fail "group a's /metrics: aviary_fenced_writes_total is '$v', expected >= 1"

# Healed: group a learns that it was removed, registers again and stays up.
kill -CONT "$proxy_pid"
wait_for 60 grep -q "the group registers again" "$tmp/a.log" || fail "group a did not register again after the partition"
kill -0 "$pid_a" 2>/dev/null || fail "group a ended"

echo "service_fencing: $passes checks passed, $fails failed"
[ "$fails" -eq 0 ]
