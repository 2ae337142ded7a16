# Shared by the integration scripts (sourced, after `set -uo pipefail`): a scratch folder
# removed at exit, pass/fail counters, an exit-code-2 expectation, and the small-CNN recipe
# (a synthetic 2024-layout corpus and a config that trains it in about a minute on 2 cores).

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
passes=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
ok() { passes=$((passes + 1)); }

# expect "substring" command...: the command must exit with 2 and say the substring.
expect() {
  local want=$1; shift
  local out rc
  out=$("$@" 2>&1); rc=$?
  if [ $rc -ne 2 ] || ! grep -qF -- "$want" <<<"$out"; then
    fail "$* -> rc=$rc, wanted '$want' in:"; echo "$out" | sed 's/^/    /'
  else
    ok
  fi
}

# loopback_coordinator_config: a coordinator's config at $tmp/c.yaml on loopback ports (0: the
# system picks; --port-file says which), its database and runs/ under $tmp, data under $tmp, and
# fresh random tokens in $tmp/c.token (client) and $tmp/c.wtoken (worker).
loopback_coordinator_config() {
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$tmp/c.token"
  echo "worker-$(cat "$tmp/c.token")" > "$tmp/c.wtoken"
  cat > "$tmp/c.yaml" <<YAML
listen: 127.0.0.1:0
metrics_listen: 127.0.0.1:0
database: $tmp/c.db
work_dir: $tmp/runs
data_roots: ["$tmp"]
token_file: $tmp/c.token
worker_token_file: $tmp/c.wtoken
YAML
}

# finetune_job_config CORPUS: a job's config at $tmp/w.yaml, fine-tuning only, 3 folds, over the
# 2024-layout corpus at CORPUS (cache under $tmp).
finetune_job_config() {
  cat > "$tmp/w.yaml" <<YAML
data:
  target: {layout: "2024", root: $1}
  pretrain_sources: []
  cache_dir: $tmp/cache
stages: {pretrain: {enabled: false}}
folds: {finetune_splits: 3}
YAML
}

# small_cnn_recipe BIN_DIR [SPECIES RECORDINGS SEED MAX_SECONDS EPOCHS NUM_WORKERS [EXTRA_YAML]]
# Writes the corpus to $tmp/t24 and the config to $tmp/p.yaml (cache at $tmp/cache).
small_cnn_recipe() {
  local bin=$1 species=${2:-12} recordings=${3:-240} seed=${4:-3} max_seconds=${5:-12}
  local epochs=${6:-12} workers=${7:-2} extra=${8:-}
  "$bin/aviary" synth --out "$tmp/t24" --layout 2024 --species "$species" --recordings "$recordings" \
    --seed "$seed" --max-seconds "$max_seconds" >/dev/null || fail "synth"
  cat > "$tmp/p.yaml" <<YAML
seed: 42
data:
  duration: 5.0
  target: {layout: "2024", root: $tmp/t24}
  pretrain_sources: []
  cache_dir: $tmp/cache
folds: {finetune_splits: 4}
sampling: {upsample_thr: 10}
model: {name: small_cnn, dropout: 0.1}
train: {batch_size: 16, epochs: $epochs, num_workers: $workers, lr_max_per_sample: 1.0e-4, lr_ramp_epochs: 1}
stages: {pretrain: {enabled: false}}
$extra
YAML
}
