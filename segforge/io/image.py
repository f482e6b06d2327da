"""Read and write images with their geometry, behind one adapter for SimpleITK, nibabel and scikit-image.

The one internal convention, used by every array in segforge:

* Arrays are spatially 3D, indexed ``(z, y, x)``: numpy order of SimpleITK, slowest axis first. A 2D file
  (PNG/TIFF, or a 2D NIfTI/MHA) is read as ``(1, y, x)``. Multi-channel cases stack channels in front:
  ``(c, z, y, x)``.
* ``Geometry.spacing`` is per array axis, in the same ``(z, y, x)`` order. A 2D file gets spacing 999 on its
  fake z axis (as nnU-Net does) so that no planner ever pools or resamples across it.
* ``Geometry.origin`` and ``Geometry.direction`` are kept exactly as ITK reports them for the file (LPS world,
  length ``ndim`` and ``ndim*ndim`` row-major), so writing restores them bit for bit.

nibabel (RAS affine, ``(i, j, k)`` arrays) is converted to this convention on read, so the same NIfTI read by
either backend gives the same array and geometry (pinned by a test).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from segforge.errors import SegforgeError
from segforge.io.file_checks import (RECOPY_FIX, ImageReadError, NONFINITE_MAX_FRACTION, check_file,  # noqa: F401
                                     check_nifti, check_spacing, checked_gzip_size, float32_overflow, is_utf8,
                                     itk_name, replace_nonfinite, restore_nonfinite, starts_with)
from segforge.io.header_checks import check_itk_header

ITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NATURAL_2D_ENDINGS = (".png", ".tif", ".tiff", ".bmp")
SUPPORTED_ENDINGS = ITK_ENDINGS + NATURAL_2D_ENDINGS
FAKE_Z_SPACING = 999.0
# relative (and absolute) tolerance when comparing the grids of files that must share one (channels, labels)
GEOMETRY_TOL = 1e-3


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a ``(z, y, x)`` array sit in the world (see module docstring)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    ndim: int = 3  # dimensionality of the file on disk (2 or 3)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Geometry":
        return cls(
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
            ndim=int(data["ndim"]),
        )

    def same_grid(self, other: "Geometry", tol: float = GEOMETRY_TOL) -> list[str]:
        """Names of the geometry fields that differ from ``other`` beyond a relative tolerance."""
        diffs = []
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if a.shape != b.shape or not np.allclose(a, b, rtol=tol, atol=tol):
                diffs.append(name)
        return diffs


def file_ending(path: str | os.PathLike) -> str:
    """The supported ending of ``path`` (``.nii.gz`` counts as one), or '' when it has none we know."""
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return ""


def strip_ending(path: str | os.PathLike) -> str:
    name = Path(path).name
    ending = file_ending(name)
    return name[: len(name) - len(ending)] if ending else name


def read_image(path: str | os.PathLike, backend: str = "auto",
               data_roots: list[Path] | None = None) -> tuple[np.ndarray, Geometry]:
    """Read one single-channel image as a ``(z, y, x)`` array with its geometry.

    ``backend`` is ``auto`` (SimpleITK for medical formats, scikit-image for PNG/TIFF), ``sitk`` or ``nibabel``.
    Raises ``ImageReadError`` naming the file when it is missing, empty, unreadable, truncated, corrupt, not an image
    of its kind, without voxels or not 2D/3D. NaN and inf are returned as they are in the file (SimpleITK alone
    would turn them into 0 in a NIfTI file); what to do with them is the caller's decision (``replace_nonfinite``).
    ``data_roots``: folders a detached data file of an .mhd/.nhdr may point into through a symlink, besides its
    header's folder (None: ``$SEGFORGE_RAW``, if set).
    """
    path = Path(path)
    check_file(path)
    check_itk_header(path, data_roots)
    ending = file_ending(path)
    if backend == "auto":
        backend = "skimage" if ending in NATURAL_2D_ENDINGS else "sitk"
    if backend not in ("sitk", "nibabel", "skimage"):
        raise ValueError(f"unknown image backend {backend!r}")
    try:
        if backend == "sitk":
            array, geometry = _read_sitk(path)
        elif backend == "nibabel":
            check_nifti(path)
            array, geometry = _read_nibabel(path)
        else:
            array, geometry = _read_natural_2d(path)
    except ImageReadError:
        raise
    except Exception as exc:  # every reader has its own exception types; name the file, keep the reason
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImageReadError(
            f"{path}: cannot read image ({reason}). Fix: the file may be truncated or not an image; "
            "re-export it from the original data"
        ) from exc
    if array.size == 0:  # e.g. an .mha with DimSize 0 (a NIfTI one is caught from its header)
        raise ImageReadError(f"{path}: has a zero-size axis (shape (z, y, x) {' x '.join(map(str, array.shape))}): "
                             "it holds no voxels. Fix: re-export the image from the original data")
    check_spacing(path, geometry.spacing, "(z, y, x) ")
    return array, geometry


def _read_sitk(path: Path) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    # SimpleITK would zero-fill a cut NIfTI, read a header with a zero-size axis as size 1, and turn NaN into 0,
    # all without an error: the header and the stream are checked first, the non-finite voxels restored after
    nifti = check_nifti(path)
    if nifti is not None and nifti.dtype.kind == "f" and nifti.slope == 1.0 and nifti.inter == 0.0:
        try:  # one decompression instead of SimpleITK's plus the NaN pass
            fast = _read_float_nifti(path, nifti)
        except (RuntimeError, OSError, EOFError, ValueError):
            if nifti.compressed:  # a damaged stream whose size field still matched: say so
                checked_gzip_size(path, nifti.end)
            raise
        if fast is not None:
            return fast
    try:
        with itk_name(path) as name:
            image = sitk.ReadImage(name)
    except RuntimeError:
        if nifti is not None and nifti.compressed:  # a damaged stream whose size field still matched: say so
            checked_gzip_size(path, nifti.end)
        raise
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector image). "
            "Fix: store each channel as its own file (CASE_0000, CASE_0001, ...)"
        )
    ndim = image.GetDimension()
    if ndim not in (2, 3):
        size = " x ".join(str(s) for s in image.GetSize())
        raise ImageReadError(
            f"{path}: is {ndim}D ({size}); segforge reads 2D and 3D images, one file per channel. Fix: split it into "
            "one 3D file per volume (CASE_0000, CASE_0001, ...; scripts/convert_msd.py does this for Decathlon data)"
        )
    array = sitk.GetArrayFromImage(image)
    if nifti is not None and nifti.dtype.kind == "f" and array.dtype.kind == "f":
        restore_nonfinite(path, nifti, array)
    spacing_xyz = image.GetSpacing()
    if ndim == 2:
        array = array[None]
        spacing = (FAKE_Z_SPACING, float(spacing_xyz[1]), float(spacing_xyz[0]))
    else:
        spacing = tuple(float(s) for s in spacing_xyz[::-1])
    geometry = Geometry(
        spacing=spacing,
        origin=tuple(float(v) for v in image.GetOrigin()),
        direction=tuple(float(v) for v in image.GetDirection()),
        ndim=ndim,
    )
    return array, geometry


def _read_float_nifti(path: Path, nifti) -> tuple[np.ndarray, Geometry] | None:
    """An unscaled float NIfTI: the geometry from SimpleITK's header reading (no voxels decompressed), the voxels
    read once here, NaN and inf kept. None when SimpleITK's view of the header differs (then the general path)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    with itk_name(path) as name:
        reader.SetFileName(name)
        reader.ReadImageInformation()
    ndim = reader.GetDimension()
    if (ndim not in (2, 3) or reader.GetNumberOfComponents() != 1
            or tuple(reader.GetSize()) != tuple(nifti.shape)):
        return None
    array = np.empty(int(np.prod(nifti.shape)), nifti.dtype)
    with (gzip.open if nifti.compressed else open)(path, "rb") as stream:
        stream.seek(nifti.offset)
        view, done = memoryview(array).cast("B"), 0
        while done < len(view):
            n = stream.readinto(view[done:])
            if not n:
                raise ImageReadError(f"{path}: is truncated (its voxel data ends early). Fix: {RECOPY_FIX}")
            done += n
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    array = array.reshape(nifti.shape[::-1])  # the file's order (x fastest) is the C order of (z, y, x)
    spacing_xyz = reader.GetSpacing()
    if ndim == 2:
        array = array[None]
        spacing = (FAKE_Z_SPACING, float(spacing_xyz[1]), float(spacing_xyz[0]))
    else:
        spacing = tuple(float(v) for v in spacing_xyz[::-1])
    # + 0.0: the header reader reports -0.0 where a full read reports 0.0
    return array, Geometry(spacing=spacing, origin=tuple(float(v) + 0.0 for v in reader.GetOrigin()),
                           direction=tuple(float(v) + 0.0 for v in reader.GetDirection()), ndim=ndim)


