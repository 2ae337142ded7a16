#!/usr/bin/env bash
# The README's first run: `aviary-coordinator init DIR` writes three distinct tokens (client,
# viewer, worker; mode 600), a config naming them and runs/; the coordinator starts on that
# config with no other file, the client reaches it with the client token (and the viewer token),
# is refused without one and with the worker token; init never overwrites; a missing token file
# says how to make one.
# usage: coordinator_init.sh BIN_DIR
set -uo pipefail
bin=$1
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/service_lib.sh"

cd "$tmp"
out=$("$bin/aviary-coordinator" init state 2>&1) || fail "init failed: $out"
for f in token viewer.token worker.token; do
  [ "$(stat -c %a state/$f)" = 600 ] || fail "the mode of $f is $(stat -c %a state/$f), not 600"
  [ "$(wc -c < state/$f)" -ge 64 ] || fail "$f is shorter than 64 hex characters"
  grep -q "wrote $tmp/state/$f (" <<<"$out" || fail "init did not name $f: $out"
done
[ "$(sort -u state/token state/viewer.token state/worker.token | wc -l)" = 3 ] || fail "the three tokens are not distinct"
grep -q "worker token, mode 600: only for the hosts that run .aviary-worker serve." <<<"$out" ||
  fail "init did not say who gets the worker token: $out"
[ -d state/runs ] || fail "init did not create state/runs"
grep -q "aviary-coordinator --config $tmp/state/coordinator.yaml" <<<"$out" || fail "init did not say how to start: $out"
cp state/token token.before
expect "will not overwrite '$tmp/state/coordinator.yaml'" "$bin/aviary-coordinator" init state
cmp -s state/token token.before || fail "a refused init changed the token"
expect "DIR is required" "$bin/aviary-coordinator" init
# The coordinator's own flags are refused with init (they were dropped silently: the config init
# writes has its own database), before or after the command; nothing is written.
expect "--database is a flag of the coordinator itself, not of init (init writes DIR/coordinator.yaml" \
  "$bin/aviary-coordinator" --database "$tmp/other.db" init flags
expect "--set is a flag of the coordinator itself, not of init" "$bin/aviary-coordinator" --set listen=127.0.0.1:1 init flags
expect "--listen is a flag of 'aviary-coordinator', not of 'init'" "$bin/aviary-coordinator" init flags --listen 127.0.0.1:1
[ ! -e flags ] || fail "a refused init wrote flags/"
# --data-root (repeatable) lands in the config's data_roots, resolved; a missing one is refused.
mkdir -p data/a data/b && ln -s data/b b-link
"$bin/aviary-coordinator" init roots --data-root data/a --data-root b-link > /dev/null 2>&1 || fail "init --data-root failed"
grep -qxF "data_roots: [\"$(realpath data/a)\", \"$(realpath data/b)\"]" roots/coordinator.yaml ||
  { fail "init --data-root did not write data_roots:"; cat roots/coordinator.yaml; }
out=$("$bin/aviary-coordinator" init roots2 --data-root "$tmp/missing" 2>&1) && fail "init took a missing --data-root"
grep -qF "key '--data-root' [0]: '$tmp/missing': No such file or directory" <<<"$out" || fail "init --data-root missing: $out"
[ ! -e roots2/coordinator.yaml ] || fail "a refused init wrote roots2/coordinator.yaml"
# A root whose path is not UTF-8 cannot go in the config (the coordinator would refuse it).
mkdir -p "$tmp/d"$'\xff'
out=$("$bin/aviary-coordinator" init roots3 --data-root "$tmp/d"$'\xff' 2>&1) && fail "init took a non-UTF-8 --data-root"
grep -qF "byte 0xff is not UTF-8" <<<"$out" || fail "init --data-root non-UTF-8: $out"
[ ! -e roots3/token ] || fail "a refused init wrote roots3/token"
# Nor a control character: a newline in a quoted YAML scalar reads back as a space.
mkdir -p "$tmp/a"$'\n'"b"
out=$("$bin/aviary-coordinator" init roots4 --data-root "$tmp/a"$'\n'"b" 2>&1) && fail "init took a --data-root with a newline"
grep -qF "a control character (byte 0x0a)" <<<"$out" || fail "init --data-root with a newline: $out"
[ ! -e roots4/token ] || fail "a refused init wrote roots4/token"
# A write that fails midway (here the config, which a long data root makes longer than a 1 KiB
# file size limit: EFBIG) leaves no file behind, so init can run again once the cause is gone.
long="$tmp/$(printf 'a%.0s' {1..150})" && mkdir -p "$long"
out=$( (trap '' XFSZ; ulimit -f 1; "$bin/aviary-coordinator" init half --data-root "$long") 2>&1) &&
  fail "init wrote past ulimit -f 1"
grep -qF "init: cannot write '$tmp/half/coordinator.yaml': File too large" <<<"$out" || fail "init past ulimit -f: $out"
[ -z "$(find half -type f)" ] || fail "a failed init left files: $(find half -type f | tr '\n' ' ')"
"$bin/aviary-coordinator" init half > /dev/null 2>&1 && [ -s half/coordinator.yaml ] || fail "init after a failed one"

