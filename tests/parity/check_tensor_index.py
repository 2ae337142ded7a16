"""common/tensor_index and the model.pretrained_weights rule on files Python's torch writes.

torchvision's efficientnet_b0 and b3 (random init) saved by torch.save (the zip format; also
nested in a checkpoint dict, and in half precision) and as safetensors: tensor_index_tool must
read exactly the names, dtypes and shapes torch has, and the rule must accept each variant for its
own model (also for one input channel) and refuse the other. `aviary weights import` output in
both formats must pass. A nested state dict beside a dotted key of the same name must be refused
by the index, the rule and `aviary weights import`, naming the file and the name. A legacy (pre-1.6) torch.save and truncated files must be clear errors.

Usage: check_tensor_index.py BIN_DIR TENSOR_INDEX_TOOL
"""
import collections
import json
import os
import struct
import subprocess
import sys
import tempfile

import torch
import torchvision

BIN, TOOL = sys.argv[1], sys.argv[2]
AVIARY = os.path.join(BIN, "aviary")
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.float64: "F64"}
failures = []


def report(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)
    if not ok:
        failures.append(name)


def run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True)


def write_safetensors(sd, path):
    header, blobs, offset = {}, [], 0
    for name, t in sd.items():
        b = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def expected_index(sd, prefix=""):
    return [f"{prefix}{k} {DTYPES[t.dtype]} {','.join(str(d) for d in t.shape)}" for k, t in sd.items()]


def check_index(tag, path, want):
    r = run(TOOL, "index", path)
    got = r.stdout.splitlines()
    report(f"index of {tag}", r.returncode == 0 and got == want,
           "" if got == want else f"rc {r.returncode}; first difference: "
           f"{next(((a, b) for a, b in zip(got, want) if a != b), (len(got), len(want)))}")


def check_fit(tag, path, model, channels, fits, expect=""):
    r = run(TOOL, "fit", path, model, channels)
    out = r.stdout.strip()
    ok = (r.returncode == 0) == fits and expect in out
    report(f"{tag} {'fits' if fits else 'refused for'} {model} in_channels {channels}", ok, "" if ok else out)
    return out


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in ("efficientnet_b0", "efficientnet_b3"):
            sd = getattr(torchvision.models, name)(weights=None).state_dict()
            pth, st = os.path.join(tmp, f"{name}.pth"), os.path.join(tmp, f"{name}.safetensors")
            torch.save(sd, pth)
            write_safetensors(sd, st)
            check_index(f"{name} torch.save", pth, expected_index(sd))
            check_index(f"{name} safetensors", st, expected_index(sd))
            files[name] = (pth, st, sd)
        b0_pth, b0_st, b0 = files["efficientnet_b0"]
        b3_pth, b3_st, _ = files["efficientnet_b3"]

        # A checkpoint dict around the state dict, and half precision.
        nested = os.path.join(tmp, "nested.pth")
        torch.save({"epoch": 3, "state_dict": b0, "args": {"lr": 0.1, "names": ["a", "b"]}}, nested)
        check_index("a nested checkpoint", nested, expected_index(b0, "state_dict."))
        half_sd = collections.OrderedDict((k, t.half() if t.is_floating_point() else t) for k, t in b0.items())
        half = os.path.join(tmp, "half.pth")
        torch.save(half_sd, half)
        check_index("half precision", half, expected_index(half_sd))

        for path in (b0_pth, b0_st, half):
            for channels in (1, 3):
                check_fit(os.path.basename(path), path, "efficientnet_b0", channels, True)
        check_fit("b3.safetensors", b3_st, "efficientnet_b3", 3, True)
        for path in (b3_pth, b3_st):
            check_fit(os.path.basename(path), path, "efficientnet_b0", 1, False,
                      "mismatched: features.0.0.weight: file [40, 3, 3, 3] vs model [32, 1, 3, 3]")
        check_fit("b0.pth", b0_pth, "efficientnet_b3", 3, False, "missing: ")
        check_fit("b0.pth", b0_pth, "efficientnet_b1", 3, False, "missing: ")
        check_fit("nested.pth", nested, "efficientnet_b0", 3, False, "no `features.*` backbone tensor")

        # A nested state dict beside a dotted key of the same flattened name: which tensor is
        # meant is ambiguous, so every reader refuses it naming the file and the name.
        clash = os.path.join(tmp, "clash.pth")
        torch.save({"state_dict": b0, "state_dict.features.0.0.weight": torch.zeros(32, 1, 3, 3)}, clash)
        want = f"two tensors are named 'state_dict.features.0.0.weight'"
        r = run(TOOL, "index", clash)
        report("index of a nested and a dotted name that collide", r.returncode == 1 and clash in r.stdout and
               want in r.stdout, r.stdout)
        check_fit("clash.pth", clash, "efficientnet_b0", 3, False, want)
        r = run(AVIARY, "weights", "import", clash, "--model", "efficientnet_b0", "--out",
                os.path.join(tmp, "clash_out.safetensors"))
        report("weights import of the colliding names", r.returncode != 0 and clash in r.stderr and want in r.stderr
               and not os.path.exists(os.path.join(tmp, "clash_out.safetensors")), r.stdout + r.stderr)

        # `aviary weights import` output passes the check, in both formats.
        for fmt in ("state_dict", "safetensors"):
            out = os.path.join(tmp, f"imported.{fmt}")
            r = run(AVIARY, "weights", "import", nested, "--model", "efficientnet_b0", "--out", out, "--format", fmt)
            report(f"weights import -> {fmt}", r.returncode == 0, r.stdout + r.stderr)
            check_fit(f"imported {fmt}", out, "efficientnet_b0", 1, True)

        # Legacy and truncated files.
        legacy = os.path.join(tmp, "legacy.pth")
        torch.save(b0, legacy, _use_new_zipfile_serialization=False)
        check_fit("legacy torch.save", legacy, "efficientnet_b0", 3, False, "legacy torch.save")
        for src, cut in ((b0_pth, 1000), (b0_pth, os.path.getsize(b0_pth) // 2), (b0_st, 100)):
            data = open(src, "rb").read()
            bad = os.path.join(tmp, "truncated" + os.path.splitext(src)[1])
            with open(bad, "wb") as f:
                f.write(data[:len(data) - cut] if cut < len(data) else data[:cut])
            out = check_fit(f"{os.path.basename(src)} without its last {cut} bytes", bad, "efficientnet_b0", 3, False,
                            bad)
            report(f"  names the problem", "truncated" in out or "no zip end record" in out or
                   "do not fit" in out, out)
    if failures:
        raise SystemExit(f"{len(failures)} checks failed: {failures}")


main()
