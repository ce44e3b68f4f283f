"""Base of the normal → defect translators (CrossGAN, CycleGAN): :class:`GANConfig`,
:class:`TranslationGAN` and the rule that turns a translated image into a defect mask.

CrossGAN (:mod:`defectlab.synth.crossgan`) and the CycleGAN baseline
(:mod:`defectlab.synth.cyclegan`) differ only in their networks and losses; the rest —
training (:mod:`defectlab.synth.gan`) and, above all, the mask rule — is held equal here.

**Mask rule** (:func:`difference_mask`). A translated image ``g`` is aligned pixel for pixel
with its source normal image ``x``, so the defect is where they differ:

1. ``d = mean over channels |g − x|`` (image range [0, 1]);
2. ``d`` is Gaussian-blurred with ``mask_blur`` px (0 = off) so single noisy pixels do not
   count;
3. threshold ``t``: with ``mask_rule="std"`` ``t = max(mean(d) + mask_k · std(d),
   mask_min_diff)`` (adapts to how much a generator changes the background; the floor keeps
   a near-identical output from producing a mask of noise), with ``mask_rule="fixed"``
   ``t = mask_level``; the mask is ``d > t``;
4. morphological opening with an elliptical ``2·mask_open + 1`` kernel (0 = off), then
   removal of 8-connected components smaller than ``mask_min_area`` pixels.

The record of each sample states the rule, ``t`` and the mask area.

**Localised edits** (``generator="residual_attention"``). The generators output an image
``G`` and a soft attention map ``a`` in (0, 1); the translation is ``a·G + (1 − a)·x``. This
form was chosen over ``x + a·r``: a convex combination of two in-range images stays in range,
so no clipping (and no dead gradient) is needed. Training adds ``attention_sparsity_weight ·
mean(a)`` and ``attention_tv_weight · TV(a)`` over every map the generator step produces. At
synthesis the mask comes from the map, not from a difference (:func:`attention_mask`):
``a > attention_threshold``, then the same opening and minimum area as above; the map is
zeroed outside the mask and the blend is done in [0, 1] image space, so every pixel outside
the mask is the source's, bit for bit, and the mask is exactly the support of the edit.
``generator="full"`` keeps the seed's whole-image generators and the difference rule.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np
import torch

from defectlab.base import SynthSample
from defectlab.components.gan_layers import GENERATOR_KINDS, attention_priors, to_image
from defectlab.config import check_choice, check_fields
from defectlab.data.transforms import resize_image
from defectlab.synth.gan import GANSynthesizer, GANTrainingConfig

#: the mask rules of :func:`difference_mask`
MASK_RULES = ("std", "fixed")


# --- mask rule -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskRule:
    """The settings of :func:`difference_mask` (see the module docstring)."""

    rule: str = "std"
    k: float = 2.0
    level: float = 0.1
    min_diff: float = 0.02
    blur: float = 1.0
    open_radius: int = 1
    min_area: int = 8

    def describe(self) -> str:
        if self.rule == "fixed":
            core = f"|g-x|>{self.level:g}"
        else:
            core = f"|g-x|>max(mean+{self.k:g}std,{self.min_diff:g})"
        return f"{core} blur={self.blur:g} open={self.open_radius} min_area={self.min_area}"


def difference_mask(
    generated: np.ndarray, source: np.ndarray, rule: MaskRule
) -> tuple[np.ndarray, float]:
    """Bool (H, W) mask of where ``generated`` differs from its aligned ``source`` (both
    (H, W[, C]) in [0, 1]) and the threshold used; the rule is in the module docstring."""
    diff = np.abs(np.asarray(generated, np.float32) - np.asarray(source, np.float32))
    if diff.ndim == 3:
        diff = diff.mean(axis=2)
    if rule.blur > 0:
        diff = cv2.GaussianBlur(diff, (0, 0), rule.blur, borderType=cv2.BORDER_REFLECT)
    if rule.rule == "fixed":
        threshold = float(rule.level)
    else:
        threshold = max(float(diff.mean() + rule.k * diff.std()), float(rule.min_diff))
    return clean_mask(diff > threshold, rule.open_radius, rule.min_area), threshold


def clean_mask(mask: np.ndarray, open_radius: int, min_area: int) -> np.ndarray:
    """Opening with an elliptical ``2·open_radius + 1`` kernel (0 = off), then removal of
    8-connected components smaller than ``min_area`` pixels; bool (H, W)."""
    mask = np.asarray(mask).astype(np.uint8)
    if open_radius > 0:
        size = 2 * open_radius + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    if min_area > 1 and mask.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = np.zeros(n, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
        mask = keep[labels].astype(np.uint8)
    return mask.astype(bool)


def attention_mask(attention: np.ndarray, threshold: float, rule: MaskRule) -> np.ndarray:
    """Bool (H, W) mask of an attention map (H, W): ``a > threshold``, cleaned with the
    rule's opening and minimum area (its difference settings do not apply)."""
    return clean_mask(np.asarray(attention) > threshold, rule.open_radius, rule.min_area)


