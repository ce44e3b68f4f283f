"""MaskGAN: mask-then-image defect generation with exact pixel labels.

A normal image and Gaussian noise give a defect **mask** (stage 1); the normal image and that
mask give the **defect image** (stage 2), painted inside the mask only. The mask is the label
by construction: outside it the output *is* the input. The networks are in
:mod:`~defectlab.synth.maskgan.networks`, the losses in :mod:`~defectlab.synth.maskgan.losses`,
the object region and the mask rule in :mod:`~defectlab.synth.maskgan.masks`.

**Stage-2 input.** The generator sees the normal image with the mask region blanked
(``x ⊙ (1 − m)``, plus ``m``): whatever it paints there replaces the normal texture anyway,
and the hole is what lets it learn from the few real defects by reconstruction (below)
without learning to copy its input. The seed's "features of the normal image" are the
features of the part around the defect.

**Training** (one step, on a batch paired as in
:class:`~defectlab.synth.gan.GANSynthesizer`: ``n = max(#normal, #defect)`` of each,
the smaller kind topped up from a rolling buffer; defect images with an empty mask carry no
shape and are left out; each fake takes the class of the real defect it is paired with):

* stage 1 (``stage`` = ``joint`` or ``mask``): ``m_g = mask_generator(x, z, c)``. The
  discriminators first (detached fakes): region level real ``m_y`` vs ``m_g``, image level
  real ``y ⊙ m_y`` vs ``x ⊙ m_g``. Then the generator against the updated, frozen ones:
  ``adv_weight·(both adversarial terms) + boundary_weight·boundary_loss(m_g, object(x))
  + diversity_weight·mode_seeking_loss``. The last term (:func:`mode_seeking_loss`, after
  MSGAN, Mao et al. 2019; not in the seed) draws a second noise ``z'`` for the same images
  and penalises ``1 / (mean|m_g(z) − m_g(z')| / mean|z − z'| + ε)``: without it the mask
  generator can collapse to one mask whatever the noise (``docs/models/maskgan.md``);
* stage 2 (``joint`` or ``image``): the fake ``ŷ = m·F + (1 − m)·x`` uses the real masks of
  the paired defects (``image``) or stage 1's masks binarised at ``mask_threshold``
  (``joint``; an empty one is replaced by the paired real mask). Discriminators: image level
  real ``y`` vs ``ŷ``, region level real ``[y ⊙ m_y, m_y]`` vs ``[ŷ ⊙ m, m]``. Generator:
  ``adv_weight·(both) + recon_weight·L1`` of the foreground painted into a real defect's own
  mask against that defect (mean over mask pixels): the reconstruction term is an addition to
  the seed, which lists only the adversarial losses; ``recon_weight=0`` drops it.

``gan_loss`` is ``bce`` (non-saturating cross-entropy, the default), ``hinge`` or ``lsgan``.
One Adam (β1 0.5) and step decay per trained network. ``stage=mask`` and ``stage=image`` train
one stage only (the other's networks get no optimiser and stay as they are); with
``init_from=RUN`` a run starts from another maskgan run's weights, so the stages can be trained
one after the other. A discriminator whose loss stays below ``collapse_threshold`` for
``collapse_patience`` steps stops training with a :class:`~defectlab.errors.TrainingError`, as
does a non-finite loss (:func:`defectlab.training.fit`). Sample grids: rows normal | generated
mask | generated defect image, and real defect | real mask | its reconstruction.

**Sampling** (:meth:`MaskGAN.synthesize`). Per sample, from the sample's rng: the defect class
(``defect_class``, or one of ``defect_classes`` at random), a noise seed, the mask head
(``n_masks`` > 1). The mask rule (:func:`binarize_mask`): soft mask ≥ ``mask_threshold``, then
8-connected components smaller than ``mask_min_area`` px (at model size) removed. An empty
result is redrawn with a new noise seed, up to ``mask_attempts`` draws in all; if all are empty
the sample keeps an empty mask and an unchanged image, says so in its record (``mask_area`` 0)
and a warning is issued. Stage 2 then paints ``F`` for the binary mask, and the output is
composed with ``np.where(mask, F, image)`` **at the input's own size** (the mask
nearest-neighbour and ``F`` bilinearly — area-averaged when shrinking — resized from the model
size when they differ): outside the mask every output value is the input value, bit for bit.
The record holds the method, defect type, noise seed, mask head, draws, rule, mask area and the
mask's share outside the object region.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlab import distributed
from defectlab.base import SynthSample
from defectlab.components.gan_layers import MultiScaleDiscriminator, frozen, to_image
from defectlab.config import check_choice, check_fields
from defectlab.data.transforms import resize_image, resize_mask
from defectlab.errors import ConfigError, TrainingError
from defectlab.registry import register
from defectlab.synth.gan import GANSynthesizer, GANTrainingConfig
from defectlab.synth.maskgan.losses import (
    MASKGAN_LOSSES,
    boundary_loss,
    gan_loss,
    mode_seeking_loss,
)
from defectlab.synth.maskgan.masks import (
    OBJECT_RULES,
    POLARITIES,
    ObjectRule,
    binarize_mask,
    object_region,
)
from defectlab.synth.maskgan.networks import DefectPainter, MaskGenerator, compose, tile_code

STAGES = ("joint", "mask", "image")

#: stage → (generator, discriminators)
STAGE_NETWORKS = {
    "mask": ("mask_generator", ("region_discriminator", "masked_image_discriminator")),
    "image": ("defect_generator", ("image_discriminator", "defect_region_discriminator")),
}


# --- config ----------------------------------------------------------------------------------


@dataclass
class MaskGANConfig(GANTrainingConfig):
    """MaskGAN settings; the docstrings of this package's modules explain each group. The
    training settings (epochs, width, Adam and its step decay, discriminators, pairing buffer,
    collapse watch, sample grids) are :class:`~defectlab.synth.gan.GANTrainingConfig`'s, with
    MaskGAN's own defaults below."""

    gan_losses: ClassVar[tuple[str, ...]] = MASKGAN_LOSSES

    lr: float = 2e-4
    weight_decay: float = 0.0
    buffer_size: int = 16
    #: residual blocks of the mask generator's and the defect generator's encoders
    mask_blocks: int = 2
    image_blocks: int = 2
    #: noise: channels and the side of the grid they are drawn on (up-sampled to H/4)
    noise_channels: int = 8
    noise_grid: int = 4
    #: soft masks per forward pass (each a separate candidate)
    n_masks: int = 1
    #: "joint" trains both stages, "mask" stage 1 only, "image" stage 2 only
    stage: str = "joint"
    #: start from the weights of another maskgan run (same size, channels and networks)
    init_from: str = ""
    #: class conditioning on ``defect_classes`` (filled from the data by api.train)
    class_conditional: bool = False
    defect_classes: tuple[str, ...] = ()
    class_dim: int = 8
    #: loss weights (diversity: the mode-seeking term of stage 1, 0 = off)
    adv_weight: float = 1.0
    boundary_weight: float = 10.0
    recon_weight: float = 10.0
    diversity_weight: float = 0.1
    #: object region of the boundary-aware loss
    object_rule: str = "auto"
    object_threshold: float = 0.5
    object_polarity: str = "auto"
    object_margin: int = 4
    object_min_separation: float = 0.85
    #: sampling: mask rule, draws before giving up on an empty mask, and the class ("" = a
    #: random one of ``defect_classes`` per sample)
    mask_threshold: float = 0.5
    mask_min_area: int = 8
    mask_attempts: int = 10
    defect_class: str = ""

    def __post_init__(self) -> None:
        self.defect_classes = tuple(str(c) for c in self.defect_classes)
        super().__post_init__()
        check_fields(
            self,
            at_least_one=(
                "mask_blocks",
                "image_blocks",
                "noise_channels",
                "noise_grid",
                "n_masks",
                "class_dim",
                "mask_attempts",
            ),
            nonnegative=(
                "adv_weight",
                "boundary_weight",
                "recon_weight",
                "diversity_weight",
                "object_margin",
                "mask_min_area",
            ),
            open_unit=("mask_threshold", "object_threshold", "object_min_separation"),
        )
        check_choice("stage", self.stage, STAGES)
        check_choice("object_rule", self.object_rule, OBJECT_RULES)
        check_choice("object_polarity", self.object_polarity, POLARITIES)
        if len(set(self.defect_classes)) != len(self.defect_classes):
            raise ValueError(f"defect_classes has duplicates: {self.defect_classes}")
        if (
            self.defect_class
            and self.defect_classes
            and (self.defect_class not in self.defect_classes)
        ):
            raise ValueError(
                f"defect_class {self.defect_class!r} is not one of the trained defect_classes "
                f"{self.defect_classes}"
            )

    @property
    def object(self) -> ObjectRule:
        return ObjectRule(
            self.object_rule,
            self.object_threshold,
            self.object_polarity,
            self.object_margin,
            self.object_min_separation,
        )

    @property
    def n_classes(self) -> int:
        """Classes the networks condition on (0: unconditional)."""
        return len(self.defect_classes) if self.class_conditional else 0