# Started from another folder with only the listen addresses overridden: the state lands in
# state/, not in the working directory.
mkdir elsewhere && cd elsewhere
setsid "$bin/aviary-coordinator" --config "$tmp/state/coordinator.yaml" --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --port-file "$tmp/port" > "$tmp/coordinator.log" 2>&1 &
pids+=($!)
wait_for 60 test -s "$tmp/port" || { fail "the coordinator did not start"; cat "$tmp/coordinator.log"; }
port=$(cat "$tmp/port")
AVIARY_TOKEN_FILE="$tmp/state/token" "$bin/aviary" --coordinator "127.0.0.1:$port" list > "$tmp/list.out" 2>&1 ||
  { fail "list with the init token failed"; cat "$tmp/list.out"; }
expect "UNAUTHENTICATED" env -u AVIARY_TOKEN_FILE -u AVIARY_TOKEN "$bin/aviary" --coordinator "127.0.0.1:$port" list
AVIARY_TOKEN_FILE="$tmp/state/viewer.token" "$bin/aviary" --coordinator "127.0.0.1:$port" list > "$tmp/list.out" 2>&1 ||
  { fail "list with the viewer token failed"; cat "$tmp/list.out"; }
expect "PERMISSION_DENIED" "$bin/aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/state/worker.token" list
expect "JobService.CancelJob: the token has role 'viewer'" "$bin/aviary" --coordinator "127.0.0.1:$port" \
  --token-file "$tmp/state/viewer.token" cancel j000000000000
# init without --data-root: no data roots, so every job is refused, saying what to set.
expect "set \`data_roots\` in the coordinator config" env AVIARY_TOKEN_FILE="$tmp/state/token" \
  "$bin/aviary" --coordinator "127.0.0.1:$port" submit "$(cd "$(dirname "$0")/../.." && pwd)/configs/demo.yaml"
[ -s "$tmp/state/aviary.db" ] || fail "the database is not in state/"
[ -z "$(ls -A "$tmp/elsewhere")" ] || fail "the coordinator wrote into the working directory: $(ls -A "$tmp/elsewhere")"

# A second coordinator on the same database, or on the same port (another database): either may
# start once the first stops, so exit 1 (systemd restarts it). A database that is not aviary's
# is the user's to fix: exit 2 (systemd does not restart it in vain).
out=$(timeout 60 "$bin/aviary-coordinator" --config "$tmp/state/coordinator.yaml" --listen 127.0.0.1:0 \
  --metrics-listen "" 2>&1); rc=$?
[ $rc -eq 1 ] && grep -q "in use by another coordinator" <<<"$out" && ok ||
  fail "a second coordinator on the same database: rc=$rc (wanted 1): $out"
out=$(timeout 60 "$bin/aviary-coordinator" --config "$tmp/state/coordinator.yaml" --database "$tmp/second.db" \
  --listen "127.0.0.1:$port" --metrics-listen "" 2>&1); rc=$?
[ $rc -eq 1 ] && grep -qF "listen 127.0.0.1:$port: cannot serve gRPC there (address in use" <<<"$out" && ok ||
  fail "a second coordinator on port $port: rc=$rc (wanted 1): $out"
expect "key 'port_file': $tmp/missing/port: the folder $tmp/missing is not there" timeout 60 \
  "$bin/aviary-coordinator" --config "$tmp/state/coordinator.yaml" --database "$tmp/third.db" \
  --port-file "$tmp/missing/port" --listen 127.0.0.1:0 --metrics-listen ""
# A database's folder that is not there, a folder named as the database: exit 2 (they were 1,
# restarted every few seconds in vain), naming the cause.
expect "(its folder $tmp/nowhere is not there or is not a folder)" timeout 60 "$bin/aviary-coordinator" \
  --config "$tmp/state/coordinator.yaml" --database "$tmp/nowhere/a.db" --listen 127.0.0.1:0 --metrics-listen ""
expect "database $tmp/state: a folder, not a database file" timeout 60 "$bin/aviary-coordinator" \
  --config "$tmp/state/coordinator.yaml" --database "$tmp/state" --listen 127.0.0.1:0 --metrics-listen ""
# A flag and a --set of its key (the flag won whatever the order), an empty --config (read as
# no file): refused.
expect "--listen and --set listen=127.0.0.1:0 both set key 'listen': give one" timeout 60 \
  "$bin/aviary-coordinator" --config "$tmp/state/coordinator.yaml" --set listen=127.0.0.1:0 --listen 127.0.0.1:1
expect "--config is empty" timeout 60 "$bin/aviary-coordinator" --config "" --listen 127.0.0.1:0
sqlite3 "$tmp/theirs.db" "CREATE TABLE notes(text TEXT);" || fail "sqlite3"
expect "not an aviary database" timeout 60 "$bin/aviary-coordinator" --config "$tmp/state/coordinator.yaml" \
  --database "$tmp/theirs.db" --listen 127.0.0.1:0 --metrics-listen ""

# configs/coordinator.yaml in place, without its token: the error says how to get one.
cd "$tmp"
mkdir cfg && printf 'token_file: "token"\n' > cfg/c.yaml
expect "aviary-coordinator init DIR" timeout 60 "$bin/aviary-coordinator" --config cfg/c.yaml --listen 127.0.0.1:0 --metrics-listen ""
echo "coordinator_init: $passes passed, $fails failed"
[ $fails -eq 0 ]
