"""MaskGAN: object rule and boundary loss, networks, exact composition, training
protocol, state, sampling, mask realism and the command-line round trip.

Everything runs at 32 px with width 8 on one thread so the suite stays light on a CPU.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from defectlab import api
from defectlab.base import Scorer
from defectlab.cli import main
from defectlab.errors import ConfigError, TrainingError
from defectlab.evaluate.synthesis import mask_realism
from defectlab.runs import load_checkpoint, save_checkpoint
from defectlab.synth.maskgan import (
    MaskGAN,
    MaskGANConfig,
    ObjectRule,
    binarize_mask,
    boundary_loss,
    mode_seeking_loss,
    object_region,
)
from defectlab.training import fit
from tests.conftest import textured, with_defect, write_image
from tests.synth.gan_checks import (
    assert_resume_reproduces_the_uninterrupted_run,
    assert_sample_grids,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
TINY = {"width": 8, "mask_blocks": 1, "image_blocks": 1, "disc_layers": 2, "object_margin": 2}


def make(channels: int = 1, seed: int | None = 0, **overrides: object) -> MaskGAN:
    """A tiny model; weights come from torch's global generator, seeded here (the API seeds
    it before building a model). Marked fitted: these tests check the mechanics of
    synthesis at the initial weights."""
    if seed is not None:
        torch.manual_seed(seed)
    model = MaskGAN(MaskGANConfig(**{**TINY, **overrides}), image_size=SIZE, channels=channels)
    model.is_fitted = True
    return model


def parts(
    n_normal: int, n_defect: int, channels: int = 1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A bright striped part (rows/columns 6–25) on a dark background; defect images carry a
    dark blob on the part. Images (N, H, W, C) float32 and masks (N, H, W) float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images, masks = [], []
    for i in range(n_normal + n_defect):
        grey = np.full((SIZE, SIZE), 0.1) + rng.normal(0, 0.01, (SIZE, SIZE))
        grey[6:26, 6:26] = 0.65 + 0.08 * np.sin(xx[6:26, 6:26] / 2.0 + i)
        mask = np.zeros((SIZE, SIZE), np.float32)
        if i >= n_normal:
            cy, cx = rng.integers(11, 21, 2)
            mask[(yy - cy) ** 2 / 9 + (xx - cx) ** 2 / 25 <= 1] = 1
            grey[mask > 0] = 0.25
        images.append(np.repeat(np.clip(grey, 0, 1)[:, :, None], channels, axis=2))
        masks.append(mask)
    return np.stack(images).astype(np.float32), np.stack(masks)


def batch_of(
    n_normal: int, n_defect: int, channels: int = 1, classes: list[int] | None = None
) -> dict[str, torch.Tensor]:
    images, masks = parts(n_normal, n_defect, channels)
    batch = {
        "image": torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
        "mask": torch.from_numpy(masks),
        "label": torch.tensor([0] * n_normal + [1] * n_defect),
    }
    if classes is not None:
        batch["defect_class"] = torch.tensor([-1.0] * n_normal + [float(c) for c in classes])
    return batch


def trained(channels: int = 1, steps: int = 2, **overrides: object) -> MaskGAN:
    model = make(channels, **overrides)
    torch.manual_seed(0)
    batch = batch_of(2, 2, channels)
    for _ in range(steps):
        model.training_step(batch)
    model.is_fitted = True  # trained by hand, step by step, not through fit()
    return model


def fit_tiny(
    model: MaskGAN, run_dir: Path, resume: bool = False, checkpoint_every: int = 100
) -> list[dict]:
    images, masks = parts(4, 2)
    return fit(
        model,
        images,
        masks=masks,
        labels=np.array([0, 0, 0, 0, 1, 1]),
        run_dir=run_dir,
        batch_size=2,
        seed=0,
        resume=resume,
        progress=False,
        checkpoint_every=checkpoint_every,
    )


# --- object region, boundary loss, mask rule ------------------------------------------------


def test_object_region_rules() -> None:
    image = parts(1, 0)[0][0]
    square = np.zeros((SIZE, SIZE), bool)
    square[6:26, 6:26] = True
    np.testing.assert_array_equal(object_region(image, ObjectRule(margin=0)), square)  # auto
    np.testing.assert_array_equal(object_region(image, ObjectRule("otsu", margin=0)), square)
    fixed = ObjectRule("fixed", threshold=0.3, margin=0)
    np.testing.assert_array_equal(object_region(image, fixed), square)
    dark = ObjectRule("fixed", threshold=0.3, polarity="dark", margin=0)
    np.testing.assert_array_equal(object_region(image, dark), ~square)
    # a texture that fills the frame has no clear object: the frame minus its margin
    texture = np.clip(np.random.default_rng(0).normal(0.5, 0.1, (SIZE, SIZE)), 0, 1)
    region = object_region(texture, ObjectRule(margin=3))
    assert region[3:-3, 3:-3].all() and region.sum() == (SIZE - 6) ** 2
    assert object_region(np.full((SIZE, SIZE), 0.5), ObjectRule(margin=0)).all()


def test_boundary_loss_is_zero_inside_the_object_and_positive_outside() -> None:
    model = make()
    images = torch.from_numpy(parts(1, 0)[0].transpose(0, 3, 1, 2).copy()) * 2 - 1
    regions = model.object_regions(images)
    assert regions.shape == (1, 1, SIZE, SIZE) and regions[0, 0, 6:26, 6:26].all()
    inside = torch.zeros(1, 1, SIZE, SIZE)
    inside[..., 10:20, 10:20] = 1.0
    assert boundary_loss(inside, regions).item() == 0.0
    outside = torch.zeros(1, 1, SIZE, SIZE)
    outside[..., 0:4, 0:8] = 0.5  # 32 px of mass 0.5 on the background
    assert boundary_loss(outside, regions).item() == pytest.approx(16 / 17)  # mass 16 (+1)
    assert boundary_loss(inside + outside, regions).item() == pytest.approx(16 / 117)


def test_binarize_mask_threshold_and_small_components() -> None:
    soft = np.zeros((SIZE, SIZE), np.float32)
    soft[4:10, 4:10] = 0.8  # 36 px: kept
    soft[20:22, 20:22] = 0.9  # 4 px: removed
    soft[12:20, 12:20] = 0.4  # below the threshold
    mask = binarize_mask(soft, 0.5, 8)
    assert mask.sum() == 36 and mask[4:10, 4:10].all()
    assert binarize_mask(soft, 0.3, 1).sum() == 36 + 4 + 64


# --- networks --------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_network_shapes(channels: int) -> None:
    model = make(channels, n_masks=2)
    images = torch.rand(2, channels, SIZE, SIZE) * 2 - 1
    masks = model.generate_masks(images, model.noise(2))
    assert masks.shape == (2, 2, SIZE, SIZE) and masks.min() >= 0 and masks.max() <= 1
    foreground = model.paint(images, masks[:, :1])
    assert foreground.shape == images.shape and foreground.abs().max() <= 1
    generator = model.nets["defect_generator"]
    assert len(generator.modulation) == 2  # the two mask-conditioned modulation blocks
    assert hasattr(generator, "defect_focus")
    maps = model.nets["defect_region_discriminator"](torch.zeros(2, channels + 1, SIZE, SIZE))
    assert [m.shape[-1] for m in maps] == [8, 4, 2]
    assert len(model.nets) == 6 and set(model.parameter_counts()) == set(model.nets)


def test_foreground_depends_on_the_mask() -> None:
    model = make()
    images = torch.from_numpy(parts(1, 0)[0].transpose(0, 3, 1, 2).copy()) * 2 - 1
    a, b = torch.zeros(1, 1, SIZE, SIZE), torch.zeros(1, 1, SIZE, SIZE)
    a[..., 8:14, 8:14] = 1
    b[..., 16:24, 12:20] = 1
    assert not torch.allclose(model.paint(images, a), model.paint(images, b))


def test_default_architecture_at_128_px() -> None:
    model = MaskGAN(MaskGANConfig(), image_size=128)
    counts = model.parameter_counts()
    print("maskgan parameters (128 px, width 32):", counts, sum(counts.values()))
    maps = model.nets["image_discriminator"](torch.zeros(1, 1, 128, 128))
    assert [128 // m.shape[-1] for m in maps] == [16, 32, 64]


# --- sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (SIZE, SIZE, 3), (40, 56, 1)])
def test_pixels_outside_the_mask_are_bit_identical(shape: tuple[int, ...]) -> None:
    channels = shape[2] if len(shape) == 3 else 1
    model = trained(channels, mask_threshold=0.55)
    rng = np.random.default_rng(0)
    image = rng.random(shape, dtype=np.float32)
    changed = 0
    for seed in range(3):
        sample = model.synthesize(image, np.random.default_rng(seed))
        assert sample.image.shape == image.shape and sample.mask.shape == shape[:2]
        assert 0 < sample.record["mask_area"] == int(sample.mask.sum()) < sample.mask.size
        assert np.array_equal(sample.image[~sample.mask], image[~sample.mask])  # bit for bit
        changed += int((sample.image[sample.mask] != image[sample.mask]).sum())
    assert changed > 0  # the defect is painted inside
    assert sample.record["resized"] == (shape[:2] != (SIZE, SIZE))


def test_different_noise_gives_different_masks() -> None:
    model = trained()
    image = torch.from_numpy(parts(1, 0)[0].transpose(0, 3, 1, 2).copy()) * 2 - 1
    a = model.generate_masks(image, model.noise(1, seed=1))[0, 0].detach().numpy()
    b = model.generate_masks(image, model.noise(1, seed=2))[0, 0].detach().numpy()
    again = model.generate_masks(image, model.noise(1, seed=1))[0, 0].detach().numpy()
    np.testing.assert_array_equal(a, again)  # the noise seed reproduces the mask
    assert np.abs(a - b).max() > 1e-3
    level = float(np.median(a))
    assert not np.array_equal(binarize_mask(a, level, 1), binarize_mask(b, level, 1))
    source = parts(1, 0)[0][0]
    model.configure_synthesis({"mask_threshold": f"{level:.4f}"})
    first = model.synthesize(source, np.random.default_rng(1))
    second = model.synthesize(source, np.random.default_rng(2))
    assert first.record["noise_seed"] != second.record["noise_seed"]
    assert not np.array_equal(first.mask, second.mask)


def test_mode_seeking_loss_penalises_one_mask_for_all_noise() -> None:
    z, z_other = torch.zeros(2, 8, 4, 4), torch.ones(2, 8, 4, 4)
    masks = torch.rand(2, 1, 16, 16)
    collapsed = mode_seeking_loss(masks, masks, z, z_other, eps=0.01)
    assert collapsed.item() == pytest.approx(100.0)  # bounded by 1 / eps
    varied = mode_seeking_loss(masks, 1 - masks, z, z_other, eps=0.01)
    expected = 1 / ((masks - (1 - masks)).abs().mean().item() / 1.0 + 0.01)
    assert varied.item() == pytest.approx(expected, rel=1e-5)
    assert varied < collapsed


def mask_spread(model: MaskGAN) -> float:
    """Mean |m(z) − m(z')| over pairs of 4 noise draws for the same 4 images."""
    images = torch.from_numpy(parts(4, 0)[0].transpose(0, 3, 1, 2).copy()) * 2 - 1
    with torch.no_grad():
        masks = [model.generate_masks(images, model.noise(4, seed=s)) for s in range(4)]
    return float(
        np.mean([(masks[i] - masks[j]).abs().mean() for i in range(4) for j in range(i + 1, 4)])
    )


def test_mode_seeking_keeps_masks_different_across_noise() -> None:
    """Without the term the tiny overfit run collapses to one mask for all noise (spread about
    0.005); with the default weight the masks stay apart."""
    spreads = {}
    default = MaskGANConfig().diversity_weight
    for weight in (0.0, default):
        model = make(lr=1e-3, diversity_weight=weight)
        batch = batch_of(2, 2)
        for _ in range(40):
            model.training_step(batch)
        spreads[weight] = mask_spread(model)
    assert spreads[default] > 10 * spreads[0.0], spreads


def test_diversity_term_is_trained_and_can_be_switched_off() -> None:
    torch.manual_seed(0)
    on = make().training_step(batch_of(2, 2))
    assert on["mode_seeking"] > 0
    torch.manual_seed(0)
    off = make(diversity_weight=0.0).training_step(batch_of(2, 2))
    assert off["mode_seeking"] == 0.0
    # the generator loss carries the term only when it is on
    assert on["g1_total"] > off["g1_total"]


def test_sample_record_and_empty_masks() -> None:
    model = trained()
    source = parts(1, 0)[0][0]
    model.configure_synthesis({"mask_threshold": "0.3", "object_rule": "otsu"})
    record = model.synthesize(source, np.random.default_rng(0)).record
    assert record["method"] == "maskgan" and record["defect_type"] == "any"
    assert record["mask_attempts"] == 1 and record["mask_rule"] == "soft>=0.3 min_area=8"
    assert 0 <= record["outside_object"] <= 1 and record["object_rule"].startswith("otsu")
    model.configure_synthesis({"mask_threshold": "0.999", "mask_attempts": "3"})
    with pytest.warns(UserWarning, match="empty mask after 3 noise draws"):
        sample = model.synthesize(source, np.random.default_rng(0))
    assert sample.record["mask_area"] == 0 and sample.record["mask_attempts"] == 3
    np.testing.assert_array_equal(sample.image, source)


def test_synthesis_settings_can_change_after_training() -> None:
    model = trained()
    model.configure_synthesis({"mask_min_area": "4", "object_rule": "frame"})
    assert model.config.mask_min_area == 4 and model.config.object_rule == "frame"
    with pytest.raises(ConfigError, match="width cannot change after training"):
        model.configure_synthesis({"width": "16"})
    with pytest.raises(ConfigError, match="mask_threshold"):
        model.configure_synthesis({"mask_threshold": "1.5"})


@pytest.mark.parametrize("channels", [1, 3])
def test_state_round_trip_gives_identical_samples(tmp_path: Path, channels: int) -> None:
    model = trained(channels, mask_threshold=0.3)
    save_checkpoint(tmp_path / "model.pt", model)
    loaded = make(channels, seed=9, mask_threshold=0.3)
    loaded.load_state_dict(load_checkpoint(tmp_path / "model.pt")["state"])  # weights_only
    loaded.is_fitted = True  # the state alone; load_run restores the flag
    source = parts(1, 0, channels, seed=5)[0][0]
    a = list(model.generate([source], 3, seed=4))
    b = list(loaded.generate([source], 3, seed=4))
    for (_, x), (_, y) in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.mask, y.mask)
        assert x.record == y.record


