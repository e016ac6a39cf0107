#!/usr/bin/env bash
# Create .venv inside the checkout and install aurora_ds with its test and benchmark extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# DeepSpeed as pure Python: its ops are JIT-built when first needed (none on CPU).
export DS_BUILD_OPS=0
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,bench]"
