#!/usr/bin/env bash
# bench/gpu/acceptance.sh in its CPU dry-run mode, through bench/gpu/pack.sh's pack as a GPU host
# would run it: every step must run and every check must be reported (figures are not checked:
# toy sizes on the CPU mean nothing). The GPU call then cannot fail on a typo.
# usage: gpu_acceptance_dry_run.sh BUILD_DIR PYTHON
set -uo pipefail
build=$1
python=$2
source "$(dirname "$0")/lib.sh"
repo=$(cd "$(dirname "$0")/../.." && pwd)

"$repo/bench/gpu/pack.sh" "$build" "$tmp/pack" > "$tmp/pack.log" 2>&1 || { cat "$tmp/pack.log"; fail "pack.sh"; }
cat "$tmp/pack.log"
# Python must not run with the pack's Debian libraries on its library path (a GPU host's
# python3 links newer ones): this python refuses to.
cat > "$tmp/guarded-python" <<EOF
#!/usr/bin/env bash
case ":\${LD_LIBRARY_PATH:-}:" in
  *"/pack/lib:"*) echo "python run with the pack's libraries: LD_LIBRARY_PATH=\$LD_LIBRARY_PATH" >&2; exit 97 ;;
esac
exec "$python" "\$@"
EOF
chmod +x "$tmp/guarded-python"
# The GPU defaults (--budget 450, --step-timeout 240) were sized from H200 runs
# (bench/gpu/runs/2026-12-04-h200-*); two loaded cores doing the same steps at toy sizes get what
# ctest's TIMEOUT (1500 s) leaves.
if "$repo/bench/gpu/acceptance.sh" --dry-run --budget 1300 --step-timeout 900 --pack "$tmp/pack" --python "$tmp/guarded-python" --out "$tmp/out" --work "$tmp/work" > "$tmp/run.log" 2>&1; then
  ok
else
  cat "$tmp/out/acceptance.log" 2>/dev/null | tail -80; fail "acceptance.sh --dry-run failed"
fi
cat "$tmp/run.log" | tail -25
for check in machine corpus train resume train_graph train_graph_partial train_graph_options resume_graph predict mel \
    step_vs_eager step_graph step_vs_compile step_wave datapath datapath_profile datapath_graph datapath_loader_wait loader allreduce_share \
    allreduce projection_8gpu; do
  grep -q "^$check	" "$tmp/out/results.tsv" || fail "results.tsv lacks the check '$check'"
done
grep -q "^resume	PASS" "$tmp/out/results.tsv" || fail "exact resume on the CPU did not pass"
# The train.cuda_graph comparisons, eager against eager: the same runs.
for check in train_graph train_graph_partial train_graph_options resume_graph; do
  grep -q "^$check	PASS	identical	.*no GPU: eager against eager" "$tmp/out/results.tsv" ||
    { grep "^$check" "$tmp/out/results.tsv"; fail "$check, eager against eager, was not identical"; }
done
# The CUDA graph check run eager against eager: the same numbers on both sides.
grep -q "^step_graph	INFO	.*no GPU: eager against eager.*gradients rel diff 0, losses 0, weights after 3 steps max |diff| 0$" \
  "$tmp/out/results.tsv" || { grep "^step_graph" "$tmp/out/results.tsv"; fail "the graph check, eager against eager, found differences"; }
grep -qE "^datapath_loader_wait	INFO	[0-9.]+ % eager, [0-9.]+ % graph" "$tmp/out/results.tsv" ||
  { grep "^datapath_loader_wait" "$tmp/out/results.tsv"; fail "no loader-wait share from the data-path runs"; }
# The data path's profile (AVIARY_PROFILE): a trace was written and read; on the CPU it has no
# device activity.
grep -q "^datapath_profile	INFO	no device activity	.*optimizer steps 2-3" "$tmp/out/results.tsv" ||
  { grep "^datapath_profile" "$tmp/out/results.tsv"; fail "no profile of the data path's steps"; }
