#!/usr/bin/env bash
# Build (or reuse) the project's virtual environment: LLaMA-Factory 0.9.5 and its pinned stack,
# this plugin (editable), test tools, and the offline tiny model. Safe to run again: it only redoes
# what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.llamafactory-longpo-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [[ ! -x $VENV/bin/python ]]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "[setup] installing LLaMA-Factory 0.9.5 + llamafactory-longpo (first time: a few minutes)"
  # pip's own exit status counts; only its noise about local index folders is filtered out
  pipq() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "WARNING: Location" >&2); }
  pipq install -q --upgrade pip
  # the toolkit's own install: torch/torchaudio/torchvision as pip resolves them (runs on CPU here)
  pipq install -q "llamafactory==0.9.5" "gradio==5.50.0"
  pipq install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
# the browser test drives Debian's Chromium (the test skips, saying why, if it cannot be installed);
# only the test set-up asks for it (SETUP_BROWSER=1), the demo does not need it
if [[ ${SETUP_BROWSER:-0} == 1 ]] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium for the LlamaBoard browser test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "[setup] chromium could not be installed; the browser test will be skipped"
fi
if [[ ! -f .cache/tiny/model.safetensors ]]; then
  echo "[setup] building the offline tiny model in .cache/tiny"
  "$VENV/bin/llamafactory-longpo" make-tiny-model --force .cache/tiny  # setup owns the folder: a cut-short build is redone
fi
echo "[setup] ready: $VENV"
