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
    "+data.x._target_=os.system",                                   # data.* is never instantiated
    "+data.x._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",  # would be ignored silently
    "+optim.opt._target_=torch.optim.Adam",                         # only optim.optimizer and optim.scheduler
    "optim.optimizer._target_=os.system",                           # not a class of torch.optim
    "optim.optimizer._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",  # not an optimizer's package
    "optim.scheduler._target_=torch.optim.lr_scheduler.LambdaLR",   # the schedule is segforge's (steps and time)
    "+callbacks.popen._target_=subprocess.Popen",                   # not a class of Lightning or segforge
    "+logger.popen._target_=subprocess.Popen",
    "logger.csv._target_=os.system",
    "+callbacks.t._target_=lightning.pytorch.callbacks.model_checkpoint.Tensor",  # torch's, re-exported there
    "+callbacks.load._target_=lightning.fabric.utilities.cloud_io._load",  # a function of Lightning, not a class
    "+callbacks.l={_target_:lightning.pytorch.callbacks.LambdaCallback,on_fit_start:{_target_:os.system}}",  # nested
    "+callbacks.swa.nested._target_=os.system",                     # an argument of a packaged entry
    """+callbacks.x='${oc.create:"{_target_: os.system}"}'""",     # made by an interpolation when resolved
    "+callbacks.cli._target_=lightning.pytorch.cli.LightningCLI",   # builds classes from arguments of its own
    "+model.x._target_=segforge.training.step_timer.TrainingStepTimer",  # a class of segforge, outside the zones
    "+callbacks.t._target_=lightning.pytorch.Trainer",              # Lightning's, but no callback
    "+logger.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",  # a callback is no logger
    "optim.optimizer._target_=segforge.training.step_timer.TrainingStepTimer",  # segforge's, but no optimizer
    "+callbacks.a._target_=segforge.errors.SegforgeError",           # segforge's, but no callback
])
def test_a_target_outside_what_segforge_instantiates_is_refused(override, capfd):
    code = main(["train", "somewhere", "--cfg", "job", override])
    printed = "".join(capfd.readouterr())
    assert code == 2 and "Traceback" not in printed, printed
    assert "_target_=" in printed and "Fix:" in printed


def test_a_config_that_does_not_resolve_here_hides_no_target_in_a_node_built_from_a_string():
    """The check scans the resolved config; where it cannot resolve (a value that resolves only where the run does),
    the unresolved tree shows no `_target_` inside `${oc.create:...}`: such a string is refused then."""
    from omegaconf import OmegaConf

    from segforge.cli.targets import check_targets

    cfg = OmegaConf.create({"callbacks": {"x": '${oc.create:"{_target_: os.system}"}'}, "data": {"y": "${oc.env:SEGFORGE_UNSET_X}"}})
    with pytest.raises(SegforgeError, match="node built from a string"):
        check_targets(cfg, CONFIG_DIR)
    for spaced in ('${\toc.create:"{_target_: os.system}"}', '${ \t oc.create :"{_target_: os.system}"}'):
        # OmegaConf takes whitespace there too (a tab resolved to {'_target_': 'os.system'})
        assert OmegaConf.create({"x": spaced.replace("os.system", "builtins.dict")}).x == {"_target_": "builtins.dict"}
        with pytest.raises(SegforgeError, match="node built from a string"):
            check_targets(OmegaConf.create({"callbacks": {"x": spaced}, "data": {"y": "${oc.env:SEGFORGE_UNSET_X}"}}),
                          CONFIG_DIR)
    check_targets(OmegaConf.create({"data": {"y": "${oc.env:SEGFORGE_UNSET_X}"}}), CONFIG_DIR)  # nothing built: fine


@pytest.mark.parametrize("override", [
    "+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",
    "+callbacks.swa={_target_:lightning.pytorch.callbacks.StochasticWeightAveraging,swa_lrs:0.001}",
    "+callbacks.timer={_target_:segforge.training.step_timer.TrainingStepTimer,path:t.json}",
    "logger=mlflow",
    "+logger.mlflow._target_=lightning.pytorch.loggers.MLFlowLogger",
    "optim.optimizer._target_=torch.optim.Adam",
    "optim.scheduler._target_=segforge.training.schedules.ScheduleCallback",
    "model._target_=segforge.nn.unet.UNet",  # what the packaged config says
])
def test_classes_of_their_packages_pass_in_callbacks_logger_and_optim(override):
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
                 "logger.tensorboard=null", "callbacks.epoch_progress.plot_path=null"])
    printed = "".join(capfd.readouterr())
    assert code == 2 and "Traceback" not in printed, printed
    assert "is inside the dataset folder" in printed and f"Fix: set paths.{setting}=DIR" in printed
    assert tree_hash(dataset) == before


