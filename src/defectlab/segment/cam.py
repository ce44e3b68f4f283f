"""Weakly supervised segmentation from image labels: class activation maps (``cam``).

The model is an image classifier (the plain or Lite0 encoder of
:mod:`defectlab.components.networks` + global average/max pooling + a two-layer head) trained
with BCE on the batch ``label`` alone (0 normal, 1 defect); ``mask`` is never read, so it
learns from exactly what a weak annotator gives. Training needs both classes: through
:func:`defectlab.api.train` that means K-shot defect images (``data.defects_per_class=K``).

Maps are class activation maps of the defect logit over the encoder stages in ``cam_layers``
(Python indices over the five stages; −1 is the deepest). ``cam_method="layercam"`` (default,
Jiang et al. 2021) weights every activation by the ReLU of the logit's gradient *at that
position*; ``"gradcam"`` (Selvaraju et al. 2017) by the channel's spatially averaged gradient.
Either way the map is ReLU(Σ weight × activation), bilinearly up-sampled to the input size
and divided by its per-image maximum; the stages' maps are averaged (an earlier, finer stage
sharpens the deepest one's blob) and rescaled to a peak of 1. LayerCAM is the default because
on the synthetic blobs of the tests it put more of its map mass inside the defect than Grad-CAM
did, for every seed tried (Grad-CAM's channel-mean weights lose the localisation of the
shallower stage). With ``normalize="probability"`` (default) the map is
then multiplied by the image's defect probability, so a confidently normal image gets a
near-zero map and pixel thresholds calibrated on normal images mean something; ``"minmax"``
keeps every map's peak at 1 (pure localisation, e.g. for the oracle-threshold Dice).

Which stages: by default the stride-16 and stride-8 stages of either encoder (the plain
encoder's last two, (−1, −2); Lite0's (−2, −3), since its deepest stage has stride 32, 3 × 3
at 96 px, too coarse to draw a defect). How that was chosen and what it gives on magnetic
tile: ``docs/models/cam.md``.

Masks: by default the run's calibrated pixel threshold (a quantile of normal validation
pixels). ``peak_fraction=r`` (with ``normalize="minmax"``) uses CAM's own rule instead (Zhou et
al. 2016 keep the region above 20% of the map's maximum): a pixel is defect when its map
value is at least ``r`` × the image's peak, and an image is defective when the classifier's
probability is at least 0.5 (the class-balanced decision point). Both thresholds are fixed
by the model (``decision_thresholds``), so no normal validation quantile is involved; on an
image the classifier calls normal the mask still shows where a defect would be, which is
what the image decision is for.

Refinement (``refine="guided"``): a guided filter (He et al. 2010) in plain torch, with the
grey image as guide, pulls the coarse map's edges onto image edges. A dense CRF
(``pydensecrf``) was the first choice, but it ships only a 2018 source distribution whose
build fails here (no wheel for this Python), and scikit-image (SLIC) is not a dependency:
hence the guided filter, which also runs on the GPU with the rest of the model.

The image score is the classifier probability, so ``defectlab evaluate`` reports image AUROC
from it like for any detector. The registry gives a class one family; ``cam`` is a
``segmenter`` (it trains on labelled defects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.base import Prediction
from defectlab.components.augment import augment_pairs
from defectlab.components.networks import (
    Lite0Encoder,
    PlainEncoder,
    TrainableState,
    check_encoder_input,
    load_network_state,
    network_state,
)
from defectlab.components.segmentation import EncoderTrainingConfig
from defectlab.config import check_choice
from defectlab.errors import ConfigError
from defectlab.registry import register
from defectlab.segment.base import Segmenter

NORMALIZATIONS = ("probability", "minmax")
REFINEMENTS = ("none", "guided")
CAM_METHODS = ("gradcam", "layercam")
#: both encoders have five stages; cam_layers index them
N_STAGES = 5
#: default cam_layers per encoder: its stride-16 and stride-8 stages
DEFAULT_CAM_LAYERS = {"plain": (-1, -2), "lite0": (-2, -3)}


@dataclass
class CAMConfig(EncoderTrainingConfig):
    #: encoder stages whose CAMs are averaged (−1 deepest, −2 the one before, …); None: the
    #: encoder's stride-16 and stride-8 stages (``DEFAULT_CAM_LAYERS``)
    cam_layers: tuple[int, ...] | None = None
    #: "gradcam" (channel weight = mean gradient) or "layercam" (per-position ReLU(gradient))
    cam_method: str = "layercam"
    #: "probability": map × defect probability (normal images get low maps); "minmax": peak 1
    normalize: str = "probability"
    #: "none" or "guided" (edge-aware guided filter with the image as guide)
    refine: str = "none"
    #: guided filter window radius in pixels and regularisation ε (larger ε = smoother)
    guide_radius: int = 4
    guide_eps: float = 1e-2
    #: weight normal and defect images equally in the BCE, by their running counts (defects
    #: are few)
    balance_classes: bool = True
    #: 0: masks at the run's calibrated pixel threshold; r in (0, 1): CAM's rule, pixels at or
    #: above r × the map's peak (needs normalize="minmax"; module docstring)
    peak_fraction: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_choice("cam_method", self.cam_method, CAM_METHODS)
        check_choice("refine", self.refine, REFINEMENTS)
        if self.cam_layers is None:
            self.cam_layers = DEFAULT_CAM_LAYERS[self.encoder]
        layers = tuple(int(i) for i in self.cam_layers)
        if not layers or any(not -N_STAGES <= i < N_STAGES for i in layers):
            raise ValueError(
                f"cam_layers must be stage indices in [{-N_STAGES}, {N_STAGES - 1}], got "
                f"{self.cam_layers}"
            )
        if len({i % N_STAGES for i in layers}) != len(layers):
            raise ValueError(f"cam_layers names a stage twice: {self.cam_layers}")
        self.cam_layers = layers
        if self.guide_radius < 1:
            raise ValueError(f"guide_radius must be at least 1, got {self.guide_radius}")
        if not (self.guide_eps > 0 and math.isfinite(self.guide_eps)):
            raise ValueError(f"guide_eps must be positive, got {self.guide_eps}")
        if not 0 <= self.peak_fraction < 1:
            raise ValueError(f"peak_fraction must be in [0, 1), got {self.peak_fraction}")
        if self.peak_fraction and self.normalize != "minmax":
            raise ValueError(
                "peak_fraction is a fraction of each map's own peak, so it needs "
                f'normalize="minmax" (every map peaks at 1); got normalize={self.normalize!r}'
            )


def guided_filter(
    guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float
) -> torch.Tensor:
    """He et al.'s guided filter: ``source`` (B, 1, H, W) smoothed within regions of similar
    ``guide`` (B, 1, H, W) intensity, so map edges snap to image edges. Box means over a
    (2r+1)² window, shrinking at the border (``count_include_pad=False``)."""

    def box(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)

    mean_i, mean_p = box(guide), box(source)
    var_i = (box(guide * guide) - mean_i * mean_i).clamp_min(0.0)
    cov_ip = box(guide * source) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box(a) * guide + box(b)


def _peak_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Divide each (B, 1, H, W) map by its maximum; all-zero maps stay zero."""
    peak = maps.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(1e-12), torch.zeros_like(maps))


