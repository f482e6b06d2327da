"""Checks of MetaIO (.mha/.mhd) and NRRD (.nrrd/.nhdr) files before SimpleITK sees them.

SimpleITK reads a damaged zlib stream of a compressed .mha as garbage voxels (values to 1e38) without an error, a cut
uncompressed one as "No such file or directory", and follows an ``ElementDataFile`` or ``data file`` wherever it
points (``../../etc``, an absolute path). As ``check_nifti`` does for NIfTI, the header is read here and the payload
verified: the detached data file lies inside the header's folder (a symlink there may point under an allowed data
root, as for images), a compressed stream is complete and intact, and there are as many data bytes as the header
promises.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segforge.io.file_checks import RECOPY_FIX, ImageReadError, check_spacing, checked_gzip_size

METAIO_ENDINGS = (".mha", ".mhd")
NRRD_ENDINGS = (".nrrd", ".nhdr")
HEADER_LIMIT = 1 << 20  # bytes of a file searched for the end of its text header (real headers are < 4 KB)

# MetaIO element types and their sizes in bytes (metaTypes.h: MET_LONG is 4 bytes there)
_METAIO_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                 "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                 "MET_DOUBLE": 8}


@dataclass(frozen=True)
class Payload:
    """Where a header's voxel data lies and how much of it there must be."""

    header: Path
    data: Path              # the header itself for .mha/.nrrd, else the detached data file
    offset: int             # of the data in ``data`` (-1: at its end, as MetaIO HeaderSize = -1 / NRRD byte skip -1)
    nbytes: int | None      # voxel bytes the header promises (None: not known, e.g. ASCII data)
    compression: str        # "", "zlib" (MetaIO) or "gzip" (NRRD)
    skip_after: int = 0     # NRRD byte skip inside a compressed stream


def data_roots(roots: list[Path] | None = None) -> list[Path]:
    """The real paths of the folders a symlinked data file may point into: ``roots``, or when None the raw data
    root ``$SEGFORGE_RAW`` (if set)."""
    if roots is None:
        roots = [Path(os.environ["SEGFORGE_RAW"])] if os.environ.get("SEGFORGE_RAW") else []
    return [Path(os.path.realpath(Path(r).expanduser())) for r in roots]


def check_itk_header(path: Path, roots: list[Path] | None = None) -> Payload | None:
    """Check a MetaIO or NRRD file's header and payload; its ``Payload``, or None for another format.

    ``roots``: folders a symlinked detached data file may point into besides the header's folder (None:
    ``$SEGFORGE_RAW``)."""
    name = path.name.lower()
    if name.endswith(METAIO_ENDINGS):
        payload = _metaio_payload(path, roots)
    elif name.endswith(NRRD_ENDINGS):
        payload = _nrrd_payload(path, roots)
    else:
        return None
    if payload is not None:
        _check_payload(payload)
    return payload


def detached_data_files(folder: Path) -> set[Path]:
    """The data files that the .mhd/.nhdr headers of ``folder`` name: they belong to their header (no stray files)."""
    named = set()
    for header in Path(folder).iterdir():
        if header.name.lower().endswith((".mhd", ".nhdr")) and header.is_file():
            data = detached_data_file(header)
            if data is not None:
                named.add(data)
    return named


def detached_data_file(header: Path) -> Path | None:
    """The one data file an .mhd/.nhdr ``header`` names (None: data in the header itself, ``LOCAL``, a multi-file
    list, or an unreadable header, which the check reports)."""
    try:
        fields, _ = (_read_metaio if header.name.lower().endswith(".mhd") else _read_nrrd)(header)
    except (OSError, ImageReadError):
        return None
    value = fields.get("elementdatafile") or fields.get("data file") or fields.get("datafile")
    if not value or _is_list(value) or value.strip().upper() == "LOCAL":
        return None
    return Path(os.path.abspath(Path(header).parent / value))


def _read_header_bytes(path: Path) -> bytes:
    with open(path, "rb") as stream:
        return stream.read(HEADER_LIMIT)


