#!/usr/bin/env bash
# The tests: set up .venv when needed, then run pytest with the venv's python.
# Extra arguments go to pytest (e.g. ./run_tests.sh -k synth -x).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
