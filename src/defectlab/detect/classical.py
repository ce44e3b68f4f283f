"""Two classical baselines that learn from normal images in one streaming pass.

``canny`` — dual-threshold Canny edge difference. Training accumulates how often each pixel is
near an edge in normal images; a test image's edges where normal images rarely have one (and,
optionally, normal edges it lacks) form the anomaly map.

``template`` — golden-template comparison for fixed-position parts. The template is the
per-pixel median (or mean) of the normal images, each aligned to a reference first; a test
image is aligned to the template (phase correlation or ECC), and the map is its absolute
difference to the template in units of the per-pixel normal standard deviation.

Both take ``epochs = 1``; OpenCV works per image (loops over a batch, never over pixels), the
statistics and maps are batched torch operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np
import torch

from defectlab.base import ModelConfig, Prediction
from defectlab.detect.base import Detector
from defectlab.ops import gaussian_blur, gaussian_kernel1d, top_fraction_mean
from defectlab.registry import register


def _grey(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 1, H, W) by averaging the channels."""
    return images.mean(dim=1, keepdim=True)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) float in [0, 1] → (B, H, W) uint8 for OpenCV."""
    return (images[:, 0].clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()


def _check_common(epochs: int, name: str, top_fraction: float, map_sigma: float) -> None:
    if epochs != 1:
        raise ValueError(f"{name} makes a single pass over the data: epochs must be 1")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"score_top_fraction must be in (0, 1], got {top_fraction}")
    if map_sigma < 0:
        raise ValueError(f"map_sigma must be >= 0, got {map_sigma}")


# --- Canny edge difference ---------------------------------------------------------------------


@dataclass
class CannyConfig(ModelConfig):
    #: Canny hysteresis thresholds on the Sobel gradient magnitude of the 8-bit image
    low_threshold: float = 50.0
    high_threshold: float = 150.0
    #: Gaussian blur before Canny, in pixels (suppresses noise edges; 0 = none)
    pre_blur_sigma: float = 1.0
    #: use the exact L2 gradient magnitude (else the L1 approximation)
    l2_gradient: bool = True
    #: positional tolerance: edges are blurred with this sigma and normalised so an edge line
    #: keeps the value 1 on itself (a soft dilation)
    tolerance_sigma: float = 1.5
    #: weight of missing edges (normal edges the test image lacks) in the map; 0 = off
    missing_weight: float = 0.0
    #: smoothing of the map, in pixels: turns isolated surprising edges into a density
    map_sigma: float = 2.0
    #: image score = mean of this top share of map values
    score_top_fraction: float = 0.01

    def __post_init__(self) -> None:
        _check_common(self.epochs, "canny", self.score_top_fraction, self.map_sigma)
        if not 0 <= self.low_threshold <= self.high_threshold:
            raise ValueError(
                "Canny thresholds need 0 <= low_threshold <= high_threshold, got "
                f"{self.low_threshold} and {self.high_threshold}"
            )
        if self.pre_blur_sigma < 0 or self.tolerance_sigma < 0:
            raise ValueError("pre_blur_sigma and tolerance_sigma must be >= 0")
        if self.missing_weight < 0:
            raise ValueError(f"missing_weight must be >= 0, got {self.missing_weight}")


@register
class CannyDiff(Detector):
    name: ClassVar[str] = "canny"
    onnx_blocker: ClassVar[str | None] = (
        "Canny's hysteresis edge tracing runs in OpenCV (cv2.Canny), outside the torch graph"
    )
    description: ClassVar[str] = (
        "Canny edge difference: edges where normal images rarely have one (baseline)"
    )
    Config = CannyConfig
    config: CannyConfig

    def __init__(self, config: CannyConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        shape = (1, self.image_size, self.image_size)
        self._sum = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self._count = 0
        self.frequency: torch.Tensor | None = None

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """Binary Canny edges (B, 1, H, W) as float of a batch (B, C, H, W) in [0, 1]."""
        grey = gaussian_blur(_grey(images.to(self.device).float()), self.config.pre_blur_sigma)
        cfg = self.config
        edges = [
            cv2.Canny(img, cfg.low_threshold, cfg.high_threshold, L2gradient=cfg.l2_gradient)
            for img in _to_uint8(grey)
        ]
        return torch.from_numpy(np.stack(edges)).to(self.device)[:, None].float() / 255.0

    def _tolerant(self, edges: torch.Tensor) -> torch.Tensor:
        """Soft dilation: blur, then rescale so a straight edge line stays at 1 (clamped)."""
        sigma = self.config.tolerance_sigma
        if sigma <= 0:
            return edges
        peak = gaussian_kernel1d(sigma).max().item()
        return (gaussian_blur(edges, sigma) / peak).clamp(max=1.0)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        near_edge = self._tolerant(self.edges(batch["image"]))
        self._sum += near_edge.double().sum(dim=0)
        self._count += near_edge.shape[0]
        return {}

    def finish_training(self) -> None:
        if self._count == 0:
            raise RuntimeError("canny: no training images were seen")
        self.frequency = (self._sum / self._count).float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.frequency is not None, "no edge statistics")
        if images.shape[-2:] != self.frequency.shape[-2:]:
            raise ValueError(
                f"canny: images of size {tuple(images.shape[-2:])} do not match the edge "
                f"statistics {tuple(self.frequency.shape[-2:])}"
            )
        edges = self.edges(images)
        maps = edges * (1.0 - self.frequency)  # surprising edges
        if self.config.missing_weight > 0:
            missing = self.frequency * (1.0 - self._tolerant(edges))
            maps = maps + self.config.missing_weight * missing
        maps = gaussian_blur(maps, self.config.map_sigma)[:, 0]
        return Prediction(top_fraction_mean(maps, self.config.score_top_fraction), maps)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"sum": self._sum, "count": self._count}
        if self.frequency is not None:
            state["frequency"] = self.frequency
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["sum"].shape) != tuple(self._sum.shape):
            raise ValueError(
                f"canny: edge statistics have shape {tuple(state['sum'].shape)}, "
                f"need {tuple(self._sum.shape)}"
            )
        self._sum = state["sum"].to(self.device)
        self._count = int(state["count"])
        frequency = state.get("frequency")
        self.frequency = frequency.to(self.device) if frequency is not None else None


# --- golden template ---------------------------------------------------------------------------

ALIGNMENTS = ("phase", "ecc", "none")
STATISTICS = ("median", "mean")


@dataclass
class TemplateConfig(ModelConfig):
    #: template = per-pixel "median" (streaming histogram approximation) or "mean"
    statistic: str = "median"
    #: how a test image is aligned to the template: "phase" (phase correlation, translation),
    #: "ecc" (cv2.findTransformECC, euclidean, started from the phase-correlation shift), "none"
    alignment: str = "phase"
    #: also align every training image to a reference (the first training image) before
    #: accumulating, so a jittered training set still gives a sharp template
    align_training: bool = True
    #: estimated shifts larger than this share of the image side are rejected (no warp)
    max_shift: float = 0.25
    #: ECC iteration limit and convergence threshold
    ecc_iterations: int = 50
    ecc_epsilon: float = 1e-5
    #: blur before everything, in pixels (noise and sub-pixel misalignment tolerance)
    blur_sigma: float = 1.0
    #: added in quadrature to each pixel's std, so flat regions do not explode the map
    min_std: float = 0.02
    #: bins of the per-pixel histogram used for the streaming median (memory: bins × C×H×W
    #: int32 counters during training); the median is interpolated within its bin
    median_bins: int = 128
    #: smoothing of the map, in pixels
    map_sigma: float = 2.0
    #: image score = mean of this top share of map values
    score_top_fraction: float = 0.01

    def __post_init__(self) -> None:
        _check_common(self.epochs, "template", self.score_top_fraction, self.map_sigma)
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if not 0 < self.max_shift <= 1:
            raise ValueError(f"max_shift must be in (0, 1], got {self.max_shift}")
        if self.ecc_iterations < 1 or self.ecc_epsilon <= 0:
            raise ValueError("ecc_iterations must be >= 1 and ecc_epsilon > 0")
        if self.blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {self.blur_sigma}")
        if self.min_std <= 0:
            raise ValueError(f"min_std must be positive, got {self.min_std}")
        if not 2 <= self.median_bins <= 4096:
            raise ValueError(f"median_bins must be in [2, 4096], got {self.median_bins}")


@register
class GoldenTemplate(Detector):
    name: ClassVar[str] = "template"
    description: ClassVar[str] = (
        "golden template: align (phase/ECC) to the normal median, map = |diff| / normal std"
    )
    Config = TemplateConfig
    config: TemplateConfig

    def __init__(self, config: TemplateConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        shape = (self.channels, self.image_size, self.image_size)
        self._sum = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self._sum_sq = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self._hist: torch.Tensor | None = None
        if self.config.statistic == "median":
            bins, n = self.config.median_bins, self.channels * self.image_size**2
            self._hist = torch.zeros((bins, n), dtype=torch.int32, device=self.device)
        self._count = 0
        self.reference: torch.Tensor | None = None  # (H, W) grey alignment target in training
        self.template: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        #: alignments that failed or were rejected since construction (diagnostic, not saved)
        self.alignment_failures = 0
        size = self.image_size
        self._window = cv2.createHanningWindow((size, size), cv2.CV_64F)

    # --- alignment -----------------------------------------------------------------------------
    def _estimate_warp(self, moving: np.ndarray, target: np.ndarray) -> np.ndarray | None:
        """Inverse-map 2×3 warp W with ``moving(W x) ≈ target(x)``, or None (no warp)."""
        limit = self.config.max_shift * max(moving.shape)
        # copies: cv2.phaseCorrelate with a window modifies its inputs in place (OpenCV 5.0)
        (dx, dy), _ = cv2.phaseCorrelate(target.copy(), moving.copy(), self._window.copy())
        if not (np.isfinite(dx) and np.isfinite(dy)) or max(abs(dx), abs(dy)) > limit:
            return None
        warp = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]], dtype=np.float32)
        if self.config.alignment == "ecc":
            criteria = (
                cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT,
                self.config.ecc_iterations,
                self.config.ecc_epsilon,
            )
            try:
                _, warp = cv2.findTransformECC(
                    target.astype(np.float32),
                    moving.astype(np.float32),
                    warp,
                    cv2.MOTION_EUCLIDEAN,
                    criteria,
                    None,
                    1,
                )
            except cv2.error:  # did not converge / uncorrelated images: leave the image as is
                return None
            if not np.isfinite(warp).all() or np.abs(warp[:, 2]).max() > limit:
                return None
        return warp

    def align(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Align each image of (B, C, H, W) to the grey ``target`` (H, W); failed or rejected
        estimates leave the image unwarped."""
        if self.config.alignment == "none":
            return images
        grey = _grey(images)[:, 0].double().cpu().numpy()
        goal = target.double().cpu().numpy()
        size = (images.shape[-1], images.shape[-2])
        out = []
        for image, moving in zip(images.cpu().numpy(), grey, strict=True):
            warp = self._estimate_warp(moving, goal)
            if warp is None:
                self.alignment_failures += 1
                out.append(image)
                continue
            channels = [
                cv2.warpAffine(
                    channel,
                    warp,
                    size,
                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                    borderMode=cv2.BORDER_REPLICATE,
                )
                for channel in image
            ]
            out.append(np.stack(channels))
        return torch.from_numpy(np.stack(out)).to(images.device, images.dtype)

    # --- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        images = gaussian_blur(batch["image"].to(self.device).float(), self.config.blur_sigma)
        if self.config.alignment != "none" and self.config.align_training:
            if self.reference is None:
                self.reference = _grey(images[:1])[0, 0].clone()
            images = self.align(images, self.reference)
        self._sum += images.double().sum(dim=0)
        self._sum_sq += (images.double() ** 2).sum(dim=0)
        if self._hist is not None:
            bins = self.config.median_bins
            index = (images.flatten(1) * bins).floor().clamp(0, bins - 1).long()
            self._hist.scatter_add_(0, index, torch.ones_like(index, dtype=torch.int32))
        self._count += images.shape[0]
        return {}

    def finish_training(self) -> None:
        if self._count == 0:
            raise RuntimeError("template: no training images were seen")
        mean = self._sum / self._count
        variance = (self._sum_sq / self._count - mean**2).clamp_min(0.0)
        self.std = torch.sqrt(variance + self.config.min_std**2).float()
        self.template = mean.float() if self._hist is None else self._median()

    def _median(self) -> torch.Tensor:
        """Per-pixel median from the histogram, linear inside the median's bin."""
        assert self._hist is not None
        hist = self._hist.double()
        cumulative = hist.cumsum(0)
        target = self._count / 2.0
        index = (cumulative < target).sum(0).clamp(max=hist.shape[0] - 1)
        # counts below the median's bin: the cumulative sum shifted down by one bin
        shifted = torch.cat([torch.zeros_like(cumulative[:1]), cumulative[:-1]])
        below = shifted.gather(0, index[None])[0]
        inside = hist.gather(0, index[None])[0].clamp_min(1.0)
        frac = ((target - below) / inside).clamp(0.0, 1.0)
        median = (index.double() + frac) / hist.shape[0]
        return median.float().view(self.channels, self.image_size, self.image_size)

    # --- inference -----------------------------------------------------------------------------
    def export_blocker(self) -> str | None:
        if self.config.alignment != "none":
            return (
                f"alignment={self.config.alignment} aligns each image to the template in "
                "OpenCV; train with alignment=none (fixed-position parts) to export"
            )
        return None

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.template is not None and self.std is not None, "no template")
        images = gaussian_blur(images.to(self.device).float(), self.config.blur_sigma)
        if images.shape[1:] != self.template.shape:
            raise ValueError(
                f"template: images of shape {tuple(images.shape[1:])} do not match the "
                f"template {tuple(self.template.shape)}"
            )
        images = self.align(images, _grey(self.template[None])[0, 0])
        z = ((images - self.template) / self.std).abs().mean(dim=1, keepdim=True)
        maps = gaussian_blur(z, self.config.map_sigma)[:, 0]
        return Prediction(top_fraction_mean(maps, self.config.score_top_fraction), maps)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"count": self._count}
        if self.template is not None:
            state |= {"template": self.template, "std": self.std}
        if self.reference is not None:
            state["reference"] = self.reference
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = (self.channels, self.image_size, self.image_size)
        if "template" in state and tuple(state["template"].shape) != shape:
            raise ValueError(
                f"template: template has shape {tuple(state['template'].shape)}, need {shape}"
            )
        self._count = int(state["count"])
        self.template = state["template"].to(self.device) if "template" in state else None
        self.std = state["std"].to(self.device) if "std" in state else None
        self.reference = state["reference"].to(self.device) if "reference" in state else None

    def training_state(self) -> dict[str, Any]:
        """The running sums (and median histogram) of an unfinished pass, for resume only."""
        state: dict[str, Any] = {"sum": self._sum, "sum_sq": self._sum_sq}
        if self._hist is not None:
            state["hist"] = self._hist
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if tuple(state["sum"].shape) != tuple(self._sum.shape):
            raise ValueError(
                f"template: statistics have shape {tuple(state['sum'].shape)}, "
                f"need {tuple(self._sum.shape)}"
            )
        self._sum = state["sum"].to(self.device)
        self._sum_sq = state["sum_sq"].to(self.device)
        if self._hist is not None and "hist" in state:
            self._hist = state["hist"].to(self.device)
