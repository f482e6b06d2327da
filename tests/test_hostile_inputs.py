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
