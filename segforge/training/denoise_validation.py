"""The final validation of a denoising run (``task=denoise``): the preprocessed validation cases, each noised at
every sigma, denoised in one step by sliding windows, PSNR before and after, written to ``validation/summary.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from segforge.diffusion.conditioning import one_hot, seed_of
from segforge.inference.generate import image_model_fn
from segforge.io.artifacts import write_json


def psnr(estimate: np.ndarray, clean: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((np.asarray(estimate, np.float64) - np.asarray(clean, np.float64)) ** 2))
    return float(10 * np.log10(data_range**2 / max(mse, 1e-20)))


@torch.no_grad()
def validate_denoiser(network: nn.Module, process, data_dir: Path, val_ids: list[str], plan_config: dict,
                      sigmas: list[float], out_dir: Path, device, mask_values: list[int] | None, seed: int,
                      step_size: float = 0.5, sw_batch_size: int = 2) -> dict:
    """The final validation of a denoising run, on the preprocessed validation cases: each noised at every sigma (a
    fraction of its intensity range), denoised in one step by sliding windows, PSNR before and after; written to
    ``out_dir/summary.json``."""
    from segforge.diffusion.samplers import denoise

    network = network.to(device).eval()
    rows = []
    for case in val_ids:
        clean = np.load(Path(data_dir) / f"{case}.npy", mmap_mode="r")
        clean_t = torch.from_numpy(np.array(clean, dtype=np.float32)).to(device)
        cond = None
        if mask_values:
            seg = np.load(Path(data_dir) / f"{case}_seg.npy", mmap_mode="r")
            cond = one_hot(seg, mask_values)[None].to(device)
        data_range = float(clean_t.max() - clean_t.min()) or 1.0
        fn = image_model_fn(network, clean_t.shape[0], list(plan_config["patch_size"]), cond, step_size, sw_batch_size)
        for k, sigma in enumerate(sigmas):
            generator = torch.Generator(device=device).manual_seed(seed_of(seed, case, k))
            noisy = clean_t + sigma * data_range * torch.randn(clean_t.shape, generator=generator, device=device)
            estimate = denoise(fn, process, noisy[None], sigma * data_range, steps=1)[0]
            rows.append({"case": case, "sigma": sigma, "noisy_psnr": psnr(noisy.cpu(), clean, data_range),
                         "denoised_psnr": psnr(estimate.cpu(), clean, data_range)})
    by_sigma = {str(s): {key: float(np.mean([r[key] for r in rows if r["sigma"] == s])) for key in ("noisy_psnr", "denoised_psnr")}
                for s in sigmas}
    summary = {"cases": rows, "by_sigma": by_sigma, "sigma_units": "fraction of each case's intensity range (normalised)"}
    write_json(Path(out_dir) / "summary.json", summary, kind="summary")
    return summary
