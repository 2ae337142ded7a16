#!/usr/bin/env python3
"""bench/gpu/trace_summary.py on synthetic traces whose figures are known, and on a CPU one.

usage: check_trace_summary.py SOURCE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

script = os.path.join(sys.argv[1], "bench", "gpu", "trace_summary.py")
failures = 0


def summary(events, *flags):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"traceEvents": events}, f)
    p = subprocess.run([sys.executable, script, f.name, *flags], capture_output=True, text=True)
    os.unlink(f.name)
    return p.returncode, dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line), p.stderr


def check(cond, what):
    global failures
    print(("ok   " if cond else "FAIL ") + what)
    failures += 0 if cond else 1


X = lambda cat, name, ts, dur: {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}
# 1 ms of CPU operators; two overlapping kernels [0, 300) and [200, 500) us (union 500), a copy
# [600, 700) on another stream, a stream sync of 250 us and an async copy call (not a wait).
gpu = [X("cpu_op", "aten::conv2d", 0, 1000), X("kernel", "conv_fwd", 0, 300), X("kernel", "bn_fwd", 200, 300),
       X("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 600, 100),
       X("cuda_runtime", "cudaStreamSynchronize", 700, 250), X("cuda_runtime", "cudaMemcpyAsync", 10, 30)]
rc, out, err = summary(gpu, "--steps", "5")
check(rc == 0, f"a GPU trace is read (rc {rc} {err.strip()})")
check(out.get("device_events") == "3", f"3 device events: {out.get('device_events')}")
check(out.get("span_ms") == "1.0", f"the span is the CPU operators' 1 ms: {out.get('span_ms')}")
check(out.get("gpu_busy_pct") == "60.0", f"busy: the union of kernels and copy, 600 of 1000 us: {out.get('gpu_busy_pct')}")
check(out.get("kernel_busy_pct") == "50.0", f"kernels alone 500 of 1000 us: {out.get('kernel_busy_pct')}")
check(out.get("copy_ms") == "0.1", f"copies 0.1 ms: {out.get('copy_ms')}")
check(out.get("host_sync_ms") == "0.05 per step", f"the sync (not the async copy), per step of 5: {out.get('host_sync_ms')}")
check(out.get("host_sync_calls") == "cudaStreamSynchronize x1", f"sync calls: {out.get('host_sync_calls')}")
check(out.get("top_kernels", "").startswith("conv_fwd 0.3 ms"), f"top kernels: {out.get('top_kernels')}")

rc, out, _ = summary([X("cpu_op", "aten::add", 100, 2000), {"ph": "M", "name": "process_name"}])
check(rc == 0 and out.get("device_events") == "0" and "gpu_busy_pct" not in out and out.get("span_ms") == "2.0",
      f"a CPU trace: no device figures, the span only: {out}")
rc, out, err = summary([{"ph": "M", "name": "process_name"}])
check(rc == 1 and "not a profiler trace" in err, f"a trace without events is an error naming the file: {err.strip()}")
sys.exit(1 if failures else 0)
