#!/usr/bin/env bash
# Multi-host faults with Linux network namespaces (issue 14): four "hosts" on one machine, each
# a network namespace with a veth pair to a bridge in a fifth namespace (10.77.0.0/24):
#   coord 10.77.0.1   the coordinator (and the client, and /metrics scrapes)
#   hA    10.77.0.2   group 1, rank 0 (mpirun runs here, started by deploy/launch-group.sh)
#   hB    10.77.0.3   group 1, rank 1 (an orted started through the rsh agent below)
#   hC    10.77.0.4   group 2, two ranks
# Ranks talk over TCP only (btl self,tcp; btl/oob_tcp_if_include the subnet); all hosts share
# this machine's filesystem, as a cluster shares NFS or Lustre. mpirun reaches the other hosts
# through a plm_rsh_agent script that maps a hostfile address to its namespace.
#   1. Partition: group 1 trains a task; hA and hB are cut off the coordinator (iptables DROP in
#      the coordinator's namespace, both directions) while they still reach each other and the
#      filesystem. The coordinator loses group 1 and re-leases the task to group 2; the partition
#      heals; the job completes. Checked: nothing the next attempt resumes from was overwritten
#      by the stale group, the task completed once (attempt 2, one restart), history.csv and
#      `aviary history` hold every epoch once, /metrics stayed consistent.
#   2. Mid-all-reduce cut: a group on hA+hB trains; hA<->hB are cut (coordinator reachable).
#      The group must end within comm.timeout_s (+ slack) with an error naming the rank, and the
#      task is handed back (READY, one restart).
# Exit 77 (ctest SKIP_RETURN_CODE) when not root or network namespaces are not permitted.
# usage: service_netns.sh BIN_DIR MPIEXEC REPO_ROOT
set -uo pipefail
bin=$(cd "$1" && pwd)
mpiexec=$(command -v "${2:-mpirun}")
repo=$(cd "${3:-$(dirname "$0")/../..}" && pwd)
launch=$repo/deploy/launch-group.sh

if [ "$(id -u)" -ne 0 ]; then echo "SKIP: service_netns needs root (ip netns, iptables)"; exit 77; fi
id=avn$$   # unique per run; interface names stay under 16 characters
if ! ip netns add "${id}-probe" 2>/dev/null; then
  echo "SKIP: 'ip netns add' is not permitted here (no CAP_SYS_ADMIN or no network namespaces)"; exit 77
fi
ip netns del "${id}-probe"
for t in iptables ip curl; do
  command -v "$t" >/dev/null || { echo "FAIL: '$t' is not installed (scripts/lib/deps.sh AVIARY_TEST_PACKAGES)"; exit 1; }
done

source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/service_lib.sh"

ns_br=${id}-br ns_co=${id}-co ns_a=${id}-ha ns_b=${id}-hb ns_c=${id}-hc
made_ns=()
cleanup_netns() {
  local ns p
  # Every process left in this run's namespaces (ranks, orteds) is one this script started.
  for ns in "${made_ns[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  done
  cleanup_service 2>/dev/null
  for ns in "${made_ns[@]}"; do ip netns del "$ns" 2>/dev/null; done
}
trap cleanup_netns EXIT

# The topology. Deleting a namespace deletes the veth ends in it (and so their peers).
ip netns add "$ns_br" && made_ns+=("$ns_br") || { echo "FAIL: ip netns add $ns_br"; exit 1; }
ip -n "$ns_br" link add br0 type bridge && ip -n "$ns_br" link set br0 up || { echo "FAIL: bridge"; exit 1; }
i=1
for ns in "$ns_co" "$ns_a" "$ns_b" "$ns_c"; do
  ip netns add "$ns" && made_ns+=("$ns") || { echo "FAIL: ip netns add $ns"; exit 1; }
  { ip link add "${id}v$i" type veth peer name "${id}b$i" &&
    ip link set "${id}v$i" netns "$ns" && ip link set "${id}b$i" netns "$ns_br" &&
    ip -n "$ns" addr add "10.77.0.$i/24" dev "${id}v$i" && ip -n "$ns" link set "${id}v$i" up &&
    ip -n "$ns" link set lo up &&
    ip -n "$ns_br" link set "${id}b$i" master br0 && ip -n "$ns_br" link set "${id}b$i" up; } ||
    { echo "FAIL: veth pair for $ns (10.77.0.$i)"; exit 1; }
  i=$((i + 1))
