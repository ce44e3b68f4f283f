"""CycleGAN baseline for normal → defect translation (the seed's comparison method).

Two ResNet generators — ``defect_generator`` G: X → Y and ``normal_generator`` F: Y → X, each
:class:`~defectlab.components.gan_layers.ResidualEncoder` (``res_blocks`` residual blocks)
followed by :class:`~defectlab.components.gan_layers.UpDecoder` — and the same multi-scale
PatchGAN discriminators, optimiser recipe, batch pairing, collapse check, sample grids and mask
rule as CrossGAN (:mod:`defectlab.synth.translation`), so a comparison isolates the method;
``res_blocks=3`` keeps the generators near CrossGAN's parameter budget
(``parameter_counts()``; ``docs/models/crossgan.md``).

Losses (Zhu et al. 2017): least-squares adversarial loss by default (``gan_loss``),
``cycle_weight·(L1(F(G(x)), x) + L1(G(F(y)), y))`` (10) and
``identity_weight·(L1(G(y), y) + L1(F(x), x))`` (5; 0 = off). The discriminators are updated
first on detached fakes of the current batch (no history pool of old fakes), then the
generators against the updated, frozen discriminators.

``generator="residual_attention"`` (the default; ``"full"`` is the classic CycleGAN): both
generators also output an attention map ``m`` and return ``m·G(x) + (1 − m)·x``; the same
attention priors as CrossGAN's are added (:mod:`defectlab.synth.translation`): TV (and
sparsity, off by default) on every map, the area prior on the map of ``G(x)`` (target: the
batch's mean defect mask area; no real defect is tied to a translation of ``x``), mask
supervision of the maps of ``F(y)`` and ``G(F(y))`` by ``y``'s mask, and with
``attention_recon="image"`` the identity terms on the generators' images rather than the
blends. The mask comes from the map.

Synthesis: ``G(x)``; one output per normal image (CycleGAN has no detail code, so
``detail="none"`` in the record), the mask from the attention map (``generator="full"``: from
the aligned difference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlab.base import Synthesizer
from defectlab.components.gan_layers import (
    MultiScaleDiscriminator,
    ResidualEncoder,
    UpDecoder,
    attention_blend,
    frozen,
)
from defectlab.components.gan_losses import adversarial_loss
from defectlab.config import check_fields
from defectlab.registry import register
from defectlab.synth.translation import GANConfig, TranslationGAN

GENERATORS = ("defect_generator", "normal_generator")
DISCRIMINATORS = ("normal_discriminator", "defect_discriminator")


@dataclass
class CycleGANConfig(GANConfig):
    gan_loss: str = "lsgan"
    #: residual blocks per generator (3 ≈ CrossGAN's generator-side parameter budget)
    res_blocks: int = 3
    cycle_weight: float = 10.0
    identity_weight: float = 5.0
    adv_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(
            self,
            at_least_one=("res_blocks",),
            nonnegative=("cycle_weight", "identity_weight", "adv_weight"),
        )


class ResnetGenerator(nn.Sequential):
    """Down-sample twice, residual blocks, up-sample twice, conv + Tanh (and an attention map
    with ``kind="residual_attention"``)."""

    def __init__(
        self,
        channels: int,
        width: int,
        blocks: int,
        norm: str = "instance",
        kind: str = "full",
        attention_gain: float = 1.0,
    ) -> None:
        super().__init__(
            ResidualEncoder(channels, width, blocks, norm),
            UpDecoder(channels, width, kind, attention_gain),
        )


@register
class CycleGAN(TranslationGAN):
    """See the module docstring."""

    name: ClassVar[str] = "cyclegan"
    description: ClassVar[str] = (
        "CycleGAN baseline: unpaired normal→defect translation with cycle consistency; "
        "trains on normal + a few defect images; edits inside a learned attention map, "
        "which is the mask (generator=full: masks from the aligned difference)"
    )
    Config = CycleGANConfig
    config: CycleGANConfig
    collapse_watch: ClassVar[dict[str, str]] = {
        "d_normal": "normal_discriminator",
        "d_defect": "defect_discriminator",
    }

    def build_networks(self) -> dict[str, nn.Module]:
        cfg, c, w = self.config, self.channels, self.config.width
        return {
            "defect_generator": ResnetGenerator(
                c, w, cfg.res_blocks, cfg.encoder_norm, cfg.generator, cfg.attention_gain
            ),
            "normal_generator": ResnetGenerator(
                c, w, cfg.res_blocks, cfg.encoder_norm, cfg.generator, cfg.attention_gain
            ),
            "normal_discriminator": MultiScaleDiscriminator(c, w, cfg.disc_layers, cfg.disc_scales),
            "defect_discriminator": MultiScaleDiscriminator(c, w, cfg.disc_layers, cfg.disc_scales),
        }

    def _edit(
        self, name: str, x: torch.Tensor, maps: dict[str, torch.Tensor] | None, role: str
    ) -> torch.Tensor:
        """Generator ``name`` on ``x``: its image, or with ``generator="residual_attention"``
        its image blended into ``x`` by its attention map (stored in ``maps`` under ``role``)."""
        out = self.nets[name](x)
        if not self.config.attention:
            return out
        image, attention = out
        if maps is not None:
            maps[role] = attention
        return attention_blend(x, image, attention)

    def to_defect(
        self, x: torch.Tensor, maps: dict[str, torch.Tensor] | None = None, role: str = ""
    ) -> torch.Tensor:
        return self._edit("defect_generator", x, maps, role)

    def to_normal(
        self, y: torch.Tensor, maps: dict[str, torch.Tensor] | None = None, role: str = ""
    ) -> torch.Tensor:
        return self._edit("normal_generator", y, maps, role)

    def _identity(self, name: str, image: torch.Tensor, maps: dict[str, torch.Tensor]) -> Any:
        """L1 of generator ``name`` on an image of its target domain to that image: on the
        generator's image alone for an attention generator with ``attention_recon="image"``
        (no reward for an empty map), on its output otherwise."""
        if self.config.attention and self.config.attention_recon == "image":
            return F.l1_loss(self.nets[name](image)[0], image)
        return F.l1_loss(self._edit(name, image, maps, f"identity_{name}"), image)

    def train_pairs(
        self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None = None
    ) -> dict[str, float]:
        cfg, kind = self.config, self.config.gan_loss
        d_normal, d_defect = (self.nets[n] for n in DISCRIMINATORS)
        maps: dict[str, torch.Tensor] = {}  # attention maps by role (residual_attention)
        u, v = self.to_defect(x, maps, "u"), self.to_normal(y, maps, "v")

        x_loss = adversarial_loss(d_normal(x), 1.0, kind) + adversarial_loss(
            d_normal(v.detach()), 0.0, kind
        )
        y_loss = adversarial_loss(d_defect(y), 1.0, kind) + adversarial_loss(
            d_defect(u.detach()), 0.0, kind
        )
        self.step_optimizers(DISCRIMINATORS, x_loss + y_loss)

        with frozen([d_normal, d_defect]):
            adv = adversarial_loss(d_defect(u), 1.0, kind) + adversarial_loss(
                d_normal(v), 1.0, kind
            )
            cycle = F.l1_loss(self.to_normal(u, maps, "x_hat"), x) + F.l1_loss(
                self.to_defect(v, maps, "y_hat"), y
            )
            loss = cfg.adv_weight * adv + cfg.cycle_weight * cycle
            losses: dict[str, float] = {}
            if cfg.identity_weight > 0:
                identity = self._identity("defect_generator", y, maps) + self._identity(
                    "normal_generator", x, maps
                )
                loss = loss + cfg.identity_weight * identity
                losses["identity"] = identity.item()
            if maps:
                if y_mask is None:
                    raise ValueError("generator=residual_attention trains on the defect masks")
                area = y_mask.mean(dim=(1, 2, 3)).mean().expand(len(x))
                prior, values = self.attention_loss(
                    maps, {"u": area}, {"v": y_mask, "y_hat": y_mask}
                )
                loss = loss + prior
                losses.update(values)
            self.step_optimizers(GENERATORS, loss)
        return {
            "cycle": cycle.item(),
            "g_adv": adv.item(),
            **losses,
            "g_total": loss.item(),
            "d_normal": x_loss.item(),
            "d_defect": y_loss.item(),
        }

    def sample_rows(
        self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None = None
    ) -> list[list[torch.Tensor]]:
        u, v = self.to_defect(x), self.to_normal(y)
        return [[x, u, self.to_normal(u)], [y, v, self.to_defect(v)]]

    def use_defect_examples(self, images: Sequence[np.ndarray]) -> None:
        """CycleGAN has no detail code to take from examples."""
        Synthesizer.use_defect_examples(self, images)

    def translate(
        self, x: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        out = self.nets["defect_generator"](x)
        image, attention = out if self.config.attention else (out, None)
        return image, attention, {"detail": "none", "detail_example": -1}
