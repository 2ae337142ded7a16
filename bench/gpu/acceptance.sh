#!/usr/bin/env bash
# Every GPU check of aviary in one command (docs/BENCHMARKS.md, "GPU acceptance"; how to fit a
# device call: bench/gpu/README.md): correctness on CUDA, the mel front end, the
# EfficientNet-B0 training step against PyTorch eager and torch.compile, the real data path
# (with a torch profile of some of its steps: how busy the GPU was, where the host waited), NCCL
# and the all-reduce share of a step, and an 8-GPU projection. Writes OUT/results.tsv (one row
# per check), OUT/steps.tsv (each step's exit status, wall seconds and limit) and
# OUT/acceptance.log, and prints both tables.
#
# On a GPU host (Ubuntu 24.04, CUDA 13, PyTorch 2.11 in python3, OpenMPI): binaries built on a
# Debian machine against the same torch wheel and packed with bench/gpu/pack.sh (the Debian
# libraries they need travel with them), so nothing is built there:
#   bench/gpu/acceptance.sh --pack .gpu --out "$OUT"
# Without a GPU (CI): --dry-run runs every step on the CPU at toy sizes (MPI instead of NCCL,
# torch.compile with its "eager" backend) from a build folder, so that the GPU call cannot fail
# on a typo; its figures mean nothing:
#   bench/gpu/acceptance.sh --dry-run --build build-cuda --python "$AVIARY_TORCH_VENV/bin/python"
#
# Options: --pack DIR (bin/ and lib/ from pack.sh) | --build DIR (its bin/), --python PY (the
# python whose torch the binaries were built against; default python3), --out DIR (default
# ./acceptance-out), --work DIR (scratch; default a temporary folder), --skip-compile,
# --only GROUPS (comma-separated, default all: checks = corpus with broken files, training,
# exact resume, train.cuda_graph, predict; speed = mel front end, model step eager / CUDA graph /
# from waveforms, torch.compile; datapath = corpus without broken files, aviary-worker train
# eager and graphed, its profile, the loader, the 8-GPU projection; allreduce = allreduce-bench;
# the rows of the others are SKIP "not selected"; datapath's ratios need speed's rates),
# --budget S (the whole run's seconds, default 450: a step is stopped when the budget runs out,
# and later steps do not start, so the table is printed before a device call's limit),
# --step-timeout S (one step's seconds, default 240: a hung step is stopped and reported).
# A check whose step the budget or --step-timeout stopped (or left unstarted) is STOPPED
# ("stopped: budget/timeout"), torch.compile with too little budget left to compile included.
# Environment: AVIARY_PROJECTION_BUSBW_GBPS (NVLink all-reduce bus bandwidth assumed for the
# 8-GPU projection; default 350, about what nccl-tests reports on 8 x H100 SXM).
# The order: checks, speed, datapath, allreduce, projection, torch.compile (minutes of compiling).
# Exit status: 0 when every selected check ran and met its goal (dry-run: when every step ran;
# SKIP is not a failure, STOPPED is), 1 else, 2 for bad arguments or no torch.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

dry=0
pack=""
build=""
python=python3
out=$PWD/acceptance-out
work=""
compile=1
budget=450
step_timeout=240
groups=checks,speed,datapath,allreduce
only=$groups
# need FLAG ARGS...: FLAG has a value after it (exit 2, as for any bad argument, when not).
need() { [ $# -ge 2 ] || { echo "acceptance.sh: $1 needs a value (see --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --pack) need "$@"; pack=$2; shift ;;
    --build) need "$@"; build=$2; shift ;;
    --python) need "$@"; python=$2; shift ;;
    --out) need "$@"; out=$2; shift ;;
    --work) need "$@"; work=$2; shift ;;
    --skip-compile) compile=0 ;;
    --only) need "$@"; only=$2; shift ;;
    --budget) need "$@"; budget=$2; shift ;;
    --step-timeout) need "$@"; step_timeout=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "acceptance.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "acceptance.sh: --budget takes whole seconds, got '$budget'" >&2; exit 2; }
# Not 0: `timeout 0` is no limit at all.
[[ "$step_timeout" =~ ^[1-9][0-9]*$ ]] ||
  { echo "acceptance.sh: --step-timeout takes whole seconds above 0, got '$step_timeout'" >&2; exit 2; }
IFS=, read -ra only_list <<<"$only"
[ ${#only_list[@]} -gt 0 ] || { echo "acceptance.sh: --only takes a comma-separated list of: $groups" >&2; exit 2; }
for g in "${only_list[@]}"; do
  case ",$groups," in *",$g,"*) ;; *) echo "acceptance.sh: --only: unknown group '$g' (groups: $groups)" >&2; exit 2 ;; esac
done
# want GROUP: whether --only selected it.
want() { case ",$only," in *",$1,"*) return 0 ;; esac; return 1; }
# The trainer's CUDA-graph flag, for the checks' graphed runs and the datapath group's graphed
# row alike (so set whatever --only chose). The dry run has no CUDA: eager against eager.
graph_set=(--set train.cuda_graph=true); graph_what="train.cuda_graph vs eager"
[ $dry -eq 1 ] && { graph_set=(); graph_what="no GPU: eager against eager"; }
if [ -n "$pack" ]; then
  bin=$(cd "$pack/bin" && pwd) || exit 2
  benchbin=$bin
elif [ -n "$build" ]; then
  bin=$(cd "$build/bin" && pwd) || exit 2
  benchbin=$(cd "$build/bench" && pwd) || exit 2
else
  echo "acceptance.sh: give --pack DIR (bench/gpu/pack.sh) or --build DIR" >&2; exit 2
fi
for b in "$bin/aviary" "$bin/aviary-worker" "$benchbin/train_step_bench" "$benchbin/frontend_bench" "$benchbin/loader_bench"; do
  [ -x "$b" ] || { echo "acceptance.sh: $b is missing" >&2; exit 2; }
done
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
if [ -z "$work" ]; then work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi
mkdir -p "$work" && work=$(cd "$work" && pwd)
log=$out/acceptance.log
results=$out/results.tsv
steps_tsv=$out/steps.tsv
: >"$log"
printf 'check\tstatus\tmeasured\treference\tratio\tgoal\tnote\n' >"$results"
printf 'step\texit\twall_s\tlimit_s\tnote\n' >"$steps_tsv"
failed=0

