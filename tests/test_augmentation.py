"""Augmentation: the spatial convention, image-label alignment through every spatial transform, no interpolated
label values, the source box, the intensity transforms, the settings, and the thread policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segforge.training import intensity
from segforge.training.augment import AugmentationSettings, Augmenter, PatchGeometry, draw_intensity, draw_spatial
from segforge.training.spatial import (affine_matrix, sampling_grid, smooth_displacement, source_box, warp_image,
                                       warp_label)
from segforge.training.threads import thread_policy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(shape, seed=0, values=(1, 2, 5)) -> np.ndarray:
    """Integer label volume with a few ellipsoids (one thin) of the given values on background 0."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    label = np.zeros(shape, np.int16)
    for i, value in enumerate(values):
        centre = [rng.uniform(0.3, 0.7) * n for n in shape]
        radii = [rng.uniform(0.12, 0.3) * n for n in shape]
        if i == len(values) - 1:
            radii[-1] = 1.2  # a thin structure
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) < 1
        label[inside] = value
    return label


def warp_case(label: np.ndarray, matrix: np.ndarray, patch, centre, elastic=None, mode="linear"):
    """Crop the source box from ``label`` (and its one-hot image) and warp both: the loader's path."""
    from segforge.training.sampling import crop_with_padding

    elastic_max = None if elastic is None else np.abs(elastic).reshape(len(patch), -1).max(1)
    start, size = source_box(centre, matrix, patch, elastic_max)
    src_label = torch.from_numpy(crop_with_padding(label, start, size))[None]
    values = sorted(set(np.unique(label).tolist()) | {0})
    onehot = torch.stack([(src_label[0] == v).float() for v in values])
    offset = torch.tensor(np.asarray(centre) - np.asarray(start), dtype=torch.float32)
    displacement = smooth_displacement(torch.from_numpy(elastic), patch) if elastic is not None else None
    grid = sampling_grid(torch.from_numpy(matrix).float(), offset, patch, size, displacement)
    return warp_image(onehot, grid), warp_label(src_label, grid, mode), values, grid


TRANSFORMS_3D = {
    "rotation": ([0.4, -0.3, 0.5], [1, 1, 1], [False] * 3),
    "scale_down": ([0, 0, 0], [0.7, 0.7, 0.7], [False] * 3),
    "scale_up": ([0, 0, 0], [1.4, 1.4, 1.4], [False] * 3),
    "mirror": ([0, 0, 0], [1, 1, 1], [True, False, True]),
    "all": ([0.5, 0.2, -0.4], [1.2, 1.2, 1.2], [False, True, False]),
    "pseudo_2d": ([0.9, 0, 0], [1, 0.8, 0.8], [False, False, True]),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS_3D))
@pytest.mark.parametrize("elastic", [False, True])
def test_label_moves_with_its_structure_3d(name, elastic):
    label = blobs((24, 40, 36))
    patch = [16, 28, 24]
    field = None
    if elastic:
        field = np.random.default_rng(1).standard_normal((3, 4, 4, 4)).astype(np.float32)
        field *= 2.5 / np.abs(field).max()
    matrix = affine_matrix(*TRANSFORMS_3D[name])
    warped_onehot, warped_label, values, _ = warp_case(label, matrix, patch, [12.5, 20.5, 17.5], field)  # centres as the loader makes them
    # the label is the argmax of the image's interpolated class indicators: it moved exactly with the image
    from_image = torch.tensor(values)[warped_onehot.argmax(0)]
    agree = (from_image == warped_label[0].long()).float().mean().item()
    assert agree > 0.995, agree
    assert set(torch.unique(warped_label).tolist()) <= set(values)  # no interpolated label values
    assert warped_label.dtype == torch.int16 and tuple(warped_label.shape) == (1, *patch)
    assert set(torch.unique(warped_label).tolist()) >= {1, 2}


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_no_new_label_values_even_between_odd_neighbours(mode):
    rng = np.random.default_rng(3)
    label = rng.choice([0, 3, 7, 200], size=(10, 12, 12)).astype(np.int16)  # every voxel a boundary
    matrix = affine_matrix([0.3, 0.2, 0.1], [0.9] * 3, [False] * 3)
    _, warped, _, _ = warp_case(label, matrix, [6, 8, 8], [5.0, 6.0, 6.0], mode=mode)
    assert set(torch.unique(warped).tolist()) <= {0, 3, 7, 200}


