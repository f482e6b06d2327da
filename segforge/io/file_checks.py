"""Checks of image files before a reader sees them, and segforge's rule for NaN/inf voxels.

The readers (SimpleITK above all) accept damaged files silently: a cut NIfTI is zero-filled, a zero-size axis
becomes size 1, NaN and inf become 0, and a file name that is not UTF-8 aborts the process. Here each of these is
found first and turned into an ``ImageReadError`` naming the file and the fix, or undone (NaN restored), so that
bad input never becomes a plausible-looking wrong mask.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segforge.errors import SegforgeError


class ImageReadError(SegforgeError):
    """A file could not be read as an image."""


RECOPY_FIX = "re-copy the file, or re-export it from the original data"


def check_file(path: Path) -> None:
    """A path that is no regular, non-empty file: why, and what to do."""
    if path.is_symlink() and not path.exists():
        raise ImageReadError(f"{path}: is a dangling symbolic link: it points to {os.readlink(path)}, which does not "
                             "exist. Fix: re-create the link to the image (or copy the image in its place)")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file. Fix: move it out of the input folder")
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: is empty (0 bytes). Fix: {RECOPY_FIX}")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise ImageReadError(f"{path}: cannot be opened: permission denied (the file is complete, but this user may "
                             "not read it). Fix: make it readable (e.g. chmod a+r), or run as its owner") from None


def check_spacing(path: Path, spacing, where: str = "") -> None:
    """A voxel size that is not a positive finite number: SimpleITK reads a NIfTI pixdim of 0, NaN or inf as 1 mm
    without a word (a mask then comes out at the wrong scale), and a negative one as a long ITK error."""
    values = [float(v) for v in spacing]
    if all(np.isfinite(v) and v > 0 for v in values):
        return
    raise ImageReadError(f"{path}: has an invalid voxel spacing {where}({', '.join(f'{v:g}' for v in values)}): each "
                         "must be a positive, finite size in mm. Fix: write the true voxel size into the header "
                         "(e.g. nibabel header.set_zooms, or SimpleITK image.SetSpacing), or re-export the image")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32_overflow(path, array: np.ndarray) -> str | None:
    """Why a float64 image cannot be computed on in float32 (finite values beyond its range would become inf), or
    None. The message names the file and the largest value."""
    if array.dtype.kind != "f" or array.dtype.itemsize <= 4:
        return None
    finite = np.isfinite(array)  # max and min, not abs: no float64 copy of the image
    largest = max(float(np.max(array, where=finite, initial=0.0)), -float(np.min(array, where=finite, initial=0.0)))
    if largest <= FLOAT32_MAX:
        return None
    return (f"{path}: holds finite values up to {largest:.3g}, beyond the float32 range (+-{FLOAT32_MAX:.3g}) that "
            "segforge computes in. Fix: rescale the image to its physical units (or clip it) when exporting it")


def starts_with(head: bytes) -> str:
    """The first bytes of a file, for a message: quoted when they are text, else in hex."""
    for cut in range(min(len(head), 40), max(min(len(head), 40) - 4, 0), -1):  # not inside a UTF-8 character
        try:
            text = head[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip() and all(c.isprintable() or c in "\r\n\t" for c in text):
            line = text.strip().splitlines()[0]
            return f"text {line[:20]!r}" + ("..." if len(line) > 20 or len(head) > len(line) + 1 else "")
        break
    return "bytes " + " ".join(f"{b:02x}" for b in head[:8])


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a name whose bytes are not UTF-8 (e.g. Latin-1 from an old archive)
        return False


@contextlib.contextmanager
def itk_name(path: Path):
    """A name SimpleITK can open for ``path``. A name that is not valid UTF-8 would abort the whole process inside
    SimpleITK's C++ string conversion; such a file is opened through a temporary symlink with a plain name."""
    if is_utf8(str(path)):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="segforge-") as folder:
        ending = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix  # the ending picks the reader
        link = Path(folder) / f"image{ending}"
        os.symlink(os.path.abspath(path), link)
        yield str(link)


_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class NiftiLayout:
    compressed: bool
    offset: int            # of the voxel data in the (decompressed) stream
    shape: tuple[int, ...]
    dtype: np.dtype
    slope: float
    inter: float

    @property
    def end(self) -> int:
        return self.offset + int(np.prod(self.shape)) * self.dtype.itemsize


def _nifti_header(raw: bytes):
    """The NIfTI-1 or NIfTI-2 header at the start of ``raw`` (either byte order), or None."""
    import nibabel as nib

    for klass, magics in ((nib.Nifti1Header, (b"n+1", b"ni1")), (nib.Nifti2Header, (b"n+2", b"ni2"))):
        size = klass.template_dtype.itemsize
        if len(raw) < size:
            continue
        try:
            header = klass.from_fileobj(io.BytesIO(raw[:size]), check=False)
        except Exception:
            continue
        if int(header["sizeof_hdr"]) == size and header["magic"].item().rstrip(b"\0") in magics:
            return header
    return None