class CAMNet(TrainableState):
    """Encoder + (global average ‖ max pooling of the deepest stage) → MLP → one logit."""

    def __init__(
        self,
        encoder: str,
        in_channels: int,
        width: int,
        freeze_encoder: bool,
        device: str | torch.device,
    ) -> None:
        super().__init__()
        self.encoder: PlainEncoder | Lite0Encoder = (
            PlainEncoder(in_channels, width)
            if encoder == "plain"
            else Lite0Encoder(freeze_encoder, device)
        )
        deep = self.encoder.channels[-1]
        hidden = max(16, deep // 4)
        self.head = nn.Sequential(
            nn.Linear(2 * deep, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1)
        )
        self.to(device)

    def stage_features(self, images: torch.Tensor, keep_graph: bool = False) -> list[torch.Tensor]:
        """Features of every stage; ``keep_graph`` runs a frozen Lite0 with autograd on too,
        so the CAM can differentiate the logit by its earlier stages."""
        if keep_graph and isinstance(self.encoder, Lite0Encoder):
            return self.encoder.features(images)
        return self.encoder(images)

    def classify(self, deepest: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([deepest.mean(dim=(2, 3)), deepest.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.stage_features(images)[-1])


@register
class CAMSegmenter(Segmenter):
    """Classifier on image labels; maps are multi-scale CAMs (see module docstring)."""

    name: ClassVar[str] = "cam"
    onnx_blocker: ClassVar[str | None] = (
        "class activation maps need the gradient of the class logit at inference (autograd), "
        "which ONNX graphs do not compute"
    )
    description: ClassVar[str] = (
        "weak segmentation from image labels: classifier + multi-scale LayerCAM/Grad-CAM maps"
    )
    Config = CAMConfig
    config: CAMConfig
    #: the API adds the K-shot defect images and refuses a split without them
    trains_on_defects: ClassVar[bool] = True

    def __init__(self, config: CAMConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        check_encoder_input(self.name, cfg.encoder, self.image_size, self.channels)
        self.net = CAMNet(cfg.encoder, self.channels, cfg.width, cfg.freeze_encoder, self.device)
        self.optimizer: torch.optim.Optimizer | None = None
        #: normal and defect images seen in training: class weights, one-class refusal
        self._label_counts = [0, 0]

    # --- training -----------------------------------------------------------------------
    def setup_training(self, n_train: int) -> None:
        parameters = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            parameters, lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One BCE step on ``image`` and ``label``; ``mask`` is deliberately not read."""
        if self.optimizer is None:
            raise RuntimeError(f"{self.name}: training step before setup_training")
        cfg = self.config
        images = batch["image"].to(self.device).float()
        labels = batch["label"].to(self.device).float().flatten()
        if labels.numel() != images.shape[0] or not ((labels == 0) | (labels == 1)).all():
            raise ValueError(f"{self.name}: batch labels must be 0 (normal) or 1 (defect)")
        if cfg.augment:
            blank = torch.zeros(images.shape[0], *images.shape[2:], device=self.device)
            images, _ = augment_pairs(images, blank, cfg.augment_settings())
        self.net.train()
        logits = self.net(images)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        positive = labels == 1
        self._label_counts[1] += int(positive.sum())
        self._label_counts[0] += int((~positive).sum())
        if cfg.balance_classes:
            # inverse running class frequency: K-shot batches often hold no defect at all, so
            # per-batch balancing would leave most steps pushing everything towards "normal"
            share = self._label_counts[1] / sum(self._label_counts)
            weights = torch.where(positive, 0.5 / max(share, 1e-6), 0.5 / max(1 - share, 1e-6))
            loss = (weights * bce).mean()
        else:
            loss = bce.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        accuracy = ((logits.detach() > 0).float() == labels).float().mean()
        return {"loss": float(loss.detach()), "accuracy": float(accuracy)}

    def end_epoch(self, epoch: int) -> None:
        if epoch == 0 and 0 in self._label_counts:
            held = "defect" if self._label_counts[0] == 0 else "normal"
            raise ConfigError(
                f"{self.name} learns from normal and defective images, but the training set "
                f"held only {held} images: set data.defects_per_class"
            )

    # --- inference ----------------------------------------------------------------------
    def activation_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Peak-normalised, averaged CAMs (B, 1, H, W) in [0, 1] and defect
        probabilities (B,). Re-enables autograd, so it works under ``torch.no_grad``."""
        self.net.eval()
        size = images.shape[-2:]
        stages = [i % N_STAGES for i in self.config.cam_layers]
        with torch.enable_grad():
            x = images.detach().to(self.device).float().requires_grad_(True)
            features = self.net.stage_features(x, keep_graph=True)
            logits = self.net.classify(features[-1])
            chosen = [features[i] for i in stages]
            # each image's logit depends on its own features only (eval mode): sum is safe
            grads = torch.autograd.grad(logits.sum(), chosen)
        cams = []
        for activation, grad in zip(chosen, grads, strict=True):
            if self.config.cam_method == "layercam":
                weights = F.relu(grad)  # per position: keeps fine stages' localisation
            else:
                weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
            cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
            cams.append(_peak_normalise(cam))
        cam = _peak_normalise(torch.stack(cams).mean(dim=0))
        return cam, torch.sigmoid(logits.detach())

    def refine(self, images: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
        """Edge-aware refinement of (B, 1, H, W) maps in [0, 1]; output stays in [0, 1]."""
        if self.config.refine == "none":
            return cam
        guide = images.to(self.device).float().mean(dim=1, keepdim=True)
        refined = guided_filter(guide, cam, self.config.guide_radius, self.config.guide_eps)
        return _peak_normalise(refined.clamp(0.0, 1.0))

    @property
    def decision_thresholds(self) -> tuple[float, float] | None:
        """With ``peak_fraction`` the image and pixel thresholds are the model's own (0.5
        probability, the fraction of a peak-1 map); the API's quantile calibration defers."""
        if not self.config.peak_fraction:
            return None
        return 0.5, self.config.peak_fraction

    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.is_fitted, "untrained networks")
        images = images.to(self.device).float()
        cam, probability = self.activation_maps(images)
        cam = self.refine(images, cam)[:, 0]
        if self.config.normalize == "probability":
            cam = cam * probability[:, None, None]
        return Prediction(probability, cam)

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return network_state(self.net)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_network_state(self.name, self.net, state)

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"label_counts": list(self._label_counts)}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        self._label_counts = [int(v) for v in state.get("label_counts", [0, 0])]
        if "optimizer" in state:
            if self.optimizer is None:
                raise RuntimeError(f"{self.name}: load_training_state before setup_training")
            self.optimizer.load_state_dict(state["optimizer"])
