"""PatchCore-style patch memory on frozen EfficientNet-Lite features (Roth et al., CVPR 2022).

* **Patch features**: the outputs of two stages of the ImageNet EfficientNet-Lite
  ``backbone`` (lite0, lite1 or lite2; ``feature_blocks``, default its last stride-8 and
  stride-16 blocks: 40 + 112 channels for Lite0 and Lite1, 48 + 120 for Lite2), each
  locally aggregated with a ``patch_size`` × ``patch_size`` average pool (stride 1, borders
  averaged over the pixels inside), the coarser one bilinearly up-sampled to the finer grid,
  concatenated: one D-dimensional vector per stride-8 location (D = 152 for Lite0).
* **Memory bank with a budget**: training is one streaming pass (``epochs`` must be 1). The
  patch features go into a candidate *pool* whose row count never exceeds ``pool_rows``
  (set by ``max_memory_mb``: the pool, its random projection and the distance workspace of
  the coreset search fit in that many MiB). Before a batch would overflow it, the pool is
  reduced by greedy k-center coreset selection to ``memory_bank_size`` rows (composable
  coresets: the k-center cover of a union of covers is a cover of the union up to a factor
  of two), and incoming patches are added in chunks that fit. After the pass (end of the
  single epoch; :meth:`PatchMemoryBank.finish_training` is a fallback) the final coreset is
  ``min(memory_bank_size, ceil(coreset_ratio · patches seen))`` rows of the pool. With
  ``coreset_ratio=1`` and a pool that never overflowed, the memory bank is every training
  patch.
* **Greedy k-center** (Sener & Savarese; PatchCore's "approximate greedy coreset"): start
  from a seeded random row, repeatedly add the row farthest from the selected set. Distances
  are computed on a Gaussian random projection to ``projection_dim`` dimensions (fixed by
  ``seed``; 0 = the full features). Picks are a deterministic function of seed and data.
* **Anomaly map**: Euclidean distance of each patch to its nearest memory row
  (``torch.cdist`` in query chunks of bounded size), bilinearly up-sampled to the image and
  smoothed with a Gaussian of ``map_sigma`` pixels.
* **Image score**: ``score="reweighted"`` (PatchCore eq. 7): s* = the largest patch
  distance, m* its nearest memory row, N_b(m*) the ``num_neighbors`` memory rows nearest to
  m* (m* included), and ``score = (1 − softmax_{m ∈ N_b(m*)}(−‖x* − m‖)[m*]) · s*`` as in
  the paper's formula ``1 − exp‖x* − m*‖ / Σ exp‖x* − m‖``, implemented — like the reference
  implementations — as one minus the softmax of the *distances* at m*. ``score="max"``: s*.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm import tqdm

from defectlab.base import Prediction, Scorer
from defectlab.components.features import (
    LiteFeatureConfig,
    check_identity,
    model_features,
    patch_embedding,
)
from defectlab.ops import gaussian_blur

SCORES = ("reweighted", "max")
#: bytes a cdist chunk at inference may use (query rows × memory rows × 4 bytes)
_CDIST_BYTES = 64 * 2**20
#: coreset searches of at least this many picks show a progress bar on a terminal
_PROGRESS_PICKS = 2048


@dataclass
class MemoryBankConfig(LiteFeatureConfig):
    """The coreset memory of normal patch features: which features, how many rows, and the
    RAM budget of building it (shared by ``patchmemory`` and the models built on it)."""

    #: side of the local average-pooling neighbourhood (odd; 1 = none)
    patch_size: int = 3
    #: final memory bank = min(memory_bank_size, ceil(coreset_ratio × training patches)) rows
    coreset_ratio: float = 0.1
    memory_bank_size: int = 16384
    #: RAM budget of the candidate pool during training (features + projection + distances)
    max_memory_mb: float = 256.0
    #: dimensions of the random projection used by the coreset search (0 = none)
    projection_dim: int = 64
    #: seed of the projection and of the first coreset pick
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd number, got {self.patch_size}")
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.memory_bank_size < 1:
            raise ValueError(f"memory_bank_size must be >= 1, got {self.memory_bank_size}")
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0, got {self.projection_dim}")
        needed = _min_budget_mb(self)
        if self.max_memory_mb < needed:
            raise ValueError(
                f"max_memory_mb={self.max_memory_mb} cannot hold a pool of twice "
                f"memory_bank_size={self.memory_bank_size} rows of {self.feature_dim} "
                f"dimensions; raise it to at least {math.ceil(needed)} or lower memory_bank_size"
            )

    def memory_bank_config(self) -> PatchMemoryConfig:
        """These memory settings as a ``patchmemory`` config (for a model built on one)."""
        names = [f.name for f in fields(MemoryBankConfig) if f.name != "epochs"]
        return PatchMemoryConfig(**{name: getattr(self, name) for name in names})

    @property
    def row_bytes(self) -> int:
        """Bytes per pool row: the feature, its projection and the coreset search's three
        distance vectors (float32)."""
        dim = self.feature_dim
        search = self.projection_dim if 0 < self.projection_dim < dim else 0
        return 4 * (dim + search + 3)

    @property
    def pool_rows(self) -> int:
        """Most rows the candidate pool may ever hold: the budget minus one memory bank (the
        gathered coreset of a reduction), divided by :attr:`row_bytes`."""
        free = self.max_memory_mb * 2**20 - 4 * self.memory_bank_size * self.feature_dim
        return int(free // self.row_bytes)


@dataclass
class PatchMemoryConfig(MemoryBankConfig):
    #: one streaming pass over the normal images
    epochs: int = 1
    #: image score: "reweighted" (PatchCore's neighbourhood re-weighting) or "max"
    score: str = "reweighted"
    #: size of the memory neighbourhood N_b used by the re-weighting
    num_neighbors: int = 9
    #: Gaussian smoothing of the up-sampled map, in pixels (PatchCore: 4)
    map_sigma: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs != 1:
            raise ValueError("patchmemory makes a single pass over the data: epochs must be 1")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.num_neighbors < 1:
            raise ValueError(f"num_neighbors must be >= 1, got {self.num_neighbors}")
        if self.map_sigma < 0:
            raise ValueError(f"map_sigma must be >= 0, got {self.map_sigma}")


def _min_budget_mb(cfg: MemoryBankConfig) -> float:
    """Budget for a pool of twice the bank (each reduction then frees at least half)."""
    return (
        2 * cfg.memory_bank_size * cfg.row_bytes + 4 * cfg.memory_bank_size * cfg.feature_dim
    ) / 2**20


def seeded_fold(n: int, count: int, seed: int) -> torch.Tensor:
    """Which of ``n`` training images form a memory: ``count`` of them, picked by a
    permutation seeded by ``seed`` (bool (n,)). Models that train on the rest leave these
    out, because their own patches are in the memory at distance zero."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fold = torch.zeros(n, dtype=torch.bool)
    fold[order[:count]] = True
    return fold