def _read_metaio(path: Path) -> tuple[dict[str, str], int]:
    """MetaIO ``Key = Value`` fields (keys lower case) and the offset just after the ElementDataFile line."""
    raw, fields, position = _read_header_bytes(path), {}, 0
    while position < len(raw):
        end = raw.find(b"\n", position)
        end = len(raw) if end < 0 else end
        line = raw[position:end].decode("latin-1").strip()
        position = end + 1
        key, sep, value = line.partition("=")
        if not sep:
            if line:
                break
            continue
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            return fields, min(position, len(raw))
    raise ImageReadError(f"{path}: is not a MetaIO image: its header has no ElementDataFile line (it starts with "
                         f"{raw[:20]!r}). Fix: check that this is the right file; {RECOPY_FIX}")


def _read_nrrd(path: Path) -> tuple[dict[str, str], int]:
    """NRRD ``field: value`` lines (fields lower case) and the offset after the header's closing blank line."""
    raw = _read_header_bytes(path)
    if not raw.startswith(b"NRRD"):
        raise ImageReadError(f"{path}: is not a NRRD image: it does not start with the NRRD signature (it starts with "
                             f"{raw[:20]!r}). Fix: check that this is the right file; {RECOPY_FIX}")
    fields, position = {}, raw.find(b"\n") + 1
    while 0 < position < len(raw):
        end = raw.find(b"\n", position)
        end = len(raw) if end < 0 else end
        line = raw[position:end].decode("latin-1").rstrip("\r")
        position = end + 1
        if not line.strip():
            return fields, position
        if line.startswith("#") or (":=" in line and (": " not in line or line.index(":=") < line.index(": "))):
            continue  # a comment, or a key:=value pair
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields, len(raw)


def _is_list(value: str) -> bool:
    """A multi-file data file (MetaIO ``LIST`` or a ``%03d`` pattern; NRRD ``LIST`` or ``FORMAT MIN MAX STEP``)."""
    return value.upper().startswith("LIST") or "%" in value


def _integers(path: Path, key: str, value: str | None) -> list[int]:
    try:
        return [int(v) for v in (value or "").split()]
    except ValueError:
        raise ImageReadError(f"{path}: has an invalid header field {key} = {value!r}. Fix: {RECOPY_FIX}") from None


def _floats(path: Path, key: str, value: str) -> list[float]:
    try:
        return [float(v) for v in value.split()]
    except ValueError:
        raise ImageReadError(f"{path}: has an invalid header field {key} = {value!r}. Fix: {RECOPY_FIX}") from None


def _resolve_data_file(header: Path, name: str, field: str, roots: list[Path] | None) -> Path:
    """The data file a header names, refused when it lies outside the header's folder (after symlinks: outside it
    and every allowed data root) or is missing."""
    folder = header.parent
    if _is_list(name):
        raise ImageReadError(f"{header}: its {field} {name!r} spreads the voxels over several files, which segforge "
                             "does not read. Fix: save the image as one file (.mha or .nrrd)")
    target = folder / name
    fix = (f"keep the data file beside its header in {folder} and name it there ({field} = {Path(name).name}), "
           "or save the image as one file (.mha, .nrrd)")
    if os.path.isabs(name) or not Path(os.path.abspath(target)).is_relative_to(Path(os.path.abspath(folder))):
        raise ImageReadError(f"{header}: its {field} names {target}, outside the header's folder {folder}. Fix: {fix}")
    real = Path(os.path.realpath(target))
    allowed = [Path(os.path.realpath(folder))] + data_roots(roots)
    if not any(real.is_relative_to(r) for r in allowed):
        raise ImageReadError(f"{header}: its {field} {target} resolves to {real}, outside the header's folder "
                             f"{folder} and the allowed data roots. Fix: {fix} (or keep the link's target under a "
                             "configured data root, SEGFORGE_RAW)")
    if not target.is_file():
        raise ImageReadError(f"{header}: its data file {target} (named by {field}) is missing. Fix: copy the data file "
                             "beside its header, or re-export the image")
    return target


