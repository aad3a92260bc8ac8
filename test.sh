#!/usr/bin/env bash
# The whole test suite from a fresh clone, in one command: ./test.sh
# Makes a venv (VENV, default .venv; reused when it exists), installs PyTorch's CPU build first
# (a plain "torch" would pull a multi-GB CUDA build), then this project with its test extra,
# and runs ruff, mypy and pytest. Extra arguments go to pytest (e.g. ./test.sh -k levit).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
python -m pip list 2>/dev/null | grep -iE '^(torch|onnx|onnxruntime|onnxscript|numpy|pytest|ruff|mypy) ' || true
ruff check .
mypy onnx_repvgg
python -m pytest -q "$@"
