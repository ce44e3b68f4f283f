"""The trainable segmentation model shared by the supervised segmenters
(:mod:`defectlab.segment.unet`) and the synthetic-defect detectors
(:mod:`defectlab.detect.synthseg`, which add the synthesis).

A model is one :class:`~defectlab.components.networks.SegmentationNet` (U-Net or UNet3+ decoder
over a plain or pretrained Lite0 encoder, with a segmentation and a classification head),
trained with :func:`~defectlab.components.losses.segmentation_loss` (Dice + BCE or Dice + focal
on pixels, BCE on the image label ``mask.any()``) on batches augmented by
:func:`~defectlab.components.augment.augment_pairs`.

Outputs: the map is the defect probability (sigmoid of the pixel logits); the image score is
``score="combined"`` (default): ``classification_share`` × classification probability +
(1 − share) × mean of the top ``score_top_fraction`` of the map, or the classifier alone
(``"classifier"``) or the map statistic alone (``"topk"``). With ``tta=True`` the
probabilities of the augmented views (:data:`~defectlab.components.augment.TTA_TRANSFORMS`)
are combined by their mean or a vote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from defectlab.base import ModelConfig, Prediction, Scorer
from defectlab.components.augment import (
    TTA_COMBINE,
    TTA_TRANSFORMS,
    AugmentSettings,
    augment_pairs,
    combine_views,
    tta_views,
    undo_view,
)
from defectlab.components.losses import LOSSES, segmentation_loss
from defectlab.components.networks import (
    ENCODERS,
    SegmentationNet,
    check_encoder_input,
    load_network_state,
    network_state,
)
from defectlab.config import check_choice
from defectlab.ops import top_fraction_mean

SCORES = ("combined", "classifier", "topk")


@dataclass
class EncoderTrainingConfig(ModelConfig):
    """What every model trained on the segment encoders shares: optimiser, encoder choice
    and training augmentation (``SegmenterConfig``, ``CAMConfig``)."""

    epochs: int = 30
    #: AdamW learning rate and weight decay
    lr: float = 1e-3
    weight_decay: float = 1e-4
    #: "plain" (small conv encoder, trained from scratch) or "lite0" (ImageNet Lite0)
    encoder: str = "plain"
    #: keep the pretrained Lite0 weights fixed (ignored by the plain encoder)
    freeze_encoder: bool = True
    #: channels of the plain encoder's first stage (w, 2w, 4w, 8w, 8w)
    width: int = 16
    #: training augmentation (flip, shift, brightness, contrast, blur, noise)
    augment: bool = True
    aug_brightness: float = 0.1
    aug_contrast: float = 0.2
    aug_noise: float = 0.02
    aug_blur_probability: float = 0.2
    aug_shift: float = 0.05

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        check_choice("encoder", self.encoder, ENCODERS)
        if self.width < 1:
            raise ValueError(f"width must be positive, got {self.width}")
        for name in ("weight_decay", "aug_brightness", "aug_contrast", "aug_noise"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        if not 0 <= self.aug_blur_probability <= 1:
            raise ValueError(
                f"aug_blur_probability must be in [0, 1], got {self.aug_blur_probability}"
            )
        if not 0 <= self.aug_shift < 0.5:
            raise ValueError(f"aug_shift must be in [0, 0.5), got {self.aug_shift}")

    def augment_settings(self) -> AugmentSettings:
        return AugmentSettings(
            flip=True,
            brightness=self.aug_brightness,
            contrast=self.aug_contrast,
            noise=self.aug_noise,
            blur_probability=self.aug_blur_probability,
            shift=self.aug_shift,
        )


@dataclass
class SegmenterConfig(EncoderTrainingConfig):
    #: UNet3+ only: channels each full-scale input is projected to
    cat_channels: int = 16
    #: "dice_bce" or "dice_focal"
    loss: str = "dice_bce"
    dice_weight: float = 1.0
    #: weight of the per-pixel term (BCE or focal)
    pixel_weight: float = 1.0
    focal_gamma: float = 2.0
    #: weight of the image-label BCE of the classification head
    classification_weight: float = 0.5
    #: image score: "combined", "classifier" or "topk" (mean of the map's top fraction)
    score: str = "combined"
    #: weight of the classification probability in the "combined" score
    classification_share: float = 0.5
    score_top_fraction: float = 0.01
    #: test-time augmentation in predict
    tta: bool = False
    tta_transforms: tuple[str, ...] = ("hflip", "vflip", "hvflip")
    #: "mean" of the views' probabilities, or "vote" (share of views above tta_threshold)
    tta_combine: str = "mean"
    tta_threshold: float = 0.5
    tta_noise: float = 0.02
    tta_brightness: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("loss", self.loss, LOSSES)
        check_choice("score", self.score, SCORES)
        check_choice("tta_combine", self.tta_combine, TTA_COMBINE)
        self.tta_transforms = tuple(self.tta_transforms)
        for name in self.tta_transforms:
            check_choice("tta_transforms", name, TTA_TRANSFORMS)
        if self.cat_channels < 1:
            raise ValueError(f"cat_channels must be positive, got {self.cat_channels}")
        for name in (
            "dice_weight",
            "pixel_weight",
            "focal_gamma",
            "classification_weight",
            "tta_noise",
            "tta_brightness",
        ):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        if self.dice_weight == 0 and self.pixel_weight == 0:
            raise ValueError("dice_weight and pixel_weight are both 0: nothing to segment")
        for name in ("classification_share", "tta_threshold"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0 < self.score_top_fraction <= 1:
            raise ValueError(f"score_top_fraction must be in (0, 1], got {self.score_top_fraction}")


class SegmentationModel(Scorer):
    """Network, optimiser, training on image/mask pairs, prediction and state, shared by the
    supervised segmenters and the synthetic-defect detectors (which add the synthesis)."""

    architecture: ClassVar[str] = "unet"
    Config = SegmenterConfig
    config: SegmenterConfig

    def __init__(self, config: SegmenterConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        check_encoder_input(self.name, cfg.encoder, self.image_size, self.channels)
        self.net = SegmentationNet(
            self.architecture,
            cfg.encoder,
            self.channels,
            cfg.width,
            cfg.cat_channels,
            cfg.freeze_encoder,
            self.device,
        )
        self.optimizer: torch.optim.Optimizer | None = None

    # --- training -----------------------------------------------------------------------
    def setup_training(self, n_train: int) -> None:
        parameters = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            parameters, lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    def train_on_pairs(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
        """One optimiser step on images (B, C, H, W) in [0, 1] and masks (B, H, W) in {0, 1}."""
        if self.optimizer is None:
            raise RuntimeError(f"{self.name}: training step before setup_training")
        cfg = self.config
        images = images.to(self.device).float()
        masks = masks.to(self.device).float()
        if cfg.augment:
            images, masks = augment_pairs(images, masks, cfg.augment_settings())
        self.net.train()
        pixel_logits, image_logits = self.net(images)
        terms = segmentation_loss(
            pixel_logits,
            image_logits,
            masks,
            kind=cfg.loss,
            dice_weight=cfg.dice_weight,
            pixel_weight=cfg.pixel_weight,
            classification_weight=cfg.classification_weight,
            focal_gamma=cfg.focal_gamma,
        )
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    # --- inference ----------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel probabilities (B, H, W) and classification probabilities (B,), without TTA."""
        self.net.eval()
        pixel_logits, image_logits = self.net(images.to(self.device).float())
        return torch.sigmoid(pixel_logits[:, 0]), torch.sigmoid(image_logits)

    def image_scores(self, maps: torch.Tensor, classification: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.score == "classifier":
            return classification
        topk = top_fraction_mean(maps, cfg.score_top_fraction)
        if cfg.score == "topk":
            return topk
        share = cfg.classification_share
        return share * classification + (1.0 - share) * topk

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.is_fitted, "untrained networks")
        cfg = self.config
        images = images.to(self.device).float()
        if not cfg.tta:
            maps, classification = self.probabilities(images)
            return Prediction(self.image_scores(maps, classification), maps)
        view_maps, view_classes = [], []
        for name, view in tta_views(images, cfg.tta_transforms, cfg.tta_noise, cfg.tta_brightness):
            maps, classification = self.probabilities(view)
            view_maps.append(undo_view(name, maps))
            view_classes.append(classification)
        maps = combine_views(torch.stack(view_maps), cfg.tta_combine, cfg.tta_threshold)
        classification = combine_views(
            torch.stack(view_classes), cfg.tta_combine, cfg.tta_threshold
        )
        return Prediction(self.image_scores(maps, classification), maps)

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return network_state(self.net)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_network_state(self.name, self.net, state)

    def training_state(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {}
        return {"optimizer": self.optimizer.state_dict()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            if self.optimizer is None:
                raise RuntimeError(f"{self.name}: load_training_state before setup_training")
            self.optimizer.load_state_dict(state["optimizer"])
