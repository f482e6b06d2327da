"""io: read and write images with their geometry, the dataset layout and its checks, versioned artifacts, and the
model folder (``model_folder``: the weights file, folds, the allowed networks; the one io module that needs torch)."""
