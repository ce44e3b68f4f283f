"""Deep SVDD (Ruff et al., ICML 2018): map normal data into a small hypersphere.

Two versions share the objectives, the centre pass, the map and the score:

* ``features="lite0"`` (the default; ``lite1`` and ``lite2`` too, the backbones of
  :mod:`defectlab.components.features`; kept by a rule on procedural defects painted onto
  normal validation images, ``benchmarks/variant_selection.py``): the PANDA-style variant
  (Reiss et al., CVPR 2021) on *pretrained* patch features. The frozen ImageNet backbone
  gives the stride-8 and stride-16 maps (``feature_blocks``,
  default the backbone's last of each), each averaged over a ``patch_size`` neighbourhood,
  the coarser one up-sampled, concatenated (as in ``patchmemory``); a bias-free projection
  head φ (non-affine BatchNorm of the frozen features, 1×1 convolution, non-affine
  BatchNorm, LeakyReLU, 1×1 convolution to ``rep_dim``) is the only trained part. The centre
  is one per location of the feature grid (``center="auto"``), and at the end of training
  each location's distance is divided by its mean over the kept training images
  (``normalization_samples``): patches at the image border, or at structures every image has
  in the same place, differ systematically from the rest and vary more, and without both
  they are the peaks of every normal image's map.
  Guard against collapse, in three parts: the
  backbone is frozen (it cannot learn to map everything to one point); the head has no bias
  and its input is standardised, so a constant output would have to be built from the
  features' variation; and a *variance floor*: each output dimension's standard deviation
  over the batch (within each location, for per-location centres) must stay at least
  ``variance_floor`` times its value at the centre pass, enforced by ``variance_weight`` ×
  Σₖ max(0, floorₖ² − varₖ) in the loss. Any weight above 1 makes dropping below the floor
  cost more distance than it saves, so the head cannot shrink the normal features to c and
  instead learns to emphasise the directions in which normal patches vary least (where
  Mahalanobis-type detectors find their discriminative power, Kamoi & Kobayashi 2020). The
  logged ``std_ratio`` is the smallest ratio of an output dimension's current standard
  deviation to its floor.
  ``finetune_blocks=k`` (PANDA's fine-tuning) also trains copies of the backbone's last k
  blocks up to the last one used, with their own small learning rate (``finetune_lr``) and
  an L2 pull back to the pretrained weights (``anchor_weight`` × Σ‖w − w₀‖²: elastic weight
  consolidation with a uniform Fisher, L2-SP). The copies stay in eval mode (BatchNorm
  statistics as pretrained), the centre still comes from the initial (pretrained) features,
  and the variance floor still holds the head's output, so the fine-tuned block cannot
  collapse the normal features either; the logged ``anchor`` is Σ‖w − w₀‖².
* ``features="pixels"``: the seed's exact version below, a CNN learnt from the pixels.

Both versions: the centre is fixed from the initial features (the centre pass below), the
anomaly map is the squared distance of each location's feature to c, up-sampled, and the
score is as described next. ``score_normalization="image_statistics"`` then subtracts what
brightness and texture predict of the score (:mod:`defectlab.detect.nuisance`, fitted on
``normalization_samples`` training images at the end of training).

The seed version (``features="pixels"``):

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

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.base import ModelConfig, Prediction
from defectlab.components.features import (
    BACKBONES,
    LiteFeatures,
    block_layout,
    check_identity,
    check_image_size,
    default_blocks,
    feature_channels,
    patch_embedding,
    validate_blocks,
)
from defectlab.config import check_choice
from defectlab.detect.base import Detector
from defectlab.detect.nuisance import ScoreNormalizer, image_statistics
from defectlab.ops import gaussian_blur, top_fraction_mean
from defectlab.registry import register

OBJECTIVES = ("one-class", "soft-boundary")
SCORES = ("topk", "global")
#: ``features`` values: a pretrained backbone of :mod:`defectlab.components.features`, or
#: "pixels" (the seed's CNN on the image)
FEATURES = (*BACKBONES, "pixels")
SCORE_NORMALIZATIONS = ("none", "image_statistics")
#: "global": one centre; "position": one centre per grid location; "auto": position for
#: pretrained features, global for pixels (the seed)
CENTERS = ("auto", "global", "position")
#: a linear fit of the five image statistics needs a few more images than unknowns
MIN_NORMALIZATION_SAMPLES = 8
LEAKY_SLOPE = 0.01
# log10 range and resolution of the distance histogram used for the soft-boundary quantile
_HIST_LOG_MIN, _HIST_LOG_MAX, _HIST_BINS = -12.0, 6.0, 4096


@dataclass
class DeepSVDDConfig(ModelConfig):
    #: total trainer epochs: pretrain_epochs AE epochs + 1 centre pass + SVDD epochs
    epochs: int = 12
    #: "lite0" (or "lite1", "lite2"): frozen pretrained patch features + trained bias-free
    #: head (see the module docstring); "pixels": the seed's CNN trained from the image.
    #: Lite0: kept by a rule on painted normal validation images
    #: (benchmarks/variant_selection.py, docs/results/variant_selection.md)
    features: str = "lite0"
    #: "one-class" (mean distance) or "soft-boundary" (radius R with outlier share ν)
    objective: str = "one-class"
    #: soft boundary: share of training distances allowed outside the sphere, in (0, 1]
    nu: float = 0.1
    #: leading epochs of autoencoder pre-training (0 = none; features=pixels only)
    pretrain_epochs: int = 0
    #: pixels: channels of the first convolution; doubled at each of the ``depth`` stages
    width: int = 16
    #: pixels: number of conv + 2×2 max-pool stages; the feature stride is 2 ** depth
    depth: int = 3
    #: feature dimension of each location (the final 1×1 convolution)
    rep_dim: int = 64
    #: pixels: side of the square convolution kernels (odd)
    kernel_size: int = 5
    #: features: backbone blocks whose outputs form the patch feature; empty = the
    #: backbone's last stride-8 and stride-16 blocks
    feature_blocks: tuple[int, ...] = ()
    #: features: side of the local average-pooling neighbourhood of each map (odd; 1 = none)
    patch_size: int = 3
    #: features: hidden channels of the projection head
    head_width: int = 256
    #: features: collapse guard, each output dimension's standard deviation may not fall
    #: below this share of its value at the centre pass (0 = no floor)
    variance_floor: float = 0.5
    #: features: weight of the floor's hinge penalty; above 1 the floor holds
    variance_weight: float = 10.0
    #: features: how many of the backbone's last blocks (up to the last one used) are
    #: fine-tuned with the head (PANDA); 0 = the backbone stays frozen
    finetune_blocks: int = 0
    #: features, finetune_blocks > 0: Adam learning rate of the fine-tuned blocks (small:
    #: they start from ImageNet weights)
    finetune_lr: float = 1e-4
    #: features, finetune_blocks > 0: weight of the L2 pull of the fine-tuned weights back
    #: to their pretrained values (EWC with a uniform Fisher, i.e. L2-SP), summed over weights
    anchor_weight: float = 1.0
    #: Adam learning rate (both phases)
    lr: float = 1e-3
    #: Adam weight decay (L2 on the weights, the paper's regulariser), both phases
    weight_decay: float = 1e-6
    #: centre coordinates with |c_k| < eps are pushed to ±eps (collapse guard)
    eps: float = 0.1
    #: "global" (one centre c, the seed), "position" (one centre per location of the feature
    #: grid, for images whose layout is fixed: borders, busbars) or "auto" (position for
    #: pretrained features, global for pixels)
    center: str = "auto"
    #: image score: "topk" (mean of the top share of the map) or "global" (distance of the
    #: global-average-pooled feature)
    score: str = "topk"
    #: share of map values averaged by the "topk" score
    score_top_fraction: float = 0.01
    #: Gaussian smoothing of the up-sampled map, in pixels (0 = none)
    map_sigma: float = 0.0
    #: "image_statistics": subtract the score that brightness and texture predict (a linear
    #: fit over normalization_samples training images kept from the first batches; with
    #: per-location centres they also set each location's distance scale)
    score_normalization: str = "none"
    normalization_samples: int = 256

    def __post_init__(self) -> None:
        check_choice("features", self.features, FEATURES)
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("score", self.score, SCORES)
        check_choice("score_normalization", self.score_normalization, SCORE_NORMALIZATIONS)
        check_choice("center", self.center, CENTERS)
        if not 0 < self.nu <= 1:
            raise ValueError(f"nu must be in (0, 1], got {self.nu}")
        if self.pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be >= 0, got {self.pretrain_epochs}")
        if self.pretrain_epochs > 0 and self.features != "pixels":
            raise ValueError(
                "pretrain_epochs (autoencoder pre-training of the CNN) applies to "
                f"features=pixels only; with features={self.features} the backbone is "
                "pretrained already: set pretrain_epochs=0"
            )
        if self.epochs < self.pretrain_epochs + 2:
            raise ValueError(
                f"epochs must be at least pretrain_epochs + 2 = {self.pretrain_epochs + 2} "
                f"(pre-training epochs, one centre pass, then SVDD epochs), got {self.epochs}"
            )
        for name in ("width", "depth", "rep_dim", "head_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")
        self.feature_blocks = tuple(int(b) for b in self.feature_blocks)
        if self.features != "pixels":
            validate_blocks(self.blocks, backbone_name=self.features)
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd number, got {self.patch_size}")
        if self.finetune_blocks < 0:
            raise ValueError(f"finetune_blocks must be >= 0, got {self.finetune_blocks}")
        if self.finetune_blocks > 0:
            if self.features == "pixels":
                raise ValueError(
                    "finetune_blocks applies to pretrained features only (features=pixels "
                    "trains its whole CNN already): set finetune_blocks=0"
                )
            if self.finetune_blocks > max(self.blocks) + 1:
                raise ValueError(
                    f"finetune_blocks={self.finetune_blocks} exceeds the "
                    f"{max(self.blocks) + 1} backbone blocks up to the last one used "
                    f"({max(self.blocks)})"
                )
        if self.finetune_lr <= 0:
            raise ValueError(f"finetune_lr must be positive, got {self.finetune_lr}")
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if not 0 <= self.variance_floor < 1:
            raise ValueError(f"variance_floor must be in [0, 1), got {self.variance_floor}")
        if self.variance_floor > 0 and not self.variance_weight > 1:
            raise ValueError(
                f"variance_weight must be above 1 for the variance floor to hold, got "
                f"{self.variance_weight} (or set variance_floor=0 to turn the guard off)"
            )
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
        if self.normalization_samples < MIN_NORMALIZATION_SAMPLES:
            raise ValueError(
                f"normalization_samples must be at least {MIN_NORMALIZATION_SAMPLES}, got "
                f"{self.normalization_samples}"
            )

    @property
    def per_position(self) -> bool:
        """Whether each grid location has its own centre (``center``, resolved)."""
        if self.center == "auto":
            return self.features != "pixels"
        return self.center == "position"

    @property
    def blocks(self) -> tuple[int, ...]:
        """The backbone blocks used (features mode): ``feature_blocks`` or the defaults."""
        return self.feature_blocks or default_blocks(self.features)

    @property
    def feature_dim(self) -> int:
        """Channels of the concatenated backbone patch feature (features mode)."""
        return feature_channels(self.blocks, self.features)


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


def build_head(in_channels: int, cfg: DeepSVDDConfig) -> nn.Sequential:
    """Bias-free projection head over frozen patch features: non-affine BN (standardises the
    features), 1×1 conv, non-affine BN, LeakyReLU, 1×1 conv to ``rep_dim``."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels, eps=1e-4, affine=False),
        *_stage(in_channels, cfg.head_width, 1),
        nn.Conv2d(cfg.head_width, cfg.rep_dim, 1, bias=False),
    )


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


