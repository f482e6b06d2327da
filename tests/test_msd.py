"""The Decathlon converter: a small synthetic 4D-NIfTI task becomes a dataset `segforge check` accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from segforge.cli.main import main
from segforge.io.image import read_image

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "convert_msd.py"
AFFINE = np.array([[-0.9, 0, 0, 10], [0, 0.9, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])


def write_task(root: Path, cases: int = 3) -> Path:
    task = root / "Task07_Tumour"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    training = []
    for i in range(cases + 1):
        image = rng.normal(0, 1, (20, 18, 6, 2)).astype(np.float32)
        label = np.zeros((20, 18, 6), np.uint8)
        label[5:12, 4:10, 1:4] = 1
        label[7:9, 6:8, 2] = 2
        split = "Tr" if i < cases else "Ts"
        nib.save(nib.Nifti1Image(image, AFFINE), str(task / f"images{split}" / f"tumour_{i:03d}.nii.gz"))
        if split == "Tr":
            nib.save(nib.Nifti1Image(label, AFFINE), str(task / "labelsTr" / f"tumour_{i:03d}.nii.gz"))
            training.append({"image": f"./imagesTr/tumour_{i:03d}.nii.gz", "label": f"./labelsTr/tumour_{i:03d}.nii.gz"})
    (task / "imagesTr" / "._tumour_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork from the tar
    (task / "dataset.json").write_text(json.dumps({
        "name": "Tumour", "modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "oedema", "2": "core"},
        "numTraining": cases, "training": training, "test": [f"./imagesTs/tumour_{cases:03d}.nii.gz"]}))
    return task


def test_converted_task_passes_check_and_keeps_channels_and_geometry(tmp_path):
    task = write_task(tmp_path)
    done = subprocess.run([sys.executable, str(SCRIPT), str(task), str(tmp_path / "raw")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    dataset = tmp_path / "raw" / "Dataset007_Tumour"
    assert main(["check", str(dataset)]) == 0
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1w"} and meta["labels"] == {"background": 0, "oedema": 1, "core": 2}
    original = nib.load(str(task / "imagesTr" / "tumour_001.nii.gz"))
    for c in range(2):
        part = nib.load(str(dataset / "imagesTr" / f"tumour_001_{c:04d}.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(part.dataobj), np.asanyarray(original.dataobj)[..., c])
        np.testing.assert_allclose(part.affine, original.affine)
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == ["tumour_003_0000.nii.gz", "tumour_003_0001.nii.gz"]
    image, geometry = read_image(dataset / "imagesTr" / "tumour_001_0000.nii.gz")
    label, label_geometry = read_image(dataset / "labelsTr" / "tumour_001.nii.gz")
    assert image.shape == label.shape and geometry.same_grid(label_geometry) == []


def test_a_path_that_leaves_the_task_is_refused(tmp_path):
    task = write_task(tmp_path, cases=1)
    meta = json.loads((task / "dataset.json").read_text())
    meta["training"][0]["label"] = "../../etc/passwd"
    (task / "dataset.json").write_text(json.dumps(meta))
    done = subprocess.run([sys.executable, str(SCRIPT), str(task), str(tmp_path / "raw")], capture_output=True, text=True)
    assert done.returncode == 2 and "leaves the task folder" in done.stderr
    assert not (tmp_path / "raw" / "Dataset007_Tumour").exists() and not list((tmp_path / "raw").glob(".tmp-*"))
