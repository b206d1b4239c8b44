#!/usr/bin/env bash
# Set-up (if needed) and the whole test suite on CPU, then the end-to-end subset against LLaMA-Factory's
# main branch (scripts/compat.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_BROWSER=1 bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# two workers: most tests wait on one single-threaded subprocess (each worker draws its own ports: conftest.free_port)
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" tests "$@"
bash scripts/compat.sh "$@"  # the same selection (-m "not slow": the quick tier)
