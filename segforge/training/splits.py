"""Cross-validation splits: seeded k-fold, optionally keeping groups of cases (e.g. one patient's scans) together,
and the choice of one fold's training and validation cases (a ``splits.json`` already there is respected)."""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np


def case_groups(case_ids: list[str], pattern: str | None) -> dict[str, list[str]]:
    """Group key -> cases: the first group of ``pattern`` (a regex matched at the start of the case id), or its
    whole match; a case the pattern does not match is a group of its own."""
    groups: dict[str, list[str]] = defaultdict(list)
    regex = re.compile(pattern) if pattern else None
    for case in sorted(case_ids):
        match = regex.match(case) if regex else None
        key = (match.group(1) if match.groups() else match.group(0)) if match else case
        groups[key].append(case)
    return dict(groups)


def make_splits(case_ids: list[str], num_folds: int, seed: int, group_pattern: str | None = None) -> list[dict]:
    """Seeded k-fold split: ``[{"train": [...], "val": [...]}, ...]`` (every case validated exactly once; with
    ``group_pattern`` no group spans training and validation)."""
    ids = sorted(case_ids)
    if not group_pattern:
        if len(ids) < num_folds:
            raise ValueError(f"{len(ids)} case(s) cannot be split into {num_folds} folds; set num_folds or fold=all")
        order = np.random.default_rng(seed).permutation(len(ids))
        folds = [[ids[i] for i in part] for part in np.array_split(order, num_folds)]
    else:
        groups = case_groups(ids, group_pattern)
        if len(groups) < num_folds:
            raise ValueError(f"{len(groups)} group(s) of cases (split_groups={group_pattern!r}) cannot be split into "
                             f"{num_folds} folds; set num_folds or fold=all")
        keys = sorted(groups)
        keys = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
        keys.sort(key=lambda k: -len(groups[k]))  # stable: shuffled order within equal sizes
        folds = [[] for _ in range(num_folds)]
        for key in keys:  # the largest groups first, each into the fold with the fewest cases so far
            min(folds, key=len).extend(groups[key])
    return [{"train": sorted(c for j, f in enumerate(folds) if j != k for c in f), "val": sorted(folds[k])}
            for k in range(num_folds)]


def check_splits(splits, source, case_ids: list[str], num_folds: int, group_pattern: str | None = None) -> list[dict]:
    """An existing ``splits.json`` (``source``) once it agrees with the settings it replaces: ``num_folds`` folds of
    known cases, and with ``group_pattern`` no group on both sides of a fold. Else a ``ValueError`` naming the file,
    the setting and the fix (the run's config.yaml records these settings as applied, so they must be true)."""
    fix = f"Fix: correct {source}, or delete it to have a split made from the settings"
    if not isinstance(splits, list) or not all(
            isinstance(s, dict) and all(isinstance(s.get(k), list) and all(isinstance(c, str) for c in s[k])
                                        for k in ("train", "val")) for s in splits):
        raise ValueError(f"{source}: is not a list of {{\"train\": [case ids], \"val\": [case ids]}}, one per fold. {fix}")
    if len(splits) != num_folds:
        raise ValueError(f"{source}: holds {len(splits)} fold(s), but num_folds={num_folds}. Fix: num_folds="
                         f"{len(splits)} to train on the file's folds, or delete it to have {num_folds} folds made")
    unknown = sorted({c for s in splits for c in s["train"] + s["val"]} - set(case_ids))
    if unknown:
        raise ValueError(f"{source} names case(s) not in the dataset: {unknown[:5]}. {fix}")
    if group_pattern:
        group_of = {case: key for key, cases in case_groups(case_ids, group_pattern).items() for case in cases}
        for k, fold in enumerate(splits):
            both = sorted({group_of[c] for c in fold["train"]} & {group_of[c] for c in fold["val"]})
            if both:
                raise ValueError(f"{source}: fold {k} has group {both[0]!r} (split_groups={group_pattern!r}) on both "
                                 f"the training and the validation side. {fix}")
    return splits
