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
                 "callbacks.epoch_progress.plot_path=null", "logger.tensorboard=null"]) == 0
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


def fake_archive(path: Path, members: dict, manifest=None, compression=zipfile.ZIP_DEFLATED) -> Path:
    """A zip laid out like export-model's, with ``members`` (name: bytes) and their manifest (or ``manifest``)."""
    import hashlib
    import json

    files = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in members.items()}
    if manifest is None:
        manifest = {"kind": "model_archive", "schema_version": 1, "files": files}
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("manifest.json", json.dumps(manifest))
    return path


BASIC = {"plans.json": b"{}", "fold_0/model_final.pt": b"weights"}


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path, capsys):
    archive = fake_archive(tmp_path / "bomb.zip", {**BASIC, "fold_0/config.yaml": bytes(8 * 2**20)})
    assert archive.stat().st_size < 2**17
    dest = tmp_path / "dest"
    assert main(["import-model", str(archive), str(dest)]) == 2
    err = capsys.readouterr().err
    assert "refused (a zip bomb?)" in err and "max_bytes=" in err and "Traceback" not in err
    assert not dest.exists() and [p.name for p in tmp_path.iterdir()] == ["bomb.zip"]


def test_a_manifest_bomb_is_refused_before_it_is_read(tmp_path, capsys, monkeypatch):
    """The manifest is read whole, so its own unpacked size is checked first (17 MiB of spaces: a few KB zipped)."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", b'{"kind": "model_archive"' + b" " * (17 * 2**20) + b"}")
    assert archive.stat().st_size < 2**16
    read = []
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, *a, **k: read.append(a) or b"")
    assert main(["import-model", str(archive), str(tmp_path / "dest")]) == 2
    err = capsys.readouterr().err
    assert "manifest.json unpacks to 17825817 bytes" in err and "refused" in err and "Traceback" not in err
    assert not read and not (tmp_path / "dest").exists()


def test_members_are_streamed_not_read_whole(tmp_path):
    import tracemalloc

    from segforge.io.model_archive import import_model

    size = 16 * 2**20
    archive = fake_archive(tmp_path / "big.zip", {**BASIC, "fold_0/config.yaml": bytes(size)})
    tracemalloc.start()
    try:
        import_model(archive, tmp_path / "dest", max_expansion=20, max_bytes=2 * size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (tmp_path / "dest" / "fold_0" / "config.yaml").stat().st_size == size
    assert peak < size / 4  # never the member whole in memory (it was read twice: 2 x size)


def test_import_checks_free_space_first(tmp_path, monkeypatch, capsys):
    import shutil as shutil_module

    from segforge.io import storage

    archive = fake_archive(tmp_path / "m.zip", BASIC)
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda _: usage._replace(free=3))
    assert main(["import-model", str(archive), str(tmp_path / "dest")]) == 3
    assert "needs about" in capsys.readouterr().err and not (tmp_path / "dest").exists()


@pytest.mark.parametrize("case", ["file_shadows_folder", "long_name", "manifest_list", "bytes_not_a_number",
                                  "files_not_a_dict", "dot_segment"])
def test_a_malformed_archive_is_refused_in_words(tmp_path, case, capsys):
    members, manifest = dict(BASIC), None
    if case == "file_shadows_folder":
        members["fold_0/validation"] = b"a file where a folder must be"
        members["fold_0/validation/summary.json"] = b"{}"
    elif case == "long_name":
        members["fold_0/" + "x" * 300] = b"long"
    elif case == "manifest_list":
        manifest = ["plans.json"]
    elif case == "bytes_not_a_number":
        manifest = {"kind": "model_archive", "schema_version": 1,
                    "files": {name: {"sha256": "0" * 64, "bytes": "many"} for name in members}}
    elif case == "files_not_a_dict":
        manifest = {"kind": "model_archive", "schema_version": 1, "files": list(members)}
    elif case == "dot_segment":
        members["fold_0/./config.yaml"] = b"x"
    archive = fake_archive(tmp_path / "bad.zip", members, manifest)
    dest = tmp_path / "dest"
    assert main(["import-model", str(archive), str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segforge import-model: error: {archive}: ") and ("refused" in err or "not a segforge" in err)
    assert "Traceback" not in err and not dest.exists() and len(list(tmp_path.iterdir())) == 1


def tampered_archive(path: Path, case: str) -> tuple[Path, str]:
    """An archive laid out like export-model's, changed as ``case`` says; the member the refusal must name."""
    import hashlib
    import json

    members = dict(BASIC)
    files = {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in members.items()}
    extra: list[tuple[zipfile.ZipInfo | str, bytes]] = []
    named = "fold_0/model_final.pt"
    if case == "missing_member":
        del members[named]
    elif case == "size_mismatch":
        files[named]["bytes"] += 1
    elif case == "oversized_declared":
        files[named]["bytes"] = 2**40
        named = str(2**40 + len(BASIC["plans.json"]))  # the refusal names the total the manifest declares
    elif case == "symlink_member":
        link = zipfile.ZipInfo(named)
        link.external_attr = (0o120777 << 16)
        extra.append((link, b"/etc/passwd"))
        files[named] = {"sha256": hashlib.sha256(b"/etc/passwd").hexdigest(), "bytes": len(b"/etc/passwd")}
        del members[named]
    elif case in ("absolute_name", "backslash_name"):
        named = "/tmp/evil.pt" if case == "absolute_name" else "fold_0\\..\\..\\evil.pt"
        members[named] = b"x"
        files[named] = {"sha256": hashlib.sha256(b"x").hexdigest(), "bytes": 1}
    elif case == "duplicate_name":
        extra.append((named, b"other weights"))
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for info, data in extra:
            with pytest.warns(UserWarning) if case == "duplicate_name" else __import__("contextlib").nullcontext():
                zf.writestr(info, data)
        zf.writestr("manifest.json", json.dumps({"kind": "model_archive", "schema_version": 1, "files": files}))
    return path, named


