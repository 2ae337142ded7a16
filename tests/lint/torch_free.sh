#!/usr/bin/env bash
# Fails naming each program that loads libtorch or libc10 (ldd: direct or through another
# library). Its arguments are the programs of the tests labelled torch-free (tests/CMakeLists.txt),
# which scripts/test-cuda.sh does not run again because their code is the same in both builds.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: torch_free.sh PROGRAM..." >&2; exit 2; }
bad=0
for program in "$@"; do
  if ! deps=$(ldd "$program" 2>&1); then
    echo "torch_free: ldd $program failed: $deps" >&2
    bad=1
    continue
  fi
  if torch=$(grep -E 'lib(torch|c10)[^ ]*\.so' <<<"$deps"); then
    echo "torch_free: $program is labelled torch-free but loads libtorch:" >&2
    echo "$torch" >&2
    bad=1
  fi
done
[ "$bad" -eq 0 ] && echo "torch_free: $# programs load no libtorch"
exit "$bad"
