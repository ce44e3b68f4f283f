"""mlaae: the multi-level adversarial autoencoder (MISSION S3) on tiny synthetic images, on
pixels (the seed's version) and on frozen Lite0 feature maps (the default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab import registry
from defectlab.components.features import patch_embedding
from defectlab.detect.mlaae import MLAAE, MLAAEConfig
from defectlab.detect.nuisance import image_statistics
from defectlab.errors import NotFittedError
from defectlab.runs import load_checkpoint, restore_model, save_checkpoint
from defectlab.training import fit
from tests.conftest import (
    interrupt_on_call,
    striped_normals,
    to_nchw,
    with_square,
    write_folder_dataset,
)

SIZE = 32
#: a small network so that training in the tests takes a few seconds
SMALL = dict(
    input="pixels",
    width=0.25,
    low_dim=16,
    low_hidden=64,
    high_dim=32,
    high_hidden=128,
    disc_hidden=64,
)


def _normal(n: int, size: int = SIZE, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Smooth gradients with a random phase plus fine noise, (N, H, W, C) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, channels), np.float32)
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi)
        base = 0.45 + 0.15 * np.sin(2 * np.pi * x + phase) + 0.1 * y
        out[i] = (base[..., None] + rng.normal(0, 0.02, (size, size, channels))).clip(0, 1)
    return out


def _with_square(images: np.ndarray, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = images.copy()
    side = images.shape[1] // 4
    for image in out:
        y, x = rng.integers(2, images.shape[1] - side - 2, 2)
        image[y : y + side, x : x + side] = 1.0
    return out


def _model(epochs: int = 1, size: int = SIZE, channels: int = 1, **overrides) -> MLAAE:
    torch.manual_seed(0)
    return MLAAE(
        MLAAEConfig(epochs=epochs, **(SMALL | overrides)), image_size=size, channels=channels
    )


def _fit(model: MLAAE, run_dir: Path, n: int = 32, checkpoint_every: int = 3, **kwargs) -> list:
    return fit(
        model,
        _normal(n),
        run_dir=run_dir,
        batch_size=8,
        seed=0,
        checkpoint_every=checkpoint_every,
        progress=False,
        **kwargs,
    )


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(tmp_path_factory, **overrides) -> tuple[MLAAE, list[dict]]:
    model = _model(epochs=25, **overrides)
    history = _fit(model, tmp_path_factory.mktemp("mlaae"), n=48, checkpoint_every=10_000)
    return model, history


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[MLAAE, list[dict]]:
    return _trained(tmp_path_factory)


def test_registered_as_a_detector() -> None:
    entry = registry.get("mlaae", "detector")
    assert entry is MLAAE and MLAAE.family == "detector"


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_of_every_level(channels: int) -> None:
    model = _model(size=64, channels=channels, width=0.5)
    x = torch.rand(2, channels, 64, 64)
    features, low, high = model.encode(x)
    widths = [32, 64, 128, 256]
    assert [tuple(f.shape) for f in features] == [
        (2, c, 64 // 2**k, 64 // 2**k) for k, c in enumerate(widths, start=1)
    ]
    assert low.shape == (2, 16) and high.shape == (2, 32)
    recon = model.decode(low, high)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    probs = model.discriminate([low, high])
    assert [tuple(p.shape) for p in probs] == [(2,), (2,)]
    pixel, feature_terms = model.score_terms(x)
    assert pixel.shape == (2,) and feature_terms.shape == (2, 4)
    with pytest.raises(NotFittedError, match="mlaae: predict before fit"):
        model.predict(x)
    model.training_step({"image": x})
    out = model.predict(x)
    assert out.scores.shape == (2,) and out.maps.shape == (2, 64, 64)
    assert torch.isfinite(out.scores).all() and torch.isfinite(out.maps).all()


def test_residual_terms_are_the_score_terms_of_the_residuals() -> None:
    """The public term formula on :meth:`residuals` gives :meth:`score_terms`, for any subset
    of levels, without a second forward pass."""
    model = _model()
    x = to_nchw(_with_square(_normal(3, seed=5)))
    pixel, _, levels = model.residuals(x)
    terms_pixel, terms_features = model.residual_terms(pixel, levels)
    expected_pixel, expected_features = model.score_terms(x)
    assert torch.allclose(terms_pixel, expected_pixel) and terms_pixel.shape == (3,)
    assert torch.allclose(terms_features, expected_features) and terms_features.shape == (3, 4)
    _, two = model.residual_terms(pixel, [levels[2], levels[0]])
    assert torch.allclose(two, expected_features[:, [2, 0]])
    assert torch.allclose(terms_pixel, pixel.flatten(1).mean(1).sqrt())


def test_training_lowers_the_reconstruction_loss(trained) -> None:
    _, history = trained
    per_epoch: dict[int, list[float]] = {}
    for row in history:
        per_epoch.setdefault(row["epoch"], []).append(row["recon"])
    first, last = np.mean(per_epoch[1]), np.mean(per_epoch[max(per_epoch)])
    assert last < 0.5 * first, (first, last)


def test_discriminators_give_probabilities_and_learn(trained) -> None:
    model, history = trained
    for key in ("p_real", "p_fake"):
        assert all(0 <= row[key] <= 1 for row in history)
    disc = [row["disc"] for row in history]
    assert len(set(disc)) > 1 and abs(np.mean(disc[-6:]) - disc[0]) > 1e-3
    codes = model.encode(to_nchw(_normal(8, seed=3)))[1:]
    for p in model.discriminate(list(codes)) + model.discriminate(
        [torch.randn_like(c) for c in codes]
    ):
        assert p.shape == (8,) and ((p >= 0) & (p <= 1)).all()


def test_encoder_learns_to_fool_the_discriminators(trained, tmp_path_factory) -> None:
    """With the adversarial term the discriminators end near chance (codes look like prior
    samples); without it (adv_weight=0) they learn to tell codes from prior samples."""
    _, history = trained
    _, free_history = _trained(tmp_path_factory, adv_weight=0.0)
    fooled = np.mean([row["p_fake"] for row in history[-12:]])
    caught = np.mean([row["p_fake"] for row in free_history[-12:]])
    assert fooled > 0.25 and caught < 0.1, (fooled, caught)


def test_bright_square_scores_above_normal_images(trained) -> None:
    model, _ = trained
    normal = _normal(16, seed=7)
    defect = _with_square(normal)
    normal_out, defect_out = model.predict(to_nchw(normal)), model.predict(to_nchw(defect))
    assert defect_out.scores.min() > normal_out.scores.max()
    # the map is hottest inside the pasted square
    inside = torch.from_numpy((defect != normal)[..., 0])
    for heat, where in zip(defect_out.maps, inside, strict=True):
        assert heat[where].mean() > 2 * heat[~where].mean()


def test_score_terms_are_normalised_to_about_one_on_normal_images(trained) -> None:
    """Raw level norms differ by orders of magnitude; normalised terms are all O(1)."""
    model, _ = trained
    pixel, features = model.score_terms(to_nchw(_normal(32, seed=13)))
    terms = torch.cat([pixel[:, None], features], dim=1).mean(dim=0)
    assert ((terms > 0.5) & (terms < 2.0)).all(), terms


def test_normalisers_use_the_weights_that_made_the_reconstruction() -> None:
    model, twin = _model(norm_momentum=0.0), _model(norm_momentum=0.0)  # same initial weights
    x = to_nchw(_normal(8))
    model.training_step({"image": x})  # momentum 0: norms = this step's mean squared residuals
    with torch.no_grad():
        features, low, high = twin.encode(x)
        recon = twin.decode(low, high)
        expected = [(x - recon).pow(2).mean()] + [
            (f - g).pow(2).mean() for f, g in zip(features, twin.net.features(recon), strict=True)
        ]
    assert torch.allclose(model.norms, torch.stack(expected), rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_feature_terms_follow_the_formula(trained, mode: str) -> None:
    """Term i = sqrt(mean((E_i(x) - E_i(x^))^2) / norm_i), in relative mode further divided
    by the image's own mean square of E_i(x)."""
    model, _ = trained
    x = to_nchw(_with_square(_normal(3, seed=17)))
    clone = MLAAE(MLAAEConfig(**(SMALL | {"feature_residual": mode})), image_size=SIZE)
    clone.load_state_dict(model.state_dict())
    pixel, features = clone.score_terms(x)
    with torch.no_grad():
        feats, low, high = clone.encode(x)
        recon = clone.decode(low, high)
        rec_feats = clone.net.features(recon)
    norms = model.norms
    assert torch.allclose(pixel, ((x - recon).pow(2).flatten(1).mean(1) / norms[0]).sqrt())
    for i, (f, g) in enumerate(zip(feats, rec_feats, strict=True)):
        expected = (f - g).pow(2).flatten(1).mean(1) / norms[i + 1]
        if mode == "relative":
            expected = expected / f.pow(2).flatten(1).mean(1)
        assert torch.allclose(features[:, i], expected.sqrt(), rtol=1e-4)


