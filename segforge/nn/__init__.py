"""nn: the U-Net core (2D/3D, per-stage kernels and strides, deep supervision, optional conditioning and attention),
and the same core as a time-conditioned denoiser (``embeddings``, ``denoiser``); nothing else."""
