#!/usr/bin/env bash
# Issue 8's acceptance run on CPU: train the small CNN on a 12-species synthetic corpus (the
# recipe of train_small_cnn.sh), synthesise soundscapes of known calls at known 5 s windows
# (`aviary synth-soundscapes`), predict them with `aviary predict` and score the submission
# against the truth with `aviary score`: macro ROC-AUC must be well above chance (>= 0.75), and
# the CSV must be in BirdCLEF's format. Then ensembles, TTA, smoothing and the refusals of bad
# input (undecodable files skipped with a summary; a non-checkpoint; ensembles of different
# label sets).
# SHARE: train_small_cnn.sh's run of the same recipe (ctest's fixture small_cnn_run), used instead
# of training again; without it (or when it holds no run) this script trains.
# usage: predict_soundscape.sh BIN_DIR [SHARE]
set -uo pipefail
bin=$1
share=${2:-}
source "$(dirname "$0")/lib.sh"

if [ -n "$share" ] && [ -s "$share/run/best.pt" ] && [ -s "$share/p.yaml" ]; then
  echo "the model of $share/run (integration.train_small_cnn's run)"
  cp -r "$share/run" "$tmp/run" && cp "$share/p.yaml" "$tmp/p.yaml" || fail "copy $share"
else
  small_cnn_recipe "$bin"
  "$bin/aviary" prepare --config "$tmp/p.yaml" > "$tmp/prepare.log" 2>&1 || { cat "$tmp/prepare.log"; fail "prepare"; }
  "$bin/aviary-worker" train --config "$tmp/p.yaml" --stage finetune --fold 0 --out "$tmp/run" --threads 2 > "$tmp/train.log" 2>&1 || { cat "$tmp/train.log"; fail "train"; }
fi

# 4 soundscapes of 92.5 s: 19 rows each, the last window padded.
"$bin/aviary" synth-soundscapes --out "$tmp/sc" --species 12 --count 4 --seconds 92.5 --seed 11 > "$tmp/sc.log" 2>&1 || { cat "$tmp/sc.log"; fail "synth-soundscapes"; }
cat "$tmp/sc.log"

if "$bin/aviary" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/sc/soundscapes" --out "$tmp/sub.csv" --threads 2 > "$tmp/predict.log" 2>&1; then
  ok
  cat "$tmp/predict.log"
  score=$("$bin/aviary" score --solution "$tmp/sc/solution.csv" --submission "$tmp/sub.csv" --json) || fail "score: $score"
  echo "score: $score"
  /usr/bin/python3 - "$tmp/sc/solution.csv" "$tmp/sub.csv" "$score" 19 <<'PY' && ok || fails=$((fails + 1))
import csv, json, math, sys
sol = list(csv.reader(open(sys.argv[1])))
sub = list(csv.reader(open(sys.argv[2])))
score = json.loads(sys.argv[3])
rows_per_file = int(sys.argv[4])
assert sub[0][0] == "row_id", sub[0][:3]
assert sub[0] == sol[0], f"header {sub[0]} != solution header {sol[0]}"
assert sub[0][1:] == sorted(sub[0][1:]), "class columns are not in label order"
assert [r[0] for r in sub[1:]] == [r[0] for r in sol[1:]], "row ids differ from the truth's"
stems = {}
for r in sub[1:]:
    stem, end = r[0].rsplit("_", 1)
    stems.setdefault(stem, []).append(int(end))
for stem, ends in stems.items():
    assert ends == [5 * (i + 1) for i in range(rows_per_file)], f"{stem}: ends {ends}"
for r in sub[1:]:
    p = [float(x) for x in r[1:]]
    assert all(0.0 <= x <= 1.0 for x in p), r
    assert abs(sum(p) - 1.0) < 1e-4, f"softmax row {r[0]} sums to {sum(p)}"
auc = score["macro_roc_auc"]
print(f"{len(stems)} files x {rows_per_file} rows; macro ROC-AUC {auc:.4f} over {score['scored_classes']} classes, cmAP {score['padded_cmap']:.4f}")
if auc is None or auc < 0.75:
    sys.exit(f"FAIL: macro ROC-AUC {auc} < 0.75")
PY
else
  cat "$tmp/predict.log"; fail "predict"
fi

