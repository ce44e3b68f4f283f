"""Augmentation benchmark v2 (the seed's table): does synthetic data help a K-shot U-Net?

On magnetic tile, split MT-K-shot v1 (``data.defects_per_class=K``, ``data.split_seed=SEED``;
every run writes its split to ``split.json``): K training defects per type carry masks, the
remaining defect images are the held-out test set. The same U-Net (same epochs; the Lite0
encoder by default, ``--unet-set``) is trained on:

* ``none`` — the K real defects + the split's normal training images;
* ``procedural`` — + N procedural (image, mask) pairs painted on the split's normal training
  images (never on test images);
* ``copy-paste`` — + N pairs made by pasting the K real training defects' mask components
  onto those normal images (:mod:`defectlab.synth.copypaste`; exact masks);
* ``cyclegan``, ``crossgan``, ``maskgan`` — + N pairs from that generator, itself trained on
  the same K-shot split (``--gen-epochs``; generator-only options from ``--gen-set``) and
  applied to the split's normal training images. ``--translation-set`` options go to
  CycleGAN and CrossGAN only (e.g. ``model.generator=residual_attention``).

Synthetic pairs enter U-Net training through ``data.extra_pairs``; they never enter
``split.json``. Extra pairs mean more images per epoch, so an augmented row takes more
iterations at equal epochs.

Metrics over the held-out real defect images (reusing ``benchmarks/weak_supervision.py``):
Dice and IoU micro at the run's calibrated pixel threshold and at the oracle best-Dice
threshold (peeks at the test masks: a reference only), pixel AUROC and pixel AP; image AUROC
of the U-Net's image score over the held-out defect and normal test images. With
``--kid``, each generator's Lite0-KID against the held-out real defect images (EfficientNet-
Lite0 features, not Inception). ``mask_diversity`` is the mean 1 − IoU between the synthetic
masks (0 when a generator gives one mask for every noise; the real masks of magnetic tile
score 0.46). ``dice_whole_image`` is the Dice of the trivial all-defect mask on the same
test masks, the floor a calibrated Dice must clear. Rows are aggregated as mean ± std over
seeds per (row, K).

Each job (row, K, seed) runs in its own process; ``--jobs N`` runs N at once (on one GPU,
15 small jobs time-share it, so each runs slower, but the whole table ends sooner). Rows go
to stdout as JSON and to ``OUT/results.json`` (plus the aggregate in ``OUT/summary.json``);
finished runs and synthetic folders are reused, and rows that an earlier invocation wrote to
the same ``OUT`` for other (row, K, seed) cells are kept, so a table can be built one seed at
a time.

    .venv/bin/python benchmarks/augmentation.py --k 5 20 --seeds 0 1 2 --image-size 128 \\
        --n-synthetic 200 --epochs-scale 1.0 --gen-epochs 100 --kid \\
        --translation-set model.generator=residual_attention --out runs/augmentation-v2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_DATA,
    add_write_docs,
    dataset_split,
    docs_key,
    fmt_fixed,
    held_out,
    job_rows,
    markdown_table,
    peak_rss_mb,
    segmentation_metrics,
    train_or_reuse,
    write_section,
)

ROWS = ("none", "procedural", "copy-paste", "cyclegan", "crossgan", "maskgan")
GENERATORS = ("cyclegan", "crossgan", "maskgan")
TRANSLATORS = ("cyclegan", "crossgan")
COLUMNS = (
    "dice",
    "iou",
    "dice_type_mean",
    "dice_oracle",
    "iou_oracle",
    "pixel_auroc_defect",
    "pixel_ap",
    "image_auroc",
    "kid",
    "mask_diversity",
    "dice_whole_image",
)


def split_overrides(args: argparse.Namespace, k: int, seed: int) -> list[str]:
    """The K-shot split every model of one (K, seed) cell shares."""
    return [f"data.defects_per_class={k}", f"data.split_seed={seed}", *args.set]


def unet_epochs(args: argparse.Namespace) -> int:
    from defectlab import registry

    return max(1, round(registry.get("unet").Config().epochs * args.epochs_scale))


def link_files(paths: list[Path], folder: Path) -> Path:
    """A flat folder of symlinks to ``paths`` (index-prefixed: names may repeat across types),
    so folder-taking APIs see exactly these images and nothing else of the dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        link = folder / f"{i:05d}_{path.name}"
        # jobs of one cell may run at once (--jobs) and link the same normals
        with contextlib.suppress(FileExistsError):
            link.symlink_to(path.resolve())
    return folder


