"""Training data: cross-validation splits, random patches with foreground oversampling, and the DataModule.

Written here rather than taken from MONAI's dataset classes because patches are read straight from memory-mapped
preprocessed arrays (no case is ever decompressed or loaded whole) and foreground oversampling uses the stored
voxel locations, which is what keeps data loading off the critical path on a 2-core machine.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from segforge.training.augment import augment_patch


def make_splits(case_ids: list[str], num_folds: int, seed: int) -> list[dict]:
    """Seeded k-fold split: ``[{"train": [...], "val": [...]}, ...]`` (every case validated exactly once)."""
    ids = sorted(case_ids)
    if len(ids) < num_folds:
        raise ValueError(f"{len(ids)} case(s) cannot be split into {num_folds} folds; set num_folds or fold=all")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.array_split(order, num_folds)
    return [{"train": sorted(ids[i] for f in folds[:k] + folds[k + 1:] for i in f), "val": sorted(ids[i] for i in folds[k])}
            for k in range(num_folds)]


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


class PatchDataset(Dataset):
    """``length`` random patches from the preprocessed cases of ``folder``.

    For 2D configurations (``dims == 2``) a random slice of a 3D case is taken and the fake axis dropped.
    ``deterministic`` makes item i the same patch every epoch (validation).
    """

    def __init__(self, folder: Path, case_ids: list[str], patch_size: list[int], dims: int, length: int,
                 oversampling: float, augmentation: dict | None, seed: int, deterministic: bool = False):
        self.folder, self.case_ids, self.dims, self.length = Path(folder), list(case_ids), dims, length
        self.patch = list(patch_size) if dims == 3 else [1] + list(patch_size)
        self.oversampling, self.augmentation, self.seed, self.deterministic = oversampling, augmentation, seed, deterministic
        self._cache: dict[str, tuple] = {}
        self._rng, self._rng_seed = None, None

    def __len__(self) -> int:
        return self.length

    def _case(self, case_id: str):
        if case_id not in self._cache:  # memory maps: opening is cheap, pages are read on demand
            self._cache[case_id] = (
                np.load(self.folder / f"{case_id}.npy", mmap_mode="r", allow_pickle=False),
                np.load(self.folder / f"{case_id}_seg.npy", mmap_mode="r", allow_pickle=False),
                np.load(self.folder / f"{case_id}_locations.npy", allow_pickle=False),
            )
        return self._cache[case_id]

    def _generator(self, index: int) -> np.random.Generator:
        if self.deterministic:
            return np.random.default_rng([self.seed, index])
        # torch re-seeds each worker every epoch; following it gives fresh, reproducible patches per epoch
        if self._rng is None or self._rng_seed != torch.initial_seed():
            self._rng_seed = torch.initial_seed()
            self._rng = np.random.default_rng([self.seed, self._rng_seed % 2**63])
        return self._rng

    def __getitem__(self, index: int):
        rng = self._generator(index)
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        data, seg, locations = self._case(case_id)
        centre = None
        force_foreground = self.oversampling > 0 and (
            (index % 3 == 0) if self.deterministic else rng.random() < self.oversampling)
        if force_foreground and len(locations):
            classes = np.unique(locations[:, 0])
            rows = locations[locations[:, 0] == classes[int(rng.integers(len(classes)))]]
            centre = [int(v) for v in rows[int(rng.integers(len(rows))), 1:]]
        if self.dims == 2:  # one slice: the foreground voxel's, or a random one
            z = centre[0] if centre is not None else int(rng.integers(seg.shape[0]))
            data, seg = data[:, z:z + 1], seg[z:z + 1]
            if centre is not None:
                centre[0] = 0
        start = choose_patch_start(list(seg.shape), self.patch, rng, centre)
        image = crop_with_padding(data, start, self.patch).astype(np.float32)
        label = crop_with_padding(seg, start, self.patch).astype(np.int64)
        if self.dims == 2:
            image, label = image[:, 0], label[0]
        if self.augmentation:
            image, label = augment_patch(image, label, self.augmentation, rng)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(label))[None]


class SegmentationDataModule(L.LightningDataModule):
    """Train and validation patch loaders of one fold; sizes are per rank (the batch size is per device)."""

    def __init__(self, folder: Path, train_ids: list[str], val_ids: list[str], patch_size: list[int], dims: int,
                 batch_size: int, data_cfg, seed: int):
        super().__init__()
        self.folder, self.train_ids, self.val_ids = folder, train_ids, val_ids
        self.patch_size, self.dims, self.batch_size, self.cfg, self.seed = patch_size, dims, batch_size, data_cfg, seed

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        workers = int(self.cfg.num_workers)
        pin = self.cfg.pin_memory
        pin = torch.cuda.is_available() if pin == "auto" else bool(pin)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=workers, pin_memory=pin,
                          persistent_workers=workers > 0, drop_last=True)

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer else 1
        augmentation = dict(self.cfg.augmentation) if self.cfg.augmentation else None
        if augmentation is not None and augmentation.get("mirror_axes") is None:
            augmentation["mirror_axes"] = list(range(self.dims))
        dataset = PatchDataset(self.folder, self.train_ids, self.patch_size, self.dims,
                               int(self.cfg.iterations_per_epoch) * self.batch_size * world,
                               float(self.cfg.foreground_oversampling), augmentation, self.seed)
        return self._loader(dataset, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer else 1
        ids = self.val_ids or self.train_ids
        dataset = PatchDataset(self.folder, ids, self.patch_size, self.dims,
                               int(self.cfg.val_iterations) * self.batch_size * world,
                               float(self.cfg.foreground_oversampling), None, self.seed + 1, deterministic=True)
        return self._loader(dataset, shuffle=False)