def localised_edit(
    source: np.ndarray, generated: np.ndarray, attention: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """``a·G + (1 − a)·x`` in [0, 1] image space with ``a`` zeroed outside ``mask``: pixels
    outside the mask are ``source``'s exactly. ``source``/``generated`` (H, W, C),
    ``attention``/``mask`` (H, W)."""
    a = np.where(mask, attention, 0).astype(np.float32)[:, :, None]
    return a * generated + (1 - a) * source


# --- translators -------------------------------------------------------------------------------


@dataclass
class GANConfig(GANTrainingConfig):
    """Settings of the translation GANs (CrossGAN, CycleGAN): training, plus the rule that
    turns a generated image's difference to its source into a defect mask."""

    #: mask rule (module docstring): "std" (mean + k·std, floored) or "fixed"
    mask_rule: str = "std"
    mask_k: float = 2.0
    mask_level: float = 0.1
    mask_min_diff: float = 0.02
    mask_blur: float = 1.0
    mask_open: int = 1
    mask_min_area: int = 8
    #: "full": the seed's generators output a whole image (mask from the difference);
    #: "residual_attention": an image and an attention map a, output a·G + (1 − a)·x, the
    #: mask from a (module docstring)
    generator: str = "full"
    #: priors on the attention maps (residual_attention only): weight of mean(a) and of TV(a)
    attention_sparsity_weight: float = 1.0
    attention_tv_weight: float = 1.0
    #: synthesis: mask = a > attention_threshold (then opening and minimum area)
    attention_threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(
            self,
            positive=("mask_k",),
            nonnegative=(
                "mask_min_diff",
                "mask_blur",
                "mask_open",
                "mask_min_area",
                "attention_sparsity_weight",
                "attention_tv_weight",
            ),
        )
        check_choice("mask_rule", self.mask_rule, MASK_RULES)
        check_choice("generator", self.generator, GENERATOR_KINDS)
        check_fields(self, open_unit=("mask_level", "attention_threshold"))

    @property
    def attention(self) -> bool:
        return self.generator == "residual_attention"

    @property
    def mask(self) -> MaskRule:
        return MaskRule(
            self.mask_rule,
            self.mask_k,
            self.mask_level,
            self.mask_min_diff,
            self.mask_blur,
            self.mask_open,
            self.mask_min_area,
        )


class TranslationGAN(GANSynthesizer):
    """Base of the normal → defect translators (CrossGAN, CycleGAN): a step pairs normal
    (label 0) and defect (label ≠ 0) images as :class:`GANSynthesizer` describes and trains on
    the pair ``(x, y)`` in [-1, 1]; synthesis translates a normal image and takes the mask
    from the aligned difference (:func:`difference_mask`). Sample grid rows are one
    direction of one pair each: all pairs of the first row, then of the next."""

    Config = GANConfig
    config: GANConfig
    buffers: dict[str, torch.Tensor]
    synthesis_fields: ClassVar[tuple[str, ...]] = (
        "mask_rule",
        "mask_k",
        "mask_level",
        "mask_min_diff",
        "mask_blur",
        "mask_open",
        "mask_min_area",
        "attention_threshold",
    )

    def __init__(self, config: GANConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.examples: list[np.ndarray] = []

    @abstractmethod
    def translate(
        self, x: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """The generator's output for normal ``x`` (1, C, H, W) in [-1, 1] — the defect
        version itself (``generator="full"``) or the image G before blending — its attention
        map (1, 1, H, W) (None for ``"full"``) and what to record."""

    def attention_loss(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sparsity + TV priors of the step's attention maps and their values."""
        sparsity, tv = attention_priors(maps)
        cfg = self.config
        loss = cfg.attention_sparsity_weight * sparsity + cfg.attention_tv_weight * tv
        return loss, {"attention_mean": sparsity.item(), "attention_tv": tv.item()}

    def _pair(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        images = batch["image"].to(self.device, torch.float32)
        labels = batch["label"].to(self.device)
        paired = self._pair_kinds({"normal": images[labels == 0], "defect": images[labels != 0]})
        if paired is None:
            return None
        return paired["normal"] * 2 - 1, paired["defect"] * 2 - 1

    def _as_model_input(self, image: np.ndarray, what: str) -> np.ndarray:
        return resize_image(self._channels_last(image, what), self.image_size)

    def use_defect_examples(self, images: Sequence[np.ndarray]) -> None:
        self.examples = [self._as_model_input(im, "a defect example") for im in images]

    @torch.no_grad()
    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> SynthSample:
        """Translate one normal image into a defect image. The mask is :func:`difference_mask`
        of the result and the (model-size) source (``generator="full"``), or the thresholded
        attention map, outside which the source is copied exactly (``"residual_attention"``).
        Images of another size are resized to the model's size first, and the sample is
        returned at that size."""
        self.check_fitted(self.is_fitted, "untrained networks", action="synthesize")
        source = self._as_model_input(image, "the normal image")
        self.nets.eval()
        generated, attention, record = self.translate(self._to_tensor(source), rng)
        out = to_image(generated[0])
        rule = self.config.mask
        if attention is None:
            mask, threshold = difference_mask(out, source, rule)
            description = rule.describe()
        else:
            threshold = self.config.attention_threshold
            a = attention[0, 0].cpu().numpy()
            mask = attention_mask(a, threshold, rule)
            out = localised_edit(source, out, a, mask)
            description = f"a>{threshold:g} open={rule.open_radius} min_area={rule.min_area}"
        if image.ndim == 2:
            out = out[:, :, 0]
        record = {
            "method": self.name,
            **record,
            "mask_rule": description,
            "mask_threshold": round(threshold, 6),
            "mask_area": int(mask.sum()),
            "resized": tuple(image.shape[:2]) != (self.image_size, self.image_size),
        }
        return SynthSample(out.astype(np.float32), mask, record)
