#!/usr/bin/env bash
# Checks deploy/ (issue 7): the Prometheus config and alert rules with promtool (including unit
# tests of every alert, and that those tests catch a broken rule), the Dockerfile's packages
# against CMakeLists.txt and the unpacked packages' CMake configs
# (tests/deploy/check_docker_deps.py), the Grafana dashboard's structure and metric names
# (tests/deploy/check_metrics.py, plus self-tests that it rejects bad input) and its data
# source provisioning, the shell scripts (bash -n, shellcheck: deploy/, tests/deploy/,
# scripts/), the systemd units (systemd-analyze verify when available) and env files, and the
# launchers: launch-group.sh's argument errors and dry run (cores per rank on a node with 2
# threads per core), a real 2-rank `mpirun` group of a stand-in worker stopped by SIGTERM, and
# the Slurm script's hostfile, dry run and requeue on the time-limit signal (a fake scontrol);
# and docs/DEPLOY.md's launch-group.sh example against the command the page says it prints.
#
#   tests/deploy/check_deploy.sh [REPO]        (REPO defaults to this checkout)
# Needs promtool (Debian: prometheus), shellcheck, python3 and mpirun (scripts/test.sh installs
# them). Exit 0 when every check passes.
# shellcheck disable=SC2015,SC2016  # `ok` never fails; single-quoted $ on purpose
set -uo pipefail
repo=$(cd "${1:-$(dirname "$0")/../..}" && pwd)
# shellcheck source=SCRIPTDIR/../integration/lib.sh
source "$repo/tests/integration/lib.sh"
deploy=$repo/deploy
py=/usr/bin/python3
[ -x "$py" ] || py=python3
# mpirun refuses root unless told (CI runs as root); 2 ranks may exceed the cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

# must_fail "what" command...: the command must exit non-zero.
must_fail() {
  local what=$1; shift
  if "$@" >"$tmp/must_fail.out" 2>&1; then
    fail "$what: expected a failure, got success:"; sed 's/^/    /' "$tmp/must_fail.out"
  else
    ok
  fi
}
# run_ok "what" command...: the command must succeed.
run_ok() {
  local what=$1; shift
  if ! "$@" >"$tmp/run_ok.out" 2>&1; then
    fail "$what:"; sed 's/^/    /' "$tmp/run_ok.out"
  else
    ok
  fi
}
# wait_for FILE...: polls until every file exists; 120 s deadline.
wait_for() {
  local deadline=$((SECONDS + 120)) f
  for f in "$@"; do
    while [ ! -e "$f" ]; do
      [ $SECONDS -lt $deadline ] || return 1
      sleep 0.2
    done
  done
}

echo "== Prometheus (promtool)"
if ! command -v promtool >/dev/null 2>&1; then
  fail "promtool not found (Debian package: prometheus)"
else
  run_ok "promtool check config" promtool check config "$deploy/prometheus/prometheus.yml"
  run_ok "promtool check rules" promtool check rules "$deploy/prometheus/alerts.yml"
  run_ok "promtool test rules" promtool test rules "$deploy/prometheus/alerts_test.yml"
  # The unit tests must catch broken rules: a stalled threshold of 40 minutes, a NaN test that
  # no longer matches NaN, a restart rule that fires an hour after a failed scrape (the "first
  # seen above 0" term it had), a never-reported rule
  # that ignores reports, a stalled rule that pairs one sweep point's timestamp with another's
  # lease, a non-finite-loss rule that holds 40 minutes after the last report.
  mkdir -p "$tmp/rules"
  cp "$deploy/prometheus/alerts_test.yml" "$tmp/rules/"
  i=0
  for edit in 's/> 20 \* 60/> 40 * 60/' \
              's/(aviary_train_loss != aviary_train_loss)/(aviary_train_loss < -1e300)/' \
              's/expr: increase(aviary_task_restarts_total\[1h\]) > 0$/expr: (increase(aviary_task_restarts_total[1h]) > 0) or ((aviary_task_restarts_total > 0) unless (aviary_task_restarts_total offset 1h))/' \
              's/unless on (job_id, stage, fold, point) aviary_task_last_progress_timestamp_seconds$/> 1/' \
              's/and on (job_id, stage, fold, point)/and on (job_id, stage, fold)/' \
              's/_seconds < 30 \* 60)/_seconds < 40 * 60)/'; do
    i=$((i + 1))
    sed "$edit" "$deploy/prometheus/alerts.yml" >"$tmp/rules/alerts.yml"
    if cmp -s "$deploy/prometheus/alerts.yml" "$tmp/rules/alerts.yml"; then
      fail "mutation $i ($edit) did not change alerts.yml"
    else
      run_ok "promtool check rules (mutation $i)" promtool check rules "$tmp/rules/alerts.yml"
      must_fail "promtool test rules must catch mutation $i ($edit)" promtool test rules "$tmp/rules/alerts_test.yml"
    fi
  done
  # The dashboard's PromQL, as recording rules (its variables matching everything): promtool
  # parses each expression, and evaluates the training-loss panel's on a sweep point's series and
  # a plain job's: the legend's {{point}} reads "point 3", and nothing for the plain job.
  mkdir -p "$tmp/dash"
  "$py" - "$deploy/grafana/aviary-dashboard.json" "$tmp/dash" <<'EOF'
import json, sys
def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))
dash = json.load(open(sys.argv[1]))
rules, loss = [], None
for p in walk(dash["panels"]):
    for t in p.get("targets", []):
        expr = t["expr"]
        for var in ("job_id", "stage", "fold", "group_id"):
            expr = expr.replace("$" + var, ".*")
        rules.append({"record": f"dashboard:panel{p['id']}:{t.get('refId', 'A')}", "expr": expr})
        if expr.startswith("label_replace(aviary_train_loss{"):
            loss = rules[-1]["record"]
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2] + "/rules.yml", "w"), indent=1)
series = [('aviary_train_loss{job_id="j1",stage="finetune",fold="0",point="3"}', "0.5x3"),
          ('aviary_train_loss{job_id="j2",stage="finetune",fold="1"}', "0.25x3")]
loss = loss or "no_training_loss_panel"
test = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": [{
    "interval": "1m",
    "input_series": [{"series": s, "values": v} for s, v in series],
    "promql_expr_test": [{"expr": loss, "eval_time": "1m", "exp_samples": [
        {"labels": loss + '{job_id="j1",stage="finetune",fold="0",point="point 3"}', "value": 0.5},
        {"labels": loss + '{job_id="j2",stage="finetune",fold="1"}', "value": 0.25}]}]}]}
