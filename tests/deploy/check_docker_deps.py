#!/usr/bin/python3
"""Checks that deploy/docker/Dockerfile provides every build dependency of CMakeLists.txt.

  check_docker_deps.py REPO

Each find_package / pkg_check_modules of the top-level CMakeLists.txt must be met by a package
that the Dockerfile installs (apt-get install) or downloads (apt-get download): a dependency
added to the build and not to the image fails `docker build` at cmake's configure step, which a
host without Docker cannot see. A dependency missing from the table below is a failure too, so
a new one gets a package here and in the Dockerfile. Exit 0 when all hold, 1 with one line per
problem otherwise, 2 for bad arguments.
"""
import os
import re
import sys

# The package (Debian 12 or Ubuntu 24.04 name) for each dependency; None: nothing to install
# (libc, the PyTorch wheel, the tests' GTest: the image builds with AVIARY_BUILD_TESTS=OFF).
PACKAGES = {
    "PkgConfig": "pkg-config", "Threads": None, "ZLIB": "zlib1g-dev", "absl": "libabsl-dev",
    "yaml-cpp": "libyaml-cpp-dev", "CLI11": "libcli11-dev", "spdlog": "libspdlog-dev",
    "SQLite3": "libsqlite3-dev", "prometheus-cpp": "prometheus-cpp-dev",
    "civetweb": "libcivetweb-dev", "OpenSSL": "libssl-dev", "MPI": "libopenmpi-dev",
    "Torch": None, "GTest": None, "grpc++": "libgrpc++-dev", "protobuf": "libprotobuf-dev",
    "sndfile": "libsndfile1-dev", "cairo": "libcairo2-dev", "soxr": "libsoxr-dev",
}


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    cmake_path = os.path.join(argv[1], "CMakeLists.txt")
    docker_path = os.path.join(argv[1], "deploy", "docker", "Dockerfile")
    try:
        with open(cmake_path, encoding="utf-8") as f:
            cmake = "\n".join(line.split("#", 1)[0] for line in f)
        with open(docker_path, encoding="utf-8") as f:
            docker = "\n".join(line for line in f if not line.lstrip().startswith("#"))
    except OSError as e:
        print(f"FAIL: {e}")
        return 1
    deps = re.findall(r"find_package\(\s*([A-Za-z0-9_+-]+)", cmake)
    deps += re.findall(r"pkg_check_modules\(\s*\w+[^)]*?IMPORTED_TARGET\s+([A-Za-z0-9_+.-]+)", cmake)
    words = set(re.findall(r"[A-Za-z0-9_.+-]+", docker))
    problems = []
    for d in deps:
        if d not in PACKAGES:
            problems.append(f"{cmake_path} needs '{d}': no package known for it (add it to PACKAGES in {argv[0]})")
        elif PACKAGES[d] is not None and PACKAGES[d] not in words:
            problems.append(f"{cmake_path} needs '{d}' (package {PACKAGES[d]}), which {docker_path} does not install")
    for p in problems:
        print(f"FAIL: {p}")
    print(f"{len(deps)} build dependencies checked against {docker_path}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
