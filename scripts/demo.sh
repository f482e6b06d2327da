#!/usr/bin/env bash
# Set up .venv (if needed) and run the end-to-end demo: generate, check, plan, preprocess, train, predict, evaluate.
# Extra arguments go to `segforge demo` (e.g. --out /tmp/demo, dim=2, "train_overrides=['trainer.max_epochs=2']").
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/scripts/setup_env.sh" dev
segforge demo "$@"