def test_score_levels_select_the_summed_feature_terms(trained) -> None:
    model, _ = trained
    x = to_nchw(_with_square(_normal(4, seed=9)))
    pixel, features = model.score_terms(x)
    clone = MLAAE(MLAAEConfig(**(SMALL | {"score_levels": (3, 1)})), image_size=SIZE)
    clone.load_state_dict(model.state_dict())
    expected = pixel + features[:, 0] + features[:, 2]
    assert torch.allclose(clone.predict(x).scores, expected, rtol=1e-5)
    assert not torch.allclose(model.predict(x).scores, expected, rtol=1e-5)


def test_alpha_and_beta_select_pixel_or_feature_terms(trained) -> None:
    model, _ = trained
    x = to_nchw(_with_square(_normal(4, seed=9)))
    pixel, features = model.score_terms(x)
    state = model.state_dict()

    def scores(alpha: float, beta: float, norms: torch.Tensor) -> torch.Tensor:
        clone = MLAAE(
            MLAAEConfig(**(SMALL | {"alpha": alpha, "beta": beta})), image_size=SIZE, channels=1
        )
        clone.load_state_dict(state | {"norms": norms})
        return clone.predict(x).scores

    norms = state["norms"]
    pixel_scaled = norms * torch.tensor([100.0, 1, 1, 1, 1])
    features_scaled = norms * torch.tensor([1.0, 100, 100, 100, 100])
    # beta = 0: the score is alpha * pixel term, blind to the feature normalisers
    assert torch.allclose(scores(2.0, 0.0, norms), 2.0 * pixel)
    assert torch.equal(scores(2.0, 0.0, features_scaled), scores(2.0, 0.0, norms))
    assert not torch.allclose(scores(2.0, 0.0, pixel_scaled), scores(2.0, 0.0, norms))
    # alpha = 0: the score is beta * sum of feature terms, blind to the pixel normaliser
    assert torch.allclose(scores(0.0, 3.0, norms), 3.0 * features.sum(1))
    assert torch.equal(scores(0.0, 3.0, pixel_scaled), scores(0.0, 3.0, norms))
    assert not torch.allclose(scores(0.0, 3.0, features_scaled), scores(0.0, 3.0, norms))
    # both: the weighted sum
    assert torch.allclose(scores(1.0, 1.0, norms), pixel + features.sum(1))


