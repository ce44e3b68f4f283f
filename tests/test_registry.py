import pytest

from defectlab import registry
from defectlab.errors import ConfigError


def test_builtin_models_are_registered_by_family() -> None:
    names = {e.name: e.family for e in registry.available()}
    assert names["pixelstats"] == "detector"
    assert names["procedural"] == "synthesizer"
    assert all(e.description for e in registry.available())


def test_unknown_name_lists_alternatives() -> None:
    with pytest.raises(ConfigError, match=r"unknown detector or segmenter 'nope'.*pixelstats"):
        registry.get("nope", ("detector", "segmenter"))
    with pytest.raises(ConfigError, match="unknown synthesizer 'pixelstats'"):
        registry.get("pixelstats", "synthesizer")


def test_name_clash_is_refused() -> None:
    class Clash:
        name = "pixelstats"
        family = "detector"
        description = "x"

    with pytest.raises(ValueError, match="taken"):
        registry.register(Clash)
