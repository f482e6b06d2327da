"""Storage checks: before long work, is the output folder writable with room for what will be written; after a
failed write, a clear error instead of a traceback.

Every long stage writes atomically (a ``.tmp-*`` name, then a rename), so a full disk or a file-size limit can only
cost the file being written, never a finished one. This module makes the failure legible and, where it can be
foreseen, makes it happen before hours of work rather than after.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from segforge.errors import SegforgeError

# write failures that are about the storage, not the data: full disk, quota, file-size limit, read-only, permissions
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class StorageError(SegforgeError):
    """A folder cannot be written, or has no room for what a stage is about to write."""

    exit_code = 3


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"  # pragma: no cover


PROBE_PREFIX = ".tmp-probe-"  # lives for microseconds; a stale-file clean-up leaves it to its writer


def remove_stale_temporaries(folder: Path, rank: int = 0, barrier: Callable[[], object] | None = None) -> None:
    """Delete the ``.tmp-*`` leftovers of a run killed while writing (write probes aside: see check_writable).

    Under DDP every rank calls this once all are in the process group and before any writes: only global rank 0
    (``rank``) deletes, and ``barrier`` (the group's) holds every rank until it has, so no rank's clean-up can reach
    a temporary another rank is already writing."""
    if rank == 0:
        for stale in Path(folder).rglob(".tmp-*"):
            if stale.name.startswith(PROBE_PREFIX):
                continue
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if barrier is not None:
        barrier()


def check_writable(folder: Path, needed_bytes: int = 0, *, what: str, setting: str, create: bool = True) -> None:
    """Create ``folder`` if needed, prove a file can be written there, and that ``needed_bytes`` (an estimate of what
    ``what`` will write) fit in its free space with a 10% margin. ``setting`` names the option that moves it.
    ``create=False`` leaves a missing folder uncreated and probes the nearest existing folder above it instead."""
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        else:
            while not folder.exists() and folder.parent != folder:
                folder = folder.parent
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
        try:
            os.write(fd, b"segforge")
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)  # another rank's clean-up of stale temporaries may have been first
    except OSError as exc:
        raise StorageError(f"{folder}: cannot write there ({exc.strerror}), so {what} would fail. Fix: make it "
                           f"writable, or choose another folder with {setting}") from exc
    free = shutil.disk_usage(folder).free
    if needed_bytes and free < 1.1 * needed_bytes:
        raise StorageError(f"{folder}: {human(free)} free, but {what} needs about {human(needed_bytes)}. Fix: free "
                           f"space there, or choose another folder with {setting}")


def storage_error(exc: BaseException, path: Path | str) -> StorageError | None:
    """``exc`` (raised while writing ``path``) as a StorageError when it is a storage failure, else None.

    torch's zip writer reports a failed write as ``RuntimeError: ... file write failed`` and numpy's a short write as
    ``OSError: N requested and M written``, both without an errno."""
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = Path(exc.filename) if getattr(exc, "filename", None) else Path(path)
        return StorageError(f"{where}: {exc.strerror} (this user may not read or write it there). Fix: give this user "
                            "access, or point the option that leads there (-i, -o, --model, paths.*, $SEGFORGE_*) "
                            "elsewhere")
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        reason = exc.strerror or str(exc)
    elif (isinstance(exc, RuntimeError) and ("write failed" in str(exc) or "unexpected pos" in str(exc))) or (
            isinstance(exc, OSError) and exc.errno is None and "written" in str(exc)):  # numpy: "N requested and M written"
        reason = "the write failed: the disk is full or a file-size limit was reached"
    else:
        return None
    folder = Path(path).parent
    try:
        free = f"{human(shutil.disk_usage(folder).free)} free there"
    except OSError:
        free = "its free space unknown"
    return StorageError(f"{path}: {reason} ({free}). Nothing finished was overwritten: the file is written under a "
                        "temporary name and renamed when complete. Fix: free space (or raise the quota / file-size "
                        "limit), then run the same command again: it resumes")
