"""Named plans (issue 19): `segforge plan DATASET plan.name=NAME` writes plans_<name>.json beside the others; plans that
agree on the preprocessed data share one folder (keyed by each configuration's data_identifier); train, preprocess
and select address a plan by name; a work folder from before named plans (one plans.json) keeps working as plan
default."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from conftest import write_dataset
from segforge.cli.main import main
from segforge.errors import SegforgeError
from segforge.workspace import Workspace, check_plans_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLAN = ["plan.configurations=[3d_fullres]", "plan.features_base=4", "plan.features_max_3d=16", "plan.memory.method=analytic",
        "preprocess.num_workers=1"]
TINY_TRAIN = ["trainer.accelerator=cpu", "trainer.max_epochs=1", "data.iterations_per_epoch=2", "data.val_iterations=1",
              "data.num_workers=0", "num_folds=2", "final_validation.mirror=false",
              "final_validation.save_probabilities=true"]


def roots(work: Path) -> list[str]:
    return [f"paths.work_root={work}", f"paths.preprocessed_root={work / 'pre'}", f"paths.results_root={work / 'res'}"]


def case_files(folder: Path) -> dict[str, int]:
    """Each preprocessed case file and its modification time (ns): a rewrite changes it."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("case*"))}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """One dataset planned three times: default, a plan for a bigger card (same data), a coarser spacing (new data)."""
    base = tmp_path_factory.mktemp("named")
    dataset = write_dataset(base / "Dataset001_Tiny", num_train=4, num_test=1)
    work = base / "work"
    ws = Workspace(dataset.name, work / dataset.name, work / "pre" / dataset.name / "preprocessed",
                   work / "res" / dataset.name / "results")
    assert main(["plan", str(dataset), *roots(work), *PLAN]) == 0
    default = json.loads(ws.new_plans_path("default").read_text())
    folder = ws.preprocessed(default["configurations"]["3d_fullres"]["data_identifier"])
    before = case_files(folder)
    assert main(["plan", str(dataset), *roots(work), *PLAN, "plan.name=card24", "plan.gpu_memory_gb=24"]) == 0
    after_same = case_files(folder)
    assert main(["plan", str(dataset), *roots(work), *PLAN, "plan.name=coarse", "plan.target_spacing=[3.0,1.8,1.8]"]) == 0
    return {"dataset": dataset, "work": work, "ws": ws, "folder": folder, "before": before, "after_same": after_same}


@pytest.fixture(scope="module")
def trained(planned):
    """Plan default and plan coarse, each one tiny fold with its validation probabilities (for select's ensembles)."""
    dataset, work = planned["dataset"], planned["work"]
    assert main(["train", str(dataset), *roots(work), *TINY_TRAIN]) == 0
    assert main(["train", str(dataset), *roots(work), *TINY_TRAIN, "plans=coarse"]) == 0
    return planned


def test_each_name_writes_its_own_plans_file(planned):
    ws = planned["ws"]
    assert sorted(p.name for p in ws.work_dir.glob("plans*.json")) == \
        ["plans_card24.json", "plans_coarse.json", "plans_default.json"]
    assert not ws.legacy_plans_path.exists()
    names = {n: json.loads(ws.new_plans_path(n).read_text())["plans_name"] for n in ("default", "card24", "coarse")}
    assert names == {"default": "default", "card24": "card24", "coarse": "coarse"}
    assert json.loads(ws.new_plans_path("card24").read_text())["rules"]["gpu_memory_gb"] == 24
    assert (ws.work_dir / "plan_config.yaml").is_file() and (ws.work_dir / "plan_coarse_config.yaml").is_file()
    assert ws.plans_names() == ["card24", "coarse", "default"]


def test_plans_that_agree_on_the_data_share_one_preprocessed_folder(planned):
    ws = planned["ws"]
    identifiers = {n: json.loads(ws.new_plans_path(n).read_text())["configurations"]["3d_fullres"]["data_identifier"]
                   for n in ("default", "card24", "coarse")}
    assert identifiers["default"] == identifiers["card24"] != identifiers["coarse"]
    assert all(i.startswith("3d_fullres_") for i in identifiers.values())
    # the second plan preprocessed nothing: every case file is the one the first plan wrote
    assert len(planned["before"]) == 4 * 4 and planned["after_same"] == planned["before"]
    assert case_files(planned["folder"]) == planned["before"]  # nor did the coarse plan touch it
    assert sorted(p.name for p in ws.preprocessed_dir.iterdir()) == sorted({identifiers["default"], identifiers["coarse"]})
    coarse = json.loads((ws.preprocessed(identifiers["coarse"]) / "case000.json").read_text())
    fine = json.loads((planned["folder"] / "case000.json").read_text())
    assert coarse["shape_after_resampling"][1] < fine["shape_after_resampling"][1]


def test_preprocess_of_a_named_plan_rewrites_nothing_another_has(planned, capsys):
    assert main(["preprocess", str(planned["dataset"]), *roots(planned["work"]), "preprocess.num_workers=1", "plans=card24"]) == 0
    assert "0 done, 4 up to date" in capsys.readouterr().out
    assert case_files(planned["folder"]) == planned["before"]


def test_a_hand_edit_that_changes_the_data_gets_its_own_folder_not_the_shared_one(planned, tmp_path, caplog):
    work = tmp_path / "work"
    shutil.copytree(planned["work"], work)
    path = work / planned["dataset"].name / "plans_card24.json"
    plans = json.loads(path.read_text())
    shared = plans["configurations"]["3d_fullres"]["data_identifier"]
    plans["configurations"]["3d_fullres"]["target_spacing"] = [3.0, 2.7, 2.7]
    path.write_text(json.dumps(plans))
    before = case_files(work / "pre" / planned["dataset"].name / "preprocessed" / shared)
    with caplog.at_level(logging.WARNING, logger="segforge"):
        assert main(["preprocess", str(planned["dataset"]), *roots(work), "preprocess.num_workers=1", "plans=card24"]) == 0
    assert f"records data_identifier {shared}" in caplog.text and str(path) in caplog.text
    folders = sorted(p.name for p in (work / "pre" / planned["dataset"].name / "preprocessed").iterdir())
    assert len(folders) == 3 and shared in folders
    assert case_files(work / "pre" / planned["dataset"].name / "preprocessed" / shared) == before


def test_a_missing_plan_and_a_bad_name_are_refused_with_the_fix(planned, capsys):
    dataset, work = planned["dataset"], planned["work"]
    assert main(["preprocess", str(dataset), *roots(work), "plans=nope"]) == 2
    err = capsys.readouterr().err
    assert f"segforge plan {dataset} plan.name=nope" in err and "card24, coarse, default" in err
    assert main(["train", str(dataset), *roots(work), *TINY_TRAIN, "plans=nope"]) == 2
    assert "plan.name=nope" in capsys.readouterr().err
    assert main(["plan", str(dataset), *roots(work), *PLAN, "plan.name=a/b"]) == 2
    assert "plan.name=a/b" in capsys.readouterr().err
    with pytest.raises(SegforgeError):
        check_plans_name("..")


def test_train_puts_each_plan_in_its_own_model_folder(trained):
    segment = trained["ws"].results_dir / "segment"
    assert sorted(p.name for p in segment.iterdir()) == ["3d_fullres", "3d_fullres__coarse"]
    assert json.loads((segment / "3d_fullres" / "plans.json").read_text())["plans_name"] == "default"
    coarse = json.loads((segment / "3d_fullres__coarse" / "plans.json").read_text())
    assert coarse["plans_name"] == "coarse" and coarse["configurations"]["3d_fullres"]["target_spacing"] == [3.0, 1.8, 1.8]
    config = (segment / "3d_fullres__coarse" / "fold_0" / "config.yaml").read_text()
    assert "plans: coarse" in config


def test_predict_with_a_named_plans_model_folder(trained, tmp_path, caplog):
    dataset, model = trained["dataset"], trained["ws"].results_dir / "segment" / "3d_fullres__coarse"
    with caplog.at_level(logging.INFO, logger="segforge"):
        assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "out"), "--model", str(model),
                     "predict.mirror=false"]) == 0
    assert (tmp_path / "out" / "case004.nii.gz").is_file()
    assert "configuration 3d_fullres of plans coarse" in caplog.text


