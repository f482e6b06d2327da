"""Fit patch and batch size to a GPU memory budget, by the traced peak of the real training step.

The search walks nnU-Net's sequence of shrinking patch candidates (largest first). A cheap analytic estimate
guesses where the budget is crossed and is recalibrated on each traced guess; traces then settle it: the chosen
candidate fits, and the next larger one does not. Within one topology the peak is affine in batch x patch voxels
(within ``LAW_TOLERANCE_BYTES``), so once a topology has two traced sizes the others are predicted: the chosen patch
is traced, its batch grown by the law. Typically two or three traces per configuration, about half a second each
on a quiet core (see ``memory.py``); with ``plan.memory.timeline`` (the default) one per topology
(``timeline.py``). ``method=analytic`` skips the traces (a rough, uncalibrated estimate: for quick experiments, not
for real plans).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from segforge.nn.unet import UNet
from segforge.planning.memory import GIB, StepSpec, analytic_activation_elements, fake_mode, traced_peak_bytes
from segforge.planning.timeline import PeakTimeline, trace_timeline

log = logging.getLogger(__name__)

# analytic method only: bytes per activation element of the proxy (fitted on traced U-Nets, 2-byte autocast)
ANALYTIC_BYTES_PER_ELEMENT = {"16-mixed": 7.0, "bf16-mixed": 7.0, "32-true": 12.0}


@dataclass(frozen=True)
class MemoryBudget:
    """A card's memory, what lies outside PyTorch's allocator, and the margin for fragmentation."""

    gpu_memory_gb: float
    reserved_gb: float = 0.5
    margin: float = 0.1

    @property
    def total_bytes(self) -> int:
        return int(self.gpu_memory_gb * GIB)

    @property
    def peak_limit_bytes(self) -> int:
        """The largest traced peak that fits: (card - reserved) / (1 + margin)."""
        return int((self.gpu_memory_gb - self.reserved_gb) * GIB / (1.0 + self.margin))

    def fits(self, peak_bytes: int) -> bool:
        return peak_bytes <= self.peak_limit_bytes


def parameter_count(spec: StepSpec) -> int:
    """Weights of the U-Net ``spec`` describes (convolutions, norms, transposed convolutions, heads); a residual
    encoder's are counted on the network itself, built on the meta device (no memory)."""
    if spec.encoder != "plain":
        with torch.device("meta"):
            return sum(p.numel() for p in UNet(**spec.network_kwargs()).parameters())
    count, channels = 0, spec.in_channels
    feats = list(spec.features_per_stage)
    for stage, (f, kernel) in enumerate(zip(feats, spec.kernel_sizes)):
        for i in range(spec.conv_per_stage):
            count += (channels if i == 0 else f) * f * math.prod(kernel) + 3 * f
        channels = f
    for stage in range(len(feats) - 1, 0, -1):
        below, skip = feats[stage], feats[stage - 1]
        count += below * skip * math.prod(spec.strides[stage]) + skip
        for i in range(spec.conv_per_stage):
            count += (2 * skip if i == 0 else skip) * skip * math.prod(spec.kernel_sizes[stage - 1]) + 3 * skip
        count += (skip + 1) * spec.num_classes
    return count


def static_bytes(spec: StepSpec) -> int:
    """Weights, gradients and optimizer state in float32: the part of the peak that does not scale with batch."""
    state = {"sgd": 1, "adamw": 2}[spec.optimizer]
    return 4 * parameter_count(spec) * (2 + state)


def analytic_peak_bytes(spec: StepSpec, bytes_per_element: float) -> int:
    return int(static_bytes(spec) + bytes_per_element * analytic_activation_elements(spec))


# The affine law: within one topology (a segmentation step with everything but patch and batch fixed) every
# activation, gradient of an activation and loss map scales with batch x patch voxels (the patch is divisible by
# the total pooling, so each stage's map is the patch volume over its pooling), and weights, their gradients and
# the optimizer state do not: peak = intercept + slope x batch x voxels. Exact but for the allocator's 512-byte
# rounding of each tensor (a few hundred tensors live at the peak, each off by < 512 bytes; 4.5 KiB at 40 MB,
# 6-21 KiB at 1-22 GB measured); tests/test_memory_law.py checks predictions against fresh traces within this.
LAW_TOLERANCE_BYTES = 64 * 1024