def test_thin_structure_survives_linear_label_warping():
    label = np.zeros((20, 20), np.int16)
    label[:, 9] = 4  # a one-voxel-wide line
    matrix = affine_matrix([0.25], [1.0, 1.0], [False, False])
    _, warped, _, _ = warp_case(label, matrix, [14, 14], [9.5, 9.5])
    rows_with_line = (warped[0] == 4).any(1).float().mean().item()
    assert rows_with_line > 0.9  # the rotated line stays connected across the patch


def test_spatial_convention_2d():
    """Known transforms give known patches: the identity crops, 90 degrees rotates, mirror flips, scale 2 zooms out."""
    image = np.arange(11 * 11, dtype=np.float32).reshape(11, 11)
    patch, centre = [5, 5], [5.0, 5.0]

    def warp(matrix):
        start, size = source_box(centre, matrix, patch)
        src = torch.from_numpy(image[start[0]:start[0] + size[0], start[1]:start[1] + size[1]].copy())[None]
        offset = torch.tensor(np.asarray(centre) - start, dtype=torch.float32)
        return warp_image(src, sampling_grid(torch.from_numpy(matrix).float(), offset, patch, size))[0].numpy()

    plain = image[3:8, 3:8]
    np.testing.assert_allclose(warp(affine_matrix([0.0], [1, 1], [False, False])), plain, atol=1e-3)
    np.testing.assert_allclose(warp(affine_matrix([0.0], [1, 1], [True, False])), plain[::-1], atol=1e-3)
    np.testing.assert_allclose(warp(affine_matrix([math.pi / 2], [1, 1], [False, False])), np.rot90(plain, -1), atol=1e-3)
    np.testing.assert_allclose(warp(affine_matrix([0.0], [2, 2], [False, False])), image[1:10:2, 1:10:2], atol=1e-3)


def test_source_box_covers_every_sample_point():
    rng = np.random.default_rng(4)
    settings = AugmentationSettings.from_config(dict(rotation_prob=1, scale_prob=1, elastic_prob=0.7,
                                                     elastic_magnitude=(0.05, 0.15), elastic_spacing=(0.15, 0.2)))
    for dims, patch in ((3, (12, 20, 16)), (2, (24, 18)), (3, (6, 40, 40))):
        geometry = PatchGeometry.resolve(settings, patch)
        for _ in range(20):
            spatial = draw_spatial(rng, settings, geometry)
            centre = rng.uniform(0, 50, dims)
            start, size = source_box(centre, spatial["matrix"], patch, spatial["elastic_max"])
            disp = smooth_displacement(torch.from_numpy(spatial["elastic"]), patch) if spatial["elastic"] is not None else None
            grid = sampling_grid(torch.from_numpy(spatial["matrix"]).float(),
                                 torch.tensor(centre - np.asarray(start), dtype=torch.float32), patch, size, disp)
            assert grid.abs().max() <= 1 + 1e-4  # every sample point (and its linear neighbours) lies in the box


