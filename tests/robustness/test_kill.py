"""kill -9 of ``train`` and ``predict`` while they write, then the same command again
(``--resume`` for training): the outcome is the uninterrupted one, nothing lost, nothing
twice. (The service, which writes nothing, is killed in ``test_service``; in-process
interruptions are covered by ``tests/test_training.py`` and ``tests/deploy/test_batch.py``.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from defectlab import api
from tests.conftest import textured, write_image

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def kill_when(command: list[str], ready: Callable[[], bool]) -> bool:
    """Run ``defectlab COMMAND`` and SIGKILL it as soon as ``ready()``; ``True`` if it was
    killed, ``False`` if it finished first (the deadline only keeps a broken run from
    hanging the test suite)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "defectlab", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    deadline = time.monotonic() + 600
    try:
        while process.poll() is None:
            if ready():
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
            assert time.monotonic() < deadline, "the command neither progressed nor ended"
            time.sleep(0.005)
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("many")
    for i in range(240):
        write_image(root / "normal" / f"n{i:03d}.png", textured(rng, 32))
    return root


TRAIN = ["--model", "pixelstats", "--image-size", "32", "--device", "cpu"]
TRAIN += ["--set", "train.batch_size=2", "--set", "train.checkpoint_every=1"]


def test_kill_9_during_training_then_resume_equals_the_uninterrupted_run(
    folder: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    api.train(
        "pixelstats",
        folder,
        reference,
        image_size=32,
        device="cpu",
        overrides=["train.batch_size=2", "train.checkpoint_every=1"],
        progress=False,
    )
    run = tmp_path / "run"
    log = run / "train_log.csv"
    killed = kill_when(
        ["train", *TRAIN, "--data", str(folder), "--out", str(run)],
        lambda: log.exists() and log.read_text().count("\n") > 5,
    )
    assert killed, "training ended before it could be killed"
    assert not (run / "model.pt").exists()
    again = ["train", *TRAIN, "--data", str(folder), "--out", str(run), "--resume"]
    resumed = subprocess.run(
        [sys.executable, "-m", "defectlab", *again],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert log.read_text() == (reference / "train_log.csv").read_text()  # every step once
    assert json.loads((run / "calibration.json").read_text()) == json.loads(
        (reference / "calibration.json").read_text()
    )
    leftovers = [p for p in run.rglob(".*") if p.is_file()]
    assert not leftovers, leftovers


def test_kill_9_during_predict_then_rerun_equals_the_uninterrupted_run(
    folder: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    api.train("pixelstats", folder, run, image_size=32, device="cpu", progress=False)
    reference = tmp_path / "reference"
    api.predict(run, folder, reference, device="cpu", progress=False)
    out = tmp_path / "out"
    command = ["predict", "--run", str(run), "--input", str(folder), "--out", str(out)]
    command += ["--batch-size", "2", "--workers", "1", "--device", "cpu"]
    results = out / "results.jsonl"
    killed = kill_when(command, lambda: results.exists() and results.read_bytes().count(b"\n") > 10)
    assert killed, "predict ended before it could be killed"
    again = subprocess.run(
        [sys.executable, "-m", "defectlab", *command], capture_output=True, text=True, env=ENV
    )
    assert again.returncode == 0, again.stderr
    assert "done before" in again.stdout
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["path"] for r in rows}) == len(expected) == 240  # once each
    by_path = {r["path"]: r for r in expected}
    assert all(row == by_path[row["path"]] for row in rows)
    assert (out / "scores.csv").read_text().count("\n") == 241
    leftovers = [p for p in out.rglob(".*") if p.is_file()]  # half-written files are gone
    assert not leftovers, leftovers
    for kind in ("masks", "overlays"):
        made = sorted(p.name for p in (out / kind).iterdir())
        assert made == sorted(p.name for p in (reference / kind).iterdir())
        for name in made:
            assert (out / kind / name).read_bytes() == (reference / kind / name).read_bytes()