def law_key(spec: StepSpec) -> tuple[StepSpec, int] | None:
    """The topology ``spec`` belongs to (patch and batch blanked) and its batch x patch voxels; None where the law
    does not hold: a patch not divisible by the total pooling, or the denoiser (attention grows with voxels^2)."""
    total = [math.prod(s[a] for s in spec.strides) for a in range(spec.spatial_dims)]
    if spec.task != "segment" or any(p % t for p, t in zip(spec.patch_size, total)):
        return None
    return replace(spec, patch_size=(0,) * spec.spatial_dims, batch_size=0), spec.batch_size * math.prod(spec.patch_size)


def affine_peak(points: dict[int, int], size: int) -> int:
    """The law's peak at ``size`` (batch x voxels) through the two traced points nearest to it."""
    (x1, y1), (x2, y2) = sorted(points.items(), key=lambda xy: abs(math.log(xy[0] / size)))[:2]
    return int(round(y1 + (y2 - y1) * (size - x1) / (x2 - x1)))


class PeakOracle:
    """Peak bytes per step spec: traced (cached; once a topology has two traced sizes, the affine law predicts
    the others and ``exact`` traces a chosen one), or the analytic proxy at ``bytes_per_element``. ``timeline``
    (``plan.memory.timeline``): each topology is traced once, at the marker batch, and its timeline answers every
    size of it, ``exact`` too (``timeline.py``); steps outside the law are traced size by size as before."""

    def __init__(self, method: str = "traced", bytes_per_element: float | None = None, timeline: bool = False):
        if method not in ("traced", "analytic"):
            raise ValueError(f"plan.memory.method must be traced or analytic, not {method!r}")
        self.method, self.bytes_per_element = method, bytes_per_element
        # timeline: one trace per topology predicts every size of it (``timeline.py``), ``exact`` included
        self.timeline = timeline and method == "traced"
        self._timelines: dict[StepSpec, PeakTimeline | None] = {}
        self._cache: dict[StepSpec, int] = {}
        self._traced: set[StepSpec] = set()
        self._laws: dict[StepSpec, dict[int, int]] = {}  # topology -> {batch x voxels: traced peak}
        self._mode = None
        self.traces = 0
        self.predictions = 0

    def __call__(self, spec: StepSpec) -> int:
        if spec not in self._cache:
            if self.timeline and self._from_timeline(spec) is not None:
                return self._cache[spec]
            if self.method == "traced":
                law = law_key(spec)
                points = self._laws.get(law[0], {}) if law else {}
                if len(points) >= 2:
                    self._cache[spec] = affine_peak(points, law[1])
                    self.predictions += 1
                else:
                    return self.exact(spec)
            else:
                per_element = self.bytes_per_element or ANALYTIC_BYTES_PER_ELEMENT[spec.precision]
                self._cache[spec] = analytic_peak_bytes(spec, per_element)
        return self._cache[spec]

    def exact(self, spec: StepSpec) -> int:
        """The traced peak, never the law's prediction (the analytic method: its estimate)."""
        if self.method != "traced":
            return self(spec)
        if self.timeline and self._from_timeline(spec) is not None:  # the topology's one trace
            return self._cache[spec]
        if spec not in self._traced:
            self._mode = self._mode or fake_mode()
            self._cache[spec] = traced_peak_bytes(spec, self._mode)
            self._traced.add(spec)
            self.traces += 1
            law = law_key(spec)
            if law:
                self._laws.setdefault(law[0], {})[law[1]] = self._cache[spec]
        return self._cache[spec]

    def _from_timeline(self, spec: StepSpec) -> int | None:
        """The peak from ``spec``'s topology's timeline, traced on first use; None where the law does not hold or
        the timeline could not split the step (then sizes are traced one by one)."""
        law = law_key(spec)
        if law is None:
            return None
        if law[0] not in self._timelines:
            self._mode = self._mode or fake_mode()
            self._timelines[law[0]] = trace_timeline(spec, self._mode)
            self.traces += 1
        timeline = self._timelines[law[0]]
        if timeline is None:
            return None
        if spec not in self._cache:
            self._cache[spec] = timeline.peak(law[1])
        return self._cache[spec]

    @staticmethod
    def calibrated(spec: StepSpec, peak_bytes: int) -> PeakOracle:
        """An analytic oracle that reproduces ``peak_bytes`` for ``spec`` (cheap searches near a traced plan)."""
        per_element = max(peak_bytes - static_bytes(spec), 1) / max(analytic_activation_elements(spec), 1.0)
        return PeakOracle("analytic", per_element)


