"""Procedural defect painting: plausible defects on normal images, with exact masks.

Normal-only inspection needs defect examples to train segmenters and to sanity-check detectors.
This engine is shared: the registered ``procedural`` synthesizer
(:mod:`defectlab.synth.procedural`) is a thin class over :class:`ProceduralPainter`, and the
detectors that learn from painted defects use the painter directly. Following the usual
competition toolbox, we draw random shapes (:mod:`defectlab.components.shapes`: Bezier and
Gaussian-cloud blobs, scratches, elastically warped lines and circles, thresholded Perlin
noise, branching cracks, CutPaste patches and scars), place them at a random position inside
the object (Otsu region of interest) and off the image border, and give them a grey value
relative to the local background with an optional linear grey-level gradient, faint noise
matching the local texture and part of a surface texture kept (flat pasted patches look
cartoonish). That texture is the surface under the defect, or, for CutPaste shapes and with
probability ``foreign_texture``, a patch cut from elsewhere in the same image or from another
normal image.

Masks are exact. The soft alpha is a Gaussian-blurred shape, cut to where it is at least 0.5:
the mask is that set, so the label agrees with what is visible, and with ``blend="alpha"``
every pixel outside the mask is bit-identical to the input (the soft edge is the inner half
of the Gaussian ramp). ``blend="poisson"`` clones the defect's texture with OpenCV's
``seamlessClone`` over the mask grown by a few pixels, then adds the brightness change under
the same alpha: the texture joins the surface seamlessly, but pixels in that thin ring outside
the mask (never outside the ROI or in the border margin) change slightly. The record says so
(``outside_mask_changed``), for callers that need a strict label.

The module is built to be extended: every shape is one small function registered in
:data:`SHAPES` (``@shape_generator("name")``), the appearance is one function
(:func:`blend_defect`), and placement is separate (:func:`object_roi`, :func:`sample_centre`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from defectlab.base import SynthConfig, Synthesizer, SynthSample
from defectlab.components.shapes import PATCH_SHAPES, SHAPES, ShapeGenerator, shape_generator
from defectlab.config import check_choice, check_fields

__all__ = [
    "PATCH_SHAPES",
    "SHAPES",
    "ProceduralConfig",
    "ProceduralPainter",
    "ShapeGenerator",
    "blend_defect",
    "object_roi",
    "sample_centre",
    "shape_generator",
]

#: images whose short side is below this cannot hold a defect off the border
MIN_IMAGE_SIDE = 16
#: a defect's radius is never below this many pixels (smaller ones are invisible noise)
MIN_RADIUS_PX = 2.5
#: attempts per defect before giving up on it (the first defect then uses a fallback disc)
MAX_TRIES = 12
#: Otsu is trusted only when it separates two classes this well (between/total variance);
#: a textured surface filling the frame scores below it and gets the whole image as ROI
MIN_OTSU_SEPARABILITY = 0.8
#: an Otsu object smaller than this share of the image falls back to the whole image
MIN_ROI_FRACTION = 0.1
#: Poisson blending clones the texture over the mask grown by this many px (seamless ring)
POISSON_RING_PX = 2
#: blending modes (see the module docstring)
BLEND_MODES = ("alpha", "poisson")
#: where defects go: inside the Otsu object, or anywhere (see :func:`object_roi`)
ROI_MODES = ("otsu", "none")


@dataclass
class ProceduralConfig(SynthConfig):
    #: shape families to draw from (names in ``SHAPES``)
    shapes: tuple[str, ...] = (
        "bezier_blob",
        "gaussian_blob",
        "scratch",
        "elastic_line",
        "elastic_circle",
        "perlin_region",
        "crack",
        "cutpaste",
        "scar",
    )
    #: relative frequency of each entry of ``shapes``, each >= 0; empty: all equally often
    shape_weights: tuple[float, ...] = ()
    #: number of defects per image, inclusive range
    defects_per_image: tuple[int, int] = (1, 2)
    #: defect extent (diameter) relative to the image's short side
    size_fraction: tuple[float, float] = (0.04, 0.2)
    #: intensity change relative to the local background (Weber); sign random: dark or bright
    contrast: tuple[float, float] = (0.15, 0.45)
    #: share of the surface texture kept inside the defect (0: flat fill + noise); CutPaste
    #: shapes always keep all of their pasted patch
    texture: tuple[float, float] = (0.2, 0.8)
    #: probability that a defect's texture comes from another normal image (given by
    #: :meth:`ProceduralPainter.generate` or ``texture_image``) instead of this one, in [0, 1]
    foreign_texture: float = 0.0
    #: Gaussian sigma in px of the soft alpha at the defect edge (capped for thin shapes)
    edge_softness: tuple[float, float] = (0.5, 2.5)
    #: "alpha": outside the mask stays bit-identical; "poisson": seamless texture (OpenCV),
    #: pixels in a thin ring outside the mask may change slightly
    blend: str = "alpha"
    #: fraction of the image's short side kept free of defects at the border, in [0, 0.4)
    border_margin: float = 0.08
    #: "otsu": defects inside the object found by Otsu thresholding; "none": whole image
    roi: str = "otsu"
    #: a defect smaller than this (in px) is resampled
    min_mask_pixels: int = 12
    #: linear grey-level gradient across each defect (random direction and strength)
    gradient: bool = True
    #: elastic_line / elastic_circle: peak displacement relative to the radius, in [0, 0.3]
    elastic_strength: tuple[float, float] = (0.08, 0.2)
    #: perlin_region: number of noise octaves (more: more ragged), integers in [1, 6]
    perlin_octaves: tuple[int, int] = (2, 4)
    #: perlin_region: share of the defect's disc above the noise threshold, in (0, 1]
    perlin_coverage: tuple[float, float] = (0.3, 0.6)
    #: crack: number of side branches (capped on small cracks), integers in [0, 10]
    crack_branches: tuple[int, int] = (0, 3)

    def __post_init__(self) -> None:
        self.shapes = tuple(self.shapes)
        if not self.shapes:
            raise ValueError("shapes must name at least one shape")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"shapes: unknown shapes {unknown}; available: {', '.join(SHAPES)}")
        self.shape_weights = tuple(float(w) for w in self.shape_weights)
        if self.shape_weights:
            if len(self.shape_weights) != len(self.shapes):
                raise ValueError(
                    f"shape_weights needs one weight per shape ({len(self.shapes)}), "
                    f"got {len(self.shape_weights)}"
                )
            weights = self.shape_weights
            if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(
                    f"shape_weights must be >= 0 with a positive sum, got {self.shape_weights}"
                )
        self.defects_per_image = _int_range("defects_per_image", self.defects_per_image, 1, 50)
        self.perlin_octaves = _int_range("perlin_octaves", self.perlin_octaves, 1, 6)
        self.crack_branches = _int_range("crack_branches", self.crack_branches, 0, 10)
        _check_range("elastic_strength", self.elastic_strength, 0.0, 0.3)
        _check_range("perlin_coverage", self.perlin_coverage, 0.0, 1.0, open_low=True)
        _check_range("size_fraction", self.size_fraction, 0.0, 0.5, open_low=True)
        _check_range("contrast", self.contrast, 0.0, 1.0, open_low=True)
        _check_range("texture", self.texture, 0.0, 1.0)
        if not 0.0 <= self.foreign_texture <= 1.0:
            raise ValueError(f"foreign_texture must be in [0, 1], got {self.foreign_texture}")
        _check_range("edge_softness", self.edge_softness, 0.0, 20.0)
        check_choice("blend", self.blend, BLEND_MODES)
        if not 0.0 <= self.border_margin < 0.4:
            raise ValueError(f"border_margin must be in [0, 0.4), got {self.border_margin}")
        check_choice("roi", self.roi, ROI_MODES)
        check_fields(self, at_least_one=("min_mask_pixels",))

    def shape_params(self, shape: str) -> dict[str, Any]:
        """Keyword ranges this config passes to the generator of ``shape``."""
        params: dict[str, dict[str, Any]] = {
            "elastic_line": {"strength": self.elastic_strength},
            "elastic_circle": {"strength": self.elastic_strength},
            "perlin_region": {"octaves": self.perlin_octaves, "coverage": self.perlin_coverage},
            "crack": {"branches": self.crack_branches},
        }
        return params.get(shape, {})

    def shape_probabilities(self) -> np.ndarray:
        """Probability of each entry of ``shapes`` (uniform when no weights are given)."""
        weights = np.asarray(self.shape_weights or [1.0] * len(self.shapes), dtype=np.float64)
        return weights / weights.sum()


def _int_range(name: str, value: Any, low: int, high: int) -> tuple[int, int]:
    """:func:`_check_range` for a pair of whole numbers; returns it as ints."""
    _check_range(name, value, low, high)
    if not all(float(v).is_integer() for v in value):
        raise ValueError(f"{name} must be integers, got {value}")
    return (int(value[0]), int(value[1]))


def _check_range(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> None:
    """``value`` must be a (lo, hi) pair with low <= lo <= hi <= high (low < lo if open)."""
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    lo, hi = value
    if lo > hi:
        raise ValueError(f"{name}: low {lo} is above high {hi}")
    if lo < low or (open_low and lo == low) or hi > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value!r}")


def object_roi(image: np.ndarray, mode: str = "otsu") -> tuple[np.ndarray, str]:
    """Where defects may go: bool (H, W) and how it was found ("otsu", "whole", "none").

    "otsu" thresholds the blurred grey image, keeps the class that touches the image border
    least (the object), takes its largest component with holes filled, and falls back to the
    whole image when the split is weak (a texture filling the frame) or the object is tiny.
    """
    height, width = image.shape[:2]
    whole = np.ones((height, width), bool)
    if mode == "none":
        return whole, "none"
    grey = image.mean(axis=2) if image.ndim == 3 else image
    sigma = max(1.0, 0.01 * min(height, width))
    grey8 = np.clip(np.rint(cv2.GaussianBlur(grey, (0, 0), sigma) * 255), 0, 255)
    grey8 = grey8.astype(np.uint8)
    threshold, _ = cv2.threshold(grey8, 0, 1, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    above = grey8 > threshold
    fraction = above.mean()
    if fraction in (0.0, 1.0):
        return whole, "whole"
    values = grey8.astype(np.float64)
    between = fraction * (1 - fraction) * (values[above].mean() - values[~above].mean()) ** 2
    if between < MIN_OTSU_SEPARABILITY * values.var():
        return whole, "whole"
    border = np.concatenate([above[0], above[-1], above[:, 0], above[:, -1]])
    candidate = above if border.mean() <= 0.5 else ~above
    contours, _ = cv2.findContours(
        candidate.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if not contours:
        return whole, "whole"
    largest = max(contours, key=cv2.contourArea)
    roi = np.zeros((height, width), np.uint8)
    cv2.drawContours(roi, [largest], -1, 1, thickness=cv2.FILLED)
    if roi.mean() < MIN_ROI_FRACTION:
        return whole, "whole"
    return roi.astype(bool), "otsu"


def _distance_inside(region: np.ndarray) -> np.ndarray:
    """Distance (px) from each pixel's centre to the edge of ``region`` or of the image."""
    padded = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1] - 0.5