def test_save_and_load_give_identical_scores(trained, tmp_path: Path) -> None:
    model, _ = trained
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    clone = _model()
    x = to_nchw(_with_square(_normal(4, seed=11)))
    with pytest.raises(NotFittedError):  # untrained until loaded
        clone.predict(x)
    restore_model(load_checkpoint(path, "mlaae"), clone, path)
    assert torch.equal(clone.predict(x).scores, model.predict(x).scores)
    assert torch.equal(clone.predict(x).maps, model.predict(x).maps)
    with pytest.raises(ValueError, match="do not fit"):
        MLAAE(MLAAEConfig(**(SMALL | {"width": 0.5})), image_size=SIZE).load_state_dict(
            model.state_dict()
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alpha": -0.1}, "alpha and beta must be >= 0"),
        ({"beta": -1.0}, "alpha and beta must be >= 0"),
        ({"alpha": 0.0, "beta": 0.0}, "both 0"),
        ({"width": 0.0}, "width must be positive"),
        ({"low_dim": 0}, "low_dim"),
        ({"feature_residual": "cosine"}, "feature_residual must be"),
        ({"score_levels": ()}, "score_levels must be"),
        ({"score_levels": (1, 5)}, "score_levels must be"),
        ({"score_levels": (2, 2)}, "score_levels must be"),
        ({"score_levels": (3,)}, "among 1-2 for input=features"),
        ({"input": "image"}, "input must be one of features, pixels"),
        ({"backbone": "resnet50"}, "backbone must be one of lite0, lite1, lite2"),
        ({"ssim_weight": 1.0}, "ssim_weight applies to input=pixels only"),
        ({"adv_weight": -1.0}, "adv_weight must be >= 0"),
        ({"embed_grid": 0}, "embed_grid must be at least 1"),
        ({"patch_size": 4}, "patch_size must be a positive odd"),
        ({"score_normalization": "zscore"}, "score_normalization must be one of"),
        ({"term_weighting": "median"}, "term_weighting must be one of mean, inverse_variance"),
        ({"holdout_share": 0.0}, "holdout_share must be in"),
        ({"holdout_share": 0.5}, "holdout_share must be in"),
    ],
)
def test_bad_configs_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MLAAEConfig(**overrides)


