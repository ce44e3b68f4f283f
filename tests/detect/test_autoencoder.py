"""Reconstruction detectors (ae, vae, wae): learning, detection, state, config, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import defectlab.api as dl
from defectlab import registry
from defectlab.detect.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    VAEConfig,
    VariationalAutoencoder,
    WAEConfig,
    WassersteinAutoencoder,
    mmd_to_prior,
    sobel_gradients,
    ssim_map,
)
from defectlab.errors import ConfigError
from defectlab.training import _batch_order, fit
from tests.conftest import textured, write_image

MODELS = {"ae": Autoencoder, "vae": VariationalAutoencoder, "wae": WassersteinAutoencoder}
SMALL = {"width": 8, "latent_channels": 8}
SQUARE = (slice(20, 30), slice(36, 46))  # rows, columns of the pasted defect at 64 px


def _normal_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """(N, H, W, 1) float32: tilted planes plus a sine ripple plus fine noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        a, b, phase = rng.uniform(-0.2, 0.2, 3)
        ripple = 0.1 * np.sin(2 * np.pi * (x + phase))
        images.append(0.4 + a * x + b * y + ripple + rng.normal(0, 0.02, (size, size)))
    return np.clip(np.stack(images)[..., None], 0, 1).astype(np.float32)


def _as_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def fit_order(n: int, batch_size: int, seed: int = 0, epoch: int = 0) -> torch.Tensor:
    """Training image indices in the order :func:`fit` presents them in ``epoch``."""
    return torch.cat(_batch_order(n, batch_size, seed, epoch))


def _test_batch() -> torch.Tensor:
    """8 unseen normal images; the last 4 carry a bright square."""
    batch = _as_batch(_normal_images(8, seed=1))
    batch[4:, :, SQUARE[0], SQUARE[1]] = 1.0
    return batch


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, tmp_path_factory) -> tuple[Autoencoder, list[dict]]:
    cls = MODELS[request.param]
    torch.manual_seed(0)
    model = cls(cls.Config(epochs=6, **SMALL), image_size=64)
    history = fit(
        model,
        _normal_images(48),
        run_dir=tmp_path_factory.mktemp(request.param),
        batch_size=8,
        progress=False,
    )
    return model, history


def test_training_lowers_the_loss(trained) -> None:
    model, history = trained
    assert len(history) == 6 * 6
    first = np.mean([h["loss"] for h in history if h["epoch"] == 1])
    last = np.mean([h["loss"] for h in history if h["epoch"] == 6])
    assert last < 0.7 * first, (model.name, first, last)
    assert {"l2", "ssim"} <= set(history[-1])
    extra = {"ae": set(), "vae": {"kl"}, "wae": {"mmd"}}[model.name]
    assert extra <= set(history[-1])


def test_bright_square_is_scored_higher_and_located(trained) -> None:
    model, _ = trained
    out = model.predict(_test_batch())
    assert out.scores.shape == (8,) and out.maps.shape == (8, 64, 64)
    assert out.scores[4:].min() > out.scores[:4].max(), out.scores
    for i in range(4, 8):
        row, col = np.unravel_index(out.maps[i].argmax().item(), (64, 64))
        assert 16 <= row <= 33 and 32 <= col <= 49, (model.name, row, col)


def test_pixel_count_score_uses_the_level_fixed_in_training(trained) -> None:
    model, _ = trained
    assert model.pixel_level is not None
    # the level is the 0.995 quantile of the maps of the first 32 training images
    first_images = _as_batch(_normal_images(48))[fit_order(48, 8)[:32]]
    share = (model.predict(first_images).maps > model.pixel_level).float().mean()
    assert share == pytest.approx(0.005, abs=0.001)
    unseen = model.predict(_as_batch(_normal_images(8, seed=2))).maps
    assert (unseen > model.pixel_level).float().mean() < 0.05
    cls = type(model)
    counter = cls(cls.Config(score="pixel_count", **SMALL), image_size=64)
    counter.load_state_dict(model.state_dict())
    scores = counter.predict(_test_batch()).scores
    assert scores[4:].min() > scores[:4].max() and scores[4:].min() > 0.01, scores
    assert (scores >= 0).all() and (scores <= 1).all()


