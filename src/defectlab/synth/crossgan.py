"""CrossGAN: unpaired normal → defect translation by two-stage cross reconstruction.

Normal images X and a handful of unpaired defect images Y are split into a **content**
code shared by both domains (what the part looks like) and a **detail** code carried by
defects only (what the defect looks like). A normal image's content with a defect's detail
code — or one drawn from the prior N(0, I) — gives a new defect image aligned with its
source, and the aligned difference gives its mask.

Networks (``w = width``, images in [-1, 1]; module names are the keys of ``self.nets``)::

    content_encoder  E^c (shared by both domains, weights shared; IN = ``encoder_norm``):
        conv7×7 w ─IN─ReLU─ conv4×4/2 2w ─IN─ReLU─ conv4×4/2 4w ─IN─ReLU
        ─ content_blocks × ResidualBlock(4w, IN)                        → z (4w, H/4, W/4)
    content_discriminator D_c (on content codes):
        3 × [conv5×5/2 4w ─LeakyReLU 0.2] ─ conv3×3 → 1, mean over positions → one logit
    detail_encoder E^a (defects): conv4×4/2 w ─LReLU─ ResidualBlock(w) ─ conv4×4/2 2w ─LReLU─
        ResidualBlock(2w) ─ global mean ─ FC → μ (detail_dim), FC → log σ²
    defect_generator G_Y(z, a): 2 × residual block on [z, a tiled] (conv3×3 → BN → ReLU →
        conv3×3 → BN, + z) ─ 2 × UpBlock (bilinear ×2, conv3×3, BN, ReLU) ─ conv7×7 ─ Tanh
    normal_generator G_X(z): 2 × UpBlock ─ conv7×7 ─ Tanh
    normal_discriminator D_X, defect_discriminator D_Y: multi-scale PatchGAN
        (``disc_scales`` scales, ``disc_layers`` stride-2 convs each; at 128 px with the
        defaults the patch maps are 8, 4 and 2 cells wide: 16×, 32×, 64× down-sampling as in
        the seed)

One training step on paired normal ``x`` and defect ``y`` (see
:class:`~defectlab.synth.translation.TranslationGAN` for how a batch is paired):

* stage 1 (forward translation): ``z_x, z_y = E^c(x), E^c(y)``; ``a_y ~ N(μ(y), σ²(y))``
  (reparameterised); ``u = G_Y(z_x, a_y)`` (defect version of x), ``v = G_X(z_y)``
  (defect-free version of y);
* stage 2 (backward reconstruction, no content discriminator): ``x̂ = G_X(E^c(u))``,
  ``ŷ = G_Y(E^c(v), a_u)`` with ``a_u`` the detail code of ``u``;
* discriminators first, on detached codes/images: D_c cross-entropy (normal codes 1, defect
  codes 0); D_X real ``x`` vs ``v``; D_Y real ``y`` vs ``u`` (and the prior-detail image below),
  with ``gan_loss`` (cross-entropy by default, as in the seed). Their reported losses are
  ``real + fake`` terms (chance level ≈ 1.39 for cross-entropy);
* then encoders and generators (discriminators frozen) minimise
  ``adv_weight·(D_Y(u)→real + D_X(v)→real)`` + ``content_adv_weight·CE(D_c(z), 0.5)`` (codes
  of both domains pushed to "either domain", the DRIT form of fooling D_c) +
  ``cross_cycle_weight·(L1(x̂, x) + L1(ŷ, y))`` (seed 10) + ``kl_weight·KL(N(μ, σ²) ‖ N(0, I))``
  (seed 0.01; mean over code elements, averaged over the codes of ``y`` and ``u``) +
  ``self_recon_weight·(L1(G_X(z_x), x) + L1(G_Y(z_y, a_y), y))`` +
  ``latent_weight·L1(μ(G_Y(z_x, a_r)), a_r)`` for a prior draw ``a_r`` (latent regression;
  its image is also shown to D_Y). The last two are the usual terms of this family (DRIT)
  that the design leaves open; set their weights to 0 to drop them (and the extra forward passes).

Image range: networks work in [-1, 1] (inputs ``2x − 1``); both generators end in Tanh.

Localised edits (``generator="residual_attention"``, the default; ``"full"`` is the seed's
design above):
G_Y and G_X also output an attention map ``m`` (sigmoid) and every image they produce is
``m·G + (1 − m)·source``, the source being the image whose content code they decode (``x`` for
``u``, ``y`` for ``v``, ``u`` for ``x̂``, ``v`` for ``ŷ``); the generator loss adds the attention
priors of :mod:`defectlab.synth.translation`: TV (and sparsity, off by default) on every map,
the area prior on the maps of ``u`` (target: the mask area of ``y``, whose detail code ``u``
carries) and ``u_r`` (the batch's mean mask area), and mask supervision of the maps of ``v``
and ``ŷ`` by ``y``'s mask (both edit exactly ``y``'s defect); with ``attention_recon="image"``
the self-reconstruction compares G_X's and G_Y's images, not the blends, with ``x`` and ``y``.
Synthesis takes the mask from G_Y's map. Everything else, losses included, is unchanged.

Synthesis (:meth:`CrossGAN.synthesize`): ``G_Y(E^c(x), a)`` with ``a`` drawn from N(0, I) by
the sample's rng (``detail="prior"``) or ``a = μ`` of a real defect example given through
:meth:`use_defect_examples`, one chosen per sample by the rng (``detail="encode"``). The mask is
G_Y's thresholded attention map (``generator="full"``: the shared difference rule of
:mod:`defectlab.synth.translation`). ``detail`` and the mask
settings can change after training (:meth:`configure_synthesis`).

Optimisers: one Adam per network — seven, where the seed counts six (it lists two content
encoders, which share their weights here, and leaves out the image discriminators).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlab.components.gan_layers import (
    MultiScaleDiscriminator,
    ResidualBlock,
    ResidualEncoder,
    UpBlock,
    UpDecoder,
    attention_blend,
    frozen,
    output_layer,
)
from defectlab.components.gan_losses import adversarial_loss
from defectlab.config import check_choice, check_fields
from defectlab.errors import ConfigError
from defectlab.registry import register
from defectlab.synth.translation import GANConfig, TranslationGAN

DETAIL_MODES = ("prior", "encode")


@dataclass
class CrossGANConfig(GANConfig):
    #: residual blocks of the content encoder (the seed only says "residual blocks")
    content_blocks: int = 3
    #: size of the detail (attribute) code
    detail_dim: int = 8
    #: loss weights (seed: cross-cycle 10, KL 0.01; the others follow DRIT)
    cross_cycle_weight: float = 10.0
    kl_weight: float = 0.01
    adv_weight: float = 1.0
    content_adv_weight: float = 1.0
    self_recon_weight: float = 10.0
    latent_weight: float = 10.0
    #: synthesis: detail codes from the prior N(0, I) or encoded from --defects examples
    detail: str = "prior"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(
            self,
            at_least_one=("content_blocks", "detail_dim"),
            nonnegative=(
                "cross_cycle_weight",
                "kl_weight",
                "adv_weight",
                "content_adv_weight",
                "self_recon_weight",
                "latent_weight",
            ),
        )
        check_choice("detail", self.detail, DETAIL_MODES)


class ContentDiscriminator(nn.Module):
    """Three 5×5 stride-2 conv blocks, one 3×3 conv, LeakyReLU: which domain a content code
    came from, one logit per code (cross-entropy)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        c = 4 * width
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [nn.Conv2d(c, c, 5, stride=2, padding=2), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, content: torch.Tensor) -> torch.Tensor:
        return self.net(content).mean(dim=(1, 2, 3))


