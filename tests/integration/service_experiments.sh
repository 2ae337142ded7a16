#!/usr/bin/env bash
# Issue 16 ("around the console"), end to end with real processes on 127.0.0.1: a coordinator, a
# 2-rank worker group under mpirun, the `aviary` client, on the synthetic corpus (small CNN):
#   - a sweep (2 x 2 fine-tuning points sharing one pretraining) with tags and a note: refused
#     keys and values named before any work; SUCCEEDED; status reports the best point; list and
#     list --json show the tags;
#   - `logs --follow` streams the group's lines of every task, each once, and ends with the job;
#   - `groups` / `groups --json` show the group;
#   - `retry` of a cancelled job resumes its pretraining from the checkpoint it left;
#   - `delete` refuses a job that is not finished, removes a finished one (and its run folder
#     only with --with-run-folders).
# usage: service_experiments.sh BIN_DIR MPIEXEC
set -uo pipefail
bin=$1
mpiexec=${2:-mpirun}
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/service_lib.sh"

service_recipe 1 1 "[0]"
write_coordinator_config 20 2
start_coordinator || exit 1
echo "coordinator on 127.0.0.1:$port"

# Sweep refusals: named before any work, nothing recorded.
expect "train.lrr" av submit "$tmp/p.yaml" --sweep "train.lrr=[1e-3,2e-3]"
expect "sweep point 1 (train.lr=fast)" av submit "$tmp/p.yaml" --sweep "train.lr=[1e-3,fast]"
expect "changes 'seed'" av submit "$tmp/p.yaml" --sweep "seed=[1,2]"
expect "--sweep 'train.lr=1e-3': the values are not one [...] list" av submit "$tmp/p.yaml" --sweep train.lr=1e-3
expect "tags[0]" av submit "$tmp/p.yaml" --tag "bad key"
no_jobs_listed || fail "a refused submission left a job behind"

start_group g1 2
wait_for 60 sh -c "'$bin/aviary' --coordinator 127.0.0.1:$port --token-file '$tmp/token' groups | grep -q idle" ||
  fail "groups does not show the idle group"
job=$(av submit "$tmp/p.yaml" --name sweep --tag team=birds --tag smoke --note "e2e sweep" \
  --sweep "stages.finetune.lr_max_per_sample=[1.4e-6,5e-7]" --sweep "stages.finetune.label_smoothing=[0.0,0.1]" | tail -n 1)
[[ "$job" =~ ^j[0-9a-f]{12}$ ]] || fail "submit's last line is not a job id: '$job'"
echo "sweep job $job"
jq_status "$job" 'len(j["tasks"]) == 5' || fail "a 2 x 2 fine-tuning sweep over one fold should have 5 tasks (one pretraining)"
jq_status "$job" 'j["tags"] == {"team": "birds", "smoke": ""} and j["note"] == "e2e sweep"' || fail "tags or note not stored"
avt 900 logs "$job" --follow > "$tmp/logs.log" 2>"$tmp/logs.err" &
logs_pid=$!
# While it runs: groups shows the group and the task it holds.
wait_for 120 sh -c "'$bin/aviary' --coordinator 127.0.0.1:$port --token-file '$tmp/token' groups | grep -q '$job/'" ||
  fail "groups does not show the task the group runs"
av groups --json > "$tmp/groups.json" || fail "groups --json"
/usr/bin/python3 -c '
import json, sys
g = json.load(open(sys.argv[1]))["groups"]
assert len(g) == 1 and g[0]["world_size"] == 2 and g[0]["backend"] == "mpi", g
' "$tmp/groups.json" || fail "groups --json: expected one 2-rank mpi group"
if avt 900 watch "$job" > "$tmp/watch.log" 2>&1; then ok; else
  fail "the sweep did not succeed"; tail -n 30 "$tmp/watch.log"; tail -n 30 "$tmp/g1.log"
  kill "$logs_pid" 2>/dev/null  # a job still running would hold logs --follow for its 900 s
fi
wait "$logs_pid" || fail "logs --follow did not end cleanly with the job (rc $?)"
for t in pretrain-f0-p0 finetune-f0-p0 finetune-f0-p3; do
  grep -q "^$job/$t  .*\[rank 0\]" "$tmp/logs.log" || fail "logs --follow has no line of $t"
done
grep -q "SUCCEEDED" "$tmp/logs.err" || fail "logs --follow did not say how the job ended"
# Every line once (ShipLogs runs on the heartbeat thread and at a task's end; a line is stamped to
# the millisecond, so two equal lines are one line shipped twice).
av logs "$job" > "$tmp/logs-all.log" && grep -q "^$job/pretrain-f0-p0  .*\[rank 0\]" "$tmp/logs-all.log" ||
  fail "logs has no line of the pretraining"
for f in logs.log logs-all.log; do
  dups=$(sort "$tmp/$f" | uniq -d | head -n 3)
  [ -z "$dups" ] || fail "$f has lines twice: $dups"
done
av status "$job" > "$tmp/status.txt" || fail "status"
grep -q "^best     point [0-3] (stages.finetune.lr_max_per_sample=.*): val_auc [0-9.]*, mean of 1/1 folds" "$tmp/status.txt" ||
  { fail "status does not report the best sweep point"; cat "$tmp/status.txt"; }
