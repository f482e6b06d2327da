"""Preprocessing: invertibility, anisotropic handling, separable resampling against torch, labels, and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segforge.io.dataset import load_dataset
from segforge.io.image import Geometry
from segforge.preprocessing import pipeline
from segforge.preprocessing.pipeline import preprocess_image, restore_image, restore_probabilities, run_preprocessing
from segforge.preprocessing.resample import (axis_taps, resample, resample_axis, resample_label, resampling_modes,
                                             separate_axis)

from conftest import ROTATED


def plans_for(target, normalization=None, resampling=None) -> dict:
    plans = {"normalization": normalization or [{"scheme": "zscore", "use_nonzero_mask": False}],
             "configurations": {"3d_fullres": {"target_spacing": list(target)}}}
    if resampling:
        plans["resampling"] = resampling
    return plans


def smooth_volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    out = np.zeros(shape, np.float32)
    for _ in range(4):
        centre, width = rng.uniform(-0.5, 0.5, 3), rng.uniform(0.4, 0.8)
        out += rng.uniform(50, 150) * np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / width ** 2)
    return out + 20


# ---- resampling primitives ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,native", [("linear", "bilinear"), ("cubic", "bicubic"), ("nearest", "nearest-exact")])
@pytest.mark.parametrize("size", [(5, 9), (20, 31), (11, 13)])
def test_axis_taps_match_torch_interpolate(mode, native, size):
    """The taps used across slices and inside label boxes are torch's own kernels, axis by axis."""
    x = torch.randn(2, 3, 11, 13, generator=torch.Generator().manual_seed(0))
    ours = resample_axis(resample_axis(x, 2, *axis_taps(11, size[0], mode)), 3, *axis_taps(13, size[1], mode))
    reference = F.interpolate(x, size=size, mode=native, align_corners=None if mode == "nearest" else False)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_separable_3d_resampling_matches_trilinear():
    x = torch.randn(1, 2, 9, 10, 11, generator=torch.Generator().manual_seed(1))
    ours = resample(x[0], [13, 7, 15], ["linear"] * 3)
    reference = F.interpolate(x, size=(13, 7, 15), mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_separate_axis_rule():
    assert separate_axis([5.0, 0.8, 0.8], [5.0, 0.8, 0.8], 3.0) == 0
    assert separate_axis([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], 3.0) is None
    assert separate_axis([1.0, 1.0, 1.0], [4.0, 1.0, 1.0], 3.0) == 0  # the target is anisotropic
    assert separate_axis([0.8, 0.8, 4.0], [0.8, 0.8, 4.0], 3.0) == 2  # a sagittal stack
    assert separate_axis([4.0, 4.0, 1.0], [4.0, 4.0, 1.0], 3.0) is None  # two coarse axes: nothing to separate
    assert separate_axis([999.0, 0.5, 0.5], [None, 0.5, 0.5], 3.0) == 0
    modes = resampling_modes([5.0, 0.8, 0.8], [5.0, 1.0, 1.0])
    assert modes["image"] == ["nearest", "cubic", "cubic"] and modes["label"] == ["nearest", "linear", "linear"]
    with pytest.raises(ValueError, match="resampling.image"):
        resampling_modes([1, 1, 1], [1, 1, 1], {"image": "quintic"})


def test_label_resampling_inside_boxes_equals_full_volume_argmax():
    """Per-class boxes and the partition of unity give exactly the argmax of whole-volume interpolated indicators."""
    rng = np.random.default_rng(2)
    label = np.zeros((14, 30, 26), np.int16)
    for value in (1, 2, 4, 9):
        z, y, x = rng.integers(2, 10), rng.integers(3, 20), rng.integers(3, 18)
        label[z:z + rng.integers(2, 5), y:y + rng.integers(2, 9), x:x + rng.integers(1, 8)] = value
    new_shape = [11, 41, 19]
    ours = resample_label(label, new_shape)
    values = [0, 1, 2, 4, 9]
    scores = torch.stack([resample(torch.from_numpy((label == v).astype(np.float32))[None], new_shape, ["linear"] * 3)[0]
                          for v in values])
    best = scores.max(0).values
    # the reference argmax, ties to the higher value: take the last maximal index
    reference = torch.tensor(values)[len(values) - 1 - torch.flip(scores, [0]).argmax(0)]
    agree = ours == reference.numpy()
    ties = (scores >= best - 1e-6).sum(0).numpy() > 1
    assert np.all(agree | ties) and agree.mean() > 0.99


# ---- preprocess and invert ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,target", [((3.0, 0.9, 0.9), (3.0, 0.7, 0.7)), ((1.0, 1.0, 1.0), (1.3, 1.3, 1.3)),
                                            ((5.0, 0.8, 0.8), (4.0, 1.0, 1.0))])