# --- training --------------------------------------------------------------------------------


def test_overfit_lowers_both_stages_losses() -> None:
    model = make(lr=1e-3)
    torch.manual_seed(0)
    batch = batch_of(2, 2)
    history = [model.training_step(batch) for _ in range(40)]
    # adversarial totals oscillate once the discriminators react: the last 10 steps' mean
    # against the first 3 steps'
    for key in ("g1_total", "boundary", "g2_total", "recon"):
        values = [h[key] for h in history]
        assert np.mean(values[-10:]) < 0.75 * np.mean(values[:3]), (key, values)


def test_stages_train_separately() -> None:
    batch = batch_of(2, 2)
    for stage, frozen, keys in [
        ("mask", "defect_generator", {"boundary", "d1_region", "d1_image"}),
        ("image", "mask_generator", {"recon", "d2_image", "d2_region"}),
    ]:
        model = make(stage=stage)
        before = {k: v.clone() for k, v in model.nets[frozen].state_dict().items()}
        losses = model.training_step(batch)
        assert keys <= set(losses)
        assert not ({"boundary", "recon"} - keys) & set(losses)
        for key, value in model.nets[frozen].state_dict().items():
            assert torch.equal(value, before[key]), key


def test_pairing_skips_batches_without_a_defect_mask() -> None:
    model = make(buffer_size=3)
    torch.manual_seed(0)
    batch = batch_of(2, 1)
    no_mask = {**batch, "mask": torch.zeros_like(batch["mask"])}
    assert model.training_step(no_mask) == {}  # the defect has no mask: nothing to learn
    assert "defect" not in model.buffers and len(model.buffers["normal"]["image"]) == 2
    assert "recon" in model.training_step(batch)
    normals = {k: v[:2] for k, v in batch.items()}  # topped up from the defect buffer
    assert "recon" in model.training_step(normals)
    assert len(model.buffers["normal"]["image"]) == 3


