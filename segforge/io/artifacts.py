"""Versioned, human-readable artifacts on disk: JSON and YAML written atomically, refused when unreadable.

Every artifact (fingerprint, plans, case properties, summaries, model weights) records ``kind``,
``schema_version`` and ``segforge_version``. A stage that finds an artifact of another schema refuses it and says
which command produces a current one. No pickle anywhere: JSON, YAML, ``.npy`` and ``weights_only`` torch files.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from segforge import __version__
from segforge.errors import ArtifactError
from segforge.io.storage import storage_error

# One schema version per artifact kind; bump when a reader could no longer understand the old layout.
SCHEMA_VERSIONS = {
    "fingerprint": 1,
    "plans": 2,  # 2: network norm/deep_supervision and a traced memory entry per configuration
    "case_properties": 2,  # 2: normalisation and resampling applied, locations_per_class
    "preprocessing_manifest": 1,
    "model_weights": 1,
    "summary": 1,
    "run": 1,
    "check": 1,
}

# The command that (re)creates each artifact, for the error message of a stage that cannot read it.
PRODUCED_BY = {
    "fingerprint": "segforge plan DATASET",
    "plans": "segforge plan DATASET",
    "case_properties": "segforge preprocess DATASET",
    "preprocessing_manifest": "segforge preprocess DATASET",
    "model_weights": "segforge train DATASET",
    "summary": "segforge evaluate PRED REF",
    "run": "segforge train DATASET",
    "check": "segforge plan DATASET",
}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def create_temporary(path: Path, name: str | None = None) -> Path:
    """A new empty file beside ``path`` (``name``, default ``.tmp-NAME-RANDOM``) for a writer to fill, created with the
    mode any new file gets here (0o666 less the umask; ``mkstemp``'s 0600 made every artifact unreadable to the
    colleagues the umask lets in)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(name or f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the kernel applies the umask
    return tmp


def commit_temporary(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` (a file, or a folder's entries) to the disk, rename it to ``path``, and flush the folder's entry:
    after a crash or power cut the folder holds the old file or the complete new one, never an empty or partial file
    under the final name."""
    if os.name == "posix" or not Path(tmp).is_dir():
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    if os.name == "posix":  # a folder cannot be opened for fsync on Windows (its renames are durable as they are)
        try:
            fd = os.open(Path(path).parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            # the file is in place and flushed; only an I/O error is a failure here. Some network and FUSE file
            # systems cannot open or fsync a folder (EINVAL, ENOTSUP, ENOSYS, EACCES on a write-only folder)
            if exc.errno == errno.EIO:
                raise


@contextmanager
def atomic_path(path: Path, name: str | None = None):
    """The temporary path (see ``create_temporary``) that a writer fills with ``path``'s new content: committed
    (``commit_temporary``) when the block completes, removed when it fails; a storage failure (full disk, quota,
    permissions) is re-raised as a worded ``StorageError``. Every segforge writer goes through here."""
    path = Path(path)
    tmp = None
    try:
        tmp = create_temporary(path, name)
        yield tmp
        commit_temporary(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        error = storage_error(exc, path)
        if error is None:
            raise
        raise error from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def stamp(kind: str, payload: dict) -> dict:
    """``payload`` with the artifact header in front."""
    return {"kind": kind, "schema_version": SCHEMA_VERSIONS[kind], "segforge_version": __version__, **payload}


def write_json(path: Path, payload: dict, kind: str | None = None) -> None:
    """Write ``payload`` as indented JSON; with ``kind``, stamped with the artifact header."""
    data = stamp(kind, payload) if kind else payload
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: Path, kind: str | None = None) -> dict:
    """Read a JSON artifact; with ``kind``, refuse a missing, foreign or other-version artifact clearly."""
    path = Path(path)
    hint = f" Fix: run `{PRODUCED_BY[kind]}`." if kind else ""
    if not path.is_file():
        raise ArtifactError(f"{path}: not found.{hint}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}).{hint}") from exc
    if kind is None:
        return data
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise ArtifactError(f"{path}: is not a segforge {kind} artifact.{hint}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSIONS[kind]:
        raise ArtifactError(
            f"{path}: {kind} schema version {version} (written by segforge {data.get('segforge_version')}), "
            f"this segforge reads version {SCHEMA_VERSIONS[kind]}.{hint}"
        )
    return data


def check_header(data: dict, kind: str, source: str) -> None:
    """Validate the header of an artifact already loaded (e.g. from a weights file)."""
    hint = f" Fix: run `{PRODUCED_BY[kind]}`."
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise ArtifactError(f"{source}: is not a segforge {kind} artifact.{hint}")
    if data.get("schema_version") != SCHEMA_VERSIONS[kind]:
        raise ArtifactError(
            f"{source}: {kind} schema version {data.get('schema_version')}, this segforge reads "
            f"version {SCHEMA_VERSIONS[kind]}.{hint}"
        )


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename (the result is memory-mappable and pickle-free)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
