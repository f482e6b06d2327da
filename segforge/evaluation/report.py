"""``segforge report PATH``: one self-contained static HTML page of an evaluated prediction folder (its
``summary.json``, written by ``segforge evaluate``) or of a fold folder (its ``validation/`` and training curves).

The page holds a per-case x per-class table of Dice, HD95 and NSD (worst cases first by mean foreground Dice,
sortable by a click on a header: a few lines of inline JavaScript), and per case image / prediction / reference
overlays on three orthogonal slices through the largest disagreement (``report_images``), PNGs embedded as base64:
no server, no network, no file beside it. Images are found where the predictions came from: the ``-i`` folder that
``predict`` recorded in its ``predict_report*.json``, the ``imagesTr``/``imagesTs`` beside a reference's
``labelsTr``/``labelsTs``, or (a fold folder) the dataset under the fold's ``paths.raw_root``. The page is written
atomically and marked as this command's (``<meta name="generator">``); any other file of its name is never replaced.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from segforge.errors import SegforgeError
from segforge.evaluation.metrics import nan_mean
from segforge.evaluation.report_images import case_views, colour, curves_from_logs
from segforge.evaluation.selection import model_identity
from segforge.io.artifacts import atomic_write_text, read_json
from segforge.io.model_folder import trained_folds
from segforge.io.image import file_ending

log = logging.getLogger("segforge")

GENERATOR = "segforge report"
MARKER = f'<meta name="generator" content="{GENERATOR}">'
REPORT_NAME = "report.html"
SHOWN_METRICS = (("dice", "Dice", 3), ("hd95", "HD95 mm", 2), ("nsd", "NSD", 3))


@dataclass
class Source:
    """What a report is of: the folder given, its summary and (a fold folder) the fold."""

    folder: Path
    summary_path: Path
    summary: dict
    fold_dir: Path | None = None
    notes: list = field(default_factory=list)

    @property
    def predictions(self) -> Path:
        return self.summary_path.parent


def find_source(path: Path) -> Source:
    """The prediction folder (``PATH/summary.json``) or fold folder (``PATH/validation/summary.json``) at ``path``;
    refused, naming the file and the command that writes it, when there is neither."""
    path = Path(path)
    if not path.is_dir():
        raise SegforgeError(f"{path}: not found or not a folder. Fix: give a prediction folder evaluated by "
                            "`segforge evaluate PRED REF`, or a fold folder (<results>/segment/<configuration>/fold_k)")
    for summary_path, fold_dir in ((path / "summary.json", None), (path / "validation" / "summary.json", path)):
        if summary_path.is_file():
            summary = read_json(summary_path, "summary")
            if "classes" not in summary or "by_sigma" in summary:  # e.g. a denoising run's PSNR validation
                raise SegforgeError(f"{summary_path}: is not a segmentation summary (no per-class scores); a report "
                                    "covers segmentation: a prediction folder evaluated by `segforge evaluate PRED "
                                    "REF`, or the fold folder of a task=segment run")
            return Source(path, summary_path, summary, fold_dir=fold_dir)
    folds = trained_folds(path, "validation/summary.json")  # the folds with a validation to report
    if folds:  # a model folder: its folds have reports
        raise SegforgeError(f"{path}: is a model folder; a report is of one fold's validation (or of a prediction "
                            f"folder). Fix: segforge report {folds[0]}")
    raise SegforgeError(f"{path / 'summary.json'}: not found (nor {path / 'validation' / 'summary.json'}, as in a fold "
                        f"folder): nothing to report. Fix: `segforge evaluate {path} REF_DIR` writes it (REF_DIR: the "
                        "reference masks); a fold folder gets validation/summary.json at the end of `segforge train`")


def check_replaceable(output: Path) -> None:
    """Never replace a file this command did not write (one without its generator mark)."""
    if not output.exists() and not output.is_symlink():
        return
    try:
        with open(output, "rb") as handle:
            ours = output.is_file() and not output.is_symlink() and MARKER.encode() in handle.read(4096)
    except OSError:
        ours = False
    if not ours:
        raise SegforgeError(f"{output}: exists and was not written by `segforge report`; it is never replaced. "
                            "Fix: move it away, or write the report elsewhere with -o OUT.html")


# ------------------------------------------------------------------------------------------- where files are
def _dataset_of_reference(reference: Path) -> tuple[Path, Path] | None:
    """(dataset folder, image folder) of a reference in a dataset's ``labelsTr``/``labelsTs``."""
    parent = reference.parent
    if parent.name.startswith("labels"):
        return parent.parent, parent.parent / ("images" + parent.name[len("labels"):])
    return None