done
co_ip=10.77.0.1 a_ip=10.77.0.2 b_ip=10.77.0.3 c_ip=10.77.0.4
# reach NS IP PORT: a TCP connection from NS to IP:PORT succeeds within 2 s.
reach() { ip netns exec "$1" timeout 2 bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; }

# Open MPI's rsh launcher runs `AGENT [options] HOST orted ...` (the command as one shell
# string); this agent runs it in HOST's namespace instead of over ssh.
cat > "$tmp/rsh-agent.sh" <<EOF
#!/bin/bash
while [ \$# -gt 0 ]; do case \$1 in -*) shift ;; *) break ;; esac; done
host=\$1; shift
case \$host in
  $a_ip) ns=$ns_a ;; $b_ip) ns=$ns_b ;; $c_ip) ns=$ns_c ;;
  *) echo "rsh-agent: unknown host '\$host'" >&2; exit 255 ;;
esac
exec ip netns exec "\$ns" /bin/sh -c "\$*"
EOF
chmod +x "$tmp/rsh-agent.sh"

# The coordinator in its namespace; the client and scrapes run there too (127.0.0.1).
service_recipe 2 30 "[0]"
write_coordinator_config 8 3
sed -i -e 's/^listen: .*/listen: 0.0.0.0:0/' -e 's/^metrics_listen: .*/metrics_listen: 0.0.0.0:0/' "$tmp/coordinator.yaml"
setsid ip netns exec "$ns_co" "$bin/aviary-coordinator" --config "$tmp/coordinator.yaml" \
  --port-file "$tmp/coord.port" --metrics-port-file "$tmp/coord.mport" > "$tmp/coordinator.log" 2>&1 &
pids+=("$!")
if ! wait_for 60 test -s "$tmp/coord.port" || ! wait_for 10 test -s "$tmp/coord.mport"; then
  echo "FAIL: the coordinator did not start"; cat "$tmp/coordinator.log"; exit 1
fi
port=$(cat "$tmp/coord.port")
mport=$(cat "$tmp/coord.mport")
av() { ip netns exec "$ns_co" "$bin/aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/token" "$@"; }
avt() { local s=$1; shift; timeout "$s" ip netns exec "$ns_co" "$bin/aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/token" "$@"; }
scrape() { ip netns exec "$ns_co" curl -sf "http://127.0.0.1:$mport/metrics"; }
reach "$ns_a" "$co_ip" "$port" || fail "hA cannot reach the coordinator at $co_ip:$port"

