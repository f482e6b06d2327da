"""planning: dataset fingerprint and training plans, as pure functions of image statistics."""
