"""CrossGAN: networks, losses, training protocol, state, masks, API round trip.

Everything runs at 32 px with a tiny width so the suite stays light on a CPU.
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
from defectlab.errors import ConfigError, TrainingError
from defectlab.runs import load_checkpoint, save_checkpoint
from defectlab.synth.crossgan import CrossGAN, CrossGANConfig, kl_divergence
from defectlab.synth.cyclegan import CycleGAN
from defectlab.synth.translation import MaskRule, difference_mask
from defectlab.training import fit
from tests.synth.gan_checks import (
    assert_resume_reproduces_the_uninterrupted_run,
    assert_sample_grids,
)

SIZE = 32
#: the seed's whole-image generators (difference masks); tests/synth/test_localised.py
#: covers the default residual_attention generator
TINY = {"width": 4, "content_blocks": 1, "detail_dim": 4, "disc_layers": 2, "generator": "full"}


def make(channels: int = 1, cls: type = CrossGAN, seed: int | None = 0, **overrides: object):
    """A tiny model; weights are initialised from torch's global generator, seeded here
    (the API seeds it before building a model). Marked fitted: these tests check the
    mechanics of synthesis at the initial weights."""
    if seed is not None:
        torch.manual_seed(seed)
    fields = set(cls.Config.__dataclass_fields__)
    config = cls.Config(**{k: v for k, v in {**TINY, **overrides}.items() if k in fields})
    model = cls(config, image_size=SIZE, channels=channels)
    model.is_fitted = True
    return model


def train_tiny_run(model: str, folder_root: Path, out: Path, *settings: str) -> api.TrainedRun:
    """One epoch of a tiny translator through the API on the folder fixture."""
    overrides = ["data.defects_per_class=2", "model.epochs=1", "train.batch_size=8", *settings]
    return api.train(model, folder_root, out, image_size=SIZE, overrides=overrides, progress=False)


def surfaces(n_normal: int, n_defect: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Striped normal surfaces; defect ones carry a bright disc. (N, H, W, C) float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images = []
    for i in range(n_normal + n_defect):
        grey = 0.4 + 0.1 * np.sin(xx / 3.0 + i) + rng.normal(0, 0.02, (SIZE, SIZE))
        if i >= n_normal:
            cy, cx = rng.integers(8, SIZE - 8, 2)
            grey[(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = 0.95
        images.append(np.repeat(np.clip(grey, 0, 1)[:, :, None], channels, axis=2))
    return np.stack(images).astype(np.float32)


def batch_of(images: np.ndarray, labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "image": torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
        "label": torch.tensor(labels),
        "mask": torch.zeros(len(labels), SIZE, SIZE),
    }


def fit_tiny(
    model, run_dir: Path, seed: int = 0, resume: bool = False, checkpoint_every: int = 100
) -> list[dict]:
    images = surfaces(4, 2)
    labels = np.array([0, 0, 0, 0, 1, 1])
    return fit(
        model,
        images,
        labels=labels,
        run_dir=run_dir,
        batch_size=2,
        seed=seed,
        resume=resume,
        progress=False,
        checkpoint_every=checkpoint_every,
    )


# --- networks --------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_network_shapes(channels: int) -> None:
    model = make(channels)
    w, d = TINY["width"], TINY["detail_dim"]
    images = torch.rand(2, channels, SIZE, SIZE) * 2 - 1
    content = model.content(images)
    assert content.shape == (2, 4 * w, SIZE // 4, SIZE // 4)
    mean, logvar = model.detail(images)
    assert mean.shape == logvar.shape == (2, d)
    assert model.to_defect(content, mean).shape == images.shape
    assert model.to_normal(content).shape == images.shape
    assert model.nets["content_discriminator"](content).shape == (2,)
    for name in ("normal_discriminator", "defect_discriminator"):
        maps = model.nets[name](images)
        assert len(maps) == 3  # three scales, each a patch map of logits
        assert [m.shape[-1] for m in maps] == [8, 4, 2]
    out = model.to_defect(content, mean)
    assert out.min() >= -1 and out.max() <= 1  # Tanh: the image range


def test_seed_architecture_at_default_size() -> None:
    model = CrossGAN(CrossGANConfig(generator="full"), image_size=128, channels=1)
    counts = model.parameter_counts()
    print("crossgan parameters (128 px, width 32):", counts, sum(counts.values()))
    assert set(counts) == {
        "content_encoder",
        "detail_encoder",
        "defect_generator",
        "normal_generator",
        "content_discriminator",
        "normal_discriminator",
        "defect_discriminator",
    }
    content_disc = model.nets["content_discriminator"].net
    convs = [m for m in content_disc if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((5, 5), (2, 2))] * 3 + [((3, 3), (1, 1))]
    maps = model.nets["defect_discriminator"](torch.zeros(1, 1, 128, 128))
    assert [128 // m.shape[-1] for m in maps] == [16, 32, 64]  # the seed's multi-scale strides


@pytest.mark.parametrize("cls", [CrossGAN, CycleGAN])
def test_instance_norm_encoder_is_blind_to_contrast_and_batch_norm_is_not(cls: type) -> None:
    """Why ``encoder_norm`` exists: with instance norm, a grey image at twice the contrast
    gets the same code, so a generator cannot give its output the source's contrast back."""
    images = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 0.5

    def change(norm: str) -> float:
        """Relative change of the code when the images' contrast doubles."""
        model = make(cls=cls, encoder_norm=norm)
        model.nets.eval()
        encoder = model.content if cls is CrossGAN else model.nets["defect_generator"][0]
        with torch.no_grad():
            code, code_at_twice_the_contrast = encoder(images), encoder(2 * images)
        return float((code - code_at_twice_the_contrast).norm() / code.norm())

    assert change("instance") < 0.01  # only the norm's eps tells them apart
    assert change("batch") > 0.03


