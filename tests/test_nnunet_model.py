"""nnU-Net v2 model folders through segforge: a tiny nnU-Net model trained for a few iterations predicts the same
masks through both tools (needs nnunetv2, the bench extra; skipped without it), and a checkpoint is data only."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segforge.errors import SegforgeError
from segforge.inference.nnunet_model import is_nnunet_model, load_checkpoint, load_nnunet_model

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
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


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NNUNET, reason="needs nnunetv2 (bench extra: source scripts/setup_env.sh bench)")
def test_an_nnunet_model_predicts_the_same_masks_through_segforge(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    from bench.datasets import ensure_dataset

    root = ensure_dataset("tiny", tmp_path / "bench", log=lambda m: None)
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res")}
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / root.name).symlink_to(root)
    train = (
        "import json, torch; torch.set_num_threads(2)\n"
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        f"pre = '{tmp_path / 'pre' / root.name}'\n"
        "plans = json.load(open(pre + '/nnUNetPlans.json')); plans['continue_training'] = False\n"
        "t = nnUNetTrainer(plans, '3d_fullres', 0, json.load(open(pre + '/dataset.json')), device=torch.device('cpu'))\n"
        "t.num_iterations_per_epoch, t.num_val_iterations_per_epoch, t.num_epochs = 10, 2, 2\n"
        "t.run_training()\n")
    for command in (["nnUNetv2_plan_and_preprocess", "-d", "903", "-c", "3d_fullres", "-np", "2"], [sys.executable, "-c", train]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    model = tmp_path / "res" / root.name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    images = tmp_path / "images"
    images.mkdir()
    for case in ("case_0004", "case_0005"):
        (images / f"{case}_0000.nii.gz").write_bytes((root / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())
    done = subprocess.run(["nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "nn"), "-d", "903", "-c", "3d_fullres",
                           "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    from segforge.cli.main import main
    from segforge.io.image import read_image

    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "sf"), "--model", str(model)]) == 0
    for case in ("case_0004", "case_0005"):
        theirs, their_geometry = read_image(tmp_path / "nn" / f"{case}.nii.gz")
        ours, our_geometry = read_image(tmp_path / "sf" / f"{case}.nii.gz")
        assert ours.shape == theirs.shape and our_geometry.same_grid(their_geometry, tol=1e-6) == []
        assert (ours == theirs).mean() >= 0.999, (case, (ours == theirs).mean())