def test_pseudo_2d_keeps_slices_apart():
    """Anisotropic patches: in-plane transforms only, each output slice comes from exactly one source slice."""
    settings = AugmentationSettings.from_config(dict(rotation_prob=1, scale_prob=1, elastic_prob=1))
    geometry = PatchGeometry.resolve(settings, (4, 40, 40))
    assert geometry.pseudo_2d and geometry.rotation_rad == pytest.approx(math.pi)
    rng = np.random.default_rng(0)
    volume = np.repeat(np.arange(10, dtype=np.float32)[:, None, None] * 10, 64, 1).repeat(64, 2)
    for _ in range(5):
        spatial = draw_spatial(rng, settings, geometry)
        assert np.allclose(spatial["matrix"][0], [1, 0, 0]) and np.allclose(spatial["matrix"][:, 0], [1, 0, 0])
        centre = [4.5, 31.5, 31.5]
        start, size = source_box(centre, spatial["matrix"], geometry.patch_size, spatial["elastic_max"])
        assert size[0] == 4  # no extra slices read
        from segforge.training.sampling import crop_with_padding

        src = torch.from_numpy(crop_with_padding(volume, start, size))[None]
        grid = sampling_grid(torch.from_numpy(spatial["matrix"]).float(), torch.tensor(np.asarray(centre) - start, dtype=torch.float32),
                             geometry.patch_size, size, smooth_displacement(torch.from_numpy(spatial["elastic"]), geometry.patch_size))
        out = warp_image(src, grid)[0]
        inside = out[:, 15:25, 15:25]  # away from the zero padding
        for z in range(4):
            np.testing.assert_allclose(inside[z].numpy(), (start[0] + z) * 10, atol=1e-3)


def test_geometry_rules_follow_nnunet():
    default = AugmentationSettings.from_config()
    assert PatchGeometry.resolve(default, (64, 64, 64)).rotation_rad == pytest.approx(math.radians(30))
    assert not PatchGeometry.resolve(default, (64, 64, 64)).pseudo_2d
    assert PatchGeometry.resolve(default, (16, 128, 128)).pseudo_2d
    assert PatchGeometry.resolve(default, (128, 128)).rotation_rad == pytest.approx(math.pi)
    assert PatchGeometry.resolve(default, (64, 160)).rotation_rad == pytest.approx(math.radians(15))
    assert PatchGeometry.resolve(AugmentationSettings.from_config(dict(rotation_deg=10)), (64, 64, 64)).rotation_rad == pytest.approx(math.radians(10))
    assert PatchGeometry.resolve(default, (8, 8, 8), plan_mirror_axes=[1, 2]).mirror_axes == (1, 2)
    with pytest.raises(ValueError, match="mirror axes"):
        PatchGeometry.resolve(AugmentationSettings.from_config(dict(mirror_axes=(0, 3))), (8, 8))


def test_settings_refuse_unknown_keys_and_modes():
    with pytest.raises(ValueError, match="rotaton_prob"):
        AugmentationSettings.from_config({"rotaton_prob": 0.2})
    with pytest.raises(ValueError, match="label_interpolation"):
        AugmentationSettings.from_config({"label_interpolation": "cubic"})
    assert AugmentationSettings.from_config({"scale_range": [0.8, 1.2]}).scale_range == (0.8, 1.2)


def test_drawn_probabilities_match_the_settings():
    settings = AugmentationSettings.from_config()
    geometry = PatchGeometry.resolve(settings, (32, 32, 32))
    rng = np.random.default_rng(0)
    n = 4000
    spatial = [draw_spatial(rng, settings, geometry) for _ in range(n)]
    warped = np.mean([s["matrix"] is not None for s in spatial])
    assert warped == pytest.approx(1 - 0.8 * 0.8, abs=0.03)  # rotation 0.2 or scaling 0.2
    assert np.mean([s["mirror"][1] for s in spatial]) == pytest.approx(0.5, abs=0.03)
    params = [draw_intensity(rng, settings, 2, 3) for _ in range(n)]
    assert np.mean([p["noise_std"] > 0 for p in params]) == pytest.approx(0.1, abs=0.02)
    assert np.mean([(p["gamma"] != 1).any() for p in params]) == pytest.approx(0.3, abs=0.03)
    assert np.mean([(p["blur_sigma"][0] > 0).any() for p in params]) == pytest.approx(0.2 * 0.5, abs=0.02)
    gammas = np.concatenate([p["gamma"][p["gamma"] != 1] for p in params])
    assert gammas.min() >= 0.7 and gammas.max() <= 1.5 and np.mean(gammas < 1) == pytest.approx(0.5, abs=0.06)


