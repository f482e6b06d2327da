"""A trained denoising model (``task=denoise``): loaded and checked, and what ``segforge sample`` and ``segforge denoise``
do with it.

* ``DenoisingModel.from_model_dir``: the model folder of the training run (plans.json, dataset.json,
  ``diffusion.json``: the process, written at training start; ``fold_<k>/model_final.pt``, whose payload records the
  same process, the default sampler and steps, the label values of a mask-conditioned model and the training cases'
  typical normalisation). A ``diffusion.json`` that is unreadable, of an unknown kind, or not the process the weights
  were trained with is refused: training and sampling cannot disagree.
* ``image_model_fn``: the network over whole images by Gaussian-weighted sliding windows at every sampler step (the
  sampler's noise is one field, windows only evaluate the network); a label map rides along as extra channels after
  the image (``nn.denoiser.WindowDenoiser`` splits them again).
* ``sample_images``: ``n`` images drawn from pure noise by the model's sampler, at the plan's spacing (shape: the
  plan's median image unless given), brought to the dataset's intensity units by the training cases' typical
  normalisation, written one file per channel (``sample_000_0000<ending>``).
* ``sample_from_masks``: one image per label map of a mask-conditioned model, on that map's grid: the map is
  resampled to the plan's spacing, the image generated there and resampled back; the map's geometry is kept.
* ``denoise_folder``: real noisy images (the ``predict`` layout: ``CASE_XXXX<ending>``) denoised by entering the
  reverse process at their noise level (``samplers.denoise``; ``steps=1`` is the one-step MMSE estimate). The case
  goes through the training preprocessing and back (``restore_image``), so the output has the input's exact grid
  and units. ``sigma`` is a fraction of each channel's intensity range (``sigma_units=range``; the range is
  ``intensity_range`` when given, else estimated from a lightly smoothed copy), or in intensity units
  (``sigma_units=intensity``). Plans made with ``task=denoise`` normalise with the dataset's map ("global"), which
  noise does not change; a per-image z-score (a plan made for segmentation) is corrected for the noise (the clean
  image's standard deviation is ``sqrt(std^2 - sigma^2)``), a per-image rescale takes the stated or robust range.

Every file is written atomically (``write_image``); an output folder that is the input folder is refused; a bad
case is reported and skipped (the checks ``predict`` applies), the others go on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segforge.configs import packaged_config
from segforge.diffusion.conditioning import one_hot, seed_of
from segforge.diffusion.process import PROCESS_FILE, DiffusionProcess
from segforge.errors import SegforgeError
from segforge.inference.folder import CaseResult, channel_files, find_cases, run_case
from segforge.inference.case_checks import check_input
from segforge.inference.sliding_window import sliding_window
from segforge.io.image import FAKE_Z_SPACING, Geometry, file_ending, read_case, read_image, write_image
from segforge.io.model_folder import FINAL_WEIGHTS, load_network, read_model_files, read_weights, select_device, select_folds
from segforge.io.storage import check_writable, storage_error
from segforge.nn.denoiser import Denoiser, WindowDenoiser
from segforge.preprocessing.normalize import invert_normalization
from segforge.preprocessing.pipeline import preprocess_image, resampling_settings, restore_image
from segforge.preprocessing.resample import resample, resample_label, resampling_modes, shape_at_spacing

log = logging.getLogger("segforge")


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
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise SegforgeError(f"{model_dir}: model folder not found")
        process = read_process(model_dir / PROCESS_FILE)
        plans, dataset_json = read_model_files(model_dir)
        source = select_folds(model_dir, None if fold is None else [fold],
                              "a finished `segforge train DATASET task=denoise` run", hint="generate.fold=all")[0] / FINAL_WEIGHTS
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


def run_sampler(model: DenoisingModel, model_fn, x_start: torch.Tensor, steps: int | None, sampler: str | None,
                generator: torch.Generator, start_t: float | None = None) -> torch.Tensor:
    from segforge.diffusion.samplers import check_sampler

    name, steps = sampler or model.sampling["sampler"], int(steps or model.sampling["steps"])
    return check_sampler(str(name), model.process)(model_fn, model.process, x_start, steps, start_t=start_t,
                                                   generator=generator)


def sample_geometry(model: DenoisingModel) -> Geometry:
    """The plan's spacing on an identity grid; a 2D dataset's files (PNG, 2D NIfTI) stay 2D."""
    spacing = list(model.plan_config["target_spacing"])
    original = model.plans.get("original_median_spacing") or [1.0, 1.0, 1.0]
    spacing = [float(o) if s is None else float(s) for s, o in zip(spacing, original)]
    if spacing[0] >= FAKE_Z_SPACING:  # a 2D dataset
        return Geometry(tuple(spacing), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), ndim=2)
    return Geometry(tuple(spacing), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), ndim=3)


def sample_shape(model: DenoisingModel, shape) -> list[int]:
    """``(z, y, x)`` of a generated image: ``shape`` (2 values for a 2D model: one slice), else the plan's median."""
    dims = model.plan_config["dims"]
    wanted = [int(round(v)) for v in (shape if shape is not None else model.plan_config["median_shape"])]
    if len(wanted) == 3 and dims == 2 and shape is not None and wanted[0] != 1:
        raise SegforgeError(f"shape={list(shape)}: a 2D model generates single slices; give [y, x] or [1, y, x]")
    if len(wanted) not in (dims, 3) or min(wanted) < 1:
        raise SegforgeError(f"shape={list(wanted)}: give {dims} positive sizes ({'y, x' if dims == 2 else 'z, y, x'})")
    return [1, *wanted] if len(wanted) == 2 else wanted


