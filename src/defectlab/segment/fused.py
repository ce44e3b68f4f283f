"""``fused``: a trained detector's image score with its map fused with a trained segmenter's
defect probability.

The workbench's retrain makes it (:mod:`defectlab.app.retrain`): a detector trained on
normal images ranks images well but outlines defects loosely; a segmenter trained on a few
dozen reviewed defects outlines them better but, having seen few normal parts, ranks images
worse. So the image score stays the detector's, unchanged (its ranking, and the image
threshold the reviews recalibrated), and only the map changes: the segmenter's probability,
gated by or averaged with the detector's map on [0, 1]
(:func:`~defectlab.components.fusion.fuse_maps`; which one, the retrain decides on its
reviewed hold-out).

Like ``ensemble`` it loads its member runs (``runs.load_run``), so it never imports another
family. "Training" is one pass that fits nothing: the members are already trained, and the
detector's normal map median and pixel threshold (the scale of its map) are read from the
detector run's calibration and kept in the state. With ``image_threshold`` and
``pixel_threshold`` set (the retrain sets both) the run's calibration takes them, so
``predict``, ``evaluate``, ``serve`` and the workbench decide alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from defectlab.base import ModelConfig, Prediction
from defectlab.components.fusion import MAP_FUSIONS, adapt_batch, fuse_maps, resize_maps
from defectlab.config import check_choice
from defectlab.registry import register
from defectlab.segment.base import Segmenter


@dataclass
class FusedConfig(ModelConfig):
    #: run directory of a trained detector: its image score is the fused run's score
    detector_run: str = ""
    #: run directory of a trained segmenter (or any scorer whose map is a probability)
    segmenter_run: str = ""
    #: how the two maps become one (see components.fusion.MAP_FUSIONS)
    fusion: str = "product"
    #: decision thresholds fixed by whoever built the run (both or neither; ``None``:
    #: calibrated on normal validation images like any run)
    image_threshold: float | None = None
    pixel_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.epochs != 1:
            raise ValueError("fused trains nothing (its members are trained): epochs must be 1")
        check_choice("fusion", self.fusion, MAP_FUSIONS)
        if (self.image_threshold is None) != (self.pixel_threshold is None):
            raise ValueError("image_threshold and pixel_threshold are set together or not at all")


@register
class FusedSegmenter(Segmenter):
    name: ClassVar[str] = "fused"
    description: ClassVar[str] = (
        "a trained detector's image score; its map fused with a trained segmenter's probability"
    )
    Config = FusedConfig
    config: FusedConfig

    def __init__(self, config: FusedConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if not self.config.detector_run or not self.config.segmenter_run:
            raise ValueError(
                "fused needs two trained runs: --set detector_run=RUN --set segmenter_run=RUN"
            )
        from defectlab.runs import load_run  # runs load through the registry, which imports us

        detector = load_run(self.config.detector_run, str(self.device))
        segmenter = load_run(self.config.segmenter_run, str(self.device))
        self.detector = detector.model
        self.segmenter = segmenter.model
        #: the detector's map scale: normal map median and calibrated pixel threshold
        self.detector_level = (
            float(detector.calibration["map_median"]),
            float(detector.pixel_threshold),
        )

    @property
    def decision_thresholds(self) -> tuple[float, float] | None:
        if self.config.pixel_threshold is None or self.config.image_threshold is None:
            return None
        return self.config.image_threshold, self.config.pixel_threshold

    def export_blocker(self) -> str | None:
        for run, member in (
            (self.config.detector_run, self.detector),
            (self.config.segmenter_run, self.segmenter),
        ):
            reason = member.export_blocker()
            if reason:
                return f"member {run} ({member.name}): {reason}"
        return None

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {}

    def member_predictions(self, images: torch.Tensor) -> tuple[Prediction, Prediction]:
        """The detector's and the segmenter's predictions, maps at the input size."""
        size = (images.shape[-2], images.shape[-1])
        out = []
        for member in (self.detector, self.segmenter):
            pred = member.predict(adapt_batch(images, member.image_size, member.channels))
            out.append(Prediction(pred.scores, resize_maps(pred.maps, size)))
        return out[0], out[1]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.is_fitted, "members not joined by training")
        detector, segmenter = self.member_predictions(images.to(self.device))
        median, threshold = self.detector_level
        maps = fuse_maps(detector.maps, segmenter.maps, self.config.fusion, median, threshold)
        return Prediction(detector.scores, maps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "runs": [self.config.detector_run, self.config.segmenter_run],
            "detector_level": list(self.detector_level),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        runs = [self.config.detector_run, self.config.segmenter_run]
        if list(state["runs"]) != runs:
            raise ValueError(f"fused was built from runs {state['runs']}, not {runs}")
        median, threshold = state["detector_level"]
        self.detector_level = (float(median), float(threshold))
