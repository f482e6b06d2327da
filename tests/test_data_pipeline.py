"""Training data and preprocessing steps: splits, patch cropping, crop/paste, resampling, normalisation,
foreground locations, the patch dataset and its sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segforge.io.artifacts import save_npy_atomic
from segforge.preprocessing.crop import crop, nonzero_bbox, paste
from segforge.preprocessing.normalize import normalize
from segforge.preprocessing.pipeline import foreground_locations
from segforge.preprocessing.resample import resample_image, resample_label, shape_at_spacing
from segforge.training.augment import AugmentationSettings, Augmenter, PatchGeometry
from segforge.training.splits import make_splits
from segforge.training.sampling import (PatchCollate, PatchDataset, PatchIndexSampler, choose_patch_start,
                                       crop_with_padding)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---- splits ----------------------------------------------------------------------------------------------------

IDS = [f"case{i:03d}" for i in range(11)]


def test_make_splits_is_deterministic_and_complete():
    splits = make_splits(IDS, 5, seed=12345)
    assert splits == make_splits(list(reversed(IDS)), 5, seed=12345)  # input order does not matter
    assert len(splits) == 5
    validated = [case for fold in splits for case in fold["val"]]
    assert sorted(validated) == sorted(IDS)  # every case validated exactly once
    for fold in splits:
        assert set(fold["train"]).isdisjoint(fold["val"])
        assert sorted(fold["train"] + fold["val"]) == sorted(IDS)
        assert len(fold["val"]) in (2, 3)


def test_make_splits_depends_on_seed():
    seeds = [make_splits(IDS, 5, seed=s) for s in range(4)]
    assert any(s != seeds[0] for s in seeds[1:])


def test_make_splits_too_few_cases():
    with pytest.raises(ValueError, match="2 case"):
        make_splits(["a", "b"], 5, seed=0)
    assert make_splits(["a", "b"], 2, seed=0)[0]["val"] in (["a"], ["b"])


# ---- patch cropping --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start,size", [([0, 0], [3, 4]), ([-2, 3], [4, 4]), ([3, -1], [5, 9]), ([-3, -3], [12, 13]),
                                        ([6, 8], [2, 2])])
def test_crop_with_padding_matches_padded_slicing(start, size):
    array = np.arange(2 * 5 * 7, dtype=np.int16).reshape(2, 5, 7) + 1
    margin = 20
    padded = np.pad(array, ((0, 0), (margin, margin), (margin, margin)), constant_values=-9)
    expected = padded[:, start[0] + margin:start[0] + margin + size[0], start[1] + margin:start[1] + margin + size[1]]
    out = crop_with_padding(array, start, size, fill=-9)
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out, expected)


def test_crop_with_padding_pads_outside():
    array = np.ones((3, 3), np.float32)
    out = crop_with_padding(array, [-1, 1], [5, 3])
    assert out.shape == (5, 3)
    np.testing.assert_array_equal(out[:, 2], 0)
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_array_equal(out[1:4, :2], 1)


def test_choose_patch_start_contains_centre():
    rng = np.random.default_rng(0)
    for shape, patch in (([10, 20], [4, 8]), ([3, 5], [6, 8])):
        for centre in ([0, 0], [shape[0] - 1, shape[1] - 1], [shape[0] // 2, 1]):
            start = choose_patch_start(shape, patch, rng, centre)
            assert all(s <= c < s + p for s, c, p in zip(start, centre, patch))
        for _ in range(20):
            start = choose_patch_start(shape, patch, rng)
            assert all(min(0, s - p) <= st <= max(0, s - p) for st, s, p in zip(start, shape, patch))


# ---- crop / paste ----------------------------------------------------------------------------------------------


def test_nonzero_bbox_crop_paste_round_trip():
    image = np.zeros((2, 6, 7, 8), np.float32)
    image[0, 1:3, 2:4, 3:5] = 1.0
    image[1, 4, 5, 1] = -2.0  # negative counts as nonzero; channels are united
    bbox = nonzero_bbox(image)
    assert bbox == [[1, 5], [2, 6], [1, 5]]
    cropped = crop(image, bbox)
    assert cropped.shape == (2, 4, 4, 4)
    np.testing.assert_array_equal(paste(cropped, bbox, image.shape[1:]), image)
    label = (image[0] > 0).astype(np.int16)
    np.testing.assert_array_equal(paste(crop(label, bbox), bbox, label.shape), label)


def test_nonzero_bbox_of_empty_image_is_full_extent():
    image = np.zeros((1, 3, 4, 5))
    assert nonzero_bbox(image) == [[0, 3], [0, 4], [0, 5]]
    assert crop(image, nonzero_bbox(image)).shape == image.shape


def test_paste_fill_value():
    out = paste(np.ones((1, 1, 2, 2), np.int16), [[0, 1], [1, 3], [1, 3]], (2, 4, 4), fill=-1)
    assert out.shape == (1, 2, 4, 4)
    assert out.sum() == 4 - (2 * 16 - 4)


# ---- resampling -------------------------------------------------------------------------------------------------


def test_shape_at_spacing():
    assert shape_at_spacing([10, 100, 100], [3.0, 0.5, 0.5], [3.0, 1.0, 1.0]) == [10, 50, 50]
    assert shape_at_spacing([1, 64, 64], [999.0, 1.0, 1.0], [None, 2.0, 2.0]) == [1, 32, 32]


def test_resample_label_keeps_label_values():
    rng = np.random.default_rng(0)
    label = np.zeros((6, 20, 20), np.int16)
    label[1:4, 3:12, 4:9] = 1
    label[2:6, 10:18, 10:19] = 3
    label[rng.random(label.shape) < 0.05] = 5
    for shape in ([6, 10, 10], [9, 27, 13], [3, 40, 40]):
        out = resample_label(label, shape, [0, 1, 3, 5])
        assert list(out.shape) == shape
        assert out.dtype == label.dtype
        assert set(np.unique(out)) <= {0, 1, 3, 5}
        assert {1, 3} <= set(np.unique(out))


def test_resample_label_same_shape_is_identity():
    label = np.random.default_rng(1).integers(0, 3, (4, 5, 6)).astype(np.uint8)
    np.testing.assert_array_equal(resample_label(label, [4, 5, 6], [0, 1, 2]), label)


def test_thin_plane_across_unresampled_axis_survives_in_plane_downsample():
    label = np.zeros((6, 16, 16), np.int16)
    label[3] = 1  # one voxel thick in z; z keeps its size
    out = resample_label(label, [6, 8, 8], [0, 1])
    assert (out[3] == 1).all()
    assert (out == 1).sum() == 64


@pytest.mark.parametrize("position", [6, 7])
def test_thin_plane_along_downsampled_axis_survives_2x_in_plane_downsample(position):
    label = np.zeros((4, 16, 16), np.int16)
    label[:, position, :] = 1  # one voxel thick along y, which is halved
    out = resample_label(label, [4, 8, 8], [0, 1])
    assert (out == 1).any()
    assert (out[:, position // 2, :] == 1).all()


def test_resample_image_same_shape_is_identity():
    image = np.random.default_rng(2).standard_normal((2, 3, 4, 5)).astype(np.float32)
    out = resample_image(image, [3, 4, 5])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, image)


def test_resample_image_changes_shape_and_keeps_constants():
    image = np.full((2, 4, 6, 6), 3.5, np.float32)
    image[1] = -1.0
    out = resample_image(image, [8, 3, 9])
    assert out.shape == (2, 8, 3, 9) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 3.5, rtol=1e-6)
    np.testing.assert_allclose(out[1], -1.0, rtol=1e-6)


# ---- normalisation ----------------------------------------------------------------------------------------------


def test_normalize_zscore():
    image = (np.random.default_rng(3).standard_normal((1, 6, 7, 8)) * 40 + 300).astype(np.float32)
    out = normalize(image, [{"scheme": "zscore", "use_nonzero_mask": False}])
    assert out is image  # in place
    assert abs(float(out.mean())) < 1e-4
    assert float(out.std()) == pytest.approx(1.0, abs=1e-4)


def test_normalize_zscore_in_nonzero_mask():
    rng = np.random.default_rng(4)
    image = np.zeros((1, 6, 8, 8), np.float32)
    image[0, 1:5, 2:7, 2:7] = rng.standard_normal((4, 5, 5)) * 10 + 100
    mask = image[0] != 0
    normalize(image, [{"scheme": "zscore", "use_nonzero_mask": True}])
    assert (image[0][~mask] == 0).all()
    assert abs(float(image[0][mask].mean())) < 1e-4
    assert float(image[0][mask].std()) == pytest.approx(1.0, abs=1e-4)


def test_normalize_ct_clips_then_uses_global_statistics():
    image = np.array([[[[-1000.0, -100.0, 0.0, 100.0, 300.0, 3000.0]]]], np.float32)
    normalize(image, [{"scheme": "ct", "clip": [-100.0, 300.0], "mean": 50.0, "std": 20.0}])
    np.testing.assert_allclose(image.ravel(), [-7.5, -7.5, -2.5, 2.5, 12.5, 12.5])


def test_normalize_per_channel_and_unknown_scheme():
    image = np.stack([np.full((2, 3, 3), 5.0), np.linspace(0, 1, 18).reshape(2, 3, 3)]).astype(np.float32)
    normalize(image, [{"scheme": "none"}, {"scheme": "zscore"}])
    np.testing.assert_array_equal(image[0], 5.0)
    assert float(image[1].std()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        normalize(np.ones((1, 2, 2, 2), np.float32), [{"scheme": "minmax"}])


# ---- foreground locations ----------------------------------------------------------------------------------------


def make_seg() -> np.ndarray:
    seg = np.zeros((6, 20, 20), np.int16)
    seg[0:2, 0:3, 0:3] = 1  # in a corner: patches around it overhang the image
    seg[4:6, 15:18, 14:19] = 2
    return seg


def test_foreground_locations_rows_are_of_their_class():
    seg = make_seg()
    seg[3, 10, 10] = 3
    locations = foreground_locations(seg, [1, 2, 3, 4], per_class=10, seed=0)
    assert locations.dtype == np.int32 and locations.shape[1] == 4
    classes, counts = np.unique(locations[:, 0], return_counts=True)
    assert classes.tolist() == [1, 2, 3]  # class 4 is absent
    assert counts.tolist() == [10, 10, 1]  # bounded per class
    for row in locations:
        assert seg[tuple(row[1:])] == row[0]
    assert len({tuple(r) for r in locations}) == len(locations)  # no duplicates
    np.testing.assert_array_equal(locations, foreground_locations(seg, [1, 2, 3, 4], per_class=10, seed=0))


def test_foreground_locations_all_and_none():
    seg = make_seg()
    everything = foreground_locations(seg, [1], per_class=10_000, seed=0)
    assert len(everything) == int((seg == 1).sum())
    empty = foreground_locations(np.zeros((2, 2, 2), np.int16), [1, 2], per_class=5, seed=0)
    assert empty.shape == (0, 4) and empty.dtype == np.int32


# ---- patch dataset -----------------------------------------------------------------------------------------------


@pytest.fixture
def preprocessed(tmp_path) -> Path:
    """Two cases in the preprocessed layout; channel 0 equals the label so alignment can be checked."""
    folder = tmp_path / "3d_fullres"
    rng = np.random.default_rng(5)
    for i, case_id in enumerate(("a", "b")):
        seg = make_seg() if i == 0 else np.roll(make_seg(), 7, axis=2)
        data = np.stack([seg.astype(np.float32), rng.standard_normal(seg.shape).astype(np.float32) + 10.0])
        save_npy_atomic(folder / f"{case_id}.npy", data)
        save_npy_atomic(folder / f"{case_id}_seg.npy", seg)
        save_npy_atomic(folder / f"{case_id}_locations.npy", foreground_locations(seg, [1, 2], 1000, i))
    return folder


def patches(folder, patch, dims, uids, oversampling=0.33, augmentation=None, seed=0, ids=("a", "b")):
    """Final (image, label) batches for ``uids`` through the loader's dataset, collate and augmenter."""
    settings = AugmentationSettings.from_config(augmentation) if augmentation is not None else None
    geometry = PatchGeometry.resolve(settings or AugmentationSettings.from_config(), patch)
    ds = PatchDataset(folder, list(ids), patch, dims, oversampling, settings, geometry, seed)
    return PatchCollate(Augmenter(settings, geometry))([ds[u] for u in uids])


