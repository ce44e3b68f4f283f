"""MaskGAN's networks: the stage-1 mask generator and the stage-2 defect generator (a
SPADE-like painter with a defect-focus gate); the discriminators are the shared multi-scale
PatchGANs (:mod:`defectlab.components.gan_layers`).

Networks (``w = width``, images in [-1, 1], masks in [0, 1]; names are the keys of
``self.nets``; the design's wording in brackets)::

    mask_generator  [stage-1 generator, encoder-decoder]:
        ResidualEncoder(C, w, mask_blocks): conv7×7 w, conv4×4/2 2w, conv4×4/2 4w (IN, ReLU),
        residual blocks → (4w, H/4, W/4)  [intermediate defect features]
        ⊕ noise: ``noise_channels`` Gaussian maps drawn on a ``noise_grid``² grid, bilinearly
          up-sampled to H/4 (smooth, spatially varying: they move and reshape the defect)
        ⊕ class embedding tiled (``class_conditional`` only)
        conv3×3 4w + IN + ReLU, residual block, 2 × [bilinear ×2, conv3×3, IN, ReLU]
        [up-sample], conv7×7 → ``n_masks`` channels, sigmoid [normalise] → soft masks
    region_discriminator      [stage-1 region level]: multi-scale PatchGAN on masks 2m − 1
    masked_image_discriminator [stage-1 image level]: multi-scale PatchGAN on image ⊙ mask
        (real defect image ⊙ its real mask vs normal image ⊙ generated mask)
    defect_generator [stage-2 generator]:
        encoder: ResidualEncoder(C + 1, w, image_blocks) on [x ⊙ (1 − m), m]
        decoder: two ModulationBlocks [feature-modulation blocks, SPADE-like: each
          normalisation is a parameter-free instance norm followed by per-pixel γ, β that
          two convolutions predict from the mask (and class map)], at H/4 → 2w and at
          H/2 → w, each followed by bilinear ×2
        defect_focus [defect-focus module]: a sigmoid gate conv3×3([h, m]) re-weights the
          features per pixel and channel, then conv7×7 + Tanh → foreground F
        output: m·F + (1 − m)·x
    image_discriminator       [stage-2 image level]: multi-scale PatchGAN on whole images
    defect_region_discriminator [stage-2 region level]: multi-scale PatchGAN on
        [image ⊙ mask, mask]: the defect regions cut out with their masks

With ``class_conditional`` every generator gets a learned class embedding and every
discriminator one-hot class maps as extra input channels (a conditional GAN). The classes are
``defect_classes``, which :func:`defectlab.api.train` fills with the sorted defect types of
the training split and feeds per image as ``batch["defect_class"]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.components.gan_layers import ResidualBlock, ResidualEncoder, to_image_conv


def _up(c_in: int, c_out: int) -> nn.Module:
    """Bilinear ×2 → conv3×3 → IN → ReLU. Instance norm, not batch norm: sampling one image in
    eval mode then behaves exactly as training does."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="reflect"),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.ReLU(inplace=True),
    )