def test_preprocess_then_restore_returns_the_original(spacing, target):
    volume = smooth_volume((20, 48, 44))
    image = np.zeros((2, 26, 52, 50), np.float32)  # a zero border that cropping removes
    image[0, 3:23, 2:50, 4:48] = volume
    image[1, 3:23, 2:50, 4:48] = 2000 - 3 * volume
    geometry = Geometry(spacing=spacing, origin=(1.0, 2.0, 3.0), direction=ROTATED, ndim=3)
    plans = plans_for(target, [{"scheme": "zscore", "use_nonzero_mask": False},
                               {"scheme": "ct", "clip": [-5000, 5000], "mean": 900.0, "std": 150.0}])
    original = image.copy()
    data, props = preprocess_image(image, geometry, plans, "3d_fullres")
    np.testing.assert_array_equal(image, original)  # the caller's array is untouched
    assert props["crop_bbox"] == [[3, 23], [2, 50], [4, 48]]
    assert abs(float(data[0].mean())) < 0.05 and abs(float(data[0].std()) - 1) < 0.05
    json.dumps(props)  # recorded as JSON
    restored = restore_image(data, props)
    assert restored.shape == image.shape
    inside = (slice(None), slice(4, 22), slice(4, 48), slice(6, 46))
    error = np.abs(restored[inside] - image[inside]).max(axis=(1, 2, 3))
    spread = image[inside].max(axis=(1, 2, 3)) - image[inside].min(axis=(1, 2, 3))
    assert np.all(error < 0.03 * spread), error / spread
    assert np.all(restored[:, :3] == 0) and np.all(restored[:, 23:] == 0)


def test_probabilities_go_back_to_the_cropped_grid_with_the_recorded_modes():
    image = np.ones((1, 8, 20, 20), np.float32)
    geometry = Geometry(spacing=(5.0, 0.8, 0.8), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), ndim=3)
    data, props = preprocess_image(image, geometry, plans_for((2.5, 1.6, 1.6)), "3d_fullres")
    assert data.shape[1:] == (16, 10, 10) and props["resampling"]["probabilities"][0] == "nearest"
    slices = torch.arange(16, dtype=torch.float32)[None, :, None, None].expand(1, 16, 10, 10)
    back = restore_probabilities(slices, props)
    assert tuple(back.shape) == (1, 8, 20, 20)
    assert set(torch.unique(back).tolist()) <= set(range(16))  # slices picked, never blended


def test_anisotropic_case_is_not_smeared_across_slices():
    values = np.arange(10, dtype=np.float32) * 100 + 100
    image = np.repeat(values[:, None, None], 40, 1).repeat(40, 2)[None]
    label = np.zeros((10, 40, 40), np.int16)
    label[4, 10:30, 10:30] = 1  # a structure on one slice only
    geometry = Geometry(spacing=(5.0, 0.8, 0.8), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), ndim=3)
    for across, smeared in (("nearest", False), ("linear", True)):
        plans = plans_for((3.0, 1.0, 1.0), [{"scheme": "none"}], {"across_slices": across})
        data, props = preprocess_image(image, geometry, plans, "3d_fullres")
        seg = resample_label(label, props["shape_after_resampling"], modes=props["resampling"]["label"])
        per_slice = data[0].reshape(data.shape[1], -1)
        blended = not np.all(np.isin(np.round(per_slice[:, 0]), values))
        assert blended == smeared, across
        if not smeared:
            assert np.allclose(per_slice, per_slice[:, :1], atol=1e-3)  # each slice stays one source slice
            structure = [z for z in range(seg.shape[0]) if (seg[z] == 1).any()]
            assert structure and all(abs(z * 3.0 - 4 * 5.0) <= 5.0 for z in structure)


# ---- resume ------------------------------------------------------------------------------------------------------


def _digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _plans(tiny_dataset: Path, tmp_path: Path) -> dict:
    from segforge.cli.main import main

    assert main(["plan", str(tiny_dataset), "--work", str(tmp_path / "w"), "preprocess.run=false",
                 "plan.configurations=[3d_fullres]"]) == 0
    return json.loads((tmp_path / "w" / tiny_dataset.name / "plans_default.json").read_text())