def test_state_round_trip_gives_identical_scores(trained, tmp_path: Path) -> None:
    model, _ = trained
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    cls = type(model)
    torch.manual_seed(123)
    clone = cls(cls.Config(**SMALL), image_size=64)
    clone.is_fitted = True  # at its initial weights, to show that loading changes its scores
    batch = _test_batch()
    assert not torch.equal(clone.predict(batch).scores, model.predict(batch).scores)
    clone.load_state_dict(torch.load(path, weights_only=True))
    assert clone.pixel_level == model.pixel_level
    a, b = model.predict(batch), clone.predict(batch)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    with pytest.raises(RuntimeError, match="size mismatch"):
        cls(cls.Config(width=4, latent_channels=8), image_size=64).load_state_dict(
            model.state_dict()
        )


@pytest.mark.parametrize("name", list(MODELS))
def test_resume_after_interruption_reproduces_the_run(name: str, tmp_path: Path) -> None:
    cls = MODELS[name]
    images = _normal_images(12, size=32)
    # a median level depends on every kept image, so a lost reservoir shows
    config = cls.Config(epochs=2, width=4, latent_channels=4, level_samples=6, level_quantile=0.5)

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
    assert resumed.pixel_level == reference.pixel_level is not None


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        (AutoencoderConfig, {"skip": True, "attention": True, "pixel_loss": "l1"}),
        (AutoencoderConfig, {"edge_weight": 0.5, "map_residual": "ssim", "score": "pixel_count"}),
        (VAEConfig, {"attention": True, "map_residual": "l1"}),
        (WAEConfig, {"kernel": "rbf", "skip": True, "pixel_weight": 0.0}),
    ],
)
def test_variants_train_and_predict_in_colour(config, overrides, tmp_path: Path) -> None:
    cls = next(c for c in MODELS.values() if c.Config is config)
    torch.manual_seed(0)
    model = cls(
        config(epochs=1, width=4, latent_channels=4, **overrides), image_size=64, channels=3
    )
    images = np.repeat(_normal_images(6), 3, axis=3)
    history = fit(model, images, run_dir=tmp_path, batch_size=3, progress=False)
    assert all(np.isfinite(h["loss"]) for h in history)
    if overrides.get("edge_weight"):
        assert history[-1]["edge"] > 0
    out = model.predict(_as_batch(images[:2]))
    assert out.scores.shape == (2,) and out.maps.shape == (2, 64, 64)
    assert torch.isfinite(out.scores).all() and (out.maps >= 0).all()
    assert model.reconstructions(_as_batch(images[:2])).shape == (2, 3, 64, 64)


def test_full_skips_reconstruct_more_faithfully_than_the_bottleneck(tmp_path: Path) -> None:
    """What the docstring warns about: skips let the decoder copy the input."""
    images = _normal_images(32)
    errors = {}
    for skip in (False, True):
        torch.manual_seed(0)
        model = Autoencoder(AutoencoderConfig(epochs=3, skip=skip, **SMALL), image_size=64)
        fit(model, images, run_dir=tmp_path / str(skip), batch_size=8, progress=False)
        batch = _test_batch()
        errors[skip] = (model.reconstructions(batch) - batch).abs()[4:, :, SQUARE[0], SQUARE[1]]
    assert errors[True].mean() < errors[False].mean()


def test_image_size_must_be_a_multiple_of_32() -> None:
    for cls in MODELS.values():
        with pytest.raises(ValueError, match=r"image_size 100 .*multiple of 32"):
            cls(image_size=100)
        with pytest.raises(ValueError, match="image_size 16"):
            cls(image_size=16)
    for size in (32, 64, 256):
        model = Autoencoder(AutoencoderConfig(width=4), image_size=size)
        model.is_fitted = True  # the output shape needs no training
        assert model.predict(torch.rand(1, 1, size, size)).maps.shape == (1, size, size)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        Autoencoder(image_size=64, channels=2)