@pytest.mark.parametrize("case", ["missing_member", "size_mismatch", "symlink_member", "absolute_name", "backslash_name",
                                  "duplicate_name", "oversized_declared"])
def test_a_tampered_member_is_refused_naming_it(tmp_path, case, capsys):
    archive, named = tampered_archive(tmp_path / "bad.zip", case)
    dest = tmp_path / "dest"
    assert main(["import-model", str(archive), str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segforge import-model: error: {archive}: ") and "refused" in err, err
    assert named in err or repr(named) in err, err  # a list of names is shown as Python writes it
    assert "Traceback" not in err and not dest.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


@pytest.mark.parametrize("damage", ["no_state_dict", "unknown_configuration", "features_changed", "not_a_dict"])
def test_predict_refuses_an_inconsistent_weights_file_in_words(trained, tmp_path, damage, capsys):
    import shutil

    import torch

    dataset, model = trained
    copy = tmp_path / "model"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("checkpoints"))
    weights = copy / "fold_0" / "model_final.pt"
    payload = torch.load(weights, weights_only=True)
    if damage == "no_state_dict":
        del payload["state_dict"]
    elif damage == "unknown_configuration":
        payload["configuration"] = "3d_lowres"
    elif damage == "features_changed":
        payload["network"] = {**payload["network"],
                              "features_per_stage": [2 * f for f in payload["network"]["features_per_stage"]]}
    else:
        payload = {"kind": "model_weights", "schema_version": 1, "network": [1, 2]}
    torch.save(payload, weights)
    out = tmp_path / "out"
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(out), "--model", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segforge predict: error: {weights}: ") and "Fix: re-run training or re-copy" in err
    assert "Traceback" not in err and not list(out.glob("*.nii.gz"))


@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_resume_from_an_unreadable_last_ckpt_is_refused_before_any_work(trained, tmp_path, damage, capsys):
    """(Here for the trained fixture: a resumable run folder without training another.)"""
    import pickle
    import shutil

    from conftest import tree_hash

    dataset, model = trained
    work = tmp_path / "work"
    shutil.copytree(model.parents[3], work)
    last = work / dataset.name / "results" / "segment" / "3d_fullres" / "fold_0" / "checkpoints" / "last.ckpt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        last.write_bytes(pickle.dumps({"state_dict": {}, "loops": object.__new__(zipfile.ZipInfo)}))
    before = tree_hash(work)
    assert main(["train", str(dataset), f"paths.work_root={work}", "optim=adamw_cosine", "trainer.max_epochs=3",
                 "data.iterations_per_epoch=4", "data.val_iterations=1", "trainer.accelerator=cpu",
                 "callbacks.epoch_progress.plot_path=null", "logger.tensorboard=null"]) == 2
    err = capsys.readouterr().err
    assert f"segforge train: error: {last}: cannot be read as a checkpoint" in err and "Traceback" not in err
    assert "best.ckpt" in err and "nothing was run" in err
    assert tree_hash(work) == before


def test_import_flushes_every_member_and_folder_and_honours_the_umask(tmp_path, monkeypatch):
    import os

    from segforge.io.model_archive import import_model

    archive = fake_archive(tmp_path / "m.zip", {**BASIC, "fold_0/validation/summary.json": b"{}"})
    synced, real_fsync = set(), os.fsync

    def recording_fsync(fd):
        info = os.fstat(fd)
        synced.add((info.st_dev, info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    previous = os.umask(0o027)
    try:
        dest = import_model(archive, tmp_path / "models" / "dest", max_expansion=20)
    finally:
        os.umask(previous)
    paths = [dest.parent, dest, *dest.rglob("*")]
    assert [str(p) for p in paths if (p.stat().st_dev, p.stat().st_ino) not in synced] == []
    assert {p.stat().st_mode & 0o777 for p in dest.rglob("*") if p.is_file()} == {0o640}
