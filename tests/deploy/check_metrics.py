#!/usr/bin/python3
"""Checks the Grafana dashboards and the Prometheus alert rules of deploy/ against the metrics.

  check_metrics.py REPO                      structure of deploy/grafana/*.json; every metric
                                             that a panel, a variable or an alert rule names is
                                             in docs/SERVICE.md's tables
  check_metrics.py REPO --exported-by SRC    also: each of those names is a string literal
                                             ("aviary_...") in SRC/coordinator or SRC/worker
                                             (*.cc, *.h), i.e. the code exports it

Metric names are the identifiers aviary_[a-z0-9_]+ in each PromQL expression; histogram series
(_bucket, _sum, _count) map back to the histogram's name. Exit 0 when everything holds, 1 with
one line per problem otherwise, 2 for bad arguments.
"""
import glob
import json
import os
import re
import sys

NAME_RE = re.compile(r"\baviary_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# A task's series are told apart by job_id, stage, fold and, for the points of a sweep, point
# (docs/SERVICE.md, "Metrics"): a vector match on job_id without point pairs one sweep point's
# series with another's.
MATCH_RE = re.compile(r"\b(on|ignoring|by)\s*\(([^)]*)\)")


def task_match_problems(expr):
    """The on/by clauses of expr that name job_id but not point."""
    out = []
    for kw, labels in MATCH_RE.findall(expr):
        names = {l.strip() for l in labels.split(",")}
        if kw != "ignoring" and "job_id" in names and "point" not in names:
            out.append(f"{kw} ({labels}) names job_id without point")
    return out


def base_name(name):
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def names_in(text):
    return {base_name(n) for n in NAME_RE.findall(text)}


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))  # panels inside collapsed rows


def check_dashboard(path, problems):
    """Returns {metric: [where, ...]} for the dashboard at path; appends structural problems."""
    used = {}
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{path}: not valid JSON: {e}")
        return used
    if not isinstance(dash, dict) or not isinstance(dash.get("panels"), list):
        problems.append(f"{path}: no 'panels' list")
        return used
    if not dash.get("uid") or not dash.get("title"):
        problems.append(f"{path}: the dashboard needs a uid and a title")
    variables = dash.get("templating", {}).get("list", [])
    ds_vars = [v.get("name") for v in variables if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    if not ds_vars:
        problems.append(f"{path}: no Prometheus datasource variable in templating.list")
    for v in variables:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        if not NAME_RE.search(q):
            problems.append(f"{path}: variable '{v.get('name')}' queries no aviary metric: {q!r}")
        for n in names_in(q):
            used.setdefault(n, []).append(f"{os.path.basename(path)} variable {v.get('name')}")
    ids = {}
    for p in walk_panels(dash["panels"]):
        pid, title = p.get("id"), p.get("title", "?")
        if pid is None:
            problems.append(f"{path}: panel '{title}' has no id")
        elif pid in ids:
            problems.append(f"{path}: panel id {pid} used by '{ids[pid]}' and '{title}'")
        else:
            ids[pid] = title
        if p.get("type") == "row":
            continue
        ds = p.get("datasource")
        ds_uid = ds.get("uid") if isinstance(ds, dict) else ds
        if not ds_vars or ds_uid not in {f"${{{n}}}" for n in ds_vars} | {f"${n}" for n in ds_vars}:
            problems.append(f"{path}: panel {pid} '{title}' does not use the datasource variable (got {ds!r})")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{path}: panel {pid} '{title}' has no target")
        for t in targets:
            expr = t.get("expr", "")
            found = names_in(expr)
            if not found:
                problems.append(f"{path}: panel {pid} '{title}' target {t.get('refId')} names no aviary metric: {expr!r}")
            for n in found:
                used.setdefault(n, []).append(f"{os.path.basename(path)} panel {pid} '{title}'")
            for m in task_match_problems(expr):
                problems.append(f"{path}: panel {pid} '{title}' target {t.get('refId')}: {m}: {expr!r}")
            # A sweep's points share job_id, stage and fold: a task series' legend names the point
            # too ("point 3", from label_replace; nothing for a job without a sweep).
            legend = t.get("legendFormat", "")
            if "{{job_id}}" in legend and ("{{point}}" not in legend or "label_replace(" not in expr):
                problems.append(f"{path}: panel {pid} '{title}' target {t.get('refId')}: a legend with "
                                f"{{{{job_id}}}} needs {{{{point}}}} (label_replace'd to 'point N'): {legend!r}")
    return used


def rule_names(path, problems):
    """Metric names in an alert rules file (its text without comments)."""
    used = {}
    try:
        with open(path, encoding="utf-8") as f:
            text = "".join(line for line in f if not line.lstrip().startswith("#"))
    except OSError as e:
        problems.append(f"{path}: {e}")
        return used
    for n in names_in(text):
        used.setdefault(n, []).append(os.path.basename(path))
    for m in task_match_problems(text):
        problems.append(f"{path}: {m}")
    return used


def exported_literals(src_root):
    text = []
    for sub in ("coordinator", "worker"):
        for root, _, files in os.walk(os.path.join(src_root, sub)):
            for name in files:
                if name.endswith((".cc", ".h")):
                    with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                        text.append(f.read())
    return "\n".join(text)


def main(argv):
    if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "--exported-by"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    repo = argv[1]
    problems = []
    dashboards = sorted(glob.glob(os.path.join(repo, "deploy", "grafana", "*.json")))
    if not dashboards:
        problems.append(f"{repo}/deploy/grafana: no dashboard (*.json)")
    used = {}
    for d in dashboards:
        for n, where in check_dashboard(d, problems).items():
            used.setdefault(n, []).extend(where)
    for n, where in rule_names(os.path.join(repo, "deploy", "prometheus", "alerts.yml"), problems).items():
        used.setdefault(n, []).extend(where)

    service_md = os.path.join(repo, "docs", "SERVICE.md")
    try:
        with open(service_md, encoding="utf-8") as f:
            documented = set(re.findall(r"^\| `(aviary_[a-z0-9_]+)` \|", f.read(), re.M))
    except OSError as e:
        problems.append(f"{service_md}: {e}")
        documented = set()
    for n in sorted(used):
        if n not in documented:
            problems.append(f"{n} (used by {', '.join(sorted(set(used[n])))}) is not in the metric tables of {service_md}")

    if len(argv) == 4:
        src = argv[3]
        if not os.path.isdir(os.path.join(src, "coordinator")) or not os.path.isdir(os.path.join(src, "worker")):
            print(f"--exported-by {src}: no coordinator/ and worker/ folders there", file=sys.stderr)
            return 2
        code = exported_literals(src)
        for n in sorted(used):
            if f'"{n}"' not in code:
                problems.append(f'{n} (used by {", ".join(sorted(set(used[n])))}) is not exported: no "{n}" literal '
                                f"in {src}/coordinator or {src}/worker (*.cc, *.h)")

    for p in problems:
        print(f"FAIL: {p}")
    print(f"{len(dashboards)} dashboard(s), {len(used)} metric names checked"
          + (f" against the sources in {argv[3]}" if len(argv) == 4 else "") + f": {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