def to_dataset_units(x: np.ndarray, model: DenoisingModel) -> np.ndarray:
    if model.typical_normalization:
        invert_normalization(x, model.typical_normalization)
    return x


def channel_paths(out_dir: Path, name: str, channels: int, ending: str) -> list[Path]:
    """The files of one generated case: one per channel, ``name_XXXX<ending>``."""
    return [Path(out_dir) / f"{name}_{c:04d}{ending}" for c in range(channels)]


def write_channels(out_dir: Path, name: str, image: np.ndarray, geometry: Geometry, ending: str) -> list[Path]:
    """One file per channel of ``(c, z, y, x)`` ``image`` (``channel_paths``); PNG takes rounded integers."""
    paths = channel_paths(out_dir, name, len(image), ending)
    for channel, path in zip(image, paths):
        if ending.lower() == ".png":  # an 8/16-bit format: the dataset's units rounded into its range
            top = 255 if float(channel.max(initial=0)) <= 255 else 65535
            channel = np.clip(np.round(channel), 0, top).astype(np.uint8 if top == 255 else np.uint16)
        else:
            channel = channel.astype(np.float32, copy=False)
        write_image(path, channel, geometry)
    return paths


def _ending(model: DenoisingModel) -> str:
    ending = model.dataset_json.get("file_ending", ".nii.gz")
    if not file_ending(f"x{ending}"):
        raise SegforgeError(f"the model's dataset.json has file_ending {ending!r}. Fix: correct dataset.json in the model folder")
    return ending


