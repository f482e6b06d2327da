"""A trained denoising model (``task=denoise``) and its network applied to whole images: the model folder loaded and
checked, the ``model_fn`` a sampler calls, and the final validation of a denoising run.

The model folder is the training run's (``<results>/<dataset>/results/denoise/<configuration>/``): plans.json,
dataset.json, ``diffusion.json`` (the process, written at training start) and ``fold_<k>/model_final.pt``, whose
payload records the same process, the default sampler and steps, the label values of a mask-conditioned model and
the training cases' typical normalisation. Loading refuses a ``diffusion.json`` that is unreadable, of an unknown
kind, or not the process the weights were trained with: training and sampling cannot disagree.

Whole images go through the network by Gaussian-weighted sliding windows (``sliding_window``) at every sampler
step, so the sampler runs on the whole image (its noise is one field, windows only evaluate the network); a 2D model
takes a volume slice by slice. A label map rides along as extra channels after the image (``WindowDenoiser`` splits
them again), so every window sees its own part of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segforge.diffusion.process import PROCESS_FILE
from segforge.errors import SegforgeError
from segforge.inference.sliding_window import sliding_window
from segforge.io.artifacts import read_json, write_json
from segforge.training.finetune import FINAL_WEIGHTS

log = logging.getLogger("segforge")


class WindowDenoiser(nn.Module):
    """The denoiser at one time ``t`` as a function of a window ``(b, image + mask channels, *patch)``: the channels
    after ``image_channels`` are the one-hot label map (absent: no map). ``guidance_scale`` != 1 mixes in the
    unconditional output (classifier-free guidance): ``uncond + scale * (cond - uncond)``."""

    def __init__(self, network: nn.Module, t: float, image_channels: int, guidance_scale: float = 1.0):
        super().__init__()
        self.network, self.t, self.image_channels, self.guidance_scale = network, float(t), image_channels, guidance_scale

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        x, cond = window[:, : self.image_channels], window[:, self.image_channels:]
        wanted = int(getattr(self.network, "spatial_cond_channels", 0))
        if wanted and cond.shape[1] == 0:  # no map given (e.g. a timed forward pass): the unconditional branch
            cond = torch.zeros((x.shape[0], wanted, *x.shape[2:]), dtype=x.dtype, device=x.device)
        cond = cond if wanted else None
        t = torch.full((x.shape[0],), self.t, dtype=torch.float32, device=x.device)
        out = self.network(x, t, spatial_cond=cond)
        if cond is not None and self.guidance_scale != 1.0:
            unconditional = self.network(x, t, spatial_cond=torch.zeros_like(cond))
            out = unconditional + self.guidance_scale * (out - unconditional)
        return out


def image_model_fn(network: nn.Module, image_channels: int, patch: list[int], cond: torch.Tensor | None = None,
                   step_size: float = 0.5, sw_batch_size: int = 2, guidance_scale: float = 1.0):
    """``model_fn(x_t, t)`` for a sampler over whole images ``(b, channels, *spatial)``: each image's output by
    Gaussian-weighted sliding windows of ``network`` at its time; ``cond`` ``(b, mask channels, *spatial)``."""

    @torch.no_grad()
    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        outputs = []
        for b in range(x_t.shape[0]):
            window_input = x_t[b] if cond is None else torch.cat([x_t[b], cond[b].to(x_t.dtype)], dim=0)
            step = WindowDenoiser(network, float(t[b]), image_channels, guidance_scale)
            outputs.append(sliding_window(window_input, step, patch, step_size, (), sw_batch_size, torch.float32,
                                          None, progress=False))
        return torch.stack(outputs).to(x_t.dtype)

    return model_fn


def read_process(path: Path):
    """The ``DiffusionProcess`` of a model folder's ``diffusion.json``; anything else is refused, naming the file."""
    from segforge.diffusion.process import DiffusionProcess

    try:
        return DiffusionProcess.from_json(json.loads(Path(path).read_text()))
    except FileNotFoundError as exc:
        raise SegforgeError(f"{path}: not found: this is not a denoising model folder. Fix: pass the model folder of a "
                            "`segforge train DATASET task=denoise` run") from exc
    except (ValueError, SegforgeError, TypeError, KeyError) as exc:
        raise SegforgeError(f"{path}: not a diffusion process segforge can use ({exc}); the model is refused. "
                            "Fix: restore the file from the training run (it is written when training starts)") from exc