def build_tuned(backbone: LiteFeatures, count: int) -> nn.ModuleList:
    """Trainable copies of the last ``count`` blocks of ``backbone`` (which ends at its last
    used block), in eval mode for good: BatchNorm statistics and drop-connect stay as
    pretrained, only the weights move."""
    tuned = _EvalBlocks(copy.deepcopy(list(backbone.body[len(backbone.body) - count :])))
    tuned.requires_grad_(True)
    return tuned.eval()


class _EvalBlocks(nn.ModuleList):
    """Backbone blocks that stay in eval mode whatever ``train()`` asks."""

    def train(self, mode: bool = True) -> _EvalBlocks:
        return super().train(False)


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


def output_variance(features: torch.Tensor, per_position: bool = False) -> torch.Tensor:
    """Variance of each output dimension over a batch: (B, D, h, w) → (D,). Over all its
    locations, or (``per_position``) the mean of each location's variance over the images,
    so that differences between locations do not count as spread."""
    if per_position:
        return features.var(dim=0, unbiased=False).mean(dim=(1, 2))
    return features.transpose(0, 1).flatten(1).var(dim=1, unbiased=False)


def output_std(features: torch.Tensor, per_position: bool = False) -> torch.Tensor:
    """The square root of :func:`output_variance` (no gradient through the root)."""
    return output_variance(features.detach(), per_position).clamp_min(0).sqrt()


