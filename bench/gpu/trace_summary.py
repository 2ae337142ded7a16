#!/usr/bin/env python3
"""How busy the GPU was, and where the host waited, in a torch profiler chrome trace.

Reads the trace `aviary-worker train` writes under AVIARY_PROFILE="out=FILE,skip=K,steps=N"
(worker/trainer.cc; kineto's format, as torch.profiler's export_chrome_trace) and prints
key=value lines for bench/gpu/acceptance.sh:
  span_ms          the profiled wall time: the first CPU operator's start to the last event's end
  device_events    kernels, copies and memsets on the device (0: a CPU run or no CUPTI)
  gpu_busy_pct     the share of the span in which at least one of them ran (all streams)
  kernel_busy_pct  the same for kernels alone (copies on a stream of their own may overlap them)
  copy_ms          the device copies' total time (host to device, device to host, ...)
  host_sync_ms     the time the host spent in CUDA calls that wait for the device
                   (cuda*Synchronize, and cudaMemcpy without Async), per profiled step with --steps
  host_sync_calls  their counts by name; top_kernels the kernels with the most device time
On a trace without device events it prints device_events=0 and the span only.

usage: trace_summary.py TRACE.json [--steps N]
"""
import argparse
import collections
import json
import sys

DEVICE = ("kernel", "gpu_memcpy", "gpu_memset")
RUNTIME = ("cuda_runtime", "cuda_driver")


def union_us(intervals):
    """The total length of the union of [start, end) intervals."""
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def waits(name):
    """A CUDA runtime call that blocks the host until the device has done queued work."""
    return "Synchronize" in name or name in ("cudaMemcpy", "cuMemcpy", "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2")


def summarize(events, steps):
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    iv = lambda e: (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
    cpu = [iv(e) for e in complete if e.get("cat") == "cpu_op"]
    dev = [e for e in complete if e.get("cat") in DEVICE]
    out = collections.OrderedDict()
    if not cpu and not dev:
        raise ValueError("no CPU operators and no device events: not a profiler trace of a training run")
    start = min(s for s, _ in cpu) if cpu else min(iv(e)[0] for e in dev)
    end = max([e for _, e in cpu] + [iv(e)[1] for e in dev])
    span = max(end - start, 1e-9)
    out["span_ms"] = f"{span / 1000:.1f}"
    out["device_events"] = str(len(dev))
    if not dev:
        return out
    out["gpu_busy_pct"] = f"{100 * union_us([iv(e) for e in dev]) / span:.1f}"
    out["kernel_busy_pct"] = f"{100 * union_us([iv(e) for e in dev if e.get('cat') == 'kernel']) / span:.1f}"
    out["copy_ms"] = f"{sum(float(e['dur']) for e in dev if e.get('cat') == 'gpu_memcpy') / 1000:.1f}"
    sync = [e for e in complete if e.get("cat") in RUNTIME and waits(e.get("name", ""))]
    sync_us = sum(float(e["dur"]) for e in sync)
    per = max(steps, 1)
    out["host_sync_ms"] = f"{sync_us / 1000 / per:.2f}" + (" per step" if steps > 0 else "")
    calls = collections.Counter(e.get("name", "?") for e in sync)
    out["host_sync_calls"] = ", ".join(f"{n} x{c}" for n, c in calls.most_common(4)) or "none"
    by_kernel = collections.Counter()
    for e in dev:
        if e.get("cat") == "kernel":
            by_kernel[e.get("name", "?")[:60]] += float(e["dur"])
    out["top_kernels"] = "; ".join(f"{n} {t / 1000:.1f} ms" for n, t in by_kernel.most_common(3))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=0, help="profiled optimizer steps (per-step host_sync_ms)")
    args = ap.parse_args()
    try:
        with open(args.trace) as f:
            data = json.load(f)
        events = data["traceEvents"] if isinstance(data, dict) else data
        out = summarize(events, args.steps)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"trace_summary.py: {args.trace}: {e}", file=sys.stderr)
        return 1
    for k, v in out.items():
        print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
