"""Area-ratio pseudo-labels: hand-made rankings, label shares, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectlab.segment.arearatio.pseudolabels import pseudo_labels

pytestmark = pytest.mark.usefixtures("one_thread")

# ranked by score: vertex 0, 2, 5, 3, 4, 1 with areas 10, 10, 20, 30, 10, 20 (total 100):
# cumulative area 10, 20, 40, 70, 80, 100
SCORES = torch.tensor([0.9, 0.1, 0.8, 0.5, 0.3, 0.7])
AREAS = torch.tensor([10.0, 20.0, 10.0, 30.0, 10.0, 20.0])


@pytest.mark.parametrize(
    ("rule", "ratio", "margin", "expected"),
    [
        ("area", 0.4, 0.0, [1, 0, 1, 0, 0, 1]),  # cut exactly after vertex 5
        ("area", 0.4, 0.1, [1, 0, 1, -1, 0, -1]),  # target ≤ 30, background from 50
        ("area", 0.3, 0.0, [1, 0, 1, 0, 0, -1]),  # vertex 5 straddles the cut at 30
        ("area", 0.0, 0.0, [0, 0, 0, 0, 0, 0]),
        ("area", 1.0, 0.0, [1, 1, 1, 1, 1, 1]),
        ("area", 0.05, 0.0, [-1, 0, 0, 0, 0, 0]),  # the top vertex alone exceeds 5 %
        ("count", 0.5, 0.0, [1, 0, 1, 0, 0, 1]),  # k = 3
        ("count", 0.5, 0.1, [1, 0, 1, -1, 0, -1]),  # ⌊2.4⌋ = 2 target, from rank ⌈3.6⌉ = 4 bg
        ("count", 0.3, 0.0, [1, 0, -1, 0, 0, 0]),  # ⌊1.8⌋ = 1, ⌈1.8⌉ = 2
        ("count", 1.0, 0.0, [1, 1, 1, 1, 1, 1]),
    ],
)
def test_pseudo_labels_on_a_hand_made_graph(rule, ratio, margin, expected) -> None:
    labels = pseudo_labels(SCORES, AREAS, ratio, margin, rule)
    assert labels.dtype == torch.long
    assert labels.tolist() == expected


@pytest.mark.parametrize("rule", ["area", "count"])
def test_pseudo_label_shares_follow_ratio_and_margin(rule: str) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(2, 40, (1,), generator=generator))
        scores = torch.rand(n, generator=generator)
        areas = torch.randint(1, 50, (n,), generator=generator).float()
        ratio, margin = float(torch.rand(1, generator=generator)), 0.05
        labels = pseudo_labels(scores, areas, ratio, margin, rule)
        order = scores.argsort(descending=True, stable=True)
        # target vertices are a prefix of the ranking, background a suffix, ignored between
        ranked = torch.tensor([1, 0, 2])[labels[order] + 1]
        assert torch.equal(ranked, ranked.sort(descending=True).values)
        if rule == "area":
            total = areas.sum()
            assert areas[labels == 1].sum() <= max(0, ratio - margin) * total + 1e-6
            assert areas[labels == 0].sum() <= max(0, 1 - ratio - margin) * total + 1e-6
            # maximal: the next vertex on either side would cross its cut
            k = int((labels == 1).sum())
            assert areas[order[: k + 1]].sum() > (ratio - margin) * total
        else:
            assert int((labels == 1).sum()) == max(0, int(np.floor((ratio - margin) * n)))
            assert int((labels == 0).sum()) == n - min(n, int(np.ceil((ratio + margin) * n)))


def test_pseudo_labels_refuse_bad_ratio_margin_and_rule() -> None:
    with pytest.raises(ValueError, match="area_ratio must be in"):
        pseudo_labels(SCORES, AREAS, 1.2)
    with pytest.raises(ValueError, match="area_margin"):
        pseudo_labels(SCORES, AREAS, 0.3, 0.5)
    with pytest.raises(ValueError, match="pseudo_label_rule"):
        pseudo_labels(SCORES, AREAS, 0.3, 0.0, "median")