def test_defects_without_masks_stop_training(tmp_path: Path) -> None:
    images, _ = parts(4, 2)
    with pytest.raises(TrainingError, match="no defect training image with a non-empty mask"):
        fit(
            make(epochs=1),
            images,
            labels=np.array([0, 0, 0, 0, 1, 1]),
            run_dir=tmp_path,
            batch_size=2,
            progress=False,
        )


def test_same_seed_same_losses(tmp_path: Path) -> None:
    first = fit_tiny(make(epochs=1), tmp_path / "a")
    assert first == fit_tiny(make(epochs=1), tmp_path / "b")
    assert any("recon" in row and "boundary" in row for row in first)


def test_resume_reproduces_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # stopped mid-epoch 2
    assert_resume_reproduces_the_uninterrupted_run(make, fit_tiny, tmp_path, monkeypatch, 4)


def test_nan_loss_stops_with_a_clear_message(tmp_path: Path) -> None:
    model = make(epochs=1)
    with torch.no_grad():
        model.nets["defect_generator"].defect_focus.to_foreground[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"maskgan: non-finite loss .*recon.*epoch 1"):
        fit_tiny(model, tmp_path / "run")


def test_discriminator_collapse_stops_training() -> None:
    model = make(collapse_threshold=100.0, collapse_patience=2)
    batch = batch_of(2, 2)
    model.training_step(batch)
    with pytest.raises(TrainingError, match=r"region_discriminator collapsed.*2 consecutive"):
        model.training_step(batch)


