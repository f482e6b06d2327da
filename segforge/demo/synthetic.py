"""Generate a small, deterministic synthetic segmentation dataset in nnU-Net raw layout (3D "MRI" or 2D microscopy).

``generate_dataset(out_dir, dim=3)`` writes ``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` and
``labelsTs/`` as one atomic step: everything is built in a hidden sibling folder and renamed into place, and an
existing non-empty ``out_dir`` is refused (nothing a user made is overwritten).

3D (``.nii.gz``, one "T1" channel, int16): an abdomen-like slab of 20-28 slices of 56-72 x 56-72 voxels, spacing
2.5-3.0 mm (z) by 0.8-1.0 mm (y, x), nonzero origins and, for some cases, a small rotation in the direction matrix.
Labelled: ``liver`` (a large harmonically deformed ellipsoid, thin dark veins inside it count as liver), ``aorta``
(a tube along a random cubic Bezier curve in front of the spine) and ``lesion`` (a dark blob inside the liver).
Unlabelled distractors share their intensities, so no intensity window separates the classes: the abdominal wall
muscle, paraspinal muscles and a crescent "spleen" look like liver; subcutaneous fat is as bright as the aorta;
bowel blobs and a bowel loop (inside a thin bright wall), the hepatic veins and the vertebral cortex are as dark
as the lesion. Shape, size and context tell them apart. Images get smoothed-noise texture, partial-volume blur, a
smooth multiplicative bias field, Rician noise and a random global scale.

2D (``.png``, uint16 images, uint8 labels, ~128 x 128): a tissue-like field with ``cytoplasm`` (irregular cells),
``nucleus`` (bright, inside cells) and ``vessel`` (wide bright curved tubes); the distractors, thin fibres and small
debris dots, are either as dim as cytoplasm or as bright as nuclei and vessels.

Every case is drawn from its own generator keyed by ``(seed, dim, split, index)``, so a case does not depend on
how many others are generated (the test cases of ``num_train=2`` are those of ``num_train=24``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from segforge.errors import SegforgeError
from segforge.io.image import FAKE_Z_SPACING, Geometry, write_image

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
DEMO_MARKER = "segforge synthetic demo"  # opens the description: the demo reuses only a dataset it made
LABELS_3D = {"background": 0, "liver": 1, "aorta": 2, "lesion": 3}
LABELS_2D = {"background": 0, "cytoplasm": 1, "nucleus": 2, "vessel": 3}
CHANNEL_3D, CHANNEL_2D = "T1", "fluorescence"
TRAIN, TEST = 0, 1

# 3D tissues: T1-like intensity (fat bright) and the label each tissue carries.
AIR, FAT, MUSCLE, INTERIOR, MARROW, CORTEX, SPLEEN, LIVER, VEIN, LESION, AORTA, BOWEL, WALL = range(13)
T1_INTENSITY = np.array([0.0, 1.0, 0.45, 0.72, 0.62, 0.2, 0.45, 0.45, 0.2, 0.2, 1.0, 0.2, 0.9])
LABEL_OF_TISSUE_3D = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 3, 2, 0, 0], np.uint8)
# 2D tissues; DIM and BRIGHT are the unlabelled distractors (fibres and debris).
STROMA, DIM, BRIGHT, VESSEL, CYTO, NUCLEUS = range(6)
FL_INTENSITY = np.array([0.28, 0.58, 0.92, 0.92, 0.58, 0.92])
LABEL_OF_TISSUE_2D = np.array([0, 0, 0, 3, 1, 2], np.uint8)


# ----------------------------------------------------------------------------------------------- shape helpers
def _smooth_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation (``sigma`` in voxels per axis)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-8)


def _harmonics(rng: np.random.Generator, angle: np.ndarray, amp: float, orders=(2, 3, 4, 5)) -> np.ndarray:
    """A random smooth periodic function of ``angle``: low angular frequencies with decaying amplitudes."""
    out = np.zeros_like(angle)
    for k in orders:
        out += rng.uniform(0.3, 1.0) * amp / (k - 1) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return out


def _blob(coords, center, semi, rng: np.random.Generator, amp: float = 0.1, rot: float = 0.0) -> np.ndarray:
    """A deformed ellipsoid: its radius is modulated by random harmonics of the in-plane angle and by a tilt in z.

    ``coords`` are the (Z, Y, X) world grids in mm, ``semi`` the semi-axes (z, y, x) in mm, ``rot`` an in-plane
    rotation in radians. A 2D image uses a single slice (Z = 0) and any z semi-axis.
    """
    dz, dy, dx = (c - m for c, m in zip(coords, center))
    cos, sin = np.cos(rot), np.sin(rot)
    dy, dx = cos * dy - sin * dx, sin * dy + cos * dx
    dz, dy, dx = dz / semi[0], dy / semi[1], dx / semi[2]
    dist = np.sqrt(dz**2 + dy**2 + dx**2)
    theta, elev = np.arctan2(dy, dx), dz / (dist + 1e-6)
    radius = 1 + _harmonics(rng, theta, amp) + amp * rng.uniform(-1, 1) * elev
    radius += amp * rng.uniform(-1, 1) * elev * np.cos(theta + rng.uniform(0, 2 * np.pi))
    return dist < radius


def _bezier(ctrl: np.ndarray, n: int = 240) -> np.ndarray:
    """``n`` points along the cubic Bezier curve of the 4 control points ``ctrl`` (4, 3)."""
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 3 * ctrl[0] + 3 * (1 - t) ** 2 * t * ctrl[1] + 3 * (1 - t) * t**2 * ctrl[2] + t**3 * ctrl[3]


def _tube(points: np.ndarray, shape, curve: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Voxels (``points``: (N, 3) world coordinates) within ``radius`` (one per curve point) of ``curve``."""
    dist, idx = cKDTree(curve).query(points, distance_upper_bound=float(radius.max()) + 1e-3)
    return (dist < np.append(radius, 0.0)[idx]).reshape(shape)


