#!/usr/bin/env bash
# Set up (launchers/setup.sh) and run the default test suite. Extra arguments go to pytest,
# e.g. `bash launchers/test.sh -m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export MALLOC_TRIM_THRESHOLD_=0 MALLOC_MMAP_THRESHOLD_=65536
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
