"""Peak memory of one real training step, traced rather than estimated.

Why our own: nnU-Net compares a sum of feature-map sizes against a constant tuned on one GPU, which misjudges other
cards, precisions and network variants. Here the real step (network class, norm, deep-supervision loss, backward,
optimizer step with its state, autocast precision) runs under PyTorch's ``FakeTensorMode``: every aten op executes
on shapes only, so a 3D step at any patch size costs milliseconds of dispatch and no memory. A
``TorchDispatchMode`` (``LiveStorageTracker``) records each tensor storage as it is created and forgets it when
its storage dies; the peak of live bytes (rounded to the CUDA caching allocator's 512-byte blocks) is the step's
peak allocated memory. The same tracker measures a real CPU step, which is how the prediction is tested.

What it does not see, and the plan's margin covers: allocator fragmentation, library workspaces (cuDNN) and the
CUDA context (``reserved_gb``). Mixed precision is traced with CPU autocast in bfloat16: the same 2-byte
activations as CUDA's float16/bfloat16 autocast.

``task="denoise"`` traces the denoising step instead: a ``Denoiser`` (group norm, attention at the lowest
resolutions, spatial-conditioning channels, as configured), noise and time drawn for the batch, the noisy image and
its target, and the MSE loss.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

# the planner traces exactly what training runs: the same network class, loss and optimizer factory
from segforge.configs import OPTIM_OPTIONS, packaged_defaults
from segforge.io.dataset import DatasetSpec
from segforge.nn.denoiser import Denoiser
from segforge.nn.unet import UNet
from segforge.training.losses import make_segmentation_loss
from segforge.training.optim import make_optimizer

BLOCK_BYTES = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this
GIB = 1024**3
_REAL_OPS = (torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step)
_DEVICE = torch.ops.prim.device.default  # ``tensor.device`` under a mode: half of a step's dispatches, no tensor made


def allocator_bytes(nbytes: int) -> int:
    return BLOCK_BYTES * max(1, math.ceil(nbytes / BLOCK_BYTES)) if nbytes else 0


class LiveStorageTracker(TorchDispatchMode):
    """Live tensor-storage bytes at the dispatcher: ``current`` now, ``peak`` since the last ``reset_peak``."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage's identity; views share it and are counted once
        if key in self._live:
            return
        nbytes = allocator_bytes(storage.nbytes())
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        # fires when the storage itself dies (PyTorch keeps a storage's Python object alive with the storage)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE:
            # answered as FakeTensor's own handler answers it, without the fake mode's dispatch (creates nothing)
            tensor = args[0]
            if isinstance(tensor, FakeTensor):
                return torch.device("meta") if tensor.fake_mode.in_kernel_invocation else tensor.fake_device
            return func(*args)
        if func in _REAL_OPS:
            # small index ranges whose values code reads back (MONAI's Dice: ``arange(...).tolist()``); a fake
            # tensor has no values, so these run for real, outside every mode, and are not counted
            with _disable_current_modes():
                return func(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.track(item)
        return out


@dataclass(frozen=True)
class StepSpec:
    """One training step as a plan describes it: network topology, batch, precision and optimizer."""

    spatial_dims: int
    in_channels: int
    num_classes: int
    patch_size: tuple[int, ...]
    batch_size: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    conv_per_stage: int = 2
    norm: str = "instance"
    deep_supervision: bool = True
    precision: str = "16-mixed"   # 32-true | 16-mixed | bf16-mixed
    optimizer: str = "sgd"        # sgd (momentum buffer) | adamw (two moments)
    # the denoising task (issue 7): in_channels are the image's channels, num_classes is unused
    task: str = "segment"         # segment | denoise
    cond_mode: str = "add"
    attention_stages: int = 0
    attention_heads: int = 4
    spatial_cond_channels: int = 0  # extra input channels: a label map or an image the denoiser is conditioned on
    cond_dim: int | None = None     # the Denoiser's default (4x the first stage's features) when None
    # the encoder (issue 19): plain conv blocks, or nnU-Net's residual blocks, this many per stage
    encoder: str = "plain"          # plain | residual
    blocks_per_stage: tuple[int, ...] | None = None

    def encoder_kwargs(self) -> dict:
        """The network's encoder arguments: none for the plain encoder (so its traces stay as they were)."""
        if self.encoder == "plain":
            return {}
        return dict(encoder=self.encoder,
                    blocks_per_stage=list(self.blocks_per_stage) if self.blocks_per_stage is not None else None)

    def network_kwargs(self) -> dict:
        if self.task == "denoise":
            return dict(**self.encoder_kwargs(), spatial_dims=self.spatial_dims, image_channels=self.in_channels,
                        features_per_stage=list(self.features_per_stage),
                        kernel_sizes=[list(k) for k in self.kernel_sizes], strides=[list(s) for s in self.strides],
                        conv_per_stage=self.conv_per_stage, norm=self.norm, cond_dim=self.cond_dim,
                        cond_mode=self.cond_mode, attention_stages=self.attention_stages,
                        attention_heads=self.attention_heads, spatial_cond_channels=self.spatial_cond_channels)
        return dict(**self.encoder_kwargs(), spatial_dims=self.spatial_dims, in_channels=self.in_channels,
                    out_channels=self.num_classes,
                    features_per_stage=list(self.features_per_stage), kernel_sizes=[list(k) for k in self.kernel_sizes],
                    strides=[list(s) for s in self.strides], conv_per_stage=self.conv_per_stage, norm=self.norm,
                    deep_supervision=self.deep_supervision)


def spec_from_plan(plans: dict, configuration: str, batch_size: int | None = None) -> StepSpec:
    """The training step one configuration of plans.json describes (hand edits included); a denoising plan's
    (its ``rules.denoiser_step``) is the denoising step."""
    from segforge.io.dataset import count_outputs

    conf = plans["configurations"][configuration]
    network, memory = conf["network"], conf["memory"]
    # the denoiser's fields beyond the plan's own network entry (norm, deep supervision) and memory (optimizer)
    denoiser = {k: v for k, v in ((plans.get("rules") or {}).get("denoiser_step") or {}).items()
                if k not in ("norm", "deep_supervision", "optimizer")}
    return replace(StepSpec(
        spatial_dims=conf["dims"],  # a cascade stage also takes one channel per previous-stage label
        in_channels=len(plans["channel_names"]) + len(conf.get("previous_stage_labels") or []), num_classes=count_outputs(plans["labels"]),
        patch_size=tuple(conf["patch_size"]), batch_size=int(batch_size or conf["batch_size"]),
        features_per_stage=tuple(network["features_per_stage"]), kernel_sizes=tuple(tuple(k) for k in network["kernel_sizes"]),
        strides=tuple(tuple(s) for s in network["strides"]), conv_per_stage=int(network["conv_per_stage"]),
        norm=network["norm"], deep_supervision=bool(network["deep_supervision"]), precision=memory["precision"],
        optimizer=memory["optimizer"], **network_encoder(network)), **denoiser)


def network_encoder(network: dict) -> dict:
    """A plan's ``network`` entry's encoder as ``StepSpec`` fields; plans from before issue 19 name none (plain)."""
    blocks = network.get("blocks_per_stage")
    return {"encoder": str(network.get("encoder") or "plain"),
            "blocks_per_stage": tuple(int(b) for b in blocks) if blocks is not None else None}


ENCODERS = ("plain", "residual")


def rules_encoder(rules, num_stages: int) -> dict:
    """``plan.encoder`` and its ``plan.blocks_per_stage`` cut to the ``num_stages`` of a topology (``StepSpec``
    fields); the plain encoder has no blocks (``plan.conv_per_stage`` convolutions per stage)."""
    encoder = str(rules.encoder)
    if encoder not in ENCODERS:
        raise ValueError(f"plan.encoder={encoder!r}; use one of {list(ENCODERS)}")
    if encoder == "plain":
        return {"encoder": "plain", "blocks_per_stage": None}
    blocks = [int(b) for b in rules.blocks_per_stage or []]
    if len(blocks) < num_stages or min(blocks[:num_stages], default=1) < 1:
        raise ValueError(f"plan.blocks_per_stage={blocks} needs a positive count for each of the {num_stages} stages "
                         "of this topology (nnU-Net's ResEnc: [1, 3, 4, 6, 6, 6, ...])")
    return {"encoder": encoder, "blocks_per_stage": tuple(blocks[:num_stages])}


TASKS = ("segment", "denoise")


def _build(spec: StepSpec):
    if spec.task not in TASKS:
        raise ValueError(f"unknown task {spec.task!r}; use {' or '.join(TASKS)}")
    if spec.task == "denoise":
        network, loss = Denoiser(**spec.network_kwargs()), torch.nn.functional.mse_loss
    else:
        network = UNet(**spec.network_kwargs())
        num_outputs = len(spec.strides) - 1 if spec.deep_supervision else 1
        loss = make_segmentation_loss(None, num_outputs)  # task.loss of configs/task/segment.yaml
    network.train()
    option = OPTIM_OPTIONS[spec.optimizer]  # the packaged optimizer of that name
    optimizer = make_optimizer(network.parameters(), packaged_defaults("optim", option)["optimizer"])
    return network, loss, optimizer


def _autocast(precision: str):
    if precision in ("16-mixed", "bf16-mixed"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision in ("32-true", "32"):
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision {precision!r}; use 32-true, 16-mixed or bf16-mixed")


def step_batch(spec: StepSpec, device: torch.device | str = "cpu") -> dict:
    """The batch one training step receives: an image and a label map, or (denoise) the clean image and its
    spatial conditioning."""
    shape = (spec.batch_size, spec.in_channels, *spec.patch_size)
    if spec.task == "denoise":
        batch = {"image": torch.randn(shape, device=device)}
        if spec.spatial_cond_channels:
            batch["spatial_cond"] = torch.randn(spec.batch_size, spec.spatial_cond_channels, *spec.patch_size,
                                                device=device)
        return batch
    return {"image": torch.randn(shape, device=device),
            "label": torch.randint(0, spec.num_classes, (spec.batch_size, 1, *spec.patch_size), device=device)}


def step_loss(spec: StepSpec, network, loss_fn, batch: dict) -> torch.Tensor:
    """The loss of one step (call under the step's autocast). Denoise: noise and times are drawn inside the step,
    the noisy image is ``alpha * x0 + sigma * noise`` and the target is a same-sized tensor, as in every objective."""
    if spec.task != "denoise":
        return loss_fn(network(batch["image"]), batch["label"].float())
    x0 = batch["image"]
    noise = torch.randn_like(x0)
    t = torch.rand(x0.shape[0], device=x0.device)
    alpha = (1 - t).reshape(-1, *([1] * (x0.ndim - 1)))
    x_t = alpha * x0 + (1 - alpha) * noise
    target = noise - x0
    return loss_fn(network(x_t, t, batch.get("spatial_cond")), target)


def run_step(spec: StepSpec, tracker: LiveStorageTracker) -> int:
    """Build and run one steady-state training step under ``tracker``; the step's peak live bytes.

    Steady state: the optimizer state exists (a warm-up step on zero gradients creates it first), gradients were
    freed by the previous ``zero_grad``, and the batch is allocated inside the step, as when it arrives on the GPU.
    """
    with tracker:
        network, loss_fn, optimizer = _build(spec)
        for parameter in network.parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker.reset_peak()
        batch = step_batch(spec)
        with _autocast(spec.precision):
            loss = step_loss(spec, network, loss_fn, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss, batch
    return tracker.peak


def fake_mode():
    """A fake-tensor mode for ``traced_peak_bytes``; reusing one across traces reuses its dispatch cache (2x faster)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


# traced peaks by step description: a memo of a pure function of the frozen StepSpec (oldest dropped first)
_TRACED_PEAKS: dict[StepSpec, int] = {}
_TRACED_PEAKS_MAX = 4096


def traced_peak_bytes(spec: StepSpec, mode=None) -> int:
    """Peak allocated bytes of one training step, from shapes alone (no memory, any patch size); memoized by
    ``spec``, so a step described twice in one process is traced once."""
    if spec not in _TRACED_PEAKS:
        with mode or fake_mode():
            peak = run_step(spec, LiveStorageTracker())
        if len(_TRACED_PEAKS) >= _TRACED_PEAKS_MAX:
            del _TRACED_PEAKS[next(iter(_TRACED_PEAKS))]
        _TRACED_PEAKS[spec] = peak
    return _TRACED_PEAKS[spec]


def measured_peak_bytes(spec: StepSpec) -> int:
    """The same step actually run on the CPU, measured by the same tracker (for tests and ``--verify``)."""
    return run_step(spec, LiveStorageTracker())


def cuda_peak_bytes(spec: StepSpec) -> int:
    """The real step on the current CUDA device: ``torch.cuda.max_memory_allocated`` (``plan --verify``)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    network, loss_fn, optimizer = _build(spec)
    network.to("cuda")
    for parameter in network.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dtype = torch.bfloat16 if spec.precision == "bf16-mixed" else torch.float16
    batch = step_batch(spec, "cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=spec.precision != "32-true"):
        loss = step_loss(spec, network, loss_fn, batch)
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def analytic_activation_elements(spec: StepSpec) -> float:
    """nnU-Net-style size proxy: feature-map elements of encoder and decoder for the whole batch (a fast filter)."""
    size = list(spec.patch_size)
    total = 0.0
    for stage, (feats, stride) in enumerate(zip(spec.features_per_stage, spec.strides)):
        size = [s // st for s, st in zip(size, stride)]
        voxels = math.prod(size)
        total += feats * voxels * spec.conv_per_stage * (2 if stage < len(spec.strides) - 1 else 1)  # decoder twin
    return float(total * spec.batch_size + spec.in_channels * math.prod(spec.patch_size) * spec.batch_size)


def denoiser_step(task_cfg, spec: DatasetSpec) -> dict:
    """The planner's ``StepSpec`` fields of a denoising step as ``task_cfg`` configures it (memory tracing)."""
    network = task_cfg.network
    return {"task": "denoise", "norm": str(network.norm), "cond_mode": str(network.cond_mode),
            "attention_stages": int(network.attention_stages), "attention_heads": int(network.attention_heads),
            "cond_dim": int(network.cond_dim) if network.cond_dim else None, "deep_supervision": False,
            "spatial_cond_channels": len(spec.mask_values) if task_cfg.mask_conditioning else 0,
            "optimizer": str(task_cfg.get("planned_optimizer", "adamw"))}
