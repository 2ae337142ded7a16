#!/usr/bin/env bash
# Launches one aviary worker group: `mpirun` over a hostfile, one rank per GPU, every rank
# running `aviary-worker serve` (docs/SERVICE.md "Worker groups", docs/DEPLOY.md "Launching").
#
#   deploy/launch-group.sh --coordinator HOST:PORT --hostfile FILE [options] [-- serve flags]
#   deploy/launch-group.sh --coordinator HOST:PORT --dry-run ...   prints the mpirun command
#
# SIGTERM / SIGINT / SIGHUP to this script become SIGUSR2 to mpirun, which forwards it to every
# rank at once: the group stops its task at the next step, reports the task as preempted (it resumes
# elsewhere from its last.pt), leaves the coordinator and exits 0, and so does mpirun, within
# seconds. (SIGTERM to mpirun itself is not forwarded: Open MPI 4.1's mpirun sends the ranks
# SIGCONT, which the ranks take as a stop, SIGTERM --stop-timeout seconds later and SIGKILL after
# as long again, and exits only then, about 2 x --stop-timeout after the signal; measured.)
# Ranks that have not exited --stop-timeout seconds after SIGUSR2, or a second signal to this
# script (2 s or more after the first), get that: SIGTERM to mpirun. Exit 0 after a clean stop
# (and after a stop signal that came once the launcher's checks were done, before mpirun
# started); after one that needed SIGTERM, mpirun's exit code (1 if that was 0); after mpirun
# exited non-zero on its own, its exit code.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch-group.sh --coordinator HOST:PORT [options] [-- extra `aviary-worker serve` flags]

where the group runs
  --hostfile FILE        Open MPI hostfile, one line per node: "node01 slots=4" (slots = GPUs).
                         Every node must have the same number of slots. Default: this host only.
  --gpus-per-node G      ranks per node (default: the hostfile's slots, else `nvidia-smi -L`
                         lines on this host, else 1)
  --cores-per-rank C     physical CPU cores per rank (default: this host's physical cores / G,
                         at least 1: nproc over lscpu's threads per core, as PE= counts cores,
                         not hardware threads); also the rank's torch threads (--threads)
  --map-by SPEC          mpirun --map-by (default ppr:G:node:PE=C: G ranks per node, C cores each)
  --bind-to WHAT         mpirun --bind-to (default core; use none on shared nodes)
what it serves
  --coordinator HOST:PORT  the coordinator's gRPC address (default $AVIARY_COORDINATOR)
  --token-file FILE      the worker-group token file (the coordinator's worker_token_file;
                         default $AVIARY_TOKEN_FILE); a path rank 0 can read
  --tls-ca FILE          CA certificate for TLS (default $AVIARY_TLS_CA)
  --tls-cert FILE        client certificate for mutual TLS (coordinator's tls_client_ca_file;
                         default $AVIARY_TLS_CERT)
  --tls-key FILE         its private key (default $AVIARY_TLS_KEY)
  --metrics-listen ADDR  rank 0's /metrics (default 0.0.0.0:9471; give each group on a node
                         its own port)
  --device auto|cpu|cuda (default auto)
  --max-tasks N          exit after N tasks (default 0: serve until stopped)
  --log-level L          debug|info|warning|error (default info)
how
  --worker PATH          the aviary-worker binary (default: $AVIARY_WORKER, else
                         ../build/bin/aviary-worker next to this script, else from PATH)
  --mpirun PATH          (default $MPIRUN, else mpirun)
  --mpirun-arg ARG       one more mpirun argument (repeatable), e.g. --mpirun-arg=--mca
                         --mpirun-arg=pml --mpirun-arg=ucx
  --env NAME             export one more environment variable to every rank (repeatable);
                         NCCL_*, UCX_*, TORCH_*, AVIARY_*, PATH and LD_LIBRARY_PATH always are
  --stop-timeout S       seconds ranks get to stop after a signal before mpirun is told to kill
                         them (default 45; a stop normally takes a step and a report; a group
                         that does not stop takes about 3 x S: keep S above a step plus a
                         report, and 3 x S below systemd's TimeoutStopSec and Slurm's --signal
                         lead time)
  --sd-dir DIR           while the group runs, write DIR/aviary-group-<host>-<port>-<pid>.json,
                         a Prometheus file_sd target for rank 0's /metrics (removed at exit;
                         <pid> is this launcher's: a group that fails to start removes its own)
  --dry-run              print the mpirun command (and the file_sd target) and exit
