"""inference: sliding-window prediction, test-time mirroring, fold ensembles and export with input geometry."""