@register
class DeepSVDD(Detector):
    """See the module docstring: the pretrained-feature version and the seed's CNN."""

    name: ClassVar[str] = "deepsvdd"
    description: ClassVar[str] = (
        "Deep SVDD on frozen Lite0 patch features: bias-free head pulled to a centre, variance "
        "floor against collapse; map = patch distance to c (seed CNN: --set features=pixels)"
    )
    Config = DeepSVDDConfig
    config: DeepSVDDConfig
    #: 2: the pretrained-feature version, the score normaliser
    state_version: ClassVar[int] = 2

    def __init__(self, config: DeepSVDDConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        self.backbone: LiteFeatures | None = None
        #: finetune_blocks > 0: trainable copies of the backbone's last used blocks (eval
        #: mode: BatchNorm statistics stay as pretrained); the frozen originals are the anchor
        self.tuned: nn.ModuleList | None = None
        if cfg.features == "pixels":
            self.stride = 2**cfg.depth
            if self.image_size % self.stride != 0:
                raise ValueError(
                    f"deepsvdd: image size {self.image_size} must be divisible by the "
                    f"network's stride {self.stride} (2 ** depth, depth={cfg.depth}); use e.g. "
                    f"{max(self.stride, round(self.image_size / self.stride) * self.stride)}"
                )
            self.encoder = build_encoder(self.channels, cfg).to(self.device)
        else:
            check_image_size(self.name, self.image_size)
            if self.channels not in (1, 3):
                raise ValueError(f"deepsvdd: images must have 1 or 3 channels, got {self.channels}")
            self.backbone = LiteFeatures(cfg.blocks, self.device, backbone=cfg.features)
            if cfg.finetune_blocks > 0:
                self.tuned = build_tuned(self.backbone, cfg.finetune_blocks)
            self.stride = block_layout(cfg.features)[cfg.blocks[0]][0]
            self.encoder = build_head(cfg.feature_dim, cfg).to(self.device)
        self.decoder = (
            build_decoder(self.channels, cfg).to(self.device) if cfg.pretrain_epochs > 0 else None
        )
        self.center: torch.Tensor | None = None
        self.radius = 0.0
        #: features: per-dimension lower bound of the head output's standard deviation
        self.std_floor: torch.Tensor | None = None
        #: per-location centres: each location's mean training distance (h, w), divides the map
        self.dist_scale: torch.Tensor | None = None
        self.score_normalizer = ScoreNormalizer()
        # training progress (resume state)
        self._epochs_done = 0
        #: shape of the centre: (rep_dim,) or (rep_dim, h, w) with one per grid location
        side = self.image_size // self.stride
        self.center_shape = (cfg.rep_dim, side, side) if cfg.per_position else (cfg.rep_dim,)
        self._center_sum = torch.zeros(self.center_shape, dtype=torch.float64)
        self._center_sq = torch.zeros(self.center_shape, dtype=torch.float64)
        self._center_count = 0
        self._hist = torch.zeros(_HIST_BINS, dtype=torch.float64)
        self._kept: torch.Tensor | None = None
        self._svdd_opt: torch.optim.Optimizer | None = None
        self._ae_opt: torch.optim.Optimizer | None = None

    # --- features ------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """φ(x): one feature vector per location, (B, rep_dim, H / stride, W / stride). The
        caller sets the train/eval mode of the trained part (``encoder``)."""
        if self.backbone is None:
            return self.encoder(images)
        if self.tuned is None:
            with torch.no_grad():
                frozen = patch_embedding(self.backbone(images), self.config.patch_size)
            return self.encoder(frozen)
        return self.encoder(patch_embedding(self.backbone_maps(images), self.config.patch_size))

    def backbone_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's maps of the used blocks, the last ``finetune_blocks`` blocks run by
        their trainable copies (the rest without gradient)."""
        assert self.backbone is not None and self.tuned is not None
        backbone, wanted = self.backbone, set(self.config.blocks)
        start = len(backbone.body) - len(self.tuned)
        out = []
        with torch.no_grad():
            x = backbone.stem(backbone.normalize(images))
            for index in range(start):
                x = backbone.body[index](x)
                if index in wanted:
                    out.append(x)
        for index, block in enumerate(self.tuned, start=start):
            x = block(x)
            if index in wanted:
                out.append(x)
        return out

    def anchor_penalty(self) -> torch.Tensor:
        """Σ ‖w − w₀‖² over the fine-tuned weights, w₀ their pretrained values (0 if none)."""
        if self.tuned is None or self.backbone is None:
            return torch.zeros((), device=self.device)
        start = len(self.backbone.body) - len(self.tuned)
        pairs = zip(
            self.tuned.parameters(),
            nn.ModuleList(self.backbone.body[start:]).parameters(),
            strict=True,
        )
        return torch.stack([((w - w0) ** 2).sum() for w, w0 in pairs]).sum()

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
        if self.tuned is not None:  # its own, smaller rate; no decay: the anchor pulls instead
            group = {"params": list(self.tuned.parameters()), "weight_decay": 0.0}
            self._svdd_opt.add_param_group(group | {"lr": self.config.finetune_lr})
        if self.decoder is not None:
            self._ae_opt = self._adam([*self.encoder.parameters(), *self.decoder.parameters()])

    def _distances(self, features: torch.Tensor) -> torch.Tensor:
        """Squared distance of each location's feature to c: (B, D, h, w) → (B, h, w)."""
        assert self.center is not None
        center = self.center if self.center.ndim == 3 else self.center.view(-1, 1, 1)
        return ((features - center[None]) ** 2).sum(dim=1)

    def _keep(self, images: torch.Tensor) -> None:
        """Keep the first training images for the score normaliser and the per-location
        distance scale (CPU)."""
        cfg = self.config
        held = 0 if self._kept is None else len(self._kept)
        wanted = cfg.normalization_samples - held
        if (cfg.score_normalization == "none" and not cfg.per_position) or wanted <= 0:
            return
        new = images[:wanted].detach().float().cpu()
        self._kept = new if self._kept is None else torch.cat([self._kept, new])

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if self._svdd_opt is None:
            self.setup_training(0)
        images = batch["image"].to(self.device)
        self._check_size(images)
        if self._epochs_done == 0:
            self._keep(images)
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
                features = self.embed(images).double()
            if self.config.per_position:
                self._center_sum += features.sum(dim=0).cpu()
                self._center_sq += features.pow(2).sum(dim=0).cpu()
                self._center_count += features.shape[0]
            else:
                self._center_sum += features.sum(dim=(0, 2, 3)).cpu()
                self._center_sq += features.pow(2).sum(dim=(0, 2, 3)).cpu()
                self._center_count += features.shape[0] * features.shape[2] * features.shape[3]
            return {}
        features = self.embed(images)
        dist = self._distances(features)
        if self.config.objective == "one-class":
            loss = dist.mean()
        else:
            r2 = self.radius**2
            loss = r2 + F.relu(dist - r2).mean() / self.config.nu
            self._accumulate(dist.detach())
        logs: dict[str, float] = {}
        # the floor needs a spread to measure: at least two images (per-location centres) or
        # two locations; a smaller last batch trains without it
        spread = features.shape[0] * (1 if self.config.per_position else features[0, 0].numel())
        if self.std_floor is not None and spread > 1:
            variance = output_variance(features, self.config.per_position)
            floor = self.std_floor.to(variance.device)
            guard = F.relu(floor.pow(2) - variance).sum()
            loss = loss + self.config.variance_weight * guard
            ratio = (variance.detach().clamp_min(0).sqrt() / floor).min()
            logs = {"guard": guard.item(), "std_ratio": ratio.item()}
        if self.tuned is not None:
            anchor = self.anchor_penalty()
            loss = loss + self.config.anchor_weight * anchor
            logs["anchor"] = anchor.item()
        assert self._svdd_opt is not None
        self._svdd_opt.zero_grad(set_to_none=True)
        loss.backward()
        self._svdd_opt.step()
        return {"loss": loss.item(), "mean_dist": dist.mean().item()} | logs

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
        mean = self._center_sum / self._center_count
        c = mean.float()
        eps = self.config.eps
        c[(c.abs() < eps) & (c < 0)] = -eps
        c[(c.abs() < eps) & (c >= 0)] = eps
        self.center = c.to(self.device)
        if self.backbone is not None and self.config.variance_floor > 0:
            variance = (self._center_sq / self._center_count - mean.pow(2)).clamp_min(0)
            if variance.ndim == 3:  # per position: the mean over locations of each variance
                variance = variance.mean(dim=(1, 2))
            self.std_floor = (self.config.variance_floor * variance.sqrt()).float().to(self.device)

    def finish_training(self) -> None:
        if self.center is None:
            raise RuntimeError(
                "deepsvdd: training ended before the centre pass; epochs must be at least "
                "pretrain_epochs + 2"
            )
        self.score_normalizer = ScoreNormalizer()
        self.dist_scale = None
        if self.config.per_position:
            if self._kept is None:
                raise RuntimeError("deepsvdd: no training images kept for the distance scale")
            with torch.no_grad():
                self.encoder.eval()
                total = sum(
                    self._distances(self.embed(chunk.to(self.device))).sum(dim=0)
                    for chunk in self._kept.split(16)
                )
            assert isinstance(total, torch.Tensor)
            self.dist_scale = (total / len(self._kept)).clamp_min(1e-12)
        if self.config.score_normalization == "image_statistics":
            kept = self._kept
            if kept is None or len(kept) < MIN_NORMALIZATION_SAMPLES:
                raise RuntimeError(
                    f"deepsvdd: score_normalization=image_statistics needs at least "
                    f"{MIN_NORMALIZATION_SAMPLES} training images, got "
                    f"{0 if kept is None else len(kept)}"
                )
            raw = torch.cat([self._raw(chunk.to(self.device))[0].cpu() for chunk in kept.split(16)])
            self.score_normalizer.fit(raw, image_statistics(kept))

    # --- inference -----------------------------------------------------------------------------
    def _check_size(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        if self.config.per_position and (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"deepsvdd: image size {h}×{w} differs from the model's {self.image_size}: a "
                "centre per grid location needs the training size"
            )
        multiple = self.stride if self.backbone is None else 32
        if h % multiple or w % multiple:
            raise ValueError(
                f"deepsvdd: image size {h}×{w} is not divisible by the network's stride "
                f"{multiple} ({'2 ** depth' if self.backbone is None else 'the backbone'})"
            )

    @torch.no_grad()
    def _raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,) before any normalisation, and maps (B, H, W)."""
        self.check_fitted(self.center is not None, "the centre c is not set")
        self._check_size(images)
        self.encoder.eval()
        features = self.embed(images)
        offset = self.radius**2 if self.config.objective == "soft-boundary" else 0.0
        dist = self._distances(features) - offset
        if self.dist_scale is not None:
            dist = dist / self.dist_scale
        dist = dist[:, None]
        maps = F.interpolate(dist, size=images.shape[-2:], mode="bilinear", align_corners=False)
        maps = gaussian_blur(maps, self.config.map_sigma)[:, 0]
        if self.config.score == "topk":
            scores = top_fraction_mean(maps, self.config.score_top_fraction)
        else:
            pooled = features.mean(dim=(2, 3))
            center = self.center if self.center.ndim == 1 else self.center.mean(dim=(1, 2))
            scores = ((pooled - center) ** 2).sum(dim=1) - offset
        return scores, maps

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        images = images.to(self.device)
        scores, maps = self._raw(images)
        if self.score_normalizer.fitted:
            scores = self.score_normalizer(scores, image_statistics(images))
        return Prediction(scores, maps)

    @torch.no_grad()
    def head_output_std(self, images: torch.Tensor) -> torch.Tensor:
        """Standard deviation (rep_dim,) of each dimension of φ over all locations of
        ``images`` in inference mode: the quantity the collapse guard keeps up."""
        self.encoder.eval()
        return output_std(self.embed(images.to(self.device)), self.config.per_position)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "encoder": dict(self.encoder.state_dict()),
            "radius": float(self.radius),
            "score_normalizer": self.score_normalizer.state_dict(),
        }
        if self.center is not None:
            state["center"] = self.center.detach().cpu()
        if self.std_floor is not None:
            state["std_floor"] = self.std_floor.detach().cpu()
        if self.dist_scale is not None:
            state["dist_scale"] = self.dist_scale.detach().cpu()
        if self.backbone is not None:
            state["backbone"] = self.backbone.identity()
        if self.tuned is not None:
            state["tuned"] = dict(self.tuned.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.backbone is not None:
            if state.get("backbone") is None:
                raise ValueError(
                    "deepsvdd: checkpoint was made with features=pixels, this model uses "
                    f"features={self.config.features}"
                )
            check_identity(self.name, dict(state["backbone"]), self.backbone.identity())
        _load_module(self.encoder, state["encoder"], "encoder")
        if self.tuned is not None:
            if state.get("tuned") is None:
                raise ValueError(
                    "deepsvdd: checkpoint has no fine-tuned backbone blocks, this model "
                    f"fine-tunes {self.config.finetune_blocks} (finetune_blocks)"
                )
            _load_module(self.tuned, state["tuned"], "fine-tuned backbone block")
        elif state.get("tuned") is not None:
            raise ValueError(
                "deepsvdd: checkpoint has fine-tuned backbone blocks, this model's backbone is "
                "frozen (finetune_blocks=0)"
            )
        self.radius = float(state["radius"])
        center = state.get("center")
        if center is not None and tuple(center.shape) != self.center_shape:
            raise ValueError(
                f"deepsvdd: centre has shape {tuple(center.shape)}, need {self.center_shape}"
            )
        self.center = center.float().to(self.device) if center is not None else None
        floor = state.get("std_floor")
        self.std_floor = floor.float().to(self.device) if floor is not None else None
        scale = state.get("dist_scale")
        if scale is not None and tuple(scale.shape) != self.center_shape[1:]:
            raise ValueError(
                f"deepsvdd: distance scale has shape {tuple(scale.shape)}, need "
                f"{self.center_shape[1:]}"
            )
        self.dist_scale = scale.float().to(self.device) if scale is not None else None
        self.score_normalizer.load_state_dict(state.get("score_normalizer"))

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epochs_done": self._epochs_done,
            "center_sum": self._center_sum.clone(),
            "center_sq": self._center_sq.clone(),
            "center_count": self._center_count,
            "hist": self._hist.clone(),
        }
        if self._kept is not None:
            state["kept"] = self._kept.clone()
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
        self._center_sq = state["center_sq"].double().cpu()
        self._center_count = int(state["center_count"])
        self._hist = state["hist"].double().cpu()
        kept = state.get("kept")
        self._kept = kept.float().cpu() if kept is not None else None
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
