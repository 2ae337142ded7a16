#!/usr/bin/env bash
# `aviary mel` end to end on real ogg and mp3 files: the .npy is what numpy reads, with the
# model input's shape and range, equal to torchaudio's MelSpectrogram + AmplitudeToDB + the
# notebook's normalisation on the same decoded samples (ffmpeg decodes them for the reference);
# --offset moves the window; bad input is refused with exit code 2 (for weights import too: an
# --out in a missing folder; export makes that folder, and refuses a file on the way).
# usage: mel_cli.sh AVIARY_BIN
set -uo pipefail
aviary=$1
source "$(dirname "$0")/lib.sh"

"$aviary" synth --out "$tmp/t" --layout 2024 --species 4 --recordings 12 --seed 9 --max-seconds 14 --no-broken >/dev/null
"$aviary" synth --out "$tmp/x" --layout xc --species 4 --recordings 12 --seed 9 --max-seconds 14 --no-broken >/dev/null
cat > "$tmp/p.yaml" <<YAML
data: {duration: 5.0, target: {layout: "2024", root: $tmp/t}, pretrain_sources: []}
stages: {pretrain: {enabled: false}}
YAML
ogg=$(find "$tmp/t/train_audio" -name '*.ogg' | sort | head -1)
mp3=$(find "$tmp/x" -name '*.mp3' | sort | head -1)
for f in "$ogg" "$mp3"; do
  for offset in 0 1.5; do
    if ! "$aviary" mel --config "$tmp/p.yaml" --audio "$f" --offset $offset --out "$tmp/m.npy" > "$tmp/log" 2>&1; then
      cat "$tmp/log"; fail "mel $f --offset $offset"; continue
    fi
    # "zero-padded at the end" when, and only when, fewer samples than the window were read.
    read -r got window < <(sed -n 's/.* from \([0-9]*\) samples (window \([0-9]*\).*/\1 \2/p' "$tmp/log")
    if [ -z "${got:-}" ] || [ -z "${window:-}" ] ||
       { [ "$got" -lt "$window" ] && ! grep -qF "(window $window, zero-padded at the end)" "$tmp/log"; } ||
       { [ "$got" -ge "$window" ] && grep -qF "zero-padded" "$tmp/log"; }; then
      fail "mel $f --offset $offset: padding said wrongly: $(cat "$tmp/log")"
    else
      ok
    fi
    /usr/bin/python3 - "$f" "$tmp/m.npy" "$offset" <<'PY' && passes=$((passes + 1)) || fails=$((fails + 1))
import subprocess, sys
import numpy as np
import torch, torchaudio
path, npy, offset = sys.argv[1], sys.argv[2], float(sys.argv[3])
ours = np.load(npy)
assert ours.dtype == np.float32 and ours.shape == (3, 128, 1 + 160000 // 835), f"shape {ours.shape} {ours.dtype}"
assert np.isfinite(ours).all() and ours.min() >= 0 and ours.max() <= 1 + 1e-6
raw = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-af", "pan=mono|c0=c0", "-ar", "32000",
                      "-f", "f32le", "-"], capture_output=True, check=True).stdout
x = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())
start = int(round(offset * 32000))
clip = torch.zeros(160000)
seg = x[start:start + 160000]
clip[:len(seg)] = seg
mel = torchaudio.transforms.MelSpectrogram(sample_rate=32000, n_fft=2028, win_length=2028, hop_length=835,
    f_min=20, f_max=16000, n_mels=128, power=2.0, center=True, pad_mode="reflect", norm=None, mel_scale="htk")
db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80)(mel(clip[None])[None])[0, 0]
z = (db - db.mean()) / db.std()
ref = ((z - z.min()) / (z.max() - z.min())).numpy()
diff = float(np.abs(ours[0] - ref).max())
# ffmpeg and libsndfile decode these files independently; allow for decoder rounding.
print(f"{path.rsplit('/', 1)[1]} offset {offset}: max |aviary - torchaudio| = {diff:.2e}")
assert diff < 1e-3, diff
assert np.array_equal(ours[0], ours[1]) and np.array_equal(ours[0], ours[2])
PY
  done
done
# A full window (every file is at least 0.3 s long) is not "zero-padded"; one that runs past the
# file's end is.
out=$("$aviary" mel --config "$tmp/p.yaml" --set data.duration=0.25 --audio "$ogg" --out "$tmp/w.npy" 2>&1)
if [ $? -ne 0 ] || ! grep -qF "from 8000 samples (window 8000), source" <<<"$out"; then
  fail "mel of a full window: $out"
else
  ok
fi
len=$(sed -n 's/.*, source \([0-9.]*\) s at .*/\1/p' <<<"$out")
end=$(awk -v l="${len:-0}" 'BEGIN { printf "%.3f", (l > 0.2 ? l - 0.1 : 0) }')
out=$("$aviary" mel --config "$tmp/p.yaml" --set data.duration=0.25 --audio "$ogg" --offset "$end" --out "$tmp/w.npy" 2>&1)
if [ $? -ne 0 ] || ! grep -qE "from [0-9]+ samples \(window 8000, zero-padded at the end\), source" <<<"$out"; then
  fail "mel of a window past the file's end (--offset $end): $out"
