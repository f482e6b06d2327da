"""Portable models: export then import on a clean folder predicts identically; a tampered archive is refused."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from segforge.cli.main import main
from segforge.io.image import read_image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import write_dataset

    base = tmp_path_factory.mktemp("archive")
    dataset = write_dataset(base / "Dataset001_Tiny")
    work = base / "work"
    assert main(["plan", str(dataset), f"paths.work_root={work}", "plan.features_base=4",
                 "plan.configurations=[3d_fullres]"]) == 0
    assert main(["train", str(dataset), f"paths.work_root={work}", "optim=adamw_cosine", "trainer.max_epochs=2",
                 "data.iterations_per_epoch=4", "data.val_iterations=1", "trainer.accelerator=cpu",
                 "callbacks.progress_plot=false", "logger.tensorboard=false"]) == 0
    return dataset, work / dataset.name / "results" / "segment" / "3d_fullres"


def test_export_then_import_predicts_identically(trained, tmp_path):
    dataset, model = trained
    archive = tmp_path / "model.zip"
    assert main(["export-model", str(model), str(archive)]) == 0
    assert main(["export-model", str(model), str(archive)]) == 2  # never overwritten
    copy = tmp_path / "elsewhere" / "imported"
    assert main(["import-model", str(archive), str(copy)]) == 0
    assert main(["import-model", str(archive), str(copy)]) == 2
    names = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file())
    assert "fold_0/model_final.pt" in names and "plans.json" in names and "fold_0/checkpoints/last.ckpt" not in names
    for source, out in ((model, tmp_path / "a"), (copy, tmp_path / "b")):
        assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(out), "--model", str(source)]) == 0
    for mask in sorted((tmp_path / "a").glob("*.nii.gz")):
        np.testing.assert_array_equal(read_image(mask)[0], read_image(tmp_path / "b" / mask.name)[0])


def rewrite(archive: Path, out: Path, change) -> Path:
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = change(info.filename, src.read(info.filename))
            if data is not None:
                dst.writestr(info.filename, data)
    return out


@pytest.mark.parametrize("tamper", ["weights", "manifest_only", "extra_member", "traversal"])
def test_a_tampered_archive_is_refused(trained, tmp_path, tamper, capsys):
    _, model = trained
    archive = tmp_path / "model.zip"
    assert main(["export-model", str(model), str(archive)]) == 0
    bad = tmp_path / "bad.zip"
    if tamper == "weights":
        rewrite(archive, bad, lambda n, d: d[:-10] + b"0123456789" if n.endswith("model_final.pt") else d)
    elif tamper == "manifest_only":  # a changed plan with a manifest that was not updated
        rewrite(archive, bad, lambda n, d: d.replace(b'"patch_size"', b'"patch_sizE"') if n == "plans.json" else d)
    else:
        name = "fold_0/extra.py" if tamper == "extra_member" else "../../escape.txt"
        rewrite(archive, bad, lambda n, d: d)
        with zipfile.ZipFile(bad, "a") as zf:
            zf.writestr(name, b"import os")
    target = tmp_path / "imported"
    assert main(["import-model", str(bad), str(target)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not target.exists() and not (tmp_path / "escape.txt").exists()
    assert not list(tmp_path.glob(".tmp-*"))
