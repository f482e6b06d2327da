"""One trace per topology: the step's storage timeline, split into what scales with batch x patch voxels and what
does not, predicts the peak at every size of that topology.

Why: the affine law (``budget.py``) needs two traced sizes per topology, and a trace costs the same dispatches at any
size. Here the step is traced once at a marker batch, a prime (``MARKER_BATCH``) that divides no weight's size: every
storage whose byte count the prime divides grew with the batch (activations, their gradients, loss maps, the
labels), every other one did not (weights, gradients, optimizer state, autocast copies of the weights). The
tracker records each storage's birth and death in dispatch order; the peak at batch x voxels = ``size`` is then the
largest sum of live bytes over the same timeline with each scaling storage resized by ``size / traced size`` and
rounded to the allocator's blocks, as a fresh trace at that size would count it. This holds where the affine law
does (``budget.law_key``: a segmentation step, patches divisible by the total pooling, so every stage's map is the
patch volume over its pooling); the prediction differs from a fresh trace only by the rounding of tensors that grow
with the batch alone (per-sample Dice sums: a block each), well inside ``budget.LAW_TOLERANCE_BYTES``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import replace

import numpy as np

from segforge.planning.memory import BLOCK_BYTES, LiveStorageTracker, StepSpec, fake_mode, run_step

MARKER_BATCH = 8191  # a prime (2^13 - 1) no weight shape of a U-Net has as a factor; any batch is free under fake tensors


class TimelineTracker(LiveStorageTracker):
    """``LiveStorageTracker`` that also keeps every storage's raw bytes, birth and death (dispatch-order events)."""

    def __init__(self):
        super().__init__()
        self.raw: list[int] = []
        self.born: list[int] = []
        self.died: list[int] = []
        self.index: dict[int, int] = {}
        self.events = 0
        self.window_start = 0

    def track(self, tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        super().track(tensor)
        self.index[key] = len(self.raw)
        self.raw.append(int(storage.nbytes()))
        self.born.append(self.events)
        self.died.append(-1)
        self.events += 1
        weakref.finalize(storage, self._died, key)

    def _died(self, key: int) -> None:
        position = self.index.pop(key, None)
        if position is not None:
            self.died[position] = self.events
            self.events += 1

    def reset_peak(self) -> None:
        super().reset_peak()
        self.window_start = self.events


class PeakTimeline:
    """The traced timeline of one topology; ``peak(size)``: the step's peak bytes at batch x voxels ``size``."""

    def __init__(self, tracker: TimelineTracker, traced_size: int, marker: int):
        self.raw = np.asarray(tracker.raw, dtype=np.int64)
        self.born = np.asarray(tracker.born, dtype=np.int64)
        died = np.asarray(tracker.died, dtype=np.int64)
        self.died = np.where(died < 0, tracker.events, died)  # alive at the end: never freed inside the step
        self.events, self.window_start = tracker.events, tracker.window_start
        self.scales = (self.raw % marker == 0) & (self.raw > 0)
        # a scaling storage's bytes per unit of batch at the traced patch: exact, and small enough that times any
        # batch x voxels it stays inside int64 (the marker batch's own bytes times a size would not)
        self.per_batch = np.where(self.scales, self.raw // marker, 0)
        self.traced_voxels = traced_size // marker

    @property
    def consistent(self) -> bool:
        """Whether what existed before the step (weights, optimizer state) was all classified as fixed in size."""
        before = (self.born < self.window_start) & (self.died > self.window_start)
        return not bool(np.any(self.scales & before))

    def peak(self, size: int) -> int:
        if int(self.per_batch.max(initial=0)) * size >= 2**62:
            per_batch = self.per_batch.astype(object)  # exact beyond int64 (Python integers), slower
            scaled = np.asarray(-(-per_batch * size // self.traced_voxels), dtype=np.int64)
        else:
            scaled = -(-self.per_batch * size // self.traced_voxels)  # ceil: a partial byte is one
        raw = np.where(self.scales, scaled, self.raw)
        blocks = np.where(raw > 0, BLOCK_BYTES * np.maximum(1, -(-raw // BLOCK_BYTES)), 0)
        delta = np.zeros(self.events + 1, dtype=np.int64)
        np.add.at(delta, self.born, blocks)
        np.add.at(delta, self.died, -blocks)
        live = np.cumsum(delta)
        # the peak is taken from the window's start (the steady state), as ``LiveStorageTracker.reset_peak`` does
        return int(live[max(self.window_start - 1, 0):].max())


def trace_timeline(spec: StepSpec, mode=None) -> PeakTimeline | None:
    """The timeline of ``spec``'s topology from one trace at the marker batch; None where a weight's size has the
    marker as a factor (the split would be ambiguous: the caller traces sizes one by one)."""
    marked = replace(spec, batch_size=MARKER_BATCH)
    tracker = TimelineTracker()
    with mode or fake_mode():
        run_step(marked, tracker)
    timeline = PeakTimeline(tracker, MARKER_BATCH * math.prod(spec.patch_size), MARKER_BATCH)
    return timeline if timeline.consistent else None