def sample_images(model: DenoisingModel, out_dir: Path, n: int, steps: int | None = None, sampler: str | None = None,
                  seed: int = 0, shape=None, step_size: float = 0.5, sw_batch_size: int = 2) -> list[Path]:
    """``n`` generated images in ``out_dir`` (module docstring); returns the files written."""
    if int(n) < 1:
        raise SegforgeError(f"n={n}: give the number of images to generate (at least 1)")
    shape, geometry, ending = sample_shape(model, shape), sample_geometry(model), _ending(model)
    if geometry.ndim == 2 and shape[0] != 1:
        raise SegforgeError(f"shape {shape}: the dataset is 2D; give [y, x]")
    model.check_start(model.process.t_max, "sampling from pure noise")  # before any output folder is made
    check_writable(out_dir, what=f"{n} generated image(s)", setting="-o OUT")
    model_fn = model.model_fn(None, step_size, sw_batch_size)
    written = []
    for i in range(int(n)):
        generator = torch.Generator(device=model.device).manual_seed(seed_of(seed, "sample", i))
        noise = torch.randn((1, model.image_channels, *shape), generator=generator, device=model.device)
        start = time.perf_counter()
        x0 = run_sampler(model, model_fn, noise, steps, sampler, generator)[0].cpu().numpy()
        name, before = f"sample_{i:03d}", {p for p in channel_paths(out_dir, f"sample_{i:03d}", len(x0), ending) if p.exists()}
        try:
            written += write_channels(out_dir, name, to_dataset_units(x0, model), geometry, ending)
        except Exception as exc:  # no half-written sample (each file is atomic, the set of channels is not)
            for path in channel_paths(out_dir, name, len(x0), ending):
                if path not in before:
                    path.unlink(missing_ok=True)
            raise storage_error(exc, out_dir / name) or exc
        log.info("sample %d/%d: %s (%.1f s)", i + 1, n, written[-1].name, time.perf_counter() - start)
    return written


def sample_from_masks(model: DenoisingModel, masks: Path, out_dir: Path, steps: int | None = None,
                      sampler: str | None = None, seed: int = 0, guidance_scale: float = 1.0, step_size: float = 0.5,
                      sw_batch_size: int = 2) -> list[CaseResult]:
    """One image per label map in ``masks`` (a folder of ``CASE<ending>``, or one file), on the map's grid."""
    if not model.mask_values:
        raise SegforgeError("--masks: this model was not trained with label maps (task.mask_conditioning=false)")
    ending = _ending(model)
    files = [Path(masks)] if Path(masks).is_file() else sorted(p for p in Path(masks).iterdir()
                                                               if p.name.endswith(ending) and not p.name.startswith("."))
    if not files:
        raise SegforgeError(f"{masks}: no label maps ending in {ending} found. Fix: name them CASE{ending}")
    if any(Path(out_dir).resolve() == p.parent.resolve() for p in files[:1]):
        raise SegforgeError(f"{out_dir}: output folder is the folder of the label maps (inputs are never overwritten). "
                            "Fix: choose another -o folder")
    model.check_start(model.process.t_max, "sampling from pure noise")
    check_writable(out_dir, what=f"{len(files)} synthesised image(s)", setting="-o OUT")
    results: list[CaseResult] = []
    for path in files:
        case_id = path.name[: -len(ending)] if path.name.endswith(ending) else path.stem
        run_case(case_id, channel_paths(out_dir, case_id, model.image_channels, ending),
                 partial(synthesise_case, model, path, case_id, out_dir, ending, steps, sampler, seed, guidance_scale,
                         step_size, sw_batch_size), results)
    return results


def synthesise_case(model: DenoisingModel, path: Path, case_id: str, out_dir: Path, ending: str, steps, sampler, seed: int,
                    guidance_scale: float, step_size: float, sw_batch_size: int) -> tuple[Path, list[str]]:
    """One image synthesised from the label map ``path``, written on its grid (``sample_from_masks``)."""
    start = time.perf_counter()
    label, geometry = read_image(path)
    values = np.unique(label)
    unknown = sorted(set(int(v) for v in values) - set(model.mask_values)) if np.all(values == np.round(values)) else ["fractional"]
    if unknown:
        raise SegforgeError(f"{path}: holds label values {unknown} the model does not know (it takes "
                            f"{model.mask_values}). Fix: relabel the map as in the training dataset.json")
    target = model.plan_config["target_spacing"]
    new_shape = shape_at_spacing(list(label.shape), list(geometry.spacing), target)
    modes = resampling_modes(geometry.spacing, target, resampling_settings(model.plans))
    seg = resample_label(label.astype(np.int16), new_shape, modes=modes["label"])
    cond = one_hot(seg, model.mask_values)[None].to(model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed_of(seed, "mask", case_id))
    noise = torch.randn((1, model.image_channels, *new_shape), generator=generator, device=model.device)
    fn = model.model_fn(cond, step_size, sw_batch_size, guidance_scale)
    x0 = run_sampler(model, fn, noise, steps, sampler, generator)[0].cpu()
    image = resample(x0.float(), list(label.shape), modes["image"]).numpy()
    outputs = write_channels(out_dir, case_id, to_dataset_units(image, model), geometry, ending)
    log.info("synthesised %s from %s (%.1f s)", outputs[0].name, path.name, time.perf_counter() - start)
    return outputs[0], []


