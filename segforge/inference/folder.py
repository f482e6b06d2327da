"""Predict a folder of cases: find them, take this process's part (``--part k/n``), skip finished outputs
(``--continue``), predict the cases (the next one read and the previous one written while the network runs:
``case_pipeline``) with a bad case reported and skipped, and report.

Each output is written atomically (temporary name, then rename), so an output file that exists is complete; that
is what makes ``--continue`` safe after a crash. Probabilities (``--save-probabilities``) go beside each mask as
``CASE.npz`` (float16 ``probabilities``, ``(channels, z, y, x)`` on the input's grid) with ``CASE.probabilities.json``
naming the channels and the geometry: never ``CASE.json``, which a case named ``dataset`` or ``predict_report`` would
share with the folder's own files (their names have no dot before ``.json``, a case's files always do).
"""

from __future__ import annotations

import io
import logging
import re
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from segforge.errors import SegforgeError
from segforge.inference.case_pipeline import CaseResult, CaseWork, failed_case, run_cases
from segforge.inference.case_checks import check_input
from segforge.inference.predictor import Predictor
from segforge.io.artifacts import atomic_write_bytes, write_json
from segforge.io.dataset import group_channel_files
from segforge.io.image import SUPPORTED_ENDINGS, file_ending, read_case, write_image
from segforge.io.storage import check_writable

log = logging.getLogger("segforge")


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


def find_cases(input_path: Path, ending: str) -> tuple[dict[str, dict[int, Path]], list[str]]:
    """``{case: {channel: file}}`` of a folder (``CASE_XXXX<ending>``) or of one image, and what was passed over."""
    if input_path.is_file():
        name = input_path.name
        stem = name[: -len(ending)] if name.endswith(ending) else name[: -len(file_ending(name))] if file_ending(name) else input_path.stem
        return {re.sub(r"_\d{4}$", "", stem): {0: input_path}}, []
    groups, problems = group_channel_files(input_path, ending)
    return groups, [str(p) for p in problems]


def channel_files(case_id: str, files: dict[int, Path], channel_names: dict, folder: Path, ending: str) -> list[Path]:
    """The case's files in the model's channel order; a missing or an extra channel is refused, naming the file."""
    names = {int(k): v for k, v in channel_names.items()}
    expected = len(names)
    takes = f"the model takes {expected} channel(s), one file each: " + ", ".join(
        f"{case_id}_{c:04d}{ending} ({names[c]})" for c in sorted(names))
    problems = [f"{folder / f'{case_id}_{c:04d}{ending}'}: is missing: channel {c} ({names[c]}) of case {case_id}; "
                f"{takes}. Fix: add the file (or move the case's other files out of the input folder)"
                for c in sorted(names) if c not in files]
    problems += [f"{files[c]}: channel {c} is not a channel of the model; {takes}. Fix: remove the file from the "
                 "input folder (or predict with a model trained on this channel)"
                 for c in sorted(files) if c not in names]
    if problems:
        raise SegforgeError("; ".join(problems))
    return [files[c] for c in sorted(names)]


def remove_stale_temporaries(output_dir: Path, case_ids: list[str], ending: str) -> None:
    """Temporary files of these cases (this process's part: no other job writes them) left by a killed run."""
    names = "|".join(re.escape(c) for c in case_ids)
    pattern = re.compile(rf"\.tmp-(\d+-({names}){re.escape(ending)}|({names})\.(npz|probabilities\.json)-\w+)")
    for path in output_dir.glob(".tmp-*"):
        if pattern.fullmatch(path.name):
            path.unlink(missing_ok=True)


def save_probabilities(target: Path, probabilities, names: list[str], geometry) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=probabilities.numpy().astype(np.float16))
    atomic_write_bytes(target.with_name(target.name + ".npz"), buffer.getvalue())
    write_json(target.with_name(target.name + ".probabilities.json"),
               {"channels": names, "geometry": geometry.to_json(), "shape": list(probabilities.shape[1:])})


def run_case(case_id: str, outputs: list[Path], work, results: list[CaseResult]) -> None:
    """Run ``work()`` (returns ``(main output, warnings)``) for one case that writes ``outputs``, appending its
    ``CaseResult``. A case that fails (unreadable file, wrong channels, NaN, out of memory...) is logged with its
    reason and skipped, leaving none of the outputs this attempt created (each file is atomic, the set is not; a
    complete file from before is never removed); a storage failure (full disk, lost folder) would fail every case
    alike, so it stops the run, saying why."""
    start = time.perf_counter()
    before = {p for p in outputs if p.exists()}
    try:
        output, warnings = work()
        results.append(CaseResult(case_id, "written", output, seconds=time.perf_counter() - start, warnings=warnings))
    except Exception as exc:  # one bad case must not stop the others; the reason is reported
        results.append(failed_case(case_id, outputs, before, exc, time.perf_counter() - start))
        log.error("case %s failed: %s", case_id, results[-1].error)


