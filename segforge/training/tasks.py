"""What a training task decides, and nothing else: the network's arguments, the LightningModule (and with it the
metric the best checkpoint follows, its ``monitor``), what the batches carry, the files it adds to the model folder and
its weights file, and the final validation. Everything else (data pipeline, precision, checkpoints, resume, DDP,
logging, budget, run and model folders) is ``training/run.py``'s, the same for every task.

* ``segment`` (``task=segment``, the default): the U-Net with one output per class; Dice + CE; pseudo-Dice.
* ``denoise`` (``task=denoise``): the same U-Net core as a timestep-conditioned ``Denoiser`` trained on a
  ``DiffusionProcess`` (``configs/task/denoise.yaml``). Labels are read only for mask conditioning
  (``task.mask_conditioning``: the one-hot label map as spatial conditioning). Intensity augmentation is off unless
  ``task.intensity_augmentation`` (it would change the clean target); spatial augmentation stays. The process is
  written to ``<model_dir>/diffusion.json`` and into the weights file, with the typical normalisation of the
  training cases (to give generated images the dataset's intensity units) and the default sampler.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from segforge.errors import SegforgeError
from segforge.io.artifacts import read_json
from segforge.io.dataset import DatasetSpec
from segforge.planning.memory import network_encoder

log = logging.getLogger("segforge")

NOT_NETWORK_ARGS = ("channels_last", "compile")  # model.* settings of the run, not of the network class
TOPOLOGY = ("features_per_stage", "kernel_sizes", "strides", "conv_per_stage")
INTENSITY_PROBS = ("noise_prob", "blur_prob", "brightness_prob", "contrast_prob", "lowres_prob", "gamma_inverted_prob",
                   "gamma_prob")


def segmentation_network_kwargs(cfg, plan_config: dict, in_channels: int, out_channels: int) -> dict:
    """The segmentation network's arguments: the plan's topology, where the ``model`` config leaves a value null."""
    from_plan = plan_config["network"]
    model = OmegaConf.to_container(cfg.model, resolve=True)
    kwargs = {k: v for k, v in model.items() if k != "_target_" and k not in NOT_NETWORK_ARGS}
    for key in (*TOPOLOGY, "norm", "deep_supervision"):
        if kwargs.get(key) is None:
            kwargs[key] = from_plan[key]
    kwargs.update(trained_encoder(model, from_plan))
    kwargs.update(spatial_dims=plan_config["dims"], in_channels=in_channels, out_channels=out_channels)
    return {"_target_": model["_target_"], **kwargs}


def trained_encoder(model: dict, from_plan: dict) -> dict:
    """``model.encoder`` and ``model.blocks_per_stage``, the plan's where null (an explicit override wins; a plain
    plan's blocks are none, so ``model.encoder=residual`` on it takes the network's default ResEnc blocks)."""
    planned = network_encoder(from_plan)
    encoder = model.get("encoder") or planned["encoder"]
    blocks = model.get("blocks_per_stage")
    if blocks is None and encoder == planned["encoder"] and planned["blocks_per_stage"] is not None:
        blocks = list(planned["blocks_per_stage"])
    return {"encoder": encoder, "blocks_per_stage": blocks}


class SegmentTask:
    """``task=segment``: what ``segforge train`` did before there were tasks."""

    name = "segment"
    with_labels = True

    def __init__(self, cfg, spec: DatasetSpec, plan_config: dict, data_dir: Path):
        self.cfg, self.spec, self.plan_config, self.data_dir = cfg, spec, plan_config, data_dir

    def network_kwargs(self) -> dict:
        extra = len(self.plan_config.get("previous_stage_labels") or []) if self.plan_config.get("previous_stage") else 0
        return segmentation_network_kwargs(self.cfg, self.plan_config, self.spec.num_channels + extra,
                                           self.spec.num_outputs)

    def data_cfg(self):
        return self.cfg.data

    def module(self, network, kwargs: dict):
        from segforge.training.losses import make_segmentation_loss
        from segforge.training.module import SegmentationModule

        regions, ignore_label = label_setup(self.spec)
        outputs = len(kwargs["strides"]) - 1 if kwargs.get("deep_supervision") else 1
        loss = make_segmentation_loss(self.cfg.task.loss, outputs, regions, ignore_label)
        return SegmentationModule(network, loss, self.cfg.optim.optimizer, self.spec.num_outputs, regions, ignore_label,
                                  float(self.cfg.task.validation.metric_ema_decay), bool(self.cfg.model.get("channels_last")),
                                  bool(self.cfg.model.get("compile")))

    def model_files(self) -> dict[str, str]:
        """Files (name -> text) the model folder holds besides plans.json and dataset.json; the same for every fold."""
        return {}

    def exported(self, module, network):
        return network

    def weights_extras(self, train_ids: list[str]) -> dict:
        return {}

    def window_network(self, network):
        """A module whose ``forward(window)`` is one sliding-window step of this task (timed for a budget)."""
        return network

    def validation_passes(self, mirror_axes: list[int] | None = None) -> int:
        """How often the final validation evaluates each window (a budget counts its cost): once per mirroring of
        ``mirror_axes`` (those training used; default the plan's)."""
        axes = self.plan_config.get("mirror_axes", []) if mirror_axes is None else mirror_axes
        return 2 ** len(axes) if self.cfg.final_validation.mirror else 1

    def final_validation(self, network, plans: dict, configuration: str, val_ids: list[str], fold_dir: Path, device,
                         patch_size: list[int] | None = None, mirror_axes: list[int] | None = None,
                         next_stages: dict | None = None, previous: dict | None = None) -> dict:
        """The sliding-window validation with the patch and mirror axes training used (default: the plan's);
        ``next_stages``, ``previous``: the cascade's (``validate_fold``)."""
        from segforge.training.validation import validate_fold

        final = self.cfg.final_validation
        summary = validate_fold(network, plans, read_json(self.spec.root / "dataset.json"), configuration, self.spec,
                                val_ids, fold_dir / "validation", device, mirror=bool(final.mirror),
                                step_size=float(final.step_size), sw_batch_size=int(final.sw_batch_size),
                                save_probabilities=bool(final.get("save_probabilities", False)),
                                patch_size=patch_size, mirror_axes=mirror_axes, next_stages=next_stages,
                                previous=previous)
        log.info("validation of fold %s (%d cases, sliding window): mean foreground Dice %.4f", self.cfg.fold,
                 summary["num_cases"], summary["foreground_mean_dice"])
        return {"validation_mean_dice": summary["foreground_mean_dice"]}


def label_setup(spec: DatasetSpec) -> tuple[list[list[int]] | None, int | None]:
    """(regions as lists of label values, or None; the ignore label, or None)."""
    regions = None
    if spec.has_regions:
        regions = [list(v) if isinstance(v, list) else [v] for k, v in spec.labels.items()
                   if k not in ("background", "ignore") and v != 0]
    return regions, spec.ignore_label


def diffusion_process(task_cfg):
    """The ``DiffusionProcess`` the task config pins (``objective`` with ``schedule`` or ``flow``)."""
    from segforge.diffusion.process import DiffusionProcess
    from segforge.diffusion.schedules import FlowPath, NoiseSchedule

    objective = str(task_cfg.objective)
    if objective == "flow":
        schedule = FlowPath(**OmegaConf.to_container(task_cfg.flow, resolve=True))
    else:
        schedule = NoiseSchedule(**OmegaConf.to_container(task_cfg.schedule, resolve=True))
    return DiffusionProcess(schedule, objective)


def typical_normalization(data_dir: Path, case_ids: list[str]) -> list[dict]:
    """Per channel, the median normalisation of the training cases (``CASE.json``): a generated image has no source
    image to take per-image statistics from, so it gets the dataset's typical intensity units."""
    applied = [read_json(data_dir / f"{case}.json", "case_properties")["normalization_applied"] for case in case_ids]
    typical = []
    for channel, first in enumerate(applied[0]):
        typical.append({**first, "shift": float(np.median([a[channel]["shift"] for a in applied])),
                        "scale": float(np.median([a[channel]["scale"] for a in applied])), "mask_outside": False})
    return typical


class DenoiseTask(SegmentTask):
    """``task=denoise`` (module docstring)."""

    name = "denoise"

    def __init__(self, cfg, spec: DatasetSpec, plan_config: dict, data_dir: Path):
        super().__init__(cfg, spec, plan_config, data_dir)
        self.task = cfg.task
        self.process = diffusion_process(self.task)
        self.masks = bool(self.task.mask_conditioning)
        self.with_labels = self.masks
        if self.masks and len(spec.mask_values) < 2:
            raise SegforgeError(f"{spec.root}: task.mask_conditioning=true needs a labelled dataset (dataset.json "
                                "labels beyond background, and labelsTr/). Fix: add the labels, or task.mask_conditioning=false")

    def network_kwargs(self) -> dict:
        model = OmegaConf.to_container(self.cfg.model, resolve=True)
        network = OmegaConf.to_container(self.task.network, resolve=True)
        kwargs = {key: model.get(key) for key in (*TOPOLOGY, "encoder", "blocks_per_stage", "upsample")}
        kwargs.update({k: v for k, v in network.items() if v is not None or k not in kwargs})
        for key in TOPOLOGY:
            if kwargs.get(key) is None:
                kwargs[key] = self.plan_config["network"][key]
        kwargs.update(trained_encoder(model, self.plan_config["network"]))
        kwargs.update(spatial_dims=self.plan_config["dims"], image_channels=self.spec.num_channels,
                      spatial_cond_channels=len(self.spec.mask_values) if self.masks else 0,
                      time_scale=self.process.model_time_scale)
        return {"_target_": "segforge.nn.denoiser.Denoiser", **kwargs}

    def data_cfg(self):
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
        if data.get("augmentation") and not self.task.intensity_augmentation:  # the clean image is the target
            data["augmentation"].update({key: 0.0 for key in INTENSITY_PROBS})
        return OmegaConf.create(data)

    def module(self, network, kwargs: dict):
        from segforge.training.denoising import DenoisingModule

        ema = self.task.ema
        return DenoisingModule(network, self.process, self.cfg.optim.optimizer, seed=int(self.cfg.seed),
                               mask_values=self.spec.mask_values if self.masks else None,
                               cond_dropout=float(self.task.cond_dropout), time_band=tuple(self.task.time_band),
                               validation_sigma=float(self.task.validation.sigma),
                               metric_ema_decay=float(self.task.validation.metric_ema_decay),
                               range_floor=float(self.task.validation.range_floor),
                               weight_ema_decay=float(ema.decay) if ema.enabled else None,
                               channels_last=bool(self.cfg.model.get("channels_last")),
                               compile=bool(self.cfg.model.get("compile")))

    def model_files(self) -> dict[str, str]:
        from segforge.diffusion.process import PROCESS_FILE

        return {PROCESS_FILE: json.dumps(self.process.to_json(), indent=2) + "\n"}

    def exported(self, module, network):
        return module.averaged

    def weights_extras(self, train_ids: list[str]) -> dict:
        from segforge.diffusion.samplers import check_sampler, default_sampler

        sampler = str(self.task.sampling.sampler or default_sampler(self.process))
        check_sampler(sampler, self.process)
        return {"task": self.name, "diffusion": self.process.to_json(), "time_band": [float(v) for v in self.task.time_band],
                "sampling": {"sampler": sampler, "steps": int(self.task.sampling.steps)},
                "mask_values": self.spec.mask_values if self.masks else None,
                "typical_normalization": typical_normalization(self.data_dir, train_ids)}

    def window_network(self, network):
        from segforge.nn.denoiser import WindowDenoiser

        return WindowDenoiser(network, self.process.t_max, self.spec.num_channels)

    def validation_passes(self, mirror_axes: list[int] | None = None) -> int:
        """Once per noise level of the final validation (one-step denoising, no mirroring)."""
        return len(self.task.final_validation_sigmas)

    def final_validation(self, network, plans: dict, configuration: str, val_ids: list[str], fold_dir: Path, device,
                         patch_size: list[int] | None = None, mirror_axes: list[int] | None = None) -> dict:
        from segforge.training.denoise_validation import validate_denoiser

        windows = {**self.plan_config, "patch_size": list(patch_size or self.plan_config["patch_size"])}  # as trained
        summary = validate_denoiser(network, self.process, self.data_dir, val_ids, windows,
                                    list(self.task.final_validation_sigmas), fold_dir / "validation", device,
                                    self.spec.mask_values if self.masks else None, int(self.cfg.seed),
                                    step_size=float(self.cfg.final_validation.step_size),
                                    sw_batch_size=int(self.cfg.final_validation.sw_batch_size))
        log.info("validation of fold %s (%d cases): PSNR noisy -> denoised %s", self.cfg.fold, len(val_ids),
                 ", ".join(f"sigma {s}: {v['noisy_psnr']:.2f} -> {v['denoised_psnr']:.2f} dB"
                           for s, v in summary["by_sigma"].items()))
        return {"validation_psnr": {s: v["denoised_psnr"] for s, v in summary["by_sigma"].items()}}


TASKS = {"segment": SegmentTask, "denoise": DenoiseTask}


def planned_task(plans: dict) -> str:
    """The task a plans.json was made for: a denoising plan records the denoiser's step in its rules."""
    return "denoise" if (plans.get("rules") or {}).get("denoiser_step") else "segment"


def make_task(cfg, spec: DatasetSpec, plan_config: dict, data_dir: Path, manifest: dict, plans: dict | None = None):
    """The task ``cfg.task.name`` names, checked against the preprocessed data (labels present when it needs them)
    and, warning only, against the task the plan was made for (it still trains: only fit and speed differ)."""
    name = str(cfg.task.name)
    if name not in TASKS:
        raise SegforgeError(f"task={name} is not a task; use one of {', '.join(TASKS)}")
    if plans is not None and planned_task(plans) != name:
        log.warning("plans.json of %s was made for task=%s (its normalisation, cropping and memory fit are that "
                    "task's), and this run trains task=%s. For a plan that fits: segforge plan %s task=%s",
                    spec.root, planned_task(plans), name, spec.root, name)
    task = TASKS[name](cfg, spec, plan_config, data_dir)
    if task.with_labels and not manifest.get("labelled", True):
        need = "mask-conditioned denoising (task.mask_conditioning=true)" if name == "denoise" else f"task={name}"
        raise SegforgeError(f"{data_dir}: the dataset was preprocessed without labels (it has no labelsTr/): {need} "
                            f"needs them. Fix: add labelsTr/ and run `segforge plan {spec.root}`, or train with "
                            "task=denoise (images alone)")
    return task
