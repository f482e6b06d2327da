"""The branches only a GPU reaches, on the CPU: ``torch.cuda`` is mocked and a "cuda" device is the CPU in disguise
(tensors and modules moved "to cuda" stay on the CPU, each move recorded). Device selection and its refusal, the
out-of-memory fallback of prediction, pinned memory and asynchronous host-to-device copies in training and
prediction."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from segforge.errors import SegforgeError
from segforge.inference.predictor import Predictor
from segforge.io.model_folder import select_device

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def _cuda(value) -> bool:
    return isinstance(value, (str, torch.device)) and torch.device(value).type == "cuda"


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device that is the CPU: returns the record of host-to-device copies, one dict per ``Tensor.to`` to
    "cuda" (``pinned``: whether the source was pinned, ``non_blocking``)."""
    copies = []
    tensor_to, module_to = torch.Tensor.to, nn.Module.to

    def to(self, *args, **kwargs):
        if any(_cuda(a) for a in [*args, kwargs.get("device")]):
            copies.append({"pinned": getattr(self, "fake_pinned", False), "non_blocking": kwargs.get("non_blocking", False)})
            args = [CPU if _cuda(a) else a for a in args]
            kwargs = {k: CPU if k == "device" and _cuda(v) else v for k, v in kwargs.items()}
        return tensor_to(self, *args, **kwargs)

    def pin_memory(self, *args, **kwargs):
        pinned = self.clone()
        pinned.fake_pinned = True
        return pinned

    def module_to_device(self, *args, **kwargs):
        device = next((a for a in [*args, kwargs.get("device")] if isinstance(a, (str, torch.device))), None)
        if device is not None:
            self.fake_device = torch.device(device).type  # where the predictor meant to put the module
        args = [CPU if _cuda(a) else a for a in args]
        kwargs = {k: CPU if k == "device" and _cuda(v) else v for k, v in kwargs.items()}
        return module_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(nn.Module, "to", module_to_device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return copies


def test_device_auto_takes_the_gpu_when_there_is_one_and_cuda_is_refused_without(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto").type == "cuda" and select_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto").type == "cpu"
    with pytest.raises(SegforgeError, match="no CUDA device is available. Fix: device=cpu or device=auto"):
        select_device("cuda")


class ThresholdOnGpuOOM(nn.Module):
    """Two-class logits (class 1 where the input exceeds 0.5); out of memory whenever it was moved "to cuda"."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(20.0))
        self.fake_device = "cpu"
        self.attempts = []

    def forward(self, x, cond=None):
        self.attempts.append(self.fake_device)
        if self.fake_device == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.cat([torch.zeros_like(x[:, :1]), self.gain * (x[:, :1] - 0.5)], 1)


def _plans() -> dict:
    return {"channel_names": {"0": "MRI"}, "normalization": [{"scheme": "none"}],
            "configurations": {"3d_fullres": {"dims": 3, "patch_size": [8, 16, 16], "target_spacing": [2.0, 1.0, 1.0],
                                              "mirror_axes": [0, 1, 2]}}}


DATASET = {"labels": {"background": 0, "thing": 1}, "file_ending": ".nii.gz", "channel_names": {"0": "MRI"}}


def _case():
    from conftest import ROTATED
    from segforge.io.image import Geometry

    image = np.zeros((1, 10, 24, 20), np.float32)
    image[0, 2:8, 3:20, 4:16] = 0.2
    image[0, 3:7, 6:14, 6:12] = 1.0
    return image, Geometry(spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=ROTATED, ndim=3)


@pytest.mark.parametrize("path", ["predict", "probabilities"])
def test_a_case_running_the_gpu_out_of_memory_is_predicted_on_the_cpu_alike(fake_cuda, caplog, path):
    """Both ways through the predictor (streamed labels; full probabilities) catch the OOM, warn, redo the case on
    the CPU with the same result, and put the network back on the GPU for the next case."""
    image, geometry = _case()
    reference = Predictor(_plans(), DATASET, "3d_fullres", [ThresholdOnGpuOOM()], CPU, mirror=False)
    network = ThresholdOnGpuOOM()
    model = Predictor(_plans(), DATASET, "3d_fullres", [network], torch.device("cuda"), mirror=False)
    assert network.fake_device == "cuda"
    with caplog.at_level(logging.WARNING):
        if path == "predict":
            mask, expected = model.predict(image.copy(), geometry)[0], reference.predict(image.copy(), geometry)[0]
        else:
            mask, expected = (model.labels(m.probabilities(image, geometry)[0]) for m in (model, reference))
    assert "GPU out of memory; predicting this case on the CPU" in caplog.text
    assert network.attempts[0] == "cuda" and set(network.attempts[1:]) == {"cpu"}
    np.testing.assert_array_equal(mask, expected)
    assert 0 < (mask == 1).sum() < mask.size
    assert network.fake_device == "cuda"  # the next case on the GPU again


def test_an_out_of_memory_error_on_the_cpu_is_not_retried(monkeypatch):
    network = ThresholdOnGpuOOM()
    network.fake_device = "cuda"  # it raises, but the predictor is on the CPU: nothing to fall back to
    model = Predictor(_plans(), DATASET, "3d_fullres", [network], CPU, mirror=False)
    network.fake_device = "cuda"
    with pytest.raises(torch.cuda.OutOfMemoryError):
        model.predict(*_case())
    assert len(network.attempts) == 1


def test_prediction_copies_the_case_to_the_gpu_from_pinned_memory_without_blocking(fake_cuda):
    image, geometry = _case()

    class Threshold(ThresholdOnGpuOOM):
        def forward(self, x, cond=None):
            return torch.cat([torch.zeros_like(x[:, :1]), self.gain * (x[:, :1] - 0.5)], 1)

    model = Predictor(_plans(), DATASET, "3d_fullres", [Threshold()], torch.device("cuda"), mirror=False)
    fake_cuda.clear()  # the network's parameters moved at construction
    model.predict(image, geometry)
    model.probabilities(image, geometry)
    assert fake_cuda == [{"pinned": True, "non_blocking": True}] * 2  # the case, once per prediction


def _datamodule(tmp_path, data_cfg: dict, device: str):
    from segforge.training.data import SegmentationDataModule

    cfg = {"augmentation": None, "num_workers": 0, "torch_threads": torch.get_num_threads(), **data_cfg}
    module = SegmentationDataModule(tmp_path, ["a"], [], [8, 16, 16], 3, 2, cfg, 0)
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), num_devices=1,
                                     global_rank=0, world_size=1)
    return module


@pytest.mark.parametrize("device,setting,pinned", [("cuda", "auto", True), ("cpu", "auto", False),
                                                   ("cuda", False, False), ("cpu", True, True)])
def test_training_loaders_pin_their_batches_when_training_on_a_gpu(tmp_path, device, setting, pinned):
    module = _datamodule(tmp_path, {"pin_memory": setting}, device)
    assert module._loader([], 4, True, None).pin_memory is pinned


@pytest.mark.parametrize("kind", ["crops", "augmented"])
def test_training_batches_go_to_the_gpu_without_blocking(fake_cuda, kind):
    """Lightning moves each batch with the training module's transfer hook: every tensor of it, asynchronously (the
    pinned loader memory is what makes that copy overlap the step before)."""
    from segforge.training.module import SegmentationModule

    image, label = torch.zeros(2, 1, 8, 16, 16), torch.zeros(2, 1, 8, 16, 16)
    batch = (image, label) if kind == "augmented" else {"image": image, "label": label, "params": {"angle": torch.zeros(2)}}
    module = SegmentationModule(nn.Identity(), nn.MSELoss(), {}, 2)
    fake_cuda.clear()
    module.transfer_batch_to_device(batch, torch.device("cuda"), 0)
    assert len(fake_cuda) == (2 if kind == "augmented" else 3)
    assert all(copy["non_blocking"] for copy in fake_cuda)


def test_each_rank_times_its_forward_passes_on_its_own_gpu(monkeypatch):
    """Budget timing runs before Lightning sets the device: rank k must use cuda:k, not GPU 0 with every other rank."""
    from omegaconf import OmegaConf

    from segforge.training.run import _validation_device

    cfg = OmegaConf.create({"trainer": {"accelerator": "auto"}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _validation_device(cfg) == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert _validation_device(cfg) == torch.device("cuda", 3)
    monkeypatch.delenv("SLURM_LOCALID")
    assert _validation_device(cfg) == torch.device("cuda", 0)
    assert _validation_device(OmegaConf.create({"trainer": {"accelerator": "cpu"}})) == torch.device("cpu")
