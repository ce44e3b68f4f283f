"""Supervised segmenters (unet, unet3plus): networks, losses, augmentation, learning, TTA,
state, resume, config, vote ensembles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import defectlab.api as dl
from defectlab import registry
from defectlab.base import Prediction
from defectlab.components.augment import AugmentSettings, augment_pairs
from defectlab.components.fusion import vote_ensemble
from defectlab.components.losses import focal_loss, segmentation_loss, soft_dice_loss
from defectlab.components.networks import (
    FullScaleStage,
    SegmentationNet,
    UNet3PlusDecoder,
    count_parameters,
)
from defectlab.components.segmentation import SegmenterConfig
from defectlab.data.splits import Split
from defectlab.evaluate.metrics import auroc, pixel_auroc
from defectlab.segment.unet import UNet3PlusSegmenter, UNetSegmenter
from defectlab.synth.procedural import ProceduralConfig, ProceduralSynthesizer
from defectlab.training import fit

MODELS = {"unet": UNetSegmenter, "unet3plus": UNet3PlusSegmenter}
SMALL = {"width": 8, "cat_channels": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def textured(n: int, size: int = 64, seed: int = 0, channels: int = 1) -> np.ndarray:
    """(N, H, W, C) float32 normal surfaces: phase-shifted stripes plus fine noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    images = []
    for _ in range(n):
        py, px = rng.uniform(0, 2 * np.pi, 2)
        base = 0.5 + 0.1 * np.sin(x / 5.0 + px) + 0.05 * np.cos(y / 7.0 + py)
        images.append(np.clip(base + rng.normal(0, 0.02, (size, size)), 0, 1))
    grey = np.stack(images)[..., None].astype(np.float32)
    return np.repeat(grey, channels, axis=3)