else
  ok
fi
# An mp3 without a Xing/Info tag states no length: mel says so rather than a made-up duration.
if command -v ffmpeg >/dev/null; then
  ffmpeg -v error -nostdin -i "$mp3" -c:a libmp3lame -q:a 4 -write_xing 0 "$tmp/untagged.mp3"
  if out=$("$aviary" mel --config "$tmp/p.yaml" --audio "$tmp/untagged.mp3" --out "$tmp/u.npy" 2>&1) &&
     grep -qF "source of unknown length (an mp3 without a length tag)" <<<"$out" &&
     /usr/bin/python3 -c "import numpy as np, sys; sys.exit(0 if np.load('$tmp/u.npy').shape == (3, 128, 192) else 1)"; then
    ok
  else
    fail "mel of an mp3 without a length tag: $out"
  fi
else
  echo "SKIP mel of an mp3 without a length tag: ffmpeg is not installed"
fi
echo "not audio" > "$tmp/text.ogg"
expect "$tmp/text.ogg" "$aviary" mel --config "$tmp/p.yaml" --audio "$tmp/text.ogg" --out "$tmp/bad.npy"
expect "$tmp/missing.ogg" "$aviary" mel --config "$tmp/p.yaml" --audio "$tmp/missing.ogg" --out "$tmp/bad.npy"
expect "--offset" "$aviary" mel --config "$tmp/p.yaml" --audio "$ogg" --offset -3 --out "$tmp/bad.npy"
expect "--out is required" "$aviary" mel --config "$tmp/p.yaml" --audio "$ogg"
[ -e "$tmp/bad.npy" ] && fail "a refused command wrote its output"
# --out naming an input would replace it (the clip was decoded first, then overwritten).
cp "$ogg" "$tmp/self.ogg"
expect "--out $tmp/self.ogg: is the --audio file $tmp/self.ogg itself" \
  "$aviary" mel --config "$tmp/p.yaml" --audio "$tmp/self.ogg" --out "$tmp/self.ogg"
expect "--out $tmp/p.yaml: is the --config file $tmp/p.yaml itself" \
  "$aviary" mel --config "$tmp/p.yaml" --audio "$ogg" --out "$tmp/p.yaml"
cmp -s "$ogg" "$tmp/self.ogg" || fail "a refused --out replaced its --audio file"
# An --out in a missing folder is bad input named by its flag (exit 2, as `aviary dataset` and
# `aviary predict` say it), for the torch tools that write through a temporary file; checked
# before any work, so no checkpoint or weights file is needed to see it.
expect "--out $tmp/nodir/m.npy: the folder $tmp/nodir does not exist" \
  "$aviary" mel --config "$tmp/p.yaml" --audio "$ogg" --out "$tmp/nodir/m.npy"
# The same through a dangling link (the write goes to its target): it failed after the work with
# exit 1, naming a temporary file.
ln -s "$tmp/nodir2/y.npy" "$tmp/dangling.npy"
expect "--out $tmp/dangling.npy (a link to $tmp/nodir2/y.npy): the folder $tmp/nodir2 does not exist" \
  "$aviary" mel --config "$tmp/p.yaml" --audio "$ogg" --out "$tmp/dangling.npy"
# A flag where a value goes (the value left out) is named, not taken as the value.
expect "--config: expected a value, got the flag '--audio'" \
  "$aviary" mel --config --audio "$ogg" --out "$tmp/x.npy"
# export makes a missing folder (as aviary-worker train --out does): the refusal is the input's,
# not the folder's, and a refused export leaves no folder behind; a path on the way that is a file
# is still refused.
out=$("$aviary" export "$tmp/p.yaml" --out "$tmp/nodir/sub/model.pt" 2>&1); rc=$?
if [ $rc -eq 0 ] || grep -qF "does not exist" <<<"$out" || ! grep -qF "$tmp/p.yaml" <<<"$out" || [ -e "$tmp/nodir" ]; then
  fail "export into a missing folder of a file that is no checkpoint -> rc=$rc, $(ls -d "$tmp/nodir" 2>&1): $out"
else
  ok
fi
expect "--out $tmp/p.yaml/model.pt: $tmp/p.yaml is not a folder" \
  "$aviary" export "$tmp/p.yaml" --out "$tmp/p.yaml/model.pt"
expect "--out $tmp/nodir/b0.safetensors: the folder $tmp/nodir does not exist" \
  "$aviary" weights import "$tmp/p.yaml" --model efficientnet_b0 --out "$tmp/nodir/b0.safetensors"
echo "mel_cli: $passes passed, $fails failed"
[ $fails -eq 0 ]
