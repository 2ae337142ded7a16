#!/usr/bin/env bash
# Decode + resample throughput per core, cache preparation, and clip reads from the cache,
# against ffmpeg on the same synthetic corpus in the same invocation.
# Usage: bench/decode_bench.sh [BUILD_DIR]
#
#   decode:  aviary (libsndfile + soxr HQ, first channel, one thread) vs
#            `ffmpeg -threads 1 -i F -ac 1 -ar 32000 -f f32le -` run once per file
#   clips:   10 s training clips read from the cache / decoded on the fly (one thread) vs
#            `ffmpeg -ss S -t 10 -i F -ac 1 -ar 32000 -f f32le -` per clip, with and without
#            ffmpeg's start-up (as the decode rows)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
bench="$build/bench/decode_bench"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$build/bin/aviary" synth --out "$tmp/ogg" --layout 2024 --species 10 --recordings 60 --seed 1 --max-seconds 300 --no-broken >/dev/null
"$build/bin/aviary" synth --out "$tmp/mp3" --layout xc --species 10 --recordings 60 --seed 2 --max-seconds 300 --no-broken >/dev/null
find "$tmp/ogg" -name '*.ogg' | sort > "$tmp/ogg.list"
find "$tmp/mp3" -name '*.mp3' | sort > "$tmp/mp3.list"
cat "$tmp/ogg.list" "$tmp/mp3.list" > "$tmp/all.list"

# Seconds of wall time for a command, best of $2 runs.
best_of() {
  local cmd=$1 runs=$2 best=""
  for _ in $(seq "$runs"); do
    local t0 t1 d
    # Inside $(...) set -e is off: a failed (and fast) run must not be the best.
    t0=$(date +%s.%N); eval "$cmd" >/dev/null || { echo "failed: $cmd" >&2; return 1; }; t1=$(date +%s.%N)
    d=$(python3 -c "print($t1 - $t0)")
    if [ -z "$best" ] || python3 -c "import sys; sys.exit(0 if $d < $best else 1)"; then best=$d; fi
  done
  echo "$best"
}

ffmpeg_files() {  # ffmpeg_files LIST
  while read -r f; do
    ffmpeg -nostdin -v error -threads 1 -i "$f" -ac 1 -ar 32000 -f f32le - >/dev/null || return 1
  done < "$1"
}

# ffmpeg's fixed cost per invocation (process start, probing): a 10 ms file, best of 20 runs.
python3 - "$tmp/tiny.wav" <<'PY'
import struct, sys
n = 320
data = b"\0\0" * n
hdr = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 32000, 64000, 2, 16) + b"data" + struct.pack("<I", len(data))
open(sys.argv[1], "wb").write(hdr + data)
PY
startup=$(best_of "for i in \$(seq 20); do ffmpeg -nostdin -v error -threads 1 -i $tmp/tiny.wav -ac 1 -ar 32000 -f f32le - >/dev/null || exit 1; done" 3)
startup=$(python3 -c "print($startup / 20)")

echo "machine: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(. /etc/os-release; echo "$PRETTY_NAME")"
echo "ffmpeg: $(ffmpeg -version | head -1 | cut -d' ' -f3)"
for kind in ogg mp3; do
  "$bench" decode "$tmp/$kind.list" >/dev/null  # warm the page cache
  ours=""
  for _ in 1 2 3; do
    line=$("$bench" decode "$tmp/$kind.list")
    w=$(sed -n 's/.*wall_s=\([0-9.]*\).*/\1/p' <<<"$line")
    if [ -z "$ours" ] || python3 -c "import sys; sys.exit(0 if $w < $(sed -n 's/.*wall_s=\([0-9.]*\).*/\1/p' <<<"$ours") else 1)"; then ours=$line; fi
  done
  audio=$(sed -n 's/.* audio_s=\([0-9.]*\).*/\1/p' <<<"$ours")
  files=$(sed -n 's/.*decode files=\([0-9]*\).*/\1/p' <<<"$ours")
  wall=$(sed -n 's/.*wall_s=\([0-9.]*\).*/\1/p' <<<"$ours")
  ref=$(best_of "ffmpeg_files $tmp/$kind.list" 2)
  python3 - "$kind" "$files" "$audio" "$wall" "$ref" "$startup" <<'PY'
import sys
kind, files, audio, wall, ref, startup = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
net = ref - files * startup
print(f"decode {kind}: {files} files, {audio:.0f} s of audio | aviary {wall:.2f} s = {audio/wall:.0f} s audio/s, "
      f"{files/wall:.1f} files/s | ffmpeg {ref:.2f} s = {audio/ref:.0f} s audio/s, {files/ref:.1f} files/s | "
      f"ratio {ref/wall:.2f}x | ffmpeg less {startup*1000:.1f} ms start-up per file: {net:.2f} s, ratio {net/wall:.2f}x")
PY
done

"$bench" prepare "$tmp/all.list" "$tmp/cache1" 1
rm -rf "$tmp/cache1"
"$bench" prepare "$tmp/all.list" "$tmp/cache" "$(nproc)"

clips=$("$bench" clips "$tmp/all.list" "$tmp/cache" 400 10 "$tmp/clips.tsv")
echo "$clips"
# ffmpeg reads the same clips at the same offsets as aviary (all of clips.tsv).
nclips=$(grep -c . "$tmp/clips.tsv")
ffmpeg_clips() {
  while IFS=$'\t' read -r f s; do
    ffmpeg -nostdin -v error -threads 1 -ss "$s" -t 10 -i "$f" -ac 1 -ar 32000 -f f32le - >/dev/null || return 1
  done < "$tmp/clips.tsv"
}
ref=$(best_of ffmpeg_clips 2)
cache_rate=$(sed -n 's/.*source=cache.*clips_per_s=\([0-9.]*\).*/\1/p' <<<"$clips")
fly_rate=$(sed -n 's/.*source=decode.*clips_per_s=\([0-9.]*\).*/\1/p' <<<"$clips")
# Against one ffmpeg process per clip, most of whose time is its start-up; and against ffmpeg
# less that start-up (the whole-file rows' $startup, measured on a 10 ms wav), as the decode rows.
python3 -c "
ref = $nclips / $ref
net_s = $ref - $nclips * $startup
net = $nclips / net_s if net_s > 0 else float('nan')
print(f'clips (10 s, one core): cache {$cache_rate:.0f}/s, on the fly {$fly_rate:.0f}/s, ffmpeg -ss {ref:.1f}/s | '
      f'ratios against one ffmpeg process per clip: cache {$cache_rate/ref:.0f}x, on the fly {$fly_rate/ref:.1f}x | '
      f'ffmpeg less {$startup*1000:.1f} ms start-up per clip: {net:.0f}/s, ratios: cache {$cache_rate/net:.0f}x, on the fly {$fly_rate/net:.2f}x')
"