def greedy_coreset(
    features: torch.Tensor, k: int, *, projection: torch.Tensor | None, start: int
) -> torch.Tensor:
    """Indices (k,) of a greedy k-center cover of ``features`` (N, D), first pick ``start``.

    Each step adds the row farthest (Euclidean, on ``features @ projection`` when given) from
    the rows picked so far; ties go to the lowest index. Workspace: the projected copy (N, d)
    and three length-N vectors; time O(N·k·d) in k sequential, vectorised steps. On a CPU the
    steps run on one thread: each is a short memory-bound pass, and on a shared machine the
    hand-offs between threads cost several times what they save (and picks then do not
    depend on the thread count)."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    points = features @ projection if projection is not None else features
    sq_norms = (points * points).sum(dim=1)

    def sq_dist(index: torch.Tensor | int) -> torch.Tensor:
        return (sq_norms - 2.0 * torch.mv(points, points[index]) + sq_norms[index]).clamp_min_(0)

    picks = torch.empty(k, dtype=torch.long, device=features.device)
    picks[0] = start
    min_dist = sq_dist(start)
    # minutes on a busy CPU for a large bank: a bar on an interactive terminal only
    bar = tqdm(
        total=k,
        desc=f"coreset of {n} patches",
        disable=None if k >= _PROGRESS_PICKS else True,
        leave=False,
        file=sys.stderr,
        mininterval=1.0,
    )
    threads = torch.get_num_threads()
    if features.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for i in range(1, k):  # greedy: each pick depends on the previous ones
            index = torch.argmax(min_dist)
            picks[i] = index
            torch.minimum(min_dist, sq_dist(index), out=min_dist)
            if i % 256 == 0:
                bar.update(256)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return picks


def nearest_distances(
    queries: torch.Tensor, memory: torch.Tensor, k: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (Q, k) and indices (Q, k) of each query's k nearest memory rows,
    via ``torch.cdist`` over query chunks of at most ``_CDIST_BYTES`` of distances. Both are
    first centred on the memory mean: cdist's matrix-product formula loses precision with
    large norms."""
    k = min(k, memory.shape[0])
    offset = memory.mean(dim=0)
    queries, memory = queries - offset, memory - offset
    if torch.compiler.is_exporting():  # a graph cannot loop over a symbolic batch: one cdist
        return torch.cdist(queries, memory).topk(k, dim=1, largest=False)
    chunk = max(1, _CDIST_BYTES // (4 * memory.shape[0]))
    dists, indices = [], []
    for start in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[start : start + chunk], memory)
        values, index = d.topk(k, dim=1, largest=False)
        dists.append(values)
        indices.append(index)
    return torch.cat(dists), torch.cat(indices)


