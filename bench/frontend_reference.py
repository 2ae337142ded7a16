#!/usr/bin/python3
"""torchaudio's mel front end, timed the way bench/frontend_bench.cc times aviary's.

MelSpectrogram(32 kHz, n_fft 2028, hop 835, 20-16000 Hz, 128 mels, power 2, htk, norm=None)
+ AmplitudeToDB(power, top_db 80) per clip + the notebook's z-score/min-max per clip + tiling to
3 channels (materialised, as aviary's output is), on the same shapes.

usage: frontend_reference.py [--device cpu|cuda] [BATCH] [SECONDS] [REPEATS] [THREADS...]
On CUDA the input is on the device and each timing ends with torch.cuda.synchronize().
"""
import math
import sys
import time

import torch

from notebook_frontend import NotebookFrontEnd

args = sys.argv[1:]
device = "cpu"
if len(args) >= 2 and args[0] == "--device":
    device, args = args[1], args[2:]
batch = int(args[0]) if len(args) > 0 else 32
seconds = float(args[1]) if len(args) > 1 else 10.0
repeats = int(args[2]) if len(args) > 2 else 10
threads = [int(t) for t in args[3:]] or [1, 2]
cuda = device == "cuda"

front_end = NotebookFrontEnd(device)


def sync():
    if cuda:
        torch.cuda.synchronize()


samples = int(seconds * 32000)
g = torch.Generator().manual_seed(0)
x = torch.randn(batch, samples, generator=g) * 0.05
x += 0.3 * torch.sin(torch.arange(samples, dtype=torch.float32) * (2 * math.pi * 2000.0 / 32000))
x = x.to(device)
with torch.no_grad():
    for t in threads:
        torch.set_num_threads(t)
        for _ in range(2):
            front_end(x)
        sync()
        ms = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            front_end(x)
            sync()
            ms.append((time.perf_counter() - t0) * 1000)
        ms.sort()
        med = ms[len(ms) // 2]
        print(f"device={device} threads={t} batch={batch} seconds={seconds} reference_ms={med:.2f} "
              f"reference_clips_per_s={batch * 1000 / med:.1f}")
