#!/usr/bin/env bash
# `aviary-worker serve` without a coordinator: bad flags exit 2 naming the flag; an unreachable
# coordinator is retried with backoff (each failure logged with the gRPC code and the address)
# and --connect-timeout-s ends it with exit 1 on every rank (one process and mpirun -np 2); the
# group's /metrics answers while it waits, and SIGTERM ends it with exit 0.
# usage: serve_cli.sh BIN_DIR MPIEXEC
set -uo pipefail
bin=$1
mpiexec=$2
worker=$bin/aviary-worker
source "$(dirname "$0")/lib.sh"

expect "argument was not expected: --coordinatr" "$worker" serve --coordinatr 127.0.0.1:7070
expect "--coordinator is required" "$worker" serve --metrics-listen ""
expect "--coordinator: expected HOST:PORT, got 'localhost'" "$worker" serve --coordinator localhost
# A port out of range or missing was dialed as another (99999 wrapped to 34463, "host:" to 443).
expect "--coordinator: expected HOST:PORT with a port in 1..65535, got '127.0.0.1:99999'" \
  "$worker" serve --coordinator 127.0.0.1:99999 --metrics-listen "" --connect-timeout-s 1
expect "--coordinator: expected HOST:PORT with a port in 1..65535, got 'localhost:'" \
  "$worker" serve --coordinator localhost: --metrics-listen "" --connect-timeout-s 1
# A TLS or token flag given empty (an unset variable) is refused: it was read as not given, and
# the group dialed in plaintext with AVIARY_TOKEN.
for flag in --tls-ca --token-file --tls-cert --tls-key; do
  expect "$flag: expected a file, got ''" env AVIARY_TOKEN=x "$worker" serve --coordinator 127.0.0.1:1 "$flag" "" \
    --metrics-listen "" --connect-timeout-s 1
done
expect "--log-level: unknown log level 'loud' (expected debug, info, warning, error, off)" \
  "$worker" serve --coordinator 127.0.0.1:1 --log-level loud --metrics-listen ""
expect "--device: expected one of auto, cpu, cuda, got 'tpu'" "$worker" serve --coordinator 127.0.0.1:1 --device tpu --metrics-listen ""
expect "--max-tasks" "$worker" serve --coordinator 127.0.0.1:1 --max-tasks -1 --metrics-listen ""
expect "--stall-timeout-s" "$worker" serve --coordinator 127.0.0.1:1 --stall-timeout-s -5 --metrics-listen ""
expect "--stall-timeout-s" "$worker" serve --coordinator 127.0.0.1:1 --stall-timeout-s soon --metrics-listen ""
expect "--token-file" "$worker" serve --coordinator 127.0.0.1:1 --token-file "$tmp/missing-token" --metrics-listen ""
: > "$tmp/empty-token"
expect "holds no token" "$worker" serve --coordinator 127.0.0.1:1 --token-file "$tmp/empty-token" --metrics-listen ""
printf '# only a comment\n\n' > "$tmp/comment-token"
expect "holds no token" "$worker" serve --coordinator 127.0.0.1:1 --token-file "$tmp/comment-token" --metrics-listen ""
# A client certificate (mutual TLS) needs its key, and both must be readable.
expect "--tls-cert: a client certificate needs both --tls-cert and --tls-key" "$worker" serve \
  --coordinator 127.0.0.1:1 --tls-cert "$tmp/empty-token" --metrics-listen ""
expect "AVIARY_TLS_KEY" env AVIARY_TLS_CERT="$tmp/empty-token" AVIARY_TLS_KEY="$tmp/missing.key" "$worker" serve \
  --coordinator 127.0.0.1:1 --metrics-listen ""

# A port nobody listens on: outside the ephemeral range, where another test's listener could
# take a port found free here.
addr=127.0.0.1:1

# unreachable_case LABEL COMMAND...: exit 1, the address and UNAVAILABLE in the final message,
# and at least one "retrying in" line before it.
unreachable_case() {
  local label=$1; shift
  local out rc
  out=$("$@" 2>&1); rc=$?
  if [ $rc -ne 1 ]; then fail "$label: rc=$rc, wanted 1"; echo "$out" | sed 's/^/    /'; return; fi
  grep -qF "could not register with the coordinator at $addr within --connect-timeout-s 2" <<<"$out" \
    || { fail "$label: no final message"; echo "$out" | sed 's/^/    /'; return; }
  grep -qE "RegisterGroup to $addr: UNAVAILABLE: .*retrying in [0-9.]+ s" <<<"$out" \
    || { fail "$label: no retry line"; echo "$out" | sed 's/^/    /'; return; }
  ok
}
unreachable_case "one process" "$worker" serve --coordinator "$addr" --connect-timeout-s 2 --metrics-listen ""
unreachable_case "mpirun -np 2" "$mpiexec" -np 2 --oversubscribe "$worker" serve --coordinator "$addr" \
  --connect-timeout-s 2 --metrics-listen 127.0.0.1:0

# /metrics while waiting for the coordinator, then SIGTERM: exit 0.
"$worker" serve --coordinator "$addr" --metrics-listen 127.0.0.1:0 --metrics-port-file "$tmp/mport" \
  >"$tmp/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do [ -s "$tmp/mport" ] && break; sleep 0.1; done
if [ ! -s "$tmp/mport" ]; then
  fail "no --metrics-port-file"
else
  mport=$(cat "$tmp/mport")
  metrics=$(curl -sf "http://127.0.0.1:$mport/metrics")
  for name in aviary_coordinator_connected aviary_reports_buffered aviary_samples_total \
              aviary_samples_per_second aviary_step_duration_seconds_bucket \
              aviary_allreduce_duration_seconds_bucket aviary_loader_queue_depth \
              aviary_loader_wait_seconds_total; do
    grep -q "^$name{" <<<"$metrics" || fail "/metrics lacks $name"
  done
  grep -q '^aviary_coordinator_connected{group_id=""} 0' <<<"$metrics" || fail "connected should be 0"
  if command -v promtool >/dev/null; then
    promtool check metrics <<<"$metrics" >/dev/null 2>&1 || fail "promtool check metrics: $(promtool check metrics <<<"$metrics" 2>&1)"
  fi
  ok
fi
kill -TERM $pid
wait $pid; rc=$?
[ $rc -eq 0 ] || { fail "SIGTERM while registering: rc=$rc"; sed 's/^/    /' "$tmp/serve.log"; }

echo "serve_cli: $passes passed, $fails failed"
[ $fails -eq 0 ]
