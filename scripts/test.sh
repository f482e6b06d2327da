#!/usr/bin/env bash
# Set up .venv (if needed) with the dev, bench and mlflow extras (bench: nnunetv2, for the nnU-Net equality test;
# mlflow: the logger=mlflow test) and run the test suite, printing the slowest tests. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/scripts/setup_env.sh" dev,bench,mlflow
cd "$repo"
python -m pytest -q --durations=20 "$@"
