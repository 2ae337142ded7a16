#!/usr/bin/env bash
# The `aviary` client against a real coordinator when the user interrupts it or its output goes
# away (docs/SERVICE.md, "Client"): Ctrl-C (SIGINT) and SIGTERM end `watch` and `logs --follow`
# at once and quietly (status 130, 143), also while they wait to reconnect; a reader that went
# away ends any command by SIGPIPE (141) without a word, even while `watch` or `logs --follow`
# have nothing to write and when the parent left SIGPIPE ignored; any other failed write to
# standard output is an error naming it, exit 1.
# usage: cli_signals.sh AVIARY_BIN
set -uo pipefail
aviary=$1
source "$(dirname "$0")/lib.sh"
coordinator_bin="$(dirname "$aviary")/aviary-coordinator"

# wait_exit PID: waits for a background client at most 10 s (generous: it should take
# milliseconds); sets rc, 999 when it had to be killed.
wait_exit() {
  local i
  for i in $(seq 100); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$1" 2>/dev/null; then
    kill -KILL "$1"; wait "$1"; rc=999
  else
    wait "$1"; rc=$?
  fi
}
# wait_for TEXT FILE: polls (at most 30 s) until FILE holds TEXT.
wait_for() {
  local i
  for i in $(seq 300); do grep -qF -- "$1" "$2" && return 0; sleep 0.1; done
  fail "no '$1' in $2 within 30 s: $(cat "$2")"
  return 1
}
# wait_polling PID: polls (at most 30 s) until `logs --follow` sleeps between its polls, its first
# poll answered (it prints nothing for a job without lines; /proc's wchan shows the sleep).
# A kernel that hides wchan (it reads "0", as for a running process, or not at all) gets the 30 s.
wait_polling() {
  local i w shown=0
  for i in $(seq 300); do
    w=$(cat "/proc/$1/wchan" 2>/dev/null)
    case "$w" in *nanosleep*) return 0 ;; ""|0) ;; *) shown=1 ;; esac
    sleep 0.1
  done
  [ $shown -eq 0 ] && return 0
  fail "logs --follow (pid $1) did not reach its poll loop within 30 s (wchan: $(cat "/proc/$1/wchan" 2>&1))"
  return 1
}
# closed_pipe CMD...: runs CMD with standard output a pipe whose reader has already gone (so the
# first write, if any, meets a closed pipe: no race with a reader's exit).
closed_pipe() {
  rm -f "$tmp/fifo"; mkfifo "$tmp/fifo"
  exec 3<>"$tmp/fifo" 4>"$tmp/fifo" 3<&-
  "$@" >&4 4>&-
  local status=$?
  exec 4>&-
  return $status
}

"$aviary" synth --out "$tmp/t" --layout 2024 --species 6 --recordings 40 --seed 3 --max-seconds 3 >/dev/null
loopback_coordinator_config
finetune_job_config "$tmp/t"
"$coordinator_bin" --config "$tmp/c.yaml" --port-file "$tmp/c.yaml.port" > "$tmp/c.log" 2>&1 & coord_pid=$!
# The background processes still running at exit (a failed case) go with the scratch folder.
trap 'kill -KILL $coord_pid ${pid:-} ${watch_pid:-} ${logs_pid:-} 2>/dev/null; rm -rf "$tmp"' EXIT
if ! wait_for listening "$tmp/c.log"; then
  kill -TERM $coord_pid; echo "cli_signals: $passes passed, $fails failed"; exit 1
fi
port=$(cat "$tmp/c.yaml.port")
av() { "$aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/c.token" "$@"; }
# "${av_bg[@]}" ARGS &: $! is the client itself (env execs it). A non-interactive shell starts
# background commands with SIGINT ignored; a terminal's Ctrl-C reaches a program with it at its
# default.
av_bg=(env --default-signal=INT,TERM "$aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/c.token")
# No worker group: the jobs stay PENDING and `watch` has nothing new to say.
job=$(av submit "$tmp/w.yaml" 2>/dev/null | tail -1)
# 256 tasks: `status --json` is about 128 KB, more than a pipe holds.
lrs=$(seq -s, 1 16 | sed 's/[0-9][0-9]*/&e-7/g')
dropouts=$(seq -s, 10 25 | sed 's/[0-9][0-9]*/0.&/g')
sweep=$(av submit "$tmp/w.yaml" --sweep "train.lr_max_per_sample=[$lrs]" --sweep "model.dropout=[$dropouts]" 2>/dev/null | tail -1)

