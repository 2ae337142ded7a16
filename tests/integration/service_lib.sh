# Shared by the service integration scripts (sourced after lib.sh): a coordinator, worker
# groups and a Prometheus server as real processes on 127.0.0.1 with ports chosen at run time.
# Expects $bin (build/bin) and $mpiexec.

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
pids=()
# kill_session PID: SIGKILL to everything in the session PID leads (started with setsid): Open
# MPI puts each rank in a process group of its own, so killing mpirun's group misses the ranks.
kill_session() {
  [ -n "${1:-}" ] && [ "$1" -gt 1 ] || return 0
  kill -9 -- "-$1" 2>/dev/null
  kill -9 "$1" 2>/dev/null
  pkill -KILL -s "$1" 2>/dev/null
  return 0
}
cleanup_service() {
  local p
  for p in "${pids[@]}"; do kill_session "$p"; done
  wait 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup_service EXIT

# wait_for SECONDS command...: polls the command every 0.5 s until it succeeds.
wait_for() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -ge "$deadline" ] && return 1
    sleep 0.5
  done
}

# no_jobs_listed: `av list` answers and lists no job (a dead coordinator is not an empty list).
no_jobs_listed() {
  local listed
  listed=$(av list 2>&1) || { echo "av list failed: $listed" >&2; return 1; }
  ! grep -qE '^j[0-9a-f]{12}' <<< "$listed"
}

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# write_coordinator_config HEARTBEAT_TIMEOUT_S MAX_RESTARTS: $tmp/coordinator.yaml, $tmp/token
# (clients) and $tmp/worker.token (worker groups).
write_coordinator_config() {
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$tmp/token"
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$tmp/worker.token"
  cat > "$tmp/coordinator.yaml" <<YAML
listen: 127.0.0.1:0
metrics_listen: 127.0.0.1:0
database: $tmp/aviary.db
work_dir: $tmp/runs
data_roots: ["$tmp"]
token_file: $tmp/token
worker_token_file: $tmp/worker.token
heartbeat_interval_s: 1
heartbeat_timeout_s: ${1:-4}
max_restarts: ${2:-2}
YAML
}

# logged_more_starts N: the coordinator's log has more than N start lines.
logged_more_starts() { [ "$(grep -c "listening on" "$tmp/coordinator.log" 2>/dev/null)" -gt "$1" ]; }

# start_coordinator [flags...]: sets coord_pid, port (gRPC) and mport (/metrics).
start_coordinator() {
  rm -f "$tmp/coord.port" "$tmp/coord.mport"
  local starts
  starts=$(grep -c "listening on" "$tmp/coordinator.log" 2>/dev/null)
  setsid "$bin/aviary-coordinator" --config "$tmp/coordinator.yaml" --port-file "$tmp/coord.port" \
    --metrics-port-file "$tmp/coord.mport" "$@" >> "$tmp/coordinator.log" 2>&1 &
  coord_pid=$!
  pids+=("$coord_pid")
  # The port files come first, then the start line ("listening on ..."): wait for both, so that
  # a test may grep the line.
  if ! wait_for 60 test -s "$tmp/coord.port" || ! wait_for 10 test -s "$tmp/coord.mport" ||
     ! wait_for 10 logged_more_starts "${starts:-0}"; then
    fail "the coordinator did not start"; cat "$tmp/coordinator.log"; return 1
  fi
  port=$(cat "$tmp/coord.port")
  mport=$(cat "$tmp/coord.mport")
}

# start_group NAME NP [serve flags...]: a worker group (mpirun) with the worker token, in its own
# process group; sets group_pid (mpirun's).
start_group() {
  local name=$1 np=$2
  shift 2
  rm -f "$tmp/$name.mport"
  setsid "$mpiexec" -np "$np" --oversubscribe "$bin/aviary-worker" serve --coordinator "127.0.0.1:$port" \
    --token-file "$tmp/worker.token" --metrics-listen 127.0.0.1:0 --metrics-port-file "$tmp/$name.mport" \
    --threads 1 "$@" > "$tmp/$name.log" 2>&1 &
  group_pid=$!
  pids+=("$group_pid")
}

# av ARGS...: the client with the coordinator's address and token.
av() { "$bin/aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/token" "$@"; }
# avt SECONDS ARGS...: the same under a wall-clock limit.
avt() { local s=$1; shift; timeout "$s" "$bin/aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/token" "$@"; }

# jq_status JOB PYTHON_EXPR: evaluates the expression on `aviary status JOB --json` (as j).
jq_status() {
  av status "$1" --json 2>/dev/null | /usr/bin/python3 -c '
import json, sys
j = json.load(sys.stdin)
def task(stage, fold=0):
    for t in j.get("tasks", []):
        if t.get("stage") == stage and int(t.get("fold", 0)) == fold:
            return t
    return {}
v = eval(sys.argv[1])
if isinstance(v, bool):
    sys.exit(0 if v else 1)
print(v)' "$2"
}

# metric TEXT NAME LABEL_SUBSTRING: the value of the first sample of NAME whose labels contain it.
metric() {
  grep -E "^$2(\{|\s)" <<<"$1" | grep -F -- "$3" | head -n 1 | awk '{print $NF}'
}

# A small two-stage dataset: a 2024 target and a 2021 pretraining source, decoded into a cache.
# service_recipe EPOCHS_PRETRAIN EPOCHS_FINETUNE SELECTED_FOLDS: writes $tmp/p.yaml.
service_recipe() {
  "$bin/aviary" synth --out "$tmp/t24" --layout 2024 --species 6 --recordings 72 --seed 3 --max-seconds 8 >/dev/null || fail "synth 2024"
  "$bin/aviary" synth --out "$tmp/p21" --layout 2021 --species 8 --recordings 96 --seed 4 --max-seconds 8 >/dev/null || fail "synth 2021"
  cat > "$tmp/p.yaml" <<YAML
seed: 42
data:
  duration: 5.0
  target: {layout: "2024", root: $tmp/t24}
  pretrain_sources:
    - {layout: "2021", root: $tmp/p21}
  cache_dir: $tmp/cache
folds: {pretrain_splits: 4, finetune_splits: 3, selected_folds: ${3:-[0]}}
sampling: {upsample_thr: 8, downsample_thr: 40}
model: {name: small_cnn, dropout: 0.1}
train: {batch_size: 8, epochs: 4, num_workers: 1, lr_max_per_sample: 1.0e-4, lr_ramp_epochs: 1}
stages:
  pretrain: {enabled: true, epochs: ${1:-2}}
  finetune: {enabled: true, epochs: ${2:-3}}
YAML
  "$bin/aviary" prepare --config "$tmp/p.yaml" > "$tmp/prepare.log" 2>&1 || { cat "$tmp/prepare.log"; fail "prepare"; }
}