def test_content_discriminator_receives_content_codes() -> None:
    model = make()
    seen: list[tuple[int, ...]] = []
    hook = model.nets["content_discriminator"].register_forward_hook(
        lambda module, inputs, output: seen.append(tuple(inputs[0].shape))
    )
    torch.manual_seed(0)
    model.training_step(batch_of(surfaces(2, 2), [0, 0, 1, 1]))
    hook.remove()
    code_shape = (2, 4 * TINY["width"], SIZE // 4, SIZE // 4)
    assert seen and all(s == code_shape for s in seen)
    assert len(seen) == 4  # D_c update (normal, defect codes) + encoders' confusion loss


def test_kl_term_is_in_the_loss() -> None:
    assert kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0
    assert kl_divergence(torch.ones(3, 4), torch.zeros(3, 4)).item() == pytest.approx(0.5)
    totals, kls = [], []
    for weight in (0.0, 0.01):
        model = make(kl_weight=weight)
        losses = model.training_step(batch_of(surfaces(2, 2), [0, 1, 0, 1]))
        totals.append(losses["g_total"])
        kls.append(losses["kl"])
    assert kls[0] == kls[1] > 0
    assert totals[1] - totals[0] == pytest.approx(0.01 * kls[0], abs=1e-5)  # float32 sums


# --- training --------------------------------------------------------------------------------


def test_overfit_lowers_cross_cycle_loss() -> None:
    model = make(lr=2e-3, weight_decay=0.0)
    torch.manual_seed(0)
    batch = batch_of(surfaces(2, 2), [0, 0, 1, 1])
    history = [model.training_step(batch)["cross_cycle"] for _ in range(30)]
    assert np.mean(history[-5:]) < 0.75 * np.mean(history[:5]), history


def test_pairing_with_a_rolling_buffer() -> None:
    model = make(buffer_size=3)
    torch.manual_seed(0)
    images = surfaces(4, 2)
    assert model.training_step(batch_of(images[:2], [0, 0])) == {}  # no defect seen yet
    assert model.buffers["normal"].shape[0] == 2
    assert "cross_cycle" in model.training_step(batch_of(images[3:5], [0, 1]))
    # a batch of normal images only is paired with buffered defects
    assert "cross_cycle" in model.training_step(batch_of(images[:3], [0, 0, 0]))
    assert model.buffers["normal"].shape[0] == 3  # rolling: the last buffer_size only
    assert model.buffers["defect"].shape[0] == 1


def test_same_seed_same_losses(tmp_path: Path) -> None:
    first = fit_tiny(make(epochs=1), tmp_path / "a")
    second = fit_tiny(make(epochs=1), tmp_path / "b")
    assert first == second
    assert any("cross_cycle" in row for row in first)


@pytest.mark.parametrize("stop_after", [3, 4])  # at the epoch boundary, and mid-epoch 2
def test_resume_reproduces_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_after: int
) -> None:
    assert_resume_reproduces_the_uninterrupted_run(
        make, fit_tiny, tmp_path, monkeypatch, stop_after
    )


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_lr_step_decay() -> None:
    model = make(lr=1e-3, lr_decay_epochs=2, lr_decay_gamma=0.1)
    model.setup_training(4)
    for epoch in range(3):
        model.end_epoch(epoch)
    lrs = [o.param_groups[0]["lr"] for o in model.optimizers.values()]
    assert lrs == pytest.approx([1e-4] * len(lrs))
    assert len(model.optimizers) == len(model.nets)  # one Adam per network
    adam = model.optimizers["content_encoder"].param_groups[0]
    assert adam["betas"][0] == 0.5 and adam["weight_decay"] == 1e-4


