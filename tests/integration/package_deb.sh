#!/usr/bin/env bash
# The .deb (cpack): it holds the three programs, configs/, deploy/, the docs and the systemd units
# for its own paths (naming only files it holds), and declares its Debian dependencies;
# installed with apt-get (as root, or with passwordless sudo; skipped, exit 77, otherwise),
# `aviary --help` works and a tiny offline training runs from the installed
# files (/usr/bin, /usr/share/aviary/configs/demo.yaml); then the package is removed again.
# usage: package_deb.sh BUILD_DIR
set -uo pipefail
build=$(cd "$1" && pwd)
source "$(dirname "$0")/lib.sh"

(cd "$tmp" && cpack -G DEB --config "$build/CPackConfig.cmake" -B "$tmp/pkg" > "$tmp/cpack.log" 2>&1) ||
  { cat "$tmp/cpack.log"; fail "cpack failed"; exit 1; }
deb=$(ls "$tmp"/pkg/aviary_*.deb 2>/dev/null | head -n 1)
[ -f "$deb" ] || { fail "cpack wrote no aviary_*.deb"; cat "$tmp/cpack.log"; exit 1; }
echo "package: $(basename "$deb"), $(du -m "$deb" | cut -f1) MiB"
depends=$(dpkg-deb -f "$deb" Depends)
for want in libtorch libgrpc openmpi-bin libsndfile1 libsqlite3 libcairo2 fonts-dejavu-core libjs-dygraphs libcivetweb; do
  grep -q "$want" <<<"$depends" && ok || fail "Depends lacks $want: $depends"
done
contents=$(dpkg-deb -c "$deb" | awk '{print $6}')
for want in ./usr/bin/aviary ./usr/bin/aviary-worker ./usr/bin/aviary-coordinator \
            ./usr/share/aviary/configs/pipeline.yaml ./usr/share/aviary/configs/coordinator.yaml \
            ./usr/share/aviary/deploy/launch-group.sh ./usr/share/doc/aviary/SERVICE.md \
            ./usr/share/bash-completion/completions/aviary; do
  grep -qx -- "$want" <<<"$contents" && ok || fail "the package lacks $want"
done
# Every document of the repository (README: "the docs in P/share/doc/aviary/").
for doc in "$(dirname "$0")/../../README.md" "$(dirname "$0")"/../../docs/*.md; do
  want=./usr/share/doc/aviary/$(basename "$doc")
  grep -qx -- "$want" <<<"$contents" && ok || fail "the package lacks $want"
done
extra=$(grep '^./usr/bin/.' <<<"$contents" | grep -v -x -e ./usr/bin/aviary -e ./usr/bin/aviary-worker -e ./usr/bin/aviary-coordinator)
[ -z "$extra" ] && ok || fail "the package installs more programs than the three: $extra"
# The systemd units and env files for the .deb's paths (/usr/share/aviary/systemd): nothing in
# them names the hand-made layout's /opt/aviary, and the programs they start (ExecStart, the
# worker env file's --worker) and the Documentation= file are in the package.
mkdir -p "$tmp/unpacked" && dpkg-deb -x "$deb" "$tmp/unpacked"
for f in aviary-coordinator.service aviary-worker-group@.service coordinator.env.example worker-group.env.example; do
  shipped=/usr/share/aviary/systemd/$f
  if [ ! -f "$tmp/unpacked$shipped" ]; then fail "the package lacks $shipped"; continue; fi
  ok
  if grep -n /opt/aviary "$tmp/unpacked$shipped"; then fail "$shipped names /opt/aviary"; else ok; fi
  named=$(sed -n -e 's/^ExecStart=\([^ ]*\).*/program \1/p' -e 's/^AVIARY_LAUNCH_ARGS=.*--worker \([^ ]*\).*/program \1/p' \
                 -e 's/^Documentation=file:\([^ ]*\).*/file \1/p' "$tmp/unpacked$shipped")
  case $f in
    *.service) grep -q '^program ' <<<"$named" && ok || fail "$shipped: no ExecStart= program found" ;;
    worker-group.env.example) grep -q '^program ' <<<"$named" && ok || fail "$shipped: no --worker program found" ;;
  esac
  while read -r kind path; do
    [ -n "$path" ] || continue
    if [ ! -f "$tmp/unpacked$path" ]; then fail "$shipped names $path, which the package does not install"
    elif [ "$kind" = program ] && [ ! -x "$tmp/unpacked$path" ]; then fail "$shipped runs $path, which is not executable"
    else ok; fi
  done <<<"$named"
done

if [ "$(id -u)" = 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else
  echo "package_deb: not root and no passwordless sudo: the install step is skipped"
  [ "$fails" -eq 0 ] || exit 1
  exit 77
fi
if dpkg -s aviary >/dev/null 2>&1; then
  echo "package_deb: an aviary package is installed already; not touching it (install step skipped)"
  [ "$fails" -eq 0 ] || exit 1
  exit 77
fi
trap '"${sudo[@]}" dpkg -r aviary >/dev/null 2>&1; rm -rf "$tmp"' EXIT
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "$deb" > "$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log"; fail "apt-get install $deb failed"; exit 1; }
cd "$tmp"
/usr/bin/aviary --help | grep -q "Usage: aviary" && ok || fail "/usr/bin/aviary --help"
/usr/bin/aviary-worker --version | grep -q "libtorch" && ok || fail "/usr/bin/aviary-worker --version"
/usr/bin/aviary-coordinator init --help | grep -q "Usage: aviary-coordinator init" && ok || fail "/usr/bin/aviary-coordinator init --help"
bash -c 'source /usr/share/bash-completion/completions/aviary && complete -p aviary' | grep -q _aviary && ok ||
  fail "the bash completion of aviary is not installed"
/usr/bin/aviary synth --out t24 --layout 2024 --species 4 --recordings 32 --seed 3 --max-seconds 6 --no-broken > /dev/null ||
  fail "installed aviary synth"
set_args=(--set data.target.root="$tmp/t24" --set 'data.pretrain_sources=[]' --set data.cache_dir="$tmp/cache"
          --set stages.pretrain.enabled=false --set train.epochs=1 --set train.num_workers=1)
/usr/bin/aviary prepare --config /usr/share/aviary/configs/demo.yaml "${set_args[@]}" > prepare.log 2>&1 ||
  { cat prepare.log; fail "installed aviary prepare"; }
if /usr/bin/aviary-worker train --config /usr/share/aviary/configs/demo.yaml "${set_args[@]}" --stage finetune \
     --fold 0 --out run --threads 1 > train.log 2>&1 && [ -s run/best.pt ] && [ -s run/history.csv ]; then
  ok
else
  tail -n 20 train.log; fail "the installed aviary-worker did not train"
fi
# The client's torch command runs the installed aviary-worker next to it.
/usr/bin/aviary mel --config /usr/share/aviary/configs/demo.yaml "${set_args[@]}" \
  --audio "$(ls t24/train_audio/*/*.ogg | head -n 1)" --out x.npy > mel.log 2>&1 && [ -s x.npy ] && ok ||
  { cat mel.log; fail "installed aviary mel"; }
echo "package_deb: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
