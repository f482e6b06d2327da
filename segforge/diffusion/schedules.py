"""The forward (noising) process as data: a variance-preserving noise schedule, or a flow-matching path.

Both write ``x_t = alpha(t) * x0 + sigma(t) * noise`` and give ``alpha, sigma`` for a batch of times:

* ``NoiseSchedule`` (DDPM): integer timesteps ``0 .. num_train_timesteps - 1``, ``alpha = sqrt(abar_t)``,
  ``sigma = sqrt(1 - abar_t)``; betas linear (Ho et al. 2020) or cosine (Nichol & Dhariwal 2021, betas clipped at
  0.999), computed in float64. The same values as MONAI's ``linear_beta`` and ``cosine`` schedules (tested).
* ``FlowPath`` (rectified flow / flow matching): continuous ``t`` in [0, 1], ``alpha = 1 - t``,
  ``sigma = sigma_min + (1 - sigma_min) * t`` (``sigma_min = 0``: the straight line from data to noise).

Both are frozen dataclasses with ``to_json()`` (a plain dict, ``type`` first) and ``from_json()``, which refuses an
unknown type, kind or key with a ``SegforgeError`` naming the allowed ones; ``schedule_from_json`` reads either.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import cached_property

import torch

from segforge.errors import SegforgeError

SCHEDULE_KINDS = ("linear", "cosine")


def _as_dict(data: dict | str, what: str) -> dict:
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise SegforgeError(f"{what}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SegforgeError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return dict(data)


def _checked_fields(cls, data: dict, type_name: str) -> dict:
    """``data`` without its ``type``, refusing another type and keys the dataclass does not have."""
    if data.pop("type", None) != type_name:
        raise SegforgeError(f"{cls.__name__}: expected \"type\": \"{type_name}\" in {json.dumps(data)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SegforgeError(f"{cls.__name__}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    return data


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete variance-preserving schedule (see module docstring)."""

    kind: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise SegforgeError(f"unknown noise schedule kind {self.kind!r}; use one of {', '.join(SCHEDULE_KINDS)}")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 2:
            raise SegforgeError(f"num_train_timesteps must be an integer of at least 2, got {self.num_train_timesteps!r}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise SegforgeError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if not 0 <= self.cosine_s < 1:
            raise SegforgeError(f"cosine_s must lie in [0, 1), got {self.cosine_s}")

    @cached_property
    def betas(self) -> torch.Tensor:
        steps = self.num_train_timesteps
        if self.kind == "linear":
            return torch.linspace(self.beta_start, self.beta_end, steps, dtype=torch.float64)
        x = torch.linspace(0, steps, steps + 1, dtype=torch.float64)
        f = torch.cos((x / steps + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(0.0, 0.999)

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """``abar_t`` for ``t = 0 .. num_train_timesteps - 1`` (float64)."""
        return torch.cumprod(1 - self.betas, dim=0)

    @property
    def t_max(self) -> float:
        """The noisiest time, where sampling from pure noise starts."""
        return float(self.num_train_timesteps - 1)

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """Integer timesteps of ``t`` (rounded, clamped to the schedule)."""
        return torch.as_tensor(t).round().long().clamp(0, self.num_train_timesteps - 1)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """``abar_t`` (float64) at integer times; ``t = -1`` is the clean image (``abar = 1``)."""
        t = torch.as_tensor(t)
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        return table[(t.round().long() + 1).clamp(0, self.num_train_timesteps).cpu()].to(t.device)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.abar(t)
        return abar.sqrt(), (1 - abar).sqrt()

    def to_json(self) -> dict:
        return {"type": "noise_schedule", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict | str) -> "NoiseSchedule":
        return cls(**_checked_fields(cls, _as_dict(data, "noise schedule"), "noise_schedule"))


@dataclass(frozen=True)
class FlowPath:
    """The straight path of rectified flow / flow matching (see module docstring)."""

    sigma_min: float = 0.0

    def __post_init__(self):
        if not 0 <= self.sigma_min < 1:
            raise SegforgeError(f"sigma_min must lie in [0, 1), got {self.sigma_min}")

    @property
    def t_max(self) -> float:
        return 1.0

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        return 1 - t, self.sigma_min + (1 - self.sigma_min) * t

    def to_json(self) -> dict:
        return {"type": "flow_path", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict | str) -> "FlowPath":
        return cls(**_checked_fields(cls, _as_dict(data, "flow path"), "flow_path"))


SCHEDULE_TYPES = {"noise_schedule": NoiseSchedule, "flow_path": FlowPath}


def schedule_from_json(data: dict | str) -> NoiseSchedule | FlowPath:
    """A ``NoiseSchedule`` or a ``FlowPath``, by the ``type`` of its JSON."""
    data = _as_dict(data, "schedule")
    kind = data.get("type")
    if kind not in SCHEDULE_TYPES:
        raise SegforgeError(f"unknown schedule type {kind!r}; use one of {', '.join(SCHEDULE_TYPES)}")
    return SCHEDULE_TYPES[kind].from_json(data)
