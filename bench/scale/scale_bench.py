#!/usr/bin/python3
"""The BirdCLEF-scale rows of issue 15, measured against the reference in one invocation.

Makes a pool with make_corpus.py (every file real: hard links to `aviary synth` templates),
then measures:
  - `aviary dataset train-list --stage pretrain --fold 0` (read the CSVs, check every file,
    dedup, target exclusion, 25 stratified folds, cv filter, up- and downsampling, the train
    list) against the seed's pandas + scikit-learn code doing the same
    (tests/parity/reference_pipeline.py, which also writes the folds) on the same files: best
    wall time of REPEATS runs and peak RSS, and that both wrote the same folds (bytes) and train list
    (as tests/parity/corpus_parity.sh compares it); and
    `aviary dataset folds --stage pretrain` alone. The reference is a whole python3 process, so
    its wall time and RSS include the interpreter's start and the pandas and scikit-learn
    imports: an import-only run (best of REPEATS) is measured too, and the ratio is given both
    with and without it;
  - `aviary submit` of the whole pipeline (pretraining on the pool, fine-tuning on the target)
    to a coordinator on 127.0.0.1: wall time per submit, the coordinator's RSS and the SQLite
    file's growth per job, over JOBS jobs.
  - a scheduler load test (bench/status_bench.cc): a fresh coordinator, LOAD_JOBS jobs of the
    same pipeline (25-fold pretraining fold 0 + 5 fine-tuning folds: 6 tasks each), 64 worker
    groups heartbeating every 2 s, each holding a task and handing it back after 10 s to lease
    again, 20 status pollers once a second, for LOAD_SECONDS: LeaseTask, Heartbeat and GetJob
    latency and the coordinator's CPU.
Prints a table and writes it as JSON to OUT_JSON when given.

usage: scale_bench.py BUILD_DIR [--scale F] [--repeats N] [--jobs N] [--load-jobs N]
                      [--load-seconds S] [--json OUT_JSON] [--keep DIR]
"""
import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LAYOUTS = ["2024", "2023", "2022", "2021", "xc"]


def timed(cmd, env=None):
    """(wall seconds, peak RSS in MiB of this child) of one run; raises on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: run the small one first.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, (peak if peak > before else before) / 1024.0, r.stdout


def peak_rss_mib(cmd, env=None):
    """Peak RSS of one run of cmd, measured apart (a fresh Python process as its parent)."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(r.returncode)")
    out = subprocess.run([sys.executable, "-c", probe] + cmd, stdout=subprocess.PIPE, text=True, env=env, check=True)
    return int(out.stdout.strip()) / 1024.0


def best_of(n, cmd, env=None):
    walls = []
    for _ in range(n):
        wall, _, out = timed(cmd, env)
        walls.append(wall)
    return min(walls), out


