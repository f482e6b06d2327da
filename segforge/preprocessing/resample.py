"""Resample images, labels and class probabilities between voxel grids: separable, one axis at a time, in torch.

Written here rather than taken from MONAI (``Spacingd``) or nnU-Net (skimage ``resize``) for three reasons:

* speed: a separable cubic is 4 taps per axis (12 per voxel in 3D), not a prefiltered 64-tap spline;
* memory: no float64 and no stack of per-class volumes: the peak is a few times the volume, whatever its size;
* labels: each class is interpolated only inside its bounding box, and the most common value (background) follows
  from the partition of unity (1 - the other scores), so a many-class CT costs what its structures cover.

Modes per axis: ``cubic`` (Keys' cubic convolution, a = -0.75, the kernel of torch's bicubic), ``linear``,
``nearest``, and ``spline`` (scipy's cubic B-spline with prefilter and edge mode, output clipped to the input's range:
what nnU-Net's ``resize(order=3)`` computes, so imported nnU-Net models see the intensities they were trained on;
slower, for those models). Labels: every class's indicator is interpolated linearly and each voxel takes the class of highest
score (ties go to the higher value, so a thin structure beats background), which keeps thin structures that
nearest-neighbour resampling breaks. Anisotropic data: when the coarsest axis is more than ``separate_axis_threshold``
times the finest (in the input, else the target spacing), the coarsest axis is resampled on its own with
``across_slices`` (``nearest``, as nnU-Net, or ``linear``), so structures are not smeared across slices. A ``None`` target spacing keeps that axis
(2D configurations keep each case's slices).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from segforge.configs import packaged_defaults

MODES = ("cubic", "linear", "nearest", "spline")


def shape_at_spacing(shape: list[int], spacing: list[float], target: list[float | None]) -> list[int]:
    return [s if t is None else max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target)]


def separate_axis(spacing: Sequence[float], target: Sequence[float | None], threshold: float) -> int | None:
    """The axis to resample on its own (nnU-Net v2's ``determine_do_sep_z_and_axis``): when the input spacing's
    max/min exceeds ``threshold`` (else the target's), the axis whose spacing equals that maximum; None when no
    spacing is that anisotropic or when more than one axis shares the maximum."""
    for candidate in (list(spacing), [s if t is None else t for s, t in zip(spacing, target)]):
        values = np.asarray(candidate, float)
        if values.max() / values.min() > threshold:
            coarsest = np.flatnonzero(values.max() / values == 1)
            return int(coarsest[0]) if len(coarsest) == 1 else None
    return None


def with_default_rules(settings: dict | None) -> dict:
    """``settings`` (a plan's or the config's ``resampling``) over ``plan.resampling`` of configs/plan/default.yaml:
    what a plans.json written before the rules were recorded in it is resampled with."""
    return {**packaged_defaults("plan")["resampling"], **(settings or {})}


def resampling_modes(spacing: Sequence[float], target: Sequence[float | None], settings: dict | None = None) -> dict:
    """Per-axis modes for the image, the label and probabilities of one case, and the separate axis if any."""
    settings = with_default_rules(settings)
    for key in ("image", "probabilities", "across_slices"):
        if settings[key] not in MODES:
            raise ValueError(f"resampling.{key}={settings[key]!r}; use one of {', '.join(MODES)}")
    if "spline" in (settings["probabilities"], settings["across_slices"]):
        raise ValueError("resampling: spline is for images only; probabilities and across_slices take cubic, linear or nearest")
    if settings["label"] not in ("linear", "nearest"):
        raise ValueError(f"resampling.label={settings['label']!r}; use linear (one-hot) or nearest")
    axis = separate_axis(spacing, target, float(settings["separate_axis_threshold"]))

    def per_axis(mode: str) -> list[str]:
        across = "nearest" if settings["across_slices"] == "nearest" or mode == "nearest" else "linear"
        return [across if a == axis else mode for a in range(len(spacing))]

    return {"separate_axis": axis, "image": per_axis(settings["image"]), "label": per_axis(settings["label"]),
            "probabilities": per_axis(settings["probabilities"])}


# ---- one axis --------------------------------------------------------------------------------------------------


def _cubic_weights(t: torch.Tensor, a: float = -0.75) -> torch.Tensor:
    """Keys' cubic convolution weights of the taps at -1, 0, 1, 2 for fractional offsets ``t``; (n, 4)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)


def axis_taps(n_in: int, n_out: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices ``(n_out, taps)`` and weights for resampling one axis of ``n_in`` samples to ``n_out``.

    Sample centres are aligned (``align_corners=False``); indices past the ends are clamped to the edge, exactly as
    torch's ``interpolate`` does for each mode ("nearest" is its ``nearest-exact``).
    """
    scale = n_in / n_out
    out = torch.arange(n_out, dtype=torch.float64)
    if mode == "nearest":
        index = torch.clamp(torch.floor((out + 0.5) * scale), max=n_in - 1).long()
        return index[:, None], torch.ones(n_out, 1)
    source = (out + 0.5) * scale - 0.5
    if mode == "linear":
        source = torch.clamp(source, min=0)
        low = torch.floor(source)
        frac = source - low
        index = torch.stack([low, low + 1], dim=1).long()
        weights = torch.stack([1 - frac, frac], dim=1)
    elif mode == "cubic":
        low = torch.floor(source)
        index = (low[:, None] + torch.arange(-1, 3, dtype=torch.float64)).long()
        weights = _cubic_weights(source - low)
    else:
        raise ValueError(f"unknown resampling mode {mode!r}; use one of {', '.join(MODES)}")
    return torch.clamp(index, 0, n_in - 1), weights.float()


def resample_axis(x: torch.Tensor, axis: int, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``x`` resampled along ``axis`` by the taps of ``axis_taps`` (float32): one output slice at a time, each a
    weighted sum of whole source slices, so the only memory besides the output is one contiguous copy of ``x``."""
    moved = x.movedim(axis, 0).contiguous()
    out = torch.empty((index.shape[0], *moved.shape[1:]), dtype=torch.float32, device=x.device)
    rows, taps = index.tolist(), weights.tolist()
    for k, (source, weight) in enumerate(zip(rows, taps)):
        torch.mul(moved[source[0]], weight[0], out=out[k])
        for i, w in zip(source[1:], weight[1:]):
            if w != 0.0:
                out[k].add_(moved[i], alpha=w)
    return out.movedim(0, axis)


_NATIVE = {"nearest": "nearest-exact", "linear": "bilinear", "cubic": "bicubic"}


def _resample_inner(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """The last two axes through torch's native 2D kernel (the same taps as ``axis_taps``, pinned by a test)."""
    shape = x.shape
    flat = x.reshape(1, -1, *shape[-2:])
    out = torch.nn.functional.interpolate(flat, size=[int(s) for s in size], mode=_NATIVE[mode],
                                          align_corners=None if mode == "nearest" else False)
    return out.reshape(*shape[:-2], *size)


def resample(x: torch.Tensor, new_shape: Sequence[int], modes: Sequence[str]) -> torch.Tensor:
    """Resample the trailing ``len(new_shape)`` axes of float ``x``; the shrinking step goes first.

    The last two axes go through torch's native 2D interpolation (together when they share a mode), a leading
    third one through ``resample_axis``.
    """
    x = x if x.dtype == torch.float32 else x.float()
    n = len(new_shape)
    lead = x.ndim - n
    new_shape = [int(s) for s in new_shape]
    steps = []
    if n >= 3 and x.shape[lead] != new_shape[0]:
        steps.append(("outer", new_shape[0] / x.shape[lead]))
    inner = list(range(max(0, n - 2), n))
    changed = [a for a in inner if x.shape[lead + a] != new_shape[a]]
    if changed:
        ratio = float(np.prod([new_shape[a] / x.shape[lead + a] for a in changed]))
        if len(inner) == 2 and modes[inner[0]] != modes[inner[1]]:
            steps += [(("axis", a), new_shape[a] / x.shape[lead + a]) for a in changed]
        else:
            steps.append(("inner", ratio))
    for step, _ in sorted(steps, key=lambda s: s[1]):
        if step == "outer":
            x = resample_axis(x, lead, *axis_taps(x.shape[lead], new_shape[0], modes[0]))
        elif step == "inner":
            if len(inner) == 1:  # a 1D signal: give it a unit axis
                x = _resample_inner(x.unsqueeze(-2), [1, new_shape[-1]], modes[-1]).squeeze(-2)
            else:
                x = _resample_inner(x, new_shape[-2:], modes[-1])
        else:
            a = step[1]
            size = [x.shape[lead + b] if b != a else new_shape[a] for b in inner]
            x = _resample_inner(x, size, modes[a])
    return x.contiguous()


# ---- images, labels, probabilities -----------------------------------------------------------------------------


def _spline(image: np.ndarray, new_shape: list[int], modes: Sequence[str]) -> np.ndarray:
    """The ``spline`` axes of ``(c, *spatial)`` resampled as nnU-Net/skimage do (zoom 1 leaves an axis as it is)."""
    from scipy import ndimage

    zoom = [new_shape[a] / image.shape[1 + a] if m == "spline" else 1.0 for a, m in enumerate(modes)]
    # skimage clips to its input's range, and nnU-Net resizes slice by slice along a separate (non-spline) axis:
    # the range is then each slice's, not the volume's
    resized = tuple(a for a, m in enumerate(modes) if m == "spline")
    out = []
    for channel in image:
        low, high = channel.min(axis=resized, keepdims=True), channel.max(axis=resized, keepdims=True)
        zoomed = ndimage.zoom(np.asarray(channel, np.float32), zoom, order=3, mode="nearest", grid_mode=True)
        out.append(np.clip(zoomed, low, high))
    return np.stack(out)


def resample_image(image: np.ndarray, new_shape: list[int], modes: Sequence[str] | None = None) -> np.ndarray:
    """``(c, z, y, x)`` image (any strides) to ``new_shape`` (spatial); cubic on every axis unless ``modes`` say."""
    modes = list(modes or ["cubic"] * len(new_shape))
    if list(image.shape[1:]) == list(new_shape):
        return np.ascontiguousarray(image, dtype=np.float32)
    if "spline" in modes:  # those axes first (in-plane, as nnU-Net), the others by the torch path below
        image = _spline(image, new_shape, modes)
        modes = ["nearest" if m == "spline" else m for m in modes]  # sizes already match: nothing more happens there
        if list(image.shape[1:]) == list(new_shape):
            return image
    with torch.no_grad():
        tensor = torch.from_numpy(image if image.dtype == np.float32 else image.astype(np.float32))
        return resample(tensor, new_shape, modes).numpy()


def _window(index: torch.Tensor, low: int, high: int) -> tuple[int, int, int, int] | None:
    """Output range whose taps touch input ``[low, high)`` and the input range those outputs read."""
    touches = (index >= low).any(1) & (index < high).any(1)
    hits = torch.nonzero(touches).flatten()
    if not len(hits):
        return None
    out0, out1 = int(hits[0]), int(hits[-1]) + 1
    rows = index[out0:out1]
    return out0, out1, int(rows.min()), int(rows.max()) + 1


def label_values(label: torch.Tensor) -> tuple[list[int], int]:
    """The values present in the integer ``label`` (ascending) and the most common one (the lowest of a tie)."""
    flat = label.reshape(-1)
    low = int(flat.min())
    counts = torch.bincount(flat - low if low else flat)
    return (torch.nonzero(counts).flatten() + low).tolist(), int(torch.argmax(counts)) + low


class LabelVote:
    """The indicator-argmax of a resampled label, shared by grid resampling here and the augmentation's warp
    (``training/spatial.py``): every value's interpolated indicator is its score and each voxel takes the value of
    highest score (ties go to the later, higher value, so a thin structure beats background). The most common value
    (``base``) is never interpolated: its score is 1 minus the sum of the others' (the indicators sum to one)."""

    def __init__(self, shape, base: int, dtype: torch.dtype, device=None):
        self.base = base
        self.labels = torch.full(list(shape), base, dtype=dtype, device=device)
        self.best = torch.zeros(list(shape), device=device)
        self.total = torch.zeros(list(shape), device=device)

    def add(self, value: int, score: torch.Tensor, region=...) -> None:
        """The score of ``value`` over ``region`` (a box of the output; default all of it); add values ascending."""
        best = self.best[region]
        better = score >= best
        self.labels[region][better] = value
        self.best[region] = torch.where(better, score, best)
        self.total[region] += score

    def result(self) -> torch.Tensor:
        self.labels[(1 - self.total) > self.best] = self.base
        return self.labels


def resample_label(label: np.ndarray, new_shape: list[int], values: Sequence[int] | None = None,
                   modes: Sequence[str] | None = None) -> np.ndarray:
    """``(z, y, x)`` integer label to ``new_shape``: nearest axes first (exact selection), then the classes' indicators
    interpolated linearly inside their boxes and an argmax (see module docstring). ``values`` is unused (every value
    present is kept) and stays for callers that pass the dataset's label values."""
    modes = list(modes or ["linear"] * len(new_shape))
    dtype = label.dtype if label.dtype.kind in "iu" else np.int16
    if list(label.shape) == list(new_shape):
        return np.ascontiguousarray(label, dtype=dtype)
    with torch.no_grad():
        current = torch.from_numpy(np.ascontiguousarray(label).astype(np.int32, copy=False))
        for a, mode in enumerate(modes):  # nearest axes: pick source slices, no new values possible
            if mode == "nearest" and current.shape[a] != new_shape[a]:
                current = current.index_select(a, axis_taps(current.shape[a], int(new_shape[a]), "nearest")[0][:, 0])
        linear = [a for a in range(len(new_shape)) if current.shape[a] != new_shape[a]]
        if not linear:
            return current.numpy().astype(dtype)
        present, base = label_values(current)
        current = current.numpy()
        taps = {a: axis_taps(current.shape[a], int(new_shape[a]), "linear") for a in linear}
        vote = LabelVote(new_shape, base, torch.int32)
        boxes = _boxes(current, [v for v in present if v != base])
        for value, box in boxes:
            out_slices, in_slices, axis_taps_rel = [], [], {}
            for a in range(len(new_shape)):
                if a in taps:
                    window = _window(taps[a][0], box[a].start, box[a].stop)
                    if window is None:
                        break
                    o0, o1, i0, i1 = window
                    axis_taps_rel[a] = (taps[a][0][o0:o1] - i0, taps[a][1][o0:o1])
                else:
                    o0, o1, i0, i1 = box[a].start, box[a].stop, box[a].start, box[a].stop
                out_slices.append(slice(o0, o1))
                in_slices.append(slice(i0, i1))
            else:
                score = torch.from_numpy((current[tuple(in_slices)] == value).astype(np.float32))
                for a, (index, weights) in axis_taps_rel.items():
                    score = resample_axis(score, a, index, weights)
                vote.add(value, score, tuple(out_slices))
        return vote.result().numpy().astype(dtype)


def _boxes(label: np.ndarray, values: list[int]) -> list[tuple[int, tuple[slice, ...]]]:
    """``(value, bounding box)`` of each value in ``values`` that occurs (one pass for non-negative labels)."""
    from scipy import ndimage

    values = sorted(values)
    positive = [v for v in values if v > 0]
    found = []
    if positive:  # one pass over the label for every positive value
        found = ndimage.find_objects(label if label.min() >= 0 else np.maximum(label, 0), max_label=positive[-1])
    out = []
    for v in values:
        box = found[v - 1] if v > 0 else ndimage.find_objects((label == v).astype(np.int8))[0]
        if box is not None:
            out.append((v, box))
    return out


def resample_probabilities(probabilities: torch.Tensor, new_shape: list[int], modes: Sequence[str] | None = None) -> torch.Tensor:
    """``(classes, *spatial)`` probabilities or logits to ``new_shape`` (the inverse step at prediction)."""
    with torch.no_grad():
        return resample(probabilities.float(), new_shape, list(modes or ["linear"] * len(new_shape)))