@pytest.mark.parametrize("dims,patch", [(3, [4, 8, 8]), (3, [8, 24, 16]), (2, [8, 8]), (2, [24, 12])])
def test_patch_dataset_shapes_and_types(preprocessed, dims, patch):
    image, label = patches(preprocessed, patch, dims, range(12))
    assert image.dtype == torch.float32 and label.dtype == torch.int16
    assert tuple(image.shape) == (12, 2, *patch)
    assert tuple(label.shape) == (12, 1, *patch)
    assert set(torch.unique(label).tolist()) <= {0, 1, 2}
    # channel 0 was written equal to the label: image and label come from the same place
    assert torch.equal(image[:, 0], label[:, 0].float())


@pytest.mark.parametrize("dims,patch", [(3, [2, 6, 6]), (2, [6, 6])])
def test_full_oversampling_always_contains_foreground(preprocessed, dims, patch):
    _, label = patches(preprocessed, patch, dims, range(40), oversampling=1.0, seed=3)
    assert all((label[i] > 0).any() for i in range(40))


def test_no_oversampling_also_gives_background_patches(preprocessed):
    """Guard for the test above: small random patches of these cases are usually all background."""
    _, label = patches(preprocessed, [2, 6, 6], 3, range(40), oversampling=0.0, seed=3)
    assert sum(bool((label[i] > 0).any()) for i in range(40)) < 40


