"""A 2D configuration trained on tiles of a real fluorescence image (stardist's nuclei image, 2018 Data Science
Bowl, BSD-3) beats the best global intensity threshold on held-out tiles."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from segforge.cli.main import main
from segforge.io.image import read_image

TILE = 128


def nuclei_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("stardist")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("stardist's wheel is not installed (scripts/setup_env.sh installs it for the dev extra)")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "images"
    return folder / "img2d.tif", folder / "mask2d.tif"


def write_tiles(root: Path) -> tuple[Path, list[str]]:
    """16 tiles of 128x128: the bottom-right quadrant's four are held out (imagesTs/labelsTs), the rest train."""
    import tifffile

    image_path, mask_path = nuclei_files()
    image, mask = tifffile.imread(image_path), (tifffile.imread(mask_path) > 0).astype(np.uint8)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True)
    held_out = []
    for ty in range(4):
        for tx in range(4):
            case = f"tile_{ty}{tx}"
            split = "Ts" if ty >= 2 and tx >= 2 else "Tr"
            if split == "Ts":
                held_out.append(case)
            window = (slice(ty * TILE, (ty + 1) * TILE), slice(tx * TILE, (tx + 1) * TILE))
            tifffile.imwrite(root / f"images{split}" / f"{case}_0000.tif", image[window])
            tifffile.imwrite(root / f"labels{split}" / f"{case}.tif", mask[window])
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "fluorescence"}, "labels": {"background": 0, "nucleus": 1},
        "numTraining": 12, "file_ending": ".tif"}))
    return root, held_out


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    return 2 * float((prediction & reference).sum()) / float(prediction.sum() + reference.sum())


@pytest.mark.slow
def test_2d_unet_beats_the_best_threshold_on_held_out_tiles(tmp_path):
    dataset, held_out = write_tiles(tmp_path / "Dataset010_Nuclei")
    work = tmp_path / "work"
    roots = [f"paths.work_root={work}"]
    assert main(["plan", str(dataset), *roots, "plan.configurations=[2d]", "plan.features_base=16"]) == 0
    assert main(["train", str(dataset), *roots, "configuration=2d", "fold=all", "optim=adamw_cosine",
                 "trainer.max_epochs=6", "data.iterations_per_epoch=25", "data.val_iterations=25", "data.batch_size=4",
                 "callbacks.epoch_progress.plot_path=null", "logger.tensorboard=null"]) == 0
    model = work / dataset.name / "results" / "segment" / "2d"
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(out), "--model", str(model)]) == 0
    images = {c: read_image(dataset / "imagesTs" / f"{c}_0000.tif")[0] for c in held_out}
    truth = {c: read_image(dataset / "labelsTs" / f"{c}.tif")[0] > 0 for c in held_out}
    predicted = {c: read_image(out / f"{c}.tif")[0] > 0 for c in held_out}
    stacked = lambda d: np.concatenate([d[c].ravel() for c in held_out])  # noqa: E731
    network = dice(stacked(predicted), stacked(truth))
    # the oracle: the best single threshold, chosen on the held-out tiles themselves
    values, reference = stacked(images), stacked(truth)
    threshold = max(dice(values > t, reference) for t in np.unique(np.quantile(values, np.linspace(0.3, 0.99, 120))))
    print(f"held-out Dice: network {network:.4f}, best threshold {threshold:.4f}")
    assert network > threshold + 0.01, (network, threshold)
    assert network > 0.85, network
