"""Predict a folder of cases: find them, take this process's part (``--part k/n``), skip finished outputs
(``--continue``), predict one case at a time with a bad case reported and skipped, and report.

Each output is written atomically (temporary name, then rename), so an output file that exists is complete; that
is what makes ``--continue`` safe after a crash. Probabilities (``--save-probabilities``) go beside each mask as
``CASE.npz`` (float16 ``probabilities``, ``(channels, z, y, x)`` on the input's grid) with ``CASE.json`` naming the
channels and the geometry.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segforge.errors import SegforgeError
from segforge.io.artifacts import atomic_write_bytes, write_json
from segforge.io.dataset import group_channel_files
from segforge.io.image import file_ending, write_image

log = logging.getLogger("segforge")


@dataclass
class CaseResult:
    case_id: str
    status: str                # written | skipped | failed
    output: Path | None = None
    error: str | None = None
    seconds: float = 0.0


def parse_part(part: str | None) -> tuple[int, int] | None:
    """``"k/n"`` (1-based) -> (k, n); None for the whole folder."""
    if part in (None, "", "1/1"):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(part))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise SegforgeError(f"--part {part!r}: give k/n with 1 <= k <= n, e.g. --part 2/4 "
                            "(or $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(match[1]), int(match[2])


def take_part(case_ids: list[str], part: tuple[int, int] | None) -> list[str]:
    """Every n-th case of the sorted list from the k-th on: the parts are disjoint and together cover all."""
    ordered = sorted(case_ids)
    return ordered if part is None else ordered[part[0] - 1::part[1]]


def find_cases(input_path: Path, ending: str) -> tuple[dict[str, list[Path]], list[str]]:
    """``{case: channel files}`` of a folder (``CASE_XXXX<ending>``) or of one image, and what was passed over."""
    if input_path.is_file():
        name = input_path.name
        stem = name[: -len(ending)] if name.endswith(ending) else name[: -len(file_ending(name))] if file_ending(name) else input_path.stem
        return {re.sub(r"_\d{4}$", "", stem): [input_path]}, []
    groups, problems = group_channel_files(input_path, ending)
    cases = {case: [files[c] for c in sorted(files)] for case, files in groups.items()}
    gaps = {case: sorted(files) for case, files in groups.items() if sorted(files) != list(range(len(files)))}
    notes = [str(p) for p in problems] + [f"{case}: channels {found} are not 0..{len(found) - 1}" for case, found in gaps.items()]
    return cases, notes


def save_probabilities(target: Path, probabilities, names: list[str], geometry) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=probabilities.numpy().astype(np.float16))
    atomic_write_bytes(target.with_name(target.name + ".npz"), buffer.getvalue())
    write_json(target.with_name(target.name + ".json"), {"channels": names, "geometry": geometry.to_json(),
                                              "shape": list(probabilities.shape[1:])})


def predict_folder(predictor, input_path: Path, output_dir: Path, *, resume: bool = False, part: str | None = None,
                   with_probabilities: bool = False, postprocess=None) -> list[CaseResult]:
    """Predict the cases of ``input_path`` (this process's part) into ``output_dir``; one result per case.

    A case that fails (unreadable file, wrong channels, out of memory...) is logged with its reason and skipped;
    the others go on. ``postprocess``: a function applied to each label map before it is written.
    """
    ending = predictor.dataset_json.get("file_ending", ".nii.gz")
    cases, notes = find_cases(Path(input_path), ending)
    for note in notes:
        log.warning("passed over: %s", note)
    if not cases:
        raise SegforgeError(f"{input_path}: no images ending in {ending} found. Fix: name them CASE_0000{ending}")
    chosen = take_part(list(cases), parse_part(part))
    output_dir.mkdir(parents=True, exist_ok=True)
    expected = len(predictor.plans["channel_names"])
    results: list[CaseResult] = []
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(chosen), desc="predict", unit="case")
    for i, case_id in enumerate(chosen, 1):
        target = output_dir / f"{case_id}{ending}"
        start = time.perf_counter()
        if resume and target.is_file() and (not with_probabilities or (output_dir / f"{case_id}.npz").is_file()):
            results.append(CaseResult(case_id, "skipped", target))
        else:
            files = cases[case_id]
            try:
                if len(files) != expected:
                    raise SegforgeError(f"{files[0].parent / case_id}_XXXX{ending}: {len(files)} channel file(s), the model "
                                        f"takes {expected}. Fix: provide {case_id}_0000{ending} .. {case_id}_{expected - 1:04d}{ending}")
                if with_probabilities:
                    probabilities, geometry = predictor.probabilities(files)
                    mask = predictor.labels(probabilities)
                else:  # streamed: never classes x volume in memory
                    mask, geometry = predictor.predict(files)
                if postprocess is not None:
                    mask = postprocess(mask)
                if with_probabilities:
                    save_probabilities(output_dir / case_id, probabilities, predictor.class_names, geometry)
                write_image(target, mask, geometry)
                results.append(CaseResult(case_id, "written", target, seconds=time.perf_counter() - start))
            except Exception as exc:  # one bad case must not stop the others; the reason is reported
                log.debug("case %s failed", case_id, exc_info=True)
                reason = str(exc) if isinstance(exc, SegforgeError) else f"{type(exc).__name__}: {exc}"
                results.append(CaseResult(case_id, "failed", error=reason, seconds=time.perf_counter() - start))
                log.error("case %s failed: %s", case_id, reason)
        if bar is not None:
            bar.update()
        else:
            log.info("  [%d/%d] %s: %s", i, len(chosen), case_id, results[-1].status)
    if bar is not None:
        bar.close()
    write_json(output_dir / (f"predict_report_part{part.replace('/', 'of')}.json" if parse_part(part) else "predict_report.json"),
               {"cases": [{"case": r.case_id, "status": r.status, "output": str(r.output) if r.output else None,
                           "error": r.error, "seconds": round(r.seconds, 3)} for r in results],
                "passed_over": notes})
    return results
