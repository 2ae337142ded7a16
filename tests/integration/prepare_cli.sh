#!/usr/bin/env bash
# `aviary prepare` on a synthetic corpus: decodes every file of both stages into the cache,
# counts the broken ones per reason, writes prepare_report.csv, decodes nothing on a second run,
# recovers from a lost shard, and refuses bad input with exit code 2.
# usage: prepare_cli.sh AVIARY_BIN
set -uo pipefail
aviary=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
check() {  # check "what" condition...
  local what=$1; shift
  if "$@"; then :; else echo "FAIL: $what"; fails=$((fails + 1)); fi
}

"$aviary" synth --out "$tmp/t" --layout 2024 --species 5 --recordings 30 --seed 5 --max-seconds 4 >/dev/null || exit 1
"$aviary" synth --out "$tmp/x" --layout xc --species 5 --recordings 30 --seed 6 --max-seconds 4 >/dev/null || exit 1
cat > "$tmp/p.yaml" <<YAML
data:
  duration: 5.0
  target: {layout: "2024", root: $tmp/t}
  pretrain_sources:
    - {layout: "xc", root: $tmp/x}
  cache_dir: $tmp/cache
folds: {pretrain_splits: 2, finetune_splits: 2}
YAML

out=$("$aviary" prepare --config "$tmp/p.yaml" --threads 2 --shard-mb 0.5 2>"$tmp/err1"); rc=$?
check "first run exits 0 (rc=$rc): $(cat "$tmp/err1")" test $rc -eq 0
echo "$out"
check "first run decodes files" grep -qE "\(0 cached earlier, [1-9][0-9]* decoded now\)" <<<"$out"
for reason in ok empty not_audio truncated silent; do
  check "report row $reason" grep -qE "^$reason,[1-9]" "$tmp/cache/prepare_report.csv"
done
check "progress lines on a non-terminal" grep -q "^prepare: .* files" "$tmp/err1"
check "several shards" test "$(ls "$tmp/cache"/shard-*.index.csv | wc -l)" -ge 2

out2=$("$aviary" prepare --config "$tmp/p.yaml" 2>/dev/null); rc=$?
check "second run exits 0" test $rc -eq 0
check "second run decodes nothing" grep -q " 0 decoded now" <<<"$out2"
check "same report" diff <(sed -n '/reason/,$p' <<<"$out") <(sed -n '/reason/,$p' <<<"$out2")

last=$(ls "$tmp/cache"/shard-*.pcm | sort | tail -1)
rm "$last"
out3=$("$aviary" prepare --config "$tmp/p.yaml" 2>/dev/null); rc=$?
check "repair run exits 0" test $rc -eq 0
check "repair run redecodes" grep -qE "[1-9][0-9]* decoded now" <<<"$out3"
out4=$("$aviary" prepare --config "$tmp/p.yaml" 2>/dev/null)
check "after repair nothing to do" grep -q " 0 decoded now" <<<"$out4"
out5=$("$aviary" prepare --config "$tmp/p.yaml" --stage finetune 2>/dev/null); rc=$?
check "one stage exits 0" test $rc -eq 0
check "one stage lists only its samples" grep -q "^stage finetune: 30 samples" <<<"$out5"
check "one stage has no pretrain line" test -z "$(grep "^stage pretrain" <<<"$out5")"

expect2() {  # expect2 "substring" args...
  local want=$1; shift
  local msg rc
  msg=$("$aviary" prepare "$@" 2>&1); rc=$?
  if [ $rc -ne 2 ] || ! grep -qF -- "$want" <<<"$msg"; then
    echo "FAIL: prepare $* -> rc=$rc, wanted '$want' in: $msg"; fails=$((fails + 1))
  fi
}
expect2 "data.cache_dir is empty" --config "$tmp/p.yaml" --set data.cache_dir=
expect2 "--stage: expected one of pretrain, finetune, got 'train'" --config "$tmp/p.yaml" --stage train
expect2 "--config is required"
expect2 "holds 32000 Hz" --config "$tmp/p.yaml" --set data.sample_rate=16000 --set frontend.fmax=8000
expect2 "--threads" --config "$tmp/p.yaml" --threads 0

if [ $fails -ne 0 ]; then echo "$fails check(s) failed"; exit 1; fi
echo "all prepare CLI checks passed"
