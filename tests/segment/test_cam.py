"""Class-activation-map segmenter (cam): shapes, learning from image labels only, masks
ignored, refinement, state, config errors, the one-class refusal."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

import defectlab.api as dl
from defectlab import registry
from defectlab.errors import ConfigError
from defectlab.evaluate.metrics import auroc
from defectlab.segment.cam import CAMConfig, CAMSegmenter, guided_filter

SIZE = 32
#: CAM localisation needs a few cells at the deepest stage (stride 16): 64 px gives 4 × 4
LOCALISE = 64
SMALL = {"width": 8, "augment": False}


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Textured images (B, 1, H, W), every second with a bright disc; labels (B,), masks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    images = np.empty((n, 1, size, size), np.float32)
    masks = np.zeros((n, size, size), np.float32)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        py, px = rng.uniform(0, 2 * np.pi, 2)
        base = 0.4 + 0.08 * np.sin(x / 3.0 + px) + 0.05 * np.cos(y / 4.0 + py)
        image = base + rng.normal(0, 0.02, (size, size))
        if i % 2:
            radius = size / 8
            cy, cx = rng.uniform(radius + 1, size - radius - 1, 2)
            disc = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
            image[disc] = 0.95
            masks[i], labels[i] = disc, 1
        images[i, 0] = np.clip(image, 0, 1)
    return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(masks)


def train_steps(model: CAMSegmenter, batch: dict[str, torch.Tensor], steps: int) -> list[float]:
    model.setup_training(len(batch["image"]))
    return [model.training_step(batch)["loss"] for _ in range(steps)]


def train_blobs(method: str) -> tuple[CAMSegmenter, list[float]]:
    """40 steps of 16 random images out of 32 (augmented) at 64 px: about 4 s on one core."""
    torch.manual_seed(0)
    images, labels, _ = blobs(32, seed=0, size=LOCALISE)
    model = CAMSegmenter(CAMConfig(lr=3e-3, width=8, cam_method=method), image_size=LOCALISE)
    model.setup_training(len(images))
    losses = []
    for _ in range(40):
        index = torch.randperm(len(images))[:16]
        losses.append(model.training_step({"image": images[index], "label": labels[index]})["loss"])
    model.is_fitted = True  # trained by hand, step by step
    return model, losses


@pytest.fixture(scope="module")
def trained() -> tuple[CAMSegmenter, list[float]]:
    return train_blobs("layercam")


def test_registered_as_segmenter() -> None:
    entry = {e.name: e for e in registry.available()}["cam"]
    assert entry.family == "segmenter" and entry.cls is CAMSegmenter
    assert CAMSegmenter.trains_on_defects


@pytest.mark.parametrize("encoder", ["plain", "lite0"])
def test_shapes_and_range(encoder: str) -> None:
    model = CAMSegmenter(CAMConfig(encoder=encoder, width=8), image_size=SIZE, channels=1)
    model.is_fitted = True  # shapes and ranges need no training
    with torch.no_grad():  # Grad-CAM re-enables autograd itself
        out = model.predict(torch.rand(3, 1, SIZE, SIZE))
    assert out.scores.shape == (3,) and out.maps.shape == (3, SIZE, SIZE)
    assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
    assert ((out.scores > 0) & (out.scores < 1)).all()
    assert not out.maps.requires_grad


@pytest.mark.parametrize("encoder", ["plain", "lite0"])
def test_default_stages_are_the_encoders_stride_16_and_8_ones(encoder: str) -> None:
    """Lite0's deepest stage has stride 32, the plain encoder's 16: the default is by stride."""
    model = CAMSegmenter(CAMConfig(encoder=encoder, width=8), image_size=SIZE, channels=1)
    strides = model.net.encoder.strides
    assert sorted(strides[i] for i in model.config.cam_layers) == [8, 16]
    explicit = CAMConfig(encoder=encoder, cam_layers=(-1,))
    assert explicit.cam_layers == (-1,)


def check_learned(model: CAMSegmenter, losses: list[float], ratio: float) -> None:
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    images, labels, masks = blobs(16, seed=1, size=LOCALISE)
    with torch.no_grad():
        out = model.predict(images)
    assert auroc(labels.numpy(), out.scores.numpy()) > 0.8
    defect = labels == 1
    maps, inside = out.maps[defect], masks[defect] > 0
    assert maps[inside].mean() > ratio * maps[~inside].mean()
    # probability scaling: normal images get lower maps than defective ones
    assert out.maps[~defect].amax(dim=(1, 2)).mean() < out.maps[defect].amax(dim=(1, 2)).mean()


def test_learns_from_labels_and_localises(trained) -> None:
    check_learned(*trained, ratio=2.5)


def test_gradcam_localises_too() -> None:
    check_learned(*train_blobs("gradcam"), ratio=1.2)


def test_minmax_maps_peak_at_one(trained) -> None:
    model, _ = trained
    minmax = CAMSegmenter(CAMConfig(normalize="minmax", **SMALL), image_size=SIZE)
    minmax.load_state_dict(model.state_dict())
    images, _, _ = blobs(4, seed=2)
    maps = minmax.predict(images).maps
    peaks = maps.amax(dim=(1, 2))
    assert torch.allclose(peaks[peaks > 0], torch.ones_like(peaks[peaks > 0]))


def test_masks_do_not_influence_training() -> None:
    images, labels, masks = blobs(8, seed=3)
    runs = []
    for mask in (masks, torch.zeros_like(masks), torch.rand_like(masks)):
        torch.manual_seed(5)
        model = CAMSegmenter(CAMConfig(width=8), image_size=SIZE)  # augmentation on
        runs.append(train_steps(model, {"image": images, "label": labels, "mask": mask}, 3))
    assert runs[0] == runs[1] == runs[2]


def test_guided_refinement_keeps_shape_and_range(trained) -> None:
    model, _ = trained
    refined = CAMSegmenter(CAMConfig(refine="guided", guide_radius=2, **SMALL), image_size=SIZE)
    refined.load_state_dict(model.state_dict())
    images, _, _ = blobs(4, seed=4)
    out = refined.predict(images)
    assert out.maps.shape == (4, SIZE, SIZE)
    assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
    # a constant map stays constant; a step edge in the guide is preserved
    guide = torch.zeros(1, 1, 16, 16)
    guide[..., 8:] = 1.0
    flat = guided_filter(guide, torch.full_like(guide, 0.3), 2, 1e-2)
    assert torch.allclose(flat, torch.full_like(guide, 0.3), atol=1e-5)
    edge = guided_filter(guide, guide.clone(), 2, 1e-4)
    assert float(edge[..., :7].max()) < 0.05 and float(edge[..., 9:].min()) > 0.95


def test_state_round_trip(trained) -> None:
    model, _ = trained
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    copy = CAMSegmenter(CAMConfig(**SMALL), image_size=SIZE)
    copy.load_state_dict(state)
    images, _, _ = blobs(4, seed=6)
    a, b = model.predict(images), copy.predict(images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cam_layers", (5,)),
        ("cam_layers", (-1, 4)),
        ("cam_layers", ()),
        ("normalize", "sigmoid"),
        ("cam_method", "scorecam"),
        ("refine", "crf"),
        ("encoder", "resnet"),
        ("guide_radius", 0),
        ("guide_eps", 0.0),
        ("lr", -1.0),
        ("peak_fraction", 1.0),
        ("peak_fraction", -0.1),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        CAMConfig(**{field: value})


def test_peak_fraction_needs_minmax_maps() -> None:
    with pytest.raises(ValueError, match=r"peak_fraction.*minmax"):
        CAMConfig(peak_fraction=0.2)


def test_peak_fraction_fixes_the_thresholds(trained) -> None:
    """CAM's rule: the mask is the region at or above 20% of each map's own peak."""
    model, _ = trained
    assert model.decision_thresholds is None  # default: the API calibrates on normal pixels
    rule = CAMSegmenter(
        CAMConfig(normalize="minmax", peak_fraction=0.2, **SMALL), image_size=LOCALISE
    )
    rule.load_state_dict(model.state_dict())
    assert rule.decision_thresholds == (0.5, 0.2)
    images, _, _ = blobs(4, seed=3, size=LOCALISE)
    maps = rule.predict(images).maps
    peaks = maps.amax(dim=(1, 2), keepdim=True)
    assert torch.equal(maps >= 0.2, maps >= 0.2 * peaks)


def test_bad_image_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="image_size"):
        CAMSegmenter(CAMConfig(), image_size=40)


def test_one_class_training_is_refused() -> None:
    images, _, _ = blobs(4, seed=7)
    model = CAMSegmenter(CAMConfig(**SMALL), image_size=SIZE)
    train_steps(model, {"image": images, "label": torch.zeros(4, dtype=torch.long)}, 1)
    with pytest.raises(ConfigError, match="defects_per_class"):
        model.end_epoch(0)


def test_api_refuses_a_split_without_defects(folder_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="defects_per_class"):
        dl.train("cam", folder_root, tmp_path / "run", image_size=32, progress=False)


def train_k_shot(folder_root: Path, run_dir: Path, *overrides: str) -> dl.TrainedRun:
    """A tiny CAM run through the API on 3 labelled defects per type."""
    return dl.train(
        "cam",
        folder_root,
        run_dir,
        image_size=32,
        device="cpu",
        progress=False,
        overrides=["data.defects_per_class=3", "model.width=8", *overrides],
    )


def test_api_train_and_evaluate_k_shot(folder_root: Path, tmp_path: Path) -> None:
    run = train_k_shot(folder_root, tmp_path / "run", "model.epochs=2")
    assert run.config.model == "cam"
    metrics = dl.evaluate(run.run_dir, folder_root, tmp_path / "eval", progress=False)
    assert metrics["n_defect"] == 3 and metrics["image_auroc"] is not None
    assert metrics["dice"] is not None and (tmp_path / "eval" / "report.html").exists()


def test_api_uses_the_peak_fraction_rule(folder_root: Path, tmp_path: Path) -> None:
    run = train_k_shot(
        folder_root,
        tmp_path / "run",
        "model.epochs=1",
        "model.normalize=minmax",
        "model.peak_fraction=0.25",
    )
    assert run.calibration["method"] == "model"
    assert (run.image_threshold, run.pixel_threshold) == (0.5, 0.25)


def test_training_state_restores_class_counts() -> None:
    images, labels, _ = blobs(4, seed=8)
    model = CAMSegmenter(CAMConfig(**SMALL), image_size=SIZE)
    train_steps(model, {"image": images, "label": labels}, 2)
    state = model.training_state()
    assert state["label_counts"] == [4, 4]
    resumed = CAMSegmenter(CAMConfig(**SMALL), image_size=SIZE)
    resumed.setup_training(4)
    resumed.load_training_state(state)
    assert resumed.training_state()["label_counts"] == [4, 4]
    resumed.end_epoch(0)  # both classes seen: no error
