#!/usr/bin/env bash
# Bad input to the `aviary` offline commands: each case must fail with exit code 2 and a message
# naming the flag, key, value or path at fault, and must write no output file.
# usage: cli_errors.sh AVIARY_BIN CONFIGS_DIR
set -uo pipefail
aviary=$1
configs=$2
source "$(dirname "$0")/lib.sh"

"$aviary" synth --out "$tmp/t" --layout 2024 --species 6 --recordings 40 --seed 3 --max-seconds 3 >/dev/null
cat > "$tmp/p.yaml" <<YAML
data:
  target: {layout: "2024", root: $tmp/t}
  pretrain_sources: []
stages: {pretrain: {enabled: false}}
folds: {finetune_splits: 3}
YAML
cat > "$tmp/bad.yaml" <<YAML
train:
  batch_size: 32
  bach_size: 4
YAML

expect "unknown command 'fold'" "$aviary" fold
# A relative data root resolves against the current folder (not the config's): the error says so.
mkdir -p "$tmp/elsewhere"
sed "s#root: $tmp/t#root: t#" "$tmp/p.yaml" > "$tmp/relative.yaml"
expect "root 't', relative to the current folder $tmp/elsewhere): cannot read metadata" \
  bash -c 'cd "$0" && exec "$1" dataset summary --config "$2"' "$tmp/elsewhere" "$aviary" "$tmp/relative.yaml"
expect "unknown command 'split' (expected folds, train-list, summary)" "$aviary" dataset split
expect "--config is required" "$aviary" dataset folds --stage finetune --out "$tmp/o.csv"
expect "argument was not expected: --stge (did you mean --stage?)" "$aviary" dataset folds --config "$tmp/p.yaml" --stge finetune --out "$tmp/o.csv"
# A mistyped flag is answered with the command's nearest flag (edit distance <= 2, or a prefix
# either way), none when no flag is close.
expect "aviary submit: The following argument was not expected: --tags (did you mean --tag?)" \
  "$aviary" submit "$tmp/p.yaml" --tags a
expect "The following argument was not expected: --with-run (did you mean --with-run-folders?)" \
  "$aviary" delete j0123456789ab --with-run
expect "aviary list: The following argument was not expected: --zzzzzz (see aviary list --help)" \
  "$aviary" list --zzzzzz
expect "--stage: expected one of pretrain, finetune, got 'train'" "$aviary" dataset folds --config "$tmp/p.yaml" --stage train --out "$tmp/o.csv"
# A program's own flag after the command (the usage puts it before) is named as such; CLI11 alone
# said "The following arguments were not expected: 127.0.0.1:1 --coordinator".
expect "--coordinator is a flag of 'aviary', not of 'list' (the flags of 'aviary' go before the command: aviary --coordinator ... list ...)" \
  "$aviary" list --coordinator 127.0.0.1:1
expect "--timeout is a flag of 'aviary', not of 'dataset folds'" \
  "$aviary" dataset folds --config "$tmp/p.yaml" --stage finetune --out "$tmp/o.csv" --timeout=5
# CLI11 alone said "--stage: At Most 1 required but received 2".
expect "--stage was given 2 times; it takes one value" \
  "$aviary" dataset folds --config "$tmp/p.yaml" --stage finetune --stage pretrain --out "$tmp/o.csv"
expect "aviary list: --timeout was given 2 times; it takes one value (see aviary --help)" \
  "$aviary" --timeout 3 --timeout 4 list
expect "--set: expected dotted.key=value, got 'seed'" "$aviary" dataset folds --config "$tmp/p.yaml" --stage finetune --out "$tmp/o.csv" --set seed
expect "$tmp/nope.yaml" "$aviary" dataset folds --config "$tmp/nope.yaml" --stage finetune --out "$tmp/o.csv"
expect "bad.yaml:3: unknown key 'train.bach_size' (did you mean 'train.batch_size'?)" \
  "$aviary" dataset folds --config "$tmp/bad.yaml" --stage finetune --out "$tmp/o.csv"
