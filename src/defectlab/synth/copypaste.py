"""Copy-paste baseline: the K real defects (with their masks) pasted onto normal images.

The simplest augmentation a practitioner tries first, and the baseline a learned synthesizer
must beat. Each connected component of a real defect's mask, with a margin of context, is one
**patch**. A sample picks a patch, flips it at random (horizontally and/or vertically), places
it at a random position that keeps it inside the normal image, optionally shifts its
brightness so the ring of pixels just outside its mask matches the same ring of the
destination (``match_brightness``), and blends it in with ``alpha = max(mask, blur(mask))``
(Gaussian ``feather`` px): inside the mask the defect's pixels are copied, just outside they
fade into the destination, so there is no hard seam. The synthetic mask is the pasted
component itself: exact.

It needs real defects with masks, which ``defectlab synth`` cannot pass to a procedural
synthesizer (``--defects`` gives images only), so it is not registered:
``benchmarks/augmentation.py`` builds it from the K-shot split (:meth:`CopyPaste.from_examples`)
and writes its pairs like ``defectlab synth`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from defectlab.base import SynthConfig, Synthesizer, SynthSample
from defectlab.config import check_fields
from defectlab.errors import DataError


@dataclass
class CopyPasteConfig(SynthConfig):
    #: context kept around a component's bounding box, px
    margin: int = 4
    #: Gaussian sigma (px) of the blend at the mask edge (0 = hard paste)
    feather: float = 1.5
    #: components smaller than this (px) are not used as patches
    min_area: int = 4
    #: shift the patch's brightness to match the destination around the mask
    match_brightness: bool = True

    def __post_init__(self) -> None:
        check_fields(self, nonnegative=("margin", "feather", "min_area"))


@dataclass(frozen=True)
class Patch:
    """One defect component: its pixels (h, w, C), mask (h, w) and source index."""

    image: np.ndarray
    mask: np.ndarray
    source: int
    defect_type: str = field(default="")


def extract_patches(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    margin: int = 4,
    min_area: int = 4,
    types: Sequence[str] | None = None,
) -> list[Patch]:
    """One :class:`Patch` per 8-connected mask component of at least ``min_area`` px."""
    patches = []
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        image = np.asarray(image, np.float32)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[:2] != np.asarray(mask).shape:
            raise DataError(f"defect {i}: mask {np.asarray(mask).shape} != image {image.shape}")
        n, labels, stats, _ = cv2.connectedComponentsWithStats(
            np.asarray(mask, np.uint8), connectivity=8
        )
        for label in range(1, n):
            x, y, w, h, area = stats[label]
            if area < min_area:
                continue
            top, left = max(0, y - margin), max(0, x - margin)
            bottom, right = min(image.shape[0], y + h + margin), min(image.shape[1], x + w + margin)
            patches.append(
                Patch(
                    image[top:bottom, left:right].copy(),
                    labels[top:bottom, left:right] == label,
                    i,
                    types[i] if types is not None else "",
                )
            )
    return patches


class CopyPaste(Synthesizer):
    """See the module docstring."""

    name = "copy-paste"
    description = "real defect components (with masks) pasted onto normal images"
    Config = CopyPasteConfig
    config: CopyPasteConfig

    def __init__(self, patches: Sequence[Patch], config: CopyPasteConfig | None = None) -> None:
        super().__init__(config)
        if not patches:
            raise DataError("copy-paste needs at least one real defect with a non-empty mask")
        self.patches = list(patches)

    @classmethod
    def from_examples(
        cls,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        config: CopyPasteConfig | None = None,
        types: Sequence[str] | None = None,
    ) -> CopyPaste:
        cfg = config if config is not None else CopyPasteConfig()
        return cls(extract_patches(images, masks, cfg.margin, cfg.min_area, types), cfg)

    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> SynthSample:
        base = np.asarray(image, np.float32)
        grey = base.ndim == 2
        if grey:
            base = base[:, :, None]
        index = int(rng.integers(len(self.patches)))
        patch = self.patches[index]
        pixels, mask = patch.image, patch.mask
        flip_h, flip_v = bool(rng.integers(2)), bool(rng.integers(2))
        if flip_h:
            pixels, mask = pixels[:, ::-1], mask[:, ::-1]
        if flip_v:
            pixels, mask = pixels[::-1], mask[::-1]
        h, w = min(mask.shape[0], base.shape[0]), min(mask.shape[1], base.shape[1])
        pixels, mask = pixels[:h, :w], mask[:h, :w]
        if pixels.shape[2] != base.shape[2]:  # grey patch on colour image or the reverse
            pixels = (
                np.repeat(pixels, base.shape[2], axis=2)
                if pixels.shape[2] == 1
                else pixels.mean(axis=2, keepdims=True)
            )
        top = int(rng.integers(base.shape[0] - h + 1))
        left = int(rng.integers(base.shape[1] - w + 1))
        region = base[top : top + h, left : left + w]
        shift = 0.0
        if self.config.match_brightness:
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            ring &= ~mask
            if ring.any():
                shift = float(region[ring].mean() - pixels[ring].mean())
        pasted = np.clip(pixels + shift, 0, 1)
        alpha = mask.astype(np.float32)
        if self.config.feather > 0:
            soft = cv2.GaussianBlur(alpha, (0, 0), self.config.feather)
            alpha = np.maximum(alpha, soft)
        alpha = alpha[:, :, None]
        out = base.copy()
        out[top : top + h, left : left + w] = alpha * pasted + (1 - alpha) * region
        full_mask = np.zeros(base.shape[:2], bool)
        full_mask[top : top + h, left : left + w] = mask
        record = {
            "method": self.name,
            "patch": index,
            "patch_source": patch.source,
            "defect_type": patch.defect_type,
            "flip_h": flip_h,
            "flip_v": flip_v,
            "top": top,
            "left": left,
            "brightness_shift": round(shift, 6),
            "mask_area": int(full_mask.sum()),
        }
        return SynthSample((out[:, :, 0] if grey else out).astype(np.float32), full_mask, record)
