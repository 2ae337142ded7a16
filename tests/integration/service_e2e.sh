#!/usr/bin/env bash
# Issue 6's acceptance, end to end with real processes on 127.0.0.1 (ports chosen at run time):
# a coordinator (SQLite file, bearer token), a 2-rank worker group under mpirun, the `aviary`
# client, and a real Prometheus server (Debian `prometheus`) scraping the coordinator.
#   - submit (pretrain -> fine-tune) -> watch -> SUCCEEDED, with the metrics in SQLite, in
#     `aviary status --json`, on the coordinator's and the group's /metrics, and in Prometheus'
#     HTTP API; history with a plot; list;
#   - calls without the token or with a wrong one are refused (UNAUTHENTICATED), and the worker
#     groups' token does not work for the client (PERMISSION_DENIED);
#   - an invalid config is refused at submit with the key named;
#   - prune (dry run, then for real) of the finished job; its state and history stay;
#   - cancel stops a running task within a few steps; its fine-tuning manifest, pruned with the
#     first job and built again, is the same content, which the group has cached.
# usage: service_e2e.sh BIN_DIR MPIEXEC
set -uo pipefail
bin=$1
mpiexec=${2:-mpirun}
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/service_lib.sh"

service_recipe 2 3 "[0]"
write_coordinator_config 20 2
start_coordinator || exit 1
echo "coordinator on 127.0.0.1:$port, metrics on :$mport"

# Prometheus scrapes the coordinator every second.
if command -v prometheus >/dev/null; then
  pport=$(free_port)
  cat > "$tmp/prometheus.yml" <<YAML
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: aviary-coordinator
    static_configs: [{targets: ["127.0.0.1:$mport"]}]
YAML
  setsid prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/prom" \
    --web.listen-address="127.0.0.1:$pport" > "$tmp/prometheus.log" 2>&1 &
  pids+=($!)
else
  fail "prometheus is not installed (scripts/test.sh installs the Debian package)"
fi

# Refusals before any work: no token, a wrong token, an invalid config.
expect "UNAUTHENTICATED" "$bin/aviary" --coordinator "127.0.0.1:$port" list
echo "not-the-token" > "$tmp/wrong"
expect "UNAUTHENTICATED" "$bin/aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/wrong" list
expect "PERMISSION_DENIED" "$bin/aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/worker.token" list
expect "train.epochz" av submit "$tmp/p.yaml" --set train.epochz=3
cp "$tmp/p.yaml" "$tmp/bad.yaml"; echo "modle: {name: small_cnn}" >> "$tmp/bad.yaml"
expect "bad.yaml:$(wc -l < "$tmp/bad.yaml")" av submit "$tmp/bad.yaml"
expect "model.name" av submit "$tmp/p.yaml" --set model.name=resnet9000
expect "NOT_FOUND" av status jffffffffffff
# Issue 14: paths outside the coordinator's data_roots and absurd numbers are refused at submit.
expect "--set data.cache_dir=/etc: key 'data.cache_dir': '/etc' resolves to '/etc', outside the data roots" av submit "$tmp/p.yaml" --set data.cache_dir=/etc
# A relative data path resolves against the folder the client ran in (not the config's), and the
# refusal says so.
expect "'rel/cache' is relative: it resolves against the folder the client ran in, /, not against the config's folder" \
  bash -c 'cd / && "$0" --coordinator "$1" --token-file "$2" submit "$3" --set data.cache_dir=rel/cache' \
  "$bin/aviary" "127.0.0.1:$port" "$tmp/token" "$tmp/p.yaml"
