"""Training patches from memory-mapped preprocessed cases: the case and the centre (with foreground oversampling),
the random parameters, and the crop each patch needs; plus a sampler that gives every sample its own seed.

Written here rather than taken from MONAI's patch datasets because patches are read straight from memory-mapped
``.npy`` arrays (no case is decompressed or loaded whole), only the box a spatial transform actually reads is
copied, and foreground oversampling uses the locations stored by preprocessing.

Without labels (``with_labels=False``: an unlabelled dataset, or a task that needs none) no label is read, the
patch centre is uniform (no foreground oversampling) and samples carry ``label=None``.

Reproducibility: sample ``uid`` draws everything from ``default_rng([seed, uid])``; ``PatchIndexSampler`` hands
rank ``r`` of ``w`` in epoch ``e`` the uids ``((e * w + r) * n + i)``, so patches differ across ranks and epochs and
are the same whatever the number of loader workers, and a resumed run continues the same sequence.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from segforge.errors import SegforgeError
from segforge.training.augment import AugmentationSettings, Augmenter, PatchGeometry, draw_intensity, draw_spatial
from segforge.training.spatial import source_box


def crop_with_padding(array: np.ndarray, start: list[int], size: list[int], fill=0) -> np.ndarray:
    """``array[..., start:start+size]`` over the trailing axes, padded with ``fill`` where it leaves the array."""
    spatial = array.shape[-len(size):]
    src, dst = [], []
    for s0, n, full in zip(start, size, spatial):
        lo, hi = max(s0, 0), min(s0 + n, full)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s0, lo - s0 + max(0, hi - lo)))
    out = np.full(array.shape[: array.ndim - len(size)] + tuple(size), fill, dtype=array.dtype)
    lead = (slice(None),) * (array.ndim - len(size))
    out[lead + tuple(dst)] = array[lead + tuple(src)]
    return out


def choose_patch_start(shape: list[int], patch: list[int], rng: np.random.Generator, centre=None) -> list[int]:
    """Patch origin: uniform over all placements, or around ``centre``; patches may overhang small images."""
    start = []
    for axis, (s, p) in enumerate(zip(shape, patch)):
        lo, hi = min(0, s - p), max(0, s - p)
        if centre is None:
            start.append(int(rng.integers(lo, hi + 1)))
        else:
            start.append(int(np.clip(centre[axis] - p // 2, lo, hi)))
    return start


class PatchIndexSampler(Sampler[int]):
    """``num_samples`` sample uids per epoch for one rank (see module docstring); ``deterministic`` repeats epoch 0
    (validation). It shards by itself, so the trainer must not wrap it (``use_distributed_sampler=False``)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, deterministic: bool = False):
        self.num_samples, self.rank, self.world_size, self.deterministic = int(num_samples), int(rank), int(world_size), deterministic
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        epoch = 0 if self.deterministic else self.epoch
        first = (epoch * self.world_size + self.rank) * self.num_samples
        return iter(range(first, first + self.num_samples))

    def __len__(self) -> int:
        return self.num_samples


class _Case:
    """One preprocessed case: memory maps of image and label, and its foreground locations grouped by class
    (without ``with_labels``: the image only, no locations)."""

    def __init__(self, folder: Path, case_id: str, with_labels: bool = True, previous: Path | None = None):
        self.data = np.load(folder / f"{case_id}.npy", mmap_mode="r", allow_pickle=False)
        self.seg = np.load(folder / f"{case_id}_seg.npy", mmap_mode="r", allow_pickle=False) if with_labels else None
        # a cascade stage's previous-stage prediction, on this grid (training/cascade.py)
        self.previous = np.load(previous, mmap_mode="r", allow_pickle=False) if previous is not None else None
        if self.previous is not None and self.previous.shape != self.data.shape[1:]:
            raise SegforgeError(f"{previous}: shape {list(self.previous.shape)}, but the preprocessed case "
                                f"{folder / case_id}.npy has {list(self.data.shape[1:])}: the previous stage predicted "
                                "it for another plan. Fix: re-run the previous stage's training (its final validation "
                                "writes these) after `segforge preprocess`")
        self.locations = np.load(folder / f"{case_id}_locations.npy", mmap_mode="r", allow_pickle=False) \
            if with_labels else np.zeros((0, 4), np.int32)
        classes = np.asarray(self.locations[:, 0]) if len(self.locations) else np.zeros(0, np.int32)
        # rows are sorted by class: one contiguous block per class
        values, starts = np.unique(classes, return_index=True)
        ends = list(starts[1:]) + [len(classes)]
        self.blocks = [(int(s), int(e)) for s, e in zip(starts, ends)]

    def random_foreground(self, rng: np.random.Generator) -> list[int] | None:
        if not self.blocks:
            return None
        start, end = self.blocks[int(rng.integers(len(self.blocks)))]
        return [int(v) for v in self.locations[int(rng.integers(start, end)), 1:]]