def image_folders(source: Source, references: list[Path]) -> list[Path]:
    """Where the images of the cases may be, most specific first (module docstring)."""
    folders = []
    for record in sorted(source.predictions.glob("predict_report*.json")):
        try:
            recorded = json.loads(record.read_text()).get("input")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded:
            folders.append(Path(recorded) if file_ending(recorded) == "" else Path(recorded).parent)
    for reference in references:
        found = _dataset_of_reference(reference)
        if found is not None:
            folders.append(found[1])
    if source.fold_dir is not None and (source.fold_dir / "config.yaml").is_file():
        import yaml

        try:  # <results>/<dataset>/results/<task>/<configuration>/fold_k: the dataset under the run's raw_root
            raw_root = (yaml.safe_load((source.fold_dir / "config.yaml").read_text()).get("paths") or {}).get("raw_root")
        except (OSError, yaml.YAMLError, AttributeError):
            raw_root = None
        if raw_root and len(source.fold_dir.resolve().parents) > 3:
            folders.append(Path(raw_root) / source.fold_dir.resolve().parents[3].name / "imagesTr")
    return list(dict.fromkeys(folders))


def find_image(case_id: str, ending: str, folders: list[Path]) -> Path | None:
    """The case's first channel (``CASE_0000<ending>``, or ``CASE<ending>``) in the first folder holding it."""
    for folder in folders:
        for name in (f"{case_id}_0000{ending}", f"{case_id}{ending}"):
            if (folder / name).is_file():
                return folder / name
    return None


def evaluated_from(source: Source) -> Path | None:
    """The folder ``evaluate`` ran in, where the summary's paths are relative: the prediction folder less the
    recorded (relative) folder of its predictions, e.g. ``/data/run`` for ``pred/x.nii.gz`` in ``/data/run/pred``."""
    recorded = next((Path(c["prediction"]).parent for c in source.summary.get("cases", []) if c.get("prediction")), None)
    if recorded is None or recorded.is_absolute():
        return None
    folder = source.predictions.resolve()
    parts = [p for p in recorded.parts if p != "."]
    if parts and tuple(folder.parts[-len(parts):]) != tuple(parts):
        return None
    return Path(*folder.parts[: len(folder.parts) - len(parts)]) if parts else folder


def _located(recorded: str, beside: Path, ran_in: Path | None = None) -> Path | None:
    """A file the summary names, as recorded (relative: to where evaluate ran, ``ran_in``, or here) or, moved with
    its folder, in ``beside``."""
    path = Path(recorded)
    for candidate in (path, *([ran_in / path] if ran_in is not None and not path.is_absolute() else []),
                      beside / path.name):
        if candidate.is_file():
            return candidate
    return None


def dataset_labels(source: Source, references: list[Path]) -> dict:
    """The labels of dataset.json (the prediction folder's, the model folder's, or the reference dataset's), else
    the classes the summary scored."""
    candidates = [source.predictions / "dataset.json"]
    if source.fold_dir is not None:
        candidates.append(source.fold_dir.parent / "dataset.json")
    candidates += [found[0] / "dataset.json" for found in map(_dataset_of_reference, references[:1]) if found]
    for candidate in candidates:
        try:
            labels = json.loads(candidate.read_text()).get("labels")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(labels, dict):
            return labels
    return {"background": 0, **source.summary.get("classes", {})}


def legend_entries(labels: dict) -> list[tuple[int, str]]:
    """(label value, name) of every drawn value: a class, or for region-based labels each value named by the
    regions that hold it."""
    if any(isinstance(v, list) for v in labels.values()):
        values = sorted({int(x) for v in labels.values() if isinstance(v, list) for x in v if int(x) > 0})
        return [(v, ", ".join(k for k, r in labels.items() if isinstance(r, list) and v in r)) for v in values]
    return sorted((int(v), k) for k, v in labels.items() if isinstance(v, int) and v > 0 and k != "ignore")


# ------------------------------------------------------------------------------------------------ the page
def case_order(cases: list[dict]) -> list[dict]:
    """Worst first by mean foreground Dice; cases without any value (no class in either mask) last."""
    def key(case):
        mean = case_mean_dice(case)
        return (math.isnan(mean), mean)
    return sorted(cases, key=key)


def case_mean_dice(case: dict) -> float:
    return nan_mean(list(case.get("dice", {}).values()))


