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
so no clipping (and no dead gradient) is needed.

Every reconstruction term of these models (cross/cycle reconstruction, self-reconstruction,
identity) is minimised exactly by ``a = 0`` (the blend is then its source), and only the
adversarial term asks for an edit, so with the reconstruction terms alone the maps shrink
until nothing is edited and the mask is empty. Training therefore shapes the maps with priors
(:meth:`TranslationGAN.attention_loss`) over the step's maps, by role:

* ``attention_tv_weight · TV(a)`` on every map (compact edits), ``attention_sparsity_weight ·
  mean(a)`` on every map (off by default: it pulls every map towards the empty one);
* the **area prior**, ``attention_area_weight · BCE(a_i, T_i)`` on the maps of normal →
  defect translations (:func:`area_target`): ``T_i`` marks the ``t_i·H·W`` pixels where the
  map, box-blurred, is highest, ``t_i`` the mask area of the real defect image the
  translation is paired with (the one whose detail code CrossGAN uses; the batch's mean area
  where no real defect is tied to the translation). The edit is as large as real defects
  are, and it is one region at full strength, not a faint veil: a prior on ``mean(a)``
  alone is met by ``a = t`` everywhere, which the threshold turns into an empty mask. Where
  the region goes is the generator's own choice (its current map), moved by the adversarial
  and TV terms;
* **mask supervision**, ``attention_mask_weight · BCE(a, m)`` on the maps of the edits of real
  defect images — defect → normal, and the reconstruction of the defect from that result —
  against the real defect's mask ``m``, which every training defect image has: the generators
  learn where a defect is and what shape its region has;
* with ``attention_recon="image"`` (default) the self-reconstruction (CrossGAN) and identity
  (CycleGAN) terms compare the generator's image ``G`` with the target, not the blend, so they
  keep ``G`` faithful without rewarding ``a = 0``; ``"blend"`` applies them to the blend;
* ``attention_gain`` speeds up the attention channel alone
  (:class:`~defectlab.components.gan_layers.AttentionOutput`): the map starts near empty and
  has to cross the threshold within the run.

At synthesis the mask comes from the map, not from a difference (:func:`attention_mask`):
``a > attention_threshold``, then the same opening and minimum area as above; the map is
zeroed outside the mask and the blend is done in [0, 1] image space, so every pixel outside
the mask is the source's, bit for bit, and the mask is exactly the support of the edit.
This is the default; ``generator="full"`` keeps the seed's whole-image generators and the
difference rule (its masks follow texture changes all over the tile, not a defect).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from defectlab.base import SynthSample
from defectlab.components.gan_layers import GENERATOR_KINDS, attention_priors, to_image
from defectlab.config import check_choice, check_fields
from defectlab.data.transforms import resize_image
from defectlab.synth.gan import GANSynthesizer, GANTrainingConfig

#: the mask rules of :func:`difference_mask`
MASK_RULES = ("std", "fixed")
#: where the self-reconstruction / identity terms of an attention generator apply
ATTENTION_RECON = ("image", "blend")


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