json.dump(test, open(sys.argv[2] + "/test.yml", "w"), indent=1)
EOF
  run_ok "promtool check rules (the dashboard's expressions)" promtool check rules "$tmp/dash/rules.yml"
  run_ok "promtool test rules (a sweep point's legend label)" promtool test rules "$tmp/dash/test.yml"
fi

echo "== Grafana dashboard and metric names"
run_ok "check_metrics.py $repo" "$py" "$repo/tests/deploy/check_metrics.py" "$repo"
# Self-tests on copies: a broken dashboard; sources that export every name, and all but one.
fake=$tmp/fake
mkdir -p "$fake/deploy/grafana" "$fake/deploy/prometheus" "$fake/docs" "$fake/coordinator" "$fake/worker"
cp "$repo/docs/SERVICE.md" "$fake/docs/"
cp "$deploy/prometheus/alerts.yml" "$fake/deploy/prometheus/"
"$py" - "$deploy/grafana/aviary-dashboard.json" "$fake/deploy/grafana/broken.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
panels = [p for p in d["panels"] if p["type"] != "row"]
panels[1]["id"] = panels[0]["id"]                       # duplicate id
panels[2]["targets"] = []                               # no target
panels[3]["targets"][0]["expr"] = "rate(aviary_not_a_metric_total[5m])"
panels[4]["datasource"] = {"type": "prometheus", "uid": "some-fixed-uid"}
panels[5]["targets"][0]["expr"] = "aviary_task_epoch and on (job_id, stage, fold) aviary_task_running"
json.dump(d, open(sys.argv[2], "w"))
EOF
out=$("$py" "$repo/tests/deploy/check_metrics.py" "$fake" 2>&1); rc=$?
for want in "used by" "aviary_not_a_metric_total" "has no target" "panel id" "datasource variable" \
            "on (job_id, stage, fold) names job_id without point"; do
  grep -qF -- "$want" <<<"$out" || fail "check_metrics.py on a broken dashboard: no '$want' in: $out"
done
[ $rc -eq 1 ] && ok || fail "check_metrics.py on a broken dashboard: rc=$rc, wanted 1"
echo '{"panels": [' >"$fake/deploy/grafana/broken.json"
must_fail "check_metrics.py must refuse invalid JSON" "$py" "$repo/tests/deploy/check_metrics.py" "$fake"
rm "$fake/deploy/grafana/broken.json"
cp "$deploy/grafana/aviary-dashboard.json" "$fake/deploy/grafana/"
grep -oE '^\| `aviary_[a-z0-9_]+` \|' "$repo/docs/SERVICE.md" | grep -oE 'aviary_[a-z0-9_]+' >"$tmp/names"
[ -s "$tmp/names" ] || fail "no metric names in docs/SERVICE.md"
{ echo "// every metric, as the coordinator and the worker would name them"
  sed 's/.*/const char* k = "&";/' "$tmp/names"; } >"$fake/coordinator/metrics.cc"
run_ok "check_metrics.py --exported-by (every name exported)" \
  "$py" "$repo/tests/deploy/check_metrics.py" "$fake" --exported-by "$fake"
grep -v '"aviary_step_duration_seconds"' "$fake/coordinator/metrics.cc" >"$fake/worker/m.h"
rm "$fake/coordinator/metrics.cc"
out=$("$py" "$repo/tests/deploy/check_metrics.py" "$fake" --exported-by "$fake" 2>&1); rc=$?
if [ $rc -ne 1 ] || ! grep -q '^FAIL: aviary_step_duration_seconds .*not exported' <<<"$out"; then
  fail "check_metrics.py must report the one name that is not exported (rc=$rc): $out"
else
  ok
fi

# The provisioned data source is not the default: a Grafana whose provisioning marks two data
# sources as default (a site's own and this one) fails to start, and the dashboard picks its
# data source through its variable (check_metrics.py checks every panel uses it).
ds_file=$deploy/grafana/provisioning/datasources/prometheus.yaml
n_ds=$(grep -cE '^ *- name:' "$ds_file")
n_not_default=$(grep -cE '^ +isDefault: false *(#.*)?$' "$ds_file")
if [ "$n_ds" -ge 1 ] && [ "$n_ds" -eq "$n_not_default" ] && [ "$(grep -c 'isDefault:' "$ds_file")" -eq "$n_ds" ]; then ok
else fail "$ds_file: every data source needs 'isDefault: false' ($n_ds data sources, $n_not_default with it)"; fi

echo "== Dockerfile packages"
run_ok "check_docker_deps.py $repo" "$py" "$repo/tests/deploy/check_docker_deps.py" "$repo"
# Self-test: a Dockerfile without libssl-dev (OpenSSL) is refused by name.
mkdir -p "$fake/deploy/docker"
cp "$repo/CMakeLists.txt" "$fake/"
sed 's/ libssl-dev//' "$deploy/docker/Dockerfile" >"$fake/deploy/docker/Dockerfile"
out=$("$py" "$repo/tests/deploy/check_docker_deps.py" "$fake" 2>&1); rc=$?
[ $rc -eq 1 ] && grep -qF "needs 'OpenSSL' (package libssl-dev)" <<<"$out" && ok ||
  fail "check_docker_deps.py must refuse a Dockerfile without libssl-dev (rc=$rc): $out"
# Self-test: without libcurl4-openssl-dev, the find_dependency(CURL) of the unpacked
# prometheus-cpp's CMake config (this machine's prometheus-cpp-dev) is refused by name.
sed 's/ libcurl4-openssl-dev//' "$deploy/docker/Dockerfile" >"$fake/deploy/docker/Dockerfile"
out=$("$py" "$repo/tests/deploy/check_docker_deps.py" "$fake" 2>&1); rc=$?
[ $rc -eq 1 ] && grep -qF "prometheus-cpp-config.cmake (package prometheus-cpp-dev, which" <<<"$out" &&
  grep -qF "find_dependency(CURL): needs package libcurl4-openssl-dev" <<<"$out" && ok ||
  fail "check_docker_deps.py must refuse a Dockerfile without libcurl4-openssl-dev (rc=$rc): $out"