def test_predict_picks_a_plans_model_folder_by_configuration_and_plans(trained, tmp_path, caplog, capsys):
    """nnU-Net's `-c 3d_fullres -p PLANS`: the task folder with configuration= and plans= is that plan's model."""
    dataset, segment = trained["dataset"], trained["ws"].results_dir / "segment"
    images = str(dataset / "imagesTs")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segforge"):
        assert main(["predict", "-i", images, "-o", str(tmp_path / "coarse"), "--model", str(segment),
                     "configuration=3d_fullres", "plans=coarse", "predict.mirror=false"]) == 0
    assert "configuration 3d_fullres of plans coarse" in caplog.text and (tmp_path / "coarse" / "case004.nii.gz").is_file()
    with caplog.at_level(logging.INFO, logger="segforge"):  # no plans=: plan default's folder
        assert main(["predict", "-i", images, "-o", str(tmp_path / "default"), "--model", str(segment),
                     "configuration=3d_fullres", "predict.mirror=false"]) == 0
    assert "configuration 3d_fullres of plans default" in caplog.text
    capsys.readouterr()
    # a plan with no trained model there, and a model folder of another plan than the one asked for: refused
    assert main(["predict", "-i", images, "-o", str(tmp_path / "none"), "--model", str(segment),
                 "configuration=3d_fullres", "plans=card24"]) == 2
    err = capsys.readouterr().err
    assert "3d_fullres__card24/" in err and "3d_fullres, 3d_fullres__coarse" in err and "plans=card24" in err
    assert main(["predict", "-i", images, "-o", str(tmp_path / "other"), "--model", str(segment / "3d_fullres"),
                 "plans=coarse"]) == 2
    assert "trained from plans default, not plans=coarse" in capsys.readouterr().err
    assert main(["predict", "-i", images, "-o", str(tmp_path / "wrong"), "--model", str(segment / "3d_fullres"),
                 "configuration=2d"]) == 2
    assert "a model of configuration 3d_fullres, not configuration=2d" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("none", "other", "wrong"))