def test_oversampling_share_is_the_configured_one(preprocessed):
    """A third of the patches centred on foreground: their centre voxel is foreground; the rest land anywhere."""
    _, label = patches(preprocessed, [1, 3, 3], 3, range(600), oversampling=0.333, seed=4)
    centre_fg = (label[:, 0, 0, 1, 1] > 0).float().mean().item()
    _, random_label = patches(preprocessed, [1, 3, 3], 3, range(600), oversampling=0.0, seed=4)
    base = (random_label[:, 0, 0, 1, 1] > 0).float().mean().item()
    # a forced centre is always foreground; the others are foreground at the base rate
    assert centre_fg == pytest.approx(0.333 + (1 - 0.333) * base, abs=0.06)


def test_ignore_label_is_never_a_sampling_centre(tmp_path):
    """Preprocessing of a dataset whose box is the ignore label: the stored sampling locations hold the ball only
    (the ignore value is present in every label map, so only preprocessing's choice of classes keeps it out)."""
    import json

    from conftest import write_dataset
    from segforge.cli.main import main

    dataset = write_dataset(tmp_path / "Dataset001_Tiny", num_train=3, num_test=0)
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "ball": 1, "ignore": 2}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    work = tmp_path / "work"
    assert main(["plan", str(dataset), f"paths.work_root={work}", f"paths.preprocessed_root={work / 'pre'}",
                 "plan.features_base=4", "plan.configurations=[3d_fullres]", "preprocess.num_workers=1"]) == 0
    located = sorted((work / "pre").rglob("*_locations.npy"))
    assert len(located) == 3
    for path in located:
        seg = np.load(str(path).replace("_locations.npy", "_seg.npy"))
        assert (seg == 2).any()  # the ignore value was there to be offered
        assert set(np.load(path)[:, 0].tolist()) == {1}, path.name


