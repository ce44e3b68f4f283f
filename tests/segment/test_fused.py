"""``fused``: a trained detector's image score and its map fused with a trained segmenter's
probability, as an ordinary run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab import api
from defectlab.errors import ConfigError, NotFittedError
from defectlab.segment.fused import FusedConfig, FusedSegmenter
from tests.conftest import write_folder_dataset

SIZE = 32

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("fused")
    data = write_folder_dataset(root / "data", np.random.default_rng(1), 16, 8, size=SIZE)
    detector = api.train("pixelstats", data, root / "det", image_size=SIZE, progress=False)
    segmenter = api.train(
        "unet",
        data,
        root / "seg",
        image_size=48,  # another size than the detector's: the fused run adapts its input
        seed=0,
        overrides=["epochs=1", "width=8", "cat_channels=8", "data.defects_per_class=2"],
        progress=False,
    )
    return data, detector.run_dir, segmenter.run_dir


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="epochs must be 1"):
        FusedConfig(epochs=2)
    with pytest.raises(ValueError, match="fusion must be one of"):
        FusedConfig(fusion="max")
    with pytest.raises(ValueError, match="set together"):
        FusedConfig(image_threshold=1.0)
    with pytest.raises(ValueError, match="needs two trained runs"):
        FusedSegmenter(FusedConfig())


def test_predict_before_training_is_refused(members) -> None:
    _, detector, segmenter = members
    config = FusedConfig(detector_run=str(detector), segmenter_run=str(segmenter))
    model = FusedSegmenter(config, image_size=SIZE, channels=1)
    with pytest.raises(NotFittedError, match="fused: predict before fit"):
        model.predict(torch.rand(2, 1, SIZE, SIZE))


def test_given_thresholds_are_the_runs_calibration(members, tmp_path: Path) -> None:
    data, detector, segmenter = members
    settings = [f"detector_run={detector}", f"segmenter_run={segmenter}", "fusion=mean"]
    run = api.train(
        "fused",
        data,
        tmp_path / "fixed",
        image_size=SIZE,
        overrides=[*settings, "image_threshold=0.25", "pixel_threshold=0.5"],
        progress=False,
    )
    assert run.calibration["method"] == "model"
    assert (run.image_threshold, run.pixel_threshold) == (0.25, 0.5)
    quantile = api.train(
        "fused", data, tmp_path / "quantile", image_size=SIZE, overrides=settings, progress=False
    )
    assert quantile.calibration["method"] == "quantile"


def test_a_member_from_another_run_is_refused(members, tmp_path: Path) -> None:
    data, detector, segmenter = members
    run = api.train(
        "fused",
        data,
        tmp_path / "run",
        image_size=SIZE,
        overrides=[f"detector_run={detector}", f"segmenter_run={segmenter}"],
        progress=False,
    )
    model = FusedSegmenter(
        FusedConfig(detector_run=str(segmenter), segmenter_run=str(segmenter)),
        image_size=SIZE,
        channels=1,
    )
    with pytest.raises(ValueError, match="was built from runs"):
        model.load_state_dict(run.model.state_dict())
    with pytest.raises(ConfigError):
        api.build_config("fused", data, overrides=["fusion=max"])
