"""FastFlow-style 2-D normalizing flow on frozen EfficientNet-Lite features (seed S2).

The seed's recipe: map the features of normal images through a normalizing flow to
N(0, I), train by maximum likelihood, classify by likelihood, segment by the gradient map.

* **Features**: :class:`~defectlab.components.features.LiteFeatures` (frozen ImageNet
  EfficientNet-Lite ``backbone``: lite0, lite1 or lite2), one flow per chosen stage
  (``feature_blocks``; default the last stride-8 and stride-16 blocks; for Lite0 the stride-8
  and stride-16 stages, 40 and 112 channels).
* **Flow** per scale (Yu et al. 2021, "FastFlow"): ``flow_steps`` steps, each
  ActNorm (per-channel affine, data-dependent initialisation on the first training batch)
  → affine coupling (the first ⌊C/2⌋ channels pass unchanged and feed a small conv subnet
  conv–ReLU–conv that outputs log-scale ``s`` and shift ``t`` for the rest; kernels alternate
  3×3 / 1×1 between steps; ``s`` is soft-clamped to (−clamp, clamp) with ``clamp·tanh(s/clamp)``;
  the last subnet conv starts at zero so every step starts as the identity) → a fixed random
  channel permutation (seeded, stored). The map is fully convolutional, so the latent ``z``
  has the feature map's shape, and log|det J| is a sum of per-location terms.
* **Training**: maximum likelihood, Adam. The loss is the negative log-likelihood per
  dimension (nats), ``(½‖z‖² + ½D·log 2π − log|det J|) / D`` with D = C·h·w, averaged over
  images and then over scales; the log-determinant is included.
* **Anomaly map** (``map="nll"``, the −log p convention, not FastFlow's −exp(mean log p)):
  the per-location NLL per channel ``(½‖z_ij‖² + ½C·log 2π − log|det J|_ij) / C``, bilinearly
  up-sampled to the image and averaged over scales, then smoothed with ``map_sigma``.
  ``map="gradient"`` (the seed's gradient map): ``|∂ NLL / ∂ x|`` per pixel, summed over
  colour channels, with NLL the image's total NLL per channel summed over scales, computed
  with autograd through the frozen extractor (so :meth:`Flow.predict` enables gradients for
  that branch), then smoothed with ``map_sigma``.
* **Image score**: from the NLL map in both modes (the seed classifies by likelihood), the
  mean of its top ``score_top_fraction`` (``score="topk"``) or its maximum (``"max"``).

The backbone weights are not stored in checkpoints; their identity (package version, file
hash) is, and a checkpoint made with other weights is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.base import Prediction
from defectlab.components.features import (
    LiteFeatureConfig,
    check_identity,
    model_features,
)
from defectlab.detect.base import Detector
from defectlab.ops import gaussian_blur, top_fraction_mean
from defectlab.registry import register

MAPS = ("nll", "gradient")
SCORES = ("topk", "max")
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class FlowConfig(LiteFeatureConfig):
    #: passes over the normal training images
    epochs: int = 8
    #: flow steps (ActNorm + affine coupling + permutation) per scale
    flow_steps: int = 8
    #: hidden channels of each coupling subnet = hidden_ratio × feature channels
    hidden_ratio: float = 1.0
    #: "alternate": 3×3 and 1×1 subnet kernels alternate (FastFlow); "3x3": always 3×3
    kernels: str = "alternate"
    #: soft clamp of the coupling log-scales, |s| < clamp
    clamp: float = 2.0
    #: Adam learning rate and weight decay
    lr: float = 1e-3
    weight_decay: float = 1e-5
    #: gradient-norm clip per step (0 = none)
    grad_clip: float = 1.0
    #: "nll": per-location negative log-likelihood; "gradient": |∂NLL/∂input| per pixel
    map: str = "nll"
    #: Gaussian smoothing of the map, in pixels at model resolution (0 = none)
    map_sigma: float = 2.0
    #: image score from the NLL map: "topk" (mean of the top share) or "max"
    score: str = "topk"
    score_top_fraction: float = 0.01
    #: seed of the fixed channel permutations
    permutation_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.flow_steps < 1:
            raise ValueError(f"flow_steps must be >= 1, got {self.flow_steps}")
        if self.hidden_ratio <= 0:
            raise ValueError(f"hidden_ratio must be positive, got {self.hidden_ratio}")
        if self.kernels not in ("alternate", "3x3"):
            raise ValueError(f"kernels must be 'alternate' or '3x3', got {self.kernels!r}")
        if self.clamp <= 0:
            raise ValueError(f"clamp must be positive, got {self.clamp}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.map not in MAPS:
            raise ValueError(f"map must be one of {MAPS}, got {self.map!r}")
        if self.map_sigma < 0:
            raise ValueError(f"map_sigma must be >= 0, got {self.map_sigma}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if not 0 < self.score_top_fraction <= 1:
            raise ValueError(f"score_top_fraction must be in (0, 1], got {self.score_top_fraction}")


# --- flow building blocks ------------------------------------------------------------------------
class ActNorm(nn.Module):
    """Per-channel ``y = (x + b)·exp(log_s)``; initialised on the first training batch so that
    y has zero mean and unit variance per channel (Glow). Log-det per location: Σ log_s."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = self.log_scale.sum().expand(x.shape[0], *x.shape[2:])
        return y, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class AffineCoupling(nn.Module):
    """``y_a = x_a``, ``y_b = x_b·exp(s(x_a)) + t(x_a)``, ``s = clamp·tanh(raw/clamp)``."""

    def __init__(self, channels: int, hidden: int, kernel: int, clamp: float) -> None:
        super().__init__()
        self.split = channels // 2
        self.clamp = clamp
        rest = channels - self.split
        pad = kernel // 2
        self.net = nn.Sequential(
            nn.Conv2d(self.split, hidden, kernel, padding=pad),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * rest, kernel, padding=pad),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, shift = self.net(xa).chunk(2, dim=1)
        return self.clamp * torch.tanh(raw / self.clamp), shift

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa, xb = x[:, : self.split], x[:, self.split :]
        s, t = self._scale_shift(xa)
        return torch.cat([xa, xb * torch.exp(s) + t], dim=1), s.sum(dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        ya, yb = y[:, : self.split], y[:, self.split :]
        s, t = self._scale_shift(ya)
        return torch.cat([ya, (yb - t) * torch.exp(-s)], dim=1)


class FlowStep(nn.Module):
    """ActNorm → affine coupling → fixed channel permutation."""

    def __init__(
        self, channels: int, hidden: int, kernel: int, clamp: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.coupling = AffineCoupling(channels, hidden, kernel, clamp)
        perm = torch.randperm(channels, generator=generator)
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld_norm = self.actnorm(x)
        x, ld_coupling = self.coupling(x)
        return x[:, self.perm], ld_norm + ld_coupling

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.actnorm.inverse(self.coupling.inverse(y[:, self.inv_perm]))


class ScaleFlow(nn.Module):
    """A stack of :class:`FlowStep` for one feature scale; fully convolutional."""

    def __init__(
        self,
        channels: int,
        steps: int,
        hidden_ratio: float,
        kernels: str,
        clamp: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        hidden = max(1, round(hidden_ratio * channels))
        self.steps = nn.ModuleList(
            FlowStep(
                channels,
                hidden,
                3 if kernels == "3x3" or i % 2 == 0 else 1,
                clamp,
                generator,
            )
            for i in range(steps)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` (B, C, h, w) and the per-location log|det J| (B, h, w); the full log-det is
        its sum over locations."""
        logdet = torch.zeros(x.shape[0], *x.shape[2:], dtype=x.dtype, device=x.device)
        for step in self.steps:
            x, ld = step(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for step in reversed(self.steps):
            z = step.inverse(z)
        return z


def location_nll(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per channel at each location: (B, C, h, w), (B, h, w) → (B, h, w).

    Summed over locations and multiplied by C it is the exact NLL of the feature map."""
    channels = z.shape[1]
    return (0.5 * (z**2).sum(dim=1) + 0.5 * channels * _LOG_2PI - logdet) / channels


# --- the detector --------------------------------------------------------------------------------
@register
class Flow(Detector):
    name: ClassVar[str] = "flow"
    description: ClassVar[str] = (
        "FastFlow-style normalizing flow on frozen EfficientNet-Lite features; "
        "map = NLL or its input gradient"
    )
    Config = FlowConfig
    config: FlowConfig

    def __init__(self, config: FlowConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        self.features = model_features(self, cfg)
        generator = torch.Generator().manual_seed(cfg.permutation_seed)
        self.flows = nn.ModuleList(
            ScaleFlow(c, cfg.flow_steps, cfg.hidden_ratio, cfg.kernels, cfg.clamp, generator)
            for c in self.features.channels
        ).to(self.device)
        self._optimizer: torch.optim.Optimizer | None = None
        self._trained = False

    # --- likelihood ----------------------------------------------------------------------------
    def _scale_nll(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-location NLL per channel of every scale, [(B, h_i, w_i)]; gradients flow to the
        flows (and to the images if they require grad)."""
        out = []
        for flow, feats in zip(self.flows, self.features(images), strict=True):
            z, logdet = flow(feats)
            out.append(location_nll(z, logdet))
        return out

    # --- training ------------------------------------------------------------------------------
    def setup_training(self, n_train: int) -> None:
        self._optimizer = torch.optim.Adam(
            self.flows.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if self._optimizer is None:
            self.setup_training(0)
        assert self._optimizer is not None
        images = batch["image"].to(self.device)
        self.flows.train()
        with torch.no_grad():
            feature_maps = self.features(images)
        losses = {}
        total = torch.zeros((), device=self.device)
        for i, (flow, feats) in enumerate(zip(self.flows, feature_maps, strict=True)):
            z, logdet = flow(feats)
            nll = location_nll(z, logdet).mean()  # = NLL per dimension, averaged over images
            losses[f"nll_s{self.features.strides[i]}"] = nll.item()
            total = total + nll
        loss = total / len(self.flows)
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.flows.parameters(), self.config.grad_clip)
        self._optimizer.step()
        self._trained = True
        return {"loss": loss.item(), **losses}

    def finish_training(self) -> None:
        self.flows.eval()

    # --- inference -----------------------------------------------------------------------------
    def _nll_map(self, nlls: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        maps = [
            F.interpolate(n[:, None], size=size, mode="bilinear", align_corners=False) for n in nlls
        ]
        return torch.stack(maps).mean(dim=0)  # (B, 1, H, W)

    def _gradient_map(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(|∂NLL/∂x| map (B, 1, H, W), NLL map (B, 1, H, W)) with autograd through the
        frozen extractor; works even when called under ``torch.inference_mode``."""
        with torch.inference_mode(False), torch.enable_grad():
            x = images.clone().requires_grad_(True)  # a normal (non-inference) leaf tensor
            nlls = self._scale_nll(x)
            total = sum(n.sum() for n in nlls)
            (grad,) = torch.autograd.grad(total, x)
            grad_map = grad.abs().sum(dim=1, keepdim=True)
            nll_map = self._nll_map([n.detach() for n in nlls], tuple(images.shape[-2:]))
        return grad_map.detach(), nll_map.detach()

    def export_blocker(self) -> str | None:
        if self.config.map == "gradient":
            return (
                "map=gradient differentiates the NLL with respect to the input at inference "
                "(autograd), which ONNX graphs do not compute; train with map=nll to export"
            )
        return None

    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self._trained, "the flow is untrained")
        images = images.to(self.device)
        self.flows.eval()
        size = tuple(images.shape[-2:])
        if self.config.map == "gradient":
            maps, nll_map = self._gradient_map(images)
        else:
            with torch.no_grad():
                nll_map = maps = self._nll_map(self._scale_nll(images), size)
        with torch.no_grad():
            maps = gaussian_blur(maps, self.config.map_sigma)[:, 0]
            nll_map = gaussian_blur(nll_map, self.config.map_sigma)[:, 0]
            if self.config.score == "max":
                scores = nll_map.flatten(1).amax(dim=1)
            else:
                scores = top_fraction_mean(nll_map, self.config.score_top_fraction)
        return Prediction(scores, maps)

    def log_likelihood(self, images: torch.Tensor) -> torch.Tensor:
        """Mean log-likelihood per dimension of each image's features (B,), averaged over
        scales (the negative of the training loss per image)."""
        with torch.no_grad():
            nlls = self._scale_nll(images.to(self.device))
            return -torch.stack([n.mean(dim=(1, 2)) for n in nlls]).mean(dim=0)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "flows": dict(self.flows.state_dict()),
            "backbone": self.features.identity(),
            "trained": self._trained,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_identity(self.name, dict(state["backbone"]), self.features.identity())
        try:
            self.flows.load_state_dict(state["flows"])
        except RuntimeError as exc:
            raise ValueError(f"flow: weights do not fit this configuration: {exc}") from exc
        self._trained = bool(state["trained"])

    def training_state(self) -> dict[str, Any]:
        return {"optimizer": self._optimizer.state_dict()} if self._optimizer else {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self._optimizer is None:
            self.setup_training(0)
        assert self._optimizer is not None
        self._optimizer.load_state_dict(state["optimizer"])