def generator_run(args: argparse.Namespace, row: str, cell: str) -> Path:
    return args.out / f"gen-{row}-{cell}-g{args.gen_epochs}"


def synthetic_folder(
    args: argparse.Namespace, row: str, k: int, seed: int, normals: Path, cell: str
) -> Path:
    """Write (or reuse) N synthetic pairs of ``row`` from the split's normal training images;
    a generator is first trained on the same K-shot split."""
    from defectlab import api

    out = args.out / f"synth-{row}-{cell}-n{args.n_synthetic}"
    if (out / "manifest.csv").exists():
        print(f"reusing synthetic pairs {out}", file=sys.stderr)
        return out
    if row == "copy-paste":
        write_copy_paste(args, k, seed, normals, out)
        return out
    run = None
    if row in GENERATORS:
        run = generator_run(args, row, cell)
        options = [
            *split_overrides(args, k, seed),
            f"model.epochs={args.gen_epochs}",
            *args.gen_set,
            *(args.translation_set if row in TRANSLATORS else []),
        ]
        gen_args = argparse.Namespace(**{**vars(args), "seed": seed})
        train_or_reuse(gen_args, row, args.data, run, options)
    api.synthesize(
        row,
        normals,
        out,
        args.n_synthetic,
        run=run,
        seed=seed,
        image_size=args.image_size,
        progress=False,
    )
    return out


def write_copy_paste(args: argparse.Namespace, k: int, seed: int, normals: Path, out: Path) -> None:
    """N copy-paste pairs: the split's K real training defects (images and masks at the
    benchmark size) pasted onto its normal training images, written like ``defectlab synth``."""
    from defectlab import api
    from defectlab.data.io import list_images, read_image, to_uint8, write_csv, write_png
    from defectlab.data.loading import load_samples
    from defectlab.data.transforms import resize_image
    from defectlab.synth.copypaste import CopyPaste

    config = api.build_config(
        "unet",
        args.data,
        image_size=args.image_size,
        seed=seed,
        overrides=split_overrides(args, k, seed),
    )
    split = dataset_split(config.data)
    data = config.data
    defects = [s for s in split["train_defect"] if s.mask_path is not None]
    loaded = load_samples(defects, args.image_size, 1, data.mask_threshold, progress=False)
    synthesizer = CopyPaste.from_examples(
        list(loaded.images), list(loaded.masks), types=[s.defect_type for s in loaded.samples]
    )
    paths = list_images(normals)[: args.n_synthetic]
    images = [resize_image(read_image(p, 1), args.image_size) for p in paths]
    rows = []
    for i, (source, sample) in enumerate(synthesizer.generate(images, args.n_synthetic, seed)):
        image_name, mask_name = f"images/{i:06d}.png", f"masks/{i:06d}.png"
        write_png(out / image_name, to_uint8(sample.image))
        write_png(out / mask_name, sample.mask.astype("uint8") * 255)
        rows.append(
            {
                "index": i,
                "image": image_name,
                "mask": mask_name,
                "source": str(paths[source]),
                "seed": seed,
                **sample.record,
            }
        )
    write_csv(out / "manifest.csv", rows)


def kid_against(real: list[Path], fake: Path, device: str) -> float:
    """Lite0-KID (mean over subsets) of a synth folder against the held-out real defects."""
    from defectlab.evaluate.synthesis import evaluate_synthesis

    with tempfile.TemporaryDirectory() as tmp:
        folder = link_files(real, Path(tmp) / "real")
        result = evaluate_synthesis(folder, fake, device=device, progress=False)
    return result["lite0_kid"]["mean"]


