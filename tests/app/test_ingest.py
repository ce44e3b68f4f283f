"""Database and ingest: Alembic schema, idempotence by content, unreadable files, the CLI's
errors, and a kill during ingest followed by a resume without duplicates."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text

from defectlab.app.db import Database, Image, Inspection, Skipped, files_dir
from defectlab.app.ingest import ingest_folder, register_version
from defectlab.cli import main
from defectlab.errors import ConfigError


def test_migrations_create_the_schema(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert db.revision == "0001"
        tables = set(inspect(db.engine).get_table_names())
        assert {"model_versions", "images", "inspections", "reviews", "skipped", "tokens"} <= tables
        assert "alembic_version" in tables
        assert Database(db_url).revision == "0001"  # a second open upgrades nothing
    finally:
        db.close()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    with db.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    db.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://x/y", "only sqlite"),
        ("not a url", "not a database URL"),
        ("sqlite:////no/such/folder/x.db", "does not exist"),
    ],
)
def test_bad_database_urls_are_one_line_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Database(url)


def test_ingest_is_idempotent_by_content(
    db_url: str, trained_run: Path, parts: tuple[Path, dict], tmp_path: Path
) -> None:
    folder, truth = parts
    shutil.copy(folder / "bad00.png", folder / "same-bytes-other-name.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    db = Database(db_url)
    files = tmp_path / "files"
    version = register_version(db, trained_run)
    first = ingest_folder(db, version, folder, files, progress=False)
    assert first["n_inspected"] == len(truth)  # the copy is the same image
    assert first["n_skipped"] == 1
    again = ingest_folder(db, version, folder, files, progress=False)
    assert again["n_inspected"] == 0 and again["n_already"] == len(truth) + 1
    with db.sessions() as session:
        assert session.scalar(select(func.count(Image.id))) == len(truth)
        assert session.scalar(select(func.count(Inspection.id))) == len(truth)
        skipped = session.scalars(select(Skipped)).all()
        assert [Path(s.path).name for s in skipped] == ["broken.png"]
        assert skipped[0].reason
        flagged = session.scalars(select(Inspection).where(Inspection.is_defect)).all()
        for inspection in session.scalars(select(Inspection)):
            assert (files / inspection.mask_file).is_file()
            assert (files / inspection.heatmap_file).is_file()
    # the painted defects score above the textures for this model
    assert len(flagged) >= 4
    db.close()


def test_cli_inspect_and_its_errors(
    trained_run: Path, parts: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder, truth = parts
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["inspect", "--run", str(trained_run), "--input", str(folder), "--db", url]) == 0
    out = capsys.readouterr().out
    assert f"{len(truth)} new images inspected by version 1" in out
    assert files_dir(url) == tmp_path / "cli-files"
    code = main(
        ["inspect", "--run", str(trained_run), "--input", str(tmp_path / "nope"), "--db", url]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope: --input does not exist" in err[0]
    code = main(["inspect", "--run", str(tmp_path), "--input", str(folder), "--db", url])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.pt" in err[0]
    code = main(["inspect", "--run", str(trained_run), "--input", str(folder), "--db", "x://"])
    assert code == 2 and "--db" in capsys.readouterr().err


def test_kill_during_ingest_then_resume_leaves_no_duplicates(
    db_url: str, trained_run: Path, tmp_path: Path
) -> None:
    from tests.app.conftest import write_parts

    folder = tmp_path / "many"
    truth = write_parts(folder, n_normal=120, n_defect=40, seed=9)
    command = [
        sys.executable,
        "-m",
        "defectlab",
        "inspect",
        "--run",
        str(trained_run),
        "--input",
        str(folder),
        "--db",
        db_url,
        "--files",
        str(tmp_path / "files"),
        "--batch-size",
        "4",
        "--workers",
        "1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = Database(db_url)
    deadline = time.monotonic() + 600  # a loaded machine starts Python and torch slowly
    stored = 0
    while time.monotonic() < deadline and process.poll() is None:
        with db.sessions() as session:
            stored = session.scalar(select(func.count(Inspection.id))) or 0
        if stored >= 8:
            break
        time.sleep(0.05)
    assert process.poll() is None, "ingest finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    with db.sessions() as session:
        partial = session.scalar(select(func.count(Inspection.id)))
    assert 8 <= partial < len(truth)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(truth) - partial} new images" in done.stdout
    with db.sessions() as session:
        assert session.scalar(select(func.count(Inspection.id))) == len(truth)
        assert session.scalar(select(func.count(Image.id))) == len(truth)
        assert session.scalar(select(func.count(func.distinct(Image.sha256)))) == len(truth)
    db.close()