class PatchMemoryBank(Scorer):
    """The memory bank and its scoring; registered as the ``patchmemory`` detector and used
    inside ``memseg`` and ``arearatio-gcn``."""

    name: ClassVar[str] = "patchmemory"
    Config = PatchMemoryConfig
    config: PatchMemoryConfig

    def __init__(self, config: PatchMemoryConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        self.features = model_features(self, cfg)
        self.feature_dim = cfg.feature_dim
        self.pool_rows = cfg.pool_rows
        generator = torch.Generator().manual_seed(cfg.seed)
        self._projection = (
            (torch.randn(self.feature_dim, cfg.projection_dim, generator=generator)).to(self.device)
            / math.sqrt(cfg.projection_dim)
            if 0 < cfg.projection_dim < self.feature_dim
            else None
        )
        # training state: the candidate pool, a buffer of ``pool_rows`` rows allocated once on
        # first use (on CPU untouched pages cost no RAM) of which the first ``pool_size`` are
        # valid; patches seen; coreset reductions so far
        self._pool: torch.Tensor | None = None
        self.pool_size = 0
        self._seen = 0
        self._reductions = 0
        #: largest pool row count reached so far (diagnostic; never above ``pool_rows``)
        self.peak_pool_rows = 0
        self.memory: torch.Tensor | None = None

    # --- features ------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aggregated, concatenated patch features (B, D, h, w) on the finest grid."""
        return patch_embedding(self.features(images.to(self.device)), self.config.patch_size)

    @staticmethod
    def _rows(embedding: torch.Tensor) -> torch.Tensor:
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])

    # --- coreset -------------------------------------------------------------------------------
    def _start_index(self, n: int) -> int:
        """The seeded first pick of the r-th reduction (deterministic, resumable)."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self._reductions)
        return int(torch.randint(n, (1,), generator=generator))

    def coreset(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """Rows of ``features`` picked by the seeded greedy k-center search."""
        if k >= features.shape[0]:
            return features
        picks = greedy_coreset(
            features, k, projection=self._projection, start=self._start_index(features.shape[0])
        )
        self._reductions += 1
        return features[picks]

    def _pool_buffer(self) -> torch.Tensor:
        if self._pool is None:
            self._pool = torch.empty(self.pool_rows, self.feature_dim, device=self.device)
        return self._pool

    def _add(self, rows: torch.Tensor) -> None:
        """Copy rows into the pool, reducing it to ``memory_bank_size`` rows by a coreset
        first whenever they would not fit; the pool never holds more than ``pool_rows``."""
        pool = self._pool_buffer()
        bank = self.config.memory_bank_size
        for chunk in rows.split(self.pool_rows - bank):
            if self.pool_size + chunk.shape[0] > self.pool_rows:
                kept = self.coreset(pool[: self.pool_size], bank)
                pool[: kept.shape[0]] = kept
                self.pool_size = kept.shape[0]
                del kept
            pool[self.pool_size : self.pool_size + chunk.shape[0]] = chunk
            self.pool_size += chunk.shape[0]
            self.peak_pool_rows = max(self.peak_pool_rows, self.pool_size)

    # --- training ------------------------------------------------------------------------------
    @property
    def patches_seen(self) -> int:
        """Training patches added so far."""
        return self._seen

    @property
    def reductions(self) -> int:
        """Coreset reductions made so far (pool overflows plus the final one)."""
        return self._reductions

    @torch.no_grad()
    def add_images(self, images: torch.Tensor) -> None:
        """Add the patch features of normal images (B, C, H, W) to the candidate pool (also
        for models that build their memory from a share of their batches)."""
        if self.memory is not None:
            raise RuntimeError("patchmemory: the memory bank is final; make a new model to refit")
        rows = self._rows(self.embed(images))
        self._seen += rows.shape[0]
        self._add(rows)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.add_images(batch["image"])
        return {}

    def _finalize(self) -> None:
        if self.memory is not None:
            return
        if self._seen == 0:
            raise RuntimeError("patchmemory: training saw no images")
        target = min(
            self.config.memory_bank_size, math.ceil(self.config.coreset_ratio * self._seen)
        )
        pool = self._pool_buffer()[: self.pool_size]
        self.memory = self.coreset(pool, target).clone()  # own storage: the pool is freed
        self._pool, self.pool_size = None, 0

    def end_epoch(self, epoch: int) -> None:
        # epochs is 1, so this is the end of training: do the final coreset now, so the
        # epoch-end checkpoint holds the small memory bank instead of the whole pool
        self._finalize()

    def finish_training(self) -> None:
        self._finalize()

    # --- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def patch_distances(self, images: torch.Tensor) -> torch.Tensor:
        """Distance of each patch of ``images`` (B, C, H, W) to its nearest memory row, on
        the patch grid (B, 1, h, w): the raw map, for models built on the memory."""
        if self.memory is None:
            raise RuntimeError("patchmemory: no memory bank yet (fit first)")
        embedding = self.embed(images.to(self.device))
        b, _, h, w = embedding.shape
        dist, _ = nearest_distances(self._rows(embedding), self.memory, 1)
        return dist.view(b, 1, h, w)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.memory is not None, "no memory bank")
        images = images.to(self.device)
        embedding = self.embed(images)
        b, _, h, w = embedding.shape
        queries = self._rows(embedding)
        k = self.config.num_neighbors if self.config.score == "reweighted" else 1
        dist, index = nearest_distances(queries, self.memory, 1)
        patch = dist[:, 0].view(b, h, w)
        maps = F.interpolate(
            patch[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        maps = gaussian_blur(maps, self.config.map_sigma)[:, 0]
        flat = patch.flatten(1)
        worst = flat.argmax(dim=1)  # (B,) the patch with the largest distance
        scores = flat.gather(1, worst[:, None])[:, 0]
        if self.config.score == "reweighted":
            rows = torch.arange(b, device=self.device)
            worst_rows = rows * h * w + worst
            x_star = queries[worst_rows]  # (B, D)
            m_star = self.memory[index[worst_rows, 0]]  # (B, D)
            _, support = nearest_distances(m_star, self.memory, k)  # (B, k), m* first
            d = torch.linalg.vector_norm(x_star[:, None] - self.memory[support], dim=2)
            weights = 1.0 - torch.softmax(d, dim=1)[:, 0]
            scores = weights * scores
        return Prediction(scores, maps)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"backbone": self.features.identity(), "seen": self._seen}
        if self.memory is not None:
            state["memory"] = self.memory.cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_identity(self.name, dict(state["backbone"]), self.features.identity())
        self._seen = int(state["seen"])
        memory = state.get("memory")
        if memory is not None and (memory.ndim != 2 or memory.shape[1] != self.feature_dim):
            raise ValueError(
                f"patchmemory: memory bank has shape {tuple(memory.shape)}, "
                f"need (M, {self.feature_dim})"
            )
        self.memory = memory.float().to(self.device) if memory is not None else None

    def training_state(self) -> dict[str, Any]:
        pool = self._pool[: self.pool_size] if self._pool is not None else None
        return {
            "pool": pool.cpu().clone() if pool is not None else torch.empty(0, self.feature_dim),
            "reductions": self._reductions,
            "peak_pool_rows": self.peak_pool_rows,
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        pool = state["pool"].float()
        if pool.ndim != 2 or pool.shape[1] != self.feature_dim or len(pool) > self.pool_rows:
            raise ValueError(
                f"patchmemory: saved pool has shape {tuple(pool.shape)}, need at most "
                f"({self.pool_rows}, {self.feature_dim})"
            )
        self._pool, self.pool_size = None, 0
        if len(pool):
            self._pool_buffer()[: len(pool)] = pool.to(self.device)
            self.pool_size = len(pool)
        self._reductions = int(state["reductions"])
        self.peak_pool_rows = int(state["peak_pool_rows"])
