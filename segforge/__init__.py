"""segforge: self-configuring biomedical image segmentation (plan, preprocess, train, predict, evaluate)."""

__version__ = "0.1.0"