def mask_bce(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of an attention map in (0, 1) against a {0, 1} mask, the map
    clamped away from 0 and 1 so a saturated pixel gives a finite loss."""
    return F.binary_cross_entropy(attention.clamp(1e-6, 1 - 1e-6), mask)


def area_target(attention: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """The area prior's target for maps (B, 1, H, W) and areas (B,) in [0, 1]: per map, 1 on
    the ``round(area·H·W)`` pixels where the map box-blurred over ``2r + 1`` px
    (``r = max(1, round(H / 32))``) is highest, 0 elsewhere; no gradient. The blur makes the
    chosen pixels one compact region rather than the map's scattered maxima."""
    with torch.no_grad():
        r = max(1, round(attention.shape[-2] / 32))
        score = F.avg_pool2d(attention, 2 * r + 1, stride=1, padding=r, count_include_pad=False)
        flat = score.flatten(1)
        order = flat.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
        count = (area.clamp(0, 1) * flat.shape[1]).round().long()
        return (ranks < count[:, None]).to(attention.dtype).view_as(attention)


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
    #: "residual_attention" (default): an image and an attention map a, output
    #: a·G + (1 − a)·x, the mask from a, the source kept exactly outside it (module
    #: docstring); "full": the seed's generators output a whole image (mask from the
    #: difference), the seed's exact design
    generator: str = "residual_attention"
    #: priors on the attention maps (residual_attention only; module docstring): weight of
    #: mean(a) and of TV(a) over every map
    attention_sparsity_weight: float = 0.0
    attention_tv_weight: float = 1.0
    #: area prior: weight of BCE(a, the real defect mask area's worth of a's top pixels) on
    #: the normal → defect maps (:func:`area_target`)
    attention_area_weight: float = 10.0
    #: mask supervision: weight of BCE(a, real mask) on the maps of edits of real defects
    attention_mask_weight: float = 1.0
    #: self-reconstruction / identity terms on the generator's "image" or on the "blend"
    attention_recon: str = "image"
    #: the attention logit's gain (equalised learning rate of the attention channel,
    #: :class:`~defectlab.components.gan_layers.AttentionOutput`); 1 = a plain conv
    attention_gain: float = 10.0
    #: synthesis: mask = a > attention_threshold (then opening and minimum area)
    attention_threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(
            self,
            positive=("mask_k", "attention_gain"),
            nonnegative=(
                "mask_min_diff",
                "mask_blur",
                "mask_open",
                "mask_min_area",
                "attention_sparsity_weight",
                "attention_tv_weight",
                "attention_area_weight",
                "attention_mask_weight",
            ),
        )
        check_choice("mask_rule", self.mask_rule, MASK_RULES)
        check_choice("attention_recon", self.attention_recon, ATTENTION_RECON)
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
    the pair ``(x, y)`` in [-1, 1] (and ``y``'s masks with ``generator="residual_attention"``);
    synthesis translates a normal image and takes the mask from the aligned difference
    (:func:`difference_mask`) or the attention map. Sample grid rows are one
    direction of one pair each: all pairs of the first row, then of the next."""

    Config = GANConfig
    config: GANConfig
    buffers: dict[str, torch.Tensor]
    #: runs saved before ``generator`` existed trained the seed's whole-image generators
    former_defaults: ClassVar[dict[str, Any]] = {"generator": "full"}
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

    def attention_loss(
        self,
        maps: dict[str, torch.Tensor],
        areas: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The attention priors of one step (module docstring) and their values. ``maps``:
        role → attention map (B, 1, H, W) of every map the step produced; ``areas``: role of a
        normal → defect map → target area per image (B,); ``masks``: role of a map of an edit
        of a real defect → that defect's mask (B, 1, H, W) in {0, 1}. The logged
        ``attention_above`` is the share of normal → defect map pixels above
        ``attention_threshold``: the mask area synthesis would give before cleaning."""
        cfg = self.config
        sparsity, tv = attention_priors(list(maps.values()))
        loss = cfg.attention_sparsity_weight * sparsity + cfg.attention_tv_weight * tv
        values = {"attention_mean": sparsity.item(), "attention_tv": tv.item()}
        if areas:
            area = torch.stack(
                [mask_bce(maps[k], area_target(maps[k], t)) for k, t in areas.items()]
            ).mean()
            loss = loss + cfg.attention_area_weight * area
            above = torch.stack([(maps[k] > cfg.attention_threshold).float().mean() for k in areas])
            values |= {"attention_area": area.item(), "attention_above": above.mean().item()}
        if masks:
            supervised = torch.stack([mask_bce(maps[k], m) for k, m in masks.items()]).mean()
            loss = loss + cfg.attention_mask_weight * supervised
            values["attention_mask_bce"] = supervised.item()
        return loss, values

    def _pair(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
        """``(x, y)`` in [-1, 1]; with ``generator="residual_attention"`` also the defect
        images' masks (B, 1, H, W) in {0, 1}, paired with them, for the attention priors."""
        images = batch["image"].to(self.device, torch.float32)
        labels = batch["label"].to(self.device)
        normal, defect = labels == 0, labels != 0
        if not self.config.attention:
            paired = self._pair_kinds({"normal": images[normal], "defect": images[defect]})
            if paired is None:
                return None
            return paired["normal"] * 2 - 1, paired["defect"] * 2 - 1
        masks = (batch["mask"].to(self.device, torch.float32) > 0.5).float()[:, None]
        paired = self._pair_kinds(
            {
                "normal": images[normal],
                "defect": {"image": images[defect], "mask": masks[defect]},
            }
        )
        if paired is None:
            return None
        defects = paired["defect"]
        return paired["normal"] * 2 - 1, defects["image"] * 2 - 1, defects["mask"]

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