def _varying_radius(rng: np.random.Generator, lo: float, hi: float, n: int = 240) -> np.ndarray:
    """A tube radius that drifts smoothly (+-10 %) along the curve around a value in [lo, hi]."""
    return rng.uniform(lo, hi) * (1 + 0.1 * np.sin(np.linspace(0, rng.uniform(2, 6), n) + rng.uniform(0, 6.3)))


def _pick(rng: np.random.Generator, mask: np.ndarray, coords) -> np.ndarray | None:
    """World position (z, y, x) of a random voxel of ``mask``, or None when it is empty."""
    hits = np.flatnonzero(mask)
    if hits.size == 0:
        return None
    i = hits[rng.integers(hits.size)]
    return np.array([c.flat[i] for c in coords])


def _room(free: np.ndarray, spacing) -> np.ndarray:
    """Distance in mm from each free voxel to the nearest occupied one (infinite when nothing is occupied)."""
    if free.all():
        return np.full(free.shape, np.inf)
    return ndimage.distance_transform_edt(free, sampling=spacing)


def _finish(rng, intensity: np.ndarray, texture: float, blur, bias: float, noise: float, rician: bool) -> np.ndarray:
    """Texture, partial-volume blur, multiplicative bias field and noise on an intensity map in [0, 1]."""
    shape = intensity.shape
    tex_sigma = (0.7, 1.5, 1.5) if shape[0] > 1 else (0, 1.5, 1.5)
    image = intensity * (1 + texture * _smooth_noise(rng, shape, tex_sigma))
    image = ndimage.gaussian_filter(image, blur)
    bias_sigma = tuple(n / 3 if n > 1 else 0 for n in shape)
    image *= np.exp(bias * _smooth_noise(rng, shape, bias_sigma))
    if rician:
        return np.hypot(image + noise * rng.standard_normal(shape), noise * rng.standard_normal(shape))
    return np.clip(image + noise * rng.standard_normal(shape), 0, None)


