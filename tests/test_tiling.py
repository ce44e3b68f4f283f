"""``data.image_size=auto`` and ``data.tile=auto|on|off``: the size decision and its reason,
training on native-resolution tiles, and whole images scored by stitching tile maps in
evaluate, predict and the ONNX backend; bad sizes get a clear message or a documented
behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import defectlab.api as dl
from defectlab.cli import main
from defectlab.data.layouts import NORMAL, Sample
from defectlab.data.loading import FIXED_SIZE, choose_image_size, load_tiles
from defectlab.data.transforms import extract_tiles, score_tiled, stitch_tiles, tile_grid
from defectlab.deploy.backends import Inspector, open_inspector, score_images
from defectlab.errors import ConfigError
from tests.conftest import textured, with_defect, write_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(folder: Path, shapes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(shapes):
        image = textured(rng, max(h, w))[:h, :w]
        paths.append(write_image(folder / f"{i:03d}.png", image))
    return paths


def _folder(root: Path, size: int, n_normal: int = 12, n_defect: int = 4, seed: int = 0) -> Path:
    """A folder layout of ``size`` px images; defects are bright discs with masks."""
    rng = np.random.default_rng(seed)
    for i in range(n_normal):
        write_image(root / "normal" / f"n{i:02d}.png", textured(rng, size))
    for i in range(n_defect):
        image, mask = with_defect(textured(rng, size), rng)
        write_image(root / "defect" / f"d{i:02d}.png", image)
        write_image(root / "masks" / f"d{i:02d}.png", mask)
    return root


# --- the decision ---------------------------------------------------------------------------


def test_auto_size_rules(tmp_path: Path) -> None:
    small = _images(tmp_path / "small", [(100, 100)] * 6)
    choice = choose_image_size(small, "auto", "auto", 224, "patchmemory")
    assert (choice.image_size, choice.tile) == (224, "off")
    assert "working size" in choice.size_reason and "up-scaled" in choice.size_reason
    assert "whole images" in choice.tile_reason

    # many images: the training cost, not detail, caps the size (steps of 32 px)
    many = choose_image_size(small * 60, "auto", "auto", 224, "patchmemory")
    assert many.image_size == 192 and "lowered to 192 px so that 360 training" in many.size_reason

    large = _images(tmp_path / "large", [(480, 520)] * 6)
    choice = choose_image_size(large, "auto", "auto", 224, "patchmemory")
    assert (choice.image_size, choice.tile) == (224, "on")
    assert "tiles" in choice.size_reason and "520 px" in choice.tile_reason
    # tiling off by hand: the same size, whole images resized
    assert choose_image_size(large, "auto", "off", 224, "flow").tile == "off"

    mixed = _images(tmp_path / "mixed", [(100, 100), (300, 120), (200, 200), (120, 300)] * 2)
    choice = choose_image_size(mixed, "auto", "auto", 224, "patchmemory")
    assert (choice.image_size, choice.tile) == (FIXED_SIZE, "off")
    assert "mixed sizes" in choice.size_reason

    pixels = choose_image_size(large, "auto", "auto", None, "pixelstats")
    assert (pixels.image_size, pixels.tile) == (FIXED_SIZE, "off")
    assert "learns from pixels" in pixels.size_reason

    given = choose_image_size(large, 64, "auto", 224, "patchmemory")
    assert (given.image_size, given.tile, given.size_reason, given.tile_reason) == (
        64,
        "off",
        None,
        None,
    )
    assert choose_image_size(large, 64, "on", 224, "patchmemory").tile == "on"


def test_tile_larger_than_every_image_is_refused(tmp_path: Path) -> None:
    paths = _images(tmp_path / "imgs", [(100, 100), (90, 140)])
    with pytest.raises(ConfigError, match=r"256 px tile is larger than every training image"):
        choose_image_size(paths, 256, "on", 224, "patchmemory")


def test_train_records_auto_size_and_reason(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "data", 48, n_normal=10, n_defect=2)
    code = main(
        ["train", "--model", "pixelstats", "--data", str(data), "--out", str(tmp_path / "px")]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "data.image_size=auto → 128: pixelstats learns from pixels" in out
    config = json.loads((tmp_path / "px" / "config.json").read_text())
    assert config["data"]["image_size"] == 128 and config["data"]["tile"] == "off"
    assert "learns from pixels" in config["resolved"]["data.image_size"]["reason"]
    assert "data.image_size=auto → 128" in (tmp_path / "px" / "log.txt").read_text()

    run = dl.train("patchmemory", data, tmp_path / "pm", device="cpu", progress=False)
    assert run.config.data.image_size == 224 and run.model.image_size == 224
    reason = run.config.resolved["data.image_size"]["reason"]
    assert "working size" in reason and "48 px" in reason
    # an explicit size wins, and records no size decision
    run = dl.train(
        "patchmemory", data, tmp_path / "pm64", image_size=64, device="cpu", progress=False
    )
    assert run.config.data.image_size == 64 and "data.image_size" not in run.config.resolved
    assert run.config.data.tile == "off"


# --- the stitching loop ---------------------------------------------------------------------


def test_stitcher_matches_a_direct_average() -> None:
    rng = np.random.default_rng(0)
    positions = tile_grid((40, 50), 16)
    maps = rng.random((len(positions), 16, 16)).astype(np.float32)
    total, weight = np.zeros((40, 50)), np.zeros((40, 50))
    for heat, (t, left) in zip(maps, positions, strict=True):
        total[t : t + 16, left : left + 16] += heat
        weight[t : t + 16, left : left + 16] += 1
    np.testing.assert_allclose(stitch_tiles(maps, positions, (40, 50)), total / weight, atol=1e-6)


def test_tiles_stream_in_batches_for_a_10000_px_image() -> None:
    """A 10,000 px long image within the pixel budget: scored tile batch by tile batch
    (never all tiles at once), its map at its own size."""
    image = np.random.default_rng(0).random((300, 10_000, 1), dtype=np.float32)
    image[100:140, 7000:7040] = 5.0
    calls = []

    def score(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(tiles))
        maps = tiles[..., 0]
        return maps.max(axis=(1, 2)), maps

    best, heat = score_tiled(score, image, 64, batch_size=16)
    assert heat.shape == (300, 10_000) and best == pytest.approx(5.0)
    assert max(calls) <= 16 and sum(calls) == len(tile_grid((300, 10_000), 64))
    np.testing.assert_allclose(heat, image[..., 0], atol=1e-5)  # identity maps stitch back
    assert np.unravel_index(heat.argmax(), heat.shape)[1] in range(7000, 7040)


def test_image_smaller_than_the_tile_is_mirrored_and_cropped_back() -> None:
    """Documented behaviour: an image smaller than the model input is scored at native scale,
    mirrored out to a tile; its map has its own size and only its own pixels."""
    image = np.random.default_rng(1).random((40, 50, 1), dtype=np.float32)
    _, heat = score_tiled(lambda t: (t.max(axis=(1, 2, 3)), t[..., 0]), image, 64)
    assert heat.shape == (40, 50)
    np.testing.assert_allclose(heat, image[..., 0], atol=1e-6)
    tiles, positions = extract_tiles(image, 64)
    assert tiles.shape == (1, 64, 64, 1) and positions == [(0, 0)]


def test_training_tiles_cover_mixed_sizes(tmp_path: Path) -> None:
    paths = _images(tmp_path / "imgs", [(256, 256), (128, 200), (40, 50)])
    samples = [Sample(p, NORMAL) for p in paths]
    loaded = load_tiles(samples, 64, 1, progress=False)
    expected = sum(len(tile_grid(cv2.imread(str(p), 0).shape, 64)) for p in paths)
    assert loaded.images.shape == (expected, 64, 64, 1)
    assert loaded.original_sizes[-1] == (40, 50)


# --- tiled runs end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiled")
    data = _folder(root / "data", 256, n_normal=12, n_defect=4)
    run = root / "run"
    dl.train(
        "patchmemory",
        data,
        run,
        image_size=64,
        device="cpu",
        progress=False,
        overrides=["data.tile=on"],
    )
    return data, run


def test_tiled_training_evaluate_and_predict_at_native_size(
    tiled_run: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    data, run = tiled_run
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["tile"] == "on" and config["data"]["image_size"] == 64
    metrics = dl.evaluate(run, data, tmp_path / "eval", progress=False)
    assert metrics["tile"] == "on" and metrics["pixel_auroc"] > 0.9
    assert metrics["image_auroc"] > 0.9
    assert "native-resolution 64 px tiles" in (tmp_path / "eval" / "report.html").read_text()

    out = tmp_path / "p"
    code = main(["predict", "--run", str(run), "--input", str(data / "defect"), "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "p" / "results.jsonl").open()]
    assert len(rows) == 4 and all((r["width"], r["height"]) == (256, 256) for r in rows)
    identity = json.loads((tmp_path / "p" / "inspection.json").read_text())
    assert identity["tile"] is True  # as the run was trained, without --tile
    for row in rows:
        mask = cv2.imread(str(tmp_path / "p" / row["mask"]), cv2.IMREAD_GRAYSCALE)
        truth = cv2.imread(str(data / "masks" / Path(row["path"]).name), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (256, 256)
        assert (mask[truth > 127] > 0).mean() > 0.5  # the disc is found at native size


def test_onnx_backend_stitches_like_torch(tiled_run: tuple[Path, Path]) -> None:
    from defectlab.deploy.onnx import export_onnx

    _, run = tiled_run
    meta = export_onnx(run)
    assert meta["tiling"]["enabled"] is True and meta["input"]["shape"][1] == 64
    torch_side, onnx_side = open_inspector(run, "torch", "cpu"), open_inspector(run, "onnx")
    assert torch_side.tiled and onnx_side.tiled
    rng = np.random.default_rng(3)
    images = [
        with_defect(textured(rng, 256), rng)[0][:, :, None].astype(np.float32) / 255.0,
        textured(rng, 200)[:150, :, None].astype(np.float32) / 255.0,
    ]
    for (s_t, m_t), (s_o, m_o) in zip(
        score_images(torch_side, images), score_images(onnx_side, images), strict=True
    ):
        assert m_t.shape == m_o.shape
        assert abs(s_t - s_o) <= 1e-3 + 1e-3 * abs(s_t)
        assert np.all(np.abs(m_t - m_o) <= 1e-3 + 1e-3 * np.abs(m_t))
    assert score_images(torch_side, images)[1][1].shape == (150, 200)


class _Recorder(Inspector):
    """An inspector that returns its input as the map and records the batch sizes."""

    calls: list[int]

    def score(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(len(images))
        return images.max(axis=(1, 2, 3)), images[..., 0]


def test_mixed_sizes_in_one_folder_each_get_their_own_map(tmp_path: Path) -> None:
    inspector = _Recorder("x", 64, 1, 0.5, 0.5, (0.0, 1.0), tmp_path, tiled=True)
    inspector.calls = []
    rng = np.random.default_rng(0)
    images = [rng.random(s, dtype=np.float32) for s in [(256, 256, 1), (70, 300, 1), (30, 40, 1)]]
    results = score_images(inspector, images, batch_size=8)
    assert [heat.shape for _, heat in results] == [(256, 256), (70, 300), (30, 40)]
    assert max(inspector.calls) <= 8
    untiled = score_images(inspector, images, tile=False)  # resized to the model size
    assert [heat.shape for _, heat in untiled] == [(256, 256), (70, 300), (30, 40)]


def test_cli_tile_too_large_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "data", 48, n_normal=10, n_defect=2)
    code = main(
        [
            "train",
            "--model",
            "pixelstats",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--image-size",
            "128",
            "--set",
            "data.tile=on",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "128 px tile is larger than every training image" in err[0]


def test_predict_streams_a_10000_px_image_in_tile_batches(tmp_path: Path) -> None:
    """``predict`` on a 10,000 px wide image (within the pixel budget): tiles go to the model
    ``batch_size`` at a time and the mask comes back at the image's own size."""
    from defectlab.deploy.batch import inspect_folder

    rng = np.random.default_rng(0)
    write_image(tmp_path / "in" / "wide.png", rng.integers(0, 100, (300, 10_000), np.uint8))
    inspector = _Recorder("x", 64, 1, 0.5, 0.5, (0.0, 1.0), tmp_path, tiled=True)
    inspector.calls = []
    result = inspect_folder(
        inspector, tmp_path / "in", tmp_path / "out", batch_size=8, overlays=False, progress=False
    )
    assert result["n_images"] == 1 and max(inspector.calls) <= 8
    assert sum(inspector.calls) == len(tile_grid((300, 10_000), 64))
    mask = cv2.imread(str(tmp_path / "out" / "masks" / "wide.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (300, 10_000)
