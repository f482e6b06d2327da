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
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from segforge.errors import SegforgeError

ITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NATURAL_2D_ENDINGS = (".png", ".tif", ".tiff", ".bmp")
SUPPORTED_ENDINGS = ITK_ENDINGS + NATURAL_2D_ENDINGS
FAKE_Z_SPACING = 999.0
# relative (and absolute) tolerance when comparing the grids of files that must share one (channels, labels)
GEOMETRY_TOL = 1e-3


class ImageReadError(SegforgeError):
    """A file could not be read as an image."""


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


def read_image(path: str | os.PathLike, backend: str = "auto") -> tuple[np.ndarray, Geometry]:
    """Read one single-channel image as a ``(z, y, x)`` array with its geometry.

    ``backend`` is ``auto`` (SimpleITK for medical formats, scikit-image for PNG/TIFF), ``sitk`` or ``nibabel``.
    Raises ``ImageReadError`` naming the file when it is missing, unreadable, truncated or not 2D/3D.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    ending = file_ending(path)
    if backend == "auto":
        backend = "skimage" if ending in NATURAL_2D_ENDINGS else "sitk"
    try:
        if backend == "sitk":
            return _read_sitk(path)
        if backend == "nibabel":
            return _read_nibabel(path)
        if backend == "skimage":
            return _read_natural_2d(path)
    except ImageReadError:
        raise
    except Exception as exc:  # every reader has its own exception types; name the file, keep the reason
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImageReadError(
            f"{path}: cannot read image ({reason}). Fix: the file may be truncated or not an image; "
            "re-export it from the original data"
        ) from exc
    raise ValueError(f"unknown image backend {backend!r}")


def _read_sitk(path: Path) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    incomplete = incomplete_nifti(path)  # SimpleITK would zero-fill the missing part without an error
    if incomplete:
        raise ImageReadError(f"{path}: {incomplete}. Fix: re-export the file from the original data")

    image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector image). "
            "Fix: store each channel as its own file (CASE_0000, CASE_0001, ...)"
        )
    ndim = image.GetDimension()
    if ndim not in (2, 3):
        raise ImageReadError(
            f"{path}: is {ndim}D; segforge reads 2D and 3D images. Fix: split a 4D image into one 3D file per "
            "channel (scripts/convert_msd.py does this for Decathlon data)"
        )
    array = sitk.GetArrayFromImage(image)
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


_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def incomplete_nifti(path: Path) -> str | None:
    """Why a .nii/.nii.gz file is cut short, or None. SimpleITK zero-fills missing NIfTI data without an error.

    A complete single-member gzip file ends with its uncompressed size (mod 2^32): when that matches what the
    header promises, the file is complete and nothing is decompressed twice. Otherwise (truncated, corrupt, or an
    unusual multi-member file) the stream is decompressed to find out.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")) or not path.is_file():
        return None
    try:
        import nibabel as nib

        proxy = nib.load(str(path)).dataobj  # the array proxy knows the file's data offset; img.header does not
        expected = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    except Exception:
        expected = None  # no readable header: the stream check below, or read_image, says what is wrong
    if not name.endswith(".gz"):
        size = path.stat().st_size
    else:
        if expected is not None:
            with open(path, "rb") as stream:
                stream.seek(-4, os.SEEK_END)
                if int.from_bytes(stream.read(4), "little") == expected % 2**32:
                    return None
        size = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            return f"is truncated or corrupt: its gzip stream cannot be decompressed ({exc})"
    if expected is not None and size < expected:
        return f"is truncated: it holds {size} bytes of the {expected} its header promises"
    return None


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


def _read_natural_2d(path: Path) -> tuple[np.ndarray, Geometry]:
    import skimage.io

    array = np.asarray(skimage.io.imread(str(path)))
    if array.ndim == 3 and array.shape[-1] in (3, 4) and Path(path).suffix.lower() == ".png":
        raise ImageReadError(
            f"{path}: is an RGB(A) PNG. Fix: save one grey-level file per channel (CASE_0000.png, CASE_0001.png, ...)"
        )
    if array.ndim != 2:
        raise ImageReadError(f"{path}: has shape {array.shape}; 2D PNG/TIFF images must be single-channel 2D")
    return array[None], Geometry(spacing=(FAKE_Z_SPACING, 1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), ndim=2)


def read_case(paths: list[Path]) -> tuple[np.ndarray, Geometry]:
    """Read the channel files of one case into a ``(c, z, y, x)`` float32 array; geometry of the first channel."""
    arrays, geometry = [], None
    for path in paths:
        array, geo = read_image(path)
        if geometry is None:
            geometry = geo
        elif array.shape != arrays[0].shape or geo.same_grid(geometry):
            what = f"shape {array.shape} vs {arrays[0].shape}" if array.shape != arrays[0].shape else \
                ", ".join(geo.same_grid(geometry)) + " differ"
            raise ImageReadError(f"{path}: grid differs from {paths[0].name} ({what}). "
                                 "Fix: resample all channels of a case onto one grid")
        arrays.append(array.astype(np.float32, copy=False))
    # one channel: a view, not a copy (a 512x512x300 CT is 300 MB as float32)
    return (arrays[0][None] if len(arrays) == 1 else np.stack(arrays)), geometry


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> None:
    """Write a ``(z, y, x)`` array with ``geometry``, in the format of ``path``'s ending, atomically.

    The file appears complete or not at all: it is written under a temporary name in the same folder and
    renamed into place.
    """
    path = Path(path)
    ending = file_ending(path)
    if not ending:
        raise SegforgeError(f"{path}: unknown image file ending; use one of {', '.join(SUPPORTED_ENDINGS)}")
    if array.ndim != 3:
        raise ValueError(f"write_image expects a (z, y, x) array, got shape {array.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        if ending in NATURAL_2D_ENDINGS:
            _write_natural_2d(tmp, array, geometry)
        else:
            _write_sitk(tmp, array, geometry)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