expect "key 'model.pretrained_weights': '/etc/shadow'" av submit "$tmp/p.yaml" --set model.pretrained_weights=/etc/shadow
expect "key 'train.epochs': expected an integer in [1, 10000], got '2147483647'" av submit "$tmp/p.yaml" --set train.epochs=2147483647
expect "key 'train.loss': expected CCE while model.final_act is softmax" av submit "$tmp/p.yaml" --set train.loss=BCE
# The client's own refusals name the flag, the argument or the path (exit 2, no call made).
expect "--timeout: expected a number in [0.001, 86400], got 'abc'" av --timeout abc list
expect "--limit: expected an integer in [0, 10000], got '-1'" av list --limit -1
expect "aviary status: JOB is required" av status
expect "'$tmp/nope.yaml' does not exist" av submit "$tmp/nope.yaml"
expect "'$tmp' is a directory, expected a file" av submit "$tmp"
expect "pipeline config: /dev/zero: larger than 4194304 bytes" av submit /dev/zero
expect "model.pretrained_weights': expected '' while model.pretrain is 'none'" av submit "$tmp/p.yaml" --set model.pretrained_weights=$tmp/w.pt
# Text that is not UTF-8 (a Latin-1 comment) is named by line and column, not a bare INTERNAL.
{ cat "$tmp/p.yaml"; printf '\n# Rohrs\xe4nger\n'; } > "$tmp/latin1.yaml"
expect "$tmp/latin1.yaml:$(grep -na Rohrs "$tmp/latin1.yaml" | cut -d: -f1):8: byte 0xE4 is not UTF-8" av submit "$tmp/latin1.yaml"
expect "--name:1:4: byte 0xE9 is not UTF-8" av submit "$tmp/p.yaml" --name "$(printf 'caf\xe9')"
no_jobs_listed || fail "a refused submission left a job behind"

start_group g1 2
job=$(av submit "$tmp/p.yaml" --name e2e | tail -n 1)
[[ "$job" =~ ^j[0-9a-f]{12}$ ]] || fail "submit's last line is not a job id: '$job'"
echo "job $job"
if avt 600 watch "$job" > "$tmp/watch.log" 2>&1; then
  ok
else
  fail "watch did not end with SUCCEEDED"; tail -n 30 "$tmp/watch.log"; tail -n 30 "$tmp/g1.log"; tail -n 30 "$tmp/coordinator.log"
fi
tail -n 8 "$tmp/watch.log"

# status --json: the job and both tasks succeeded, with their metrics and checkpoints.
jq_status "$job" 'j["state"] == "JOB_STATE_SUCCEEDED"' || fail "status: job not SUCCEEDED"
jq_status "$job" 'len(j["tasks"]) == 2' || fail "status: expected 2 tasks (pretrain, finetune fold 0)"
jq_status "$job" 'all(t["state"] == "TASK_STATE_SUCCEEDED" for t in j["tasks"])' || fail "status: a task did not succeed"
jq_status "$job" 'task("finetune")["latest"]["epoch"] == 2 and task("pretrain")["latest"]["epoch"] == 1' ||
  fail "status: the latest epochs are not the last ones"
jq_status "$job" '0 <= float(task("finetune")["best"]["val_roc_auc"]) <= 1' || fail "status: the best val_roc_auc is not a number in [0, 1]"
best_ckpt=$(jq_status "$job" 'task("pretrain")["best_checkpoint"]')
[ -s "$best_ckpt" ] || fail "the pretraining's best checkpoint '$best_ckpt' does not exist"
ft_dir=$(jq_status "$job" 'task("finetune")["out_dir"]')
[ -s "$ft_dir/history.csv" ] && [ -s "$ft_dir/best.pt" ] || fail "the fine-tuning run folder '$ft_dir' lacks history.csv/best.pt"
grep -q "initialised from $best_ckpt" "$tmp/g1.log" || fail "the fine-tuning did not start from the pretraining's best.pt"
val_auc=$(jq_status "$job" 'task("finetune")["latest"]["val_auc"]')

# SQLite holds the job and its epoch metrics (read with the sqlite3 shell, not our code).
n=$(sqlite3 "$tmp/aviary.db" "SELECT COUNT(*) FROM metric_points WHERE task_id LIKE '$job/%' AND epoch_end = 1" 2>&1)
[ "$n" = 5 ] || fail "SQLite: expected 5 epoch points (2 pretrain + 3 finetune), got '$n'"
[ "$(sqlite3 "$tmp/aviary.db" "SELECT state FROM jobs WHERE job_id = '$job'" 2>&1)" != "" ] || fail "SQLite: no jobs row"

# The coordinator's /metrics.
m=$(curl -sf "http://127.0.0.1:$mport/metrics") || fail "GET /metrics"
v=$(metric "$m" aviary_val_auc "job_id=\"$job\"" | head -n1)
sel="job_id=\"$job\",stage=\"finetune\",fold=\"0\""
got=$(grep -F "aviary_val_auc{" <<<"$m" | grep -F "job_id=\"$job\"" | grep -F 'stage="finetune"' | grep -F 'fold="0"' | awk '{print $NF}')
/usr/bin/python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); sys.exit(0 if abs(a-b)<1e-9 else 1)" "${got:-nan}" "$val_auc" ||
  fail "/metrics aviary_val_auc{$sel} = '${got}', status says $val_auc"
