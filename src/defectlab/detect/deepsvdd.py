"""Deep SVDD (Ruff et al., ICML 2018): map normal data into a small hypersphere.

A bias-free fully convolutional encoder φ maps every image to a grid of feature vectors (one
per spatial location, stride ``2 ** depth``). Training pulls the features of normal images
towards a fixed centre ``c``; at test time the squared distance ``‖φ(x)_ij − c‖²`` of each
location is the anomaly map (up-sampled bilinearly to the input size) — the *patch-level*
variant — and the image score is the mean of the map's top share or the distance of the
global-average-pooled feature (``score``).

Objectives (``objective``):

* ``"one-class"``: minimise the mean squared distance to ``c`` (plus Adam weight decay);
* ``"soft-boundary"``: minimise ``R² + 1/ν · mean(max(0, ‖φ − c‖² − R²))``; the radius R is
  not a gradient parameter but set after every SVDD epoch to the (1 − ν) quantile of the
  distances seen during that epoch, as in the paper. Scores are then ``‖φ − c‖² − R²``. The
  quantile is taken from a fixed log-spaced histogram of the epoch's distances (4096 bins over
  [1e-12, 1e6], about 1 % relative resolution), so memory is bounded and resume is exact.

Guards against the trivial "hypersphere collapse" solution, as in the paper: no bias terms
anywhere, BatchNorm without affine parameters, an unbounded activation (LeakyReLU), and a
centre fixed before training with near-zero coordinates pushed to ±``eps``.

How the trainer's single ``epochs`` loop is used (epoch numbers from 1):

1. epochs ``1 … pretrain_epochs``: autoencoder pre-training — the encoder plus a mirrored
   bias-free decoder (nearest up-sampling + convolution) trained with the L2 reconstruction
   loss (``recon_loss``), their own Adam optimiser;
2. epoch ``pretrain_epochs + 1``: the *centre pass* — no gradient step; every batch's features
   (BatchNorm in training mode, as in the SVDD phase) are summed and ``c`` is their mean over
   all training locations, fixed at the end of the epoch. It depends only on the weights and
   the data, so it is deterministic, and it is stored in the model state;
3. the remaining epochs: SVDD training of the encoder (fresh Adam optimiser), logging
   ``loss`` and ``mean_dist``.

So ``epochs`` must be at least ``pretrain_epochs + 2``. The decoder and both optimisers live in
:meth:`DeepSVDD.training_state` (needed only to resume), the encoder, ``c`` and R in
:meth:`DeepSVDD.state_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.base import ModelConfig, Prediction
from defectlab.detect.base import Detector
from defectlab.ops import gaussian_blur, top_fraction_mean
from defectlab.registry import register

OBJECTIVES = ("one-class", "soft-boundary")
SCORES = ("topk", "global")
LEAKY_SLOPE = 0.01
# log10 range and resolution of the distance histogram used for the soft-boundary quantile
_HIST_LOG_MIN, _HIST_LOG_MAX, _HIST_BINS = -12.0, 6.0, 4096


@dataclass
class DeepSVDDConfig(ModelConfig):
    #: total trainer epochs: pretrain_epochs AE epochs + 1 centre pass + SVDD epochs
    epochs: int = 12
    #: "one-class" (mean distance) or "soft-boundary" (radius R with outlier share ν)
    objective: str = "one-class"
    #: soft boundary: share of training distances allowed outside the sphere, in (0, 1]
    nu: float = 0.1
    #: leading epochs of autoencoder pre-training (0 = none)
    pretrain_epochs: int = 0
    #: channels of the first convolution; doubled at each of the ``depth`` stages
    width: int = 16
    #: number of conv + 2×2 max-pool stages; the feature stride is 2 ** depth
    depth: int = 3
    #: feature dimension of each location (the final 1×1 convolution)
    rep_dim: int = 64
    #: side of the square convolution kernels (odd)
    kernel_size: int = 5
    #: Adam learning rate (both phases)
    lr: float = 1e-3
    #: Adam weight decay (L2 on the weights, the paper's regulariser), both phases
    weight_decay: float = 1e-6
    #: centre coordinates with |c_k| < eps are pushed to ±eps (collapse guard)
    eps: float = 0.1
    #: image score: "topk" (mean of the top share of the map) or "global" (distance of the
    #: global-average-pooled feature)
    score: str = "topk"
    #: share of map values averaged by the "topk" score
    score_top_fraction: float = 0.01
    #: Gaussian smoothing of the up-sampled map, in pixels (0 = none)
    map_sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if not 0 < self.nu <= 1:
            raise ValueError(f"nu must be in (0, 1], got {self.nu}")
        if self.pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be >= 0, got {self.pretrain_epochs}")
        if self.epochs < self.pretrain_epochs + 2:
            raise ValueError(
                f"epochs must be at least pretrain_epochs + 2 = {self.pretrain_epochs + 2} "
                f"(pre-training epochs, one centre pass, then SVDD epochs), got {self.epochs}"
            )
        for name in ("width", "depth", "rep_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if not 0 < self.score_top_fraction <= 1:
            raise ValueError(f"score_top_fraction must be in (0, 1], got {self.score_top_fraction}")
        if self.map_sigma < 0:
            raise ValueError(f"map_sigma must be >= 0, got {self.map_sigma}")


def _stage(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out, eps=1e-4, affine=False),
        nn.LeakyReLU(LEAKY_SLOPE),
    ]


def build_encoder(channels: int, cfg: DeepSVDDConfig) -> nn.Sequential:
    """Bias-free conv encoder: ``depth`` × (conv, non-affine BN, LeakyReLU, max-pool), then a
    1×1 convolution to ``rep_dim`` (no BN, no activation: the paper's final linear layer)."""
    layers: list[nn.Module] = []
    c_in = channels
    for i in range(cfg.depth):
        c_out = cfg.width * 2**i
        layers += [*_stage(c_in, c_out, cfg.kernel_size), nn.MaxPool2d(2)]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, cfg.rep_dim, 1, bias=False))
    return nn.Sequential(*layers)