def channel_ranges(image: np.ndarray, intensity_range=None, percentiles=None) -> list[tuple[float, float]]:
    """Each channel's ``(low, high)`` intensity: ``intensity_range`` when given, else robust to the noise: the
    ``percentiles`` (None: ``range_percentiles`` of configs/denoise.yaml) of a copy smoothed by one voxel."""
    from scipy.ndimage import gaussian_filter

    percentiles = [float(q) for q in (packaged_config("denoise")["range_percentiles"] if percentiles is None else percentiles)]

    if intensity_range is not None:
        low, high = (float(v) for v in intensity_range)
        if not high > low:
            raise SegforgeError(f"intensity_range={list(intensity_range)}: give [low, high] with high > low")
        return [(low, high)] * image.shape[0]
    ranges = []
    for channel in image:
        smoothed = gaussian_filter(np.asarray(channel, np.float32), [0 if n == 1 else 1.0 for n in channel.shape])
        low, high = np.percentile(smoothed, percentiles)
        ranges.append((float(low), float(high) if high > low else float(low) + 1.0))
    return ranges


def noise_levels(image: np.ndarray, sigma: float, units: str, ranges: list[tuple[float, float]]) -> list[float]:
    """Each channel's noise standard deviation in its intensity units."""
    if not (math.isfinite(float(sigma)) and float(sigma) >= 0):
        raise SegforgeError(f"sigma={sigma}: give the noise level, a number >= 0")
    if units == "intensity":
        return [float(sigma)] * image.shape[0]
    if units != "range":
        raise SegforgeError(f"sigma_units={units!r}; use range (a fraction of the intensity range) or intensity")
    return [float(sigma) * (high - low) for low, high in ranges]


def noise_aware_normalization(data: np.ndarray, props: dict, sigmas_abs: list[float],
                              ranges: list[tuple[float, float]]) -> list[float]:
    """Correct the per-image normalisation of a noisy case in place (module docstring); returns each channel's
    noise level in normalised units."""
    normalised = []
    for c, params in enumerate(props["normalization_applied"]):
        old_shift, old_scale = params["shift"], params["scale"]
        if params["scheme"] == "zscore":
            params["scale"] = math.sqrt(max(old_scale**2 - sigmas_abs[c] ** 2, (0.05 * old_scale) ** 2))
        elif params["scheme"] == "rescale":  # min-max of a noisy image is the noise's: the stated or robust range
            params["shift"], params["scale"] = ranges[c][0], ranges[c][1] - ranges[c][0]
        if (params["shift"], params["scale"]) != (old_shift, old_scale):  # affine: commutes with the resampling
            data[c] = (data[c] * np.float32(old_scale) + np.float32(old_shift - params["shift"])) / np.float32(params["scale"])
        normalised.append(sigmas_abs[c] / params["scale"])
    return normalised


