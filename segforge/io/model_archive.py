"""Portable model folders: ``segforge export-model MODEL_DIR model.zip`` and ``segforge import-model model.zip DEST``.

An archive holds what prediction needs and what says how the model was made: plans.json, dataset.json,
postprocessing.json (if any), and per chosen fold ``model_final.pt`` with its config.yaml, overrides.yaml,
network.yaml, training_summary.json and validation summary; plus ``manifest.json`` with the SHA-256 and size of every
file. Import checks, before anything is written, that the manifest has that shape, that every member is listed with
its exact size, that no name is absolute, climbs out of the folder or is both a file and a folder, that nothing
unlisted is there, that the members unpack to at most ``max_expansion`` times the archive (a zip bomb) and fit in the
free space; it then streams each member to a temporary folder, checking its SHA-256 as it writes (never a member
whole in memory). A tampered archive is refused. Both directions write under a temporary name, flush and rename, and
never overwrite an existing file or folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import string
import uuid
import zipfile
from pathlib import Path, PurePosixPath

from segforge import __version__
from segforge.errors import SegforgeError
from segforge.io.artifacts import commit_temporary
from segforge.io.model_folder import FINAL_WEIGHTS, trained_folds
from segforge.io.storage import check_writable

MANIFEST = "manifest.json"
TOP_FILES = ("plans.json", "dataset.json", "postprocessing.json")
FOLD_FILES = (FINAL_WEIGHTS, "config.yaml", "overrides.yaml", "network.yaml", "training_summary.json",
              "validation/summary.json")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _HashingWriter:
    """A file-like sink that hashes and counts what passes through it, refusing more than ``limit`` bytes."""

    def __init__(self, handle, limit: int, name: str) -> None:
        self.handle, self.limit, self.name = handle, limit, name
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> int:
        self.size += len(chunk)
        if self.size > self.limit:
            raise SegforgeError(f"{self.name} holds more than the {self.limit} bytes the manifest lists; refused (tampered)")
        self.digest.update(chunk)
        return self.handle.write(chunk) if self.handle is not None else len(chunk)


def _stream_member(zf: zipfile.ZipFile, name: str, expected: dict, handle=None) -> None:
    """Read member ``name`` in chunks (into ``handle`` if given), checking its size and SHA-256 as it goes."""
    sink = _HashingWriter(handle, int(expected["bytes"]), name)
    with zf.open(name) as member:
        shutil.copyfileobj(member, sink)
    if sink.size != int(expected["bytes"]) or sink.digest.hexdigest() != expected["sha256"]:
        raise SegforgeError(f"{name} does not match its SHA-256 and size in the manifest; refused (tampered)")


def _check_manifest(archive: Path, manifest) -> dict:
    """``manifest["files"]`` once the manifest has the shape export-model writes; else a SegforgeError naming it."""
    fix = "Fix: re-export it with `segforge export-model MODEL_DIR model.zip`"
    if not isinstance(manifest, dict):
        raise SegforgeError(f"{archive}: {MANIFEST} is a JSON {type(manifest).__name__}, not an object; not a segforge "
                            f"model archive. {fix}")
    if manifest.get("kind") != "model_archive" or manifest.get("schema_version") != 1:
        raise SegforgeError(f"{archive}: not a segforge model archive of schema 1")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise SegforgeError(f"{archive}: {MANIFEST} has no \"files\" object; refused. {fix}")
    for name, entry in listed.items():
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if not (isinstance(sha, str) and len(sha) == hashlib.sha256().digest_size * 2 and set(sha) <= set(string.hexdigits)
                and isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise SegforgeError(f"{archive}: {MANIFEST} lists {name!r} as {json.dumps(entry)[:80]}, not "
                                f'{{"sha256": 64 hex digits, "bytes": a whole number >= 0}}; refused (tampered). {fix}')
    return listed


def _shadowed(names) -> list[str]:
    """Names that are both a file and a folder of another name (``fold_0`` and ``fold_0/model_final.pt``)."""
    folders = {str(parent) for name in names for parent in PurePosixPath(name).parents if str(parent) != "."}
    return sorted(set(names) & folders)


MANIFEST_MAX_BYTES = 16 * 2**20  # a manifest lists a few dozen members with their hashes: KBs


def _byte_limit(archive: Path, max_expansion: float, max_bytes: int | None) -> int:
    return int(max_bytes) if max_bytes is not None else int(max_expansion * archive.stat().st_size)


def export_model(model_dir: Path, archive: Path, folds: list | None = None) -> dict:
    """Write ``archive`` from ``model_dir``; returns the manifest."""
    model_dir, archive = Path(model_dir), Path(archive)
    if archive.exists():
        raise SegforgeError(f"{archive} exists; segforge does not overwrite it. Fix: choose another name or remove it")
    if not (model_dir / "plans.json").is_file():
        raise SegforgeError(f"{model_dir}: no plans.json. Fix: pass a segforge model folder (it holds plans.json and fold_*/)")
    fold_dirs = trained_folds(model_dir)  # every trained fold, fold_all included: an archive is the whole model
    if folds is not None:
        fold_dirs = [p for p in fold_dirs if p.name in {f"fold_{f}" for f in folds}]
    if not fold_dirs:
        raise SegforgeError(f"{model_dir}: no trained fold{' among ' + str(list(folds)) if folds else ''} "
                            f"(fold_*/{FINAL_WEIGHTS}). Fix: train it first")
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
        commit_temporary(tmp, archive)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def _safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name and ":" not in name


def verify_archive(archive: Path, max_expansion: float = 20, max_bytes: int | None = None,
                   read_members: bool = True) -> dict:
    """The manifest of ``archive`` once every member checks out; raises ``SegforgeError`` naming the problem.

    The members may unpack to at most ``max_bytes``, or without it ``max_expansion`` times the archive's size (a zip
    bomb claims little on disk and much unpacked). ``read_members=False`` checks names, sizes and the manifest only
    (import then checks each hash as it writes the member)."""
    archive = Path(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SegforgeError(f"{archive}: not a readable zip archive ({exc})") from exc
    with zf:
        infos = {info.filename: info for info in zf.infolist()}
        if len(infos) != len(zf.infolist()):  # a name twice: which copy a reader takes is up to the reader
            seen, twice = set(), []
            for info in zf.infolist():
                (twice if info.filename in seen else seen.add(info.filename) or []).append(info.filename)
            raise SegforgeError(f"{archive}: the member {twice[0]!r} appears more than once; refused (tampered)")
        if MANIFEST not in infos:
            raise SegforgeError(f"{archive}: no {MANIFEST}; not a segforge model archive")
        if infos[MANIFEST].file_size > MANIFEST_MAX_BYTES:  # read whole below: its size is checked first (a bomb too)
            raise SegforgeError(f"{archive}: {MANIFEST} unpacks to {infos[MANIFEST].file_size} bytes; a model's manifest "
                                f"is a few KB (at most {MANIFEST_MAX_BYTES}): refused (tampered or not a segforge archive)")
        try:
            with zf.open(MANIFEST) as stream:
                manifest = json.loads(stream.read(MANIFEST_MAX_BYTES + 1))
        except (ValueError, RecursionError, zipfile.BadZipFile) as exc:
            raise SegforgeError(f"{archive}: {MANIFEST} is not valid JSON") from exc
        listed = _check_manifest(archive, manifest)
        unsafe = [n for n in list(infos) + list(listed)
                  if not _safe_name(n) or n.endswith("/") or str(PurePosixPath(n)) != n]
        if unsafe:
            raise SegforgeError(f"{archive}: member names that could leave the model folder: {unsafe[:3]}; refused")
        extra = sorted(set(infos) - set(listed) - {MANIFEST})
        missing = sorted(set(listed) - set(infos))
        if extra or missing:
            raise SegforgeError(f"{archive}: members not in the manifest {extra[:3]}, or listed but absent {missing[:3]}; "
                                "refused (tampered or incomplete)")
        shadowed = _shadowed(listed)
        if shadowed:
            raise SegforgeError(f"{archive}: {shadowed[0]!r} is listed both as a file and as a folder of other members; "
                                "refused (tampered)")
        total, limit = sum(int(v["bytes"]) for v in listed.values()), _byte_limit(archive, max_expansion, max_bytes)
        if total > limit:
            raise SegforgeError(f"{archive}: its members unpack to {total} bytes, more than the {limit} allowed "
                                f"({'max_bytes' if max_bytes is not None else f'{max_expansion:g} times the archive size'}"
                                "); refused (a zip bomb?). Fix: if the archive is trusted, raise the limit with "
                                "max_bytes=BYTES (import-model ARCHIVE DEST max_bytes=...)")
        for name, expected in listed.items():
            info = infos[name]
            if info.file_size != int(expected["bytes"]) or (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise SegforgeError(f"{archive}: {name} is not the file the manifest lists; refused (tampered)")
            if read_members:
                try:
                    _stream_member(zf, name, expected)
                except SegforgeError as exc:
                    raise SegforgeError(f"{archive}: {exc}") from exc
        if not any(n.endswith(f"/{FINAL_WEIGHTS}") for n in listed) or "plans.json" not in listed:
            raise SegforgeError(f"{archive}: holds no plans.json or no fold weights")
    return manifest


def _name_too_long(folder: Path, name: str) -> bool:
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer: the write itself will say
        return False
    return any(len(os.fsencode(part)) > limit for part in PurePosixPath(name).parts)


def import_model(archive: Path, destination: Path, max_expansion: float = 20, max_bytes: int | None = None) -> Path:
    """Verify ``archive`` and unpack it as the model folder ``destination`` (which must not exist yet).

    Members are streamed to disk with their hash checked as they are written (never whole in memory); the folder
    appears only once every member matched."""
    archive, destination = Path(archive), Path(destination)
    if destination.exists():
        raise SegforgeError(f"{destination} exists; segforge does not overwrite it. Fix: choose a new folder")
    manifest = verify_archive(archive, max_expansion, max_bytes, read_members=False)
    files = manifest["files"]
    check_writable(destination.parent, sum(int(v["bytes"]) for v in files.values()), what="importing the model",
                   setting="another DESTINATION folder", create=False)
    existing = destination.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    long_names = [name for name in files if _name_too_long(existing, name)]
    if long_names:
        raise SegforgeError(f"{archive}: member name {long_names[0][:60]!r}... is longer than this file system allows; "
                            "refused (not an archive export-model writes)")
    tmp = destination.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{destination.name}")
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in files:
                target = tmp / name
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "xb") as handle:
                        _stream_member(zf, name, files[name], handle)
                        handle.flush()
                        os.fsync(handle.fileno())
                except SegforgeError as exc:
                    raise SegforgeError(f"{archive}: {exc}") from exc
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EINVAL):
                        raise
                    raise SegforgeError(f"{archive}: member {name[:80]!r} cannot be unpacked as a file "
                                        f"({exc.strerror}); refused (not an archive export-model writes)") from exc
        with open(tmp / MANIFEST, "x") as handle:
            handle.write(json.dumps(manifest, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if os.name == "posix":  # the entries of the sub-folders (fold_0/...), deepest first; commit flushes tmp's own
            for folder in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        commit_temporary(tmp, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return destination
