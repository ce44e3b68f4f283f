"""Weak-supervision benchmark: how much segmentation quality each kind of label buys.

On magnetic tile, split MT-K-shot v1 (``data.defects_per_class=K``, ``data.split_seed=SEED``;
every run writes its split to ``split.json``): the K training defects per type carry masks,
the remaining defect images are the held-out test set. Rows:

* ``unet`` — masks (fully supervised; the upper bound);
* ``unet-lite0`` — the same on the frozen ImageNet Lite0 encoder (the upper bound for the
  models that use Lite0 features: ``cam-lite0-*``, the ``memory`` and ``lite0`` GCNs);
* ``cam`` — image labels only (class activation maps);
* ``cam-peak`` — the same classifier's maps thresholded by CAM's own rule (20% of each map's
  peak, ``peak_fraction=0.2``) instead of a quantile of normal pixels;
* ``cam-lite0-peak`` — the same rule on a classifier over the frozen ImageNet Lite0 encoder
  (``encoder=lite0``) instead of the small plain encoder trained from scratch, with maps from
  its two deepest stages (``cam_layers=-1,-2``: strides 32 and 16; at 96 px the deepest is
  3 × 3 pixels);
* ``cam-lite0-fine`` — the same classifier with maps from its stride-16 and stride-8 stages
  (``cam_layers=-2,-3``, now the Lite0 default); chosen with ``cam_localisation.py`` on split
  seeds 0 and 1;
* ``arearatio-gcn`` — the exact area ratio of each training mask (all ``arearatio-gcn``
  rows are calibrated with ``calibration.method=area``; their own 0.5 rule is the
  ``dice_model_rule`` column);
* ``arearatio-gcn-noisy`` — the same ratios, each × its own U(0.7, 1.3) factor drawn once
  (``ratio_noise=0.3``: a fixed error per image, like a person's estimate);
* ``arearatio-gcn-memory``, ``arearatio-gcn-memory-noisy`` — the same two with
  ``novelty=memory``: the distance of each patch to a memory of normal training patches
  ranks the vertices for the pseudo-labels and is an input channel of the FCN;
* ``arearatio-gcn-lite0``, ``arearatio-gcn-lite0-noisy`` — the ``memory`` two with the FCN on
  the frozen ImageNet Lite0 encoder (``encoder=lite0``: a U-Net decoder over its stages);
* ``whole-image``, ``centre-disc``, ``centre-box`` — trivial masks computed directly: the
  whole image, and a centred disc / box. Their "maps" rank pixels by closeness to the centre,
  so the calibrated threshold gives the disc (box) whose area is the mean defect share of the
  K-shot training masks and the oracle threshold gives the best centred disc (box).

False alarms: ``normal_flagged_share``, the share of the held-out normal images' pixels that
the calibrated threshold flags (``normal_flagged_share_model_rule`` at the model's own).

Metrics over the held-out defect images only: Dice and IoU micro (all pixels pooled,
:func:`~defectlab.evaluate.metrics.dice_iou`) and mean per image, at the run's calibrated
pixel threshold (``run.pixel_threshold``: a quantile of normal validation pixels; for
``cam-peak`` rows 20% of each map's peak; for ``arearatio-gcn`` the threshold at which the
training maps flag the labelled total area, ``calibration.method=area``), at the model's own
decision threshold when it fixes one (``dice_model_rule``: ``arearatio-gcn``'s vertex
probability 0.5, its default calibration) and at the oracle best-Dice threshold
(:func:`~defectlab.evaluate.metrics.best_dice_threshold`, which peeks at the test masks: a
reference only), and pixel AUROC over those images. A trained model's test images are
predicted once, by :func:`defectlab.api.evaluate` (normal + defect test images), which also
gives image AUROC, the usual pixel AUROC and ``eval/report.html``.

ELPV part (``--elpv``, on by default): a CAM row (``--elpv-row``, default ``cam``) on ELPV
from image labels, with K defect cells held out for training (ELPV has one defect type and no
masks): image AUROC and a report.

Each job runs in its own process, so peak RSS is its own. Rows go to stdout as JSON and to
``OUT/results.json``, which keeps the rows of earlier invocations into the same ``OUT`` for
models not run again; finished run folders are reused (and rescored).

    .venv/bin/python benchmarks/weak_supervision.py --image-size 128 --k 20 --seed 0 \\
        --epochs-scale 1.0 --out runs/weak --models unet cam arearatio-gcn arearatio-gcn-noisy
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_DATA,
    add_write_docs,
    dataset_split,
    docs_key,
    fmt_fixed,
    fmt_number,
    held_out,
    job_rows,
    markdown_table,
    peak_rss_mb,
    segmentation_metrics,
    train_or_reuse,
    write_section,
)

#: CAM's own mask rule (Zhou et al. 2016): 20% of each map's peak
PEAK_RULE = ["model.normalize=minmax", "model.peak_fraction=0.2"]
#: the area-ratio rows keep the area-matched calibration of their first runs; the model's
#: default (its own 0.5 rule) is scored alongside as ``dice_model_rule``
AREA_CALIBRATION = "calibration.method=area"
#: benchmark row name → (registered model, extra ``--set`` options, the labels it learns from)
MODELS: dict[str, tuple[str, list[str], str]] = {
    "unet": ("unet", [], "masks"),
    "unet-lite0": ("unet", ["model.encoder=lite0"], "masks (Lite0 encoder)"),
    "cam": ("cam", [], "image labels"),
    "cam-peak": ("cam", PEAK_RULE, "image labels (mask: 20% of each map's peak)"),
    "cam-lite0-peak": (
        "cam",
        ["model.encoder=lite0", "model.cam_layers=-1,-2", *PEAK_RULE],
        "image labels (Lite0 encoder, stride-16 and -32 stages; mask: 20% of each map's peak)",
    ),
    "cam-lite0-fine": (
        "cam",
        ["model.encoder=lite0", "model.cam_layers=-2,-3", *PEAK_RULE],
        "image labels (Lite0 encoder, stride-8 and -16 stages; mask: 20% of each map's peak)",
    ),
    "arearatio-gcn": ("arearatio-gcn", [AREA_CALIBRATION], "area ratios"),
    "arearatio-gcn-noisy": (
        "arearatio-gcn",
        [AREA_CALIBRATION, "model.ratio_noise=0.3"],
        "area ratios ±30%",
    ),
    "arearatio-gcn-memory": (
        "arearatio-gcn",
        [AREA_CALIBRATION, "model.novelty=memory"],
        "area ratios",
    ),
    "arearatio-gcn-memory-noisy": (
        "arearatio-gcn",
        [AREA_CALIBRATION, "model.novelty=memory", "model.ratio_noise=0.3"],
        "area ratios ±30%",
    ),
    "arearatio-gcn-lite0": (
        "arearatio-gcn",
        [AREA_CALIBRATION, "model.novelty=memory", "model.encoder=lite0"],
        "area ratios (FCN on the Lite0 encoder)",
    ),
    "arearatio-gcn-lite0-noisy": (
        "arearatio-gcn",
        [AREA_CALIBRATION, "model.novelty=memory", "model.encoder=lite0", "model.ratio_noise=0.3"],
        "area ratios ±30% (FCN on the Lite0 encoder)",
    ),
}
BASELINES = ("whole-image", "centre-disc", "centre-box")
COLUMNS = (
    "dice",
    "iou",
    "dice_mean",
    "iou_mean",
    "dice_oracle",
    "iou_oracle",
    "dice_mean_oracle",
    "dice_model_rule",
    "normal_flagged_share",
    "pixel_auroc_defect",
    "image_auroc",
)


def overrides(args: argparse.Namespace, model: str, extra: list[str], k: int) -> list[str]:
    """K-shot split by the written seed, and the model's default epochs × the scale."""
    from defectlab import registry

    default_epochs = registry.get(model).Config().epochs
    epochs = max(1, round(default_epochs * args.epochs_scale))
    return [
        f"data.defects_per_class={k}",
        f"data.split_seed={args.seed}",
        f"model.epochs={epochs}",
        *extra,
        *args.set,
    ]