def test_sample_grids(tmp_path: Path) -> None:
    # per pair a generated and a real row; columns image, mask, defect image
    model = make(sample_every=2, sample_dir=str(tmp_path / "grids"))
    assert_sample_grids(model, batch_of(2, 2), tmp_path / "grids", SIZE)


def test_class_conditioning() -> None:
    classes = ("crack", "spot")
    model = make(class_conditional=True, defect_classes=classes, mask_threshold=0.3)
    assert model.nets["region_discriminator"].scales[0].net[0].in_channels == 1 + 2
    losses = model.training_step(batch_of(2, 2, classes=[0, 1]))
    assert "recon" in losses
    with pytest.raises(TrainingError, match="defect_class"):
        model.training_step(batch_of(2, 2))
    with pytest.raises(TrainingError, match="outside the 2 defect_classes"):
        model.training_step(batch_of(2, 2, classes=[0, 2]))
    source = parts(1, 0)[0][0]
    picked = {
        model.synthesize(source, np.random.default_rng(s)).record["defect_type"] for s in range(8)
    }
    assert picked == set(classes)
    model.configure_synthesis({"defect_class": "spot"})
    assert model.synthesize(source, np.random.default_rng(0)).record["defect_type"] == "spot"
    with pytest.raises(ConfigError, match="defect_class 'hole'"):
        model.configure_synthesis({"defect_class": "hole"})
    with pytest.raises(ValueError, match="class_conditional needs defect_classes"):
        make(class_conditional=True)


