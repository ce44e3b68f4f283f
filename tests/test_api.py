"""Python API behaviours the CLI tests do not reach: tiling, reproducibility, versions."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import defectlab.api as dl
from defectlab.data.splits import Split
from defectlab.detect.pixelstats import PixelStats
from defectlab.errors import CheckpointError, ConfigError, DataError
from tests.conftest import write_image


def _flat_folder(root: Path, n: int = 16, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        write_image(root / "good" / f"{i}.png", rng.integers(95, 105, (size, size), dtype=np.uint8))
    return root


@pytest.fixture
def flat_run(tmp_path: Path) -> Path:
    """Trained at native resolution (32 px images, 32 px model), as tiling assumes."""
    data = _flat_folder(tmp_path / "data", n=80, size=32)
    dl.train("pixelstats", data, tmp_path / "run", image_size=32, device="cpu", progress=False)
    return tmp_path / "run"


def test_tiled_prediction_keeps_size_and_finds_the_defect(flat_run: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    panel = rng.integers(95, 105, (96, 160), dtype=np.uint8)
    cv2.circle(panel, (130, 70), 5, 255, -1)
    write_image(tmp_path / "panel" / "p.png", panel)
    result = dl.predict(flat_run, tmp_path / "panel", tmp_path / "out", tile=True, progress=False)
    assert result["n_images"] == 1 and result["n_defect"] == 1
    mask = cv2.imread(str(tmp_path / "out" / "masks" / "p.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (96, 160)
    ys, xs = np.nonzero(mask)
    assert abs(ys.mean() - 70) < 6 and abs(xs.mean() - 130) < 6


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    data = _flat_folder(tmp_path / "data")
    a = dl.train("pixelstats", data, tmp_path / "a", image_size=32, progress=False)
    b = dl.train("pixelstats", data, tmp_path / "b", image_size=32, progress=False)
    assert a.calibration == b.calibration
    assert (
        json.loads((tmp_path / "a" / "split.json").read_text())["parts"]
        == json.loads((tmp_path / "b" / "split.json").read_text())["parts"]
    )


def test_resume_of_a_finished_run_reproduces_it(flat_run: Path) -> None:
    before = json.loads((flat_run / "calibration.json").read_text())
    again = dl.train("pixelstats", flat_run.parent / "data", flat_run, resume=True, progress=False)
    assert again.calibration == before


def test_model_state_version_mismatch_is_refused(flat_run: Path, monkeypatch) -> None:
    monkeypatch.setattr(PixelStats, "state_version", 2)
    with pytest.raises(CheckpointError, match=r"state version 1 .* expects 2\. Retrain"):
        dl.load_run(flat_run)


def test_interrupted_run_hints_resume(tmp_path: Path, flat_run: Path) -> None:
    (flat_run / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="resume it with --resume"):
        dl.load_run(flat_run)


def test_predict_arrays_matches_model(flat_run: Path) -> None:
    run = dl.load_run(flat_run, device="cpu")
    images = np.random.default_rng(2).random((3, 32, 32, 1), dtype=np.float32)
    scores, maps = dl.predict_arrays(run.model, images, batch_size=2)
    direct = run.model.predict(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(scores, direct.scores.numpy(), rtol=1e-6)
    assert maps.shape == (3, 32, 32)


def test_dataset_split_is_the_split_training_saved(folder_root: Path, tmp_path: Path) -> None:
    dl.train("pixelstats", folder_root, tmp_path / "run", image_size=32, progress=False)
    run = dl.load_run(tmp_path / "run", device="cpu")
    dataset, split = dl.dataset_split(run.config.data)
    saved = Split.load(tmp_path / "run" / "split.json")
    assert (split.name, split.seed) == (saved.name, saved.seed)
    assert {k: [s.to_dict() for s in v] for k, v in split.parts.items()} == {
        k: [s.to_dict() for s in v] for k, v in saved.parts.items()
    }
    assert {str(s.path) for s in dataset.samples} >= {str(s.path) for s in split["test"]}


def test_load_images_loads_a_split_part_as_the_run_does(folder_root: Path, tmp_path: Path) -> None:
    dl.train("pixelstats", folder_root, tmp_path / "run", image_size=32, progress=False)
    run = dl.load_run(tmp_path / "run", device="cpu")
    test = Split.load(tmp_path / "run" / "split.json")["test"]
    loaded = dl.load_images(test, run.config.data)
    channels = run.config.data.channels
    assert loaded.images.shape == (len(test), 32, 32, channels)
    assert loaded.images.dtype == np.float32 and 0 <= loaded.images.min() <= 1
    assert loaded.labels.tolist() == [s.label for s in test]
    assert loaded.masks.shape == (len(test), 32, 32) and loaded.masks[loaded.labels == 1].any()
    scores, _ = dl.predict_arrays(run.model, loaded.images)
    assert scores.shape == (len(test),)


def test_folder_layout_names_from_settings(tmp_path: Path) -> None:
    """Non-standard folder names and mask suffixes are set with --set data.*."""
    rng = np.random.default_rng(4)
    root = tmp_path / "line3"
    for i in range(12):
        write_image(root / "pass" / f"{i}.png", rng.integers(95, 105, (32, 32), dtype=np.uint8))
    for i in range(2):
        image = rng.integers(95, 105, (32, 32), dtype=np.uint8)
        image[8:16, 8:16] = 250
        mask = np.zeros((32, 32), np.uint8)
        mask[8:16, 8:16] = 255
        write_image(root / "fail" / f"f{i}.png", image)
        write_image(root / "labels" / f"f{i}-gt.png", mask)
    settings = [
        "data.normal_dirs=pass",
        "data.defect_dirs=fail",
        "data.mask_dir=labels",
        "data.mask_suffix=-gt",
    ]
    dl.train(
        "pixelstats", root, tmp_path / "run", image_size=32, overrides=settings, progress=False
    )
    metrics = dl.evaluate(tmp_path / "run", root, tmp_path / "ev", progress=False)
    assert metrics["n_defect"] == 2 and metrics["pixel_auroc"] is not None


def test_evaluate_hands_its_predictions_to_the_caller_once(
    folder_root: Path, tmp_path: Path
) -> None:
    run = dl.train("pixelstats", folder_root, tmp_path / "run", image_size=32, progress=False)
    calls: list[tuple] = []
    metrics = dl.evaluate(
        run.run_dir,
        folder_root,
        tmp_path / "eval",
        progress=False,
        on_predictions=lambda loaded, scores, maps: calls.append((loaded, scores, maps)),
    )
    assert len(calls) == 1
    loaded, scores, maps = calls[0]
    assert len(loaded.samples) == metrics["n_normal"] + metrics["n_defect"]
    assert maps.shape == (len(scores), 32, 32) and loaded.masks.shape == maps.shape
    again, again_maps = dl.predict_arrays(run.model, loaded.images)
    np.testing.assert_allclose(scores, again, rtol=1e-6)
    np.testing.assert_allclose(maps, again_maps, rtol=1e-6)
    written = (tmp_path / "eval" / "scores.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in written] == [str(s.path) for s in loaded.samples]


def test_elpv_uncertain_cells_only_when_asked(tmp_path: Path) -> None:
    """ELPV 1/3 and 2/3 cells are kept out of metrics unless --include-uncertain."""
    run = dl.train("pixelstats", "elpv", tmp_path / "run", image_size=32, progress=False)
    plain = dl.evaluate(run.run_dir, "elpv", tmp_path / "a", progress=False)
    assert (plain["n_normal"], plain["n_defect"]) == (453, 715)
    wider = dl.evaluate(run.run_dir, "elpv", tmp_path / "b", include_uncertain=True, progress=False)
    assert (wider["n_normal"], wider["n_defect"]) == (453, 715 + 401)


def test_f1_calibration_uses_held_out_labelled_defects(folder_root: Path, tmp_path: Path) -> None:
    run = dl.train(
        "pixelstats",
        folder_root,
        tmp_path / "run",
        image_size=32,
        device="cpu",
        overrides=["calibration.method=f1", "data.val_defects_per_class=2"],
        progress=False,
    )
    calibration = run.calibration
    assert calibration["method"] == "f1" and calibration["n_val_defect"] == 2
    assert 0.0 < calibration["val_f1"] <= 1.0 and "val_dice" in calibration
    quantile = dl.train("pixelstats", folder_root, tmp_path / "q", image_size=32, progress=False)
    assert calibration["image_threshold"] != quantile.calibration["image_threshold"]
    metrics = dl.evaluate(tmp_path / "run", folder_root, tmp_path / "eval", progress=False)
    assert metrics["n_defect"] == 4  # 6 defects minus the 2 held out for calibration


def test_f1_calibration_without_validation_defects_is_a_config_error(
    folder_root: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="val_defects_per_class"):
        dl.train(
            "pixelstats",
            folder_root,
            tmp_path / "run",
            overrides=["calibration.method=f1"],
            progress=False,
        )


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("area", r"calibration\.method=area needs a model taught by area"),
        ("model", r"calibration\.method=model needs a model that fixes"),
        ("x", r"calibration\.method must be one of"),
    ],
)
def test_calibration_method_the_model_cannot_take_is_a_config_error(
    folder_root: Path, tmp_path: Path, method: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        dl.train(
            "pixelstats",
            folder_root,
            tmp_path / "run",
            overrides=[f"calibration.method={method}"],
            progress=False,
        )


def test_area_ratio_segmenter_reads_ratios_from_a_csv(folder_root: Path, tmp_path: Path) -> None:
    overrides = ["data.defects_per_class=3", "epochs=1", "n_segments=16"]
    split = dl.train(
        "arearatio-gcn",
        folder_root,
        tmp_path / "masks",
        image_size=32,
        overrides=overrides,
        progress=False,
    )  # no CSV: ratios derived from the masks
    # default calibration: the vertex classifier's own decision point
    default = json.loads((split.run_dir / "calibration.json").read_text())
    assert default["method"] == "model"
    assert default["pixel_threshold"] == 0.5
    assert default["image_threshold"] >= default["normal_score_mean"]  # still the 99% quantile
    train_defects = [s.path for s in Split.load(split.run_dir / "split.json")["train_defect"]]
    labels = tmp_path / "ratios.csv"
    labels.write_text("path,area_ratio,margin\n" + "".join(f"{p},0.05,\n" for p in train_defects))
    run = dl.train(
        "arearatio-gcn",
        folder_root,
        tmp_path / "csv",
        image_size=32,
        overrides=[*overrides, f"data.area_ratio_csv={labels}", "calibration.method=area"],
        progress=False,
    )
    assert run.model.family == "segmenter"
    # area calibration: the pixel threshold flags the labelled area on the training images
    calibration = json.loads((run.run_dir / "calibration.json").read_text())
    assert calibration["method"] == "area"
    n_train = calibration["n_area_labelled"]
    assert n_train == len(Split.load(run.run_dir / "split.json")["train"]) + len(train_defects)
    assert calibration["mean_area_ratio"] == pytest.approx(0.05 * len(train_defects) / n_train)
    labels.write_text("path,area_ratio\n" + f"{train_defects[0]},0.05\n")
    with pytest.raises(DataError, match="no area ratio for training image"):
        dl.train(
            "arearatio-gcn",
            folder_root,
            tmp_path / "missing",
            image_size=32,
            overrides=[*overrides, f"data.area_ratio_csv={labels}"],
            progress=False,
        )


def test_every_public_name_resolves() -> None:
    """``import defectlab.api as dl`` reaches what the README's tour uses, including the
    names that live in lower layers (run loading, scoring, a run's data)."""
    assert {"train", "evaluate", "load_run", "predict_arrays", "dataset_split"} <= set(dl.__all__)
    assert all(callable(getattr(dl, name)) or name == "MODEL_FILE" for name in dl.__all__)
