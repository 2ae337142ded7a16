"""Runs an `aviary export --format onnx` file with onnxruntime on 16-bit WAV soundscapes and
compares each window's probabilities with `aviary predict`'s CSV of the same files.
Run by tests/integration/onnx_vs_predict.sh with the torch venv's python (onnxruntime from PyPI).
usage: check_onnx.py MODEL.onnx WAV_DIR PREDICT.csv TOL [--batch N]
Exit 0 when every probability is within TOL; prints the largest difference.
"""
import csv
import glob
import json
import math
import os
import sys
import wave

import numpy as np
import onnxruntime as ort

onnx_path, audio_dir, ref_csv, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
batch = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[5] == "--batch" else 0
meta = json.load(open(os.path.splitext(onnx_path)[0] + ".json"))
sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
assert inp.name == "waveform" and inp.shape[1] == meta["window_samples"], (inp.name, inp.shape)
assert out.name == "probabilities" and out.shape[1] == meta["model"]["num_classes"], (out.name, out.shape)
rows = list(csv.reader(open(ref_csv)))
assert rows[0] == ["row_id"] + meta["class_names"], "the sidecar's class names are not predict's header"
ref = {r[0]: np.array([float(v) for v in r[1:]]) for r in rows[1:]}
worst, compared = 0.0, 0
for path in sorted(glob.glob(os.path.join(audio_dir, "*.wav"))):
    with wave.open(path) as w:
        assert w.getsampwidth() == 2 and w.getframerate() == meta["sample_rate"], path
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
    x = (x[:, 0] if meta["channels"] == "first" else x.mean(axis=1)).astype(np.float32) / 32768.0
    win = meta["window_samples"]
    n = max(1, math.ceil(len(x) / win))
    x = np.pad(x, (0, n * win - len(x))).reshape(n, win)
    step = batch or n
    p = np.concatenate([sess.run(None, {"waveform": x[i:i + step]})[0] for i in range(0, n, step)])
    stem = os.path.splitext(os.path.basename(path))[0]
    for i in range(n):
        end_s = f"{(i + 1) * meta['window_s']:.6f}".rstrip("0").rstrip(".")  # worker/predict.h RowId
        rid = f"{stem}_{end_s}"
        d = np.abs(p[i] - ref[rid])
        # A NaN on either side is no match (max() keeps 0.0 against a NaN that comes second).
        worst = max(worst, float(d.max()) if np.isfinite(d).all() else math.inf)
        compared += 1
ok = compared == len(ref) and worst <= tol
print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(onnx_path)} ({meta['model']['name']}): {compared} windows"
      f"{f', batch {batch}' if batch else ''}, max |onnxruntime - aviary predict| {worst:.3g} (tol {tol:g})")
sys.exit(0 if ok else 1)