# Self-test: a config (a stand-in tree) naming a dependency with no known package, followed from
# a dependency's own config (prometheus-cpp -> civetweb).
cp "$deploy/docker/Dockerfile" "$fake/deploy/docker/Dockerfile"
mkdir -p "$fake/cmake/prometheus-cpp" "$fake/cmake/civetweb"
printf 'include(CMakeFindDependencyMacro)\nfind_dependency(civetweb)\n' >"$fake/cmake/prometheus-cpp/prometheus-cpp-config.cmake"
printf '# find_dependency(Commented)\n  find_dependency(NoSuchLib 1.0)\n' >"$fake/cmake/civetweb/civetweb-config.cmake"
out=$("$py" "$repo/tests/deploy/check_docker_deps.py" "$fake" --cmake-config-root "$fake/cmake" 2>&1); rc=$?
[ $rc -eq 1 ] && grep -qF "civetweb-config.cmake (package libcivetweb-dev, which" <<<"$out" &&
  grep -qF "find_dependency(NoSuchLib): no package known" <<<"$out" && ! grep -q Commented <<<"$out" && ok ||
  fail "check_docker_deps.py must refuse a config's unknown find_dependency (rc=$rc): $out"

echo "== shell scripts"
scripts=("$deploy"/*.sh "$deploy"/slurm/*.sbatch "$repo"/tests/deploy/*.sh "$repo"/scripts/*.sh "$repo"/scripts/lib/*.sh)
for s in "${scripts[@]}"; do
  run_ok "bash -n $s" bash -n "$s"
done
# The codes that scripts/ trips today, excluded for those files only (SC2119: a function of
# deps.sh called without arguments; SC2155: export with $(...); SC2034: deps.sh's package lists,
# used by the scripts that source it; SC2086: its unquoted CMAKE_BUILD_TYPE).
declare -A shellcheck_exclude=(
  ["$repo/scripts/demo.sh"]="SC2119,SC2155" ["$repo/scripts/test.sh"]="SC2119"
  ["$repo/scripts/test-cuda.sh"]="SC2119" ["$repo/scripts/lib/deps.sh"]="SC2034,SC2086")
if command -v shellcheck >/dev/null 2>&1; then
  for s in "${scripts[@]}"; do
    exclude=${shellcheck_exclude[$s]:-}
    # From the repository's root: scripts/ source scripts/lib/deps.sh by that relative path.
    run_ok "shellcheck $s" env -C "$repo" shellcheck -s bash -x ${exclude:+-e "$exclude"} "$s"
  done
else
  fail "shellcheck is not installed (Debian package: shellcheck; scripts/test.sh installs it)"
fi

echo "== systemd units"
if command -v systemd-analyze >/dev/null 2>&1; then
  # verify wants the ExecStart binaries to exist: point them at stand-ins. It exits 0 on parse
  # warnings, so any output is a failure.
  mkdir -p "$tmp/units"
  for u in "$deploy"/systemd/*.service; do
    sed -e 's|/opt/aviary/bin/aviary-coordinator|/bin/true|' \
        -e 's|/opt/aviary/deploy/launch-group.sh|/bin/true|' "$u" >"$tmp/units/$(basename "$u")"
  done
  out=$(cd "$tmp/units" && systemd-analyze verify ./*.service 2>&1); rc=$?
  if [ $rc -ne 0 ] || [ -n "$out" ]; then fail "systemd-analyze verify (rc=$rc): $out"; else ok; fi
  printf '[Service]\nExecStart=/bin/true\nKillMode=sideways\n' >"$tmp/units/bad.service"
  out=$(cd "$tmp/units" && systemd-analyze verify ./bad.service 2>&1)
  [ -n "$out" ] && ok || fail "systemd-analyze verify said nothing about a bad unit"
  for key in KillSignal=SIGTERM Restart=on-failure EnvironmentFile= User=aviary TimeoutStopSec=; do
    for u in "$deploy"/systemd/*.service; do
      grep -q "^$key" "$u" && ok || fail "$u: no $key"
    done
  done
  # A WorkingDirectory under /var/lib must be the unit's StateDirectory: systemd then creates it
  # owned by User= before the start; otherwise a node where nothing made it (useradd --system
  # makes no home) fails every start with status 200/CHDIR.
  for u in "$deploy"/systemd/*.service; do
    wd=$(sed -n 's|^WorkingDirectory=-\{0,1\}/var/lib/||p' "$u")
    [ -z "$wd" ] && continue
    grep -qx "StateDirectory=$wd" "$u" && ok ||
      fail "$u: WorkingDirectory=/var/lib/$wd but no StateDirectory=$wd (nothing creates the folder)"
  done
  # The group unit must wait longer than a group that does not stop takes (3 x the ranks' stop
  # timeout: the launcher's wait, then mpirun's SIGTERM and SIGKILL, Open MPI 4.1).
  unit_stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s$/\1/p' "$deploy/systemd/aviary-worker-group@.service")
  env_stop=$(sed -n 's/^AVIARY_STOP_TIMEOUT=//p' "$deploy/systemd/worker-group.env.example")
  if [ -n "$unit_stop" ] && [ -n "$env_stop" ] && [ "$unit_stop" -gt $((3 * env_stop)) ]; then ok
  else fail "TimeoutStopSec ($unit_stop) must exceed 3 x AVIARY_STOP_TIMEOUT ($env_stop)"; fi
else
  echo "SKIP: systemd-analyze is not installed"
fi
# A CUDA worker built against a PyTorch wheel loads torch from the builder's virtualenv (its
# RUNPATH), which the service user may not read: the worker env example shows the way out, a
# commented LD_LIBRARY_PATH naming torch's lib and the wheel's nvidia/*/lib folders.
env_example=$deploy/systemd/worker-group.env.example
grep -Eq '^#LD_LIBRARY_PATH=.*site-packages/torch/lib' "$env_example" &&
  grep -Eq '^#LD_LIBRARY_PATH=.*site-packages/nvidia/[^/:]+/lib' "$env_example" && ok ||
  fail "$env_example: no commented LD_LIBRARY_PATH line naming torch's lib and nvidia/*/lib folders"

echo "== launch-group.sh"
launch=$deploy/launch-group.sh
for args in "--hostfile $tmp/none" "--coordinator nocolon" "--coordinator h:1 --device tpu" \
            "--coordinator h:1 --max-tasks -1" "--coordinator h:1 --bogus" "--coordinator h:1 --sd-dir $tmp --metrics-listen 0.0.0.0:0" \
            "--coordinator h:1 --tls-cert $launch" "--coordinator h:1 --tls-cert $launch --tls-key $tmp/none"; do
  # shellcheck disable=SC2086  # split on purpose
  out=$("$launch" $args --dry-run 2>&1); rc=$?
  if [ $rc -ne 2 ] || ! grep -q '^launch-group.sh: ' <<<"$out"; then fail "launch-group.sh $args: rc=$rc: $out"; else ok; fi
done
printf 'node01 slots=4 # first\n\nnode02 slots=4\n' >"$tmp/hostfile"
out=$(NCCL_IB_HCA=mlx5 UCX_TLS=rc,sm AVIARY_TOKEN=secret-token "$launch" --coordinator coord:7070 \
      --hostfile "$tmp/hostfile" --cores-per-rank 6 --token-file "$tmp/hostfile" \
      --tls-cert "$tmp/hostfile" --tls-key "$tmp/hostfile" \
      --sd-dir "$tmp/sd" --dry-run -- --log-level debug 2>&1); rc=$?
[ $rc -eq 0 ] && ok || fail "launch-group.sh --dry-run: rc=$rc: $out"
for want in "-np 8 " "--hostfile $tmp/hostfile" "--map-by ppr:4:node:PE=6 --bind-to core" \
            "--mca odls_base_sigkill_timeout 45" "-x NCCL_IB_HCA" "-x UCX_TLS" "-x AVIARY_TOKEN " \
            "serve --coordinator coord:7070 --metrics-listen 0.0.0.0:9471" "--threads 6" \
            "--token-file $tmp/hostfile" "--tls-cert $tmp/hostfile --tls-key $tmp/hostfile" "--log-level debug" \
            "file_sd target $tmp/sd/aviary-group-node01-9471-" '"targets": ["node01:9471"]'; do
  grep -qF -- "$want" <<<"$out" && ok || fail "launch-group.sh --dry-run: no '$want' in: $out"
done
grep -q secret-token <<<"$out" && fail "launch-group.sh --dry-run shows a token value: $out" || ok
[ -e "$tmp/sd" ] && fail "launch-group.sh --dry-run wrote $tmp/sd" || ok
printf 'node01 slots=4\nnode02 slots=2\n' >"$tmp/uneven"
out=$("$launch" --coordinator c:1 --hostfile "$tmp/uneven" --dry-run 2>&1); rc=$?
[ $rc -eq 2 ] && grep -qF "node02 has slots=2" <<<"$out" && ok || fail "uneven hostfile: rc=$rc: $out"

# The default cores per rank on a node with 2 threads per core (stand-in nproc and lscpu: 16
# CPUs, 2 sockets x 4 cores x 2 threads). PE= counts physical cores (Open MPI without
# --use-hwthread-cpus): 8 cores / 2 ranks = 4 each, not nproc's 16 / 2 = 8.
# lscpu_standin DIR SOCKETS CORES THREADS: an lscpu that prints that topology (-p=SOCKET,CORE).
lscpu_standin() {
  local s c t
  mkdir -p "$1"
  { echo '#!/bin/sh'; echo "echo '# Socket,Core'"
    for ((t = 0; t < $4; t++)); do for ((s = 0; s < $2; s++)); do for ((c = 0; c < $3; c++)); do
      echo "echo $s,$((s * $3 + c))"
    done; done; done; } >"$1/lscpu"
  chmod +x "$1/lscpu"
}
lscpu_standin "$tmp/smt" 2 4 2
printf '#!/bin/sh\necho 16\n' >"$tmp/smt/nproc"
chmod +x "$tmp/smt/nproc"
out=$(PATH="$tmp/smt:$PATH" "$launch" --coordinator c:1 --gpus-per-node 2 --dry-run 2>&1); rc=$?
for want in "--map-by ppr:2:node:PE=4 --bind-to core" "--threads 4 "; do
  [ $rc -eq 0 ] && grep -qF -- "$want" <<<"$out" && ok ||
    fail "launch-group.sh on 8 cores x 2 threads, 2 ranks (rc=$rc): no '$want' in: $out"
done
# Without lscpu: nproc (16 / 2 = 8). A PATH of the stand-in nproc and the few tools the dry run uses.
mkdir -p "$tmp/nolscpu"
cp "$tmp/smt/nproc" "$tmp/nolscpu/"
for c in dirname id sort awk hostname grep; do ln -sf "$(command -v "$c")" "$tmp/nolscpu/$c"; done
out=$(PATH="$tmp/nolscpu" "$BASH" "$launch" --coordinator c:1 --gpus-per-node 2 --dry-run 2>&1); rc=$?
[ $rc -eq 0 ] && grep -qF -- "--map-by ppr:2:node:PE=8 " <<<"$out" && ok ||
  fail "launch-group.sh without lscpu (nproc 16, 2 ranks; rc=$rc): no 'PE=8' in: $out"

# stop_mpirun runs once: run again (a signal between `pid=$!` and the check after it runs it
# from the trap, then the check does), it keeps its first killer and starts no second one.
fn=$(sed -n '/^stop_mpirun() {$/,/^}$/p' "$launch")
if [ -z "$fn" ]; then
  fail "no stop_mpirun() in $launch"
else
  out=$(bash -c "$fn"'
    sleep 30 & pid=$!; stop_timeout=1; forced_file=$1/forced; killer=""
    stop_mpirun; first=$killer; stop_mpirun
    echo "killers $first $killer"; wait' _ "$tmp" 2>&1)
  read -r first second < <(sed -n 's/^killers //p' <<<"$out")
  [ -n "$first" ] && [ "$first" = "$second" ] && ok ||
    fail "stop_mpirun called twice must keep its first killer: $out"
fi

# A real group: 2 ranks of a stand-in worker under mpirun. Each rank records its arguments and
# an exported knob, and on SIGUSR2 (the launcher's stop, which mpirun forwards at once) takes 3 s
# to stop, as a group finishing its step and reporting does. It ignores SIGTERM, so a launcher
# that sent SIGTERM to mpirun (SIGCONT now, SIGTERM after --stop-timeout, SIGKILL after as long
# again) would get it killed, and late.
cat >"$tmp/fake-worker" <<EOF
#!/usr/bin/env bash
r=\${OMPI_COMM_WORLD_RANK:-x}
trap 'sleep 3; echo stopped > "$tmp/rank\$r.stopped"; exit 0' USR2
trap '' TERM
echo "\$* NCCL_TEST_KNOB=\${NCCL_TEST_KNOB:-unset}" > "$tmp/rank\$r.args"
while true; do sleep 0.1; done
EOF
chmod +x "$tmp/fake-worker"
echo "localhost slots=2" >"$tmp/local-hostfile"
if ! command -v mpirun >/dev/null 2>&1; then
  fail "mpirun not found"
else
  # Targets an earlier launcher left for this host and port: one whose launcher is gone (killed
  # before its EXIT trap) is removed, one whose launcher lives (racing for the port) is kept.
  mkdir -p "$tmp/sd"
  (exit 0) &
  dead=$!
  wait $dead
  echo '[]' >"$tmp/sd/aviary-group-localhost-19471-$dead.json"
  echo '[]' >"$tmp/sd/aviary-group-localhost-19471-$$.json"
  NCCL_TEST_KNOB=42 "$launch" --coordinator 127.0.0.1:7070 --hostfile "$tmp/local-hostfile" \
    --cores-per-rank 1 --bind-to none --worker "$tmp/fake-worker" --sd-dir "$tmp/sd" \
    --metrics-listen 127.0.0.1:19471 --stop-timeout 15 >"$tmp/launch.log" 2>&1 &
  lpid=$!
  if ! wait_for "$tmp/rank0.args" "$tmp/rank1.args"; then
    fail "the group's ranks did not start:"; sed 's/^/    /' "$tmp/launch.log"
    kill -TERM $lpid 2>/dev/null
  else
    [ -s "$tmp/sd/aviary-group-localhost-19471-$lpid.json" ] && ok || fail "no file_sd target while the group runs: $(ls "$tmp/sd")"
    [ ! -e "$tmp/sd/aviary-group-localhost-19471-$dead.json" ] && ok || fail "a gone launcher's file_sd target was kept"
    [ -e "$tmp/sd/aviary-group-localhost-19471-$$.json" ] && ok || fail "a live launcher's file_sd target was removed"
    rm -f "$tmp/sd/aviary-group-localhost-19471-$$.json"
    for r in 0 1; do
      grep -q -- "serve --coordinator 127.0.0.1:7070 --metrics-listen 127.0.0.1:19471 --device auto --threads 1 .* NCCL_TEST_KNOB=42$" \
        "$tmp/rank$r.args" && ok || fail "rank $r got: $(cat "$tmp/rank$r.args")"
    done
    kill -TERM $lpid
  fi
  t0=$(date +%s%N)
  wait $lpid; rc=$?
  took_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  [ $rc -eq 0 ] && ok || { fail "launch-group.sh after SIGTERM: rc=$rc"; sed 's/^/    /' "$tmp/launch.log"; }
  # 3 s of the stand-in's stop (and mpirun's teardown, 1-2 s on a loaded machine), not
  # --stop-timeout (15 s) or more: the launcher waited for the stop and escalated nothing.
  [ "$took_ms" -lt 15000 ] && ok || fail "launch-group.sh took ${took_ms} ms to stop the group (--stop-timeout 15)"
  for r in 0 1; do
    [ -e "$tmp/rank$r.stopped" ] && ok || fail "rank $r was killed before it stopped cleanly"
  done
  [ -e "$tmp/sd/aviary-group-localhost-19471-$lpid.json" ] && fail "file_sd target left behind" || ok
  grep -q "stopped by signal" "$tmp/launch.log" && ok || fail "no 'stopped by signal' in: $(cat "$tmp/launch.log")"

  # A terminal's Ctrl-C: SIGINT to the launcher's whole process group (a job of its own here,
  # as a shell in a terminal starts it). mpirun, in that group too, aborted the ranks on it
  # (SIGTERM, which the stand-in ignores, then SIGKILL: no clean stop) instead of the
  # launcher's SIGUSR2.
  rm -f "$tmp"/rank?.args "$tmp"/rank?.stopped
  set -m
  "$launch" --coordinator 127.0.0.1:7070 --hostfile "$tmp/local-hostfile" --cores-per-rank 1 --bind-to none \
    --worker "$tmp/fake-worker" --metrics-listen 127.0.0.1:19471 --stop-timeout 15 >"$tmp/launch-int.log" 2>&1 &
  lpid=$!
  set +m
  if ! wait_for "$tmp/rank0.args" "$tmp/rank1.args"; then
    fail "the group's ranks did not start (Ctrl-C case):"; sed 's/^/    /' "$tmp/launch-int.log"
    kill -TERM $lpid 2>/dev/null
  else
    kill -INT -- -"$lpid"
  fi
  wait $lpid; rc=$?
  [ $rc -eq 0 ] && ok || { fail "launch-group.sh after Ctrl-C: rc=$rc"; sed 's/^/    /' "$tmp/launch-int.log"; }
  for r in 0 1; do
    [ -e "$tmp/rank$r.stopped" ] && ok || fail "rank $r was not stopped by the launcher's SIGUSR2 after Ctrl-C"
  done
  grep -q "SIGINT: stopping the group" "$tmp/launch-int.log" && ok || fail "no 'SIGINT: stopping' in: $(cat "$tmp/launch-int.log")"

  # A closed terminal (SIGHUP to the launcher alone: mpirun, in a session of its own, gets none)
  # stops the group as SIGTERM does; untrapped, the launcher died and the group trained on.
  rm -f "$tmp"/rank?.args "$tmp"/rank?.stopped
  "$launch" --coordinator 127.0.0.1:7070 --hostfile "$tmp/local-hostfile" --cores-per-rank 1 --bind-to none \
    --worker "$tmp/fake-worker" --metrics-listen 127.0.0.1:19471 --stop-timeout 15 >"$tmp/launch-hup.log" 2>&1 &
  lpid=$!
  if ! wait_for "$tmp/rank0.args" "$tmp/rank1.args"; then
    fail "the group's ranks did not start (SIGHUP case):"; sed 's/^/    /' "$tmp/launch-hup.log"
    kill -TERM $lpid 2>/dev/null
  else
    kill -HUP "$lpid"
  fi
  wait $lpid; rc=$?
  [ $rc -eq 0 ] && ok || { fail "launch-group.sh after SIGHUP: rc=$rc"; sed 's/^/    /' "$tmp/launch-hup.log"; }
  for r in 0 1; do
    [ -e "$tmp/rank$r.stopped" ] && ok || fail "rank $r was not stopped after the launcher's SIGHUP"
  done
  # What a failed stop left running (an orphaned mpirun and its stand-in ranks).
  pkill -KILL -f "mpirun .*$tmp/local-hostfile" 2>/dev/null || true
  pkill -KILL -f "$tmp/fake-worker" 2>/dev/null || true

  # A metrics port that already answers (another group's on a shared node): refused before the
  # file_sd target of that name is touched (the failed group's exit removed the other's).
  "$py" -c 'import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True); time.sleep(120)' >"$tmp/busy.port" &
busy_pid=$!
for _ in $(seq 100); do [ -s "$tmp/busy.port" ] && break; sleep 0.1; done
busy=$(cat "$tmp/busy.port")
echo '[{"targets": ["localhost:'"$busy"'"]}]' >"$tmp/sd/aviary-group-localhost-$busy.json"
out=$(timeout 60 "$launch" --coordinator 127.0.0.1:7070 --hostfile "$tmp/local-hostfile" --cores-per-rank 1 \
        --bind-to none --worker "$tmp/fake-worker" --sd-dir "$tmp/sd" --metrics-listen "127.0.0.1:$busy" 2>&1); rc=$?
kill "$busy_pid" 2>/dev/null
[ $rc -eq 2 ] && grep -qF "rank 0's metrics port localhost:$busy already answers" <<<"$out" && ok ||
  fail "launch-group.sh on a metrics port in use: rc=$rc: $out"
grep -qF "localhost:$busy" "$tmp/sd/aviary-group-localhost-$busy.json" 2>/dev/null && ok ||
  fail "launch-group.sh on a metrics port in use removed or changed the other group's file_sd target"

  # A group slower to stop (3 s) than --stop-timeout (1 s): the launcher falls back to SIGTERM
  # to mpirun, and its exit code says the stop was not clean (it said 0).
  rm -f "$tmp"/rank*.args "$tmp"/rank*.stopped
  "$launch" --coordinator 127.0.0.1:7070 --hostfile "$tmp/local-hostfile" --cores-per-rank 1 --bind-to none \
    --worker "$tmp/fake-worker" --stop-timeout 1 >"$tmp/launch2.log" 2>&1 &
  lpid=$!
  if wait_for "$tmp/rank0.args" "$tmp/rank1.args"; then kill -TERM $lpid; else fail "the second group did not start"; kill -TERM $lpid; fi
  wait $lpid; rc=$?
  [ $rc -ne 0 ] && ok || { fail "launch-group.sh after a stop that needed SIGTERM: rc=0"; sed 's/^/    /' "$tmp/launch2.log"; }
  grep -q "did not stop within --stop-timeout 1s" "$tmp/launch2.log" && ok ||
    fail "no 'did not stop within' in: $(cat "$tmp/launch2.log")"

  # A launcher (--mpirun) that exits 3 at once on the stop signal, as after a rank failed while
  # stopping: not a clean stop, though no SIGTERM was needed (the launcher said 0). A stand-in:
  # Open MPI 4.1's mpirun, after a rank's non-zero exit, aborts the job and waits 2 x
  # odls_base_sigkill_timeout, so the launcher's SIGTERM after --stop-timeout comes first.
  printf '%s\n' '#!/usr/bin/env bash' "trap 'exit 3' USR2" ": >'$tmp/mpirun.started'" \
    'while true; do sleep 0.1; done' >"$tmp/failing-mpirun"
  chmod +x "$tmp/failing-mpirun"
  "$launch" --coordinator 127.0.0.1:7070 --hostfile "$tmp/local-hostfile" --cores-per-rank 1 --bind-to none \
    --worker "$tmp/fake-worker" --mpirun "$tmp/failing-mpirun" --stop-timeout 15 >"$tmp/launch3.log" 2>&1 &
  lpid=$!
  wait_for "$tmp/mpirun.started" || fail "the stand-in mpirun did not start"
  kill -TERM $lpid
  wait $lpid; rc=$?
  [ $rc -eq 3 ] && ok || { fail "launch-group.sh after mpirun exited 3 on the stop: rc=$rc"; sed 's/^/    /' "$tmp/launch3.log"; }
  grep -q "mpirun exited with code 3 (a rank failed)" "$tmp/launch3.log" && ok ||
    fail "no 'mpirun exited with code 3 (a rank failed)' in: $(cat "$tmp/launch3.log")"
fi

echo "== Slurm script"
sbatch_script=$deploy/slurm/aviary-group.sbatch
mkdir -p "$tmp/bin"
cat >"$tmp/bin/scontrol" <<EOF
#!/usr/bin/env bash
if [ "\$1 \$2" = "show hostnames" ]; then
  case \$3 in localhost) echo localhost ;; *) echo gpu-a01; echo gpu-a02 ;; esac
  exit 0
