"""segforge.io.artifacts: stamped JSON round trips, refusal of foreign/outdated/broken artifacts, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import segforge
from segforge.errors import ArtifactError, SegforgeError
from segforge.io.artifacts import (
    PRODUCED_BY,
    SCHEMA_VERSIONS,
    atomic_write_text,
    check_header,
    read_json,
    save_npy_atomic,
    stamp,
    write_json,
)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp"))


def test_every_kind_has_a_producing_command():
    assert set(PRODUCED_BY) == set(SCHEMA_VERSIONS)


@pytest.mark.parametrize("kind", sorted(SCHEMA_VERSIONS))
def test_write_read_round_trip_with_stamp(tmp_path, kind):
    path = tmp_path / "sub" / "a.json"
    payload = {"numbers": [1, 2.5], "nested": {"x": "y"}, "flag": True, "none": None}
    write_json(path, payload, kind=kind)
    raw = json.loads(path.read_text())
    assert raw["kind"] == kind
    assert raw["schema_version"] == SCHEMA_VERSIONS[kind]
    assert raw["segforge_version"] == segforge.__version__
    data = read_json(path, kind)
    assert {k: data[k] for k in payload} == payload
    assert data == raw


def test_unstamped_round_trip_and_numpy_values(tmp_path):
    path = tmp_path / "plain.json"
    write_json(path, {"i": np.int64(3), "f": np.float32(0.5), "a": np.arange(3), "p": Path("x/y")})
    data = read_json(path)
    assert data == {"i": 3, "f": 0.5, "a": [0, 1, 2], "p": "x/y"}
    assert "kind" not in data
    assert path.read_text().endswith("\n")


def test_unserialisable_value_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "a.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_stamp_puts_header_first():
    data = stamp("plans", {"a": 1})
    assert list(data)[:3] == ["kind", "schema_version", "segforge_version"]
    assert data["a"] == 1


def test_wrong_kind_is_refused(tmp_path):
    path = tmp_path / "fingerprint.json"
    write_json(path, {"a": 1}, kind="fingerprint")
    with pytest.raises(ArtifactError) as info:
        read_json(path, "plans")
    message = str(info.value)
    assert str(path) in message
    assert PRODUCED_BY["plans"] in message


def test_unstamped_file_is_refused_when_a_kind_is_asked(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"a": 1})
    with pytest.raises(ArtifactError):
        read_json(path, "plans")
    path.write_text("[1, 2, 3]")
    with pytest.raises(ArtifactError):
        read_json(path, "plans")


@pytest.mark.parametrize("kind", sorted(SCHEMA_VERSIONS))
@pytest.mark.parametrize("delta", [1, -1])
def test_other_schema_version_is_refused(tmp_path, kind, delta):
    path = tmp_path / f"{kind}.json"
    data = stamp(kind, {"a": 1})
    data["schema_version"] = SCHEMA_VERSIONS[kind] + delta
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError) as info:
        read_json(path, kind)
    message = str(info.value)
    assert str(path) in message
    assert PRODUCED_BY[kind] in message


def test_missing_schema_version_is_refused(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"kind": "plans", "a": 1}))
    with pytest.raises(ArtifactError, match="segforge plan DATASET"):
        read_json(path, "plans")


@pytest.mark.parametrize("kind", [None, "plans"])
def test_missing_file_is_refused(tmp_path, kind):
    path = tmp_path / "absent.json"
    with pytest.raises(ArtifactError) as info:
        read_json(path, kind)
    assert str(path) in str(info.value)
    if kind:
        assert PRODUCED_BY[kind] in str(info.value)


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"kind": "plans",', b"\xff\xfe\x00garbage"])
def test_invalid_json_is_refused(tmp_path, content):
    path = tmp_path / "plans.json"
    path.write_bytes(content)
    with pytest.raises(ArtifactError) as info:
        read_json(path, "plans")
    assert str(path) in str(info.value)
    assert PRODUCED_BY["plans"] in str(info.value)


def test_artifact_error_is_a_user_error():
    assert issubclass(ArtifactError, SegforgeError)


def test_check_header():
    check_header(stamp("model_weights", {}), "model_weights", "w.pt")
    with pytest.raises(ArtifactError, match="w.pt"):
        check_header(stamp("plans", {}), "model_weights", "w.pt")
    old = stamp("model_weights", {})
    old["schema_version"] = 0
    with pytest.raises(ArtifactError, match="segforge train DATASET"):
        check_header(old, "model_weights", "w.pt")


def test_atomic_write_text_leaves_no_temp_file(tmp_path):
    path = tmp_path / "deep" / "dir" / "note.txt"
    atomic_write_text(path, "hello ünïcode\n")
    assert path.read_text(encoding="utf-8") == "hello ünïcode\n"
    assert os.listdir(path.parent) == ["note.txt"]
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["note.txt"]


def _broken_replace(src, dst, *args, **kwargs):
    raise OSError("power cut during rename")


def test_interrupted_write_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "plans.json"
    write_json(path, {"version": "old"}, kind="plans")
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", _broken_replace)
    with pytest.raises(OSError, match="power cut"):
        atomic_write_text(path, "new content that must not appear")
    with pytest.raises(OSError):
        write_json(path, {"version": "new"}, kind="plans")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert read_json(path, "plans")["version"] == "old"
    assert leftovers(tmp_path) == []
    assert os.listdir(tmp_path) == ["plans.json"]


def test_interrupted_first_write_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "a.txt", "x")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.arange(24, dtype=np.int16).reshape(2, 3, 4).transpose(2, 0, 1),  # not C-contiguous
    np.zeros((0, 4), np.int32),
    np.array([True, False]),
])
def test_save_npy_atomic_is_mmappable_without_pickle(tmp_path, array):
    path = tmp_path / "sub" / "case.npy"
    save_npy_atomic(path, array)
    loaded = np.load(path, allow_pickle=False, mmap_mode="r")
    assert loaded.dtype == array.dtype
    assert loaded.shape == array.shape
    np.testing.assert_array_equal(np.asarray(loaded), array)
    assert os.listdir(path.parent) == ["case.npy"]


def test_save_npy_atomic_refuses_object_arrays(tmp_path):
    with pytest.raises(ValueError):
        save_npy_atomic(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    assert os.listdir(tmp_path) == []


def test_save_npy_atomic_interrupted_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "case.npy"
    save_npy_atomic(path, np.ones(3))
    monkeypatch.setattr(os, "replace", _broken_replace)
    with pytest.raises(OSError):
        save_npy_atomic(path, np.zeros(5))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), np.ones(3))
    assert os.listdir(tmp_path) == ["case.npy"]


def _write_with(writer: str, path: Path) -> None:
    import torch

    from segforge.io.artifacts import save_npy_atomic, write_json
    from segforge.io.image import Geometry, write_image
    from segforge.training.callbacks import AtomicCheckpointIO
    from segforge.io.model_folder import write_weights

    if writer == "write_json":
        write_json(path, {"a": 1})
    elif writer == "save_npy_atomic":
        save_npy_atomic(path, np.arange(3))
    elif writer == "write_weights":
        write_weights(path, torch.nn.Linear(2, 2), {}, "3d_fullres", {"patch_size": [2, 2, 2], "dims": 3})
    elif writer == "checkpoint":
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    else:
        write_image(path, np.zeros((2, 3, 4), np.float32), Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                                                                     (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)))


@pytest.mark.parametrize("writer, name", [("write_json", "plans.json"), ("save_npy_atomic", "case.npy"),
                                          ("write_weights", "model_final.pt"), ("checkpoint", "last.ckpt"),
                                          ("write_image", "case.nii.gz")])
def test_every_writer_flushes_file_and_folder_and_honours_the_umask(tmp_path, monkeypatch, writer, name):
    """Durable (a power cut leaves the old file or the whole new one: the file and then its folder entry are
    fsynced) and readable by whom the umask allows (temporary files were created 0600)."""
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = tmp_path / "out" / name
    path.parent.mkdir()
    previous = os.umask(0o027)
    try:
        _write_with(writer, path)
    finally:
        os.umask(previous)
    file_info, folder_info = path.stat(), path.parent.stat()
    assert (file_info.st_dev, file_info.st_ino) in synced, "the file was not fsynced"
    assert (folder_info.st_dev, folder_info.st_ino) in synced, "its folder was not fsynced after the rename"
    assert file_info.st_mode & 0o777 == 0o640
    assert leftovers(path.parent) == []
