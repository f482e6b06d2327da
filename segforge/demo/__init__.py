"""demo: the synthetic dataset generator (3D and 2D) and the oracle threshold baseline; the demo run is ``cli/demo.py``."""
