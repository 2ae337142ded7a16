#!/usr/bin/python3
"""`aviary export` and `aviary weights import` against python3-torch/torchvision themselves.

Export: for small_cnn and efficientnet_b0..b3 (1 and 3 input channels, with and without a neck,
softmax and sigmoid), export_tool writes a checkpoint of random weights and randomised BatchNorm
statistics; `aviary export` writes it as a state dict and as safetensors. Checked: torch.load
with weights_only=True reads the state dict (an OrderedDict), the safetensors file holds the same
tensors, the JSON sidecar describes the model, the state dict loads with strict=True into
torchvision's efficientnet_bN where the sidecar says so, and the notebook block of
docs/INFERENCE.md (extracted and run as written, paths replaced) gives the same probabilities as
`aviary predict --tta 1` on synthetic soundscapes, within 1e-4. Then the refusals (an unknown
format, an --out that the sidecar would overwrite, a file that is no checkpoint). ONNX is
checked with onnxruntime by tests/integration/onnx_vs_predict.sh.

Import: torchvision's efficientnet_bN with random weights, written by Python as torch.save
(.pth) and as safetensors, and renamed to timm's parameter names (with a DataParallel "module."
prefix), must come out of `aviary weights import` as exactly its `features.*` tensors; the
ImageNet classifier is reported skipped; weights of another variant are refused as missing
tensors; a 1-channel target reports the first convolution mismatched.

usage: check_export.py BIN_DIR EXPORT_TOOL INFERENCE_MD
"""
import collections
import csv
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torchvision

BIN, TOOL, DOC = sys.argv[1], sys.argv[2], sys.argv[3]
AVIARY = os.path.join(BIN, "aviary")
TOL = 1e-4
torch.set_num_threads(2)
failures = []


def report(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)
    if not ok:
        failures.append(name)


def run(*args, check=True):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"FAIL: {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def read_safetensors(path):
    dtypes = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = collections.OrderedDict()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        a = np.frombuffer(data[b:e], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        out[name] = torch.from_numpy(a.copy())
    return out


def write_safetensors(sd, path):
    header, blobs, offset = {}, [], 0
    for name, t in sd.items():
        dtype = "I64" if t.dtype == torch.int64 else "F32"
        b = (t if dtype == "I64" else t.float()).contiguous().numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def same_tensors(a, b):
    if list(a.keys()) != list(b.keys()) and set(a.keys()) != set(b.keys()):
        return False, f"names differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        if a[k].shape != b[k].shape or not torch.equal(a[k].to(b[k].dtype), b[k]):
            return False, f"{k} differs"
    return True, f"{len(a)} tensors"


def notebook_code():
    text = open(DOC).read()
    m = re.search(r"<!-- notebook:begin -->\s*```python\n(.*?)```\s*<!-- notebook:end -->", text, re.S)
    if not m:
        raise SystemExit(f"FAIL: {DOC} has no notebook block")
    return m.group(1)


def run_notebook(code, export, audio_dir, submission):
    code = re.sub(r'^EXPORT = .*$', f"EXPORT = {export!r}", code, count=1, flags=re.M)
    code = re.sub(r'^AUDIO_DIR = .*$', f"AUDIO_DIR = {audio_dir!r}", code, count=1, flags=re.M)
    code = re.sub(r'^SUBMISSION = .*$', f"SUBMISSION = {submission!r}", code, count=1, flags=re.M)
    code = code.replace("torch.set_num_threads(os.cpu_count())", "torch.set_num_threads(2)")
    exec(compile(code, DOC + " (notebook block)", "exec"), {"__name__": "notebook"})


def read_csv(path):
    rows = list(csv.reader(open(path)))
    return rows[0], [r[0] for r in rows[1:]], np.array([[float(x) for x in r[1:]] for r in rows[1:]])


# timm's efficientnet_bN names for torchvision's (timm/models/_efficientnet_blocks.py:
# DepthwiseSeparableConv conv_dw, bn1, se, conv_pw, bn2; InvertedResidual conv_pw, bn1, conv_dw,
# bn2, se, conv_pwl, bn3; EfficientNet conv_stem, bn1, blocks, conv_head, bn2, classifier).
TIMM_DS = {"0.0": "conv_dw", "0.1": "bn1", "1.fc1": "se.conv_reduce", "1.fc2": "se.conv_expand",
           "2.0": "conv_pw", "2.1": "bn2"}
TIMM_IR = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2.fc1": "se.conv_reduce",
           "2.fc2": "se.conv_expand", "3.0": "conv_pwl", "3.1": "bn3"}


