"""preprocessing: crop, normalise and resample cases for training, and the exact inverse for export."""
