#!/usr/bin/python3
"""worker/tools/npy against numpy itself: WriteNpy must produce the bytes numpy.save writes for the
same float32 C-order array, numpy.load must read them back, and ReadNpy must read numpy's files
(and refuse float64 and Fortran-order ones).

usage: check_npy.py NPY_TOOL
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

TOOL = sys.argv[1]
failures = []


def report(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}".rstrip())
    if not ok:
        failures.append(name)


SHAPES = [(3, 128, 384), (1, 3, 128, 384), (5,), (), (0,), (2, 0, 3), (7, 1), (123456789012, 0),
          tuple(range(1, 9))]

with tempfile.TemporaryDirectory() as tmp:
    for shape in SHAPES:
        ours = os.path.join(tmp, "ours.npy")
        theirs = os.path.join(tmp, "theirs.npy")
        subprocess.run([TOOL, "write", ours, *map(str, shape)], check=True)
        n = int(np.prod(shape, dtype=np.int64))
        ref = (0.25 * np.arange(n, dtype=np.float32) - 3.0).astype(np.float32).reshape(shape)
        np.save(theirs, ref)
        same_bytes = open(ours, "rb").read() == open(theirs, "rb").read()
        loaded = np.load(ours)
        report(f"shape {shape}: bytes == numpy.save, numpy.load reads it",
               same_bytes and loaded.shape == shape and loaded.dtype == np.float32
               and np.array_equal(loaded, ref),
               "" if same_bytes else
               f"\n  ours:   {open(ours, 'rb').read(128)!r}\n  theirs: {open(theirs, 'rb').read(128)!r}")
        out = subprocess.run([TOOL, "read", theirs], check=True, capture_output=True, text=True).stdout
        want = "shape" + "".join(f" {d}" for d in shape)
        got_shape, got_sum = out.splitlines()[0], float(out.splitlines()[1].split()[1])
        report(f"shape {shape}: ReadNpy reads numpy.save's file", got_shape == want and
               abs(got_sum - float(ref.astype(np.float64).sum())) <= 1e-6 * max(1.0, abs(got_sum)),
               f"[{out.strip()}]")
    for name, arr in [("float64", np.zeros((2, 3))), ("fortran", np.asfortranarray(np.zeros((2, 3), np.float32))),
                      ("big-endian", np.zeros((2, 3), dtype=">f4"))]:
        p = os.path.join(tmp, f"{name}.npy")
        np.save(p, arr)
        r = subprocess.run([TOOL, "read", p], capture_output=True, text=True)
        report(f"ReadNpy refuses {name}", r.returncode == 2 and "npy" in r.stderr, f"[{r.stderr.strip()}]")

if failures:
    print(f"{len(failures)} check(s) failed")
    sys.exit(1)
print("all npy checks passed")