EOF
}

die() { echo "launch-group.sh: $*" >&2; exit 2; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
coordinator=${AVIARY_COORDINATOR:-}
hostfile=""
gpus_per_node=""
cores_per_rank=""
map_by=""
bind_to="core"
token_file=${AVIARY_TOKEN_FILE:-}
tls_ca=${AVIARY_TLS_CA:-}
tls_cert=${AVIARY_TLS_CERT:-}
tls_key=${AVIARY_TLS_KEY:-}
metrics_listen="0.0.0.0:9471"
device="auto"
max_tasks=0
log_level="info"
worker=${AVIARY_WORKER:-}
mpirun=${MPIRUN:-mpirun}
mpirun_extra=()
env_extra=()
stop_timeout=45
sd_dir=${AVIARY_SD_DIR:-}  # --sd-dir; from the environment too (the systemd unit's env file)
dry_run=0
serve_extra=()

need() { [ $# -ge 2 ] || die "$1 needs a value (--help)"; }
while [ $# -gt 0 ]; do
  case $1 in
    --*=*) opt=${1%%=*}; val=${1#*=}; shift; set -- "$opt" "$val" "$@"; continue ;;
  esac
  case $1 in
    --hostfile) need "$@"; hostfile=$2; shift 2 ;;
    --gpus-per-node) need "$@"; gpus_per_node=$2; shift 2 ;;
    --cores-per-rank) need "$@"; cores_per_rank=$2; shift 2 ;;
    --map-by) need "$@"; map_by=$2; shift 2 ;;
    --bind-to) need "$@"; bind_to=$2; shift 2 ;;
    --coordinator) need "$@"; coordinator=$2; shift 2 ;;
    --token-file) need "$@"; token_file=$2; shift 2 ;;
    --tls-ca) need "$@"; tls_ca=$2; shift 2 ;;
    --tls-cert) need "$@"; tls_cert=$2; shift 2 ;;
    --tls-key) need "$@"; tls_key=$2; shift 2 ;;
    --metrics-listen) need "$@"; metrics_listen=$2; shift 2 ;;
    --device) need "$@"; device=$2; shift 2 ;;
    --max-tasks) need "$@"; max_tasks=$2; shift 2 ;;
    --log-level) need "$@"; log_level=$2; shift 2 ;;
    --worker) need "$@"; worker=$2; shift 2 ;;
    --mpirun) need "$@"; mpirun=$2; shift 2 ;;
    --mpirun-arg) need "$@"; mpirun_extra+=("$2"); shift 2 ;;
    --env) need "$@"; env_extra+=("$2"); shift 2 ;;
    --stop-timeout) need "$@"; stop_timeout=$2; shift 2 ;;
    --sd-dir) need "$@"; sd_dir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; serve_extra=("$@"); break ;;
    *) die "unknown argument '$1' (--help)" ;;
  esac
done

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_pos_int() { [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ]; }
[ -n "$coordinator" ] || die "--coordinator HOST:PORT is required (or AVIARY_COORDINATOR)"
[[ $coordinator =~ ^[^:]+:[0-9]+$ || $coordinator =~ ^\[.*\]:[0-9]+$ ]] ||
  die "--coordinator '$coordinator': expected HOST:PORT"
