from pathlib import Path

import numpy as np
import pytest
import torch

import defectlab.api as dl
from defectlab.errors import ConfigError, DataError
from tests.conftest import write_image


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("ens")
    rng = np.random.default_rng(0)
    for i in range(30):
        write_image(
            root / "data" / "good" / f"{i}.png", rng.integers(95, 105, (32, 32), dtype=np.uint8)
        )
    runs = [root / "a", root / "b"]
    dl.train("pixelstats", root / "data", runs[0], image_size=32, progress=False)
    dl.train(
        "pixelstats",
        root / "data",
        runs[1],
        image_size=32,
        progress=False,
        overrides=["blur_sigma=2", "map_sigma=1"],
    )
    return root, runs


def test_ensemble_normalises_members_and_flags_anomalies(two_runs, tmp_path: Path) -> None:
    root, runs = two_runs
    run = dl.train(
        "ensemble",
        root / "data",
        tmp_path / "ens",
        image_size=32,
        progress=False,
        overrides=[f"runs={runs[0]},{runs[1]}"],
    )
    normal = np.random.default_rng(5).integers(95, 105, (4, 32, 32, 1)).astype(np.float32) / 255
    anomalous = normal.copy()
    anomalous[:, 10:16, 10:16] = 1.0
    scores, maps = dl.predict_arrays(run.model, np.concatenate([normal, anomalous]))
    assert scores[4:].min() > scores[:4].max()
    assert abs(float(np.mean(scores[:4]))) < 3  # z-scores: normal images near 0
    assert maps.shape == (8, 32, 32) and np.unravel_index(maps[4].argmax(), (32, 32))[0] in range(
        8, 18
    )
    reloaded = dl.load_run(tmp_path / "ens")
    again, _ = dl.predict_arrays(reloaded.model, normal)
    np.testing.assert_allclose(again, scores[:4], rtol=1e-5)


def test_max_combination_is_at_least_each_member(two_runs, tmp_path: Path) -> None:
    root, runs = two_runs
    run = dl.train(
        "ensemble",
        root / "data",
        tmp_path / "ens",
        image_size=32,
        progress=False,
        overrides=[f"runs={runs[0]},{runs[1]}", "combine=max"],
    )
    x = torch.rand(3, 1, 32, 32)
    out = run.model.predict(x)
    members = run.model._member_outputs(x)
    for i, member in enumerate(members):
        z = (member.scores - run.model.stats[i, 0]) / run.model.stats[i, 1]
        assert torch.all(out.scores >= z - 1e-6)


def test_bad_ensemble_configs(two_runs, tmp_path: Path) -> None:
    root, runs = two_runs
    with pytest.raises(ConfigError, match="at least two trained runs"):
        dl.train("ensemble", root / "data", tmp_path / "e1", overrides=[f"runs={runs[0]}"])
    with pytest.raises(ConfigError, match="1 weights for 2 runs"):
        dl.train(
            "ensemble",
            root / "data",
            tmp_path / "e2",
            overrides=[f"runs={runs[0]},{runs[1]}", "weights=1"],
        )
    with pytest.raises(ConfigError, match="combine must be one of"):
        dl.train(
            "ensemble",
            root / "data",
            tmp_path / "e3",
            overrides=[f"runs={runs[0]},{runs[1]}", "combine=median"],
        )


def _striped(rng: np.random.Generator, n: int) -> np.ndarray:
    """A second product type: bright, vertically striped."""
    base = np.tile(np.where(np.arange(32) % 8 < 4, 190, 220), (32, 1))
    return np.clip(base + rng.integers(-5, 6, (n, 32, 32)), 0, 255).astype(np.uint8)


def test_router_sends_each_image_type_to_its_own_detector(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    flat = rng.integers(95, 105, (30, 32, 32), dtype=np.uint8)
    striped = _striped(rng, 30)
    for i in range(30):
        write_image(tmp_path / "flat" / "good" / f"{i}.png", flat[i])
        write_image(tmp_path / "striped" / "good" / f"{i}.png", striped[i])
        write_image(tmp_path / "mixed" / "good" / f"f{i}.png", flat[i])
        write_image(tmp_path / "mixed" / "good" / f"s{i}.png", striped[i])
    runs = [tmp_path / "run-flat", tmp_path / "run-striped"]
    dl.train("pixelstats", tmp_path / "flat", runs[0], image_size=32, progress=False)
    dl.train("pixelstats", tmp_path / "striped", runs[1], image_size=32, progress=False)
    run = dl.train(
        "ensemble",
        tmp_path / "mixed",
        tmp_path / "router",
        image_size=32,
        progress=False,
        overrides=[f"runs={runs[0]},{runs[1]}", "combine=route"],
    )
    normal = np.concatenate([rng.integers(95, 105, (3, 32, 32)), _striped(rng, 3)])
    anomalous = normal.copy()
    anomalous[:, 8:14, 8:14] = 0
    images = np.concatenate([normal, anomalous])[..., None].astype(np.float32) / 255
    member = run.model.route(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    assert member.tolist() == [0, 0, 0, 1, 1, 1] * 2
    scores, _ = dl.predict_arrays(run.model, images)
    assert scores[6:].min() > scores[:6].max()
    # each type judged by its own detector: normals of both types look normal (z near 0)
    assert np.abs(scores[:6]).max() < 4
    reloaded = dl.load_run(tmp_path / "router")
    again, _ = dl.predict_arrays(reloaded.model, images)
    np.testing.assert_allclose(again, scores, rtol=1e-5)


def test_router_needs_normal_images_of_every_member_type(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    flat = rng.integers(95, 105, (20, 32, 32), dtype=np.uint8)
    striped = _striped(rng, 20)
    for i in range(20):
        write_image(tmp_path / "flat" / "good" / f"{i}.png", flat[i])
        write_image(tmp_path / "striped" / "good" / f"{i}.png", striped[i])
    runs = [tmp_path / "a", tmp_path / "b"]
    dl.train("pixelstats", tmp_path / "flat", runs[0], image_size=32, progress=False)
    dl.train("pixelstats", tmp_path / "striped", runs[1], image_size=32, progress=False)
    with pytest.raises(DataError, match=r"no training image was routed to .*b"):
        dl.train(
            "ensemble",
            tmp_path / "flat",
            tmp_path / "router",
            image_size=32,
            progress=False,
            overrides=[f"runs={runs[0]},{runs[1]}", "combine=route"],
        )


def test_vote_counts_members_at_their_own_thresholds(two_runs, tmp_path: Path) -> None:
    root, runs = two_runs
    run = dl.train(
        "ensemble",
        root / "data",
        tmp_path / "vote",
        image_size=32,
        progress=False,
        overrides=[f"runs={runs[0]},{runs[1]}", "combine=vote", "vote_threshold=1.0"],
    )
    assert run.calibration["method"] == "model"
    assert run.image_threshold == pytest.approx(1.0, abs=1e-5)
    normal = np.random.default_rng(6).integers(95, 105, (4, 32, 32, 1)).astype(np.float32) / 255
    anomalous = normal.copy()
    anomalous[:, 10:16, 10:16] = 1.0
    scores, maps = dl.predict_arrays(run.model, np.concatenate([normal, anomalous]))
    members = [dl.load_run(r) for r in runs]
    expected = np.mean(
        [
            dl.predict_arrays(m.model, np.concatenate([normal, anomalous]))[0] >= m.image_threshold
            for m in members
        ],
        axis=0,
    )
    np.testing.assert_allclose(scores, expected)
    assert set(np.unique(maps)) <= {0.0, 0.5, 1.0}
    assert (scores[4:] >= run.image_threshold).all()
