"""Samplers against references that are not segforge's code: MONAI's DDIM and DDPM schedulers step for step over
whole multi-step chains (every intermediate state), and Heun against SciPy's ODE solver on an analytic velocity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segforge.diffusion.process import DiffusionProcess
from segforge.diffusion.samplers import ddim_step, heun_sample
from segforge.diffusion.schedules import FlowPath, NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_output(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in network: depends on the state and the time, so a wrong state or time shows."""
    return 0.3 * torch.tanh(x) + 0.001 * t * torch.cos(x)


def start_state() -> torch.Tensor:
    return torch.randn((2, 1, 6, 6), generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def with_our_schedule(scheduler, process: DiffusionProcess):
    """MONAI's scheduler holding our schedule in float64. The schedules themselves agree to 4e-7
    (test_diffusion.py::test_schedules_match_monai), but MONAI forms them in float32, whose cancellation near t = 0
    (1 - abar ~ 1e-4, and betas of 1e-5 as differences of cumulative products) reaches a relative 1e-2 there; in
    float64 the update rules alone are compared, to 1e-9."""
    abar = process.schedule.abar(torch.arange(scheduler.num_train_timesteps, dtype=torch.float64)).double()
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    scheduler.alphas_cumprod, scheduler.betas, scheduler.alphas = abar, betas, 1 - betas
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


@pytest.mark.parametrize("schedule,monai_schedule", [("linear", "linear_beta"), ("cosine", "cosine")])
@pytest.mark.parametrize("objective,prediction_type", [("epsilon", "epsilon"), ("v", "v_prediction")])
def test_a_whole_ddim_chain_equals_monai_at_every_step(schedule, monai_schedule, objective, prediction_type):
    from monai.networks.schedulers import DDIMScheduler

    process = DiffusionProcess(NoiseSchedule(schedule), objective)
    scheduler = with_our_schedule(DDIMScheduler(1000, schedule=monai_schedule, clip_sample=False,
                                                prediction_type=prediction_type), process)
    scheduler.set_timesteps(10)
    stride = 1000 // 10
    ours = theirs = start_state()
    # MONAI evaluates on its own grid (999, 888, ..., 0) and steps from t to t - 1000 // 10: the same step here
    for t in [int(t) for t in scheduler.timesteps]:
        theirs, _ = scheduler.step(model_output(theirs, t), t, theirs)
        ours, _ = ddim_step(process, ours, t, t - stride if t >= stride else -1, model_output(ours, t))
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9, msg=f"DDIM state after t={t}")


@pytest.mark.parametrize("schedule,monai_schedule", [("linear", "linear_beta"), ("cosine", "cosine")])
@pytest.mark.parametrize("objective,prediction_type", [("epsilon", "epsilon"), ("v", "v_prediction")])
def test_a_whole_ddpm_chain_equals_monai_at_every_step(schedule, monai_schedule, objective, prediction_type):
    from monai.networks.schedulers import DDPMScheduler

    # MONAI's DDPM step always goes from t to t - 1 (its posterior uses beta_t): the whole 1000-step chain
    process = DiffusionProcess(NoiseSchedule(schedule), objective)
    scheduler = with_our_schedule(DDPMScheduler(1000, schedule=monai_schedule, clip_sample=False,
                                                prediction_type=prediction_type), process)
    ours = theirs = start_state()
    # both draw one noise tensor of the state's shape per step (none at the last): equal generators, equal noise
    our_noise, their_noise = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    timesteps = list(range(999, -1, -1))
    for t in timesteps:
        theirs, _ = scheduler.step(model_output(theirs, t), t, theirs, generator=their_noise)
        ours, _ = ddim_step(process, ours, t, t - 1, model_output(ours, t), eta=1.0, generator=our_noise)
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9, msg=f"DDPM state after t={t}")


def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx/dt = x cos(3t) - 0.5 x^2: nonlinear in x and t."""
    t = t.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return x * torch.cos(3 * t) - 0.5 * x**2


def test_heun_converges_to_scipys_solution_at_second_order():
    from scipy.integrate import solve_ivp

    process = DiffusionProcess(FlowPath(), "flow")
    start = torch.linspace(-0.8, 0.9, 12, dtype=torch.float64).reshape(1, 1, 12)
    reference = solve_ivp(lambda t, y: y * math.cos(3 * t) - 0.5 * y**2, (0.7, 0.0), start.flatten().numpy(),
                          rtol=1e-12, atol=1e-12).y[:, -1]
    errors = []
    for steps in (25, 50, 100):
        result = heun_sample(velocity, process, start.clone(), steps, start_t=0.7).flatten().numpy()
        errors.append(np.abs(result - reference).max())
    assert errors[-1] < 2e-4
    # second order: halving the step quarters the error (an Euler integrator would only halve it)
    assert 3.0 < errors[0] / errors[1] < 5.0 and 3.0 < errors[1] / errors[2] < 5.0
