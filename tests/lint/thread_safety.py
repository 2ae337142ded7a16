#!/usr/bin/env python3
"""clang's -Wthread-safety over the translation units whose locking is annotated
(absl::Mutex + ABSL_GUARDED_BY / ABSL_EXCLUSIVE_LOCKS_REQUIRED): the token sets, the scheduler and its fold cache, the
coordinator's metrics, the worker group's coordinator link, metrics and report buffer, and the
batch loader.

It reuses the gcc build's compile commands (compile_commands.json) with clang++ in -fsyntax-only
mode, so CI adds an analysis pass, not a third build. Any thread-safety warning fails.

usage: thread_safety.py BUILD_DIR [SOURCE ...]   (default: the annotated sources)
"""
import json
import os
import shlex
import shutil
import subprocess
import sys

ANNOTATED = [
    "coordinator/auth.cc",
    "coordinator/fold_cache.cc",
    "coordinator/scheduler.cc",
    "coordinator/scheduler_experiments.cc",
    "coordinator/metrics.cc",
    "worker/agent/coordinator_link.cc",
    "worker/agent/group_metrics.cc",
    "worker/agent/lease_clock.cc",
    "worker/agent/report_buffer.cc",
    "worker/agent/stall_watchdog.cc",
    "worker/loader.cc",
]
# gcc-only flags clang rejects or that point at gcc's precompiled header.
DROP_PREFIXES = ("-Winvalid-pch", "-fno-semantic-interposition")


def clang_command(entry, clang):
    args = shlex.split(entry["command"]) if "command" in entry else list(entry["arguments"])
    # The launcher (ccache through cmake -E env ...) comes before the compiler: start at g++/c++.
    for i, a in enumerate(args):
        if os.path.basename(a) in ("c++", "g++", "x86_64-linux-gnu-g++", "g++-12"):
            args = args[i + 1:]
            break
    out = [clang, "-fsyntax-only", "-Wthread-safety", "-Werror=thread-safety", "-Wno-unknown-warning-option",
           "-Wno-ignored-optimization-argument", "-Wno-unused-command-line-argument"]
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MF", "-MT", "-MQ"):
            skip = True
            continue
        if a in ("-c", "-MD", "-MMD") or a.startswith(DROP_PREFIXES):
            continue
        if a == "-include" or a == "-Xclang":
            skip = True  # gcc's precompiled header (cmake_pch.hxx): clang reads the headers itself
            continue
        if a.startswith("-include"):
            continue
        if a.startswith("-W") and not a.startswith(("-Wl,", "-Wno-")):
            continue  # gcc's warning set; only thread safety matters here
        out.append(a)
    return out


def main():
    build = os.path.abspath(sys.argv[1])
    wanted = sys.argv[2:] or ANNOTATED
    clang = shutil.which("clang++") or shutil.which("clang++-14")
    if not clang:
        print("thread_safety: clang++ is not installed (scripts/test.sh installs Debian's clang)")
        return 77
    with open(os.path.join(build, "compile_commands.json")) as f:
        db = json.load(f)
    failures = 0
    for rel in wanted:
        entries = [e for e in db if os.path.normpath(e["file"]).endswith(os.path.normpath(rel))]
        if not entries:
            print(f"FAIL: {rel} is not in {build}/compile_commands.json")
            failures += 1
            continue
        e = entries[0]
        cmd = clang_command(e, clang)
        p = subprocess.run(cmd, cwd=e["directory"], capture_output=True, text=True)
        if p.returncode != 0:
            failures += 1
            print(f"FAIL: {rel}\n{p.stderr[-6000:]}")
        else:
            print(f"ok: {rel}")
    print(f"thread_safety: {len(wanted) - failures} clean, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
