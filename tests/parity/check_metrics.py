#!/usr/bin/python3
"""Parity of aviary's evaluation metrics (common/metrics.h, `aviary score`) with scikit-learn.

The references are scikit-learn 1.2's own functions, called as the recipe defines the metrics:
  micro PR-AUC (val_auc)  average_precision_score(y.ravel(), s.ravel())
  macro ROC-AUC           roc_auc_score(y[:, keep], s[:, keep], average='macro'),
                          keep = y.sum(0) > 0 (the BirdCLEF 2024 metric)
  padded cmAP             average_precision_score(y + 5 rows of ones, s + 5 rows of ones,
                          average='macro') (BirdCLEF 2022/2023)
  accuracy                mean(argmax(s, 1) == argmax(y, 1)) (the metrics tool, the trainer's
                          val_acc); `aviary score`: over the rows with a positive,
                          mean(y[r, argmax(s[r])] == 1)
Undefined cases must come back as NaN from aviary: no positive at all (scikit-learn warns and
returns 0 for the micro AP), and a ValueError from roc_auc_score.

usage: check_metrics.py --tool METRICS_TOOL     random and heavily tied matrices, float and double
       check_metrics.py --aviary AVIARY_BIN     `aviary score` end to end, plus bad input
Exit 0 when every value is within 1e-9 of scikit-learn's; prints every mismatch otherwise.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

TOLERANCE = 1e-9
PAD_ROWS = 5


def reference(y, s):
    """The four metrics (and the unpadded macro AP) by scikit-learn; NaN where undefined."""
    ref = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n, k = y.shape
        ref["micro_ap"] = (average_precision_score(y.ravel(), s.ravel())
                           if y.sum() > 0 else math.nan)
        keep = y.sum(axis=0) > 0
        if keep.any():
            try:
                ref["roc_auc"] = roc_auc_score(y[:, keep], s[:, keep], average="macro")
            except ValueError:  # a scored class without a negative
                ref["roc_auc"] = math.nan
        else:
            ref["roc_auc"] = math.nan
        yp = np.vstack([y, np.ones((PAD_ROWS, k), dtype=y.dtype)])
        sp = np.vstack([s, np.ones((PAD_ROWS, k), dtype=s.dtype)])
        ref["cmap"] = average_precision_score(yp, sp, average="macro")
        ref["macro_ap"] = average_precision_score(y, s, average="macro") if n > 0 else math.nan
        ref["accuracy"] = (float(np.mean(np.argmax(s, axis=1) == np.argmax(y, axis=1)))
                           if n > 0 else math.nan)
        labelled = y.sum(axis=1) > 0
        ref["score_accuracy"] = (float(np.mean(y[labelled, np.argmax(s[labelled], axis=1)] == 1))
                                 if labelled.any() else math.nan)
    return ref


# metrics_tool output name -> reference name
TOOL_NAMES = {
    "val_auc": "micro_ap", "micro_ap": "micro_ap",
    "val_roc_auc": "roc_auc", "macro_roc_auc": "roc_auc",
    "val_cmap": "cmap", "padded_cmap": "cmap",
    "macro_ap_pad0": "macro_ap",
    "val_acc": "accuracy", "accuracy": "accuracy", "soft_accuracy": "accuracy",
}
JSON_NAMES = {"micro_pr_auc": "micro_ap", "macro_roc_auc": "roc_auc", "padded_cmap": "cmap",
              "accuracy": "score_accuracy"}


class Checker:
    def __init__(self):
        self.failures = []
        self.checks = 0
        self.max_diff = {}

    def compare(self, case, name, ours, ref):
        """Records a mismatch; returns True when `ours` matches `ref`."""
        self.checks += 1
        if math.isnan(ref) or ours is None or math.isnan(ours):
            ok = ours is not None and math.isnan(ref) and math.isnan(ours)
            diff = 0.0 if ok else math.inf
        else:
            diff = abs(ours - ref)
            ok = diff <= TOLERANCE
        if not ok:
            self.failures.append(f"{case}: {name}: aviary {ours!r}, scikit-learn {ref!r}")
        elif diff > self.max_diff.get(name, -1.0):
            self.max_diff[name] = diff
        return ok


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def make_case(rng, kind, n, k):
    """Truth (int 0/1, n x k) and scores (float64) of one kind."""
    weights = 1.0 / np.arange(1, k + 1) ** 1.2  # long tail: rare classes often have no positive
    primary = rng.choice(k, size=n, p=weights / weights.sum()) if n > 0 else np.zeros(0, int)
    y = np.zeros((n, k), dtype=np.int64)
    y[np.arange(n), primary] = 1
    if kind.startswith("multilabel"):
        y |= (rng.random_sample((n, k)) < 0.05).astype(np.int64)
    logits = rng.normal(size=(n, k)) + 2.5 * y * rng.random_sample((n, k))
    s = softmax(logits) if n > 0 else np.zeros((0, k))
    if kind.endswith("round1"):
        s = np.round(s * 1.6, 1)          # values 0.0 .. 1.6: many ties, exact 1.0 and above
    elif kind.endswith("round2"):
        s = np.round(s, 2)
    elif kind == "integers":
        s = rng.randint(0, 4, size=(n, k)).astype(np.float64)
    elif kind == "all_tied":
        s = np.full((n, k), 0.5)
    elif kind == "logits":
        s = np.round(logits, 3)
    return y, s


def write_matrix(path, m, fmt):
    header = ",".join(f"c{j}" for j in range(m.shape[1]))
    np.savetxt(path, m, fmt=fmt, delimiter=",", header=header, comments="")


def run_tool(tool, tmp, y, s, use_float):
    write_matrix(os.path.join(tmp, "truth.csv"), y, "%d")
    # float32 values written as the doubles they are, so that parsing loses nothing.
    write_matrix(os.path.join(tmp, "scores.csv"), s.astype(np.float64), "%.17g")
    cmd = [tool, os.path.join(tmp, "truth.csv"), os.path.join(tmp, "scores.csv")]
    if use_float:
        cmd.append("--float")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr}")
    values = {}
    for line in out.stdout.splitlines():
        name, value = line.split(" ", 2)[:2]
        values[name] = None if value == "error" else float(value)
    return values


def check_tool(tool):
    checker = Checker()
    rng = np.random.RandomState(20240)
    kinds = ["continuous", "round1", "round2", "multilabel_round1", "multilabel", "integers",
             "logits", "all_tied"]
    cases = []
    # Fixed shapes: big, narrow, single row / class, then random shapes and kinds.
    cases += [("round2", 5000, 200, False), ("round1", 5000, 182, True),
              ("continuous", 3000, 180, False), ("multilabel_round1", 2000, 50, True),
              ("round1", 1, 1, False), ("continuous", 1, 5, False), ("round1", 7, 1, False),
              ("integers", 40, 2, False), ("all_tied", 30, 4, False), ("round1", 0, 3, False)]
    for _ in range(70):
        n = int(np.exp(rng.uniform(0, np.log(5000))))
        k = int(np.exp(rng.uniform(0, np.log(200))))
        cases.append((kinds[rng.randint(len(kinds))], n, k, bool(rng.randint(2))))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, n, k, use_float) in enumerate(cases):
            y, s = make_case(rng, kind, n, k)
            if use_float:
                s = s.astype(np.float32)
            edits = [("", y)]
            if n >= 2 and k >= 2:
                no_pos = y.copy(); no_pos[:, 0] = 0         # a class without positives
                all_pos = y.copy(); all_pos[:, -1] = 1      # a scored class without negatives
                edits += [("+empty_class", no_pos), ("+full_class", all_pos)]
            if i < 3:
                edits.append(("+no_positive", np.zeros_like(y)))
            for suffix, yy in edits:
                name = f"case{i}:{kind}{suffix} {n}x{k} {'float' if use_float else 'double'}"
                ref = reference(yy, s)
                got = run_tool(tool, tmp, yy, s, use_float)
                for tool_name, ref_name in TOOL_NAMES.items():
                    checker.compare(name, tool_name, got.get(tool_name), ref[ref_name])

        # The check must be able to fail: aviary on a perturbed input (one label flipped, one
        # score changed) against the unperturbed reference has to be reported.
        y, s = make_case(rng, "round2", 300, 12)
        ref = reference(y, s)
        flipped = y.copy(); flipped[0, 0] ^= 1
        scores = s.copy(); scores[1, 1] += 0.05
        probe = Checker()
        got = run_tool(tool, tmp, flipped, scores, False)
        caught = sum(not probe.compare("probe", t, got.get(t), ref[r]) for t, r in TOOL_NAMES.items())
        got = run_tool(tool, tmp, y, s, False)
        near = Checker()
        caught_tiny = not near.compare("probe", "val_auc", got["val_auc"] + 3 * TOLERANCE, ref["micro_ap"])
        if caught == 0 or not caught_tiny:
            checker.failures.append(f"self-test: perturbed inputs not reported (caught {caught} "
                                    f"metrics; 3e-9 offset caught: {caught_tiny})")
        else:
            print(f"self-test: perturbed input flagged in {caught} of {len(TOOL_NAMES)} metrics; "
                  f"a 3e-9 offset is flagged")
    return checker, len(cases)


def run_score(aviary, solution, submission, json_output=True):
    cmd = [aviary, "score", "--solution", solution, "--submission", submission]
    if json_output:
        cmd.append("--json")
    return subprocess.run(cmd, capture_output=True, text=True)


def write_birdclef(tmp, name, y, s, rng, shuffle=True, classes=None):
    """solution.csv (0/1) and submission.csv (scores, rows shuffled, columns permuted)."""
    n, k = y.shape
    classes = classes or [f"sp{j:03d}" for j in range(k)]
    row_ids = [f"soundscape_{i // 12}_{5 * (i % 12 + 1)}" for i in range(n)]
    sol = pd.DataFrame(y, columns=classes)
    sol.insert(0, "row_id", row_ids)
    sub = pd.DataFrame(s, columns=classes)
    sub.insert(0, "row_id", row_ids)
    if shuffle:
        sub = sub.iloc[rng.permutation(n)]
        cols = list(sub.columns)
        sub = sub[[cols[j] for j in rng.permutation(len(cols))]]
    sol_path = os.path.join(tmp, f"{name}_solution.csv")
    sub_path = os.path.join(tmp, f"{name}_submission.csv")
    sol.to_csv(sol_path, index=False)
    sub.to_csv(sub_path, index=False)
    return sol_path, sub_path


def check_cli(aviary):
    checker = Checker()
    rng = np.random.RandomState(7)
    cases = 0
    with tempfile.TemporaryDirectory() as tmp:
        shapes = [("round2", 480, 182), ("round1", 96, 30), ("continuous", 60, 8),
                  ("multilabel_round1", 200, 40), ("integers", 25, 3)]
        for i, (kind, n, k) in enumerate(shapes):
            y, s = make_case(rng, kind, n, k)
            sol, sub = write_birdclef(tmp, f"c{i}", y, s, rng)
            out = run_score(aviary, sol, sub)
            cases += 1
            if out.returncode != 0:
                checker.failures.append(f"cli case {i}: exit {out.returncode}: {out.stderr}")
                continue
            got = json.loads(out.stdout)
            ref = reference(y, s)
            for json_name, ref_name in JSON_NAMES.items():
                checker.compare(f"cli case {i} ({kind} {n}x{k})", json_name, got[json_name], ref[ref_name])
            if (got["rows"] != n or got["classes"] != k or got["scored_classes"] != int((y.sum(0) > 0).sum())
                    or got["accuracy_rows"] != int((y.sum(1) > 0).sum())):
                checker.failures.append(f"cli case {i}: counts {got}")
            if i == 0:
                table = run_score(aviary, sol, sub, json_output=False)
                for label in ("macro ROC-AUC", "padded cmAP", "micro PR-AUC (val_auc)", "accuracy",
                              f"{n} rows, {k} classes"):
                    if table.returncode != 0 or label not in table.stdout:
                        checker.failures.append(f"cli table lacks '{label}': {table.stdout}{table.stderr}")
                # The comparison must be able to fail: one cell of the submission changed.
                changed = s.copy()
                changed[np.argmax(y[:, 0]), 0] = 0.0
                _, sub2 = write_birdclef(tmp, "probe", y, changed, rng)
                got2 = json.loads(run_score(aviary, sol, sub2).stdout)
                probe = Checker()
                caught = sum(not probe.compare("probe", j, got2[j], ref[r]) for j, r in JSON_NAMES.items())
                if caught == 0:
                    checker.failures.append("self-test: a changed submission cell was not reported")
                else:
                    print(f"self-test: a changed submission cell is flagged in {caught} metrics")

        # Undefined metrics: no positive anywhere -> null with a reason, exit 0.
        y = np.zeros((6, 3), dtype=np.int64)
        s = rng.random_sample((6, 3))
        sol, sub = write_birdclef(tmp, "none", y, s, rng)
        out = run_score(aviary, sol, sub)
        got = json.loads(out.stdout) if out.returncode == 0 else {}
        if (out.returncode != 0 or got.get("macro_roc_auc") is not None
                or got.get("micro_pr_auc") is not None
                or "no class has a positive" not in got.get("undefined", {}).get("macro_roc_auc", "")):
            checker.failures.append(f"cli undefined case: rc {out.returncode} {out.stdout} {out.stderr}")
        else:
            checker.compare("cli undefined case", "padded_cmap", got["padded_cmap"], reference(y, s)["cmap"])
            if got.get("accuracy") is not None or got.get("accuracy_rows") != 0:
                checker.failures.append(f"cli undefined case: accuracy {out.stdout}")

        # Accuracy over the labelled rows: a window without a bird is left out, a window with two
        # species is right when either scores highest (by hand: 2 of the 3 labelled rows).
        y = np.array([[0, 0, 0], [1, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.int64)
        s = np.array([[0.9, 0.1, 0.1], [0.1, 0.2, 0.8], [0.7, 0.3, 0.1], [0.6, 0.5, 0.4]])
        sol, sub = write_birdclef(tmp, "windows", y, s, rng)
        out = run_score(aviary, sol, sub)
        got = json.loads(out.stdout) if out.returncode == 0 else {}
        checker.checks += 1
        if got.get("accuracy_rows") != 3 or got.get("accuracy") is None or abs(got["accuracy"] - 2 / 3) > 1e-12:
            checker.failures.append(f"cli accuracy over labelled rows: rc {out.returncode} {out.stdout} {out.stderr}")

        # A class with no negative label: the reason names its column, not only its index (182
        # columns are not counted by eye).
        y = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 0], [0, 1, 1]], dtype=np.int64)
        s = rng.random_sample((4, 3))
        sol, sub = write_birdclef(tmp, "allpos", y, s, rng, classes=["owl", "wren", "jay"])
        out = run_score(aviary, sol, sub)
        got = json.loads(out.stdout) if out.returncode == 0 else {}
        want = f"class 1 has no negative label (ROC-AUC needs both; every row is positive); class 1 is the column 'wren' of {sol}"
        checker.checks += 1
        if got.get("macro_roc_auc") is not None or got.get("undefined", {}).get("macro_roc_auc") != want:
            checker.failures.append(f"cli no-negative class: rc {out.returncode} {out.stdout} {out.stderr}")

        # Kaggle's solution files carry a Usage column (Public/Private), which its scorer drops:
        # scored as without it (it was refused as a class the submission lacked).
        y, s = make_case(rng, "round2", 12, 4)
        sol, sub = write_birdclef(tmp, "usage", y, s, rng)
        sol_usage = os.path.join(tmp, "usage_solution_with_usage.csv")
        frame = pd.read_csv(sol)
        frame.insert(1, "Usage", ["Public" if i % 2 else "Private" for i in range(len(frame))])
        frame.to_csv(sol_usage, index=False)
        plain, with_usage = run_score(aviary, sol, sub), run_score(aviary, sol_usage, sub)
        checker.checks += 1
        if with_usage.returncode != 0 or plain.returncode != 0 or json.loads(with_usage.stdout) != json.loads(plain.stdout):
            checker.failures.append(f"cli Usage column: rc {with_usage.returncode} {with_usage.stdout} {with_usage.stderr}")

        # Bad input: exit code 2 and a message naming what is wrong.
        y, s = make_case(rng, "round2", 12, 4)
        sol, sub = write_birdclef(tmp, "good", y, s, rng, shuffle=False)
        sol_df, sub_df = pd.read_csv(sol), pd.read_csv(sub)

        def bad(name, want, sol_frame=None, sub_frame=None, raw_sub=None, args=None):
            sol_path = os.path.join(tmp, f"bad_{name}_solution.csv")
            sub_path = os.path.join(tmp, f"bad_{name}_submission.csv")
            (sol_frame if sol_frame is not None else sol_df).to_csv(sol_path, index=False)
            if raw_sub is not None:
                with open(sub_path, "w") as f:
                    f.write(raw_sub)
            else:
                (sub_frame if sub_frame is not None else sub_df).to_csv(sub_path, index=False)
            cmd = [aviary, "score"] + (args if args is not None else
                                       ["--solution", sol_path, "--submission", sub_path])
            out = subprocess.run(cmd, capture_output=True, text=True)
            want = want.replace("SUB", sub_path).replace("SOL", sol_path)
            checker.checks += 1
            if out.returncode != 2 or want not in out.stderr:
                checker.failures.append(f"bad input '{name}': rc {out.returncode}, wanted '{want}' "
                                        f"in stderr: {out.stderr.strip()} (stdout: {out.stdout.strip()})")

        bad("missing_row", "SUB: no row for row_id 'soundscape_0_15' (SOL:4)",
            sub_frame=sub_df.drop(index=2))
        bad("duplicate_row", "SUB:6: duplicate row_id 'soundscape_0_10' (first at line 3)",
            sub_frame=pd.concat([sub_df.iloc[:4], sub_df.iloc[[1]], sub_df.iloc[4:]]))
        bad("duplicate_solution_row", "SOL:5: duplicate row_id 'soundscape_0_5' (first at line 2)",
            sol_frame=pd.concat([sol_df.iloc[:3], sol_df.iloc[[0]], sol_df.iloc[3:]]))
        bad("unknown_row", "SUB:14: row_id 'elsewhere_5' is not in SOL",
            sub_frame=pd.concat([sub_df, sub_df.iloc[[0]].assign(row_id="elsewhere_5")]))
        bad("missing_class", "SUB:1: class columns differ from SOL:1: missing 1 (sp002)",
            sub_frame=sub_df.drop(columns=["sp002"]))
        # The header's own line, after blank lines (a duplicate column named line 1).
        bad("duplicate_class", "SUB:3: duplicate column 'sp001'",
            raw_sub="\n\n" + open(sub).read().replace("sp002", "sp001", 1))
        bad("extra_class", "extra 1 (bogus)", sub_frame=sub_df.assign(bogus=0.5))
        # A submission written with pandas' index (to_csv without index=False): named as such
        # (it said "extra 1 ()").
        bad("pandas_index", "extra 1 (an unnamed column, pandas' index?)", sub_frame=sub_df.reset_index().rename(
            columns={"index": ""}))
        bad("no_row_id", "SUB:1: missing column 'row_id'", sub_frame=sub_df.drop(columns=["row_id"]))
        lines = open(sub).read().splitlines()
        cells = lines[3].split(",")
        cells[2] = "abc"
        lines[3] = ",".join(cells)
        bad("non_numeric", "SUB:4: column 'sp001': not a number: 'abc'", raw_sub="\n".join(lines) + "\n")
        # Hexadecimal: strtod reads "0x10" as 16; pandas (and so Kaggle's scorer) reads text.
        cells[2] = "0x10"
        lines[3] = ",".join(cells)
        bad("hex_cell", "SUB:4: column 'sp001': not a number: '0x10'", raw_sub="\n".join(lines) + "\n")
        cells[2] = "nan"
        lines[3] = ",".join(cells)
        bad("nan_cell", "SUB:4: column 'sp001': 'nan' is not a finite number",
            raw_sub="\n".join(lines) + "\n")
        cells[2] = ""
        lines[3] = ",".join(cells)
        bad("empty_cell", "SUB:4: column 'sp001': not a number: ''", raw_sub="\n".join(lines) + "\n")
        soft = sol_df.astype({"sp003": float})
        soft.loc[5, "sp003"] = 0.95
        bad("soft_truth", "SOL:7: column 'sp003': truth must be 0 or 1, got '0.95'", sol_frame=soft)
        bad("no_rows", "SOL: no rows to score", sol_frame=sol_df.iloc[:0], sub_frame=sub_df.iloc[:0])
        bad("missing_flag", "--submission is required", args=["--solution", sol])
        bad("missing_file", os.path.join(tmp, "nope.csv"),
            args=["--solution", os.path.join(tmp, "nope.csv"), "--submission", sub])
    return checker, cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", help="tests/parity/metrics_tool binary")
    parser.add_argument("--aviary", help="the aviary binary (score command)")
    args = parser.parse_args()
    if not args.tool and not args.aviary:
        parser.error("give --tool and/or --aviary")
    failures, summary = [], []
    if args.tool:
        checker, n = check_tool(args.tool)
        failures += checker.failures
        summary.append(f"metrics_tool: {n} matrices, {checker.checks} values")
        diffs = checker.max_diff
    if args.aviary:
        checker, n = check_cli(args.aviary)
        failures += checker.failures
        summary.append(f"aviary score: {n} solution/submission pairs + bad input, {checker.checks} checks")
        diffs = {**(diffs if args.tool else {}), **{f"cli:{k}": v for k, v in checker.max_diff.items()}}
    for line in summary:
        print(line)
    print("max |aviary - scikit-learn|: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(diffs.items())))
    if failures:
        print(f"{len(failures)} mismatches:")
        for f in failures[:50]:
            print("  " + f)
        return 1
    print("all metrics match scikit-learn within", TOLERANCE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
