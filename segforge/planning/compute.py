"""Size a configuration for a wall-clock budget on the device at hand: the compute-aware plan.

Why our own: nnU-Net sizes every network for an 8 GB GPU and assumes 250,000 iterations; on a CPU or with minutes
to spare that network takes seconds per step and learns nothing in time. Here the planner asks what the budget
buys: the seconds one training step takes (measured on the device with a few real steps, or computed from a throughput
the user states, e.g. for a GPU the plan is made for elsewhere) decide how many iterations fit, and the largest
network and patch that still get ``target_iterations`` within the budget, after the final validation, win.

Candidates are the nnU-Net patch sequence at the full-resolution spacing (never larger than the memory-fitted
full-resolution patch, so every candidate fits the memory budget too) crossed with first-stage widths
(``compute.features_base``). Preference: patch coverage of the median image up to ``coverage_goal`` first (context
matters most for segmentation), then width, then more coverage. Step times are predicted from the step's
floating-point operations and a seconds-per-FLOP rate calibrated on the nearest measured candidate (small steps
run less efficiently than large ones); the choice is then measured itself, and the search repeats until the
measured choice fits. A handful of real steps per plan, a few seconds on a CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from segforge.planning.memory import StepSpec, _build, step_batch, step_loss
from segforge.planning.precision import cuda_supports_bf16

# Training step = forward + backward (about twice the forward): 3 forward passes' worth of multiply-adds, 2 FLOPs each.
FLOPS_PER_MAC_STEP = 6.0


def forward_macs(spec: StepSpec) -> float:
    """Multiply-accumulates of one forward pass of the U-Net ``spec`` describes, for the whole batch."""
    feats = list(spec.features_per_stage)
    size, channels, macs, voxels_per_stage = list(spec.patch_size), spec.in_channels, 0.0, []
    for features, kernel, stride in zip(feats, spec.kernel_sizes, spec.strides):
        size = [max(1, s // st) for s, st in zip(size, stride)]
        voxels = math.prod(size)
        voxels_per_stage.append(voxels)
        for i in range(spec.conv_per_stage):
            macs += (channels if i == 0 else features) * features * math.prod(kernel) * voxels
        channels = features
    for stage in range(len(feats) - 1, 0, -1):
        below, skip, voxels = feats[stage], feats[stage - 1], voxels_per_stage[stage - 1]
        macs += below * skip * voxels  # transposed convolution, kernel = stride: one product per output voxel
        for i in range(spec.conv_per_stage):
            macs += (2 * skip if i == 0 else skip) * skip * math.prod(spec.kernel_sizes[stage - 1]) * voxels
        macs += skip * spec.num_classes * voxels  # segmentation head (every deep-supervision level has one)
    return macs * spec.batch_size


def step_flops(spec: StepSpec) -> float:
    return FLOPS_PER_MAC_STEP * forward_macs(spec)


def _autocast(device: torch.device, precision: str):
    if precision in ("32-true", "32"):
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if precision == "16-mixed" and device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def measure_step_seconds(spec: StepSpec, device: torch.device | str = "cpu", repeats: int = 2,
                         give_up_after: float | None = None) -> float:
    """Seconds of one real training step (network, the task's loss, backward, optimizer) on ``device``: the same
    batch and loss the memory tracer runs (``memory.step_batch``/``step_loss``: deep-supervision Dice+CE, or the
    denoiser's MSE), the fastest of ``repeats`` timed steps after one warm-up step. A step slower than
    ``give_up_after`` seconds (the warm-up included) ends the timing: that step's time is returned, enough to rule
    the setting out."""
    device = torch.device(device)
    network, loss_fn, optimizer = _build(spec)
    network.to(device)
    batch = step_batch(spec, device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with _autocast(device, spec.precision):
            loss = step_loss(spec, network, loss_fn, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        if give_up_after is not None and times[-1] > give_up_after:
            return times[-1]
    return min(times[1:])


class StepTimer:
    """Seconds per step for any candidate: measured ones exactly, the rest predicted from FLOPs at the rate of the
    nearest measured candidate (by FLOPs, on a log scale). ``tflops`` (stated throughput) replaces measuring."""

    def __init__(self, measure: Callable[[StepSpec], float] | None = None, tflops: float | None = None):
        if measure is None and not tflops:
            raise ValueError("a StepTimer needs a way to measure steps or a stated throughput (tflops)")
        self.measure, self.tflops = measure, tflops
        self.measured: dict[StepSpec, float] = {}

    def exact(self, spec: StepSpec) -> float:
        if self.tflops:
            return step_flops(spec) / (self.tflops * 1e12)
        if spec not in self.measured:
            self.measured[spec] = float(self.measure(spec))
        return self.measured[spec]

    def is_exact(self, spec: StepSpec) -> bool:
        return bool(self.tflops) or spec in self.measured

    def predict(self, spec: StepSpec) -> float:
        if self.is_exact(spec):
            return self.exact(spec)
        flops = step_flops(spec)
        nearest = min(self.measured, key=lambda s: abs(math.log(step_flops(s) / flops)))
        return flops * self.measured[nearest] / step_flops(nearest)


@dataclass(frozen=True)
class ComputeBudget:
    """What the budget must pay for besides training steps."""

    budget_s: float
    target_iterations: int
    coverage_goal: float
    setup_s: float            # start-up, data loader, checkpoints, writing results
    validation_cases: int     # cases the final validation predicts
    device: str               # where the steps were measured (or the stated throughput applies)
    loop_overhead: float = 1.0  # a training iteration / the bare step: loading and augmentation between steps


@dataclass
class Candidate:
    spec: StepSpec
    coverage: float           # patch voxels / median image voxels (capped at 1)
    windows_per_case: int     # sliding-window positions over the median image at step 0.5


def validation_seconds(candidate: Candidate, step_s: float, budget: ComputeBudget) -> float:
    """Final validation: a forward pass is about a third of a training step, per window of one patch."""
    per_window = step_s / (3.0 * candidate.spec.batch_size)
    return budget.validation_cases * candidate.windows_per_case * per_window


def expected_iterations(candidate: Candidate, step_s: float, budget: ComputeBudget) -> int:
    left = budget.budget_s - budget.setup_s - validation_seconds(candidate, step_s, budget)
    return max(0, int(left / (step_s * budget.loop_overhead)))


def choose_for_budget(candidates: list[Candidate], budget: ComputeBudget, timer: StepTimer, max_rounds: int = 6) -> dict:
    """The preferred candidate whose (measured) step still buys ``target_iterations``; with the evidence.

    Returns ``{"candidate", "step_s", "expected_iterations", "reason", "measured"}``."""
    def key(c: Candidate) -> tuple:
        return (min(c.coverage, budget.coverage_goal), c.spec.features_per_stage[0], c.coverage)

    def fits(c: Candidate, step_s: float) -> bool:
        return expected_iterations(c, step_s, budget) >= budget.target_iterations

    by_cost = sorted(candidates, key=lambda c: step_flops(c.spec))
    if not timer.tflops:
        timer.exact(by_cost[0].spec)  # the cheapest step calibrates the first guess
    rejected: set[int] = set()
    choice = None
    for _ in range(max_rounds + len(candidates)):
        feasible = [c for i, c in enumerate(candidates) if i not in rejected and fits(c, timer.predict(c.spec))]
        if not feasible:
            break
        choice = max(feasible, key=key)
        if timer.is_exact(choice.spec):
            break
        step_s = timer.exact(choice.spec)
        if not fits(choice, step_s):
            rejected.add(candidates.index(choice))
            choice = None
    if choice is None:  # no candidate reaches the target: the one that trains most, and say so
        # not simply the cheapest step: its small patch needs the most windows in the final validation
        choice = max(candidates, key=lambda c: (expected_iterations(c, timer.predict(c.spec), budget), -step_flops(c.spec)))
        step_s = timer.exact(choice.spec)
        reason = (f"no candidate reaches {budget.target_iterations} iterations in {budget.budget_s:.0f} s; the one "
                  f"that trains most ({step_s:.3f} s per step) gets {expected_iterations(choice, step_s, budget)}")
    else:
        step_s = timer.exact(choice.spec)
        reason = (f"largest patch (up to {budget.coverage_goal:.0%} of the median image), then widest network, whose "
                  f"step ({step_s:.3f} s on {budget.device}) leaves at least {budget.target_iterations} iterations "
                  f"after {budget.setup_s:.0f} s of set-up and the final validation of {budget.validation_cases} cases")
    return {"candidate": choice, "step_s": step_s, "expected_iterations": expected_iterations(choice, step_s, budget),
            "validation_s": validation_seconds(choice, step_s, budget), "reason": reason}


def choose_precision(spec: StepSpec, device: torch.device, measure: Callable[[StepSpec], float],
                     wanted: str = "auto", gain: float = 0.9) -> tuple[str, str]:
    """(precision, why): ``wanted`` unless auto; on CUDA bf16-mixed where the GPU has bf16 units, else 16-mixed; on a
    CPU bf16 autocast only where it is measured faster (by ``gain``), since CPUs without bf16 units run it slower
    than float32."""
    if wanted != "auto":
        return wanted, "set by plan.compute.precision"
    if device.type == "cuda":
        if cuda_supports_bf16():
            return "bf16-mixed", "CUDA with bf16 units: bfloat16 autocast"
        return "16-mixed", "CUDA without bf16 units: float16 autocast"
    full = measure(replace(spec, precision="32-true"))
    # CPUs without bf16 units run autocast through slow reference kernels (100x slower seen): stop timing early
    half = measure(replace(spec, precision="bf16-mixed"), give_up_after=10 * full)
    if half <= gain * full:
        return "bf16-mixed", f"bf16 autocast measured {full / half:.2f}x faster than float32 on this CPU"
    return "32-true", f"bf16 autocast measured {full / half:.2f}x the speed of float32 on this CPU (not worth it)"
