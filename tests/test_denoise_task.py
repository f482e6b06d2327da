"""task=denoise through the real CLI on tiny data: an unlabelled dataset is valid for denoising (and refused for
segmentation, naming the fix), training writes a model folder whose diffusion.json is the process sampling uses,
`segforge sample` and `segforge denoise` write images with the right grid, and mask-conditioned synthesis gives one
image per label map on the map's grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import data_identifier_of, write_dataset
from segforge.cli.main import main
from segforge.io.image import Geometry, read_image, write_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = ["data.iterations_per_epoch=4", "data.val_iterations=1", "trainer.accelerator=cpu", "callbacks.epoch_progress.plot_path=null",
         "logger.tensorboard=null", "task.network.attention_stages=1", "task.sampling.steps=4"]
GEO_2D = Geometry(spacing=(999.0, 0.5, 0.5), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), ndim=2)


def roots(work: Path) -> list[str]:
    return [f"paths.work_root={work}", f"paths.preprocessed_root={work / 'pre'}", f"paths.results_root={work / 'res'}"]


def blob_image(rng: np.random.Generator, shape=(40, 40)) -> np.ndarray:
    """A few bright discs on a dim background, as 8-bit intensities (a microscopy-like PNG)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.full(shape, 40.0)
    for _ in range(3):
        cy, cx, r = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8), rng.uniform(4, 8)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 200.0
    return image


def write_unlabelled_2d(root: Path, cases: int = 8) -> Path:
    """An unlabelled 2D PNG dataset: imagesTr only, dataset.json without labels."""
    rng = np.random.default_rng(3)
    for i in range(cases):
        write_image(root / "imagesTr" / f"img{i:02d}_0000.png", blob_image(rng)[None].astype(np.uint8), GEO_2D)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "fluorescence"}, "numTraining": cases,
                                                   "file_ending": ".png"}))
    return root


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    base = tmp_path_factory.mktemp("denoise2d")
    dataset, work = write_unlabelled_2d(base / "Dataset003_Blobs"), base / "work"
    assert main(["plan", str(dataset), *roots(work), "task=denoise", "plan.features_base=8"]) == 0
    assert main(["train", str(dataset), *roots(work), "task=denoise", "configuration=2d", "trainer.max_epochs=4",
                 "data.iterations_per_epoch=10", *QUICK[1:], "task.time_band=[0.0,0.5]"]) == 0
    model = work / "res" / dataset.name / "results" / "denoise" / "2d"
    return {"base": base, "dataset": dataset, "work": work, "model": model}


def test_unlabelled_dataset_is_for_denoising_only(unlabelled, capsys):
    dataset, work = unlabelled["dataset"], unlabelled["work"]
    assert main(["check", str(dataset), "task=denoise"]) == 0
    for command in (["check", str(dataset)], ["plan", str(dataset), *roots(work / "seg")],
                    ["train", str(dataset), *roots(work), "configuration=2d"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "has no labelsTr/" in err and "task=denoise" in err and "Fix:" in err, command
    preprocessed = work / "pre" / dataset.name / "preprocessed" / data_identifier_of(work, dataset.name, "2d")
    assert json.loads((preprocessed / "manifest.json").read_text())["labelled"] is False
    assert sorted(p.name for p in preprocessed.glob("img00*")) == ["img00.json", "img00.npy"]  # no label files


def test_model_folder_records_the_process(unlabelled):
    model = unlabelled["model"]
    saved = json.loads((model / "diffusion.json").read_text())
    assert saved["objective"] == "v" and saved["schedule"]["kind"] == "cosine"
    payload = torch.load(model / "fold_0" / "model_final.pt", weights_only=True)
    assert payload["task"] == "denoise" and payload["diffusion"] == saved
    assert payload["network"]["_target_"] == "segforge.nn.denoiser.Denoiser" and payload["network"]["norm"] == "group"
    summary = json.loads((model / "fold_0" / "training_summary.json").read_text())
    assert np.isfinite(summary["final_metrics"]["val_psnr"]) and set(summary["validation_psnr"]) == {"0.05", "0.1", "0.2"}
    assert (model / "fold_0" / "checkpoints" / "best.ckpt").is_file()  # best checkpoint by val_psnr_ema
    plans = json.loads((model / "plans.json").read_text())  # the plan traced the denoiser's step, not a segmenter's
    assert plans["rules"]["denoiser_step"]["task"] == "denoise" and plans["configurations"]["2d"]["network"]["norm"] == "group"
    assert plans["normalization"][0]["scheme"] == "global"  # one intensity map for clean and noisy images alike
    assert plans["crop_to_nonzero"] is False  # noisy images have no zero border: the denoiser learns whole images


def test_sample_writes_images_at_the_plans_spacing(unlabelled, tmp_path, capsys):
    # trained on task.time_band=[0.0,0.5]: sampling from pure noise would start where the model never trained
    assert main(["sample", "--model", str(unlabelled["model"]), "-o", str(tmp_path / "refused"), "n=1"]) == 2
    assert "task.time_band" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    model = tmp_path / "model"  # the same weights declared as trained on the whole process
    shutil.copytree(unlabelled["model"], model)
    payload = torch.load(model / "fold_0" / "model_final.pt", weights_only=True)
    torch.save({**payload, "time_band": [0.0, 1.0]}, model / "fold_0" / "model_final.pt")
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(model), "-o", str(out), "n=3", "steps=3", "seed=1"]) == 0
    files = sorted(out.glob("sample_*_0000.png"))
    assert [f.name for f in files] == [f"sample_{i:03d}_0000.png" for i in range(3)]
    image, geometry = read_image(files[0])
    plans = json.loads((unlabelled["model"] / "plans.json").read_text())
    assert geometry.ndim == 2 and image.shape == (1, *[round(v) for v in plans["configurations"]["2d"]["median_shape"]])
    assert np.isfinite(image).all() and image.max() > image.min()  # in the dataset's 8-bit units, not normalised
    again = tmp_path / "again"
    assert main(["sample", "--model", str(model), "-o", str(again), "n=1", "steps=3", "seed=1"]) == 0
    np.testing.assert_array_equal(read_image(again / "sample_000_0000.png")[0], image)  # seeded


