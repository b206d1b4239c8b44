#!/usr/bin/env bash
# Set-up (if needed) and the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_BROWSER=1 bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q tests "$@"
