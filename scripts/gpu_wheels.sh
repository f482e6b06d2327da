#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (it has torch, Lightning, scikit-image, scipy, matplotlib, rich, psutil,
# tqdm and tensorboard, but no network) for CPython 3.12 manylinux x86-64 into .gpu_wheels/ (git-ignored), print
# their total size, and fail when they and the working tree would pass the device transfer's limit.
# Usage: bash scripts/gpu_wheels.sh        (then the device command in README's "GPU acceptance check")
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/.gpu_wheels"
python="${PYTHON:-python3}"
limit_mib="${GPU_TRANSFER_LIMIT_MIB:-64}"   # the working tree, carried paths included, must stay under this
# The versions this repository is tested with (within pyproject.toml's ranges). SimpleITK (~50 MB) is by far the
# heaviest; the total still fits (checked below), so segforge keeps reading NIfTI through it on the GPU machine too.
wheels=(monai==1.6.1 nibabel==5.4.2 simpleitk==2.5.7 hydra-core==1.3.8 omegaconf==2.3.1 tensorboardX==2.6.5)
antlr=antlr4-python3-runtime==4.9.3   # omegaconf 2.3 needs 4.9.*: PyPI has only its source, built here (pure Python)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
mkdir -p "$dest"
rm -f "$dest"/*.whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${wheels[@]}" 2>&1 | grep -v "^WARNING: Location" || true
"$python" -m pip wheel -q --no-deps --no-binary :all: -w "$dest" "$antlr" 2>&1 | grep -v "^WARNING: Location" || true
count=$(find "$dest" -maxdepth 1 -name '*.whl' | wc -l)
expected=$(( ${#wheels[@]} + 1 ))
if [ "$count" -ne "$expected" ]; then
  echo "gpu_wheels: expected $expected wheels in $dest, found $count (pip's messages above)" >&2
  exit 1
fi
wheel_bytes=$(find "$dest" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s}')
# what else travels: tracked files and untracked ones git does not ignore
tree_bytes=$(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
             | awk '{s += $1} END {print s + 0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
find "$dest" -maxdepth 1 -name '*.whl' -printf '%s %f\n' | sort -rn | awk '{printf "  %6.1f MiB  %s\n", $1 / 1048576, $2}'
echo "wheels: $(mib "$wheel_bytes") MiB; working tree: $(mib "$tree_bytes") MiB; together $(mib $((wheel_bytes + tree_bytes))) MiB of $limit_mib MiB"
if [ $((wheel_bytes + tree_bytes)) -gt $((limit_mib * 1048576)) ]; then
  echo "gpu_wheels: over the $limit_mib MiB transfer limit" >&2
  exit 1
fi
