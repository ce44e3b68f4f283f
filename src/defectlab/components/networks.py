"""Segmentation networks: U-Net and UNet3+ decoders over a plain or a pretrained encoder.

Every network has two heads so one model gives both outputs inspection needs:

* ``segmentation_head`` — 1×1 conv to one logit per pixel, up-sampled (bilinear) to the
  input size when the shallowest features are coarser than the input (Lite0 starts at
  stride 2);
* ``classification_head`` — global average *and* max pooling of the deepest encoder
  features → one image logit ("is there a defect at all"), which is steadier than any
  statistic of the map on small or faint defects.

Encoders (``encoder=``):

* ``"plain"`` — :class:`PlainEncoder`, five stages of two 3×3 conv + batch norm + ReLU, the
  last four after a 2×2 max-pool (widths w, 2w, 4w, 8w, 8w; total stride 16). Trainable from
  scratch on a CPU; w = 16 gives about 1.2 M parameters with the U-Net decoder, 1.0 M with
  UNet3+.
* ``"lite0"`` — :class:`Lite0Encoder`, the ImageNet EfficientNet-Lite0 of
  :mod:`defectlab.components.features` (blocks 0, 2, 4, 10, 15: strides 2–32, grey replicated to
  three channels). Frozen by default (its batch norms always stay in eval mode); with
  ``freeze_encoder=False`` its weights are fine-tuned and then stored in checkpoints.

Decoders (``architecture=``):

* ``"unet"`` — :class:`UNetDecoder`: from the deepest features up, each stage up-samples to
  the next shallower scale, concatenates the encoder features of that scale and applies two
  3×3 convs (Ronneberger et al. 2015).
* ``"unet3plus"`` — :class:`UNet3PlusDecoder`, full-scale skip connections (Huang et al.
  2020): every decoder stage takes **all** encoder scales (shallower ones max-pooled down,
  its own as is) and **all** deeper decoder outputs (bilinearly up-sampled; the deepest
  encoder output counts as the first of them), projects each to ``cat_channels`` with a 3×3
  conv and fuses their concatenation with another 3×3 conv. With L scales, every stage has
  L inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.components.features import Lite0Features, check_identity
from defectlab.errors import InputShapeError

ARCHITECTURES = ("unet", "unet3plus")
ENCODERS = ("plain", "lite0")
#: Lite0 blocks whose outputs feed the decoder: strides 2, 4, 8, 16, 32
LITE0_BLOCKS = (0, 2, 4, 10, 15)
#: total down-sampling of each encoder: the input side must be a multiple of it
ENCODER_STRIDES = {"plain": 16, "lite0": 32}


def check_encoder_input(model: str, encoder: str, image_size: int, channels: int) -> None:
    """The input a network on ``encoder`` can take: sides a multiple of its total stride,
    grey or RGB."""
    stride = ENCODER_STRIDES[encoder]
    if image_size < stride or image_size % stride:
        raise InputShapeError(
            f"{model}: image_size {image_size} is not a multiple of {stride} "
            f"(the total stride of the {encoder!r} encoder); use e.g. 64, 128 or 256"
        )
    if channels not in (1, 3):
        raise InputShapeError(f"{model}: channels must be 1 or 3, got {channels}")


def conv_block(in_channels: int, out_channels: int, convs: int = 2) -> nn.Sequential:
    """``convs`` × (3×3 conv → batch norm → ReLU)."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            nn.Conv2d(
                in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


# --- encoders --------------------------------------------------------------------------------


class PlainEncoder(nn.Module):
    """Five conv stages (widths w, 2w, 4w, 8w, 8w), 2×2 max-pool before all but the first.

    ``forward`` returns the features of every stage, shallow (stride 1) to deep (stride 16).
    """

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width, 8 * width, 8 * width)
        ins = (in_channels, *widths[:-1])
        self.stages = nn.ModuleList(conv_block(i, o) for i, o in zip(ins, widths, strict=True))
        self.channels: tuple[int, ...] = widths
        self.strides: tuple[int, ...] = (1, 2, 4, 8, 16)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = 2.0 * images - 1.0  # inputs in [0, 1] → centred
        features = []
        for index, stage in enumerate(self.stages):
            if index > 0:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            features.append(x)
        return features


