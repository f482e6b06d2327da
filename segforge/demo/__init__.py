"""demo: a synthetic dataset generator (3D and 2D) and the end-to-end demo run."""
