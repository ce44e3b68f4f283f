"""Synthetic-defect detectors (synth-unet, synth-unet3plus): learning from normal images only,
reproducible painting, curriculum, resume, config."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import defectlab.api as dl
from defectlab import registry
from defectlab.detect.synthseg import SynthSegConfig, SynthUNet, SynthUNet3Plus, paint_defects
from defectlab.errors import ConfigError
from defectlab.evaluate.metrics import auroc, pixel_auroc
from defectlab.synth.procedural import ProceduralConfig, ProceduralSynthesizer
from defectlab.training import fit
from tests.conftest import textured as conftest_textured
from tests.conftest import write_image

MODELS = {"synth-unet": SynthUNet, "synth-unet3plus": SynthUNet3Plus}
SMALL = {"width": 8, "cat_channels": 8, "roi": "none"}


pytestmark = pytest.mark.usefixtures("one_thread")


def textured(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """(N, H, W, 1) float32 normal surfaces: phase-shifted stripes plus fine noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    images = []
    for _ in range(n):
        py, px = rng.uniform(0, 2 * np.pi, 2)
        base = 0.5 + 0.1 * np.sin(x / 5.0 + px) + 0.05 * np.cos(y / 7.0 + py)
        images.append(np.clip(base + rng.normal(0, 0.02, (size, size)), 0, 1))
    return np.stack(images)[..., None].astype(np.float32)


def as_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[SynthUNet, list[dict]]:
    torch.manual_seed(0)
    model = SynthUNet(SynthSegConfig(epochs=16, lr=3e-3, **SMALL), image_size=64)
    history = fit(
        model,
        textured(32),
        run_dir=tmp_path_factory.mktemp("synth-unet"),
        batch_size=8,
        progress=False,
    )
    return model, history


def test_trained_on_normal_images_it_separates_painted_defects(trained) -> None:
    model, history = trained
    assert len(history) == 64 and {"dice", "bce", "classification"} <= set(history[-1])
    normal = textured(8, seed=5)
    painter = ProceduralSynthesizer(
        ProceduralConfig(size_fraction=(0.1, 0.25), contrast=(0.3, 0.6), roi="none")
    )
    rng = np.random.default_rng(7)
    samples = [painter.synthesize(image, rng) for image in textured(8, seed=6)]
    images = np.concatenate([normal, np.stack([s.image for s in samples])])
    masks = np.concatenate([np.zeros((8, 64, 64)), np.stack([s.mask for s in samples])])
    out = model.predict(as_batch(images))
    assert out.scores.shape == (16,) and out.maps.shape == (16, 64, 64)
    assert auroc([0] * 8 + [1] * 8, out.scores.numpy()) >= 0.95
    assert pixel_auroc(masks, out.maps.numpy()) > 0.85
    assert out.scores[:8].mean() < 0.5 < out.scores[8:].mean()


def test_curriculum_moves_from_easy_to_final_ranges(trained) -> None:
    model, history = trained
    levels = [h["curriculum"] for h in history]
    assert levels[0] == 0.0 and levels[-1] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(levels))
    # 64 steps, curriculum_share 0.6: the final ranges from step ceil(0.6 · 63) on
    assert levels.index(1.0) == 38
    cfg = model.config
    easy, final = cfg.procedural_config(0.0), cfg.procedural_config(1.0)
    assert easy.size_fraction == cfg.easy_size_fraction and easy.contrast == cfg.easy_contrast
    assert final.size_fraction == cfg.size_fraction and final.contrast == cfg.contrast
    half = cfg.procedural_config(0.5)
    assert half.contrast == pytest.approx(
        tuple((a + b) / 2 for a, b in zip(cfg.easy_contrast, cfg.contrast, strict=True))
    )
    flat = SynthSegConfig(curriculum=False, **SMALL)
    assert flat.procedural_config(0.0).size_fraction == flat.size_fraction


def test_painting_is_reproducible_and_easy_defects_are_larger() -> None:
    model = SynthUNet(SynthSegConfig(synth_share=0.5, **SMALL), image_size=64)
    images = as_batch(textured(8, seed=1))
    a_images, a_masks = paint_defects(images, model.config, 3, 0.0)
    b_images, b_masks = paint_defects(images, model.config, 3, 0.0)
    assert torch.equal(a_images, b_images) and torch.equal(a_masks, b_masks)
    c_images, _ = paint_defects(images, model.config, 4, 0.0)
    assert not torch.equal(a_images, c_images)
    painted = a_masks.flatten(1).any(dim=1)
    assert 0 < painted.sum() < 8  # a share of the batch, the rest stays normal
    assert torch.equal(a_images[~painted], images[~painted])
    areas, changes = {}, {}
    for level in (0.0, 1.0):
        pairs = [paint_defects(images, model.config, step, level) for step in range(6)]
        areas[level] = sum(float(m.sum()) for _, m in pairs)
        changes[level] = np.mean(
            [float((p - images)[:, 0].abs()[m > 0].mean()) for p, m in pairs if m.any()]
        )
    assert areas[0.0] > 1.4 * areas[1.0], areas  # diameters (0.12, 0.3) vs (0.04, 0.2)
    assert changes[0.0] > 1.4 * changes[1.0], changes  # contrast (0.4, 0.8) vs (0.15, 0.45)


