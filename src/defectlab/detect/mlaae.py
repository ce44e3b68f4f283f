"""Multi-level, distribution-constrained adversarial autoencoder (MISSION S3, seed 003).

An autoencoder trained on normal images only, whose latent space has two levels, each pulled
towards a prior N(0, I) by its own feature discriminator (an adversarial autoencoder). The
constraint makes the normal feature space compact and limits what the decoder can
reconstruct, so defects reconstruct badly and score high.

Two inputs (``input``):

* ``"features"`` (the default): the same design reconstructs the *feature maps* of a frozen
  ImageNet backbone (``backbone``: lite0, lite1, lite2) instead of pixels (the DFR /
  reverse-distillation family). ``f`` is the backbone's stride-8 and stride-16 maps
  (``feature_blocks``, default its last of each), each averaged over a
  ``patch_size`` neighbourhood, the stride-16 one up-sampled, concatenated (as in
  ``patchmemory``) and standardised per channel with the mean and standard deviation of the
  first training batch (fixed from then on, kept in the model state). Two ConvDown stages
  (``C = round(256 * width)``)::

      encoder   f (D, H/8) ─ConvDown C ─ConvDown 2C          E1 (H/16), E2 (H/32)
      low code  E1 ─pool─ FC low_hidden ─ReLU─ FC low_dim
      high code E2 ─pool─ FC high_hidden ─ReLU─ FC high_dim
      decoder   high ─FC─ReLU─FC─ReLU→ (2C, H/32) ─ConvUp C → (C, H/16), concatenated with
                low ─FC─ReLU─FC─ReLU→ (C, H/16); ─ConvUp D (no activation) → f̂ (D, H/8)

  with the seed's per-code discriminators, losses and training step (the reconstruction
  loss is the MSE between f and f̂). Each term's squared residual is normalised location by
  location (``position_norm``): divided by its mean over the kept training images at the
  end of training, so that locations where normal images vary more (the image border,
  where the stride-2 transposed convolutions also reconstruct worst) weigh no more than
  the rest. The score is the seed's
  ``α‖f − f̂‖ + β Σᵢ ‖Eᵢ(f) − Eᵢ(f̂)‖`` over the two levels, normalised term by term as
  below and then weighted (``term_weighting="inverse_variance"``): a fixed share of the
  training images (``holdout_share``, chosen by training index) is held out of training,
  and at the end each mean-normalised term is weighted by the inverse of its variance over
  those images, relative to the input term's (which keeps weight 1; α and β multiply on
  top). If a defect raises every term by the same share of its normal mean, this is
  Fisher's discriminant for independent terms: a term that varies a lot between normal
  images carries less evidence per unit. The weights come from images the network never
  trained on, because training images reconstruct better than new normal images and
  would understate each term's spread. The map is built the same way and up-sampled to
  the image. Defaults that differ
  from the pixel version because the reconstruction error of standardised features is about
  fifty times that of pixels in [0, 1]: ``adv_weight`` 0.1 instead of 0.003 (the same
  balance between the two losses), and ``embed_grid`` 8 (at 128 px E1 is 8×8: the codes
  see it unpooled).
* ``"pixels"``: the seed's exact version, described next.

``score_normalization="image_statistics"`` (either input) subtracts from the image score
what brightness and texture predict (:mod:`defectlab.detect.nuisance`, fitted on
``normalization_samples`` training images at the end of training).

Pixel architecture (``C = round(64 * width)``; seed sizes are ``width=1``)::

    encoder   x (c, H) ─ConvDown C ─ConvDown 2C ─ConvDown 4C ─ConvDown 8C   each 3×3 stride 2 + ReLU
                           E1 (H/2)    E2 (H/4)     E3 (H/8)     E4 (H/16)
    low code  E2 ─pool─ FC low_hidden ─ReLU─ FC low_dim             (seed FC1024 / FC128)
    high code E4 ─pool─ FC high_hidden ─ReLU─ FC high_dim           (seed FC2048 / FC256)
    decoder   high code ─FC─ReLU─FC─ReLU→ (8C, H/16) ─ConvUp 4C ─ConvUp 2C → (2C, H/4)
              low code  ─FC─ReLU─FC─ReLU→ (2C, H/4), concatenated there (the level it came from)
              ─ConvUp C ─ConvUp c (no ReLU) ─ sigmoid → x̂              ConvUp = 3×3 stride-2
                                                                       transposed conv + ReLU
    discriminators, one per code: FC disc_hidden ─LeakyReLU─ FC ─LeakyReLU─ FC 1 ─ sigmoid

Design choices the seed leaves open:

* **Pooling before the embeddings.** A feature map larger than ``embed_grid``² cells is
  average-pooled to that grid before it is flattened, and the decoder's FC layers produce
  maps on the same grid, bilinearly up-sampled to the level's size. With the default grid 4
  at 128 px the 32×32 shallow map and the 8×8 deep map both become 4×4 cells; the FC sizes
  are then independent of the image size (the seed's literal flatten of the shallow map
  would need a 131072×1024 layer at 128 px). ``embed_grid=H/4`` flattens without pooling.
* **Where the low-level code enters the decoder**: at the decoder stage with the resolution
  it was taken from (H/4), concatenated with the up-sampled deep features — a mirror of the
  encoder, so the low-level code carries structure and the high-level code semantics.
* The last ConvUp has no ReLU: a sigmoid follows so x̂ lies in [0, 1] like the input.
* **CPU defaults**: ``width=0.25`` (channels 16/32/64/128) with the seed's FC sizes gives
  about 11 M parameters (most in the FC layers); a training step at 128 px, batch 16, takes
  about 0.17 s on one CPU thread. On a busy machine run with ``OMP_NUM_THREADS=1``: two
  contended threads were ten times slower.
* ``adv_weight`` is small (0.003) because the L2 term is a per-pixel *mean* (≈ 1e-2 on
  normal images) while each BCE is ≈ 0.7: at 0.1 the adversarial term stopped the codes from
  carrying information and the decoder produced the mean image; at 0.001–0.003 the
  discriminators end near chance (codes indistinguishable from prior samples) and the
  reconstruction still converges.

Training (one call of :meth:`MLAAE.training_step`): the autoencoder (encoder, embeddings,
decoder; Adam, ``lr``) minimises the L2 reconstruction loss (MSE, plus ``ssim_weight`` ×
(1 − SSIM) if set) plus ``adv_weight`` × the BCE that its two codes are taken for prior
samples; then the discriminators (their own Adam, ``disc_lr``) minimise BCE on prior
samples (label 1) vs the detached codes (label 0). Prior samples come from torch's global
CPU generator, which the trainer seeds and checkpoints, so resumed runs are exact.

Score. The seed's ``A(x) = α‖x − x̂‖₂ + β Σᵢ ‖Eᵢ(x) − Eᵢ(x̂)‖₂`` over the four encoder levels.
Raw norms of the levels differ by orders of magnitude (element counts and activation scales
differ), so every term is normalised: it is the root of the **mean over elements** of the
squared residual divided by that mean on normal training batches (an exponential moving
average kept during training, ``norm_momentum``). Each term is therefore ≈ 1 on normal
images, and α, β weigh comparable quantities. With ``feature_residual="relative"`` each
level's squared residual is first divided by the image's own mean squared activation of
that level (see the ELPV note below). The map is built the same way per location
(channel mean of squared residuals, normalised, rooted), the level maps up-sampled
bilinearly to the image size, weighted ``α·pixel + β·Σ levels`` and Gaussian-smoothed with
``map_sigma``.

ELPV note (128 px, 25 epochs, test split ``elpv-normal-only-v1``): defective cells are darker
on average, so their shallow ReLU activations — and the absolute feature residuals of
levels 1–2 — are *smaller* than those of normal cells; those two terms rank defects below
normal cells (AUROC < 0.5) and pull the seed's sum towards chance, while the pixel term
alone ranks well. See the benchmark report for the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.base import Prediction
from defectlab.components.features import (
    LiteFeatureConfig,
    LiteFeatures,
    block_layout,
    check_identity,
    check_image_size,
    patch_embedding,
)
from defectlab.config import check_choice
from defectlab.detect.base import Detector
from defectlab.detect.nuisance import ScoreNormalizer, image_statistics
from defectlab.ops import gaussian_blur
from defectlab.registry import register

#: four stride-2 ConvDown blocks: the image side must be divisible by 2**4
DOWNSAMPLING = 16
#: encoder channel counts at width 1 (ConvDown64 … ConvDown512)
BASE_CHANNELS = (64, 128, 256, 512)
#: encoder level (1-based) whose output feeds the low-level code, and the high-level one
LOW_LEVEL, HIGH_LEVEL = 2, 4
#: input=features: channel counts of the two ConvDown stages at width 1
FEATURE_CHANNELS = (256, 512)
INPUTS = ("features", "pixels")
SCORE_NORMALIZATIONS = ("none", "image_statistics")
#: a linear fit of the five image statistics needs a few more images than unknowns
MIN_NORMALIZATION_SAMPLES = 8
#: defaults that depend on the input: (pixels, features)
_ADV_WEIGHT = {"pixels": 0.003, "features": 0.1}
_EMBED_GRID = {"pixels": 4, "features": 8}
#: ``term_weighting``: "mean" (each term divided by its normal mean only, the seed) or
#: "inverse_variance" (then weighted by the inverse of its variance on held-out normals)
TERM_WEIGHTINGS = ("mean", "inverse_variance")
_TERM_WEIGHTING = {"pixels": "mean", "features": "inverse_variance"}
#: the held-out images are those whose training index i has frac(i · φ) < holdout_share
#: (φ the golden ratio's fractional part: an even spread over any index range)
_GOLDEN = 0.6180339887498949


@dataclass
class MLAAEConfig(LiteFeatureConfig):
    """``backbone`` and ``feature_blocks`` (from :class:`LiteFeatureConfig`) apply to
    input=features only."""

    epochs: int = 20
    #: "features": reconstruct frozen pretrained feature maps; "pixels": the seed's version
    input: str = "features"
    #: input=features: side of the local average-pooling neighbourhood of each map (odd)
    patch_size: int = 3
    #: channel multiplier of the encoder/decoder (seed: 1.0 → 64/128/256/512)
    width: float = 0.25
    #: low-level code size (from the ConvDown128 output) and its FC hidden size (seed 128/1024)
    low_dim: int = 128
    low_hidden: int = 1024
    #: high-level code size (from the ConvDown512 output) and its FC hidden size (seed 256/2048)
    high_dim: int = 256
    high_hidden: int = 2048
    #: feature maps are average-pooled to at most this many cells per side before an FC layer
    #: (None: 4 for pixels, 8 for features)
    embed_grid: int | None = None
    #: hidden width of each feature discriminator
    disc_hidden: int = 256
    #: weight of the encoder's "fool the discriminators" BCE in the autoencoder loss
    #: (None: 0.003 for pixels, 0.1 for features; see the module docstring)
    adv_weight: float | None = None
    #: weight of an extra (1 − SSIM) reconstruction term; 0 = plain L2 as in the seed
    ssim_weight: float = 0.0
    #: Adam learning rates of the autoencoder and of the discriminators
    lr: float = 1e-3
    disc_lr: float = 1e-3
    #: score weights: α on the pixel residual, β on the sum of the feature residuals
    alpha: float = 1.0
    beta: float = 1.0
    #: feature residual per level: "absolute" ‖Eᵢ(x) − Eᵢ(x̂)‖ as in the seed, or "relative"
    #: (divided by the image's own ‖Eᵢ(x)‖: invariant to the brightness-driven activation scale)
    feature_residual: str = "absolute"
    #: encoder levels (1 = shallowest … 4 for pixels, … 2 for features) whose feature
    #: residuals enter the score and map; None: all, as the seed (see the ELPV note)
    score_levels: tuple[int, ...] | None = None
    #: smoothing of the anomaly map, in pixels
    map_sigma: float = 2.0
    #: momentum of the moving averages that normalise the score terms
    norm_momentum: float = 0.9
    #: "image_statistics": subtract the score that brightness and texture predict (a linear
    #: fit over normalization_samples training images kept from the first epoch)
    score_normalization: str = "none"
    normalization_samples: int = 256
    #: divide each term's squared residual, location by location, by its mean over the kept
    #: training images (normalization_samples) instead of by the term's moving average alone;
    #: None: on for features, off for pixels (the seed)
    position_norm: bool | None = None
    #: how the score's terms are weighed against each other (α, β multiply on top):
    #: "inverse_variance" weighs each (mean-normalised) term by the inverse of its variance
    #: over training images held out of training, "mean" leaves them at 1 each (the seed);
    #: None: inverse_variance for features, mean for pixels
    term_weighting: str | None = None
    #: share of the training images (chosen by index) held out of training to estimate the
    #: term variances (term_weighting=inverse_variance only)
    holdout_share: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()  # backbone and blocks
        check_choice("input", self.input, INPUTS)
        check_choice("score_normalization", self.score_normalization, SCORE_NORMALIZATIONS)
        if self.term_weighting is not None:
            check_choice("term_weighting", self.term_weighting, TERM_WEIGHTINGS)
        if not 0 < self.holdout_share < 0.5:
            raise ValueError(
                f"holdout_share must be in (0, 0.5): the share of training images held out to "
                f"weigh the score's terms, got {self.holdout_share}"
            )
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd number, got {self.patch_size}")
        if self.input == "features" and self.ssim_weight > 0:
            raise ValueError(
                "ssim_weight applies to input=pixels only (SSIM compares images, not "
                "feature maps); set ssim_weight=0 or input=pixels"
            )
        if self.normalization_samples < MIN_NORMALIZATION_SAMPLES:
            raise ValueError(
                f"normalization_samples must be at least {MIN_NORMALIZATION_SAMPLES}, got "
                f"{self.normalization_samples}"
            )
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(
                f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}"
            )
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta are both 0: the anomaly score would always be 0")
        if self.feature_residual not in ("absolute", "relative"):
            raise ValueError(
                f"feature_residual must be 'absolute' or 'relative', got {self.feature_residual!r}"
            )
        if self.score_levels is not None:
            self.score_levels = tuple(int(v) for v in self.score_levels)
            levels, top = self.score_levels, self.levels
            if (
                not levels
                or len(set(levels)) != len(levels)
                or not set(levels) <= set(range(1, top + 1))
            ):
                raise ValueError(
                    f"score_levels must be distinct encoder levels among 1-{top} for "
                    f"input={self.input}, got {self.score_levels}"
                )
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")
        for key in ("low_dim", "low_hidden", "high_dim", "high_hidden"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.embed_grid is not None and self.embed_grid < 1:
            raise ValueError(f"embed_grid must be at least 1, got {self.embed_grid}")
        if self.adv_weight is not None and self.adv_weight < 0:
            raise ValueError(f"adv_weight must be >= 0, got {self.adv_weight}")
        if self.disc_hidden < 1:
            raise ValueError(f"disc_hidden must be at least 1, got {self.disc_hidden}")
        for key in ("ssim_weight", "map_sigma"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.lr <= 0 or self.disc_lr <= 0:
            raise ValueError(f"lr and disc_lr must be positive, got {self.lr}, {self.disc_lr}")
        if not 0 <= self.norm_momentum < 1:
            raise ValueError(f"norm_momentum must be in [0, 1), got {self.norm_momentum}")

    @property
    def levels(self) -> int:
        """Encoder levels of the network: 4 on pixels, 2 on feature maps."""
        return len(BASE_CHANNELS) if self.input == "pixels" else len(FEATURE_CHANNELS)

    @property
    def summed_levels(self) -> tuple[int, ...]:
        """The levels whose residuals enter the score (``score_levels`` or all)."""
        if self.score_levels is None:
            return tuple(range(1, self.levels + 1))
        return tuple(sorted(self.score_levels))

    @property
    def grid(self) -> int:
        """``embed_grid``, or its default for the input."""
        return self.embed_grid if self.embed_grid is not None else _EMBED_GRID[self.input]

    @property
    def per_position(self) -> bool:
        """``position_norm``, or its default for the input."""
        return self.position_norm if self.position_norm is not None else self.input == "features"

    @property
    def weighting(self) -> str:
        """``term_weighting``, or its default for the input."""
        if self.term_weighting is not None:
            return self.term_weighting
        return _TERM_WEIGHTING[self.input]

    @property
    def adversarial_weight(self) -> float:
        """``adv_weight``, or its default for the input."""
        return self.adv_weight if self.adv_weight is not None else _ADV_WEIGHT[self.input]


def _conv_down(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU())


def _conv_up(c_in: int, c_out: int, relu: bool = True) -> nn.Module:
    conv = nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)
    return nn.Sequential(conv, nn.ReLU()) if relu else conv


class _Embedding(nn.Module):
    """Feature map (B, C, h, w) → pool to ≤ grid² cells → FC hidden → ReLU → FC code."""

    def __init__(self, channels: int, side: int, grid: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.grid = min(grid, side)
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * self.grid**2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.grid:
            features = F.adaptive_avg_pool2d(features, self.grid)
        return self.fc(features)


class _Unembedding(nn.Module):
    """Code → FC hidden → ReLU → FC → ReLU → map (C, grid, grid) → bilinear to (side, side)."""

    def __init__(self, dim: int, hidden: int, channels: int, side: int, grid: int) -> None:
        super().__init__()
        self.channels, self.side, self.grid = channels, side, min(grid, side)
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, channels * self.grid**2),
            nn.ReLU(),
        )

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        maps = self.fc(code).view(-1, self.channels, self.grid, self.grid)
        if self.grid != self.side:
            maps = F.interpolate(maps, size=self.side, mode="bilinear", align_corners=False)
        return maps


def _discriminator(dim: int, hidden: int) -> nn.Module:
    """FC layers → one logit (the probability that a code is a prior sample is its sigmoid)."""
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, 1),
    )


class _Network(nn.Module):
    def __init__(self, config: MLAAEConfig, image_size: int, channels: int) -> None:
        super().__init__()
        widths = [max(1, round(c * config.width)) for c in BASE_CHANNELS]
        sides = [image_size // 2**k for k in range(1, 5)]
        self.encoder = nn.ModuleList(
            _conv_down(c_in, c_out)
            for c_in, c_out in zip([channels, *widths[:-1]], widths, strict=True)
        )
        lo, hi = LOW_LEVEL - 1, HIGH_LEVEL - 1
        grid = config.grid
        self.low_embed = _Embedding(widths[lo], sides[lo], grid, config.low_hidden, config.low_dim)
        self.high_embed = _Embedding(
            widths[hi], sides[hi], grid, config.high_hidden, config.high_dim
        )
        self.high_unembed = _Unembedding(
            config.high_dim, config.high_hidden, widths[hi], sides[hi], grid
        )
        self.low_unembed = _Unembedding(
            config.low_dim, config.low_hidden, widths[lo], sides[lo], grid
        )
        # decoder: H/16 → H/8 → H/4, then [features, low map] → H/2 → H
        self.up_deep = nn.Sequential(_conv_up(widths[3], widths[2]), _conv_up(widths[2], widths[1]))
        self.up_shallow = nn.Sequential(
            _conv_up(2 * widths[1], widths[0]), _conv_up(widths[0], channels, relu=False)
        )
        self.discriminators = nn.ModuleList(
            [
                _discriminator(config.low_dim, config.disc_hidden),
                _discriminator(config.high_dim, config.disc_hidden),
            ]
        )

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The four encoder levels E1..E4."""
        out = []
        for block in self.encoder:
            images = block(images)
            out.append(images)
        return out

    def embed(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.low_embed(features[LOW_LEVEL - 1]), self.high_embed(features[HIGH_LEVEL - 1])

    def decode(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        deep = self.up_deep(self.high_unembed(high))
        merged = torch.cat([deep, self.low_unembed(low)], dim=1)
        return torch.sigmoid(self.up_shallow(merged))

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        skip = {id(p) for p in self.discriminators.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]


class _FeatureNetwork(nn.Module):
    """The seed's network on feature maps (D, H/8): two ConvDown levels, the low code from
    the first, the high code from the second, a linear last ConvUp (see the module doc)."""

    def __init__(self, config: MLAAEConfig, image_size: int, channels: int) -> None:
        super().__init__()
        widths = [max(1, round(c * config.width)) for c in FEATURE_CHANNELS]
        side = image_size // block_layout(config.backbone)[config.blocks[0]][0]
        sides = [side // 2, side // 4]
        self.encoder = nn.ModuleList(
            [_conv_down(channels, widths[0]), _conv_down(widths[0], widths[1])]
        )
        grid = config.grid
        self.low_embed = _Embedding(widths[0], sides[0], grid, config.low_hidden, config.low_dim)
        self.high_embed = _Embedding(widths[1], sides[1], grid, config.high_hidden, config.high_dim)
        self.high_unembed = _Unembedding(
            config.high_dim, config.high_hidden, widths[1], sides[1], grid
        )
        self.low_unembed = _Unembedding(
            config.low_dim, config.low_hidden, widths[0], sides[0], grid
        )
        self.up_deep = _conv_up(widths[1], widths[0])
        self.up_shallow = _conv_up(2 * widths[0], channels, relu=False)
        self.discriminators = nn.ModuleList(
            [
                _discriminator(config.low_dim, config.disc_hidden),
                _discriminator(config.high_dim, config.disc_hidden),
            ]
        )

    def features(self, maps: torch.Tensor) -> list[torch.Tensor]:
        """The two encoder levels E1, E2."""
        out = []
        for block in self.encoder:
            maps = block(maps)
            out.append(maps)
        return out

    def embed(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.low_embed(features[0]), self.high_embed(features[1])

    def decode(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        deep = self.up_deep(self.high_unembed(high))
        return self.up_shallow(torch.cat([deep, self.low_unembed(low)], dim=1))

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        skip = {id(p) for p in self.discriminators.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]


def _ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity per image (Gaussian window), images in [0, 1]."""
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = gaussian_blur(a, sigma), gaussian_blur(b, sigma)
    var_a = gaussian_blur(a * a, sigma) - mu_a**2
    var_b = gaussian_blur(b * b, sigma) - mu_b**2
    cov = gaussian_blur(a * b, sigma) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim.flatten(1).mean(dim=1)


@register
class MLAAE(Detector):
    """See the module docstring for architecture, training and score."""

    name: ClassVar[str] = "mlaae"
    description: ClassVar[str] = (
        "multi-level adversarial autoencoder (codes constrained to N(0,I)) on frozen Lite0 "
        "feature maps; score = α feature + β code-level residuals, each term weighted by its "
        "held-out inverse variance (seed: --set input=pixels)"
    )
    Config = MLAAEConfig
    config: MLAAEConfig
    #: 2: input=features, the score normaliser
    state_version: ClassVar[int] = 2

    def __init__(self, config: MLAAEConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        if self.channels not in (1, 3):
            raise ValueError(f"mlaae: channels must be 1 or 3, got {self.channels}")
        self.backbone: LiteFeatures | None = None
        #: input=features: per-channel standardisation of the backbone maps (first batch)
        self.feature_mean: torch.Tensor | None = None
        self.feature_std: torch.Tensor | None = None
        self.net: _Network | _FeatureNetwork
        if cfg.input == "pixels":
            if self.image_size < DOWNSAMPLING or self.image_size % DOWNSAMPLING:
                raise ValueError(
                    f"mlaae: image size {self.image_size} is not a positive multiple of "
                    f"{DOWNSAMPLING} (four stride-2 ConvDown blocks); use e.g. "
                    f"{max(DOWNSAMPLING, round(self.image_size / DOWNSAMPLING) * DOWNSAMPLING)}"
                )
            self.net = _Network(cfg, self.image_size, self.channels).to(self.device)
        else:
            check_image_size(self.name, self.image_size)
            self.backbone = LiteFeatures(cfg.blocks, self.device, backbone=cfg.backbone)
            self.net = _FeatureNetwork(cfg, self.image_size, cfg.feature_dim).to(self.device)
        #: moving mean squared residual on normal training batches: [input, E1, …]
        self.norms = torch.ones(1 + cfg.levels, device=self.device)
        self.steps = 0
        self.score_normalizer = ScoreNormalizer()
        self.ae_optimizer: torch.optim.Optimizer | None = None
        self.disc_optimizer: torch.optim.Optimizer | None = None
        self._epochs_done = 0
        self._kept: torch.Tensor | None = None
        #: position_norm: each term's mean squared residual per location on the kept images
        self.position_norms: list[torch.Tensor] | None = None
        #: weight of each score term [input, E1, …] (term_weighting; ones for "mean")
        self.term_weights = torch.ones(1 + cfg.levels, device=self.device)
        #: term_weighting=inverse_variance: the training images held out of training (CPU)
        self._holdout: torch.Tensor | None = None

    # --- building blocks (public for tests and inspection) ------------------------------------
    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the autoencoder reconstructs: the images themselves (pixels), or their
        standardised backbone feature maps (B, D, H/8, W/8) (features)."""
        if self.backbone is None:
            return images
        with torch.no_grad():
            maps = patch_embedding(self.backbone(images), self.config.patch_size)
            if self.feature_mean is None or self.feature_std is None:
                raise RuntimeError("mlaae: predict before fit (no feature standardisation yet)")
            return (maps - self.feature_mean) / self.feature_std

    def _set_standardisation(self, images: torch.Tensor) -> None:
        """Fix the per-channel mean and standard deviation of the backbone maps from the
        first training batch."""
        assert self.backbone is not None
        with torch.no_grad():
            maps = patch_embedding(self.backbone(images), self.config.patch_size)
            rows = maps.transpose(0, 1).flatten(1)
            self.feature_mean = rows.mean(dim=1).view(1, -1, 1, 1)
            std = rows.var(dim=1, unbiased=False).sqrt()
            self.feature_std = std.clamp_min(1e-3).view(1, -1, 1, 1)

    def encode(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Encoder levels [E1, …] of the autoencoder's input (images, or the standardised
        feature maps of :meth:`inputs`), low-level code (B, low_dim), high-level code
        (B, high_dim)."""
        features = self.net.features(images)
        low, high = self.net.embed(features)
        return features, low, high

    def decode(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.net.decode(low, high)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        _, low, high = self.encode(images)
        return self.decode(low, high)

    def discriminate(
        self, codes: list[torch.Tensor] | tuple[torch.Tensor, ...]
    ) -> list[torch.Tensor]:
        """Probability (B,) per level that each code is a prior sample rather than an encoding."""
        return [
            torch.sigmoid(d(c)).squeeze(1)
            for d, c in zip(self.net.discriminators, codes, strict=True)
        ]

    # --- training ------------------------------------------------------------------------------
    def setup_training(self, n_train: int) -> None:
        if n_train > 0 and self.config.weighting == "inverse_variance":
            held = int(self.held_out(torch.arange(n_train)).sum())
            if held < MIN_NORMALIZATION_SAMPLES:
                raise ValueError(
                    f"mlaae: term_weighting=inverse_variance holds out {held} of the "
                    f"{n_train} training images (holdout_share={self.config.holdout_share}), "
                    f"fewer than the {MIN_NORMALIZATION_SAMPLES} needed to estimate the term "
                    "variances: raise holdout_share, train on more images or set "
                    "term_weighting=mean"
                )
        self.ae_optimizer = torch.optim.Adam(
            self.net.autoencoder_parameters(), lr=self.config.lr, betas=(0.5, 0.999)
        )
        self.disc_optimizer = torch.optim.Adam(
            self.net.discriminators.parameters(), lr=self.config.disc_lr, betas=(0.5, 0.999)
        )

    def _keep(self, images: torch.Tensor) -> None:
        """Keep the first epoch's first images for the score normaliser and the per-location
        normalisers (CPU)."""
        cfg = self.config
        held = 0 if self._kept is None else len(self._kept)
        wanted = cfg.normalization_samples - held
        needed = cfg.score_normalization != "none" or cfg.per_position
        if not needed or self._epochs_done > 0 or wanted <= 0:
            return
        new = images[:wanted].detach().float().cpu()
        self._kept = new if self._kept is None else torch.cat([self._kept, new])

    def held_out(self, index: torch.Tensor) -> torch.Tensor:
        """Which training indices (B,) are held out of training to weigh the score's terms
        (``term_weighting=inverse_variance``): a fixed, evenly spread ``holdout_share`` of
        them, the same in every epoch and after a resume."""
        if self.config.weighting != "inverse_variance":
            return torch.zeros(index.shape, dtype=torch.bool, device=index.device)
        return torch.frac(index.double() * _GOLDEN) < self.config.holdout_share

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.ae_optimizer is None or self.disc_optimizer is None:
            self.setup_training(0)
        assert self.ae_optimizer is not None and self.disc_optimizer is not None
        cfg = self.config
        images = batch["image"].to(self.device)
        if "index" in batch:  # the trainer's batches: hold a fixed share out of training
            held = self.held_out(batch["index"]).to(images.device)
            if held.any():
                if self._epochs_done == 0:
                    new = images[held].detach().float().cpu()
                    self._holdout = (
                        new if self._holdout is None else torch.cat([self._holdout, new])
                    )
                images = images[~held]
            if len(images) == 0:
                return {}
        self._keep(images)
        if self.backbone is not None and self.feature_mean is None:
            self._set_standardisation(images)
        images = self.inputs(images)
        features, low, high = self.encode(images)
        recon = self.decode(low, high)
        codes = [low, high]
        with torch.no_grad():  # the normalisers' residuals, with the weights that made recon
            levels = self._level_residuals(features, self.net.features(recon))
            current = [(images - recon).pow(2).mean()] + [r.mean() for r in levels]

        # autoencoder: reconstruct, and make both codes look like prior samples
        rec_loss = F.mse_loss(recon, images)
        loss = rec_loss
        losses: dict[str, float] = {"recon": rec_loss.item()}
        if cfg.ssim_weight > 0:
            ssim_loss = 1 - _ssim(recon, images).mean()
            loss = loss + cfg.ssim_weight * ssim_loss
            losses["ssim"] = ssim_loss.item()
        fool = torch.stack(
            [
                F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
                for logit in (d(c) for d, c in zip(self.net.discriminators, codes, strict=True))
            ]
        ).mean()
        loss = loss + cfg.adversarial_weight * fool
        self.ae_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.ae_optimizer.step()

        # discriminators: prior samples (real, 1) vs encoder codes (fake, 0)
        d_losses, p_real, p_fake = [], [], []
        for d, code in zip(self.net.discriminators, codes, strict=True):
            prior = torch.randn(code.shape).to(self.device)  # CPU generator: checkpointed
            real, fake = d(prior), d(code.detach())
            d_losses.append(
                F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
            )
            p_real.append(torch.sigmoid(real).mean())
            p_fake.append(torch.sigmoid(fake).mean())
        disc_loss = torch.stack(d_losses).mean()
        self.disc_optimizer.zero_grad(set_to_none=True)
        disc_loss.backward()
        self.disc_optimizer.step()

        # score normalisers: moving mean squared residual of each term on normal images
        with torch.no_grad():
            current_t = torch.stack(current).clamp_min(1e-10)
            m = cfg.norm_momentum if self.steps > 0 else 0.0
            self.norms = m * self.norms + (1 - m) * current_t
        self.steps += 1

        return losses | {
            "adv": fool.item(),
            "disc": disc_loss.item(),
            "p_real": torch.stack(p_real).mean().item(),
            "p_fake": torch.stack(p_fake).mean().item(),
        }

    def end_epoch(self, epoch: int) -> None:
        self._epochs_done = epoch + 1

    def finish_training(self) -> None:
        self.score_normalizer = ScoreNormalizer()
        self.position_norms = None
        if self.config.per_position:
            if self._kept is None:
                raise RuntimeError("mlaae: no training images kept for the per-location norms")
            sums: list[torch.Tensor] | None = None
            for chunk in self._kept.split(16):
                raw, _ = self._raw_residuals(chunk.to(self.device))
                terms = [t.sum(dim=0) for t in raw]
                sums = terms if sums is None else [a + b for a, b in zip(sums, terms, strict=True)]
            assert sums is not None
            self.position_norms = [(t / len(self._kept)).clamp_min(1e-10) for t in sums]
        self.term_weights = torch.ones(1 + self.config.levels, device=self.device)
        if self.config.weighting == "inverse_variance":
            self.term_weights = self._inverse_variance_weights()
        if self.config.score_normalization != "image_statistics":
            return
        kept = self._kept
        n_kept = 0 if kept is None else len(kept)
        if kept is None or n_kept < MIN_NORMALIZATION_SAMPLES:
            raise RuntimeError(
                f"mlaae: score_normalization=image_statistics needs at least "
                f"{MIN_NORMALIZATION_SAMPLES} training images, got {n_kept}"
            )
        raw = torch.cat([self._raw(chunk.to(self.device))[0].cpu() for chunk in kept.split(16)])
        self.score_normalizer.fit(raw, image_statistics(kept))

    def _inverse_variance_weights(self) -> torch.Tensor:
        """Each term's weight: the input term's variance over the held-out images divided by
        the term's own (so the input term keeps weight 1). If a defect raises every
        mean-normalised term by the same share, Fisher's discriminant of independent terms
        weighs each by the inverse of its normal variance: a term that varies a lot between
        normal images says less per unit."""
        held = self._holdout
        if held is None or len(held) < MIN_NORMALIZATION_SAMPLES:
            raise RuntimeError(
                f"mlaae: term_weighting=inverse_variance needs at least "
                f"{MIN_NORMALIZATION_SAMPLES} held-out training images, got "
                f"{0 if held is None else len(held)}: raise holdout_share, train on more "
                "images or set term_weighting=mean"
            )
        terms = torch.cat(
            [torch.cat([p[:, None], f], dim=1) for p, f in map(self.score_terms, held.split(16))]
        )
        variance = terms.double().var(dim=0).clamp_min(1e-12)
        return (variance[0] / variance).float().to(self.device)

    # --- inference -----------------------------------------------------------------------------
    def _level_residuals(
        self, features: list[torch.Tensor], rec_features: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Channel mean of squared feature residuals per level (B, h_i, w_i), not normalised."""
        out = []
        for f, g in zip(features, rec_features, strict=True):
            residual = (f - g).pow(2).mean(dim=1)
            if self.config.feature_residual == "relative":
                energy = f.pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
                residual = residual / energy[:, None, None]
            out.append(residual)
        return out

    @torch.no_grad()
    def residuals(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Normalised squared residuals (channel means divided by the training normalisers):
        input term (B, h, w) — pixels (B, H, W) or feature maps (B, H/8, W/8) —, the
        reconstruction of the input, and per level [(B, h_i, w_i)]."""
        raw, recon = self._raw_residuals(images.to(self.device))
        if self.position_norms is not None:
            terms = [r / n for r, n in zip(raw, self.position_norms, strict=True)]
        else:
            terms = [r / self.norms[i] for i, r in enumerate(raw)]
        return terms[0], recon, terms[1:]

    @torch.no_grad()
    def _raw_residuals(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Un-normalised squared residual maps [input (B, h, w), E1, …] and the
        reconstruction of the input."""
        x = self.inputs(images)
        features, low, high = self.encode(x)
        recon = self.decode(low, high)
        levels = self._level_residuals(features, self.net.features(recon))
        return [(x - recon).pow(2).mean(dim=1), *levels], recon

    @staticmethod
    def residual_terms(
        pixel: torch.Tensor, levels: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The score's terms from normalised squared residual maps (as :meth:`residuals`
        returns them): the input term (B,) and one term per given level (B, len(levels)), each
        the root of the map's mean. For callers that already ran :meth:`residuals` (and want
        its reconstruction too); :meth:`score_terms` does both from images."""
        pixel_term = pixel.flatten(1).mean(dim=1).sqrt()
        feature_terms = torch.stack([lv.flatten(1).mean(dim=1).sqrt() for lv in levels], dim=1)
        return pixel_term, feature_terms

    @torch.no_grad()
    def score_terms(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input term (B,) and feature terms (B, levels): normalised RMS residuals (see module
        doc). The score is ``alpha * input + beta`` × the sum of the summed levels' terms."""
        pixel, _, levels = self.residuals(images)
        return self.residual_terms(pixel, levels)

    @torch.no_grad()
    def _raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,) before any normalisation, and maps (B, H, W)."""
        self.check_fitted(self.steps > 0, "untrained networks")
        cfg = self.config
        pixel, _, levels = self.residuals(images)
        levels = [levels[i - 1] for i in cfg.summed_levels]
        pixel_term, feature_terms = self.residual_terms(pixel, levels)
        alpha, betas = cfg.alpha, [cfg.beta] * len(levels)
        if cfg.weighting != "mean":
            weights = self.term_weights
            alpha = cfg.alpha * weights[0]
            betas = [cfg.beta * weights[i] for i in cfg.summed_levels]
            feature_terms = feature_terms * torch.stack(betas)[None]
            scores = alpha * pixel_term + feature_terms.sum(dim=1)
        else:
            scores = cfg.alpha * pixel_term + cfg.beta * feature_terms.sum(dim=1)
        size = (self.image_size, self.image_size)
        maps = pixel.sqrt()[:, None]
        if maps.shape[-2:] != size:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        maps = alpha * maps[:, 0]
        if cfg.beta > 0:
            for level, beta in zip(levels, betas, strict=True):
                up = F.interpolate(
                    level.sqrt()[:, None], size=size, mode="bilinear", align_corners=False
                )
                maps = maps + beta * up[:, 0]
        maps = gaussian_blur(maps[:, None], cfg.map_sigma)[:, 0]
        return scores, maps

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        images = images.to(self.device)
        scores, maps = self._raw(images)
        if self.score_normalizer.fitted:
            scores = self.score_normalizer(scores, image_statistics(images))
        return Prediction(scores, maps)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "net": dict(self.net.state_dict()),
            "norms": self.norms,
            "steps": self.steps,
            "score_normalizer": self.score_normalizer.state_dict(),
        }
        if self.position_norms is not None:
            state["position_norms"] = [n.detach().cpu() for n in self.position_norms]
        state["term_weights"] = self.term_weights.detach().cpu()
        if self.backbone is not None:
            state["backbone"] = self.backbone.identity()
            if self.feature_mean is not None and self.feature_std is not None:
                state["feature_mean"] = self.feature_mean.detach().cpu()
                state["feature_std"] = self.feature_std.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        norms = state["norms"]
        if tuple(norms.shape) != tuple(self.norms.shape):
            raise ValueError(
                f"mlaae: normalisers have shape {tuple(norms.shape)}, need "
                f"{tuple(self.norms.shape)} (input={self.config.input})"
            )
        if self.backbone is not None:
            if state.get("backbone") is None:
                raise ValueError(
                    "mlaae: checkpoint was made with input=pixels, this model uses "
                    f"input=features with backbone {self.config.backbone}"
                )
            check_identity(self.name, dict(state["backbone"]), self.backbone.identity())
        try:
            self.net.load_state_dict(state["net"])
        except RuntimeError as exc:
            raise ValueError(
                f"mlaae: weights do not fit this model (input {self.config.input}, image size "
                f"{self.image_size}, {self.channels} channels, width {self.config.width}, "
                f"code sizes): {exc}"
            ) from exc
        self.norms = norms.to(self.device, torch.float32).clone()
        self.steps = int(state["steps"])
        mean, std = state.get("feature_mean"), state.get("feature_std")
        self.feature_mean = mean.float().to(self.device) if mean is not None else None
        self.feature_std = std.float().to(self.device) if std is not None else None
        self.score_normalizer.load_state_dict(state.get("score_normalizer"))
        position = state.get("position_norms")
        self.position_norms = (
            [n.float().to(self.device) for n in position] if position is not None else None
        )
        weights = state.get("term_weights")  # absent from checkpoints older than the weighting
        if weights is not None and tuple(weights.shape) != tuple(self.norms.shape):
            raise ValueError(
                f"mlaae: term weights have shape {tuple(weights.shape)}, need "
                f"{tuple(self.norms.shape)}"
            )
        self.term_weights = (
            weights.float().to(self.device)
            if weights is not None
            else torch.ones(1 + self.config.levels, device=self.device)
        )

    def training_state(self) -> dict[str, Any]:
        if self.ae_optimizer is None or self.disc_optimizer is None:
            return {}
        state: dict[str, Any] = {
            "ae_optimizer": self.ae_optimizer.state_dict(),
            "disc_optimizer": self.disc_optimizer.state_dict(),
            "epochs_done": self._epochs_done,
        }
        if self._kept is not None:
            state["kept"] = self._kept.clone()
        if self._holdout is not None:
            state["holdout"] = self._holdout.clone()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.ae_optimizer is None or self.disc_optimizer is None:
            self.setup_training(0)
        assert self.ae_optimizer is not None and self.disc_optimizer is not None
        self.ae_optimizer.load_state_dict(state["ae_optimizer"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self._epochs_done = int(state["epochs_done"])
        kept = state.get("kept")
        self._kept = kept.float().cpu() if kept is not None else None
        holdout = state.get("holdout")
        self._holdout = holdout.float().cpu() if holdout is not None else None
