#!/usr/bin/env bash
# Compatibility run: the end-to-end subset (train CLI, bad input, exactness, one sequence-parallel run) against
# LLaMA-Factory's main branch (0.9.6.dev0, .ci/wheels) with the newest transformers that branch allows.
# The environment .venv-compat reuses .venv's packages (a path file) and holds only what differs.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLKIT_WHEEL=.ci/wheels/llamafactory-0.9.6.dev0-py3-none-any.whl
TRANSFORMERS=${COMPAT_TRANSFORMERS:-5.8.0}  # the toolkit main branch's upper bound
VENV=.venv-compat
stamp="$VENV/.llamafactory-longpo-compat"
want=$(cat pyproject.toml scripts/compat.sh "$TOOLKIT_WHEEL" | sha256sum | cut -d' ' -f1)
[[ -x .venv/bin/python ]] || bash scripts/setup.sh
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "[compat] building $VENV: LLaMA-Factory 0.9.6.dev0 + transformers $TRANSFORMERS over .venv's packages"
  rm -rf "$VENV"
  .venv/bin/python -m venv "$VENV"
  base=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  own=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$base" > "$own/_main_venv.pth"  # after the compat venv's own packages: what it installs wins
  pipq() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v -e "WARNING: Location" -e "outside environment" >&2); }
  pipq install -q "$TOOLKIT_WHEEL" "transformers==$TRANSFORMERS"
  pipq install -q --no-deps -e .
  # torch lives in .venv, so pip made no torchrun here; the toolkit's launcher finds it on PATH, and .venv's
  # own would start the ranks under .venv's interpreter (toolkit 0.9.5, older transformers).
  printf '#!/usr/bin/env bash\nexec "%s" -m torch.distributed.run "$@"\n' "$PWD/$VENV/bin/python" > "$VENV/bin/torchrun"
  chmod +x "$VENV/bin/torchrun"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c 'import importlib.metadata as m; print("[compat] llamafactory", m.version("llamafactory"), "transformers", m.version("transformers"))'
export PATH="$PWD/$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" \
  tests/e2e/test_train_cli.py tests/e2e/test_bad_input.py tests/train/test_exactness.py tests/train/test_shared_prefix.py \
  tests/test_attention_kernels.py "tests/e2e/test_sequence_parallel.py::test_sequence_parallel_equals_one_process[longpo]" "$@"
