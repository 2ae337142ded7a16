#!/usr/bin/env python3
"""Self time per operator from a chrome trace written by the autograd profiler.

Reads the trace of bench/train_step_bench --profile FILE (torch::autograd::profiler::
RecordProfile) or of bench/train_step_reference.py --profile FILE (torch.profiler), nests each
thread's complete ("X") events by time, and prints the operators with the most self time (own
duration minus the durations of the events nested in it), with their share of the total.

usage: profile_summary.py TRACE.json [TOP]
"""
import collections
import json
import sys

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
with open(path) as f:
    data = json.load(f)
events = data["traceEvents"] if isinstance(data, dict) else data
by_thread = collections.defaultdict(list)
for e in events:
    if e.get("ph") == "X" and "dur" in e and e.get("cat", "cpu_op") in ("cpu_op", "Operator", "operator", ""):
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
self_us = collections.Counter()
calls = collections.Counter()
for evs in by_thread.values():
    evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
    stack = []  # [end, name, child_time]
    def close(item):
        end, name, child, dur = item
        self_us[name] += max(0.0, dur - child)
    for e in evs:
        ts, dur = float(e["ts"]), float(e["dur"])
        while stack and stack[-1][0] <= ts:
            close(stack.pop())
        if stack:
            stack[-1][2] += dur
        stack.append([ts + dur, e["name"], 0.0, dur])
        calls[e["name"]] += 1
    while stack:
        close(stack.pop())
total = sum(self_us.values()) or 1.0
print(f"{'operator':<48} {'calls':>7} {'self ms':>10} {'share':>7}")
for name, us in self_us.most_common(top):
    print(f"{name[:48]:<48} {calls[name]:>7} {us / 1000:>10.1f} {100 * us / total:>6.1f}%")
print(f"{'total':<48} {sum(calls.values()):>7} {total / 1000:>10.1f}")