def tile_code(code: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, K) code → (B, K, H, W) constant maps the size of ``like``."""
    return code[:, :, None, None].expand(-1, -1, *like.shape[2:])


class MaskGenerator(nn.Module):
    """Stage 1: normal image + noise (+ class) → ``n_masks`` soft masks in [0, 1]."""

    def __init__(
        self,
        channels: int,
        width: int,
        blocks: int,
        noise_channels: int,
        n_masks: int,
        n_classes: int,
        class_dim: int,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        self.encoder = ResidualEncoder(channels, width, blocks, norm)
        self.class_embedding = nn.Embedding(n_classes, class_dim) if n_classes else None
        extra = noise_channels + (class_dim if n_classes else 0)
        self.fuse = nn.Sequential(
            nn.Conv2d(4 * width + extra, 4 * width, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(4 * width, affine=True),
            nn.ReLU(inplace=True),
            ResidualBlock(4 * width, "instance"),
        )
        self.decoder = nn.Sequential(
            _up(4 * width, 2 * width),
            _up(2 * width, width),
            nn.Conv2d(width, n_masks, 7, padding=3, padding_mode="reflect"),
        )

    def forward(
        self, images: torch.Tensor, noise: torch.Tensor, classes: torch.Tensor | None = None
    ) -> torch.Tensor:
        features = self.encoder(images)
        noise = F.interpolate(noise, size=features.shape[2:], mode="bilinear", align_corners=False)
        parts = [features, noise]
        if self.class_embedding is not None:
            parts.append(tile_code(self.class_embedding(classes), features))
        return torch.sigmoid(self.decoder(self.fuse(torch.cat(parts, dim=1))))


class FeatureModulation(nn.Module):
    """SPADE-like normalisation: parameter-free instance norm, then per-pixel γ, β predicted
    from the condition (mask, class map) resized to the features: ``norm(h)·(1 + γ) + β``.
    The mask decides, pixel by pixel, how the decoder's features are scaled and shifted."""

    def __init__(self, channels: int, cond_channels: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.shared = nn.Sequential(
            nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU(inplace=True)
        )
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cond = F.interpolate(cond, size=features.shape[2:], mode="area")
        hidden = self.shared(cond)
        return self.norm(features) * (1 + self.gamma(hidden)) + self.beta(hidden)


class ModulationBlock(nn.Module):
    """SPADE residual block: [modulation → LeakyReLU → conv3×3] × 2, plus a modulated 1×1
    shortcut; ``c_in`` → ``c_out`` channels at the same resolution."""

    def __init__(self, c_in: int, c_out: int, cond_channels: int, hidden: int) -> None:
        super().__init__()
        self.mod1 = FeatureModulation(c_in, cond_channels, hidden)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="reflect")
        self.mod2 = FeatureModulation(c_out, cond_channels, hidden)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, padding_mode="reflect")
        self.shortcut_mod = FeatureModulation(c_in, cond_channels, hidden)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dx = self.conv1(F.leaky_relu(self.mod1(features, cond), 0.2))
        dx = self.conv2(F.leaky_relu(self.mod2(dx, cond), 0.2))
        return self.shortcut(self.shortcut_mod(features, cond)) + dx


class DefectFocus(nn.Module):
    """The defect-focus module: a sigmoid gate from the features and the mask re-weights
    every feature per pixel, so the foreground is built from what the mask points at; then
    conv7×7 + Tanh → the defect foreground F (image channels, [-1, 1])."""

    def __init__(self, width: int, channels: int, cond_channels: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.Conv2d(width + cond_channels, width, 3, padding=1, padding_mode="reflect"),
            nn.Sigmoid(),
        )
        self.to_foreground = to_image_conv(width, channels)

    def forward(self, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gate = self.gate(torch.cat([features, cond], dim=1))
        return self.to_foreground(features * gate)


class DefectPainter(nn.Module):
    """Stage 2: (normal image, mask, class) → defect foreground F. Compose with
    :func:`compose`."""

    def __init__(
        self,
        channels: int,
        width: int,
        blocks: int,
        n_classes: int,
        class_dim: int,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        self.encoder = ResidualEncoder(channels + 1, width, blocks, norm)
        self.class_embedding = nn.Embedding(n_classes, class_dim) if n_classes else None
        cond = 1 + (class_dim if n_classes else 0)
        self.modulation = nn.ModuleList(
            [
                ModulationBlock(4 * width, 2 * width, cond, width),
                ModulationBlock(2 * width, width, cond, width),
            ]
        )
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.defect_focus = DefectFocus(width, channels, cond)

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor | None = None
    ) -> torch.Tensor:
        features = self.encoder(torch.cat([images * (1 - masks), masks], dim=1))
        cond = masks
        if self.class_embedding is not None:
            cond = torch.cat([masks, tile_code(self.class_embedding(classes), masks)], dim=1)
        for block in self.modulation:
            features = self.up(block(features, cond))
        return self.defect_focus(features, cond)


def compose(images: torch.Tensor, masks: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """``m·F + (1 − m)·x``: the differentiable fusion used in training (soft masks allowed)."""
    return masks * foreground + (1 - masks) * images