def to_timm(name):
    p = name.split(".")
    if p[0] == "classifier":
        return "classifier." + p[-1]
    s = int(p[1])
    if s == 0:
        return {"0": "conv_stem", "1": "bn1"}[p[2]] + "." + ".".join(p[3:])
    if s == 8:
        return {"0": "conv_head", "1": "bn2"}[p[2]] + "." + ".".join(p[3:])
    assert p[3] == "block", name
    layer = (TIMM_DS if s == 1 else TIMM_IR)[p[4] + "." + p[5]]
    return f"blocks.{s - 1}.{p[2]}.{layer}." + ".".join(p[6:])


def check_export(tmp, code, soundscapes):
    cases = [("small_cnn", 1, 0, "softmax"), ("small_cnn", 3, 16, "sigmoid"),
             ("efficientnet_b0", 3, 0, "softmax"), ("efficientnet_b1", 3, 0, "sigmoid"),
             ("efficientnet_b2", 1, 0, "softmax"), ("efficientnet_b3", 3, 0, "softmax"),
             ("efficientnet_b0", 3, 24, "sigmoid")]
    for i, (model, cin, neck, act) in enumerate(cases):
        tag = f"{model} in_channels={cin} neck={neck} {act}"
        d = os.path.join(tmp, f"case{i}")
        os.makedirs(os.path.join(d, "st"))
        ckpt = os.path.join(d, "best.pt")
        classes = 7
        run(TOOL, model, classes, cin, neck, act, 100 + i, ckpt)
        out = run(AVIARY, "export", ckpt, "--format", "state_dict", "--out", os.path.join(d, "model.pt")).stdout
        run(AVIARY, "export", ckpt, "--format", "safetensors", "--out", os.path.join(d, "st", "model.safetensors"))
        sd = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
        report(f"{tag}: torch.load(weights_only=True) reads an OrderedDict", isinstance(sd, collections.OrderedDict)
               and all(isinstance(v, torch.Tensor) for v in sd.values()), f"({len(sd)} tensors)")
        ok, why = same_tensors(sd, read_safetensors(os.path.join(d, "st", "model.safetensors")))
        report(f"{tag}: safetensors holds the state dict's tensors", ok, why)
        meta = json.load(open(os.path.join(d, "model.json")))
        want_tv = model if model.startswith("efficientnet") and neck == 0 else None
        report(f"{tag}: sidecar", meta["class_names"] == [f"sp{k:02d}" for k in range(classes)]
               and meta["sample_rate"] == 32000 and meta["window_samples"] == 160000
               and meta["model"]["name"] == model and meta["model"]["in_channels"] == cin
               and meta["model"]["neck_features"] == neck and meta["model"]["final_act"] == act
               and meta["model"]["torchvision"] == want_tv and meta["frontend"]["stft"]["n_fft"] == 2028
               and meta["weights"] == "model.pt" and meta["aviary_version"],
               json.dumps(meta["model"]))
        if want_tv:
            tv = getattr(torchvision.models, model)(weights=None, num_classes=classes)
            if cin != 3:
                first = tv.features[0][0]
                tv.features[0][0] = torch.nn.Conv2d(cin, first.out_channels, 3, 2, 1, bias=False)
            r = tv.load_state_dict(sd, strict=True)
            report(f"{tag}: loads strictly into torchvision.models.{model}",
                   not r.missing_keys and not r.unexpected_keys and "strict=True" in out)
        nb = os.path.join(d, "notebook.csv")
        run_notebook(code, os.path.join(d, "model.pt"), soundscapes, nb)
        sub = os.path.join(d, "predict.csv")
        run(AVIARY, "predict", "--checkpoint", ckpt, "--audio", soundscapes, "--out", sub, "--tta", "1",
            "--threads", "2")
        h1, ids1, p1 = read_csv(nb)
        h2, ids2, p2 = read_csv(sub)
        err = float(np.abs(p1 - p2).max()) if p1.shape == p2.shape else float("inf")
        report(f"{tag}: the notebook block matches aviary predict", h1 == h2 and ids1 == ids2 and err <= TOL
               and p1.size > 0, f"{len(ids1)} rows, max abs diff {err:.3g} (tol {TOL:g})")
    # Refusals.
    ckpt = os.path.join(tmp, "case0", "best.pt")
    r = run(AVIARY, "export", ckpt, "--format", "tflite", "--out", os.path.join(tmp, "m.tflite"), check=False)
    report("an unknown --format is refused, named", r.returncode == 2 and "--format" in r.stderr
           and not os.path.exists(os.path.join(tmp, "m.tflite")), r.stderr.strip())
    r = run(AVIARY, "export", ckpt, "--out", os.path.join(tmp, "m.json"), check=False)
    report("an --out that the sidecar would overwrite is refused", r.returncode != 0 and "sidecar" in r.stderr,
           r.stderr.strip())
    bogus = os.path.join(tmp, "bogus.pt")
    open(bogus, "w").write("not a checkpoint")
    r = run(AVIARY, "export", bogus, "--out", os.path.join(tmp, "b.pt"), check=False)
    report("a file that is no checkpoint is refused, named", r.returncode != 0 and bogus in r.stderr, r.stderr.strip())