# Ensemble (best + last), TTA and smoothing on one file given directly.
one=$(ls "$tmp/sc/soundscapes" | head -1)
if "$bin/aviary" predict --checkpoint "$tmp/run/best.pt" --checkpoint "$tmp/run/last.pt" --audio "$tmp/sc/soundscapes/$one" \
     --out "$tmp/ens.csv" --tta 3 --smooth 0.25,0.5,0.25 --batch 7 --threads 2 > "$tmp/ens.log" 2>&1; then
  grep -q "tta 3, smoothing 0.25,0.5,0.25" "$tmp/ens.log" || fail "ensemble run did not report its settings: $(cat "$tmp/ens.log")"
  # Epochs are numbered from 0 everywhere (README, "Training"): each checkpoint's line names the
  # epoch of history.csv it was written after (last.pt: the last row; best.pt: the best one).
  last_epoch=$(tail -n 1 "$tmp/run/history.csv" | cut -d, -f1)
  grep -qF "last.pt: small_cnn, stage finetune fold 0, after epoch $last_epoch," "$tmp/ens.log" && ok ||
    fail "predict does not name last.pt's epoch $last_epoch (history.csv's numbering): $(grep -F last.pt: "$tmp/ens.log")"
  /usr/bin/python3 - "$tmp/ens.csv" <<'PY' && ok || fails=$((fails + 1))
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
assert len(rows) == 1 + 19, len(rows)
for r in rows[1:]:
    s = sum(float(x) for x in r[1:])
    assert abs(s - 1.0) < 1e-4, (r[0], s)
PY
else
  cat "$tmp/ens.log"; fail "ensemble predict"
fi

# A checkpoint written on a GPU (its storages tagged cuda:0, as torch saves CUDA tensors) is
# read on a machine without one, onto the CPU: the same submission as from best.pt.
/usr/bin/python3 - "$tmp/run/best.pt" "$tmp/gpu_best.pt" <<'PY' || fail "could not retag best.pt as a CUDA checkpoint"
import sys, zipfile
src, dst = zipfile.ZipFile(sys.argv[1]), zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_STORED)
for info in src.infolist():
    data = src.read(info.filename)
    if info.filename.endswith("/data.pkl"):
        cpu = b"X\x03\x00\x00\x00cpu"  # pickle BINUNICODE 'cpu', memoized for every storage
        assert data.count(cpu) == 1, data.count(cpu)
        data = data.replace(cpu, b"X\x06\x00\x00\x00cuda:0")
    dst.writestr(info.filename, data)
dst.close()
PY
if "$bin/aviary" predict --checkpoint "$tmp/gpu_best.pt" --audio "$tmp/sc/soundscapes/$one" --out "$tmp/gpu_ckpt.csv" \
     --device cpu --threads 2 > "$tmp/gpu_ckpt.log" 2>&1 &&
   "$bin/aviary" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/sc/soundscapes/$one" --out "$tmp/cpu_ckpt.csv" \
     --device cpu --threads 2 > "$tmp/cpu_ckpt.log" 2>&1; then
  cmp -s "$tmp/gpu_ckpt.csv" "$tmp/cpu_ckpt.csv" && ok || fail "a GPU-written checkpoint predicts differently on the CPU"
else
  cat "$tmp/gpu_ckpt.log"; fail "predict from a GPU-written checkpoint on the CPU"
fi

# Undecodable files are reported and skipped; the others are predicted.
mkdir -p "$tmp/mixed"
cp "$tmp/sc/soundscapes/$one" "$tmp/mixed/"
: > "$tmp/mixed/empty.ogg"
# Notes beside a recording, under its stem: not audio by its name, so not refused as a second
# file of that stem; tried and skipped.
echo "not audio" > "$tmp/mixed/${one%.*}.txt"
if "$bin/aviary" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/mixed" --out "$tmp/mixed.csv" --threads 2 > "$tmp/mixed.log" 2>&1; then
  if grep -q "skipped 2 file(s) (no rows): 1 empty 1 not_audio" "$tmp/mixed.log" &&
     grep -q "19 rows from 1 of 3 file(s)" "$tmp/mixed.log" && [ "$(wc -l < "$tmp/mixed.csv")" -eq 20 ]; then
    ok
  else
    fail "bad files not reported as expected: $(cat "$tmp/mixed.log")"
  fi
else
  fail "predict over a folder with bad files failed: $(cat "$tmp/mixed.log")"
fi

