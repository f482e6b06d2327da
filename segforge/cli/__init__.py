"""cli: argument parsing and Hydra composition only; each command is a thin call into the layers."""
