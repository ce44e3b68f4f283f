"""The normal-only rule of ``benchmarks/variant_selection.py`` that chooses a detector's
default variant (issue 24): small tables with a known pick."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rule():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports _common
    try:
        path = ROOT / "benchmarks" / "variant_selection.py"
        spec = importlib.util.spec_from_file_location("variant_selection", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_the_highest_score_wins_only_beyond_the_margin(rule) -> None:
    d = rule.DEFAULT
    assert rule.pick({d: 0.80, "a": 0.83, "b": 0.82}, d) == "a"
    assert rule.pick({d: 0.80, "a": 0.804}, d) == d  # within the margin
    assert rule.pick({d: 0.80, "a": 0.805}, d) == d  # exactly the margin is not more
    assert rule.pick({d: 0.85, "a": 0.70}, d) == d
    assert rule.pick({d: 0.80, "a": 0.83, "b": 0.83}, d) == "a"  # tie: the earlier variant


def test_a_pick_must_stand_with_its_other_seeds(rule) -> None:
    d = rule.DEFAULT
    scores = {d: 0.80, "a": 0.83, "b": 0.82}
    assert rule.seed_checked(scores, {"a": [0.84]}, d) == "a"
    assert rule.seed_checked(scores, {"a": [0.84, 0.81]}, d) == d  # b would win over 0.81
    assert rule.seed_checked(scores, {"a": [0.802]}, d) == d  # within the margin of the default
    assert rule.seed_checked(scores, {"b": [0.70]}, d) == "a"  # only the pick's seeds count


def test_the_default_changes_only_to_a_variant_picked_on_every_dataset(rule) -> None:
    d = rule.DEFAULT
    assert rule.decide({"elpv": "a", "magnetic-tile": "a"}, d) == "a"
    assert rule.decide({"elpv": "a", "magnetic-tile": "b"}, d) == d
    assert rule.decide({"elpv": "a", "magnetic-tile": d}, d) == d


def test_apply_rule_on_rows(rule) -> None:
    d = rule.DEFAULT

    def row(dataset: str, variant: str, seed: int, auroc: float) -> dict:
        return {"dataset": dataset, "variant": variant, "seed": seed, "synthetic_auroc": auroc}

    rows = [
        row("elpv", d, 0, 0.80),
        row("elpv", "a", 0, 0.90),
        row("elpv", "a", 1, 0.88),
        row("mt", d, 0, 0.70),
        row("mt", "a", 0, 0.75),
        row("mt", "b", 0, 0.74),
    ]
    assert rule.apply_rule(rows) == ({"elpv": "a", "mt": "a"}, "a")
    rows[2]["synthetic_auroc"] = 0.79  # seed 1 of "a" falls below the default on elpv
    assert rule.apply_rule(rows) == ({"elpv": d, "mt": "a"}, d)


def test_variant_names_come_from_the_config(rule) -> None:
    assert rule.variant_name("deepsvdd", {"objective": "one-class"}) == rule.DEFAULT
    assert rule.variant_name("deepsvdd", {"objective": "soft-boundary"}) == (
        "objective=soft-boundary"
    )
    assert rule.variant_name("deepsvdd", {"feature_blocks": [2, 4, 10]}) == (
        "feature_blocks=2,4,10"
    )
    # an mlaae run from before the held-out term weights loads with equal weights
    assert rule.variant_name("mlaae", {"input": "features"}) == "term_weighting=mean"
    assert rule.variant_name("mlaae", {"input": "features", "term_weighting": None}) == (
        rule.DEFAULT
    )