def run_job(args: argparse.Namespace, row: str, k: int, seed: int) -> dict[str, Any]:
    """One (row, K, seed): synthesize if needed, train (or reuse) the U-Net, score it."""
    from defectlab import api
    from defectlab.data.layouts import NORMAL
    from defectlab.data.splits import Split
    from defectlab.evaluate.metrics import auroc, average_precision, dice_iou
    from defectlab.evaluate.synthesis import mask_diversity, synthetic_masks

    cell = f"k{k}-{args.image_size}-s{seed}"
    options = split_overrides(args, k, seed)
    config = api.build_config(
        "unet", args.data, image_size=args.image_size, seed=seed, overrides=options
    )
    split = dataset_split(config.data)
    normals = [s.path for s in split["train"] if s.label == NORMAL]
    normal_folder = link_files(normals, args.out / f"normals-{cell}")
    extra: list[str] = []
    synth = None
    if row != "none":
        synth = synthetic_folder(args, row, k, seed, normal_folder, cell)
        extra = [f"data.extra_pairs={synth}"]
    run_dir = args.out / f"unet-{row}-{cell}-e{args.epochs_scale:g}-n{args.n_synthetic}"
    unet_options = [*options, f"model.epochs={unet_epochs(args)}", *args.unet_set, *extra]
    seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
    train_seconds = train_or_reuse(seed_args, "unet", args.data, run_dir, unet_options)
    run = api.load_run(run_dir, args.device)
    trained_split = Split.load(run_dir / "split.json")
    test = held_out(trained_split, run.config)
    scores, maps = api.predict_arrays(run.model, test.images)
    normal_test = held_out(trained_split, run.config, defects=False)
    normal_scores, _ = api.predict_arrays(run.model, normal_test.images)
    image_labels = np.r_[np.ones(len(scores)), np.zeros(len(normal_scores))]
    image_auroc = auroc(image_labels, np.r_[np.asarray(scores), np.asarray(normal_scores)])
    types = [s.defect_type for s in test.samples]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    kid = None
    if args.kid and synth is not None:
        kid = kid_against([s.path for s in test.samples], synth, args.device)
    spread = None
    if synth is not None:
        # mean 1 − IoU between the synthetic masks: 0 for a collapsed generator
        spread = mask_diversity(synthetic_masks(synth))
    # the trivial mask "all of the image is defect" on the same test masks: a calibrated
    # Dice means something only above it
    whole_image, _ = dice_iou(test.masks, np.ones_like(test.masks))
    gen_seconds = None
    if row in GENERATORS:
        gen_metrics = generator_run(args, row, cell) / "metrics.json"
        gen_seconds = json.loads(gen_metrics.read_text())["train_seconds"]
    return {
        "row": row,
        "k": k,
        "seed": seed,
        "split": trained_split.name,
        "n_train_defect": len(trained_split["train_defect"]),
        "n_train_synthetic": metrics.get("n_train_synthetic", 0),
        "n_test_defect": len(test.samples),
        "unet_epochs": unet_epochs(args),
        "gen_epochs": args.gen_epochs if row in GENERATORS else None,
        "gen_train_seconds": gen_seconds,
        "train_seconds": train_seconds,
        "peak_rss_mb": peak_rss_mb(),
        **segmentation_metrics(test.masks, maps, run.pixel_threshold, types),
        "pixel_ap": average_precision(test.masks.ravel(), maps.ravel()),
        "image_auroc": image_auroc,
        "n_test_normal": len(normal_scores),
        "kid": kid,
        "mask_diversity": spread,
        "dice_whole_image": whole_image,
        "run": str(run_dir),
    }