class DetailEncoder(nn.Module):
    """Conv, residual blocks, FC → mean and log-variance of the defect detail code."""

    def __init__(self, channels: int, width: int, dim: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            ResidualBlock(width, "none"),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            ResidualBlock(2 * width, "none"),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.mean = nn.Linear(2 * width, dim)
        self.logvar = nn.Linear(2 * width, dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(images)
        return self.mean(h), self.logvar(h)


class DetailResidualBlock(nn.Module):
    """Residual block whose body also sees the detail code tiled over the content grid, so
    the detail can change the image everywhere the content allows."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels + dim, channels, 3, padding=1, padding_mode="reflect"),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
            nn.BatchNorm2d(channels),
        )

    def forward(self, content: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        tiled = detail[:, :, None, None].expand(-1, -1, *content.shape[2:])
        return content + self.body(torch.cat([content, tiled], dim=1))


class DefectGenerator(nn.Module):
    """G_Y(content, detail): two residual blocks, two up-sampling blocks, one conv (+Tanh);
    with ``kind="residual_attention"`` the last conv also gives an attention map."""

    def __init__(
        self, channels: int, width: int, dim: int, kind: str = "full", attention_gain: float = 1.0
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DetailResidualBlock(4 * width, dim) for _ in range(2))
        self.up = nn.Sequential(
            UpBlock(4 * width, 2 * width),
            UpBlock(2 * width, width),
            output_layer(width, channels, kind, attention_gain),
        )

    def forward(self, content: torch.Tensor, detail: torch.Tensor) -> Any:
        for block in self.blocks:
            content = block(content, detail)
        return self.up(content)


#: networks updated by the generator loss, and by the discriminator loss
GENERATOR_SIDE = ("content_encoder", "detail_encoder", "defect_generator", "normal_generator")
DISCRIMINATORS = ("content_discriminator", "normal_discriminator", "defect_discriminator")


@register
class CrossGAN(TranslationGAN):
    """See the module docstring for networks, losses and synthesis."""

    name: ClassVar[str] = "crossgan"
    description: ClassVar[str] = (
        "learned normal→defect translation (shared content + defect detail codes, two-stage "
        "cross reconstruction); trains on normal + a few defect images; edits inside a learned "
        "attention map, which is the mask (generator=full: masks from the aligned difference)"
    )
    Config = CrossGANConfig
    config: CrossGANConfig
    collapse_watch: ClassVar[dict[str, str]] = {
        "d_content": "content_discriminator",
        "d_normal": "normal_discriminator",
        "d_defect": "defect_discriminator",
    }
    synthesis_fields: ClassVar[tuple[str, ...]] = ("detail", *TranslationGAN.synthesis_fields)

    def build_networks(self) -> dict[str, nn.Module]:
        cfg, c, w = self.config, self.channels, self.config.width
        return {
            "content_encoder": ResidualEncoder(c, w, cfg.content_blocks, cfg.encoder_norm),
            "detail_encoder": DetailEncoder(c, w, cfg.detail_dim),
            "defect_generator": DefectGenerator(
                c, w, cfg.detail_dim, cfg.generator, cfg.attention_gain
            ),
            "normal_generator": UpDecoder(c, w, cfg.generator, cfg.attention_gain),
            "content_discriminator": ContentDiscriminator(w),
            "normal_discriminator": MultiScaleDiscriminator(c, w, cfg.disc_layers, cfg.disc_scales),
            "defect_discriminator": MultiScaleDiscriminator(c, w, cfg.disc_layers, cfg.disc_scales),
        }

    # --- building blocks (public for tests) ----------------------------------------------------
    def content(self, images: torch.Tensor) -> torch.Tensor:
        return self.nets["content_encoder"](images)

    def detail(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the detail code of defect images."""
        return self.nets["detail_encoder"](images)

    def sample_detail(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised draw ``μ + σ·ε`` and the KL term of ``images``' detail codes."""
        mean, logvar = self.detail(images)
        code = mean + torch.exp(0.5 * logvar) * self.randn(*mean.shape)
        return code, kl_divergence(mean, logvar)

    def _edit(
        self,
        out: Any,
        source: torch.Tensor | None,
        maps: dict[str, torch.Tensor] | None,
        role: str,
    ) -> torch.Tensor:
        """A generator's output as an image: itself (``generator="full"``) or blended into
        ``source`` by its attention map, which is stored in ``maps`` under ``role`` (for the
        priors)."""
        if not self.config.attention:
            return out
        if source is None:
            raise ValueError("generator=residual_attention edits a source image: pass source")
        image, attention = out
        if maps is not None:
            maps[role] = attention
        return attention_blend(source, image, attention)

    def to_defect(
        self,
        content: torch.Tensor,
        detail: torch.Tensor,
        source: torch.Tensor | None = None,
        maps: dict[str, torch.Tensor] | None = None,
        role: str = "",
    ) -> torch.Tensor:
        """G_Y: the defect version of the image whose content code is ``content``
        (``source``: that image, needed by ``generator="residual_attention"``)."""
        return self._edit(self.nets["defect_generator"](content, detail), source, maps, role)

    def to_normal(
        self,
        content: torch.Tensor,
        source: torch.Tensor | None = None,
        maps: dict[str, torch.Tensor] | None = None,
        role: str = "",
    ) -> torch.Tensor:
        """G_X: the defect-free version (``source`` as for :meth:`to_defect`)."""
        return self._edit(self.nets["normal_generator"](content), source, maps, role)

    # --- training ------------------------------------------------------------------------------
    def train_pairs(
        self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None = None
    ) -> dict[str, float]:
        cfg, nets = self.config, self.nets
        kind = cfg.gan_loss
        d_content, d_normal, d_defect = (nets[n] for n in DISCRIMINATORS)

        # attention maps of the generator-side images by role (residual_attention only)
        maps: dict[str, torch.Tensor] = {}
        # stage 1: forward translation
        z_x, z_y = self.content(torch.cat([x, y])).split([len(x), len(y)])
        a_y, kl = self.sample_detail(y)
        u = self.to_defect(z_x, a_y, x, maps, "u")
        v = self.to_normal(z_y, y, maps, "v")
        a_r = self.randn(len(x), cfg.detail_dim) if cfg.latent_weight > 0 else None
        u_r = self.to_defect(z_x, a_r, x, maps, "u_r") if a_r is not None else None
        # stage 2: backward (cross) reconstruction, no content discriminator
        z_u, z_v = self.content(torch.cat([u, v])).split([len(u), len(v)])
        a_u, kl_u = self.sample_detail(u)
        x_hat = self.to_normal(z_u, u, maps, "x_hat")
        y_hat = self.to_defect(z_v, a_u, v, maps, "y_hat")

        # discriminators on detached codes and images
        c_loss = adversarial_loss(d_content(z_x.detach()), 1.0, "bce") + adversarial_loss(
            d_content(z_y.detach()), 0.0, "bce"
        )
        x_loss = adversarial_loss(d_normal(x), 1.0, kind) + adversarial_loss(
            d_normal(v.detach()), 0.0, kind
        )
        fake_y = adversarial_loss(d_defect(u.detach()), 0.0, kind)
        if u_r is not None:
            fake_y = 0.5 * (fake_y + adversarial_loss(d_defect(u_r.detach()), 0.0, kind))
        y_loss = adversarial_loss(d_defect(y), 1.0, kind) + fake_y
        self.step_optimizers(DISCRIMINATORS, c_loss + x_loss + y_loss)

        # encoders and generators against the updated, frozen discriminators
        with frozen([d_content, d_normal, d_defect]):
            content_adv = adversarial_loss(d_content(z_x), 0.5, "bce") + adversarial_loss(
                d_content(z_y), 0.5, "bce"
            )
            adv = adversarial_loss(d_defect(u), 1.0, kind) + adversarial_loss(
                d_normal(v), 1.0, kind
            )
            if u_r is not None:
                adv = adv + adversarial_loss(d_defect(u_r), 1.0, kind)
            cross = F.l1_loss(x_hat, x) + F.l1_loss(y_hat, y)
            kl_term = 0.5 * (kl + kl_u)
            loss = (
                cfg.adv_weight * adv
                + cfg.content_adv_weight * content_adv
                + cfg.cross_cycle_weight * cross
                + cfg.kl_weight * kl_term
            )
            losses: dict[str, float] = {}
            if cfg.self_recon_weight > 0:
                if cfg.attention and cfg.attention_recon == "image":
                    # on G alone: faithful images without rewarding an empty map
                    rebuilt_x = nets["normal_generator"](z_x)[0]
                    rebuilt_y = nets["defect_generator"](z_y, a_y)[0]
                else:
                    rebuilt_x = self.to_normal(z_x, x, maps, "self_x")
                    rebuilt_y = self.to_defect(z_y, a_y, y, maps, "self_y")
                self_recon = F.l1_loss(rebuilt_x, x) + F.l1_loss(rebuilt_y, y)
                loss = loss + cfg.self_recon_weight * self_recon
                losses["self_recon"] = self_recon.item()
            if u_r is not None and a_r is not None:
                latent = F.l1_loss(self.detail(u_r)[0], a_r)
                loss = loss + cfg.latent_weight * latent
                losses["latent"] = latent.item()
            if maps:
                if y_mask is None:
                    raise ValueError("generator=residual_attention trains on the defect masks")
                # u carries y's detail code: y's mask area; u_r a prior code: the batch mean
                area = y_mask.mean(dim=(1, 2, 3))
                areas = {"u": area}
                if "u_r" in maps:
                    areas["u_r"] = area.mean().expand_as(area)
                # v removes y's defect and y_hat puts it back: both edit y's mask
                prior, values = self.attention_loss(maps, areas, {"v": y_mask, "y_hat": y_mask})
                loss = loss + prior
                losses.update(values)
            self.step_optimizers(GENERATOR_SIDE, loss)

        return {
            "cross_cycle": cross.item(),
            "kl": kl_term.item(),
            "g_adv": adv.item(),
            "content_adv": content_adv.item(),
            **losses,
            "g_total": loss.item(),
            "d_content": c_loss.item(),
            "d_normal": x_loss.item(),
            "d_defect": y_loss.item(),
        }

    def sample_rows(
        self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None = None
    ) -> list[list[torch.Tensor]]:
        """Like the seed's Figure 3: x → u → x̂ and y → v → ŷ (detail codes = means)."""
        z_x, z_y = self.content(x), self.content(y)
        u = self.to_defect(z_x, self.detail(y)[0], x)
        v = self.to_normal(z_y, y)
        x_hat = self.to_normal(self.content(u), u)
        y_hat = self.to_defect(self.content(v), self.detail(u)[0], v)
        return [[x, u, x_hat], [y, v, y_hat]]

    # --- synthesis -----------------------------------------------------------------------------
    def translate(
        self, x: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        mode = self.config.detail
        example = -1
        if mode == "encode":
            if not self.examples:
                raise ConfigError(
                    "crossgan detail=encode takes its detail codes from real defect images: "
                    "give some with --defects (use_defect_examples), or use detail=prior"
                )
            example = int(rng.integers(len(self.examples)))
            code = self.detail(self._to_tensor(self.examples[example]))[0]
        else:
            prior = rng.standard_normal(self.config.detail_dim).astype(np.float32)
            code = torch.from_numpy(prior)[None].to(self.device)
        out = self.nets["defect_generator"](self.content(x), code)
        image, attention = out if self.config.attention else (out, None)
        return image, attention, {"detail": mode, "detail_example": example}


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)), mean over batch and code elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
