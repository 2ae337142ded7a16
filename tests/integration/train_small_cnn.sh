#!/usr/bin/env bash
# Issue 4's acceptance run on CPU: `aviary synth` writes a 12-species 2024-layout corpus (real
# ogg files, broken ones included), `aviary prepare` decodes it into the cache, and
# `aviary-worker train` trains the small CNN; its validation macro ROC-AUC must reach 0.9, and
# the run folder must hold what DESIGN.md promises. Then the refusals of bad input.
# With SHARE, the run folder and its config are copied there when every check of the training
# passed (ctest's fixture small_cnn_run: predict_soundscape.sh predicts with that model).
# usage: train_small_cnn.sh BIN_DIR [SHARE]
set -uo pipefail
bin=$1
share=${2:-}
source "$(dirname "$0")/lib.sh"
[ -z "$share" ] || rm -rf "$share"

small_cnn_recipe "$bin"
"$bin/aviary" prepare --config "$tmp/p.yaml" > "$tmp/prepare.log" 2>&1 || { cat "$tmp/prepare.log"; fail "prepare"; }
if "$bin/aviary-worker" train --config "$tmp/p.yaml" --stage finetune --fold 0 --out "$tmp/run" --threads 2 > "$tmp/train.log" 2>&1; then
  for f in history.csv best.pt last.pt config.yaml history.png; do
    [ -s "$tmp/run/$f" ] || fail "run folder lacks $f"
  done
  /usr/bin/python3 - "$tmp/run/history.csv" <<'PY' || fails=$((fails + 1))
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
want = "epoch,step,lr,train_loss,train_acc,val_loss,val_auc,val_roc_auc,val_cmap,val_acc,samples_per_s".split(",")
assert list(rows[0].keys()) == want, f"history.csv columns {list(rows[0].keys())}"
assert len(rows) == 12, f"{len(rows)} epochs"
best = max(float(r["val_roc_auc"]) for r in rows)
print(f"best validation macro ROC-AUC {best:.4f} (epochs: {', '.join(r['val_roc_auc'][:6] for r in rows)})")
if best < 0.9:
    sys.exit(f"FAIL: validation macro ROC-AUC reached only {best:.4f} < 0.9")
PY
  grep -q "decoded-audio cache" "$tmp/train.log" || fail "training did not read the prepared cache"
  # Reported with the first broken clip's message, which names its file.
  grep -qE "skipped as truncated \(substituted\); the first: [^ ]+\.(ogg|mp3|wav): " "$tmp/train.log" ||
    { grep "skipped as" "$tmp/train.log"; fail "broken clips were not reported with a file"; }
  # The loader's share of each epoch (what the GPU acceptance reports for the real data path).
  [ "$(grep -cE "epoch [0-9]+: waited [0-9.]+ s for the loader's batches of [0-9.]+ s \([0-9.]+%\)" "$tmp/train.log")" = 12 ] ||
    { grep "waited" "$tmp/train.log"; fail "no loader-wait line for each of the 12 epochs"; }
  if [ -n "$share" ] && [ $fails -eq 0 ]; then
    mkdir -p "$share" && cp -r "$tmp/run" "$share/run" && cp "$tmp/p.yaml" "$share/p.yaml" || fail "copy the run to $share"
  fi
else
  cat "$tmp/train.log"; fail "train"
fi

w="$bin/aviary-worker"
expect "--fold is required" "$w" train --config "$tmp/p.yaml" --stage finetune --out "$tmp/r2"
expect "--stage: expected one of pretrain, finetune, got 'warmup'" "$w" train --config "$tmp/p.yaml" --stage warmup --fold 0 --out "$tmp/r2"
expect "fold 9 is out of range" "$w" train --config "$tmp/p.yaml" --stage finetune --fold 9 --out "$tmp/r2"
expect "key 'train.loss': expected CCE while model.final_act is softmax" "$w" train --config "$tmp/p.yaml" --set train.loss=BCE --stage finetune --fold 0 --out "$tmp/r2"
expect "--device: expected one of auto, cpu, cuda, got 'tpu'" "$w" train --config "$tmp/p.yaml" --stage finetune --fold 0 --out "$tmp/r2" --device tpu
expect "model.name" "$w" train --config "$tmp/p.yaml" --set model.name=resnet --stage finetune --fold 0 --out "$tmp/r2"
# The profiling switch (AVIARY_PROFILE, diagnostics) is checked before any work.
expect "AVIARY_PROFILE='out=$tmp/t.json,steps=0': 'steps=0' is not out=FILE, skip=K (0 <= K <= 1e9) or steps=N (1 <= N <= 1e9)" \
  env AVIARY_PROFILE="out=$tmp/t.json,steps=0" "$w" train --config "$tmp/p.yaml" --stage finetune --fold 0 --out "$tmp/r2"
expect "AVIARY_PROFILE='skip=3': needs out=FILE" \
  env AVIARY_PROFILE="skip=3" "$w" train --config "$tmp/p.yaml" --stage finetune --fold 0 --out "$tmp/r2"
expect "belongs to stage finetune fold 0, not stage finetune fold 1" "$w" train --config "$tmp/p.yaml" --stage finetune --fold 1 --out "$tmp/run"
expect "no such checkpoint" "$w" train --config "$tmp/p.yaml" --stage finetune --fold 0 --out "$tmp/r3" --init "$tmp/none.pt"
expect "--coordinator: expected HOST:PORT, got 'localhost'" "$w" serve --coordinator localhost
# Multi-rank training is tested by train_distributed.sh (mpirun -np 2).

echo "train_small_cnn: $passes passed, $fails failed"
[ $fails -eq 0 ]