expect "--set train.batch_size=abc" "$aviary" dataset folds --config "$tmp/p.yaml" --set train.batch_size=abc --stage finetune --out "$tmp/o.csv"
expect "fold 7 is out of range" "$aviary" dataset train-list --config "$tmp/p.yaml" --stage finetune --fold 7 --out "$tmp/o.csv"
expect "--fold: expected an integer in [0, 1000000], got 'x'" "$aviary" dataset train-list --config "$tmp/p.yaml" --stage finetune --fold x --out "$tmp/o.csv"
expect "data.target" "$aviary" dataset folds --config "$tmp/p.yaml" --set data.target.root=$tmp/missing --stage finetune --out "$tmp/o.csv"
expect "data.pretrain_sources" "$aviary" dataset folds --config "$tmp/p.yaml" --stage pretrain --out "$tmp/o.csv"
expect "cannot make 30 stratified folds" "$aviary" dataset folds --config "$tmp/p.yaml" --set folds.finetune_splits=30 --stage finetune --out "$tmp/o.csv"
# An --out that is one of the files read (a tab-completion slip) would be replaced, exit 0.
cp "$tmp/p.yaml" "$tmp/p.keep"
cp "$tmp/t/train_metadata.csv" "$tmp/meta.keep"
expect "--out $tmp/p.yaml: is the --config file $tmp/p.yaml itself" \
  "$aviary" dataset folds --config "$tmp/p.yaml" --stage finetune --out "$tmp/p.yaml"
expect "--out $tmp/t/train_metadata.csv: is the 2024 metadata" \
  "$aviary" dataset train-list --config "$tmp/p.yaml" --stage finetune --fold 0 --out "$tmp/t/train_metadata.csv"
expect "--plot $tmp/p.yaml: is the --config file" "$aviary" dataset summary --config "$tmp/p.yaml" --plot "$tmp/p.yaml"
# The target's metadata under another stage (pretraining reads it to leave its rows out), the
# corrupt-file list, the config with no stage enabled: each was replaced with exit 0.
expect "--out $tmp/t/train_metadata.csv: is the 2024 metadata" \
  "$aviary" dataset folds --config "$tmp/p.yaml" --stage pretrain --out "$tmp/t/train_metadata.csv"
echo '[]' > "$tmp/corrupt.json"
expect "--out $tmp/corrupt.json: is the data.corrupt_files list" \
  "$aviary" dataset folds --config "$tmp/p.yaml" --set "data.corrupt_files=$tmp/corrupt.json" --stage finetune \
  --out "$tmp/corrupt.json"
expect "--plot $tmp/p.yaml: is the --config file" \
  "$aviary" dataset summary --config "$tmp/p.yaml" --set stages.finetune.enabled=false --plot "$tmp/p.yaml"
if cmp -s "$tmp/p.yaml" "$tmp/p.keep" && cmp -s "$tmp/t/train_metadata.csv" "$tmp/meta.keep" &&
   [ "$(cat "$tmp/corrupt.json")" = "[]" ]; then ok; else fail "an input was replaced"; fi
# An output path in a missing folder, or a folder, is bad input named by its flag (exit 1 and the
# atomic write's temporary file name before).
expect "--out $tmp/nodir/o.csv: the folder $tmp/nodir does not exist" \
  "$aviary" dataset folds --config "$tmp/p.yaml" --stage finetune --out "$tmp/nodir/o.csv"
mkdir -p "$tmp/adir"
expect "--out $tmp/adir: is a directory, expected a file path" \
  "$aviary" dataset train-list --config "$tmp/p.yaml" --stage finetune --fold 0 --out "$tmp/adir"
expect "--plot $tmp/nodir/s.png: the folder $tmp/nodir does not exist" \
  "$aviary" dataset summary --config "$tmp/p.yaml" --plot "$tmp/nodir/s.png"
