"""nn: the U-Net core (2D/3D, per-stage kernels and strides, deep supervision, optional conditioning); nothing else."""
