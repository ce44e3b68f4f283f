"""Pieces shared by the learned (GAN) synthesizers: layers, multi-scale PatchGAN
discriminators, the adversarial losses, the mask rule and the training/synthesis base classes
(:class:`GANSynthesizer` for every GAN, :class:`TranslationGAN` for the translators).

CrossGAN (:mod:`defectlab.synth.crossgan`) and the CycleGAN baseline
(:mod:`defectlab.synth.cyclegan`) differ only in their networks and losses; everything a
comparison must hold equal lives here once — the discriminators, the optimiser recipe
(one Adam per network, step decay), the pairing of normal and defect images within a batch,
discriminator-collapse detection, sample grids and, above all, the rule that turns a
generated image into a mask. MaskGAN (:mod:`defectlab.synth.maskgan`) shares all of that but
the mask rule (its masks are generated, not derived).

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
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlab import distributed
from defectlab.base import Model, ModelConfig, Prediction
from defectlab.config import apply_overrides
from defectlab.data.io import to_uint8, write_png
from defectlab.data.transforms import resize_image
from defectlab.errors import ConfigError, TrainingError
from defectlab.synth.base import Synthesizer, SynthSample

GAN_LOSSES = ("bce", "lsgan")
ENCODER_NORMS = ("instance", "batch", "none")
MASK_RULES = ("std", "fixed")


# --- layers ----------------------------------------------------------------------------------


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class ResidualBlock(nn.Module):
    """conv3×3 → norm → ReLU → conv3×3 → norm, plus the input: keeps content while refining."""

    def __init__(self, channels: int, norm: str = "instance") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
            _norm(norm, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
            _norm(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UpBlock(nn.Sequential):
    """Bilinear ×2 → conv3×3 → BN → ReLU (the seed's up-sampling block; no checkerboards)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="reflect"),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


def to_image_conv(width: int, channels: int) -> nn.Module:
    """Final 7×7 conv to the image channels + Tanh: outputs in [-1, 1] like the inputs."""
    return nn.Sequential(
        nn.Conv2d(width, channels, 7, padding=3, padding_mode="reflect"), nn.Tanh()
    )


def _conv_norm_relu(c_in: int, c_out: int, kernel: int, stride: int, norm: str) -> nn.Module:
    padding = (kernel - 1) // 2 if stride == 1 else 1
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding=padding),
        _norm(norm, c_out),
        nn.ReLU(inplace=True),
    )


class ResidualEncoder(nn.Sequential):
    """Residual FCN with two stride-2 down-samplings: conv7×7 w, conv4×4/2 2w, conv4×4/2 4w
    (each norm + ReLU), then ``blocks`` residual blocks → (4w, H/4, W/4). CrossGAN's content
    encoder; with :class:`UpDecoder` after it, CycleGAN's generator.

    ``norm`` is ``"instance"`` (the CycleGAN/DRIT choice), ``"batch"`` or ``"none"``. Instance
    norm right after the first conv makes the code of a grey image blind to its contrast
    (``a·x`` gives the same code) and nearly blind to its brightness (only the zero-padded
    border still sees a shift), so a decoder can only guess them back."""

    def __init__(self, channels: int, width: int, blocks: int, norm: str = "instance") -> None:
        super().__init__(
            _conv_norm_relu(channels, width, 7, 1, norm),
            _conv_norm_relu(width, 2 * width, 4, 2, norm),
            _conv_norm_relu(2 * width, 4 * width, 4, 2, norm),
            *(ResidualBlock(4 * width, norm) for _ in range(blocks)),
        )


