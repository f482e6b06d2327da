"""segforge.diffusion and the Denoiser: time reaches the network, conditioned branches start as identity, the
process JSON round-trips exactly, the samplers invert the process (exactly with analytic models; a trained tiny model
in test_diffusion_overfit.py), MONAI's schedulers agree with ours step for step, and bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from segforge.diffusion.process import DiffusionProcess
from segforge.diffusion.samplers import (SAMPLERS, check_sampler, ddim_sample, ddim_step, denoise, euler_sample,
                                         timestep_grid)
from segforge.diffusion.schedules import FlowPath, NoiseSchedule, schedule_from_json
from segforge.errors import SegforgeError
from segforge.nn.denoiser import Denoiser
from segforge.nn.embeddings import ConditionEmbedding, sinusoidal_embedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROCESSES = {
    "epsilon-linear": DiffusionProcess(NoiseSchedule("linear"), "epsilon"),
    "v-cosine": DiffusionProcess(NoiseSchedule("cosine", num_train_timesteps=500), "v"),
    "flow": DiffusionProcess(FlowPath(), "flow"),
    "flow-sigma_min": DiffusionProcess(FlowPath(sigma_min=0.01), "flow"),
}


def tiny_denoiser(dims: int = 2, **kw) -> Denoiser:
    args = dict(spatial_dims=dims, image_channels=1, features_per_stage=[8, 16, 32], kernel_sizes=[[3] * dims] * 3,
                strides=[[1] * dims, [2] * dims, [2] * dims])
    args.update(kw)
    torch.manual_seed(0)
    return Denoiser(**args)


def image_batch(dims: int, batch: int = 2, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, channels, *[size] * dims), generator=torch.Generator().manual_seed(seed))


# --- the network: time and class reach every block; zero-initialised branches start as identity ----------------------


def test_sinusoidal_embedding_shape_and_values():
    t = torch.tensor([0.0, 1.0, 500.0])
    features = sinusoidal_embedding(t, 7)
    assert features.shape == (3, 7) and torch.all(features[:, -1] == 0)
    torch.testing.assert_close(features[0, :3], torch.ones(3))  # cos(0)
    torch.testing.assert_close(features[1, 0], torch.cos(torch.tensor(1.0)))  # the highest frequency is 1
    assert not torch.allclose(features[1], features[2])
    with pytest.raises(ValueError, match="batch"):
        sinusoidal_embedding(torch.zeros(2, 2), 8)


def _train_one_step(net: Denoiser, process: DiffusionProcess, **inputs) -> None:
    """One optimizer step on the denoising loss: moves the zero-initialised conditioning away from zero."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x0 = image_batch(net.spatial_dims, batch=4)
    noise, t = torch.randn_like(x0), process.sample_timesteps(4, torch.Generator().manual_seed(0))
    loss = (net(process.add_noise(x0, noise, t), t, **inputs) - process.training_target(x0, noise, t)).square().mean()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("cond_mode", ["add", "scale_shift"])
def test_output_changes_with_t_and_class_once_trained(cond_mode):
    net = tiny_denoiser(cond_mode=cond_mode, num_classes=3)
    x = image_batch(2, batch=4, seed=1)
    with torch.no_grad():  # fresh: every conditioned branch is zero, so time cannot matter yet
        assert torch.equal(net(x, torch.full((4,), 10.0)), net(x, torch.full((4,), 900.0)))
    _train_one_step(net, PROCESSES["epsilon-linear"], class_label=torch.tensor([0, 1, 2, 3]))
    net.eval()
    with torch.no_grad():
        early, late = net(x, torch.full((4,), 10.0)), net(x, torch.full((4,), 900.0))
        assert (early - late).abs().mean() > 1e-3 * early.abs().mean()
        assert (net(x, 10.0, class_label=torch.zeros(4)) - net(x, 10.0, class_label=torch.ones(4))).abs().max() > 1e-4
    # every block of encoder, bottleneck and decoder has a conditioning projection that moved
    moved = [float(m.cond_proj.weight.detach().abs().sum()) for m in net.unet.modules() if getattr(m, "cond_proj", None)]
    assert len(moved) == len(net.unet.encoder) + len(net.unet.decoder) and min(moved) > 0