# launch NAME NS HOSTFILE_LINES...: deploy/launch-group.sh inside NS (mpirun there), ranks over
# the hostfile; sets group_pid (launch-group.sh, in its own process group).
launch() {
  local name=$1 ns=$2; shift 2
  printf '%s\n' "$@" > "$tmp/$name.hosts"
  setsid ip netns exec "$ns" "$launch" --coordinator "$co_ip:$port" --hostfile "$tmp/$name.hosts" \
    --cores-per-rank 1 --bind-to none --metrics-listen 0.0.0.0:0 --device cpu --token-file "$tmp/worker.token" \
    --worker "$bin/aviary-worker" --mpirun "$mpiexec" --stop-timeout 5 \
    --mpirun-arg=--mca --mpirun-arg=plm_rsh_agent --mpirun-arg="$tmp/rsh-agent.sh" \
    --mpirun-arg=--mca --mpirun-arg=btl --mpirun-arg=self,tcp \
    --mpirun-arg=--mca --mpirun-arg=btl_tcp_if_include --mpirun-arg=10.77.0.0/24 \
    --mpirun-arg=--mca --mpirun-arg=oob_tcp_if_include --mpirun-arg=10.77.0.0/24 \
    > "$tmp/$name.log" 2>&1 &
  group_pid=$!
  pids+=("$group_pid")
}
# partition NS IP...: DROP every packet between NS and each IP, both directions (rules in NS).
partition() {
  local ns=$1 ip; shift
  for ip in "$@"; do
    ip netns exec "$ns" iptables -I INPUT -s "$ip" -j DROP &&
      ip netns exec "$ns" iptables -I OUTPUT -d "$ip" -j DROP || fail "iptables in $ns: cannot drop $ip"
  done
}
heal() { ip netns exec "$1" iptables -F || fail "iptables -F in $1"; }
# snapshot DIR: "sha256  path" of every file under DIR, sorted.
snapshot() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum); }
epoch_lines() { grep -cE ' epoch [0-9]+/[0-9]+: lr ' "$1" 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
# 1. Partition between group 1 (hA+hB) and the coordinator, the task re-leased to group 2 (hC).
epochs=16
job=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false --set stages.finetune.epochs=$epochs | tail -n 1)
echo "job $job ($epochs epochs of fine-tuning)"
launch g1 "$ns_a" "$a_ip slots=1" "$b_ip slots=1"
g1_pid=$group_pid
if ! wait_for 300 jq_status "$job" 'task("finetune").get("latest", {}).get("epoch", 0) >= 1 and task("finetune")["latest"].get("epoch_end", False)'; then
  fail "group 1 (hA+hB) made no progress"; tail -n 40 "$tmp/g1.log"; tail -n 20 "$tmp/coordinator.log"; exit 1
fi
grep -q "rank 1 of 2 (mpi)" "$tmp/g1.log" || grep -qE "rank [01] of 2" "$tmp/g1.log" ||
  fail "group 1 did not train with 2 ranks: $(grep -m2 -E 'rank [0-9]+ of' "$tmp/g1.log")"
grep -q "2 ranks on 2 node(s)" "$tmp/g1.log" || fail "launch-group.sh did not start 2 ranks on 2 nodes: $(head -n 3 "$tmp/g1.log")"
ft_dir=$(jq_status "$job" 'task("finetune")["out_dir"]')
task_id=$(jq_status "$job" 'task("finetune")["task_id"]')
[ -d "$ft_dir" ] || fail "the run folder '$ft_dir' does not exist"
e_cut=$(jq_status "$job" 'task("finetune")["latest"]["epoch"]')
partition "$ns_co" "$a_ip" "$b_ip"
t_cut=$(date +%s)
echo "cut hA and hB off the coordinator after epoch $e_cut"
reach "$ns_a" "$co_ip" "$port" && fail "hA still reaches the coordinator after the cut"
# The coordinator loses group 1 after heartbeat_timeout_s (8 s) and puts the task back.
if wait_for 30 jq_status "$job" 'task("finetune")["state"] == "TASK_STATE_READY"'; then ok; else
  fail "the task was not READY again after group 1 was cut off: $(jq_status "$job" 'task("finetune")')"
fi
grep -qE "group g[0-9a-f]+ lost \(no heartbeat" "$tmp/coordinator.log" || fail "the coordinator did not log group 1 as lost"
# Only group 1 runs now: whatever changes in the run folder from here on was written by a group
# whose lease is gone. The files there are what the next attempt resumes from.
snap1=$(snapshot "$ft_dir")
lines1=$(epoch_lines "$tmp/g1.log")
# (An epoch takes 3-5 s here: 20 s is several epochs of a group that goes on training.)
if wait_for 20 bash -c "[ \$(grep -cE ' epoch [0-9]+/[0-9]+: lr ' '$tmp/g1.log') -gt $lines1 ]"; then
  echo "group 1 finished an epoch after its lease was gone"
else
  echo "group 1 finished no epoch after its lease was gone (it stopped training)"
