#!/usr/bin/env bash
# The web console in a real browser (issue 16): a real coordinator serving the console
# (console_listen, client + viewer + worker tokens), two real worker groups
# (`mpirun aviary-worker serve`, 2 ranks and 1 rank) training two small jobs on the synthetic
# corpus, and Debian's headless chromium driven by python3-selenium through chromium-driver
# (console_browser.py): login, jobs page, live curves that grow, click through to a task,
# compare two jobs with their config diff, groups page, a coordinator restart the page rides
# through, and the refusals (no token; a viewer token trying to cancel). Screenshots go to
# ARTIFACTS_DIR. Exit 77 (skipped) only when chromium is not installed.
# usage: console_browser.sh BIN_DIR MPIEXEC ARTIFACTS_DIR
set -uo pipefail
bin=$1
mpiexec=${2:-mpirun}
artifacts=${3:-$PWD/test-artifacts/console}
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/service_lib.sh"
mkdir -p "$artifacts"
rm -f "$artifacts"/*.png

service_recipe 2 8 "[0]"
write_coordinator_config 20 2
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$tmp/viewer.token"
cat >> "$tmp/coordinator.yaml" <<YAML
viewer_token_file: $tmp/viewer.token
console_listen: 127.0.0.1:0
console_port_file: $tmp/console.port
YAML
start_coordinator || exit 1
cport=$(cat "$tmp/console.port")
# The coordinator restarts on the ports it got (the groups redial the gRPC port, the page the
# console's). Picked by the kernel at the first start: a port picked free beforehand could be
# taken by another test's listener before the coordinator bound it.
sed -i -e "s#^listen: .*#listen: 127.0.0.1:$port#" -e "s#^console_listen: .*#console_listen: 127.0.0.1:$cport#" \
  "$tmp/coordinator.yaml"
echo "coordinator on 127.0.0.1:$port, console on http://127.0.0.1:$cport/"

# The JSON API without a browser: no token, a worker token, a viewer's cancel.
api="http://127.0.0.1:$cport/api"
code=$(curl -s -o "$tmp/body" -w '%{http_code}' "$api/jobs")
[ "$code" = 401 ] && grep -q UNAUTHENTICATED "$tmp/body" && ok || fail "/api/jobs without a token: HTTP $code $(cat "$tmp/body")"
code=$(curl -s -o "$tmp/body" -w '%{http_code}' -H "Authorization: Bearer $(cat "$tmp/worker.token")" "$api/jobs")
[ "$code" = 403 ] && ok || fail "/api/jobs with the worker token: HTTP $code $(cat "$tmp/body")"

# Two jobs: a two-stage one (pretrain -> fine-tune) on a 2-rank group and a
# fine-tune-only one with another learning rate and dropout on a 1-rank group.
start_group g1 2
start_group g2 1
# job1's fine-tuning runs until the end of the test (200 epochs): the restart's checks need it
# still training then, and 8 epochs were sometimes over by that point.
job1=$(av submit "$tmp/p.yaml" --name baseline --tag team=birds --note "first try" \
         --set stages.finetune.epochs=200 | tail -n 1)
job2=$(av submit "$tmp/p.yaml" --name "lower lr" --set stages.pretrain.enabled=false \
         --set train.lr_max_per_sample=5.0e-5 --set model.dropout=0.3 --set stages.finetune.epochs=6 | tail -n 1)
[[ "$job1" =~ ^j[0-9a-f]{12}$ && "$job2" =~ ^j[0-9a-f]{12}$ ]] || { fail "submit: '$job1' '$job2'"; exit 1; }
echo "jobs $job1 $job2"

code=$(curl -s -o "$tmp/body" -w '%{http_code}' -X POST -H "Authorization: Bearer $(cat "$tmp/viewer.token")" \
         "$api/jobs/$job1/cancel")
[ "$code" = 403 ] && grep -q "role 'viewer'" "$tmp/body" && ok || fail "viewer cancel over /api: HTTP $code $(cat "$tmp/body")"
code=$(curl -s -o "$tmp/body" -w '%{http_code}' -H "Authorization: Bearer $(cat "$tmp/viewer.token")" "$api/jobs/$job1")
[ "$code" = 200 ] && grep -q "\"job_id\":\"$job1\"" "$tmp/body" && ok || fail "/api/jobs/$job1 with the viewer token: HTTP $code"

status=0
# In its own process group (with chromedriver and chromium) so that the cleanup ends them all.
setsid /usr/bin/python3 "$(dirname "$0")/console_browser.py" --url "http://127.0.0.1:$cport" \
  --client-token "$tmp/token" --viewer-token "$tmp/viewer.token" --job1 "$job1" --job2 "$job2" \
  --artifacts "$artifacts" --restart-file "$tmp/restart" &
browser_pid=$!
pids+=("$browser_pid")
# The browser script asks for a coordinator restart by writing $tmp/restart.request; this loop
# stops the coordinator (SIGTERM), starts it again on the same database and console port (the
# groups keep heartbeating and keep their tasks) and answers in $tmp/restart.done ...
while kill -0 "$browser_pid" 2>/dev/null; do
  if [ -f "$tmp/restart.request" ]; then
    rm -f "$tmp/restart.request"
    kill -TERM "$coord_pid"; wait "$coord_pid" 2>/dev/null
    # Written whole, then renamed: the browser script reads it as soon as it exists.
    if start_coordinator; then echo ok > "$tmp/restart.done.part"; else echo failed > "$tmp/restart.done.part"; fi
    mv "$tmp/restart.done.part" "$tmp/restart.done"
  fi
  # ... and for a job of its own to cancel (long enough to be running still), answered with its
  # id in $tmp/restart.job.
  if [ -f "$tmp/restart.submit" ]; then
    rm -f "$tmp/restart.submit"
    av submit "$tmp/p.yaml" --name "to cancel" --set stages.pretrain.enabled=false \
      --set stages.finetune.epochs=200 | tail -n 1 > "$tmp/restart.job.part"
    mv "$tmp/restart.job.part" "$tmp/restart.job"
  fi
  sleep 0.3
done
wait "$browser_pid"; status=$?
if [ "$status" -eq 77 ]; then
  echo "SKIP: chromium is not installed (see above)"
  exit 77
fi
[ "$status" -eq 0 ] && ok || { fail "the browser checks failed (exit $status)"; tail -n 20 "$tmp/coordinator.log"; }
ls "$artifacts"/*.png > /dev/null 2>&1 && ok || fail "no screenshots in $artifacts"

echo "console_browser: $passes checks passed, $fails failed; screenshots in $artifacts"
[ "$fails" -eq 0 ]
