#!/usr/bin/env bash
# Status polling under heartbeat load: builds aviary-coordinator and status_bench, starts a
# coordinator on 127.0.0.1 port 0 with a fresh SQLite file and a token, submits 4 jobs over a
# hand-written dataset, registers 50 worker groups heartbeating every 100 ms (8 holding leases)
# and runs 200 polling clients (GetJob, every 4th call ListJobs) for DURATION seconds. Prints
# one JSON line and a table (p50/p99/max latency, RPC/s, errors) of the pollers and heartbeats.
# Usage: bench/status_bench.sh [BUILD_DIR] [DURATION_S] [extra status_bench flags...]
#   e.g. bench/status_bench.sh build 20 --poll-interval-ms 1000 --channels 20
#        bench/status_bench.sh build 20 --groups 64 --leased 64 --jobs 32 --report-ms 2000
#        (every group holds a task and sends ReportProgress every 2 s, as aviary-worker does)
# COORDINATOR_BIN=path uses that aviary-coordinator instead of building $BUILD_DIR's.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
duration=${2:-10}
shift $(( $# > 2 ? 2 : $# ))
if [[ ! -f "$build/build.ninja" && ! -f "$build/Makefile" ]]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
coordinator=${COORDINATOR_BIN:-}
targets=(status_bench)
if [[ -z "$coordinator" ]]; then targets+=(aviary-coordinator); fi
# Quiet unless it fails (ninja prints compiler errors on stdout).
if ! build_log=$(cmake --build "$build" -j"$(nproc)" --target "${targets[@]}" 2>&1); then
  echo "$build_log" >&2
  echo "status_bench.sh: building ${targets[*]} in $build failed" >&2
  exit 1
fi
coordinator=${coordinator:-$build/bin/aviary-coordinator}
echo "machine: $(nproc) cores, $(uname -srm), $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$build/bench/status_bench" --coordinator-bin "$coordinator" --duration "$duration" "$@"
