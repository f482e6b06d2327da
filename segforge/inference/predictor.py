"""Predict masks with a trained model folder: the training preprocessing, Gaussian-weighted sliding windows,
test-time mirroring, a fold ensemble, and export onto the input's exact grid.

The windows are segforge's (``sliding_window``: nnU-Net's placement and Gaussian, mirroring per window).
``Predictor.from_model_dir(model_dir).predict(path_or_array)`` is the Python API (``probabilities`` for the soft
output); ``Ensemble`` averages several model folders; ``inference.folder.predict_folder`` drives the CLI. A CUDA
out-of-memory error on one case moves that case to the CPU. Weights load with ``weights_only=True``: a model folder
is data, never code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from segforge.errors import SegforgeError
from segforge.inference.case_checks import check_input
from segforge.inference.sliding_window import sliding_window
from segforge.io.image import Geometry, read_case
from segforge.io.model_folder import (FINAL_WEIGHTS, load_network, read_model_files, read_weights, select_device,
                                      select_folds, trained_windows)
from segforge.preprocessing.pipeline import preprocess_image, restore_probabilities
from segforge.workspace import DEFAULT_PLANS, model_folder_name

log = logging.getLogger(__name__)


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``; to a GPU from pinned memory, asynchronously (pageable memory would be
    staged through a pinned buffer anyway, and the copy no longer blocks the host)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


class Predictor:
    def __init__(self, plans: dict, dataset_json: dict, configuration: str, networks: list[torch.nn.Module],
                 device: torch.device, step_size: float = 0.5, mirror: bool = True, sw_batch_size: int = 2,
                 accumulate: str = "auto", patch_size: list[int] | None = None, mirror_axes: list[int] | None = None,
                 gaussian_sigma: float | None = None, gaussian_centre_weight: float | None = None):
        """``patch_size``, ``mirror_axes``: the window and the test-time flips, those the networks were trained with
        (their weights file records them); default: the plan's. ``gaussian_*``: the window weights (None:
        ``predict.gaussian_*`` of configs/predict/default.yaml)."""
        self.plans, self.dataset_json, self.configuration = plans, dataset_json, configuration
        self.plan_config = plans["configurations"][configuration]
        # a cascade stage (3d_cascade_fullres) also takes the previous stage's mask, one-hot over these values
        self.previous_stage = self.plan_config.get("previous_stage")
        self.previous_labels = list(self.plan_config.get("previous_stage_labels") or []) if self.previous_stage else None
        self.patch_size = list(patch_size or self.plan_config["patch_size"])
        self.mirror_axes = list(self.plan_config.get("mirror_axes", range(self.plan_config["dims"]))
                                if mirror_axes is None else mirror_axes)
        self.networks = [n.to(device).eval() for n in networks]
        self.device, self.step_size, self.mirror, self.sw_batch_size = device, step_size, mirror, sw_batch_size
        self.gaussian = {"gaussian_sigma": gaussian_sigma, "gaussian_centre_weight": gaussian_centre_weight}
        if accumulate == "auto" and plans.get("aggregate") == "logits":  # nnU-Net models as nnU-Net predicts them
            accumulate = "float16"
        # auto: float32, or float16 once the buffer would be large (sliding_window.AUTO_HALF_BYTES)
        self.accumulate = {"float16": torch.float16, "float32": torch.float32, "auto": "auto"}[accumulate]
        # region-based models: one sigmoid per region, painted in regions_class_order
        self.regions_class_order = dataset_json.get("regions_class_order") \
            if any(isinstance(v, list) for v in dataset_json.get("labels", {}).values()) else None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, folds=None, device: str = "auto", step_size: float = 0.5,
                       mirror: bool = True, sw_batch_size: int = 2, accumulate: str = "auto",
                       gaussian_sigma: float | None = None, gaussian_centre_weight: float | None = None) -> "Predictor":
        model_dir = Path(model_dir)
        gaussian = {"gaussian_sigma": gaussian_sigma, "gaussian_centre_weight": gaussian_centre_weight}
        from segforge.inference.nnunet_model import is_nnunet_model, load_nnunet_model

        if is_nnunet_model(model_dir):  # a trained nnU-Net v2 results folder, mapped onto segforge's pieces
            plans, dataset_json, configuration, networks = load_nnunet_model(model_dir, folds)
            return cls(plans, dataset_json, configuration, networks, select_device(device), step_size, mirror, sw_batch_size,
                       accumulate, **gaussian)
        plans, dataset_json = read_model_files(model_dir)
        fold_dirs = select_folds(model_dir, folds)
        torch_device = select_device(device)
        networks, configuration, trained = [], None, {}
        for fold_dir in fold_dirs:
            source = fold_dir / FINAL_WEIGHTS
            payload = read_weights(source)
            if payload.get("task", "segment") != "segment":  # e.g. a denoiser: it takes a time, predicts no classes
                raise SegforgeError(f"{source}: is a {payload['task']} model, not a segmentation model. Fix: use "
                                    "`segforge sample` / `segforge denoise` with it, or a model trained with task=segment")
            network = load_network(payload, plans, source)
            networks.append(network)
            configuration = payload["configuration"]
            trained[fold_dir.name] = trained_windows(payload, plans, source)
        if len(set(trained.values())) > 1:  # the folds' windows are predicted in step: one patch, one set of flips
            raise SegforgeError(f"{model_dir}: the folds were trained with different patches or mirror axes "
                                f"({', '.join(f'{k}: patch {list(p)}, mirror axes {list(m)}' for k, (p, m) in trained.items())}). "
                                "Fix: predict the folds that agree (predict.folds=[...])")
        patch_size, mirror_axes = next(iter(trained.values()))
        return cls(plans, dataset_json, configuration, networks, torch_device, step_size, mirror, sw_batch_size, accumulate,
                   list(patch_size), list(mirror_axes), **gaussian)

    @property
    def average_logits(self) -> bool:
        """Average (and resample) logits rather than probabilities: how nnU-Net models were validated."""
        return self.plans.get("aggregate") == "logits"

    def _activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes, or a sigmoid per region, along axis 1."""
        return torch.sigmoid(logits) if self.regions_class_order else torch.softmax(logits, dim=1)

    @property
    def class_names(self) -> list[str]:
        """The output channels' names: classes with background first, or regions."""
        labels = self.dataset_json.get("labels", {})
        if self.regions_class_order:
            return [k for k, v in labels.items() if k not in ("background", "ignore") and v != 0]
        return [k for k, v in sorted(labels.items(), key=lambda kv: kv[1]) if isinstance(v, int) and k != "ignore"]

    @torch.no_grad()
    def _sliding_window(self, data: np.ndarray, device: torch.device) -> torch.Tensor:
        """Averaged probabilities (or logits, see ``average_logits``) ``(channels, z, y, x)`` of a preprocessed
        ``(c, z, y, x)`` case, on the CPU: every network (fold), mirrored per window, Gaussian-weighted windows."""
        x = host_to_device(data, device)
        axes = self.mirror_axes if self.mirror else []
        activation = None if self.average_logits else self._activation
        total = None
        for network in self.networks:
            network.to(device)
            out = sliding_window(x, network, self.patch_size, self.step_size, axes, self.sw_batch_size, self.accumulate,
                                 activation, **self.gaussian)
            total = out if total is None else total.add_(out)
        return (total / len(self.networks)).cpu()

    def _probabilities(self, data: np.ndarray) -> torch.Tensor:
        return self._on_device_or_cpu(lambda device: self._sliding_window(data, device))

    def _on_device_or_cpu(self, work):
        """``work(device)`` on the predictor's device; where a case runs the GPU out of memory, that case on the CPU,
        the next ones on the GPU again."""
        try:
            return work(self.device)
        except torch.cuda.OutOfMemoryError:
            if self.device.type == "cpu":
                raise
        # out of the except block: its traceback holds the failed attempt's GPU tensors, empty_cache could not free them
        log.warning("GPU out of memory; predicting this case on the CPU")
        torch.cuda.empty_cache()
        try:
            return work(torch.device("cpu"))
        finally:
            for network in self.networks:
                network.to(self.device)

    def _checked(self, image, geometry: Geometry | None) -> tuple[np.ndarray, Geometry]:
        """The case read from its channel files (or the array given), checked by ``check_input``."""
        files = None
        if not isinstance(image, np.ndarray):
            files = [Path(p) for p in (image if isinstance(image, (list, tuple)) else [image])]
            image, geometry = read_case(files)
        if geometry is None:
            raise ValueError("an array input needs its geometry")
        image, warnings = check_input(self, image, geometry, files, copy=files is None)  # never alter a caller's array
        for warning in warnings:
            log.warning(warning)
        return image, geometry

    def _preprocessed(self, image: np.ndarray, geometry: Geometry, previous: np.ndarray | None,
                      copy: bool = True) -> tuple[np.ndarray, dict]:
        """``preprocess_image``; for a cascade stage with the previous stage's one-hot mask appended as channels
        (``previous``: its ``(z, y, x)`` mask on the input's grid, e.g. the lowres model's prediction)."""
        if self.previous_labels is None:
            return preprocess_image(image, geometry, self.plans, self.configuration, copy=copy)
        if previous is None:
            plans = self.plans.get("plans_name", DEFAULT_PLANS)  # model folders of another plan carry its name
            before, this = (model_folder_name(c, plans) for c in (self.previous_stage, self.configuration))
            raise SegforgeError(f"{self.configuration} is a cascade stage: it takes the {self.previous_stage} "
                                f"prediction as input. Fix: pass the {self.previous_stage} model folder too, before it: "
                                f"`segforge predict -i IMAGES -o OUT --model .../{before} --model .../{this}`")
        from segforge.preprocessing.cascade import one_hot, previous_stage_on_grid

        data, props = preprocess_image(image, geometry, self.plans, self.configuration, copy=copy)
        prior = one_hot(previous_stage_on_grid(previous, props), self.previous_labels)
        return np.concatenate([data, prior]), props

    def probabilities(self, image: np.ndarray | str | Path | list, geometry: Geometry | None = None,
                      previous: np.ndarray | None = None) -> tuple[torch.Tensor, Geometry]:
        """Class (or region) probabilities ``(channels, z, y, x)`` on the input's grid, and its geometry.

        ``image``: channel files (a path or a list), or a ``(c, z, y, x)`` array with its geometry. Outside the crop box
        the probabilities say background (a region model: no region). ``previous``: a cascade stage's input, the
        previous stage's ``(z, y, x)`` mask on the input's grid.
        """
        image, geometry = self._checked(image, geometry)
        order = list(self.plans.get("transpose_forward") or range(3))
        if order != [0, 1, 2]:  # nnU-Net models work on axes reordered by their plan; undone below
            image = image.transpose(0, *[a + 1 for a in order])
            previous = previous.transpose(order) if previous is not None else None
            geometry_t = Geometry(tuple(geometry.spacing[a] for a in order), geometry.origin, geometry.direction, geometry.ndim)
            full, _ = self._probabilities_on_grid(image, geometry_t, previous)
            return full.permute(0, *[int(np.argsort(order)[a]) + 1 for a in range(3)]).contiguous(), geometry
        return self._probabilities_on_grid(image, geometry, previous)

    def _probabilities_on_grid(self, image: np.ndarray, geometry: Geometry,
                               previous: np.ndarray | None = None) -> tuple[torch.Tensor, Geometry]:
        start = time.perf_counter()
        data, props = self._preprocessed(image, geometry, previous)
        preprocessed = time.perf_counter()
        network_output = self._probabilities(data)
        predicted = time.perf_counter()
        cropped = restore_probabilities(network_output, props)
        if self.average_logits:
            cropped = self._activation(cropped[None])[0]
        full = torch.zeros((cropped.shape[0], *props["shape_before_crop"]), dtype=torch.float32)
        if not self.regions_class_order:
            full[0] = 1.0  # outside the crop box: background
        box = tuple(slice(a, b) for a, b in props["crop_bbox"])
        full[(slice(None), *box)] = cropped
        # seconds of the last case by stage (preprocess, network, restore to the input grid)
        self.last_timings = {"preprocess": preprocessed - start, "network": predicted - preprocessed,
                             "restore": time.perf_counter() - predicted}
        return full, geometry

    def labels(self, probabilities: torch.Tensor) -> np.ndarray:
        """The label map of ``probabilities``: argmax over classes, or regions painted in ``regions_class_order``."""
        if self.regions_class_order:
            out = np.zeros(probabilities.shape[1:], np.uint8 if max(self.regions_class_order) < 256 else np.uint16)
            for region, value in enumerate(self.regions_class_order):
                out[(probabilities[region] > 0.5).numpy()] = value
            return out
        return probabilities.argmax(0).numpy().astype(np.uint8 if probabilities.shape[0] < 256 else np.uint16)

    def predict(self, image: np.ndarray | str | Path | list, geometry: Geometry | None = None,
                overwrite_input: bool = False, previous: np.ndarray | None = None) -> tuple[np.ndarray, Geometry]:
        """A mask on the input's grid: from channel files (a path or a list), a ``(c, z, y, x)`` array + geometry, or
        a ``prepare``d case.

        Streamed: windows, the way back to the input grid and the labels go slab by slab along the first axis, so the
        memory for classes x volume is never taken (``probabilities`` does take it, to return it). Preprocessing
        works inside the image when it was read here or ``overwrite_input`` allows it (one copy of a 1 GB CT less).
        ``previous``: a cascade stage's previous-stage mask (``probabilities``)."""
        case = image if isinstance(image, PreparedCase) else self.prepare(image, geometry, overwrite_input, previous)
        del image
        if case.data is None:
            probabilities, geometry = self.probabilities(case.image, case.geometry, case.previous)
            return self.labels(probabilities), geometry
        data, props, geometry = case.data, case.props, case.geometry
        preprocessed = time.perf_counter()
        labels = self._on_device_or_cpu(lambda device: self._streamed_labels(data, props, device))
        out = np.zeros(props["shape_before_crop"], labels.dtype)
        out[tuple(slice(a, b) for a, b in props["crop_bbox"])] = labels
        self.last_timings = {"preprocess": case.seconds, "network+restore": time.perf_counter() - preprocessed}
        return out, geometry

    def prepare(self, image: np.ndarray | str | Path | list, geometry: Geometry | None = None,
                overwrite_input: bool = False, previous: np.ndarray | None = None) -> "PreparedCase":
        """``predict``'s work before the network: the case read, checked and preprocessed (a background loader does it
        for the next case while the network runs); ``predict`` takes the result in place of the image."""
        owned = overwrite_input or not isinstance(image, np.ndarray)
        image, geometry = self._checked(image, geometry)
        if list(self.plans.get("transpose_forward") or range(3)) != [0, 1, 2]:  # preprocessed on probabilities' path
            return PreparedCase(geometry, image=image, previous=previous)
        start = time.perf_counter()
        data, props = self._preprocessed(image, geometry, previous, copy=not owned)
        return PreparedCase(geometry, data=data, props=props, seconds=time.perf_counter() - start)

    @torch.no_grad()
    def _streamed_labels(self, data: np.ndarray, props: dict, device: torch.device) -> np.ndarray:
        """Labels on the cropped input grid from slabs of the windows' output: each slab is taken back in-plane as it
        comes, and an output slice is finished as soon as the slabs it interpolates from have arrived."""
        from segforge.inference.sliding_window import sliding_window_slabs
        from segforge.preprocessing.resample import axis_taps, resample

        modes = (props.get("resampling") or {}).get("probabilities") or ["linear"] * 3
        target = list(props["shape_after_crop"])
        # one 2D image (a slide) for a 2D model: stream along its rows instead, so classes x image is never held
        single_image = self.plan_config["dims"] == 2 and data.shape[1] == 1 and target[0] == 1
        if single_image:
            data, target, modes = data[:, 0], target[1:], list(modes[1:])
        depth_in = data.shape[1]
        if depth_in == target[0]:
            rows, weights = np.arange(target[0])[:, None], np.ones((target[0], 1), np.float32)
        else:
            index, w = axis_taps(depth_in, target[0], modes[0])
            rows, weights = index.numpy(), w.numpy()
        axes = self.mirror_axes if self.mirror else []
        activation = None if self.average_logits else self._activation
        x = host_to_device(data, device)
        streams = [sliding_window_slabs(x, network.to(device), self.patch_size, self.step_size,
                                        axes, self.sw_batch_size, self.accumulate, activation, **self.gaussian)
                   for network in self.networks]
        labels = None
        cache: dict[int, torch.Tensor] = {}
        done = 0
        for parts in zip(*streams):  # a few slices at a time, every fold's windows in step
            first = parts[0][0]
            slab = parts[0][1] if len(parts) == 1 else sum(p[1] for p in parts) / len(parts)
            slab = resample(slab.cpu(), [slab.shape[1], *target[1:]], ["nearest", *modes[1:]])  # in-plane only
            for k in range(slab.shape[1]):
                cache[first + k] = slab[:, k]
            del slab
            while done < target[0] and int(rows[done].max()) in cache:
                values = sum(float(wt) * cache[int(r)] for r, wt in zip(rows[done], weights[done]) if wt != 0.0)
                if self.average_logits:
                    values = self._activation(values[None])[0]
                row = self.labels(values[:, None])[0]
                if labels is None:
                    labels = np.zeros(target, row.dtype)
                labels[done] = row
                done += 1
                keep_from = int(rows[done].min()) if done < target[0] else depth_in
                for z in [z for z in cache if z < keep_from]:
                    del cache[z]
        return labels[None] if single_image else labels