def child_command(args: argparse.Namespace, row: str, k: int, seed: int) -> list[str]:
    command = [sys.executable, __file__, "--one", row, "--k", str(k), "--seeds", str(seed)]
    command += ["--data", args.data, "--image-size", str(args.image_size)]
    command += ["--epochs-scale", str(args.epochs_scale), "--gen-epochs", str(args.gen_epochs)]
    command += ["--n-synthetic", str(args.n_synthetic), "--device", args.device]
    command += ["--out", str(args.out), *(["--kid"] if args.kid else [])]
    for option in args.set:
        command += ["--set", option]
    for option in args.gen_set:
        command += ["--gen-set", option]
    for option in args.translation_set:
        command += ["--translation-set", option]
    for option in args.unet_set:
        command += ["--unet-set", option]
    return command


def type_mean_dice(row: dict[str, Any]) -> float | None:
    """The mean over defect types of each type's mean per-image Dice at the calibrated
    threshold: every type counts alike, where the micro Dice is mostly that of the types with
    the largest masks."""
    by_type = row.get("dice_mean_by_type") or {}
    return float(np.mean(list(by_type.values()))) if by_type else None


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every column, per (row, K)."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["row"], r["k"]), []).append({**r, "dice_type_mean": type_mean_dice(r)})
    summary = []
    for (row, k), group in cells.items():
        entry: dict[str, Any] = {"row": row, "k": k, "n_seeds": len(group)}
        for column in COLUMNS:
            values = [r[column] for r in group if r.get(column) is not None]
            entry[column] = float(np.mean(values)) if values else None
            entry[f"{column}_std"] = float(np.std(values)) if values else None
        summary.append(entry)
    return summary


def print_table(summary: list[dict[str, Any]]) -> None:
    print(f"{'row':<12} {'K':>3} {'seeds':>5} " + " ".join(f"{c:>17}" for c in COLUMNS))
    for s in summary:
        cells = " ".join(
            f"{fmt_fixed(s[c], 8)} ±{fmt_fixed(s[f'{c}_std'], 7)}"
            if s[c] is not None
            else f"{'n/a':>17}"
            for c in COLUMNS
        )
        print(f"{s['row']:<12} {s['k']:>3} {s['n_seeds']:>5} {cells}")
    print(
        "mean ± std over seeds; dice/iou: micro over held-out real defect images at the "
        "calibrated pixel threshold; dice_type_mean: mean over defect types of each type's "
        "mean per-image Dice there; *_oracle: best-Dice threshold on the test masks (reference "
        "only); pixel AUROC/AP over those images' pixels; kid: Lite0-KID of the generator's "
        "samples vs the held-out real defects (not Inception KID); mask_diversity: mean 1 − IoU "
        "between the synthetic masks (0 = one mask for all)."
    )