# ---- intensity -------------------------------------------------------------------------------------------------


def batch(shape=(3, 2, 10, 12, 14), seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)) * 2 + 1


def test_neutral_parameters_change_nothing():
    x = batch()
    original = x.clone()
    b, c = x.shape[:2]
    intensity.add_noise(x, torch.zeros(b), torch.arange(b))
    intensity.gaussian_blur(x, torch.zeros(b, c, 3))
    intensity.multiply_brightness(x, torch.ones(b, c))
    intensity.adjust_contrast(x, torch.ones(b, c))
    intensity.simulate_low_resolution(x, torch.ones(b, c))
    intensity.gamma(x, torch.ones(b, c), invert=True)
    assert torch.equal(x, original)


def test_each_intensity_transform_touches_only_its_pairs():
    for name, apply in {
        "noise": lambda x: intensity.add_noise(x, torch.tensor([0.0, 0.5, 0.0]), torch.arange(3)),
        "blur": lambda x: intensity.gaussian_blur(x, torch.tensor([[[0.0] * 3, [0.0] * 3], [[0.0] * 3, [1.0, 0.5, 0.8]], [[0.0] * 3] * 2])),
        "brightness": lambda x: intensity.multiply_brightness(x, torch.tensor([[1, 1], [1, 1.2], [1, 1]])),
        "contrast": lambda x: intensity.adjust_contrast(x, torch.tensor([[1, 1], [1, 0.8], [1, 1]])),
        "lowres": lambda x: intensity.simulate_low_resolution(x, torch.tensor([[1, 1], [1, 0.5], [1, 1]])),
        "gamma": lambda x: intensity.gamma(x, torch.tensor([[1, 1], [1, 1.4], [1, 1]]), invert=False),
    }.items():
        x = batch()
        original = x.clone()
        apply(x)
        changed = [(b, c) for b in range(3) for c in range(2) if not torch.equal(x[b, c], original[b, c])]
        assert changed == [(1, 1)] or (name == "noise" and changed == [(1, 0), (1, 1)]), name


def test_intensity_transforms_do_what_they_say():
    x = batch((2, 1, 16, 16, 16))
    noisy = x.clone()
    intensity.add_noise(noisy, torch.tensor([0.3, 0.3]), torch.tensor([1, 2]))
    assert (noisy - x).std().item() == pytest.approx(0.3, rel=0.05)
    blurred = x.clone()
    intensity.gaussian_blur(blurred, torch.full((2, 1, 3), 1.0))
    assert blurred.std() < 0.6 * x.std() and blurred.mean().item() == pytest.approx(x.mean().item(), abs=0.05)
    contrast = x.clone()
    intensity.adjust_contrast(contrast, torch.full((2, 1), 0.5))
    for b in range(2):
        assert contrast[b].mean().item() == pytest.approx(x[b].mean().item(), abs=1e-4)
        assert contrast[b].std().item() == pytest.approx(0.5 * x[b].std().item(), rel=1e-3)
    stretched = x.clone()
    intensity.adjust_contrast(stretched, torch.full((2, 1), 2.0))
    assert stretched.max() <= x.max() + 1e-5 and stretched.min() >= x.min() - 1e-5  # range preserved
    for invert in (False, True):
        g = x.clone()
        intensity.gamma(g, torch.full((2, 1), 1.5), invert=invert)
        assert not torch.allclose(g, x)
        for b in range(2):  # mean and std retained
            assert g[b].mean().item() == pytest.approx(x[b].mean().item(), abs=1e-3)
            assert g[b].std().item() == pytest.approx(x[b].std().item(), rel=1e-3)
    low = x.clone()
    intensity.simulate_low_resolution(low, torch.full((2, 1), 0.5), keep_axes=(0,))
    assert low.std() < x.std()
    lowres_slices = x.clone()  # keep_axes: slices are never mixed
    lowres_slices[:, :, ::2] = 5.0
    lowres_slices[:, :, 1::2] = -5.0
    intensity.simulate_low_resolution(lowres_slices, torch.full((2, 1), 0.5), keep_axes=(0,))
    assert torch.all(lowres_slices[:, :, ::2] == 5.0) and torch.all(lowres_slices[:, :, 1::2] == -5.0)