def test_bad_image_size_and_channels_are_refused() -> None:
    pixels = MLAAEConfig(input="pixels")
    with pytest.raises(ValueError, match="image size 40 is not a positive multiple of 16"):
        MLAAE(pixels, image_size=40)
    with pytest.raises(ValueError, match="image size 8 "):
        MLAAE(pixels, image_size=8)
    with pytest.raises(ValueError, match="multiple of 32"):
        MLAAE(MLAAEConfig(), image_size=48)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        MLAAE(MLAAEConfig(**SMALL), image_size=SIZE, channels=2)


def test_interrupted_training_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    x = to_nchw(_with_square(_normal(4, seed=5)))
    reference = _model(epochs=2)
    ref_history = _fit(reference, tmp_path / "ref", n=24)

    original = interrupt_on_call(monkeypatch, MLAAE, "training_step", 5)
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(epochs=2), tmp_path / "run", n=24)
    monkeypatch.setattr(MLAAE, "training_step", original)
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", "mlaae")
    assert saved["training"]["global_step"] == 3  # checkpoint_every=3, died in step 5
    assert set(saved["training"]["model"]) == {"ae_optimizer", "disc_optimizer", "epochs_done"}

    torch.manual_seed(123)  # a fresh process would start from other weights and RNG state
    resumed = MLAAE(MLAAEConfig(epochs=2, **SMALL), image_size=SIZE)
    history = _fit(resumed, tmp_path / "run", n=24, resume=True)
    assert history == ref_history
    assert resumed.steps == reference.steps == 6
    assert torch.equal(resumed.norms, reference.norms)
    assert torch.equal(resumed.predict(x).scores, reference.predict(x).scores)


def test_seed_defaults_stay_with_input_pixels() -> None:
    """input=pixels keeps the seed's values of the settings whose default depends on input."""
    pixels, features = MLAAEConfig(input="pixels"), MLAAEConfig()
    assert features.input == "features"
    assert (pixels.adversarial_weight, pixels.grid, pixels.summed_levels) == (
        0.003,
        4,
        (1, 2, 3, 4),
    )
    assert (features.adversarial_weight, features.grid, features.summed_levels) == (0.1, 8, (1, 2))
    assert MLAAEConfig(input="pixels", adv_weight=0.01).adversarial_weight == 0.01
    assert (pixels.weighting, features.weighting) == ("mean", "inverse_variance")


# --- input=features ----------------------------------------------------------------------------
FSIZE = 64
#: a third of the 32 training images held out, so that the term variances have 10 images
FEAT = SMALL | {"input": "features", "holdout_share": 0.3}
SQUARE = (36, 16, 12)


def _feature_model(epochs: int = 8, **overrides) -> MLAAE:
    torch.manual_seed(0)
    return MLAAE(MLAAEConfig(epochs=epochs, **(FEAT | overrides)), image_size=FSIZE)


def _feature_fit(model: MLAAE, run_dir: Path, **kwargs) -> list[dict]:
    return fit(
        model,
        striped_normals(32),
        run_dir=run_dir,
        batch_size=8,
        seed=0,
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory) -> tuple[MLAAE, list[dict]]:
    model = _feature_model()
    return model, _feature_fit(model, tmp_path_factory.mktemp("mlaae-lite0"))


