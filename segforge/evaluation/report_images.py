"""The pictures of ``segforge report``: three orthogonal slices of a case through the largest disagreement between
prediction and reference, drawn as image / prediction / reference overlays (PNG bytes), and training curves from
the CSV logs when a fold has no ``progress.png``.

Memory is bounded by one volume at a time, whatever the case's size: the masks are compared in chunks of slices,
only the three chosen slices of each volume are kept, and a slice is resampled to square pixels (by its spacing)
of at most ``max_px`` on its long side before it is encoded.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segforge.io.image import read_image

AXIS_NAMES = ("axial", "coronal", "sagittal")  # the view along array axis 0 (z), 1 (y), 2 (x)
# tab10's colours: distinct on a grey image; label value v > 0 takes PALETTE[(v - 1) % 10]
PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]], np.uint8)
CHUNK = 16  # slices compared at a time (a 512 x 512 CT: a few MB per chunk)


def colour(value: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in PALETTE[(int(value) - 1) % len(PALETTE)])


@dataclass
class View:
    """One orthogonal slice of a case: its axis, index, disagreeing voxels and the three panels as PNG bytes."""

    axis: int
    index: int
    disagreeing: int
    panels: dict  # "image" (absent without an image), "prediction", "reference" -> PNG bytes

    @property
    def name(self) -> str:
        return AXIS_NAMES[self.axis]


def shown_axes(shape) -> list[int]:
    """The axes along which a slice is a picture (the other two axes longer than one voxel): a 2D image's (1, y, x)
    has one view, a volume three."""
    return [a for a in range(3) if all(shape[b] > 1 for b in range(3) if b != a)]


def disagreement_slices(prediction: np.ndarray, reference: np.ndarray, ignore: int | None = None) -> tuple[list[int], list[int]]:
    """Per axis, the slice index with the most voxels where prediction != reference (ignore-label voxels excluded),
    and those counts. Where they agree everywhere: the centre of their foreground (of the volume, without one)."""
    differ = [np.zeros(n, np.int64) for n in prediction.shape]
    fore = [np.zeros(n, np.int64) for n in prediction.shape]
    for start in range(0, prediction.shape[0], CHUNK):
        p, r = prediction[start:start + CHUNK], reference[start:start + CHUNK]
        d = p != r
        if ignore is not None:
            d &= r != ignore
        f = (p > 0) | ((r > 0) & (r != ignore) if ignore is not None else r > 0)
        for counts, mask in ((differ, d), (fore, f)):
            counts[0][start:start + len(p)] += mask.sum(axis=(1, 2))
            counts[1] += mask.sum(axis=(0, 2))
            counts[2] += mask.sum(axis=(0, 1))
    if differ[0].sum():
        indices = [int(np.argmax(c)) for c in differ]
    elif fore[0].sum():
        indices = [int(np.floor(float(np.dot(np.arange(len(c)), c)) / c.sum() + 0.5)) for c in fore]
    else:
        indices = [n // 2 for n in prediction.shape]
    return indices, [int(differ[a][i]) for a, i in enumerate(indices)]


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice, rows from high to low z for the views that contain z (the head end on top)."""
    plane = np.take(volume, index, axis=axis)
    return np.ascontiguousarray(plane[::-1] if axis != 0 else plane)


def _plane_spacing(spacing, axis: int) -> tuple[float, float]:
    rest = [float(spacing[a]) for a in range(3) if a != axis]
    return rest[0], rest[1]


