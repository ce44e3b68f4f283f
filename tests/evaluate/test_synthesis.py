"""Generated-image quality: Lite0-FID/KID against numpy references, the Inception-style score,
diversity, mask statistics, folders with bad files, and the evaluate-synth command."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from defectlab.errors import DataError
from defectlab.evaluate import synthesis as syn
from defectlab.evaluate.synthesis import (
    Lite0Embedder,
    compare_mask_statistics,
    diversity,
    embed_images,
    evaluate_synthesis,
    fid_from_features,
    frechet_distance,
    inception_score_from_logits,
    kid_from_features,
    mask_diversity,
    mask_statistics,
    mmd2_unbiased,
    outside_region_fraction,
)
from defectlab.evaluate.synthesis_cli import add_parser
from tests.conftest import textured, write_image

SIZE = 64  # Lite0 input size in these tests (a multiple of 32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def embedder() -> Lite0Embedder:
    return Lite0Embedder("cpu")


def _images(n: int, seed: int = 0, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [textured(rng, size).astype(np.float32) / 255.0 for _ in range(n)]


# --- references ------------------------------------------------------------------------------


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """FID with tr((Σ1Σ2)^½) = tr((√Σ1 Σ2 √Σ1)^½), symmetric eigendecompositions only."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r1 = _psd_sqrt(s1)
    cross = np.trace(_psd_sqrt(r1 @ s2 @ r1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def _mmd2_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(x, y) = (x·y/d + 1)³, written as the double sums."""
    d = x.shape[1]

    def k(u: np.ndarray, v: np.ndarray) -> float:
        return (float(u @ v) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


# --- embeddings ------------------------------------------------------------------------------


def test_embedder_is_lite0_with_its_imagenet_head(embedder: Lite0Embedder) -> None:
    """Stem, blocks, head and classifier reproduce the package's own full forward pass."""
    import efficientnet_lite_pytorch as lite

    from defectlab.components.features import INPUT_MEAN, INPUT_STD, weights_path

    net = lite.EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True))
    net.eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        emb, logits = embedder(x)
        expected = net((x - INPUT_MEAN) / INPUT_STD)
    assert emb.shape == (2, syn.EMBEDDING_DIM) and logits.shape == (2, 1000)
    torch.testing.assert_close(logits, expected)
    assert not any(p.requires_grad for p in embedder.parameters())
    embedder.train()
    assert not embedder.training


def test_embeddings_of_any_size_and_grey_replicated(embedder: Lite0Embedder) -> None:
    grey = _images(1, size=40)[0]
    a, _ = embed_images([grey, grey[:, :, None], np.repeat(grey[:, :, None], 3, 2)], embedder, SIZE)
    np.testing.assert_allclose(a[0], a[1], atol=1e-6)
    np.testing.assert_allclose(a[0], a[2], atol=1e-6)
    b, _ = embed_images([np.zeros((37, 90), np.float32)], embedder, SIZE)
    assert b.shape == (1, syn.EMBEDDING_DIM)


# --- FID -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d"), [(60, 5), (9, 30)])  # full-space and reduced-span paths
def test_fid_matches_numpy_reference(n: int, d: int) -> None:
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(0.3, 1.5, size=(n + 3, d))
    assert fid_from_features(a, b) == pytest.approx(_fid_reference(a, b), rel=1e-6, abs=1e-8)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_known_gaussians() -> None:
    # ‖μ1−μ2‖² + tr(Σ1+Σ2−2(Σ1Σ2)^½) for diagonal covariances is Σ (σ1−σ2)² per axis
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 2.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5.0 + 1.0 + 0.0 + 4.0)


def test_fid_is_zero_for_a_set_against_itself_and_grows_with_shift(
    embedder: Lite0Embedder,
) -> None:
    images = _images(12)
    base, _ = embed_images(images, embedder, SIZE)
    bright_a, _ = embed_images([np.clip(i + 0.1, 0, 1) for i in images], embedder, SIZE)
    bright_b, _ = embed_images([np.clip(i + 0.35, 0, 1) for i in images], embedder, SIZE)
    blurred, _ = embed_images([cv2.GaussianBlur(i, (0, 0), 2.5) for i in images], embedder, SIZE)
    same = fid_from_features(base, base)
    small, large = fid_from_features(base, bright_a), fid_from_features(base, bright_b)
    blur = fid_from_features(base, blurred)
    assert same == pytest.approx(0.0, abs=1e-6 * max(large, 1.0))
    assert 0 < small < large
    assert blur > 100 * max(same, 1e-9)