def test_sampling_uses_the_saved_process_and_refuses_a_tampered_one(unlabelled, tmp_path, capsys):
    from segforge.inference.generate import DenoisingModel

    copy = tmp_path / "model"
    shutil.copytree(unlabelled["model"], copy)
    model = DenoisingModel.from_model_dir(copy)
    assert model.process.to_json() == json.loads((copy / "diffusion.json").read_text())
    # the config at sampling time has no say over the process: a flow sampler does not fit the saved v-objective model
    weights = copy / "fold_0" / "model_final.pt"
    payload = {**torch.load(weights, weights_only=True), "time_band": [0.0, 1.0]}  # may sample from pure noise
    torch.save(payload, weights)
    assert main(["sample", "--model", str(copy), "-o", str(tmp_path / "o1"), "n=1", "sampler=euler"]) == 2
    assert "does not fit" in capsys.readouterr().err
    torch.save({k: v for k, v in payload.items() if k != "sampling"}, weights)  # damaged weights: an error, no traceback
    assert main(["sample", "--model", str(copy), "-o", str(tmp_path / "o1"), "n=1"]) == 2
    err = capsys.readouterr().err
    assert "incomplete denoising weights" in err and "Traceback" not in err
    torch.save(payload, weights)
    saved = json.loads((copy / "diffusion.json").read_text())
    saved["schedule"]["kind"] = "linear"  # a valid process, but not the one the weights were trained with
    (copy / "diffusion.json").write_text(json.dumps(saved))
    assert main(["sample", "--model", str(copy), "-o", str(tmp_path / "o2"), "n=1"]) == 2
    assert "differs from the process" in capsys.readouterr().err
    saved["schedule"]["type"] = "warp_drive"
    (copy / "diffusion.json").write_text(json.dumps(saved))
    assert main(["denoise", "--model", str(copy), "-i", str(tmp_path), "-o", str(tmp_path / "o3")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").glob("sample_*"))


def test_denoise_lowers_the_error_and_reports_a_bad_case(unlabelled, tmp_path, capsys):
    rng = np.random.default_rng(11)
    clean = blob_image(rng)[None]
    noisy_dir, out = tmp_path / "noisy", tmp_path / "out"
    noisy = np.clip(clean + 0.15 * 160 * rng.standard_normal(clean.shape), 0, 255).round().astype(np.uint8)
    write_image(noisy_dir / "case_0000.png", noisy, GEO_2D)
    write_image(noisy_dir / "bad_0000.png", np.zeros((1, 40, 40), np.uint8), GEO_2D)
    (noisy_dir / "bad_0001.png").write_bytes(b"not a png")  # a second channel the model does not take
    before = (noisy_dir / "case_0000.png").read_bytes()
    assert main(["denoise", "--model", str(unlabelled["model"]), "-i", str(noisy_dir), "-o", str(out), "sigma=0.15",
                 "intensity_range=[40,200]"]) == 1  # one bad case, reported; the other written
    assert "bad" in capsys.readouterr().err
    denoised = read_image(out / "case_0000.png")[0]
    assert denoised.shape == clean.shape
    error_before = np.sqrt(np.mean((noisy.astype(float) - clean) ** 2))
    error_after = np.sqrt(np.mean((denoised.astype(float) - clean) ** 2))
    assert error_after < 0.8 * error_before, (error_before, error_after)
    assert (noisy_dir / "case_0000.png").read_bytes() == before  # the input is never touched
    assert main(["denoise", "--model", str(unlabelled["model"]), "-i", str(noisy_dir), "-o", str(noisy_dir)]) == 2
    assert "input folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def labelled_3d(tmp_path_factory):
    base = tmp_path_factory.mktemp("denoise3d")
    dataset, work = write_dataset(base / "Dataset004_Tiny", num_train=6, num_test=2), base / "work"
    assert main(["plan", str(dataset), *roots(work), "task=denoise", "plan.features_base=4",
                 "plan.configurations=[2d,3d_fullres]"]) == 0
    return dataset, work


def test_3d_denoiser_trains_resumes_and_samples(labelled_3d, tmp_path):
    dataset, work = labelled_3d
    run = ["train", str(dataset), *roots(work), "task=denoise", *QUICK, "final_validation.enabled=false",
           "task.objective=epsilon", "task.schedule.kind=linear"]
    assert main([*run, "trainer.max_epochs=1"]) == 0
    model = work / "res" / dataset.name / "results" / "denoise" / "3d_fullres"
    assert main([*run, "trainer.max_epochs=2"]) == 0  # resume=auto continues the run
    summary = json.loads((model / "fold_0" / "training_summary.json").read_text())
    assert summary["global_step"] == 8 and summary["epochs"] == 2
    assert json.loads((model / "diffusion.json").read_text())["schedule"]["kind"] == "linear"
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(model), "-o", str(out), "n=2", "steps=2", "shape=[8,16,16]"]) == 0
    image, geometry = read_image(out / "sample_001_0000.nii.gz")
    plans = json.loads((model / "plans.json").read_text())
    assert image.shape == (8, 16, 16) and np.isfinite(image).all()
    np.testing.assert_allclose(geometry.spacing, plans["configurations"]["3d_fullres"]["target_spacing"], rtol=1e-5)
    # denoise: the output has the input's exact grid (anisotropic spacing, rotated direction, origin)
    clean, geometry = read_image(dataset / "imagesTs" / "case006_0000.nii.gz")
    noisy = clean + 0.1 * float(clean.max() - clean.min()) * np.random.default_rng(0).standard_normal(clean.shape)
    write_image(tmp_path / "noisy" / "vol_0000.nii.gz", noisy.astype(np.float32), geometry)
    assert main(["denoise", "--model", str(model), "-i", str(tmp_path / "noisy"), "-o", str(tmp_path / "clean"),
                 "sigma=0.1"]) == 0
    denoised, written = read_image(tmp_path / "clean" / "vol_0000.nii.gz")
    assert denoised.shape == clean.shape and written.same_grid(geometry, tol=1e-6) == [] and np.isfinite(denoised).all()
    # a model folder never mixes processes: another objective into the same folder is refused
    assert main([*run[:-2], "task.objective=v", "trainer.max_epochs=3"]) == 2