def _metaio_payload(path: Path, roots: list[Path] | None) -> Payload | None:
    fields, offset = _read_metaio(path)
    data_name = fields["elementdatafile"]
    data = path
    if data_name.upper() != "LOCAL":
        data = _resolve_data_file(path, data_name, "ElementDataFile", roots)
        offset = int(fields.get("headersize", "0") or 0)
    dims = _integers(path, "DimSize", fields.get("dimsize"))
    item = _METAIO_SIZES.get(fields.get("elementtype", "").upper().removesuffix("_ARRAY"))
    channels = (_integers(path, "ElementNumberOfChannels", fields.get("elementnumberofchannels", "1")) or [1])[0]
    ascii_data = fields.get("binarydata", "true").lower() in ("false", "0")
    nbytes = None if item is None or not dims or ascii_data else item * channels * math.prod(dims)
    if fields.get("elementspacing"):  # ITK refuses 0 with a multi-line error and takes NaN as it is
        check_spacing(path, _floats(path, "ElementSpacing", fields["elementspacing"]), "in its header, ElementSpacing ")
    compressed = fields.get("compresseddata", "false").lower() in ("true", "1")
    return Payload(path, data, offset, nbytes, "zlib" if compressed else "")


def _nrrd_payload(path: Path, roots: list[Path] | None) -> Payload | None:
    fields, offset = _read_nrrd(path)
    data_name = fields.get("data file") or fields.get("datafile")
    data = path
    skip = _integers(path, "byte skip", fields.get("byte skip", fields.get("byteskip", "0")))
    skip = skip[0] if skip else 0
    if data_name:
        data = _resolve_data_file(path, data_name, "data file", roots)
        offset = 0
    if fields.get("spacings"):
        check_spacing(path, _floats(path, "spacings", fields["spacings"]), "in its header, spacings ")
    if fields.get("space directions"):  # one vector per axis ("none" for a non-spatial one): its length is the spacing
        lengths = [float(np.linalg.norm(_floats(path, "space directions", v.replace(",", " "))))
                   for v in re.findall(r"\(([^)]*)\)", fields["space directions"])]
        check_spacing(path, lengths, "in its header, the lengths of the space directions ")
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        compression = "gzip"
    elif encoding == "raw":
        compression = ""
        offset = -1 if skip == -1 else offset + skip
    else:  # ascii, hex, bzip2: left to the reader
        return None
    if fields.get("line skip", fields.get("lineskip", "0")) not in ("", "0"):
        return None
    sizes = _integers(path, "sizes", fields.get("sizes"))
    item = _nrrd_item_size(fields.get("type", ""))
    nbytes = None if item is None or not sizes else item * math.prod(sizes)
    return Payload(path, data, offset, nbytes, compression, skip_after=max(skip, 0) if compression else 0)


def _nrrd_item_size(kind: str) -> int | None:
    kind = kind.lower().replace("_t", "")
    if kind == "float":
        return 4
    if kind == "double":
        return 8
    for size, words in ((8, ("long long", "longlong", "64")), (1, ("char", "8")), (2, ("short", "16")),
                        (4, ("int", "32"))):
        if any(w in kind for w in words):
            return size
    return None


def _check_payload(payload: Payload) -> None:
    """A compressed stream must be intact and complete; the data must be as long as the header promises."""
    where = f"its data file {payload.data}" if payload.data != payload.header else "it"
    if payload.compression:
        kind = "zlib" if payload.compression == "zlib" else "gzip"
        size = checked_gzip_size(payload.data, payload.nbytes, offset=max(payload.offset, 0), kind=kind)
        size -= payload.skip_after
    elif payload.offset < 0:
        return  # the data is the end of the file, whatever its length
    else:
        size = payload.data.stat().st_size - payload.offset
    if payload.nbytes is not None and size < payload.nbytes:
        raise ImageReadError(f"{payload.data}: is truncated: {where} holds {max(size, 0)} bytes of voxel data of the "
                             f"{payload.nbytes} that the header {payload.header.name} promises: the file was cut "
                             f"short, or its header claims more voxels than it holds. Fix: {RECOPY_FIX}")