def test_a_renamed_model_folder_keeps_its_configuration_and_plan(trained, tmp_path):
    """`import-model model.zip DEST` may name the folder anything: its identity comes from what it holds."""
    import shutil

    import torch

    from segforge.evaluation.selection import model_identity

    renamed = tmp_path / "segment" / "my_model"
    shutil.copytree(trained["ws"].results_dir / "segment" / "3d_fullres__coarse", renamed)
    assert model_identity(renamed) == {"configuration": "3d_fullres", "plans": "coarse"}
    weights = renamed / "fold_0" / "model_final.pt"
    payload = torch.load(weights, weights_only=True)
    torch.save({**payload, "configuration": ["3d_fullres"]}, weights)  # data of any type: the folder's name
    assert model_identity(renamed) == {"configuration": "my_model", "plans": "coarse"}
    weights.write_bytes(b"broken")  # unreadable: the folder's name, no crash
    assert model_identity(renamed) == {"configuration": "my_model", "plans": "coarse"}


def test_select_compares_and_ensembles_across_plans(trained, capsys):
    segment = trained["ws"].results_dir / "segment"
    assert main(["select", str(segment), *roots(trained["work"])]) == 0
    out = capsys.readouterr().out
    selection = json.loads((segment / "selection.json").read_text())
    assert set(selection["cross_validation_dice"]) == {"3d_fullres", "3d_fullres__coarse", "3d_fullres+3d_fullres__coarse"}
    assert selection["configurations"]["3d_fullres__coarse"]["plans"] == "coarse"
    assert selection["configurations"]["3d_fullres"]["configuration"] == "3d_fullres"
    assert selection["candidates"]["3d_fullres+3d_fullres__coarse"] == \
        "3d_fullres (plans default) + 3d_fullres (plans coarse)"
    assert "3d_fullres (plans coarse)" in out and "3d_fullres (plans default)" in out
    assert main(["select", str(segment), *roots(trained["work"]), "plans=coarse", "postprocessing=false"]) == 0
    only = json.loads((segment / "selection.json").read_text())
    assert set(only["cross_validation_dice"]) == {"3d_fullres__coarse"}


