"""Each numbered gap of the hardening issue, through the command line: bombs skipped with
their reason by predict, train, evaluate and data check; one-line errors with exit status 2;
``train --resume`` refusing contradicting arguments; ``data check`` exit statuses."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from defectlab import api
from defectlab.cli import main
from tests.conftest import textured, write_folder_dataset, write_image
from tests.robustness.corpus import BOMB_SIDE, bmp_rle_bomb, png_bytes

SIZE = 32


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, command: str) -> str:
    """The single stderr line of a failed command (progress bars aside)."""
    lines = [line for line in err.splitlines() if line.startswith(f"defectlab {command}")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "PosixPath" not in err
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder layout with a PNG bomb among the normal images and a BMP bomb and a 1 × 1
    image among the defect ones."""
    root = write_folder_dataset(tmp_path_factory.mktemp("data"), np.random.default_rng(3), 16, 6)
    (root / "normal" / "bomb.png").write_bytes(png_bytes(BOMB_SIDE, BOMB_SIDE, None))
    write_image(root / "normal" / "tiny.png", np.full((1, 1), 100, np.uint8))
    return root


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    api.train("pixelstats", data, out, image_size=SIZE, device="cpu", progress=False)
    return out


# --- gap 2: bombs in batch commands are skipped with their reason ----------------------------


def test_train_skips_the_bomb_and_the_1x1_image_with_their_reason(run: Path) -> None:
    """Whichever part of the split they fell in (train or validation), both are skipped
    and named, never decoded (the bomb) or up-scaled into the training set (the 1 × 1)."""
    metrics = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())["parts"]
    fitted = {Path(s["path"]).name for part in ("train", "val") for s in split[part]}
    skipped = {Path(s.split(": ")[0]).name: s.split(": ", 1)[1] for s in metrics["skipped_files"]}
    for name in {"bomb.png", "tiny.png"} & fitted:
        assert name in skipped
    if "bomb.png" in fitted:
        assert skipped["bomb.png"].startswith("image too large: PNG declares 12000x12000")
    if "tiny.png" in fitted:
        assert skipped["tiny.png"].startswith("image too small: 1x1 pixels")
    assert {"bomb.png", "tiny.png"} & fitted, "neither file was in the training split"


def test_predict_skips_bombs_and_tiny_images_are_scored(
    capsys: pytest.CaptureFixture[str], run: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    rng = np.random.default_rng(4)
    for i in range(3):
        write_image(inputs / f"ok{i}.png", textured(rng))
    (inputs / "bomb.png").write_bytes(png_bytes(BOMB_SIDE, BOMB_SIDE, None))
    (inputs / "rle.bmp").write_bytes(bmp_rle_bomb(20_000, 20_000))
    write_image(inputs / "tiny.png", np.full((1, 1), 100, np.uint8))
    (inputs / "loop.png").symlink_to("loop.png")
    code, out, err = run_cli(
        capsys, "predict", "--run", run, "--input", inputs, "--out", tmp_path / "o"
    )
    assert code == 0, err
    assert "4 images inspected" in out and "3 skipped" in out
    with (tmp_path / "o" / "skipped.csv").open() as handle:
        skipped = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(handle)}
    assert set(skipped) == {"bomb.png", "rle.bmp", "loop.png"}
    assert skipped["bomb.png"].startswith("image too large: PNG declares 12000x12000")
    assert skipped["rle.bmp"].startswith("image too large: BMP declares 20000x20000")
    assert skipped["loop.png"] == "symbolic link loops back on itself"
    rows = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    assert sorted(Path(json.loads(r)["path"]).name for r in rows) == [
        "ok0.png",
        "ok1.png",
        "ok2.png",
        "tiny.png",
    ]
    assert not list((tmp_path / "o" / "masks").glob("bomb*"))
    # the budget is the user's to set: below 48 × 48 even the good images are refused
    code, out, err = run_cli(
        capsys,
        "predict",
        "--run",
        run,
        "--input",
        inputs / "ok0.png",
        "--out",
        tmp_path / "o2",
        "--max-pixels",
        "2e3",
    )
    line = one_line_error(err, "predict")
    assert code == 2 and "none of the 1 images could be read" in line
    assert "48x48 = 2304 pixels, the limit is 2000" in err


def test_evaluate_skips_a_bomb_among_the_test_images(
    capsys: pytest.CaptureFixture[str], run: Path, data: Path, tmp_path: Path
) -> None:
    split = json.loads((run / "split.json").read_text())["parts"]["test"]
    victim = Path(next(s["path"] for s in split if s["label"] == 0)).name
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    (copy / "normal" / victim).write_bytes(png_bytes(BOMB_SIDE, BOMB_SIDE, None))
    code, _, err = run_cli(
        capsys, "evaluate", "--run", run, "--data", copy, "--out", tmp_path / "ev"
    )
    assert code == 0, err
    assert f"skipped {copy / 'normal' / victim}: image too large" in err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    tiny_in_test = any(Path(s["path"]).name == "tiny.png" for s in split)
    assert metrics["n_skipped"] == 1 + tiny_in_test
    if tiny_in_test:
        assert f"skipped {copy / 'normal' / 'tiny.png'}: image too small: 1x1" in err


