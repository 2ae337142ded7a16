#!/usr/bin/env python3
"""The documented commands and flags against what the programs accept and what their --help
says (issue 13, "first contact"):

- README.md's "Commands" block: every entry's flags are in `PROGRAM CMD --help`, and every flag
  of that help is in the entry (the README lists commands in full);
- docs/SERVICE.md: the coordinator's and `serve`'s flag lists are complete both ways; the
  client bullets' flags are in the client commands' help;
- every documented flag is accepted: `PROGRAM CMD --flag=x` never answers "unknown flag";
- a README entry shows a flag that has a default (`--seed S=42` in the help) in [brackets], as
  optional.

usage: cli_docs.py BIN_DIR SOURCE_DIR
"""
import re
import subprocess
import sys

BIN, SRC = sys.argv[1], sys.argv[2]
FLAG = re.compile(r"--[a-z][a-z0-9-]*")
CLIENT = ["submit", "status", "list", "watch", "cancel", "history", "prune", "logs", "groups", "retry", "delete"]
GLOBAL = {"--coordinator", "--token-file", "--tls-ca", "--timeout"}
failures = []


def run(argv, timeout=30):
    try:
        p = subprocess.run([f"{BIN}/{argv[0]}"] + argv[1:], capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        return None, ""


def help_flags(program, command):
    argv = [program] + (command.split() if command else []) + ["--help"]
    rc, out = run(argv)
    if rc != 0:
        failures.append(f"{' '.join(argv)} exited {rc}")
    rc2, out2 = run(argv[:-1] + ["-h"])
    if rc2 != 0 or out2 != out:
        failures.append(f"{' '.join(argv[:-1])} -h differs from --help (exit {rc2})")
    if command == "init":  # its footer names the next command (--config): options only
        out = out.split("Options:", 1)[-1].split("\n\n", 1)[0]
    flags = set(FLAG.findall(out)) - {"--help", "--version"}
    if program == "aviary" and command in CLIENT:
        flags -= GLOBAL
    return flags


def accepted(program, command, flags):
    """Every documented flag in one call (a stray positional makes each program stop right after
    parsing its flags). The programs name an unknown flag before any other error
    (common/cli.cc), so a documented flag they do not know is named: a failure; it is dropped
    and the call repeated until the parser names no documented flag."""
    argv = [program] + (command.split() if command else [])
    if program == "aviary" and command in CLIENT:
        argv = ["aviary", "--coordinator", "127.0.0.1:1", "--timeout", "1", command, "j000000000000"]
    given = {f: f"{f}=x" for f in sorted(flags)}
    for _ in range(len(given) + 1):
        # `init DIR` takes one positional: a second one is the stray (init never runs).
        probe = ["__probe__", "__probe__"] if command == "init" else ["__probe__"]
        rc, out = run(argv + list(given.values()) + probe, timeout=20)
        if rc != 2:
            failures.append(f"{' '.join(argv)} with every documented flag and a stray argument exited {rc}, not 2")
        unknown = re.search(r"argument was not expected: (--[a-z0-9-]+)", out)
        if unknown and unknown.group(1) in given:
            failures.append(f"{' '.join(argv)} does not accept the documented {unknown.group(1)}")
            del given[unknown.group(1)]
        else:
            return


def unbracketed(line):
    """The flags of `line` outside [...] (innermost brackets first: `[--sweep KEY=[V1,V2] ...]`)."""
    while True:
        stripped = re.sub(r"\[[^\[\]]*\]", "", line)
        if stripped == line:
            return set(FLAG.findall(line))
        line = stripped


def defaulted_flags(program, command):
    """The flags whose help line shows a default: "  --seed S=42   random seed". --set's value
    name KEY=VALUE is no default."""
    argv = [program] + (command.split() if command else []) + ["--help"]
    _, out = run(argv)
    found = re.findall(r"^\s+(?:-\w,)?(--[a-z][a-z0-9-]*) \S*=\S*", out, re.M)
    return set(found) - {"--set"}


def compare(where, program, command, documented, both_ways=True):
    helped = help_flags(program, command)
    name = f"{program} {command or ''}".strip()
    for f in sorted(documented - helped):
        failures.append(f"{where}: {name} {f} is documented but not in `{name} --help`")
    if both_ways:
        for f in sorted(helped - documented):
            failures.append(f"{where}: `{name} --help` has {f}, the docs do not")
    accepted(program, command, documented)


def readme_entries():
    text = open(f"{SRC}/README.md").read()
    block = text.split("## Commands", 1)[1].split("```", 2)[1]
    entries = []  # [program, command, flags, flags shown outside brackets]
    client_block = False
    for line in block.splitlines():
        if not line.strip():
            continue
        words = line.split()
        if not line.startswith(" "):
            program = words[0]
            client_block = program == "aviary" and words[1].startswith("[")
            if client_block:
                continue
            command = None if program == "aviary-coordinator" else words[1]
            if program == "aviary-coordinator" and words[1] == "init":  # its own help
                command = "init"
            if command in ("dataset", "weights"):  # dataset folds|..., weights import: each its own help
                command = f"{command} {words[2]}"
            entries.append([program, command, set(), set()])
        if client_block:
            current = None
            for w in words:
                if w in CLIENT:
                    current = [("aviary"), w, set(), None]  # the client's line: not checked for brackets
                    entries.append(current)
                elif current is not None:
                    current[2].update(FLAG.findall(w))
            continue
        entries[-1][2].update(FLAG.findall(line))
        entries[-1][3].update(unbracketed(line))
    merged, required_looking = {}, {}
    for program, command, flags, bare in entries:
        merged.setdefault((program, command), set()).update(flags)
        if bare is not None:
            required_looking.setdefault((program, command), set()).update(bare)
    return merged, required_looking


def main():
    entries, required_looking = readme_entries()
    for (program, command), flags in entries.items():
        compare("README.md", program, command, flags)
    for (program, command), bare in required_looking.items():
        name = f"{program} {command or ''}".strip()
        for f in sorted(bare & defaulted_flags(program, command)):
            failures.append(f"README.md: {name} shows {f} as required; it has a default: write it [{f} ...]")
    service = open(f"{SRC}/docs/SERVICE.md").read()
    coord = service.split("Flags override keys:", 1)[1].split("Unknown keys", 1)[0]
    compare("docs/SERVICE.md", "aviary-coordinator", None, set(FLAG.findall(coord)) | {"--config"})
    serve = service.split("## Worker groups", 1)[1].split("Rank 0 registers", 1)[0]
    compare("docs/SERVICE.md", "aviary-worker", "serve", set(FLAG.findall(serve.split("Flags:", 1)[1])))
    client = service.split("## Client (`aviary`)", 1)[1]
    for line in client.splitlines():
        m = re.match(r"- `(\w+) [^`]*`", line) or re.match(r"- `(\w+)`", line)
        if m and m.group(1) in CLIENT:
            compare("docs/SERVICE.md", "aviary", m.group(1), set(FLAG.findall(m.group(0))), both_ways=False)
    # Every command of the overview has its own help.
    rc, overview = run(["aviary", "--help"])
    for command in re.findall(r"^  ([a-z][a-z-]+) ", overview, re.M):
        if run(["aviary", command, "--help"])[0] != 0:
            failures.append(f"aviary {command} --help failed")
    for f in failures:
        print("FAIL:", f)
    print(f"{len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
