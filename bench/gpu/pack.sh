#!/usr/bin/env bash
# Packs what bench/gpu/acceptance.sh needs on a bare GPU host that has PyTorch (the same torch
# version these binaries were built against) but none of aviary's Debian libraries: the
# stripped programs, and every shared library they load that is neither torch's, CUDA's, NCCL's,
# OpenMPI's nor the C/C++ runtime's (gRPC, protobuf, abseil, prometheus-cpp, civetweb,
# yaml-cpp, libsndfile and its codecs, soxr, ...). OpenMPI's own libraries go to mpi-lib/, used
# only where the host has no libmpi.so.40 (the programs load it even without mpirun). The C++
# bindings (libmpi_cxx.so.40) go to lib/: a host's OpenMPI 4.1 may come without them, and they
# work over any libmpi.so.40.
#
# usage: bench/gpu/pack.sh BUILD_DIR [OUT_DIR=.gpu]
#   BUILD_DIR: a CUDA configuration (scripts/lib/deps.sh: aviary_configure_cuda), Release
# The pack must stay under the device tool's 64 MiB: the size is checked.
set -euo pipefail
build=${1:?usage: pack.sh BUILD_DIR [OUT_DIR]}
out=${2:-.gpu}
programs=(aviary aviary-worker train_step_bench frontend_bench loader_bench)
# The programs are in BUILD_DIR/bin, the benchmarks in BUILD_DIR/bench.
path_of() { if [ -x "$build/bin/$1" ]; then echo "$build/bin/$1"; else echo "$build/bench/$1"; fi; }
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/mpi-lib"
for p in "${programs[@]}"; do
  src=$(path_of "$p")
  [ -x "$src" ] || { echo "pack.sh: $src is missing (build it first)" >&2; exit 1; }
  strip --strip-unneeded -o "$out/bin/$p" "$src"
done
# Host-provided: torch (and the libraries of its wheel), CUDA, the C/C++ runtime.
host='^(libtorch|libc10|libcaffe2|libgomp|libcu(da|dart|blas|dnn|fft|file|pti|rand|sparse|solver)|libnv|libnccl|libcudnn|libshm|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|ld-linux|libstdc\+\+|libgcc_s|linux-vdso)'
mpi='^(libmpi\.so|libopen-rte|libopen-pal|libpmix|libhwloc|libevent|libudev|libltdl)'
declare -A seen=()
for p in "${programs[@]}"; do
  while read -r name path; do
    [ -n "$path" ] && [ -f "$path" ] || continue
    [ -n "${seen[$name]:-}" ] && continue
    seen[$name]=1
    if [[ $name =~ $host ]]; then continue; fi
    if [[ $name =~ $mpi ]]; then cp -L "$path" "$out/mpi-lib/$name"; else cp -L "$path" "$out/lib/$name"; fi
  done < <(ldd "$(path_of "$p")" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}')
done
strip --strip-unneeded "$out"/lib/*.so* "$out"/mpi-lib/*.so* 2>/dev/null || true
size=$(du -sm "$out" | cut -f1)
echo "pack.sh: $out holds ${#programs[@]} programs, $(ls "$out/lib" | wc -l) libraries, $(ls "$out/mpi-lib" | wc -l) MPI libraries: ${size} MiB"
# The device call carries the pack with the tracked tree, 64 MiB in all (and a MiB to spare).
repo=$(cd "$(dirname "$0")/../.." && pwd)
tree=$(cd "$repo" && git ls-files -z 2>/dev/null | du -cm --files0-from=- 2>/dev/null | tail -1 | cut -f1)
limit=$(( 63 - ${tree:-5} ))
if [ "$size" -gt "$limit" ]; then
  echo "pack.sh: ${size} MiB is over the ${limit} MiB the device call leaves for it (64 MiB less the ${tree:-5} MiB tracked tree, less 1)" >&2
  exit 1
fi
