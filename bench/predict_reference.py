#!/usr/bin/python3
"""The reference for bench/predict_bench.sh: `aviary predict`'s work done by PyTorch from Python.

For every file of AUDIO (sorted): torchaudio.load (sox_io; soundfile where torchaudio needs
torchcodec and it is missing), first channel, resampled to 32 kHz
when needed, cut into 5 s windows (the last zero-padded), in batches of BATCH windows:
torchaudio MelSpectrogram(32 kHz, n_fft 2028, hop 835, 20-16000 Hz, 128 HTK mels, power 2)
+ AmplitudeToDB(top_db 80) per clip + the notebook's z-score/min-max per clip + 3 channels,
then the model (torchvision's efficientnet_b0, or small_cnn written out here as aviary builds
it) with the weights aviary exported (safetensors, read by the small reader below), softmax,
and one CSV row per window as aviary writes it. Under torch.inference_mode, torch threads as
given. Prints the seconds per file of the loop (decode + front end + model + CSV) and the
wall time of the whole script.

With MEMORY_FORMAT channels_last the model and its input are converted to
torch.channels_last (what `aviary predict` does by default); contiguous is PyTorch's default.

usage: predict_reference.py MODEL WEIGHTS.safetensors SOLUTION.csv AUDIO_DIR OUT.csv THREADS BATCH
                            [contiguous|channels_last]
"""
import csv
import json
import math
import os
import sys
import time

start_wall = time.perf_counter()

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
import torchvision

from notebook_frontend import NotebookFrontEnd

model_name, weights_path, solution, audio_dir, out_path = sys.argv[1:6]
threads = int(sys.argv[6])
batch = int(sys.argv[7])
memory_format = sys.argv[8] if len(sys.argv) > 8 else "contiguous"
fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
torch.set_num_threads(threads)

SR = 32000
WINDOW = 5 * SR


def read_safetensors(path):
    dtypes = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        arr = np.frombuffer(data[b:e], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


class SmallCnn(nn.Module):
    """aviary's small_cnn: four conv-BN-SiLU-maxpool stages, global average pooling, head."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        stages, c = [], in_channels
        for o in (16, 32, 64, 128):
            stages.append(nn.Sequential(nn.Conv2d(c, o, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(o), nn.SiLU(), nn.MaxPool2d(2)))
            c = o
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


classes = next(csv.reader(open(solution)))[1:]
if model_name == "small_cnn":
    model = SmallCnn(3, len(classes))
else:
    model = getattr(torchvision.models, model_name)(weights=None, num_classes=len(classes))
model.load_state_dict(read_safetensors(weights_path), strict=True)
model.eval()
model = model.to(memory_format=fmt)

notebook_front_end = NotebookFrontEnd()


def front_end(x):
    return notebook_front_end(x, fmt)


def load_audio(path):
    """torchaudio.load; from torchaudio 2.9 on it decodes through torchcodec, which the PyTorch
    wheel's venv lacks: then soundfile (libsndfile, as aviary's decoder) when that is there."""
    try:
        return torchaudio.load(path)
    except (ImportError, RuntimeError) as e:
        try:
            import soundfile
        except ImportError:
            sys.exit(f"predict_reference.py: torchaudio {torchaudio.__version__} cannot load audio ({e}) and "
                     f"soundfile is not installed: pip install torchcodec or soundfile into {sys.executable}, "
                     "or run against build/ with /usr/bin/python3")
        data, sr = soundfile.read(path, dtype="float32", always_2d=True)
        return torch.from_numpy(data.T.copy()), sr


# The decoder, checked before the timed loop (it failed after the model had loaded).
files = sorted(os.path.join(audio_dir, f) for f in os.listdir(audio_dir) if not f.startswith("."))
if files:
    load_audio(files[0])
t0 = time.perf_counter()
with torch.inference_mode(), open(out_path, "w", newline="") as out:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["row_id"] + classes)
    for path in files:
        wav, sr = load_audio(path)
        wav = wav[0]
        if sr != SR:
            wav = torchaudio.functional.resample(wav, sr, SR)
        rows = max(1, math.ceil(wav.numel() / WINDOW))
        wav = F.pad(wav, (0, rows * WINDOW - wav.numel())).view(rows, WINDOW)
        probs = torch.cat([torch.softmax(model(front_end(wav[i:i + batch])), -1)
                           for i in range(0, rows, batch)])
        stem = os.path.splitext(os.path.basename(path))[0]
        for r in range(rows):
            w.writerow([f"{stem}_{5 * (r + 1)}"] + [repr(float(v)) for v in probs[r].float()])
loop = time.perf_counter() - t0
print(f"reference model={model_name} format={memory_format} files={len(files)} threads={threads} "
      f"per_file_s={loop / len(files):.3f} loop_s={loop:.2f} wall_s={time.perf_counter() - start_wall:.2f}")