case $device in auto|cpu|cuda) ;; *) die "--device '$device': expected auto, cpu or cuda" ;; esac
case $log_level in debug|info|warning|error) ;; *) die "--log-level '$log_level': expected debug, info, warning or error" ;; esac
is_uint "$max_tasks" || die "--max-tasks '$max_tasks': expected an integer >= 0"
is_pos_int "$stop_timeout" || die "--stop-timeout '$stop_timeout': expected seconds >= 1"
[ -z "$token_file" ] || [ -r "$token_file" ] || die "--token-file '$token_file': not a readable file"
[ -z "$tls_ca" ] || [ -r "$tls_ca" ] || die "--tls-ca '$tls_ca': not a readable file"
[ -z "$tls_cert" ] || [ -r "$tls_cert" ] || die "--tls-cert '$tls_cert': not a readable file"
[ -z "$tls_key" ] || [ -r "$tls_key" ] || die "--tls-key '$tls_key': not a readable file"
if [ -n "$tls_cert" ] && [ -z "$tls_key" ]; then die "--tls-cert needs --tls-key (or AVIARY_TLS_KEY)"; fi
if [ -z "$tls_cert" ] && [ -n "$tls_key" ]; then die "--tls-key needs --tls-cert (or AVIARY_TLS_CERT)"; fi