@pytest.mark.parametrize("cond_mode", ["add", "scale_shift"])
def test_fresh_denoiser_is_its_unconditioned_unet(cond_mode):
    net = tiny_denoiser(cond_mode=cond_mode, attention_stages=2, attention_heads=2, num_classes=2).eval()
    x = image_batch(2)
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([3.0, 700.0]), class_label=torch.tensor([1, 2])), net.unet(x))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("cond_mode", ["add", "scale_shift"])
@pytest.mark.parametrize("spatial,classes", [(0, None), (2, 3)])
def test_denoiser_variants_run_in_2d_and_3d(dims, cond_mode, spatial, classes):
    net = tiny_denoiser(dims, cond_mode=cond_mode, attention_stages=2, attention_heads=4,
                        spatial_cond_channels=spatial, num_classes=classes)
    x = image_batch(dims, size=8)
    inputs = {"spatial_cond": image_batch(dims, channels=spatial, size=8)} if spatial else {}
    if classes:
        inputs["class_label"] = torch.tensor([0, net.null_class])
    out = net(x, torch.tensor([0.0, 999.0]), **inputs)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []


def test_denoiser_refuses_missing_or_wrong_spatial_cond_and_classes():
    net = tiny_denoiser(spatial_cond_channels=2)
    x = image_batch(2)
    with pytest.raises(ValueError, match="pass spatial_cond"):
        net(x, 1.0)
    with pytest.raises(ValueError, match=r"spatial_cond needs shape \(2, 2, 16, 16\)"):
        net(x, 1.0, spatial_cond=image_batch(2, channels=1))
    with pytest.raises(ValueError, match="spatial_cond_channels=0"):
        tiny_denoiser()(x, 1.0, spatial_cond=x)
    with pytest.raises(ValueError, match="without num_classes"):
        tiny_denoiser()(x, 1.0, class_label=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        tiny_denoiser(num_classes=3)(x, 1.0, class_label=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="x_t needs shape"):
        net(image_batch(3), 1.0)
    assert ConditionEmbedding(8, num_classes=5).null_class == 5


def test_a_saved_denoiser_is_rebuilt_from_plain_arguments():
    from segforge.io.model_folder import build_network

    spec = {"_target_": "segforge.nn.denoiser.Denoiser", "spatial_dims": 2, "image_channels": 1,
            "features_per_stage": [8, 16], "kernel_sizes": [[3, 3], [3, 3]], "strides": [[1, 1], [2, 2]],
            "attention_stages": 1, "cond_mode": "scale_shift", "num_classes": 2, "time_scale": 1000.0}
    net = build_network(json.loads(json.dumps(spec)), "model_final.pt")
    assert isinstance(net, Denoiser) and net.embedding.time_scale == 1000.0
    assert build_network(spec, "again").load_state_dict(net.state_dict()) is not None
    with pytest.raises(SegforgeError, match="not plain values"):
        build_network({**spec, "cond_mode": {"_target_": "os.system"}}, "model_final.pt")


# --- schedules and the process: JSON round trip, refusals, the algebra of each objective -----------------------------


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_process_json_round_trip_gives_identical_noising_and_sampling(name):
    process = PROCESSES[name]
    text = json.dumps(process.to_json())
    loaded = DiffusionProcess.from_json(text)
    assert loaded == process and loaded.to_json() == process.to_json()
    assert DiffusionProcess.from_json(json.loads(text)) == process
    x0, noise = image_batch(2), image_batch(2, seed=1)
    t = process.sample_timesteps(2, torch.Generator().manual_seed(3))
    assert torch.equal(loaded.add_noise(x0, noise, t), process.add_noise(x0, noise, t))
    assert torch.equal(loaded.training_target(x0, noise, t), process.training_target(x0, noise, t))
    net = tiny_denoiser(time_scale=process.model_time_scale).eval()
    _perturb(net)
    sampler = check_sampler("heun" if process.is_flow else "ddpm", process)
    with torch.no_grad():
        runs = [sampler(lambda x, t: net(x, t), p, noise, 4, generator=torch.Generator().manual_seed(5))
                for p in (process, loaded)]
    assert torch.equal(*runs) and torch.isfinite(runs[0]).all()


def _perturb(net: nn.Module) -> None:
    """Random weights in every zero-initialised branch, so the output depends on time."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in net.modules():
            for layer in (getattr(module, "cond_proj", None), getattr(module, "out", None)):
                if isinstance(layer, nn.Linear):
                    layer.weight.copy_(0.3 * torch.randn(layer.weight.shape, generator=generator))


@pytest.mark.parametrize("bad,match", [
    ({"type": "diffusion_process", "objective": "x0", "schedule": {"type": "flow_path", "sigma_min": 0.0}}, "objective"),
    ({"type": "diffusion_process", "objective": "flow", "schedule": NoiseSchedule().to_json()}, "does not fit"),
    ({"type": "diffusion_process", "objective": "v", "schedule": FlowPath().to_json()}, "does not fit"),
    ({"type": "diffusion_process", "objective": "v", "schedule": {**NoiseSchedule().to_json(), "kind": "sigmoid"}},
     "kind"),
    ({"type": "diffusion_process", "objective": "v", "schedule": {**NoiseSchedule().to_json(), "beta_max": 0.1}},
     r"unknown key\(s\) \['beta_max'\]"),
    ({"type": "diffusion_process", "objective": "v", "schedule": {**NoiseSchedule().to_json(), "type": "edm"}},
     "schedule type"),
    ({"type": "diffusion_process", "objective": "v", "schedule": NoiseSchedule().to_json(), "sampler": "ddim"},
     "unknown key"),
    ({"type": "diffusion_process", "objective": "v"}, "missing key"),
    ({"type": "process", "objective": "v", "schedule": NoiseSchedule().to_json()}, "not a diffusion process"),
    ({"type": "diffusion_process", "objective": "v", "schedule": {**NoiseSchedule().to_json(),
                                                                  "num_train_timesteps": 10.5}}, "integer"),
    ({"type": "diffusion_process", "objective": "v", "schedule": {**NoiseSchedule().to_json(), "beta_end": 2.0}},
     "beta_end"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
])
def test_bad_process_json_is_refused(bad, match):
    with pytest.raises(SegforgeError, match=match):
        DiffusionProcess.from_json(bad if isinstance(bad, str) else json.dumps(bad))


def test_schedules_match_monai():
    from monai.networks.schedulers import DDPMScheduler

    for kind, monai_name in (("linear", "linear_beta"), ("cosine", "cosine")):
        ours = NoiseSchedule(kind).alphas_cumprod
        assert ours.dtype == torch.float64 and ours.shape == (1000,)
        theirs = DDPMScheduler(1000, schedule=monai_name).alphas_cumprod.double()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert schedule_from_json(FlowPath(0.1).to_json()) == FlowPath(0.1)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_predict_x0_and_noise_inverts_the_training_target(name):
    process = PROCESSES[name]
    x0, noise = image_batch(2, batch=6), image_batch(2, batch=6, seed=1)
    t = process.sample_timesteps(6, torch.Generator().manual_seed(2))
    x_t = process.add_noise(x0, noise, t)
    x0_hat, noise_hat = process.predict_x0_and_noise(x_t, t, process.training_target(x0, noise, t))
    tolerance = dict(rtol=1e-3, atol=1e-3) if process.objective == "epsilon" else {}  # x0 from eps divides by alpha
    torch.testing.assert_close(x0_hat, x0, **tolerance)
    torch.testing.assert_close(noise_hat, noise, **tolerance)


@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("sigma", [0.05, 0.2, 1.0])
def test_entry_for_sigma_matches_the_noise_level(name, sigma):
    process = PROCESSES[name]
    t, scale = process.entry_for_sigma(sigma)
    alpha, noise_level = (float(v) for v in process.schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    assert scale == pytest.approx(alpha, rel=1e-6)
    # a schedule's nearest integer timestep; a flow path hits the level exactly
    assert noise_level / alpha == pytest.approx(sigma, rel=0.05 if not process.is_flow else 1e-6)
    assert process.entry_for_sigma(sigma / 2)[0] < t < process.t_max
    with pytest.raises(SegforgeError, match="sigma"):
        process.entry_for_sigma(float("nan"))


# --- samplers: exact on analytic models, equal to MONAI's steps, refused for the wrong process -----------------------

DATA_STD = 0.5  # the analytic data: every voxel an independent N(0, DATA_STD^2)


def gaussian_model(process: DiffusionProcess):
    """The MMSE-optimal model output for Gaussian data: E[x0 | x_t] and E[noise | x_t] are linear in x_t."""
    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = process.alpha_sigma(t, x_t)
        total = alpha ** 2 * DATA_STD ** 2 + sigma ** 2
        return process.training_target(alpha * DATA_STD ** 2 / total * x_t, sigma / total * x_t, t)
    return model_fn


def point_model(process: DiffusionProcess, x0: torch.Tensor):
    """The exact model when the data is the single image ``x0``."""
    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = process.alpha_sigma(t, x_t)
        return process.training_target(x0, (x_t - alpha * x0) / sigma, t)
    return model_fn


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_every_fitting_sampler_reproduces_the_data_distribution(name):
    """With the exact model of Gaussian data, samples from noise have the data's standard deviation (a sampler with
    a wrong coefficient or noise variance misses it), and a single-image dataset is reproduced exactly."""
    process = PROCESSES[name]
    noise = torch.randn((8, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    x0 = image_batch(2, batch=1, size=32)
    for sampler in SAMPLERS:
        if (sampler in ("euler", "heun")) != process.is_flow:
            with pytest.raises(SegforgeError, match="does not fit"):
                check_sampler(sampler, process)
            continue
        run = check_sampler(sampler, process)
        # first-order samplers shrink the spread by their discretisation error, which vanishes with more steps
        samples = run(gaussian_model(process), process, noise, 250, generator=torch.Generator().manual_seed(1))
        assert samples.std().item() == pytest.approx(DATA_STD, rel=0.04), sampler
        if sampler == "heun":  # second order: close in few steps
            assert run(gaussian_model(process), process, noise, 20).std().item() == pytest.approx(DATA_STD, rel=0.01)
        if sampler != "ddpm":  # deterministic samplers follow the straight line of a point dataset
            exact = run(point_model(process, x0), process, noise[:1], 20)
            torch.testing.assert_close(exact, x0, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_denoise_in_one_step_is_the_mmse_estimate(name):
    """Entering at the matching level, one step gives E[x0 | y]: for Gaussian data the Wiener filter."""
    process, sigma = PROCESSES[name], 0.3
    generator = torch.Generator().manual_seed(0)
    x0 = DATA_STD * torch.randn((4, 1, 32, 32), generator=generator)
    y = x0 + sigma * torch.randn(x0.shape, generator=generator)
    wiener = DATA_STD ** 2 / (DATA_STD ** 2 + sigma ** 2) * y
    torch.testing.assert_close(denoise(gaussian_model(process), process, y, sigma), wiener, rtol=0.03, atol=0.01)
    wiener_mse = DATA_STD ** 2 * sigma ** 2 / (DATA_STD ** 2 + sigma ** 2)  # 0.066, the noisy image's is 0.09
    assert (wiener - x0).square().mean() == pytest.approx(wiener_mse, rel=0.05)
    several = denoise(gaussian_model(process), process, y, sigma, steps=5)
    assert (several - x0).square().mean() < 0.85 * (y - x0).square().mean()
    assert torch.equal(denoise(gaussian_model(process), process, y, 0.0), y)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["epsilon-linear", "flow"])
def test_samplers_shapes_and_finite_values_with_a_denoiser(dims, name):
    process = PROCESSES[name]
    net = tiny_denoiser(dims, attention_stages=1, spatial_cond_channels=1, num_classes=2,
                        time_scale=process.model_time_scale).eval()
    _perturb(net)
    cond, label = image_batch(dims, channels=1, size=8, seed=4), torch.tensor([0, 1])
    calls = []
    with torch.no_grad():
        for sampler in (["euler", "heun"] if process.is_flow else ["ddpm", "ddim"]):
            out = SAMPLERS[sampler](lambda x, t: net(x, t, cond, label), process, image_batch(dims, size=8), 3,
                                    generator=torch.Generator().manual_seed(0), progress=lambda i, n: calls.append(n))
            assert out.shape == (2, 1, *[8] * dims) and torch.isfinite(out).all()
    assert calls == [3] * 6


def test_timestep_grids():
    vp = PROCESSES["epsilon-linear"]
    assert timestep_grid(vp, 20)[:3] == [999.0, 949.0, 899.0] and timestep_grid(vp, 20)[-2:] == [49.0, -1.0]
    assert timestep_grid(vp, 5, start_t=3) == [3.0, 2.0, 1.0, 0.0, -1.0]  # duplicates of a low start dropped
    assert timestep_grid(PROCESSES["flow"], 4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert timestep_grid(PROCESSES["flow"], 2, start_t=0.5) == [0.5, 0.25, 0.0]
    with pytest.raises(SegforgeError, match="start time"):
        timestep_grid(PROCESSES["flow"], 4, start_t=2.0)
    with pytest.raises(SegforgeError, match="steps"):
        timestep_grid(vp, 0)
    with pytest.raises(SegforgeError, match="unknown sampler"):
        check_sampler("dpm++", vp)
    with pytest.raises(SegforgeError, match="decrease"):
        ddim_sample(lambda x, t: x, vp, image_batch(2), [10, 500])
    explicit = ddim_sample(gaussian_model(vp), vp, image_batch(2), [999, 500, 100, 0])
    assert torch.isfinite(explicit).all()


@pytest.mark.parametrize("objective,monai_type", [("epsilon", "epsilon"), ("v", "v_prediction")])
def test_ddim_and_ddpm_steps_equal_monai(objective, monai_type):
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    process = DiffusionProcess(NoiseSchedule("cosine"), objective)
    x, output = image_batch(2, seed=1), image_batch(2, seed=2)
    ddim = DDIMScheduler(1000, schedule="cosine", clip_sample=False, prediction_type=monai_type)
    ddim.set_timesteps(20)  # MONAI steps from t to t - 1000 // 20
    for t in (999, 500, 49):
        ours, x0 = ddim_step(process, x, t, t - 50 if t >= 50 else -1, output)
        theirs, their_x0 = ddim.step(output, t, x)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x0, their_x0, rtol=1e-4, atol=1e-4)
    ddpm = DDPMScheduler(1000, schedule="cosine", clip_sample=False, prediction_type=monai_type)
    for t in (999, 300, 1):
        ours, _ = ddim_step(process, x, t, t - 1, output, eta=1.0, generator=torch.Generator().manual_seed(3))
        theirs, _ = ddpm.step(output, t, x, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_euler_step_equals_monai_rectified_flow():
    from monai.networks.schedulers import RFlowScheduler

    process = PROCESSES["flow"]
    x0, noise = image_batch(2, seed=1), image_batch(2, seed=2)
    rflow = RFlowScheduler(1000, use_discrete_timesteps=False)
    t = torch.tensor([0.7, 0.7])
    torch.testing.assert_close(process.add_noise(x0, noise, t), rflow.add_noise(x0, noise, 1000 * t))
    rflow.set_timesteps(10)
    velocity = image_batch(2, seed=3)  # MONAI's model predicts data minus noise: the negative of our velocity
    ours = euler_sample(lambda x, t: velocity, process, noise, 1, start_t=0.7)
    theirs, _ = rflow.step(-velocity, 700, noise, next_timestep=0)
    torch.testing.assert_close(ours, theirs)

