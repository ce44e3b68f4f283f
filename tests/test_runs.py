"""Seeding: same seed, same draws; on CUDA, deterministic kernels are asked for."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from defectlab.runs import seed_everything


def test_same_seed_same_draws() -> None:
    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((random.random(), np.random.rand(), torch.rand(3).tolist()))
    assert draws[0] == draws[1]
    seed_everything(8)
    assert (random.random(), np.random.rand(), torch.rand(3).tolist()) != draws[0]


def test_cuda_asks_for_deterministic_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU here, CUDA is faked: the flags, not the kernels, are what is checked."""
    before = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    # set, then deleted: monkeypatch restores the variable's original state afterwards
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        seed_everything(0)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])