gzip -t "$tmp/out/datapath_trace.json.gz" 2>/dev/null || fail "the data path's trace did not come back in --out"
# The speed rows read a corpus without broken files, the correctness checks one with them.
broken='^ +(empty|not_audio|truncated|silent) +[0-9]+ '
grep -qE "$broken" "$tmp/work/prepare.out" || { cat "$tmp/work/prepare.out"; fail "the checks' corpus has no broken files"; }
grep -qE "$broken" "$tmp/work/prepare_clean.out" && { cat "$tmp/work/prepare_clean.out"; fail "the speed rows' corpus has broken files"; }
# The eager data path against the waveform-input step (like for like: all but the loader), the
# graphed one against the graphed model step (said to be not like for like); medians both.
grep -q "^datapath	INFO	.*vs the waveform-input step's median round" "$tmp/out/results.tsv" ||
  { grep "^datapath	" "$tmp/out/results.tsv"; fail "the data path is not compared with the waveform-input step"; }
grep -q "^datapath_graph	INFO	.*vs the graphed model step alone (mel input, no loader/front end; median round): not like for like" \
  "$tmp/out/results.tsv" || { grep "^datapath_graph" "$tmp/out/results.tsv"; fail "the graphed data path is not compared with the graphed step"; }
# Each step's wall time, and nothing stopped.
awk -F'\t' 'NR > 1 && $3 !~ /^[0-9]+$/ {bad = 1} END {exit (NR < 20 || bad)}' "$tmp/out/steps.tsv" ||
  { cat "$tmp/out/steps.tsv"; fail "steps.tsv lacks the steps' wall times"; }
grep -q "	STOPPED	" "$tmp/out/results.tsv" && { grep "	STOPPED	" "$tmp/out/results.tsv"; fail "a check was stopped"; }
# The 8-GPU projection never exceeds 8 x the one-rank rate (its ratio column).
awk -F'\t' '$1 == "projection_8gpu" {found = 1; if ($2 != "INFO" || $5 == "-" || $5 + 0 > 1) bad = 1} END {exit (!found || bad)}' \
  "$tmp/out/results.tsv" || { grep "^projection_8gpu" "$tmp/out/results.tsv"; fail "the 8-GPU projection is faster than linear"; }
# Every check that ran measured something.
awk -F'\t' 'NR > 1 && $2 != "SKIP" && ($3 == "" || $3 == "-" || $3 ~ /^ /) {print "FAIL: " $1 " measured nothing: " $0; bad=1} END {exit bad}' \
  "$tmp/out/results.tsv" || fail "a check measured nothing"
[ -s "$tmp/out/acceptance.log" ] || fail "no acceptance.log"

# Bad input to the new flags is refused by name, before any work.
expect_refusal() {  # EXPECTED_TEXT CMD...
  local want=$1; shift
  if "$@" > "$tmp/bad.log" 2>&1; then fail "accepted: $*"; return; fi
  grep -qF -- "$want" "$tmp/bad.log" || { cat "$tmp/bad.log"; fail "'$*' did not say: $want"; return; }
  ok
}
bench=$build/bench/train_step_bench
expect_refusal "--cuda-graph needs --input mel --device cuda (got --input wave --device cpu)" "$bench" --cuda-graph
expect_refusal "--cuda-graph needs --input mel --device cuda (got --input mel --device cpu)" "$bench" --cuda-graph --input mel
expect_refusal "--cudnn-benchmark: expected one of auto, on, off, got 'fast'" "$bench" --cudnn-benchmark fast
expect_refusal "--budget takes whole seconds, got '7m'" \
  "$repo/bench/gpu/acceptance.sh" --dry-run --build "$build" --budget 7m
# 0 would be `timeout 0`: no limit at all.
expect_refusal "--step-timeout takes whole seconds above 0, got '0'" \
  "$repo/bench/gpu/acceptance.sh" --dry-run --build "$build" --step-timeout 0