@pytest.mark.parametrize("name", list(MODELS))
def test_resume_after_interruption_reproduces_the_run(name: str, tmp_path: Path) -> None:
    cls = MODELS[name]
    images = textured(12, size=32)
    config = SynthSegConfig(epochs=2, width=4, cat_channels=4, roi="none")

    def train(run_dir: Path, *, interrupt_at: int = 0, resume: bool = False):
        torch.manual_seed(0 if not resume else 99)
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
    assert resumed.step == reference.step == 6
    for key, value in reference.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key
    batch = as_batch(textured(2, size=32, seed=9))
    assert torch.equal(reference.predict(batch).maps, resumed.predict(batch).maps)


def test_state_round_trip_gives_identical_predictions(trained, tmp_path: Path) -> None:
    model, _ = trained
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(5)
    clone = SynthUNet(SynthSegConfig(**SMALL), image_size=64)
    clone.load_state_dict(torch.load(path, weights_only=True))
    batch = as_batch(textured(3, seed=8))
    a, b = model.predict(batch), clone.predict(batch)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_lite0_encoder_trains_a_step_at_64_px() -> None:
    model = SynthUNet3Plus(SynthSegConfig(encoder="lite0", synth_share=1.0, **SMALL), image_size=64)
    model.setup_training(2)
    losses = model.training_step({"image": as_batch(textured(2, seed=3))})
    assert np.isfinite(losses["loss"]) and model.step == 1
    model.is_fitted = True  # one step is enough to check the output shape
    assert model.predict(as_batch(textured(1))).maps.shape == (1, 64, 64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"synth_share": 0.0}, "synth_share must be in"),
        ({"curriculum_share": 1.5}, "curriculum_share must be in"),
        ({"easy_contrast": (0.5, 1.5)}, r"easy_contrast must lie in"),
        ({"size_fraction": (0.3, 0.1)}, "size_fraction: low 0.3 is above high 0.1"),
        ({"size_fraction": (0.1,)}, r"size_fraction must be a \(low, high\) pair"),
        ({"shapes": ("triangle",)}, "unknown shapes"),
        ({"roi": "box"}, "roi must be"),
        ({"encoder": "resnet"}, "encoder must be one of plain, lite0"),
        ({"loss": "l2"}, "loss must be one of dice_bce, dice_focal"),
    ],
)
def test_bad_config_is_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SynthSegConfig(**kwargs)


def test_image_size_must_suit_the_encoder_stride() -> None:
    for cls in MODELS.values():
        with pytest.raises(ValueError, match=r"image_size 72 .*multiple of 16"):
            cls(SynthSegConfig(**SMALL), image_size=72)
        with pytest.raises(ValueError, match=r"image_size 80 .*multiple of 32"):
            cls(SynthSegConfig(encoder="lite0", **SMALL), image_size=80)


def test_registered_as_detectors() -> None:
    for name, cls in MODELS.items():
        assert registry.get(name, "detector") is cls and cls.description


def test_trainable_through_the_api_with_command_line_overrides(tmp_path: Path) -> None:
    """Tuple settings parse from strings; checkpoints survive the weights_only reader."""
    rng = np.random.default_rng(0)
    for i in range(12):
        write_image(tmp_path / "data" / "good" / f"{i}.png", conftest_textured(rng, 32))
    run = dl.train(
        "synth-unet",
        tmp_path / "data",
        tmp_path / "run",
        image_size=32,
        device="cpu",
        overrides=[
            "epochs=1",
            "width=4",
            "size_fraction=0.1,0.3",
            "shapes=bezier_blob,scratch",
            "tta=true",
        ],
        progress=False,
    )
    loaded = dl.load_run(tmp_path / "run", device="cpu")
    assert loaded.model.config.size_fraction == (0.1, 0.3)
    assert loaded.model.config.shapes == ("bezier_blob", "scratch")
    batch = torch.from_numpy(conftest_textured(rng, 32)[None, None] / np.float32(255))
    assert torch.equal(run.model.predict(batch).maps, loaded.model.predict(batch).maps)
    with pytest.raises(ConfigError, match="image_size 40 is not a multiple of 16"):
        dl.train("synth-unet", tmp_path / "data", tmp_path / "bad", image_size=40, progress=False)
