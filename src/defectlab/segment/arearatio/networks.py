"""The per-pixel feature networks (FCNs) of ``arearatio-gcn``, whose features the superpixels
cluster and the GCN scores: a small encoder-decoder trained from scratch (``encoder="plain"``)
or a U-Net decoder over the frozen ImageNet EfficientNet-Lite0 (``encoder="lite0"``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.components.networks import Lite0Encoder, TrainableState, UNetDecoder

#: total down-sampling inside the FCN: image sides must be multiples of it
FCN_STRIDE = 4


def _block(c_in: int, c_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(2):
        layers += [
            nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(math.gcd(8, c_out), c_out),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class PixelFeatureNet(nn.Module):
    """Three-stage encoder-decoder (widths w, 2w, 4w; two 2× poolings, skip connections) with
    a 1×1 head to ``feature_dim``: one feature per input pixel. GroupNorm, not BatchNorm, so
    training and inference compute the same thing on small batches. w = 24: about 0.27 M
    parameters."""

    def __init__(self, channels: int, width: int, feature_dim: int) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = (
            _block(channels, w),
            _block(w, 2 * w),
            _block(2 * w, 4 * w),
        )
        self.dec2, self.dec1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.head = nn.Conv2d(w, feature_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(images)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], dim=1))
        return self.head(d1)


class Lite0PixelFeatureNet(TrainableState):
    """Per-pixel features on the frozen ImageNet EfficientNet-Lite0 (``encoder="lite0"``):
    a U-Net decoder (GroupNorm stages, widths mirroring Lite0's) over its stride-2 to
    stride-32 stages — the network of the ``unet-lite0`` upper bound — then, at full
    resolution, the up-sampled decoder output concatenated with the raw input channels
    (the image, and the memory distance when there is one) through one ``_block`` of
    ``width`` and a 1×1 head to ``feature_dim``. Only the decoder and head learn (about
    0.65 M parameters); the first ``image_channels`` input channels go to Lite0."""

    def __init__(
        self,
        image_channels: int,
        extra_channels: int,
        width: int,
        feature_dim: int,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.image_channels = image_channels
        self.encoder = Lite0Encoder(freeze=True, device=device)
        self.decoder = UNetDecoder(self.encoder.channels, block=_block)
        self.refine = _block(self.decoder.out_channels + image_channels + extra_channels, width)
        self.head = nn.Conv2d(width, feature_dim, 1)
        self.to(device)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        decoded = self.decoder(self.encoder(inputs[:, : self.image_channels]))
        decoded = F.interpolate(
            decoded, size=inputs.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.head(self.refine(torch.cat([decoded, inputs], dim=1)))
