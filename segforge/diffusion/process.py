"""A diffusion process: the forward process (``NoiseSchedule`` or ``FlowPath``) and what the network predicts.

Objectives, with ``x_t = alpha * x0 + sigma * noise`` (``schedules``):

* ``epsilon`` (VP schedules): the network predicts the noise; ``x0 = (x_t - sigma * eps) / alpha``.
* ``v`` (VP schedules; Salimans & Ho 2022): ``v = alpha * noise - sigma * x0``; ``x0 = alpha * x_t - sigma * v``.
* ``flow`` (flow paths): the velocity ``d x_t / dt = -x0 + (1 - sigma_min) * noise`` (rectified flow).

``DiffusionProcess.to_json()`` is saved next to a trained model and ``from_json`` rebuilds exactly the process the
model was trained with, so training and sampling cannot disagree. Times are what the model is conditioned on:
integer-valued float timesteps for a schedule (``0`` nearly clean, ``num_train_timesteps - 1`` noise), ``t`` in
[0, 1] for a flow path. ``entry_for_sigma`` maps a real noisy image ``y = x0 + sigma * n`` onto the process
(``x_t = scale * y`` at time ``t``) so that a sampler can denoise it by starting there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from segforge.errors import SegforgeError
from segforge.diffusion.schedules import FlowPath, NoiseSchedule, _as_dict, schedule_from_json

PROCESS_FILE = "diffusion.json"  # the process of a denoising model folder, beside plans.json

OBJECTIVES = {"epsilon": NoiseSchedule, "v": NoiseSchedule, "flow": FlowPath}
PROCESS_KEYS = ("type", "objective", "schedule")


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(batch,)`` coefficient shaped to broadcast over ``like``, in its dtype and device."""
    value = value.to(device=like.device, dtype=like.dtype)
    if value.ndim == 0:
        return value
    return value.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class DiffusionProcess:
    """A forward process and the objective the network is trained on (see module docstring)."""

    schedule: NoiseSchedule | FlowPath
    objective: str = "epsilon"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise SegforgeError(f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        if not isinstance(self.schedule, OBJECTIVES[self.objective]):
            allowed = [name for name, kind in OBJECTIVES.items() if isinstance(self.schedule, kind)]
            raise SegforgeError(f"objective {self.objective!r} does not fit a {type(self.schedule).__name__}; "
                                f"use {' or '.join(allowed)} (epsilon and v need a noise schedule, flow a flow path)")

    @property
    def is_flow(self) -> bool:
        return isinstance(self.schedule, FlowPath)

    @property
    def t_max(self) -> float:
        """The time of pure noise, where generation starts."""
        return self.schedule.t_max

    @property
    def model_time_scale(self) -> float:
        """The ``time_scale`` a ``Denoiser`` for this process should use: flow times in [0, 1] are stretched to
        the 0..1000 range that the sinusoidal frequencies resolve (integer timesteps need none)."""
        return 1000.0 if self.is_flow else 1.0

    # --- JSON: saved with the model -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"type": "diffusion_process", "objective": self.objective, "schedule": self.schedule.to_json()}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_json(cls, data: dict | str) -> "DiffusionProcess":
        data = _as_dict(data, "diffusion process")
        if data.get("type") != "diffusion_process":
            raise SegforgeError(f"not a diffusion process: expected \"type\": \"diffusion_process\", got {data.get('type')!r}")
        unknown = sorted(set(data) - set(PROCESS_KEYS))
        missing = sorted(set(PROCESS_KEYS) - set(data))
        if unknown or missing:
            raise SegforgeError(f"diffusion process: unknown key(s) {unknown}, missing key(s) {missing}; "
                                f"expected exactly {list(PROCESS_KEYS)}")
        return cls(schedule=schedule_from_json(data["schedule"]), objective=data["objective"])

    # --- training -------------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None, band: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """``(batch,)`` float times, uniform over ``band`` (fractions of the process; the default is all of it):
        integers in ``[0, T)`` or reals in ``[0, 1)``."""
        low, high = (float(v) for v in band)
        if not 0.0 <= low < high <= 1.0:
            raise SegforgeError(f"a time band must satisfy 0 <= low < high <= 1, got {[low, high]}")
        u = low + (high - low) * torch.rand(batch, generator=generator, device=device)
        if self.is_flow:
            return u
        steps = self.schedule.num_train_timesteps
        return (u * steps).floor().clamp(0, steps - 1)

    def time_fraction(self, t: float) -> float:
        """Where time ``t`` lies in the process, 0 (clean) to 1 (pure noise): what ``band`` of ``sample_timesteps``
        is measured in."""
        if self.is_flow:
            return float(t)
        return max(0.0, float(t) + 1.0) / self.schedule.num_train_timesteps

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t, device=like.device))
        return _per_sample(alpha, like), _per_sample(sigma, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha(t) * x0 + sigma(t) * noise``."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output at ``x_t`` (the loss is the MSE to this)."""
        if self.objective == "epsilon":
            return noise
        if self.objective == "v":
            alpha, sigma = self.alpha_sigma(t, x0)
            return alpha * noise - sigma * x0
        return (1 - self.schedule.sigma_min) * noise - x0

    # --- sampling -------------------------------------------------------------------------------------------------
    def predict_x0_and_noise(self, x_t: torch.Tensor, t: torch.Tensor,
                             model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean image and the noise that the model output implies at ``(x_t, t)``."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        if self.objective == "epsilon":
            return (x_t - sigma * model_output) / alpha, model_output
        if self.objective == "v":  # alpha^2 + sigma^2 = 1
            return alpha * x_t - sigma * model_output, sigma * x_t + alpha * model_output
        # x_t = alpha x0 + sigma n and u = -x0 + c n, with c = 1 - sigma_min, solved for n and x0
        c = 1 - self.schedule.sigma_min
        noise = (x_t + alpha * model_output) / (alpha * c + sigma)
        return c * noise - model_output, noise

    def entry_for_sigma(self, sigma: float) -> tuple[float, float]:
        """``(t, scale)``: a noisy image ``y = x0 + sigma * n`` (``sigma`` in units of the normalised image) is the
        process state ``x_t = scale * y`` at time ``t``, where ``sigma(t) / alpha(t) = sigma``. A schedule takes the
        integer timestep nearest in log signal-to-noise ratio; ``sigma <= 0`` (or below a flow's ``sigma_min``) is
        the clean end of the process."""
        sigma = float(sigma)
        if not math.isfinite(sigma) or sigma < 0:
            raise SegforgeError(f"sigma must be a finite number >= 0, got {sigma}")
        if self.is_flow:
            sigma_min = self.schedule.sigma_min
            t = max(0.0, (sigma - sigma_min) / (1 - sigma_min + sigma))
            return t, 1.0 - t
        abar = self.schedule.alphas_cumprod
        if sigma == 0:
            return -1.0, 1.0
        ratio = ((1 - abar) / abar).sqrt()  # sigma/alpha of every timestep, increasing
        t = int(torch.argmin((ratio.log() - math.log(sigma)).abs()))
        return float(t), float(abar[t].sqrt())
