"""PatchCore-style patch memory: greedy k-center coreset, memory budget, bounded streaming
pool, nearest-neighbour maps, PatchCore score re-weighting, checkpoints and resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab.components import memory
from defectlab.components.memory import PatchMemoryConfig, greedy_coreset
from defectlab.detect.patchmemory import PatchMemory
from defectlab.runs import load_checkpoint, restore_model, save_checkpoint
from defectlab.training import fit
from tests.conftest import striped_normals, to_nchw, with_square

SIZE = 64
PATCHES = (SIZE // 8) ** 2  # stride-8 grid: 64 patch features per image
SQUARE = (36, 16, 12)
#: a budget so small that the pool (314 rows) overflows after a few images
TINY = {"memory_bank_size": 64, "max_memory_mb": 0.3}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**overrides) -> PatchMemory:
    return PatchMemory(PatchMemoryConfig(**overrides), image_size=SIZE)


def _fit(model: PatchMemory, run_dir: Path, images: np.ndarray, **kwargs) -> PatchMemory:
    fit(model, images, run_dir=run_dir, batch_size=8, progress=False, **kwargs)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> PatchMemory:
    model = _model(coreset_ratio=0.25)
    return _fit(model, tmp_path_factory.mktemp("pm"), striped_normals(32))


# --- greedy k-center -------------------------------------------------------------------------
def _naive_greedy(points: np.ndarray, k: int, start: int) -> list[int]:
    picks = [start]
    for _ in range(1, k):
        d = np.min(
            [np.linalg.norm(points - points[p], axis=1) for p in picks], axis=0
        )  # distance to the nearest pick
        picks.append(int(np.argmax(d)))
    return picks


def test_greedy_k_center_picks_the_farthest_point_each_time() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    picks = greedy_coreset(points, 25, projection=None, start=7)
    assert picks.tolist() == _naive_greedy(points.numpy(), 25, 7)
    assert len(set(picks.tolist())) == 25
    # covering radius: every point lies within r of a pick, and the picks are ≥ r apart
    # (so the greedy radius is at most twice the optimal one)
    dist = torch.cdist(points, points[picks])
    radius = dist.min(dim=1).values.max()
    pairwise = torch.cdist(points[picks], points[picks]) + torch.eye(25) * 1e9
    assert pairwise.min() >= radius - 1e-9
    # everything asked for (or more) → all rows
    assert greedy_coreset(points[:10], 10, projection=None, start=0).tolist() == list(range(10))


def test_greedy_picks_are_a_deterministic_function_of_seed_and_data(tmp_path: Path) -> None:
    images = striped_normals(16)
    a = _fit(_model(coreset_ratio=0.1, seed=3), tmp_path / "a", images)
    b = _fit(_model(coreset_ratio=0.1, seed=3), tmp_path / "b", images)
    c = _fit(_model(coreset_ratio=0.1, seed=4), tmp_path / "c", images)
    d = _fit(_model(coreset_ratio=0.1, seed=3), tmp_path / "d", striped_normals(16, seed=1))
    assert torch.equal(a.memory, b.memory)
    assert not torch.equal(a.memory, c.memory)  # another projection and first pick
    assert not torch.equal(a.memory, d.memory)


def test_greedy_picks_do_not_depend_on_the_thread_count() -> None:
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(5000, 40, generator=generator)
    projection = torch.randn(40, 16, generator=generator)
    one = greedy_coreset(points, 50, projection=projection, start=3)
    torch.set_num_threads(2)  # the module's one_thread fixture restores the count after
    two = greedy_coreset(points, 50, projection=projection, start=3)
    assert torch.get_num_threads() == 2  # the search's own single thread is undone
    assert torch.equal(one, two)


# --- budget and bounded memory ------------------------------------------------------------------
def test_coreset_size_respects_ratio_and_budget(tmp_path: Path) -> None:
    images = striped_normals(16)  # 1024 patches
    by_ratio = _fit(_model(coreset_ratio=0.05), tmp_path / "r", images)
    assert by_ratio.memory.shape == (math.ceil(0.05 * 16 * PATCHES), 152)
    by_budget = _fit(_model(coreset_ratio=0.5, memory_bank_size=100), tmp_path / "b", images)
    assert by_budget.memory.shape == (100, 152)
    # the memory rows are real training patches
    rows = PatchMemory._rows(by_budget.embed(to_nchw(images)))
    exact = torch.cdist(
        by_budget.memory.double(), rows.double(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    assert exact.min(dim=1).values.max() < 1e-3  # batch-size rounding only


def test_pool_never_exceeds_its_cap_when_fed_ten_times_more_images(
    tmp_path: Path, monkeypatch
) -> None:
    cfg = PatchMemoryConfig(**TINY)
    assert cfg.pool_rows == 314
    sizes: list[tuple[int, int]] = []
    coreset_inputs: list[int] = []
    original_step, original_greedy = PatchMemory.training_step, memory.greedy_coreset

    def spy_step(self, batch):
        out = original_step(self, batch)
        sizes.append((self.pool_size, self._pool.shape[0]))
        return out

    def spy_greedy(features, k, **kwargs):
        coreset_inputs.append(features.shape[0])
        return original_greedy(features, k, **kwargs)

    monkeypatch.setattr(PatchMemory, "training_step", spy_step)
    monkeypatch.setattr(memory, "greedy_coreset", spy_greedy)
    small = _fit(_model(**TINY), tmp_path / "small", striped_normals(16))
    small_sizes, sizes[:] = list(sizes), []
    large = _fit(_model(**TINY), tmp_path / "large", striped_normals(160, seed=2))
    assert len(sizes) == 20 and large.patches_seen == 160 * PATCHES
    assert max(valid for valid, _ in small_sizes + sizes) <= cfg.pool_rows
    assert {capacity for _, capacity in small_sizes + sizes} == {cfg.pool_rows}  # one buffer
    assert large.peak_pool_rows <= cfg.pool_rows and large.reductions > 20
    assert max(coreset_inputs) <= cfg.pool_rows
    assert small.memory.shape[0] == large.memory.shape[0] == 64
    assert large._pool is None  # the pool is freed once the memory bank is built


def test_budget_too_small_for_the_memory_bank_is_refused() -> None:
    with pytest.raises(ValueError, match=r"max_memory_mb=0.1 .* at least 1"):
        PatchMemoryConfig(memory_bank_size=64, max_memory_mb=0.1)
    with pytest.raises(ValueError, match="epochs must be 1"):
        PatchMemoryConfig(epochs=2)
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchMemoryConfig(coreset_ratio=0.0)
    with pytest.raises(ValueError, match="patch_size"):
        PatchMemoryConfig(patch_size=2)
    with pytest.raises(ValueError, match="score must be"):
        PatchMemoryConfig(score="mean")


# --- inference ----------------------------------------------------------------------------------
def test_training_patches_are_at_distance_zero_with_the_full_memory(tmp_path: Path) -> None:
    images = striped_normals(8)
    model = _fit(_model(coreset_ratio=1.0, score="max", map_sigma=0.0), tmp_path / "full", images)
    assert model.memory.shape[0] == 8 * PATCHES
    train = model.predict(to_nchw(images[:4]))
    unseen = model.predict(to_nchw(striped_normals(4, seed=9)))
    assert train.scores.max() < 1e-2 * unseen.scores.min()
    assert train.maps.abs().max() < 1e-2 * unseen.maps.mean()


def test_separates_an_obvious_anomaly_and_localises_it(trained: PatchMemory) -> None:
    normals = striped_normals(8, seed=3)
    with torch.inference_mode():
        good = trained.predict(to_nchw(normals))
        bad = trained.predict(to_nchw(with_square(normals, *SQUARE)))
    assert good.maps.shape == (8, SIZE, SIZE) and good.scores.shape == (8,)
    assert bad.scores.min() > good.scores.max()
    top, left, side = SQUARE
    for m in bad.maps:
        y, x = np.unravel_index(int(m.argmax()), m.shape)
        assert top - 6 <= y < top + side + 6 and left - 6 <= x < left + side + 6


def test_reweighted_score_follows_patchcore(trained: PatchMemory) -> None:
    images = to_nchw(with_square(striped_normals(3, seed=4), *SQUARE))
    plain = PatchMemory(PatchMemoryConfig(coreset_ratio=0.25, score="max"), image_size=SIZE)
    plain.load_state_dict(trained.state_dict())
    weighted, maximum = trained.predict(images).scores, plain.predict(images).scores
    # brute force, image by image, with full distance matrices
    memory = trained.memory
    for i in range(3):
        patches = PatchMemory._rows(trained.embed(images[i : i + 1]))
        dist = torch.cdist(patches, memory)
        nearest = dist.min(dim=1)
        worst = int(nearest.values.argmax())
        s_star = nearest.values[worst]
        m_star = memory[nearest.indices[worst]]
        support = torch.cdist(m_star[None], memory)[0].topk(9, largest=False).indices
        d = torch.linalg.vector_norm(patches[worst] - memory[support], dim=1)
        expected = (1 - torch.exp(d[0]) / torch.exp(d).sum()) * s_star
        assert torch.allclose(maximum[i], s_star, rtol=1e-4)
        assert torch.allclose(weighted[i], expected, rtol=1e-4)
    assert (weighted < maximum).all()


def test_save_load_gives_identical_scores(trained: PatchMemory, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, trained)
    clone = _model(coreset_ratio=0.25)
    with pytest.raises(RuntimeError, match="before fit"):
        clone.predict(torch.rand(1, 1, SIZE, SIZE))
    restore_model(load_checkpoint(path, "patchmemory"), clone, path)
    images = to_nchw(with_square(striped_normals(4, seed=6), *SQUARE))
    a, b = trained.predict(images), clone.predict(images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_interrupted_training_resumes_to_the_same_memory(tmp_path: Path, monkeypatch) -> None:
    images = striped_normals(48, seed=5)  # 6 steps of 8 images; the tiny pool overflows repeatedly
    reference = _fit(_model(**TINY), tmp_path / "ref", images, checkpoint_every=2)

    calls = {"n": 0}
    original = PatchMemory.training_step

    def interrupted_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(PatchMemory, "training_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(**TINY), tmp_path / "run", images, checkpoint_every=2)
    monkeypatch.setattr(PatchMemory, "training_step", original)
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", "patchmemory")
    assert saved["training"]["global_step"] == 4 and saved["training"]["model"]["reductions"] > 0
    resumed = _fit(_model(**TINY), tmp_path / "run", images, checkpoint_every=2, resume=True)
    assert torch.equal(resumed.memory, reference.memory)
    # the epoch-end checkpoint holds the final memory bank, not the pool
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", "patchmemory")
    assert final["training"]["model"]["pool"].shape[0] == 0
    assert torch.equal(final["state"]["memory"], reference.memory)
