"""``segforge report``: the page of an evaluated prediction folder and of a fold folder, its table (worst first),
its slices (through the largest disagreement), its refusals, and the page as a real browser renders it."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_dataset
from segforge.cli.main import main
from segforge.errors import SegforgeError
from segforge.evaluation.metrics import evaluate_folders
from segforge.evaluation.report import MARKER, write_report
from segforge.evaluation.report_images import case_views, disagreement_slices
from segforge.io.image import Geometry, read_image, write_image

LABELS = {"background": 0, "ball": 1, "box": 2}


def perturbed_predictions(labels_dir: Path, pred_dir: Path, input_dir: Path | None = None) -> Path:
    """Each case's reference with a different share of its voxels cut away (case i: the first 3*i rows of y)."""
    pred_dir.mkdir(parents=True)
    for i, path in enumerate(sorted(labels_dir.iterdir())):
        mask, geometry = read_image(path)
        mask = mask.copy()
        mask[:, : 3 * i] = 0
        write_image(pred_dir / path.name, mask, geometry)
    if input_dir is not None:  # what `segforge predict` records
        (pred_dir / "predict_report.json").write_text(json.dumps({"cases": [], "input": str(input_dir)}))
    return pred_dir


@pytest.fixture
def evaluated(tmp_path):
    dataset = write_dataset(tmp_path / "Dataset001_Tiny", num_train=4, num_test=0)
    pred = perturbed_predictions(dataset / "labelsTr", tmp_path / "pred", dataset / "imagesTr")
    summary = evaluate_folders(pred, dataset / "labelsTr", LABELS, pred / "summary.json")
    return {"dataset": dataset, "pred": pred, "summary": summary}


def table_cases(page: str) -> list[str]:
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return re.findall(r'<a href="#case-([^"]+)">', body)