# --- KID -------------------------------------------------------------------------------------


def test_unbiased_mmd_matches_double_sum_reference() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 4)), rng.normal(0.5, 1.0, size=(9, 4))
    kxx, kyy, kxy = syn._poly_kernel(x, x), syn._poly_kernel(y, y), syn._poly_kernel(x, y)
    assert mmd2_unbiased(kxx, kyy, kxy) == pytest.approx(_mmd2_reference(x, y))
    # one subset holding every sample is exactly the estimator on the whole sets
    z = rng.normal(size=(7, 4))
    kid = kid_from_features(x, z, n_subsets=1, subset_size=100)
    assert kid["subset_size"] == 7 and kid["n_subsets"] == 1 and kid["std"] is None
    assert kid["mean"] == pytest.approx(_mmd2_reference(x, z))


def test_kid_near_zero_for_halves_of_one_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(400, 16))
    same = kid_from_features(feats[:200], feats[200:], n_subsets=50, subset_size=50)
    assert abs(same["mean"]) < 2 * same["std"]
    shifted = kid_from_features(feats[:200], feats[200:] + 0.5, n_subsets=50, subset_size=50)
    assert shifted["mean"] > 5 * shifted["std"] > 0
    # the per-subset kernels (large sets) give the same numbers as indexing precomputed ones
    monkeypatch.setattr(syn, "_KID_PRECOMPUTE_MAX", 0)
    again = kid_from_features(feats[:200], feats[200:], n_subsets=50, subset_size=50)
    assert again["mean"] == pytest.approx(same["mean"]) and again["std"] == pytest.approx(
        same["std"]
    )


# --- Inception-style score and diversity -----------------------------------------------------


def test_inception_score_bounds() -> None:
    uniform = inception_score_from_logits(np.zeros((8, 10)), splits=2, min_split_size=4)
    assert uniform["mean"] == pytest.approx(1.0)
    confident = np.full((8, 10), -50.0)
    confident[np.arange(8), np.arange(8) % 4] = 50.0  # 4 classes, evenly, per split
    score = inception_score_from_logits(confident, splits=2, min_split_size=4)
    assert score["mean"] == pytest.approx(4.0, rel=1e-6) and score["std"] == pytest.approx(0.0)
    assert score["splits"] == 2 and score["images_per_split"] == 4
    # small sets are not cut into splits too small to score: 8 images, 1 split, score 4
    small = inception_score_from_logits(confident, splits=10)
    assert small["splits"] == 1 and small["mean"] == pytest.approx(4.0, rel=1e-6)


def test_diversity_zero_for_identical_images_larger_for_varied(embedder: Lite0Embedder) -> None:
    images = _images(6, seed=3)
    same, _ = embed_images([images[0]] * 4, embedder, SIZE)
    varied, _ = embed_images(images, embedder, SIZE)
    for metric in ("cosine", "l2"):
        d_same = diversity(same, metric=metric)["overall"]
        d_varied = diversity(varied, metric=metric)["overall"]
        assert d_same == pytest.approx(0.0, abs=1e-4) and d_varied > 10 * max(d_same, 1e-6)
    grouped = diversity(np.concatenate([same[:2], varied[:3]]), groups=["a", "a", "b", "b", "b"])
    assert grouped["within_group"]["n_groups"] == 2
    assert grouped["overall"] > grouped["within_group"]["mean"] > 0


# --- masks -----------------------------------------------------------------------------------


def _disc(size: int = 40, radius: int = 8, centre: tuple[int, int] = (20, 20)) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, centre, radius, 1, -1)
    return mask.astype(bool)


def test_mask_statistics_on_hand_made_masks() -> None:
    bar = np.zeros((40, 40), bool)
    bar[10:14, 5:25] = True  # 4 × 20
    two = _disc(radius=4, centre=(8, 8)) | _disc(radius=4, centre=(30, 30))
    empty = np.zeros((40, 40), bool)
    stats = mask_statistics([bar, _disc(), two, empty])
    per = stats["per_mask"]
    assert per["elongation"][0] == pytest.approx(5.0)  # length / width of a rectangle
    assert per["elongation"][1] == pytest.approx(1.0, abs=0.02)
    assert per["elongation"][0] > 4 * per["elongation"][1]
    assert per["n_components"] == [1, 1, 2, 0]
    assert per["area_fraction"][0] == pytest.approx(80 / 1600) and per["area_fraction"][3] == 0
    assert per["elongation"][3] is None and stats["n_empty"] == 1
    assert stats["summary"]["elongation"]["n"] == 3
    json.dumps(stats)  # plain Python values only


