"""The whole path through the real CLI on a tiny dataset: plan, preprocess, train, predict, evaluate.

Pins the contracts: masks carry the input's exact geometry (non-identity direction), the dataset folder is
byte-identical afterwards, the run folder holds the exact config, a 2-rank CPU DDP run writes one run folder,
and a stage refuses an artifact of another schema version, naming the command to re-run.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import data_identifier_of, tree_hash, write_dataset
from segforge.cli.main import main
from segforge.io.artifacts import SCHEMA_VERSIONS
from segforge.io.image import read_image

TINY_TRAIN = ["optim=adamw_cosine", "trainer.max_epochs=8", "data.iterations_per_epoch=12", "data.val_iterations=2", "data.num_workers=0",
              "trainer.accelerator=cpu"]


def roots(work: Path) -> list[str]:
    return [f"paths.work_root={work}", f"paths.preprocessed_root={work / 'pre'}", f"paths.results_root={work / 'res'}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    dataset = write_dataset(base / "Dataset001_Tiny")
    before = tree_hash(dataset)
    work = base / "work"
    assert main(["plan", str(dataset), *roots(work), "plan.features_base=8", "plan.configurations=[3d_fullres]"]) == 0
    assert main(["train", str(dataset), *roots(work), *TINY_TRAIN]) == 0
    model_dir = work / "res" / dataset.name / "results" / "segment" / "3d_fullres"
    return {"base": base, "dataset": dataset, "work": work, "model_dir": model_dir, "hash_before": before}


def test_artifact_layout(trained):
    work, name = trained["work"], trained["dataset"].name
    plans = json.loads((work / name / "plans_default.json").read_text())
    assert plans["kind"] == "plans" and plans["schema_version"] == SCHEMA_VERSIONS["plans"] and "segforge_version" in plans
    assert (work / name / "fingerprint.json").is_file()
    assert (work / name / "plan_config.yaml").is_file()
    assert (work / "pre" / name / "preprocessed" / data_identifier_of(work, name) / "manifest.json").is_file()
    model_dir = trained["model_dir"]
    for item in ("plans.json", "dataset.json", "fold_0/config.yaml", "fold_0/overrides.yaml", "fold_0/model_final.pt",
                 "fold_0/checkpoints/last.ckpt"):
        assert (model_dir / item).is_file(), item
    assert (work / name / "splits.json").is_file()


def test_run_folder_holds_the_exact_config(trained):
    fold = trained["model_dir"] / "fold_0"
    config = yaml.safe_load((fold / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 8 and config["data"]["iterations_per_epoch"] == 12
    overrides = yaml.safe_load((fold / "overrides.yaml").read_text())["overrides"]
    assert "trainer.max_epochs=8" in overrides
    summary = json.loads((fold / "training_summary.json").read_text())
    assert summary["global_step"] == 8 * 12


def test_weights_load_with_weights_only(trained):
    payload = torch.load(trained["model_dir"] / "fold_0" / "model_final.pt", weights_only=True)
    assert payload["kind"] == "model_weights" and payload["network"]["_target_"] == "segforge.nn.unet.UNet"
    torch.load(trained["model_dir"] / "fold_0" / "checkpoints" / "last.ckpt", weights_only=True)


def test_predict_writes_input_geometry_and_learns(trained, tmp_path):
    dataset, out = trained["dataset"], tmp_path / "pred"
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(out), "--model", str(trained["model_dir"])]) == 0
    for image_path in sorted((dataset / "imagesTs").iterdir()):
        case = image_path.name.replace("_0000.nii.gz", "")
        image, image_geo = read_image(image_path)
        mask, mask_geo = read_image(out / f"{case}.nii.gz")
        assert mask.shape == image.shape
        assert mask_geo.same_grid(image_geo, tol=1e-6) == []
        assert set(np.unique(mask)) <= {0, 1, 2}
    assert main(["evaluate", str(out), str(dataset / "labelsTs")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "summary" and summary["num_cases"] == 2
    # 96 steps on an easy dataset: far above what an untrained network scores (~0 for both classes)
    assert summary["foreground_mean_dice"] > 0.6, summary["mean_dice"]
    assert (out / "predict_config.yaml").is_file()
    # one case at a time (predict.overlap=false): the same masks as the overlapped default
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "seq"), "--model",
                 str(trained["model_dir"]), "predict.overlap=false"]) == 0
    assert yaml.safe_load((tmp_path / "seq" / "predict_config.yaml").read_text())["predict"]["overlap"] is False
    for mask_path in sorted(out.glob("*.nii.gz")):
        np.testing.assert_array_equal(read_image(tmp_path / "seq" / mask_path.name)[0], read_image(mask_path)[0])


def test_report_of_the_fold_and_of_its_predictions(trained, tmp_path, capsys):
    dataset, fold = trained["dataset"], trained["model_dir"] / "fold_0"
    assert main(["report", str(fold)]) == 0
    page = (fold / "report.html").read_text()
    assert base64.b64encode((fold / "progress.png").read_bytes()).decode() in page  # the training curves
    validation = json.loads((fold / "validation" / "summary.json").read_text())
    for case in validation["cases"]:  # each validation case drawn on its image, found beside its labelsTr
        assert f'id="case-{case["case"]}"' in page and f"image: {dataset / 'imagesTr' / case['case']}_0000" in page
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(out), "--model", str(trained["model_dir"])]) == 0
    assert main(["evaluate", str(out), str(dataset / "labelsTs")]) == 0
    assert f"segforge report {out}" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert f"image: {dataset / 'imagesTs'}" in (out / "report.html").read_text()  # the -i folder predict read


def test_dataset_folder_is_never_written(trained, tmp_path):
    dataset = trained["dataset"]
    assert main(["check", str(dataset)]) == 0
    assert main(["preprocess", str(dataset), *roots(trained["work"])]) == 0  # up to date: nothing redone
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "p"), "--model", str(trained["model_dir"])]) == 0
    assert tree_hash(dataset) == trained["hash_before"]


def test_work_root_inside_dataset_is_refused(tiny_dataset, capsys):
    before = tree_hash(tiny_dataset)
    assert main(["plan", str(tiny_dataset), f"paths.work_root={tiny_dataset / 'work'}"]) == 2
    assert "never writes" in capsys.readouterr().err
    assert tree_hash(tiny_dataset) == before


def test_other_schema_version_is_refused_with_the_command_to_rerun(trained, tmp_path, capsys):
    model_copy = tmp_path / "model"
    import shutil

    shutil.copytree(trained["model_dir"], model_copy)
    plans = json.loads((model_copy / "plans.json").read_text())
    plans["schema_version"] = 999
    (model_copy / "plans.json").write_text(json.dumps(plans))
    code = main(["predict", "-i", str(trained["dataset"] / "imagesTs"), "-o", str(tmp_path / "out"), "--model", str(model_copy)])
    err = capsys.readouterr().err
    assert code == 2 and "schema version 999" in err and "segforge plan" in err
    assert not (tmp_path / "out").exists()


def test_resume_extends_training(trained):
    dataset, work = trained["dataset"], trained["work"]
    extended = [o.replace("max_epochs=8", "max_epochs=9") for o in TINY_TRAIN]
    assert main(["train", str(dataset), *roots(work), *extended]) == 0
    summary = json.loads((trained["model_dir"] / "fold_0" / "training_summary.json").read_text())
    assert summary["global_step"] == 9 * 12  # continued from step 96, not restarted


def test_ddp_two_cpu_ranks_write_one_run_folder(trained, tmp_path):
    """Lightning re-executes the command line per rank; both ranks must land in one fold folder."""
    dataset, work = trained["dataset"], tmp_path / "ddp"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    assert main(["plan", str(dataset), *roots(work), "plan.features_base=4", "plan.configurations=[3d_fullres]"]) == 0
    cmd = [sys.executable, "-m", "segforge", "train", str(dataset), *roots(work), "trainer.max_epochs=1",
           "data.iterations_per_epoch=3", "data.val_iterations=1", "data.num_workers=0", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.strategy=ddp", "fold=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in result.stderr + result.stdout  # the second rank really ran
    results = work / "res" / dataset.name / "results"
    folds = sorted(p.relative_to(results) for p in results.glob("*/*/fold_*"))
    assert folds == [Path("segment/3d_fullres/fold_1")]
    fold = results / "segment" / "3d_fullres" / "fold_1"
    assert sorted(p.name for p in fold.glob("*.yaml")) == ["config.yaml", "network.yaml", "overrides.yaml"]
    assert json.loads((fold / "training_summary.json").read_text())["global_step"] == 3
    assert not any(p.name in ("lightning_logs", "outputs") for p in tmp_path.iterdir())  # no stray run folders


def test_run_folder_has_best_checkpoint_curves_logs_and_validation(trained):
    fold = trained["model_dir"] / "fold_0"
    best = torch.load(fold / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["segforge_dice_ema"] is not None and 0 < best["segforge_dice_ema"] <= 1
    assert (fold / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (fold / "logs" / "version_0" / "metrics.csv").is_file()
    assert list((fold / "tensorboard").rglob("events.out.tfevents.*"))
    assert not list(fold.rglob(".tmp-*"))  # every write was atomic and finished
    splits = json.loads((trained["work"] / trained["dataset"].name / "splits.json").read_text())
    validation = json.loads((fold / "validation" / "summary.json").read_text())
    assert sorted(c["case"] for c in validation["cases"]) == splits[0]["val"]  # the fold's cases, no other
    assert validation["foreground_mean_dice"] > 0.5 and not validation["missing_predictions"]
    summary = json.loads((fold / "training_summary.json").read_text())
    assert summary["validation_mean_dice"] == validation["foreground_mean_dice"]
    assert summary["data_policy"]["augment_on"] == "device"