# Nodes and slots from the hostfile ("host slots=N", comments and blank lines ignored).
hosts=()
slots=()
if [ -n "$hostfile" ]; then
  [ -r "$hostfile" ] || die "--hostfile '$hostfile': not a readable file"
  lineno=0
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line=${line%%#*}
    read -r -a words <<<"$line" || true
    [ ${#words[@]} -gt 0 ] || continue
    n=1
    for w in "${words[@]:1}"; do
      case $w in
        slots=*) n=${w#slots=} ;;
        max_slots=*|max-slots=*) ;;
        *) die "$hostfile:$lineno: unexpected '$w' (expected 'host slots=N')" ;;
      esac
    done
    is_pos_int "$n" || die "$hostfile:$lineno: slots '$n' is not an integer >= 1"
    hosts+=("${words[0]}")
    slots+=("$n")
  done <"$hostfile"
  [ ${#hosts[@]} -gt 0 ] || die "--hostfile '$hostfile': no hosts in it"
fi

if [ -z "$gpus_per_node" ]; then
  if [ ${#slots[@]} -gt 0 ]; then
    gpus_per_node=${slots[0]}
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    # The GPUs this launcher was given (docs/DEPLOY.md, "Several groups on one node"): nvidia-smi
    # lists every GPU of the node whatever CUDA_VISIBLE_DEVICES says, so two groups given 4 GPUs
    # each started 8 ranks apiece on 4 GPUs (NCCL: "Duplicate GPU detected").
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    gpus_per_node=${#visible[@]}
  elif command -v nvidia-smi >/dev/null 2>&1 && n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [ "$n" -gt 0 ]; then
    gpus_per_node=$n
  else
    gpus_per_node=1
  fi
fi
is_pos_int "$gpus_per_node" || die "--gpus-per-node '$gpus_per_node': expected an integer >= 1"
for i in "${!slots[@]}"; do
  [ "${slots[$i]}" -ge "$gpus_per_node" ] ||
    die "--hostfile '$hostfile': ${hosts[$i]} has slots=${slots[$i]}, fewer than $gpus_per_node ranks per node"
done
num_nodes=${#hosts[@]}
[ "$num_nodes" -gt 0 ] || num_nodes=1
np=$((num_nodes * gpus_per_node))

# Physical cores this process may run on. Open MPI's PE=N counts cores, not hardware threads
# (without --use-hwthread-cpus), while nproc counts threads: on a node with 2 threads per core,
# nproc / G would ask for twice the cores a rank can have. So nproc (which honours the CPU
# affinity a cgroup, container or taskset gives) over the threads per core (lscpu's CPUs per
# distinct socket,core pair); nproc alone where lscpu is missing or leaves a core blank.
physical_cores() {
  local threads per_core=1
  threads=$(nproc 2>/dev/null || echo 1)
  if command -v lscpu >/dev/null 2>&1; then
    per_core=$(lscpu -p=SOCKET,CORE 2>/dev/null | awk -F, '
      /^#/ { next }
      { if ($2 == "") blank = 1; n++; if (!(($1 "," $2) in seen)) { seen[$1 "," $2] = 1; k++ } }
      END { if (blank || n == 0 || k == 0 || n < k) print 1; else print int(n / k) }') || per_core=1
    is_pos_int "$per_core" || per_core=1
  fi
  echo $((threads / per_core))
}

if [ -z "$cores_per_rank" ]; then
  cores=$(physical_cores)
  cores_per_rank=$((cores / gpus_per_node))
  [ "$cores_per_rank" -ge 1 ] || cores_per_rank=1
fi
is_pos_int "$cores_per_rank" || die "--cores-per-rank '$cores_per_rank': expected an integer >= 1"
[ -n "$map_by" ] || map_by="ppr:${gpus_per_node}:node:PE=${cores_per_rank}"

if [ -z "$worker" ]; then
  if [ -x "$script_dir/../build/bin/aviary-worker" ]; then
    worker=$(cd "$script_dir/../build/bin" && pwd)/aviary-worker
  else
    worker=aviary-worker
  fi
fi

cmd=("$mpirun" -np "$np")
if [ -n "$hostfile" ]; then
  cmd+=(--hostfile "$hostfile")
else
  cmd+=(--host "localhost:$gpus_per_node")
fi
cmd+=(--map-by "$map_by" --bind-to "$bind_to" --report-bindings)
# On SIGTERM, mpirun sends the ranks SIGCONT, then SIGTERM and SIGKILL 1 s apart unless told
# otherwise (measured with Open MPI 4.1): when this script falls back to SIGTERM (below), give
# the ranks time to finish a step and report.
cmd+=(--mca odls_base_sigkill_timeout "$stop_timeout")
if [ "$(id -u)" -eq 0 ]; then cmd+=(--allow-run-as-root); fi
# Environment for every rank, by name only (values such as AVIARY_TOKEN never appear in the
# command line).
exported=()
while IFS= read -r name; do
  case $name in
    NCCL_*|UCX_*|TORCH_*|AVIARY_*|PATH|LD_LIBRARY_PATH) exported+=("$name") ;;
  esac
done < <(compgen -e | sort)
for name in "${env_extra[@]+"${env_extra[@]}"}"; do
  [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env '$name': not a variable name"
  exported+=("$name")
done
for name in "${exported[@]+"${exported[@]}"}"; do cmd+=(-x "$name"); done
cmd+=("${mpirun_extra[@]+"${mpirun_extra[@]}"}")
cmd+=("$worker" serve --coordinator "$coordinator" --metrics-listen "$metrics_listen"
      --device "$device" --threads "$cores_per_rank" --log-level "$log_level" --max-tasks "$max_tasks")
[ -z "$token_file" ] || cmd+=(--token-file "$token_file")
[ -z "$tls_ca" ] || cmd+=(--tls-ca "$tls_ca")
[ -z "$tls_cert" ] || cmd+=(--tls-cert "$tls_cert" --tls-key "$tls_key")
cmd+=("${serve_extra[@]+"${serve_extra[@]}"}")

# Rank 0 runs on the hostfile's first node (ppr and slot mappings fill nodes in order).
rank0_host=${hosts[0]:-$(hostname -f 2>/dev/null || hostname)}
metrics_port=${metrics_listen##*:}
sd_file=""
sd_json=""
if [ -n "$sd_dir" ]; then
  if [ -z "$metrics_listen" ] || ! is_uint "$metrics_port" || [ "$metrics_port" -eq 0 ]; then
    die "--sd-dir needs a fixed --metrics-listen port (got '$metrics_listen')"
  fi
  # This launcher's own file (its pid in the name): two groups that raced for one port both
  # wrote their target, and the one that failed to bind it removes its own, not the other's.
  sd_file="$sd_dir/aviary-group-${rank0_host}-${metrics_port}-$$.json"
  all_hosts=$(IFS=,; echo "${hosts[*]:-$rank0_host}")
  sd_json="[{\"targets\": [\"${rank0_host}:${metrics_port}\"], \"labels\": {\"aviary_hosts\": \"${all_hosts}\"}}]"
fi

if [ "$dry_run" -eq 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  if [ -n "$sd_file" ]; then echo "file_sd target $sd_file: $sd_json"; fi
  exit 0
fi

stopping=0
# Set before the work that comes before mpirun (the port probe, the file_sd target): a stop
# signal there ends the launch with exit 0 below, not a kill (143) halfway.
# The first signal: SIGUSR2 to mpirun (forwarded to every rank at once), and SIGTERM to mpirun
# if it is still running --stop-timeout seconds later; a second signal (2 s or more after the
# first): SIGTERM to mpirun now.
killer=""
# Microseconds since the epoch (bash 5's EPOCHREALTIME, its separator whatever the locale's;
# whole seconds from SECONDS on an older bash).
# shellcheck disable=SC2317  # called from forward
now_us() {
  local t=${EPOCHREALTIME:-}
  if [ -n "$t" ]; then echo "${t//[!0-9]/}"; else echo $((SECONDS * 1000000)); fi
}
# shellcheck disable=SC2317  # called from traps
forward() {
  if [ "$stopping" -eq 1 ]; then
    # The same stop said twice within 2 s (Slurm's scancel signals every process of the step,
    # and the batch script's trap passes it on too): not a second request. (Microseconds:
    # SECONDS counts whole seconds, and 1.2 s could read as 2.)
    if [ $(($(now_us) - first_signal_us)) -lt 2000000 ]; then
      echo "launch-group.sh: $1 again within 2 s: taken for the same stop" >&2 || true
      return
    fi
    echo "launch-group.sh: $1 again: SIGTERM to mpirun" >&2 || true
    # Before mpirun has started there is nothing to kill (and no marker folder yet).
    if [ -n "$pid" ]; then
      : >"$forced_file"
      kill -TERM "$pid" 2>/dev/null || true
    fi
    return
  fi
  stopping=1
  first_signal_us=$(now_us)
  # A hung-up terminal: what the launcher still says would fail (EIO), and set -e would end it
  # with 1 after a clean stop.
  if [ "$1" = SIGHUP ] && [ -t 2 ]; then exec 2>/dev/null; fi
  # (|| true: after a SIGHUP the terminal may be gone, and set -e would end the launcher here.)
  echo "launch-group.sh: $1: stopping the group (SIGUSR2 to mpirun; SIGTERM after ${stop_timeout}s)" >&2 || true
  if [ -n "$pid" ]; then stop_mpirun; fi
}
# Once: a signal between `pid=$!` and the check after it runs this from the trap, and the check
# would run it again (a second SIGUSR2, and a second killer in place of the first).
# shellcheck disable=SC2317  # called from forward
stop_mpirun() {
  if [ -n "$killer" ]; then return; fi
  kill -USR2 "$pid" 2>/dev/null || true
  (sleep "$stop_timeout"; : >"$forced_file"; kill -TERM "$pid" 2>/dev/null) >/dev/null 2>&1 &
  killer=$!
}
pid=""
forced_file=""
first_signal_us=0
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT
# A closed terminal or a dropped ssh: mpirun runs in a session of its own (below) and gets no
# SIGHUP, so the group stops as on SIGTERM rather than train on without its launcher.
trap 'forward SIGHUP' HUP

command -v "$mpirun" >/dev/null 2>&1 || die "--mpirun '$mpirun': not found"
command -v "$worker" >/dev/null 2>&1 || die "--worker '$worker': not found (build it, or pass --worker)"

# A metrics port that already answers on rank 0's host is another process's (another group's,
# when allocations share a node): this group's rank 0 could not bind it, and its exit would
# remove the file_sd target that group wrote under the same name. Refused before the file is
# touched.
# shellcheck disable=SC2016  # $1 and $2 are the inner shell's arguments
if [ -n "$sd_file" ] && timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$rank0_host" "$metrics_port" 2>/dev/null; then
  die "rank 0's metrics port ${rank0_host}:${metrics_port} already answers (another group's?): give this group another --metrics-listen port (under Slurm: AVIARY_METRICS_PORT)"
fi

# Where the stop's SIGTERM fallback notes that it fired (a subshell cannot set our variables):
# a private folder, so that no one else can place the marker.
marker_dir=$(mktemp -d "${TMPDIR:-/tmp}/aviary-launch.XXXXXX") || die "mktemp -d failed"
forced_file=$marker_dir/forced
# shellcheck disable=SC2317  # called from traps
cleanup() {
  if [ -n "$sd_file" ]; then rm -f "$sd_file"; fi
  rm -rf "$marker_dir"
}
trap cleanup EXIT
if [ -n "$sd_file" ]; then
  mkdir -p "$sd_dir"
  # Targets of earlier launchers for this host and port whose launcher is gone (SIGKILLed before
  # its EXIT trap: a plain scancel after Slurm's KillWait, a node that crashed) were scraped for
  # ever, and counted twice with a new group on the same port. The port answers no one now
  # (checked above); a launcher still alive (one racing for the port, another user's: /proc
  # shows it where kill -0 may not) keeps its file. Only this launcher's names (a pid; the Slurm
  # script's srun path names its files by "job<id>").
  for old in "$sd_dir/aviary-group-${rank0_host}-${metrics_port}-"*.json; do
    [ -e "$old" ] || continue
    old_pid=${old##*-}
    old_pid=${old_pid%.json}
    if is_uint "$old_pid" && [ "$old_pid" != "$$" ] && [ ! -d "/proc/$old_pid" ]; then
      echo "launch-group.sh: removing $old (its launcher, pid $old_pid, is gone)" >&2
      rm -f "$old"
    fi
  done
  # `||`, not `&&`: set -e passed over a failed write inside an && list, and the group ran
  # without its target.
  { printf '%s\n' "$sd_json" >"$sd_file.tmp.$$" && mv -f "$sd_file.tmp.$$" "$sd_file"; } ||
    die "--sd-dir '$sd_dir': cannot write $sd_file"
fi

echo "launch-group.sh: $np ranks on $num_nodes node(s), coordinator $coordinator" >&2
# A stop asked for before mpirun starts: nothing to stop (a SIGUSR2 before mpirun set its
# handlers killed it, and the launcher said "a rank failed").
if [ "$stopping" -eq 1 ]; then
  echo "launch-group.sh: stopped before mpirun started" >&2
  exit 0
fi
# In a session of its own, stdin from /dev/null: a terminal's Ctrl-C goes to the foreground
# process group, which held mpirun too, and mpirun aborted the ranks on it (SIGTERM, without
# their clean stop; a second Ctrl-C left them running, orphaned) instead of the launcher's
# SIGUSR2; and mpirun reads no terminal.
setsid "${cmd[@]}" </dev/null &
pid=$!
# A signal that came while mpirun was starting.
if [ "$stopping" -eq 1 ]; then stop_mpirun; fi
# `wait` returns early (status > 128) when a trapped signal arrives; wait again until mpirun
# has exited.
rc=""
while [ -z "$rc" ]; do
  if wait "$pid"; then
    rc=0
  else
    r=$?
    if [ "$r" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    # Cut by a trapped signal just as mpirun exited (bash reaped it meanwhile), r is the
    # signal's 128+n, not mpirun's code: waiting again gives the code bash kept for it (and the
    # same r when r was mpirun's own).
    if [ "$r" -gt 128 ]; then
      if wait "$pid"; then r=0; else r2=$?; [ "$r2" -eq 127 ] || r=$r2; fi  # 127: forgotten (POSIX mode)
    fi
    rc=$r
  fi
done
if [ -n "$killer" ]; then kill "$killer" 2>/dev/null || true; fi
if [ "$stopping" -eq 1 ]; then
  if [ -e "$forced_file" ]; then
    # The ranks did not all stop on SIGUSR2 in time (or a second signal asked for SIGTERM):
    # mpirun got SIGTERM and killed what was left. Not a clean stop: say so in the exit code
    # (systemd and Slurm then show the unit or job as failed).
    echo "launch-group.sh: the group did not stop within --stop-timeout ${stop_timeout}s of the signal" \
      "(or a second signal came): mpirun was sent SIGTERM (mpirun exit code $rc)" >&2
    if [ "$rc" -eq 0 ]; then exit 1; fi
    exit "$rc"
  fi
  if [ "$rc" -ne 0 ]; then
    # mpirun exits 0 once every rank has left on SIGUSR2: a rank that failed (an error while
    # stopping, a crash, a group already failing when the signal came) is not a clean stop.
    echo "launch-group.sh: the group was stopping on a signal but mpirun exited with code $rc (a rank failed)" >&2
    exit "$rc"
  fi
  echo "launch-group.sh: group stopped by signal (mpirun exit code 0)" >&2
  exit 0
fi
exit "$rc"
