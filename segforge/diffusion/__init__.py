"""diffusion: noise schedules and flow paths, the training objective of a denoiser, and the samplers that invert it.

``schedules`` (what the forward process is), ``process`` (schedule + objective: noising, targets, x0 from a model
output, entry time for denoising; its JSON is saved with a model), ``samplers`` (DDPM, DDIM, Euler, Heun, denoise),
``conditioning`` (label maps as one-hot channels, per-case seeds).
The network is ``segforge.nn.denoiser.Denoiser``; training lives in ``segforge.training``, loading and sampling in
``segforge.inference.generate``.
"""
