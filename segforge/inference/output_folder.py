"""The folder ``segforge predict -o`` writes into: never a dataset's, never one holding files segforge did not write.

``predict`` writes a mask per case (``CASE<ending>``, with ``--save-probabilities`` also ``CASE.npz`` and
``CASE.probabilities.json``) and the folder's own files (``dataset.json``, ``predict_config.yaml``,
``predict_overrides.yaml``, ``predict_report*.json``; ``evaluate`` adds ``summary.json``, ``segforge report``
adds ``report.html``). Those names have no dot before their extension and a case's files always do, so no case name can
take one. ``predict_config.yaml`` is
written before the first mask: it marks the folder as segforge's, so that a re-run or ``--continue`` after a kill
may write there again. Any other existing folder that holds a ``dataset.json`` or image files is refused: they may be
a dataset's (its ``dataset.json``, its images or reference labels) and would be replaced. ``sample`` and
``denoise`` refuse the same folders (their marker: ``sample_config.yaml``, ``denoise_config.yaml``, written at the
end of a run: the same command may write into a folder it completed).
"""

from __future__ import annotations

import os
from pathlib import Path

from segforge.errors import SegforgeError
from segforge.io.image import file_ending
from segforge.workspace import check_not_inside

MARKER = "predict_config.yaml"  # written by every predict run, before its first mask
CONFIG_FILES = (MARKER, "predict_overrides.yaml")  # what ``save_config`` writes
DATASET_SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


def is_prediction_folder(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def dataset_folder_of(path: Path) -> Path | None:
    """The dataset folder that is ``path`` or holds it: a ``dataset.json`` beside a dataset's image or label folders."""
    for folder in [path, *path.parents]:
        if (folder / "dataset.json").is_file() and any((folder / sub).is_dir() for sub in DATASET_SUBFOLDERS):
            return folder
    return None


def check_not_in_dataset(output: Path) -> None:
    """Refuse an ``-o`` folder (of predict, sample, denoise) that is a dataset folder or inside one."""
    real = Path(os.path.realpath(output))
    dataset = dataset_folder_of(real)
    if dataset is not None:
        check_not_inside(real, dataset, "dataset folder", fix="choose an -o folder outside it (its dataset.json, "
                         "images and labels would be replaced)")


def check_output_folder(output: Path, marker: str = MARKER) -> None:
    """Refuse ``-o`` inside a dataset folder, or an existing folder segforge did not write into (no ``marker``: the
    command's own config file, ``predict_config.yaml``, ``sample_config.yaml``, ``denoise_config.yaml``) that holds
    a ``dataset.json`` or image files (module docstring)."""
    check_not_in_dataset(output)
    real = Path(os.path.realpath(output))
    if not real.is_dir() or (real / marker).is_file():
        return
    if (real / "dataset.json").exists():
        raise SegforgeError(f"{output}: holds a dataset.json that segforge did not write (no {marker} beside it); "
                            "predicting there would replace it. Fix: choose a new or empty -o folder")
    images = sorted(p.name for p in real.iterdir() if not p.name.startswith(".") and file_ending(p.name))
    if images:
        raise SegforgeError(f"{output}: holds {len(images)} image file(s) segforge did not write (e.g. {images[0]}): "
                            "a dataset's images or labels would be replaced by masks of the same names. Fix: choose "
                            "a new or empty -o folder, or one segforge predicted into")


def release_unused(output: Path, existed: bool) -> None:
    """After a run refused before its first case: remove the config files it wrote, and the folder it created, if
    they are all the folder holds (nothing is left behind; a folder with masks keeps its marker)."""
    output = Path(output)
    try:  # best effort: the refusal that brought us here is the message, never an error of this clean-up
        if not output.is_dir() or not set(os.listdir(output)) <= set(CONFIG_FILES):
            return
        for name in CONFIG_FILES:
            (output / name).unlink(missing_ok=True)
        if not existed:
            output.rmdir()
    except OSError:
        pass