class Lite0Encoder(nn.Module):
    """The pretrained EfficientNet-Lite0 of :class:`~defectlab.components.features.Lite0Features`
    at blocks :data:`LITE0_BLOCKS`; frozen unless ``freeze=False``.

    Lite0Features stays in eval mode even while training (pretrained batch-norm statistics
    are kept, drop-connect stays off); unfrozen, its weights still learn.
    """

    def __init__(self, freeze: bool = True, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.features = Lite0Features(LITE0_BLOCKS, device)
        self.features.requires_grad_(not freeze)
        self.frozen = freeze
        self.channels: tuple[int, ...] = self.features.channels
        self.strides: tuple[int, ...] = self.features.strides

    def identity(self) -> dict[str, str]:
        return self.features.identity()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.frozen:
            with torch.no_grad():
                return self.features(images)
        return self.features(images)


# --- decoders --------------------------------------------------------------------------------


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Max-pool a finer map down or bilinearly up-sample a coarser one to ``size``."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h > size[0]:
        return F.adaptive_max_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UNetDecoder(nn.Module):
    """Classic U-Net decoder: up-sample, concatenate the same-scale encoder features, 2 convs.

    Decoder widths mirror the encoder (the width of the scale each stage ends at), so the
    output has ``encoder_channels[0]`` channels at the shallowest encoder scale. ``block``
    builds each stage from (in, out) channels: :func:`conv_block` (batch norm) by default.
    """

    def __init__(
        self,
        encoder_channels: tuple[int, ...],
        block: Callable[[int, int], nn.Module] = conv_block,
    ) -> None:
        super().__init__()
        deep = encoder_channels[-1]
        stages = []
        for skip in reversed(encoder_channels[:-1]):
            stages.append(block(deep + skip, skip))
            deep = skip
        self.stages = nn.ModuleList(stages)
        self.out_channels = encoder_channels[0]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for stage, skip in zip(self.stages, reversed(features[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], dim=1))
        return x


class FullScaleStage(nn.Module):
    """One UNet3+ decoder stage: project every input (each resized to this stage's scale) to
    ``cat_channels`` with 3×3 conv + BN + ReLU, concatenate, fuse with one more 3×3 conv."""

    def __init__(self, input_channels: tuple[int, ...], cat_channels: int) -> None:
        super().__init__()
        self.projections = nn.ModuleList(conv_block(c, cat_channels, 1) for c in input_channels)
        fused = cat_channels * len(input_channels)
        self.fuse = conv_block(fused, fused, 1)

    @property
    def n_inputs(self) -> int:
        return len(self.projections)

    def forward(self, inputs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        if len(inputs) != self.n_inputs:
            raise ValueError(f"stage built for {self.n_inputs} inputs, got {len(inputs)}")
        parts = [proj(resize_to(x, size)) for proj, x in zip(self.projections, inputs, strict=True)]
        return self.fuse(torch.cat(parts, dim=1))


class UNet3PlusDecoder(nn.Module):
    """UNet3+ decoder with full-scale skip connections.

    With encoder scales 0 (shallow) … L−1 (deep), decoder stage i (i = L−2 … 0) aggregates the
    encoder features of scales 0 … i and the decoder outputs of scales i+1 … L−1 (the output
    at scale L−1 is the deepest encoder map): L inputs per stage, ``stages[k].n_inputs``.
    """

    def __init__(self, encoder_channels: tuple[int, ...], cat_channels: int) -> None:
        super().__init__()
        levels = len(encoder_channels)
        fused = cat_channels * levels
        stages = []
        for i in range(levels - 2, -1, -1):
            deeper = [fused] * (levels - 2 - i) + [encoder_channels[-1]]
            stages.append(FullScaleStage((*encoder_channels[: i + 1], *deeper), cat_channels))
        self.stages = nn.ModuleList(stages)
        self.levels = levels
        self.out_channels = fused

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = self.levels
        # decoder outputs, deepest first; the deepest "decoder output" is the encoder's
        decoded: list[torch.Tensor] = [features[-1]]
        for stage, i in zip(self.stages, range(levels - 2, -1, -1), strict=True):
            size = tuple(features[i].shape[-2:])
            deeper = list(reversed(decoded))  # scales i+1 … L−1, shallow to deep
            decoded.append(stage([*features[: i + 1], *deeper], size))
        return decoded[-1]


# --- the full network ------------------------------------------------------------------------


class TrainableState(nn.Module):
    """For networks with an ``encoder``: their state without the frozen, installed Lite0
    weights (checkpoints store those weights' identity instead), and its strict reload."""

    encoder: nn.Module

    def _frozen_backbone(self) -> bool:
        return isinstance(self.encoder, Lite0Encoder) and self.encoder.frozen

    def trainable_state(self) -> dict[str, Any]:
        state = self.state_dict()
        if self._frozen_backbone():
            state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
        return dict(state)

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        frozen = self._frozen_backbone()
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (frozen and k.startswith("encoder."))]
        if missing or unexpected:
            raise RuntimeError(
                f"{type(self).__name__} state does not match: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )


def network_state(net: TrainableState) -> dict[str, Any]:
    """A model's checkpoint state for ``net``, with the Lite0 backbone's identity."""
    state: dict[str, Any] = {"net": net.trainable_state()}
    if isinstance(net.encoder, Lite0Encoder):
        state["backbone"] = net.encoder.identity()
    return state


def load_network_state(model_name: str, net: TrainableState, state: dict[str, Any]) -> None:
    """Reload :func:`network_state`, refusing a checkpoint made with other Lite0 weights."""
    if isinstance(net.encoder, Lite0Encoder):
        check_identity(model_name, dict(state.get("backbone", {})), net.encoder.identity())
    net.load_trainable_state(state["net"])


class SegmentationNet(TrainableState):
    """Encoder + decoder + ``segmentation_head`` (pixel logits at input size) +
    ``classification_head`` (one image logit from the pooled deepest features).

    ``forward(images)`` → ``(pixel logits (B, 1, H, W), image logits (B,))``.
    """

    def __init__(
        self,
        architecture: str = "unet",
        encoder: str = "plain",
        in_channels: int = 1,
        width: int = 16,
        cat_channels: int = 16,
        freeze_encoder: bool = True,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        self.architecture = architecture
        self.encoder_kind = encoder
        self.encoder: PlainEncoder | Lite0Encoder = (
            PlainEncoder(in_channels, width)
            if encoder == "plain"
            else Lite0Encoder(freeze_encoder, device)
        )
        channels = self.encoder.channels
        self.decoder: UNetDecoder | UNet3PlusDecoder = (
            UNetDecoder(channels)
            if architecture == "unet"
            else UNet3PlusDecoder(channels, cat_channels)
        )
        self.segmentation_head = nn.Conv2d(self.decoder.out_channels, 1, 1)
        hidden = max(16, channels[-1] // 4)
        self.classification_head = nn.Sequential(
            nn.Linear(2 * channels[-1], hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1)
        )
        self.to(device)

    @property
    def stride(self) -> int:
        return self.encoder.strides[-1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(images)
        logits = self.segmentation_head(self.decoder(features))
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(
                logits, size=images.shape[-2:], mode="bilinear", align_corners=False
            )
        deepest = features[-1]
        pooled = torch.cat([deepest.mean(dim=(2, 3)), deepest.amax(dim=(2, 3))], dim=1)
        return logits, self.classification_head(pooled)[:, 0]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