def test_a_work_folder_from_before_named_plans_keeps_working(planned, tmp_path, caplog, capsys):
    """Only plans.json, without data identifiers: read as plan default, preprocessed into preprocessed/3d_fullres,
    trained into results/segment/3d_fullres; the next `segforge plan` keeps it as a dated copy."""
    dataset, work = planned["dataset"], tmp_path / "work"
    source = planned["ws"]
    ws = Workspace(dataset.name, work / dataset.name, work / "pre" / dataset.name / "preprocessed",
                   work / "res" / dataset.name / "results")
    ws.work_dir.mkdir(parents=True)
    shutil.copy(source.fingerprint_path, ws.fingerprint_path)
    legacy = json.loads(source.new_plans_path("default").read_text())
    del legacy["plans_name"]
    for conf in legacy["configurations"].values():
        del conf["data_identifier"]
    ws.legacy_plans_path.write_text(json.dumps(legacy, indent=2))
    with caplog.at_level(logging.INFO, logger="segforge"):
        assert main(["preprocess", str(dataset), *roots(work), "preprocess.num_workers=1"]) == 0
        assert main(["train", str(dataset), *roots(work), *TINY_TRAIN, "final_validation.enabled=false"]) == 0
    assert caplog.text.count("read as plan default") == 1
    assert sorted(p.name for p in ws.preprocessed_dir.iterdir()) == ["3d_fullres"]
    model = ws.results_dir / "segment" / "3d_fullres"
    assert json.loads((model / "plans.json").read_text()) == legacy  # the copy: read as plan default
    assert "plans default" in main_select_description(model)
    capsys.readouterr()
    assert main(["plan", str(dataset), *roots(work), *PLAN, "preprocess.run=false"]) == 0
    assert not ws.legacy_plans_path.exists() and ws.new_plans_path("default").is_file()
    kept = list(ws.work_dir.glob("plans.previous-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == legacy


def main_select_description(model: Path) -> str:
    from segforge.evaluation.selection import describe, model_identity

    return describe(model.name, {model.name: model_identity(model)})


def test_work_folder_kinds_see_named_plans(planned, capsys):
    from segforge.cli.folder_kinds import folder_kind

    assert folder_kind(planned["ws"].work_dir) == "work"
    legacy = planned["ws"].work_dir.parent / "old"
    legacy.mkdir()
    (legacy / "plans.json").write_text("{}")
    assert folder_kind(legacy) == "work"


def test_predict_given_a_work_folder_names_its_model_folders_of_every_plan(tmp_path, capsys):
    work = tmp_path / "work" / "Dataset001_X"
    work.mkdir(parents=True)
    (work / "plans_big.json").write_text("{}")
    for name in ("3d_fullres", "3d_fullres__big"):
        (work / "results" / "segment" / name / "fold_0").mkdir(parents=True)
        (work / "results" / "segment" / name / "plans.json").write_text("{}")
        (work / "results" / "segment" / name / "fold_0" / "model_final.pt").write_bytes(b"")
    assert main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--model", str(work)]) == 2
    err = capsys.readouterr().err
    assert "work folder" in err and str(work / "results" / "segment" / "3d_fullres__big") in err


def test_report_of_a_fold_names_its_plan(trained, tmp_path):
    fold = trained["ws"].results_dir / "segment" / "3d_fullres__coarse" / "fold_0"
    out = tmp_path / "report.html"
    assert main(["report", str(fold), "-o", str(out), "max_cases=1"]) == 0
    assert "model: 3d_fullres of plans coarse" in out.read_text()


def test_a_kept_copy_of_a_replanned_plan_is_not_a_plan(tmp_path):
    """Re-planning keeps the old file as plans_<name>.previous-<date>.json: no plan of that name is listed or taken."""
    from segforge.errors import SegforgeError
    from segforge.workspace import Workspace, check_plans_name

    work = tmp_path / "work" / "Dataset001_X"
    work.mkdir(parents=True)
    for name in ("plans_default.json", "plans_card24.json", "plans_card24.previous-20261203-101500.json"):
        (work / name).write_text("{}")
    workspace = Workspace("Dataset001_X", work, tmp_path / "pre", tmp_path / "res")
    assert workspace.plans_names() == ["card24", "default"]
    with pytest.raises(SegforgeError, match="previous"):
        check_plans_name("card24.previous-20261203-101500", "plans")