def test_mask_conditioned_synthesis_one_image_per_map_on_its_grid(labelled_3d, tmp_path):
    dataset, work = labelled_3d
    assert main(["train", str(dataset), *roots(work), "task=denoise", "configuration=2d", "task.mask_conditioning=true",
                 "task.cond_dropout=0.2", "trainer.max_epochs=1", "final_validation.enabled=false", *QUICK]) == 0
    model = work / "res" / dataset.name / "results" / "denoise" / "2d"
    assert torch.load(model / "fold_0" / "model_final.pt", weights_only=True)["mask_values"] == [0, 1, 2]
    masks, out = tmp_path / "masks", tmp_path / "out"
    for source in sorted((dataset / "labelsTs").iterdir()):
        label, geometry = read_image(source)
        write_image(masks / source.name, label[:, 3:27, :30], geometry)  # another grid than the training cases'
    assert main(["sample", "--model", str(model), "-o", str(out), "--masks", str(masks), "steps=2",
                 "guidance_scale=1.5"]) == 0
    blank_masks, blank_out = tmp_path / "blank_masks", tmp_path / "blank_out"
    for source in sorted(masks.iterdir()):
        image, geometry = read_image(out / source.name.replace(".nii.gz", "_0000.nii.gz"))
        label, label_geometry = read_image(source)
        assert image.shape == label.shape and geometry.same_grid(label_geometry, tol=1e-6) == [] and np.isfinite(image).all()
        write_image(blank_masks / source.name, np.zeros_like(label), label_geometry)  # same name: the same noise
    assert main(["sample", "--model", str(model), "-o", str(blank_out), "--masks", str(blank_masks), "steps=2",
                 "guidance_scale=1.5"]) == 0
    for source in sorted(masks.iterdir()):  # the map reaches the network: another map, another image
        name = source.name.replace(".nii.gz", "_0000.nii.gz")
        assert np.abs(read_image(out / name)[0] - read_image(blank_out / name)[0]).max() > 1e-3
    assert main(["sample", "--model", str(model), "-o", str(masks), "--masks", str(masks)]) == 2  # inputs kept apart
    assert sorted(p.name for p in masks.iterdir()) == sorted(p.name for p in blank_masks.iterdir())
    assert main(["sample", "--model", str(model), "-o", str(tmp_path / "no_masks"), "n=1"]) == 2  # needs maps