say() { echo "== $*" | tee -a "$log"; }
# record CHECK STATUS MEASURED REFERENCE RATIO GOAL NOTE. STATUS: PASS, MISS (ran, goal not
# met), FAIL, STOPPED (the budget or --step-timeout stopped a step it needs, or left it
# unstarted: not measured), INFO, SKIP (not asked for: --only, --skip-compile; or impossible on
# this host). Only PASS, INFO and SKIP leave the exit status 0.
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$results"
  case "$2" in PASS|INFO|SKIP) ;; *) failed=1 ;; esac
  echo "   -> $1: $2 $3 ${7:-}" | tee -a "$log"
}
# not_selected GROUP CHECK...: SKIP rows for the checks of a group --only left out.
not_selected() {
  local g=$1 c; shift
  for c in "$@"; do record "$c" SKIP - - - - "not selected (--only $only; group $g)"; done
}
# Each step's exit status, wall time and limit (steps.tsv and the log); why a step was stopped.
declare -A step_stop=()
step_done() {  # step_done NAME RC SECONDS LIMIT WHY
  [ -n "$5" ] && step_stop[$1]=$5
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:--}" >>"$steps_tsv"
  echo "-- $1: exit $2 after $3 s (limit $4 s)${5:+: $5}" >>"$log"
}
# run NAME CMD...: runs with output in $work/NAME.out and appended to the log, stopped after
# --step-timeout or when the --budget runs out (status 124 then; not started when under 5 s
# are left, status 124 too).
run() {
  local name=$1; shift
  local now; now=$(date +%s)
  local left=$(( budget - (now - t_start) ))
  local limit=$(( left < step_timeout ? left : step_timeout ))
  if [ $left -lt 5 ]; then
    echo "not run: the ${budget} s budget is spent" | tee "$work/$name.out" >>"$log"
    say "$name: not run, the ${budget} s budget is spent"
    step_done "$name" 124 0 0 "not started: the ${budget} s --budget was spent"
    return 124
  fi
  echo "\$ $* (limit ${limit} s)" >>"$log"
  timeout -k 10 "$limit" "$@" >"$work/$name.out" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - now ))
  cat "$work/$name.out" >>"$log"
  local why=""
  # timeout's 124 (137 when TERM was not enough), at the limit: not the command's own status.
  if { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && [ $(( took + 1 )) -ge "$limit" ]; then
    if [ "$limit" -lt "$step_timeout" ]; then why="stopped after ${limit} s: the ${budget} s --budget ran out"
    else why="stopped after ${limit} s: the --step-timeout"; fi
    say "$name: $why"
  fi
  step_done "$name" "$rc" "$took" "$limit" "$why"
  return $rc
}
# bad CHECK GOAL NOTE STEP...: the row of a check that got no result. STOPPED ("stopped:
# budget/timeout", naming the step) when the budget or --step-timeout stopped one of the STEPs
# or left it unstarted; else FAIL with NOTE.
bad() {
  local check=$1 goal=$2 note=$3 s; shift 3
  for s in "$@"; do
    if [ -n "${step_stop[$s]:-}" ]; then
      record "$check" STOPPED - - - "$goal" "stopped: budget/timeout (step $s ${step_stop[$s]}); not measured"
      return
    fi
  done
  record "$check" FAIL - - - "$goal" "$note"
}
kv() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" "$work/$1.out" | tail -1; }
ratio() { "$python" -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.3f}' if b > 0 else 'nan')" "$1" "$2" 2>/dev/null || echo nan; }
meets() { "$python" -c "import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) else 1)" "$1" "$2" 2>/dev/null; }
# A goal is a verdict on a GPU and information in the dry run.
verdict() { if [ $dry -eq 1 ]; then echo INFO; elif meets "$1" "$2"; then echo PASS; else echo MISS; fi; }
# The results as a table (column is in bsdextrautils, which a bare host may lack).
table() { column -t -s $'\t' "$1" 2>/dev/null || cat "$1"; }

# The budget counts from here: importing torch on a cold host takes seconds.
t_start=$(date +%s)
# Libraries: the packed Debian ones, torch's, and the wheels' CUDA libraries (NCCL, cuDNN, ...).
# One import of torch, bounded by --step-timeout (also with no budget left: nothing runs without
# it): its folder, its version and whether it sees a GPU.
probe_t0=$(date +%s)
timeout -k 5 "$step_timeout" "$python" -c 'import os, torch
print(os.path.dirname(torch.__file__))
print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' >"$work/torch_probe.out" 2>>"$log"
probe_rc=$?
step_done torch_import "$probe_rc" $(( $(date +%s) - probe_t0 )) "$step_timeout" \
  "$([ $probe_rc -eq 124 ] || [ $probe_rc -eq 137 ] && echo "stopped after $step_timeout s: the --step-timeout")"
torch_dir=$(sed -n 1p "$work/torch_probe.out")
torch_v=$(sed -n 2p "$work/torch_probe.out")
if [ $probe_rc -ne 0 ] || [ -z "$torch_dir" ]; then
  echo "acceptance.sh: $python cannot import torch (exit $probe_rc; see $log)" >&2; exit 2
fi
# Python runs with the host's own library path, through a wrapper: the packed Debian 12
# libraries are older than a GPU host's (an Ubuntu 24.04 python3 links its libexpat 2.6 and
# libz), so only aviary's programs get them.
py=$(command -v "$python") && py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py") || py=""
if [ -n "$py" ]; then
  if [ -n "${LD_LIBRARY_PATH+x}" ]; then keep="export LD_LIBRARY_PATH=$(printf %q "$LD_LIBRARY_PATH")"; else keep="unset LD_LIBRARY_PATH"; fi
  printf '#!/usr/bin/env bash\n%s\nexec %q "$@"\n' "$keep" "$py" >"$work/python" && chmod +x "$work/python" &&
    "$work/python" -c '' 2>/dev/null && python=$work/python  # not where --work is mounted noexec