def test_features_input_shapes_and_frozen_backbone() -> None:
    model = _feature_model()
    assert model.backbone is not None
    assert not any(p.requires_grad for p in model.backbone.parameters())
    x = torch.rand(2, 1, FSIZE, FSIZE)
    with pytest.raises(RuntimeError, match="before fit"):
        model.predict(x)
    model.training_step({"image": x})  # the first batch fixes the standardisation
    f = model.inputs(x)
    assert f.shape == (2, 152, 8, 8)  # 40 + 112 channels on the stride-8 grid
    features, low, high = model.encode(f)
    assert [tuple(e.shape[1:]) for e in features] == [(64, 4, 4), (128, 2, 2)]
    assert low.shape == (2, 16) and high.shape == (2, 32)
    assert model.decode(low, high).shape == f.shape
    assert model.norms.shape == (3,)
    pixel, feature_terms = model.score_terms(x)
    assert pixel.shape == (2,) and feature_terms.shape == (2, 2)
    out = model.predict(x)
    assert out.maps.shape == (2, FSIZE, FSIZE) and torch.isfinite(out.scores).all()


def test_features_standardisation_is_fixed_by_the_first_batch() -> None:
    model = _feature_model()
    first, second = to_nchw(striped_normals(8)), to_nchw(striped_normals(8, seed=1))
    model.training_step({"image": first})
    mean, std = model.feature_mean.clone(), model.feature_std.clone()
    with torch.no_grad():
        maps = patch_embedding(model.backbone(first), 3)
    assert torch.allclose(mean[0, :, 0, 0], maps.mean(dim=(0, 2, 3)), atol=1e-5)
    model.training_step({"image": second})
    assert torch.equal(model.feature_mean, mean) and torch.equal(model.feature_std, std)
    standardised = model.inputs(first)
    assert torch.allclose(standardised.mean(dim=(0, 2, 3)), torch.zeros(152), atol=1e-4)


def test_features_training_reconstructs_better_and_separates_squares(feature_run) -> None:
    model, history = feature_run
    first = np.mean([r["recon"] for r in history if r["epoch"] == 1])
    last = np.mean([r["recon"] for r in history if r["epoch"] == 8])
    assert last < 0.7 * first, (first, last)
    normals = striped_normals(8, seed=5)
    defects = with_square(normals, *SQUARE)
    out_normal, out_defect = model.predict(to_nchw(normals)), model.predict(to_nchw(defects))
    assert out_defect.scores.min() > out_normal.scores.max()
    top, left, side = SQUARE
    inside = torch.zeros(FSIZE, FSIZE, dtype=torch.bool)
    inside[top : top + side, left : left + side] = True
    for heat in out_defect.maps:
        assert heat[inside].mean() > heat[~inside].mean()


def test_features_terms_are_normalised_per_location_on_the_kept_images(feature_run) -> None:
    model, _ = feature_run
    assert model.config.per_position and not MLAAEConfig(input="pixels").per_position
    assert [tuple(n.shape) for n in model.position_norms] == [(8, 8), (4, 4), (2, 2)]
    pixel, _, levels = model.residuals(model._kept)
    for term in [pixel, *levels]:
        assert torch.allclose(term.mean(dim=0), torch.ones_like(term[0]), atol=1e-4)


def test_features_hold_out_a_fixed_share_of_the_training_images(feature_run) -> None:
    model, _ = feature_run
    held = model.held_out(torch.arange(32))
    assert int(held.sum()) == len(model._holdout) == 10  # the same indices every epoch
    assert torch.equal(model.held_out(torch.arange(32)), held)

    def ordered(x: torch.Tensor) -> torch.Tensor:  # the batches come shuffled
        return x[x.flatten(1).sum(dim=1).argsort()]

    expected = to_nchw(striped_normals(32))[held]
    assert torch.equal(ordered(model._holdout), ordered(expected))  # those images, each once
    pixels = MLAAE(MLAAEConfig(**SMALL), image_size=SIZE)
    assert not pixels.held_out(torch.arange(32)).any()  # the seed's version trains on all