def denoise_case(model: DenoisingModel, image: np.ndarray, geometry: Geometry, sigma: float, units: str = "range",
                 intensity_range=None, steps: int = 1, sampler: str | None = None, seed: int = 0,
                 step_size: float = 0.5, sw_batch_size: int = 2, range_percentiles=None) -> np.ndarray:
    """The denoised ``(c, z, y, x)`` image on the input's grid, in its units (``range_percentiles``: see
    ``channel_ranges``)."""
    from segforge.diffusion.samplers import denoise

    ranges = channel_ranges(image, intensity_range, range_percentiles) if units == "range" or any(
        n["scheme"] == "rescale" for n in model.plans["normalization"]) else None
    sigmas_abs = noise_levels(image, sigma, units, ranges)
    data, props = preprocess_image(image, geometry, model.plans, model.configuration)
    levels = noise_aware_normalization(data, props, sigmas_abs, ranges)
    if max(levels) > 1.05 * min(levels):
        log.warning("channels have different normalised noise levels %s; their mean is used", [round(v, 4) for v in levels])
    model.check_start(model.process.entry_for_sigma(float(np.mean(levels)))[0], f"denoising at sigma={sigma}")
    generator = torch.Generator(device=model.device).manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(data)).to(model.device)[None]
    out = denoise(model.model_fn(None, step_size, sw_batch_size), model.process, x, float(np.mean(levels)), int(steps),
                  generator, sampler)
    return restore_image(out[0].cpu().numpy(), props)


def denoise_folder(model: DenoisingModel, input_path: Path, out_dir: Path, sigma: float, units: str = "range",
                   intensity_range=None, steps: int = 1, sampler: str | None = None, seed: int = 0,
                   step_size: float = 0.5, sw_batch_size: int = 2, range_percentiles=None) -> list[CaseResult]:
    """Denoise every case of ``input_path`` (a folder of ``CASE_XXXX<ending>`` or one image) into ``out_dir``."""
    if model.mask_values:
        raise SegforgeError("this model is conditioned on label maps; it synthesises images (`segforge sample "
                            "--masks`) and cannot denoise without them")
    input_path = Path(input_path)
    if not input_path.exists():
        raise SegforgeError(f"{input_path}: input not found")
    folder = input_path if input_path.is_dir() else input_path.parent
    if Path(out_dir).resolve() == folder.resolve():
        raise SegforgeError(f"{out_dir}: output folder is the input folder (inputs are never overwritten). Fix: choose another -o folder")
    ending = _ending(model)
    cases, notes = find_cases(input_path, ending)
    for note in notes:
        log.warning("passed over: %s", note)
    if not cases:
        raise SegforgeError(f"{input_path}: no images ending in {ending} found. Fix: name them CASE_0000{ending}")
    check_writable(out_dir, what=f"{len(cases)} denoised case(s)", setting="-o OUT")
    results: list[CaseResult] = []
    for case_id in sorted(cases):
        run_case(case_id, channel_paths(out_dir, case_id, len(cases[case_id]), ending),
                 partial(denoise_file_case, model, case_id, cases[case_id], folder, out_dir, ending, sigma, units,
                         intensity_range, steps, sampler, seed, step_size, sw_batch_size, range_percentiles), results)
    return results


def denoise_file_case(model: DenoisingModel, case_id: str, channels: dict[int, Path], folder: Path, out_dir: Path,
                      ending: str, sigma: float, units: str, intensity_range, steps: int, sampler, seed: int,
                      step_size: float, sw_batch_size: int, range_percentiles=None) -> tuple[Path, list[str]]:
    """One case of ``denoise_folder``: read, checked, denoised and written on its grid."""
    start = time.perf_counter()
    files = channel_files(case_id, channels, model.plans["channel_names"], folder, ending)
    image, geometry = read_case(files)
    image, warnings = check_input(model, image, geometry, files, copy=False)
    for warning in warnings:
        log.warning("case %s: %s", case_id, warning)
    clean = denoise_case(model, image, geometry, sigma, units, intensity_range, steps, sampler, seed_of(seed, case_id),
                         step_size, sw_batch_size, range_percentiles)
    outputs = write_channels(out_dir, case_id, clean, geometry, ending)
    log.info("denoised %s (%.1f s)", case_id, time.perf_counter() - start)
    return outputs[0], warnings