# --- the synthesizer -------------------------------------------------------------------------


class Pair(NamedTuple):
    """Paired normal images and real defects (images in [-1, 1], masks (n, 1, H, W) 0/1,
    class ids (n,)); a tuple, so the base class hands its tensors to :meth:`MaskGAN.train_pairs`
    and :meth:`MaskGAN.sample_rows` as arguments."""

    normal: torch.Tensor
    defect: torch.Tensor
    mask: torch.Tensor
    classes: torch.Tensor


@register
class MaskGAN(GANSynthesizer):
    """See the module docstring for networks, losses, training and sampling; pairing, the
    optimiser recipe, collapse detection, grids and state come from
    :class:`~defectlab.synth.gan.GANSynthesizer`."""

    name: ClassVar[str] = "maskgan"
    description: ClassVar[str] = (
        "two-stage learned synthesis: a defect mask from the normal image + noise, then the "
        "defect painted inside it (outside pixels untouched); trains on normal + a few defect "
        "images with masks"
    )
    #: api.train fills ``defect_classes`` and feeds ``batch["defect_class"]``
    learns_defect_types: ClassVar[bool] = True
    Config = MaskGANConfig
    config: MaskGANConfig
    buffers: dict[str, dict[str, torch.Tensor]]
    #: config fields that may change after training (they do not touch the networks)
    synthesis_fields: ClassVar[tuple[str, ...]] = (
        "mask_threshold",
        "mask_min_area",
        "mask_attempts",
        "defect_class",
        "object_rule",
        "object_threshold",
        "object_polarity",
        "object_margin",
        "object_min_separation",
    )
    #: loss key → discriminator, per stage
    collapse_watch: ClassVar[dict[str, str]] = {
        "d1_region": "region_discriminator",
        "d1_image": "masked_image_discriminator",
        "d2_image": "image_discriminator",
        "d2_region": "defect_region_discriminator",
    }

    def _check_setup(self) -> None:
        super()._check_setup()
        cfg = self.config
        if 2 * cfg.object_margin >= self.image_size:
            raise ValueError(
                f"{self.name}: object_margin {cfg.object_margin} leaves no object region in a "
                f"{self.image_size} px image"
            )
        if cfg.class_conditional and not cfg.defect_classes:
            raise ValueError(
                f"{self.name}: class_conditional needs defect_classes (api.train fills them "
                "with the defect types of the training data)"
            )

    def build_networks(self) -> dict[str, nn.Module]:
        cfg, c, w, k = self.config, self.channels, self.config.width, self.config.n_classes
        layers, scales = cfg.disc_layers, cfg.disc_scales
        return {
            "mask_generator": MaskGenerator(
                c,
                w,
                cfg.mask_blocks,
                cfg.noise_channels,
                cfg.n_masks,
                k,
                cfg.class_dim,
                cfg.encoder_norm,
            ),
            "region_discriminator": MultiScaleDiscriminator(1 + k, w, layers, scales),
            "masked_image_discriminator": MultiScaleDiscriminator(c + k, w, layers, scales),
            "defect_generator": DefectPainter(
                c, w, cfg.image_blocks, k, cfg.class_dim, cfg.encoder_norm
            ),
            "image_discriminator": MultiScaleDiscriminator(c + k, w, layers, scales),
            "defect_region_discriminator": MultiScaleDiscriminator(c + 1 + k, w, layers, scales),
        }

    @property
    def active_stages(self) -> tuple[str, ...]:
        stage = self.config.stage
        return ("mask", "image") if stage == "joint" else (stage,)

    @property
    def trained_networks(self) -> tuple[str, ...]:
        """The networks of the stages being trained; only these get an optimiser."""
        names: list[str] = []
        for stage in self.active_stages:
            generator, discriminators = STAGE_NETWORKS[stage]
            names += [generator, *discriminators]
        return tuple(names)

    # --- building blocks (public for tests and notebooks) ------------------------------------
    def noise(self, n: int, seed: int | None = None) -> torch.Tensor:
        """(n, noise_channels, g, g) standard normal noise: from torch's global generator
        (seeded and checkpointed by the trainer) or, with ``seed``, from its own generator."""
        cfg = self.config
        shape = (n, cfg.noise_channels, cfg.noise_grid, cfg.noise_grid)
        if seed is None:
            return self.randn(*shape)
        values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        return torch.from_numpy(values).to(self.device)

    def generate_masks(
        self, images: torch.Tensor, noise: torch.Tensor, classes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Soft masks (B, n_masks, H, W) in [0, 1] for normal images in [-1, 1]."""
        return self.nets["mask_generator"](images, noise, self._classes(classes, len(images)))

    def paint(
        self, images: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Defect foreground F (B, C, H, W) in [-1, 1] for images in [-1, 1] and masks
        (B, 1, H, W)."""
        return self.nets["defect_generator"](images, masks, self._classes(classes, len(images)))

    def object_regions(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) 0/1 object masks of images in [-1, 1] by the configured rule."""
        rule = self.config.object
        arrays = ((images.detach() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        regions = np.stack([object_region(a, rule) for a in arrays]).astype(np.float32)
        return torch.from_numpy(regions)[:, None].to(images.device)

    def _classes(self, classes: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if not self.config.n_classes:
            return None
        if classes is None:
            raise ValueError(f"{self.name} is class-conditional: give the class ids")
        return classes.to(self.device).long().reshape(n)

    def _with_class(self, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Discriminator input: one-hot class maps appended as channels (conditional only)."""
        k = self.config.n_classes
        if not k:
            return inputs
        one_hot = F.one_hot(classes.long(), k).to(inputs.dtype)
        return torch.cat([inputs, tile_code(one_hot, inputs)], dim=1)

    @staticmethod
    def masked(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """image ⊙ mask in [0, 1] terms, returned in [-1, 1]: outside the mask is black."""
        return (images + 1) * masks - 1

    # --- training ----------------------------------------------------------------------------
    def setup_training(self, n_train: int) -> None:
        if self.config.init_from:
            self._load_weights_from(Path(self.config.init_from))
        super().setup_training(n_train)

    def _load_weights_from(self, run_dir: Path) -> None:
        """Start from another maskgan run's networks (training stages one after another)."""
        source = type(self).from_run(run_dir)
        try:
            self.load_state_dict({"nets": source.state_dict()["nets"], "steps": 0})
        except ValueError as exc:
            raise ConfigError(f"init_from={run_dir}: {exc}") from exc

    def _class_ids(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Per-image defect class ids from ``batch["defect_class"]`` (api.train provides it;
        normal images −1); without it every defect is class 0, which only an unconditional
        or single-class model accepts."""
        given = batch.get("defect_class")
        if given is None:
            if self.config.n_classes > 1:
                raise TrainingError(
                    f"{self.name}: class_conditional over {self.config.n_classes} classes needs "
                    "per-image defect classes (batch['defect_class'], as api.train provides)"
                )
            return torch.zeros(len(labels), dtype=torch.long, device=self.device)
        ids = given.to(self.device).round().long()
        limit = max(self.config.n_classes, 1)
        bad = (labels != 0) & ((ids < 0) | (ids >= limit))
        if self.config.n_classes and bad.any():
            raise TrainingError(
                f"{self.name}: defect class id {int(ids[bad][0])} outside the "
                f"{self.config.n_classes} defect_classes {self.config.defect_classes}"
            )
        return ids.clamp(0, limit - 1)

    def _pair(self, batch: dict[str, torch.Tensor]) -> Pair | None:
        """Pair normal images with real defects (see the module docstring)."""
        images = batch["image"].to(self.device, torch.float32)
        labels = batch["label"].to(self.device)
        masks = (batch["mask"].to(self.device, torch.float32) > 0.5).float()[:, None]
        classes = self._class_ids(batch, labels)
        normal = labels == 0
        defect = (labels != 0) & (masks.flatten(1).amax(dim=1) > 0)
        paired = self._pair_kinds(
            {
                "normal": {"image": images[normal]},
                "defect": {"image": images[defect], "mask": masks[defect], "cls": classes[defect]},
            }
        )
        if paired is None:
            return None
        normal_pair, defect_pair = paired["normal"], paired["defect"]
        return Pair(
            normal_pair["image"] * 2 - 1,
            defect_pair["image"] * 2 - 1,
            defect_pair["mask"],
            defect_pair["cls"],
        )

    def train_pairs(
        self, normal: torch.Tensor, defect: torch.Tensor, mask: torch.Tensor, classes: torch.Tensor
    ) -> dict[str, float]:
        """One update of the active stages on the tensors of a :class:`Pair`."""
        pair = Pair(normal, defect, mask, classes)
        losses: dict[str, float] = {}
        generated = None
        if "mask" in self.active_stages:
            generated, stage1 = self.train_mask_stage(pair)
            losses |= stage1
        if "image" in self.active_stages:
            losses |= self.train_image_stage(pair, generated)
        return losses

    def train_mask_stage(self, pair: Pair) -> tuple[torch.Tensor, dict[str, float]]:
        """One stage-1 update; returns the generated soft masks (detached) and the losses."""
        cfg, kind = self.config, self.config.gan_loss
        region_d, image_d = (self.nets[n] for n in STAGE_NETWORKS["mask"][1])
        x, y, m_y, c = pair.normal, pair.defect, pair.mask, pair.classes
        k = cfg.n_masks
        noise = self.noise(len(x))
        soft = self.generate_masks(x, noise, c)  # (n, K, H, W)
        fake_masks = soft.reshape(-1, 1, *soft.shape[2:])
        x_k, c_k = x.repeat_interleave(k, dim=0), c.repeat_interleave(k)

        def region_input(masks: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
            return self._with_class(masks * 2 - 1, classes)

        def image_input(
            images: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor
        ) -> torch.Tensor:
            return self._with_class(self.masked(images, masks), classes)

        detached = fake_masks.detach()
        d_region = gan_loss(region_d(region_input(m_y, c)), True, kind, True) + gan_loss(
            region_d(region_input(detached, c_k)), False, kind, True
        )
        d_image = gan_loss(image_d(image_input(y, m_y, c)), True, kind, True) + gan_loss(
            image_d(image_input(x_k, detached, c_k)), False, kind, True
        )
        self.step_optimizers(STAGE_NETWORKS["mask"][1], d_region + d_image)

        with frozen([region_d, image_d]):
            adv = gan_loss(region_d(region_input(fake_masks, c_k)), True, kind, False) + gan_loss(
                image_d(image_input(x_k, fake_masks, c_k)), True, kind, False
            )
            boundary = boundary_loss(soft, self.object_regions(x))
            loss = cfg.adv_weight * adv + cfg.boundary_weight * boundary
            seeking = torch.zeros((), device=self.device)
            if cfg.diversity_weight > 0:
                other = self.noise(len(x))
                seeking = mode_seeking_loss(soft, self.generate_masks(x, other, c), noise, other)
                loss = loss + cfg.diversity_weight * seeking
            self.step_optimizers(("mask_generator",), loss)
        return soft.detach(), {
            "boundary": boundary.item(),
            "mode_seeking": seeking.item(),
            "g1_adv": adv.item(),
            "g1_total": loss.item(),
            "mask_mean": soft.mean().item(),
            "d1_region": d_region.item(),
            "d1_image": d_image.item(),
        }

    def train_image_stage(self, pair: Pair, generated: torch.Tensor | None) -> dict[str, float]:
        """One stage-2 update; fakes use stage 1's binarised masks when given, else the real
        masks of the paired defects."""
        cfg, kind = self.config, self.config.gan_loss
        image_d, region_d = (self.nets[n] for n in STAGE_NETWORKS["image"][1])
        x, y, m_y, c = pair.normal, pair.defect, pair.mask, pair.classes
        masks = m_y
        if generated is not None:
            heads = torch.randint(generated.shape[1], (len(x),)).to(self.device)
            chosen = generated[torch.arange(len(x), device=self.device), heads][:, None]
            binary = (chosen >= cfg.mask_threshold).float()
            empty = binary.flatten(1).amax(dim=1) == 0
            masks = torch.where(empty[:, None, None, None], m_y, binary)
        fake = compose(x, masks, self.paint(x, masks, c))

        def region(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return self._with_class(torch.cat([self.masked(images, m), m * 2 - 1], dim=1), c)

        d_image = gan_loss(image_d(self._with_class(y, c)), True, kind, True) + gan_loss(
            image_d(self._with_class(fake.detach(), c)), False, kind, True
        )
        d_region = gan_loss(region_d(region(y, m_y)), True, kind, True) + gan_loss(
            region_d(region(fake.detach(), masks)), False, kind, True
        )
        self.step_optimizers(STAGE_NETWORKS["image"][1], d_image + d_region)

        with frozen([image_d, region_d]):
            adv = gan_loss(image_d(self._with_class(fake, c)), True, kind, False) + gan_loss(
                region_d(region(fake, masks)), True, kind, False
            )
            loss = cfg.adv_weight * adv
            recon = torch.zeros((), device=self.device)
            if cfg.recon_weight > 0:
                painted = self.paint(y, m_y, c)
                recon = ((painted - y).abs() * m_y).sum() / (m_y.sum() * self.channels + 1e-6)
                loss = loss + cfg.recon_weight * recon
            self.step_optimizers(("defect_generator",), loss)
        return {
            "recon": recon.item(),
            "g2_adv": adv.item(),
            "g2_total": loss.item(),
            "d2_image": d_image.item(),
            "d2_region": d_region.item(),
        }

    def end_epoch(self, epoch: int) -> None:
        # every rank takes part, so the decision is the same on all of them
        if not distributed.any_rank("defect" in self.buffers):
            raise TrainingError(
                f"{self.name}: no defect training image with a non-empty mask in epoch "
                f"{epoch + 1}: maskgan learns the masks from real defects, so give defect "
                "images with masks (data.defects_per_class=K on a dataset with masks)"
            )
        super().end_epoch(epoch)

    def sample_rows(
        self, normal: torch.Tensor, defect: torch.Tensor, mask: torch.Tensor, classes: torch.Tensor
    ) -> list[list[torch.Tensor]]:
        """Per pair two grid rows: normal | generated mask | generated defect image, and real
        defect | real mask | its reconstruction. Fixed noise (seed 0), so grids of successive
        steps compare, and torch's training stream is left untouched."""
        x, y, m_y, c = normal, defect, mask, classes
        if "mask" in self.active_stages:
            soft = self.generate_masks(x, self.noise(len(x), seed=0), c)[:, :1]
        else:
            soft = m_y
        binary = (soft >= self.config.mask_threshold).float()
        fake = torch.where(binary > 0, self.paint(x, binary, c), x)
        recon = compose(y, m_y, self.paint(y, m_y, c))
        as_image = [(soft * 2 - 1).expand_as(x), (m_y * 2 - 1).expand_as(y)]
        rows = [[x, as_image[0], fake], [y, as_image[1], recon]]
        return [[t[i : i + 1] for t in row] for i in range(len(x)) for row in rows]

    # --- inference ---------------------------------------------------------------------------
    def _pick_class(self, rng: np.random.Generator) -> tuple[int, str]:
        classes = self.config.defect_classes
        if self.config.defect_class:
            return classes.index(self.config.defect_class), self.config.defect_class
        if self.config.n_classes:
            index = int(rng.integers(len(classes)))
            return index, classes[index]
        return 0, classes[0] if len(classes) == 1 else "any"

    @torch.no_grad()
    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> SynthSample:
        """A defect image and its exact mask for one normal image (any size; the networks run
        at the model size and the result is composed at the input's size)."""
        self.check_fitted(self.is_fitted, "untrained networks", action="synthesize")
        cfg = self.config
        native = self._channels_last(image, "the normal image")
        x = self._to_tensor(resize_image(native, self.image_size))
        class_id, defect_type = self._pick_class(rng)
        classes = torch.tensor([class_id], device=self.device)
        self.nets.eval()
        attempts = 0
        while True:
            attempts += 1
            noise_seed = int(rng.integers(2**31))
            head = int(rng.integers(cfg.n_masks))
            soft = self.generate_masks(x, self.noise(1, seed=noise_seed), classes)[0, head]
            mask = binarize_mask(soft.cpu().numpy(), cfg.mask_threshold, cfg.mask_min_area)
            if mask.any() or attempts == cfg.mask_attempts:
                break
        if not mask.any():
            warnings.warn(
                f"{self.name}: empty mask after {cfg.mask_attempts} noise draws (rule soft >= "
                f"{cfg.mask_threshold:g}, components >= {cfg.mask_min_area} px); the sample keeps "
                "the normal image. Lower mask_threshold / mask_min_area or train longer",
                stacklevel=2,
            )
        binary = torch.from_numpy(mask.astype(np.float32))[None, None].to(self.device)
        foreground = self.paint(x, binary, classes)
        painted = to_image(foreground[0])
        height, width = native.shape[:2]
        native_mask = resize_mask(mask, (height, width))
        painted = resize_image(painted.astype(np.float32), (height, width))
        out = np.where(native_mask[:, :, None], painted, native).astype(np.float32)
        if image.ndim == 2:
            out = out[:, :, 0]
        outside = (native_mask & ~object_region(native, cfg.object)).sum()
        area = int(native_mask.sum())
        record = {
            "method": self.name,
            "defect_type": defect_type,
            "noise_seed": noise_seed,
            "mask_head": head,
            "mask_attempts": attempts,
            "mask_rule": f"soft>={cfg.mask_threshold:g} min_area={cfg.mask_min_area}",
            "mask_area": area,
            "outside_object": round(float(outside) / area, 6) if area else 0.0,
            "object_rule": cfg.object.describe(),
            "resized": (height, width) != (self.image_size, self.image_size),
        }
        return SynthSample(out, native_mask, record)

    # --- state -------------------------------------------------------------------------------
    def _weights_hint(self) -> str:
        """The class count shapes the networks too (embeddings, discriminator inputs)."""
        return f"{super()._weights_hint()}, {self.config.n_classes} classes"
