"""nnU-Net v2 model folders through segforge: a small nnU-Net model trained by nnU-Net predicts the same masks through
both tools (needs nnunetv2, the bench extra, which CI installs), its weights map onto segforge's UNet tensor by
tensor, and a checkpoint is data only."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segforge.errors import SegforgeError
from segforge.inference.nnunet_model import is_nnunet_model, load_checkpoint, load_nnunet_model

HAS_NNUNET = importlib.util.find_spec("nnunetv2") is not None


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def fake_folder(root: Path, checkpoint: dict | object) -> Path:
    folder = root / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans", "configurations": {}}))
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "channel_names": {"0": "CT"}}))
    with open(folder / "fold_0" / "checkpoint_final.pth", "wb") as handle:
        pickle.dump(checkpoint, handle)
    return folder


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = fake_folder(tmp_path, {"network_weights": Boom()})
    assert is_nnunet_model(folder)
    with pytest.raises(SegforgeError, match="weights_only"):
        load_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    assert not (tmp_path / "pwned").exists()


def test_an_architecture_segforge_cannot_map_is_refused_by_name(tmp_path):
    folder = fake_folder(tmp_path, {"network_weights": {}, "init_args": {"configuration": "3d_fullres"}})
    plans = {"plans_name": "nnUNetPlans", "configurations": {"3d_fullres": {
        "patch_size": [8, 8, 8], "architecture": {"network_class_name":
                                                   "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"}}}}
    (folder / "plans.json").write_text(json.dumps(plans))
    torch.save({"network_weights": {}, "init_args": {"configuration": "3d_fullres"}}, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(SegforgeError, match="ResidualEncoderUNet is not supported"):
        load_nnunet_model(folder)


PLAN_ARCH = {"n_stages": 4, "features_per_stage": [4, 8, 16, 32], "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
             "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]], "n_conv_per_stage": [2, 2, 2, 2],
             "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
             "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
             "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
             "nonlin_kwargs": {"inplace": True}}  # nnU-Net's plan for conftest's data, at an eighth of its width


def test_nnunet_weights_land_where_segforge_expects_them_and_give_the_same_output():
    """dynamic_network_architectures' PlainConvUNet (what nnU-Net trains), built from a plan with random weights:
    every tensor of its state dict lands, by map_state_dict, on the segforge UNet parameter of the same role and
    shape (the duplicates nnU-Net keeps aside), and both networks give the same logits for one random input."""
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    from segforge.inference.nnunet_model import map_state_dict, network_from_checkpoint

    torch.manual_seed(0)
    arch = dict(PLAN_ARCH)
    theirs = unet.PlainConvUNet(
        2, arch["n_stages"], arch["features_per_stage"], torch.nn.Conv3d, arch["kernel_sizes"], arch["strides"],
        arch["n_conv_per_stage"], 3, arch["n_conv_per_stage_decoder"], True, torch.nn.InstanceNorm3d,
        arch["norm_op_kwargs"], None, None, torch.nn.LeakyReLU, arch["nonlin_kwargs"], deep_supervision=True)
    with torch.no_grad():  # instance norms start at 1 / 0: random affine parameters so that a swap would show
        for name, tensor in theirs.named_parameters():
            if ".norm." in name:
                tensor.uniform_(0.5, 1.5)
    state = theirs.state_dict()
    plans = {"configurations": {"3d_fullres": {"patch_size": [8, 16, 16], "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet", "arch_kwargs": arch}}}}
    ours = network_from_checkpoint({"network_weights": state}, plans, "3d_fullres", Path("fold_0/checkpoint_final.pth"))
    mapped = map_state_dict(state)
    our_state = ours.state_dict()
    assert sorted(mapped) == sorted(our_state)  # every segforge tensor filled, by exactly one nnU-Net tensor
    unique = {k: v for k, v in state.items() if not k.startswith("decoder.encoder.") and ".all_modules." not in k}
    assert len(unique) == len(mapped)
    for key, value in mapped.items():
        assert our_state[key].shape == value.shape and torch.equal(our_state[key], value), key
    # the roles, spelled out for one of each kind (the stage and conv indices carry over)
    assert torch.equal(our_state["encoder.1.convs.0.weight"], state["encoder.stages.1.0.convs.0.conv.weight"])
    assert torch.equal(our_state["encoder.2.norms.1.bias"], state["encoder.stages.2.0.convs.1.norm.bias"])
    assert torch.equal(our_state["decoder.0.convs.1.weight"], state["decoder.stages.0.convs.1.conv.weight"])
    assert torch.equal(our_state["upsample.2.weight"], state["decoder.transpconvs.2.weight"])
    assert torch.equal(our_state["heads.2.weight"], state["decoder.seg_layers.2.weight"])
    theirs.eval()
    ours.eval()
    x = torch.randn(1, 2, 8, 32, 32)
    with torch.no_grad():
        their_logits = theirs(x)[0]  # deep supervision: full resolution first
        torch.testing.assert_close(ours(x), their_logits, rtol=1e-5, atol=1e-5)
        theirs.decoder.deep_supervision = False
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_an_nnunet_weight_without_a_place_in_segforge_is_refused_by_name():
    from segforge.inference.nnunet_model import map_state_dict

    weight = torch.zeros(1)
    assert map_state_dict({"encoder.stages.0.0.convs.1.norm.weight": weight, "decoder.encoder.stages.0.x": weight}) == {
        "encoder.0.norms.1.weight": weight}
    with pytest.raises(SegforgeError, match="'decoder.attention.0.weight' has no place"):
        map_state_dict({"decoder.attention.0.weight": weight})


@pytest.mark.parametrize("new_shape, separate_z", [([14, 36, 37], True), ([12, 36, 37], True), ([12, 36, 37], False)])
def test_spline_resampling_is_nnunets(new_shape, separate_z):
    """``spline`` (the image resampling of nnU-Net model folders) against nnU-Net's own resample_data_or_seg on
    noise (cubic overshoot everywhere): with a separate z axis nnU-Net resizes slice by slice, so each slice is clipped
    to its own range (clipping to the volume's range was 0.28 off)."""
    resampling = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling")
    from segforge.preprocessing.resample import resample_image

    image = np.random.default_rng(0).normal(size=(1, 14, 40, 44)).astype(np.float32)
    theirs = resampling.resample_data_or_seg(image, new_shape, False, 0, 3, separate_z, 0)
    ours = resample_image(image, new_shape, ["nearest", "spline", "spline"] if separate_z else ["spline"] * 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


# nnU-Net's recipe, shortened: 5 x 40 steps at 3e-2 learn both classes of conftest's data (held-out Dice ~0.9 / ~0.8)
EPOCHS, ITERATIONS, LR = 5, 40, 0.03
# held-out cases (seed, shape, spacing): on the training grid (no resampling; several sliding windows), resampled
# in-plane (0.8 x 0.75 mm -> 0.9 mm: B-spline slice by slice), resampled across slices (2.6 mm -> 3 mm: nearest)
HELD_OUT = {"same_grid": (7, (14, 40, 44), (3.0, 0.9, 0.9)), "in_plane": (8, (14, 40, 44), (3.0, 0.8, 0.75)),
            "across_slices": (9, (12, 36, 36), (2.6, 0.95, 0.95))}


def dice(mask, reference, value) -> float:
    return 2 * float(((mask == value) & (reference == value)).sum()) / max(1, int((mask == value).sum() + (reference == value).sum()))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NNUNET, reason="needs nnunetv2 (bench extra: source scripts/setup_env.sh dev,bench)")
def test_an_nnunet_model_predicts_the_same_masks_through_segforge(tmp_path, one_torch_thread):
    """nnU-Net plans, preprocesses, trains and predicts (tests/nnunet_reference_run.py); segforge predicts the same
    held-out cases from the model folder: identical masks, except where nnU-Net's own top two classes tie (top two
    probabilities within 1e-3): there float rounding picks the class. Measured: 0 voxels differ on the training grid
    and in-plane; across slices 2 of 15,552, both at an exact tie (0.49999994 / 0.49999994) in nnU-Net."""
    from conftest import ROTATED, make_case, write_dataset
    from segforge.cli.main import main
    from segforge.io.image import Geometry, read_image, write_image

    root = write_dataset(tmp_path / "raw" / "Dataset990_Tiny")
    images = tmp_path / "held_out"
    images.mkdir()
    references = {}
    for case, (seed, shape, spacing) in HELD_OUT.items():
        image, references[case] = make_case(np.random.default_rng(seed), shape)
        write_image(images / f"{case}_0000.nii.gz", image, Geometry(spacing=spacing, origin=(1.0, 2.0, 3.0),
                                                                        direction=ROTATED, ndim=3))
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res")}
    command = [sys.executable, str(Path(__file__).parent / "nnunet_reference_run.py"), "990", str(EPOCHS),
               str(ITERATIONS), str(LR), str(images), str(tmp_path / "nn")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout[-500:])
    model = tmp_path / "res" / root.name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "sf"), "--model", str(model)]) == 0
    for case, reference in references.items():
        theirs, their_geometry = read_image(tmp_path / "nn" / f"{case}.nii.gz")
        ours, our_geometry = read_image(tmp_path / "sf" / f"{case}.nii.gz")
        assert ours.shape == theirs.shape and our_geometry.same_grid(their_geometry, tol=1e-6) == []
        # a trained model, not a trivial one: both classes found on unseen cases (chance Dice here is below 0.05)
        scores = [dice(theirs, reference, value) for value in (1, 2)]
        differing = np.argwhere(ours != theirs)
        print(case, "Dice", np.round(scores, 3), "voxels differing", len(differing), "of", ours.size)
        assert min(scores) > 0.5, (case, scores)
        assert len(differing) <= 5, (case, len(differing))
        probabilities = np.load(tmp_path / "nn" / f"{case}.npz")["probabilities"]
        for voxel in map(tuple, differing):
            top_two = np.sort(probabilities[(slice(None), *voxel)])[-2:]
            assert top_two[1] - top_two[0] < 1e-3, (case, voxel, top_two)  # a tie in nnU-Net's own prediction
