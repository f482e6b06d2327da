"""Shared fixtures: a tiny 3D dataset in the raw layout (non-identity direction, anisotropic spacing), tree hashing."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from segforge.io.image import Geometry, write_image

ROTATED = (math.cos(0.3), -math.sin(0.3), 0.0, math.sin(0.3), math.cos(0.3), 0.0, 0.0, 0.0, 1.0)


def make_case(rng: np.random.Generator, shape=(12, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """An image with a bright ellipsoid (class 1) and a darker box (class 2) in noise, and its label."""
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cz, cy, cx = rng.integers(4, shape[0] - 4), rng.integers(9, 14), rng.integers(9, shape[2] - 9)
    label = np.zeros(shape, np.uint8)
    label[((zz - cz) / 3.5) ** 2 + ((yy - cy) / 6) ** 2 + ((xx - cx) / 6) ** 2 < 1] = 1
    by, bx = rng.integers(19, 23), rng.integers(6, shape[2] - 14)
    label[2:-2, by:by + 7, bx:bx + 8] = 2
    image = np.where(label == 1, 3.0, np.where(label == 2, 1.5, 0.0)) + rng.normal(0, 0.4, shape) + 0.5
    return image.astype(np.float32), label


def write_dataset(root: Path, num_train: int = 8, num_test: int = 2, seed: int = 0, ending: str = ".nii.gz") -> Path:
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True)
    for i in range(num_train + num_test):
        image, label = make_case(rng)
        geometry = Geometry(spacing=(3.0, 0.9, 0.9), origin=(12.5, -40.0, 7.0), direction=ROTATED, ndim=3)
        split = "Tr" if i < num_train else "Ts"
        write_image(root / f"images{split}" / f"case{i:03d}_0000{ending}", image, geometry)
        write_image(root / f"labels{split}" / f"case{i:03d}{ending}", label, geometry)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "ball": 1, "box": 2},
        "numTraining": num_train, "file_ending": ending}))
    return root


def tree_hash(root: Path) -> str:
    """Hash of every path, mode and file content under ``root`` (symlinks by target)."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
        digest.update(str(path.stat().st_mode if not path.is_symlink() else 0).encode())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is fastest, and avoids OpenMP spin contention on a loaded 2-core machine
    (``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` in a test module)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "Dataset001_Tiny")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the developer's SEGFORGE_* variables or writes into the working directory."""
    for name in ("SEGFORGE_RAW", "SEGFORGE_WORK", "SEGFORGE_PREPROCESSED", "SEGFORGE_RESULTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def pytest_configure(config):
    """Under pytest-xdist (``-n 2``, scripts/test.sh) each worker gets one of the cores: one torch thread per worker,
    inherited by the subprocesses a test starts, so two workers never fight over both cores with spinning OpenMP
    threads."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report):
    """A worker sends its reports to the controller as UTF-8: captured output naming a file whose name is not UTF-8
    (tests/test_bad_inputs.py makes one) would crash the worker's channel, so it is sent backslash-escaped."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        report.sections = [(key, text.encode("utf-8", "backslashreplace").decode("utf-8"))
                           for key, text in report.sections]


def data_identifier_of(work: Path, dataset: str, configuration: str = "3d_fullres", plans: str = "default") -> str:
    """The preprocessed folder name (``<configuration>_<hash>``) plan ``plans`` in ``<work>/<dataset>/`` records."""
    recorded = json.loads((Path(work) / dataset / f"plans_{plans}.json").read_text())
    return recorded["configurations"][configuration]["data_identifier"]
