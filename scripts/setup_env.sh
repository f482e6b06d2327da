#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install segforge with its extras.
# Usage: source scripts/setup_env.sh [extras]   (extras default: dev; CI: dev,bench,mlflow, about 70 s more on 2 cores)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-dev}"
python="${PYTHON:-python3}"
if [ ! -x "$repo/.venv/bin/python" ]; then
  "$python" -m venv "$repo/.venv"
fi
# shellcheck disable=SC1091
. "$repo/.venv/bin/activate"
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first and pinned: on CPU machines 2.13.0 is a local CPU wheel; pyproject's range (<2.14) then adds nothing.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
python -m pip install -q -e "$repo[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
# The bench extra (nnunetv2 -> timm) pulls PyPI's torchvision, which cannot load beside the local CPU torch and then
# breaks `import lightning` (torchmetrics imports torchvision when present). nnU-Net's U-Net does not need it.
if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)" 2>/dev/null \
    && ! python -c "import torchvision" 2>/dev/null; then
  echo "removing torchvision: it does not load beside torch $(python -c 'import torch; print(torch.__version__)')"
  python -m pip uninstall -q -y torchvision
fi
# Real 2D test data: the nuclei image and mask inside stardist's wheel (BSD-3). Only the files are used: importing
# stardist needs tensorflow, so it is installed without its dependencies.
if [[ ",$extras," == *",dev,"* ]] && ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('stardist') is None)"; then
  python -m pip install -q --no-deps "stardist==0.9.2" 2>&1 | grep -v "^WARNING: Location" || true
fi
# lightning too: a torchvision that cannot load breaks it (above)
python -c "import lightning, segforge, torch; print(f'segforge {segforge.__version__}, torch {torch.__version__}')"
