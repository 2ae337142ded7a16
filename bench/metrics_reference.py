#!/usr/bin/python3
"""scikit-learn's side of bench/metrics_bench.sh: the four metrics on metrics_bench's dump.

usage: metrics_reference.py PREFIX ROWS CLASSES float|double
Prints the values and reference_ms=... (best of 3 runs, as metrics_bench's aviary_ms). The
padded cmAP's arrays (5 rows of ones under the truth and the scores, the scores' dtype) are
built before the clock starts: aviary pads without copying, and the copy is not the metric.
"""
import sys
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

prefix, rows, cols, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
labels = np.fromfile(prefix + ".labels", dtype=np.int64)
scores = np.fromfile(prefix + ".scores", dtype=np.float32 if kind == "float" else np.float64)
scores = scores.reshape(rows, cols)
truth = np.zeros((rows, cols), dtype=np.int64)
truth[np.arange(rows), labels] = 1
truth_padded = np.vstack([truth, np.ones((5, cols), dtype=truth.dtype)])
scores_padded = np.vstack([scores, np.ones((5, cols), dtype=scores.dtype)])

best_ms = float("inf")
for _ in range(3):
    start = time.perf_counter()
    val_auc = average_precision_score(truth.ravel(), scores.ravel())
    keep = truth.sum(0) > 0
    val_roc_auc = roc_auc_score(truth[:, keep], scores[:, keep], average="macro")
    val_cmap = average_precision_score(truth_padded, scores_padded, average="macro")
    val_acc = np.mean(np.argmax(scores, 1) == labels)
    best_ms = min(best_ms, (time.perf_counter() - start) * 1e3)
print(f"{rows} x {cols}: val_auc {val_auc:.6g}, val_roc_auc {val_roc_auc:.6g} ({keep.sum()} classes), "
      f"val_cmap {val_cmap:.6g}, val_acc {val_acc:.6g}")
print(f"reference_ms={best_ms:.1f} (best of 3)")