fi
echo "\$*" >> "$tmp/scontrol.log"
EOF
chmod +x "$tmp/bin/scontrol"
lscpu_standin "$tmp/bin" 2 8 1   # one thread per core: Slurm's CPUs are cores
grep -q '^#SBATCH --signal=B:USR1@' "$sbatch_script" && ok || fail "no --signal=B:USR1@ in $sbatch_script"
# The time-limit signal must come early enough for a group that does not stop (killed about
# 3 x AVIARY_STOP_TIMEOUT after it with the mpirun launcher) to be gone before the limit, or
# Slurm ends the job at its limit and the script never requeues it.
lead=$(sed -n 's/^#SBATCH --signal=B:USR1@\([0-9]*\)$/\1/p' "$sbatch_script")
stop=$(sed -n 's/^stop_timeout=\${AVIARY_STOP_TIMEOUT:-\([0-9]*\)}$/\1/p' "$sbatch_script")
if [ -n "$lead" ] && [ -n "$stop" ] && [ "$lead" -gt $((3 * stop)) ]; then ok
else fail "$sbatch_script: --signal lead time '$lead' s must exceed 3 x AVIARY_STOP_TIMEOUT ('$stop' s)"; fi
grep -q '^#SBATCH --requeue' "$sbatch_script" && ok || fail "no --requeue in $sbatch_script"
out=$(env -u SLURM_JOB_ID bash "$sbatch_script" 2>&1); rc=$?
[ $rc -eq 2 ] && grep -q "not inside a Slurm allocation" <<<"$out" && ok || fail "sbatch outside Slurm: rc=$rc: $out"
slurm_env=(PATH="$tmp/bin:$PATH" SLURM_JOB_ID=4242 SLURM_JOB_NODELIST="gpu-a[01-02]" SLURM_GPUS_ON_NODE=4
           SLURM_CPUS_PER_TASK=8 SLURM_SUBMIT_DIR="$repo" AVIARY_COORDINATOR=coord:7070 AVIARY_DRY_RUN=1)