def test_refusals() -> None:
    model = make()
    assert not isinstance(model, Scorer) and not hasattr(model, "predict")
    with pytest.raises(ConfigError, match="takes no --defects"):
        model.use_defect_examples([np.zeros((SIZE, SIZE, 1), np.float32)])
    with pytest.raises(ConfigError, match="1-channel"):
        model.synthesize(np.zeros((SIZE, SIZE, 3), np.float32), np.random.default_rng(0))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 0),
        ("noise_channels", 0),
        ("n_masks", 0),
        ("stage", "both"),
        ("gan_loss", "wgan"),
        ("object_rule", "edges"),
        ("object_polarity", "grey"),
        ("mask_threshold", 1.0),
        ("boundary_weight", -1.0),
        ("recon_weight", -1.0),
        ("mask_attempts", 0),
        ("beta1", 1.0),
        ("lr", 0.0),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        MaskGANConfig(**{field: value})


@pytest.mark.parametrize("size", [30, 16])
def test_bad_image_size(size: int) -> None:
    with pytest.raises(ValueError, match="image_size"):
        MaskGAN(MaskGANConfig(**TINY), image_size=size)


# --- mask realism ----------------------------------------------------------------------------


def test_mask_realism_on_hand_made_masks() -> None:
    def bar(length: int, top: int = 10) -> np.ndarray:
        mask = np.zeros((40, 40), bool)
        mask[top : top + 4, 5 : 5 + length] = True
        return mask

    real = [bar(20), bar(20)]  # 4 × 20: area 80/1600, elongation 5, one component
    same = mask_realism(real, [bar(20, top=20)])
    assert same["real"]["area_fraction"]["mean"] == pytest.approx(0.05)
    assert same["real"]["elongation"]["mean"] == pytest.approx(5.0)
    for key in ("area_fraction", "elongation", "n_components"):
        assert same["distance"][key]["w1"] == pytest.approx(0.0)
    two = bar(8) | bar(8, top=30)  # two 4 × 8 bars
    other = mask_realism(real, [two, bar(20)], regions=np.ones((40, 40), bool))
    assert other["fake"]["n_components"]["mean"] == pytest.approx(1.5)
    assert other["distance"]["n_components"]["w1"] == pytest.approx(0.5)
    assert other["distance"]["area_fraction"]["w1"] == pytest.approx((80 - 64) / 1600 / 2)
    assert other["outside_object"]["pixel_share"] == 0.0
    region = np.zeros((40, 40), bool)
    region[:, :15] = True  # the first 10 of each 20-px bar lie inside
    outside = mask_realism(real, [bar(20), bar(8)], regions=region)["outside_object"]
    assert outside["pixel_share"] == pytest.approx(40 / (80 + 32))
    assert outside["mean_per_mask"] == pytest.approx(0.25)
    assert outside["masks_touching_outside"] == pytest.approx(0.5)