# 1. SIGINT and SIGTERM: `watch` blocked in the stream's Read, `logs --follow` between polls.
for sig in INT TERM; do
  want=$([ $sig = INT ] && echo 130 || echo 143)
  "${av_bg[@]}" watch "$job" > "$tmp/w.out" 2> "$tmp/w.err" & pid=$!
  wait_for PENDING "$tmp/w.out"
  kill -$sig $pid; wait_exit $pid
  if [ $rc -ne "$want" ] || [ -s "$tmp/w.err" ]; then
    fail "watch, then SIG$sig -> rc=$rc (wanted $want), stderr: $(cat "$tmp/w.err")"
  else
    ok
  fi
  "${av_bg[@]}" logs "$job" --follow > "$tmp/l.out" 2> "$tmp/l.err" & pid=$!
  wait_polling $pid
  kill -$sig $pid; wait_exit $pid
  if [ $rc -ne "$want" ] || [ -s "$tmp/l.err" ]; then
    fail "logs --follow, then SIG$sig -> rc=$rc (wanted $want), stderr: $(cat "$tmp/l.err")"
  else
    ok
  fi
done

# 2. A reader that goes away: SIGPIPE, no message.
# watch on a quiet job wrote its first lines and waited for the next event, for as long as the
# job stayed unchanged (here: for ever), with head long gone.
out=$(timeout 20 "$aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/c.token" watch "$job" 2>"$tmp/e" | head -1)
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 141 ] || ! grep -qF "job $job PENDING" <<<"$out" || [ -s "$tmp/e" ]; then
  fail "watch JOB | head -1 -> rc=$rc (wanted 141, 124 is a hang), out '$out', stderr: $(cat "$tmp/e")"
else
  ok
fi
# logs --follow of a job without lines never writes: only watching the pipe can end it.
closed_pipe timeout 20 "$aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/c.token" logs "$job" --follow 2>"$tmp/e"
rc=$?
if [ $rc -ne 141 ] || [ -s "$tmp/e" ]; then
  fail "logs --follow to a closed pipe -> rc=$rc (wanted 141, 124 is a hang), stderr: $(cat "$tmp/e")"
else
  ok
fi
out=$(av status "$sweep" --json 2>"$tmp/e" | head -1); rc=${PIPESTATUS[0]}
if [ "$rc" -ne 141 ] || [ "$out" != "{" ] || [ -s "$tmp/e" ]; then
  fail "status SWEEP --json | head -1 -> rc=$rc (wanted 141), out '$out', stderr: $(cat "$tmp/e")"
else
  ok
fi
# A parent that left SIGPIPE ignored (systemd services do): the same, not a silent exit 0.
for cmd in "list" "status $sweep"; do
  # shellcheck disable=SC2086  # $cmd is words
  (trap '' PIPE; closed_pipe av $cmd 2>"$tmp/e"); rc=$?
  if [ $rc -ne 141 ] || [ -s "$tmp/e" ]; then
    fail "$cmd to a closed pipe with SIGPIPE ignored -> rc=$rc (wanted 141), stderr: $(cat "$tmp/e")"
  else
    ok
  fi
done

# 3. Other failed writes: an error naming standard output and the reason, exit 1, not exit 0
# with the output lost (watch went on watching a job nobody saw).
for case in "list|aviary list" "status $job|aviary status" "--version|aviary" "--timeout 20 watch $job|aviary watch"; do
  cmd=${case%|*}
  want="${case#*|}: cannot write to standard output: No space left on device"
  # shellcheck disable=SC2086  # $cmd is words
  out=$(timeout 20 "$aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/c.token" $cmd 2>&1 >/dev/full); rc=$?
  if [ $rc -ne 1 ] || [ "$out" != "$want" ]; then
    fail "$cmd > /dev/full -> rc=$rc (wanted 1, 124 is a hang), wanted '$want', got: $out"
  else
    ok
  fi
done
out=$(av list 2>&1 >&-); rc=$?
if [ $rc -ne 1 ] || [ "$out" != "aviary list: cannot write to standard output: Bad file descriptor" ]; then
  fail "list with standard output closed -> rc=$rc: $out"
else
  ok
fi

# 4. Interrupted while waiting to reconnect: the coordinator is gone, watch and logs --follow
# back off and retry; Ctrl-C ends them there too, with no further retry or error.
"${av_bg[@]}" watch "$job" > "$tmp/w.out" 2> "$tmp/w.err" & watch_pid=$!
"${av_bg[@]}" logs "$job" --follow > "$tmp/l.out" 2> "$tmp/l.err" & logs_pid=$!
wait_for PENDING "$tmp/w.out"
wait_polling $logs_pid  # past its first poll: a first poll that fails is an error, not retried
kill -TERM $coord_pid; wait $coord_pid
wait_for reconnecting "$tmp/w.out" && wait_for retrying "$tmp/l.err"
for pid in $watch_pid $logs_pid; do
  kill -INT $pid; wait_exit $pid
  what=$([ $pid = $watch_pid ] && echo watch || echo "logs --follow")
  if [ $rc -ne 130 ] || grep -q "gave up" "$tmp/w.out" "$tmp/w.err" "$tmp/l.err"; then
    fail "$what, coordinator gone, then SIGINT -> rc=$rc (wanted 130): $(cat "$tmp/w.out" "$tmp/w.err" "$tmp/l.err")"
  else
    ok
  fi
done

echo "cli_signals: $passes passed, $fails failed"
[ $fails -eq 0 ]