for name in aviary_val_roc_auc aviary_val_accuracy aviary_train_loss aviary_learning_rate; do
  grep -F "$name{" <<<"$m" | grep -qF "job_id=\"$job\"" || fail "/metrics lacks $name for $job"
done
grep -qE '^aviary_jobs\{state="succeeded"\} 1' <<<"$m" || fail "/metrics: aviary_jobs{state=\"succeeded\"} is not 1"
grep -qE '^aviary_worker_groups 1' <<<"$m" || fail "/metrics: aviary_worker_groups is not 1"

# The group's own /metrics.
if [ -s "$tmp/g1.mport" ]; then
  gm=$(curl -sf "http://127.0.0.1:$(cat "$tmp/g1.mport")/metrics") || fail "GET the group's /metrics"
  s=$(grep -E '^aviary_samples_total\{' <<<"$gm" | awk '{print $NF}')
  /usr/bin/python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)" "${s:-0}" || fail "group: aviary_samples_total is '${s}'"
  grep -qE '^aviary_step_duration_seconds_count\{' <<<"$gm" || fail "group: no aviary_step_duration_seconds histogram"
  grep -qE '^aviary_allreduce_duration_seconds_count\{' <<<"$gm" || fail "group: no aviary_allreduce_duration_seconds histogram"
  # Idle after the job: its throughput and loader queue read 0, not the last task's values.
  for name in aviary_samples_per_second aviary_loader_queue_depth; do
    grep -qE "^$name\{[^}]*\} 0$" <<<"$gm" || fail "group (idle): $(grep -E "^$name\{" <<<"$gm")"
  done
else
  fail "the group wrote no metrics port file"
fi

# Prometheus scraped the coordinator: its HTTP API returns aviary_val_auc for the job.
if [ -n "${pport:-}" ]; then
  q="http://127.0.0.1:$pport/api/v1/query?query=aviary_val_auc%7Bjob_id%3D%22$job%22%7D"
  if wait_for 60 bash -c "curl -sf '$q' | grep -q '\"job_id\":\"$job\"'"; then
    ok
    curl -sf "$q" | /usr/bin/python3 -c "
import json, sys
r = json.load(sys.stdin)['data']['result']
print('prometheus:', ', '.join(f\"aviary_val_auc{{stage={x['metric']['stage']},fold={x['metric']['fold']}}} = {x['value'][1]}\" for x in r))"
  else
    fail "Prometheus' API has no aviary_val_auc for $job"; tail -n 20 "$tmp/prometheus.log"
  fi
fi

# history (table and plot) and list.
av history "$job" --plot "$tmp/history.png" > "$tmp/history.txt" 2>&1 || fail "history"
[ "$(head -c 4 "$tmp/history.png" | od -An -c | tr -d ' ')" = "211PNG" ] || fail "history --plot wrote no PNG"
grep -q finetune "$tmp/history.txt" && grep -q pretrain "$tmp/history.txt" || fail "history lacks a stage"
av list | grep -q "$job" || fail "list does not show $job"
# --task: the named task's rows only (its name within the job, or its id); a task the job does
# not have is refused, named, exit 2.
av history "$job" --csv > "$tmp/history_all.csv" || fail "history --csv"
first_task=$(sed -n 2p "$tmp/history_all.csv" | cut -d, -f1)
[ -n "$first_task" ] || fail "history --csv has no rows"
av history "$job" --task "${first_task#*/}" --csv > "$tmp/history_one.csv" || fail "history --task ${first_task#*/}"
[ "$(tail -n +2 "$tmp/history_one.csv")" = "$(grep "^$first_task," "$tmp/history_all.csv")" ] &&
  [ "$(tail -n +2 "$tmp/history_one.csv" | wc -l)" -lt "$(tail -n +2 "$tmp/history_all.csv" | wc -l)" ] ||
  fail "history --task ${first_task#*/}: not exactly that task's rows"
av history "$job" --task "$first_task" --csv | cmp -s - "$tmp/history_one.csv" || fail "history --task by id differs"
out=$(av history "$job" --task finetune-f99 2>&1); rc=$?
[ "$rc" = 2 ] && grep -q "NOT_FOUND: job $job has no task 'finetune-f99'" <<<"$out" ||
  fail "history --task finetune-f99 -> rc=$rc: $out"
out=$(av history "$job" --task 'fine tune' 2>&1); rc=$?
[ "$rc" = 2 ] && grep -q "INVALID_ARGUMENT: field 'tasks\[0\]': 'fine tune' is not a task" <<<"$out" ||
  fail "history --task 'fine tune' -> rc=$rc: $out"

# prune (issue 15): a dry run counts what the finished job would lose and removes nothing; the
# real run removes the same (its step points, its manifests: no other job refers to them); its
# state and epoch history stay.
av prune --older-than 0 --dry-run > "$tmp/prune_dry.log" 2>&1 || fail "prune --dry-run"; cat "$tmp/prune_dry.log"
grep -qE "^job $job: would remove [1-9][0-9]* step points, 2 task manifest references$" "$tmp/prune_dry.log" ||
  fail "prune --dry-run does not name $job's step points and 2 manifests"
grep -qE "^dry run: 1 job\(s\) finished more than 0 days ago; would remove 2 stored manifests .*nothing was removed$" \
  "$tmp/prune_dry.log" || fail "prune --dry-run: not 2 stored manifests of 1 job"
av prune --older-than 0 > "$tmp/prune.log" 2>&1 || fail "prune"; cat "$tmp/prune.log"
grep -qE "^job $job: removed [1-9][0-9]* step points, 2 task manifest references$" "$tmp/prune.log" &&
  grep -qE "^pruned 1 job\(s\) finished more than 0 days ago; removed 2 stored manifests" "$tmp/prune.log" ||
  fail "prune did not remove what its dry run counted"
[ "$(sed -n 's/^job [^:]*: would remove \([0-9]*\) step.*/\1/p' "$tmp/prune_dry.log")" = \
  "$(sed -n 's/^job [^:]*: removed \([0-9]*\) step.*/\1/p' "$tmp/prune.log")" ] || fail "prune removed other counts than its dry run"
av prune --older-than 0 | grep -q "^pruned 0 job(s)" || fail "a second prune found something left"
jq_status "$job" 'j["state"] == "JOB_STATE_SUCCEEDED"' || fail "status after prune: job not SUCCEEDED"
av history "$job" | grep -q finetune || fail "history after prune lacks the epoch rows"

# Cancel: a long job; once its task has trained a few steps, cancel it. The group stops within
# a few steps (its sample counter stands still) and the job is CANCELLED.
job2=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false --set stages.finetune.epochs=200 | tail -n 1)
if wait_for 120 jq_status "$job2" 'int(task("finetune").get("latest", {}).get("step", 0)) >= 3'; then
  grep -qE "manifest [0-9a-f]{12} \([0-9]+ bytes\) from the cache" "$tmp/g1.log" ||
    fail "the group fetched $job2's manifest again (the same content as $job's fine-tuning manifest)"
  av cancel "$job2" > "$tmp/cancel.log" 2>&1 || fail "cancel"; cat "$tmp/cancel.log"
  jq_status "$job2" 'j["state"] == "JOB_STATE_CANCELLED"' || fail "the cancelled job is not CANCELLED"
  # The task's last line comes after the trainer's last step exchange: no sample is counted after
  # it. (Whichever it is: a cancel revokes the lease, and a last.pt written just then is refused.)
  wait_for 60 grep -qE "task $job2/finetune-f0 (stopped|attempt [0-9]+ abandoned|failed)" "$tmp/g1.log" ||
    { fail "the group did not end the cancelled task"; grep -F "$job2" "$tmp/g1.log" | tail -n 8; }
  grep -q "task $job2/finetune-f0 stopped: cancelled by the coordinator" "$tmp/g1.log" ||
    { fail "the group did not say the task was cancelled"; grep -F "$job2" "$tmp/g1.log" | tail -n 8; }
  # A user's cancel is no error of the group's: its refused write and reports are no errors, and
  # the write is no fenced one (alert AviaryWritesFenced: "lost its lease").
  if grep -F "$job2" "$tmp/g1.log" | grep -F "[error]"; then fail "the group logged errors for a cancelled task"; fi
  fenced=$(curl -sf "http://127.0.0.1:$(cat "$tmp/g1.mport")/metrics" | awk '$1 == "aviary_fenced_writes_total" {print $2}')
  [ -n "$fenced" ] && awk -v f="$fenced" 'BEGIN {exit !(f + 0 == 0)}' ||
    fail "the cancel counted as a fenced write (aviary_fenced_writes_total '$fenced')"
  c1=$(curl -sf "http://127.0.0.1:$(cat "$tmp/g1.mport")/metrics" | grep -E '^aviary_samples_total\{' | awk '{print $NF}')
  sleep 4
  c2=$(curl -sf "http://127.0.0.1:$(cat "$tmp/g1.mport")/metrics" | grep -E '^aviary_samples_total\{' | awk '{print $NF}')
  [ -n "$c1" ] && [ "$c1" = "$c2" ] || fail "the group still trains after the cancel (samples '$c1' -> '$c2')"
  avt 20 watch "$job2" > /dev/null 2>&1; [ $? -eq 1 ] || fail "watch of a cancelled job should exit 1"
else
  fail "the second job's task made no progress"; tail -n 20 "$tmp/g1.log"
fi
kill -0 "$group_pid" 2>/dev/null || fail "the group exited after the cancel"

# Fold-parallel fine-tuning: a second group (1 rank) joins; after the pretraining, the two
# fine-tuning folds run at the same time, one on each group, both from the pretraining's best.pt
# (20 epochs each: well longer than an idle group's 5 s lease poll, so one group cannot take
# both; 10 epochs of this corpus can take about 5 s on a fast machine).
start_group g2 1
job3=$(av submit "$tmp/p.yaml" --set folds.selected_folds=[0,1] --set stages.pretrain.epochs=1 \
         --set stages.finetune.epochs=20 | tail -n 1)
if avt 600 watch "$job3" > "$tmp/watch3.log" 2>&1; then
  jq_status "$job3" 'len(j["tasks"]) == 3 and all(t["state"] == "TASK_STATE_SUCCEEDED" for t in j["tasks"])' ||
    fail "fold-parallel job: expected 3 succeeded tasks"
  for f in 0 1; do
    n=$(cat "$tmp/g1.log" "$tmp/g2.log" | grep -c "leased task $job3/finetune-f$f ")
    [ "$n" = 1 ] || fail "finetune-f$f was leased $n times (expected once)"
  done
  g1_ft=$(grep -c "leased task $job3/finetune-f" "$tmp/g1.log"); g2_ft=$(grep -c "leased task $job3/finetune-f" "$tmp/g2.log")
  [ "$g1_ft" = 1 ] && [ "$g2_ft" = 1 ] || fail "the fine-tuning folds did not run one per group (g1: $g1_ft, g2: $g2_ft)"
  pre=$(jq_status "$job3" 'task("pretrain")["best_checkpoint"]')
  grep -q "initialised from $pre" "$tmp/g1.log" && grep -q "initialised from $pre" "$tmp/g2.log" ||
    fail "both fine-tuning folds should start from $pre"
  grep -qE '^aviary_worker_groups 2' <<<"$(curl -sf "http://127.0.0.1:$mport/metrics")" || fail "/metrics: aviary_worker_groups is not 2"
else
  fail "the fold-parallel job did not succeed"; tail -n 20 "$tmp/watch3.log"; tail -n 20 "$tmp/g2.log"
fi

# TLS: a second coordinator with a self-signed certificate for 127.0.0.1; the client trusts it
# with --tls-ca, and a plaintext client is refused.
if openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
     -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" -keyout "$tmp/tls.key" -out "$tmp/tls.crt" > /dev/null 2>&1; then
  plain_port=$port
  sed -i "s#^database: .*#database: $tmp/tls.db#" "$tmp/coordinator.yaml"
  start_coordinator --set tls_cert_file="$tmp/tls.crt" --set tls_key_file="$tmp/tls.key" || exit 1
  av --tls-ca "$tmp/tls.crt" list > "$tmp/tls_list.log" 2>&1 || { fail "list over TLS with --tls-ca"; cat "$tmp/tls_list.log"; }
  out=$(av list 2>&1); rc=$?
  [ $rc -ne 0 ] || fail "a plaintext client was answered by the TLS coordinator: $out"
  AVIARY_TLS_CA="$tmp/tls.crt" av list > /dev/null 2>&1 || fail "AVIARY_TLS_CA is not used"
  port=$plain_port
else
  fail "openssl could not make a certificate"
fi

echo "service_e2e: $passes checks passed, $fails failed"
[ "$fails" -eq 0 ]
