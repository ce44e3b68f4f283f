"""Data-parallel training (defectlab.distributed): two CPU processes with gloo train to the
same weights as one process with the same global batch; refusals and single-writer files.

The equivalence test trains a small model without BatchNorm or randomness whose losses are
batch means, so averaging the ranks' gradients weighted by their batch share gives the
whole batch's gradient: distributed and single-process training then differ only by
floating-point rounding (a sum of two half-batch means is not bit-for-bit the mean of the
batch), about 1e-7 on the weights after a few steps; the tests allow 1e-5.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import defectlab.api as dl
from defectlab import cli, training
from defectlab import distributed as dist
from defectlab.base import Model, ModelConfig, Prediction
from defectlab.errors import ConfigError
from defectlab.runs import load_checkpoint
from defectlab.training import _shard, fit

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD_SIZE = 2
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TinyConfig(ModelConfig):
    epochs: int = 2


class TinyTwoNets(Model):
    """A conv reconstruction net (Adam, weight decay) and a linear head (SGD + momentum)
    with separate backward passes and optimisers kept in a dict, as a GAN keeps them; the
    net has a spare layer that never gets a gradient (Adam must skip it, not decay it)."""

    name: ClassVar[str] = "tiny-two-nets"
    family: ClassVar[str] = "detector"
    description: ClassVar[str] = "test model"
    Config = TinyConfig

    def __init__(self, config: TinyConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        torch.manual_seed(123)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1)
        )
        self.spare = nn.Linear(3, 3)
        self.head = nn.Linear(1, 1)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def setup_training(self, n_train: int) -> None:
        self.optimizers = {
            "net": torch.optim.Adam(
                [*self.net.parameters(), *self.spare.parameters()], lr=1e-2, weight_decay=0.1
            ),
            "head": torch.optim.SGD(self.head.parameters(), lr=0.1, momentum=0.9),
        }

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        images = batch["image"]
        recon = self.net(images)
        loss = F.mse_loss(recon, images)
        self.optimizers["net"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["net"].step()
        level = self.head(recon.detach().mean(dim=(1, 2, 3))[:, None])[:, 0]
        head_loss = F.mse_loss(level, images.mean(dim=(1, 2, 3)))
        self.optimizers["head"].zero_grad(set_to_none=True)
        head_loss.backward()
        self.optimizers["head"].step()
        return {"loss": loss.item(), "head": head_loss.item()}

    def predict(self, images: torch.Tensor) -> Prediction:
        maps = (self.net(images) - images).abs()[:, 0]
        return Prediction(maps.flatten(1).mean(dim=1), maps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": dict(self.net.state_dict()),
            "spare": dict(self.spare.state_dict()),
            "head": dict(self.head.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.spare.load_state_dict(state["spare"])
        self.head.load_state_dict(state["head"])

    def training_state(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 8, 8, 1), dtype=np.float32)


#: (name, images, batch size): equal shards and a last batch of 1 image (rank 1 pads with
#: weight 0); shards of 2 and 1 images (weights 2/3 and 1/3)
SCENARIOS = (("pad", 9, 4), ("uneven", 9, 3))


def _train(run_dir: Path, n: int, batch_size: int, epochs: int = 2, **kwargs: Any) -> tuple:
    model = TinyTwoNets(TinyConfig(epochs=epochs), image_size=8)
    history = fit(
        model,
        _images(n),
        run_dir=run_dir,
        batch_size=batch_size,
        seed=3,
        checkpoint_every=2,
        progress=False,
        **kwargs,
    )
    return model.state_dict(), history


def _worker(rank: int, port: int, out: str) -> None:
    """One torchrun-like process: every scenario, then an interrupted run resumed."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    writes = {"n": 0}
    save, write_csv = training.save_checkpoint, training.write_csv

    def counting(function):
        def wrapped(*args, **kwargs):
            writes["n"] += 1
            return function(*args, **kwargs)

        return wrapped

    training.save_checkpoint, training.write_csv = counting(save), counting(write_csv)
    context = dist.init_from_env("cpu")
    try:
        root = Path(out)
        results = {name: _train(root / name, n, bs, distributed=True) for name, n, bs in SCENARIOS}
        _, n, bs = SCENARIOS[0]
        _train(root / "resumed", n, bs, epochs=1, distributed=True)
        results["resumed"] = _train(root / "resumed", n, bs, resume=True, distributed=True)
        results["writes"] = writes["n"]
        torch.save(results, root / f"rank{rank}.pt")
    finally:
        dist.shutdown(context)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return ranks[0], ranks[1], out


def _assert_states_close(a: dict, b: dict, atol: float) -> None:
    for part in a:
        for key, value in a[part].items():
            torch.testing.assert_close(value, b[part][key], atol=atol, rtol=0, msg=f"{part}.{key}")