out=$(env "${slurm_env[@]}" bash "$sbatch_script" 2>&1); rc=$?
[ $rc -eq 0 ] && ok || fail "sbatch dry run: rc=$rc: $out"
for want in "gpu-a01 slots=4" "gpu-a02 slots=4" "-np 8 " "--map-by ppr:4:node:PE=8" "--threads 8" \
            "serve --coordinator coord:7070" "--metrics-listen 0.0.0.0:9513"; do  # 9471 + 4242 mod 100
  grep -qF -- "$want" <<<"$out" && ok || fail "sbatch dry run: no '$want' in: $out"
done
out=$(env "${slurm_env[@]}" AVIARY_LAUNCHER=srun bash "$sbatch_script" 2>&1); rc=$?
for want in "srun --mpi=pmix --ntasks-per-node=4 --cpus-per-task=8" "serve --coordinator coord:7070"; do
  grep -qF -- "$want" <<<"$out" && ok || fail "sbatch srun dry run (rc=$rc): no '$want' in: $out"
done
# Nodes with 2 threads per core (the stand-in lscpu of $tmp/smt): Slurm's 8 CPUs per task are
# 4 cores' threads, so PE=4 and 4 torch threads; srun keeps --cpus-per-task=8 (Slurm's count);
# the job's --threads-per-core=1 (SLURM_THREADS_PER_CORE) makes the 8 CPUs 8 cores;
# AVIARY_CORES_PER_RANK sets it outright.
for case in "|--map-by ppr:4:node:PE=4|--threads 4 " \
            "AVIARY_LAUNCHER=srun|--cpus-per-task=8 --cpu-bind=cores|--threads 4 " \
            "SLURM_THREADS_PER_CORE=1|--map-by ppr:4:node:PE=8|--threads 8 " \
            "AVIARY_CORES_PER_RANK=6|--map-by ppr:4:node:PE=6|--threads 6 "; do
  IFS='|' read -r extra want1 want2 <<<"$case"
  # shellcheck disable=SC2086  # $extra: one NAME=value or none
  out=$(env "${slurm_env[@]}" PATH="$tmp/smt:$tmp/bin:$PATH" $extra bash "$sbatch_script" 2>&1); rc=$?
  for want in "$want1" "$want2"; do
    [ $rc -eq 0 ] && grep -qF -- "$want" <<<"$out" && ok ||
      fail "sbatch dry run, 2 threads per core, SLURM_CPUS_PER_TASK=8 ${extra:-} (rc=$rc): no '$want' in: $out"
  done