fi
sleep 1
snap2=$(snapshot "$ft_dir")
changed=$(comm -23 <(sort <<<"$snap1") <(sort <<<"$snap2") | awk '{print $2}' | tr '\n' ' ')
if [ -z "$changed" ]; then ok; else
  fail "the stale group (lease gone) overwrote files of the run folder the next attempt resumes from: $changed"
fi
added=$(comm -13 <(awk '{print $2}' <<<"$snap1" | sort) <(awk '{print $2}' <<<"$snap2" | sort) | grep -E '^\./(last|best)\.pt$|^\./history\.csv$' | tr '\n' ' ')
[ -z "$added" ] || fail "the stale group created the run folder's current files: $added"

launch g2 "$ns_c" "$c_ip slots=2"
g2_pid=$group_pid
if wait_for 120 jq_status "$job" 'task("finetune")["attempt"] == 2 and task("finetune")["state"] in ("TASK_STATE_LEASED", "TASK_STATE_RUNNING")'; then ok; else
  fail "the task was not re-leased to group 2: $(jq_status "$job" 'task("finetune")')"; tail -n 30 "$tmp/g2.log"
fi
wait_for 120 grep -qE "resuming .*last.pt after epoch" "$tmp/g2.log" ||
  fail "group 2 did not resume from last.pt: $(grep -m3 -E 'leased|resuming|epoch 1/' "$tmp/g2.log")"
wait_for 120 jq_status "$job" 'task("finetune")["attempt"] == 2 and task("finetune").get("latest", {}).get("epoch", 0) > '"$e_cut" ||
  fail "group 2 made no progress"
# Heal once group 2 has trained an epoch of its own (both groups now train the task).
wait_for 120 bash -c "grep -qE ' epoch [0-9]+/[0-9]+: lr ' '$tmp/g2.log'" || fail "group 2 finished no epoch"
heal "$ns_co"
echo "healed the partition $(( $(date +%s) - t_cut )) s after the cut"
reach "$ns_a" "$co_ip" "$port" || fail "hA does not reach the coordinator after the heal"
# Group 1 hears NOT_FOUND, drops its task and registers again.
if wait_for 60 grep -q "the group registers again" "$tmp/g1.log"; then ok; else
  fail "group 1 did not hear that it was lost: $(tail -n 5 "$tmp/g1.log")"
fi
if avt 600 watch "$job" > "$tmp/watch1.log" 2>&1; then ok; else
  fail "the job did not succeed after the partition"; tail -n 20 "$tmp/watch1.log"; tail -n 30 "$tmp/g2.log"; tail -n 30 "$tmp/coordinator.log"
fi
jq_status "$job" 'j["state"] == "JOB_STATE_SUCCEEDED"' || fail "job state: $(jq_status "$job" 'j["state"]')"
jq_status "$job" 'task("finetune")["attempt"] == 2 and task("finetune")["restarts"] == 1' ||
  fail "attempt should be 2 and restarts 1: $(jq_status "$job" 'task("finetune")')"
n=$(grep -cE "task $task_id succeeded on group" "$tmp/coordinator.log")
[ "$n" = 1 ] || fail "the coordinator logged $n completions of task $task_id (want 1)"
grep -qE "task $task_id succeeded on group" "$tmp/g1.log" && fail "group 1 (stale) completed the task"
want="$(seq -s ' ' 0 $((epochs - 1))) "
got=$(cut -d, -f1 "$ft_dir/history.csv" | tail -n +2 | tr '\n' ' ')
[ "$got" = "$want" ] || fail "history.csv epochs are not 0..$((epochs - 1)) once each: $got"
hdr=$(av history "$job" --csv | head -n 1)
col=$(tr ',' '\n' <<<"$hdr" | grep -nx epoch | cut -d: -f1)
got=$(av history "$job" --csv | tail -n +2 | cut -d, -f"${col:-1}" | tr '\n' ' ')
[ "$got" = "$want" ] || fail "aviary history: epochs are not 0..$((epochs - 1)) once each, in order: $got"
m=$(scrape)
[ -n "$m" ] || fail "/metrics: no answer"
v=$(grep -F "aviary_task_epoch{" <<<"$m" | grep -F "job_id=\"$job\"" | awk '{print $NF}')
[ "$v" = "$epochs" ] || fail "/metrics: aviary_task_epoch for $job is '$v', want $epochs"
v=$(grep -F "aviary_task_restarts_total{" <<<"$m" | grep -F "job_id=\"$job\"" | awk '{print $NF}')
[ "$v" = 1 ] || fail "/metrics: aviary_task_restarts_total for $job is '$v', want 1"
v=$(grep -F "aviary_task_running{" <<<"$m" | grep -F "job_id=\"$job\"" | awk '{print $NF}')
[ "$v" = 0 ] || fail "/metrics: aviary_task_running for $job is '$v', want 0"
grep -qE '^aviary_worker_groups_lost_total 1$' <<<"$m" ||
  fail "/metrics: aviary_worker_groups_lost_total is not 1: $(grep '^aviary_worker_groups_lost_total' <<<"$m")"
