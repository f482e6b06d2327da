"""Portable model folders: ``segforge export-model MODEL_DIR model.zip`` and ``segforge import-model model.zip DEST``.

An archive holds what prediction needs and what says how the model was made: plans.json, dataset.json,
postprocessing.json (if any), and per chosen fold ``model_final.pt`` with its config.yaml, overrides.yaml,
network.yaml, training_summary.json and validation summary; plus ``manifest.json`` with the SHA-256 and size of every
file. Import checks, before anything is written, that every member is listed with its exact hash and size, that
no name is absolute or climbs out of the folder, and that nothing unlisted is there; a tampered archive is refused.
Both directions write under a temporary name and rename, and never overwrite an existing file or folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path, PurePosixPath

from segforge import __version__
from segforge.errors import SegforgeError

MANIFEST = "manifest.json"
TOP_FILES = ("plans.json", "dataset.json", "postprocessing.json")
FOLD_FILES = ("model_final.pt", "config.yaml", "overrides.yaml", "network.yaml", "training_summary.json",
              "validation/summary.json")
MAX_BYTES = 64 * 2**30  # refuse archives claiming more than this (zip bombs)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_model(model_dir: Path, archive: Path, folds: list | None = None) -> dict:
    """Write ``archive`` from ``model_dir``; returns the manifest."""
    model_dir, archive = Path(model_dir), Path(archive)
    if archive.exists():
        raise SegforgeError(f"{archive} exists; segforge does not overwrite it. Fix: choose another name or remove it")
    if not (model_dir / "plans.json").is_file():
        raise SegforgeError(f"{model_dir}: no plans.json. Fix: pass a segforge model folder (it holds plans.json and fold_*/)")
    fold_dirs = sorted(p for p in model_dir.glob("fold_*") if (p / "model_final.pt").is_file())
    if folds is not None:
        fold_dirs = [p for p in fold_dirs if p.name in {f"fold_{f}" for f in folds}]
    if not fold_dirs:
        raise SegforgeError(f"{model_dir}: no trained fold{' among ' + str(list(folds)) if folds else ''} "
                            "(fold_*/model_final.pt). Fix: train it first")
    members = [name for name in TOP_FILES if (model_dir / name).is_file()]
    members += [f"{fold.name}/{name}" for fold in fold_dirs for name in FOLD_FILES if (fold / name).is_file()]
    files = {}
    for name in members:
        data = (model_dir / name).read_bytes()
        files[name] = {"sha256": _sha256(data), "bytes": len(data)}
    manifest = {"kind": "model_archive", "schema_version": 1, "segforge_version": __version__,
                "model": model_dir.name, "folds": [f.name for f in fold_dirs], "files": files}
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{archive.name}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in members:
                zf.write(model_dir / name, name)
            zf.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, archive)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def _safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name and ":" not in name


def verify_archive(archive: Path) -> dict:
    """The manifest of ``archive`` once every member checks out; raises ``SegforgeError`` naming the problem."""
    archive = Path(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SegforgeError(f"{archive}: not a readable zip archive ({exc})") from exc
    with zf:
        infos = {info.filename: info for info in zf.infolist()}
        if MANIFEST not in infos:
            raise SegforgeError(f"{archive}: no {MANIFEST}; not a segforge model archive")
        try:
            manifest = json.loads(zf.read(MANIFEST))
        except ValueError as exc:
            raise SegforgeError(f"{archive}: {MANIFEST} is not valid JSON") from exc
        if manifest.get("kind") != "model_archive" or manifest.get("schema_version") != 1:
            raise SegforgeError(f"{archive}: not a segforge model archive of schema 1")
        listed = manifest.get("files", {})
        unsafe = [n for n in list(infos) + list(listed) if not _safe_name(n) or n.endswith("/")]
        if unsafe:
            raise SegforgeError(f"{archive}: member names that could leave the model folder: {unsafe[:3]}; refused")
        extra = sorted(set(infos) - set(listed) - {MANIFEST})
        missing = sorted(set(listed) - set(infos))
        if extra or missing:
            raise SegforgeError(f"{archive}: members not in the manifest {extra[:3]}, or listed but absent {missing[:3]}; "
                                "refused (tampered or incomplete)")
        if sum(int(v["bytes"]) for v in listed.values()) > MAX_BYTES:
            raise SegforgeError(f"{archive}: claims more than {MAX_BYTES >> 30} GB; refused")
        for name, expected in listed.items():
            info = infos[name]
            if info.file_size != int(expected["bytes"]) or (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise SegforgeError(f"{archive}: {name} is not the file the manifest lists; refused (tampered)")
            if _sha256(zf.read(name)) != expected["sha256"]:
                raise SegforgeError(f"{archive}: {name} does not match its SHA-256 in the manifest; refused (tampered)")
        if not any(n.endswith("/model_final.pt") for n in listed) or "plans.json" not in listed:
            raise SegforgeError(f"{archive}: holds no plans.json or no fold weights")
    return manifest


def import_model(archive: Path, destination: Path) -> Path:
    """Verify ``archive`` and unpack it as the model folder ``destination`` (which must not exist yet)."""
    destination = Path(destination)
    if destination.exists():
        raise SegforgeError(f"{destination} exists; segforge does not overwrite it. Fix: choose a new folder")
    manifest = verify_archive(archive)
    tmp = destination.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{destination.name}")
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in manifest["files"]:
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                data = zf.read(name)
                if _sha256(data) != manifest["files"][name]["sha256"]:  # read again: the file could have changed
                    raise SegforgeError(f"{archive}: {name} changed while it was read; refused")
                target.write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return destination
