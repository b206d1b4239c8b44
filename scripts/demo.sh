#!/usr/bin/env bash
# The main job: environment + tiny model, then `llamafactory-cli train` on a tiny SoLoPO example and
# a tiny LongPO example, on CPU. Loss plots land in saves/tiny/*/training_loss.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" DISABLE_VERSION_CHECK=1
mkdir -p saves/logs
for cfg in examples/tiny/solo_orpo_tiny.yaml examples/tiny/longpo_tiny.yaml; do
  echo "[demo] llamafactory-cli train $cfg"
  llamafactory-cli train "$cfg" > "saves/logs/$(basename "$cfg" .yaml).log" 2>&1 || { tail -30 "saves/logs/$(basename "$cfg" .yaml).log"; exit 1; }
done
ls -1 saves/tiny/*/training_loss.png