def test_features_terms_are_weighted_by_their_held_out_inverse_variance(feature_run) -> None:
    model, _ = feature_run
    pixel, levels = model.score_terms(model._holdout)
    variance = torch.cat([pixel[:, None], levels], dim=1).double().var(dim=0)
    assert torch.allclose(model.term_weights.double(), variance[0] / variance, rtol=1e-4)
    assert model.term_weights[0] == 1
    x = to_nchw(with_square(striped_normals(4, seed=2), *SQUARE))
    pixel, levels = model.score_terms(x)
    cfg = model.config
    w = model.term_weights
    expected = cfg.alpha * w[0] * pixel + cfg.beta * (w[1:] * levels).sum(dim=1)
    assert torch.allclose(model.predict(x).scores, expected, rtol=1e-5)


def test_features_refuse_too_few_held_out_images(tmp_path: Path) -> None:
    model = _feature_model(epochs=2, holdout_share=0.1)  # 4 of 32 images
    with pytest.raises(ValueError, match="holds out 4 of the 32 training images"):
        _feature_fit(model, tmp_path / "run")
    mean = _feature_model(epochs=2, holdout_share=0.1, term_weighting="mean")
    _feature_fit(mean, tmp_path / "mean")
    assert mean._holdout is None and torch.equal(mean.term_weights, torch.ones(3))


def test_features_save_load_and_foreign_backbone(feature_run, tmp_path: Path) -> None:
    model, _ = feature_run
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    clone = _feature_model()
    restore_model(load_checkpoint(path, "mlaae"), clone, path)
    x = to_nchw(with_square(striped_normals(4, seed=2), *SQUARE))
    a, b = model.predict(x), clone.predict(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    pairs = zip(clone.position_norms, model.position_norms, strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
    assert torch.equal(clone.term_weights, model.term_weights)
    state = model.state_dict()
    foreign = state | {"backbone": state["backbone"] | {"sha256": "0" * 64}}
    with pytest.raises(ValueError, match="EfficientNet-Lite0 weights"):
        _feature_model().load_state_dict(foreign)
    with pytest.raises(ValueError, match="normalisers have shape"):
        _feature_model().load_state_dict(_model().state_dict())


def test_features_image_statistics_normaliser(tmp_path: Path) -> None:
    model = _feature_model(epochs=2, score_normalization="image_statistics")
    _feature_fit(model, tmp_path / "run")
    assert model.score_normalizer.fitted and len(model._kept) == 32 - 10  # 10 held out
    x = to_nchw(striped_normals(6, seed=4))
    raw, _ = model._raw(x)
    expected = model.score_normalizer(raw, image_statistics(x))
    assert torch.allclose(model.predict(x).scores, expected)
    assert not torch.allclose(model.predict(x).scores, raw)


def test_features_interrupted_training_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    def run(run_dir: Path, **kwargs) -> tuple[MLAAE, list[dict]]:
        model = _feature_model(epochs=2, score_normalization="image_statistics")
        return model, _feature_fit(model, run_dir, checkpoint_every=3, **kwargs)

    reference, ref_history = run(tmp_path / "ref")
    original = interrupt_on_call(monkeypatch, MLAAE, "training_step", 6)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run")
    monkeypatch.setattr(MLAAE, "training_step", original)
    torch.manual_seed(123)
    resumed, history = run(tmp_path / "run", resume=True)
    assert history == ref_history
    assert torch.equal(resumed.feature_mean, reference.feature_mean)
    x = to_nchw(with_square(striped_normals(4, seed=5), *SQUARE))
    assert torch.equal(resumed.predict(x).scores, reference.predict(x).scores)


def test_features_version_trains_evaluates_and_exports(tmp_path: Path) -> None:
    """End to end through the API on a folder of images, the ONNX graph included."""
    import defectlab.api as dl
    from defectlab.deploy.onnx import export_onnx

    root = write_folder_dataset(tmp_path / "data", np.random.default_rng(3), 48, 6, FSIZE)
    settings = [f"model.{k}={v}" for k, v in FEAT.items()] + ["model.epochs=2"]
    settings += ["model.score_normalization=image_statistics", "model.normalization_samples=8"]
    run = dl.train(
        "mlaae",
        root,
        tmp_path / "run",
        image_size=FSIZE,
        device="cpu",
        overrides=settings,
        progress=False,
    )
    metrics = dl.evaluate(run.run_dir, root, tmp_path / "eval", device="cpu")
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    meta = export_onnx(run.run_dir, tmp_path / "export")
    assert meta["check"]["score_within_tolerance"] and meta["check"]["anomaly_map_within_tolerance"]
