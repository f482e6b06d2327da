#!/usr/bin/env bash
# The dependency floors are true: install every dependency of pyproject.toml pinned to its lower bound in a venv of
# its own (.venv-floors) and run a fast subset of the suite (imports, CLI and config composition, references, a tiny
# plan/train/predict). torch is the exception: its floor (2.5) exists on PyPI only as a multi-GB CUDA build, so the
# lowest CPU build this machine holds (2.13.0, a local wheel) stands in for it. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv-floors"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pins="$("$venv/bin/python" - "$repo/pyproject.toml" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name, floor = re.match(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,; ]*)", requirement).groups()
    if name != "torch":
        print(f"{name}=={floor}")
PY
)"
quiet() { grep -v -e "^WARNING: Location" -e "is ignored: it is neither" || true; }
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet
"$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/python" -m pip install -q "torch==2.13.0" 2>&1 | quiet
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q $pins 2>&1 | quiet
"$venv/bin/python" -m pip install -q --no-deps -e "$repo" 2>&1 | quiet
"$venv/bin/python" -c "import importlib.metadata as m; print('floors:', ', '.join(f'{n} {m.version(n)}' for n in ('torch', 'numpy', 'monai', 'lightning', 'hydra-core', 'scipy', 'scikit-image', 'SimpleITK', 'nibabel')))"
cd "$repo"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_cli.py tests/test_references.py \
  "tests/test_end_to_end.py::test_predict_writes_input_geometry_and_learns" \
  "tests/test_end_to_end.py::test_weights_load_with_weights_only" "$@"