neg=$(grep -E '^aviary_' <<<"$m" | awk '$NF ~ /^-/' | head -n 3)
[ -z "$neg" ] || fail "/metrics: negative values: $neg"
grep -qE '^aviary_jobs\{state="succeeded"\} 1$' <<<"$m" || fail "/metrics: aviary_jobs{succeeded} is not 1"
# The lease recorded in the run folder's checkpoints (checkpoint metadata "task_id" and "attempt",
# YAML inside the archive's data.pkl): last.pt is the final attempt's (best.pt may hold an epoch
# of attempt 1 from before the cut). Checkpoints written before that
# metadata existed carry neither key: then only the snapshot check above stands.
for f in last.pt best.pt; do
  lease=$(/usr/bin/python3 - "$ft_dir/$f" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = b"".join(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
t = re.search(rb"\ntask_id: ([^\n]*)\n", data)
a = re.search(rb"\nattempt: (\d+)", data)
print(f"{t.group(1).decode()} {a.group(1).decode()}" if t and a else "")
PY
  ) || fail "$ft_dir/$f: not a readable checkpoint archive"
  if [ -z "$lease" ]; then
    echo "note: $f records no task_id/attempt (checkpoints without lease metadata)"
  elif [ "$f" = last.pt ] && [ "$lease" != "$task_id 2" ]; then
    fail "last.pt was written by lease '$lease', not by the final attempt '$task_id 2'"
  elif [ "$f" = best.pt ] && [ "$lease" != "$task_id 2" ] && [ "$lease" != "$task_id 1" ]; then
    fail "best.pt was written by lease '$lease', not by attempt 1 or 2 of $task_id"
  fi
done

# ---------------------------------------------------------------------------------------------
# 2. hA <-> hB cut in the middle of training (the gradient all-reduce); the coordinator stays
#    reachable from both. A fresh group 3 on hA+hB; groups 1 and 2 are ended first.
for p in "$g1_pid" "$g2_pid"; do kill -9 -- "-$p" 2>/dev/null; wait "$p" 2>/dev/null; done
for ns in "$ns_a" "$ns_b" "$ns_c"; do
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
done
comm_timeout=15
job2=$(av submit "$tmp/p.yaml" --set stages.pretrain.enabled=false --set stages.finetune.epochs=40 \
         --set comm.timeout_s=$comm_timeout | tail -n 1)
echo "job $job2 (comm.timeout_s $comm_timeout)"
launch g3 "$ns_a" "$a_ip slots=1" "$b_ip slots=1"
g3_pid=$group_pid
if wait_for 300 jq_status "$job2" 'task("finetune").get("latest", {}).get("epoch", 0) >= 1'; then
  # Cut while both ranks compute a step, so that their next collective is the gradient
  # all-reduce: shortly after an epoch-end line (files written, the next epoch's first step
  # under way). A cut that lands in a control exchange instead (T4/T5) ends the group after that
  # exchange's deadline, 2 x comm.timeout_s + 30 s (worker/agent/group_control.h).
  n0=$(epoch_lines "$tmp/g3.log")
  wait_for 60 bash -c "[ \$(grep -cE ' epoch [0-9]+/[0-9]+: lr ' '$tmp/g3.log') -gt $n0 ]" || fail "group 3 finished no epoch"
  sleep 0.3
  partition "$ns_a" "$b_ip"
  partition "$ns_b" "$a_ip"
  t_cut=$(date +%s)
  echo "cut hA <-> hB during epoch $(jq_status "$job2" 'task("finetune")["latest"]["epoch"]')"
  # Within comm.timeout_s + slack: rank 0 (hA, which still reaches the coordinator) reports the
  # task as failed naming the rank that did not arrive, and ends (MPI_Abort): no aviary-worker
  # is left on hA. (Without the short T6 deadline after a collective timeout this took
  # 3 x comm.timeout_s + 30 s.) mpirun itself cannot end before the link returns: its
  # teardown waits for hB's daemon.
  slack=20
  handed_back='task("finetune")["restarts"] == 1 and task("finetune")["state"] in ("TASK_STATE_READY", "TASK_STATE_LEASED", "TASK_STATE_RUNNING")'
  if wait_for $((comm_timeout + slack)) jq_status "$job2" "$handed_back"; then
    echo "the task was handed back $(( $(date +%s) - t_cut )) s after the cut (comm.timeout_s $comm_timeout)"; ok
  elif ! grep -q "waited longer than comm.timeout_s" "$tmp/g3.log" &&
       wait_for $((comm_timeout + 30 + slack)) jq_status "$job2" "$handed_back"; then
    echo "note: the cut landed in a control exchange, not in a collective: the task was handed back" \
         "$(( $(date +%s) - t_cut )) s after the cut (2 x comm.timeout_s + 30 s by design)"
    grep -qE "task $job2/finetune-f0 failed on group .*another rank did not arrive" "$tmp/coordinator.log" ||
      fail "the failure the coordinator recorded does not say a rank did not arrive"
    heal "$ns_a"; heal "$ns_b"
    echo "service_netns: $passes checks passed, $fails failed"
    [ "$fails" -eq 0 ]; exit
  else
    fail "the task was not handed back within comm.timeout_s + $slack s of the cut: $(jq_status "$job2" 'task("finetune")')"
    tail -n 5 "$tmp/g3.log"
  fi
  if wait_for 10 bash -c "[ -z \"\$(ip netns pids $ns_a | xargs -r -I{} cat /proc/{}/comm 2>/dev/null | grep -x aviary-worker)\" ]"; then
    echo "rank 0 ended $(( $(date +%s) - t_cut )) s after the cut"; ok
  else
    fail "rank 0 (hA) is still running $(( $(date +%s) - t_cut )) s after the cut"
  fi
  grep -qE "rank 0: collective #[0-9]+ \(.*\) waited longer than comm.timeout_s = $comm_timeout s; ranks that did not arrive: 1" "$tmp/g3.log" ||
    fail "group 3's log does not name the rank whose collective timed out: $(grep -m3 -iE 'error|timeout|rank [01]:' "$tmp/g3.log")"
  grep -qE "task $job2/finetune-f0 failed on group .*did not arrive: 1" "$tmp/coordinator.log" ||
    fail "the failure the coordinator recorded does not name the missing rank: $(grep -m2 "$job2.*failed on group" "$tmp/coordinator.log")"
  grep -q "ends the group" "$tmp/g3.log" || fail "rank 0 did not end the group: $(tail -n 3 "$tmp/g3.log")"
  heal "$ns_a"; heal "$ns_b"
  t_heal=$(date +%s)
  if wait_for 90 bash -c "! kill -0 $g3_pid 2>/dev/null"; then
    echo "mpirun (group 3) exited $(( $(date +%s) - t_heal )) s after the link returned"; ok
  else
    fail "mpirun (group 3) did not exit within 90 s of the link's return"
  fi
else
  fail "group 3 made no progress"; tail -n 30 "$tmp/g3.log"
fi

echo "service_netns: $passes checks passed, $fails failed"
[ "$fails" -eq 0 ]