def test_discriminator_collapse_stops_training() -> None:
    model = make(collapse_threshold=100.0, collapse_patience=2)
    torch.manual_seed(0)
    batch = batch_of(surfaces(2, 2), [0, 0, 1, 1])
    model.training_step(batch)
    with pytest.raises(TrainingError, match=r"collapsed.*2 consecutive steps"):
        model.training_step(batch)


def test_sample_grids(tmp_path: Path) -> None:
    # per pair and direction a row; columns input, translation, cross reconstruction
    model = make(sample_every=2, sample_dir=str(tmp_path / "grids"))
    batch = batch_of(surfaces(2, 2), [0, 0, 1, 1])
    assert_sample_grids(model, batch, tmp_path / "grids", SIZE)


# --- state and synthesis ---------------------------------------------------------------------


def trained(channels: int = 1, steps: int = 2, **overrides: object) -> CrossGAN:
    model = make(channels, **overrides)
    torch.manual_seed(0)
    batch = batch_of(surfaces(2, 2, channels), [0, 0, 1, 1])
    for _ in range(steps):
        model.training_step(batch)
    model.is_fitted = True  # trained by hand, step by step, not through fit()
    return model


@pytest.mark.parametrize("channels", [1, 3])
def test_state_round_trip_gives_identical_samples(tmp_path: Path, channels: int) -> None:
    model = trained(channels)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    loaded = make(channels)
    loaded.load_state_dict(load_checkpoint(path)["state"])  # weights_only load
    loaded.is_fitted = True  # the state alone; load_run restores the flag
    source = surfaces(1, 0, channels, seed=5)[0]
    a = model.synthesize(source, np.random.default_rng(3))
    b = loaded.synthesize(source, np.random.default_rng(3))
    assert a.image.shape == source.shape and a.image.dtype == np.float32
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.record == b.record
    c = loaded.synthesize(source, np.random.default_rng(4))
    assert not np.array_equal(a.image, c.image)  # another prior draw, another defect


def reference_mask(generated: np.ndarray, source: np.ndarray, k: float, floor: float):
    """The documented rule, written out independently of synth.translation."""
    diff = np.abs(generated - source).mean(axis=2).astype(np.float32)
    diff = cv2.GaussianBlur(diff, (0, 0), 1.0, borderType=cv2.BORDER_REFLECT)
    threshold = max(diff.mean() + k * diff.std(), floor)
    mask = (diff > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_OPEN, np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)
    )
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    big = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 8]
    return np.isin(labels, big), threshold


