"""The affine law of peak memory the planner's search relies on (``segforge.planning.budget``): within one
topology the traced peak is intercept + slope x batch x patch voxels, so two traces predict a third."""

from __future__ import annotations

from dataclasses import replace

from segforge.planning.budget import LAW_TOLERANCE_BYTES, PeakOracle, affine_peak, law_key
from segforge.planning.memory import StepSpec, fake_mode, traced_peak_bytes

SPEC = StepSpec(spatial_dims=3, in_channels=1, num_classes=3, patch_size=(16, 32, 32), batch_size=2,
                features_per_stage=(8, 16, 32, 32), kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
                strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)), precision="16-mixed")


def test_two_traces_predict_a_fresh_trace_at_a_third_size():
    mode = fake_mode()
    points = {}
    for spec in (SPEC, replace(SPEC, batch_size=5)):
        points[law_key(spec)[1]] = traced_peak_bytes(spec, mode)
    # another patch shape (same topology) and a larger batch: interpolated and extrapolated
    for third in (replace(SPEC, patch_size=(24, 32, 48), batch_size=3), replace(SPEC, batch_size=9)):
        key, size = law_key(third)
        assert key == law_key(SPEC)[0]
        fresh = traced_peak_bytes(third, mode)
        assert abs(affine_peak(points, size) - fresh) <= LAW_TOLERANCE_BYTES, (affine_peak(points, size), fresh)


def test_the_oracle_predicts_once_a_topology_has_two_traced_sizes():
    oracle = PeakOracle("traced")
    oracle(SPEC), oracle(replace(SPEC, batch_size=4))
    assert (oracle.traces, oracle.predictions) == (2, 0)
    third = replace(SPEC, batch_size=7)
    predicted = oracle(third)
    assert (oracle.traces, oracle.predictions) == (2, 1)
    assert abs(oracle.exact(third) - predicted) <= LAW_TOLERANCE_BYTES and oracle.traces == 3
    # another topology (one stage more) starts its own law; a patch the pooling does not divide is always traced
    deeper = replace(SPEC, features_per_stage=(8, 16, 32, 32, 32), kernel_sizes=SPEC.kernel_sizes + ((3, 3, 3),),
                     strides=SPEC.strides + ((2, 2, 2),), patch_size=(32, 32, 32))
    assert law_key(deeper)[0] != law_key(SPEC)[0]
    assert law_key(replace(SPEC, patch_size=(15, 32, 32))) is None
    assert law_key(replace(SPEC, task="denoise")) is None  # attention grows with voxels squared