class PatchDataset(Dataset):
    """Sample ``uid`` -> one patch's crop and random parameters (collated by ``collate_patches``).

    For 2D configurations (``dims == 2``) a slice of a 3D case is taken: the foreground voxel's, or a random one.
    Without ``settings`` (validation) every sample is a plain crop.
    """

    def __init__(self, folder: Path, case_ids: list[str], patch_size: list[int], dims: int, oversampling: float,
                 settings: AugmentationSettings | None, geometry: PatchGeometry, seed: int, with_labels: bool = True,
                 previous: dict[str, Path] | None = None):
        """``previous``: case -> its previous-stage prediction (a cascade stage), cropped and warped as the label."""
        self.folder, self.case_ids, self.dims = Path(folder), list(case_ids), dims
        self.previous = previous
        self.patch = [int(p) for p in patch_size]
        self.oversampling, self.settings, self.geometry, self.seed = oversampling, settings, geometry, seed
        self.with_labels = with_labels
        self._cases: dict[str, _Case] = {}
        if not self.case_ids:
            raise ValueError(f"{folder}: no cases to sample patches from")

    def __len__(self) -> int:
        return sys.maxsize  # uids come from PatchIndexSampler

    def _case(self, case_id: str) -> _Case:
        if case_id not in self._cases:  # opening a memory map is cheap; pages are read on demand
            self._cases[case_id] = _Case(self.folder, case_id, self.with_labels,
                                         self.previous[case_id] if self.previous else None)
        return self._cases[case_id]

    def __getitem__(self, uid: int) -> dict:
        rng = np.random.default_rng([self.seed, int(uid)])
        case = self._case(self.case_ids[int(rng.integers(len(self.case_ids)))])
        data, seg, prior = case.data, case.seg, case.previous
        centre = case.random_foreground(rng) if self.oversampling > 0 and rng.random() < self.oversampling else None
        if self.dims == 2:
            z = centre[0] if centre is not None else int(rng.integers(data.shape[1]))
            data, seg = data[:, z], (seg[z] if seg is not None else None)
            prior = prior[z] if prior is not None else None
            centre = centre[1:] if centre is not None else None
        start = choose_patch_start(list(data.shape[1:]), self.patch, rng, centre)
        spatial = draw_spatial(rng, self.settings, self.geometry) if self.settings else {"matrix": None, "mirror": []}
        label = previous = None
        if spatial["matrix"] is None:
            image = crop_with_padding(data, start, self.patch)
            if seg is not None:
                label = crop_with_padding(seg, start, self.patch)
            if prior is not None:
                previous = crop_with_padding(prior, start, self.patch)
            flips = [a for a, m in enumerate(spatial["mirror"]) if m]
            if flips:  # mirroring folds into the copy
                image = np.flip(image, [a + 1 for a in flips])
                label = np.flip(label, flips) if label is not None else None
                previous = np.flip(previous, flips) if previous is not None else None
            matrix, offset, elastic = torch.zeros(0), torch.zeros(0), torch.zeros(0)
        else:
            centre_f = np.asarray(start, float) + (np.asarray(self.patch, float) - 1) / 2
            box_start, box_size = source_box(centre_f, spatial["matrix"], self.patch, spatial["elastic_max"])
            image = crop_with_padding(data, box_start, box_size)
            if seg is not None:
                label = crop_with_padding(seg, box_start, box_size)
            if prior is not None:
                previous = crop_with_padding(prior, box_start, box_size)
            matrix = torch.from_numpy(spatial["matrix"].astype(np.float32))
            offset = torch.from_numpy((centre_f - np.asarray(box_start)).astype(np.float32))
            elastic = torch.from_numpy(spatial["elastic"]) if spatial["elastic"] is not None else torch.zeros(0)
        params = draw_intensity(rng, self.settings, image.shape[0], self.dims) if self.settings else None
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int16))[None] if label is not None else None,
                "previous": torch.from_numpy(np.ascontiguousarray(previous, dtype=np.int16))[None]
                if previous is not None else None,
                "matrix": matrix, "offset": offset, "elastic": elastic, "params": params,
                "seed": int(rng.integers(2**62))}


def collate_patches(samples: list[dict]) -> dict:
    """Per-sample tensors stay lists (crops differ in size); parameters are stacked per name."""
    batch = {key: [s.get(key) for s in samples] for key in ("image", "label", "previous", "matrix", "offset", "elastic")}
    if batch["previous"][0] is None:
        del batch["previous"]
    batch["seed"] = torch.tensor([s["seed"] for s in samples], dtype=torch.int64)
    if samples[0]["params"] is not None:
        batch["params"] = {key: torch.from_numpy(np.stack([s["params"][key] for s in samples]))
                           for key in samples[0]["params"]}
    return batch


class PatchCollate:
    """The loader's ``collate_fn``: collate, then (when augmentation runs in the workers) augment on the CPU."""

    def __init__(self, augmenter: Augmenter | None):
        self.augmenter = augmenter

    def __call__(self, samples: list[dict]):
        batch = collate_patches(samples)
        if self.augmenter is None:
            return batch
        with torch.no_grad():
            return self.augmenter(batch)