# ----------------------------------------------------------------------------------------------- 3D case
def make_case_3d(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One 3D case: int16 ``(z, y, x)`` image, uint8 label and its geometry (see module docstring)."""
    shape = (int(rng.integers(20, 29)), int(rng.integers(56, 73)), int(rng.integers(56, 73)))
    sz, sxy = round(float(rng.uniform(2.5, 3.0)), 4), round(float(rng.uniform(0.8, 1.0)), 4)
    spacing = (sz, sxy, sxy)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    grid = np.meshgrid(*axes, indexing="ij")
    # one smooth elastic deformation (mm) of the whole anatomy
    grid = [g + amp * _smooth_noise(rng, shape, (3, 10, 10)) for g, amp in zip(grid, (1.0, 1.5, 1.5))]
    points = np.stack([g.ravel() for g in grid], axis=1)
    zhalf = shape[0] * sz / 2
    for _ in range(20):  # redraw the anatomy (same rng: deterministic) in the rare case a class ends up too small
        tissue = _anatomy_3d(rng, shape, spacing, grid, points, zhalf)
        label = LABEL_OF_TISSUE_3D[tissue]
        if all(np.count_nonzero(label == v) >= 150 for v in (1, 2, 3)):
            break
    else:
        raise RuntimeError("synthetic anatomy failed to place every class")
    levels = T1_INTENSITY * rng.uniform(0.95, 1.05, T1_INTENSITY.size)
    levels[AIR] = 0.0
    image = _finish(rng, levels[tissue], texture=0.06, blur=(0.35, 0.6, 0.6), bias=0.12,
                    noise=rng.uniform(0.025, 0.04), rician=True)
    image = np.clip(np.rint(image * rng.uniform(400, 1600)), 0, 32767).astype(np.int16)

    angle = np.deg2rad(rng.uniform(-12, 12)) if rng.random() < 0.4 else 0.0
    c, s = float(np.cos(angle)), float(np.sin(angle))
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    origin = (round(float(-(shape[2] - 1) / 2 * sxy + rng.normal(0, 5)), 2),
              round(float(-(shape[1] - 1) / 2 * sxy + rng.normal(0, 5)), 2), round(float(rng.uniform(-150, 50)), 2))
    return image, label, Geometry(spacing=spacing, origin=origin, direction=direction, ndim=3)


def _anatomy_3d(rng, shape, spacing, grid, points, zhalf) -> np.ndarray:
    """The tissue map (uint8 ids) of one abdomen-like slab."""
    Z, Y, X = grid
    nx, ny = shape[2] * spacing[2], shape[1] * spacing[1]
    A = 0.47 * nx * rng.uniform(0.95, 1.0)
    B = min(A * rng.uniform(0.75, 0.88), 0.47 * ny)
    cy, cx = rng.normal(0, 1.0, 2)
    u, v = (X - cx) / A, (Y - cy) / B  # v = -1 anterior (top rows), +1 posterior
    rho = np.hypot(u, v) / (1 + _harmonics(rng, np.arctan2(v, u), 0.04) + 0.03 * Z / zhalf)
    tf, tm = rng.uniform(2.0, 3.0) / B, rng.uniform(2.0, 2.8) / B
    tissue = np.zeros(shape, np.uint8)
    tissue[rho < 1] = FAT
    tissue[rho < 1 - tf] = MUSCLE
    inside = rho < 1 - tf - tm
    tissue[inside] = INTERIOR
    # spine with paraspinal muscles behind it
    rv = 0.17 * B * rng.uniform(0.9, 1.1)
    spine = np.array([0.0, cy + B * (1 - tf - tm) - 1.1 * rv, cx + rng.normal(0, 0.8)])
    for side in (-1, 1):
        para = _blob(grid, (0, spine[1] + 0.9 * rv, spine[2] + side * 1.3 * rv), (4 * zhalf, 0.9 * rv, 1.1 * rv), rng, 0.08)
        tissue[para & (rho < 1 - tf)] = MUSCLE
    dspine = np.hypot(Y - spine[1], X - spine[2])
    tissue[dspine < rv] = CORTEX
    tissue[dspine < rv - 1.3] = MARROW
    # aorta: a tube along a gently curved Bezier in front of the spine
    ra = _varying_radius(rng, 3.2, 4.2)
    base = np.array([0.0, spine[1] - rv - ra.mean() - rng.uniform(1.0, 2.5), spine[2] + rng.uniform(0.0, 0.5) * rv])
    ctrl = np.array([base + [t * (zhalf + 6), rng.normal(0, 1.5), rng.normal(0, 2.0)] for t in (-1, -1 / 3, 1 / 3, 1)])
    aorta = _tube(points, shape, _bezier(ctrl), ra)
    # liver: large deformed ellipsoid on one side, kept off the wall by a gap
    semi = (zhalf * rng.uniform(0.7, 0.9), 0.68 * B * rng.uniform(0.9, 1.1), 0.48 * A * rng.uniform(0.9, 1.1))
    center = (zhalf * rng.uniform(-0.15, 0.15), cy - 0.1 * B + rng.normal(0, 1), cx - 0.4 * A + rng.normal(0, 1))
    liver = _blob(grid, center, semi, rng, 0.12, rng.uniform(-0.35, 0.35))
    liver &= (rho < 1 - tf - tm - rng.uniform(1.0, 2.0) / B) & ~aorta & (dspine > rv + 1.5)
    # spleen (unlabelled, liver intensity): a smaller crescent on the other side
    ssemi = (zhalf * rng.uniform(0.45, 0.6), 0.42 * B, 0.26 * A)
    scenter = np.array([zhalf * rng.uniform(-0.2, 0.2), cy + 0.2 * B, cx + 0.52 * A])
    spleen = _blob(grid, scenter, ssemi, rng, 0.08, rng.uniform(0.3, 0.7))
    spleen &= ~_blob(grid, scenter + [0, -0.1 * ssemi[1], -0.75 * ssemi[2]], (ssemi[0] * 1.2, ssemi[1] * 0.75, ssemi[2] * 0.75), rng, 0.05)
    spleen &= (rho < 1 - tf - tm - 1.0 / B) & ~aorta & ~liver & (dspine > rv + 1.5)
    tissue[spleen] = SPLEEN
    tissue[liver] = LIVER
    tissue[aorta] = AORTA
    # hepatic veins (labelled liver, lesion intensity): thin tubes running up through the liver
    for _ in range(int(rng.integers(2, 4))):
        c0 = np.array(center) + [-0.9 * semi[0], rng.normal(0, 3), rng.normal(0, 3)]
        c3 = np.array(center) + [0.9 * semi[0], rng.normal(0, 0.4 * semi[1]), rng.normal(0, 0.4 * semi[2])]
        mid = [c0 + (c3 - c0) * t + rng.normal(0, 2.5, 3) for t in (1 / 3, 2 / 3)]
        vein = _tube(points, shape, _bezier(np.array([c0, *mid, c3])), _varying_radius(rng, 1.2, 1.6))
        tissue[vein & liver] = VEIN
    # lesion(s) inside the liver, fully surrounded by it
    depth = _room(liver, spacing)
    for k in range(1 if rng.random() < 0.5 else 2):
        r = min(semi[1], semi[2]) * (rng.uniform(0.5, 0.65) if k == 0 else rng.uniform(0.3, 0.4))
        while r > 3.0 and not (depth > 0.8 * r + 0.5).any():
            r *= 0.9
        where = _pick(rng, depth > 0.8 * r + 0.5, grid)
        if where is not None:
            blob = _blob(grid, where, r * rng.uniform(0.85, 1.15, 3) * [1.3, 1, 1], rng, 0.1)
            tissue[blob & liver] = LESION
            depth[ndimage.binary_dilation(blob, iterations=2)] = 0
    # bowel (unlabelled, lesion intensity): blobs and a loop in the free abdominal space
    free = (tissue == INTERIOR) & (rho < 1 - tf - tm - 1.0 / B)
    room = _room(free & ~ndimage.binary_dilation(aorta | liver | spleen, iterations=2), spacing)
    for _ in range(int(rng.integers(3, 6))):
        r = rng.uniform(3.5, 6.0)
        where = _pick(rng, room > r + 0.5, grid)
        if where is None:
            continue
        blob = _blob(grid, where, r * rng.uniform(0.85, 1.15, 3), rng, 0.12) & free
        tissue[blob] = BOWEL
        room = np.minimum(room, _room(~ndimage.binary_dilation(blob, iterations=2), spacing))
    ends = [_pick(rng, room > 2.0, grid) for _ in range(4)]
    if all(e is not None for e in ends):
        loop = _tube(points, shape, _bezier(np.array(ends)), _varying_radius(rng, 2.5, 3.5))
        tissue[loop & (room > 0.5)] = BOWEL
    # a thin bright bowel wall (in-plane rim): a local cue that tells bowel from lesion
    rim = ndimage.binary_dilation(tissue == BOWEL, structure=np.ones((1, 3, 3), bool))
    tissue[rim & (tissue == INTERIOR)] = WALL
    return tissue


# ----------------------------------------------------------------------------------------------- 2D case
def make_case_2d(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One 2D case: uint16 ``(1, y, x)`` image, uint8 label and the 2D geometry (see module docstring)."""
    shape = (1, int(rng.integers(120, 137)), int(rng.integers(120, 137)))
    grid = np.meshgrid(np.zeros(1), np.arange(shape[1], dtype=float), np.arange(shape[2], dtype=float), indexing="ij")
    points = np.stack([g.ravel() for g in grid], axis=1)
    for _ in range(20):
        tissue = _tissue_2d(rng, shape, grid, points)
        label = LABEL_OF_TISSUE_2D[tissue]
        if all(np.count_nonzero(label == v) >= 40 for v in (1, 2, 3)):
            break
    else:
        raise RuntimeError("synthetic 2D tissue failed to place every class")
    levels = FL_INTENSITY * rng.uniform(0.95, 1.05, FL_INTENSITY.size)
    image = _finish(rng, levels[tissue], texture=0.08, blur=(0, 0.8, 0.8), bias=0.12,
                    noise=rng.uniform(0.03, 0.045), rician=False)
    image = np.clip(np.rint(image * rng.uniform(0.5, 0.75) * 65535), 0, 65535).astype(np.uint16)
    geometry = Geometry(spacing=(FAKE_Z_SPACING, 1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), ndim=2)
    return image, label, geometry


def _crossing_curve(rng, shape) -> np.ndarray:
    """Control points of a curve entering and leaving the image through two random borders (pixel units)."""
    ny, nx = shape[1], shape[2]

    def border_point():
        t, side = rng.uniform(0, 1), int(rng.integers(4))
        return [(0, t * ny, -5), (0, t * ny, nx + 5), (0, -5, t * nx), (0, ny + 5, t * nx)][side]

    p0, p3 = np.array(border_point(), float), np.array(border_point(), float)
    mid = [np.array([0, rng.uniform(0.15, 0.85) * ny, rng.uniform(0.15, 0.85) * nx]) for _ in range(2)]
    return np.array([p0, *mid, p3])


def _tissue_2d(rng, shape, grid, points) -> np.ndarray:
    """The tissue map of one 2D field: fibres, vessels, cells with nuclei, debris."""
    tissue = np.zeros(shape, np.uint8)
    for _ in range(int(rng.integers(4, 8))):  # thin fibres, as dim as cytoplasm or as bright as nuclei and vessels
        fibre = _tube(points, shape, _bezier(_crossing_curve(rng, shape)), _varying_radius(rng, 0.9, 1.5))
        tissue[fibre] = DIM if rng.random() < 0.6 else BRIGHT
    vessels = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 3))):
        vessels |= _tube(points, shape, _bezier(_crossing_curve(rng, shape)), _varying_radius(rng, 3.0, 4.5))
    tissue[vessels] = VESSEL
    spacing = (1.0, 1.0, 1.0)
    room = _room(~vessels, spacing)
    for _ in range(int(rng.integers(5, 9))):
        r = rng.uniform(8.0, 13.0)
        where = _pick(rng, room > r + 2, grid)
        if where is None:
            continue
        cell = _blob(grid, where, (1, r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)), rng, 0.15, rng.uniform(0, 3.2))
        cell &= room > 1
        tissue[cell] = CYTO
        offset = np.array([0, *rng.normal(0, 0.15 * r, 2)])
        tissue[cell & _blob(grid, where + offset, (1, 0.42 * r, 0.42 * r * rng.uniform(0.8, 1.2)), rng, 0.1)] = NUCLEUS
        room = np.minimum(room, _room(~cell, spacing))
    for _ in range(int(rng.integers(8, 15))):
        r = rng.uniform(2.0, 3.5)
        where = _pick(rng, room > r + 2, grid)
        if where is not None:
            debris = _blob(grid, where, (1, r, r), rng, 0.1)
            tissue[debris] = BRIGHT if rng.random() < 0.5 else DIM
            room = np.minimum(room, _room(~debris, spacing))
    return tissue