@pytest.mark.parametrize("dims,patch", [(3, [4, 8, 8]), (2, [8, 8])])
def test_items_are_a_function_of_their_uid(preprocessed, dims, patch):
    augmentation = {"mirror_prob": 0.5, "noise_prob": 0.5, "rotation_prob": 0.5, "scale_prob": 0.5}
    first = patches(preprocessed, patch, dims, range(9), augmentation=augmentation, seed=7)
    again = patches(preprocessed, patch, dims, range(9), augmentation=augmentation, seed=7)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert any(not torch.equal(first[0][0], first[0][i]) for i in range(1, 9))  # not one patch over and over
    other_seed = patches(preprocessed, patch, dims, range(9), augmentation=augmentation, seed=8)
    assert not torch.equal(first[0], other_seed[0])


def test_index_sampler_shards_ranks_and_epochs():
    samplers = [PatchIndexSampler(5, rank, 3) for rank in range(3)]
    seen = []
    for epoch in range(2):
        for sampler in samplers:
            sampler.set_epoch(epoch)
            seen += list(sampler)
    assert len(seen) == len(set(seen)) == 30  # no uid twice: ranks and epochs all differ
    fixed = PatchIndexSampler(5, 1, 3, deterministic=True)
    fixed.set_epoch(4)
    assert list(fixed) == list(PatchIndexSampler(5, 1, 3, deterministic=True)) and len(fixed) == 5


