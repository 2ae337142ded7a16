# shellcheck shell=bash
# Sourced by bench scripts whose reference runs PyTorch from Python against a build's libtorch
# (bench/frontend_bench.sh, bench/predict_bench.sh): the comparison means something only when
# both sides run the same torch version.
#
# reference_python BUILD_DIR: prints the python to run the reference with, $PYTHON if set, else
# /usr/bin/python3 (Debian's torch 1.13, what `build/` links); exits 2 with a message when that
# python's torch is not the version of BUILD_DIR's libtorch (its CMakeCache's Torch_DIR), e.g.
#   PYTHON=/usr/bin/python3 bench/frontend_bench.sh build ...
#   PYTHON="$AVIARY_TORCH_VENV/bin/python" bench/frontend_bench.sh build-cuda ...
reference_python() {
  local build=$1 py=${PYTHON:-/usr/bin/python3} torch_dir want have
  torch_dir=$(sed -n 's/^Torch_DIR:PATH=//p' "$build/CMakeCache.txt" 2>/dev/null)
  want=$(sed -n 's/^set(PACKAGE_VERSION "\(.*\)")$/\1/p' "$torch_dir/TorchConfigVersion.cmake" 2>/dev/null)
  if [ -z "$want" ]; then
    echo "$(basename "$0"): cannot tell the libtorch version of $build (no Torch_DIR in $build/CMakeCache.txt or no TorchConfigVersion.cmake there)" >&2
    exit 2
  fi
  have=$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null) || {
    echo "$(basename "$0"): $py cannot import torch (set PYTHON to the python whose torch is $build's libtorch $want)" >&2
    exit 2
  }
  # 1.13.0a0 (Debian) and 2.11.0+cu130 (the wheel) are 1.13.0 and 2.11.0.
  if [ "$(sed -E 's/^([0-9]+\.[0-9]+\.[0-9]+).*/\1/' <<<"$have")" != "$(sed -E 's/^([0-9]+\.[0-9]+\.[0-9]+).*/\1/' <<<"$want")" ]; then
    echo "$(basename "$0"): $py has torch $have but $build links libtorch $want: the two sides would run different torch versions (set PYTHON to the matching python)" >&2
    exit 2
  fi
  echo "$py"
}