def test_mask_is_the_documented_rule_on_the_difference() -> None:
    model = trained(mask_k=1.0)
    source = surfaces(1, 0, seed=5)[0]
    sample = model.synthesize(source, np.random.default_rng(7))
    # the same translation, by hand: the prior code comes from the same rng draw
    generated, _, _ = model.translate(model._to_tensor(source), np.random.default_rng(7))
    image = ((generated[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).detach().numpy()
    np.testing.assert_allclose(sample.image, image, atol=1e-6)
    expected, threshold = reference_mask(image, source, k=1.0, floor=0.02)
    assert expected.any()
    np.testing.assert_array_equal(sample.mask, expected)
    record = sample.record
    assert record["detail"] == "prior" and record["detail_example"] == -1
    assert record["mask_threshold"] == pytest.approx(threshold, abs=1e-5)
    assert record["mask_area"] == int(expected.sum())
    assert record["mask_rule"] == "|g-x|>max(mean+1std,0.02) blur=1 open=1 min_area=8"


def test_difference_mask_fixed_rule_and_small_components() -> None:
    source = np.zeros((32, 32, 1), np.float32)
    generated = source.copy()
    generated[4:12, 4:12] = 0.5  # 64 px blob: kept
    generated[20, 20] = 0.9  # single pixel: removed by opening / min area
    rule = MaskRule(rule="fixed", level=0.2, blur=0.0, open_radius=1, min_area=8)
    mask, threshold = difference_mask(generated, source, rule)
    assert threshold == 0.2
    assert mask[4:12, 4:12].sum() >= 50 and not mask[18:23, 18:23].any()
    identical, _ = difference_mask(source, source, MaskRule())
    assert not identical.any()  # the floor keeps a no-change output from a noise mask


def test_detail_encode_uses_the_examples() -> None:
    model = trained(detail="encode")
    source = surfaces(1, 0, seed=5)[0]
    with pytest.raises(ConfigError, match=r"detail=encode.*--defects"):
        model.synthesize(source, np.random.default_rng(0))
    model.use_defect_examples(list(surfaces(0, 3, seed=9)))
    picks = {
        model.synthesize(source, np.random.default_rng(s)).record["detail_example"]
        for s in range(8)
    }
    assert picks <= {0, 1, 2} and len(picks) > 1
    sample = model.synthesize(source[:, :, 0], np.random.default_rng(0))  # (H, W) in, (H, W) out
    assert sample.image.shape == (SIZE, SIZE) and sample.record["detail"] == "encode"


def test_synthesis_settings_can_change_after_training() -> None:
    model = trained()
    model.configure_synthesis({"detail": "encode", "mask_k": "1.5"})
    assert model.config.detail == "encode" and model.config.mask_k == 1.5
    with pytest.raises(ConfigError, match="width cannot change after training"):
        model.configure_synthesis({"width": "8"})
    with pytest.raises(ConfigError, match="detail"):
        model.configure_synthesis({"detail": "random"})


def test_other_sizes_are_resized_and_wrong_channels_refused() -> None:
    model = trained()
    big = cv2.resize(surfaces(1, 0)[0], (48, 48))[:, :, None]
    sample = model.synthesize(big, np.random.default_rng(0))
    assert sample.image.shape == (SIZE, SIZE, 1) and sample.record["resized"] is True
    with pytest.raises(ConfigError, match="1-channel"):
        model.synthesize(np.zeros((SIZE, SIZE, 3), np.float32), np.random.default_rng(0))


def test_a_synthesizer_has_no_predict() -> None:
    model = make()
    assert not isinstance(model, Scorer) and not hasattr(model, "predict")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 0),
        ("detail_dim", 0),
        ("kl_weight", -1.0),
        ("cross_cycle_weight", -1.0),
        ("detail", "random"),
        ("gan_loss", "wgan"),
        ("beta1", 1.0),
        ("lr", 0.0),
        ("mask_rule", "otsu"),
        ("mask_level", 1.5),
        ("collapse_patience", -1),
        ("encoder_norm", "layer"),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        CrossGANConfig(**{field: value})


@pytest.mark.parametrize("size", [30, 16])
def test_bad_image_size(size: int) -> None:
    with pytest.raises(ValueError, match="image_size"):
        CrossGAN(CrossGANConfig(**TINY), image_size=size)


# --- through the API -------------------------------------------------------------------------


def test_train_and_synthesize_through_the_api(folder_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # bare keys go to the model
    run = train_tiny_run("crossgan", folder_root, out, *(f"{k}={v}" for k, v in TINY.items()))
    assert isinstance(run.model, CrossGAN) and run.calibration == {}
    with pytest.raises(ConfigError, match="synthesizer"):
        api.predict(out, folder_root / "normal", tmp_path / "pred")
    with pytest.raises(ConfigError, match="not cyclegan"):
        CycleGAN.from_run(out)

    out2 = tmp_path / "synth"
    api.synthesize("crossgan", folder_root, out2, 4, run=out, image_size=SIZE, progress=False)
    assert len(list((out2 / "images").glob("*.png"))) == 4
    assert len(list((out2 / "masks").glob("*.png"))) == 4
    with open(out2 / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert {r["method"] for r in rows} == {"crossgan"} and {r["detail"] for r in rows} == {"prior"}
    for row in rows:
        mask = cv2.imread(str(out2 / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (SIZE, SIZE) and int(row["mask_area"]) == int((mask > 0).sum())

    encoded = tmp_path / "synth-encoded"
    api.synthesize(
        "crossgan",
        folder_root,
        encoded,
        3,
        run=out,
        defects=folder_root,
        image_size=SIZE,
        overrides=["detail=encode"],
        progress=False,
    )
    with open(encoded / "manifest.csv", newline="") as handle:
        assert {r["detail"] for r in csv.DictReader(handle)} == {"encode"}
    with pytest.raises(ConfigError, match="cannot change after training"):
        api.synthesize("crossgan", folder_root, tmp_path / "x", 1, run=out, overrides=["width=8"])
