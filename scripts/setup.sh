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
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # the toolkit's own install: torch/torchaudio/torchvision as pip resolves them (runs on CPU here)
  "$VENV/bin/python" -m pip install -q "llamafactory==0.9.5" "gradio==5.50.0"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
if [[ ! -f .cache/tiny/model.safetensors ]]; then
  echo "[setup] building the offline tiny model in .cache/tiny"
  "$VENV/bin/llamafactory-longpo" make-tiny-model .cache/tiny
fi
echo "[setup] ready: $VENV"
