"""Image statistics and the score normalizer that removes what they predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab.detect.autoencoder import Autoencoder, AutoencoderConfig
from defectlab.detect.nuisance import STATISTICS, ScoreNormalizer, image_statistics
from defectlab.errors import TrainingError
from defectlab.training import fit

BRIGHTNESS, CONTRAST, STREAKS, ROWS, DETAIL = range(len(STATISTICS))


def test_statistics_measure_what_they_are_named_for() -> None:
    flat = torch.full((1, 1, 16, 16), 0.3)
    stats = image_statistics(flat)[0]
    assert stats[BRIGHTNESS] == pytest.approx(0.3)
    assert torch.allclose(stats[1:], torch.zeros(4), atol=1e-6)
    columns = torch.zeros(1, 1, 16, 16)
    columns[..., ::2] = 1.0  # vertical stripes: streaks run top to bottom
    stats = image_statistics(columns)[0]
    assert stats[STREAKS] == pytest.approx(1.0) and stats[ROWS] == 0
    assert stats[CONTRAST] == pytest.approx(0.5) and stats[DETAIL] > 0.3
    rows = columns.transpose(2, 3)
    assert image_statistics(rows)[0, ROWS] == pytest.approx(1.0)
    assert image_statistics(rows)[0, STREAKS] == 0
    colour = columns.repeat(1, 3, 1, 1)
    assert torch.allclose(image_statistics(colour), image_statistics(columns))


def _confounded(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics of random images and scores driven by their brightness and streaks."""
    g = torch.Generator().manual_seed(seed)
    brightness = torch.rand(n, 1, 1, 1, generator=g) * 0.6 + 0.2
    images = brightness + 0.1 * torch.rand(n, 1, 32, 32, generator=g)
    stats = image_statistics(images)
    scores = 3.0 * stats[:, BRIGHTNESS] + 20.0 * stats[:, STREAKS]
    return scores + 0.01 * torch.randn(n, generator=g), stats


def test_normalizer_removes_the_predicted_part_and_keeps_the_rest() -> None:
    scores, stats = _confounded(64, seed=0)
    normalizer = ScoreNormalizer().fit(scores, stats)
    test_scores, test_stats = _confounded(32, seed=1)
    test_scores[16:] += 0.1  # "defects": a rise much smaller than the normal spread
    raw_gap = test_scores[16:].min() - test_scores[:16].max()
    adjusted = normalizer(test_scores, test_stats)
    assert raw_gap < 0 < adjusted[16:].min() - adjusted[:16].max()
    assert adjusted[:16].std() < 0.1 * test_scores[:16].std()
    assert adjusted[:16].mean() == pytest.approx(scores.mean().item(), abs=0.02)


def test_unfitted_normalizer_passes_scores_through_and_bad_fits_are_refused() -> None:
    scores, stats = _confounded(16, seed=0)
    assert torch.equal(ScoreNormalizer()(scores, stats), scores)
    with pytest.raises(ValueError, match="more than 6 normal images, got 5"):
        ScoreNormalizer().fit(scores[:5], stats[:5])
    with pytest.raises(ValueError, match="15 scores for 16 rows"):
        ScoreNormalizer().fit(scores[:15], stats)
    scores[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ScoreNormalizer().fit(scores, stats)
    with pytest.raises(ValueError, match="ridge"):
        ScoreNormalizer(ridge=-1.0)


def _normal_images(n: int, seed: int) -> np.ndarray:
    """(N, 64, 64, 1): vertical streaks of random strength on a random brightness."""
    rng = np.random.default_rng(seed)
    x = np.arange(64) / 64
    images = [
        rng.uniform(0.2, 0.7)
        + rng.uniform(0.0, 0.15) * np.sin(2 * np.pi * 8 * x + rng.uniform(0, 6))[None, :]
        + rng.normal(0, 0.02, (64, 64))
        for _ in range(n)
    ]
    return np.clip(np.stack(images)[..., None], 0, 1).astype(np.float32)


def test_autoencoder_scores_are_normalised_and_survive_a_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = AutoencoderConfig(
        epochs=2,
        width=4,
        latent_channels=4,
        score_normalization="image_statistics",
        normalization_samples=32,
    )
    model = Autoencoder(config, image_size=64)
    train = _normal_images(40, seed=0)
    fit(model, train, run_dir=tmp_path / "run", batch_size=8, progress=False)
    assert model.score_normalizer.fitted
    kept = model._level_images
    assert len(kept) == 32
    normalised = model.predict(kept).scores
    stats = image_statistics(kept)
    for j in range(len(STATISTICS)):
        rho = np.corrcoef(normalised.numpy(), stats[:, j].numpy())[0, 1]
        assert abs(rho) < 0.1, (STATISTICS[j], rho)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    clone = Autoencoder(config, image_size=64)
    clone.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    batch = torch.from_numpy(_normal_images(6, seed=1).transpose(0, 3, 1, 2).copy())
    assert torch.equal(clone.predict(batch).scores, model.predict(batch).scores)
    raw = Autoencoder(AutoencoderConfig(width=4, latent_channels=4), image_size=64)
    raw.load_state_dict({**model.state_dict(), "score_normalizer": None})
    assert not torch.equal(raw.predict(batch).scores, model.predict(batch).scores)


def test_autoencoder_refuses_too_few_images_and_bad_settings(tmp_path: Path) -> None:
    config = AutoencoderConfig(
        epochs=1, width=4, latent_channels=4, score_normalization="image_statistics"
    )
    with pytest.raises(TrainingError, match="needs at least 8 training images, got 6"):
        fit(
            Autoencoder(config, image_size=64),
            _normal_images(6, 0),
            run_dir=tmp_path,
            batch_size=4,
            progress=False,
        )
    with pytest.raises(ValueError, match="score_normalization must be one of none"):
        AutoencoderConfig(score_normalization="zscore")
    with pytest.raises(ValueError, match="normalization_samples must be at least 8"):
        AutoencoderConfig(normalization_samples=4)
