"""Prediction with deterministic stand-in networks: geometry to the voxel, test-time mirroring and fold ensembles
average exactly, configuration ensembles, and the folder runner (bad cases, --continue, --part, probabilities)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROTATED
from segforge.errors import SegforgeError
from segforge.inference.folder import parse_part, predict_folder, take_part
from segforge.inference.predictor import Ensemble, Predictor
from segforge.io.image import Geometry, read_image, write_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Threshold(nn.Module):
    """Two-class logits: class 1 where the (single-channel) input exceeds ``level``."""

    def __init__(self, level: float = 0.5, gain: float = 20.0):
        super().__init__()
        self.level, self.gain = level, gain

    def forward(self, x, cond=None):
        return torch.cat([torch.zeros_like(x[:, :1]), self.gain * (x[:, :1] - self.level)], 1)


class Ramp(nn.Module):
    """Logits that depend on the position in the window along the last axis: not mirror-equivariant."""

    def forward(self, x, cond=None):
        ramp = torch.linspace(-1, 1, x.shape[-1]).reshape(*([1] * (x.ndim - 1)), -1)
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1] + ramp], 1)


class Constant(nn.Module):
    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x, cond=None):
        return self.logits.reshape(1, -1, *([1] * (x.ndim - 2))).expand(x.shape[0], -1, *x.shape[2:]).clone()


def plans(patch, target_spacing, mirror_axes=(0, 1, 2), dims=3) -> dict:
    return {"channel_names": {"0": "MRI"}, "normalization": [{"scheme": "none"}],
            "configurations": {"3d_fullres": {"dims": dims, "patch_size": list(patch), "target_spacing": list(target_spacing),
                                              "mirror_axes": list(mirror_axes)}}}


DATASET = {"labels": {"background": 0, "thing": 1}, "file_ending": ".nii.gz", "channel_names": {"0": "MRI"}}


def predictor(networks, patch=(8, 16, 16), target=(5.0, 0.8, 0.8), mirror=True, dataset=DATASET, **kw) -> Predictor:
    return Predictor(plans(patch, target, **kw), dataset, "3d_fullres", networks, torch.device("cpu"), 0.5, mirror, 2)


def volume(shape=(12, 30, 28)) -> np.ndarray:
    """A blocky structure inside a zero border (the crop box is [2:10, 3:27, 4:24])."""
    image = np.zeros(shape, np.float32)
    image[2:10, 3:27, 4:24] = 0.1
    image[3:8, 6:20, 7:15] = 1.0
    image[5:7, 20:25, 15:22] = 0.9
    return image


GEOMETRY = Geometry(spacing=(5.0, 0.8, 0.8), origin=(10.0, -20.0, 3.5), direction=ROTATED, ndim=3)


def test_mask_aligns_voxel_for_voxel_with_the_known_answer(tmp_path):
    image = volume()
    write_image(tmp_path / "case_0000.nii.gz", image, GEOMETRY)
    # no resampling: crop, windows, paste must put every voxel back where it was
    mask, geometry = predictor([Threshold()]).predict(tmp_path / "case_0000.nii.gz")
    np.testing.assert_array_equal(mask, (image > 0.5).astype(np.uint8))
    assert geometry.same_grid(GEOMETRY, tol=1e-6) == []  # NIfTI keeps float32 spacing and direction
    # resampled to another grid (anisotropic: the slice axis by nearest) and back: the same mask but at boundaries
    mask, _ = predictor([Threshold()], target=(2.5, 1.1, 1.1)).predict(tmp_path / "case_0000.nii.gz")
    assert mask.shape == image.shape
    agree = (mask == (image > 0.5)).mean()
    assert agree > 0.97, agree
    assert not mask[:2].any() and not mask[:, :3].any()  # outside the crop box: background


def test_mirroring_averages_the_flipped_predictions_exactly():
    image = np.random.default_rng(0).uniform(0.2, 1.0, (1, 8, 16, 16)).astype(np.float32)
    single = predictor([Ramp()], mirror=False)._sliding_window(image, torch.device("cpu"))
    mirrored = predictor([Ramp()], mirror=True)._sliding_window(image, torch.device("cpu"))
    # by hand (one window): softmax of the average over all 8 flips of flip(f(flip(x))), as nnU-Net mirrors
    x = torch.from_numpy(image)[None]
    expected = 0
    for r in range(4):
        for axes in itertools.combinations((2, 3, 4), r):
            flipped = torch.flip(x, axes) if axes else x
            logits = Ramp()(flipped)
            expected = expected + (torch.flip(logits, axes) if axes else logits)
    torch.testing.assert_close(mirrored, torch.softmax(expected / 8, 1)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(single, mirrored, atol=1e-3)  # the ramp makes the flips differ: the test can fail


def test_fold_ensemble_and_configuration_ensemble_average_probabilities(tmp_path):
    image = volume()[None]
    a, b = Constant([0.0, 2.0]), Constant([1.0, -1.0])
    folds = predictor([a, b], mirror=False)
    probabilities, _ = folds.probabilities(image, GEOMETRY)
    expected = (torch.softmax(torch.tensor([0.0, 2.0]), 0) + torch.softmax(torch.tensor([1.0, -1.0]), 0)) / 2
    inside = probabilities[:, 4, 10, 10]
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(probabilities[:, 0, 0, 0], torch.tensor([1.0, 0.0]))  # outside the crop box: background
    both = Ensemble([predictor([a], mirror=False), predictor([b], mirror=False, target=(2.5, 1.0, 1.0))])
    mixed, _ = both.probabilities(image, GEOMETRY)
    torch.testing.assert_close(mixed[:, 4, 10, 10], expected, atol=1e-5, rtol=1e-5)
    other = dict(DATASET, labels={"background": 0, "thing": 1, "other": 2})
    with pytest.raises(SegforgeError, match="different classes"):
        Ensemble([predictor([a]), predictor([Constant([0.0, 1.0, 2.0])], dataset=other)])


def write_cases(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        write_image(folder / f"{name}_0000.nii.gz", volume(), GEOMETRY)


def test_a_bad_case_is_reported_and_the_others_complete(tmp_path):
    images = tmp_path / "in"
    write_cases(images, ["a", "c"])
    good = (images / "a_0000.nii.gz").read_bytes()
    (images / "b_0000.nii.gz").write_bytes(good[: len(good) // 3])  # truncated download
    write_image(images / "d_0000.nii.gz", volume(), GEOMETRY)
    write_image(images / "d_0001.nii.gz", volume(), GEOMETRY)  # a second channel the model does not take
    results = predict_folder(predictor([Threshold()], mirror=False), images, tmp_path / "out")
    status = {r.case_id: r.status for r in results}
    assert status == {"a": "written", "b": "failed", "c": "written", "d": "failed"}
    errors = {r.case_id: r.error for r in results if r.error}
    assert "b_0000.nii.gz" in errors["b"] and "channel" in errors["d"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a.nii.gz", "c.nii.gz"]
    report = json.loads((tmp_path / "out" / "predict_report.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["written", "failed", "written", "failed"]


def test_continue_skips_finished_cases_and_parts_split_the_folder(tmp_path):
    images, out = tmp_path / "in", tmp_path / "out"
    write_cases(images, ["a", "b", "c", "d", "e"])
    model = predictor([Threshold()], mirror=False)
    parts = [predict_folder(model, images, out, part=f"{k}/3") for k in (1, 2, 3)]
    done = [r.case_id for part in parts for r in part]
    assert sorted(done) == ["a", "b", "c", "d", "e"] and len(set(done)) == 5
    stamp = (out / "a.nii.gz").stat().st_mtime_ns
    again = predict_folder(model, images, out, resume=True)
    assert {r.status for r in again} == {"skipped"} and (out / "a.nii.gz").stat().st_mtime_ns == stamp
    (out / "c.nii.gz").unlink()
    again = predict_folder(model, images, out, resume=True)
    assert [r.case_id for r in again if r.status == "written"] == ["c"]
    assert take_part(["c", "a", "b"], (2, 2)) == ["b"] and parse_part(None) is None
    for bad in ("0/3", "4/3", "x"):
        with pytest.raises(SegforgeError, match="--part"):
            parse_part(bad)


def test_probabilities_are_saved_on_the_input_grid(tmp_path):
    images, out = tmp_path / "in", tmp_path / "out"
    write_cases(images, ["a"])
    predict_folder(predictor([Threshold(gain=2.0)], mirror=False), images, out, with_probabilities=True)
    probabilities = np.load(out / "a.npz")["probabilities"].astype(np.float32)
    meta = json.loads((out / "a.probabilities.json").read_text())
    mask, geometry = read_image(out / "a.nii.gz")
    assert probabilities.shape == (2, *mask.shape) and meta["channels"] == ["background", "thing"]
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=2e-3)
    np.testing.assert_array_equal(probabilities.argmax(0), mask)
    assert Geometry.from_json(meta["geometry"]).same_grid(geometry) == []


class Noisy(nn.Module):
    """Many-class logits from fixed random 1x1x1 mixing of the input and a ramp: windows disagree, classes are many."""

    def __init__(self, classes: int = 6, dims: int = 3):
        super().__init__()
        torch.manual_seed(3)  # before the layer: weights and biases the same in every instance
        self.mix = (nn.Conv3d if dims == 3 else nn.Conv2d)(1, classes, 3, padding=1)
        nn.init.normal_(self.mix.weight)

    def forward(self, x, cond=None):
        ramp = torch.linspace(-1, 1, x.shape[-1]).reshape(*([1] * (x.ndim - 1)), -1)
        return self.mix(x[:, :1] + ramp)


def _naive_windows(image, network, patch, step):
    """Every window into one full buffer, float64: the reference for the slab-streaming sliding window."""
    from segforge.inference.sliding_window import gaussian_weights, window_starts

    pads = []
    for s, p in reversed(list(zip(image.shape[1:], patch))):
        extra = max(p - s, 0)
        pads += [extra // 2, extra - extra // 2]
    padded = torch.nn.functional.pad(image, pads)
    starts = [window_starts(n, p, step) for n, p in zip(padded.shape[1:], patch)]
    weights = gaussian_weights(patch).double()
    total, counts = None, torch.zeros(padded.shape[1:], dtype=torch.float64)
    for origin in itertools.product(*starts):
        box = tuple(slice(o, o + p) for o, p in zip(origin, patch))
        out = torch.softmax(network(padded[(slice(None), *box)][None]), 1)[0].double()
        total = torch.zeros((out.shape[0], *padded.shape[1:]), dtype=torch.float64) if total is None else total
        total[(slice(None), *box)] += out * weights
        counts[box] += weights
    keep = [slice(None)] + [slice(pads[2 * (2 - a)], pads[2 * (2 - a)] + image.shape[1 + a]) for a in range(3)]
    return (total / counts)[tuple(keep)]


def test_slab_streaming_windows_equal_one_full_buffer():
    from segforge.inference.sliding_window import sliding_window_slabs

    image = torch.from_numpy(np.random.default_rng(1).uniform(0, 1, (1, 23, 19, 9)).astype(np.float32))
    patch = [8, 12, 12]  # several window depths, and padding in x
    slabs = list(sliding_window_slabs(image, Noisy(), patch, 0.5, (), 3, torch.float32, lambda o: torch.softmax(o, 1)))
    firsts = [first for first, _ in slabs]
    assert firsts == sorted(firsts) and len(slabs) > 2  # in order, in pieces
    streamed = torch.cat([slab for _, slab in slabs], 1)
    torch.testing.assert_close(streamed.double(), _naive_windows(image, Noisy(), patch, 0.5), atol=1e-5, rtol=1e-5)


def test_every_window_pass_has_the_full_batch_and_short_chunks_are_filled_up():
    """A single small window on a CPU takes PyTorch's slow im2col convolution: a short last chunk is padded with
    copies of its last window, whose outputs are dropped (the result equals the windows computed one by one)."""
    from segforge.inference.sliding_window import sliding_window

    sizes = []

    class Recording(Noisy):
        def forward(self, x, cond=None):
            sizes.append(x.shape[0])
            return super().forward(x, cond)

    image = torch.from_numpy(np.random.default_rng(3).uniform(0, 1, (1, 8, 20, 12)).astype(np.float32))
    patch = [8, 12, 12]  # one window depth, 3 windows in plane: chunks of 2 + 1
    out = sliding_window(image, Recording(), patch, 0.5, (), 2, torch.float32, lambda o: torch.softmax(o, 1))
    assert sizes == [2, 2]
    torch.testing.assert_close(out.double(), _naive_windows(image, Noisy(), patch, 0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target,patch,dims", [((5.0, 0.8, 0.8), (8, 16, 16), 3), ((2.5, 1.1, 1.1), (8, 16, 16), 3),
                                               ((4.0, 0.6, 0.6), (6, 12, 12), 3), ((None, 1.2, 0.7), (16, 16), 2)])
def test_streamed_labels_equal_labels_of_the_full_probabilities(target, patch, dims):
    """predict() never holds classes x volume; it must give the labels of the full probabilities."""
    image = volume((17, 40, 36))[None] + np.random.default_rng(2).uniform(0, 0.2, (1, 17, 40, 36)).astype(np.float32)
    dataset = dict(DATASET, labels={"background": 0, **{f"c{i}": i for i in range(1, 6)}})
    model = predictor([Noisy(6, dims), Noisy(6, dims)], patch=patch, target=target, dataset=dataset,
                      mirror_axes=tuple(range(dims)), dims=dims)
    streamed, _ = model.predict(image, GEOMETRY)
    full, _ = model.probabilities(image, GEOMETRY)
    reference = model.labels(full)
    assert streamed.shape == reference.shape
    assert (streamed == reference).mean() > 0.9999, (streamed != reference).sum()
    assert len(np.unique(reference)) > 2


def test_a_single_2d_image_streams_along_its_rows_to_the_same_labels():
    """A slide (one 2D image, a 2D model) is streamed along its rows, not held as classes x image; same labels."""
    rng = np.random.default_rng(4)
    image = np.zeros((1, 1, 90, 70), np.float32)
    image[0, 0, 5:85, 4:66] = 0.1 + rng.uniform(0, 0.3, (80, 62)).astype(np.float32)
    geometry = Geometry(spacing=(999.0, 1.0, 0.6), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), ndim=2)
    dataset = dict(DATASET, labels={"background": 0, **{f"c{i}": i for i in range(1, 6)}})
    model = predictor([Noisy(6, 2)], patch=(16, 16), target=(None, 1.2, 0.7), dataset=dataset, mirror_axes=(0, 1), dims=2)
    streamed, _ = model.predict(image, geometry)
    reference = model.labels(model.probabilities(image, geometry)[0])
    assert streamed.shape == reference.shape == (1, 90, 70)
    assert (streamed == reference).mean() > 0.9999, (streamed != reference).sum()
    assert len(np.unique(reference)) > 2


class Levels(nn.Module):
    """Three-class logits with clear margins from an input of -1, 0 and 1 (class 1, 2 and 0): no near-ties."""

    def forward(self, x, cond=None):
        return torch.cat([4 * x[:, :1], -4 * x[:, :1], torch.full_like(x[:, :1], 0.3)], 1)


@pytest.mark.parametrize("dims", [3, 2])
def test_voxels_only_a_window_corner_covers_are_predicted_alike_in_every_accumulation_precision(dims, monkeypatch):
    """The Gaussian's corners (~1e-10 of its centre) flush to 0 in float16: a voxel covered by one window's corner
    only would be 0 / 0. Every precision (auto: made to choose float16) gives finite probabilities summing to 1,
    and float16 the labels of float32."""
    from segforge.inference import sliding_window as sw

    monkeypatch.setattr(sw, "AUTO_HALF_BYTES", 0)
    patch = [8, 16, 16] if dims == 3 else [16, 16]
    image = torch.from_numpy(np.random.default_rng(5).integers(-1, 2, (1, 12, 23, 21)).astype(np.float32))
    results = {}
    for mode in (torch.float32, torch.float16, "auto"):
        out = sw.sliding_window(image, Levels(), patch, 0.5, (), 2, mode, lambda o: torch.softmax(o, 1), progress=False)
        assert torch.isfinite(out).all(), mode
        torch.testing.assert_close(out.sum(0), torch.ones(out.shape[1:]), atol=0.01, rtol=0)  # corners too
        results[str(mode)] = out.argmax(0)
    expected = torch.tensor([1, 2, 0])[image[0].long() + 1]  # input -1, 0, 1: class 1, 2, 0 (Levels)
    for mode, labels in results.items():
        assert torch.equal(labels, expected), mode