expect "--plot $tmp/nodir/h.png: the folder $tmp/nodir does not exist" \
  "$aviary" --coordinator 127.0.0.1:1 --timeout 5 history j0123456789ab --plot "$tmp/nodir/h.png"
expect "--layout: unknown layout '2019'" "$aviary" synth --out "$tmp/s" --layout 2019
expect "--species: expected an integer in [1, 999], got '0'" "$aviary" synth --out "$tmp/s" --layout 2024 --species 0
expect "--out is required" "$aviary" synth --layout 2024
if [ -e "$tmp/o.csv" ]; then echo "FAIL: a refused command wrote $tmp/o.csv"; fails=$((fails + 1)); fi

# And the good path still works with the same files.
if ! "$aviary" dataset folds --config "$tmp/p.yaml" --stage finetune --out "$tmp/o.csv" >/dev/null 2>&1; then
  echo "FAIL: the good command failed"; fails=$((fails + 1))
fi
# A disabled stage's sources are not read: pretraining sources that do not exist are fine.
out=$("$aviary" dataset summary --config "$tmp/p.yaml" --set 'data.pretrain_sources=[{layout: "2021", root: '"$tmp/nowhere"'}]' 2>&1)
if [ $? -ne 0 ] || ! grep -q "pretrain: disabled" <<<"$out"; then
  echo "FAIL: dataset summary read the disabled pretraining stage's sources: $out"; fails=$((fails + 1))
else
  passes=$((passes + 1))
fi
# The class counts say what the config does: cv_filter off and thresholds of 0 are "off" (not
# "4 with fewer than 5 (cv=False)" or "N above downsample_thr 0"), and fine-tuning (which does
# not downsample) gives no downsampling count.
out=$("$aviary" dataset summary --config "$tmp/p.yaml" --set folds.cv_filter=false --set sampling.upsample_thr=0 \
  --set sampling.downsample_thr=0 2>&1)
if [ $? -ne 0 ] || ! grep -qF "classes: 6; cv_filter off, upsampling off (upsample_thr 0)" <<<"$out" ||
   grep -q "downsampl" <<<"$out"; then
  echo "FAIL: dataset summary with cv_filter, upsampling and downsampling off: $out"; fails=$((fails + 1))
else
  passes=$((passes + 1))
fi
"$aviary" synth --out "$tmp/t21" --layout 2021 --species 6 --recordings 40 --seed 5 --max-seconds 3 >/dev/null
out=$("$aviary" dataset summary --config "$tmp/p.yaml" --set stages.pretrain.enabled=true \
  --set 'data.pretrain_sources=[{layout: "2021", root: '"$tmp/t21"'}]' --set folds.pretrain_splits=3 \
  --set sampling.downsample_thr=0 2>&1)
if [ $? -ne 0 ] || ! grep -qE "classes: [0-9]+; [0-9]+ with fewer than 5 \(cv=False, always trained on\), [0-9]+ below upsample_thr 50, downsampling off \(downsample_thr 0\)$" <<<"$out"; then
  echo "FAIL: dataset summary of the pretraining stage with downsampling off: $out"; fails=$((fails + 1))
else
  passes=$((passes + 1))
fi
# `aviary help` is the program's help (it printed help's own usage), and `aviary help CMD SUB`
# reaches a subcommand (README: "aviary help CMD").
if [ "$("$aviary" help 2>&1)" != "$("$aviary" --help 2>&1)" ]; then
  echo "FAIL: aviary help differs from aviary --help: $("$aviary" help 2>&1 | head -3)"; fails=$((fails + 1))
else
  passes=$((passes + 1))
fi
out=$("$aviary" help dataset folds 2>&1)
if [ $? -ne 0 ] || ! grep -q "^Usage: aviary dataset folds " <<<"$out"; then
  echo "FAIL: aviary help dataset folds: $out"; fails=$((fails + 1))
