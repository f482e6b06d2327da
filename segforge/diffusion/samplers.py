"""Samplers that run a ``DiffusionProcess`` backwards: DDPM (ancestral) and DDIM for noise schedules, Euler and
Heun for flow paths, and ``denoise`` for real noisy images.

Every sampler is ``sampler(model_fn, process, x_start, steps, start_t=None, generator=None, progress=None) -> x0``
with ``model_fn(x_t, t_batch) -> model_output`` (the caller closes over spatial conditioning, class labels and
classifier-free guidance), ``x_start`` the state at ``start_t`` (default: pure noise at ``process.t_max``) and
``steps`` model evaluations (Heun: two per step). ``progress(i, steps)`` is called after every step.

Why our own and not MONAI's schedulers (``monai.networks.schedulers``, 1.6): a MONAI scheduler is an ``nn.Module``
whose state is set by ``set_timesteps`` and always starts at the noisiest time, so it cannot enter the reverse
process at an intermediate noise level (denoising); its DDIM grid (``linspace(T - 1, 0, N)``) disagrees with the
step it takes (``t - T // N``), so the model is evaluated at times other than those of the state; the rectified-flow
scheduler stores times as float16, handles 2D/3D only as 4D/5D tensors and has no Heun step. The update rules are the
same: tests compare ``ddim_step`` with ``DDIMScheduler.step``, the flow step with ``RFlowScheduler.step`` and the
schedules with MONAI's ``linear_beta`` and ``cosine`` (tests/test_diffusion.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from segforge.errors import SegforgeError
from segforge.diffusion.process import DiffusionProcess

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _batch_time(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def timestep_grid(process: DiffusionProcess, steps: int, start_t: float | None = None) -> list[float]:
    """The times a sampler evaluates the model at, noisiest first, then the clean end (``-1`` for a schedule: the
    clean image ``abar = 1``; ``0`` for a flow). A schedule's grid is "trailing": ``steps`` integer times evenly spread
    from ``start_t`` down, e.g. 999, 949, ..., 49 for 20 of 1000 (duplicates dropped for a low ``start_t``)."""
    if steps < 1:
        raise SegforgeError(f"steps must be at least 1, got {steps}")
    start = process.t_max if start_t is None else float(start_t)
    if process.is_flow:
        if not 0 <= start <= 1:
            raise SegforgeError(f"a flow path's start time must lie in [0, 1], got {start}")
        return [start * (steps - i) / steps for i in range(steps)] + [0.0]
    if not -1 <= start <= process.t_max:
        raise SegforgeError(f"a schedule's start time must lie in [-1, {process.t_max:g}], got {start}")
    grid = [round((start + 1) * (steps - i) / steps) - 1 for i in range(steps)]
    times = sorted({t for t in grid if t >= 0}, reverse=True)
    return [float(t) for t in times] + [-1.0]


def ddim_step(process: DiffusionProcess, x_t: torch.Tensor, t: float, t_prev: float, model_output: torch.Tensor,
              eta: float = 0.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12) from ``t`` to ``t_prev`` (``-1``: the clean image); ``eta = 1`` is
    the ancestral DDPM step on the same grid. Returns ``(x_prev, x0_prediction)``."""
    x0, eps = process.predict_x0_and_noise(x_t, _batch_time(t, x_t), model_output)
    abar_t, abar_prev = (float(process.schedule.abar(torch.tensor(v))) for v in (t, t_prev))
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev) if t_prev < t else 0.0
    std = eta * max(variance, 0.0) ** 0.5
    x_prev = abar_prev ** 0.5 * x0 + max(1 - abar_prev - std ** 2, 0.0) ** 0.5 * eps
    if std > 0:
        x_prev = x_prev + std * _randn(x_t, generator)
    return x_prev, x0


def _vp_sample(model_fn: ModelFn, process: DiffusionProcess, x_start: torch.Tensor, steps: int | Sequence[int],
               start_t, generator, progress, eta: float) -> torch.Tensor:
    if process.is_flow:
        raise SegforgeError("DDPM and DDIM sample noise schedules (objective epsilon or v); use euler or heun for flow")
    if isinstance(steps, int):
        grid = timestep_grid(process, steps, start_t)
    else:  # an explicit, strictly decreasing subsequence of timesteps
        grid = [float(t) for t in steps] + [-1.0]
        if any(b >= a for a, b in zip(grid, grid[1:])) or grid[0] > process.t_max or grid[-2] < 0:
            raise SegforgeError(f"timesteps must decrease strictly within [0, {process.t_max:g}], got {list(steps)}")
    x = x_start
    for i, (t, t_prev) in enumerate(zip(grid, grid[1:])):
        x, _ = ddim_step(process, x, t, t_prev, model_fn(x, _batch_time(t, x)), eta, generator)
        if progress:
            progress(i + 1, len(grid) - 1)
    return x


