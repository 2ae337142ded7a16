#!/usr/bin/python3
"""The recipe's training step in PyTorch, timed the way bench/train_step_bench.cc times aviary's.

One step: waveform augmentation (per-sample gaussian noise, MixUp, CutMix), torchaudio's
MelSpectrogram + AmplitudeToDB + the notebook's z-score/min-max per clip + tiling to 3 channels,
SpecAugment (torchaudio's iid time and frequency masks), torchvision's EfficientNet, cross
entropy with label smoothing on the mixed targets, backward, Adam. With --input mel the step
starts at the model (random front-end-shaped input already on the device). channels_last (as
aviary's trainer, on every device; --channels-last off for PyTorch's default layout), bf16
autocast on CUDA, cuDNN's benchmark mode on CUDA (as aviary's trainer outside
train.deterministic; --cudnn-benchmark off for PyTorch's default), and --compile wraps the
model in torch.compile.

Runs under Debian's /usr/bin/python3 (torch 1.13, CPU) and under a venv with PyTorch 2.x.
Prints one line: key=value pairs (reference_samples_per_s is the figure to compare).

usage: train_step_reference.py [--device cpu|cuda] [--model efficientnet_b0] [--batch 16]
       [--seconds 5] [--classes 182] [--input wave|mel] [--steps 10] [--warmup 3] [--rounds 1]
       [--threads N] [--compile [--compile-backend inductor]] [--precision auto|fp32|bf16] [--channels-last auto|on|off]
       [--cudnn-benchmark auto|on|off] [--profile TRACE.json]
"""
import argparse
import contextlib
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchaudio
import torchvision

from notebook_frontend import HOP, SAMPLE_RATE, NotebookFrontEnd

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu")
p.add_argument("--model", default="efficientnet_b0")
p.add_argument("--batch", type=int, default=16)
p.add_argument("--seconds", type=float, default=5.0)
p.add_argument("--classes", type=int, default=182)
p.add_argument("--input", choices=["wave", "mel"], default="wave")
p.add_argument("--steps", type=int, default=10)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--rounds", type=int, default=1)
p.add_argument("--threads", type=int, default=0)
p.add_argument("--compile", action="store_true")
p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (eager: tracing only)")
p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
p.add_argument("--cudnn-benchmark", choices=["auto", "on", "off"], default="auto", help="auto: on with CUDA")
p.add_argument("--profile", default="", help="write a chrome trace of one more round here")
a = p.parse_args()

if a.threads > 0:
    torch.set_num_threads(a.threads)
dev = torch.device(a.device)
cuda = dev.type == "cuda"
bf16 = cuda and a.precision != "fp32"
channels_last = a.channels_last != "off"  # auto: as aviary's trainer, NHWC on every device
fmt = torch.channels_last if channels_last else torch.contiguous_format
cudnn_benchmark = cuda and a.cudnn_benchmark != "off"
torch.backends.cudnn.benchmark = cudnn_benchmark
samples = int(a.seconds * SAMPLE_RATE)
frames = samples // HOP + 1

notebook = NotebookFrontEnd(dev)
time_mask = torchaudio.transforms.TimeMasking(25, iid_masks=True)
freq_mask = torchaudio.transforms.FrequencyMasking(10, iid_masks=True)


def front_end(x):
    with torch.no_grad():
        z = notebook.normalize(notebook.db(x))           # [B, 1, mels, frames]
        z = time_mask(time_mask(z))                      # 2 time masks, 1 frequency mask
        z = freq_mask(z)
        return notebook.tile(z, fmt)


def augment(x, y):
    b, t = x.shape
    with torch.no_grad():
        noise = (torch.rand(b, 1, device=dev) < 0.35 * 0.5).float()
        std = torch.empty(b, 1, device=dev).uniform_(0.0025, 0.025)
        x = x + noise * std * torch.randn_like(x)
        lam = float(torch.distributions.Beta(0.5, 0.5).sample())
        x = lam * x + (1 - lam) * x.roll(1, 0)
        y = lam * y + (1 - lam) * y.roll(1, 0)
        cut_lam = float(torch.distributions.Beta(2.5, 2.5).sample())
        n = int((1 - cut_lam) * t)
        start = int(torch.randint(0, t - n + 1, (1,)))
        x = x.clone()
        x[:, start:start + n] = x.roll(1, 0)[:, start:start + n]
        share = n / t
        y = (1 - share) * y + share * y.roll(1, 0)
    return x, y


model = getattr(torchvision.models, a.model)(num_classes=a.classes).to(dev)
model = model.to(memory_format=fmt)
# The fused kernel where aviary's step uses it (_fused_adam_: CUDA, and the CPU from torch 2.4 on,
# worker/optimizer.h): the default Adam would credit aviary with a faster optimizer kernel, not a
# faster step.
_torch_version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
opt = torch.optim.Adam(model.parameters(), lr=1e-3,
                       **({"fused": True} if dev.type == "cuda" or _torch_version >= (2, 4) else {}))
step_model = torch.compile(model, backend=a.compile_backend) if a.compile else model

g = torch.Generator().manual_seed(0)
wave = torch.randn(a.batch, samples, generator=g) * 0.05
ids = torch.randint(0, a.classes, (a.batch,), generator=g)
if cuda:
    wave = wave.pin_memory()
feats = torch.rand(a.batch, 3, 128, frames, generator=g).to(dev).contiguous(memory_format=fmt)
onehot = F.one_hot(ids, a.classes).float().to(dev)


def step():
    if a.input == "wave":
        x = wave.to(dev, non_blocking=True)
        y = F.one_hot(ids, a.classes).float().to(dev, non_blocking=True)
        x, y = augment(x, y)
        z = front_end(x)
    else:
        z, y = feats, onehot
    # (torch 1.13's autocast checks for bf16 CUDA support even when disabled)
    with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        logits = step_model(z)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=0.05)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()    # aviary's trainer reads every step's loss too


def sync():
    if cuda:
        torch.cuda.synchronize()


t_start = time.perf_counter()
for _ in range(a.warmup):
    step()
sync()
warmup_s = time.perf_counter() - t_start
rates = []
for _ in range(a.rounds):
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    rates.append(a.batch * a.steps / (time.perf_counter() - t0))
if a.profile:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
        sync()
    prof.export_chrome_trace(a.profile)
extra = ""
if cuda:
    extra = f" peak_gpu_mib={torch.cuda.max_memory_allocated() / 2**20:.0f}"
print(f"side=reference torch={torch.__version__} device={a.device} model={a.model} batch={a.batch} "
      f"input={a.input} compile={int(a.compile)} bf16={int(bf16)} channels_last={int(channels_last)} "
      f"cudnn_benchmark={int(cudnn_benchmark)} "
      f"threads={torch.get_num_threads()} steps={a.steps} rounds={a.rounds} warmup_s={warmup_s:.2f} "
      f"reference_samples_per_s={max(rates):.2f} reference_median_samples_per_s={statistics.median(rates):.2f}"
      f"{extra}", flush=True)
