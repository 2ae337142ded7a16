#!/usr/bin/python3
"""Runs docs/INFERENCE.md's notebook block as written (paths and thread count replaced) and
prints its timing: per_file_s (the prediction loop over the files / the file count) and wall_s
(including imports and model loading). For bench/export_bench.sh.
usage: notebook_inference.py INFERENCE_MD EXPORT AUDIO_DIR SUBMISSION THREADS
"""
import re
import sys
import time

start = time.perf_counter()
doc, export, audio_dir, submission, threads = sys.argv[1:6]
text = open(doc).read()
code = re.search(r"<!-- notebook:begin -->\s*```python\n(.*?)```\s*<!-- notebook:end -->", text, re.S).group(1)
code = re.sub(r"^EXPORT = .*$", f"EXPORT = {export!r}", code, count=1, flags=re.M)
code = re.sub(r"^AUDIO_DIR = .*$", f"AUDIO_DIR = {audio_dir!r}", code, count=1, flags=re.M)
code = re.sub(r"^SUBMISSION = .*$", f"SUBMISSION = {submission!r}", code, count=1, flags=re.M)
code = code.replace("torch.set_num_threads(os.cpu_count())", f"torch.set_num_threads({int(threads)})")
scope = {"__name__": "notebook"}
exec(compile(code, doc, "exec"), scope)
print(f"per_file_s={scope['elapsed'] / max(1, len(scope['files'])):.3f} wall_s={time.perf_counter() - start:.2f}")
