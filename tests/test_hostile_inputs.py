"""Hostile settings and files: each refused with one line naming the setting or file and the fix, no traceback."""

from __future__ import annotations

import pytest

from segforge.cli.main import main
from segforge.errors import SegforgeError


@pytest.mark.parametrize("step", ["2", "0", "-1", "abc", "1.0001"])
def test_a_step_size_outside_zero_one_is_refused_before_any_model_is_read(tmp_path, step, capsys):
    from segforge.inference.sliding_window import window_starts

    images = tmp_path / "images"
    images.mkdir()
    code = main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "no_model"),
                 f"predict.step_size={step}"])
    err = capsys.readouterr().err
    assert code == 2 and f"predict.step_size={step}: the sliding-window step must be" in err and "Traceback" not in err
    with pytest.raises(SegforgeError, match="in \\(0, 1\\]"):
        window_starts(40, 16, float(step) if step != "abc" else step)


def test_step_sizes_in_zero_one_cover_the_axis():
    from segforge.inference.sliding_window import window_starts

    for step in (1.0, 0.5, 0.01):
        starts = window_starts(40, 16, step)
        assert starts[0] == 0 and starts[-1] == 40 - 16 and max(b - a for a, b in zip(starts, starts[1:])) <= 16 * step + 1


@pytest.mark.parametrize("mismatch", ["num_folds", "split_groups", "not_a_list"])
def test_an_existing_splits_json_that_contradicts_the_settings_is_refused(tmp_path, mismatch):
    import json
    from types import SimpleNamespace

    from segforge.training.run import fold_case_ids

    ids = [f"patient{p}_scan{s}" for p in range(4) for s in range(2)]
    splits_path = tmp_path / "splits.json"
    # 2 folds, patient0's scans on both sides of fold 0
    splits = [{"train": ids[1:4], "val": [ids[0]] + ids[4:]}, {"train": [ids[0]] + ids[4:], "val": ids[1:4]}]
    splits_path.write_text(json.dumps(splits if mismatch != "not_a_list" else {"train": ids}))
    workspace = SimpleNamespace(splits_path=splits_path)
    num_folds, groups = (5, None) if mismatch == "num_folds" else (2, r"^(patient\d+)_")
    with pytest.raises(SegforgeError) as info:
        fold_case_ids(workspace, ids, 0, num_folds, seed=0, group_pattern=groups)
    message = str(info.value)
    assert str(splits_path) in message and "Fix:" in message
    assert {"num_folds": "num_folds=5", "split_groups": "'patient0' (split_groups=", "not_a_list": "one per fold"}[
        mismatch] in message
    if mismatch != "not_a_list":  # the file is used where it agrees with the settings
        assert fold_case_ids(workspace, ids, 1, 2, seed=0)[1] == ids[1:4]


class _CountedLookups(dict):
    """A plans ``configurations`` mapping that fails the test instead of letting a lookup loop run forever."""

    def __getitem__(self, key):
        self.lookups = getattr(self, "lookups", 0) + 1
        assert self.lookups < 1000, "configuration_of looped"
        return super().__getitem__(key)


@pytest.mark.parametrize("chain", [{"a": "a"}, {"a": "b", "b": "c", "c": "a"}, {"a": "missing"}])
def test_nnunet_plans_whose_inheritance_cycles_or_dangles_are_refused(chain):
    from segforge.inference.nnunet_model import configuration_of

    configurations = _CountedLookups({name: {"inherits_from": parent, name: 1} for name, parent in chain.items()})
    with pytest.raises(SegforgeError, match="plans.json: configuration 'a' inherits from .*Fix: correct `inherits_from`"):
        configuration_of({"configurations": configurations}, "a")


def test_nnunet_inheritance_fills_in_the_parents():
    from segforge.inference.nnunet_model import configuration_of

    plans = {"configurations": {"a": {"inherits_from": "b", "x": 1}, "b": {"inherits_from": "c", "x": 2, "y": 2},
                                "c": {"z": 3, "y": 3}}}
    assert configuration_of(plans, "a") == {"x": 1, "y": 2, "z": 3}