a="$bin/aviary"
expect "not an aviary checkpoint" "$a" predict --checkpoint "$tmp/p.yaml" --audio "$tmp/mixed" --out "$tmp/x.csv"
expect "no such checkpoint" "$a" predict --checkpoint "$tmp/none.pt" --audio "$tmp/mixed" --out "$tmp/x.csv"
expect "--checkpoint is required" "$a" predict --audio "$tmp/mixed" --out "$tmp/x.csv"
expect "no such file or directory" "$a" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/nowhere" --out "$tmp/x.csv"
expect "smooth: expected an odd number of weights" "$a" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/mixed" --out "$tmp/x.csv" --smooth 1,1
expect "--device: expected one of auto, cpu, cuda, got 'tpu'" "$a" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/mixed" --out "$tmp/x.csv" --device tpu
mkdir -p "$tmp/bad"; : > "$tmp/bad/a.ogg"
expect "no file could be predicted" "$a" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/bad" --out "$tmp/x.csv"
expect "--smooth: expected comma-separated weights" "$a" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/mixed" --out "$tmp/x.csv" --smooth ""
# Outputs refused before any work: a folder (the rename would fail after the whole run), the
# checkpoint or an audio file itself.
expect "--out $tmp/bad: is a directory" "$a" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/mixed" --out "$tmp/bad"
cp "$tmp/run/best.pt" "$tmp/copy.pt"
expect "is the checkpoint $tmp/copy.pt itself" "$a" predict --checkpoint "$tmp/copy.pt" --audio "$tmp/mixed" --out "$tmp/copy.pt"
expect "--out $tmp/mixed/$one: in the --audio folder $tmp/mixed with an audio file's name" "$a" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/mixed" --out "$tmp/mixed/$one"
expect "is the audio file $tmp/mixed/$one itself" "$a" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/mixed/$one" --out "$tmp/mixed/$one"
cmp -s "$tmp/run/best.pt" "$tmp/copy.pt" && cmp -s "$tmp/sc/soundscapes/$one" "$tmp/mixed/$one" || fail "a refused --out was written"
ls "$tmp/bad" "$tmp/mixed" | grep -q "\.tmp\." && fail "a refused run left a temporary file"
# A CSV written into the --audio folder is not an input of the next run there.
for run in 1 2; do
  "$a" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/mixed" --out "$tmp/mixed/sub.csv" --threads 2 > "$tmp/inside.log" 2>&1 &&
    grep -q "19 rows from 1 of 3 file(s)" "$tmp/inside.log" && ok || fail "run $run with --out in the --audio folder: $(cat "$tmp/inside.log")"
done

# A write that fails in the middle (a full disk; here the file size limit, EFBIG): the run stops
# at that file, says so, and keeps the whole files' rows written before it as --out.partial.
(trap '' XFSZ; ulimit -f 6; exec "$a" predict --checkpoint "$tmp/run/best.pt" --audio "$tmp/sc/soundscapes" \
  --out "$tmp/full.csv" --threads 2) 2>&1 | cat > "$tmp/full.log"  # the log outside the limit
rc=${PIPESTATUS[0]}
rows=$(($(wc -l < "$tmp/full.csv.partial" 2>/dev/null || echo 0) - 1))
if [ $rc -ne 0 ] && grep -q "writing $tmp/full.csv.tmp.[0-9.]* failed at the rows of .*: File too large (EFBIG)" "$tmp/full.log" &&
   grep -q "are in $tmp/full.csv.partial; $tmp/full.csv not written" "$tmp/full.log" && [ ! -e "$tmp/full.csv" ] &&
   [ $rows -gt 0 ] && [ $((rows % 19)) -eq 0 ] && [ $rows -lt 76 ] &&
   cmp -s <(head -n $((rows + 1)) "$tmp/sub.csv") "$tmp/full.csv.partial"; then
  ok
else
  fail "a failed write (rc=$rc, $rows rows kept): $(cat "$tmp/full.log")"
fi
ls "$tmp" | grep -q "full\.csv\.tmp\." && fail "the failed write left its temporary file"
# An ensemble of checkpoints with different label sets: a 2-epoch debug run on 6 species.
"$a" synth --out "$tmp/t6" --layout 2024 --species 6 --recordings 40 --seed 4 --max-seconds 6 --no-broken >/dev/null || fail "synth 6"
"$bin/aviary-worker" train --config "$tmp/p.yaml" --set data.target.root="$tmp/t6" --set data.cache_dir= --set debug=true \
  --stage finetune --fold 0 --out "$tmp/run6" --threads 2 > "$tmp/train6.log" 2>&1 || { cat "$tmp/train6.log"; fail "train 6"; }
expect "ensemble checkpoints have different label sets" "$a" predict --checkpoint "$tmp/run/best.pt" --checkpoint "$tmp/run6/last.pt" --audio "$tmp/mixed" --out "$tmp/x.csv"
[ ! -e "$tmp/x.csv" ] || fail "a refused run left $tmp/x.csv"

echo "predict_soundscape: $passes passed, $fails failed"
[ $fails -eq 0 ]
