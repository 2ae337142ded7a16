# Installs aviary's Debian 12 packages when they are missing (sourced by test.sh and demo.sh).
# apt-get update runs at most once, and only when something has to be installed.

AVIARY_BUILD_PACKAGES=(
  cmake ninja-build g++ pkg-config ccache zlib1g-dev dpkg-dev file  # cpack: dpkg-shlibdeps, file
  libtorch-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libc-ares-dev libre2-dev libssl-dev  # their static archives: the aviary client
  prometheus-cpp-dev libspdlog-dev libyaml-cpp-dev libsqlite3-dev
  libcivetweb-dev libjs-dygraphs  # the web console: its HTTP server and its charts (served at run time)
  libopenmpi-dev openmpi-bin
  libsndfile1-dev libsoxr-dev
  libcairo2-dev fonts-dejavu-core  # the plots (common/plot.h): cairo, and the font it draws text in
  libgtest-dev libgmock-dev
  libcli11-dev
)
# References the parity tests compare against (python under /usr/bin/python3; ffmpeg and sox
# for the audio decode and resampling tests), and what the service tests drive: a real
# Prometheus server (and promtool for the deploy files), curl, the sqlite3 shell, openssl for
# a TLS certificate.
AVIARY_TEST_PACKAGES=(python3 python3-numpy python3-pandas python3-sklearn python3-torch
                      python3-torchaudio python3-torchvision python3-soundfile ffmpeg sox
                      prometheus curl sqlite3 openssl
                      iproute2 iptables  # ctest integration.service_netns: network namespaces, partitions
                      clang  # clang: -Wthread-safety over the annotated sources (ctest lint.thread_safety)
                      shellcheck  # the deploy, test and build scripts (ctest deploy.checks)
                      procps  # ps, pgrep, pkill (service tests, deploy.checks): not in a minimal image
                      systemd  # systemd-analyze verify of the units (deploy.checks)
                      chromium chromium-driver python3-selenium)  # ctest integration.console_browser

aviary_install_packages() {
  local missing=()
  local p
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  echo "aviary: installing ${missing[*]}"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  if [ -z "${AVIARY_APT_UPDATED:-}" ]; then
    # apt-get update takes the lists' lock, which a fresh machine's apt-daily may hold at boot,
    # and DPkg::Lock::Timeout does not cover it: while the lock is held, again every 10 s for up
    # to 10 minutes; any other failure ends here.
    local tries=0 out
    until out=$($sudo apt-get -o DPkg::Lock::Timeout=600 update -q 2>&1); do
      echo "$out" >&2
      tries=$((tries + 1))
      if ! grep -qiE "could not get lock|unable to lock" <<<"$out" || [ "$tries" -ge 60 ]; then
        echo "aviary: apt-get update failed" >&2
        return 1
      fi
      echo "aviary: the apt lists' lock is held; apt-get update again in 10 s" >&2
      sleep 10
    done
    echo "$out"
    AVIARY_APT_UPDATED=1
  fi
  # A fresh machine's unattended-upgrades may hold dpkg's lock for a while: wait for it.
  # DEBIAN_FRONTEND through env, after sudo: sudo's env_reset drops it from sudo's own environment.
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
}

# Configures ${AVIARY_BUILD_DIR:-build} (extra arguments go to cmake). Release, like the CUDA
# configuration: the two builds then compile the torch-free sources with the same flags, and
# ccache (CCACHE_BASEDIR, no hash of the build folder: see CMakeLists.txt) compiles them once.
aviary_configure() {
  cmake -S . -B "${AVIARY_BUILD_DIR:-build}" -G Ninja -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release} "$@"
}

# Builds the given targets (all when none) with every core.
aviary_build_targets() {
  local args=()
  local t
  for t in "$@"; do args+=(--target "$t"); done
  cmake --build "${AVIARY_BUILD_DIR:-build}" -j "$(nproc)" "${args[@]}"
}

# The CUDA configuration: PyTorch's CUDA libtorch from PyPI's torch wheel, the version the GPU
# hosts run (PyTorch 2.11, CUDA 13.0), in a virtualenv outside the source tree that is reused
# when present. gRPC, protobuf, prometheus-cpp, spdlog, sndfile, soxr, yaml-cpp, sqlite and
# OpenMPI still come from Debian. The wheel's CUDA runtime libraries (cudart, cuBLAS, cuDNN,
# NCCL, cuFFT, ...) come from the CUDA 13 toolkit under /usr/local/cuda rather than PyPI's
# nvidia-* wheels (about 3 GB); only the three the toolkit lacks (cuSPARSELt, NVSHMEM, cuFile)
# are installed from PyPI, at the versions torch 2.11.0 pins. torchvision and torchaudio are the
# references of the benchmarks against PyTorch on the same libtorch.
AVIARY_CUDA_PACKAGES=(python3-venv python3-dev)  # the venv; torch.compile's C++ needs Python.h
AVIARY_TORCH_VERSION=2.11.0
AVIARY_TORCH_PIP_PACKAGES=(
  "torch==${AVIARY_TORCH_VERSION}" torchvision==0.26.0 torchaudio==2.11.0
  nvidia-cusparselt-cu13==0.8.0 nvidia-nvshmem-cu13==3.4.5 nvidia-cufile==1.15.1.6
  filelock==4.3.1 fsspec==2026.9.0 Jinja2==3.1.6 MarkupSafe==3.0.4 mpmath==1.4.1
  networkx==3.6.1 numpy==2.4.6 pillow==13.0.0 sympy==1.14.0 typing_extensions==4.16.0
)
AVIARY_TORCH_VENV=${AVIARY_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/aviary/torch-${AVIARY_TORCH_VERSION}-cu130}

