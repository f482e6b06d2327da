"""The benchmark harness (scripts/bench): results file, synthetic datasets, child-process stages, segforge runner.

Run: ``python -m pytest tests/test_bench_harness.py``. The harness lives in ``scripts/`` (not in the package), so
``scripts/`` is put on ``sys.path`` from this file's location (conftest chdirs to a tmp folder). nnunetv2 is not
needed: nnU-Net's folder layout is tested without running it, and the real nnU-Net run (it spawns
workers that import torch, ~20 s) only runs with ``SEGFORGE_BENCH_NNUNET=1`` and nnunetv2 installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench import datasets  # noqa: E402
from bench.child import StageError, run_stage  # noqa: E402
from bench.nnunet import NnunetTool  # noqa: E402
from bench.report import comparison_rows, summarize  # noqa: E402
from bench.results import ResultsFile, make_record  # noqa: E402
from bench.segforge_runner import SegforgeTool  # noqa: E402


def _record(stage: str, tool: str = "segforge", seconds: float = 1.0, workers: int = 2) -> dict:
    return make_record("planning", tool, "tiny", stage, {"seconds": seconds}, {"workers": workers})


# ------------------------------------------------------------------------------------------------ results
def test_results_append_find_and_resume(tmp_path):
    results = ResultsFile(tmp_path / "sub" / "results.jsonl")
    assert results.records() == [] and not results.has("planning", "segforge", "tiny", "plan")
    results.append(_record("fingerprint", seconds=1.0))
    results.append(_record("fingerprint", seconds=2.0))
    results.append(_record("plan", tool="nnunet"))
    assert results.has("planning", "segforge", "tiny", "fingerprint")
    assert not results.has("planning", "segforge", "tiny", "plan")  # only nnunet's plan is recorded
    assert not results.has("planning", "segforge", "tiny", "fingerprint", {"workers": 4})  # other parameters
    assert results.latest("planning", "segforge", "tiny", "fingerprint")["metrics"]["seconds"] == 2.0
    record = results.records()[0]
    assert set(record["versions"]) >= {"segforge", "nnunetv2", "torch"}
    assert record["host"]["cpu_count"] >= 1 and record["timestamp"].endswith("+00:00")


def test_results_tolerate_a_partial_line(tmp_path):
    results = ResultsFile(tmp_path / "results.jsonl")
    results.append(_record("fingerprint"))
    with open(results.path, "a") as handle:  # what a crash in the middle of a write leaves
        handle.write('{"benchmark": "planning", "tool": "segf')
    assert len(results.records()) == 1
    results.append(_record("plan"))  # must start on its own line, not glued to the fragment
    assert [r["stage"] for r in results.records()] == ["fingerprint", "plan"]
    assert results.path.read_text().endswith("\n")


# ------------------------------------------------------------------------------------------------ datasets
def test_tiny_dataset_is_valid_and_reused(tmp_path):
    from segforge.io.checks import check_dataset

    stale = tmp_path / "datasets" / ".tmp-Dataset903_Tiny-deadbeef"  # an interrupted earlier generation
    stale.mkdir(parents=True)
    root = datasets.ensure_dataset("tiny", tmp_path, workers=2, log=lambda msg: None)
    assert root.name == "Dataset903_Tiny" and not stale.exists()
    assert check_dataset(root) == []
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 6 and meta["file_ending"] == ".nii.gz"
    assert len(list((root / "imagesTr").glob("*_0000.nii.gz"))) == 6 == len(list((root / "labelsTr").iterdir()))
    stamp = (root / "dataset.json").stat().st_mtime_ns
    assert datasets.ensure_dataset("tiny", tmp_path, log=pytest.fail) == root  # complete: not written again
    assert (root / "dataset.json").stat().st_mtime_ns == stamp


def test_cases_are_deterministic_and_ct_like():
    preset = datasets.get_preset("tiny")
    image, label, spacing = datasets.make_case(preset, 3)
    again, _, _ = datasets.make_case(preset, 3)
    assert (image == again).all() and image.dtype.name == "int16" and label.shape == image.shape
    assert image.min() >= -1024 and set(range(4)) <= set(label.ravel().tolist())
    assert 2.0 < spacing[0] < 3.0 and 0.6 < spacing[1] == spacing[2] < 1.0


def test_other_parameters_mean_incomplete(tmp_path):
    root = datasets.ensure_dataset("tiny", tmp_path, workers=1, log=lambda msg: None)
    other = datasets.Preset("tiny", 903, 5, (16, 32, 32), (2.5, 0.8, 0.8))
    assert datasets.is_complete(root, datasets.get_preset("tiny")) and not datasets.is_complete(root, other)


# ------------------------------------------------------------------------------------------------ child protocol
def test_child_stage_times_the_work_and_reports_failures(tmp_path):
    result = run_stage("bench.child:stage_selftest", {"sleep": 0.2, "echo": [1, 2]}, tmp_path / "run", name="ok")
    assert 0.2 <= result.seconds < 1.0 and result.wall_seconds > result.seconds
    assert result.metrics["echo"] == [1, 2] and result.metrics["cwd"] == str((tmp_path / "run").resolve())
    with pytest.raises(StageError, match="selftest asked to fail"):
        run_stage("bench.child:stage_selftest", {"fail": True}, tmp_path / "run", name="bad")
    with pytest.raises(StageError, match="timed out"):
        run_stage("bench.child:stage_selftest", {"sleep": 30}, tmp_path / "run", name="slow", timeout=1.0)


def test_import_clock_counts_only_real_loads(tmp_path, monkeypatch):
    from bench.importclock import ImportClock

    (tmp_path / "bench_slow_module.py").write_text("import time\ntime.sleep(0.2)\nVALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bench_slow_module", raising=False)
    with ImportClock() as clock:
        import bench_slow_module

        first = clock.seconds
        import bench_slow_module  # noqa: F811  already loaded: free
    assert bench_slow_module.VALUE == 7 and 0.2 <= first < 1.0 and clock.seconds == first
    assert clock not in sys.meta_path and not type(bench_slow_module.__loader__).__name__.startswith("_Timed")


def test_summary_takes_medians_and_table_ratios(tmp_path):
    runs = [run_stage("bench.child:stage_selftest", {"sleep": s}, tmp_path, name=f"r{i}") for i, s in enumerate((0.0, 0.1, 0.3))]
    metrics = summarize(runs)
    assert metrics["repeats"] == 3 and abs(metrics["seconds"] - runs[1].seconds) < 1e-9
    rows = comparison_rows({"plan": {"nnunet": {"seconds": 4.0, "wall_seconds": 8.0},
                                     "segforge": {"seconds": 1.0, "wall_seconds": 6.0}}})
    assert rows[0][:5] == ["plan", "in-process", "4.00", "1.00", "0.250"] and rows[0][5] == "ok"
    assert rows[1][4] == "0.750" and rows[-1][0] == "total"


# ------------------------------------------------------------------------------------------------ tools
def _fast_plan_overrides() -> list[str]:
    """Overrides passed through to segforge; the quick memory model when the planner has one (the runner is tested
    here, not the planner: tracing a training step costs seconds)."""
    from segforge.cli.main import compose_config

    overrides = ["plan.gpu_memory_gb=8"]
    method = compose_config("plan", []).plan.get("memory", {}).get("method")
    return overrides + (["plan.memory.method=analytic"] if method is not None else [])


def test_segforge_fingerprint_and_plan_on_tiny(tmp_path):
    root = datasets.ensure_dataset("tiny", tmp_path, workers=2, log=lambda msg: None)
    tool = SegforgeTool(root, tmp_path / "work", num_workers=2, plan_overrides=_fast_plan_overrides(), timeout=120)
    (tool.run_dir(0)).mkdir(parents=True)
    (tool.run_dir(0) / "leftover.json").write_text("{}")  # a fingerprint run starts from an empty folder
    fingerprint = tool.fingerprint(0)
    assert not (tool.run_dir(0) / "leftover.json").exists() and tool.has_fingerprint(0)
    assert fingerprint.metrics["num_cases"] == 6 and 0 < fingerprint.seconds < fingerprint.wall_seconds
    plan = tool.plan(0)
    plans = json.loads((tool.run_dir(0) / "plans.json").read_text())
    assert "3d_fullres" in plans["configurations"] and "3d_fullres" in plan.metrics["configurations"]
    assert plan.metrics["make_plans_seconds"] <= plan.seconds < plan.wall_seconds


def test_nnunet_layout_without_running_it(tmp_path):
    root = datasets.ensure_dataset("tiny", tmp_path, workers=2, log=lambda msg: None)
    tool = NnunetTool(root, 903, tmp_path / "work", num_workers=3)
    env = tool.env(1)
    link = Path(env["nnUNet_raw"]) / "Dataset903_Tiny"
    assert link.is_symlink() and link.resolve() == root.resolve() and (link / "dataset.json").is_file()
    assert env["nnUNet_preprocessed"].endswith(os.path.join("run-1", "preprocessed")) and env["nnUNet_def_n_proc"] == "3"
    with pytest.raises(ValueError, match="Dataset904_"):
        NnunetTool(root, 904, tmp_path / "work")


@pytest.mark.skipif(os.environ.get("SEGFORGE_BENCH_NNUNET") != "1" or importlib.util.find_spec("nnunetv2") is None,
                    reason="runs nnU-Net for real (~20 s): set SEGFORGE_BENCH_NNUNET=1 with nnunetv2 installed")
def test_nnunet_fingerprint_and_plan_on_tiny(tmp_path):
    root = datasets.ensure_dataset("tiny", tmp_path, workers=2, log=lambda msg: None)
    tool = NnunetTool(root, 903, tmp_path / "work", num_workers=2, timeout=300)
    assert tool.fingerprint(0).metrics["num_cases"] == 6 and tool.has_fingerprint(0)
    assert "3d_fullres" in tool.plan(0).metrics["configurations"]


def test_segforge_data_pipeline_stages_on_tiny(tmp_path):
    """preprocess, patches and the memory stage of bench_data_pipeline.py run and report (child processes)."""
    root = datasets.ensure_dataset("tiny", tmp_path, workers=2, log=lambda msg: None)
    tool = SegforgeTool(root, tmp_path / "work", num_workers=1, plan_overrides=_fast_plan_overrides(), timeout=180)
    tool.fingerprint(0)
    tool.plan(0)
    (tool.run_dir(0) / "preprocessed" / "stale").mkdir(parents=True)  # preprocessing is measured cold
    prep = tool.preprocess(["3d_fullres"], 0)
    assert prep.metrics["num_cases"] == 6 and prep.metrics["output_mb"] > 0
    assert not (tool.run_dir(0) / "preprocessed" / "stale").exists()
    assert len(list(tool.preprocessed("3d_fullres").glob("case_*_seg.npy"))) == 6
    patches = tool.patches("3d_fullres", [8, 16, 16], 2, 3)
    assert patches.metrics["patches"] == 6 and patches.metrics["threads"] == 1 and patches.seconds > 0
    memory = tool.preprocess_case_memory([5.0, 1.6, 1.6])
    assert all(shape[0] < 16 for shape in memory.metrics["shapes_after_resampling"]) and memory.peak_rss_mb > 0
