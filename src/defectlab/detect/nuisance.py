"""Image statistics that move a detector's score without being defects, and their removal.

A reconstruction residual grows with how bright and how textured an image is: on magnetic
tile and ELPV, 40–70% of the spread of the autoencoders' image scores among *normal* test
images is predicted by five image statistics (``benchmarks/score_confounds.py``). That spread
swamps the smaller rise a defect causes. :class:`ScoreNormalizer` fits, on normal training
images only, a linear model of the score from those statistics and subtracts its prediction,
so what remains is the part of the score that brightness and texture do not explain. It
needs no defect labels, and it is plain tensor arithmetic, so it exports to ONNX with the
model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: what :func:`image_statistics` measures, in column order
STATISTICS = (
    "brightness",
    "contrast",
    "vertical-streak energy",
    "row texture",
    "fine detail",
)


def image_statistics(images: torch.Tensor) -> torch.Tensor:
    """Per-image statistics ``(B, 5)`` of images ``(B, C, H, W)`` in [0, 1] (channel mean):
    mean brightness, contrast (standard deviation), vertical-streak energy (mean absolute
    difference between neighbouring columns), row texture (the same between rows) and fine
    detail (mean absolute difference to a 5×5 box blur)."""
    grey = images.float().mean(dim=1, keepdim=True)
    blurred = F.avg_pool2d(grey, 5, stride=1, padding=2, count_include_pad=False)
    return torch.stack(
        [
            grey.mean(dim=(1, 2, 3)),
            grey.flatten(1).std(dim=1, unbiased=False),
            (grey[..., 1:] - grey[..., :-1]).abs().mean(dim=(1, 2, 3)),
            (grey[..., 1:, :] - grey[..., :-1, :]).abs().mean(dim=(1, 2, 3)),
            (grey - blurred).abs().mean(dim=(1, 2, 3)),
        ],
        dim=1,
    )


class ScoreNormalizer:
    """Removes the part of an image score that :func:`image_statistics` predict linearly.

    ``fit`` on the scores and statistics of normal images (ridge regression on standardised
    statistics); ``__call__`` returns ``score − prediction + mean fitted score``, so normal
    images keep scores on their old scale. Unfitted, it returns scores unchanged.
    """

    def __init__(self, ridge: float = 1e-3) -> None:
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.ridge = ridge
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.coef: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.coef is not None

    def fit(self, scores: torch.Tensor, statistics: torch.Tensor) -> ScoreNormalizer:
        """Fit on ``scores`` (N,) and ``statistics`` (N, S) of N normal images, N > S."""
        scores, statistics = scores.double().cpu(), statistics.double().cpu()
        n, s = statistics.shape
        if len(scores) != n:
            raise ValueError(f"{len(scores)} scores for {n} rows of statistics")
        if n <= s + 1:
            raise ValueError(
                f"fitting {s} statistics needs more than {s + 1} normal images, got {n}"
            )
        if not (torch.isfinite(scores).all() and torch.isfinite(statistics).all()):
            raise ValueError("non-finite scores or statistics: cannot fit the normalizer")
        self.mean = statistics.mean(dim=0)
        self.std = statistics.std(dim=0, unbiased=False).clamp_min(1e-12)
        design = (statistics - self.mean) / self.std
        centred = scores - scores.mean()
        gram = design.T @ design + self.ridge * n * torch.eye(s, dtype=torch.float64)
        self.coef = torch.linalg.solve(gram, design.T @ centred)
        return self

    def __call__(self, scores: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        if self.coef is None or self.mean is None or self.std is None:
            return scores
        device = scores.device
        design = (statistics.to(device, torch.float32) - self.mean.to(device, torch.float32)) / (
            self.std.to(device, torch.float32)
        )
        return scores - design @ self.coef.to(device, torch.float32)

    def state_dict(self) -> dict[str, Any] | None:
        if self.coef is None:
            return None
        return {"mean": self.mean, "std": self.std, "coef": self.coef, "ridge": self.ridge}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self.mean = self.std = self.coef = None
            return
        self.ridge = float(state["ridge"])
        self.mean, self.std, self.coef = state["mean"], state["std"], state["coef"]