def sample_centre(
    rng: np.random.Generator, candidates: list[np.ndarray]
) -> tuple[float, float] | None:
    """A random sub-pixel (y, x) centre in the first non-empty of ``candidates`` (bool masks)."""
    for region in candidates:
        flat = np.flatnonzero(region)
        if flat.size:
            y, x = divmod(int(flat[rng.integers(flat.size)]), region.shape[1])
            dy, dx = rng.uniform(-0.5, 0.5, 2)
            return y + float(dy), x + float(dx)
    return None


@dataclass
class Painted:
    """One painted defect: its exact mask and the parameters that made it."""

    shape: str
    centre: tuple[float, float]
    radius: float
    contrast: float  # signed: negative = darker than the background
    softness: float  # effective Gaussian sigma of the edge, px
    texture: float  # share of the texture kept inside
    origin: str  # where that texture came from: "under", "self" (elsewhere) or "other" image
    mask: np.ndarray


def _displaced_patch(
    rng: np.random.Generator, texture_image: np.ndarray, box: tuple[int, int, int, int]
) -> np.ndarray | None:
    """A patch the size of ``box`` (y0, y1, x0, x1) at a random place in ``texture_image``,
    preferring places that do not overlap ``box`` (a CutPaste patch comes from elsewhere).
    None when the texture image is smaller than the box."""
    y0, y1, x0, x1 = box
    h, w = y1 - y0, x1 - x0
    th, tw = texture_image.shape[:2]
    if th < h or tw < w:
        return None
    ty = rng.integers(0, th - h + 1, 8)
    tx = rng.integers(0, tw - w + 1, 8)
    apart = (np.abs(ty - y0) >= h) | (np.abs(tx - x0) >= w)
    pick = int(np.argmax(apart))  # first non-overlapping candidate, else the first one
    top, left = int(ty[pick]), int(tx[pick])
    return texture_image[top : top + h, left : left + w].astype(np.float32)