def rss_of(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("build")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--load-jobs", type=int, default=20)
    p.add_argument("--load-seconds", type=float, default=60, help="0 skips the load test")
    p.add_argument("--json", default="")
    p.add_argument("--keep", default="", help="make the pool here and keep it (reused when made at the same scale)")
    a = p.parse_args()
    if a.repeats < 1 or a.jobs < 1:
        raise SystemExit("--repeats and --jobs must be at least 1")
    bin_dir = os.path.join(os.path.abspath(a.build), "bin")
    aviary = os.path.join(bin_dir, "aviary")
    tmp = tempfile.mkdtemp(prefix="aviary_scale_")
    work = os.path.abspath(a.keep) if a.keep else tmp
    pool = os.path.join(work, "pool")
    # What the pool was made with, written once it is complete: a pool of another scale, or one
    # an interrupted run left half made, is not measured as this one.
    made_with = f"scale {a.scale!r} seed 1 templates 300x600 v2\n"
    marker = os.path.join(pool, ".complete")
    # SIGTERM (a CI timeout, kill) cleans up as Ctrl-C does.
    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        if os.path.isdir(pool) and not (os.path.exists(marker) and open(marker).read() == made_with):
            if not os.path.exists(marker):
                raise SystemExit(f"{pool} is incomplete (an interrupted run?): remove it, or --keep another folder")
            raise SystemExit(f"{pool} was made with {open(marker).read().strip()!r}, not {made_with.strip()!r}: "
                             "remove it, or --keep another folder")
        if not os.path.isdir(pool):
            templates = os.path.join(work, "templates")
            shutil.rmtree(templates, ignore_errors=True)
            procs = [subprocess.Popen([aviary, "synth", "--out", os.path.join(templates, layout), "--layout", layout,
                                       "--species", "300", "--recordings", "600", "--seed", "3", "--max-seconds", "2",
                                       "--no-broken"], stdout=subprocess.DEVNULL) for layout in LAYOUTS]
            codes = [proc.wait() for proc in procs]  # every one, before any cleanup
            if any(code != 0 for code in codes):
                raise SystemExit(f"aviary synth failed (exit codes {codes})")
            subprocess.run([sys.executable, os.path.join(HERE, "make_corpus.py"), "--templates", templates,
                            "--out", pool, "--scale", str(a.scale)], check=True)
            with open(marker, "w") as out:
                out.write(made_with)
        config = os.path.join(tmp, "pipeline.yaml")
        with open(config, "w") as f:  # paths as JSON strings: YAML takes them whatever they hold
            f.write(f"data:\n  target: {{layout: \"2024\", root: {json.dumps(pool + '/2024')}}}\n  pretrain_sources:\n")
            for layout in ["2021", "2022", "2023", "xc"]:
                f.write(f"    - {{layout: \"{layout}\", root: {json.dumps(pool + '/' + layout)}}}\n")
        rows = {}

        # 1. Folds of the pretraining pool.
        ours_cmd = [aviary, "dataset", "folds", "--config", config, "--stage", "pretrain",
                    "--out", os.path.join(tmp, "ours.csv")]
        ref_cmd = [sys.executable, os.path.join(ROOT, "tests/parity/reference_pipeline.py"),
                   "--target", f"2024:{pool}/2024"] + sum(
            [["--source", f"{layout}:{pool}/{layout}"] for layout in ["2021", "2022", "2023", "xc"]], []) + [
            "--stage", "pretrain", "--fold", "0", "--seed", "42", "--pretrain-splits", "25",
            "--finetune-splits", "5", "--cv-filter", "1", "--cv-thr", "5", "--upsample-thr", "50",
            "--downsample-thr", "500", "--folds-out", os.path.join(tmp, "ref.csv"),
            "--train-out", os.path.join(tmp, "ref_train.csv")]
        train_cmd = [aviary, "dataset", "train-list", "--config", config, "--stage", "pretrain", "--fold", "0",
                     "--out", os.path.join(tmp, "ours_train.csv")]
        timed(ours_cmd)  # warm the page cache and the dentry cache for both
        folds_s, _ = best_of(a.repeats, ours_cmd)
        ours_s, _ = best_of(a.repeats, train_cmd)
        ref_s, ref_out = best_of(a.repeats, ref_cmd)
        # The reference's fixed cost: the interpreter and its imports, nothing else.
        import_cmd = [sys.executable, "-c", "import argparse, json, os; import pandas as pd; "
                      "from sklearn.model_selection import StratifiedKFold"]
        import_s, _ = best_of(a.repeats, import_cmd)
        ours_mib = peak_rss_mib(train_cmd)
        ref_mib = peak_rss_mib(ref_cmd)
        import_mib = peak_rss_mib(import_cmd)

        def same_bytes(x, y):
            return open(os.path.join(tmp, x), "rb").read() == open(os.path.join(tmp, y), "rb").read()

        def same_train_list():
            """As tests/parity/corpus_parity.sh compares them: the rows whose place pandas fixes
            (the reference's ordered_prefix) in order, the up- and downsampled rest as a multiset
            (their order follows value_counts' order of tied classes)."""
            prefix = int(ref_out.split("ordered_prefix=")[1].split()[0])
            ours = open(os.path.join(tmp, "ours_train.csv")).read().splitlines()
            ref = open(os.path.join(tmp, "ref_train.csv")).read().splitlines()
            return ours[:prefix + 1] == ref[:prefix + 1] and sorted(ours[prefix + 1:]) == sorted(ref[prefix + 1:])

        same = same_bytes("ours.csv", "ref.csv") and same_train_list()
        samples = sum(1 for _ in open(os.path.join(tmp, "ours.csv"))) - 1
        rows["folds"] = {"aviary_s": ours_s, "reference_s": ref_s, "speedup": ref_s / ours_s,
                         "reference_imports_s": import_s, "speedup_without_imports": (ref_s - import_s) / ours_s,
                         "aviary_folds_only_s": folds_s, "aviary_mib": ours_mib, "reference_mib": ref_mib,
                         "reference_imports_mib": import_mib, "same_output": same, "pool_samples": samples}

        # 2. Submits to a coordinator.
        state = os.path.join(tmp, "state")
        subprocess.run([os.path.join(bin_dir, "aviary-coordinator"), "init", state, "--data-root", pool],
                       check=True, stdout=subprocess.DEVNULL)
        port_file = os.path.join(tmp, "port")
        log = open(os.path.join(tmp, "coordinator.log"), "w")
        coordinator = subprocess.Popen([os.path.join(bin_dir, "aviary-coordinator"), "--config",
                                        os.path.join(state, "coordinator.yaml"), "--listen", "127.0.0.1:0",
                                        "--port-file", port_file, "--metrics-listen", ""], stdout=log, stderr=log)
        try:
            for _ in range(300):
                if os.path.exists(port_file) and os.path.getsize(port_file) > 0:
                    break
                time.sleep(0.1)
            else:
                raise SystemExit("the coordinator did not start: " + open(log.name).read()[-2000:])
            port = open(port_file).read().strip()
            env = dict(os.environ, AVIARY_TOKEN_FILE=os.path.join(state, "token"))
            db = os.path.join(state, "aviary.db")
            idle_mib = rss_of(coordinator.pid)

            def db_bytes():
                return os.path.getsize(db) + (os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0)

            sizes, walls, rss = [db_bytes()], [], []
            for _ in range(a.jobs):
                wall, _, _ = timed([aviary, "--coordinator", f"127.0.0.1:{port}", "submit", config,
                                    "--set", "folds.selected_folds=[0]"], env)
                walls.append(wall)
                # The coordinator frees a submit's dataset tables and trims its heap after the
                # reply (Scheduler::SubmitJob): its memory read once that is done.
                time.sleep(1.0)
                rss.append(rss_of(coordinator.pid))
                sizes.append(db_bytes())
            growth = [(b - a_) / 2**20 for a_, b in zip(sizes, sizes[1:])]
            rows["submit"] = {"jobs": a.jobs, "submit_s": walls, "coordinator_idle_mib": idle_mib,
                              "coordinator_mib_after_each": rss, "db_growth_mib_per_job": growth}
        finally:
            coordinator.send_signal(signal.SIGTERM)
            try:
                coordinator.wait(timeout=60)
            except subprocess.TimeoutExpired:
                coordinator.kill()
                coordinator.wait()
                print("the coordinator did not stop within 60 s of SIGTERM: killed", file=sys.stderr)
        # After a clean stop the WAL is folded into the file: its size over the jobs.
        rows["submit"]["db_mib_after_stop"] = os.path.getsize(db) / 2**20

        # 3. Scheduler load test.
        if a.load_seconds > 0:
            load_pipeline = os.path.join(tmp, "load.yaml")
            with open(load_pipeline, "w") as out:
                out.write("data:\n  target: {layout: \"2024\", root: 2024}\n  pretrain_sources:\n")
                for layout in ["2021", "2022", "2023", "xc"]:
                    out.write(f"    - {{layout: \"{layout}\", root: {layout}}}\n")
                out.write("folds: {selected_folds: [0, 1, 2, 3, 4]}\n")
            r = subprocess.run([os.path.join(os.path.abspath(a.build), "bench", "status_bench"), "--coordinator-bin",
                                os.path.join(bin_dir, "aviary-coordinator"), "--pipeline", load_pipeline,
                                "--working-dir", pool, "--jobs", str(a.load_jobs), "--groups", "64", "--leased", "64",
                                "--heartbeat-ms", "2000", "--task-ms", "10000", "--pollers", "20",
                                "--poll-interval-ms", "1000", "--duration", str(a.load_seconds),
                                "--scratch", os.path.join(tmp, "load")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
            if r.returncode != 0:
                raise SystemExit(f"status_bench failed ({r.returncode}): {r.stderr[-2000:]}")
            rows["load"] = json.loads(r.stdout.splitlines()[0])
            rows["load_table"] = r.stdout.split("\n", 2)[2]

        f = rows["folds"]
        s = rows["submit"]
        print(f"pool: {f['pool_samples']} pretraining samples (scale {a.scale}); machine: {os.cpu_count()} cores")
        print(f"{'what':44} {'aviary':>16} {'reference':>16}")
        print(f"{'folds + train list (pretrain): wall (best)':44} {f['aviary_s']:>15.2f}s {f['reference_s']:>15.2f}s"
              f"   {f['speedup']:.1f}x")
        print(f"{'  the reference less python3 + imports':44} {'':>16} {f['reference_s'] - f['reference_imports_s']:>15.2f}s"
              f"   {f['speedup_without_imports']:.1f}x (imports alone {f['reference_imports_s']:.2f}s)")
        print(f"{'folds + train list (pretrain): peak RSS':44} {f['aviary_mib']:>13.0f}MiB {f['reference_mib']:>13.0f}MiB"
              f"   same output: {f['same_output']}; python3 + imports alone {f['reference_imports_mib']:.0f} MiB")
        print(f"{'dataset folds alone: wall (best)':44} {f['aviary_folds_only_s']:>15.2f}s")
        def few(values, fmt):
            """All values, or the first three, '...' and the last three."""
            shown = values if len(values) <= 8 else values[:3] + [None] + values[-3:]
            return ", ".join("..." if v is None else fmt.format(v) for v in shown)

        walls = sorted(s["submit_s"])
        print(f"{'submit of the full pipeline: wall':44} {few(s['submit_s'], '{:.2f}s')} "
              f"(median {walls[len(walls) // 2]:.2f}s)")
        if len(s["submit_s"]) > 1:
            # The first submit reads the dataset and builds the folds; the others find the same
            # dataset version in the coordinator's fold cache.
            rest = sorted(s["submit_s"][1:])
            growth = sorted(s["db_growth_mib_per_job"][1:])
            print(f"{'  first submit; the others (median, max)':44} {s['submit_s'][0]:.2f}s; "
                  f"{rest[len(rest) // 2]:.3f}s, {rest[-1]:.3f}s")
            print(f"{'  SQLite growth: first job; the others (max)':44} {s['db_growth_mib_per_job'][0]:.2f} MiB; "
                  f"{growth[-1] * 1024:.0f} KiB")
        print(f"{'coordinator RSS idle, then after each job':44} {s['coordinator_idle_mib']:.0f}; "
              f"{few(s['coordinator_mib_after_each'], '{:.0f}')} MiB")
        print(f"{'SQLite growth per job (file + WAL)':44} {few(s['db_growth_mib_per_job'], '{:.1f}')} MiB;"
              f" {s['db_mib_after_stop']:.1f} MiB for {s['jobs']} jobs after the stop")
        if "load_table" in rows:
            print(f"\nscheduler load test ({a.load_jobs} jobs x 6 tasks, 64 groups):")
            print(rows.pop("load_table").rstrip())
        if a.json:
            with open(a.json, "w") as out:
                json.dump(rows, out, indent=2)
        if not f["same_output"]:
            raise SystemExit("aviary's folds or train list differ from the reference's")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