else
  passes=$((passes + 1))
fi
expect "aviary help: unknown command 'fold' of 'aviary dataset' (aviary dataset --help lists them)" \
  "$aviary" help dataset fold
# A worker's command and its subcommand (it showed `weights`' help).
out=$("$aviary" help weights import 2>&1)
if [ $? -ne 0 ] || ! grep -q "^Usage: .*weights import " <<<"$out"; then
  echo "FAIL: aviary help weights import: $out"; fails=$((fails + 1))
else
  passes=$((passes + 1))
fi
# An empty path (an unset shell variable) is refused naming the flag: synth-soundscapes wrote into
# /, history and summary skipped the plot, dataset folds failed at the rename naming no flag.
expect "--out: expected a folder, got ''" "$aviary" synth-soundscapes --out "" --species 3
# A --out that is a file is bad input (exit 2), as for `aviary synth` (it exited 1).
touch "$tmp/afile"
expect "--out $tmp/afile: exists and is not a directory" "$aviary" synth-soundscapes --out "$tmp/afile" --species 3
expect "--out: expected a path, got ''" "$aviary" dataset folds --config "$tmp/p.yaml" --stage finetune --out ""
expect "--plot: expected a path, got ''" "$aviary" dataset summary --config "$tmp/p.yaml" --plot ""
expect "--out: expected a path, got ''" "$aviary" export "$tmp/none.pt" --out ""
# A value left out: the next flag was taken as the value (export wrote a file named --format).
expect "--out: expected a value, got the flag '--format'" "$aviary" export "$tmp/none.pt" --out --format
# "--out=" (an unset variable): the next argument was taken as the value, the override lost and
# a file named "--set=seed=7" written; "-h" and "--" were file names too.
expect "--out=: expected a value after the '='" \
  "$aviary" dataset folds --config "$tmp/p.yaml" --stage finetune --out= --set=seed=7
expect "--out: expected a value, got '-h'" "$aviary" export "$tmp/none.pt" --out -h
expect "--out: expected a value, got '--'" "$aviary" export "$tmp/none.pt" --out --
if [ -e ./--set=seed=7 ] || [ -e ./-h ] || [ -e ./-- ]; then fail "a flag was written as a file"; else ok; fi
# An on/off flag before another flag is no such case (the first version of that check refused
# `synth ... --no-broken --seed 5`).
if "$aviary" synth --out "$tmp/flags" --layout 2024 --species 3 --recordings 6 --max-seconds 2 --no-broken --seed 5 \
  >/dev/null 2>"$tmp/flags.err"; then
  passes=$((passes + 1))
else
  echo "FAIL: synth --no-broken --seed 5 was refused: $(cat "$tmp/flags.err")"; fails=$((fails + 1))
fi
if "$aviary" dataset summary --config "$tmp/p.yaml" --all-classes --set seed=1 >/dev/null 2>"$tmp/flags.err"; then
  passes=$((passes + 1))
else
  echo "FAIL: dataset summary --all-classes --set seed=1 was refused: $(cat "$tmp/flags.err")"; fails=$((fails + 1))
fi
[ -e ./--format ] && { echo "FAIL: export wrote ./--format"; fails=$((fails + 1)); }
# Integers are base 10: a leading zero is not octal (--seed 010 wrote seed 8's corpus).
"$aviary" synth --out "$tmp/s10" --layout 2024 --species 3 --recordings 6 --seed 10 --max-seconds 2 >/dev/null
"$aviary" synth --out "$tmp/s010" --layout 2024 --species 3 --recordings 6 --seed 010 --max-seconds 2 >/dev/null
if cmp -s "$tmp/s10/train_metadata.csv" "$tmp/s010/train_metadata.csv"; then
  passes=$((passes + 1))
else
  echo "FAIL: synth --seed 010 wrote another corpus than --seed 10"; fails=$((fails + 1))