def ddpm_sample(model_fn: ModelFn, process: DiffusionProcess, x_start: torch.Tensor, steps: int | Sequence[int],
                start_t: float | None = None, generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
    """Ancestral sampling: the posterior ``q(x_prev | x_t, x0_pred)`` with fresh noise at every step (``steps`` =
    ``num_train_timesteps`` is the original DDPM chain; fewer steps use the same posterior on a coarser grid)."""
    return _vp_sample(model_fn, process, x_start, steps, start_t, generator, progress, eta=1.0)


def ddim_sample(model_fn: ModelFn, process: DiffusionProcess, x_start: torch.Tensor, steps: int | Sequence[int],
                start_t: float | None = None, generator: torch.Generator | None = None, progress=None,
                eta: float = 0.0) -> torch.Tensor:
    """Deterministic DDIM (``eta = 0``) on ``steps`` trailing timesteps, or on an explicit decreasing sequence."""
    return _vp_sample(model_fn, process, x_start, steps, start_t, generator, progress, eta=eta)


def _flow_grid(process: DiffusionProcess, steps: int, start_t) -> list[float]:
    if not process.is_flow:
        raise SegforgeError("euler and heun integrate a flow path (objective flow); use ddpm or ddim for a noise schedule")
    return timestep_grid(process, steps, start_t)


def _flow_step(process: DiffusionProcess, x: torch.Tensor, t: float, t_next: float,
               velocity: torch.Tensor) -> torch.Tensor:
    """An Euler step; the step to t=0 is the x0 prediction (the same point for ``sigma_min = 0``; without the
    path's residual ``sigma_min`` noise otherwise)."""
    if t_next == 0:
        return process.predict_x0_and_noise(x, _batch_time(t, x), velocity)[0]
    return x + (t_next - t) * velocity


def euler_sample(model_fn: ModelFn, process: DiffusionProcess, x_start: torch.Tensor, steps: int,
                 start_t: float | None = None, generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
    """The flow ODE ``dx/dt = u(x, t)`` integrated from ``start_t`` to 0 in ``steps`` Euler steps (one step from
    ``t`` to 0 is the model's x0 prediction)."""
    grid = _flow_grid(process, steps, start_t)
    x = x_start
    for i, (t, t_next) in enumerate(zip(grid, grid[1:])):
        x = _flow_step(process, x, t, t_next, model_fn(x, _batch_time(t, x)))
        if progress:
            progress(i + 1, len(grid) - 1)
    return x


def heun_sample(model_fn: ModelFn, process: DiffusionProcess, x_start: torch.Tensor, steps: int,
                start_t: float | None = None, generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
    """The flow ODE with Heun's second-order method (an Euler predictor, then the average of both velocities); the
    last step, to t=0, is an Euler step as in EDM (Karras et al. 2022): ``2 * steps - 1`` model evaluations."""
    grid = _flow_grid(process, steps, start_t)
    x = x_start
    for i, (t, t_next) in enumerate(zip(grid, grid[1:])):
        velocity = model_fn(x, _batch_time(t, x))
        if t_next > 0:
            predicted = x + (t_next - t) * velocity
            velocity = 0.5 * (velocity + model_fn(predicted, _batch_time(t_next, x)))
        x = _flow_step(process, x, t, t_next, velocity)
        if progress:
            progress(i + 1, len(grid) - 1)
    return x


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "euler": euler_sample, "heun": heun_sample}
FLOW_SAMPLERS = ("euler", "heun")


def check_sampler(name: str, process: DiffusionProcess) -> Callable:
    """The sampler called ``name`` if it fits ``process`` (ddpm/ddim: noise schedules; euler/heun: flow paths)."""
    if name not in SAMPLERS:
        raise SegforgeError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    if (name in FLOW_SAMPLERS) != process.is_flow:
        fitting = [n for n in SAMPLERS if (n in FLOW_SAMPLERS) == process.is_flow]
        raise SegforgeError(f"sampler {name!r} does not fit a model trained with objective {process.objective!r}; "
                            f"use {' or '.join(fitting)}")
    return SAMPLERS[name]


def default_sampler(process: DiffusionProcess) -> str:
    return "euler" if process.is_flow else "ddim"


def denoise(model_fn: ModelFn, process: DiffusionProcess, y: torch.Tensor, sigma: float, steps: int = 1,
            generator: torch.Generator | None = None, sampler: str | None = None) -> torch.Tensor:
    """Denoise a real image ``y = x0 + sigma * n`` (``sigma`` in units of the normalised image): enter the reverse
    process where its noise level matches (``entry_for_sigma``) and run ``steps`` steps of ``sampler`` (default
    DDIM or Euler). ``steps=1`` is the model's one-step x0 prediction, the MMSE estimate of the clean image."""
    t, scale = process.entry_for_sigma(sigma)
    if (not process.is_flow and t < 0) or (process.is_flow and t == 0):
        return y.clone()
    run = check_sampler(sampler or default_sampler(process), process)
    return run(model_fn, process, scale * y, steps, start_t=t, generator=generator)
