#!/usr/bin/env bash
# Roles, token rotation and mutual TLS with real processes (issue 14, item 2: "Any token holder
# can act as a worker"): a coordinator with client and worker tokens, `mpirun -np 2 aviary-worker
# serve` groups and the `aviary` client on 127.0.0.1 (ports chosen at run time).
#   - a group given the clients' token is refused (PERMISSION_DENIED naming RegisterGroup and
#     the roles) and exits 2; the client with the worker token is refused too;
#   - SIGHUP rotation: a second client token works after a reload, the old one stops working
#     after the next; a broken file on reload keeps the tokens in force;
#   - tls_client_ca_file: a group without a client certificate is refused (exit 2), one with a
#     certificate the CA did not sign never gets through the handshake (exit 1 after
#     --connect-timeout-s), one with a CA-signed certificate registers; clients stay token-only.
# usage: service_roles.sh BIN_DIR MPIEXEC
set -uo pipefail
bin=$1
mpiexec=${2:-mpirun}
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/service_lib.sh"

write_coordinator_config 20 2
start_coordinator || exit 1

# serve_once LABEL RC SUBSTRING [serve flags...]: a 2-rank group that must end by itself with RC
# and say SUBSTRING.
serve_once() {
  local label=$1 want_rc=$2 want=$3 out rc; shift 3
  out=$(timeout 120 "$mpiexec" -np 2 --oversubscribe "$bin/aviary-worker" serve --coordinator "127.0.0.1:$port" \
        --metrics-listen "" --threads 1 "$@" 2>&1); rc=$?
  if [ $rc -ne "$want_rc" ] || ! grep -qF -- "$want" <<<"$out"; then
    fail "$label: rc=$rc (wanted $want_rc), wanted '$want' in:"; echo "$out" | sed 's/^/    /'
  else
    ok
  fi
}

# A client token cannot act as a worker group (the reported bug), nor a worker token as a client.
serve_once "group with the client token" 2 \
  "PERMISSION_DENIED: WorkerService.RegisterGroup: the token has role 'client' (token_file); this call needs role 'worker'" \
  --token-file "$tmp/token" --connect-timeout-s 30
expect "PERMISSION_DENIED: JobService.ListJobs: the token has role 'worker'" \
  "$bin/aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/worker.token" list
av list > /dev/null 2>&1 && ok || fail "list with the client token"

# Rotation: add a second client token, reload, then remove the old one and reload again.
old=$(cat "$tmp/token")
client() { env -u AVIARY_TOKEN_FILE AVIARY_TOKEN="$1" "$bin/aviary" --coordinator "127.0.0.1:$port" list; }
expect "UNAUTHENTICATED" client new-client-token
printf '# rotation in progress\nnew-client-token\n%s\n' "$old" > "$tmp/token"
kill -HUP "$coord_pid"
wait_for 20 grep -q "tokens reloaded: 2 client, 0 viewer, 1 worker" "$tmp/coordinator.log" || fail "no reload line after SIGHUP"
client new-client-token > /dev/null 2>&1 && ok || fail "the new token after the first reload"
client "$old" > /dev/null 2>&1 && ok || fail "the old token after the first reload"
# The second rotation renames a group-readable file over it (a umask of 022): the reload warns.
not_private() { grep -c "key 'token_file': $tmp/token holds secrets but is not private (mode 0644" "$tmp/coordinator.log"; }
warned=$(not_private)
(umask 022; echo new-client-token > "$tmp/token.new") && mv "$tmp/token.new" "$tmp/token"
kill -HUP "$coord_pid"
wait_for 20 grep -q "tokens reloaded: 1 client, 0 viewer, 1 worker" "$tmp/coordinator.log" || fail "no second reload line"
[ "$(not_private)" -gt "$warned" ] && ok || fail "the reload of a group-readable token file does not warn"
expect "UNAUTHENTICATED" client "$old"
client new-client-token > /dev/null 2>&1 && ok || fail "the new token after the second reload"
# A broken reload (the worker token listed as a client token too) keeps the tokens in force.
cat "$tmp/worker.token" >> "$tmp/token"
kill -HUP "$coord_pid"
wait_for 20 grep -q "token reload failed, the current tokens stay: key 'worker_token_file'" "$tmp/coordinator.log" ||
  { fail "no failed-reload line"; tail -n 5 "$tmp/coordinator.log"; }
client new-client-token > /dev/null 2>&1 && ok || fail "the token in force after a failed reload"
kill -0 "$coord_pid" 2>/dev/null && ok || fail "the coordinator died on a bad reload"
echo new-client-token > "$tmp/token"

# Mutual TLS: the coordinator's own certificate, a CA for the groups, a group certificate it
# signed, and one it did not.
kill -TERM "$coord_pid"; wait "$coord_pid" 2>/dev/null
pki=$tmp/pki
mkdir -p "$pki"
{
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout "$pki/server.key" -out "$pki/server.pem" &&
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=aviary-groups-ca -keyout "$pki/ca.key" -out "$pki/ca.pem" &&
  openssl req -newkey rsa:2048 -nodes -subj /CN=group1 -keyout "$pki/group.key" -out "$pki/group.csr" &&
  openssl x509 -req -days 1 -in "$pki/group.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial \
    -out "$pki/group.pem" &&
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=rogue -keyout "$pki/rogue.key" -out "$pki/rogue.pem"
} > "$tmp/openssl.log" 2>&1 || { fail "openssl"; cat "$tmp/openssl.log"; exit 1; }
cat >> "$tmp/coordinator.yaml" <<YAML
tls_cert_file: $pki/server.pem
tls_key_file: $pki/server.key
tls_client_ca_file: $pki/ca.pem
YAML
start_coordinator || exit 1
grep -q "(gRPC, TLS, client certificates for worker groups)" "$tmp/coordinator.log" && ok || fail "no mTLS in the start line"

serve_once "group without a client certificate" 2 \
  "PERMISSION_DENIED: WorkerService.RegisterGroup: needs a client certificate signed by the coordinator's tls_client_ca_file" \
  --token-file "$tmp/worker.token" --tls-ca "$pki/server.pem" --connect-timeout-s 30
serve_once "group with a certificate the CA did not sign" 1 "could not register with the coordinator" \
  --token-file "$tmp/worker.token" --tls-ca "$pki/server.pem" --tls-cert "$pki/rogue.pem" --tls-key "$pki/rogue.key" \
  --connect-timeout-s 3
serve_once "client token with a CA-signed certificate" 2 "the token has role 'client'" \
  --token-file "$tmp/token" --tls-ca "$pki/server.pem" --tls-cert "$pki/group.pem" --tls-key "$pki/group.key" \
  --connect-timeout-s 30
grep -q "registered" "$tmp/coordinator.log" && fail "a refused group registered"
# The CA-signed certificate (given through the environment here) and the worker token: registered.
AVIARY_TLS_CERT="$pki/group.pem" AVIARY_TLS_KEY="$pki/group.key" start_group g1 2 --tls-ca "$pki/server.pem"
wait_for 60 grep -q "group g[0-9a-f]* registered: world_size 2" "$tmp/coordinator.log" && ok ||
  { fail "the group with a CA-signed certificate did not register"; cat "$tmp/g1.log"; }
# Clients stay token-only.
"$bin/aviary" --coordinator "127.0.0.1:$port" --tls-ca "$pki/server.pem" --token-file "$tmp/token" list \
  > "$tmp/list.out" 2>&1 && ok || { fail "a TLS client without a certificate"; cat "$tmp/list.out"; }

echo "service_roles: $passes passed, $fails failed"
[ $fails -eq 0 ]