fi
libs="$torch_dir/lib"
for nv in "$torch_dir"/../nvidia/*/lib; do [ -d "$nv" ] && libs="$libs:$(cd "$nv" && pwd)"; done
if [ -n "$pack" ]; then
  libs="$(cd "$pack/lib" && pwd):$libs"
  # OpenMPI's libmpi.so.40 from the pack only when the host has neither mpirun nor a libmpi of
  # its own: the packed one under the host's mpirun (another OpenMPI) would not start.
  if ! command -v mpirun >/dev/null 2>&1 &&
     ! { ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null | grep -q 'libmpi.so.40 '; then
    libs="$libs:$(cd "$pack/mpi-lib" && pwd)"
  fi
fi
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
# aviary's programs load here, or no step of theirs can run: said now, not after the Python
# references have used minutes of device time (a library the host lacks, e.g. libgomp.so.1,
# which the pack leaves to the host, failed every aviary step within milliseconds).
missing=""
if command -v ldd >/dev/null 2>&1; then
  for b in "$bin/aviary-worker" "$bin/aviary"; do [ -x "$b" ] && ldd "$b" >>"$log" 2>&1; done
  missing=$(for b in "$bin/aviary-worker" "$bin/aviary"; do [ -x "$b" ] && ldd "$b" 2>&1 | grep 'not found'; done |
    sort -u | tr -s ' \t\n' ' ')
fi
if [ -n "$missing" ]; then
  echo "acceptance.sh: the programs in $bin do not load here:$missing (see $log)" >&2
  exit 2
fi

if [ $dry -eq 1 ]; then
  dev=cpu; backend=mpi
  species=6; recordings=60; epochs=2; resume_epochs=2; batch_b0=2; clip_s=2
  steps=2; warmup=1; rounds=1; mel_batch=4; mel_repeats=2; upsample=12; compile_backend=eager
else
  dev=cuda; backend=nccl
  species=12; recordings=240; epochs=8; resume_epochs=3; batch_b0=256; clip_s=10
  steps=20; warmup=8; rounds=3; mel_batch=256; mel_repeats=20; upsample=1500; compile_backend=inductor
fi
threads=$(nproc)
mpirun_cmd=()
has_mpirun=no
if command -v mpirun >/dev/null 2>&1; then
  has_mpirun=yes
  mpirun_cmd=(mpirun -np 1 --oversubscribe --bind-to none -x LD_LIBRARY_PATH)
fi

# 0. The machine.
say "0. machine"
gpu=$(timeout -k 5 60 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
record machine INFO "${gpu:-no GPU}" "torch ${torch_v}" - - \
  "$(nproc) cores; mpirun: $has_mpirun; dry-run $dry; --only $only; --budget $budget s, --step-timeout $step_timeout s"
if [ $dry -eq 0 ] && [ "${torch_v##* }" != True ]; then
  record machine FAIL "torch sees no GPU" - - - "run with --dry-run on a machine without one"
  table "$results"; exit 1
fi

# 1. Synthetic corpora (real ogg files) and their decoded-audio caches. The correctness checks
# read one with aviary synth's broken files (about 7% of the data path's clips, which the loader
# substitutes); the speed rows (data path, loader) a second one without them (--no-broken), so
# that they time no substitution the synthetic-input step never makes. Each only when its group
# runs.
say "1. corpus and cache"
cat >"$work/cnn.yaml" <<YAML
seed: 42
data:
  duration: 5.0
  target: {layout: "2024", root: $work/t24}
  pretrain_sources: []
  cache_dir: $work/cache
folds: {finetune_splits: 4}
sampling: {upsample_thr: 10}
model: {name: small_cnn, dropout: 0.1}
train: {batch_size: 16, epochs: $epochs, num_workers: 4, lr_max_per_sample: 1.0e-4, lr_ramp_epochs: 1, deterministic: true}
stages: {pretrain: {enabled: false}}
YAML
# The data path at the benchmark's shapes: EfficientNet-B0 on 10 s clips, every class upsampled
# so that an epoch holds enough global batches to time (about 70 of 256 on the GPU: an epoch's
# start, its first batch decoded while the GPU waits, weighed too much in 28), three epochs (the
# rows read the median of the last two) (no downsampling: its default threshold,
# 500, is under the GPU run's upsampling threshold, which the config refuses); the corpus
# without broken files, in a cache of its own.
cat >"$work/b0.yaml" <<YAML
seed: 42
data:
  duration: $clip_s
  target: {layout: "2024", root: $work/t24clean}
  pretrain_sources: []
  cache_dir: $work/cache_clean
folds: {finetune_splits: 4}
sampling: {upsample_thr: $upsample, downsample_thr: 0}
model: {name: efficientnet_b0}
train: {batch_size: $batch_b0, epochs: 3, num_workers: $threads, infer_bs: 1}
stages: {pretrain: {enabled: false}}
YAML
synth_args=(--layout 2024 --species "$species" --recordings "$recordings" --seed 3 --max-seconds 12)
t0=$(date +%s)
corpus_ok=1; corpus_note=""; corpus_rows="-"; corpus_steps=()
if want checks; then
  if run synth "$bin/aviary" synth --out "$work/t24" "${synth_args[@]}" &&
     run prepare "$bin/aviary" prepare --config "$work/cnn.yaml" --threads "$threads"; then
    corpus_rows="$(grep -c . "$work/t24/train_metadata.csv") rows"
    corpus_note="the checks' corpus (with broken files): $corpus_rows"
  else
    corpus_ok=0; corpus_steps=(synth prepare)
  fi
fi
if want datapath; then
  if run synth_clean "$bin/aviary" synth --out "$work/t24clean" "${synth_args[@]}" --no-broken &&
     run prepare_clean "$bin/aviary" prepare --config "$work/b0.yaml" --threads "$threads"; then
    [ "$corpus_rows" = - ] && corpus_rows="$(grep -c . "$work/t24clean/train_metadata.csv") rows"
    corpus_note="${corpus_note:+$corpus_note; }the speed rows' corpus without broken files: $(grep -c . "$work/t24clean/train_metadata.csv") rows"
  else
    corpus_ok=0; corpus_steps+=(synth_clean prepare_clean)
  fi
fi
if ! want checks && ! want datapath; then
  record corpus SKIP - - - - "not needed (--only $only)"
elif [ $corpus_ok -eq 1 ]; then
  record corpus PASS "$corpus_rows" - - - "synth + prepare in $(( $(date +%s) - t0 )) s; $corpus_note"
else
  bad corpus - "aviary synth or prepare failed (see the log)" "${corpus_steps[@]}"
fi

if want checks; then
# 2. Training on the device with the NCCL backend (one rank: NCCL refuses two ranks on one GPU).
say "2. training on $dev, backend $backend"
train_cmd=("$bin/aviary-worker" train --config "$work/cnn.yaml" --stage finetune --fold 0 --device "$dev")
if [ ${#mpirun_cmd[@]} -eq 0 ]; then
  record train SKIP - - - - "no mpirun on this host: the NCCL backend needs an MPI world; one process instead"
else
  train_cmd=("${mpirun_cmd[@]}" "${train_cmd[@]}" --set "comm.backend=$backend")
fi
if run train_full "${train_cmd[@]}" --out "$work/run_full"; then
  best=$("$python" -c "import csv,sys; print(max(float(r['val_roc_auc']) for r in csv.DictReader(open(sys.argv[1]))))" "$work/run_full/history.csv")
  if [ ${#mpirun_cmd[@]} -gt 0 ] && ! grep -q "(${backend})" "$work/train_full.out"; then
    record train FAIL "$best" - - - "the log does not show the $backend backend"
  else
    st=$(verdict "$best" 0.85)
    record train "$st" "val ROC-AUC $best" - - ">= 0.85" "small_cnn, $epochs epochs, deterministic"
  fi
else
  bad train ">= 0.85" "aviary-worker train failed (see the log)" train_full
fi

# 3. Exact resume: the same run killed in the middle of epoch 2 (fault injection) and resumed
# ends with the same history and the same weights and optimizer state.
say "3. exact resume"
resume_cfg=(--set "train.epochs=$resume_epochs")
kill_step=""
if run train_ref "${train_cmd[@]}" --out "$work/run_ref" "${resume_cfg[@]}"; then
  spe=$(sed -n '2p' "$work/run_ref/history.csv" 2>/dev/null | cut -d, -f2)
  kill_step=$(( ${spe:-1} + ${spe:-1} / 2 ))
  AVIARY_FAULT_INJECT="rank=0,step=$kill_step,kind=throw" run train_killed "${train_cmd[@]}" --out "$work/run_resumed" "${resume_cfg[@]}"
  if grep -q "AVIARY_FAULT_INJECT" "$work/train_killed.out" && run train_resumed "${train_cmd[@]}" --out "$work/run_resumed" "${resume_cfg[@]}"; then
    if run compare_ckpt "$python" "$here/compare_checkpoints.py" "$work/run_ref" "$work/run_resumed"; then
      record resume PASS "identical" - - "identical" "killed at step $kill_step, resumed: history, weights, optimizer state"
    elif [ -n "${step_stop[compare_ckpt]:-}" ]; then
      bad resume identical - compare_ckpt
    else
      record resume FAIL "$(tail -1 "$work/compare_ckpt.out")" - - "identical" "killed at step $kill_step"
    fi
  else
    bad resume identical "the interrupted or the resumed run failed (see the log)" train_killed train_resumed
  fi
else
  bad resume identical "the reference run failed (see the log)" train_ref
fi

# 3b. train.cuda_graph: the same run with the model step replayed as a CUDA graph is the same
# run (deterministic cuDNN: history, weights and optimizer state bit for bit); also with
# drop_remainder false, where each epoch's partial last batch takes the eager step between
# replays. The dry run has no CUDA: eager against eager (tests the comparison and the parsing).
say "3b. CUDA graph training"
# graph_same NAME EAGER_RUN GRAPH_RUN NOTE: the row comparing two run folders of $work (the
# graphed run's `run` name is its folder's).
graph_same() {
  if [ $dry -eq 0 ] && ! grep -q "train.cuda_graph: the model step captured" "$work/$3.out"; then
    record "$1" FAIL - - - identical "the graphed run's log does not show a capture"
  elif run "compare_$1" "$python" "$here/compare_checkpoints.py" "$work/$2" "$work/$3"; then
    record "$1" PASS identical - - identical "$graph_what, $4: history, weights, optimizer state"
  elif [ -n "${step_stop[compare_$1]:-}" ]; then
    bad "$1" identical - "compare_$1"
  else
    record "$1" FAIL "$(tail -1 "$work/compare_$1.out")" - - identical "$graph_what, $4"
  fi
}
if [ ! -s "$work/run_full/history.csv" ]; then
  bad train_graph identical "no eager run to compare with (the train check's run failed)" train_full
elif run run_graph "${train_cmd[@]}" --out "$work/run_graph" "${graph_set[@]}"; then
  graph_same train_graph run_full run_graph "small_cnn, $epochs epochs against the train check's run_full"
else
  bad train_graph identical "the graphed run failed (see the log)" run_graph
fi
part=(--set train.drop_remainder=false --set "train.epochs=$resume_epochs")
if run run_part_eager "${train_cmd[@]}" --out "$work/run_part_eager" "${part[@]}" &&
   run run_part_graph "${train_cmd[@]}" --out "$work/run_part_graph" "${part[@]}" "${graph_set[@]}"; then
  graph_same train_graph_partial run_part_eager run_part_graph "drop_remainder false, $resume_epochs epochs"
else
  bad train_graph_partial identical "a drop_remainder false run failed (see the log)" run_part_eager run_part_graph
fi
# With gradient clipping, the EMA (validating with it) and the per-step schedule, which act
# between replays.
opts=(--set train.grad_clip_norm=1.0 --set train.ema_decay=0.9 --set train.ema_eval=true --set train.lr_per_step=true
      --set "train.epochs=$resume_epochs")
if run run_opts_eager "${train_cmd[@]}" --out "$work/run_opts_eager" "${opts[@]}" &&
   run run_opts_graph "${train_cmd[@]}" --out "$work/run_opts_graph" "${opts[@]}" "${graph_set[@]}"; then
  graph_same train_graph_options run_opts_eager run_opts_graph "grad_clip_norm, ema_decay + ema_eval, lr_per_step"
else
  bad train_graph_options identical "a clipping/EMA/lr_per_step run failed (see the log)" run_opts_eager run_opts_graph
fi
# A graphed run killed mid-epoch and resumed (graphed again) against the eager reference run.
if [ -z "$kill_step" ]; then
  bad resume_graph identical "no eager reference run to compare with (see the resume check)" train_ref
else
  AVIARY_FAULT_INJECT="rank=0,step=$kill_step,kind=throw" run run_graph_killed "${train_cmd[@]}" --out "$work/run_graph_resumed" \
    "${resume_cfg[@]}" "${graph_set[@]}"
  if grep -q "AVIARY_FAULT_INJECT" "$work/run_graph_killed.out" &&
     run run_graph_resumed "${train_cmd[@]}" --out "$work/run_graph_resumed" "${resume_cfg[@]}" "${graph_set[@]}"; then
    graph_same resume_graph run_ref run_graph_resumed "killed at step $kill_step and resumed, against the eager uninterrupted run"
  else
    bad resume_graph identical "the interrupted or the resumed graphed run failed (see the log)" run_graph_killed run_graph_resumed
  fi
fi

# 4. aviary predict on the device against the CPU, float32 on both: the device run without TF32
# (NVIDIA_TF32_OVERRIDE=0 turns it off in cuDNN and cuBLAS). cuDNN's default TF32 convolutions
# alone move these probabilities by up to 2.7e-3 when they truncate to TF32 (emulated on the
# CPU with this corpus and recipe), over the 2e-3 that catches a wrong device path.
say "4. predict on $dev vs cpu"
if run soundscapes "$bin/aviary" synth-soundscapes --out "$work/sc" --species $species --count 2 --seconds 62.5 --seed 11 &&
   NVIDIA_TF32_OVERRIDE=0 run predict_dev "$bin/aviary" predict --checkpoint "$work/run_full/best.pt" --audio "$work/sc/soundscapes" \
     --out "$work/pred_dev.csv" --device "$dev" &&
   run predict_cpu "$bin/aviary" predict --checkpoint "$work/run_full/best.pt" --audio "$work/sc/soundscapes" \
     --out "$work/pred_cpu.csv" --device cpu --threads "$threads"; then
  run predict_diff "$python" - "$work/pred_dev.csv" "$work/pred_cpu.csv" <<'PY'
import csv, sys
a = list(csv.reader(open(sys.argv[1]))); b = list(csv.reader(open(sys.argv[2])))
assert a[0] == b[0] and [r[0] for r in a] == [r[0] for r in b], "different rows or columns"
print(max(abs(float(x) - float(y)) for ra, rb in zip(a[1:], b[1:]) for x, y in zip(ra[1:], rb[1:])))
PY
  diff=$(tail -1 "$work/predict_diff.out")
  if [ -n "$diff" ] && "$python" -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 2e-3 else 1)" "$diff" 2>/dev/null; then
    record predict PASS "max |diff| $diff" - - "<= 2e-3" "probabilities, $dev (no TF32) vs cpu"
  elif [ -n "${step_stop[predict_diff]:-}" ]; then
    bad predict "<= 2e-3" - predict_diff
  else
    record predict FAIL "max |diff| ${diff:-?}" - - "<= 2e-3" "probabilities, $dev (no TF32) vs cpu"
  fi
else
  bad predict "<= 2e-3" "aviary predict failed (see the log)" soundscapes predict_dev predict_cpu
fi
else
  not_selected checks train resume train_graph train_graph_partial train_graph_options resume_graph predict
fi

# The synthetic-input step's rates: a (mel input, eager), g (mel input, CUDA graph), w (from
# waveforms), each the best round (against PyTorch's best round) and the median round (*_med:
# what the data-path rows, one epoch each, compare with).
a=""; e=""; g=""; w=""; a_med=""; g_med=""; w_med=""
step_args=(--device "$dev" --model efficientnet_b0 --batch "$batch_b0" --seconds "$clip_s" --classes 182
           --steps "$steps" --warmup "$warmup" --rounds "$rounds" --threads "$threads")
graph_flags=(--cuda-graph --graph-check 3); graph_what="CUDA graph"
[ $dry -eq 1 ] && { graph_flags=(--graph-check 3); graph_what="no GPU: eager against eager"; }
if want speed; then
# 5. The mel front end against torchaudio on the same device.
say "5. mel front end"
if run mel_aviary "$benchbin/frontend_bench" --device "$dev" $mel_batch 10 $mel_repeats 1 &&
   run mel_ref "$python" "$repo/bench/frontend_reference.py" --device "$dev" $mel_batch 10 $mel_repeats 1; then
  ma=$(kv mel_aviary aviary_clips_per_s); mr=$(kv mel_ref reference_clips_per_s)
  record mel "$(verdict "$(ratio "$ma" "$mr")" 1.0)" "$ma clips/s" "$mr clips/s" "$(ratio "$ma" "$mr")" ">= 1.0x torchaudio" "batch $mel_batch x 10 s"
else
  bad mel ">= 1.0x torchaudio" "a front-end benchmark failed (see the log)" mel_aviary mel_ref
fi

# 6. EfficientNet-B0, 3x128x384 (10 s), the model step (bf16 autocast + channels_last on CUDA)
# against PyTorch eager and torch.compile in the same run.
say "6. training step, synthetic input"
run step_aviary "$benchbin/train_step_bench" "${step_args[@]}" --input mel
run step_eager "$python" "$repo/bench/train_step_reference.py" "${step_args[@]}" --input mel
a=$(kv step_aviary aviary_samples_per_s); a_med=$(kv step_aviary aviary_median_samples_per_s)
e=$(kv step_eager reference_samples_per_s)
if [ -n "$a" ] && [ -n "$e" ]; then
  record step_vs_eager "$(verdict "$(ratio "$a" "$e")" 1.25)" "$a samples/s" "$e samples/s" "$(ratio "$a" "$e")" ">= 1.25x" \
    "PyTorch eager, same GPU; best of $rounds rounds each"
else
  bad step_vs_eager ">= 1.25x" "no rate to compare (aviary '${a}', PyTorch eager '${e}'): a side failed or printed none (see the log)" \
    step_aviary step_eager
fi
# The same model step with forward + backward replayed as one CUDA graph (train.cuda_graph;
# worker/cuda_graph_step.h), checked first against the eager step from the same state and seeds:
# the first step's gradients within 2% (bf16 autocast; nondeterministic cuDNN kernels) and the
# losses of 3 steps within 1%. The dry run has no CUDA: it runs the check with the eager step on
# both sides (every difference 0 on the CPU), which tests the check and this parsing.
if run step_graph "$benchbin/train_step_bench" "${step_args[@]}" --input mel "${graph_flags[@]}"; then
  g=$(kv step_graph aviary_samples_per_s); g_med=$(kv step_graph aviary_median_samples_per_s)
  gd=$(kv step_graph graph_check_grad_rel_diff)
  ld=$(kv step_graph graph_check_loss_max_rel_diff); pd=$(kv step_graph graph_check_param_max_abs_diff)
  check="gradients rel diff $gd, losses $ld, weights after 3 steps max |diff| $pd"
  if "$python" -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 0.02 and float(sys.argv[2]) <= 0.01 else 1)" "$gd" "$ld" 2>/dev/null; then
    record step_graph "$(verdict "$(ratio "$g" "${e:-0}")" 1.25)" "$g samples/s" "${e:-?} samples/s" "$(ratio "$g" "${e:-0}")" ">= 1.25x" \
      "$graph_what vs PyTorch eager; vs aviary eager $(ratio "$g" "${a:-0}")x; $check"
  else
    record step_graph FAIL "$g samples/s" - - "same as eager" "the graphed step differs from the eager one: $check"
    g=""; g_med=""  # not a rate to compare with (torch.compile, the graphed data path)
  fi
else
  bad step_graph ">= 1.25x" "train_step_bench ${graph_flags[*]} failed (see the log)" step_graph
fi
# The trainer's step from waveforms in host memory (pinned; copied ahead on a copy stream):
# augmentation, the front end and the model, everything of the data path but the loader.
if run wave_aviary "$benchbin/train_step_bench" "${step_args[@]}" --input wave &&
   w=$(kv wave_aviary aviary_samples_per_s) && w_med=$(kv wave_aviary aviary_median_samples_per_s) && [ -n "$w" ]; then
  record step_wave INFO "$w samples/s" "${a:-?} samples/s" "$(ratio "$w" "${a:-0}")" - \
    "waveforms in host memory + copy + augmentation + front end + model, vs the model step alone (mel input); best rounds"
else
  w=""; w_med=""
  bad step_wave - "the waveform-input step failed or printed no rate (see the log)" wave_aviary
fi
else
  not_selected speed mel step_vs_eager step_graph step_wave
fi

d=""; share=""  # the data path's rate (for the projection) and all-reduce share
if want datapath; then
# 7. The real data path (cache + loader + front end + the trainer) under the same group setup.
# Like for like: the epochs after the first (the first, with cuDNN's benchmark and the profile, is
# the warm-up; their median) against the median round of the waveform-input step (after its warm-up steps), which
# does the same work from waveforms already in host memory: the ratio is what the loader and
# the trainer's own work (reducer, bookkeeping) cost. Without the speed group there is no
# reference: the row is INFO.
say "7. the real data path"
# The median samples_per_s (history.csv's last column) of the epochs after the first (the
# warm-up: cuDNN's benchmark, the profile), or the only epoch's.
epochs_rate() {
  awk -F, 'NR > 1 { r[n++] = $NF } END {
    if (n == 0) exit 1
    m = 0; for (i = (n > 1 ? 1 : 0); i < n; i++) v[m++] = r[i] + 0
    for (i = 1; i < m; i++) { x = v[i]; for (j = i - 1; j >= 0 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
    printf "%.2f\n", (m % 2 ? v[int(m / 2)] : (v[m / 2 - 1] + v[m / 2]) / 2) }' "$1"
}
why_no_ref() {  # why_no_ref STEP: why a reference rate is missing
  if ! want speed; then echo "the speed group was not selected (--only $only)"; else echo "its step ($1) failed or was stopped"; fi
}
dp_cmd=("$bin/aviary-worker" train --config "$work/b0.yaml" --stage finetune --fold 0 --device "$dev" --out "$work/run_b0")
[ ${#mpirun_cmd[@]} -gt 0 ] && dp_cmd=("${mpirun_cmd[@]}" "${dp_cmd[@]}" --set "comm.backend=$backend")
# Profiled in epoch 0 (the rows read the later ones): where the data-path step leaves the GPU
# idle, for the datapath_profile row (AVIARY_PROFILE, bench/gpu/trace_summary.py).
prof_skip=10; prof_steps=8
[ $dry -eq 1 ] && { prof_skip=1; prof_steps=2; }
rm -f "$work/datapath_trace.json"
# TEARDOWN_CUPTI=1: the profiler detaches CUPTI when it stops (Kineto keeps it attached
# otherwise, slowing the epochs after the profile by 10-20%: the one the rows read).
if run datapath env TEARDOWN_CUPTI=1 AVIARY_PROFILE="out=$work/datapath_trace.json,skip=$prof_skip,steps=$prof_steps" "${dp_cmd[@]}"; then
  d=$(epochs_rate "$work/run_b0/history.csv")
  what="aviary-worker train's epochs after the first, median (loader + copy + augmentation + front end + model + reducer)"
  if [ -n "$w_med" ]; then
    record datapath "$(verdict "$(ratio "$d" "$w_med")" 0.9)" "$d samples/s" "$w_med samples/s" "$(ratio "$d" "$w_med")" ">= 0.9x" \
      "$what vs the waveform-input step's median round (the same work from host memory, no loader); vs the model step alone (mel input, median) $(ratio "$d" "${a_med:-0}")x"
  else
    record datapath INFO "$d samples/s" - - ">= 0.9x" "$what; no waveform-input step to compare with: $(why_no_ref wave_aviary)"
  fi
  reducer_line=$(grep -o 'gradient all-reduce: .*' "$work/datapath.out" | tail -1)
  share=$(echo "$reducer_line" | sed -n 's/.*(\([0-9.]*\)%).*/\1/p')
  if [ -n "$share" ]; then
    st=$([ $dry -eq 1 ] && echo INFO || ("$python" -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 3 else 1)" "$share" && echo PASS || echo MISS))
    # Its two parts: Finish after backward (the GPU waits) and the hooks (host time during backward).
    parts=$(echo "$reducer_line" | sed -n 's/.*: \([0-9.]*\) s waiting after backward + \([0-9.]*\) s in hooks of \([0-9.]*\) s.*/Finish \1 s + hooks \2 s of \3 s/p')
    record allreduce_share "$st" "$share %" - - "<= 3 %" "the last epoch's reducer time, hidden or not (${parts:-parts not logged}), 1 rank"
  elif [ ${#mpirun_cmd[@]} -eq 0 ]; then
    record allreduce_share SKIP - - - - "no reducer (no mpirun)"
  else
    record allreduce_share FAIL - - - "<= 3 %" "run under mpirun, but the data path's log has no 'gradient all-reduce' line with a share"
  fi
else
  bad datapath ">= 0.9x" "aviary-worker train (EfficientNet-B0) failed (see the log)" datapath
  bad allreduce_share "<= 3 %" "no data-path run (see the datapath row)" datapath
fi
sv() { sed -n "s/^$2=//p" "$work/$1.out" | tail -1; }
# The trace itself comes back with the results, compressed (for Perfetto or chrome://tracing),
# whether or not the summary below reads it; not when over 15 MiB (files over 16 MiB do not
# come back from a device call).
if [ -s "$work/datapath_trace.json" ]; then
  timeout -k 5 60 gzip -c "$work/datapath_trace.json" > "$out/datapath_trace.json.gz" 2>>"$log" || rm -f "$out/datapath_trace.json.gz"
  if [ -f "$out/datapath_trace.json.gz" ] && [ "$(stat -c %s "$out/datapath_trace.json.gz")" -gt $((15 << 20)) ]; then
    say "datapath_trace.json.gz: over 15 MiB, not kept"; rm -f "$out/datapath_trace.json.gz"
  fi
fi
# The steps the trainer says it profiled (fewer when the run ended first): the per-step host
# waits are divided by their number, not by the steps asked for.
steps_line=$(grep -o "AVIARY_PROFILE: optimizer steps [0-9]* to [0-9]*" "$work/datapath.out" 2>/dev/null | tail -1)
prof_from=$(echo "$steps_line" | sed -n 's/.* steps \([0-9]*\) to \([0-9]*\)$/\1/p')
prof_to=$(echo "$steps_line" | sed -n 's/.* steps \([0-9]*\) to \([0-9]*\)$/\2/p')
prof_n=0
[ -n "$prof_from" ] && [ -n "$prof_to" ] && prof_n=$(( prof_to - prof_from + 1 ))
if [ -s "$work/datapath_trace.json" ] &&
   run trace_summary "$python" "$here/trace_summary.py" "$work/datapath_trace.json" --steps "$prof_n"; then
  where="eager data path, optimizer steps ${prof_from:-?}-${prof_to:-?} ($prof_n; host waits $([ $prof_n -gt 0 ] && echo per step || echo in all: the count was not logged)), $(sv trace_summary span_ms) ms"
  if [ "$(sv trace_summary device_events)" = 0 ] && [ $dry -eq 1 ]; then
    record datapath_profile INFO "no device activity" - - - "$where (a CPU run: nothing on a GPU to measure)"
  elif [ "$(sv trace_summary device_events)" = 0 ]; then
    record datapath_profile SKIP - - - - "$where: the trace holds no device activity (CUPTI, in the wheel's nvidia libraries, not loaded?)"
  else
    record datapath_profile INFO "GPU busy $(sv trace_summary gpu_busy_pct) %" - - - \
      "$where; kernels $(sv trace_summary kernel_busy_pct) %, copies $(sv trace_summary copy_ms) ms; host waits $(sv trace_summary host_sync_ms) ($(sv trace_summary host_sync_calls)); top kernels: $(sv trace_summary top_kernels)"
  fi
elif [ -n "${step_stop[datapath]:-}" ] || [ -n "${step_stop[trace_summary]:-}" ]; then
  bad datapath_profile - - datapath trace_summary
else
  record datapath_profile SKIP - - - - "no profile of the data path (see the log: AVIARY_PROFILE)"
fi
# The same with train.cuda_graph (one rank: no reducer; eager again in the dry run). There is no
# graphed waveform-input step (train_step_bench graphs the mel-input step only), so the goal
# here is harder than the eager row's: the whole graphed data path (loader, copy, augmentation
# and front end included) against the graphed model step alone, median round.
dpg_cmd=("$bin/aviary-worker" train --config "$work/b0.yaml" --stage finetune --fold 0 --device "$dev" --out "$work/run_b0_graph")
[ ${#mpirun_cmd[@]} -gt 0 ] && dpg_cmd=("${mpirun_cmd[@]}" "${dpg_cmd[@]}" --set "comm.backend=$backend")
if run datapath_graph "${dpg_cmd[@]}" "${graph_set[@]}" &&
   { [ $dry -eq 1 ] || grep -q "train.cuda_graph: the model step captured" "$work/datapath_graph.out"; }; then
  dg=$(epochs_rate "$work/run_b0_graph/history.csv")
  what="$graph_what: aviary-worker train's epochs after the first, median (loader + copy + augmentation + front end + graphed model)"
  also="vs the eager waveform-input step (median) $(ratio "$dg" "${w_med:-0}")x, vs the eager data path $(ratio "$dg" "${d:-0}")x"
  if [ -n "$g_med" ]; then
    record datapath_graph "$(verdict "$(ratio "$dg" "$g_med")" 0.9)" "$dg samples/s" "$g_med samples/s" "$(ratio "$dg" "$g_med")" \
      ">= 0.9x the model step alone" "$what vs the graphed model step alone (mel input, no loader/front end; median round): not like for like; $also"
  else
    record datapath_graph INFO "$dg samples/s" - - ">= 0.9x the model step alone" \
      "$what; no graphed model step to compare with: $(why_no_ref step_graph); $also"
  fi
else
  bad datapath_graph ">= 0.9x the model step alone" "aviary-worker train (EfficientNet-B0, $graph_what) failed or did not capture (see the log)" datapath_graph
fi

# The host's wait for the loader in the data path's last epoch (the trainer's epoch log line).
wait_share() { grep -o "waited [0-9.]* s for the loader's batches of [0-9.]* s ([0-9.]*%)" "$work/$1.out" 2>/dev/null |
  tail -1 | sed -n 's/.*(\([0-9.]*\)%)/\1/p'; }
we=$(wait_share datapath); wg=$(wait_share datapath_graph)
if [ -n "$we" ] || [ -n "$wg" ]; then
  record datapath_loader_wait INFO "${we:-?} % eager, ${wg:-?} % graph" - - - \
    "the last epoch's time the training thread waited for a ready batch"
elif [ -n "${step_stop[datapath]:-}" ] || [ -n "${step_stop[datapath_graph]:-}" ]; then
  bad datapath_loader_wait - - datapath datapath_graph
else
  record datapath_loader_wait SKIP - - - - "no data-path run logged its loader wait"
fi

# The loader alone on this host (the cache, the decode threads, pinned batches; no GPU step):
# how fast the data path can be fed, against the waveform-input step it would feed.
say "7b. the loader alone"
if run loader env AVIARY_LOADER_BENCH_ONLY=1 "$benchbin/loader_bench" "$work/b0.yaml" "$([ $dry -eq 1 ] && echo 4 || echo 60)"; then
  l=$(sed -n 's/^loader alone: *\([0-9.e+]*\) samples\/s.*/\1/p' "$work/loader.out" | tail -1)
  what="the loader alone: $threads threads, batch $batch_b0 of ${clip_s} s clips, after 5 untimed batches"
  if [ -z "$l" ]; then
    record loader FAIL - - - - "loader_bench printed no rate (see the log)"
  elif [ -n "$w_med" ]; then
    record loader INFO "$l samples/s" "$w_med samples/s" "$(ratio "$l" "$w_med")" - \
      "$what; vs the waveform-input step's median round (what it must feed)"
  else
    record loader INFO "$l samples/s" - - - "$what; no waveform-input step to compare with: $(why_no_ref wave_aviary)"
  fi
else
  bad loader - "loader_bench failed (see the log)" loader
fi
else
  not_selected datapath datapath allreduce_share datapath_profile datapath_graph datapath_loader_wait loader
fi

# 8. NCCL all-reduce. One rank: NCCL's in-place all-reduce launches nothing, so this is the
# call's host overhead (event, wait), not bandwidth; bandwidth needs two or more GPUs.
if want allreduce; then
say "8. allreduce-bench"
if [ ${#mpirun_cmd[@]} -eq 0 ]; then
  record allreduce SKIP - - - - "no mpirun on this host"
elif run allreduce "${mpirun_cmd[@]}" "$bin/aviary-worker" allreduce-bench --device "$dev" \
     --backend "$backend" --min-bytes 1048576 --max-bytes "$([ $dry -eq 1 ] && echo 4194304 || echo 268435456)"; then
  cp "$work/allreduce.out" "$out/allreduce.txt"
  # The row nearest EfficientNet-B0's gradients (about 16 MB in float32), else the largest.
  row=$(awk '$1 ~ /^[0-9]+$/ {last=$0; if ($1 >= 16777216 && !found) {pick=$0; found=1}} END {print (found ? pick : last)}' "$work/allreduce.out")
  record allreduce INFO "$(echo "$row" | awk '{print $4 " us for " $1 " B, busbw " $6 " GB/s"}')" - - - "1 rank, $backend (one rank: no transfer, the call's overhead)"
else
  bad allreduce - "aviary-worker allreduce-bench failed (see the log)" allreduce
fi
else
  not_selected allreduce allreduce
fi

# 9. The 8-GPU projection, optimistic: each of 8 ranks takes the measured one-rank data-path step
# (its loader, host syncs and the reducer's own time included, which 8 ranks pay too; no
# stragglers, no ranks sharing the host's cores) plus a ring all-reduce of the gradients modelled
# at an assumed NVLink bus bandwidth (one GPU measures no transfer), without and with full
# overlap; never more than 8 x the one-rank rate.
if want datapath; then
say "9. 8-GPU projection"
if [ -n "$d" ]; then
  run projection "$python" - "$d" "$batch_b0" "${AVIARY_PROJECTION_BUSBW_GBPS:-350}" <<'PY'
import sys
import torchvision
rate, batch, busbw = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
params = sum(p.numel() for p in torchvision.models.efficientnet_b0(num_classes=182).parameters())
n = 8
step = batch / rate  # the measured one-rank step: each rank's compute
comm = 2 * (n - 1) / n * params * 4 / (busbw * 1e9)
no_overlap = min(n * batch / (step + comm), n * rate)
full_overlap = min(n * batch / max(step, comm), n * rate)
print(f"params={params} step1_s={step:.4f} comm8_s={comm:.5f} "
      f"samples_per_s_8gpu_no_overlap={no_overlap:.0f} samples_per_s_8gpu_full_overlap={full_overlap:.0f} "
      f"scaling_no_overlap={no_overlap / rate / n:.3f}")
PY
  projected=$?
  p=$(sed -n 's/.*samples_per_s_8gpu_no_overlap=\([0-9]*\).*/\1/p' "$work/projection.out")
  f=$(sed -n 's/.*samples_per_s_8gpu_full_overlap=\([0-9]*\).*/\1/p' "$work/projection.out")
  if [ $projected -ne 0 ] || [ -z "$p" ]; then
    bad projection_8gpu - "the projection's python failed (exit $projected; see the log)" projection
  else
    record projection_8gpu INFO "at most $p-$f samples/s" "$d x 8" "$(sed -n 's/.*scaling_no_overlap=\([0-9.]*\).*/\1/p' "$work/projection.out")" - \
      "a model, no overlap to full overlap: the one-rank data-path step on each rank + a ring all-reduce (busbw ${AVIARY_PROJECTION_BUSBW_GBPS:-350} GB/s assumed; $(sed -n 's/.*\(comm8_s=[0-9.]*\).*/\1/p' "$work/projection.out")); ratio: no overlap vs 8 x one rank"
  fi
elif [ -n "${step_stop[datapath]:-}" ]; then
  bad projection_8gpu - - datapath
else
  record projection_8gpu SKIP - - - - "no data-path rate"
fi
else
  not_selected datapath projection_8gpu
fi

# 10. torch.compile last: its compile takes minutes, and the budget may stop it. Not started
# with under 150 s of the budget left (it compiled for 99 s on an H200): STOPPED, not measured.
if want speed; then
say "10. torch.compile"
compile_left=$(( budget - ($(date +%s) - t_start) ))
if [ $compile -eq 0 ]; then
  record step_vs_compile SKIP - - - - "--skip-compile"
elif [ $dry -eq 0 ] && { [ $compile_left -lt 150 ] || [ $step_timeout -lt 150 ]; }; then
  # The step would be cut short by the budget left or by --step-timeout, whichever is shorter.
  step_done step_compile 124 0 0 "not started: ${compile_left} s of the ${budget} s --budget left, --step-timeout ${step_timeout} s; its compile needs 150 s"
  record step_vs_compile STOPPED - - - ">= 1.0x" \
    "stopped: budget/timeout (not started: ${compile_left} s of the --budget left, --step-timeout ${step_timeout} s; the compile takes about 100-120 s); not measured"
else
  run step_compile "$python" "$repo/bench/train_step_reference.py" "${step_args[@]}" --input mel --compile \
    --compile-backend $compile_backend --warmup $(( warmup + 2 ))
  rc=$?
  c=$(kv step_compile reference_samples_per_s)
  if [ $rc -ne 0 ]; then
    bad step_vs_compile ">= 1.0x" "torch.compile reference failed (see the log)" step_compile
  elif [ -n "$a" ] && [ -n "$c" ]; then
    record step_vs_compile "$(verdict "$(ratio "$a" "$c")" 1.0)" "$a samples/s" "$c samples/s" \
      "$(ratio "$a" "$c")" ">= 1.0x" "torch.compile ($compile_backend), warm-up $(kv step_compile warmup_s) s${g:+; the CUDA graph step $(ratio "$g" "$c")x}"
  else
    bad step_vs_compile ">= 1.0x" "no rate to compare (aviary '${a}', torch.compile '${c}'): see the log" step_aviary step_compile
  fi
fi
else
  not_selected speed step_vs_compile
fi

used=$(( $(date +%s) - t_start ))
stopped=$(awk -F'\t' 'NR > 1 && $2 == "STOPPED" {printf "%s%s", sep, $1; sep=", "}' "$results")
say "done in $used s of the ${budget} s budget${stopped:+; STOPPED (not measured): $stopped}"
echo
echo "steps (wall seconds; OUT/steps.tsv):" | tee -a "$log"
table "$steps_tsv" | tee -a "$log"
echo
table "$results" | tee -a "$log"
exit $failed