def test_a_model_folders_config_is_data_never_instantiated(planned, tmp_path, capfd):
    """A fold's config.yaml (as a downloaded model folder could hold it) naming `_target_: os.mkdir` in callbacks,
    logger, optim and the model: resuming the fold, fine-tuning from it and predicting with it build only the
    command's own config; nothing the folder says is run."""
    import yaml

    dataset, work = planned
    quick = ["trainer.max_epochs=1", "data.iterations_per_epoch=1", "data.val_iterations=1", "trainer.accelerator=cpu",
             "final_validation.enabled=false", "logger.tensorboard=null", "callbacks.epoch_progress.plot_path=null"]
    assert main(["train", str(dataset), *roots(work, "data"), *quick]) == 0
    model = work / "data" / dataset.name / "results" / "segment" / "3d_fullres"
    fold = model / "fold_0"
    markers = {name: tmp_path / f"ran_{name}" for name in ("callback", "logger", "optimizer", "scheduler", "model", "top")}
    config = yaml.safe_load((fold / "config.yaml").read_text())
    evil = {name: {"_target_": "os.mkdir", "path": str(path)} for name, path in markers.items()}
    config["callbacks"]["evil"] = evil["callback"]
    config["logger"]["evil"] = evil["logger"]
    config["optim"] = {"optimizer": {**evil["optimizer"], "_partial_": True}, "scheduler": evil["scheduler"]}
    config["model"] = evil["model"]
    config.update(evil["top"])
    (fold / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(dataset), *roots(work, "data"), *quick, "trainer.max_epochs=2"]) == 0  # resume=auto
    assert torch.load(fold / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2  # it did resume
    assert main(["train", str(dataset), *roots(work, "tuned"), *quick, f"init_from={fold}"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    for image in sorted((dataset / "imagesTs").iterdir())[:1]:
        (images / image.name).write_bytes(image.read_bytes())
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "--model", str(model), *FAST]) == 0
    assert "Traceback" not in "".join(capfd.readouterr())
    assert not [name for name, path in markers.items() if path.exists()]


# --- predict -o: never into a dataset, never over files segforge did not write; sidecars apart from cases ----------

FAST = ["predict.mirror=false", "predict.device=cpu"]


@pytest.fixture(scope="module")
def model(planned) -> Path:
    """A model folder as `train` leaves it, with the planned network's seeded random weights (not trained)."""
    import shutil

    from segforge.io.model_folder import FINAL_WEIGHTS, build_network, write_weights
    from segforge.training.run import network_kwargs

    dataset, work = planned
    plans = json.loads((work / dataset.name / "plans_default.json").read_text())
    plan_config = plans["configurations"]["3d_fullres"]
    kwargs = network_kwargs(compose_config("train", []), plan_config, 1, 3)
    torch.manual_seed(0)
    folder = work / "model" / "3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    shutil.copy(work / dataset.name / "plans_default.json", folder / "plans.json")
    shutil.copy(dataset / "dataset.json", folder / "dataset.json")
    write_weights(folder / "fold_0" / FINAL_WEIGHTS, build_network(kwargs, "test"), kwargs, "3d_fullres", plan_config)
    return folder


def predict(model: Path, images: Path, out: Path, capfd, *extra: str) -> tuple[int, str]:
    code = main(["predict", "-i", str(images), "-o", str(out), "--model", str(model), *FAST, *extra])
    printed = "".join(capfd.readouterr())
    assert "Traceback" not in printed, printed
    return code, printed


@pytest.mark.parametrize("where", [".", "labelsTs", "imagesTr", "predictions", "link to labelsTs"])
def test_predict_never_writes_into_a_dataset_folder(planned, model, where, tmp_path, capfd):
    """`-o DATASET` replaced its dataset.json, `-o DATASET/labelsTs` its reference labels."""
    dataset, _ = planned
    before = tree_hash(dataset)
    out = dataset / where
    if where.startswith("link"):
        out = tmp_path / "masks"
        out.symlink_to(dataset / "labelsTs")
    code, printed = predict(model, dataset / "imagesTs", out, capfd)
    assert code == 2 and "is inside the dataset folder" in printed and "Fix: choose an -o folder outside it" in printed
    assert tree_hash(dataset) == before


@pytest.mark.parametrize("command", [["sample", "n=1"], ["denoise", "-i", "IN"]])
def test_generated_images_never_go_into_a_dataset_folder(planned, tmp_path, command, capfd):
    dataset, _ = planned
    before = tree_hash(dataset)
    args = [str(tmp_path) if a == "IN" else a for a in command]
    code = main([args[0], "--model", str(tmp_path / "some_model"), "-o", str(dataset / "imagesTr"), *args[1:]])
    printed = "".join(capfd.readouterr())
    assert code == 2 and "Traceback" not in printed and "is inside the dataset folder" in printed, printed
    assert tree_hash(dataset) == before


@pytest.mark.parametrize("command", [["sample", "n=1"], ["denoise", "-i", "IN"]])
def test_generated_images_never_replace_a_users_images(tmp_path, command, capfd):
    """`denoise -i noisy -o originals` would have replaced the clean originals of the same names."""
    originals = tmp_path / "originals"
    originals.mkdir()
    (originals / "case_0000.nii.gz").write_bytes(b"a user's image")
    (tmp_path / "in").mkdir()
    args = [str(tmp_path / "in") if a == "IN" else a for a in command]
    code = main([args[0], "--model", str(tmp_path / "some_model"), "-o", str(originals), *args[1:]])
    printed = "".join(capfd.readouterr())
    assert code == 2 and "Traceback" not in printed and "image file(s) segforge did not write" in printed, printed
    assert (originals / "case_0000.nii.gz").read_bytes() == b"a user's image"


def test_predict_refuses_a_folder_holding_files_it_did_not_write(planned, model, tmp_path, capfd):
    dataset, _ = planned
    foreign = tmp_path / "listing"  # a dataset that lists its cases in dataset.json, no imagesTr/
    foreign.mkdir()
    (foreign / "dataset.json").write_text(json.dumps({"labels": {"background": 0}, "dataset": {}}))
    labels = tmp_path / "my_labels"  # reference labels copied out of a dataset
    labels.mkdir()
    (labels / "case005.nii.gz").write_bytes((dataset / "labelsTs" / "case005.nii.gz").read_bytes())
    for out, message in ((foreign, "holds a dataset.json that segforge did not write"),
                         (labels, "holds 1 image file(s) segforge did not write (e.g. case005.nii.gz)")):
        before = tree_hash(out)
        code, printed = predict(model, dataset / "imagesTs", out, capfd)
        assert code == 2 and message in printed and "Fix: choose a new or empty -o folder" in printed, printed
        assert tree_hash(out) == before


def test_predict_writes_again_into_its_own_folder_also_after_a_kill(planned, model, tmp_path, capfd, monkeypatch):
    """A re-run and `--continue` keep working: the folder is marked before the first mask (a killed run's too)."""
    import shutil

    import segforge.inference.folder as folder

    dataset, _ = planned
    images, out = tmp_path / "in", tmp_path / "out"
    images.mkdir()
    for case in ("a", "b"):
        shutil.copy(dataset / "imagesTs" / "case005_0000.nii.gz", images / f"{case}_0000.nii.gz")
    real, calls = folder.network_case, []

    def killed_at_b(*args):  # the network stage runs in the main thread, where a Ctrl-C lands
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill: no report, no dataset.json
        return real(*args)

    monkeypatch.setattr(folder, "network_case", killed_at_b)
    code, _ = predict(model, images, out, capfd, "predict.overlap=false")  # a's mask written before b's network
    assert code == 130 and (out / "a.nii.gz").is_file() and not (out / "dataset.json").exists()
    monkeypatch.undo()
    code, printed = predict(model, images, out, capfd, "--continue")
    assert code == 0 and "1 mask(s) written, 1 already there" in printed, printed
    code, printed = predict(model, images, out, capfd)
    assert code == 0 and "2 mask(s) written" in printed, printed


def test_a_refused_prediction_leaves_no_folder(model, tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    code, printed = predict(model, tmp_path / "empty", tmp_path / "out", capfd)
    assert code == 2 and "no images ending in .nii.gz" in printed
    assert not (tmp_path / "out").exists()


def test_cases_named_like_the_folders_own_files_overwrite_nothing(planned, model, tmp_path, capfd):
    """`dataset_0000.nii.gz` with --save-probabilities wrote its probabilities' JSON as dataset.json (then replaced
    by the sidecar, or the other way round); likewise predict_report and evaluate's summary."""
    import shutil

    dataset, _ = planned
    images, refs, out = tmp_path / "in", tmp_path / "ref", tmp_path / "out"
    images.mkdir()
    refs.mkdir()
    cases = ("dataset", "predict_report", "summary", "predict_config")
    for case in cases:
        shutil.copy(dataset / "imagesTs" / "case005_0000.nii.gz", images / f"{case}_0000.nii.gz")
        shutil.copy(dataset / "labelsTs" / "case005.nii.gz", refs / f"{case}.nii.gz")
    code, printed = predict(model, images, out, capfd, "--save-probabilities")
    assert code == 0, printed
    assert main(["evaluate", str(out), str(refs)]) == 0
    assert json.loads((out / "dataset.json").read_text()) == json.loads((model / "dataset.json").read_text())
    assert sorted(c["case"] for c in json.loads((out / "predict_report.json").read_text())["cases"]) == sorted(cases)
    assert sorted(c["case"] for c in json.loads((out / "summary.json").read_text())["cases"]) == sorted(cases)
    assert "predict:" in (out / "predict_config.yaml").read_text()
    for case in cases:
        meta = json.loads((out / f"{case}.probabilities.json").read_text())
        assert meta["channels"] == ["background", "ball", "box"] and (out / f"{case}.npz").is_file()


def test_at_building_an_entry_resolved_late_calls_nothing_but_its_kind_or_a_packaged_factory(tmp_path, monkeypatch):
    """The second gate, where Hydra instantiates: the entry as it resolves then (an interpolation the command line's
    check could not resolve) builds no function but the packaged factories, no class of another kind or package,
    no nested argument, nothing it cannot locate itself (Hydra walks attribute chains through modules)."""
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from segforge.training.components import PACKAGES, build
    from segforge.training.optim import make_optimizer

    mark = tmp_path / "MARK"
    monkeypatch.setenv("SEGFORGE_LATE", f'{{_target_: os.mkdir, path: "{mark}"}}')
    late = OmegaConf.create({"x": "${oc.create:${oc.env:SEGFORGE_LATE}}"})

    def refused(entry, match, packages=PACKAGES["callbacks"]):
        with pytest.raises(SegforgeError, match=match):
            build(OmegaConf.create(entry) if isinstance(entry, dict) else entry, "callbacks.x", "remove it",
                  L.Callback, packages, "a Lightning callback")

    refused(late.x, "os.mkdir is not a Lightning callback of lightning, segforge")
    refused({"_target_": "lightning.pytorch.callbacks.LambdaCallback",
             "on_fit_start": {"_target_": "os.mkdir", "path": str(mark)}}, "would be built too")
    refused({"_target_": "segforge.parallel.os.mkdir", "path": str(mark)}, "cannot make segforge.parallel.os.mkdir")
    refused({"_target_": "segforge.io.artifacts.atomic_write_text", "_args_": [str(mark), "x"]}, "is not a Lightning")
    refused({"_target_": "lightning.pytorch.cli.SaveConfigCallback"}, "is not a Lightning callback")
    refused({"_target_": "tests_helper.Callback"}, "is not a Lightning callback")  # outside the packages: not imported
    with pytest.raises(SegforgeError, match="is not a torch optimizer"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], {"_target_": "os.mkdir", "path": str(mark)})
    with pytest.raises(SegforgeError, match="is not a torch optimizer"):  # packaged, but a logger group's factory
        make_optimizer([torch.nn.Parameter(torch.zeros(1))],
                       {"_target_": "segforge.training.components.local_mlflow_logger", "save_dir": str(mark)})
    assert not mark.exists()
    assert build(OmegaConf.create({"_target_": "segforge.training.callbacks.progress_bar", "kind": "none"}),
                 "callbacks.progress_bar", "", L.Callback, PACKAGES["callbacks"]) is None  # a packaged factory: built
    swa = build(OmegaConf.create({"_target_": "lightning.pytorch.callbacks.StochasticWeightAveraging", "swa_lrs": 1e-3}),
                "callbacks.swa", "", L.Callback, PACKAGES["callbacks"])
    assert isinstance(swa, L.pytorch.callbacks.StochasticWeightAveraging)
