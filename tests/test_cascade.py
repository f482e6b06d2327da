"""The cascade end to end through the CLI: plan adds 3d_cascade_fullres with 3d_lowres, the lowres folds' final
validations write every case's prediction on the fullres grid, the cascade trains on them as extra input channels,
and predict runs both stages, writing masks on the input's exact grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import data_identifier_of, write_dataset
from segforge.cli.main import main
from segforge.errors import SegforgeError
from segforge.evaluation.selection import with_previous_stages
from segforge.inference.cascade import pair_stages
from segforge.inference.predictor import Predictor
from segforge.io.image import read_case, read_image
from segforge.io.artifacts import read_json
from segforge.planning.planner import make_plans

# a tiny budget and a 2x finer in-plane spacing: the fullres patch covers 3/8 of the 12x64x64 image, and a lowres
# threshold of 1 plans a lowres grid its patch covers whole (the images stay small: the test stays fast)
CASCADE_PLAN = ["plan.features_base=8", "plan.configurations=[3d_fullres,3d_lowres]", "plan.gpu_memory_gb=0.52",
                "plan.memory.reserved_gb=0.5", "plan.lowres_threshold=1.0", "plan.target_spacing=[3.0,0.45,0.45]"]
TINY = ["trainer.max_epochs=1", "data.iterations_per_epoch=2", "data.val_iterations=1", "data.num_workers=0",
        "trainer.accelerator=cpu", "num_folds=2", "final_validation.mirror=false"]


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    base = tmp_path_factory.mktemp("cascade")
    dataset = write_dataset(base / "Dataset004_Cascade", num_train=4, num_test=1)
    work = base / "work"
    roots = [f"paths.work_root={work}"]
    assert main(["plan", str(dataset), *roots, *CASCADE_PLAN]) == 0
    return {"dataset": dataset, "work": work, "roots": roots, "results": work / dataset.name / "results" / "segment"}


def test_plan_records_the_cascade_stage(cascade):
    plans = json.loads((cascade["work"] / cascade["dataset"].name / "plans_default.json").read_text())
    configurations = plans["configurations"]
    stage, full = configurations["3d_cascade_fullres"], configurations["3d_fullres"]
    assert stage["previous_stage"] == "3d_lowres" and configurations["3d_lowres"]["next_stage"] == ["3d_cascade_fullres"]
    assert stage["data_identifier"] == full["data_identifier"]  # 3d_fullres' preprocessed data, not a folder of its own
    assert stage["previous_stage_labels"] == [1, 2]  # ball, box: background gets no channel
    assert stage["patch_size"] == full["patch_size"] and stage["target_spacing"] == full["target_spacing"]
    assert not list((cascade["work"] / cascade["dataset"].name / "preprocessed").glob("3d_cascade_fullres*"))
    # plan.cascade=false plans no cascade
    fingerprint = read_json(cascade["work"] / cascade["dataset"].name / "fingerprint.json")
    plain = make_plans(fingerprint, OmegaConf.create({**plans["rules"], "cascade": False}))["configurations"]
    assert "3d_lowres" in plain and "3d_cascade_fullres" not in plain and "next_stage" not in plain["3d_lowres"]


def test_cascade_trains_on_the_lowres_predictions_and_predicts_in_two_stages(cascade, tmp_path, capsys):
    dataset, roots, results = cascade["dataset"], cascade["roots"], cascade["results"]
    cascade_train = ["train", str(dataset), *roots, "configuration=3d_cascade_fullres", "fold=0", *TINY]
    # before the lowres folds: refused, naming a case and the command that makes its prediction
    assert main(cascade_train) != 0
    err = capsys.readouterr().err
    assert "no 3d_lowres prediction of case(s) case00" in err and "configuration=3d_lowres fold=" in err
    assert not (results / "3d_cascade_fullres" / "fold_0").exists()

    for fold in (0, 1):
        assert main(["train", str(dataset), *roots, "configuration=3d_lowres", f"fold={fold}", *TINY]) == 0
    splits = json.loads((cascade["work"] / dataset.name / "splits.json").read_text())
    assert len(splits) == 2
    next_stage = results / "3d_lowres" / "predicted_next_stage" / "3d_cascade_fullres"
    fullres = cascade["work"] / dataset.name / "preprocessed" / data_identifier_of(cascade["work"], dataset.name)
    for case in sorted(c for split in splits for c in split["val"]):  # every case, once, from its held-out fold
        prior = np.load(next_stage / f"{case}.npy")
        assert prior.dtype == np.int16 and prior.shape == np.load(fullres / f"{case}.npy", mmap_mode="r").shape[1:]
        assert set(np.unique(prior)) <= {0, 1, 2}
    assert not list(next_stage.glob(".tmp-*"))

    assert main(cascade_train) == 0
    model = results / "3d_cascade_fullres"
    payload = torch.load(model / "fold_0" / "model_final.pt", weights_only=True)
    assert payload["network"]["in_channels"] == 1 + 2  # the image and the one-hot lowres prediction
    assert (model / "fold_0" / "validation" / "summary.json").is_file()

    # predict: the lowres stage, then the cascade stage, masks on the input's exact grid
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(out), "--model", str(results / "3d_lowres"),
                 "--model", str(model), *roots, "predict.mirror=false"]) == 0
    mask, mask_geometry = read_image(out / "case004.nii.gz")
    image, image_geometry = read_image(dataset / "imagesTs" / "case004_0000.nii.gz")
    assert mask.shape == image.shape and mask.dtype.kind in "iu"
    assert np.allclose(mask_geometry.spacing, image_geometry.spacing)
    assert np.allclose(mask_geometry.origin, image_geometry.origin)
    assert np.allclose(mask_geometry.direction, image_geometry.direction)

    # the same through the API: the cascade's output is the stage's on the lowres mask, and depends on it
    lowres = Predictor.from_model_dir(results / "3d_lowres", mirror=False)
    stage = Predictor.from_model_dir(model, mirror=False)
    (member,) = pair_stages([lowres, stage], [results / "3d_lowres", model])
    case_image, geometry = read_case([dataset / "imagesTs" / "case004_0000.nii.gz"])
    lowres_mask = lowres.predict(case_image, geometry)[0]
    assert np.array_equal(member.predict(case_image, geometry)[0], mask)
    assert np.array_equal(stage.predict(case_image, geometry, previous=lowres_mask)[0], mask)
    with_lowres = stage.probabilities(case_image, geometry, previous=lowres_mask)[0]
    everywhere_box = stage.probabilities(case_image, geometry, previous=np.full_like(lowres_mask, 2))[0]
    assert not torch.allclose(with_lowres, everywhere_box)
    # a lowres model given once more is an ensemble member beside the cascade; select's command lists it so
    joined = pair_stages([lowres, stage, lowres], [results / "3d_lowres", model, results / "3d_lowres"])
    assert [type(m).__name__ for m in joined] == ["Cascade", "Predictor"]
    assert with_previous_stages(results, ["3d_cascade_fullres", "3d_lowres"]) == \
        ["3d_lowres", "3d_cascade_fullres", "3d_lowres"]

    # the task folder with configuration=3d_cascade_fullres: the stage and its lowres, the same masks
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "by_name"), "--model", str(results),
                 "configuration=3d_cascade_fullres", *roots, "predict.mirror=false"]) == 0
    assert np.array_equal(read_image(tmp_path / "by_name" / "case004.nii.gz")[0], mask)

    # the cascade model alone is refused, naming the lowres model to add
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "alone"), "--model", str(model),
                 *roots]) != 0
    err = capsys.readouterr().err
    assert "cascade stage" in err and f"--model {results / '3d_lowres'} --model {model}" in err
    with pytest.raises(SegforgeError, match="takes the 3d_lowres prediction"):
        stage.predict(case_image, geometry)

    # predictions of another network than the fold holding a case out now are refused, naming the fold to re-train
    source_file = next_stage / "case000.json"
    source = json.loads(source_file.read_text())
    fold = source["fold"]
    assert source["case"] == "case000" and len(source["weights_sha256"]) == 64
    for edit, why in (({"weights_sha256": "0" * 64}, f"earlier weights of fold {fold}"),
                      ({"fold": "7"}, f"made by fold 7, but fold {fold} holds the case out now")):
        source_file.write_text(json.dumps({**source, **edit}))
        assert main(cascade_train) != 0
        err = capsys.readouterr().err
        assert "case000" in err and why in err and f"configuration=3d_lowres fold={fold}" in err
    source_file.unlink()
    assert main(cascade_train) != 0 and "records no source" in capsys.readouterr().err
    source_file.write_text(json.dumps(source))

    # exported, the stage names the lowres model to export with it
    assert main(["export-model", str(model), str(tmp_path / "cascade.zip")]) == 0
    out = capsys.readouterr().out
    assert "is a cascade stage" in out and f"segforge export-model {results / '3d_lowres'}" in out


def test_previous_stage_channels_follow_the_label_through_augmentation(tmp_path):
    """The previous stage's map is cropped, mirrored and warped exactly as the label (the same nearest/linear label
    rule), appended after the image channels, untouched by the intensity transforms; the perturbations keep it
    one-hot and change it."""
    from segforge.io.artifacts import save_npy_atomic
    from segforge.preprocessing.cascade import one_hot
    from segforge.preprocessing.pipeline import foreground_locations
    from segforge.training.augment import AugmentationSettings, Augmenter, PatchGeometry
    from segforge.training.morphology import perturb_one_hot
    from segforge.training.sampling import PatchCollate, PatchDataset

    seg = np.zeros((10, 20, 20), np.int16)
    seg[2:8, 4:12, 5:14] = 1
    seg[3:6, 13:18, 2:9] = 2
    save_npy_atomic(tmp_path / "a.npy", np.stack([seg.astype(np.float32)]))
    save_npy_atomic(tmp_path / "a_seg.npy", seg)
    save_npy_atomic(tmp_path / "a_locations.npy", foreground_locations(seg, [1, 2], 100, 0))
    save_npy_atomic(tmp_path / "prior.npy", seg)
    always = {"rotation_prob": 1.0, "scale_prob": 1.0, "noise_prob": 1.0, "brightness_prob": 1.0, "gamma_prob": 1.0,
              "previous_stage_morphology_prob": 0.0, "previous_stage_component_removal_prob": 0.0}
    settings = AugmentationSettings.from_config(always)
    geometry = PatchGeometry.resolve(settings, [8, 16, 16])
    dataset = PatchDataset(tmp_path, ["a"], [8, 16, 16], 3, 0.5, settings, geometry, 0, previous={"a": tmp_path / "prior.npy"})
    image, label = PatchCollate(Augmenter(settings, geometry, [1, 2]))([dataset[u] for u in range(4)])
    assert image.shape == (4, 3, 8, 16, 16)
    assert torch.equal(image[:, 1:], one_hot(label, [1, 2]))  # warped as the label, no intensity transform
    assert not torch.equal(image[:, :1], label.float())  # while the image channel got them
    assert label.sum() > 0

    channels = one_hot(torch.from_numpy(seg)[None, None], [1, 2])[0]
    rng = np.random.default_rng(0)
    for removal in (False, True):
        perturbed = channels.clone()
        perturb_one_hot(perturbed, rng, AugmentationSettings.from_config({
            "previous_stage_morphology_prob": 0.0 if removal else 1.0,
            "previous_stage_component_removal_prob": 1.0 if removal else 0.0,
            "previous_stage_component_max_fraction": 0.5}))
        assert perturbed.sum(0).max() <= 1.0 and not torch.equal(perturbed, channels)
        if removal:  # each channel is one small component here: both removed
            assert perturbed.sum() == 0


def test_a_cascade_stage_is_joined_to_the_lowres_model_of_its_own_plan(tmp_path):
    """Given the lowres models of two plans, a plan's cascade stage takes its own plan's; the other stays an ensemble
    member; without its own plan's lowres it is refused, naming that folder (<configuration>__<plans>)."""
    from types import SimpleNamespace

    from segforge.errors import SegforgeError
    from segforge.inference.cascade import Cascade, pair_stages

    def model(configuration, plans, previous=None):
        return SimpleNamespace(configuration=configuration, previous_stage=previous, plans={} if plans == "default"
                               else {"plans_name": plans}, dataset_json={}, plan_config={}, regions_class_order=None,
                               class_names=["ball", "box"])

    lowres_default, lowres_x = model("3d_lowres", "default"), model("3d_lowres", "x")
    stage_x = model("3d_cascade_fullres", "x", previous="3d_lowres")
    sources = [tmp_path / "3d_lowres", tmp_path / "3d_lowres__x", tmp_path / "3d_cascade_fullres__x"]
    members = pair_stages([lowres_default, lowres_x, stage_x], sources)
    assert members[0] is lowres_default and isinstance(members[1], Cascade)
    assert members[1].previous is lowres_x and members[1].stage is stage_x and len(members) == 2
    with pytest.raises(SegforgeError, match="3d_lowres__x --model"):
        pair_stages([lowres_default, stage_x], [sources[0], sources[2]])


def test_the_cpu_dilation_is_the_convolution_with_the_ball():
    """On a CPU the perturbation dilates through the distance transform; it must be the same ball as the GPU's
    convolution (erosion too, with the patch's outside counting as empty for dilation)."""
    import torch.nn.functional as F

    from segforge.training.morphology import ball, dilate, erode

    def convolved(mask, radius):
        conv = F.conv3d if mask.ndim == 3 else F.conv2d
        return (conv(mask[None, None], ball(radius, mask.ndim, mask.device), padding=radius)[0, 0] > 0.5).float()

    rng = np.random.default_rng(0)
    for shape in [(20, 30, 25), (40, 50)]:
        mask = convolved(torch.from_numpy((rng.random(shape) < 0.02).astype(np.float32)), 2)
        for radius in range(1, 6):
            assert torch.equal(dilate(mask, radius), convolved(mask, radius))
            assert torch.equal(erode(mask, radius), 1 - convolved(1 - mask, radius))
    assert torch.equal(dilate(torch.zeros(5, 6, 7), 3), torch.zeros(5, 6, 7))