done
out=$(env "${slurm_env[@]}" AVIARY_CORES_PER_RANK=0 bash "$sbatch_script" 2>&1); rc=$?
[ $rc -eq 2 ] && grep -qF "AVIARY_CORES_PER_RANK '0'" <<<"$out" && ok || fail "sbatch with AVIARY_CORES_PER_RANK=0: rc=$rc: $out"
# The time-limit signal (SIGUSR1 to the batch shell): the group stops cleanly, the job is
# requeued. A real 2-rank group of the stand-in worker on this host.
# sbatch_time_limit WHAT JOB_ID [NAME=VALUE...]: runs the script as job JOB_ID with the extra
# environment, sends SIGUSR1 once both ranks run, and checks the clean stop and the requeue.
sbatch_time_limit() {
  local what=$1 id=$2 log="$tmp/sbatch-$2.log" spid rc r
  shift 2
  rm -f "$tmp"/rank*.args "$tmp"/rank*.stopped "$tmp/scontrol.log"
  env PATH="$tmp/bin:$PATH" SLURM_JOB_ID="$id" SLURM_JOB_NODELIST=localhost SLURM_GPUS_ON_NODE=2 \
      SLURM_CPUS_PER_TASK=1 SLURM_SUBMIT_DIR="$repo" AVIARY_COORDINATOR=127.0.0.1:7070 \
      AVIARY_WORKER="$tmp/fake-worker" AVIARY_STOP_TIMEOUT=5 "$@" \
      bash "$sbatch_script" >"$log" 2>&1 &
  spid=$!
  if wait_for "$tmp/rank0.args" "$tmp/rank1.args"; then
    kill -USR1 $spid
  else
    fail "$what: the group's ranks did not start:"; sed 's/^/    /' "$log"
    kill -TERM $spid
  fi
  wait $spid; rc=$?
  [ $rc -eq 0 ] && ok || { fail "$what after SIGUSR1: rc=$rc"; sed 's/^/    /' "$log"; }
  for r in 0 1; do
    [ -e "$tmp/rank$r.stopped" ] && ok || { fail "$what: rank $r was killed before it stopped cleanly"; sed 's/^/    /' "$log"; }
  done
  grep -qx "requeue $id" "$tmp/scontrol.log" 2>/dev/null && ok ||
    { fail "$what: no 'scontrol requeue $id' after SIGUSR1"; sed 's/^/    /' "$log"; }
}
sbatch_time_limit sbatch 4243

