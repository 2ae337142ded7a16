#!/usr/bin/env python3
"""Runs each command line N times as a separate process (as a shell would), in alternating
order, and prints per command the median and p90 wall time and the median and max peak memory
(ru_maxrss of the process, from wait4).

usage: client_bench.py N LABEL=CMD [LABEL=CMD ...]   (CMD is split on spaces)
"""
import os
import statistics
import subprocess
import sys
import time


def run_once(argv):
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # stderr is read to its end before waiting, as communicate() does (a child that writes more
    # than a pipe holds would block on a full pipe while we wait for it); communicate() itself
    # would reap the child, and wait4 is what gives its ru_maxrss.
    with p.stderr:
        err = p.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {p.returncode}: {err.strip()}")
    return wall, usage.ru_maxrss / 1024.0  # KiB -> MiB


def main():
    n = int(sys.argv[1])
    commands = []
    for spec in sys.argv[2:]:
        label, cmd = spec.split("=", 1)
        commands.append((label, cmd.split()))
    results = {label: [] for label, _ in commands}
    for label, argv in commands:  # one warm-up each (page cache, the coordinator's first call)
        run_once(argv)
    for i in range(n):
        order = commands if i % 2 == 0 else list(reversed(commands))
        for label, argv in order:
            results[label].append(run_once(argv))
    print(f"{'command':<28} {'runs':>4} {'median ms':>10} {'p90 ms':>8} {'median MiB':>11} {'max MiB':>8}")
    for label, _ in commands:
        walls = sorted(w for w, _ in results[label])
        rss = [r for _, r in results[label]]
        p90 = walls[min(len(walls) - 1, int(0.9 * len(walls)))]
        print(f"{label:<28} {len(walls):>4} {statistics.median(walls) * 1e3:>10.1f} {p90 * 1e3:>8.1f} "
              f"{statistics.median(rss):>11.1f} {max(rss):>8.1f}")


if __name__ == "__main__":
    main()