# pip install of pinned wheels into the venv, tried three times: pip retries a connection, not a
# read that fails partway through a wheel of hundreds of MB.
aviary_pip_install() {
  local try
  for try in 1 2 3; do
    if "${AVIARY_TORCH_VENV}/bin/pip" install -q --no-deps --no-compile --disable-pip-version-check \
      --only-binary=:all: --retries 10 --timeout 60 "$@"; then
      return 0
    fi
    [ "$try" = 3 ] && break
    echo "aviary: pip install failed (try $try of 3); again in $((try * 20)) s" >&2
    sleep $((try * 20))
  done
  echo "aviary: pip install $* failed three times" >&2
  return 1
}

# Creates (once) the virtualenv with the CUDA torch wheel; prints nothing. The venv's python is
# ${AVIARY_TORCH_VENV}/bin/python.
aviary_torch_venv() {
  local stamp="${AVIARY_TORCH_VENV}/.aviary-complete"
  if [ -f "$stamp" ] && cmp -s "$stamp" <(printf '%s\n' "${AVIARY_TORCH_PIP_PACKAGES[@]}"); then
    return 0
  fi
  aviary_install_packages python3-venv
  echo "aviary: installing PyTorch ${AVIARY_TORCH_VERSION} (CUDA 13.0 wheel) into ${AVIARY_TORCH_VENV}"
  rm -rf "${AVIARY_TORCH_VENV}"
  /usr/bin/python3 -m venv "${AVIARY_TORCH_VENV}"
  # --no-deps: the pins above are the whole set (not the nvidia-* wheels the toolkit provides).
  aviary_pip_install "${AVIARY_TORCH_PIP_PACKAGES[@]}"
  printf '%s\n' "${AVIARY_TORCH_PIP_PACKAGES[@]}" >"$stamp"
}

# onnxruntime (PyPI; Debian ships none) in the same venv, for the ONNX export's test
# (tests/integration/check_onnx.py, ctest integration.onnx_vs_predict). Its own stamp, so adding it does
# not reinstall torch. --no-deps: at inference it needs numpy only, which the venv has.
AVIARY_ONNXRUNTIME_PIP_PACKAGES=(onnxruntime==1.32.0)
aviary_onnxruntime() {
  aviary_torch_venv
  local stamp="${AVIARY_TORCH_VENV}/.aviary-onnxruntime"
  if [ -f "$stamp" ] && cmp -s "$stamp" <(printf '%s\n' "${AVIARY_ONNXRUNTIME_PIP_PACKAGES[@]}"); then
    return 0
  fi
  aviary_pip_install "${AVIARY_ONNXRUNTIME_PIP_PACKAGES[@]}"
  printf '%s\n' "${AVIARY_ONNXRUNTIME_PIP_PACKAGES[@]}" >"$stamp"
}

# torch's package folder in the venv (what CMAKE_PREFIX_PATH needs: TorchConfig.cmake under
# share/cmake and the libraries under lib, ahead of Debian's libtorch). Not
# torch.utils.cmake_prefix_path (share/cmake alone): with it, TorchConfig's find_library takes
# /usr/lib's libtorch 1.13 when libtorch-dev is installed, as it is here.
aviary_torch_dir() {
  local d
  for d in "${AVIARY_TORCH_VENV}"/lib/python3*/site-packages/torch; do
    [ -f "$d/share/cmake/Torch/TorchConfig.cmake" ] && { echo "$d"; return 0; }
  done
  echo "aviary: no torch package in ${AVIARY_TORCH_VENV}" >&2
  return 1
}

# Configures the CUDA configuration in ${AVIARY_CUDA_BUILD_DIR:-build-cuda} against the venv's
# torch (Release: what GPU hosts run; the reference python of the benchmarks and of the GPU
# acceptance dry run is the venv's). Extra arguments go to cmake.
aviary_configure_cuda() {
  local torch_dir
  torch_dir=$(aviary_torch_dir) || return 1
  cmake -S . -B "${AVIARY_CUDA_BUILD_DIR:-build-cuda}" -G Ninja -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release} \
    -DCMAKE_PREFIX_PATH="$torch_dir" -DAVIARY_WITH_CUDA=ON \
    -DAVIARY_REFERENCE_PYTHON="${AVIARY_TORCH_VENV}/bin/python" "$@"
}