def check_nifti(path: Path) -> NiftiLayout | None:
    """Check a .nii/.nii.gz file before a reader sees it; its data layout, or None for another format.

    Refused, with the reason: not gzip and not NIfTI, gzip without a NIfTI header, a zero-size axis, fewer data bytes
    than the header promises (truncated, or a header that claims more voxels than there are), a gzip stream that
    ends early or is corrupt. A complete single-member gzip file ends with its uncompressed size (mod 2^32): when
    that matches what the header promises, nothing is decompressed here.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    with open(path, "rb") as stream:
        head = stream.read(544)
    compressed = head[:2] == _GZIP_MAGIC
    if compressed:
        try:
            with gzip.open(path, "rb") as stream:
                head = stream.read(544)
        except EOFError:
            raise ImageReadError(f"{path}: truncated or corrupt gzip stream (the file ends early, inside the NIfTI "
                                 f"header). Fix: {RECOPY_FIX}") from None
        except (OSError, zlib.error) as exc:
            raise ImageReadError(f"{path}: corrupt gzip stream ({exc}). Fix: {RECOPY_FIX}") from None
    header = _nifti_header(head)
    if header is None:
        if compressed:
            raise ImageReadError(f"{path}: is gzip-compressed but holds no NIfTI image (its content starts with "
                                 f"{starts_with(head)}). Fix: check that this is the right file; save the image as "
                                 "NIfTI (.nii.gz)")
        raise ImageReadError(
            f"{path}: is not a NIfTI image: it starts with {starts_with(head)}, not with the gzip signature 1f 8b "
            f"(.nii.gz) or a NIfTI header (.nii). Fix: check that this is the right file; convert the image to "
            "NIfTI (e.g. with SimpleITK or dcm2niix)")
    dims = [int(d) for d in header["dim"]]
    if not 1 <= dims[0] <= 7 or any(d < 0 for d in dims[1:dims[0] + 1]):
        raise ImageReadError(f"{path}: has an invalid NIfTI header (dim = {dims}). Fix: {RECOPY_FIX}")
    shape = tuple(dims[1:dims[0] + 1])
    # a singleton axis (a 2D image stored as 3D) has no extent: its pixdim (often 0) scales nothing
    check_spacing(path, [float(v) for v, n in zip(header["pixdim"][1:min(dims[0], 3) + 1], dims[1:]) if n > 1],
                  "in its NIfTI header, pixdim ")
    if 0 in shape:
        raise ImageReadError(f"{path}: has a zero-size axis (shape {' x '.join(map(str, shape))} in its header): it "
                             "holds no voxels. Fix: re-export the image from the original data (the export that "
                             "wrote it failed)")
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception:
        raise ImageReadError(f"{path}: has an unknown NIfTI data type (code {int(header['datatype'])}). "
                             f"Fix: {RECOPY_FIX}") from None
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    layout = NiftiLayout(compressed, max(int(header["vox_offset"]), int(header["sizeof_hdr"]) + 4), shape, dtype,
                          slope if np.isfinite(slope) and slope != 0 else 1.0, inter if np.isfinite(inter) else 0.0)
    if not compressed:
        size = path.stat().st_size
    else:
        with open(path, "rb") as stream:
            stream.seek(-4, os.SEEK_END)
            if int.from_bytes(stream.read(4), "little") == layout.end % 2**32:
                return layout
        size = checked_gzip_size(path, layout.end)
    if size < layout.end:
        raise ImageReadError(
            f"{path}: is truncated: it holds {size} bytes of the {layout.end} its NIfTI header promises (shape "
            f"{' x '.join(map(str, shape))}, {dtype.name}): the file was cut short, or its header claims more voxels "
            f"than it holds. Fix: {RECOPY_FIX}")
    return layout


def checked_gzip_size(path: Path, expected: int | None = None, offset: int = 0, kind: str = "gzip") -> int:
    """The decompressed size of a gzip file (every member), a bounded chunk at a time; a clear error when the
    stream ends early or is corrupt. ``offset``: where the stream starts (after a text header); ``kind``: "gzip",
    or "zlib" for a zlib stream (MetaIO's CompressedData)."""
    size, finished = 0, False
    wbits = 16 + zlib.MAX_WBITS if kind == "gzip" else zlib.MAX_WBITS
    decompressor = zlib.decompressobj(wbits)
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            while chunk := stream.read(_CHUNK):
                pending = chunk
                while pending:
                    if finished:  # bytes after a complete member: another member, or zero padding
                        if not pending.strip(b"\0"):
                            break
                        decompressor, finished = zlib.decompressobj(wbits), False
                    size += len(decompressor.decompress(pending, _CHUNK))
                    if decompressor.eof:
                        finished, pending = True, decompressor.unused_data
                    else:
                        pending = decompressor.unconsumed_tail
        if not finished:
            size += len(decompressor.flush())
    except zlib.error as exc:
        raise ImageReadError(f"{path}: corrupt {kind} stream ({exc}): the compressed data is damaged. "
                             f"Fix: {RECOPY_FIX}") from None
    if not finished:
        promised = f" of the {expected} its header promises" if expected else ""
        raise ImageReadError(f"{path}: truncated or corrupt {kind} stream: the file ends early, after {size} "
                             f"decompressed bytes{promised} (an interrupted copy or download?). Fix: {RECOPY_FIX}")
    return size


def restore_nonfinite(path: Path, layout: NiftiLayout, array: np.ndarray) -> None:
    """Put back the NaN and inf that SimpleITK's NIfTI reader turned into 0: an unscaled float image without a 0 has
    none; otherwise its data is streamed once more, a chunk at a time (no second copy of the image)."""
    flat = array.reshape(-1)  # the file's voxel order (x fastest) is the C order of the (z, y, x) array
    if flat.size != int(np.prod(layout.shape)):
        return
    if layout.slope == 1.0 and layout.inter == 0.0 and not (flat == 0).any():
        return
    item = layout.dtype.itemsize
    opener = gzip.open if layout.compressed else open
    with opener(path, "rb") as stream:
        stream.seek(layout.offset)
        start = 0
        while start < flat.size:
            raw = stream.read(min(_CHUNK // item, flat.size - start) * item)
            if not raw:
                break
            values = np.frombuffer(raw, layout.dtype, len(raw) // item)
            bad = ~np.isfinite(values)
            if bad.any():
                target = flat[start:start + values.size]
                target[bad] = values[bad] * layout.slope + layout.inter
            start += values.size


def replace_nonfinite(image: np.ndarray, paths: list, max_fraction: float | None = None,
                      copy: bool = False) -> tuple[np.ndarray, list[str]]:
    """Apply segforge's rule for NaN/inf voxels to a ``(c, z, y, x)`` case; returns the image and warnings.

    Why a rule at all: one NaN reaches the normalisation and then every window that touches it, and the mask comes
    out meaningless without a word (SimpleITK reads NIfTI NaN as 0 and nnU-Net predicts on that, which is no better:
    0 is water in a CT). The rule, per channel file:

    * a few isolated non-finite voxels (at most ``max_fraction``, 0.01 % of the image, e.g. 2600 voxels of a
      512x512x100 CT, 1 % of one slice: a division by zero in a derived map, a dead detector pixel) are replaced by the channel's lowest finite value, i.e. background, as
      outside the field of view, with a warning naming the file: they cannot change the mask beyond their own
      neighbourhood, and refusing the whole case over them would help nobody;
    * more than that is a missing region (NaN fill outside the field of view after registration or resampling, a
      failed reconstruction): a mask predicted over an invented background there would look plausible and be
      wrong, so the case is refused with the count and the fix.

    ``paths`` name the channels in messages (file paths, or any labels). ``copy``: never modify ``image``.
    """
    if image.dtype.kind not in "fc":
        return image, []
    max_fraction = NONFINITE_MAX_FRACTION if max_fraction is None else max_fraction
    warnings, done_copy = [], False
    for c in range(image.shape[0]):
        n_nan, n_inf = _count_nonfinite(image[c])
        if not (n_nan or n_inf):
            continue
        total = image[c].size
        fraction = (n_nan + n_inf) / total
        name = paths[c] if c < len(paths) else f"channel {c}"
        if fraction > max_fraction:
            raise ImageReadError(
                f"{name}: holds {n_nan + n_inf} non-finite voxel(s) ({n_nan} NaN, {n_inf} inf; {100 * fraction:.3g} % "
                f"of the image): too many to predict on (at most {100 * max_fraction:.2g} %, isolated voxels, are "
                "replaced by the image's minimum); a mask over a region without data would be meaningless. Fix: "
                "replace the NaN/inf with finite values when exporting the file (e.g. the background value), or crop "
                "the image to where it has data")
        if copy and not done_copy:
            image, done_copy = image.copy(), True
        channel = image[c]
        finite = np.isfinite(channel)
        fill = float(np.min(channel, where=finite, initial=np.inf)) if finite.any() else 0.0
        channel[~finite] = fill
        warnings.append(f"{name}: {n_nan + n_inf} non-finite voxel(s) ({n_nan} NaN, {n_inf} inf; "
                        f"{100 * fraction:.2g} % of the image) replaced by the image's minimum {fill:g}; check the "
                        "file (re-export it without NaN/inf to silence this)")
    return image, warnings


# above this share of non-finite voxels in one channel a case is refused (see replace_nonfinite)
NONFINITE_MAX_FRACTION = 1e-4


def _count_nonfinite(channel: np.ndarray) -> tuple[int, int]:
    """(NaN, inf) counts, a slab at a time: no full-size temporary for a 300 MB CT."""
    step = max(1, (1 << 24) // max(1, int(np.prod(channel.shape[1:]))))
    n_nan = n_bad = 0
    for z in range(0, channel.shape[0], step):
        slab = channel[z:z + step]
        bad = int(np.count_nonzero(~np.isfinite(slab)))
        if bad:
            n_bad += bad
            n_nan += int(np.count_nonzero(np.isnan(slab)))
    return n_nan, n_bad - n_nan