def test_augmenter_batch_on_the_batch_device_keeps_dtypes():
    settings = AugmentationSettings.from_config(dict(rotation_prob=1, noise_prob=1, gamma_prob=1))
    geometry = PatchGeometry.resolve(settings, (8, 12, 12))
    rng = np.random.default_rng(2)
    label = blobs((14, 20, 20))
    samples = []
    for _ in range(3):
        spatial = draw_spatial(rng, settings, geometry)
        centre = [7.0, 10.0, 10.0]
        start, size = source_box(centre, spatial["matrix"], geometry.patch_size)
        from segforge.training.sampling import collate_patches, crop_with_padding

        lab = crop_with_padding(label, start, size)
        samples.append({"image": torch.from_numpy(lab.astype(np.float32))[None], "label": torch.from_numpy(lab)[None],
                        "matrix": torch.from_numpy(spatial["matrix"]).float(),
                        "offset": torch.tensor(np.asarray(centre) - start, dtype=torch.float32),
                        "elastic": torch.zeros(0), "params": draw_intensity(rng, settings, 1, 3), "seed": 5})
    image, out_label = Augmenter(settings, geometry)(collate_patches(samples))
    assert image.dtype == torch.float32 and out_label.dtype == torch.int16
    assert image.shape == (3, 1, 8, 12, 12) and out_label.shape == (3, 1, 8, 12, 12)
    assert torch.isfinite(image).all()


# ---- thread policy -----------------------------------------------------------------------------------------------


def test_thread_policy():
    auto = {"augment_on": "auto", "num_workers": "auto", "torch_threads": "auto", "worker_threads": 1}
    cpu = thread_policy(auto, on_cuda=False, ranks_on_node=1, cores=2)
    assert (cpu.augment_on, cpu.num_workers, cpu.torch_threads) == ("device", 0, 2)  # no worker beside the step
    big_cpu = thread_policy(auto, on_cuda=False, ranks_on_node=1, cores=16)
    assert (big_cpu.augment_on, big_cpu.num_workers, big_cpu.torch_threads) == ("device", 1, 16)
    ddp_cpu = thread_policy(auto, on_cuda=False, ranks_on_node=2, cores=2)
    assert (ddp_cpu.num_workers, ddp_cpu.torch_threads) == (0, 1)  # one core per rank: no worker on top
    gpu = thread_policy(auto, on_cuda=True, ranks_on_node=4, cores=32)
    assert (gpu.augment_on, gpu.num_workers, gpu.torch_threads) == ("device", 4, 4)
    manual = thread_policy({**auto, "num_workers": 3, "torch_threads": 5, "augment_on": "device"}, False, 1, 2)
    assert (manual.augment_on, manual.num_workers, manual.torch_threads) == ("device", 3, 5)
    capped = thread_policy(auto, on_cuda=False, ranks_on_node=1, cores=16, thread_limit=1)
    assert capped.torch_threads == 1 and "OMP_NUM_THREADS=1" in capped.reason  # who set it shares the cores
    assert thread_policy(auto, on_cuda=False, ranks_on_node=2, cores=2, thread_limit=4).torch_threads == 1
    assert thread_policy({**auto, "torch_threads": 3}, False, 1, 2, thread_limit=1).torch_threads == 3
    from segforge.training.threads import environment_thread_limit
    assert [environment_thread_limit(e) for e in ({"OMP_NUM_THREADS": "2"}, {}, {"OMP_NUM_THREADS": "x"},
                                                  {"OMP_NUM_THREADS": "0"})] == [2, None, None, None]
    with pytest.raises(ValueError, match="augment_on"):
        thread_policy({**auto, "augment_on": "gpu"}, False)