def images_of(page: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
            for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_table_lists_every_case_worst_first_with_dice_hd95_nsd(evaluated):
    page = write_report(evaluated["pred"]).read_text()
    assert MARKER in page
    means = {c["case"]: np.nanmean([v for v in c["dice"].values()]) for c in evaluated["summary"]["cases"]}
    expected = sorted(means, key=lambda case: means[case])
    assert table_cases(page) == expected and len(set(means.values())) > 2  # the cuts made the cases differ
    assert re.findall(r'<section class="case" id="case-([^"]+)"', page) == expected  # the overlays in that order too
    header = page.split("<thead>", 1)[1].split("</thead>", 1)[0]
    for name in ("ball", "box"):
        for metric in ("Dice", "HD95", "NSD"):
            assert f"{name}<br>{metric}" in header
    worst = next(c for c in evaluated["summary"]["cases"] if c["case"] == expected[0])
    row = page.split("<tbody>", 1)[1].split("</tr>", 1)[0]
    assert f'data-v="{worst["dice"]["ball"]!r}"' in row and f'data-v="{worst["hd95"]["ball"]!r}"' in row
    assert "<script>" in page and "http" not in page.replace(str(evaluated["pred"]), "")  # nothing fetched
    assert f"image: {evaluated['dataset'] / 'imagesTr'}" in page  # the -i folder predict recorded


def test_slices_go_through_the_largest_disagreement(tmp_path):
    reference = np.zeros((40, 20, 30), np.uint8)
    reference[10:30, 5:15, 5:25] = 1
    prediction = reference.copy()
    prediction[23, 12, 5:26] = 2      # 21 voxels on z=23, y=12
    prediction[23, 0:10, 17] = 2      # 10 more on z=23 and x=17 (5 of them inside the reference's class 1)
    prediction[2, 12, 5:8] = 1        # 3 elsewhere
    assert disagreement_slices(prediction, reference)[0] == [23, 12, 17]  # z crosses the chunks of 16 slices
    # where they agree: the centre of the foreground
    assert disagreement_slices(reference, reference) == ([20, 10, 15], [0, 0, 0])
    # the ignore label's voxels are no disagreement
    ignored = reference.copy()
    ignored[5, 2, 2:12] = 9
    assert disagreement_slices(reference, ignored, ignore=9)[1] == [0, 0, 0]

    geometry = Geometry(spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = reference.astype(np.float32) * 100 + np.random.default_rng(0).normal(0, 5, reference.shape)
    for name, array in (("pred.nii.gz", prediction), ("ref.nii.gz", reference), ("img.nii.gz", image)):
        write_image(tmp_path / name, array, geometry)
    views, note = case_views(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", tmp_path / "img.nii.gz")
    assert note is None and [(v.name, v.index, v.disagreeing) for v in views] == \
        [("axial", 23, 31), ("coronal", 12, 24), ("sagittal", 17, 11)]
    axial = {k: np.asarray(Image.open(io.BytesIO(v))) for k, v in views[0].panels.items()}
    assert axial["image"].ndim == 2 and axial["prediction"].shape[:2] == axial["image"].shape
    assert not np.array_equal(axial["prediction"], axial["reference"])
    # the sagittal slice (z, y) keeps world proportions: 40 slices of 2 mm by 20 rows of 1 mm -> 4:1
    rows, cols = np.asarray(Image.open(io.BytesIO(views[2].panels["reference"]))).shape[:2]
    assert rows == 4 * cols


def test_a_2d_case_has_one_view(tmp_path):
    reference = np.zeros((1, 40, 50), np.uint8)
    reference[0, 10:30, 10:40] = 1
    prediction = reference.copy()
    prediction[0, 10:30, 30:40] = 2
    geometry = Geometry(spacing=(999.0, 1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), ndim=2)
    for name, array in (("pred.png", prediction), ("ref.png", reference), ("img.png", reference * 120)):
        write_image(tmp_path / name, array, geometry)
    views, note = case_views(tmp_path / "pred.png", tmp_path / "ref.png", tmp_path / "img.png")
    assert note is None and [(v.name, v.index, v.disagreeing) for v in views] == [("axial", 0, 200)]
    assert np.asarray(Image.open(io.BytesIO(views[0].panels["image"]))).shape == (128, 160)  # enlarged to 160 px


def test_large_volume_keeps_the_page_to_slices_of_bounded_size(tmp_path):
    reference = np.zeros((30, 700, 650), np.uint8)
    reference[10:20, 100:600, 100:500] = 1
    geometry = Geometry(spacing=(5.0, 0.7, 0.7), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(tmp_path / "ref.nii.gz", reference, geometry)
    reference[15, 300:400, 200:300] = 0
    write_image(tmp_path / "pred.nii.gz", reference, geometry)
    views, _ = case_views(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", None)
    assert [v.index for v in views][0] == 15
    for view in views:
        shape = np.asarray(Image.open(io.BytesIO(view.panels["reference"]))).shape
        assert max(shape[:2]) <= 512 and set(view.panels) == {"prediction", "reference"}


def test_without_images_it_shows_prediction_vs_reference_and_says_so(tmp_path):
    dataset = write_dataset(tmp_path / "Dataset001_Tiny", num_train=2, num_test=0)
    refs = tmp_path / "refs"
    shutil.copytree(dataset / "labelsTr", refs)  # not in a dataset's labelsTr: no imagesTr beside it
    pred = perturbed_predictions(refs, tmp_path / "pred", tmp_path / "gone")
    evaluate_folders(pred, refs, LABELS, pred / "summary.json")
    page = write_report(pred).read_text()
    assert "The images were not found" in page and "no image found: prediction vs reference only" in page
    assert len(images_of(page)) == 2 * 3 * 2  # per case and view: prediction and reference


def test_relative_paths_in_the_summary_are_found_from_another_folder(tmp_path, monkeypatch):
    dataset = write_dataset(tmp_path / "Dataset001_Tiny", num_train=2, num_test=0)
    perturbed_predictions(dataset / "labelsTr", tmp_path / "runs" / "pred")
    assert main(["evaluate", "runs/pred", "Dataset001_Tiny/labelsTr", "surface_metrics=false"]) == 0  # in tmp_path
    assert json.loads((tmp_path / "runs" / "pred" / "summary.json").read_text())["cases"][0]["reference"] \
        .startswith("Dataset001_Tiny/labelsTr/")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    page = write_report(tmp_path / "runs" / "pred").read_text()
    assert "not found" not in page and page.count(f"image: {dataset / 'imagesTr'}") == 2


def test_a_foreign_report_html_is_never_replaced(evaluated, capsys):
    foreign = evaluated["pred"] / "report.html"
    foreign.write_text("<html><body>my notes</body></html>")
    with pytest.raises(SegforgeError, match="not written by `segforge report`"):
        write_report(evaluated["pred"])
    assert main(["report", str(evaluated["pred"])]) != 0
    assert str(foreign) in capsys.readouterr().err and foreign.read_text() == "<html><body>my notes</body></html>"
    foreign.unlink()
    assert main(["report", str(evaluated["pred"])]) == 0  # its own report it writes, and writes again
    assert main(["report", str(evaluated["pred"])]) == 0
    assert f"report: {foreign}" in capsys.readouterr().out
    other = evaluated["pred"].parent / "elsewhere" / "r.html"
    assert main(["report", str(evaluated["pred"]), "-o", str(other)]) == 0 and MARKER in other.read_text()


def test_a_folder_without_summary_is_refused_naming_the_command(tmp_path, capsys):
    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / "case.nii.gz").write_bytes(b"")
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert str(folder / "summary.json") in err and f"segforge evaluate {folder} REF_DIR" in err
    assert sorted(p.name for p in folder.iterdir()) == ["case.nii.gz"]  # no page, no temporary file
    assert main(["report", str(tmp_path / "missing")]) == 2


def write_fold(results: Path, dataset: Path, raw_root: Path | None = None) -> Path:
    """A fold folder as training leaves it: validation/ (masks, summary.json), logs/, training_summary.json."""
    fold = results / dataset.name / "results" / "segment" / "3d_fullres" / "fold_0"
    validation = perturbed_predictions(dataset / "labelsTr", fold / "validation")
    references = {p.name.split(".")[0]: p for p in (dataset / "labelsTr").iterdir()}
    if raw_root is not None:  # references elsewhere: the images come from the run's raw_root
        refs = results / "refs"
        shutil.copytree(dataset / "labelsTr", refs)
        references = {p.name.split(".")[0]: p for p in refs.iterdir()}
        (fold / "config.yaml").write_text(f"paths:\n  raw_root: {raw_root}\nfold: 0\n")
    evaluate_folders(validation, references, LABELS, validation / "summary.json")
    (fold / "logs" / "version_0").mkdir(parents=True)
    (fold / "logs" / "version_0" / "metrics.csv").write_text(
        "epoch,step,lr,train_loss_epoch,val_dice,val_loss\n"
        "0,9,0.01,,,\n0,9,,1.2,,\n0,9,,,0.3,0.9\n1,19,0.005,,,\n1,19,,0.8,,\n1,19,,,0.6,0.5\n")
    (fold / "training_summary.json").write_text(json.dumps({"kind": "run", "schema_version": 1, "fold": "0",
                                                            "global_step": 20, "precision": "32-true"}))
    return fold


def test_fold_folder_has_its_validation_and_curves(tmp_path, capsys):
    dataset = write_dataset(tmp_path / "raw" / "Dataset001_Tiny", num_train=3, num_test=0)
    fold = write_fold(tmp_path / "results", dataset, raw_root=tmp_path / "raw")
    page = write_report(fold).read_text()
    assert (fold / "report.html").is_file() and "<h2>Training</h2>" in page and "32-true" in page
    assert "version_*/metrics.csv" in page  # no progress.png: drawn from the CSV logs
    assert len(table_cases(page)) == 3
    assert f"image: {tmp_path / 'raw' / dataset.name / 'imagesTr'}" in page  # via the fold's config.yaml
    curves = images_of(page)[0]
    assert curves.shape[1] > 600 and curves[..., :3].std() > 10  # a drawn figure, not a blank one
    progress = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(progress, format="PNG")
    (fold / "progress.png").write_bytes(progress.getvalue())
    page = write_report(fold).read_text()
    assert base64.b64encode(progress.getvalue()).decode() in page and "version_*/metrics.csv" not in page
    assert main(["report", str(fold.parent)]) == 2  # the model folder: pointed to its fold
    assert f"Fix: segforge report {fold}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the browser
PROBE = """<script>window.addEventListener('load', function () {
  var images = Array.prototype.filter.call(document.images, function (i) { return i.complete && i.naturalWidth > 0; });
  var rows = document.querySelectorAll('#metrics tbody tr');
  var first = rows[0].cells[0].textContent;
  var header = document.querySelector('#metrics thead th:nth-child(2)');
  header.click(); header.click();  // mean Dice, descending: the best case first
  var best = document.querySelector('#metrics tbody tr').cells[0].textContent;
  header.click();                  // and ascending again
  var overlay = document.querySelector('section.case img[alt$="prediction"]').getBoundingClientRect();
  var table = document.getElementById('metrics').getBoundingClientRect();
  document.title = 'PROBE' + JSON.stringify({images: images.length, all: document.images.length, rows: rows.length,
    first: first, best: best, overlay: [overlay.left, overlay.top, overlay.right, overlay.bottom],
    table: [table.left, table.top, table.right, table.bottom]});
});</script>"""


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def browse(page: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                           *flags, page.as_uri()], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium; .ci/run "
                                                "installs it when it can), so the page cannot be rendered in a browser")
def test_the_report_of_the_demo_dataset_renders_in_headless_chromium(tmp_path):
    from segforge.demo.synthetic import generate_dataset

    dataset = generate_dataset(tmp_path / "Dataset900_Synthetic", dim=3, num_train=2, num_test=0)
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    pred = tmp_path / "pred"
    pred.mkdir()
    for i, path in enumerate(sorted((dataset / "labelsTr").iterdir())):  # one class dilated by a voxel, more in case 1
        mask, geometry = read_image(path)
        grown = mask.copy()
        for _ in range(i + 1):
            grown[:, 1:][(grown[:, :-1] == 1) & (grown[:, 1:] == 0)] = 1
        write_image(pred / path.name, grown, geometry)
    summary = evaluate_folders(pred, dataset / "labelsTr", labels, pred / "summary.json")
    page = write_report(pred)
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))

    dom = browse(probed, tmp_path, "--dump-dom")
    found = re.search(r"<title>PROBE(.*?)</title>", dom.stdout)
    assert found, f"the probe did not run: {dom.stderr[-2000:]}"
    probe = json.loads(found.group(1).replace("&quot;", '"'))
    worst = min(summary["cases"], key=lambda c: np.nanmean(list(c["dice"].values())))["case"]
    best = max(summary["cases"], key=lambda c: np.nanmean(list(c["dice"].values())))["case"]
    assert probe["rows"] == 2 and probe["first"] == worst and probe["best"] == best  # worst first; the header sorts
    assert probe["images"] == probe["all"] == 2 * 3 * 3  # every PNG decoded: 2 cases x 3 views x 3 panels

    shot = tmp_path / "shot.png"
    browse(probed, tmp_path, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 20, "a blank page"
    left, top, right, bottom = (int(round(v)) for v in probe["table"])
    table = pixels[top:bottom, left:right]
    assert (table.max(axis=2) < 100).mean() > 0.02  # text in the table
    left, top, right, bottom = (int(round(v)) for v in probe["overlay"])
    assert bottom <= pixels.shape[0], "the first overlay is below the screenshot"
    overlay = pixels[top + 2:bottom - 2, left + 2:right - 2]
    spread = overlay.max(axis=2) - overlay.min(axis=2)
    # class colours over a grey image (grey alone has no spread between its channels)
    assert (spread > 40).mean() > 0.005 and overlay.std() > 15