fi
# synth --no-broken says none are broken (no empty "(0 broken:)").
out=$("$aviary" synth --out "$tmp/nb" --layout 2024 --species 3 --recordings 6 --seed 1 --max-seconds 2 --no-broken 2>&1)
if grep -q "0 broken:" <<<"$out" || ! grep -q "(none broken)" <<<"$out"; then
  echo "FAIL: synth --no-broken printed: $out"; fails=$((fails + 1))
else
  passes=$((passes + 1))
fi
# By default the broken files are listed, by kind and path under --out (the help said "listed";
# only their counts were printed).
out=$("$aviary" synth --out "$tmp/broken" --layout 2024 --species 3 --recordings 12 --seed 1 --max-seconds 2 2>&1)
listed=$(sed -n 's/^  \(empty\|truncated\|silent\|not_audio\)\t//p' <<<"$out")
missing=0
while IFS= read -r rel; do [ -n "$rel" ] && [ ! -e "$tmp/broken/$rel" ] && missing=$((missing + 1)); done <<<"$listed"
if grep -q "^broken files (under $tmp/broken):" <<<"$out" && [ "$(grep -c . <<<"$listed")" -ge 4 ] && [ "$missing" = 0 ]; then
  passes=$((passes + 1))
else
  echo "FAIL: synth did not list its broken files by kind and existing path: $out"; fails=$((fails + 1))
fi
# Credentials the client cannot send are refused by source and byte, before gRPC sees them (it
# aborted on a token byte an HTTP/2 header cannot carry); a CA file that is not PEM is refused.
printf 'tok\001en\n' > "$tmp/control.token"
expect "--token-file $tmp/control.token: byte 0x01 at position 4" \
  "$aviary" --coordinator 127.0.0.1:1 --token-file "$tmp/control.token" list
expect "AVIARY_TOKEN: byte 0x01 at position 4" env AVIARY_TOKEN=$'tok\001en' "$aviary" --coordinator 127.0.0.1:1 list
printf 't\303\266k\n' > "$tmp/utf8.token"
expect "AVIARY_TOKEN_FILE $tmp/utf8.token: byte 0xc3 at position 2" \
  env AVIARY_TOKEN_FILE="$tmp/utf8.token" "$aviary" --coordinator 127.0.0.1:1 list
echo "not a certificate" > "$tmp/notpem.crt"
expect "--tls-ca $tmp/notpem.crt: holds no PEM certificate" \
  "$aviary" --coordinator 127.0.0.1:1 --tls-ca "$tmp/notpem.crt" list
expect "AVIARY_TLS_CA $tmp/notpem.crt: holds no PEM certificate" \
  env AVIARY_TLS_CA="$tmp/notpem.crt" "$aviary" --coordinator 127.0.0.1:1 list
# A flag given empty (a script's unset variable) is refused, not taken for "not given": an empty
# --tls-ca skipped AVIARY_TLS_CA and dialed in plaintext, the token in clear.
expect "--tls-ca is empty" env AVIARY_TLS_CA="$tmp/notpem.crt" "$aviary" --coordinator 127.0.0.1:1 --tls-ca "" list
expect "--token-file is empty" env AVIARY_TOKEN=t "$aviary" --coordinator 127.0.0.1:1 --token-file "" list
# A coordinator address without a port (gRPC would dial 443) is refused naming where it came from.
# (as aviary-worker serve and the launchers already do).
expect "--coordinator: expected HOST:PORT, got 'localhost' (e.g. localhost:7070)" "$aviary" --coordinator localhost list
expect "AVIARY_COORDINATOR: expected HOST:PORT, got 'coord' (e.g. coord:7070)" env AVIARY_COORDINATOR=coord "$aviary" status j0123456789ab
# An empty or out-of-range port was dialed as port 0 ("ipv4:127.0.0.1:0: Connection refused").
expect "--coordinator: expected HOST:PORT with a port in 1..65535, got '127.0.0.1:'" "$aviary" --coordinator 127.0.0.1: list
expect "AVIARY_COORDINATOR: expected HOST:PORT with a port in 1..65535, got 'coord:70000'" \
  env AVIARY_COORDINATOR=coord:70000 "$aviary" status j0123456789ab