def load_case(predictor, case_id: str, channels: dict[int, Path], folder: Path, streamed: bool) -> tuple:
    """Read and check one case of a folder; preprocessed too where the network stage takes it so (one predictor,
    streamed masks): all that a background loader can do before the network."""
    ending = predictor.dataset_json.get("file_ending", ".nii.gz")
    files = channel_files(case_id, channels, predictor.plans["channel_names"], folder, ending)
    # read and checked here (not by the predictor) so that the warnings reach the report
    image, geometry = read_case(files)
    image, warnings = check_input(predictor, image, geometry, files, copy=False)
    for warning in warnings:
        log.warning("case %s: %s", case_id, warning)
    if streamed and isinstance(predictor, Predictor):
        return predictor.prepare(image, geometry, overwrite_input=True), None, warnings
    return image, geometry, warnings


def network_case(predictor, with_probabilities: bool, loaded: tuple) -> tuple:
    """The label map (and probabilities) of a loaded case, on its input grid."""
    image, geometry, warnings = loaded
    if with_probabilities:
        probabilities, geometry = predictor.probabilities(image, geometry)
        mask = predictor.labels(probabilities)
        # stored as float16 anyway: half the memory while it waits for the exporter (overlap holds it beside the next)
        probabilities = probabilities.to(torch.float16)
    else:  # streamed: never classes x volume in memory
        probabilities = None
        mask, geometry = predictor.predict(image, geometry, overwrite_input=True)
    return mask, probabilities, geometry, warnings


def export_case(target: Path, case_id: str, class_names: list[str], postprocess, predicted: tuple) -> tuple[Path, list[str]]:
    """Write a predicted case: its mask to ``target`` (postprocessed), its probabilities beside it if any."""
    mask, probabilities, geometry, warnings = predicted
    if postprocess is not None:
        mask = postprocess(mask)
    if probabilities is not None:
        save_probabilities(target.with_name(case_id), probabilities, class_names, geometry)
    write_image(target, mask, geometry)
    return target, warnings


def predict_folder(predictor, input_path: Path, output_dir: Path, *, resume: bool = False, part: str | None = None,
                   with_probabilities: bool = False, postprocess=None, overlap: bool = True) -> list[CaseResult]:
    """Predict the cases of ``input_path`` (this process's part) into ``output_dir``; one result per case.

    A case that fails is reported and skipped, leaving none of its outputs (``run_case``); the others go on.
    ``postprocess``: a function applied to each label map before it is written. ``overlap``: read the next case and
    write the previous one while the network runs (``case_pipeline``), else one case at a time.
    """
    ending = predictor.dataset_json.get("file_ending", ".nii.gz")
    if ending not in SUPPORTED_ENDINGS:  # it names every output file: nothing else may come from the model folder
        raise SegforgeError(f"the model's dataset.json has file_ending {ending!r}; expected one of "
                            f"{', '.join(SUPPORTED_ENDINGS)}. Fix: correct dataset.json in the model folder")
    cases, notes = find_cases(Path(input_path), ending)
    for note in notes:
        log.warning("passed over: %s", note)
    if not cases:
        raise SegforgeError(f"{input_path}: no images ending in {ending} found. Fix: name them CASE_0000{ending}")
    chosen = take_part(list(cases), parse_part(part))
    folder = Path(input_path) if Path(input_path).is_dir() else Path(input_path).parent
    # writable now; the space a mask needs is not known before it is predicted (a full disk is caught at the write)
    check_writable(output_dir, what=f"the masks of {len(chosen)} case(s)", setting="-o OUT")
    remove_stale_temporaries(output_dir, chosen, ending)
    items: list[CaseWork | CaseResult] = []
    for case_id in chosen:
        target = output_dir / f"{case_id}{ending}"
        if resume and target.is_file() and (not with_probabilities or (output_dir / f"{case_id}.npz").is_file()):
            items.append(CaseResult(case_id, "skipped", target))  # before any loading: a done case costs nothing
        else:
            outputs = [target, *([output_dir / f"{case_id}.npz", output_dir / f"{case_id}.probabilities.json"] if with_probabilities else [])]
            items.append(CaseWork(case_id, outputs,
                                  partial(load_case, predictor, case_id, cases[case_id], folder, not with_probabilities),
                                  partial(network_case, predictor, with_probabilities),
                                  partial(export_case, target, case_id, predictor.class_names, postprocess)))
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(chosen), desc="predict", unit="case")
    finished = []

    def progress(result: CaseResult) -> None:
        finished.append(result)
        if bar is not None:
            bar.update()
        else:
            log.info("  [%d/%d] %s: %s", len(finished), len(chosen), result.case_id, result.status)

    results = run_cases(items, progress, overlap)
    if bar is not None:
        bar.close()
    write_json(output_dir / (f"predict_report_part{part.replace('/', 'of')}.json" if parse_part(part) else "predict_report.json"),
               {"cases": [{"case": r.case_id, "status": r.status, "output": str(r.output) if r.output else None,
                           "error": r.error, "warnings": r.warnings, "seconds": round(r.seconds, 3)} for r in results],
                "passed_over": notes, "input": str(Path(input_path).resolve())})  # where `segforge report` finds the images
    return results
