#!/usr/bin/env bash
# `aviary status JOB` and `aviary list` against a local coordinator, one process per call as a
# user runs them, against the same calls from a Python gRPC client (Debian's python3-grpcio;
# bench/client_reference.py) in the same run. Prints median/p90 wall time and peak memory.
# The coordinator (SQLite file, bearer token, 127.0.0.1, port chosen at run time) holds 5 jobs
# of a small synthetic corpus; no worker group runs, so the jobs stay queued.
#
# Usage: bench/client_bench.sh BUILD_DIR [RUNS]      e.g. bench/client_bench.sh build 30
# Needs python3-grpcio and python3-protobuf (apt-get install python3-grpcio python3-protobuf)
# and protoc (protobuf-compiler, a build dependency).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "${1:?build folder}/bin" && pwd)
runs=${2:-30}
source "$root/tests/integration/lib.sh"
source "$root/tests/integration/service_lib.sh"
/usr/bin/python3 -c 'import grpc, google.protobuf' 2>/dev/null ||
  { echo "needs python3-grpcio and python3-protobuf (apt-get install python3-grpcio python3-protobuf)"; exit 2; }

"$bin/aviary" synth --out "$tmp/t24" --layout 2024 --species 6 --recordings 48 --seed 3 --max-seconds 4 >/dev/null || exit 1
cat > "$tmp/p.yaml" <<YAML
data: {target: {layout: "2024", root: $tmp/t24}}
folds: {finetune_splits: 3, selected_folds: [0, 1, 2]}
model: {name: small_cnn}
stages: {pretrain: {enabled: false}, finetune: {enabled: true, epochs: 2}}
YAML
write_coordinator_config 20 2
start_coordinator || exit 1
for i in 1 2 3 4 5; do job=$(av submit "$tmp/p.yaml" --name "bench$i" | tail -n 1) || exit 1; done
[[ "$job" =~ ^j[0-9a-f]{12}$ ]] || { echo "submit did not print a job id: $job"; exit 1; }
mkdir -p "$tmp/pb2"
protoc -I "$root/proto" --python_out="$tmp/pb2" "$root/proto/aviary.proto" || exit 1

echo "coordinator 127.0.0.1:$port, 5 jobs of 3 tasks; $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
a="$bin/aviary --coordinator 127.0.0.1:$port --token-file $tmp/token"
py="/usr/bin/python3 $root/bench/client_reference.py $tmp/pb2 127.0.0.1:$port $tmp/token"
/usr/bin/python3 "$root/bench/client_bench.py" "$runs" \
  "aviary status JOB=$a status $job" "aviary list=$a list" \
  "python grpc: GetJob=$py status $job" "python grpc: ListJobs=$py list 20"