# A port with junk after its digits was dialed as the digits ("ipv4:127.0.0.1:7070").
expect "--coordinator: expected HOST:PORT with a port in 1..65535, got '127.0.0.1:7070x'" \
  "$aviary" --coordinator 127.0.0.1:7070x list
# An IPv6 address without brackets: its last group was read as the port ("::1" dialled port 1).
expect "--coordinator: expected HOST:PORT, got '::1' (an IPv6 address goes in brackets: [::1]:7070)" \
  "$aviary" --coordinator ::1 list
expect "--coordinator: expected [IPV6]:PORT, got '[::1]7070'" "$aviary" --coordinator '[::1]7070' list
# gRPC's target schemes keep their colons: the call goes out (and finds no coordinator).
for target in 'dns:///127.0.0.1:1' 'ipv4:127.0.0.1:1' 'ipv6:[::1]:1' '[::1]:1'; do
  out=$("$aviary" --coordinator "$target" --timeout 2 list 2>&1); rc=$?
  if [ $rc -ne 1 ] || grep -qF "expected" <<<"$out"; then fail "--coordinator $target -> rc=$rc: $out"; else ok; fi
done
# A number flag takes decimal text (strtod read "0x10" as 16 and skipped leading blanks).
expect "--timeout: expected a number in [0.001, 86400], got '0x10'" "$aviary" --timeout 0x10 list
expect "--timeout: expected a number in [0.001, 86400], got ' 5'" "$aviary" --timeout ' 5' list
# A token file that starts with a UTF-8 BOM works: the call goes out (and finds no coordinator).
printf '\357\273\277the-token\n' > "$tmp/bom.token"
out=$("$aviary" --coordinator 127.0.0.1:1 --timeout 5 --token-file "$tmp/bom.token" list 2>&1); rc=$?
if [ $rc -ne 1 ] || ! grep -qF "to coordinator 127.0.0.1:1" <<<"$out"; then
  echo "FAIL: a token file with a BOM -> rc=$rc: $out"; fails=$((fails + 1))
else
  passes=$((passes + 1))
fi

# The torch commands run the aviary-worker next to aviary; without it the error says so.
mkdir -p "$tmp/alone" && cp "$aviary" "$tmp/alone/aviary"
out=$("$tmp/alone/aviary" mel --config x 2>&1)
if [ $? -ne 1 ] || ! grep -qF "needs the aviary-worker program (libtorch) next to aviary: $tmp/alone/aviary-worker" <<<"$out"; then
  echo "FAIL: aviary mel without aviary-worker: $out"; fails=$((fails + 1))
else
  passes=$((passes + 1))
fi

# `watch` of a coordinator never reached: exit 3 (the job's state unknown), not the 1 of a job
# that failed, which a script would take as the job's end.
out=$("$aviary" --coordinator 127.0.0.1:1 --timeout 2 watch j0123456789ab 2>&1); rc=$?
if [ $rc -ne 3 ] || ! grep -qF "aviary watch: job j0123456789ab not seen; its state is not known" <<<"$out"; then
  fail "watch of a coordinator never reached -> rc=$rc: $out"
else
  ok
fi

