"""Training data: the DataModule that feeds patches to the trainer.

The pieces: ``sampling`` (which patch, its crop and random parameters, on the loader side), ``augment`` (the batch
made from the crops, on the training device or in the loader workers), ``threads`` (who gets which cores). The
DataModule wires them per rank: it sets the thread policy when the trainer starts, shards samples by rank, and
augments after the transfer to the device when ``augment_on=device``.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from segforge.training.augment import AugmentationSettings, Augmenter, PatchGeometry
from segforge.training.sampling import PatchCollate, PatchDataset, PatchIndexSampler
from segforge.training.threads import ThreadPolicy, environment_thread_limit, thread_policy

log = logging.getLogger(__name__)


def _init_worker(threads: int, _worker_id: int) -> None:
    torch.set_num_threads(threads)


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg or {})


class SegmentationDataModule(L.LightningDataModule):
    """Train and validation patch loaders of one fold; sizes are per rank (the batch size is per device).

    Every task trains from these loaders; ``with_labels=False`` (a task that needs no labels) reads images only and
    its batches are ``(image, None)``."""

    def __init__(self, folder: Path, train_ids: list[str], val_ids: list[str], patch_size: list[int], dims: int,
                 batch_size: int, data_cfg, seed: int, mirror_axes: list[int] | None = None, with_labels: bool = True,
                 previous=None):
        """``previous``: a cascade stage's ``PreviousStage`` (training/cascade.py): each patch also carries the
        previous stage's prediction, as one-hot channels after the image's."""
        super().__init__()
        self.with_labels = with_labels
        self.previous_arrays = previous.arrays if previous is not None else None
        self.previous_labels = previous.labels if previous is not None else None
        self.folder, self.train_ids, self.val_ids = Path(folder), list(train_ids), list(val_ids)
        self.patch_size, self.dims, self.batch_size, self.seed = [int(p) for p in patch_size], dims, batch_size, seed
        self.cfg = _plain(data_cfg)
        augmentation = self.cfg.get("augmentation")
        self.settings = AugmentationSettings.from_config(augmentation) if augmentation else None
        self.geometry = PatchGeometry.resolve(self.settings or AugmentationSettings.from_config(), self.patch_size, mirror_axes)
        self.policy: ThreadPolicy | None = None

    @property
    def trained_mirror_axes(self) -> list[int]:
        """The axes training mirrors patches along: none without augmentation or with ``mirror_prob`` 0 (test-time
        mirroring then averages flips the network never saw)."""
        mirrored = self.settings is not None and self.settings.mirror_prob > 0
        return list(self.geometry.mirror_axes) if mirrored else []

    # ---- the trainer's side --------------------------------------------------------------------------------
    def _on_cuda(self) -> bool:
        strategy = getattr(self.trainer, "strategy", None) if self.trainer else None
        device = getattr(strategy, "root_device", None)
        return device is not None and device.type == "cuda"

    def resolve_policy(self) -> ThreadPolicy:
        if self.policy is None:
            ranks = int(getattr(self.trainer, "num_devices", 1) or 1) if self.trainer else 1
            self.policy = thread_policy(self.cfg, self._on_cuda(), ranks, thread_limit=environment_thread_limit())
            torch.set_num_threads(self.policy.torch_threads)
            log.info("data: %s (%s)", {k: v for k, v in self.policy.to_json().items() if k != "reason"}, self.policy.reason)
        return self.policy

    def setup(self, stage: str) -> None:
        self.resolve_policy()

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def _loader(self, dataset: PatchDataset, samples: int, deterministic: bool, augmenter: Augmenter | None) -> DataLoader:
        policy = self.resolve_policy()
        rank, world = self._rank()
        pin = self.cfg.get("pin_memory", "auto")
        pin = self._on_cuda() if pin == "auto" else bool(pin)
        workers = policy.num_workers
        extra = {"prefetch_factor": int(self.cfg.get("prefetch_factor") or 2), "persistent_workers": True,
                 "worker_init_fn": functools.partial(_init_worker, policy.worker_threads)} if workers > 0 else {}
        sampler = PatchIndexSampler(samples, rank, world, deterministic)
        if self.trainer is not None:
            # loader workers draw their first indices when the loader is iterated, before Lightning's set_epoch: a
            # resumed run must start from its restored epoch, not 0 (it trained other patches than the straight run)
            sampler.set_epoch(int(getattr(self.trainer, "current_epoch", 0) or 0))
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          num_workers=workers, pin_memory=pin, drop_last=True,
                          collate_fn=PatchCollate(augmenter if policy.augment_on == "workers" else None), **extra)

    def _oversampling(self) -> float:
        return float(self.cfg["foreground_oversampling"]) if self.with_labels else 0.0  # no labels: uniform patches

    def train_dataloader(self) -> DataLoader:
        dataset = PatchDataset(self.folder, self.train_ids, self.patch_size, self.dims, self._oversampling(),
                               self.settings, self.geometry, self.seed, self.with_labels, self.previous_arrays)
        samples = int(self.cfg["iterations_per_epoch"]) * self.batch_size
        return self._loader(dataset, samples, False, Augmenter(self.settings, self.geometry, self.previous_labels))

    def val_dataloader(self) -> DataLoader:
        ids = self.val_ids or self.train_ids
        dataset = PatchDataset(self.folder, ids, self.patch_size, self.dims, self._oversampling(),
                               None, self.geometry, self.seed + 1, self.with_labels, self.previous_arrays)
        samples = int(self.cfg["val_iterations"]) * self.batch_size
        return self._loader(dataset, samples, True, Augmenter(None, self.geometry, self.previous_labels))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """``augment_on=device``: the batch arrives as crops and parameters; augment it where it now is."""
        if isinstance(batch, dict):
            with torch.no_grad():
                return Augmenter(self.settings if "params" in batch else None, self.geometry, self.previous_labels)(batch)
        return batch
