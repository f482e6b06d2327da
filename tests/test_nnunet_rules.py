"""nnU-Net v2's rules where segforge says it follows them: the separate-axis rule of anisotropic resampling, the
network topology (``get_pool_and_conv_props``) and the validation batches per epoch.

The expected values come from nnU-Net's source logic, never from segforge's output: ``nnunet_*`` below transcribe
nnU-Net v2's functions (``nnunetv2/preprocessing/resampling/default_resampling.py``,
``nnunetv2/experiment_planning/experiment_planners/network_topology.py``), the named cases are derived by hand from
them (derivation in the comments), and where nnunetv2 is installed the transcriptions are checked against it.
Each named case is one where segforge's former rule gave a different answer.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import segforge
from segforge.planning.topology import divisible_patch, topology
from segforge.preprocessing.resample import resampling_modes, separate_axis

ANISO_THRESHOLD = 3  # nnunetv2.configuration.ANISO_THRESHOLD
CONFIGS = Path(segforge.__file__).parent / "configs"


# ---- nnU-Net's logic, transcribed ----------------------------------------------------------------------------


def nnunet_separate_axis(current_spacing, new_spacing, threshold=ANISO_THRESHOLD):
    """``determine_do_sep_z_and_axis(force_separate_z=None, ...)``: the axis, or None for no separate z."""
    def lowres_axes(spacing):  # get_lowres_axis
        return np.where(max(spacing) / np.array(spacing) == 1)[0]

    if np.max(current_spacing) / np.min(current_spacing) > threshold:
        axis = lowres_axes(current_spacing)
    elif np.max(new_spacing) / np.min(new_spacing) > threshold:
        axis = lowres_axes(new_spacing)
    else:
        return None
    return int(axis[0]) if len(axis) == 1 else None  # two or three lowres axes: no separate z


def nnunet_pool_and_conv_props(spacing, patch_size, min_feature_map_size=4, max_numpool=999999):
    """``get_pool_and_conv_props``: (pool_op_kernel_sizes, conv_kernel_sizes, padded patch size)."""
    dim = len(spacing)
    current_spacing, current_size = list(spacing), list(patch_size)
    pool_op_kernel_sizes, conv_kernel_sizes = [[1] * dim], []
    num_pool_per_axis, kernel_size = [0] * dim, [1] * dim
    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_feature_map_size]
        if len(valid) < 1:
            break
        min_spacing_of_valid = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / min_spacing_of_valid < 2]
        valid = [i for i in valid if num_pool_per_axis[i] < max_numpool]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map_size:
            break
        if len(valid) < 1:
            break
        for d in range(dim):
            if kernel_size[d] != 3 and current_spacing[d] / min(current_spacing) < 2:
                kernel_size[d] = 3
        pool = [1] * dim
        for v in valid:
            pool[v] = 2
            num_pool_per_axis[v] += 1
            current_spacing[v] *= 2
            current_size[v] = np.ceil(current_size[v] / 2)
        pool_op_kernel_sizes.append(pool)
        conv_kernel_sizes.append(list(kernel_size))
    divisor = [2**n for n in num_pool_per_axis]
    padded = [p + d - p % d - (d if p % d == 0 else 0) for p, d in zip(patch_size, divisor)]  # pad_shape
    conv_kernel_sizes.append([3] * dim)  # the bottleneck: always 3
    return pool_op_kernel_sizes, conv_kernel_sizes, padded


# ---- the separate axis ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,target,expected", [
    # max/min = 5 > 3 and axis 0 alone has the maximum spacing; the former rule (axes > 3x the finest) found two
    ([5.0, 4.0, 1.0], [5.0, 4.0, 1.0], 0),
    ([1.0, 4.0, 5.0], [1.0, 1.0, 1.0], 2),
    # the input is isotropic; the target's max/min is 3.5 > 3 and axis 1 has its maximum (former rule: axes 0 and 1)
    ([1.0, 1.0, 1.0], [3.2, 3.5, 1.0], 1),
    # two axes share the maximum: nnU-Net resamples nothing separately (its (0.24, 1.25, 1.25) comment)
    ([0.24, 1.25, 1.25], [0.24, 1.25, 1.25], None),
    ([5.0, 0.8, 0.8], [5.0, 0.8, 0.8], 0),
    ([3.0, 1.0, 1.0], [3.0, 1.0, 1.0], None),  # max/min = 3 is not above 3
])
def test_separate_axis_is_nnunets(spacing, target, expected):
    assert nnunet_separate_axis(spacing, target) == expected  # the transcription agrees with the derivation
    assert separate_axis(spacing, target, 3.0) == expected
    modes = resampling_modes(spacing, target)
    assert modes["separate_axis"] == expected
    assert modes["image"] == ["nearest" if a == expected else "cubic" for a in range(3)]


def test_separate_axis_matches_nnunet_on_a_grid_of_spacings():
    values = [0.5, 1.0, 1.5, 3.0, 4.0, 5.0]
    for spacing in itertools.product(values, repeat=3):
        for target in ([1.0, 1.0, 1.0], [5.0, 1.0, 1.0], list(spacing)):
            assert separate_axis(spacing, target, 3.0) == nnunet_separate_axis(spacing, target), (spacing, target)


# ---- topology ------------------------------------------------------------------------------------------------


def segforge_props(spacing, patch):
    topo = topology(list(patch), list(spacing), 4)
    return topo["strides"], topo["kernel_sizes"], divisible_patch(list(patch), topo["total_pooling"])


def test_finest_axis_is_taken_over_the_poolable_axes():
    # spacing (3, 1), patch (64, 12). Stage 1: both axes >= 8, finest 1: only axis 1 pools (3/1 >= 2), alone and
    # 12 >= 3 x 4: sizes (64, 6), spacing (3, 2). From then on axis 1 (6 < 8) cannot pool: the finest poolable
    # spacing is axis 0's own 3, so axis 0 pools alone while >= 12: 64 -> 32 -> 16 -> 8 (three stages).
    # (The former rule took the finest over all axes, 2 and then 4, and stopped after one pool of axis 0.)
    strides, kernels, _ = segforge_props([3.0, 1.0], [64, 12])
    assert strides == [[1, 1], [1, 2], [2, 1], [2, 1], [2, 1]]
    # kernels before each pool: axis 0 reaches 3 once 3/min(3, 2) < 2; the bottleneck is 3
    assert kernels == [[1, 3], [3, 3], [3, 3], [3, 3], [3, 3]]
    assert (strides, kernels) == nnunet_pool_and_conv_props([3.0, 1.0], [64, 12])[:2]


def test_a_single_poolable_axis_stops_below_three_times_the_min_feature_map():
    # spacing (3, 1), patch (64, 8): axis 1 is the only one within 2x of the finest and 8 < 3 x 4: nnU-Net stops
    # at once (the former rule pooled it to 4 and went on with axis 0)
    strides, kernels, padded = segforge_props([3.0, 1.0], [64, 8])
    assert strides == [[1, 1]] and kernels == [[3, 3]] and padded == [64, 8]
    assert (strides, kernels) == nnunet_pool_and_conv_props([3.0, 1.0], [64, 8])[:2]


def test_the_bottleneck_kernel_is_always_three():
    # spacing (20, 1, 1), patch (4, 32, 32): axis 0 never pools (4 < 8); in-plane pools three times to spacing 8,
    # and 20/8 >= 2 keeps axis 0's kernel at 1 in every stage but the bottleneck, which nnU-Net sets to 3
    strides, kernels, _ = segforge_props([20.0, 1.0, 1.0], [4, 32, 32])
    assert strides == [[1, 1, 1]] + [[1, 2, 2]] * 3
    assert kernels == [[1, 3, 3]] * 3 + [[3, 3, 3]]


def test_no_stage_cap_and_sizes_round_up():
    # 512^3 at 1 mm: 512 -> 256 -> ... -> 4, seven pools, eight stages (the former cap was six)
    strides, _, _ = segforge_props([1.0] * 3, [512] * 3)
    assert len(strides) == 8
    # 15 at 1 mm: ceil(15 / 2) = 8 >= 8 pools again: two pools, padded to 16 (the former floor: one pool)
    strides, _, padded = segforge_props([1.0] * 3, [15, 15, 15])
    assert len(strides) == 3 and padded == [16, 16, 16]


def test_topology_matches_nnunet_on_a_sweep():
    rng = np.random.default_rng(0)
    for _ in range(300):
        dims = int(rng.integers(2, 4))
        spacing = [float(v) for v in rng.choice([0.5, 0.7, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0], dims)]
        patch = [int(v) for v in rng.integers(1, 400, dims)]
        assert segforge_props(spacing, patch) == nnunet_pool_and_conv_props(spacing, patch), (spacing, patch)


# ---- nnunetv2 itself, where installed ------------------------------------------------------------------------


def test_transcriptions_match_installed_nnunetv2():
    topology_module = pytest.importorskip("nnunetv2.experiment_planning.experiment_planners.network_topology")
    resampling = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling")
    rng = np.random.default_rng(1)
    for _ in range(200):
        dims = int(rng.integers(2, 4))
        spacing = [float(v) for v in rng.choice([0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0], dims)]
        patch = [int(v) for v in rng.integers(1, 400, dims)]
        _, pools, convs, padded, _ = topology_module.get_pool_and_conv_props(spacing, patch, 4, 999999)
        ours = nnunet_pool_and_conv_props(spacing, patch)
        assert ([list(p) for p in pools], [list(c) for c in convs], [int(v) for v in padded]) == ours
    for spacing in itertools.product([0.5, 1.0, 3.0, 4.0, 5.0], repeat=3):
        _, axis = resampling.determine_do_sep_z_and_axis(None, spacing, [1.0, 1.0, 1.0])
        assert (None if axis is None else int(axis)) == nnunet_separate_axis(spacing, [1.0, 1.0, 1.0])


# ---- validation batches --------------------------------------------------------------------------------------


def test_validation_batches_per_epoch_are_nnunets():
    # nnUNetTrainer.__init__: self.num_val_iterations_per_epoch = 50
    assert OmegaConf.load(CONFIGS / "data" / "default.yaml").val_iterations == 50
