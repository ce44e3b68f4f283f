"""PaDiM: per-position Gaussians of Lite patch features, streaming statistics equal to the
batch estimate, Mahalanobis maps, the training grid, checkpoints and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab.detect.padim import Padim, PadimConfig
from defectlab.errors import NotFittedError
from defectlab.runs import load_checkpoint, restore_model, save_checkpoint
from defectlab.training import fit
from tests.conftest import interrupt_on_call, striped_normals, to_nchw, with_square

SIZE = 64
SQUARE = (36, 16, 12)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**overrides) -> Padim:
    return Padim(PadimConfig(**overrides), image_size=SIZE)


def _fit(model: Padim, run_dir: Path, images: np.ndarray, **kwargs) -> Padim:
    fit(model, images, run_dir=run_dir, batch_size=8, progress=False, **kwargs)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Padim:
    return _fit(_model(), tmp_path_factory.mktemp("padim"), striped_normals(32))


def test_streaming_statistics_equal_the_batch_estimate(trained: Padim) -> None:
    rows = trained.embed(to_nchw(striped_normals(32))).double()  # (N, L, D)
    mean = rows.mean(dim=0)
    centred = rows - mean
    covariance = torch.einsum("nld,nle->lde", centred, centred) / (rows.shape[0] - 1)
    covariance += 0.01 * torch.eye(rows.shape[2], dtype=torch.float64)
    assert torch.allclose(trained.mean.double(), mean, atol=1e-5)
    expected = torch.linalg.inv(covariance)
    error = (trained.precision.double() - expected).abs().amax(dim=(1, 2))
    assert (error / expected.abs().amax(dim=(1, 2))).max() < 1e-5  # float32 storage only


def test_map_is_the_mahalanobis_distance_and_finds_the_defect(trained: Padim) -> None:
    normals = striped_normals(8, seed=5)
    defects = with_square(normals, *SQUARE)
    normal_out = trained.predict(to_nchw(normals))
    defect_out = trained.predict(to_nchw(defects))
    assert normal_out.maps.shape == (8, SIZE, SIZE)
    assert defect_out.scores.min() > normal_out.scores.max()
    top, left, side = SQUARE
    inside = defect_out.maps[:, top : top + side, left : left + side].mean()
    outside = defect_out.maps[:, :8, -16:].mean()
    assert inside > 2 * outside
    # without smoothing, each position's value is sqrt(δᵀ Σ⁻¹ δ) of that position
    raw = _model(map_sigma=0.0)
    raw.load_state_dict(trained.state_dict())
    rows = raw.embed(to_nchw(defects[:1]))[0]  # (L, D)
    delta = (rows - raw.mean).double()
    expected = torch.einsum("ld,lde,le->l", delta, raw.precision.double(), delta).sqrt()
    grid = expected.view(*raw.grid)
    out = raw.predict(to_nchw(defects[:1]))
    assert out.scores[0] == pytest.approx(out.maps[0].max().item())
    # the corner pixels of the up-sampled map hold the corner position's distance
    assert out.maps[0, 0, 0].item() == pytest.approx(grid[0, 0].item(), rel=1e-4)


def test_feature_subset_keeps_a_seeded_channel_choice(tmp_path: Path) -> None:
    a, b = _model(feature_subset=20), _model(feature_subset=20)
    c = _model(feature_subset=20, seed=1)
    assert torch.equal(a.channel_subset, b.channel_subset)
    assert not torch.equal(a.channel_subset, c.channel_subset)
    _fit(a, tmp_path, striped_normals(8))
    assert a.mean.shape == (64, 20) and a.precision.shape == (64, 20, 20)


def test_refuses_another_input_size_and_prediction_before_fit(trained: Padim) -> None:
    with pytest.raises(ValueError, match="needs the training size"):
        trained.predict(torch.zeros(1, 1, 96, 96))
    with pytest.raises(NotFittedError):
        _model().predict(torch.zeros(1, 1, SIZE, SIZE))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 2}, "single pass"),
        ({"feature_subset": 999}, "feature_subset"),
        ({"covariance_ridge": 0.0}, "covariance_ridge"),
        ({"score": "mean"}, "score"),
        ({"backbone": "lite9"}, "backbone"),
    ],
)
def test_bad_settings_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PadimConfig(**overrides)


def test_one_image_cannot_make_a_covariance(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="at least 2"):
        _fit(_model(), tmp_path, striped_normals(1))


def test_checkpoint_round_trip_predicts_identically(trained: Padim, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, trained)
    restored = _model()
    restore_model(load_checkpoint(path, "padim"), restored, path)
    images = to_nchw(with_square(striped_normals(4, seed=9), *SQUARE))
    a, b = trained.predict(images), restored.predict(images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_interrupted_training_resumes_to_the_same_model(tmp_path: Path, monkeypatch) -> None:
    images = striped_normals(32)
    whole = _fit(_model(), tmp_path / "whole", images)
    resumed_dir = tmp_path / "resumed"
    original = interrupt_on_call(monkeypatch, Padim, "training_step", call=3)
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), resumed_dir, images, checkpoint_every=1)
    monkeypatch.setattr(Padim, "training_step", original)
    saved = load_checkpoint(resumed_dir / "checkpoints" / "last.pt", "padim")
    assert saved["training"]["global_step"] == 2 and saved["state"]["count"] == 16
    resumed = _fit(_model(), resumed_dir, images, resume=True, checkpoint_every=1)
    assert torch.allclose(resumed.mean, whole.mean, atol=1e-6)
    assert torch.allclose(resumed.precision, whole.precision, rtol=1e-4, atol=1e-4)