# The same with AVIARY_LAUNCHER=srun: a stand-in srun with Slurm's signal handling (SIGUSR2
# forwarded to the tasks; a SIGTERM it receives kills them: "forcing job termination"). The
# script's stop must reach the ranks as SIGUSR2, not kill them.
mkdir -p "$tmp/srunbin"
cat >"$tmp/srunbin/srun" <<'EOF'
#!/usr/bin/env bash
while [ "${1#--}" != "$1" ]; do shift; done
pids=()
trap 'kill -USR2 "${pids[@]}" 2>/dev/null' USR2
trap 'echo "srun: forcing job termination" >&2; kill -KILL "${pids[@]}" 2>/dev/null; exit 143' TERM
for r in 0 1; do OMPI_COMM_WORLD_RANK=$r "$@" & pids+=($!); done
for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do wait "$p"; done; done
EOF
chmod +x "$tmp/srunbin/srun"
sbatch_time_limit "sbatch with srun" 4244 PATH="$tmp/srunbin:$tmp/bin:$PATH" AVIARY_LAUNCHER=srun AVIARY_STOP_TIMEOUT=20

# A group that fails by itself (the stall watchdog's exit 1, a crash) is launched again in its
# allocation, AVIARY_RELAUNCHES times (it ended the job, and the allocation with it, for good);
# exit 2 (a configuration error, which a relaunch repeats) is not. A one-task stand-in srun.
mkdir -p "$tmp/srun1"
cat >"$tmp/srun1/srun" <<'EOF'
#!/usr/bin/env bash
while [ "${1#--}" != "$1" ]; do shift; done
OMPI_COMM_WORLD_RANK=0 "$@"
EOF
chmod +x "$tmp/srun1/srun"
for code in 1 2; do
  printf '#!/usr/bin/env bash\necho run >>"%s/failing.runs"\nexit %s\n' "$tmp" "$code" >"$tmp/failing-worker"
  chmod +x "$tmp/failing-worker"
  rm -f "$tmp/failing.runs"
  out=$(env PATH="$tmp/srun1:$tmp/bin:$PATH" SLURM_JOB_ID=4245 SLURM_JOB_NODELIST=localhost SLURM_GPUS_ON_NODE=1 \
        SLURM_CPUS_PER_TASK=1 SLURM_SUBMIT_DIR="$repo" AVIARY_COORDINATOR=127.0.0.1:7070 \
        AVIARY_WORKER="$tmp/failing-worker" AVIARY_LAUNCHER=srun AVIARY_RELAUNCHES=1 bash "$sbatch_script" 2>&1); rc=$?
  runs=$(grep -c . "$tmp/failing.runs" 2>/dev/null || echo 0)
  want=1
  if [ "$code" = 1 ]; then want=2; fi
  if [ $rc -eq "$code" ] && [ "$runs" -eq "$want" ]; then ok; else
    fail "sbatch, a group exiting $code by itself: rc=$rc, $runs launches (want rc $code, $want launches): $out"
  fi
  if [ "$code" = 1 ]; then
    grep -qF "launching the group again in 10 s (relaunch 1 of 1, AVIARY_RELAUNCHES)" <<<"$out" && ok ||
      fail "sbatch relaunch: no notice in: $out"
  fi