def test_mask_diversity_zero_when_collapsed_one_when_disjoint() -> None:
    disc = _disc(radius=6)
    assert mask_diversity([disc] * 5) == 0.0  # one mask for every noise: collapsed
    empty = np.zeros((40, 40), bool)
    assert mask_diversity([empty, empty]) == 0.0  # two empty masks are the same mask
    left, right = np.zeros((40, 40), bool), np.zeros((40, 40), bool)
    left[:, :10], right[:, 30:] = True, True
    assert mask_diversity([left, right], size=40) == 1.0
    half = np.zeros((40, 40), bool)
    half[:, :5] = True  # inside `left`: IoU 0.5
    assert mask_diversity([left, half], size=40) == pytest.approx(0.5)
    # different sizes compare after resizing; pairs are sampled when there are many
    big = cv2.resize(left.astype(np.uint8), (80, 80), interpolation=cv2.INTER_NEAREST) > 0
    assert mask_diversity([left, big], size=40) == 0.0
    many = [_disc(radius=3, centre=(5 + i, 5 + i)) for i in range(30)]
    assert 0 < mask_diversity(many, max_pairs=50) <= 1
    with pytest.raises(ValueError, match="at least 2"):
        mask_diversity([disc])


def test_compare_mask_statistics_and_outside_region() -> None:
    discs = [_disc(radius=r) for r in (5, 6, 7, 8)]
    bars = []
    for length in (16, 20, 24, 28):
        bar = np.zeros((40, 40), bool)
        bar[18:21, 6 : 6 + length] = True
        bars.append(bar)
    same = compare_mask_statistics(discs, mask_statistics(discs))
    assert all(same[k]["w1"] == pytest.approx(0.0) for k in syn.MASK_STATISTICS)
    other = compare_mask_statistics(discs, bars)
    assert other["elongation"]["w1"] > 3  # about 8.7 − 1 on average
    assert other["elongation"]["w1_relative"] is None  # every disc has elongation 1: no spread
    assert other["area_fraction"]["w1_relative"] > 0

    region = np.zeros((40, 40), bool)
    region[:, :20] = True  # left half allowed
    out = outside_region_fraction([bars[0], np.zeros((40, 40), bool)], region)
    assert out["per_mask"] == [pytest.approx(2 / 16), None]
    assert out["overall"] == pytest.approx(2 / 16) and out["mean"] == pytest.approx(2 / 16)


# --- folders and the command -----------------------------------------------------------------


def _write_folder(root: Path, n: int, seed: int) -> Path:
    for i, image in enumerate(_images(n, seed)):
        write_image(root / f"sub{i % 2}" / f"{i:03d}.png", (image * 255).astype(np.uint8))
    return root


def _write_synth_output(root: Path, n: int, seed: int) -> Path:
    """A `defectlab synth` output: images/, masks/, manifest.csv with a source column."""
    rows = []
    for i, image in enumerate(_images(n, seed)):
        write_image(root / "images" / f"{i:06d}.png", (image * 255).astype(np.uint8))
        write_image(root / "masks" / f"{i:06d}.png", _disc(48, 5).astype(np.uint8) * 255)
        rows.append({"index": i, "image": f"images/{i:06d}.png", "source": f"n{i % 3}.png"})
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_corrupt_file_is_reported_and_skipped(
    tmp_path: Path, embedder: Lite0Embedder, capsys: pytest.CaptureFixture[str]
) -> None:
    real = _write_folder(tmp_path / "real", 6, seed=1)
    fake = _write_folder(tmp_path / "fake", 5, seed=2)
    (fake / "broken.png").write_bytes(b"not a png at all")
    write_image(fake / "sub0" / "000_mask.png", np.zeros((48, 48), np.uint8))  # not a sample
    result = evaluate_synthesis(
        real, fake, None, image_size=SIZE, kid_subsets=3, embedder=embedder, progress=False
    )
    err = capsys.readouterr().err
    assert "broken.png" in err and "skipped" in err
    assert result["fake"]["n_images"] == 5 and result["fake"]["n_skipped"] == 1
    assert result["fake"]["skipped"][0]["path"].endswith("broken.png")
    assert result["real"]["n_images"] == 6 and "not Inception" in result["note"]