def test_data_check_lists_bombs_tiny_images_and_broken_links(
    capsys: pytest.CaptureFixture[str], data: Path, tmp_path: Path
) -> None:
    root = tmp_path / "check"
    rng = np.random.default_rng(5)
    for i in range(4):
        write_image(root / "normal" / f"n{i}.png", textured(rng))
    write_image(root / "normal" / "tiny.png", np.zeros((1, 100), np.uint8))
    (root / "normal" / "bomb.bmp").write_bytes(bmp_rle_bomb(20_000, 20_000))
    (root / "normal" / "loop.png").symlink_to("loop.png")
    (root / "normal" / "gone.png").symlink_to(root / "nowhere.png")
    code, out, err = run_cli(capsys, "data", "check", root)
    assert code == 1, err
    problems = {
        Path(line.split(": ")[1]).name: line.split(": ", 2)[2]
        for line in out.splitlines()
        if line.startswith("problem: ")
    }
    assert problems["bomb.bmp"].startswith("image too large: BMP declares 20000x20000")
    assert problems["tiny.png"].startswith("image is 100x1, below the minimum side of 8")
    assert problems["loop.png"] == "symbolic link loops back on itself"
    assert problems["gone.png"] == "symbolic link is dangling (target missing)"
    assert out.splitlines()[-1].endswith(" s]") and "4 problems" in out.splitlines()[-1]
    for link in ("loop.png", "gone.png", "tiny.png", "bomb.bmp"):
        (root / "normal" / link).unlink()
    code, out, err = run_cli(capsys, "data", "check", root)
    assert code == 0 and "0 problems" in out, out + err


# --- gap 3: one-line errors, exit status 2 ---------------------------------------------------


def test_errors_print_plain_paths(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    (tmp_path / "empty" / "defect").mkdir()
    code, out, err = run_cli(capsys, "data", "check", tmp_path / "empty")
    line = one_line_error(err, "data")
    assert code == 2 and out == ""
    assert line.endswith(
        f"no images in {tmp_path / 'empty' / 'normal'}, {tmp_path / 'empty' / 'defect'}"
    )


@pytest.mark.parametrize("where", ["file", "under-file"])
@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "export"])
def test_out_naming_a_file_is_one_line(
    capsys: pytest.CaptureFixture[str],
    run: Path,
    data: Path,
    tmp_path: Path,
    command: str,
    where: str,
) -> None:
    blocker = tmp_path / "taken.txt"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "sub" / "out"
    args = {
        "train": ["--model", "pixelstats", "--data", data],
        "predict": ["--run", run, "--input", data / "normal" / "n00.png"],
        "evaluate": ["--run", run, "--data", data],
        "export": ["--run", run],
    }[command]
    code, _, err = run_cli(capsys, command, *args, "--out", out)
    line = one_line_error(err, command)
    assert code == 2 and str(out) in line
    assert ("names an existing file" if where == "file" else f"{blocker} is a file") in line
    assert blocker.read_text() == "not a folder"


def test_os_errors_become_one_line_naming_the_path(
    capsys: pytest.CaptureFixture[str], data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "model.pt"))

    monkeypatch.setattr(api, "train", disk_full)
    code, _, err = run_cli(
        capsys, "train", "--model", "pixelstats", "--data", data, "--out", tmp_path / "run"
    )
    line = one_line_error(err, "train")
    assert code == 2
    assert (
        line
        == f"defectlab train: error: {tmp_path / 'run' / 'model.pt'}: no space left on the device"
    )


def test_unexpected_errors_name_the_log_of_their_traceback(
    capsys: pytest.CaptureFixture[str], data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise KeyError("no such column")

    monkeypatch.setattr(api, "check_data", bug)
    monkeypatch.setenv("DEFECTLAB_LOG_DIR", str(tmp_path))
    code, _, err = run_cli(capsys, "data", "check", data)
    line = one_line_error(err, "data")
    assert code == 2 and "unexpected error: KeyError" in line
    (log,) = tmp_path.glob("defectlab-data-*.log")
    assert str(log) in line
    assert "Traceback" in log.read_text() and "no such column" in log.read_text()


# --- gap 5: --resume refuses contradicting arguments ------------------------------------------


def test_resume_refuses_other_data_or_size_and_names_them(
    capsys: pytest.CaptureFixture[str], run: Path, data: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    before = (run / "model.pt").read_bytes()
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        "pixelstats",
        "--data",
        other,
        "--image-size",
        64,
        "--set",
        "train.batch_size=3",
        "--out",
        run,
        "--resume",
    )
    line = one_line_error(err, "train")
    assert code == 2
    assert f"data {other} (the run has {data})" in line
    assert "image size 64 (the run has 32)" in line
    assert "--set train.batch_size 3 (the run has 16)" in line
    assert (run / "model.pt").read_bytes() == before