# A real coordinator (the one built next to aviary): `watch` rides out its restart, and the
# coordinator's own UNAVAILABLE ("the coordinator is shutting down") is not blamed on TLS; a
# plaintext client closed on by a TLS coordinator still gets the --tls-ca hint.
coordinator_bin="$(dirname "$aviary")/aviary-coordinator"
# Whatever ends this script (a failed wait, a branch that stops early) stops the coordinator too.
trap 'kill -KILL ${coord_pid:-} 2>/dev/null; rm -rf "$tmp"' EXIT
start_coord() {  # start_coord YAML LOG: sets coord_pid; waits for "listening"
  "$coordinator_bin" --config "$1" --port-file "$1.port" > "$2" 2>&1 & coord_pid=$!
  for _ in $(seq 300); do grep -q listening "$2" && return 0; sleep 0.1; done
  fail "coordinator did not start: $(cat "$2")"; return 1
}
loopback_coordinator_config
[ -x "$coordinator_bin" ] || fail "$coordinator_bin is not built"
if [ -x "$coordinator_bin" ] && start_coord "$tmp/c.yaml" "$tmp/c1.log"; then
  port=$(cat "$tmp/c.yaml.port")
  av() { "$aviary" --coordinator "127.0.0.1:$port" --token-file "$tmp/c.token" "$@"; }
  finetune_job_config "$tmp/t"
  job=$(av submit "$tmp/w.yaml" | tail -1)
  av --timeout 10 watch "$job" > "$tmp/watch.out" 2>&1 & watch_pid=$!
  for _ in $(seq 300); do grep -q PENDING "$tmp/watch.out" && break; sleep 0.1; done
  kill -TERM $coord_pid; wait $coord_pid
  sed -i "s/^listen: .*/listen: 127.0.0.1:$port/" "$tmp/c.yaml"
  start_coord "$tmp/c.yaml" "$tmp/c2.log" && av cancel "$job" >/dev/null
  wait $watch_pid; rc=$?
  kill -TERM $coord_pid; wait $coord_pid
  if [ $rc -ne 1 ] || ! grep -qF "job $job CANCELLED" "$tmp/watch.out" || grep -qF -- "--tls-ca" "$tmp/watch.out"; then
    fail "watch across a coordinator restart -> rc=$rc:"; sed 's/^/    /' "$tmp/watch.out"
  else
    ok
  fi
  # The job's header line once (with its task count), not the state again at each reconnect.
  if [ "$(grep -c "job $job PENDING" "$tmp/watch.out")" -ne 1 ] || ! grep -q "job $job PENDING.*, [0-9]* tasks" "$tmp/watch.out"; then
    fail "watch: one header line 'job $job PENDING ..., N tasks' across the restart:"; sed 's/^/    /' "$tmp/watch.out"
  else
    ok
  fi
  # A sweep's tasks of one fold differ only in their point: watch's lines name it as status does
  # ("finetune  f0-p1 READY", not two "finetune  f0" lines). The history of a job cancelled before
  # any epoch end says so without "yet".
  if start_coord "$tmp/c.yaml" "$tmp/c5.log"; then
    sweep=$(av submit "$tmp/w.yaml" --sweep "train.lr_max_per_sample=[1e-4,2e-4]" 2>/dev/null | tail -1)
    av --timeout 10 watch "$sweep" > "$tmp/watch3.out" 2>&1 & watch_pid=$!
    for _ in $(seq 300); do grep -q "f2-p1" "$tmp/watch3.out" && break; sleep 0.1; done
    av cancel "$sweep" >/dev/null
    wait $watch_pid
    hist=$(av history "$sweep" 2>&1); hist_rc=$?
    hist_csv_err=$(av history "$sweep" --csv 2>&1 > "$tmp/hist.csv"); hist_csv_rc=$?
    kill -TERM $coord_pid; wait $coord_pid
    if ! grep -q "finetune  f0-p0 " "$tmp/watch3.out" || ! grep -q "finetune  f0-p1 " "$tmp/watch3.out" ||
       grep -q "finetune  f0  " "$tmp/watch3.out"; then
      fail "watch of a sweep: its lines do not name the point:"; sed 's/^/    /' "$tmp/watch3.out"
    else
      ok
    fi
    if [ $hist_rc -ne 0 ] || ! grep -qF "job $sweep is CANCELLED and has no finished epochs" <<<"$hist" ||
       grep -q "yet" <<<"$hist"; then
      fail "history of a job cancelled before any epoch end -> rc=$hist_rc: $hist"
    else
      ok
    fi
    # --csv: the header alone on stdout, the same notice on stderr.
    if [ $hist_csv_rc -ne 0 ] || [ "$(wc -l < "$tmp/hist.csv")" -ne 1 ] ||
       ! grep -qF "job $sweep is CANCELLED and has no finished epochs" <<<"$hist_csv_err"; then
      fail "history --csv of a job without epoch ends -> rc=$hist_csv_rc, stderr '$hist_csv_err', stdout: $(cat "$tmp/hist.csv")"
    else
      ok
    fi
  fi
  # A coordinator that does not come back (kill -9, its host gone): watch gives up after its
  # reconnections (10, each bounded by --timeout) with exit 3, "final state unknown", not the 1
  # of a failed job, and no TLS hint for a connection that had worked.
  if start_coord "$tmp/c.yaml" "$tmp/c4.log"; then
    job2=$(av submit "$tmp/w.yaml" | tail -1)
    av --timeout 1 watch "$job2" > "$tmp/watch2.out" 2>&1 & watch_pid=$!
    for _ in $(seq 300); do grep -q PENDING "$tmp/watch2.out" && break; sleep 0.1; done
    kill -9 $coord_pid; wait $coord_pid 2>/dev/null
    wait $watch_pid; rc=$?
    if [ $rc -ne 3 ] || ! grep -qF "job $job2 was PENDING when last seen" "$tmp/watch2.out" ||
       ! grep -qF "gave up after 10 reconnection attempts" "$tmp/watch2.out" || grep -qF -- "--tls-ca" "$tmp/watch2.out"; then
      fail "watch of a coordinator gone for good -> rc=$rc:"; sed 's/^/    /' "$tmp/watch2.out"
    else
      ok
    fi
  fi
  if command -v openssl >/dev/null; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$tmp/tls.key" -out "$tmp/tls.crt" -days 1 \
      -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 2>/dev/null
    sed "s/^listen: .*/listen: 127.0.0.1:0/" "$tmp/c.yaml" > "$tmp/tls.yaml"
    printf 'tls_cert_file: %s\ntls_key_file: %s\n' "$tmp/tls.crt" "$tmp/tls.key" >> "$tmp/tls.yaml"
    if start_coord "$tmp/tls.yaml" "$tmp/c3.log"; then
      out=$("$aviary" --coordinator "127.0.0.1:$(cat "$tmp/tls.yaml.port")" --token-file "$tmp/c.token" --timeout 5 list 2>&1); rc=$?
      # A CA that did not sign the coordinator's certificate: the one error line, not gRPC's own
      # handshake log lines before it.
      openssl req -x509 -newkey rsa:2048 -nodes -keyout "$tmp/other.key" -out "$tmp/other.crt" -days 1 \
        -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 2>/dev/null
      wrong=$("$aviary" --coordinator "127.0.0.1:$(cat "$tmp/tls.yaml.port")" --token-file "$tmp/c.token" \
        --tls-ca "$tmp/other.crt" --timeout 5 list 2>&1); wrong_rc=$?
      kill -TERM $coord_pid; wait $coord_pid
      if [ $rc -ne 1 ] || ! grep -qF "(if the coordinator serves TLS, pass --tls-ca)" <<<"$out"; then
        fail "plaintext list against a TLS coordinator -> rc=$rc: $out"
      else
        ok
      fi
      if [ $wrong_rc -ne 1 ] || [ "$(grep -c . <<<"$wrong")" -ne 1 ] || ! grep -q "^aviary list: UNAVAILABLE" <<<"$wrong"; then
        fail "list with a CA that did not sign the coordinator's certificate -> rc=$wrong_rc, wanted one line: $wrong"
      else
        ok
      fi
    fi
  fi
fi
echo "cli_errors: $passes passed, $fails failed"
[ $fails -eq 0 ]
