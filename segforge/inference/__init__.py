"""inference: sliding-window prediction, test-time mirroring, fold ensembles and export with input geometry
(``predictor``, ``folder``), nnU-Net model folders, and sampling and denoising with a denoising model (``generate``).
Never imports training: a predictor loads without Lightning."""
