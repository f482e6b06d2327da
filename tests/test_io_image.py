"""segforge.io.image: geometry round trips per format, backend agreement, 2D files, channel stacking, errors,
atomic writes and file endings."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from segforge.io.image import (
    FAKE_Z_SPACING,
    Geometry,
    ImageReadError,
    file_ending,
    read_case,
    read_image,
    strip_ending,
    write_image,
)

# a rotation about z (not a flip, not the identity), anisotropic non-unit spacing, nonzero origin
ROTATED = (math.cos(0.3), -math.sin(0.3), 0.0, math.sin(0.3), math.cos(0.3), 0.0, 0.0, 0.0, 1.0)
GEO = Geometry(spacing=(3.0, 0.9, 0.7), origin=(12.5, -40.0, 7.25), direction=ROTATED, ndim=3)
SHAPE = (4, 5, 6)


def assert_same_geometry(actual: Geometry, expected: Geometry) -> None:
    assert actual.ndim == expected.ndim
    for name in ("spacing", "origin", "direction"):
        a, e = np.asarray(getattr(actual, name)), np.asarray(getattr(expected, name))
        assert a.shape == e.shape, name
        assert np.allclose(a, e, atol=1e-5, rtol=0), (name, a, e)


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def random_image(dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(SHAPE) * 100).astype(dtype)
    return rng.integers(0, 120, SHAPE).astype(dtype)


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_geometry_round_trip(tmp_path, ending, dtype):
    array = random_image(dtype)
    path = tmp_path / f"img{ending}"
    write_image(path, array, GEO)
    back, geometry = read_image(path)
    assert back.shape == SHAPE
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)
    assert_same_geometry(geometry, GEO)


def test_round_trip_keeps_axis_order(tmp_path):
    """A (z, y, x) array keeps its axes: spacing[0] belongs to the first (slowest) axis."""
    array = np.zeros(SHAPE, np.uint8)
    array[1, 2, 3] = 7
    write_image(tmp_path / "a.nii.gz", array, GEO)
    back, geometry = read_image(tmp_path / "a.nii.gz")
    assert tuple(np.argwhere(back == 7)[0]) == (1, 2, 3)
    assert geometry.spacing[0] == pytest.approx(3.0, abs=1e-5)
    assert geometry.spacing[2] == pytest.approx(0.7, abs=1e-5)


def test_2d_medical_image_round_trip(tmp_path):
    geo = Geometry(spacing=(FAKE_Z_SPACING, 0.5, 0.8), origin=(3.0, -2.0), direction=(0.0, 1.0, 1.0, 0.0), ndim=2)
    array = np.arange(5 * 7, dtype=np.int16).reshape(1, 5, 7)
    write_image(tmp_path / "a.mha", array, geo)
    back, geometry = read_image(tmp_path / "a.mha")
    np.testing.assert_array_equal(back, array)
    assert_same_geometry(geometry, geo)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_sitk_and_nibabel_backends_agree(tmp_path, dtype):
    array = random_image(dtype, seed=1)
    path = tmp_path / "img.nii.gz"
    write_image(path, array, GEO)
    a_sitk, g_sitk = read_image(path, backend="sitk")
    a_nib, g_nib = read_image(path, backend="nibabel")
    assert a_sitk.shape == a_nib.shape == SHAPE
    assert a_sitk.dtype == a_nib.dtype
    np.testing.assert_array_equal(a_sitk, a_nib)
    np.testing.assert_array_equal(a_nib, array)
    assert_same_geometry(g_nib, g_sitk)
    assert_same_geometry(g_nib, GEO)


def test_backends_agree_on_a_flipped_direction(tmp_path):
    """Axis flips are where an LPS/RAS mix-up shows; both readers must report the same world geometry."""
    flipped = Geometry(spacing=(2.0, 1.5, 0.5), origin=(-5.0, 10.0, 3.0),
                       direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0), ndim=3)
    array = random_image(np.float32, seed=2)
    write_image(tmp_path / "f.nii.gz", array, flipped)
    a_sitk, g_sitk = read_image(tmp_path / "f.nii.gz", backend="sitk")
    a_nib, g_nib = read_image(tmp_path / "f.nii.gz", backend="nibabel")
    np.testing.assert_array_equal(a_sitk, a_nib)
    assert_same_geometry(g_sitk, flipped)
    assert_same_geometry(g_nib, flipped)


@pytest.mark.parametrize("ending,dtype", [(".png", np.uint8), (".png", np.uint16), (".tif", np.uint16),
                                          (".tiff", np.float32)])
def test_natural_2d_round_trip(tmp_path, ending, dtype):
    rng = np.random.default_rng(3)
    array = (rng.random((1, 9, 11)) * 200).astype(dtype)
    path = tmp_path / f"img{ending}"
    write_image(path, array, Geometry(spacing=(FAKE_Z_SPACING, 1.0, 1.0), origin=(0.0, 0.0),
                                      direction=(1.0, 0.0, 0.0, 1.0), ndim=2))
    back, geometry = read_image(path)
    assert back.shape == (1, 9, 11)
    np.testing.assert_array_equal(back, array)
    assert geometry.ndim == 2
    assert geometry.spacing[0] == 999
    assert geometry.spacing[1:] == (1.0, 1.0)


def test_read_case_stacks_channels(tmp_path):
    a, b = random_image(np.float32, 4), random_image(np.int16, 5)
    write_image(tmp_path / "c_0000.nii.gz", a, GEO)
    write_image(tmp_path / "c_0001.nii.gz", b, GEO)
    data, geometry = read_case([tmp_path / "c_0000.nii.gz", tmp_path / "c_0001.nii.gz"])
    assert data.shape == (2, *SHAPE)
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data[0], a)
    np.testing.assert_array_equal(data[1], b.astype(np.float32))
    assert_same_geometry(geometry, GEO)


@pytest.mark.parametrize("other", [
    Geometry(spacing=(3.0, 0.9, 1.4), origin=GEO.origin, direction=GEO.direction),
    Geometry(spacing=GEO.spacing, origin=(12.5, -30.0, 7.25), direction=GEO.direction),
    Geometry(spacing=GEO.spacing, origin=GEO.origin, direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)),
], ids=["spacing", "origin", "direction"])
def test_read_case_rejects_channels_on_another_grid(tmp_path, other):
    write_image(tmp_path / "c_0000.nii.gz", random_image(np.float32), GEO)
    write_image(tmp_path / "c_0001.nii.gz", random_image(np.float32), other)
    with pytest.raises(ImageReadError) as info:
        read_case([tmp_path / "c_0000.nii.gz", tmp_path / "c_0001.nii.gz"])
    assert str(tmp_path / "c_0001.nii.gz") in str(info.value)


def test_read_case_rejects_channels_of_another_shape(tmp_path):
    write_image(tmp_path / "c_0000.nii.gz", random_image(np.float32), GEO)
    write_image(tmp_path / "c_0001.nii.gz", np.zeros((4, 5, 7), np.float32), GEO)
    with pytest.raises(ImageReadError, match="c_0001.nii.gz"):
        read_case([tmp_path / "c_0000.nii.gz", tmp_path / "c_0001.nii.gz"])


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope_0000.nii.gz"
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("backend", ["auto", "sitk", "nibabel"])
def test_truncated_nifti_gz_names_the_path(tmp_path, backend):
    path = tmp_path / "cut.nii.gz"
    write_image(path, random_image(np.float32), GEO)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as info:
        read_image(path, backend=backend)
    assert str(path) in str(info.value)


def test_truncated_plain_nifti_is_refused(tmp_path):
    """An uncompressed .nii cut short: SimpleITK alone would zero-fill the missing voxels silently."""
    path = tmp_path / "cut.nii"
    write_image(tmp_path / "full.nii.gz", random_image(np.float32), GEO)
    path.write_bytes(gzip.decompress((tmp_path / "full.nii.gz").read_bytes())[:-40])
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_not_an_image_names_the_path(tmp_path):
    path = tmp_path / "junk.mha"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".png"])
def test_write_leaves_no_temp_file(tmp_path, ending):
    array = np.ones((1, 4, 4), np.uint8) if ending == ".png" else random_image(np.float32)
    geo = GEO if ending != ".png" else Geometry((FAKE_Z_SPACING, 1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), 2)
    write_image(tmp_path / f"out{ending}", array, geo)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{ending}"]


def _failing_writer(image, path, *args, **kwargs):
    Path(path).write_bytes(b"half an image")  # a writer that dies after starting its output
    raise RuntimeError("disk full")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import SimpleITK as sitk

    monkeypatch.setattr(sitk, "WriteImage", _failing_writer)
    path = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError, match="disk full"):
        write_image(path, random_image(np.float32), GEO)
    assert not path.exists()
    assert temp_files(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import SimpleITK as sitk

    path = tmp_path / "out.nii.gz"
    old = random_image(np.float32, seed=7)
    write_image(path, old, GEO)
    monkeypatch.setattr(sitk, "WriteImage", _failing_writer)
    with pytest.raises(RuntimeError):
        write_image(path, random_image(np.float32, seed=8), GEO)
    monkeypatch.undo()
    np.testing.assert_array_equal(read_image(path)[0], old)
    assert temp_files(tmp_path) == []


def test_write_refuses_unknown_ending_and_wrong_rank(tmp_path):
    from segforge.errors import SegforgeError

    with pytest.raises(SegforgeError):
        write_image(tmp_path / "a.jpg2000", random_image(np.float32), GEO)
    with pytest.raises(ValueError):
        write_image(tmp_path / "a.nii.gz", np.zeros((2, 3), np.float32), GEO)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,ending,stem", [
    ("case_0000.nii.gz", ".nii.gz", "case_0000"),
    ("CASE_0000.NII.GZ", ".nii.gz", "CASE_0000"),
    ("a.b.nii.gz", ".nii.gz", "a.b"),
    ("x.nii", ".nii", "x"),
    ("x.nrrd", ".nrrd", "x"),
    ("x.mha", ".mha", "x"),
    ("slice.png", ".png", "slice"),
    ("slice.tiff", ".tiff", "slice"),
    ("notes.txt", "", "notes.txt"),
    ("archive.gz", "", "archive.gz"),
])
def test_file_ending_and_strip_ending(name, ending, stem):
    assert file_ending(name) == ending
    assert file_ending(Path("some/dir") / name) == ending
    assert strip_ending(name) == stem
    assert strip_ending(Path("some/dir") / name) == stem


def test_geometry_json_round_trip():
    assert Geometry.from_json(GEO.to_json()) == GEO
    assert GEO.same_grid(GEO) == []
    moved = Geometry(spacing=GEO.spacing, origin=(0.0, 0.0, 0.0), direction=GEO.direction)
    assert GEO.same_grid(moved) == ["origin"]
