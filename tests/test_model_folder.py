"""The model-folder contract (segforge/io/model_folder.py): fold discovery and the default ensemble, the weights
file written and read back, and the one place every reader goes through."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from segforge.errors import SegforgeError
from segforge.io.model_folder import (FINAL_WEIGHTS, build_network, load_network, read_weights, select_folds,
                                      trained_folds, trained_windows, weights_file, write_weights)

KWARGS = {"_target_": "segforge.nn.unet.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
          "features_per_stage": [4, 8], "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
          "conv_per_stage": 1, "norm": "instance", "deep_supervision": False}
PLAN = {"dims": 3, "patch_size": [8, 8, 8], "mirror_axes": [0, 1, 2]}
PLANS = {"configurations": {"3d_fullres": PLAN}}


def folder(tmp_path: Path, folds: list[str], weights: str = FINAL_WEIGHTS) -> Path:
    model = tmp_path / "model"
    for fold in folds:
        (model / f"fold_{fold}").mkdir(parents=True)
        (model / f"fold_{fold}" / weights).write_bytes(b"x")
    (model / "fold_9").mkdir(parents=True, exist_ok=True)  # unfinished: no weights, never chosen
    return model


def names(paths) -> list[str]:
    return [p.name for p in paths]


def test_the_default_ensemble_is_the_numbered_folds_in_numeric_order_without_fold_all(tmp_path, caplog):
    model = folder(tmp_path, ["10", "2", "all", "0"])
    assert names(trained_folds(model)) == ["fold_0", "fold_2", "fold_10", "fold_all"]
    with caplog.at_level(logging.INFO):
        assert names(select_folds(model)) == ["fold_0", "fold_2", "fold_10"]
    assert "predict.folds=[all]" in caplog.text  # says how to get the one left out


def test_fold_all_when_asked_or_when_it_is_the_only_trained_fold(tmp_path):
    model = folder(tmp_path, ["0", "all"])
    assert names(select_folds(model, ["all"])) == ["fold_all"]
    assert names(select_folds(model, [0, "all"])) == ["fold_0", "fold_all"]
    only_all = folder(tmp_path / "b", ["all"])
    assert names(select_folds(only_all)) == ["fold_all"]


def test_no_trained_fold_is_refused_naming_what_there_is(tmp_path):
    model = folder(tmp_path, ["0", "1"])
    with pytest.raises(SegforgeError, match=r"no fold_\*/model_final.pt found for folds \[3\] \(trained: fold_0, fold_1\)"):
        select_folds(model, [3])
    with pytest.raises(SegforgeError, match="no fold_.*Fix: pass the model folder of a finished `segforge train` run"):
        select_folds(tmp_path / "empty")


def test_nnunet_folds_are_found_by_their_checkpoint_name(tmp_path):
    model = folder(tmp_path, ["1", "0", "all"], weights="checkpoint_final.pth")
    assert names(select_folds(model, weights="checkpoint_final.pth")) == ["fold_0", "fold_1"]
    with pytest.raises(SegforgeError):
        select_folds(model)  # no segforge weights there


def test_weights_file_of_a_file_a_fold_and_a_model_folder(tmp_path):
    model = folder(tmp_path, ["all", "1", "0"])
    assert weights_file(model) == model / "fold_0" / FINAL_WEIGHTS
    assert weights_file(model / "fold_1") == model / "fold_1" / FINAL_WEIGHTS
    assert weights_file(model / "fold_all" / FINAL_WEIGHTS) == model / "fold_all" / FINAL_WEIGHTS
    with pytest.raises(SegforgeError, match=r"init_from=.*nothing: no model_final.pt there or in a fold_\* folder"):
        weights_file(tmp_path / "nothing")


def test_weights_written_are_read_back_as_data_with_their_windows(tmp_path):
    network = build_network(KWARGS, "test")
    path = tmp_path / "fold_0" / FINAL_WEIGHTS
    path.parent.mkdir()
    write_weights(path, network, KWARGS, "3d_fullres", PLAN, {"task": "segment"}, patch_size=[8, 8, 16],
                  mirror_axes=[1, 2])
    payload = read_weights(path)
    assert payload["kind"] == "model_weights" and payload["task"] == "segment"
    assert trained_windows(payload, PLANS | {"configurations": {"3d_fullres": {**PLAN, "patch_size": [8, 8, 16]}}},
                           path) == ((8, 8, 16), (1, 2))
    loaded = load_network(payload, PLANS, path)
    for name, tensor in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not list(path.parent.glob(".tmp*"))  # written under a temporary name, then renamed


def test_a_weights_file_that_is_not_segforge_data_is_refused_with_the_given_fix(tmp_path):
    path = tmp_path / FINAL_WEIGHTS
    path.write_bytes(b"not a torch file")
    with pytest.raises(SegforgeError, match="(?s)cannot load weights.*Fix: re-export the source model$"):
        read_weights(path, fix="re-export the source model")
    torch.save({"kind": "plans", "schema_version": 1}, path)
    with pytest.raises(SegforgeError, match="is not a segforge model_weights artifact"):
        read_weights(path)


def test_every_reader_goes_through_the_model_folder_module():
    """One weights loader and one fold discovery: no other module of segforge loads a weights file or looks for
    fold folders."""
    root = Path(__file__).resolve().parents[1] / "segforge"
    allowed = {"io/model_folder.py", "cli/folder_kinds.py"}  # the latter: is this path itself a fold folder (its name)
    offenders = []
    for path in root.rglob("*.py"):
        name = str(path.relative_to(root))
        if name in allowed:
            continue
        text = path.read_text()
        if re.search(r"""glob\(f?["']fold_|startswith\(["']fold_|FINAL_WEIGHTS = |["']model_final\.pt["']""", text):
            offenders.append(name)
    assert offenders == []