grep -q "^tags     smoke team=birds" "$tmp/status.txt" && grep -q "^note     e2e sweep" "$tmp/status.txt" ||
  fail "status does not show the tags and the note"
jq_status "$job" 'j["sweep_best"]["metric"] == "val_auc" and 0 <= j["sweep_best"]["value"] <= 1' || fail "status --json: sweep_best"
# The best point is the one whose fine-tuning has the highest best val_auc (one fold).
jq_status "$job" 'max((t for t in j["tasks"] if t["stage"] == "finetune"), key=lambda t: t["best"]["val_auc"])["sweep_point"] == j["sweep_best"]["point"]' ||
  fail "sweep_best is not the point with the highest val_auc"
av list | grep -q "$job .*sweep  \[smoke team=birds\]" || fail "list does not show the tags"
av list --json | /usr/bin/python3 -c 'import json,sys; j=json.load(sys.stdin); sys.exit(0 if j["jobs"][0]["tags"]["team"] == "birds" else 1)' ||
  fail "list --json"
av logs "$job" --task pretrain-f0-p0 --tail 3 > "$tmp/tail.log" || fail "logs --tail"
[ "$(wc -l < "$tmp/tail.log")" -eq 3 ] || fail "logs --tail 3 printed $(wc -l < "$tmp/tail.log") lines"

# Retry: a job cancelled once its pretraining wrote last.pt resumes from it.
expect "only a FAILED or CANCELLED job can be retried" av retry "$job"
# Cancelling a job that had ended: exit 0 (it is not running, as asked), not said as if cancelled.
if out=$(av cancel "$job" 2>&1) && [ "$out" = "job $job had already ended (SUCCEEDED): nothing to cancel" ]; then
  ok
else
  fail "cancel of a SUCCEEDED job said: $out"
fi
# 12 epochs: the pretraining must still run when the cancel lands (seeing epoch 1 and cancelling
# takes a second or two; with 4 epochs of about a second each it sometimes finished first).
job2=$(av submit "$tmp/p.yaml" --name retry --set stages.pretrain.epochs=12 | tail -n 1)
# Cancelled once the coordinator has the checkpoint of epoch 0: the group reports in order, so a
# step point of epoch 1 comes after the checkpoint written at the end of epoch 0.
wait_for 300 jq_status "$job2" 'task("pretrain").get("latest", {}).get("epoch", 0) >= 1' ||
  fail "the pretraining did not reach epoch 1"
test -s "$tmp/runs/$job2/pretrain-fold0/last.pt" || fail "the pretraining wrote no last.pt"
expect "cancel it first" av delete "$job2"
av cancel "$job2" > /dev/null || fail "cancel"
jq_status "$job2" 'j["state"] == "JOB_STATE_CANCELLED"' || fail "not CANCELLED"
jq_status "$job2" 'task("pretrain")["state"] == "TASK_STATE_CANCELLED"' ||
  fail "the pretraining had finished before the cancel: $(jq_status "$job2" 'task("pretrain")["state"]')"
av retry "$job2" > "$tmp/retry.txt" || fail "retry"
grep -q "tasks to run again" "$tmp/retry.txt" || fail "retry said: $(cat "$tmp/retry.txt")"
if avt 900 watch "$job2" > "$tmp/watch2.log" 2>&1; then ok; else
  fail "the retried job did not succeed"; tail -n 30 "$tmp/watch2.log"; tail -n 30 "$tmp/g1.log"
fi
jq_status "$job2" 'task("pretrain")["attempt"] == 2' || fail "the retried pretraining should be attempt 2"
# The second attempt resumed from the checkpoint the first one left (the trainer says so in the
# task's log, which the group shipped).
av logs "$job2" --task pretrain-f0 > "$tmp/logs2.log" || fail "logs of the retried job"
# `aviary logs` shows the rank once, from the line's rank field ("[rank 0] [agent] [rank 0] ..."
# before: the text carried it too).
grep -q "info    \[rank 0\] \[trainer\] resuming $tmp/runs/$job2/pretrain-fold0/.* after epoch [0-9]" "$tmp/logs2.log" ||
  { fail "the retried pretraining did not resume from its checkpoint"; grep -i resum "$tmp/logs2.log"; }
grep -q "leased task $job2/pretrain-f0 (attempt 2" "$tmp/logs2.log" || fail "the log lacks the second lease"

# Delete: without and with the run folders.
av delete "$job2" --with-run-folders > "$tmp/delete.txt" || fail "delete"
grep -q "removed $(realpath "$tmp")/runs/$job2" "$tmp/delete.txt" || fail "delete said: $(cat "$tmp/delete.txt")"
[ ! -e "$tmp/runs/$job2" ] || fail "the run folder of $job2 is still there"
expect "NOT_FOUND" av status "$job2"
av delete "$job" > /dev/null || fail "delete of the sweep"
[ -d "$tmp/runs/$job" ] || fail "delete without --with-run-folders removed the run folder"
no_jobs_listed || fail "deleted jobs are still listed"

echo "service_experiments: $passes checks passed, $fails failed"
[ "$fails" -eq 0 ]
