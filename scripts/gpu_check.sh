#!/usr/bin/env bash
# The GPU checks (benchmarks/gpu_check.py) from a fresh clone on one H100 or H200, in under 10 minutes; writes
# ${OUT:-saves/gpu_check}/gpu_check.json. Uses the Python that has a CUDA build of torch (PYTHON, else python3);
# installs this project into it when missing; says in one line what it cannot find.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-saves/gpu_check}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: $PY has no CUDA build of torch, or no GPU is visible (set PYTHON to one that has)"; exit 2
fi
if ! "$PY" -c "import llamafactory" 2>/dev/null; then
  "$PY" -m pip install -q "llamafactory==0.9.5" >/dev/null 2>&1 ||
    { echo "gpu_check: LLaMA-Factory is missing and pip could not install llamafactory==0.9.5 (offline?)"; exit 2; }
fi
if ! "$PY" -c "import llamafactory_longpo, deepspeed" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[deepspeed]" >/dev/null 2>&1 ||
    { echo "gpu_check: could not install this project into $PY (pip install -e '.[deepspeed]' failed: offline?)"; exit 2; }
fi
"$PY" -c "import flash_attn" 2>/dev/null ||
  echo "gpu_check: flash-attn is not installed; the shared-prefix check records that and the others run"
mkdir -p "$out"
timeout 570 "$PY" benchmarks/gpu_check.py --out "$out/gpu_check.json"
echo "gpu_check: wrote $out/gpu_check.json"
