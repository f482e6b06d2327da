"""The Medical Segmentation Decathlon's layout (4D multi-channel NIfTI, MSD dataset.json) to nnU-Net v2's raw layout,
which segforge reads: one 3D file per channel (``CASE_0000.nii.gz`` ...), labels as they are, dataset.json with
``channel_names``, ``labels`` (name -> value) and ``file_ending``.

Every path read from the MSD dataset.json must stay inside the task folder; macOS ``._*`` resource files are
skipped; the new dataset is built under a temporary name and renamed into place (never over an existing folder).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np

from segforge.errors import SegforgeError


def _inside(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if root.resolve() not in path.parents:
        raise SegforgeError(f"{root / 'dataset.json'}: path {relative!r} leaves the task folder; refused")
    return path


def _split_channels(source: Path, case: str, out_dir: Path, channels: int) -> None:
    import nibabel as nib

    image = nib.load(str(source))
    data = np.asanyarray(image.dataobj)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4 or data.shape[3] != channels:
        raise SegforgeError(f"{source}: shape {data.shape}, expected (x, y, z, {channels}) for {channels} channel(s)")
    header = image.header.copy()
    header.set_data_shape(data.shape[:3])
    for c in range(channels):
        channel = nib.Nifti1Image(np.ascontiguousarray(data[..., c]), image.affine, header)
        nib.save(channel, str(out_dir / f"{case}_{c:04d}.nii.gz"))


def convert_msd(task_dir: Path, output_root: Path, dataset_id: int) -> Path:
    """``TaskNN_Name`` -> ``<output_root>/DatasetNNN_Name``; returns the new dataset folder."""
    task_dir = Path(task_dir)
    meta_path = task_dir / "dataset.json"
    if not meta_path.is_file():
        raise SegforgeError(f"{task_dir}: no dataset.json; not a Decathlon task folder")
    meta = json.loads(meta_path.read_text())
    name = task_dir.name.split("_", 1)[1] if "_" in task_dir.name else task_dir.name
    final = Path(output_root) / f"Dataset{int(dataset_id):03d}_{name}"
    if final.exists():
        raise SegforgeError(f"{final} exists; segforge does not overwrite it. Fix: remove it or choose another id")
    modality = meta.get("modality") or {"0": "image"}
    channels = len(modality)
    tmp = final.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{final.name}")
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir(parents=True)
        training = [t for t in meta.get("training", []) if not Path(t["image"]).name.startswith("._")]
        for entry in training:
            image, label = _inside(task_dir, entry["image"]), _inside(task_dir, entry["label"])
            case = Path(entry["image"]).name.removesuffix(".nii.gz")
            _split_channels(image, case, tmp / "imagesTr", channels)
            shutil.copyfile(label, tmp / "labelsTr" / f"{case}.nii.gz")
        for entry in meta.get("test", []):
            relative = entry if isinstance(entry, str) else entry["image"]
            if Path(relative).name.startswith("._"):
                continue
            _split_channels(_inside(task_dir, relative), Path(relative).name.removesuffix(".nii.gz"), tmp / "imagesTs", channels)
        labels = {str(v): int(k) for k, v in meta["labels"].items()}
        dataset_json = {"channel_names": {str(k): str(v) for k, v in modality.items()}, "labels": labels,
                        "numTraining": len(training), "file_ending": ".nii.gz", "name": name,
                        "description": meta.get("description", ""), "source": f"Medical Segmentation Decathlon {task_dir.name}",
                        "licence": meta.get("licence", meta.get("license", ""))}
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