def write_docs(args: argparse.Namespace, summary: list[dict[str, Any]]) -> None:
    """``--write-docs``: the mean ± std table of ``--out`` as one section, keyed by its folder."""

    def cell(column: str) -> Any:
        def text(s: dict[str, Any]) -> str:
            if s[column] is None:
                return "—"
            return f"{s[column]:.3f} ± {s[f'{column}_std']:.3f}"

        return text

    table = [
        {"row": s["row"], "k": s["k"], "n_seeds": s["n_seeds"]} | {c: cell(c)(s) for c in COLUMNS}
        for s in summary
    ]
    columns = [("row", "row", str), ("k", "K", str), ("n_seeds", "seeds", str)]
    columns += [(c, c, str) for c in COLUMNS]
    name = args.out.name
    path = write_section(
        args.write_docs,
        docs_key(name if name.startswith("augmentation") else f"augmentation-{name}"),
        f"Augmentation, K = {', '.join(map(str, sorted({s['k'] for s in summary})))}, "
        f"{args.image_size} px: {name}",
        markdown_table(table, columns),
        notes=(
            "Mean ± std over seeds; dice/iou: micro over held-out real defect images at the "
            "calibrated pixel threshold; dice_type_mean: each defect type's mean per-image "
            "Dice at that threshold, averaged over the types (all types count alike; the micro "
            "Dice is mostly that of the types with the largest masks); *_oracle: best-Dice "
            "threshold on the test masks (reference only); kid: Lite0-KID of the generator's "
            "samples against the held-out real defects (not Inception KID); mask_diversity: "
            "mean 1 − IoU between the synthetic masks; dice_whole_image: Dice of the mask 'the "
            "whole image is defect'; image_auroc: the U-Net's image score over held-out "
            "defect and normal test images. " + args.docs_note
        ),
        command=args.docs_command or " ".join([".venv/bin/python", *sys.argv]),
    )
    print(f"results → {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--data", default=DEFAULT_DATA, help="magnetic-tile folder")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 20], help="defects per type")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-synthetic", type=int, default=200, help="pairs per generator")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="× U-Net default epochs")
    parser.add_argument("--gen-epochs", type=int, default=100, help="generator training epochs")
    parser.add_argument("--kid", action="store_true", help="Lite0-KID of each generator")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--gen-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="options for the generators only (e.g. model.disc_scales=2 at 64 px)",
    )
    parser.add_argument(
        "--translation-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="options for CycleGAN and CrossGAN only (e.g. model.generator=residual_attention)",
    )
    parser.add_argument(
        "--unet-set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="options for the U-Net only (default: model.encoder=lite0)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="jobs run at once, each its own process (a GPU has room for several small ones)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/augmentation"))
    parser.add_argument("--docs-note", default="", help="text added to the docs section")
    parser.add_argument("--docs-command", default="", help="command shown in the docs section")
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="run nothing: print (and --write-docs) the table of OUT/results.json",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    add_write_docs(parser, "augmentation")
    args = parser.parse_args()
    if args.unet_set is None:
        args.unet_set = ["model.encoder=lite0"]
    if min(args.k) < 1:
        parser.error("--k must be at least 1: the U-Net and generators learn from defects")
    if args.epochs_scale <= 0 or min(args.n_synthetic, args.gen_epochs, args.jobs) < 1:
        parser.error("--epochs-scale, --n-synthetic, --gen-epochs and --jobs must be positive")

    if args.one:
        print(json.dumps(run_job(args, args.one, args.k[0], args.seeds[0])))
        return
    if args.from_results:
        # the table of what an earlier invocation (maybe one cut short) wrote to --out
        summary = aggregate(json.loads((args.out / "results.json").read_text()))
        print_table(summary)
        if args.write_docs:
            write_docs(args, summary)
        return
    from defectlab.data.io import atomic_write_text

    jobs = [(row, k, seed) for k in args.k for seed in args.seeds for row in args.rows]
    # generators first: they are the long jobs, so --jobs N overlaps them with the U-Nets
    jobs.sort(key=lambda job: job[0] not in GENERATORS)
    failed = []
    args.out.mkdir(parents=True, exist_ok=True)
    # rows of earlier invocations into the same --out (other seeds, K or rows) are kept, so a
    # table can be built one seed at a time; the jobs run now replace their own rows
    rerun = set(jobs)
    previous = args.out / "results.json"
    rows: list[dict[str, Any]] = [
        r
        for r in (json.loads(previous.read_text()) if previous.exists() else [])
        if (r["row"], r["k"], r["seed"]) not in rerun
    ]

    lock = threading.Lock()

    def run_one(job: tuple[str, int, int]) -> None:
        """One child process; results.json is rewritten as each job ends, so a run cut short
        keeps what finished."""
        row, k, seed = job
        found = job_rows(child_command(args, row, k, seed), f"{row}/k{k}/s{seed}")
        with lock:
            if found is None:
                failed.append(f"{row}/k{k}/s{seed}")
                return
            rows.extend(found)
            rows.sort(key=lambda r: (r["k"], ROWS.index(r["row"]), r["seed"]))
            atomic_write_text(args.out / "results.json", json.dumps(rows, indent=2))

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run_one, jobs))
    summary = aggregate(rows)
    atomic_write_text(args.out / "results.json", json.dumps(rows, indent=2))
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2))
    print_table(summary)
    if args.write_docs:
        write_docs(args, summary)
    if failed:
        sys.exit(f"failed jobs: {', '.join(failed)}")


if __name__ == "__main__":
    main()
