# Installs aviary's Debian 12 packages when they are missing (sourced by test.sh and demo.sh).
# apt-get update runs at most once, and only when something has to be installed.

AVIARY_BUILD_PACKAGES=(
  cmake ninja-build g++ pkg-config ccache zlib1g-dev
  libtorch-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  prometheus-cpp-dev libspdlog-dev libyaml-cpp-dev libsqlite3-dev
  libopenmpi-dev openmpi-bin
  libsndfile1-dev libsoxr-dev
  libgtest-dev libgmock-dev
)
# References the parity tests compare against (python under /usr/bin/python3; ffmpeg and sox
# for the audio decode and resampling tests), and what the service tests drive: a real
# Prometheus server (and promtool for the deploy files), curl, the sqlite3 shell, openssl for
# a TLS certificate.
AVIARY_TEST_PACKAGES=(python3 python3-numpy python3-pandas python3-sklearn python3-torch
                      python3-torchaudio python3-torchvision ffmpeg sox
                      prometheus curl sqlite3 openssl)

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
    $sudo apt-get update -q
    AVIARY_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Configures ${AVIARY_BUILD_DIR:-build} (extra arguments go to cmake).
aviary_configure() {
  cmake -S . -B "${AVIARY_BUILD_DIR:-build}" -G Ninja -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-RelWithDebInfo} "$@"
}

# Builds the given targets (all when none) with every core.
aviary_build_targets() {
  local args=()
  local t
  for t in "$@"; do args+=(--target "$t"); done
  cmake --build "${AVIARY_BUILD_DIR:-build}" -j "$(nproc)" "${args[@]}"
}