def test_device_and_worker_augmentation_give_the_same_batches(preprocessed):
    """augment_on=workers augments inside the loader; augment_on=device after the transfer: same numbers, same batch."""
    from omegaconf import OmegaConf

    from segforge.training.data import SegmentationDataModule

    cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "segforge" / "configs" / "data" / "default.yaml")
    cfg.iterations_per_epoch, cfg.num_workers, cfg.torch_threads = 3, 0, 1
    cfg.augmentation.rotation_prob = cfg.augmentation.noise_prob = cfg.augmentation.blur_prob = 0.7
    batches = {}
    for where in ("workers", "device"):
        cfg.augment_on = where
        module = SegmentationDataModule(preprocessed, ["a", "b"], [], [6, 10, 10], 3, 2, cfg, seed=3)
        batches[where] = [module.on_after_batch_transfer(batch, 0) for batch in module.train_dataloader()]
    assert len(batches["device"]) == 3
    for (image_w, label_w), (image_d, label_d) in zip(batches["workers"], batches["device"]):
        assert torch.equal(image_w, image_d) and torch.equal(label_w, label_d)
    assert torch.equal(batches["device"][0][1][:, 0].float(), batches["device"][0][0][:, 0]) is False  # augmented


def test_ignore_and_region_values_pass_through_augmentation(tmp_path):
    """Label values are carried, never remapped: an ignore value (255) and region member values survive warping."""
    folder = tmp_path / "pre"
    seg = np.zeros((8, 24, 24), np.int16)
    seg[:, 2:10] = 255
    seg[2:6, 12:20, 4:12] = 1
    seg[3:5, 14:18, 6:10] = 2
    save_npy_atomic(folder / "c.npy", seg[None].astype(np.float32))
    save_npy_atomic(folder / "c_seg.npy", seg)
    save_npy_atomic(folder / "c_locations.npy", foreground_locations(seg, [1, 2], 100, 0))
    augmentation = {"rotation_prob": 1.0, "scale_prob": 1.0}
    _, label = patches(folder, [6, 16, 16], 3, range(20), oversampling=0.5, augmentation=augmentation, ids=["c"])
    values = set(torch.unique(label).tolist())
    assert values <= {0, 1, 2, 255} and {255, 1} <= values
