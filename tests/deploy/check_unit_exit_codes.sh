#!/usr/bin/env bash
# Checks deploy/systemd/aviary-coordinator.service against the real aviary-coordinator's exit
# codes: a config error (exit 2, before it listens) must be in RestartPreventExitStatus, so that
# systemd leaves the unit failed with the error in the journal instead of restarting it every
# RestartSec for ever; a data root that does not exist (a shared filesystem not mounted yet
# after a reboot) must exit with a code the unit restarts, so that the coordinator comes up once
# the mount does; a data root that is a file stays a config error; SIGTERM (KillSignal) must end
# a running coordinator with exit 0.
#
#   tests/deploy/check_unit_exit_codes.sh COORDINATOR_BINARY [REPO]
# shellcheck disable=SC2015  # `ok` never fails
set -uo pipefail
coordinator=$1
repo=$(cd "${2:-$(dirname "$0")/../..}" && pwd)
# shellcheck source=SCRIPTDIR/../integration/lib.sh
source "$repo/tests/integration/lib.sh"
unit=$repo/deploy/systemd/aviary-coordinator.service

# A config error: an unknown key.
printf 'listen: 127.0.0.1:0\nlisten_adress: 127.0.0.1:0\n' >"$tmp/bad.yaml"
"$coordinator" --config "$tmp/bad.yaml" >"$tmp/bad.out" 2>&1; rc=$?
if [ $rc -ne 2 ] || ! grep -q "listen_adress" "$tmp/bad.out"; then
  fail "aviary-coordinator with an unknown config key: rc=$rc, wanted 2 naming the key: $(cat "$tmp/bad.out")"
else
  ok
fi
prevent=$(sed -n 's/^RestartPreventExitStatus=//p' "$unit")
if [[ " $prevent " == *" $rc "* ]]; then ok
else fail "$unit: RestartPreventExitStatus='$prevent' lacks $rc, the coordinator's exit code for config errors (systemd restarts it every RestartSec for ever)"; fi

mkdir -p "$tmp/state"
printf 'listen: 127.0.0.1:0\nmetrics_listen: 127.0.0.1:0\ndatabase: %s/state/aviary.db\nwork_dir: %s/state/runs\nallow_no_auth: true\n' \
  "$tmp" "$tmp" >"$tmp/good.yaml"

# A data root that does not exist (its share not mounted yet): an exit code that the unit's
# Restart= restarts (on-failure: any non-zero code outside RestartPreventExitStatus), with a
# message that says so; the unit must not be started for good.
restart=$(sed -n 's/^Restart=//p' "$unit")
timeout 60 "$coordinator" --config "$tmp/good.yaml" --set "data_roots=$tmp/not-mounted" >"$tmp/nfs.out" 2>&1; rc=$?
if [ $rc -eq 0 ] || [ $rc -eq 124 ] || [[ " $prevent " == *" $rc "* ]] ||
   { [ "$restart" != on-failure ] && [ "$restart" != always ]; }; then
  fail "aviary-coordinator --set data_roots=$tmp/not-mounted: rc=$rc; the unit (Restart=$restart, RestartPreventExitStatus='$prevent') would not restart it once the share is mounted: $(cat "$tmp/nfs.out")"
else
  ok
fi
grep -q "not-mounted.*not mounted yet" "$tmp/nfs.out" && ok ||
  fail "aviary-coordinator with a data root that does not exist: no 'not mounted yet' naming the root in: $(cat "$tmp/nfs.out")"
# A data root that is a file, not a folder: a config error still (exit 2, not restarted).
: >"$tmp/a-file"
timeout 60 "$coordinator" --config "$tmp/good.yaml" --set "data_roots=$tmp/a-file" >"$tmp/file.out" 2>&1; rc=$?
if [ $rc -eq 2 ] && grep -q "is not a folder" "$tmp/file.out"; then ok
else fail "aviary-coordinator with a data root that is a file: rc=$rc, wanted 2 (a config error): $(cat "$tmp/file.out")"; fi
# Both a missing root and a bad value: the config error wins (exit 2, naming the value).
timeout 60 "$coordinator" --config "$tmp/good.yaml" --set "data_roots=$tmp/not-mounted" --set listen=bogus \
  >"$tmp/both.out" 2>&1; rc=$?
if [ $rc -eq 2 ] && grep -q "listen=bogus" "$tmp/both.out"; then ok
else fail "aviary-coordinator with a missing data root and listen=bogus: rc=$rc, wanted 2 naming listen: $(cat "$tmp/both.out")"; fi
# A missing root before a root that is a file: the file is the error (exit 2), whatever the order.
timeout 60 "$coordinator" --config "$tmp/good.yaml" --set "data_roots=[$tmp/not-mounted, $tmp/a-file]" \
  >"$tmp/roots.out" 2>&1; rc=$?
if [ $rc -eq 2 ] && grep -q "a-file.*is not a folder" "$tmp/roots.out"; then ok
else fail "aviary-coordinator with a missing data root and one that is a file: rc=$rc, wanted 2 naming the file: $(cat "$tmp/roots.out")"; fi
# A missing root and a missing token file: the token file is the error (exit 2), not a wait for the mount.
grep -v '^allow_no_auth' "$tmp/good.yaml" >"$tmp/token.yaml"
printf 'token_file: %s/no-such.token\nworker_token_file: %s/no-such.token\n' "$tmp" "$tmp" >>"$tmp/token.yaml"
timeout 60 "$coordinator" --config "$tmp/token.yaml" --set "data_roots=$tmp/not-mounted" >"$tmp/token.out" 2>&1; rc=$?
if [ $rc -eq 2 ] && grep -q "no-such.token" "$tmp/token.out"; then ok
else fail "aviary-coordinator with a missing data root and a missing token file: rc=$rc, wanted 2 naming the token file: $(cat "$tmp/token.out")"; fi

# SIGTERM (the unit's KillSignal) to a running coordinator: exit 0.
signal=$(sed -n 's/^KillSignal=SIG//p' "$unit")
"$coordinator" --config "$tmp/good.yaml" --port-file "$tmp/port" >"$tmp/good.out" 2>&1 &
pid=$!
deadline=$((SECONDS + 60))
while [ ! -s "$tmp/port" ] && kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
if [ ! -s "$tmp/port" ]; then
  fail "the coordinator did not start: $(cat "$tmp/good.out")"; kill -KILL "$pid" 2>/dev/null
else
  kill "-${signal:-TERM}" "$pid"
  wait "$pid"; rc=$?
  [ $rc -eq 0 ] && ok || fail "SIG${signal:-TERM} (the unit's KillSignal) to the coordinator: rc=$rc, wanted 0: $(tail -n 5 "$tmp/good.out")"
fi
echo "unit exit-code checks: $passes passed, $fails failed"
[ $fails -eq 0 ]
