"""Building blocks of the GAN synthesizers: residual encoders and decoders, multi-scale
PatchGAN discriminators, discriminator freezing and sample-image grids.

They are shared so that models compared with each other (CrossGAN, its CycleGAN baseline,
MaskGAN) differ only where their methods differ.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlab.data.io import to_uint8

#: normalisations of :class:`ResidualEncoder` (``encoder_norm`` of the GAN configs)
ENCODER_NORMS = ("instance", "batch", "none")
#: generator outputs (``generator`` of the translation GANs): a whole image, or an image and
#: a soft attention map that confines the edit (:class:`AttentionOutput`)
GENERATOR_KINDS = ("full", "residual_attention")
#: initial bias of the attention logit: sigmoid(-3) ≈ 0.05, so an untrained generator edits
#: little and training starts near the identity
ATTENTION_INIT_BIAS = -3.0


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


class AttentionOutput(nn.Module):
    """Final 7×7 conv to the image channels (Tanh) plus one attention channel (sigmoid):
    returns ``(image, attention)``, the image in [-1, 1] and the map in (0, 1), (B, 1, H, W).

    ``gain`` multiplies the attention logit, and the attention row of the conv starts divided
    by it, so the initial map is the same for every gain while each optimiser step moves the
    logit ``gain`` times as far (an equalised learning rate for this one channel): the map
    has to travel from its near-empty start to above the synthesis threshold, and Adam moves
    each weight by about the learning rate per step whatever the gradient's size.

    The gain is a buffer, saved with the weights it was trained with, so a checkpoint keeps its
    function whatever the config says; a checkpoint from before the gain loads as gain 1 (the
    plain conv it was trained as)."""

    gain: torch.Tensor

    def __init__(self, width: int, channels: int, gain: float = 1.0) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("gain", torch.tensor(float(gain)))
        self.conv = nn.Conv2d(width, channels + 1, 7, padding=3, padding_mode="reflect")
        with torch.no_grad():
            self.conv.weight[channels:] /= float(gain)
            self.conv.bias[channels:].fill_(ATTENTION_INIT_BIAS / float(gain))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        state_dict.setdefault(prefix + "gain", torch.tensor(1.0))  # saved before the gain
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.conv(h)
        logit = self.gain * out[:, self.channels :]
        return torch.tanh(out[:, : self.channels]), torch.sigmoid(logit)


def output_layer(width: int, channels: int, kind: str, gain: float = 1.0) -> nn.Module:
    """The generator's last layer for ``generator=kind``: an image, or image + attention
    (``gain``: :class:`AttentionOutput`)."""
    if kind == "residual_attention":
        return AttentionOutput(width, channels, gain)
    return to_image_conv(width, channels)


def attention_blend(
    source: torch.Tensor, image: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """``a·image + (1 − a)·source``: a convex combination, so the result stays in the images'
    range without clipping, and where ``a`` is exactly 0 it is the source, bit for bit."""
    return attention * image + (1 - attention) * source


def attention_priors(maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparsity (mean of ``a``) and total variation (mean absolute difference of neighbours)
    of attention maps, averaged over the maps: small, compact edits are preferred."""
    sparsity = torch.stack([m.mean() for m in maps]).mean()
    tv = torch.stack(
        [
            (m[..., 1:, :] - m[..., :-1, :]).abs().mean()
            + (m[..., :, 1:] - m[..., :, :-1]).abs().mean()
            for m in maps
        ]
    ).mean()
    return sparsity, tv


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
    """Two up-sampling blocks, one conv, Tanh: (4w, H/4, W/4) → image (``kind="full"``) or
    (image, attention) (``"residual_attention"``). CrossGAN's G_X."""

    def __init__(
        self, channels: int, width: int, kind: str = "full", attention_gain: float = 1.0
    ) -> None:
        super().__init__(
            UpBlock(4 * width, 2 * width),
            UpBlock(2 * width, width),
            output_layer(width, channels, kind, attention_gain),
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
