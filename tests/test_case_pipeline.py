"""Overlapped prediction (predict.overlap): the same masks and reports as one case at a time, a bad case in any stage
skipped while its neighbours are written, --continue, and at most one case ahead and one behind."""

from __future__ import annotations

import errno
import json
import threading
import time

import numpy as np
import pytest

from segforge.inference.case_pipeline import CaseResult, CaseWork, run_cases
from segforge.inference.folder import predict_folder
from segforge.io.image import read_image
from segforge.io.storage import StorageError
from test_predict import Threshold, predictor, write_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _folder_with_a_bad_case(tmp_path):
    images = tmp_path / "in"
    write_cases(images, ["a", "b", "d", "e"])
    good = (images / "a_0000.nii.gz").read_bytes()
    (images / "c_0000.nii.gz").write_bytes(good[: len(good) // 3])  # truncated download, in the middle
    return images


@pytest.mark.parametrize("with_probabilities", [False, True])
def test_overlapped_prediction_writes_what_one_case_at_a_time_writes(tmp_path, with_probabilities):
    images = _folder_with_a_bad_case(tmp_path)
    model = predictor([Threshold()], mirror=False)
    runs = {}
    for overlap in (False, True):
        out = tmp_path / f"out_{overlap}"
        results = predict_folder(model, images, out, with_probabilities=with_probabilities, overlap=overlap)
        report = json.loads((out / "predict_report.json").read_text())
        for case in report["cases"]:
            case.pop("seconds")
            case["output"] = case["output"] and case["output"].replace(str(out), "OUT")
        runs[overlap] = results, report, out
    (sequential, report_s, out_s), (overlapped, report_o, out_o) = runs[False], runs[True]
    assert [(r.case_id, r.status) for r in overlapped] == [("a", "written"), ("b", "written"), ("c", "failed"),
                                                           ("d", "written"), ("e", "written")]
    assert report_o == report_s and "c_0000.nii.gz" in report_o["cases"][2]["error"]
    names = sorted(p.name for p in out_o.iterdir())
    assert names == sorted(p.name for p in out_s.iterdir()) and not any(n.startswith("c.") for n in names)
    for case in "abde":
        mask_s, geometry_s = read_image(out_s / f"{case}.nii.gz")
        mask_o, geometry_o = read_image(out_o / f"{case}.nii.gz")
        np.testing.assert_array_equal(mask_o, mask_s)
        assert mask_o.any() and geometry_o.same_grid(geometry_s) == []
        if with_probabilities:
            np.testing.assert_array_equal(np.load(out_o / f"{case}.npz")["probabilities"],
                                          np.load(out_s / f"{case}.npz")["probabilities"])


def test_a_failed_export_loses_only_its_own_case(tmp_path):
    images = tmp_path / "in"
    write_cases(images, ["a", "b", "c"])
    calls = []

    def postprocess(mask):  # the second case's export fails (after the third case was read and predicted)
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("postprocessing broke")
        return mask

    out = tmp_path / "out"
    results = predict_folder(predictor([Threshold()], mirror=False), images, out, postprocess=postprocess, overlap=True)
    assert [(r.case_id, r.status) for r in results] == [("a", "written"), ("b", "failed"), ("c", "written")]
    assert "postprocessing broke" in results[1].error
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz", "c.nii.gz"]
    assert not list(out.glob(".tmp-*"))
    again = predict_folder(predictor([Threshold()], mirror=False), images, out, resume=True, overlap=True)
    assert [(r.case_id, r.status) for r in again] == [("a", "skipped"), ("b", "written"), ("c", "skipped")]


class Recorder:
    """Fake stages that record what is alive: a case lives from the start of its load to the end of its export (or
    of the stage it failed in)."""

    def __init__(self, count: int, slow: float = 0.02, fail: dict | None = None, skipped=()):
        self.slow, self.fail = slow, fail or {}  # slow: the longest a network waits for the next case's load
        self.order = [k for k in range(count) if k not in skipped]  # the cases worked on, in order
        self.lock = threading.Lock()
        self.loaded: list[int] = []          # load started, in order
        self.networked: list[int] = []
        self.exported: list[int] = []        # export finished well
        self.ended: set[int] = set()         # export (or the failing stage) over
        self.live, self.max_live = set(), 0
        self.violations: list[str] = []
        self.load_started = {k: threading.Event() for k in range(count + 1)}
        self.overlapped: dict[int, bool] = {}

    def work(self, k: int, folder) -> CaseWork:
        path = folder / f"case{k}.out"
        return CaseWork(f"case{k}", [path], lambda: self.load(k), lambda s: self.network(k, s),
                        lambda s: self.export(k, s, path))

    def _end(self, k):
        with self.lock:
            self.ended.add(k)
            self.live.discard(k)

    def load(self, k):
        with self.lock:
            self.loaded.append(k)
            self.live.add(k)
            self.max_live = max(self.max_live, len(self.live))
        self.load_started[k].set()
        if self.fail.get(k) == "load":
            self._end(k)
            raise ValueError(f"cannot read case{k}")
        return k

    def network(self, k, state):
        assert state == k
        position = self.order.index(k)
        if position + 1 < len(self.order):  # the next case is read while this one is in the network (waited for)
            self.overlapped[k] = self.load_started[self.order[position + 1]].wait(self.slow)
        with self.lock:
            self.networked.append(k)
            ahead = [j for j in self.loaded if j > k]
            behind = [j for j in self.networked if j < k and j not in self.ended]
            if len(ahead) > 1:
                self.violations.append(f"cases {ahead} read while case{k} is in the network")
            if len(behind) > 1:
                self.violations.append(f"cases {behind} still being written while case{k} is in the network")
        if self.fail.get(k) == "network":
            self._end(k)
            raise ValueError(f"network failed on case{k}")
        return k

    def export(self, k, state, path):
        try:
            time.sleep(0.02)  # a slow writer: the network must wait for it rather than run ahead
            if self.fail.get(k) == "export":
                path.write_text("partial")
                raise ValueError(f"export failed on case{k}")
            if self.fail.get(k) == "disk":
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            path.write_text("done")
            with self.lock:
                self.exported.append(k)
            return path, []
        finally:
            self._end(k)


def test_at_most_one_case_ahead_and_one_behind_and_results_in_order(tmp_path):
    rec = Recorder(10, fail={3: "load", 5: "network", 6: "export"}, skipped={1})
    items = [rec.work(k, tmp_path) for k in range(10)]
    items[1] = CaseResult("case1", "skipped", tmp_path / "case1.out")  # --continue: never loaded
    reported = []
    results = run_cases(items, reported.append, overlap=True)
    assert rec.violations == []
    assert 1 not in rec.loaded and rec.loaded == sorted(rec.loaded)
    assert rec.max_live <= 3  # alive at once: the case in the network, the one being read, the one being written
    assert [r.case_id for r in reported] == [r.case_id for r in results] == [f"case{k}" for k in range(10)]
    assert [r.status for r in results] == ["written", "skipped", "written", "failed", "written", "failed", "failed",
                                           "written", "written", "written"]
    assert "cannot read case3" in results[3].error and "export failed on case6" in results[6].error
    assert not (tmp_path / "case6.out").exists()  # a failed export leaves none of its outputs
    assert rec.exported == [0, 2, 4, 7, 8, 9]


def test_the_next_case_is_read_while_the_network_runs_and_not_one_at_a_time(tmp_path):
    overlapped = Recorder(4, slow=10.0)  # each network waits (at most 10 s) for the next case's load to start
    run_cases([overlapped.work(k, tmp_path) for k in range(4)], lambda r: None, overlap=True)
    assert overlapped.violations == [] and overlapped.overlapped == {0: True, 1: True, 2: True}
    sequential = Recorder(2, slow=0.05)
    results = run_cases([sequential.work(k, tmp_path) for k in range(2)], lambda r: None, overlap=False)
    assert [r.status for r in results] == ["written", "written"]
    assert sequential.max_live == 1 and sequential.overlapped == {0: False}


def test_a_full_disk_stops_the_overlapped_run(tmp_path):
    rec = Recorder(6, fail={1: "disk"})
    with pytest.raises(StorageError, match="No space left"):
        run_cases([rec.work(k, tmp_path) for k in range(6)], lambda r: None, overlap=True)
    assert rec.exported == [0] and max(rec.networked) <= 2 and max(rec.loaded) <= 3