_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
def _read_nibabel(path: Path) -> tuple[np.ndarray, Geometry]:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageReadError(f"{path}: is {data.ndim}D; the nibabel reader takes 3D images")
    # nibabel's affine maps (i, j, k) to RAS; ITK reports LPS with direction columns per index axis.
    affine = img.affine
    linear = _LPS_FROM_RAS @ affine[:3, :3]
    spacing_ijk = np.linalg.norm(linear, axis=0)
    direction = linear / spacing_ijk
    origin = _LPS_FROM_RAS @ affine[:3, 3]
    array = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    geometry = Geometry(
        spacing=tuple(float(s) for s in spacing_ijk[::-1]),
        origin=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in direction.reshape(-1)),
        ndim=3,
    )
    return array, geometry


# the signatures a file of each 2D format starts with
_SIGNATURES = {".png": ("PNG", (b"\x89PNG\r\n\x1a\n",)), ".bmp": ("BMP", (b"BM",)),
               ".tif": ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
               ".tiff": ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"))}


def _read_natural_2d(path: Path) -> tuple[np.ndarray, Geometry]:
    import skimage.io

    ending = file_ending(path)
    kind, signatures = _SIGNATURES.get(ending, (ending.lstrip(".").upper(), ()))
    with open(path, "rb") as stream:
        head = stream.read(16)
        stream.seek(max(0, path.stat().st_size - 64))
        tail = stream.read()
    if signatures and not head.startswith(signatures):
        raise ImageReadError(f"{path}: is not a {kind} image: it starts with {starts_with(head)}, not the {kind} "
                             f"signature. Fix: check that this is the right file; save the image as {kind}")
    if kind == "PNG" and head[12:16] == b"IHDR":  # colour type: byte 25, the 10th of the IHDR data
        with open(path, "rb") as stream:
            ihdr = stream.read(26)
        if len(ihdr) == 26 and ihdr[25] == 3:
            raise ImageReadError(f"{path}: is a palette (indexed-colour) PNG: its pixels are indices into a colour "
                                 "table, not grey levels. Fix: save it as a grey-level PNG (e.g. PIL "
                                 "Image.open(f).convert('L'), or for a label map write the index values as 8-bit grey)")
    if kind == "PNG" and b"IEND" not in tail:  # every complete PNG ends with its IEND chunk
        raise ImageReadError(f"{path}: truncated PNG (the file ends early, before the PNG end marker IEND; an "
                             f"interrupted copy or download?). Fix: {RECOPY_FIX}")
    try:
        array = np.asarray(skimage.io.imread(str(path)))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImageReadError(f"{path}: truncated or corrupt {kind} data ({reason}). Fix: {RECOPY_FIX}") from None
    if array.ndim == 3 and array.shape[-1] in (3, 4) and Path(path).suffix.lower() == ".png":
        raise ImageReadError(
            f"{path}: is an RGB(A) PNG. Fix: save one grey-level file per channel (CASE_0000.png, CASE_0001.png, ...)"
        )
    if array.ndim != 2:
        raise ImageReadError(f"{path}: has shape {array.shape}; 2D PNG/TIFF images must be single-channel 2D")
    return array[None], Geometry(spacing=(FAKE_Z_SPACING, 1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), ndim=2)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def read_case(paths: list[Path]) -> tuple[np.ndarray, Geometry]:
    """Read the channel files of one case into a ``(c, z, y, x)`` float32 array; geometry of the first channel."""
    arrays, geometry = [], None
    for path in paths:
        array, geo = read_image(path)
        if geometry is None:
            geometry = geo
        elif array.shape != arrays[0].shape or geo.same_grid(geometry):
            if array.shape != arrays[0].shape:
                what = f"size (z, y, x) {' x '.join(map(str, array.shape))} vs {' x '.join(map(str, arrays[0].shape))}"
            else:
                what = "; ".join(f"{name} {_fmt(getattr(geo, name))} vs {_fmt(getattr(geometry, name))}"
                                 for name in geo.same_grid(geometry))
            raise ImageReadError(f"{path}: its grid differs from {Path(paths[0]).name}, another channel of the case "
                                 f"({what}). Fix: resample all channels of a case onto one grid (same size, spacing, "
                                 "origin and direction), e.g. register them to channel 0")
        overflow = float32_overflow(path, array)
        if overflow:  # the cast would turn them into inf, with a numpy warning
            raise ImageReadError(overflow)
        arrays.append(array.astype(np.float32, copy=False))
    # one channel: a view, not a copy (a 512x512x300 CT is 300 MB as float32)
    return (arrays[0][None] if len(arrays) == 1 else np.stack(arrays)), geometry


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> None:
    """Write a ``(z, y, x)`` array with ``geometry``, in the format of ``path``'s ending, atomically.

    The file appears complete or not at all: it is written under a temporary name in the same folder and
    renamed into place.
    """
    from segforge.io.artifacts import commit_temporary

    path = Path(path)
    ending = file_ending(path)
    if not ending:
        raise SegforgeError(f"{path}: unknown image file ending; use one of {', '.join(SUPPORTED_ENDINGS)}")
    if array.ndim != 3:
        raise ValueError(f"write_image expects a (z, y, x) array, got shape {array.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name keeps the ending (it picks the writer); SimpleITK needs a UTF-8 name (see itk_name)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name if is_utf8(path.name) else 'image' + ending}")
    if ending not in NATURAL_2D_ENDINGS and not is_utf8(str(tmp)):
        raise SegforgeError(f"{path.parent}: folder name is not valid UTF-8; SimpleITK cannot write there. "
                            "Fix: choose an output folder whose name is UTF-8")
    if ending in (".mhd", ".nhdr"):
        _write_header_and_data(path, array, geometry)
        return
    try:
        if ending in NATURAL_2D_ENDINGS:
            _write_natural_2d(tmp, array, geometry)
        else:
            _write_sitk(tmp, array, geometry)
        _verify_written(tmp, path, array)
        commit_temporary(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_header_and_data(path: Path, array: np.ndarray, geometry: Geometry) -> None:
    """.mhd/.nhdr name their data file after themselves: both are written under their final names in a temporary
    folder, checked, and moved out data first, header last (a header that exists points at complete data)."""
    import shutil

    from segforge.io.artifacts import commit_temporary

    folder = path.with_name(f".tmp-{os.getpid()}-{path.name}.d")
    folder.mkdir(exist_ok=True)
    try:
        inner = folder / path.name
        _write_sitk(inner, array, geometry)
        _verify_written(inner, path, array)
        for data in folder.iterdir():
            if data.name != path.name:
                commit_temporary(data, path.parent / data.name)
        commit_temporary(inner, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _verify_written(tmp: Path, path: Path, array: np.ndarray) -> None:
    """SimpleITK reports no error when a write fails part-way (full disk, file-size limit): it leaves a truncated
    file that even reads back, zero-filled. So the file is checked before it takes its final name: a NIfTI by its
    header and gzip trailer (no decompression when complete), any other format by reading it back."""
    from segforge.io.storage import StorageError

    try:
        if check_nifti(tmp) is None:
            written, _ = read_image(tmp)
            if written.shape != array.shape or not np.array_equal(written, array, equal_nan=array.dtype.kind == "f"):
                raise ImageReadError(f"{tmp}: reads back different from what was written")
    except ImageReadError as exc:
        raise StorageError(f"{path}: could not be written completely (the file came out cut short): the disk is full "
                           "or a file-size limit was reached. Nothing finished was overwritten. Fix: free space, then run the same command "
                           "again (with --continue, finished cases are kept)") from exc


def _write_sitk(path: Path, array: np.ndarray, geometry: Geometry) -> None:
    import SimpleITK as sitk

    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if geometry.ndim == 2:
        if array.shape[0] != 1:
            raise ValueError(f"a 2D geometry needs a (1, y, x) array, got {array.shape}")
        image = sitk.GetImageFromArray(array[0])
        image.SetSpacing((geometry.spacing[2], geometry.spacing[1]))
    else:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(geometry.spacing[::-1]))
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    sitk.WriteImage(image, str(path), useCompression=True)


def _write_natural_2d(path: Path, array: np.ndarray, geometry: Geometry) -> None:
    import skimage.io

    if array.shape[0] != 1:
        raise ValueError(f"PNG/TIFF output needs a (1, y, x) array, got {array.shape}")
    plane = array[0]
    if path.name.lower().endswith(".png") and plane.dtype not in (np.uint8, np.uint16):
        plane = plane.astype(np.uint16 if plane.max(initial=0) > 255 else np.uint8)
    # skimage picks the writer from the suffix; the temp name keeps it.
    skimage.io.imsave(str(path), plane, check_contrast=False)
