#!/usr/bin/python3
"""Checks that deploy/docker/Dockerfile provides every build dependency of CMakeLists.txt.

  check_docker_deps.py REPO [--cmake-config-root DIR]

Each find_package / pkg_check_modules of the top-level CMakeLists.txt must be met by a package
that the Dockerfile installs (apt-get install) or downloads (apt-get download): a dependency
added to the build and not to the image fails `docker build` at cmake's configure step, which a
host without Docker cannot see. A dependency missing from the table below is a failure too, so
a new one gets a package here and in the Dockerfile.

The Debian packages the Dockerfile downloads are unpacked (dpkg -x), not installed, so apt does
not bring their dependencies: the find_dependency(...) calls of their CMake config files must be
met by the Dockerfile too (prometheus-cpp's find_dependency(CURL) needs libcurl4-openssl-dev).
Those config files are read from this machine's installed copies of the same packages (`dpkg
-L`; the build here needs them installed), following the dependencies' own configs in turn;
--cmake-config-root DIR reads DIR/<CMake package name>/*onfig.cmake instead (the self-tests).

Exit 0 when all hold, 1 with one line per problem otherwise, 2 for bad arguments.
"""
import glob
import os
import re
import subprocess
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
    # Named by find_dependency in the downloaded packages' CMake configs: prometheus-cpp (push
    # is on in Debian's build: CURL), spdlog (fmt), civetweb (LibDl and LibRt: find modules it
    # ships, met by libc; WinSock: Windows only).
    "CURL": "libcurl4-openssl-dev", "fmt": "libfmt-dev", "LibDl": None, "LibRt": None, "WinSock": None,
}

FIND_DEPENDENCY = re.compile(r"^\s*find_dependency\s*\(\s*([A-Za-z0-9_+.-]+)", re.M)


def downloaded_packages(docker):
    """The package names after `apt-get download` (continuation lines joined; up to &&)."""
    joined = docker.replace("\\\n", " ")
    names = []
    for m in re.finditer(r"apt-get\s+download((?:\s+[A-Za-z0-9][A-Za-z0-9_.+:-]*)+)", joined):
        names += m.group(1).split()
    return names


def is_config(path):
    name = os.path.basename(path)
    return re.search(r"[Cc]onfig\.cmake$", name) is not None and "ersion" not in name


def config_files(package, cmake_name, config_root):
    """CMake config files of a package: from --cmake-config-root, else dpkg -L."""
    if config_root is not None:
        return sorted(p for p in glob.glob(os.path.join(config_root, cmake_name, "*.cmake")) if is_config(p))
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    except OSError as e:
        return f"dpkg -L {package}: {e}"
    if out.returncode != 0:
        return f"{package} is not installed on this machine (apt-get install {package}), so its CMake configs cannot be read"
    return sorted(p for p in out.stdout.split("\n") if "/cmake/" in p and is_config(p) and os.path.isfile(p))


def main(argv):
    args = argv[1:]
    config_root = None
    if len(args) == 3 and args[1] == "--cmake-config-root":
        config_root = args[2]
        args = args[:1]
    if len(args) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    repo = args[0]
    cmake_path = os.path.join(repo, "CMakeLists.txt")
    docker_path = os.path.join(repo, "deploy", "docker", "Dockerfile")
    try:
        with open(cmake_path, encoding="utf-8") as f:
            cmake = "\n".join(line.split("#", 1)[0] for line in f)
        with open(docker_path, encoding="utf-8") as f:
            docker = "".join(line for line in f if not line.lstrip().startswith("#"))
    except OSError as e:
        print(f"FAIL: {e}")
        return 1
    deps = re.findall(r"find_package\(\s*([A-Za-z0-9_+-]+)", cmake)
    deps += re.findall(r"pkg_check_modules\(\s*\w+[^)]*?IMPORTED_TARGET\s+([A-Za-z0-9_+.-]+)", cmake)
    words = set(re.findall(r"[A-Za-z0-9_.+-]+", docker))
    downloaded = set(downloaded_packages(docker))
    problems = []
    for d in deps:
        if d not in PACKAGES:
            problems.append(f"{cmake_path} needs '{d}': no package known for it (add it to PACKAGES in {argv[0]})")
        elif PACKAGES[d] is not None and PACKAGES[d] not in words:
            problems.append(f"{cmake_path} needs '{d}' (package {PACKAGES[d]}), which {docker_path} does not install")
    if not downloaded:
        problems.append(f"{docker_path}: no `apt-get download` list found")
    # The CMake configs of the downloaded packages that CMakeLists.txt finds in config mode, and
    # of their find_dependency names in turn (those found through a config of their own).
    config_deps = re.findall(r"find_package\(\s*([A-Za-z0-9_+-]+)[^)]*\bCONFIG\b", cmake)
    todo = [d for d in config_deps if PACKAGES.get(d) in downloaded]
    seen = set(todo)
    configs_read = 0
    while todo:
        name = todo.pop(0)
        files = config_files(PACKAGES[name], name, config_root)
        if isinstance(files, str):
            problems.append(files)
            continue
        if not files and name in config_deps:
            problems.append(f"no CMake config file of '{name}' (package {PACKAGES[name]}) found on this machine")
        for path in files:
            configs_read += 1
            with open(path, encoding="utf-8", errors="replace") as f:
                text = "\n".join(line.split("#", 1)[0] for line in f)
            for dep in FIND_DEPENDENCY.findall(text):
                if dep not in PACKAGES:
                    problems.append(f"{path} (package {PACKAGES[name]}, which {docker_path} unpacks) calls "
                                    f"find_dependency({dep}): no package known for it (add it to PACKAGES in {argv[0]})")
                elif PACKAGES[dep] is not None and PACKAGES[dep] not in words:
                    problems.append(f"{path} (package {PACKAGES[name]}, which {docker_path} unpacks) calls "
                                    f"find_dependency({dep}): needs package {PACKAGES[dep]}, which {docker_path} "
                                    "does not install (unpacked .debs bring no dependencies)")
                elif PACKAGES[dep] in downloaded and dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
    for p in problems:
        print(f"FAIL: {p}")
    print(f"{len(deps)} build dependencies and {configs_read} CMake configs of downloaded packages checked "
          f"against {docker_path}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