def _poisson_clone(src: np.ndarray, dst: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``dst`` (h, w, C) with ``src`` seamlessly cloned (OpenCV ``NORMAL_CLONE``) over the bool
    ``region``; pixels outside ``region`` are returned bit-identical.

    OpenCV works on 8-bit BGR, so the clone's *change* is measured in 8 bits and added to the
    float ``dst``: no 8-bit rounding leaks into unchanged pixels."""
    pad = 2  # OpenCV ignores the mask's outermost pixel ring; keep the region off the edge
    channels = dst.shape[2]

    def to8(a: np.ndarray) -> np.ndarray:
        a3 = a if channels == 3 else np.repeat(a[:, :, :1], 3, axis=2)
        a8 = np.clip(np.rint(a3 * 255.0), 0, 255).astype(np.uint8)
        return cv2.copyMakeBorder(a8, pad, pad, pad, pad, cv2.BORDER_REFLECT)

    src8, dst8 = to8(src), to8(dst)
    mask8 = np.pad(region.astype(np.uint8) * 255, pad)
    x, y, w, h = cv2.boundingRect(mask8)
    if w == 0 or h == 0:
        return dst.copy()
    cloned = cv2.seamlessClone(src8, dst8, mask8.copy(), (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)
    change = (cloned.astype(np.float32) - dst8.astype(np.float32))[pad:-pad, pad:-pad] / 255.0
    if channels == 1:
        change = change.mean(axis=2, keepdims=True)
    change[~region] = 0.0
    return dst + change


def blend_defect(
    target: np.ndarray,
    source: np.ndarray,
    shape: np.ndarray,
    rng: np.random.Generator,
    *,
    contrast: float,
    softness: float,
    gradient: bool,
    texture: float = 0.0,
    allowed: np.ndarray,
    min_pixels: int = 1,
    texture_image: np.ndarray | None = None,
    blend: str = "alpha",
) -> tuple[np.ndarray, float, float] | None:
    """Paint ``shape`` into ``target`` in place; return (exact mask, signed contrast, sigma).

    The defect value is the local background of ``source`` (mean inside the dilated shape)
    changed by ``contrast`` (Weber; sign random, flipped when there is no room), times an
    optional linear gradient, plus faint noise at the local high-frequency std; a share
    ``texture`` of a texture is kept underneath: the ``source`` pixels under the defect, or a
    patch from a random place in ``texture_image`` (``source`` itself for CutPaste, or another
    normal image) shifted to the mean of the surface it covers. The alpha is the shape blurred
    with ``softness`` (capped at half the shape's thickness, peak normalised to 1), cut to
    ``allowed`` and to where it is >= 0.5; that set is the mask.

    ``blend="alpha"`` changes only mask pixels. ``blend="poisson"`` clones the textured value
    seamlessly over the mask grown by :data:`POISSON_RING_PX` (within ``allowed``) and adds
    the brightness change under the alpha, so ring pixels outside the mask may change.
    Returns None, leaving ``target`` untouched, when the mask has fewer than ``min_pixels``.
    """
    height, width = shape.shape
    shape_u8 = shape.astype(np.uint8)
    x, y, w, h = cv2.boundingRect(shape_u8)
    if w == 0 or h == 0:
        return None
    radius = max(w, h) / 2
    support = math.ceil(3 * softness)
    grow = max(2, round(radius / 2))
    pad = max(support, grow, POISSON_RING_PX) + 2
    y0, y1 = max(0, y - pad), min(height, y + h + pad)
    x0, x1 = max(0, x - pad), min(width, x + w + pad)
    local = shape_u8[y0:y1, x0:x1]
    src = source[y0:y1, x0:x1].astype(np.float32)
    allowed_local = allowed[y0:y1, x0:x1]

    # edge softness: never blur a thin shape (scratch) more than its half-thickness
    inradius = float(cv2.distanceTransform(np.pad(local, 1), cv2.DIST_L2, 3).max())
    sigma = min(softness, max(0.5, 0.5 * inradius)) if softness > 0 else 0.0
    alpha = local.astype(np.float32)
    if sigma > 0:
        k = 2 * math.ceil(3 * sigma) + 1
        alpha = cv2.GaussianBlur(alpha, (k, k), sigma, borderType=cv2.BORDER_CONSTANT)
        alpha = np.minimum(alpha / max(float(alpha.max()), 1e-6), 1.0)
    alpha *= allowed_local
    mask = alpha >= 0.5
    if int(mask.sum()) < max(1, min_pixels):
        return None
    alpha[~mask] = 0.0  # the label is exactly the set of pixels the alpha touches

    # local background and texture statistics, per channel
    ring = cv2.dilate(local, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)).astype(bool)
    background = src[ring].mean(axis=0)  # (C,)
    residual = src - cv2.GaussianBlur(src, (0, 0), 1.5).reshape(src.shape)
    local_std = residual[ring].std(axis=0)

    # Weber contrast with a floor (dark backgrounds still get a visible change)
    level = float(background.mean())
    magnitude = contrast * max(level, 0.25)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if sign < 0 and level < magnitude and 1 - level > level:
        sign = 1.0
    elif sign > 0 and 1 - level < magnitude and level > 1 - level:
        sign = -1.0
    delta = sign * contrast * np.maximum(background, 0.25)

    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    shade = np.ones_like(yy)
    if gradient:
        theta = rng.uniform(0, 2 * math.pi)
        cy, cx = y + h / 2, x + w / 2
        along = ((yy - cy) * math.sin(theta) + (xx - cx) * math.cos(theta)) / max(radius, 1.0)
        shade = 1.0 + rng.uniform(0.2, 0.7) * np.clip(along, -1.0, 1.0)
    noise = rng.standard_normal(yy.shape).astype(np.float32)
    strength = rng.uniform(0.5, 1.0)
    fill = background + strength * noise[..., None] * local_std
    patch = None
    if texture_image is not None:
        patch = _displaced_patch(rng, texture_image, (y0, y1, x0, x1))
    surface = src
    if patch is not None:
        # a displaced patch keeps its structure but takes the mean of the surface it covers,
        # so ``contrast`` alone sets how much darker or brighter the defect is
        inside = local > 0
        surface = patch - patch[inside].mean(axis=0) + src[inside].mean(axis=0)
    textured = (1 - texture) * fill + texture * surface
    brightness = shade[..., None] * delta

    region = target[y0:y1, x0:x1]  # a view: painting it paints target
    if blend == "poisson":
        grown = cv2.dilate(
            mask.astype(np.uint8),
            cv2.getStructuringElement(
                cv2.MORPH_ELLIPSE, (2 * POISSON_RING_PX + 1, 2 * POISSON_RING_PX + 1)
            ),
        ).astype(bool)
        grown &= allowed_local
        guide = np.where(mask[..., None], np.clip(textured, 0.0, 1.0), region)
        painted = _poisson_clone(guide, region, grown) + alpha[..., None] * brightness
        touched = grown
        region[touched] = np.clip(painted[touched], 0.0, 1.0)
    else:
        value = np.clip(textured + brightness, 0.0, 1.0).astype(np.float32)
        a = alpha[mask][:, None]
        region[mask] = region[mask] + a * (value[mask] - region[mask])
    full = np.zeros((height, width), bool)
    full[y0:y1, x0:x1] = mask
    return full, sign * contrast, sigma


def _as_texture(texture_image: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A texture image as float32 (H, W, ``channels``), grey-converted when channels differ."""
    if texture_image is None:
        return None
    tex = np.asarray(texture_image, dtype=np.float32)
    if tex.ndim == 2:
        tex = tex[:, :, None]
    if tex.shape[2] != channels:
        tex = np.repeat(tex.mean(axis=2, keepdims=True), channels, axis=2)
    return tex


class ProceduralPainter(Synthesizer):
    """Random blobs, scratches, cracks, Perlin stains, warped lines/circles and CutPaste
    patches, blended in the object ROI, with exact masks. Not registered itself: the
    ``procedural`` synthesizer of :mod:`defectlab.synth.procedural` is this painter."""

    name: ClassVar[str] = "procedural"
    description: ClassVar[str] = (
        "random blobs, scratches, cracks, Perlin stains, warped lines/circles and CutPaste "
        "patches, alpha- or Poisson-blended in the object ROI"
    )
    Config = ProceduralConfig
    config: ProceduralConfig

    def synthesize(
        self,
        image: np.ndarray,
        rng: np.random.Generator,
        texture_image: np.ndarray | None = None,
    ) -> SynthSample:
        """Paint 1+ defects on ``image`` (H, W[, C]) in [0, 1]; same shape and dtype back.

        ``texture_image`` (another normal image, any size) is where ``foreign_texture``
        defects take their texture from; without it they take it from elsewhere in ``image``.
        """
        cfg = self.config
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
            raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got {image.shape}")
        height, width = image.shape[:2]
        short = min(height, width)
        if short < MIN_IMAGE_SIDE:
            raise ValueError(
                f"image {height}x{width} is too small for procedural defects: the short side "
                f"must be at least {MIN_IMAGE_SIDE} px"
            )
        source = np.asarray(image, dtype=np.float32)
        if source.ndim == 2:
            source = source[:, :, None]
        out = source.copy()
        foreign = _as_texture(texture_image, source.shape[2])

        roi, roi_kind = object_roi(source, cfg.roi)
        margin = cfg.border_margin * short
        inner = _distance_inside(np.ones((height, width), bool)) >= margin
        allowed = roi & inner
        depth = _distance_inside(roi)  # distance to the ROI edge or the image border

        n_defects = int(rng.integers(cfg.defects_per_image[0], cfg.defects_per_image[1] + 1))
        painted: list[Painted] = []
        for index in range(n_defects):
            result = self._paint_one(out, source, foreign, rng, depth, inner, allowed, short)
            if result is None and index == 0:
                result = self._fallback(out, source, rng, inner, short)
            if result is not None:
                painted.append(result)

        mask = np.zeros((height, width), bool)
        for p in painted:
            mask |= p.mask
        changed = (out != source).any(axis=2)
        result_image = out if image.ndim == 3 else out[:, :, 0]
        record = {
            "shapes": "+".join(p.shape for p in painted),
            "n_defects": len(painted),
            "centres_yx": ";".join(f"{p.centre[0]:.1f} {p.centre[1]:.1f}" for p in painted),
            "radii": ";".join(f"{p.radius:.1f}" for p in painted),
            "contrasts": ";".join(f"{p.contrast:+.3f}" for p in painted),
            "softness": ";".join(f"{p.softness:.2f}" for p in painted),
            "textures": ";".join(f"{p.texture:.2f}" for p in painted),
            "texture_origins": ";".join(p.origin for p in painted),
            "blend": cfg.blend,
            "outside_mask_changed": bool((changed & ~mask).any()),
            "roi": roi_kind,
            "area_fraction": round(float(mask.mean()), 6),
        }
        return SynthSample(result_image.astype(image.dtype, copy=False), mask, record)

    def generate(
        self, images: Sequence[np.ndarray], n: int, seed: int = 0
    ) -> Iterator[tuple[int, SynthSample]]:
        """As :meth:`Synthesizer.generate`; when ``foreign_texture`` > 0 and there are several
        images, sample ``i`` also gets another image as texture source, picked by a generator
        seeded by ``(seed, i, 1)``; ``record["texture_image"]`` is its index (-1: none)."""
        if not images:
            raise ValueError("no normal images to synthesize defects on")
        for i in range(n):
            source = i % len(images)
            rng = np.random.default_rng([seed, i])
            other = -1
            if self.config.foreign_texture > 0 and len(images) > 1:
                pick = int(np.random.default_rng([seed, i, 1]).integers(len(images) - 1))
                other = pick + (pick >= source)
            texture = images[other] if other >= 0 else None
            sample = self.synthesize(images[source], rng, texture)
            sample.record["texture_image"] = other
            yield source, sample

    def _paint_one(
        self,
        out: np.ndarray,
        source: np.ndarray,
        foreign: np.ndarray | None,
        rng: np.random.Generator,
        depth: np.ndarray,
        inner: np.ndarray,
        allowed: np.ndarray,
        short: int,
    ) -> Painted | None:
        """Sample and paint one defect, resampling when it ends below ``min_mask_pixels``."""
        cfg = self.config
        height, width = out.shape[:2]
        margin = cfg.border_margin * short
        probabilities = cfg.shape_probabilities()
        for _ in range(MAX_TRIES):
            shape_name = cfg.shapes[int(rng.choice(len(cfg.shapes), p=probabilities))]
            radius = max(MIN_RADIUS_PX, rng.uniform(*cfg.size_fraction) * short / 2)
            centre = sample_centre(
                rng, [depth >= margin + radius, depth >= margin, inner, np.ones_like(inner)]
            )
            assert centre is not None  # the last candidate is the whole image
            params = cfg.shape_params(shape_name)
            shape = SHAPES[shape_name](rng, height, width, centre, radius, **params) & allowed
            if shape.sum() < cfg.min_mask_pixels:
                continue
            contrast = rng.uniform(*cfg.contrast)
            softness = rng.uniform(*cfg.edge_softness)
            texture = rng.uniform(*cfg.texture)
            texture_image, origin = None, "under"
            if rng.random() < cfg.foreign_texture:
                texture_image, origin = (source, "self") if foreign is None else (foreign, "other")
            elif shape_name in PATCH_SHAPES:
                texture_image, origin = source, "self"
            if shape_name in PATCH_SHAPES:
                texture = 1.0  # CutPaste: the whole patch, shifted in brightness
            painted = blend_defect(
                out,
                source,
                shape,
                rng,
                contrast=contrast,
                softness=softness,
                gradient=cfg.gradient,
                texture=texture,
                allowed=allowed,
                min_pixels=cfg.min_mask_pixels,
                texture_image=texture_image,
                blend=cfg.blend,
            )
            if painted is None:
                continue
            mask, signed, sigma = painted
            return Painted(shape_name, centre, radius, signed, sigma, texture, origin, mask)
        return None

    def _fallback(
        self,
        out: np.ndarray,
        source: np.ndarray,
        rng: np.random.Generator,
        inner: np.ndarray,
        short: int,
    ) -> Painted:
        """A soft disc in the middle of the image, off the border; used when no defect fits
        the ROI (e.g. a tiny ROI). It is never empty for images of MIN_IMAGE_SIDE or more."""
        height, width = out.shape[:2]
        radius = max(3.0, 0.1 * short)
        centre = ((height - 1) / 2, (width - 1) / 2)
        shape = np.zeros((height, width), np.uint8)
        cv2.circle(shape, (round(centre[1]), round(centre[0])), round(radius), 1, cv2.FILLED)
        contrast = max(self.config.contrast)
        painted = blend_defect(
            out,
            source,
            shape.astype(bool) & inner,
            rng,
            contrast=contrast,
            softness=0.5,
            gradient=False,
            allowed=inner,
            blend=self.config.blend,
        )
        assert painted is not None, "fallback disc is empty"
        mask, signed, sigma = painted
        return Painted("disc", centre, radius, signed, sigma, 0.0, "under", mask)
