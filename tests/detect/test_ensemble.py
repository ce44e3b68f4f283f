from pathlib import Path

import numpy as np
import pytest
import torch

import defectlab.api as dl
from defectlab.errors import ConfigError
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
            overrides=[f"runs={runs[0]},{runs[1]}", "combine=vote"],
        )