# ----------------------------------------------------------------------------------------------- dataset
def case_rng(seed: int, dim: int, split: int, index: int) -> np.random.Generator:
    """The generator of one case; independent of how many other cases are made."""
    return np.random.default_rng([seed, dim, split, index])


def case_ids(num_train: int, num_test: int) -> tuple[list[str], list[str]]:
    return [f"synth_tr{i:03d}" for i in range(num_train)], [f"synth_ts{i:03d}" for i in range(num_test)]


def _refuse_existing(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise SegforgeError(f"{out_dir}: exists and is not a folder; refusing to overwrite it. "
                            "Fix: choose a new output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise SegforgeError(f"{out_dir}: folder exists and is not empty; refusing to write the synthetic dataset "
                            "into it (nothing existing is overwritten). Fix: choose a new output folder or remove it")


def generate_dataset(out_dir: Path, dim: int = 3, num_train: int = 24, num_test: int = 6, seed: int = 0) -> Path:
    """Write the synthetic dataset to ``out_dir`` atomically and return ``out_dir``.

    The whole folder appears at once (built in a hidden sibling folder, then renamed). Raises ``SegforgeError``
    when ``out_dir`` exists and is not an empty folder, or when the arguments are invalid.
    """
    out_dir = Path(out_dir)
    if dim not in (2, 3):
        raise SegforgeError(f"dim must be 2 or 3, got {dim}")
    if num_train < 1 or num_test < 0 or seed < 0:
        raise SegforgeError(f"need num_train >= 1, num_test >= 0 and seed >= 0; got {num_train}, {num_test}, {seed}")
    _refuse_existing(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    start = time.perf_counter()
    try:
        ending = ".nii.gz" if dim == 3 else ".png"
        make = make_case_3d if dim == 3 else make_case_2d
        train_ids, test_ids = case_ids(num_train, num_test)
        for split, ids, sub in ((TRAIN, train_ids, "Tr"), (TEST, test_ids, "Ts")):
            for index, case_id in enumerate(ids):
                image, label, geometry = make(case_rng(seed, dim, split, index))
                write_image(tmp / f"images{sub}" / f"{case_id}_0000{ending}", image, geometry)
                write_image(tmp / f"labels{sub}" / f"{case_id}{ending}", label, geometry)
        dataset_json = {
            "name": f"SegforgeSynthetic{dim}D",
            "description": DEMO_MARKER + ": " + ("abdomen-like T1 MRI slabs" if dim == 3
                                                          else "tissue-like fluorescence fields"),
            "channel_names": {"0": CHANNEL_3D if dim == 3 else CHANNEL_2D},
            "labels": dict(LABELS_3D if dim == 3 else LABELS_2D),
            "numTraining": num_train,
            "numTest": num_test,
            "file_ending": ending,
            "generator": {"module": __name__, "version": GENERATOR_VERSION, "dim": dim, "seed": seed},
        }
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
        _refuse_existing(out_dir)
        try:
            os.replace(tmp, out_dir)  # POSIX: also replaces an empty folder; fails if one became non-empty
        except OSError as exc:
            if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
                out_dir.rmdir()  # platforms where rename cannot replace an empty folder
                os.replace(tmp, out_dir)
            else:
                raise SegforgeError(f"{out_dir}: cannot move the generated dataset into place ({exc}); "
                                    "nothing there was changed. Fix: choose a new output folder") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("wrote %d+%d synthetic %dD cases to %s in %.1f s", num_train, num_test, dim, out_dir,
             time.perf_counter() - start)
    return out_dir
