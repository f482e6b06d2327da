"""One trace per topology (``segforge.planning.timeline``): the storage timeline traced once at the marker batch
predicts fresh traces at other patches and batches of the topology, the oracle traces each topology once, and a
step the marker cannot split falls back to tracing each size."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import segforge
from segforge.planning.budget import LAW_TOLERANCE_BYTES, PeakOracle, law_key
from segforge.planning.memory import StepSpec, fake_mode, traced_peak_bytes
from segforge.planning.planner import make_plans
from segforge.planning.timeline import MARKER_BATCH, trace_timeline

SPEC = StepSpec(spatial_dims=3, in_channels=1, num_classes=3, patch_size=(16, 32, 32), batch_size=2,
                features_per_stage=(8, 16, 32, 32), kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
                strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)), precision="16-mixed")
SPEC_2D = StepSpec(spatial_dims=2, in_channels=2, num_classes=4, patch_size=(32, 48), batch_size=2,
                   features_per_stage=(8, 16, 32), kernel_sizes=((3, 3),) * 3, strides=((1, 1), (2, 2), (2, 2)),
                   precision="bf16-mixed")
RESIDUAL = replace(SPEC, encoder="residual", blocks_per_stage=(1, 2, 3, 2), conv_per_stage=1, precision="32-true")


@pytest.mark.parametrize("base, others", [
    (SPEC, [replace(SPEC, patch_size=(24, 32, 48), batch_size=3), replace(SPEC, batch_size=9)]),
    (replace(SPEC, precision="32-true", optimizer="adamw"), [replace(SPEC, precision="32-true", optimizer="adamw",
                                                                     batch_size=1)]),
    (SPEC_2D, [replace(SPEC_2D, batch_size=37), replace(SPEC_2D, patch_size=(64, 16), batch_size=5)]),
    (RESIDUAL, [replace(RESIDUAL, batch_size=5, patch_size=(32, 32, 16))]),
], ids=["3d-16-mixed", "3d-32-true-adamw", "2d-bf16", "residual"])
def test_one_trace_predicts_fresh_traces_at_other_sizes(base, others):
    mode = fake_mode()
    timeline = trace_timeline(base, mode)
    assert timeline is not None and timeline.consistent
    for spec in (base, *others):
        assert law_key(spec)[0] == law_key(base)[0]
        fresh = traced_peak_bytes(spec, mode)
        predicted = timeline.peak(spec.batch_size * math.prod(spec.patch_size))
        assert abs(predicted - fresh) <= LAW_TOLERANCE_BYTES, (spec.patch_size, spec.batch_size, predicted, fresh)


def test_the_oracle_traces_each_topology_once():
    oracle = PeakOracle("traced", timeline=True)
    peaks = [oracle(replace(SPEC, batch_size=b)) for b in (2, 4, 7)]
    assert oracle.traces == 1 and peaks == sorted(peaks) and len(set(peaks)) == 3
    assert oracle.exact(replace(SPEC, batch_size=11)) > peaks[-1] and oracle.traces == 1  # exact: the same trace
    deeper = replace(SPEC, features_per_stage=(8, 16, 32, 32, 32), kernel_sizes=SPEC.kernel_sizes + ((3, 3, 3),),
                     strides=SPEC.strides + ((2, 2, 2),), patch_size=(32, 32, 32))
    oracle(deeper), oracle(replace(deeper, batch_size=3))
    assert oracle.traces == 2


def test_a_weight_the_marker_divides_is_traced_size_by_size():
    wide = replace(SPEC, features_per_stage=(MARKER_BATCH, 16, 32, 32))  # a first stage of 8191 features
    assert trace_timeline(wide) is None
    oracle = PeakOracle("traced", timeline=True)
    assert oracle(wide) == traced_peak_bytes(wide) and oracle.traces == 2  # the timeline tried, then the size


def test_plans_are_the_same_with_one_trace_per_topology_and_take_fewer_traces():
    rules = OmegaConf.load(Path(segforge.__file__).parent / "configs" / "plan" / "default.yaml")
    rules.update({"configurations": ["2d", "3d_fullres"], "gpu_memory_gb": 0.3, "features_base": 8,
                  "features_max_3d": 64, "features_max_2d": 64})
    rules.memory.reserved_gb = 0.05
    stats = {"mean": 0.0, "median": 0.0, "std": 1.0, "min": -1.0, "max": 1.0, "percentile_00_5": -1.0,
             "percentile_99_5": 1.0}
    fingerprint = {"dataset_name": "Dataset053_Timeline", "channel_names": {"0": "MRI"},
                   "labels": {"background": 0, "a": 1}, "intensity_foreground": {"0": stats},
                   "cases": [{"spacing": [3.0, 1.0, 1.0], "shape_after_crop": [32, 96, 96],
                              "relative_size_after_crop": 1.0}] * 6}
    one = make_plans(fingerprint, rules)
    rules.memory.timeline = False
    each = make_plans(fingerprint, rules)
    assert one["memory_traces"] < each["memory_traces"]
    for name, conf in each["configurations"].items():
        mine = one["configurations"][name]
        assert (mine["patch_size"], mine["batch_size"]) == (conf["patch_size"], conf["batch_size"]), name
        assert abs(mine["memory"]["predicted_peak_bytes"] - conf["memory"]["predicted_peak_bytes"]) <= LAW_TOLERANCE_BYTES
