"""Times an `aviary export --format onnx` file with onnxruntime over a folder of 16-bit WAV
soundscapes (docs/INFERENCE.md's onnxruntime block, WAV read with the wave module instead of
soundfile, which the torch venv lacks), writes the submission and prints per_file_s (the
prediction loop) and wall_s (including session creation). For bench/export_bench.sh.
usage: onnx_inference.py MODEL.onnx WAV_DIR SUBMISSION THREADS
"""
import time

start = time.perf_counter()
import csv, glob, json, math, os, sys, wave  # noqa: E401

import numpy as np
import onnxruntime as ort

onnx_path, audio_dir, submission, threads = sys.argv[1:5]
meta = json.load(open(os.path.splitext(onnx_path)[0] + ".json"))
opts = ort.SessionOptions()
opts.intra_op_num_threads = int(threads)
opts.inter_op_num_threads = 1
session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
W = meta["window_samples"]
loop = time.perf_counter()
files = sorted(glob.glob(os.path.join(audio_dir, "*.wav")))
with open(submission, "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["row_id"] + meta["class_names"])
    for path in files:
        with wave.open(path) as w:
            x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
        x = x[:, 0].astype(np.float32) / 32768.0
        n = max(1, math.ceil(len(x) / W))
        probs = session.run(None, {"waveform": np.pad(x, (0, n * W - len(x))).reshape(n, W)})[0]
        stem = os.path.splitext(os.path.basename(path))[0]
        for i, p in enumerate(probs):
            end = f"{(i + 1) * meta['window_s']:.6f}".rstrip("0").rstrip(".")  # as aviary predict's row ids
            out.writerow([f"{stem}_{end}"] + [f"{v:.9g}" for v in p])
end = time.perf_counter()
print(f"per_file_s={(end - loop) / max(1, len(files)):.3f} wall_s={end - start:.2f}")
