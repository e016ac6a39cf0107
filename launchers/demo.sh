#!/usr/bin/env bash
# Set up (launchers/setup.sh) and run the main job once: sample data -> shards -> local S3 ->
# Aurora under ZeRO-3 on 2 ranks -> evaluation -> adapter, TensorBoard logs, report.
# Arguments go to python -m aurora_ds.demo (--out DIR, --no-s3, --ranks N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/setup.sh
source launchers/_common.sh
exec .venv/bin/python -m aurora_ds.demo "$@"