def _cell(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td data-v="" class="nan">&ndash;</td>'
    return f'<td data-v="{float(value)!r}">{float(value):.{digits}f}</td>'


def metrics_table(summary: dict, cases: list[dict]) -> str:
    classes = list(summary.get("classes", {}))
    metrics = [m for m in SHOWN_METRICS if cases and m[0] in cases[0]]
    head = ['<th data-type="text">case</th>', "<th>mean Dice</th>"]
    head += [f"<th>{html.escape(name)}<br>{label}</th>" for name in classes for _, label, _ in metrics]
    rows = []
    for case in cases:
        cells = [f'<td data-v="{html.escape(case["case"])}"><a href="#case-{html.escape(case["case"])}">'
                 f'{html.escape(case["case"])}</a></td>', _cell(case_mean_dice(case), 3)]
        cells += [_cell(case[m].get(name), digits) for name in classes for m, _, digits in metrics]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    mean = summary.get("mean", {})
    foot = ["<td>mean</td>", _cell(summary.get("foreground_mean_dice"), 3)]
    foot += [_cell(mean.get(m, {}).get(name), digits) for name in classes for m, _, digits in metrics]
    return (f'<table class="metrics" id="metrics"><thead><tr>{"".join(head)}</tr></thead>\n<tbody>\n'
            + "\n".join(rows) + f'\n</tbody>\n<tfoot><tr>{"".join(foot)}</tr></tfoot></table>')


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def case_section(case: dict, source: Source, folders: list[Path], ignore: int | None, max_px: int,
                 ran_in: Path | None) -> tuple[str, bool]:
    """The overlays of one case, and whether its image was drawn (``ran_in``: ``evaluated_from(source)``)."""
    name = case["case"]
    parts = [f'<section class="case" id="case-{html.escape(name)}"><h3>{html.escape(name)} '
             f'<small>mean Dice {case_mean_dice(case):.3f}</small></h3>']
    prediction = _located(case.get("prediction", ""), source.predictions, ran_in)
    reference = _located(case["reference"], source.predictions, ran_in) if case.get("reference") else None
    if prediction is None or reference is None:
        missing = case.get("prediction") if prediction is None else case.get("reference")
        parts.append(f'<p class="note">{html.escape(str(missing))}: not found; no overlays.</p></section>')
        return "".join(parts), False
    image = find_image(name, file_ending(reference) or file_ending(prediction), folders)
    try:
        views, note = case_views(prediction, reference, image, ignore, max_px)
    except (SegforgeError, OSError, ValueError) as exc:
        parts.append(f'<p class="note">cannot draw this case: {html.escape(str(exc))}</p></section>')
        return "".join(parts), False
    if note:
        parts.append(f'<p class="note">{html.escape(note)}: prediction vs reference only.</p>')
    else:
        parts.append(f'<p class="source">image: {html.escape(str(image))}</p>')
    for view in views:
        axis_letter = "zyx"[view.axis]
        where = (f"{view.disagreeing} voxels disagree on this slice" if view.disagreeing else
                 "prediction and reference agree: through the centre of the foreground")
        panels = "".join(f'<figure>{_img(data, f"{name} {view.name} {kind}")}<figcaption>{kind}</figcaption></figure>'
                         for kind, data in view.panels.items())
        parts.append(f'<div class="view"><div class="caption">{view.name}, {axis_letter} = {view.index}: {where}</div>'
                     f'<div class="panels">{panels}</div></div>')
    parts.append("</section>")
    return "".join(parts), note is None


def legend(labels: dict) -> str:
    items = "".join(f'<span class="swatch" style="background: rgb{colour(v)}"></span>{html.escape(name)} ({v}) '
                    for v, name in legend_entries(labels))
    return f'<p class="legend">{items}</p>' if items else ""


def fold_section(fold_dir: Path) -> str:
    """The fold's training summary and curves (``progress.png``, else drawn from ``logs/``)."""
    parts = ["<h2>Training</h2>"]
    try:
        training = read_json(fold_dir / "training_summary.json")
    except SegforgeError:
        training = None
    if isinstance(training, dict):
        facts = {k: v for k, v in training.items() if isinstance(v, (int, float, str)) and
                 k not in ("kind", "schema_version")}
        parts.append('<table class="facts">' + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                                                      for k, v in facts.items()) + "</table>")
    progress = fold_dir / "progress.png"
    data = progress.read_bytes() if progress.is_file() else b""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        parts.append(f'<figure class="curves">{_img(data, "training curves")}<figcaption>progress.png</figcaption></figure>')
    else:
        drawn = curves_from_logs(fold_dir / "logs")
        if drawn:
            parts.append(f'<figure class="curves">{_img(drawn, "training curves")}<figcaption>from '
                         f'{html.escape(str(fold_dir / "logs"))}/version_*/metrics.csv</figcaption></figure>')
        else:
            parts.append(f'<p class="note">no training curves: neither {html.escape(str(progress))} nor CSV logs '
                         f'under {html.escape(str(fold_dir / "logs"))}.</p>')
    return "\n".join(parts)


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table.metrics{border-collapse:collapse;font-size:13px}
table.metrics th,table.metrics td{border:1px solid #ccc;padding:3px 6px;text-align:right}
table.metrics th{cursor:pointer;background:#eee;position:sticky;top:0}table.metrics td:first-child{text-align:left}
td.nan{color:#999}tfoot td{font-weight:bold}.note{color:#a40}.source{color:#666;font-size:12px}
.panels{display:flex;gap:6px;flex-wrap:wrap}figure{margin:0}figcaption{font-size:12px;color:#555}
.view{margin:6px 0}.caption{font-size:13px}.swatch{display:inline-block;width:1em;height:1em;margin:0 4px 0 12px;
vertical-align:middle}section.case{border-top:1px solid #ddd;margin-top:1em}img{image-rendering:pixelated}
table.facts{font-size:13px}table.facts th{text-align:left;padding-right:1em}"""

# A click on a header sorts by that column (again: the other way); empty cells (no value) stay last.
SORT_SCRIPT = """document.querySelectorAll('table.metrics thead th').forEach(function (th, column) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], text = th.dataset.type === 'text';
    var up = th.dataset.order !== 'up';
    th.parentNode.querySelectorAll('th').forEach(function (h) { delete h.dataset.order; });
    th.dataset.order = up ? 'up' : 'down';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[column].dataset.v, y = b.cells[column].dataset.v;
      if (x === '' || y === '') return (x === '') - (y === '');
      var d = text ? x.localeCompare(y) : parseFloat(x) - parseFloat(y);
      return up ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});"""


def trained_from(source: Source) -> str:
    """``; model: 3d_fullres of plans default`` for a fold folder whose model folder has its plans.json, else ``""``."""
    if source.fold_dir is None or not (source.fold_dir.parent / "plans.json").is_file():
        return ""
    try:
        identity = model_identity(source.fold_dir.parent)
    except SegforgeError:  # an unreadable plans.json: the report goes on without the line
        return ""
    return f"; model: {identity['configuration']} of plans {identity['plans']}"


def render(source: Source, max_cases: int | None = 50, max_px: int = 512) -> str:
    summary = source.summary
    cases = case_order(summary.get("cases", []))
    ran_in = evaluated_from(source)
    references = [Path(c["reference"]) if ran_in is None or Path(c["reference"]).is_absolute()
                  else ran_in / c["reference"] for c in cases if c.get("reference")]
    labels = dataset_labels(source, references)
    ignore = labels.get("ignore") if isinstance(labels.get("ignore"), int) else None
    folders = image_folders(source, references)
    title = f"segforge report: {source.folder.resolve().name}"
    shown = cases if max_cases is None else cases[:max_cases]
    sections, with_image = [], 0
    for i, case in enumerate(shown, 1):
        log.info("report %d/%d: %s", i, len(shown), case["case"])
        text, drawn = case_section(case, source, folders, ignore, max_px, ran_in)
        sections.append(text)
        with_image += drawn
    notes = []
    if summary.get("missing_predictions"):
        notes.append(f"{len(summary['missing_predictions'])} reference(s) without a prediction: "
                     + html.escape(", ".join(summary["missing_predictions"][:20])))
    if shown and not with_image:
        where = ", ".join(str(f) for f in folders) or "no folder recorded"
        notes.append(f"The images were not found (looked in: {html.escape(where)}): prediction vs reference only.")
    if len(shown) < len(cases):
        notes.append(f"Overlays of the {len(shown)} worst of {len(cases)} cases (max_cases={max_cases}; "
                     "max_cases=null draws all); the table lists every case.")
    fg = summary.get("foreground_mean_dice")
    head = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{MARKER}\n<title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f'<p class="source">{"fold folder" if source.fold_dir else "predictions"}: '
            f"{html.escape(str(source.folder.resolve()))}; summary: {html.escape(str(source.summary_path))}"
            f"{html.escape(trained_from(source))}</p>\n"
            f"<p>{summary.get('num_cases', len(cases))} case(s); mean foreground Dice "
            f"{fg if fg is None else f'{fg:.4f}'}; HD95 in mm; NSD at {summary.get('nsd_tolerance_mm', 1.0)} mm. "
            "Worst cases first (by mean foreground Dice); click a header to sort.</p>\n")
    body = [head, *(f'<p class="note">{n}</p>' for n in notes)]
    if source.fold_dir is not None:
        body.append(fold_section(source.fold_dir))
    body += ["<h2>Metrics per case and class</h2>", metrics_table(summary, cases), "<h2>Cases</h2>", legend(labels),
             *sections, f"<script>\n{SORT_SCRIPT}\n</script>\n</body></html>\n"]
    return "\n".join(body)


def write_report(path: Path, output: Path | None = None, max_cases: int | None = 50, max_px: int = 512) -> Path:
    """Write the report of the prediction or fold folder ``path`` to ``output`` (default ``PATH/report.html``)."""
    source = find_source(Path(path))
    output = Path(output) if output is not None else Path(path) / REPORT_NAME
    check_replaceable(output)
    text = render(source, max_cases, max_px)
    check_replaceable(output)  # one that appeared meanwhile is not ours either
    atomic_write_text(output, text)
    return output