def run_model(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Train (or reuse) one model, then score the held-out images of its split (predicted
    once, inside ``api.evaluate``)."""
    from defectlab import api
    from defectlab.data.layouts import DEFECT, NORMAL
    from defectlab.data.splits import Split

    model, extra, supervision = MODELS[name]
    run_dir = args.out / f"{name}-k{args.k}-{args.image_size}-s{args.seed}-e{args.epochs_scale:g}"
    train_seconds = train_or_reuse(
        args, model, args.data, run_dir, overrides(args, model, extra, args.k)
    )
    run = api.load_run(run_dir, args.device)
    split = Split.load(run_dir / "split.json")
    predicted: dict[str, Any] = {}
    metrics = api.evaluate(
        run_dir,
        args.data,
        run_dir / "eval",
        device=args.device,
        on_predictions=lambda loaded, _, maps: predicted.update(loaded=loaded, maps=maps),
    )
    loaded, all_maps = predicted["loaded"], predicted["maps"]
    defect = np.array([s.label == DEFECT and s.mask_path is not None for s in loaded.samples])
    test_samples = [s for s, keep in zip(loaded.samples, defect, strict=True) if keep]
    masks, maps = loaded.masks[defect], all_maps[defect]
    normal_maps = all_maps[loaded.labels == NORMAL]
    own = getattr(run.model, "decision_thresholds", None)
    flagged = {"normal_flagged_share": float((normal_maps >= run.pixel_threshold).mean())}
    if own is not None:
        flagged["normal_flagged_share_model_rule"] = float((normal_maps >= own[1]).mean())
    return {
        "model": name,
        "dataset": "magnetic-tile",
        "split": split.name,
        "supervision": supervision,
        "n_train_defect": len(split["train_defect"]),
        "n_test_defect": len(test_samples),
        "train_seconds": train_seconds,
        "peak_rss_mb": peak_rss_mb(),
        **segmentation_metrics(
            masks,
            maps,
            run.pixel_threshold,
            [s.defect_type for s in test_samples],
            None if own is None else own[1],
        ),
        **flagged,
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "report": str(run_dir / "eval" / "report.html"),
    }


def centre_distance(size: int, kind: str) -> np.ndarray:
    """Normalised distance from the image centre: Euclidean (disc) or Chebyshev (box)."""
    coords = (np.arange(size) + 0.5) / size - 0.5
    dy, dx = np.meshgrid(coords, coords, indexing="ij")
    return np.hypot(dy, dx) if kind == "disc" else np.maximum(np.abs(dy), np.abs(dx))


def run_baselines(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The trivial masks, on the same split as the trained models (same seed, same K)."""
    from defectlab import api
    from defectlab.data.loading import load_samples

    started = time.perf_counter()
    config = api.build_config(
        "unet",
        args.data,
        image_size=args.image_size,
        seed=args.seed,
        overrides=overrides(args, "unet", [], args.k),
    )
    split = dataset_split(config.data)
    out = args.out / f"baselines-k{args.k}-{args.image_size}-s{args.seed}"
    split.save(out / "split.json")
    test = held_out(split, config)
    data = config.data
    train = load_samples(
        split["train_defect"],
        data.image_size,
        data.channels,
        data.mask_threshold,
        workers=data.workers,
        desc="loading training defects",
        progress=False,
    )
    share = float(train.masks.mean())  # mean defect area share of the K-shot masks
    n, size = len(test.samples), args.image_size
    types = [s.defect_type for s in test.samples]
    rows = []
    for name in BASELINES:
        if name == "whole-image":
            maps, threshold = np.ones((n, size, size), np.float32), 1.0
        else:
            closeness = 1.0 - centre_distance(size, name.removeprefix("centre-"))
            maps = np.broadcast_to(closeness.astype(np.float32), (n, size, size))
            threshold = float(np.quantile(closeness, 1.0 - share))  # area = share
        rows.append(
            {
                "model": name,
                "dataset": "magnetic-tile",
                "split": split.name,
                "supervision": "none" if name == "whole-image" else "mean train area",
                "n_train_defect": len(split["train_defect"]),
                "n_test_defect": n,
                "train_seconds": 0.0,
                "peak_rss_mb": peak_rss_mb(),
                **segmentation_metrics(test.masks, maps, threshold, types),
                "image_auroc": None,
                "pixel_auroc": None,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    return rows


def run_elpv(args: argparse.Namespace) -> dict[str, Any]:
    """A CAM row (``--elpv-row``) on ELPV from image labels (K defect cells for training):
    image AUROC and the report's maps."""
    from defectlab import api

    name = args.elpv_row
    model, extra, _ = MODELS[name]
    k = args.elpv_k if args.elpv_k is not None else args.k
    run_dir = args.out / f"{name}-elpv-k{k}-{args.image_size}-s{args.seed}-e{args.epochs_scale:g}"
    train_seconds = train_or_reuse(args, model, "elpv", run_dir, overrides(args, model, extra, k))
    metrics = api.evaluate(run_dir, "elpv", run_dir / "eval", device=args.device)
    return {
        "model": name,
        "dataset": "elpv",
        "split": metrics["split"],
        "supervision": "image labels",
        "n_train_defect": k,
        "n_test_defect": metrics["n_defect"],
        "train_seconds": train_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "image_auroc": metrics["image_auroc"],
        "image_ap": metrics["image_ap"],
        "f1": metrics["f1"],
        "report": str(run_dir / "eval" / "report.html"),
    }


def run_one(args: argparse.Namespace, job: str) -> list[dict[str, Any]]:
    if job == "baselines":
        return run_baselines(args)
    if job == "elpv":
        return [run_elpv(args)]
    return [run_model(args, job)]


def child_command(args: argparse.Namespace, job: str) -> list[str]:
    command = [
        sys.executable,
        __file__,
        "--one",
        job,
        "--data",
        args.data,
        "--image-size",
        str(args.image_size),
        "--k",
        str(args.k),
        "--seed",
        str(args.seed),
        "--epochs-scale",
        str(args.epochs_scale),
        "--device",
        args.device,
        "--out",
        str(args.out),
    ]
    if args.elpv_k is not None:
        command += ["--elpv-k", str(args.elpv_k)]
    command += ["--elpv-row", args.elpv_row]
    for option in args.set:
        command += ["--set", option]
    return command


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'model':<20} {'dataset':<14} {'split':<26} " + " ".join(f"{c:>12}" for c in COLUMNS)
    print(header + f" {'train_s':>9} {'peak_MB':>9}")
    for r in rows:
        values = " ".join(fmt_fixed(r.get(c), 12) for c in COLUMNS)
        extra = f"{fmt_fixed(r['train_seconds'], 9, 1)} {fmt_fixed(r['peak_rss_mb'], 9, 1)}"
        print(f"{r['model']:<20} {r['dataset']:<14} {r['split']:<26} {values} {extra}")
    print(
        "dice/iou: micro over held-out defect images at the calibrated pixel threshold; "
        "*_mean: mean per image; *_oracle: best-Dice threshold on the test masks (reference "
        "only); pixel_auroc_defect: pixels of held-out defect images."
    )


SUMMARY_COLUMNS = (
    "dice",
    "dice_oracle",
    "dice_model_rule",
    "normal_flagged_share",
    "normal_flagged_share_model_rule",
    "pixel_auroc_defect",
    "image_auroc",
)


def summarise(seeds: list[str], reference: str = "unet") -> list[dict[str, str]]:
    """Mean ± std over split seeds of each magnetic-tile row, and each row's Dice per seed
    (calibrated and at its own rule) as a share of the same seed's ``reference`` Dice. Each item of
    ``seeds`` is one seed's ``--out`` folders, comma-separated (a later folder's row replaces
    an earlier one's). Returns the table's rows as text cells, for ``--write-docs``."""
    per_seed: list[dict[str, dict[str, Any]]] = []
    table: list[dict[str, str]] = []
    for item in seeds:
        rows: dict[str, dict[str, Any]] = {}
        for folder in item.split(","):
            path = Path(folder) / "results.json"
            if not path.is_file():
                sys.exit(f"{folder}: no results.json (run the benchmark into it first)")
            for r in json.loads(path.read_text()):
                if r["dataset"] == "magnetic-tile":
                    rows[r["model"]] = r
        per_seed.append(rows)
    names = [m for m in [*MODELS, *BASELINES] if any(m in rows for rows in per_seed)]
    print(f"{'model':<28} {'seeds':>5} " + " ".join(f"{c:>22}" for c in SUMMARY_COLUMNS))
    for name in names:
        group = [rows[name] for rows in per_seed if name in rows]
        cells = []
        for column in SUMMARY_COLUMNS:
            values = [r[column] for r in group if r.get(column) is not None]
            cells.append(
                f"{np.mean(values):>12.3f} ± {np.std(values):.3f}" if values else f"{'n/a':>22}"
            )
        print(f"{name:<28} {len(group):>5} {' '.join(cells)}")
        table_row = {"model": f"`{name}`", "seeds": str(len(group))}
        table_row |= {
            c: " ".join(cell.split()) for c, cell in zip(SUMMARY_COLUMNS, cells, strict=True)
        }
        for column in ("dice", "dice_model_rule"):
            if any(rows.get(name, {}).get(column) is not None for rows in per_seed):
                shares = per_seed_shares(per_seed, name, column, reference)
                print(f"    {column} per seed: {shares}")
                table_row[f"{column}_per_seed"] = shares
        table.append(table_row)
    print(
        "mean ± std over split seeds; dice: calibrated threshold; dice_model_rule: the model's "
        "own threshold; normal_flagged_share(_model_rule): share of the held-out normal images' "
        f"pixels flagged at that threshold; per seed: the Dice (its share of the same seed's "
        f"{reference} Dice)."
    )
    return table


def per_seed_shares(
    per_seed: list[dict[str, dict[str, Any]]], name: str, column: str, reference: str
) -> str:
    """``0.237 (108%) 0.244 (80%) -``: a row's Dice per seed and its share of the
    ``reference`` row's calibrated Dice on that seed."""
    cells = []
    for rows in per_seed:
        value = rows.get(name, {}).get(column)
        upper = rows.get(reference, {}).get("dice")
        if value is None:
            cells.append("-")
        elif upper:
            cells.append(f"{value:.3f} ({value / upper:.0%})")
        else:
            cells.append(f"{value:.3f}")
    return " ".join(cells)


def write_docs_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """``--write-docs``: the rows of ``--out``'s results.json as one section of the page."""
    columns = [("model", "model", str), ("dataset", "dataset", str), ("split", "split", str)]
    columns += [(c, c, fmt_number(3)) for c in COLUMNS]
    columns += [("train_seconds", "train s", fmt_number(0))]
    path = write_section(
        args.write_docs,
        docs_key("weak-supervision", args.out.name),
        f"Weak supervision, one split seed: {args.out.name}",
        markdown_table(rows, columns),
        notes=(
            "dice/iou: micro over held-out defect images at the calibrated pixel threshold; "
            "*_mean: mean per image; *_oracle: best-Dice threshold on the test masks (reference "
            "only); dice_model_rule: at the model's own threshold; pixel_auroc_defect: pixels of "
            "held-out defect images."
        ),
    )
    print(f"results → {path}")


def write_docs_summary(args: argparse.Namespace, table: list[dict[str, str]]) -> None:
    """``--write-docs`` with ``--summarise``: the mean ± std table as one section."""
    columns = [("model", "model", str), ("seeds", "seeds", str)]
    columns += [(c, c, lambda v: v or "n/a") for c in SUMMARY_COLUMNS]
    columns += [
        (f"{c}_per_seed", f"{c} per seed (share of `{args.reference}`)", lambda v: v or "")
        for c in ("dice", "dice_model_rule")
    ]
    path = write_section(
        args.write_docs,
        docs_key("weak-supervision-summary", f"{len(args.summarise)}seeds", "ref", args.reference),
        f"Weak supervision on magnetic tile over {len(args.summarise)} split seeds",
        markdown_table(table, columns),
        notes=(
            "Mean ± std over split seeds; dice: calibrated threshold; dice_model_rule: the "
            "model's own threshold; normal_flagged_share(_model_rule): share of the held-out "
            "normal images' pixels flagged at that threshold; per seed: the Dice (its share of "
            f"the same seed's `{args.reference}` Dice)."
        ),
    )
    print(f"results → {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--data", default=DEFAULT_DATA, help="magnetic-tile folder")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=20, help="training defects per type")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="× each default epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/weak"))
    parser.add_argument("--no-baselines", dest="baselines", action="store_false")
    parser.add_argument("--no-elpv", dest="elpv", action="store_false")
    parser.add_argument("--elpv-k", type=int, default=None, help="ELPV training defects (K)")
    parser.add_argument(
        "--elpv-row",
        default="cam",
        choices=[name for name, (model, _, _) in MODELS.items() if model == "cam"],
        help="the CAM row trained on ELPV",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument(
        "--summarise",
        nargs="+",
        metavar="OUT[,OUT...]",
        help="only print mean ± std over split seeds; one argument per seed, its --out folders",
    )
    parser.add_argument(
        "--reference",
        default="unet",
        choices=list(MODELS),
        help="--summarise: the row whose calibrated Dice the shares are of",
    )
    add_write_docs(parser, "weak_supervision")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.summarise:
        table = summarise(args.summarise, args.reference)
        if args.write_docs:
            write_docs_summary(args, table)
        return
    if args.k < 1:
        parser.error("--k must be at least 1: the weak models learn from defect images")
    if args.epochs_scale <= 0:
        parser.error("--epochs-scale must be positive")

    from defectlab.data.io import atomic_write_text

    if args.one:
        for row in run_one(args, args.one):
            print(json.dumps(row))
        return

    jobs = [*args.models, *(["baselines"] if args.baselines else [])]
    jobs += ["elpv"] if args.elpv else []
    # rows of earlier invocations into the same --out are kept unless rerun now
    rerun = {(name, "magnetic-tile") for name in args.models}
    rerun |= {(name, "magnetic-tile") for name in BASELINES} if args.baselines else set()
    rerun |= {(args.elpv_row, "elpv")} if args.elpv else set()
    previous = args.out / "results.json"
    rows: list[dict[str, Any]] = [
        r
        for r in (json.loads(previous.read_text()) if previous.exists() else [])
        if (r["model"], r["dataset"]) not in rerun
    ]
    failed = []
    for job in jobs:
        found = job_rows(child_command(args, job), job)
        if found is None:
            failed.append(job)
        else:
            rows += found
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(rows, indent=2))
    print_table(rows)
    if args.write_docs:
        write_docs_table(args, rows)
    if failed:
        sys.exit(f"failed jobs: {', '.join(failed)}")


if __name__ == "__main__":
    main()
