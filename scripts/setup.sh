#!/usr/bin/env bash
# Create .venv and install scalegen with its test extras. torch 2.14.1 / torchvision 0.29.1 are pinned so pip
# takes them from the local wheel store where there is one (no multi-GB download on machines that have it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
