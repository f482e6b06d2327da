"""cli: argument parsing and Hydra composition; each command is a thin call into the layers; the demo (``demo.py``)
runs the commands in turn on a generated dataset; a folder of the wrong kind is named (``folder_kinds.py``)."""