@pytest.mark.parametrize(
    ("config", "kwargs", "match"),
    [
        (AutoencoderConfig, {"ssim_weight": -1.0}, "ssim_weight must be a non-negative"),
        (AutoencoderConfig, {"edge_weight": -0.1}, "edge_weight must be a non-negative"),
        (AutoencoderConfig, {"pixel_weight": float("nan")}, "pixel_weight must be"),
        (AutoencoderConfig, {"pixel_weight": 0.0, "ssim_weight": 0.0}, "nothing to reconstruct"),
        (AutoencoderConfig, {"lr": 0.0}, "lr must be positive"),
        (AutoencoderConfig, {"map_residual": "l3"}, "map_residual must be one of ssim, l1"),
        (AutoencoderConfig, {"pixel_loss": "huber"}, "pixel_loss must be one of l1, l2"),
        (AutoencoderConfig, {"score": "max"}, "score must be one of topk, pixel_count"),
        (AutoencoderConfig, {"score_top_fraction": 0.0}, "score_top_fraction"),
        (AutoencoderConfig, {"level_quantile": 1.0}, "level_quantile"),
        (AutoencoderConfig, {"width": 0}, "width and latent_channels must be positive"),
        (VAEConfig, {"kl_weight": -1e-3}, "kl_weight must be a non-negative"),
        (WAEConfig, {"mmd_weight": -1.0}, "mmd_weight must be a non-negative"),
        (WAEConfig, {"kernel": "laplace"}, "kernel must be one of imq, rbf; got 'laplace'"),
    ],
)
def test_bad_config_is_refused(config, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        config(**kwargs)


def test_ssim_sobel_and_mmd_behave() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=g)
    assert torch.allclose(ssim_map(x, x), torch.ones_like(x), atol=1e-4)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert ssim_map(x, noisy).mean() < 0.9
    ramp = torch.linspace(0, 1, 16).repeat(1, 1, 16, 1)  # grows along columns
    gradients = sobel_gradients(ramp)[0, :, 4:-4, 4:-4]
    assert (gradients[0] > 0).all() and gradients[1].abs().max() < 1e-6
    for kernel in ("imq", "rbf"):
        prior = torch.randn(64, 16, generator=g)
        matched = mmd_to_prior(torch.randn(64, 16, generator=g), prior, kernel)
        shifted = mmd_to_prior(torch.randn(64, 16, generator=g) + 2.0, prior, kernel)
        assert abs(matched) < 0.2 * shifted, (kernel, matched, shifted)
    assert mmd_to_prior(torch.randn(1, 16), torch.randn(1, 16), "imq") == 0


def test_registered_and_trainable_through_the_api(tmp_path: Path) -> None:
    """Checkpoints survive the safe (weights_only) reader; a bad size is a one-line error."""
    for name, cls in MODELS.items():
        assert registry.get(name, "detector") is cls and cls.description
    rng = np.random.default_rng(0)
    for i in range(16):
        write_image(tmp_path / "data" / "good" / f"{i}.png", textured(rng, 32))
    run = dl.train(
        "vae",
        tmp_path / "data",
        tmp_path / "run",
        image_size=32,
        device="cpu",
        overrides=["epochs=1", "width=4", "latent_channels=4", "map_residual=l1"],
        progress=False,
    )
    with pytest.raises(ConfigError, match="image_size 48 is not a multiple of 32"):
        dl.train("ae", tmp_path / "data", tmp_path / "bad", image_size=48, progress=False)
    loaded = dl.load_run(tmp_path / "run", device="cpu")  # weights_only checkpoint read
    batch = torch.from_numpy(textured(rng, 32)[None, None] / np.float32(255))
    assert loaded.model.config.map_residual == "l1"
    assert torch.equal(run.model.predict(batch).maps, loaded.model.predict(batch).maps)