def synthetic_pairs(n: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Images with painted defects (every fourth one left normal) and their masks."""
    painter = ProceduralSynthesizer(
        ProceduralConfig(size_fraction=(0.15, 0.3), contrast=(0.4, 0.7), roi="none")
    )
    images = textured(n, size, seed)
    masks = np.zeros(images.shape[:3], np.float32)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if i % 4 != 3:
            sample = painter.synthesize(images[i], rng)
            images[i], masks[i] = sample.image, sample.mask
    return images, masks


def as_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[UNetSegmenter, list[dict]]:
    images, masks = synthetic_pairs(32, seed=0)
    torch.manual_seed(0)
    model = UNetSegmenter(SegmenterConfig(epochs=16, lr=3e-3, **SMALL), image_size=64)
    history = fit(
        model,
        images,
        masks=masks,
        run_dir=tmp_path_factory.mktemp("unet"),
        batch_size=8,
        progress=False,
    )
    return model, history


# --- networks --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["plain", "lite0"])
@pytest.mark.parametrize("name", list(MODELS))
def test_both_architectures_and_encoders_give_maps_at_input_size(name: str, encoder: str) -> None:
    channels = 3 if encoder == "lite0" and name == "unet" else 1
    model = MODELS[name](
        SegmenterConfig(encoder=encoder, **SMALL), image_size=64, channels=channels
    )
    model.is_fitted = True  # shapes and ranges need no training
    out = model.predict(torch.rand(2, channels, 64, 64))
    assert out.scores.shape == (2,) and out.maps.shape == (2, 64, 64)
    assert (out.maps >= 0).all() and (out.maps <= 1).all()
    assert (out.scores >= 0).all() and (out.scores <= 1).all()
    pixel_logits, image_logits = model.net(torch.rand(3, channels, 64, 64))
    assert pixel_logits.shape == (3, 1, 64, 64) and image_logits.shape == (3,)
    if encoder == "lite0":  # frozen by default: only decoder and heads learn
        assert not any(p.requires_grad for p in model.net.encoder.parameters())
        assert count_parameters(model.net, trainable_only=True) < count_parameters(model.net)


def test_default_plain_networks_are_small() -> None:
    for architecture in ("unet", "unet3plus"):
        parameters = count_parameters(SegmentationNet(architecture))
        assert 0.5e6 < parameters < 2e6, (architecture, parameters)


def test_unfrozen_lite0_encoder_learns_and_is_checkpointed() -> None:
    model = UNetSegmenter(
        SegmenterConfig(encoder="lite0", freeze_encoder=False, augment=False, **SMALL),
        image_size=64,
    )
    assert all(p.requires_grad for p in model.net.encoder.parameters())
    before = model.net.encoder.features.stem[0].weight.clone()
    model.setup_training(2)
    masks = torch.zeros(2, 64, 64)
    masks[0, 20:30, 20:30] = 1
    model.training_step({"image": torch.rand(2, 1, 64, 64), "mask": masks})
    assert not torch.equal(before, model.net.encoder.features.stem[0].weight)
    assert any(k.startswith("encoder.") for k in model.state_dict()["net"])


def test_unet3plus_stages_aggregate_every_scale() -> None:
    """Full-scale skips: each decoder stage sees all five scales (encoder maps at its scale
    and above, decoder outputs below), each resized to the stage's own scale."""
    net = SegmentationNet("unet3plus", "plain", width=4, cat_channels=4)
    decoder = net.decoder
    assert isinstance(decoder, UNet3PlusDecoder)
    assert len(decoder.stages) == 4
    assert all(isinstance(s, FullScaleStage) and s.n_inputs == 5 for s in decoder.stages)
    seen: list[tuple[list[int], list[int], int]] = []

    def record(module, args) -> None:
        inputs, size = args
        seen.append(([x.shape[-1] for x in inputs], [x.shape[1] for x in inputs], size[0]))

    for stage in decoder.stages:
        stage.register_forward_pre_hook(record)
    net(torch.rand(1, 1, 64, 64))
    fused = 5 * 4
    for k, (sides, channels, target) in enumerate(seen):
        i = 3 - k  # stage k works at encoder scale i (64 >> i px)
        assert sides == [64, 32, 16, 8, 4] and target == 64 >> i
        encoder_widths = [4, 8, 16, 32, 32]
        assert channels == [*encoder_widths[: i + 1], *[fused] * (3 - i), 32]


# --- losses and augmentation -----------------------------------------------------------------


def test_losses_reward_correct_masks() -> None:
    target = torch.zeros(2, 16, 16)
    target[0, 4:8, 4:8] = 1
    good, bad = 20.0 * (2 * target - 1), -20.0 * (2 * target - 1)
    assert soft_dice_loss(good, target) < 0.01 < 0.9 < soft_dice_loss(bad, target)
    uncertain = torch.zeros_like(target)
    assert focal_loss(uncertain, target) < torch.nn.functional.binary_cross_entropy_with_logits(
        uncertain, target
    )
    terms = segmentation_loss(good[:, None], torch.tensor([5.0, -5.0]), target)
    assert set(terms) == {"dice", "bce", "classification", "loss"}
    assert terms["loss"] < 0.05
    focal = segmentation_loss(good, torch.tensor([-5.0, 5.0]), target, kind="dice_focal")
    assert "focal" in focal and focal["classification"] > 1.0  # labels are mask.any()
    with pytest.raises(ValueError, match="loss must be one of"):
        segmentation_loss(good, torch.zeros(2), target, kind="dice_ce")


def test_augmentation_moves_image_and_mask_together() -> None:
    torch.manual_seed(0)
    masks = torch.zeros(16, 32, 32)
    for i in range(16):
        masks[i, 3 + i % 5 : 9 + i % 5, 20:27] = 1
    images = 0.2 + 0.6 * masks[:, None]
    geometry_only = AugmentSettings(
        brightness=0, contrast=0, noise=0, blur_probability=0, shift=0.1
    )
    moved_images, moved_masks = augment_pairs(images, masks, geometry_only)
    assert not torch.equal(moved_masks, masks)  # something flipped or shifted
    assert torch.allclose(moved_images[:, 0], 0.2 + 0.6 * moved_masks)
    photometric_images, photometric_masks = augment_pairs(images, masks, AugmentSettings())
    assert set(photometric_masks.unique().tolist()) <= {0.0, 1.0}
    assert photometric_images.min() >= 0 and photometric_images.max() <= 1
    assert not torch.equal(photometric_images[:, 0], 0.2 + 0.6 * photometric_masks)


# --- learning --------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_finds_unseen_defects(trained) -> None:
    model, history = trained
    assert len(history) == 16 * 4
    assert {"dice", "bce", "classification", "loss"} <= set(history[-1])
    first = np.mean([h["loss"] for h in history if h["epoch"] == 1])
    last = np.mean([h["loss"] for h in history if h["epoch"] == 16])
    assert last < 0.75 * first, (first, last)
    images, masks = synthetic_pairs(16, seed=1)
    out = model.predict(as_batch(images))
    assert pixel_auroc(masks, out.maps.numpy()) > 0.85
    labels = masks.reshape(16, -1).any(axis=1)
    assert auroc(labels, out.scores.numpy()) > 0.8
    inside = out.maps.numpy()[masks > 0].mean()
    outside = out.maps.numpy()[masks == 0].mean()
    assert inside > outside + 0.2, (inside, outside)


def test_score_variants_follow_the_config(trained) -> None:
    model, _ = trained
    batch = as_batch(synthetic_pairs(4, seed=2)[0])
    _, classification = model.probabilities(batch)
    variants = {}
    for score in ("combined", "classifier", "topk"):
        clone = UNetSegmenter(SegmenterConfig(score=score, **SMALL), image_size=64)
        clone.load_state_dict(model.state_dict())
        variants[score] = clone.predict(batch).scores
    assert torch.allclose(variants["classifier"], classification)
    assert torch.allclose(variants["combined"], 0.5 * (variants["classifier"] + variants["topk"]))


@pytest.mark.parametrize("combine", ["mean", "vote"])
def test_test_time_augmentation_is_flip_equivariant(trained, combine: str) -> None:
    model, _ = trained
    flips = UNetSegmenter(SegmenterConfig(tta=True, tta_combine=combine, **SMALL), image_size=64)
    flips.load_state_dict(model.state_dict())
    batch = as_batch(synthetic_pairs(4, seed=3)[0])
    out = flips.predict(batch)
    assert out.maps.shape == (4, 64, 64) and out.scores.shape == (4,)
    assert (out.maps >= 0).all() and (out.maps <= 1).all()
    for dims in ((-1,), (-2,), (-1, -2)):
        mirrored = flips.predict(batch.flip(dims))
        assert torch.allclose(mirrored.maps.flip(dims), out.maps, atol=1e-5)
        assert torch.allclose(mirrored.scores, out.scores, atol=1e-5)
    # TTA with the flips keeps the trained model's answer (it is roughly flip-invariant)
    plain = model.predict(batch)
    if combine == "mean":
        assert torch.corrcoef(torch.stack([plain.maps.flatten(), out.maps.flatten()]))[0, 1] > 0.8
    everything = UNetSegmenter(
        SegmenterConfig(tta=True, tta_transforms=("hflip", "noise", "brighter", "darker"), **SMALL),
        image_size=64,
    )
    everything.load_state_dict(model.state_dict())
    first, second = everything.predict(batch), everything.predict(batch)
    assert first.maps.shape == (4, 64, 64)
    assert torch.equal(first.maps, second.maps)  # the noise view is seeded


# --- state, resume, config -------------------------------------------------------------------


def test_state_round_trip_gives_identical_predictions(trained, tmp_path: Path) -> None:
    model, _ = trained
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(123)
    clone = UNetSegmenter(SegmenterConfig(**SMALL), image_size=64)
    clone.is_fitted = True  # at its initial weights, to show that loading changes its maps
    batch = as_batch(synthetic_pairs(4, seed=4)[0])
    assert not torch.equal(clone.predict(batch).maps, model.predict(batch).maps)
    clone.load_state_dict(torch.load(path, weights_only=True))
    a, b = model.predict(batch), clone.predict(batch)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    with pytest.raises(RuntimeError, match="size mismatch"):
        UNetSegmenter(SegmenterConfig(width=4), image_size=64).load_state_dict(model.state_dict())


def test_frozen_lite0_state_holds_no_backbone_weights_and_checks_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UNet3PlusSegmenter(SegmenterConfig(encoder="lite0", **SMALL), image_size=64)
    model.is_fitted = True  # what the state holds matters here, not training
    state = model.state_dict()
    assert not any(k.startswith("encoder.") for k in state["net"])
    assert len(state["backbone"]["sha256"]) == 64
    path = tmp_path / "state.pt"
    torch.save(state, path)
    torch.manual_seed(1)
    clone = UNet3PlusSegmenter(SegmenterConfig(encoder="lite0", **SMALL), image_size=64)
    clone.load_state_dict(torch.load(path, weights_only=True))
    batch = torch.rand(2, 1, 64, 64)
    assert torch.equal(model.predict(batch).maps, clone.predict(batch).maps)
    other = dict(state, backbone=dict(state["backbone"], sha256="0" * 64))
    with pytest.raises(ValueError, match="EfficientNet-Lite0 weights"):
        clone.load_state_dict(other)


@pytest.mark.parametrize("name", list(MODELS))
def test_resume_after_interruption_reproduces_the_run(name: str, tmp_path: Path) -> None:
    cls = MODELS[name]
    images, masks = synthetic_pairs(12, seed=5, size=32)
    config = SegmenterConfig(epochs=2, width=4, cat_channels=4)

    def train(run_dir: Path, *, interrupt_at: int = 0, resume: bool = False):
        torch.manual_seed(0 if not resume else 99)  # a resumed run must not need the same init
        model = cls(config, image_size=32)
        if interrupt_at:
            calls = {"n": 0}
            original = model.training_step

            def interrupted(batch):
                calls["n"] += 1
                if calls["n"] == interrupt_at:
                    raise KeyboardInterrupt
                return original(batch)

            model.training_step = interrupted
        history = fit(
            model,
            images,
            masks=masks,
            run_dir=run_dir,
            batch_size=4,
            checkpoint_every=2,
            resume=resume,
            progress=False,
            seed=3,
        )
        return model, history

    reference, reference_history = train(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", interrupt_at=5)  # 3 steps per epoch: dies mid epoch 2
    resumed, resumed_history = train(tmp_path / "run", resume=True)
    assert resumed_history == reference_history
    ref_state, new_state = reference.net.state_dict(), resumed.net.state_dict()
    assert ref_state.keys() == new_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(value, new_state[key]), key


def test_image_size_must_suit_the_encoder_stride() -> None:
    for cls in MODELS.values():
        with pytest.raises(ValueError, match=r"image_size 40 .*multiple of 16"):
            cls(SegmenterConfig(**SMALL), image_size=40)
        with pytest.raises(ValueError, match=r"image_size 48 .*multiple of 32 .*'lite0'"):
            cls(SegmenterConfig(encoder="lite0", **SMALL), image_size=48)
    model = UNetSegmenter(SegmenterConfig(width=4), image_size=48)
    model.is_fitted = True  # the output shape needs no training
    assert model.predict(torch.rand(1, 1, 48, 48)).maps.shape == (1, 48, 48)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        UNetSegmenter(image_size=64, channels=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoder": "vgg"}, "encoder must be one of plain, lite0; got 'vgg'"),
        ({"loss": "dice_ce"}, "loss must be one of dice_bce, dice_focal"),
        ({"score": "max"}, "score must be one of combined, classifier, topk"),
        ({"tta_combine": "median"}, "tta_combine must be one of mean, vote"),
        ({"tta_transforms": ("rotate",)}, "tta_transforms must be one of hflip"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"width": 0}, "width must be positive"),
        ({"dice_weight": 0.0, "pixel_weight": 0.0}, "nothing to segment"),
        ({"aug_noise": -0.1}, "aug_noise must be a non-negative"),
        ({"classification_share": 1.5}, r"classification_share must be in \[0, 1\]"),
        ({"aug_shift": 0.5}, "aug_shift must be in"),
        ({"score_top_fraction": 0.0}, "score_top_fraction"),
        ({"epochs": 0}, "epochs must be at least 1"),
    ],
)
def test_bad_config_is_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SegmenterConfig(**kwargs)


