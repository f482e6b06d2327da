"""nnU-Net's cascade in the plan: the ``3d_cascade_fullres`` stage, 3d_fullres with the one-hot 3d_lowres
prediction as extra input channels."""

from __future__ import annotations

import json

CASCADE = "3d_cascade_fullres"


def previous_stage_labels(labels: dict) -> list[int]:
    """The label values a cascade stage gets as one-hot input channels: every value but background and ignore
    (nnU-Net's foreground labels), in increasing order."""
    ignore = labels.get("ignore")
    values = {int(m) for k, v in labels.items() if k != "ignore" for m in (v if isinstance(v, list) else [v])}
    return sorted(v for v in values if v != 0 and v != ignore)


def add_cascade(configurations: dict, labels: dict) -> None:
    """nnU-Net's cascade: ``3d_cascade_fullres`` is 3d_fullres (its preprocessed data, patch and network) whose input
    also holds the one-hot 3d_lowres prediction (``previous_stage_labels`` channels); 3d_lowres names it as its
    ``next_stage``, so its final validation writes the predictions the cascade trains on. The memory entry is
    3d_fullres' (the extra input channels change only the first convolution)."""
    full = configurations["3d_fullres"]
    configurations[CASCADE] = {**json.loads(json.dumps(full)), "data_identifier": full.get("data_identifier", "3d_fullres"),
                               "previous_stage": "3d_lowres", "previous_stage_labels": previous_stage_labels(labels)}
    configurations["3d_lowres"]["next_stage"] = [CASCADE]