def test_denoising_turns_intensity_augmentation_off_and_keeps_spatial(tmp_path):
    from segforge.cli.main import compose_config
    from segforge.io.dataset import DatasetSpec
    from segforge.training.tasks import INTENSITY_PROBS, DenoiseTask

    spec = DatasetSpec(tmp_path, {0: "MRI"}, {"background": 0}, ".nii.gz", 1)
    plan_config = {"dims": 2, "network": {}}
    data = DenoiseTask(compose_config("train", ["task=denoise"]), spec, plan_config, tmp_path).data_cfg()
    assert all(data.augmentation[key] == 0.0 for key in INTENSITY_PROBS)
    assert data.augmentation.rotation_prob > 0 and data.augmentation.mirror_prob > 0
    kept = DenoiseTask(compose_config("train", ["task=denoise", "task.intensity_augmentation=true"]), spec, plan_config,
                       tmp_path).data_cfg()
    assert kept.augmentation.noise_prob > 0


def test_patches_without_labels_are_uniform_and_carry_none(tmp_path):
    from segforge.training.augment import AugmentationSettings, Augmenter, PatchGeometry
    from segforge.training.sampling import PatchDataset, collate_patches

    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((1, 3, 20, 24), dtype=np.float32))
    settings = AugmentationSettings.from_config()
    geometry = PatchGeometry.resolve(settings, [16, 16])
    dataset = PatchDataset(tmp_path, ["a"], [16, 16], 2, 1.0, settings, geometry, 0, with_labels=False)
    samples = [dataset[uid] for uid in range(6)]
    assert all(s["label"] is None for s in samples)
    image, label = Augmenter(settings, geometry)(collate_patches(samples))
    assert image.shape == (6, 1, 16, 16) and label is None


def test_budget_counts_the_final_validation_of_each_task(tmp_path):
    from segforge.cli.main import compose_config
    from segforge.io.dataset import DatasetSpec
    from segforge.training.tasks import DenoiseTask, SegmentTask

    spec = DatasetSpec(tmp_path, {0: "MRI"}, {"background": 0, "a": 1}, ".nii.gz", 1)
    plan_config = {"dims": 3, "network": {}, "mirror_axes": [0, 1, 2]}
    assert SegmentTask(compose_config("train", []), spec, plan_config, tmp_path).validation_passes() == 8  # mirroring
    assert SegmentTask(compose_config("train", ["final_validation.mirror=false"]), spec, plan_config,
                       tmp_path).validation_passes() == 1
    denoise = compose_config("train", ["task=denoise", "task.final_validation_sigmas=[0.1,0.2]"])
    assert DenoiseTask(denoise, spec, plan_config, tmp_path).validation_passes() == 2  # one pass per noise level


def test_a_plan_made_for_the_other_task_is_named(tmp_path, caplog):
    from segforge.cli.main import compose_config
    from segforge.io.dataset import DatasetSpec
    from segforge.training.tasks import make_task, planned_task

    spec = DatasetSpec(tmp_path, {0: "MRI"}, {"background": 0, "a": 1}, ".nii.gz", 1)
    denoising_plans = {"rules": {"denoiser_step": {"task": "denoise"}}}
    assert planned_task(denoising_plans) == "denoise" and planned_task({"rules": {}}) == "segment"
    with caplog.at_level("WARNING", logger="segforge"):
        make_task(compose_config("train", []), spec, {"dims": 3, "network": {}}, tmp_path, {}, denoising_plans)
    assert "made for task=denoise" in caplog.text and "task=segment" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="segforge"):
        make_task(compose_config("train", ["task=denoise"]), spec, {"dims": 3, "network": {}}, tmp_path, {}, denoising_plans)
    assert "made for task" not in caplog.text


def test_training_noise_differs_between_batches_of_one_optimizer_step():
    """Gradient accumulation runs several batches per global step: each must draw its own noise and times."""
    from omegaconf import OmegaConf

    from segforge.diffusion.process import DiffusionProcess
    from segforge.diffusion.schedules import NoiseSchedule
    from segforge.training.denoising import DenoisingModule

    module = DenoisingModule(torch.nn.Identity(), DiffusionProcess(NoiseSchedule(), "v"), OmegaConf.create({}),
                             weight_ema_decay=None)
    assert module.global_step == 0  # no trainer: every batch below is at the same optimizer step
    draws = [module.sample_times(8, module.training_generator(batch)) for batch in (0, 1, 0)]
    assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