def output_size(shape2d, spacing2d, max_px: int = 512, min_px: int = 160) -> tuple[int, int]:
    """Rows and columns of the drawn slice: square pixels in world units, long side at most ``max_px`` (and small
    slices enlarged to about ``min_px``, at most 4x, so that a 32-voxel case is visible)."""
    rows, cols = shape2d
    sr, sc = spacing2d
    unit = min(sr, sc)
    h, w = rows * sr / unit, cols * sc / unit
    scale = min(max_px / max(h, w), max(1.0, min(4.0, min_px / max(h, w))))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def resize_nearest(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    rows = np.minimum((np.arange(size[0]) + 0.5) * plane.shape[0] / size[0], plane.shape[0] - 1).astype(np.intp)
    cols = np.minimum((np.arange(size[1]) + 0.5) * plane.shape[1] / size[1], plane.shape[1] - 1).astype(np.intp)
    return plane[rows][:, cols]


def grey(planes: list[np.ndarray]) -> list[np.ndarray]:
    """Image slices as uint8, one window for all of a case's slices (0.5th to 99.5th percentile of their voxels)."""
    values = np.concatenate([p[np.isfinite(p)].ravel() for p in planes]) if planes else np.zeros(1)
    low, high = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    span = float(high - low) or 1.0
    return [(np.clip((np.nan_to_num(p.astype(np.float32), nan=low) - low) / span, 0, 1) * 255).astype(np.uint8)
            for p in planes]


def overlay(background: np.ndarray | None, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB: the label colours over the grey ``background`` (opaque over black where there is none)."""
    base = np.zeros(labels.shape + (3,), np.float32) if background is None else \
        np.repeat(background[..., None], 3, axis=2).astype(np.float32)
    weight = alpha if background is not None else 1.0
    for value in np.unique(labels):
        if value <= 0:
            continue
        mask = labels == value
        base[mask] = (1 - weight) * base[mask] + weight * np.asarray(colour(value), np.float32)
    return base.clip(0, 255).astype(np.uint8)


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def case_views(prediction_path: Path, reference_path: Path, image_path: Path | None, ignore: int | None = None,
               max_px: int = 512) -> tuple[list[View], str | None]:
    """The views of one case (see module docstring) and, where the image is not drawn, why. Reads the prediction
    and the reference, keeps their slices and drops them, then the same for the image (its first channel), if any."""
    prediction, _ = read_image(prediction_path)
    reference, geometry = read_image(reference_path)
    if prediction.shape != reference.shape:
        raise ValueError(f"{prediction_path}: shape {prediction.shape} differs from the reference's {reference.shape}")
    shape = reference.shape
    indices, counts = disagreement_slices(prediction, reference, ignore)
    axes = shown_axes(shape)
    pred_planes = [take_slice(prediction, a, indices[a]) for a in axes]
    ref_planes = [take_slice(reference, a, indices[a]) for a in axes]
    if ignore is not None:  # the ignore label is no class: not drawn
        ref_planes = [np.where(p == ignore, 0, p) for p in ref_planes]
    del prediction, reference
    image_planes, note = None, None if image_path is not None else "no image found"
    if image_path is not None:
        image, _ = read_image(image_path)
        if image.shape == shape:
            image_planes = grey([take_slice(image, a, indices[a]) for a in axes])
        else:
            note = f"{image_path}: shape {image.shape} is not the masks' {shape}"
        del image
    views = []
    for k, axis in enumerate(axes):
        size = output_size(ref_planes[k].shape, _plane_spacing(geometry.spacing, axis), max_px)
        background = resize_nearest(image_planes[k], size) if image_planes is not None else None
        panels = {} if background is None else {"image": png(background)}
        panels["prediction"] = png(overlay(background, resize_nearest(pred_planes[k], size)))
        panels["reference"] = png(overlay(background, resize_nearest(ref_planes[k], size)))
        views.append(View(axis, indices[axis], counts[axis], panels))
    return views, note


def curves_from_logs(log_dir: Path) -> bytes | None:
    """A PNG of the per-epoch curves of Lightning's CSV logs (``logs/version_*/metrics.csv``, versions in order:
    a resumed run continues the curves), or None when there are none."""
    files = sorted(Path(log_dir).glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])
                   if p.parent.name.split("_")[-1].isdigit() else -1)
    per_epoch: dict[str, dict[int, float]] = {}
    for path in files:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                epoch = row.get("epoch")
                if not epoch:
                    continue
                for key, value in row.items():
                    if key in ("epoch", "step") or key.endswith("_step") or not value:
                        continue
                    try:
                        per_epoch.setdefault(key, {})[int(float(epoch))] = float(value)
                    except ValueError:
                        continue
    if not per_epoch:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    losses = sorted(k for k in per_epoch if "loss" in k)
    others = sorted(k for k in per_epoch if k not in losses and k != "lr")
    groups = [g for g in (losses, others, ["lr"] if "lr" in per_epoch else []) if g]
    figure = Figure(figsize=(4.2 * len(groups), 3.2), dpi=100)
    for i, group in enumerate(groups):
        ax = figure.add_subplot(1, len(groups), i + 1)
        for key in group:
            epochs = sorted(per_epoch[key])
            ax.plot(epochs, [per_epoch[key][e] for e in epochs], label=key, marker="." if len(epochs) < 30 else None)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