def build_decoder(channels: int, cfg: DeepSVDDConfig) -> nn.Sequential:
    """The encoder mirrored, bias-free: 1×1 conv back from ``rep_dim``, then ``depth`` ×
    (nearest 2× up-sampling, conv, non-affine BN, LeakyReLU) and a final conv to the image
    channels (a sigmoid is applied in the forward pass)."""
    top = cfg.width * 2 ** (cfg.depth - 1)
    layers: list[nn.Module] = _stage(cfg.rep_dim, top, 1)
    c_in = top
    for i in reversed(range(cfg.depth)):
        c_out = cfg.width * 2 ** max(i - 1, 0)
        layers += [
            nn.Upsample(scale_factor=2, mode="nearest"),
            *_stage(c_in, c_out, cfg.kernel_size),
        ]
        c_in = c_out
    layers.append(
        nn.Conv2d(c_in, channels, cfg.kernel_size, padding=cfg.kernel_size // 2, bias=False)
    )
    return nn.Sequential(*layers)


def _hist_quantile(hist: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of values histogrammed in log10-spaced bins (linear in log within a
    bin)."""
    total = float(hist.sum())
    cumulative = hist.cumsum(0)
    target = q * total
    index = int(torch.searchsorted(cumulative, torch.tensor(target, dtype=hist.dtype)))
    index = min(index, _HIST_BINS - 1)
    below = float(cumulative[index - 1]) if index > 0 else 0.0
    inside = float(hist[index])
    frac = (target - below) / inside if inside > 0 else 0.0
    width = (_HIST_LOG_MAX - _HIST_LOG_MIN) / _HIST_BINS
    return 10.0 ** (_HIST_LOG_MIN + (index + min(max(frac, 0.0), 1.0)) * width)


@register
class DeepSVDD(Detector):
    name: ClassVar[str] = "deepsvdd"
    description: ClassVar[str] = (
        "Deep SVDD: bias-free CNN pulls patch features to a centre; map = patch distance to c"
    )
    Config = DeepSVDDConfig
    config: DeepSVDDConfig

    def __init__(self, config: DeepSVDDConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.stride = 2**self.config.depth
        if self.image_size % self.stride != 0:
            raise ValueError(
                f"deepsvdd: image size {self.image_size} must be divisible by the network's "
                f"stride {self.stride} (2 ** depth, depth={self.config.depth}); use e.g. "
                f"{max(self.stride, round(self.image_size / self.stride) * self.stride)}"
            )
        self.encoder = build_encoder(self.channels, self.config).to(self.device)
        self.decoder = (
            build_decoder(self.channels, self.config).to(self.device)
            if self.config.pretrain_epochs > 0
            else None
        )
        self.center: torch.Tensor | None = None
        self.radius = 0.0
        # training progress (resume state)
        self._epochs_done = 0
        self._center_sum = torch.zeros(self.config.rep_dim, dtype=torch.float64)
        self._center_count = 0
        self._hist = torch.zeros(_HIST_BINS, dtype=torch.float64)
        self._svdd_opt: torch.optim.Optimizer | None = None
        self._ae_opt: torch.optim.Optimizer | None = None

    # --- training ------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """``"pretrain"``, ``"center"`` or ``"svdd"``: what the next training step does."""
        if self._epochs_done < self.config.pretrain_epochs:
            return "pretrain"
        if self._epochs_done == self.config.pretrain_epochs:
            return "center"
        return "svdd"

    def _adam(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def setup_training(self, n_train: int) -> None:
        self._svdd_opt = self._adam(list(self.encoder.parameters()))
        if self.decoder is not None:
            self._ae_opt = self._adam([*self.encoder.parameters(), *self.decoder.parameters()])

    def _distances(self, features: torch.Tensor) -> torch.Tensor:
        """Squared distance of each location's feature to c: (B, D, h, w) → (B, h, w)."""
        assert self.center is not None
        return ((features - self.center.view(1, -1, 1, 1)) ** 2).sum(dim=1)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if self._svdd_opt is None:
            self.setup_training(0)
        images = batch["image"].to(self.device)
        self._check_size(images)
        self.encoder.train()
        phase = self.phase
        if phase == "pretrain":
            assert self.decoder is not None and self._ae_opt is not None
            self.decoder.train()
            recon = torch.sigmoid(self.decoder(self.encoder(images)))
            loss = F.mse_loss(recon, images)
            self._ae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self._ae_opt.step()
            return {"recon_loss": loss.item()}
        if phase == "center":
            with torch.no_grad():
                features = self.encoder(images)
            self._center_sum += features.double().sum(dim=(0, 2, 3)).cpu()
            self._center_count += features.shape[0] * features.shape[2] * features.shape[3]
            return {}
        features = self.encoder(images)
        dist = self._distances(features)
        if self.config.objective == "one-class":
            loss = dist.mean()
        else:
            r2 = self.radius**2
            loss = r2 + F.relu(dist - r2).mean() / self.config.nu
            self._accumulate(dist.detach())
        assert self._svdd_opt is not None
        self._svdd_opt.zero_grad(set_to_none=True)
        loss.backward()
        self._svdd_opt.step()
        return {"loss": loss.item(), "mean_dist": dist.mean().item()}

    def _accumulate(self, dist: torch.Tensor) -> None:
        log = dist.double().clamp_min(1e-300).log10().cpu().flatten()
        scaled = (log - _HIST_LOG_MIN) / (_HIST_LOG_MAX - _HIST_LOG_MIN) * _HIST_BINS
        index = scaled.floor().clamp(0, _HIST_BINS - 1).long()
        self._hist += torch.bincount(index, minlength=_HIST_BINS).double()

    def end_epoch(self, epoch: int) -> None:
        phase = self.phase
        if phase == "center":
            self._fix_center()
        elif phase == "svdd" and self.config.objective == "soft-boundary" and self._hist.sum() > 0:
            r2 = _hist_quantile(self._hist, 1.0 - self.config.nu)
            self.radius = math.sqrt(r2)
            self._hist.zero_()
        self._epochs_done = epoch + 1

    def _fix_center(self) -> None:
        if self._center_count == 0:
            raise RuntimeError("deepsvdd: the centre pass saw no training data")
        c = (self._center_sum / self._center_count).float()
        eps = self.config.eps
        c[(c.abs() < eps) & (c < 0)] = -eps
        c[(c.abs() < eps) & (c >= 0)] = eps
        self.center = c.to(self.device)

    def finish_training(self) -> None:
        if self.center is None:
            raise RuntimeError(
                "deepsvdd: training ended before the centre pass; epochs must be at least "
                "pretrain_epochs + 2"
            )

    # --- inference -----------------------------------------------------------------------------
    def _check_size(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"deepsvdd: image size {h}×{w} is not divisible by the network's stride "
                f"{self.stride} (2 ** depth)"
            )

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        if self.center is None:
            raise RuntimeError("deepsvdd: predict before fit (the centre c is not set)")
        images = images.to(self.device)
        self._check_size(images)
        self.encoder.eval()
        features = self.encoder(images)
        offset = self.radius**2 if self.config.objective == "soft-boundary" else 0.0
        dist = self._distances(features)[:, None] - offset
        maps = F.interpolate(dist, size=images.shape[-2:], mode="bilinear", align_corners=False)
        maps = gaussian_blur(maps, self.config.map_sigma)[:, 0]
        if self.config.score == "topk":
            scores = top_fraction_mean(maps, self.config.score_top_fraction)
        else:
            pooled = features.mean(dim=(2, 3))
            scores = ((pooled - self.center) ** 2).sum(dim=1) - offset
        return Prediction(scores, maps)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "encoder": dict(self.encoder.state_dict()),
            "radius": float(self.radius),
        }
        if self.center is not None:
            state["center"] = self.center.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_module(self.encoder, state["encoder"], "encoder")
        self.radius = float(state["radius"])
        center = state.get("center")
        if center is not None and tuple(center.shape) != (self.config.rep_dim,):
            raise ValueError(
                f"deepsvdd: centre has shape {tuple(center.shape)}, need ({self.config.rep_dim},)"
            )
        self.center = center.float().to(self.device) if center is not None else None

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epochs_done": self._epochs_done,
            "center_sum": self._center_sum.clone(),
            "center_count": self._center_count,
            "hist": self._hist.clone(),
        }
        if self._svdd_opt is not None:
            state["svdd_opt"] = self._svdd_opt.state_dict()
        if self.decoder is not None:
            state["decoder"] = dict(self.decoder.state_dict())
        if self._ae_opt is not None:
            state["ae_opt"] = self._ae_opt.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._epochs_done = int(state["epochs_done"])
        self._center_sum = state["center_sum"].double().cpu()
        self._center_count = int(state["center_count"])
        self._hist = state["hist"].double().cpu()
        if self._svdd_opt is None:
            self.setup_training(0)
        if "svdd_opt" in state:
            assert self._svdd_opt is not None
            self._svdd_opt.load_state_dict(state["svdd_opt"])
        if self.decoder is not None and "decoder" in state:
            _load_module(self.decoder, state["decoder"], "decoder")
        if self._ae_opt is not None and "ae_opt" in state:
            self._ae_opt.load_state_dict(state["ae_opt"])


def _load_module(module: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:  # shape or key mismatch: another architecture's weights
        raise ValueError(f"deepsvdd: {what} weights do not fit this configuration: {exc}") from exc