expect_refusal "--only needs a value" "$repo/bench/gpu/acceptance.sh" --dry-run --build "$build" --only

# Out of time: with no budget left no step starts, each is reported as STOPPED (not measured,
# a failure), and the table is still printed (a device call's limit must not take the results
# with it).
if "$repo/bench/gpu/acceptance.sh" --dry-run --pack "$tmp/pack" --python "$python" --out "$tmp/out0" --work "$tmp/work0" \
     --budget 0 > "$tmp/run0.log" 2>&1; then
  fail "acceptance.sh --budget 0 passed"
fi
grep -q "synth: not run, the 0 s budget is spent" "$tmp/run0.log" || { tail -20 "$tmp/run0.log"; fail "no 'budget is spent' line"; }
grep -q "^corpus  *STOPPED  .*stopped: budget/timeout (step synth not started" "$tmp/run0.log" ||
  { tail -20 "$tmp/run0.log"; fail "the table was not printed with the corpus check stopped"; }
grep -q "^projection_8gpu  *STOPPED" "$tmp/run0.log" || { tail -20 "$tmp/run0.log"; fail "a projection without a data-path rate"; }
grep -q "^step_vs_compile  *STOPPED" "$tmp/run0.log" || { tail -20 "$tmp/run0.log"; fail "torch.compile without budget was not STOPPED"; }
grep -q "	FAIL	" "$tmp/out0/results.tsv" && { cat "$tmp/out0/results.tsv"; fail "a step the budget left unstarted reads FAIL"; }
ok

# --only: one group; the others' rows are SKIP "not selected" and pass; unknown groups refused.
if "$repo/bench/gpu/acceptance.sh" --dry-run --pack "$tmp/pack" --python "$python" --out "$tmp/out1" --work "$tmp/work1" \
     --only allreduce > "$tmp/run1.log" 2>&1; then
  ok
else
  tail -30 "$tmp/run1.log"; fail "acceptance.sh --only allreduce failed"
fi
grep -q "^allreduce	INFO	" "$tmp/out1/results.tsv" || fail "--only allreduce did not run allreduce-bench"
grep -q "^datapath	SKIP	.*not selected (--only allreduce; group datapath)" "$tmp/out1/results.tsv" ||
  { cat "$tmp/out1/results.tsv"; fail "--only allreduce: the data path's row is not SKIP"; }
[ "$(grep -c "	SKIP	.*not selected" "$tmp/out1/results.tsv")" -eq 19 ] ||
  { cat "$tmp/out1/results.tsv"; fail "--only allreduce: not every other check is SKIP"; }
expect_refusal "--only: unknown group 'bogus'" "$repo/bench/gpu/acceptance.sh" --dry-run --build "$build" --only speed,bogus

# The next GPU session's first device call, its flags as docs/BENCHMARKS.md gives them: every
# row of the speed and data-path groups is measured (INFO on the CPU), torch.compile skipped.
if "$repo/bench/gpu/acceptance.sh" --dry-run --pack "$tmp/pack" --python "$tmp/guarded-python" --out "$tmp/out2" \
     --work "$tmp/work2" --only speed,datapath --skip-compile --budget 400 --step-timeout 300 > "$tmp/run2.log" 2>&1; then
  ok
else
  tail -30 "$tmp/run2.log"; fail "acceptance.sh --only speed,datapath --skip-compile failed"
fi
for check in mel step_vs_eager step_graph step_wave datapath datapath_profile datapath_graph datapath_loader_wait \
    loader projection_8gpu; do
  grep -q "^$check	INFO	" "$tmp/out2/results.tsv" ||
    { grep "^$check	" "$tmp/out2/results.tsv"; fail "--only speed,datapath --skip-compile: '$check' was not measured"; }
done
grep -q "^step_vs_compile	SKIP	" "$tmp/out2/results.tsv" || fail "--skip-compile: torch.compile's row is not SKIP"
echo "gpu_acceptance_dry_run: $passes passed, $fails failed"
[ $fails -eq 0 ]