def check_import(tmp):
    os.makedirs(os.path.join(tmp, "imported"))
    for name in ("efficientnet_b0", "efficientnet_b2"):
        torch.manual_seed(3)
        tv = getattr(torchvision.models, name)(weights=None)  # ImageNet's 1000 classes
        sd = tv.state_dict()
        features = collections.OrderedDict((k, v) for k, v in sd.items() if k.startswith("features."))
        timm = collections.OrderedDict(("module." + to_timm(k), v) for k, v in sd.items())
        if name == "efficientnet_b0":  # timm's published shapes of efficientnet_b0
            shapes = {"module.blocks.0.0.conv_dw.weight": (32, 1, 3, 3), "module.blocks.1.0.conv_pw.weight": (96, 16, 1, 1),
                      "module.blocks.1.0.se.conv_reduce.weight": (4, 96, 1, 1), "module.conv_head.weight": (1280, 320, 1, 1),
                      "module.blocks.6.0.conv_pwl.weight": (320, 1152, 1, 1), "module.classifier.weight": (1000, 1280)}
            report("the timm renaming has timm's efficientnet_b0 shapes",
                   all(tuple(timm[k].shape) == v for k, v in shapes.items()))
        inputs = {"pth": os.path.join(tmp, f"{name}.pth"), "safetensors": os.path.join(tmp, f"{name}.safetensors"),
                  "timm": os.path.join(tmp, f"{name}_timm.safetensors"), "timm-pth": os.path.join(tmp, f"{name}_timm.pth")}
        torch.save(sd, inputs["pth"])
        write_safetensors(sd, inputs["safetensors"])
        write_safetensors(timm, inputs["timm"])
        torch.save(timm, inputs["timm-pth"])
        for kind, path in inputs.items():
            for fmt in ("safetensors", "state_dict"):
                out = os.path.join(tmp, "imported", f"{name}_{kind}.{fmt}")
                r = run(AVIARY, "weights", "import", path, "--model", name, "--out", out, "--format", fmt)
                got = read_safetensors(out) if fmt == "safetensors" else torch.load(out, weights_only=True)
                ok, why = same_tensors(features, got)
                naming = "timm" if kind.startswith("timm") else "torchvision"
                ok = ok and f"{naming} names" in r.stdout and f"{len(features)} mapped, 2 skipped, 0 mismatched, 0 missing" in r.stdout
                ok = ok and ("classifier.1.weight" in r.stdout or "classifier.weight" in r.stdout)
                report(f"weights import {name} from {kind} -> {fmt}", ok, f"{why}; {r.stdout.splitlines()[0]}")
    r = run(AVIARY, "weights", "import", os.path.join(tmp, "efficientnet_b2.pth"), "--model", "efficientnet_b0",
            "--out", os.path.join(tmp, "wrong.safetensors"), check=False)
    report("b2 weights for efficientnet_b0 are refused", r.returncode != 0 and "mismatched" in r.stderr
           and "does not hold the efficientnet_b0 backbone" in r.stderr
           and not os.path.exists(os.path.join(tmp, "wrong.safetensors")),
           r.stderr.strip()[:300])
    torch.manual_seed(4)
    torch.save(torchvision.models.efficientnet_b1(weights=None).state_dict(), os.path.join(tmp, "b1.pth"))
    r = run(AVIARY, "weights", "import", os.path.join(tmp, "b1.pth"), "--model", "efficientnet_b0",
            "--out", os.path.join(tmp, "wrong_b1.safetensors"), check=False)
    report("b1 weights (b0's widths, more blocks) for efficientnet_b0 are refused",
           r.returncode != 0 and "backbone tensors the model lacks" in r.stderr
           and not os.path.exists(os.path.join(tmp, "wrong_b1.safetensors")), r.stderr.strip()[:300])
    out = os.path.join(tmp, "b0_mono.safetensors")
    r = run(AVIARY, "weights", "import", os.path.join(tmp, "efficientnet_b0_timm.pth"), "--model", "efficientnet_b0",
            "--in-channels", "1", "--out", out)
    report("a 1-channel target reports the first convolution mismatched",
           "1 mismatched" in r.stdout and "features.0.0.weight: file [32, 3, 3, 3] vs model [32, 1, 3, 3]" in r.stdout,
           r.stdout.strip().replace("\n", " | ")[:300])


def main():
    code = notebook_code()
    with tempfile.TemporaryDirectory() as tmp:
        run(AVIARY, "synth-soundscapes", "--out", os.path.join(tmp, "sc"), "--species", "4", "--count", "2",
            "--seconds", "22.5", "--seed", "5")
        check_export(tmp, code, os.path.join(tmp, "sc", "soundscapes"))
        check_import(tmp)
    if failures:
        print(f"{len(failures)} check(s) failed: {failures}")
        return 1
    print("all export/import checks passed")
    return 0


sys.exit(main())