@dataclass
class PreparedCase:
    """A case as ``Predictor.prepare`` leaves it for the network: preprocessed ``data`` and the ``props`` to undo it
    (or, for a plan that reorders axes, the checked ``image``), on the input's ``geometry``."""

    geometry: Geometry
    image: np.ndarray | None = None
    previous: np.ndarray | None = None  # a cascade stage's previous-stage mask, while the image waits unprocessed
    data: np.ndarray | None = None
    props: dict | None = None
    seconds: float = 0.0


class Ensemble:
    """Several predictors (e.g. the 2d and 3d_fullres models of one dataset) averaged on the input's grid."""

    def __init__(self, predictors: list[Predictor]):
        if not predictors:
            raise ValueError("an ensemble needs at least one predictor")
        first = predictors[0]
        for other in predictors[1:]:
            if other.class_names != first.class_names or bool(other.regions_class_order) != bool(first.regions_class_order):
                raise SegforgeError(f"models predict different classes ({first.class_names} vs {other.class_names}); "
                                    "an ensemble needs models of one dataset")
        self.predictors = predictors
        self.dataset_json, self.plans = first.dataset_json, first.plans

    @property
    def average_logits(self) -> bool:
        return self.predictors[0].average_logits

    def _activation(self, logits: torch.Tensor) -> torch.Tensor:
        return self.predictors[0]._activation(logits)

    @property
    def class_names(self) -> list[str]:
        return self.predictors[0].class_names

    def probabilities(self, image, geometry: Geometry | None = None) -> tuple[torch.Tensor, Geometry]:
        if not isinstance(image, np.ndarray):
            files = [Path(p) for p in (image if isinstance(image, (list, tuple)) else [image])]
            image, geometry = read_case(files)
        total = None
        for predictor in self.predictors:
            probabilities, geometry = predictor.probabilities(image, geometry)
            total = probabilities if total is None else total.add_(probabilities)
        return total / len(self.predictors), geometry

    def labels(self, probabilities: torch.Tensor) -> np.ndarray:
        return self.predictors[0].labels(probabilities)

    def predict(self, image, geometry: Geometry | None = None, overwrite_input: bool = False) -> tuple[np.ndarray, Geometry]:
        probabilities, geometry = self.probabilities(image, geometry)
        return self.labels(probabilities), geometry
