#!/usr/bin/env bash
# `aviary completion bash`: the script completes commands, subcommands and flags at each point
# of a command line, and the torch commands' flags from aviary-worker's help.
# usage: bash_completion.sh BIN_DIR
set -uo pipefail
bin=${1:?usage: bash_completion.sh BIN_DIR}
script=$("$bin/aviary" completion bash) || { echo "FAIL: aviary completion bash exited $?"; exit 1; }
source /dev/stdin <<<"$script"
failures=0
# complete WORDS... : what the completion offers for the last word.
complete_words() {
  COMP_WORDS=("$@")
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
  COMPREPLY=()
  _aviary
  echo "${COMPREPLY[*]}"
}
check() {
  local want=$1
  shift
  local got
  got=$(complete_words "$@")
  if [ "$got" != "$want" ]; then
    echo "FAIL: '${*:2}' completes to '$got', wanted '$want'"
    failures=$((failures + 1))
  fi
}
check "dataset" "$bin/aviary" dat
check "folds" "$bin/aviary" dataset f
check "--stage" "$bin/aviary" dataset folds --config p.yaml --st
check "--json" "$bin/aviary" --coordinator h:1 status --j
check "synth synth-soundscapes" "$bin/aviary" syn
check "--memory-format" "$bin/aviary" predict --checkpoint x --mem
check "--offset --out" "$bin/aviary" mel --o
echo "bash_completion: $failures failure(s)"
[ "$failures" -eq 0 ]