def _session_members(sid: int) -> list[int]:
    import os
    from pathlib import Path

    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z" and int(stat.parent.name) != os.getpid():
            members.append(int(stat.parent.name))
    return members


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_forkserver_and_tracker_die_with_a_sigkilled_parent(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import time\nfrom segforge.parallel import progress_map\n"
              "for _ in progress_map(time.sleep, [(300,), (300,)], 2, 'sleep'):\n    pass\n")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(_session_members(parent.pid)) < 4 and time.monotonic() < deadline:  # parent, forkserver, 2 workers
            time.sleep(0.2)
        assert len(_session_members(parent.pid)) >= 4, "the pool did not start"
        os.kill(parent.pid, signal.SIGKILL)  # the parent only, as the OOM killer or a scheduler would
        parent.wait()
        deadline = time.monotonic() + 30
        while _session_members(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_members(parent.pid) == []
    finally:
        for pid in _session_members(parent.pid):  # what the old code left running
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("override, names", [
    ("trainer.max_epochs=${oc.env:SEGFORGE_TEST_UNSET}", "Environment variable 'SEGFORGE_TEST_UNSET' not found"),
    ("trainer.max_epochs=${nope.key}", "Interpolation key 'nope.key' not found"),
    ("trainer.foo=1", "+trainer.foo=1"),
])
def test_an_override_hydra_or_omegaconf_refuses_is_one_line_naming_it(tmp_path, override, names, capsys):
    assert main(["train", str(tmp_path / "absent"), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segforge train: error: bad override {override}: ") and names in err and "Fix: " in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("override, message", [
    ("+trainer.foo=1", "trainer.foo: not an option of Lightning's Trainer"),
    ("+trainer.callbacks=[]", "trainer.callbacks: segforge sets this Trainer argument itself"),
    ("+trainer.logger=false", "trainer.logger: segforge sets this Trainer argument itself"),
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc': must be a whole number >= 1, or -1"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: must be a whole number >= 1, or -1"),
    ("optim.optimizer.lr=-1", "optim.optimizer.lr=-1: must be a number >= 0"),
    ("optim.optimizer.lr=nan", "optim.optimizer.lr=nan: must be a number >= 0"),
    ("data.patch_size=[8,8]", "data.patch_size=[8, 8]: must be null (the plan's [8, 16, 16]) or 3 whole numbers"),
    ("data.batch_size=0.5", "data.batch_size=0.5: must be null"),
    ("num_folds=abc", "num_folds='abc': must be a whole number >= 2"),
    ("fold=x", "fold='x': must be a whole number >= 0 or all"),
])
def test_train_settings_of_the_wrong_type_or_range_are_refused_before_any_work(override, message):
    from omegaconf import OmegaConf

    from segforge.cli.main import compose_config
    from segforge.training.settings import check_train_settings

    cfg = compose_config("train", [override])
    with pytest.raises(SegforgeError, match="^" + __import__("re").escape(message)):
        check_train_settings(cfg, OmegaConf.to_container(cfg.trainer, resolve=True), {"dims": 3, "patch_size": [8, 16, 16]})
    check_train_settings(compose_config("train", []), OmegaConf.to_container(compose_config("train", []).trainer),
                         {"dims": 3, "patch_size": [8, 16, 16]})  # the defaults pass
    unlimited = compose_config("train", ["trainer.max_epochs=-1", "trainer.max_time=00:01:00:00"])
    check_train_settings(unlimited, OmegaConf.to_container(unlimited.trainer), {"dims": 3, "patch_size": [8, 16, 16]})


def test_a_dataset_json_nested_too_deeply_is_a_problem_not_a_crash(tmp_path):
    from segforge.io.dataset import parse_dataset_json

    (tmp_path / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)
    fields, problems = parse_dataset_json(tmp_path)
    assert fields is None and "nested too deeply" in problems[0].message