class DenoisingModel:
    """One fold of a trained denoising model folder, ready to evaluate on whole images (see module docstring)."""

    def __init__(self, model_dir: Path, plans: dict, dataset_json: dict, payload: dict, network: nn.Module, process,
                 device: torch.device):
        self.model_dir, self.plans, self.dataset_json = Path(model_dir), plans, dataset_json
        self.configuration = payload["configuration"]
        self.plan_config = plans["configurations"][self.configuration]
        self.network, self.process, self.device = network.to(device).eval(), process, device
        self.sampling = dict(payload["sampling"])
        self.time_band = [float(v) for v in payload.get("time_band", [0.0, 1.0])]  # models from before it was saved: all
        self.mask_values = payload.get("mask_values")
        self.typical_normalization = payload.get("typical_normalization")
        self.patch = list(payload.get("patch_size") or self.plan_config["patch_size"])

    def check_start(self, t: float, what: str) -> None:
        """Refuse to enter the reverse process at time ``t`` beyond the times the model was trained on
        (``task.time_band``): its output there is untrained. One training timestep of slack."""
        fraction, high = self.process.time_fraction(t), self.time_band[1]
        slack = 0.0 if self.process.is_flow else 1.0 / self.process.schedule.num_train_timesteps
        if fraction > high + slack + 1e-9:
            raise SegforgeError(f"{self.model_dir}: {what} starts at {fraction:.2f} of the process, but the model was "
                                f"trained on times up to {high:g} only (task.time_band={self.time_band}). Fix: "
                                + ("use a lower sigma, or " if "sigma" in what else "")
                                + "train a model with task.time_band=[0.0,1.0]")

    @property
    def image_channels(self) -> int:
        return int(self.network.image_channels)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, fold=None, device: str = "auto") -> "DenoisingModel":
        from segforge.inference.predictor import load_network, read_weights, select_device
        from segforge.nn.denoiser import Denoiser

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise SegforgeError(f"{model_dir}: model folder not found")
        process = read_process(model_dir / PROCESS_FILE)
        plans = read_json(model_dir / "plans.json", "plans")
        dataset_json = read_json(model_dir / "dataset.json")
        folds = sorted(p for p in model_dir.glob("fold_*") if (p / FINAL_WEIGHTS).is_file())
        if fold is not None:
            folds = [p for p in folds if p.name == f"fold_{fold}"]
        if not folds:
            raise SegforgeError(f"{model_dir}: no fold_*/{FINAL_WEIGHTS}{f' for fold {fold}' if fold is not None else ''}. "
                                "Fix: pass the model folder of a finished `segforge train DATASET task=denoise` run")
        source = folds[0] / FINAL_WEIGHTS
        payload = read_weights(source)
        if not isinstance(payload, dict) or payload.get("task") != "denoise" or "diffusion" not in payload:
            task = payload.get("task", "segment") if isinstance(payload, dict) else type(payload).__name__
            raise SegforgeError(f"{source}: is not a denoising model (task {task!r}). Fix: "
                                "use `segforge predict` for segmentation models, or train with task=denoise")
        if payload["diffusion"] != process.to_json():
            raise SegforgeError(f"{model_dir / PROCESS_FILE}: differs from the process {source} was trained with "
                                f"({json.dumps(payload['diffusion'])}); the model is refused. Fix: restore the file "
                                "from the training run")
        sampling = payload.get("sampling")
        if not (isinstance(sampling, dict) and {"sampler", "steps"} <= set(sampling)):
            raise SegforgeError(f"{source}: incomplete denoising weights (no sampling.sampler, sampling.steps). Fix: "
                                "re-run training or re-copy the model folder")
        network = load_network(payload, plans, source, "denoising")
        if not isinstance(network, Denoiser):
            raise SegforgeError(f"{source}: its network is not a denoiser. Fix: use a model trained with task=denoise")
        return cls(model_dir, plans, dataset_json, payload, network, process, select_device(device))

    def model_fn(self, cond: torch.Tensor | None = None, step_size: float = 0.5, sw_batch_size: int = 2,
                 guidance_scale: float = 1.0):
        if bool(self.mask_values) != (cond is not None):
            raise SegforgeError("this model synthesises from label maps: give --masks DIR" if self.mask_values else
                                "this model was not trained with label maps (task.mask_conditioning=false); drop --masks")
        return image_model_fn(self.network, self.image_channels, self.patch, cond, step_size, sw_batch_size, guidance_scale)


def one_hot(label: np.ndarray, values: list[int]) -> torch.Tensor:
    """``(*spatial)`` label values -> ``(len(values), *spatial)`` float32 one-hot."""
    label_t = torch.from_numpy(np.ascontiguousarray(label))
    return torch.stack([(label_t == v) for v in values]).float()


def seed_of(*parts) -> int:
    """A generator seed from ``parts`` that is the same in every process (``hash`` of a string is not)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


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
