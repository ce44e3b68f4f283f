import pytest

from defectlab.config import DataConfig, RunConfig, apply_overrides, parse_set_options
from defectlab.detect.pixelstats import PixelStatsConfig
from defectlab.errors import ConfigError


def test_overrides_are_typed() -> None:
    cfg = apply_overrides(
        DataConfig(),
        {"image_size": "64", "include_uncertain": "yes", "category": "none", "val_fraction": "0.2"},
    )
    assert (cfg.image_size, cfg.include_uncertain, cfg.category, cfg.val_fraction) == (
        64,
        True,
        None,
        0.2,
    )


def test_unknown_key_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'data.imagesize'.*data.image_size"):
        apply_overrides(DataConfig(), {"imagesize": "64"}, "data.")


def test_bad_value_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.image_size: cannot read 'big' as int"):
        apply_overrides(DataConfig(), {"image_size": "big"}, "data.")
    for bad in ("2", "rgb"):
        with pytest.raises(ConfigError, match=r"data\.channels must be one of auto, 1, 3"):
            apply_overrides(DataConfig(), {"channels": bad}, "data.")


def test_channels_default_to_auto_and_take_1_or_3() -> None:
    assert DataConfig().channels == "auto"
    assert apply_overrides(DataConfig(), {"channels": "3"}, "data.").channels == 3
    assert apply_overrides(DataConfig(channels=3), {"channels": "auto"}, "data.").channels == "auto"
    with pytest.raises(ConfigError, match="min_std must be positive"):
        apply_overrides(PixelStatsConfig(), {"min_std": "0"})


def test_set_options_sections() -> None:
    sections = parse_set_options(["data.image_size=64", "epochs=1", "train.batch_size=4"])
    assert sections == {
        "data": {"image_size": "64"},
        "model": {"epochs": "1"},
        "train": {"batch_size": "4"},
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_options(["epochs"])
    with pytest.raises(ConfigError, match="section must be"):
        parse_set_options(["optim.lr=1"])


def test_run_config_round_trip() -> None:
    cfg = RunConfig("pixelstats", model_config={"blur_sigma": 2.0})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
