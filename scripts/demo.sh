#!/usr/bin/env bash
# The main job, on CPU: set-up, then SoLo-ORPO and LongPO trained with `llamafactory-cli train` from the
# shipped start model (examples/demo_model: reads long inputs, reasons worse over them), then the start
# model and both methods answer the same held-out key-value questions at 1x, 2x, 4x and 8x the short
# length (`llamafactory-longpo eval kv`): a before/after accuracy table with 95% intervals, and
# saves/demo/accuracy_vs_length.png next to the loss plots saves/demo/*/training_loss.png.
#
# Shorter runs (the tests): DEMO_STEPS (training steps of each method), DEMO_ITEMS (questions per length
# and task), DEMO_OUT (output folder, default saves/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" DISABLE_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
# one torch thread per process: a model this small runs no faster on two, and much slower next to other work
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export LLAMAFACTORY_VERBOSITY=${LLAMAFACTORY_VERBOSITY:-WARN} TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}
out=${DEMO_OUT:-saves/demo}
mkdir -p "$out/logs"
start=$SECONDS
for method in solo_orpo longpo; do
  cfg=examples/demo/${method}_kv.yaml
  log="$out/logs/$method.log"
  echo "[demo] llamafactory-cli train $cfg"
  llamafactory-cli train "$cfg" "output_dir=$out/$method" "s2l_ref_cache_dir=$out/ref_cache" ${DEMO_STEPS:+"max_steps=$DEMO_STEPS" "logging_steps=1"} \
    > "$log" 2>&1 || { tail -30 "$log"; exit 1; }
done
echo "[demo] llamafactory-longpo eval kv examples/eval/kv_demo.yaml"
llamafactory-longpo eval kv examples/eval/kv_demo.yaml "output_dir=$out" "models.SoLo-ORPO=$out/solo_orpo" \
  "models.LongPO=$out/longpo" ${DEMO_ITEMS:+"items=$DEMO_ITEMS"} 2> "$out/logs/eval.log" || { tail -30 "$out/logs/eval.log"; exit 1; }
echo "[demo] plots:"
ls -1 "$out"/*/training_loss.png "$out/accuracy_vs_length.png"
echo "[demo] done in $((SECONDS - start)) s after set-up"
