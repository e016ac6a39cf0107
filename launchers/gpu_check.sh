#!/usr/bin/env bash
# Does the GPU path work here? One prepared run, at most ~8 minutes on one H100/H200-class GPU:
# every recipe a few steps under DeepSpeed ZeRO-3 + NCCL in bf16, one in fp16, one on the plain
# path, one at BLIP-base size, aurora-eval on an adapter, the BLIP-base bf16 step benchmark (batch 8, 64);
# then one summary table (stdout and OUT/summary.md, figures in OUT/summary.json).
#
#   bash launchers/gpu_check.sh [--out DIR] [--cpu] [--only NAME,...]
#
# Needs no package registry. It uses the python3 on PATH (or $PYTHON), which must have torch,
# transformers, timm, tokenizers, safetensors, pyyaml, pillow, tensorboard and peft; deepspeed,
# webdataset, braceexpand, decord and av may come as wheels in $WHEELS (default: .whl/ in the
# checkout), installed into a private folder for this run only. Build them where pip works with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl webdataset braceexpand decord av hjson pydantic pydantic-core annotated-types typing-inspection
#   DS_BUILD_OPS=0 pip wheel --no-deps -w .whl deepspeed
# --cpu runs the same plan on the CPU with gloo (no fp16, no step benchmark), to exercise the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
WHEELS=${WHEELS:-.whl}
if ! "$PY" -c "import deepspeed, webdataset, braceexpand, decord, av" 2>/dev/null && compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/aurora_ds/torch_extensions}"
exec "$PY" launchers/gpu_check.py "$@"
