"""``data.extra_pairs``: synthetic (image, mask) pairs join mask-trained models' training only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import defectlab.api as dl
from defectlab.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def synth_dir(folder_root: Path, tmp_path: Path) -> Path:
    """Procedural pairs painted on the folder layout's normal images."""
    out = tmp_path / "procedural"
    dl.synthesize("procedural", folder_root / "normal", out, 6, image_size=32, progress=False)
    return out


def test_unet_trains_on_extra_pairs_outside_the_split(
    folder_root: Path, synth_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    dl.train(
        "unet",
        folder_root,
        run,
        image_size=32,
        device="cpu",
        overrides=[
            "data.defects_per_class=2",
            "model.epochs=1",
            f"data.extra_pairs={synth_dir}",
        ],
        progress=False,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_train_synthetic"] == 6
    split_text = (run / "split.json").read_text()
    assert str(synth_dir) not in split_text and "synthetic:" not in split_text
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["extra_pairs"] == [str(synth_dir)]


def test_extra_pairs_parse_as_a_tuple(folder_root: Path) -> None:
    config = dl.build_config("unet", folder_root, overrides=["data.extra_pairs=a,b"])
    assert config.data.extra_pairs == ("a", "b")


def test_detector_refuses_extra_pairs(folder_root: Path, synth_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="extra_pairs"):
        dl.train(
            "pixelstats",
            folder_root,
            tmp_path / "run",
            image_size=32,
            overrides=[f"data.extra_pairs={synth_dir}"],
            progress=False,
        )


def test_manifest_naming_a_missing_file_is_a_data_error(
    folder_root: Path, synth_dir: Path, tmp_path: Path
) -> None:
    (synth_dir / "masks" / "000003.png").unlink()
    with pytest.raises(DataError, match=r"000003\.png"):
        dl.train(
            "unet",
            folder_root,
            tmp_path / "run",
            image_size=32,
            overrides=["model.epochs=1", f"data.extra_pairs={synth_dir}"],
            progress=False,
        )


def test_missing_manifest_is_a_data_error_naming_the_folder(
    folder_root: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DataError, match="nothing"):
        dl.train(
            "unet",
            folder_root,
            tmp_path / "run",
            image_size=32,
            overrides=["model.epochs=1", f"data.extra_pairs={empty}"],
            progress=False,
        )
