"""``data.channels=auto``: decided from the training images when a run is trained."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import defectlab.api as dl
from defectlab.data.loading import choose_channels, colour_spread
from defectlab.errors import ConfigError
from tests.conftest import textured, with_defect, write_image


def _mvtec(root: Path, colour: bool, n_train: int = 10) -> Path:
    """A tiny MVTec-layout category; colour images are the grey texture tinted per channel."""
    rng = np.random.default_rng(0)

    def picture(grey: np.ndarray) -> np.ndarray:
        if not colour:
            return grey
        tint = np.array([1.0, 0.7, 0.4])
        return np.clip(grey[:, :, None] * tint, 0, 255).astype(np.uint8)

    for i in range(n_train):
        write_image(root / "train" / "good" / f"{i:03d}.png", picture(textured(rng, 32)))
    for i in range(3):
        write_image(root / "test" / "good" / f"{i:03d}.png", picture(textured(rng, 32)))
        image, mask = with_defect(textured(rng, 32), rng)
        write_image(root / "test" / "hole" / f"{i:03d}.png", picture(image))
        write_image(root / "ground_truth" / "hole" / f"{i:03d}_mask.png", mask)
    return root


@pytest.fixture
def colour_root(tmp_path: Path) -> Path:
    return _mvtec(tmp_path / "colour" / "part", colour=True)


@pytest.fixture
def grey_root(tmp_path: Path) -> Path:
    return _mvtec(tmp_path / "grey" / "part", colour=False)


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def test_colour_training_images_keep_rgb(colour_root: Path, tmp_path: Path, one_thread) -> None:
    run = dl.train(
        "patchmemory", colour_root, tmp_path / "run", image_size=32, device="cpu", progress=False
    )
    config = _config(tmp_path / "run")
    assert config["data"]["channels"] == 3 and run.model.channels == 3
    reason = config["resolved"]["data.channels"]
    assert reason["value"] == 3 and "RGB" in reason["reason"]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "data.channels=auto → 3" in log
    # evaluation and a reload read colour too
    metrics = dl.evaluate(tmp_path / "run", colour_root, tmp_path / "eval", progress=False)
    assert metrics["image_auroc"] is not None
    assert dl.load_run(tmp_path / "run").model.channels == 3


def test_grey_training_images_are_read_grey(grey_root: Path, tmp_path: Path) -> None:
    run = dl.train(
        "pixelstats", grey_root, tmp_path / "run", image_size=32, device="cpu", progress=False
    )
    config = _config(tmp_path / "run")
    assert config["data"]["channels"] == 1 and run.model.channels == 1
    assert "grey" in config["resolved"]["data.channels"]["reason"]
    assert "data.channels=auto → 1" in (tmp_path / "run" / "log.txt").read_text()


def test_a_set_value_overrides_auto(colour_root: Path, tmp_path: Path) -> None:
    run = dl.train(
        "pixelstats",
        colour_root,
        tmp_path / "run",
        image_size=32,
        device="cpu",
        overrides=["data.channels=1"],
        progress=False,
    )
    config = _config(tmp_path / "run")
    assert config["data"]["channels"] == 1 and run.model.channels == 1
    assert config["resolved"] == {}


def test_bad_channels_value_lists_the_valid_ones(grey_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.channels must be one of auto, 1, 3; got 'rgb'"):
        dl.train("pixelstats", grey_root, tmp_path / "run", overrides=["data.channels=rgb"])


def test_grey_stored_as_rgb_counts_as_grey(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    grey = textured(rng, 32)
    rgb_file = write_image(tmp_path / "g.jpg", np.repeat(grey[:, :, None], 3, axis=2))
    assert cv2.imread(str(rgb_file), cv2.IMREAD_UNCHANGED).ndim == 3  # stored with 3 channels
    assert choose_channels([rgb_file]).channels == 1
    tinted = write_image(tmp_path / "c.png", np.dstack([grey, grey // 2, grey // 3]))
    assert colour_spread(cv2.imread(str(tinted))[:, :, ::-1] / 255.0) > 0.1
    # the majority decides; unreadable files are left out
    (tmp_path / "broken.png").write_bytes(b"not an image")
    choice = choose_channels([tinted, tinted, rgb_file, tmp_path / "broken.png"])
    assert choice.channels == 3 and "2 of 3" in choice.reason


def test_train_command_says_what_auto_chose(
    grey_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from defectlab.cli import main

    args = ["train", "--model", "pixelstats", "--data", str(grey_root), "--out"]
    code = main([*args, str(tmp_path / "r"), "--image-size", "32", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "data.channels=auto → 1:" in out and "grey" in out