done
# The time limit's signal during the pause before a relaunch: a clean stop (exit 0, requeued;
# it exited 1, the code of the group that had failed before the pause).
printf '#!/usr/bin/env bash\necho run >>"%s/failing.runs"\nexit 1\n' "$tmp" >"$tmp/failing-worker"
rm -f "$tmp/failing.runs" "$tmp/scontrol.log"
env PATH="$tmp/srun1:$tmp/bin:$PATH" SLURM_JOB_ID=4246 SLURM_JOB_NODELIST=localhost SLURM_GPUS_ON_NODE=1 \
    SLURM_CPUS_PER_TASK=1 SLURM_SUBMIT_DIR="$repo" AVIARY_COORDINATOR=127.0.0.1:7070 \
    AVIARY_WORKER="$tmp/failing-worker" AVIARY_LAUNCHER=srun AVIARY_RELAUNCHES=3 \
    bash "$sbatch_script" >"$tmp/sbatch-4246.log" 2>&1 &
spid=$!
deadline=$((SECONDS + 30))
until grep -q "launching the group again" "$tmp/sbatch-4246.log" 2>/dev/null || [ $SECONDS -ge $deadline ]; do sleep 0.1; done
kill -USR1 $spid
wait $spid; rc=$?
runs=$(grep -c . "$tmp/failing.runs" 2>/dev/null || echo 0)
if [ $rc -eq 0 ] && [ "$runs" -eq 1 ] && grep -qx "requeue 4246" "$tmp/scontrol.log" 2>/dev/null; then ok; else
  fail "sbatch stopped during a relaunch's pause: rc=$rc, $runs launches: $(cat "$tmp/sbatch-4246.log")"
fi
out=$(env "${slurm_env[@]}" AVIARY_RELAUNCHES=x bash "$sbatch_script" 2>&1); rc=$?
[ $rc -eq 2 ] && grep -qF "AVIARY_RELAUNCHES 'x'" <<<"$out" && ok || fail "sbatch with AVIARY_RELAUNCHES=x: rc=$rc: $out"

echo "== docs/DEPLOY.md: the launch-group.sh example and the output it shows"
# The page's hostfile, its `launch-group.sh ... --dry-run` command and the mpirun command it says
# that prints, taken from the page as written and run here on the machine it describes: a normal
# user (the root-only --allow-run-as-root is dropped), 96 cores of 2 threads (stand-in nproc and
# lscpu), LD_LIBRARY_PATH and NCCL_IB_HCA set. The token file is the only path replaced (the
# launcher checks it is readable).
doc=$repo/docs/DEPLOY.md
if ! "$py" - "$doc" "$tmp/docex" <<'EOF2'
import os, re, sys
text = open(sys.argv[1]).read()
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
m = re.search(r"cat > hosts <<EOF\n(.*?)\nEOF\n(deploy/launch-group\.sh .*?--dry-run)\n```\n(.*?)\n```\n(.*?)```", text, re.S)
if not m:
    sys.exit("docs/DEPLOY.md: no hostfile / launch-group.sh --dry-run / printed-command example found")
hosts, command, between, printed = m.groups()
if "prints" not in between:
    sys.exit("docs/DEPLOY.md: the block after the launch-group.sh example is not introduced by 'prints'")
open(os.path.join(out, "hosts"), "w").write(hosts + "\n")
join = lambda s: " ".join(s.replace("\\\n", " ").split())
open(os.path.join(out, "command"), "w").write(join(command) + "\n")
open(os.path.join(out, "printed"), "w").write(join(printed) + "\n")
EOF2
then
  fail "could not extract the launch-group.sh example from $doc"
else
  lscpu_standin "$tmp/docex/bin" 2 48 2
  printf '#!/bin/sh\necho 192\n' >"$tmp/docex/bin/nproc"
  chmod +x "$tmp/docex/bin/nproc"
  read -r -a words <"$tmp/docex/command"
  token=""
  for i in "${!words[@]}"; do
    if [ "${words[$i]}" = --token-file ]; then token=${words[$((i + 1))]}; fi
  done
  : >"$tmp/docex/worker.token"
  argv=()
  for w in "${words[@]:1}"; do
    if [ -n "$token" ] && [ "$w" = "$token" ]; then argv+=("$tmp/docex/worker.token"); else argv+=("$w"); fi
  done
  got=$(cd "$tmp/docex" && env -i HOME="$tmp" PATH="$tmp/docex/bin:/usr/bin:/bin" LD_LIBRARY_PATH=/opt/deps/lib \
          NCCL_IB_HCA=mlx5 bash "$deploy/launch-group.sh" "${argv[@]}" 2>&1); rc=$?
  got=$(sed -e 's/ --allow-run-as-root//' -e "s|$tmp/docex/worker.token|$token|" <<<"$got" | xargs)
  want=$(xargs <"$tmp/docex/printed")
  if [ $rc -eq 0 ] && [ "$got" = "$want" ]; then ok
  else fail "docs/DEPLOY.md's launch-group.sh example (rc=$rc) prints:"$'\n'"    $got"$'\n'"  the page shows:"$'\n'"    $want"; fi
fi

echo "deploy checks: $passes passed, $fails failed"
[ $fails -eq 0 ]
