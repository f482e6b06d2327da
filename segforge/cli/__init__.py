"""cli: argument parsing and Hydra composition; each command is a thin call into the layers, and the demo (``demo.py``)
runs the commands in turn on a generated dataset."""
