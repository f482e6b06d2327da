#!/usr/bin/env bash
# Set up .venv (if needed) with the dev, bench and mlflow extras (bench: nnunetv2, for the nnU-Net equality test;
# mlflow: the logger=mlflow test) and run the test suite on two pytest-xdist workers (one per core, one torch thread
# each; a file's tests stay on one worker, so its module fixtures are built once), printing the slowest tests. Extra
# arguments go to pytest (`-n 0`: one process).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/scripts/setup_env.sh" dev,bench,mlflow
cd "$repo"
python -m pytest -q -n 2 --dist loadfile --durations=25 "$@"
