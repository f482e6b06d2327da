"""diffusion: noise schedules and flow paths, the training objective of a denoiser, and the samplers that invert it.

``schedules`` (what the forward process is), ``process`` (schedule + objective: noising, targets, x0 from a model
output, entry time for denoising; its JSON is saved with a model), ``samplers`` (DDPM, DDIM, Euler, Heun, denoise).
The network is ``segforge.nn.denoiser.Denoiser``; training lives in ``segforge.training``.
"""
