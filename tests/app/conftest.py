"""Workbench fixtures: a small trained run, a folder of parts, databases on SQLite and on a
real PostgreSQL server (under CI a missing server fails the tests instead of skipping)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.app import pg
from tests.conftest import textured, with_defect, write_folder_dataset, write_image

SIZE = 32


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pixelstats run on small textures (seconds to train)."""
    from defectlab import api

    root = tmp_path_factory.mktemp("train")
    data = write_folder_dataset(root / "data", np.random.default_rng(0), 24, 4, size=SIZE)
    api.train("pixelstats", data, root / "run", image_size=SIZE, device="cpu", progress=False)
    return root / "run"


def write_parts(folder: Path, n_normal: int = 10, n_defect: int = 8, seed: int = 5) -> dict:
    """A line folder: textures and painted defects; returns {file name: mask or None}."""
    rng = np.random.default_rng(seed)
    truth: dict[str, np.ndarray | None] = {}
    for i in range(n_normal):
        write_image(folder / f"ok{i:02d}.png", textured(rng, SIZE))
        truth[f"ok{i:02d}.png"] = None
    for i in range(n_defect):
        image, mask = with_defect(textured(rng, SIZE), rng)
        write_image(folder / f"bad{i:02d}.png", image)
        truth[f"bad{i:02d}.png"] = mask
    return truth


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "line"
    return folder, write_parts(folder)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str | None]:
    url, cluster, reason = pg.server_url()
    if url is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
        pytest.skip(reason)
    try:
        yield url
    finally:
        if cluster is not None:
            cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, then a fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'workbench.db'}"
        return
    admin = request.getfixturevalue("pg_server")
    url, name = pg.fresh_database(admin)
    try:
        yield url
    finally:
        pg.drop_database(admin, name)
