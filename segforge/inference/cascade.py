"""Predict with a cascade (nnU-Net's ``predict_from_raw_data`` with ``prev_stage_predictions``): the previous stage
(3d_lowres) predicts the case, then the cascade stage (3d_cascade_fullres) predicts it again with that mask's one-hot
encoding as extra input channels; the result is on the input's exact grid like any prediction.

``segforge predict --model LOWRES --model CASCADE``: ``pair_stages`` finds, for every model whose configuration has a
``previous_stage``, the model of that configuration among the others and makes the two one ``Cascade``; what is
left of the models is an ensemble as before. A cascade model without its previous stage is refused, with the fix.
"""

from __future__ import annotations

import numpy as np
import torch

from segforge.errors import SegforgeError
from segforge.io.image import Geometry, read_case
from segforge.workspace import DEFAULT_PLANS, model_folder_name


class Cascade:
    """A previous-stage predictor and the cascade stage's predictor, used like one ``Predictor``."""

    def __init__(self, previous, stage):
        if previous.class_names != stage.class_names:
            raise SegforgeError(f"the {previous.configuration} model predicts {previous.class_names}, the "
                                f"{stage.configuration} model {stage.class_names}: a cascade needs models of one "
                                "dataset. Fix: pass the two model folders of one `segforge train` dataset")
        self.previous, self.stage = previous, stage
        self.plans, self.dataset_json = stage.plans, stage.dataset_json
        self.configuration, self.plan_config = stage.configuration, stage.plan_config
        self.regions_class_order = stage.regions_class_order

    @property
    def class_names(self) -> list[str]:
        return self.stage.class_names

    @property
    def average_logits(self) -> bool:
        return self.stage.average_logits

    def _activation(self, logits: torch.Tensor) -> torch.Tensor:
        return self.stage._activation(logits)

    def labels(self, probabilities: torch.Tensor) -> np.ndarray:
        return self.stage.labels(probabilities)

    def _read(self, image, geometry: Geometry | None) -> tuple[np.ndarray, Geometry]:
        if not isinstance(image, np.ndarray):
            image, geometry = read_case([image] if not isinstance(image, (list, tuple)) else list(image))
        return image, geometry

    def previous_mask(self, image: np.ndarray, geometry: Geometry) -> np.ndarray:
        """The previous stage's mask of ``image``, on its grid (the image is left as it was)."""
        return self.previous.predict(image, geometry, overwrite_input=False)[0]

    def probabilities(self, image, geometry: Geometry | None = None) -> tuple[torch.Tensor, Geometry]:
        image, geometry = self._read(image, geometry)
        return self.stage.probabilities(image, geometry, previous=self.previous_mask(image, geometry))

    def predict(self, image, geometry: Geometry | None = None, overwrite_input: bool = False) -> tuple[np.ndarray, Geometry]:
        image, geometry = self._read(image, geometry)
        prior = self.previous_mask(image, geometry)
        return self.stage.predict(image, geometry, overwrite_input=overwrite_input, previous=prior)


def plans_name(plans: dict) -> str:
    """The plan a model folder's plans.json records (none: the default plan)."""
    return str(plans.get("plans_name", DEFAULT_PLANS))


def pair_stages(predictors: list, sources: list) -> list:
    """``predictors`` (of the model folders ``sources``, in the order given) with each cascade stage joined to the
    predictor of its ``previous_stage`` (which it then uses up); refused when that one is not among them."""
    stages = [p for p in predictors if getattr(p, "previous_stage", None)]
    used, joined = set(), {}
    for stage in stages:  # the previous stage of the same plan (a cascade trained on that plan's lowres folds)
        found = [i for i, p in enumerate(predictors) if i not in used and p is not stage
                 and p.configuration == stage.previous_stage and not getattr(p, "previous_stage", None)
                 and plans_name(p.plans) == plans_name(stage.plans)]
        if not found:
            source = sources[predictors.index(stage)]
            previous = model_folder_name(stage.previous_stage, plans_name(stage.plans))
            raise SegforgeError(f"{source}: is a {stage.configuration} model of plans {plans_name(stage.plans)}, a "
                                f"cascade stage that takes the {stage.previous_stage} prediction of the same plans as "
                                f"input, and no such {stage.previous_stage} model was given. Fix: pass its model "
                                f"folder too: `segforge predict -i IMAGES -o OUT --model {source.parent / previous} "
                                f"--model {source}`")
        used.add(found[0])
        joined[id(stage)] = Cascade(predictors[found[0]], stage)
    return [joined.get(id(p), p) for i, p in enumerate(predictors) if i not in used]
