"""Reconstruction-based detectors: convolutional autoencoder, VAE and WAE-MMD.

All three learn to reconstruct normal images only; a defect is what the network cannot
reconstruct. They share one convolutional backbone built from small blocks:

* :class:`EncoderStage` — 3×3 conv + batch norm + LeakyReLU, then 2×2 max-pooling. Five of
  them make the :class:`Encoder` (image side / 32), so ``image_size`` must be divisible by 32.
* a 1×1 conv turns the deepest features into a small spatial **code** (``latent_channels``
  per position at 1/32 resolution: 4×4 at 128 px). A conv code keeps the parameter count
  independent of image size and works for 64, 128, 256 px alike.
* :class:`DecoderStage` — ×2 nearest up-sampling, optional concatenation of the encoder
  features of the same resolution (``skip``), 3×3 conv + batch norm + LeakyReLU, optional
  :class:`ChannelSpatialGate` (``attention``). Five of them make the :class:`Decoder`, whose
  last 3×3 conv + sigmoid gives the reconstruction in [0, 1].

Loss: ``pixel_weight`` × L1 or L2 + ``ssim_weight`` × (1 − SSIM) (the "weighted SSIM" mix
of structural and grey-level terms) + ``edge_weight`` × L1 between Sobel gradients (the
contour loss, which sharpens edges a plain L2 blurs). The VAE adds ``kl_weight`` × KL, the
WAE ``mmd_weight`` × MMD to an N(0, I) prior.

Anomaly map: the residual between image and reconstruction — ``1 − SSIM`` (``"ssim"``),
``|x − x̂|`` (``"l1"``) or their mean (``"mixed"``), channel-averaged and smoothed with
:func:`~defectlab.ops.gaussian_blur`. Image score: the mean of the top
``score_top_fraction`` of the map (``"topk"``), or the share of map pixels above a pixel
level fixed at the end of training as the ``level_quantile`` quantile of the residual maps
of ``level_samples`` training images (``"pixel_count"``: "residual thresholded to a mask,
pixel count thresholded to a decision").

``score_normalization="image_statistics"`` then subtracts from the image score what the
image's brightness and texture energy predict (:mod:`defectlab.detect.nuisance`, fitted on
``normalization_samples`` normal training images at the end of training): among normal
images most of the residual's spread is brightness and texture, not defects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlab.base import ModelConfig, Prediction
from defectlab.config import check_choice
from defectlab.detect.base import Detector
from defectlab.detect.nuisance import ScoreNormalizer, image_statistics
from defectlab.errors import InputShapeError, TrainingError
from defectlab.ops import gaussian_blur, top_fraction_mean
from defectlab.registry import register

#: the five encoder stages halve the image five times
DOWNSAMPLING = 32
PIXEL_LOSSES = ("l1", "l2")
MAP_RESIDUALS = ("ssim", "l1", "mixed")
SCORES = ("topk", "pixel_count")
SCORE_NORMALIZATIONS = ("none", "image_statistics")
#: a linear fit of five statistics needs a few more images than unknowns
MIN_NORMALIZATION_SAMPLES = 8
KERNELS = ("imq", "rbf")
#: IMQ kernel scales of Tolstikhin et al.'s reference code, multiplying C = 2·d·σ²
IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


# --- image similarity ------------------------------------------------------------------------


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim_map(
    x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Differentiable local SSIM of (B, C, H, W) images in [0, 1], per pixel and channel.

    Gaussian window (``window`` taps, ``sigma``), constants C1 = 0.01², C2 = 0.03² (Wang et al.
    2004), reflect padding so the map has the input size.
    """
    g = _gaussian_window(window, sigma, x.device).to(x.dtype)
    channels = x.shape[1]
    horizontal = g.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = g.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    pad = window // 2

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (pad, pad, pad, pad), mode="reflect")
        t = F.conv2d(t, horizontal, groups=channels)
        return F.conv2d(t, vertical, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return numerator / denominator


def sobel_gradients(images: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical Sobel responses, (B, C, H, W) → (B, 2C, H, W)."""
    kx = torch.tensor(
        [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
        dtype=images.dtype,
        device=images.device,
    )
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    channels = images.shape[1]
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernels.repeat(channels, 1, 1, 1), groups=channels)


def mmd_to_prior(codes: torch.Tensor, prior: torch.Tensor, kernel: str) -> torch.Tensor:
    """Unbiased MMD² estimate between ``codes`` and ``prior`` samples, both (B, d).

    ``imq``: k(a, b) = Σₛ sC / (sC + ‖a − b‖²) over the scales s of :data:`IMQ_SCALES`, and
    ``rbf``: k(a, b) = exp(−‖a − b‖² / C), with C = 2·d·σ² for the N(0, σ²I) prior, σ = 1
    (Tolstikhin et al., "Wasserstein Auto-Encoders", 2018). Fewer than two codes give 0.
    """
    n, d = codes.shape
    if n < 2:
        return codes.new_zeros(())
    base = 2.0 * d * 1.0

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(a, b).pow(2)
        if kernel == "imq":
            return sum(base * s / (base * s + distances) for s in IMQ_SCALES)
        return torch.exp(-distances / base)

    off_diagonal = 1.0 - torch.eye(n, device=codes.device, dtype=codes.dtype)
    within_codes = (k(codes, codes) * off_diagonal).sum() / (n * (n - 1))
    within_prior = (k(prior, prior) * off_diagonal).sum() / (n * (n - 1))
    between = k(codes, prior).mean()
    return within_codes + within_prior - 2.0 * between


# --- network blocks --------------------------------------------------------------------------


def stage_widths(width: int) -> tuple[int, ...]:
    """Channels of the five encoder stages: ``width`` doubling up to ``4·width``."""
    return (width, 2 * width, 4 * width, 4 * width, 4 * width)


class ChannelSpatialGate(nn.Module):
    """A light attention gate: squeeze-and-excitation over channels, then a 7×7 spatial gate
    over the channel mean and max (CBAM-style). Re-weights decoder features so the decoder
    can focus on the structures of normal parts; it adds only a few hundred parameters."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )
        self.spatial = nn.Sequential(nn.Conv2d(2, 1, 7, padding=3), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.spatial(pooled)


class EncoderStage(nn.Module):
    """3×3 conv → batch norm → LeakyReLU, then 2×2 max-pool. Returns (pooled, pre-pool)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.block(x)
        return self.pool(features), features


class Encoder(nn.Module):
    """Five :class:`EncoderStage` (5 conv + 5 pool) and a 1×1 conv to ``code_channels``.

    ``forward`` returns the code (B, code_channels, H/32, W/32) and the pre-pool features of
    every stage (full resolution first), which the decoder may use as skip connections.
    """

    def __init__(self, in_channels: int, width: int, code_channels: int) -> None:
        super().__init__()
        widths = stage_widths(width)
        ins = (in_channels, *widths[:-1])
        self.stages = nn.ModuleList(EncoderStage(i, o) for i, o in zip(ins, widths, strict=True))
        self.to_code = nn.Conv2d(widths[-1], code_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        x = 2.0 * x - 1.0  # inputs in [0, 1] → centred
        for stage in self.stages:
            x, features = stage(x)
            skips.append(features)
        return self.to_code(x), skips


class DecoderStage(nn.Module):
    """×2 nearest up-sampling → [concat skip] → 3×3 conv → batch norm → LeakyReLU → [gate]."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, attention: bool
    ) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.gate = ChannelSpatialGate(out_channels) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.gate(self.block(x))


class Decoder(nn.Module):
    """Code → image: 1×1 conv, five :class:`DecoderStage` mirroring the encoder, a 3×3 conv
    to the image channels and a sigmoid. With ``skip`` each stage concatenates the
    encoder features of its resolution (U-Net-like)."""

    def __init__(
        self, code_channels: int, width: int, out_channels: int, skip: bool, attention: bool
    ) -> None:
        super().__init__()
        widths = stage_widths(width)
        self.from_code = nn.Sequential(
            nn.Conv2d(code_channels, widths[-1], 1), nn.LeakyReLU(0.2, inplace=True)
        )
        # stage i up-samples to the resolution of encoder stage k = 4 - i and leaves it with
        # the channels that stage k received (4w, 4w, 2w, w, w): the decoder costs about
        # what the encoder costs. Skips bring the widths[k] pre-pool features of stage k.
        outs = (widths[3], widths[2], widths[1], widths[0], widths[0])
        ins = (widths[-1], *outs[:-1])
        skip_widths = tuple(reversed(widths)) if skip else (0,) * len(widths)
        self.skip = skip
        self.stages = nn.ModuleList(
            DecoderStage(i, s, o, attention) for i, s, o in zip(ins, skip_widths, outs, strict=True)
        )
        self.to_image = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, code: torch.Tensor, skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = self.from_code(code)
        for i, stage in enumerate(self.stages):
            x = stage(x, skips[-1 - i] if self.skip and skips is not None else None)
        return torch.sigmoid(self.to_image(x))


class ReconstructionNet(nn.Module):
    """Encoder + decoder. ``code_channels`` may exceed the decoder's input (the VAE's encoder
    emits mean and log-variance); :meth:`decode` takes the code the decoder sees."""

    def __init__(
        self,
        channels: int,
        width: int,
        latent_channels: int,
        skip: bool,
        attention: bool,
        code_factor: int = 1,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(channels, width, latent_channels * code_factor)
        self.decoder = Decoder(latent_channels, width, channels, skip, attention)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.encoder(x)

    def decode(self, code: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(code, skips)


# --- configuration ---------------------------------------------------------------------------


@dataclass
class AutoencoderConfig(ModelConfig):
    epochs: int = 20
    #: Adam learning rate and (L2) weight decay
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: channels of the first encoder stage; the stages have w, 2w, 4w, 4w, 4w
    width: int = 16
    #: code channels per position at 1/32 resolution (16 → a 256-number code at 128 px)
    latent_channels: int = 16
    #: U-Net-like skip connections. They let the decoder copy the input, anomalies included,
    #: so the residual of a defect shrinks: keep False for detection unless you know why.
    skip: bool = False
    #: channel + spatial attention gate after every decoder stage
    attention: bool = False
    #: reconstruction loss: "l1" or "l2", weighted by pixel_weight
    pixel_loss: str = "l2"
    pixel_weight: float = 1.0
    #: weight of the (1 − SSIM) term (SSIM: Gaussian window 11, σ 1.5)
    ssim_weight: float = 1.0
    #: weight of the contour loss: L1 between Sobel gradients of image and reconstruction
    edge_weight: float = 0.0
    #: anomaly map: "ssim" (1 − SSIM), "l1" (|x − x̂|) or "mixed" (their mean)
    map_residual: str = "mixed"
    #: Gaussian smoothing of the map, in pixels at model resolution
    map_sigma: float = 2.0
    #: image score: "topk" (mean of the top score_top_fraction of the map) or "pixel_count"
    #: (share of pixels above the level fixed from training residuals)
    score: str = "topk"
    score_top_fraction: float = 0.01
    #: pixel level for "pixel_count": this quantile of training residual maps ...
    level_quantile: float = 0.995
    #: ... of this many training images (kept from the first batches)
    level_samples: int = 32
    #: "image_statistics": subtract the score that brightness and texture energy predict,
    #: a linear fit over normalization_samples training images (kept from the first batches;
    #: how the result varies with their number: docs/models/ae.md)
    score_normalization: str = "none"
    normalization_samples: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("weight_decay", "pixel_weight", "ssim_weight", "edge_weight", "map_sigma"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        if self.pixel_weight == 0 and self.ssim_weight == 0:
            raise ValueError("pixel_weight and ssim_weight are both 0: nothing to reconstruct")
        if self.width < 1 or self.latent_channels < 1:
            raise ValueError(
                f"width and latent_channels must be positive, got {self.width}, "
                f"{self.latent_channels}"
            )
        check_choice("pixel_loss", self.pixel_loss, PIXEL_LOSSES)
        check_choice("map_residual", self.map_residual, MAP_RESIDUALS)
        check_choice("score", self.score, SCORES)
        if not 0 < self.score_top_fraction <= 1:
            raise ValueError(f"score_top_fraction must be in (0, 1], got {self.score_top_fraction}")
        if not 0 < self.level_quantile < 1:
            raise ValueError(f"level_quantile must be in (0, 1), got {self.level_quantile}")
        if self.level_samples < 1:
            raise ValueError(f"level_samples must be at least 1, got {self.level_samples}")
        check_choice("score_normalization", self.score_normalization, SCORE_NORMALIZATIONS)
        if self.normalization_samples < MIN_NORMALIZATION_SAMPLES:
            raise ValueError(
                f"normalization_samples must be at least {MIN_NORMALIZATION_SAMPLES}, got "
                f"{self.normalization_samples}"
            )


@dataclass
class VAEConfig(AutoencoderConfig):
    #: weight of KL(q(z|x) ‖ N(0, I)), averaged per code number (not summed). With the L2
    #: loss averaged per pixel, 1e-3 is the β = 1 ELBO of a Gaussian decoder with noise
    #: σ ≈ 0.18 at 128 px and a 256-number code: enough to regularise the code without
    #: the posterior collapse (blurry, input-independent output) of much larger weights.
    kl_weight: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"kl_weight must be a non-negative number, got {self.kl_weight}")


@dataclass
class WAEConfig(AutoencoderConfig):
    #: weight of the MMD between codes and N(0, I) samples
    mmd_weight: float = 1.0
    #: MMD kernel: "imq" (inverse multiquadratic, multi-scale) or "rbf"
    kernel: str = "imq"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.mmd_weight >= 0 and math.isfinite(self.mmd_weight)):
            raise ValueError(f"mmd_weight must be a non-negative number, got {self.mmd_weight}")
        check_choice("kernel", self.kernel, KERNELS)


# --- models ----------------------------------------------------------------------------------


@register
class Autoencoder(Detector):
    """Convolutional autoencoder; anomaly map = smoothed reconstruction residual."""

    name: ClassVar[str] = "ae"
    description: ClassVar[str] = (
        "conv autoencoder (5 conv+pool encoder); map = SSIM/L1 residual, score = top-1% mean"
    )
    Config = AutoencoderConfig
    config: AutoencoderConfig
    #: the encoder emits this many codes per latent channel (VAE: mean and log-variance)
    code_factor: ClassVar[int] = 1

    def __init__(self, config: AutoencoderConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if self.image_size < DOWNSAMPLING or self.image_size % DOWNSAMPLING:
            raise InputShapeError(
                f"{self.name}: image_size {self.image_size} is not a multiple of "
                f"{DOWNSAMPLING} (the encoder pools 5 times); use e.g. 64, 128 or 256"
            )
        if self.channels not in (1, 3):
            raise InputShapeError(f"{self.name}: channels must be 1 or 3, got {self.channels}")
        cfg = self.config
        self.net = ReconstructionNet(
            self.channels,
            cfg.width,
            cfg.latent_channels,
            cfg.skip,
            cfg.attention,
            self.code_factor,
        ).to(self.device)
        self.optimizer: torch.optim.Optimizer | None = None
        #: training images kept to fix the pixel level (CPU), and the level itself
        self._level_images: torch.Tensor | None = None
        self.pixel_level: float | None = None
        self.score_normalizer = ScoreNormalizer()

    # --- reconstruction -----------------------------------------------------------------
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training-time reconstruction and the extra loss terms (weighted, name → value)."""
        code, skips = self.net.encode(images)
        return self.net.decode(code, skips), {}

    def reconstruct_for_map(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction used for the anomaly map."""
        code, skips = self.net.encode(images)
        return self.net.decode(code, skips)

    # --- training -----------------------------------------------------------------------
    def setup_training(self, n_train: int) -> None:
        self.optimizer = torch.optim.Adam(
            self.net.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    @property
    def _kept_samples(self) -> int:
        cfg = self.config
        if cfg.score_normalization == "none":
            return cfg.level_samples
        return max(cfg.level_samples, cfg.normalization_samples)

    def _keep_for_level(self, images: torch.Tensor) -> None:
        held = 0 if self._level_images is None else len(self._level_images)
        wanted = self._kept_samples - held
        if wanted <= 0:
            return
        new = images[:wanted].detach().float().cpu()
        self._level_images = (
            new if self._level_images is None else torch.cat([self._level_images, new])
        )

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.optimizer is None:
            raise RuntimeError(f"{self.name}: training_step before setup_training")
        cfg = self.config
        images = batch["image"].to(self.device)
        self._keep_for_level(images)
        self.net.train()
        recon, extra = self.reconstruct(images)
        terms: dict[str, torch.Tensor] = {}
        if cfg.pixel_weight > 0:
            difference = recon - images
            pixel = difference.abs().mean() if cfg.pixel_loss == "l1" else difference.pow(2).mean()
            terms[cfg.pixel_loss] = cfg.pixel_weight * pixel
        if cfg.ssim_weight > 0:
            terms["ssim"] = cfg.ssim_weight * (1.0 - ssim_map(images, recon).mean())
        if cfg.edge_weight > 0:
            edges = (sobel_gradients(recon) - sobel_gradients(images)).abs().mean()
            terms["edge"] = cfg.edge_weight * edges
        terms |= extra
        loss = torch.stack(list(terms.values())).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}

    def finish_training(self) -> None:
        if self._level_images is None:
            return
        cfg = self.config
        kept = self._level_images
        maps = torch.cat([self.anomaly_maps(chunk).cpu() for chunk in kept.split(16)])
        level_maps = maps[: cfg.level_samples]
        self.pixel_level = float(np.quantile(level_maps.double().numpy(), cfg.level_quantile))
        self.score_normalizer = ScoreNormalizer()
        if cfg.score_normalization == "image_statistics":
            if len(kept) < MIN_NORMALIZATION_SAMPLES:
                raise TrainingError(
                    f"{self.name}: score_normalization=image_statistics needs at least "
                    f"{MIN_NORMALIZATION_SAMPLES} training images, got {len(kept)}"
                )
            self.score_normalizer.fit(self._raw_scores(maps), image_statistics(kept))

    # --- inference ----------------------------------------------------------------------
    def residual_maps(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Unsmoothed residual (B, 1, H, W) of the configured kind, channel-averaged."""
        kind = self.config.map_residual
        l1 = (images - recon).abs().mean(dim=1, keepdim=True)
        if kind == "l1":
            return l1
        dissimilarity = (1.0 - ssim_map(images, recon)).mean(dim=1, keepdim=True)
        return dissimilarity if kind == "ssim" else 0.5 * (dissimilarity + l1)

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Smoothed residual maps (B, H, W) of images (B, C, H, W) in [0, 1]."""
        images = images.to(self.device).float()
        self.net.eval()
        recon = self.reconstruct_for_map(images)
        return gaussian_blur(self.residual_maps(images, recon), self.config.map_sigma)[:, 0]

    def _raw_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """The image score of the configured kind, before any normalisation."""
        cfg = self.config
        if cfg.score == "topk":
            return top_fraction_mean(maps, cfg.score_top_fraction)
        if self.pixel_level is None:
            raise RuntimeError(
                f"{self.name}: score 'pixel_count' needs the pixel level set by training"
            )
        return (maps > self.pixel_level).flatten(1).float().mean(dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.is_fitted, "untrained networks")
        maps = self.anomaly_maps(images)
        scores = self._raw_scores(maps)
        if self.score_normalizer.fitted:
            scores = self.score_normalizer(scores, image_statistics(images.to(maps.device)))
        return Prediction(scores, maps)

    @torch.no_grad()
    def reconstructions(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstructions (B, C, H, W) in [0, 1] as used for the map: for inspection."""
        self.net.eval()
        return self.reconstruct_for_map(images.to(self.device).float())

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "net": dict(self.net.state_dict()),
            "pixel_level": self.pixel_level,
            "score_normalizer": self.score_normalizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        level = state.get("pixel_level")
        self.pixel_level = None if level is None else float(level)
        self.score_normalizer.load_state_dict(state.get("score_normalizer"))

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"level_images": self._level_images}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        self._level_images = state.get("level_images")
        if "optimizer" in state:
            if self.optimizer is None:
                raise RuntimeError(f"{self.name}: load_training_state before setup_training")
            self.optimizer.load_state_dict(state["optimizer"])


@register
class VariationalAutoencoder(Autoencoder):
    """VAE on the same backbone: the encoder emits a per-position mean and log-variance, the
    decoder sees a reparameterised sample while training and the mean code for the map."""

    name: ClassVar[str] = "vae"
    description: ClassVar[str] = (
        "variational autoencoder (conv code, KL to N(0, I)); map = residual of the mean code"
    )
    Config = VAEConfig
    config: VAEConfig
    code_factor: ClassVar[int] = 2

    def _posterior(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        code, skips = self.net.encode(images)
        mean, log_var = code.chunk(2, dim=1)
        return mean, log_var.clamp(-10.0, 10.0), skips

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mean, log_var, skips = self._posterior(images)
        # noise from the CPU generator: the trainer checkpoints its state, so resume is exact
        noise = torch.randn(mean.shape).to(mean.device, mean.dtype)
        z = mean + torch.exp(0.5 * log_var) * noise
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).mean()
        return self.net.decode(z, skips), {"kl": self.config.kl_weight * kl}

    def reconstruct_for_map(self, images: torch.Tensor) -> torch.Tensor:
        mean, _, skips = self._posterior(images)
        return self.net.decode(mean, skips)


@register
class WassersteinAutoencoder(Autoencoder):
    """WAE-MMD: a deterministic autoencoder whose codes are pulled towards N(0, I) by the MMD
    between a batch of codes and as many prior samples (Tolstikhin et al. 2018)."""

    name: ClassVar[str] = "wae"
    description: ClassVar[str] = (
        "Wasserstein autoencoder (MMD to N(0, I), IMQ/RBF kernel); map = reconstruction residual"
    )
    Config = WAEConfig
    config: WAEConfig

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        code, skips = self.net.encode(images)
        flat = code.flatten(1)
        # prior samples from the CPU generator: checkpointed by the trainer, so resume is exact
        prior = torch.randn(flat.shape).to(flat.device, flat.dtype)
        mmd = mmd_to_prior(flat, prior, self.config.kernel)
        return self.net.decode(code, skips), {"mmd": self.config.mmd_weight * mmd}
