"""The workbench commands refuse what they cannot use with one line and exit code 2."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from defectlab.app.cli import demo_inspection_input
from defectlab.cli import main


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["app", "--host", "0.0.0.0"], "refusing to listen on 0.0.0.0"),
        (["app", "--scan", "{tmp}/nope"], "nope: --scan names no folder"),
        (["app"], "--db is required"),
        (["app", "--max-upload-mb", "0"], "--max-upload-mb must be positive"),
        (["retrain"], "no model version"),
        (["inspect", "--run", "{tmp}", "--input", "{tmp}/nope"], "nope: --input does not exist"),
    ],
)
def test_one_line_errors(tmp_path: Path, capsys, args: list[str], words: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args != ["app"]:  # that case is about the missing --db
        args += ["--db", f"sqlite:///{tmp_path / 'x.db'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_occupied_port_is_one_line(tmp_path: Path, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["app", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already in use" in err[0]


def test_app_finds_the_demo_inspection_beside_the_run(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "line").mkdir()
    (tmp_path / "inspect").mkdir()
    (tmp_path / "inspect" / "inspection.json").write_text(
        f'{{"run": "{tmp_path.name}/run", "input": "{tmp_path / "line"}"}}'
    )
    assert demo_inspection_input(tmp_path / "run") == [str(tmp_path / "line")]
    assert demo_inspection_input(tmp_path / "other") == []
