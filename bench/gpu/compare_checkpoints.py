#!/usr/bin/env python3
"""Are two aviary run folders the same run? (bench/gpu/acceptance.sh, exact resume)

Compares history.csv (every column but samples_per_s, which is wall time) and the tensors of
last.pt and best.pt: every part's parameters and buffers (the model, the optimizer state, the
EMA state, ...), bit for bit.
Prints what differs and the largest absolute difference; exit status 0 when identical.

usage: compare_checkpoints.py RUN_A RUN_B
"""
import csv
import os
import sys

import torch


def history(run):
    with open(os.path.join(run, "history.csv")) as f:
        return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(f)]


def tensors(path):
    archive = torch.jit.load(path, map_location="cpu")
    out = {}
    for part, module in archive.named_children():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            out[f"{part}/{name}"] = t.detach()
    return out


a, b = sys.argv[1], sys.argv[2]
problems = []
ha, hb = history(a), history(b)
if ha != hb:
    for i, (ra, rb) in enumerate(zip(ha, hb)):
        if ra != rb:
            problems.append(f"history.csv row {i}: {ra} != {rb}")
            break
    if len(ha) != len(hb):
        problems.append(f"history.csv: {len(ha)} rows vs {len(hb)}")
worst = 0.0
for name in ("last.pt", "best.pt"):
    ta, tb = tensors(os.path.join(a, name)), tensors(os.path.join(b, name))
    if ta.keys() != tb.keys():
        problems.append(f"{name}: different tensors: {sorted(set(ta) ^ set(tb))[:5]}")
        continue
    if not ta:
        problems.append(f"{name}: no tensors found")
    for key in ta:
        x, y = ta[key], tb[key]
        # Equal, NaNs where the other has NaNs included (torch.equal takes two NaNs for different:
        # a diverged pair failed alike); infinities compare as themselves.
        nan_x = torch.isnan(x) if x.is_floating_point() else None
        same = x.shape == y.shape and x.dtype == y.dtype and (
            torch.equal(x, y) or (nan_x is not None and torch.equal(nan_x, torch.isnan(y))
                                  and torch.equal(x[~nan_x], y[~nan_x])))
        if not same:
            if x.shape != y.shape:
                d = float("inf")
            else:
                diff = (x.double() - y.double()).abs()
                # NaN on one side only: infinitely apart (max() kept 0 for a NaN difference).
                d = float("inf") if torch.isnan(diff).any() else diff.max().item()
            worst = max(worst, d)
            problems.append(f"{name}: {key} differs (max |diff| {d:.3g})")
for p in problems[:20]:
    print(p)
if problems:
    print(f"{len(problems)} differences, max |diff| {worst:.3g}")
    sys.exit(1)
print(f"identical: {len(ha)} history rows, last.pt and best.pt tensors")
