#!/usr/bin/env bash
# The aviary demo on a fresh Debian 12 machine: installs what is missing, builds, writes a
# synthetic BirdCLEF-style corpus (a 2024 target and 2021/2022/2023/Xeno-Canto pretraining
# sources, real ogg and mp3 files), shows the dataset pipeline of configs/demo.yaml (summary +
# distribution plot, stratified folds, training lists) and decodes the corpus into the cache.
#
# Then it runs the service: a coordinator (aviary-coordinator, SQLite in runs/demo/aviary.db, a
# fresh client token and a worker-group token), one 2-rank worker group (`mpirun -np 2 aviary-worker serve`), and the
# client: `aviary submit configs/demo.yaml` (pretraining of the small CNN on the pool, then
# fine-tuning on the target from its best checkpoint), `aviary watch` (live progress, then a
# table of the final metrics), `aviary history --plot`. Finally it scores the fine-tuned model
# on synthetic soundscapes with known calls (`aviary predict`, `aviary score`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
aviary_install_packages "${AVIARY_BUILD_PACKAGES[@]}" python3 curl
aviary_configure
aviary_build_targets aviary aviary-worker aviary-coordinator
aviary=${AVIARY_BUILD_DIR:-build}/bin/aviary
worker=${AVIARY_BUILD_DIR:-build}/bin/aviary-worker
coordinator=${AVIARY_BUILD_DIR:-build}/bin/aviary-coordinator
data=data/demo
out=runs/demo
mkdir -p "$out"

step() { printf '\n==> %s\n' "$*"; }

step "Synthetic corpus in $data (same seed for every source, so they share some recordings)"
"$aviary" synth --out $data/birdclef-2024 --layout 2024 --species 12 --recordings 180 --seed 1 --max-seconds 20
"$aviary" synth --out $data/birdclef-2021 --layout 2021 --species 20 --recordings 200 --seed 1 --max-seconds 20
"$aviary" synth --out $data/birdclef-2022 --layout 2022 --species 16 --recordings 160 --seed 1 --max-seconds 20
"$aviary" synth --out $data/birdclef-2023 --layout 2023 --species 14 --recordings 140 --seed 1 --max-seconds 20
"$aviary" synth --out $data/xeno-canto-extended --layout xc --species 24 --recordings 240 --seed 1 --max-seconds 20

step "Dataset summary (configs/demo.yaml)"
"$aviary" dataset summary --config configs/demo.yaml --plot $out/dataset_summary.png

step "Stratified folds and training lists"
"$aviary" dataset folds --config configs/demo.yaml --stage pretrain --out $out/folds_pretrain.csv
"$aviary" dataset folds --config configs/demo.yaml --stage finetune --out $out/folds_finetune.csv
"$aviary" dataset train-list --config configs/demo.yaml --stage pretrain --fold 0 --out $out/train_pretrain_fold0.csv
"$aviary" dataset train-list --config configs/demo.yaml --stage finetune --fold 0 --out $out/train_finetune_fold0.csv
echo
echo "first rows of $out/folds_finetune.csv:"
head -n 4 $out/folds_finetune.csv

step "Decode every file once into the cache (data.cache_dir)"
"$aviary" prepare --config configs/demo.yaml

step "Start the service: a coordinator and a 2-rank worker group"
# mpirun refuses root unless told; two ranks on two cores need --oversubscribe.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
rm -rf $out/runs $out/aviary.db* $out/*.port $out/*.log
# One token for the client, another for the worker group (a client token cannot act as a group).
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > $out/token
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > $out/worker.token
chmod 600 $out/token $out/worker.token
pids=()
stop_service() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_service EXIT
# wait_started WHAT PID LOG SECONDS FILE...: waits until every FILE is non-empty while PID runs;
# otherwise prints LOG and says which file WHAT did not write, and the demo ends (exit 1).
wait_started() {
  local what=$1 pid=$2 log=$3 seconds=$4 f
  shift 4
  local deadline=$((SECONDS + seconds))
  for f in "$@"; do
    until [ -s "$f" ]; do
      if ! kill -0 "$pid" 2>/dev/null; then
        cat "$log"; echo "$what exited before writing $f (its log is above: $log)"; exit 1
      fi
      if [ $SECONDS -ge $deadline ]; then
        cat "$log"; echo "$what did not write $f within $seconds s (its log is above: $log)"; exit 1
      fi
      sleep 0.2
    done
  done
  if ! kill -0 "$pid" 2>/dev/null; then
    cat "$log"; echo "$what exited right after writing $* (its log is above: $log)"; exit 1
  fi
}
"$coordinator" --config configs/coordinator.yaml --listen 127.0.0.1:0 --port-file $out/coordinator.port \
  --metrics-listen 127.0.0.1:0 --metrics-port-file $out/metrics.port --database $out/aviary.db \
  --work-dir $out/runs --token-file $out/token --worker-token-file $out/worker.token \
  --set data_roots="$PWD/data" > $out/coordinator.log 2>&1 &
pids+=($!)
wait_started "the coordinator" $! $out/coordinator.log 30 $out/coordinator.port $out/metrics.port
export AVIARY_COORDINATOR=127.0.0.1:$(cat $out/coordinator.port) AVIARY_TOKEN_FILE=$out/token
echo "coordinator on $AVIARY_COORDINATOR (log $out/coordinator.log), Prometheus metrics on" \
  "http://127.0.0.1:$(cat $out/metrics.port)/metrics"
mpirun -np 2 --oversubscribe "$worker" serve --coordinator "$AVIARY_COORDINATOR" --token-file $out/worker.token \
  --metrics-listen 127.0.0.1:0 --metrics-port-file $out/group.port > $out/group.log 2>&1 &
pids+=($!)
# Rank 0 writes group.port once its /metrics listens; mpirun exits when a rank dies at start
# (a missing library, a bad flag): the demo then stops here, not in `aviary watch`.
wait_started "the worker group (mpirun)" $! $out/group.log 120 $out/group.port
echo "worker group: 2 ranks (log $out/group.log), its metrics on http://127.0.0.1:$(cat $out/group.port)/metrics"

step "Submit configs/demo.yaml: pretrain on the pool (fold 0), then fine-tune on the target (fold 0)"
job=$("$aviary" submit configs/demo.yaml --name demo | tail -n 1)
echo "job $job"

step "Watch it (live progress per task; the final metrics at the end)"
"$aviary" watch "$job"

step "Final state and metrics"
"$aviary" status "$job"
"$aviary" history "$job" --plot $out/history.png
curl -sf "http://127.0.0.1:$(cat $out/metrics.port)/metrics" 2>/dev/null | grep -E "^aviary_(val_auc|val_roc_auc|jobs)" || true
best=$("$aviary" status "$job" --json | python3 -c '
import json, sys
j = json.load(sys.stdin)
print([t for t in j["tasks"] if t["stage"] == "finetune"][0]["best_checkpoint"])')

step "Inference: synthetic soundscapes with known calls -> BirdCLEF submission -> score"
"$aviary" synth-soundscapes --out $data/soundscapes --species 12 --count 3 --seconds 60 --seed 2
"$aviary" predict --checkpoint "$best" --audio $data/soundscapes/soundscapes \
  --out $out/submission.csv
"$aviary" score --solution $data/soundscapes/solution.csv --submission $out/submission.csv

step "Done"
echo "outputs in $out: dataset_summary.png, folds_*.csv, train_*_fold0.csv, runs/$job/ (one run"
echo "folder per task: history.csv, best.pt, last.pt, history.png), history.png, submission.csv,"
echo "aviary.db (the coordinator's state), coordinator.log, group.log"
