"""The plan's intensity normalisation per channel: the scheme from the channel's name in dataset.json (nnU-Net's
conventions) or the user's override, with the statistics of the fingerprint it needs."""

from __future__ import annotations

from segforge.configs import packaged_defaults
from segforge.planning.fingerprint import clip_keys

SCHEMES = ("ct", "zscore", "global", "rescale", "none")
# nnU-Net's channel-name conventions, so its datasets plan the same way
NAME_TO_SCHEME = {"ct": "ct", "computed tomography": "ct", "nonorm": "none", "none": "none",
                  "rescale_to_0_1": "rescale", "rgb_to_0_1": "rescale", "rescale": "rescale", "zscore": "zscore",
                  "global": "global"}


def normalization_scheme(channel_name: str) -> str:
    return NAME_TO_SCHEME.get(channel_name.strip().lower(), "zscore")


def plan_normalization(fingerprint: dict, median_relative_size: float, overrides=None, denoising: bool = False,
                       nonzero_mask_threshold: float | None = None) -> list[dict]:
    """Per channel: CT (clip to the foreground percentiles the fingerprint took, ``fingerprint.clip_percentiles``,
    z-score with the foreground mean/std), per-image z-score (inside the nonzero mask when cropping kept less than
    ``nonzero_mask_threshold`` of the median image, default ``plan.nonzero_mask_threshold``), global (z-score with the dataset's foreground
    mean/std, no clipping), rescale to [0, 1], or none. The scheme follows the channel name in dataset.json;
    ``overrides`` (channel index or name -> scheme) wins. ``denoising`` (``plan DATASET task=denoise``): global
    instead of per-image z-score, since a denoiser's input and output must share one intensity map whatever the
    image's noise and field of view (per-image statistics change with both)."""
    overrides = {str(k): str(v) for k, v in dict(overrides or {}).items()}
    if nonzero_mask_threshold is None:
        nonzero_mask_threshold = packaged_defaults("plan")["nonzero_mask_threshold"]
    low_key, high_key = clip_keys(fingerprint)
    out = []
    for index, name in sorted(fingerprint["channel_names"].items(), key=lambda kv: int(kv[0])):
        stats = fingerprint["intensity_foreground"][index]
        default = normalization_scheme(name)
        scheme = overrides.get(str(index), overrides.get(name, "global" if denoising and default == "zscore" else default))
        if scheme not in SCHEMES:
            raise ValueError(f"plan.normalization for channel {index} ({name}) is {scheme!r}; use one of {list(SCHEMES)}")
        entry = {"channel": int(index), "name": name, "scheme": scheme}
        if scheme == "ct":
            entry.update(clip=[stats[low_key], stats[high_key]], mean=stats["mean"], std=stats["std"])
        elif scheme == "global":
            entry.update(mean=stats["mean"], std=stats["std"])
        elif scheme == "zscore":
            entry["use_nonzero_mask"] = bool(median_relative_size < float(nonzero_mask_threshold))
        out.append(entry)
    return out
