"""Hostile and careless input that would run code or lose data (issue 22, items 1-4): no override instantiates an
arbitrary callable, and no command writes into a dataset folder or over a file segforge did not write.
Each case: a clear message (exit 2), no traceback, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import tree_hash, write_dataset
from segforge.cli.main import CONFIG_DIR, compose_config, main
from segforge.errors import SegforgeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _MakesDirectoryWhenLoaded:
    """A pickle whose loading runs code (here: ``os.mkdir(path)``), as a downloaded ``evil.pt`` would."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def roots(work: Path, results: str = "res") -> list[str]:
    return [f"paths.work_root={work}", f"paths.preprocessed_root={work / 'pre'}", f"paths.results_root={work / results}"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A tiny dataset, planned and preprocessed: `train` would start at once."""
    base = tmp_path_factory.mktemp("untrusted")
    dataset = write_dataset(base / "Dataset001_Tiny", num_train=5, num_test=1)
    work = base / "work"
    assert main(["plan", str(dataset), *roots(work), "plan.features_base=4", "plan.configurations=[3d_fullres]",
                 "preprocess.num_workers=0"]) == 0
    return dataset, work


@pytest.fixture
def evil_pickle(tmp_path) -> tuple[Path, Path]:
    """(the pickle, the folder its loading would create)."""
    marker = tmp_path / "code_ran"
    torch.save(_MakesDirectoryWhenLoaded(marker), tmp_path / "evil.pt")
    return tmp_path / "evil.pt", marker


def test_a_target_under_model_on_the_command_line_runs_nothing(planned, evil_pickle, tmp_path, capfd):
    """`+model.evil={_target_:torch.load,...}` was instantiated by Hydra, running the pickle: refused by name."""
    dataset, work = planned
    evil, marker = evil_pickle
    code = main(["train", str(dataset), *roots(work, "evil"), "trainer.max_epochs=1",
                 f"+model.evil={{_target_:torch.load,f:'{evil}',weights_only:false}}"])
    printed = "".join(capfd.readouterr())
    assert code == 2 and "Traceback" not in printed, printed
    assert "model.evil._target_=torch.load" in printed and "Fix: remove the override" in printed
    assert not marker.exists() and not (work / "evil").exists()


@pytest.mark.parametrize("override, message", [
    ("+model.evil={_target_:torch.load,f:EVIL,weights_only:false}", "are not plain values"),
    ("model._target_=torch.load", "is not one of segforge's networks"),
])
def test_training_builds_the_network_from_segforges_list(planned, evil_pickle, override, message):
    """Past the command line (the Python API with a config of its own), `train` still builds the network from the
    allow-list weights files go through, never through Hydra's instantiate."""
    from segforge.io.dataset import load_dataset
    from segforge.training.run import train

    dataset, work = planned
    evil, marker = evil_pickle
    cfg = compose_config("train", [*roots(work, "api"), override.replace("EVIL", f"'{evil}'")])
    with pytest.raises(SegforgeError, match=message):
        train(cfg, load_dataset(dataset), [])
    assert not marker.exists()


def test_an_argument_the_network_does_not_take_is_a_message(planned, capfd):
    dataset, work = planned
    code = main(["train", str(dataset), *roots(work, "foo"), "+model.foo=1"])
    printed = "".join(capfd.readouterr())
    assert code == 2 and "Traceback" not in printed, printed
    assert "the model config" in printed and "foo" in printed


@pytest.mark.parametrize("override", [
    "+data.x._target_=os.system",                                   # no group but callbacks/logger/optim instantiates
    "+callbacks.x._target_=subprocess.Popen",                       # not a class of Lightning or segforge
    "+callbacks.x._target_=lightning.pytorch.callbacks.model_checkpoint.Tensor",  # torch's class, re-exported there
    "+logger.x._target_=lightning.fabric.utilities.cloud_io._load",  # a function of Lightning, not a class
    "+callbacks.x={_target_:lightning.pytorch.callbacks.LambdaCallback,on_fit_start:{_target_:os.system}}",  # nested
])
def test_a_target_outside_what_segforge_instantiates_is_refused(override, capfd):
    code = main(["train", "somewhere", "--cfg", "job", override])
    printed = "".join(capfd.readouterr())
    assert code == 2 and "Traceback" not in printed, printed
    assert "_target_=" in printed and "Fix:" in printed


@pytest.mark.parametrize("override", [
    "+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",
    "+logger.csv_extra._target_=lightning.pytorch.loggers.CSVLogger",
    "+optim.opt._target_=torch.optim.SGD",
    "model._target_=segforge.nn.unet.UNet",  # what the packaged config says
])
def test_classes_of_lightning_and_segforge_pass_in_their_groups(override):
    from segforge.cli.targets import check_targets

    check_targets(compose_config("train", [override]), CONFIG_DIR)


@pytest.mark.parametrize("setting", ["results_root", "preprocessed_root", "work_root"])
def test_train_never_writes_into_the_dataset_folder(planned, setting, capfd):
    """`plan` and `preprocess` refused a root inside the dataset, `train` wrote a 100 MB run folder there."""
    dataset, work = planned
    before = tree_hash(dataset)
    paths = dict(o.split("=", 1) for o in roots(work, "inside"))
    paths[f"paths.{setting}"] = str(dataset / "runs")
    code = main(["train", str(dataset), *[f"{k}={v}" for k, v in paths.items()], "trainer.max_epochs=1",
                 "data.iterations_per_epoch=1", "data.val_iterations=1", "final_validation.enabled=false",
                 "logger.tensorboard=false", "callbacks.progress_plot=false"])
    printed = "".join(capfd.readouterr())
    assert code == 2 and "Traceback" not in printed, printed
    assert "is inside the dataset folder" in printed and f"Fix: set paths.{setting}=DIR" in printed
    assert tree_hash(dataset) == before