# --- through the command line and the API ----------------------------------------------------


def test_train_and_synth_from_the_command_line(
    folder_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models"]) == 0
    assert any(line.startswith("maskgan ") for line in capsys.readouterr().out.splitlines())
    run = tmp_path / "run"
    settings = [
        "data.defects_per_class=2",
        "epochs=1",
        "train.batch_size=8",
        "stage=mask",
        *(f"model.{k}={v}" for k, v in TINY.items()),
    ]
    code = main(
        ["train", "--model", "maskgan", "--data", str(folder_root), "--out", str(run)]
        + ["--image-size", str(SIZE)]
        + [arg for setting in settings for arg in ("--set", setting)]
    )
    assert code == 0
    first = api.load_run(run)
    assert first.model.config.defect_classes == ("defect",)  # filled from the training split

    # stage 2 alone, starting from the stage-1 run
    second = api.train(
        "maskgan",
        folder_root,
        tmp_path / "run2",
        image_size=SIZE,
        overrides=[*settings[:3], "stage=image", f"init_from={run}"]
        + [f"{k}={v}" for k, v in TINY.items()],
        progress=False,
    )
    for key, value in first.model.nets["mask_generator"].state_dict().items():
        assert torch.equal(value, second.model.nets["mask_generator"].state_dict()[key])

    out = tmp_path / "synth"
    synth = ["synth", "--method", "maskgan", "--run", str(tmp_path / "run2"), "--n", "3"]
    sampling = ["--set", "mask_threshold=0.55", "--set", "mask_min_area=2"]
    code = main([*synth, "--normal", str(folder_root / "normal"), "--out", str(out), *sampling])
    assert code == 0
    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and {r["method"] for r in rows} == {"maskgan"}
    assert {r["defect_type"] for r in rows} == {"defect"}
    for row in rows:
        image = cv2.imread(str(out / row["image"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / row["mask"]), cv2.IMREAD_UNCHANGED) > 0
        source = cv2.imread(row["source"], cv2.IMREAD_UNCHANGED)
        assert image.shape == mask.shape == source.shape == (48, 48)  # the files' own size
        assert 0 < int(row["mask_area"]) == int(mask.sum()) < mask.size
        np.testing.assert_array_equal(image[~mask], source[~mask])
    with pytest.raises(ConfigError, match="cannot change after training"):
        api.synthesize("maskgan", folder_root, tmp_path / "x", 1, run=run, overrides=["width=16"])


def test_class_conditional_training_on_two_defect_types(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "magnetic-tile"  # MT_<type>/Imgs/X.jpg with X.png masks beside them
    for i in range(10):
        write_image(root / "MT_Free" / "Imgs" / f"n{i:02d}.jpg", textured(rng))
    for kind in ("Crack", "Blowhole"):
        for i in range(3):
            image, mask = with_defect(textured(rng), rng)
            write_image(root / f"MT_{kind}" / "Imgs" / f"{kind}{i}.jpg", image)
            write_image(root / f"MT_{kind}" / "Imgs" / f"{kind}{i}.png", mask)
    settings = ["data.defects_per_class=2", "epochs=1", "train.batch_size=4"]
    run = api.train(
        "maskgan",
        root,
        tmp_path / "run",
        image_size=SIZE,
        overrides=[*settings, "class_conditional=true", *(f"{k}={v}" for k, v in TINY.items())],
        progress=False,
    )
    assert run.model.config.defect_classes == ("Blowhole", "Crack")  # sorted
    assert run.model.config.n_classes == 2
    out = tmp_path / "synth"
    api.synthesize(
        "maskgan",
        root,
        out,
        2,
        run=tmp_path / "run",
        image_size=SIZE,
        overrides=["defect_class=Crack", "mask_threshold=0.55"],
        progress=False,
    )
    with open(out / "manifest.csv", newline="") as handle:
        assert {r["defect_type"] for r in csv.DictReader(handle)} == {"Crack"}