def test_registered_as_segmenters() -> None:
    for name, cls in MODELS.items():
        assert registry.get(name, "segmenter") is cls and cls.description


def test_vote_ensemble_counts_members_above_threshold() -> None:
    maps = torch.tensor([[[0.9, 0.2]], [[0.7, 0.6]], [[0.1, 0.4]]])  # 3 members, 1×1×2 maps
    scores = [0.9, 0.6, 0.2]
    members = [Prediction(torch.tensor([s]), m[None]) for s, m in zip(scores, maps, strict=True)]
    vote = vote_ensemble(members)
    assert torch.allclose(vote.shares.maps, torch.tensor([[[2 / 3, 1 / 3]]]))
    assert torch.allclose(vote.shares.scores, torch.tensor([2 / 3]))
    assert vote.pixels.tolist() == [[[True, False]]] and vote.images.tolist() == [True]
    unanimous = vote_ensemble(members, vote_threshold=1.0)
    assert not unanimous.pixels.any() and not unanimous.images.any()
    anyone = vote_ensemble(members, vote_threshold=1 / 3, pixel_thresholds=0.3)
    assert anyone.pixels.all()
    # per-member thresholds, e.g. each run's calibrated ones
    own = vote_ensemble(members, image_thresholds=[0.95, 0.5, 0.1], pixel_thresholds=[1, 1, 0])
    assert torch.allclose(own.shares.scores, torch.tensor([2 / 3]))
    assert torch.allclose(own.shares.maps, torch.tensor([[[1 / 3, 1 / 3]]]))
    with pytest.raises(ValueError, match="image_thresholds: 2 thresholds for 3 members"):
        vote_ensemble(members, image_thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="vote_threshold"):
        vote_ensemble(members, vote_threshold=0.0)


def test_trainable_through_the_api_on_defect_examples(folder_root: Path, tmp_path: Path) -> None:
    """Image/mask pairs from a folder layout; the checkpoint survives the weights_only reader."""
    run = dl.train(
        "unet3plus",
        folder_root,
        tmp_path / "run",
        image_size=32,
        device="cpu",
        overrides=[
            "epochs=1",
            "width=4",
            "cat_channels=4",
            "loss=dice_focal",
            "tta_transforms=hflip,noise",
            "data.defects_per_class=3",
        ],
        progress=False,
    )
    assert run.model.name == "unet3plus" and run.model.config.tta_transforms == ("hflip", "noise")
    split = Split.load(tmp_path / "run" / "split.json")
    assert len(split["train_defect"]) == 3  # the masks of three defect images were learned from
    loaded = dl.load_run(tmp_path / "run", device="cpu")
    batch = torch.rand(2, 1, 32, 32)
    assert torch.equal(run.model.predict(batch).maps, loaded.model.predict(batch).maps)