@dataclass
class Fit:
    """The chosen candidate and batch, with the evidence: its predicted peak and the next larger candidate's."""

    index: int
    spec: StepSpec
    peak_bytes: int
    fits: bool
    next_larger_patch: list[int] | None = None
    next_larger_peak_bytes: int | None = None


def choose_candidate(specs: list[StepSpec], budget: MemoryBudget, peak: PeakOracle) -> Fit:
    """The largest candidate (lowest index) whose step fits ``budget``; ``specs`` run from largest to smallest.

    The analytic proxy guesses the crossing, is recalibrated on each traced guess, and traces settle it: the
    chosen candidate fits and the next larger one (also traced) does not."""
    def first_fitting(proxy: PeakOracle) -> int:
        return next((i for i, s in enumerate(specs) if budget.fits(proxy(s))), len(specs) - 1)

    index = first_fitting(PeakOracle("analytic"))
    for _ in range(3):
        better = first_fitting(PeakOracle.calibrated(specs[index], peak(specs[index])))
        if better == index:
            break
        index = better
    if budget.fits(peak(specs[index])):
        while index > 0 and budget.fits(peak(specs[index - 1])):
            index -= 1
    else:
        while index < len(specs) - 1 and not budget.fits(peak(specs[index])):
            index += 1
    while index < len(specs) - 1 and not budget.fits(peak.exact(specs[index])):  # the chosen one is traced
        index += 1
    chosen = peak.exact(specs[index])
    if index == 0:
        return Fit(0, specs[0], chosen, budget.fits(chosen))
    larger = specs[index - 1]
    return Fit(index, specs[index], chosen, budget.fits(chosen), list(larger.patch_size), peak(larger))


def choose_batch(fit: Fit, budget: MemoryBudget, peak: PeakOracle, batch_min: int, batch_max: int) -> Fit:
    """Grow the batch while the step fits. Activations scale linearly with the batch and weights, gradients and
    optimizer state do not, so one trace at a guessed batch gives the exact slope and a second confirms."""
    spec, current = fit.spec, fit.peak_bytes
    if not fit.fits or batch_max <= spec.batch_size:
        return fit

    def largest_fitting(per_sample: float) -> int:
        extra = (budget.peak_limit_bytes - current) // max(per_sample, 1.0)
        return int(max(batch_min, min(batch_max, spec.batch_size + extra)))

    batch = largest_fitting(max(current - static_bytes(spec), 1) / spec.batch_size)
    if batch > spec.batch_size:
        probe = peak(replace(spec, batch_size=batch))
        batch = largest_fitting((probe - current) / (batch - spec.batch_size))
    while batch > spec.batch_size and not budget.fits(peak(replace(spec, batch_size=batch))):
        batch -= 1  # rounding in the allocator's blocks: at most a step or two
    chosen = replace(spec, batch_size=batch)
    return replace(fit, spec=chosen, peak_bytes=peak(chosen), fits=budget.fits(peak(chosen)))


def describe(fit: Fit, budget: MemoryBudget, precision: str, optimizer: str, method: str) -> dict:
    """The plan's ``memory`` entry: what was predicted, against what budget, with which margin."""
    entry = {
        "method": method,
        "gpu_memory_gb": budget.gpu_memory_gb,
        "precision": precision,
        "optimizer": optimizer,
        "predicted_peak_bytes": int(fit.peak_bytes),
        "reserved_bytes": int(budget.reserved_gb * GIB),
        "margin": budget.margin,
        "required_bytes": int(fit.peak_bytes * (1 + budget.margin) + budget.reserved_gb * GIB),
        "budget_bytes": budget.total_bytes,
        "fits_budget": bool(fit.fits),
    }
    if fit.next_larger_patch is not None:
        entry["next_larger_patch_size"] = fit.next_larger_patch
        entry["next_larger_peak_bytes"] = int(fit.next_larger_peak_bytes)
    return entry