def test_resume_after_a_crash_gives_identical_files(tiny_dataset, tmp_path, monkeypatch):
    spec = load_dataset(tiny_dataset)
    plans = _plans(tiny_dataset, tmp_path)
    reference = tmp_path / "reference"
    run_preprocessing(spec.cases, plans, "3d_fullres", reference, spec.label_values, num_workers=1)

    crashed = tmp_path / "crashed"
    real = pipeline.preprocess_case
    calls = []

    def dies_on_the_fourth(case, *args):
        calls.append(case.case_id)
        if len(calls) == 4:
            (crashed / f".tmp-{case.case_id}-half.npy").write_bytes(b"\x93NUMPY half")  # a write cut short
            raise KeyboardInterrupt("killed")
        return real(case, *args)

    monkeypatch.setattr(pipeline, "preprocess_case", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_preprocessing(spec.cases, plans, "3d_fullres", crashed, spec.label_values, num_workers=1)
    assert not (crashed / "manifest.json").exists()
    monkeypatch.setattr(pipeline, "preprocess_case", real)
    redone = run_preprocessing(spec.cases, plans, "3d_fullres", crashed, spec.label_values, num_workers=1)
    assert redone == {"done": len(spec.cases) - 3, "skipped": 3}
    assert _digests(crashed) == _digests(reference)  # the half-written temporary is gone too


def test_changed_plan_invalidates_and_unrelated_edit_does_not(tiny_dataset, tmp_path):
    spec = load_dataset(tiny_dataset)
    plans = _plans(tiny_dataset, tmp_path)
    out = tmp_path / "pre"
    assert run_preprocessing(spec.cases, plans, "3d_fullres", out, spec.label_values, 1)["done"] == len(spec.cases)
    plans["configurations"]["3d_fullres"]["batch_size"] = 7  # does not change preprocessed data
    assert run_preprocessing(spec.cases, plans, "3d_fullres", out, spec.label_values, 1)["done"] == 0
    plans["configurations"]["3d_fullres"]["target_spacing"][1] *= 1.5
    assert run_preprocessing(spec.cases, plans, "3d_fullres", out, spec.label_values, 1)["done"] == len(spec.cases)
    plans["resampling"] = {**plans["resampling"], "image": "linear"}
    assert run_preprocessing(spec.cases, plans, "3d_fullres", out, spec.label_values, 1)["done"] == len(spec.cases)
    assert run_preprocessing(spec.cases, plans, "3d_fullres", out, spec.label_values, 1, per_class=50)["done"] == len(spec.cases)


@pytest.mark.slow
def test_sigkill_during_preprocess_then_rerun_gives_identical_files(tmp_path):
    """The real thing: `segforge preprocess` killed with SIGKILL mid-run, then run again."""
    from conftest import data_identifier_of, write_dataset

    dataset = write_dataset(tmp_path / "Dataset002_Kill", num_train=24, num_test=0)
    env = {**os.environ, "SEGFORGE_WORK": str(tmp_path / "ref")}
    base = [sys.executable, "-m", "segforge"]
    subprocess.run(base + ["plan", str(dataset), "plan.configurations=[3d_fullres]", "preprocess.num_workers=1"],
                   env=env, check=True, capture_output=True)
    reference = tmp_path / "ref" / dataset.name / "preprocessed" / data_identifier_of(tmp_path / "ref", dataset.name)
    killed_work = tmp_path / "killed"
    (killed_work / dataset.name).mkdir(parents=True)
    (killed_work / dataset.name / "plans_default.json").write_bytes((tmp_path / "ref" / dataset.name / "plans_default.json").read_bytes())
    env_killed = {**env, "SEGFORGE_WORK": str(killed_work)}
    out = killed_work / dataset.name / "preprocessed" / reference.name
    proc = subprocess.Popen(base + ["preprocess", str(dataset), "preprocess.num_workers=1"], env=env_killed,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("case*.json"))) < 3:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(out.glob("case*.json")))
    assert 3 <= finished < 24 and not (out / "manifest.json").exists(), finished
    subprocess.run(base + ["preprocess", str(dataset), "preprocess.num_workers=1"], env=env_killed, check=True,
                   capture_output=True)
    assert _digests(out) == _digests(reference)