@pytest.mark.parametrize(("name", "n", "batch_size"), SCENARIOS)
def test_two_processes_train_like_one_with_the_same_global_batch(
    two_rank_results: tuple[dict, dict, Path], tmp_path: Path, name: str, n: int, batch_size: int
) -> None:
    rank0, rank1, _ = two_rank_results
    state, history = _train(tmp_path / "single", n, batch_size)
    state0, history0 = rank0[name]
    state1, history1 = rank1[name]
    # every rank ends with the same model and logged the same (averaged) losses
    _assert_states_close(state0, state1, atol=0)
    assert history0 == history1
    _assert_states_close(state, state0, atol=ATOL)
    assert [h["step"] for h in history] == [h["step"] for h in history0]
    for single, parallel in zip(history, history0, strict=True):
        assert parallel["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert parallel["head"] == pytest.approx(single["head"], rel=1e-5)
    # the layer without gradients was skipped by Adam on every rank, as in one process
    torch.testing.assert_close(state0["spare"]["weight"], TinyTwoNets().spare.weight.detach())


def test_resumed_distributed_run_ends_like_an_uninterrupted_one(
    two_rank_results: tuple[dict, dict, Path], tmp_path: Path
) -> None:
    rank0, rank1, out = two_rank_results
    _, n, batch_size = SCENARIOS[0]
    state, history = _train(tmp_path / "single", n, batch_size)
    _assert_states_close(rank0["resumed"][0], rank1["resumed"][0], atol=0)
    _assert_states_close(state, rank0["resumed"][0], atol=ATOL)
    assert len(rank0["resumed"][1]) == len(history)
    saved = load_checkpoint(out / "resumed" / "checkpoints" / "last.pt")
    assert len(saved["training"]["torch_rng_ranks"]) == WORLD_SIZE


def test_only_rank_zero_writes_checkpoints_and_logs(two_rank_results: tuple) -> None:
    rank0, rank1, _ = two_rank_results
    assert rank0["writes"] > 0
    assert rank1["writes"] == 0


def test_shards_cover_the_batch_once_with_weights_summing_to_one() -> None:
    index = torch.tensor([5, 2, 7, 0, 3])
    labels = torch.tensor([0, 0, 1, 0, 0, 1, 0, 1])  # images 2, 5 and 7 are defects
    shards = [_shard(index, labels, r, 2) for r in range(2)]
    assert sorted(torch.cat([s for s, _ in shards]).tolist()) == sorted(index.tolist())
    assert sum(w for _, w in shards) == pytest.approx(1.0)
    # by label first: the three defects spread over both ranks
    assert sorted(int(labels[s].sum()) for s, _ in shards) == [1, 2]
    # a batch of one image: rank 1 trains on a copy with weight 0
    alone = [_shard(torch.tensor([4]), labels, r, 2) for r in range(2)]
    assert [(s.tolist(), w) for s, w in alone] == [([4], 1.0), ([4], 0.0)]


# --- the command line under torchrun ---------------------------------------------------------


def test_torchrun_cli_trains_one_run_written_by_rank_zero(folder_root: Path, tmp_path: Path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD_SIZE}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "defectlab",
        "train",
        "--model=ae",
        f"--data={folder_root}",
        f"--out={out}",
        "--image-size=32",
        "--device=cpu",
        "--set=epochs=1",
        "--set=train.batch_size=4",
        "--set=width=4",
        "--distributed",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("trained ae")]
    assert len(summaries) == 1, result.stdout  # rank 1 prints nothing

    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["backend"]) == (WORLD_SIZE, "gloo")
    environment = json.loads((out / "environment.json").read_text())
    assert (environment["world_size"], environment["backend"]) == (WORLD_SIZE, "gloo")
    log = (out / "log.txt").read_text()
    assert log.count("train ae on") == 1 and log.count("trained in") == 1
    assert not [p for p in out.rglob(".*")]  # no temporary files left by racing writers
    steps = (out / "train_log.csv").read_text().splitlines()[1:]
    assert len(steps) == -(-metrics["n_train"] // 4)  # one row per global batch
    run = dl.load_run(out, device="cpu")
    scores, maps = dl.predict_arrays(run.model, np.full((2, 32, 32, 1), 0.5, np.float32))
    assert scores.shape == (2,) and np.isfinite(maps).all()


def _clear_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in dist.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_distributed_without_torchrun_says_how_to_launch(
    folder_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _clear_torchrun_env(monkeypatch)
    argv = ["train", "--model", "ae", "--data", str(folder_root), "--out", str(tmp_path / "r")]
    assert cli.main([*argv, "--device", "cpu", "--distributed"]) == 2
    err = capsys.readouterr().err
    assert "launch with torchrun --nproc_per_node N" in err and "RANK" in err
    assert not (tmp_path / "r").exists()


def test_statistics_model_is_refused(
    folder_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear_torchrun_env(monkeypatch)
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    for name, value in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="pixelstats has no gradient training to distribute"):
        dl.train(
            "pixelstats",
            folder_root,
            tmp_path / "r",
            image_size=32,
            device="cpu",
            progress=False,
            distributed=True,
        )
    assert not dist.is_initialized()  # the process group was closed on the way out
