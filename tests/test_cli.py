"""The CLI contract end to end: models, data check, train, predict, evaluate, synth."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from defectlab.cli import main
from tests.conftest import MAGNETIC_TILE, requires_magnetic_tile, write_image

METRIC_KEYS = {
    "image_auroc",
    "image_ap",
    "pixel_auroc",
    "aupro",
    "dice",
    "iou",
    "f1",
    "threshold",
    "n_normal",
    "n_defect",
}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_every_family(capsys) -> None:
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    assert "pixelstats" in out and "detector" in out and "procedural" in out
    assert "models registered" in out.splitlines()[-1]


def test_data_check_counts_and_reports_bad_files(capsys, folder_root: Path) -> None:
    (folder_root / "normal" / "n05.png").write_bytes(b"")
    write_image(folder_root / "masks" / "d01.png", np.zeros((5, 5), np.uint8))
    code, out, _ = run_cli(capsys, "data", "check", folder_root)
    assert code == 1  # problems found: a pipeline can gate on it
    assert "normal:   20" in out and "defect:   6 (6 with masks)" in out
    assert "n05.png: empty file" in out
    assert "d01.png: mask is 5x5, image is 48x48" in out
    assert out.splitlines()[-1].startswith(
        "folder: 20 normal, 6 defect images (6 with masks), 2 problems"
    )


@pytest.mark.parametrize("path", ["does/not/exist", "."])
def test_data_check_errors_are_one_line(capsys, tmp_path: Path, path: str) -> None:
    target = tmp_path / path
    code, out, err = run_cli(capsys, "data", "check", target)
    assert code == 2 and out == ""
    assert err.startswith("defectlab data: error: ") and str(target.resolve().name) in err
    assert "Traceback" not in err


@requires_magnetic_tile
def test_data_check_magnetic_tile(capsys) -> None:
    code, out, _ = run_cli(capsys, "data", "check", MAGNETIC_TILE)
    assert code == 1  # four MT_Uneven masks are empty: problems, so exit status 1
    assert out.count("mask is empty") == 4
    assert "magnetic-tile: 952 normal, 392 defect images (392 with masks)" in out.splitlines()[-1]


def test_train_predict_evaluate_on_mvtec_layout(capsys, mvtec_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys,
        "train",
        "--model",
        "pixelstats",
        "--data",
        mvtec_root,
        "--out",
        run,
        "--image-size",
        "32",
        "--seed",
        "3",
        "--set",
        "calibration.image_quantile=0.95",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert out.splitlines()[-1].startswith(f"trained pixelstats → {run}")
    for name in (
        "config.json",
        "environment.json",
        "split.json",
        "model.pt",
        "metrics.json",
        "calibration.json",
        "train_log.csv",
        "log.txt",
        "checkpoints/last.pt",
    ):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["seed"] == 3 and config["data"]["image_size"] == 32
    assert config["calibration"]["image_quantile"] == 0.95
    assert "torch" in json.loads((run / "environment.json").read_text())

    # a second train into the same folder is refused, not overwritten
    code, _, err = run_cli(
        capsys, "train", "--model", "pixelstats", "--data", mvtec_root, "--out", run
    )
    assert code == 2 and "already holds a run" in err

    # predict on a folder with one corrupt file: it is reported, the rest processed
    inputs = tmp_path / "inputs"
    for p in sorted((mvtec_root / "test").rglob("*.png")):
        write_image(
            inputs / f"{p.parent.name}_{p.name}", np.asarray(__import__("cv2").imread(str(p), 0))
        )
    (inputs / "broken.png").write_bytes(b"\x89PNG broken")
    pred = tmp_path / "pred"
    code, out, err = run_cli(capsys, "predict", "--run", run, "--input", inputs, "--out", pred)
    assert code == 0, err
    assert "broken.png" in err and "1 skipped" in out
    rows = list(csv.DictReader((pred / "scores.csv").read_text().splitlines()))
    assert len(rows) == 8 and {"path", "score", "is_defect", "mask"} <= set(rows[0])
    flagged = {Path(r["path"]).name.split("_")[0] for r in rows if r["is_defect"] == "1"}
    assert "crack" in flagged
    assert len(list((pred / "masks").glob("*.png"))) == 8
    assert len(list((pred / "overlays").glob("*.png"))) == 8

    ev = tmp_path / "eval"
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--data", mvtec_root, "--out", ev)
    assert code == 0, err
    metrics = json.loads((ev / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    assert metrics["n_normal"] == 4 and metrics["n_defect"] == 4
    assert metrics["image_auroc"] > 0.9  # bright disc defects on smooth texture
    assert metrics["pixel_auroc"] is not None and metrics["aupro"] is not None
    assert (ev / "report.html").stat().st_size > 10_000
    assert "image AUROC" in out.splitlines()[-1]


def test_evaluate_without_masks_gives_null_pixel_metrics(capsys, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "nomask"
    for i in range(20):
        write_image(root / "good" / f"g{i}.png", rng.integers(90, 110, (32, 32), dtype=np.uint8))
    for i in range(3):
        write_image(root / "bad" / f"b{i}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
    run = tmp_path / "run"
    assert (
        run_cli(
            capsys,
            "train",
            "--model",
            "pixelstats",
            "--data",
            root,
            "--out",
            run,
            "--image-size",
            "32",
        )[0]
        == 0
    )
    code, _, err = run_cli(capsys, "evaluate", "--run", run, "--data", root, "--out", run / "ev")
    assert code == 0, err
    metrics = json.loads((run / "ev" / "metrics.json").read_text())
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None and metrics["dice"] is None
    assert metrics["image_auroc"] == 1.0  # noise vs flat: trivially separable, and honest


def test_bad_run_dirs_are_clear_errors(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(
        capsys, "predict", "--run", tmp_path / "none", "--input", tmp_path, "--out", tmp_path / "o"
    )
    assert code == 2 and "run directory does not exist" in err
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model.pt").write_bytes(b"junk")
    code, _, err = run_cli(
        capsys, "predict", "--run", fake, "--input", tmp_path, "--out", tmp_path / "o"
    )
    assert code == 2 and "not a readable defectlab checkpoint" in err


def test_unknown_model_and_bad_setting(capsys, folder_root: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(
        capsys, "train", "--model", "nope", "--data", folder_root, "--out", tmp_path / "r"
    )
    assert code == 2 and "unknown detector, segmenter or synthesizer 'nope'" in err
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        "pixelstats",
        "--data",
        folder_root,
        "--out",
        tmp_path / "r",
        "--set",
        "blur=2",
    )
    assert code == 2 and "unknown setting 'model.blur'" in err


def test_synth_writes_images_masks_and_manifest(capsys, folder_root: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "synth"
    code, _, err = run_cli(
        capsys,
        "synth",
        "--method",
        "procedural",
        "--normal",
        folder_root / "normal",
        "--n",
        "5",
        "--out",
        out_dir,
        "--seed",
        "1",
    )
    assert code == 0, err
    rows = list(csv.DictReader((out_dir / "manifest.csv").read_text().splitlines()))
    assert len(rows) == 5
    for row in rows:
        assert (out_dir / row["image"]).is_file() and (out_dir / row["mask"]).is_file()
        assert Path(row["source"]).parent == folder_root / "normal"
    code, _, err = run_cli(
        capsys,
        "synth",
        "--method",
        "procedural",
        "--normal",
        folder_root / "normal",
        "--n",
        "2",
        "--out",
        out_dir,
        "--defects",
        folder_root / "defect",
    )
    assert code == 2 and "takes no --defects" in err


@requires_magnetic_tile
def test_end_to_end_on_magnetic_tile(capsys, tmp_path: Path) -> None:
    run = tmp_path / "mt"
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        "pixelstats",
        "--data",
        MAGNETIC_TILE,
        "--out",
        run,
        "--image-size",
        "32",
    )
    assert code == 0, err
    split = json.loads((run / "split.json").read_text())
    assert split["name"] == "magnetic-tile-normal-only-v1"
    assert split["counts"]["test"] == {"normal": 286, "defect": 392}
    code, _, err = run_cli(
        capsys, "evaluate", "--run", run, "--data", MAGNETIC_TILE, "--out", run / "eval"
    )
    assert code == 0, err
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert (metrics["n_normal"], metrics["n_defect"]) == (286, 392)
    assert all(metrics[k] is not None for k in METRIC_KEYS)


@requires_magnetic_tile
def test_synth_from_an_image_folder_skips_its_sibling_masks(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(
        capsys,
        "synth",
        "--method",
        "procedural",
        "--normal",
        MAGNETIC_TILE / "MT_Free" / "Imgs",
        "--n",
        "3",
        "--out",
        tmp_path,
    )
    assert code == 0, err
    sources = [
        row["source"]
        for row in csv.DictReader((tmp_path / "manifest.csv").read_text().splitlines())
    ]
    assert sources and all(s.endswith(".jpg") for s in sources)


@pytest.mark.parametrize("key", ["data.image_size", "train.batch_size", "calibration.x"])
def test_synth_refuses_settings_it_does_not_use(
    capsys, folder_root: Path, tmp_path: Path, key: str
) -> None:
    out_dir = tmp_path / "synth"
    args = ["synth", "--method", "procedural", "--normal", folder_root / "normal"]
    code, out, err = run_cli(capsys, *args, "--n", "1", "--out", out_dir, "--set", f"{key}=8")
    assert code == 2 and out == "" and not out_dir.exists()
    assert err.count("\n") == 1 and f"--set {key!r}" in err
    assert "procedural settings: shapes, shape_weights," in err and "--image-size" in err
    code, _, err = run_cli(capsys, *args, "--n", "1", "--out", out_dir, "--set", "blur=2")
    assert code == 2 and "unknown setting 'blur'; valid: " in err and "shapes" in err  # as before
    code, _, err = run_cli(
        capsys, *args, "--n", "1", "--out", out_dir, "--set", "model.shapes=scratch"
    )
    assert code == 0, err


def test_export_format_is_checked_and_documented(capsys, tmp_path: Path) -> None:
    from argparse import Namespace

    from defectlab.cli import cmd_export
    from defectlab.errors import ConfigError

    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--run", str(tmp_path), "--format", "tflite"])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "graph format (only onnx so far)" in " ".join(capsys.readouterr().out.split())
    # the command reads the format: one it has no exporter for is refused before any work
    args = Namespace(run=tmp_path / "no-run", out=None, quantize=None, format="tflite")
    with pytest.raises(ConfigError, match="--format 'tflite': defectlab exports to onnx only"):
        cmd_export(args)