def test_empty_or_too_small_folder_is_a_data_error(tmp_path: Path, embedder: Lite0Embedder) -> None:
    real = _write_folder(tmp_path / "real", 3, seed=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty.*no images"):
        evaluate_synthesis(real, empty, None, image_size=SIZE, embedder=embedder, progress=False)
    one = _write_folder(tmp_path / "one", 1, seed=2)
    with pytest.raises(DataError, match=r"one.*at least 2"):
        evaluate_synthesis(real, one, None, image_size=SIZE, embedder=embedder, progress=False)
    with pytest.raises(DataError, match=r"missing.*does not exist"):
        evaluate_synthesis(real, tmp_path / "missing", None, embedder=embedder, progress=False)


def test_evaluate_synth_command_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = _write_folder(tmp_path / "real", 6, seed=1)
    fake = _write_synth_output(tmp_path / "synth", 6, seed=5)
    parser = argparse.ArgumentParser(prog="defectlab")
    add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "quality"
    args = parser.parse_args(
        ["evaluate-synth", "--real", str(real), "--fake", str(fake), "--out", str(out),
         "--device", "cpu", "--image-size", str(SIZE),
         "--kid-subsets", "4", "--kid-subset-size", "4"]
    )  # fmt: skip
    summary = args.func(args)
    printed = capsys.readouterr().out
    assert "not Inception FID/KID" in summary and "6 real / 6 fake" in summary
    assert all("Lite0" in line or "feature space" in line or line.startswith("warning")
               for line in printed.splitlines())  # fmt: skip
    saved = json.loads((out / syn.RESULT_FILE).read_text())
    assert saved["fake"]["n_images"] == 6 and saved["fake"]["grouped_by_source"]
    assert saved["fake"]["folder"] == str(fake)
    assert saved["diversity"]["fake"]["within_group"]["n_groups"] == 3
    assert saved["feature_dim"] == 1280 and "Lite0" in saved["feature_space"]
    assert saved["versions"]["lite0"]["sha256"] and saved["versions"]["scipy"]
    assert saved["lite0_fid"] >= 0 and saved["lite0_kid"]["n_subsets"] == 4
    assert saved["lite0_kid"]["subset_size"] == 4 and saved["lite0_kid"]["std"] > 0
    assert not list(out.glob(".*"))  # the atomic write left no temp file


def test_mask_realism_of_a_synth_output_against_real_masks(
    folder_root: Path, tmp_path: Path
) -> None:
    from defectlab import api

    fake = tmp_path / "synth"
    api.synthesize("procedural", folder_root / "normal", fake, 5, seed=0, progress=False)
    realism = syn.synthesis_mask_realism(folder_root, fake)
    assert realism is not None and "outside_object" not in realism  # procedural records none
    assert realism["distance"]["n_real"] == 6 and realism["distance"]["n_fake"] == 5
    assert realism["distance"]["area_fraction"]["w1"] >= 0
    assert 0.5 < realism["diversity"]["fake"] <= 1  # random shapes at random places
    masks = syn.synthetic_masks(fake)  # the manifest's masks, as the benchmark reads them
    assert len(masks) == 5 and all(m.dtype == bool and m.any() for m in masks)
    with pytest.raises(DataError, match=r"no manifest\.csv"):
        syn.synthetic_masks(folder_root / "normal")
    assert 0 <= realism["diversity"]["real"] <= 1
    # a synthesizer that knows the object region records each mask's share outside it
    lines = (fake / "manifest.csv").read_text().splitlines()
    extra = ["100,0", "300,0.5", "100,0", "100,0", "100,0"]
    rows = [lines[0] + ",mask_area,outside_object"] + [
        f"{line},{cols}" for line, cols in zip(lines[1:], extra, strict=True)
    ]
    (fake / "manifest.csv").write_text("\n".join(rows) + "\n")
    outside = syn.synthesis_mask_realism(folder_root, fake)["outside_object"]
    assert outside["pixel_share"] == pytest.approx(150 / 700)
    assert outside["masks_touching_outside"] == pytest.approx(1 / 5)
    assert syn.synthesis_mask_realism(folder_root / "normal", fake) is None  # no real masks