class UpDecoder(nn.Sequential):
    """Two up-sampling blocks, one conv, Tanh: (4w, H/4, W/4) → image. CrossGAN's G_X."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__(
            UpBlock(4 * width, 2 * width),
            UpBlock(2 * width, width),
            to_image_conv(width, channels),
        )


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``layers`` 4×4 stride-2 convs (width doubling, instance norm after the first,
    LeakyReLU 0.2) and a 3×3 conv to one logit per patch."""

    def __init__(self, channels: int, width: int, layers: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = channels
        for i in range(layers):
            c_out = width * 2 ** min(i, 3)
            blocks += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
            if i > 0:
                blocks += [nn.InstanceNorm2d(c_out, affine=True)]
            blocks += [nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        blocks += [nn.Conv2d(c_in, 1, 3, padding=1)]
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiScaleDiscriminator(nn.Module):
    """One PatchGAN per scale on the image average-pooled by 1, 2, 4, …: coarse scales judge
    global structure, fine scales texture. Returns one logit map per scale."""

    def __init__(self, channels: int, width: int, layers: int, scales: int) -> None:
        super().__init__()
        self.scales = nn.ModuleList(
            PatchDiscriminator(channels, width, layers) for _ in range(scales)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, disc in enumerate(self.scales):
            if i > 0:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(disc(x))
        return out


def min_image_size(disc_layers: int, disc_scales: int) -> int:
    """Smallest side whose coarsest discriminator scale still has 2×2 maps after its last
    strided conv (instance norm needs more than one position)."""
    return 2 ** (disc_layers + 1) * 2 ** (disc_scales - 1)


def adversarial_loss(logits: torch.Tensor | Sequence[torch.Tensor], target: float, kind: str):
    """Mean over scales of BCE-with-logits (``kind="bce"``, cross-entropy as in the seed) or
    least squares (``"lsgan"``) against the constant ``target`` (1 real, 0 fake, 0.5 confused)."""
    maps = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    losses = []
    for m in maps:
        t = torch.full_like(m, target)
        if kind == "lsgan":
            losses.append(F.mse_loss(m, t))
        else:
            losses.append(F.binary_cross_entropy_with_logits(m, t))
    return torch.stack(losses).mean()


def set_requires_grad(modules: Sequence[nn.Module], flag: bool) -> None:
    """Freeze discriminators during the generator update (saves their weight gradients)."""
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(flag)


@contextmanager
def frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Discriminators frozen for a generator update and unfrozen after it, even when the
    update raises (a non-finite loss must not leave them frozen)."""
    set_requires_grad(modules, False)
    try:
        yield
    finally:
        set_requires_grad(modules, True)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    mask = (diff > threshold).astype(np.uint8)
    if rule.open_radius > 0:
        size = 2 * rule.open_radius + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    if rule.min_area > 1 and mask.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = np.zeros(n, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= rule.min_area
        mask = keep[labels].astype(np.uint8)
    return mask.astype(bool), threshold


# --- sample grids ----------------------------------------------------------------------------


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """uint8 grid of equally sized (H, W, C) float images in [0, 1], white gaps of ``pad``."""
    h, w, c = rows[0][0].shape
    n_cols = max(len(r) for r in rows)
    grid = np.ones((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, c), np.float32)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top : top + h, left : left + w] = image
    return to_uint8(grid)


def to_image(tensor: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor in [-1, 1] → (H, W, C) float array in [0, 1], for grids and samples."""
    return ((tensor + 1) / 2).clamp(0, 1).permute(1, 2, 0).cpu().numpy()


# --- config and base class -------------------------------------------------------------------

#: range rules of :func:`check_fields`: name → (test that a value fails, what it must be)
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "at_least_one": (lambda v: v < 1, "must be at least 1"),
    "positive": (lambda v: v <= 0, "must be positive"),
    "nonnegative": (lambda v: v < 0, "must be >= 0"),
    "half_open_unit": (lambda v: not 0 <= v < 1, "must be in [0, 1)"),
    "open_unit": (lambda v: not 0 < v < 1, "must be in (0, 1)"),
}


def check_fields(config: object, **rules: Sequence[str]) -> None:
    """Range checks of config fields, rule by rule in the order given (rules: the keys of
    ``_FIELD_RULES``), so every GAN config words its errors alike; the first failure raises a
    ValueError that names the field."""
    for rule, keys in rules.items():
        fails, requirement = _FIELD_RULES[rule]
        for key in keys:
            value = getattr(config, key)
            if fails(value):
                raise ValueError(f"{key} {requirement}, got {value}")


def check_choices(config: object, choices: dict[str, tuple[str, ...]]) -> None:
    """Each named string field must be one of its allowed values; the error names the field."""
    for key, allowed in choices.items():
        value = getattr(config, key)
        if value not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {value!r}")


@dataclass
class GANTrainingConfig(ModelConfig):
    """The training settings every GAN synthesizer shares and :class:`GANSynthesizer` reads
    (seed values where the seed gives them); subclasses add their networks' and losses'
    settings and may change a default."""

    #: the ``gan_loss`` values the synthesizer implements
    gan_losses: ClassVar[tuple[str, ...]] = GAN_LOSSES

    epochs: int = 400
    #: base channel count; encoders/generators work at up to 4× this, discriminators 8×
    width: int = 32
    #: normalisation in the residual encoders (:class:`ResidualEncoder`): "instance" (the
    #: CycleGAN/DRIT choice, the default), "batch" or "none"
    encoder_norm: str = "instance"
    #: Adam: one optimiser per network (seed: lr 1e-4, β1 0.5, weight decay 1e-4)
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 1e-4
    #: step decay: every ``lr_decay_epochs`` epochs multiply lr by ``lr_decay_gamma``
    lr_decay_epochs: int = 200
    lr_decay_gamma: float = 0.5
    #: image discriminators: strided convs per scale and number of scales
    disc_layers: int = 4
    disc_scales: int = 3
    #: "bce" (cross-entropy, the seed) or "lsgan" (least squares); MaskGAN also "hinge"
    gan_loss: str = "bce"
    #: images of each kind remembered to pair batches that lack one kind
    buffer_size: int = 8
    #: a discriminator whose loss stays below ``collapse_threshold`` for
    #: ``collapse_patience`` consecutive steps has collapsed: training stops (0 = never)
    collapse_threshold: float = 1e-3
    collapse_patience: int = 200
    #: write a sample grid every ``sample_every`` steps (0 = off) and at the end of training
    #: into ``sample_dir`` (empty = no grids)
    sample_every: int = 0
    sample_dir: str = ""

    def __post_init__(self) -> None:
        check_fields(
            self,
            at_least_one=("width", "lr_decay_epochs", "disc_layers", "disc_scales", "buffer_size"),
            positive=("lr", "lr_decay_gamma"),
            half_open_unit=("beta1", "beta2"),
            nonnegative=("weight_decay", "collapse_threshold", "collapse_patience", "sample_every"),
        )
        check_choices(self, {"gan_loss": self.gan_losses, "encoder_norm": ENCODER_NORMS})


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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(
            self,
            positive=("mask_k",),
            nonnegative=("mask_min_diff", "mask_blur", "mask_open", "mask_min_area"),
        )
        check_choices(self, {"mask_rule": MASK_RULES})
        check_fields(self, open_unit=("mask_level",))

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


def map_tensors(fn: Callable[..., torch.Tensor], data: Any, *others: Any) -> Any:
    """``fn`` applied to every tensor of ``data`` — a tensor or a (nested) dict of tensors —
    with the tensors at the same place in ``others`` as further arguments. Pairing buffers
    are flat (one image tensor per kind) in TranslationGAN and dicts (image, mask, class) in
    MaskGAN; this lets one pairing and one checkpoint code path serve both."""
    if isinstance(data, dict):
        return {
            key: map_tensors(fn, value, *(o[key] for o in others)) for key, value in data.items()
        }
    return fn(data, *others)


def _count(data: Any) -> int:
    """Rows of a tensor, or of the (equally long) tensors of a nested dict."""
    while isinstance(data, dict):
        data = next(iter(data.values()))
    return len(data)


def _top_up(own: Any, source: Any, pick: torch.Tensor) -> Any:
    """``own`` followed by the rows ``pick`` of ``source``, tensor by tensor."""
    return map_tensors(lambda a, b: torch.cat([a, b[pick]]), own, source)


def _concat(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return torch.cat([first, second])


class GANSynthesizer(Model, Synthesizer):
    """What every GAN synthesizer shares, so that TranslationGAN (CrossGAN, CycleGAN) and
    MaskGAN train, checkpoint and sample alike: networks in one ``ModuleDict``, one Adam + step
    decay per trained network, batch pairing with rolling buffers, discriminator-collapse
    detection, sample grids, synthesis settings and the checkpoint state.

    A subclass builds the networks (:meth:`build_networks`), turns a batch into paired
    tensors (:meth:`_pair`, normally through :meth:`_pair_kinds`), updates on them
    (:meth:`train_pairs`) and lays out sample grids (:meth:`sample_rows`).

    Pairing. Batches mix normal and defect images in any proportion. Each step pairs
    ``n = max(#normal, #defect)`` of each kind: a kind with fewer is topped up with items drawn
    at random (torch's global generator, which the trainer seeds and checkpoints) from a
    rolling buffer of the last ``buffer_size`` items of that kind seen, or, while that buffer
    is still empty, by repeating the batch's own. A step whose batch lacks a kind that has
    never been seen only fills the buffer and returns no losses (this can only happen at the
    start of training).
    """

    family: ClassVar[str] = "synthesizer"
    needs_training: ClassVar[bool] = True
    trains_on_defects: ClassVar[bool] = True
    config: GANTrainingConfig
    #: loss key → discriminator name, for every discriminator watched for collapse
    collapse_watch: ClassVar[dict[str, str]] = {}
    #: config fields that may change after training (they do not touch the networks)
    synthesis_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ModelConfig | None = None, **kwargs: Any) -> None:
        Model.__init__(self, config, **kwargs)
        self._check_setup()
        self.nets = nn.ModuleDict(self.build_networks()).to(self.device)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.StepLR] = {}
        #: kind → its latest items: a tensor or a dict of tensors (see :func:`map_tensors`)
        self.buffers: dict[str, Any] = {}
        self.low_d_steps: dict[str, int] = dict.fromkeys(self.collapse_watch, 0)
        self.steps = 0
        self._last_pair: tuple[torch.Tensor, ...] | None = None

    def _check_setup(self) -> None:
        """Refuse sizes and channels the networks cannot take, before building them."""
        cfg = self.config
        smallest = min_image_size(cfg.disc_layers, cfg.disc_scales)
        if self.image_size % 4 or self.image_size < smallest:
            raise ValueError(
                f"{self.name}: image_size {self.image_size} must be a multiple of 4 (two stride-2 "
                f"down-samplings) and at least {smallest} (disc_layers={cfg.disc_layers} at "
                f"disc_scales={cfg.disc_scales}); lower disc_layers/disc_scales for small images"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"{self.name}: channels must be 1 or 3, got {self.channels}")

    # --- to implement -------------------------------------------------------------------------
    @abstractmethod
    def build_networks(self) -> dict[str, nn.Module]:
        """Name → network; every trained network gets its own optimiser."""

    @abstractmethod
    def _pair(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
        """The batch's paired tensors (images in [-1, 1]), or None when it cannot be paired
        yet; :meth:`train_pairs` and :meth:`sample_rows` receive them as arguments."""

    @abstractmethod
    def train_pairs(self, *pair: torch.Tensor) -> dict[str, float]:
        """One update on the tensors of :meth:`_pair`; returns the losses, including the
        ``collapse_watch`` keys of the discriminators it trained."""

    @abstractmethod
    def sample_rows(self, *pair: torch.Tensor) -> list[list[torch.Tensor]]:
        """Rows of image batches in [-1, 1] for the sample grid of up to 4 pairs (eval mode,
        no grad); each row becomes one grid row per image of its batches."""

    # --- helpers -------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        return {name: count_parameters(net) for name, net in self.nets.items()}

    @property
    def trained_networks(self) -> tuple[str, ...]:
        """The networks that get an optimiser: all of them unless a subclass says otherwise."""
        return tuple(self.nets)

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal noise from torch's global CPU generator (seeded and checkpointed
        by the trainer), so runs and resumes are exact on CPU and CUDA alike."""
        return torch.randn(shape).to(self.device)

    def step_optimizers(self, names: Sequence[str], loss: torch.Tensor) -> None:
        for name in names:
            self.optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        for name in names:
            self.optimizers[name].step()

    # --- training ------------------------------------------------------------------------------
    def setup_training(self, n_train: int) -> None:
        cfg = self.config
        for name in self.trained_networks:
            optimizer = torch.optim.Adam(
                self.nets[name].parameters(),
                lr=cfg.lr,
                betas=(cfg.beta1, cfg.beta2),
                weight_decay=cfg.weight_decay,
            )
            self.optimizers[name] = optimizer
            self.schedulers[name] = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=cfg.lr_decay_epochs, gamma=cfg.lr_decay_gamma
            )

    def _pair_kinds(self, kinds: dict[str, Any]) -> dict[str, Any] | None:
        """Pair the kinds of one batch as the class docstring says and remember the latest
        items of each kind in :attr:`buffers`. ``kinds`` maps a kind to a tensor or a dict of
        equally long tensors (an image with its mask and class); None when a kind has no
        items and no buffer yet, or the batch is empty."""
        n = max(_count(own) for own in kinds.values())
        paired: dict[str, Any] = {}
        for kind, own in kinds.items():
            count = _count(own)
            pool = self.buffers.get(kind)
            if count >= n:
                paired[kind] = own if n else None
                continue
            if pool is None:
                if not count:
                    paired[kind] = None
                    continue
                pick, source = (torch.arange(n - count) % count).to(self.device), own
            else:
                pick, source = torch.randint(_count(pool), (n - count,)).to(self.device), pool
            paired[kind] = _top_up(own, source, pick)
        size = self.config.buffer_size
        for kind, own in kinds.items():  # remember the latest real items of each kind
            if _count(own):
                pool = self.buffers.get(kind)
                merged = own if pool is None else map_tensors(_concat, pool, own)
                self.buffers[kind] = map_tensors(lambda t: t[-size:].detach().clone(), merged)
        if any(items is None for items in paired.values()):
            return None
        return paired

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if not self.optimizers:
            self.setup_training(0)
        pair = self._pair(batch)
        # distributed training: when one rank has no pair, every rank skips the step, so all
        # run the same optimiser steps (and gradient all-reduces)
        if distributed.any_rank(pair is None) or pair is None:
            return {}
        self.nets.train()
        losses = self.train_pairs(*pair)
        self.steps += 1
        self._check_collapse(losses)
        cfg = self.config
        if cfg.sample_dir and cfg.sample_every and self.steps % cfg.sample_every == 0:
            self.write_samples(Path(cfg.sample_dir) / f"step_{self.steps:07d}.png", *pair)
        self._last_pair = tuple(t[:4].detach() for t in pair)
        return losses

    def _check_collapse(self, losses: dict[str, float]) -> None:
        """Stop when a watched discriminator's loss stays tiny; a discriminator not trained
        this step (no loss reported) keeps its count."""
        cfg = self.config
        if not cfg.collapse_patience:
            return
        for key, name in self.collapse_watch.items():
            if key not in losses:
                continue
            low = losses[key] < cfg.collapse_threshold
            self.low_d_steps[key] = self.low_d_steps[key] + 1 if low else 0
            if self.low_d_steps[key] >= cfg.collapse_patience:
                raise TrainingError(
                    f"{self.name}: the {name} collapsed: its loss stayed below "
                    f"{cfg.collapse_threshold:g} for {cfg.collapse_patience} consecutive steps "
                    f"(step {self.steps}), so it separates real from generated images perfectly "
                    "and the generators get no useful gradient. Lower lr, use gan_loss=lsgan, "
                    "or add training images"
                )

    def end_epoch(self, epoch: int) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()

    def finish_training(self) -> None:
        if self.config.sample_dir and self._last_pair is not None:
            self.write_samples(Path(self.config.sample_dir) / "final.png", *self._last_pair)

    @torch.no_grad()
    def write_samples(self, path: Path, *pair: torch.Tensor) -> None:
        """A PNG grid of :meth:`sample_rows` for the first 4 pairs (eval mode)."""
        was_training = self.nets.training
        self.nets.eval()
        try:
            rows = self.sample_rows(*(t[:4] for t in pair))
        finally:
            self.nets.train(was_training)
        images = [[to_image(t[i]) for t in row] for row in rows for i in range(len(row[0]))]
        write_png(path, image_grid(images))

    # --- inference -----------------------------------------------------------------------------
    def predict(self, images: torch.Tensor) -> Prediction:
        raise ConfigError(
            f"{self.name} is a synthesizer: it generates defect images and does not score "
            f"them. Use `defectlab synth --method {self.name} --run RUN`"
        )

    @classmethod
    def from_run(cls, run_dir: Path) -> Self:
        from defectlab.api import load_run  # the API imports the registry, which imports us

        model = load_run(run_dir).model
        if not isinstance(model, cls):
            raise ConfigError(f"{run_dir} holds a {model.name} run, not {cls.name}")
        return model

    def configure_synthesis(self, overrides: dict[str, str]) -> None:
        """Apply ``--set key=value`` strings to a trained model before synthesis. Only
        :attr:`synthesis_fields` may change: the others describe the trained networks."""
        fixed = sorted(set(overrides) - set(self.synthesis_fields))
        if fixed:
            raise ConfigError(
                f"{self.name}: {', '.join(fixed)} cannot change after training; at synthesis "
                f"time only {', '.join(self.synthesis_fields)} can be set"
            )
        self.config = apply_overrides(self.config, overrides, "")

    def _channels_last(self, image: np.ndarray, what: str) -> np.ndarray:
        """``image`` as float32 (H, W, C) at its own size; a channel count the model was not
        trained on is refused with the option that fixes it."""
        array = np.asarray(image, np.float32)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] != self.channels:
            raise ConfigError(
                f"{self.name} was trained on {self.channels}-channel images; {what} has shape "
                f"{image.shape} (pass --channels {self.channels})"
            )
        return array

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, C) image in [0, 1] → (1, C, H, W) network input in [-1, 1]."""
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        return tensor.to(self.device) * 2 - 1

    # --- state ---------------------------------------------------------------------------------
    def _weights_hint(self) -> str:
        """What shapes the networks, for the error when checkpoint weights do not fit."""
        return f"image size {self.image_size}, {self.channels} channels, width {self.config.width}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "nets": {name: dict(net.state_dict()) for name, net in self.nets.items()},
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        nets = state["nets"]
        if set(nets) != set(self.nets):
            raise ValueError(f"{self.name}: networks {sorted(nets)} != {sorted(self.nets)}")
        for name, net in self.nets.items():
            try:
                net.load_state_dict(nets[name])
            except RuntimeError as exc:
                raise ValueError(
                    f"{self.name}: weights of {name} do not fit this model "
                    f"({self._weights_hint()}): {str(exc).splitlines()[0]}"
                ) from exc
        self.steps = int(state["steps"])

    def training_state(self) -> dict[str, Any]:
        if not self.optimizers:
            return {}
        return {
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "buffers": map_tensors(lambda t: t.cpu(), self.buffers),
            "low_d_steps": dict(self.low_d_steps),
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if not self.optimizers:
            self.setup_training(0)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        self.buffers = map_tensors(lambda t: t.to(self.device), state["buffers"])
        self.low_d_steps = {k: int(v) for k, v in state["low_d_steps"].items()}


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
    )

    def __init__(self, config: GANConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.examples: list[np.ndarray] = []

    @abstractmethod
    def translate(
        self, x: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Defect version (1, C, H, W) in [-1, 1] of normal ``x`` and what to record."""

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
        """Translate one normal image into a defect image; the mask is :func:`difference_mask`
        of the result and the (model-size) source. Images of another size are resized to the
        model's size first, and the sample is returned at that size."""
        source = self._as_model_input(image, "the normal image")
        self.nets.eval()
        generated, record = self.translate(self._to_tensor(source), rng)
        out = to_image(generated[0])
        rule = self.config.mask
        mask, threshold = difference_mask(out, source, rule)
        if image.ndim == 2:
            out = out[:, :, 0]
        record = {
            "method": self.name,
            **record,
            "mask_rule": rule.describe(),
            "mask_threshold": round(threshold, 6),
            "mask_area": int(mask.sum()),
            "resized": tuple(image.shape[:2]) != (self.image_size, self.image_size),
        }
        return SynthSample(out.astype(np.float32), mask, record)
