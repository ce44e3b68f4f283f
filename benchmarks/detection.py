"""Detection benchmark on real data with the standard splits of ``../shared/data/README.md``.

Trains every requested detector on the normal training share of each dataset, calibrates on
the normal validation share, evaluates on the held-out test share and prints one row per
(model, dataset) with the split name, training wall time, inference images/s (model time at
the run's image size, data already decoded) and the peak resident memory of the process
that trained and evaluated it. Each pair runs in its own process so that peak RAM is that
model's own. Results also go to ``OUT/results.json``, merged with the rows of earlier
invocations; a finished run folder is reused.

    .venv/bin/python benchmarks/detection.py --models pixelstats ae flow \
        --datasets elpv ../shared/data/magnetic-tile --out runs/bench

``--set KEY=VALUE`` overrides go to every model of the invocation and name its run folders
(``MODEL-DATASET-SIZE-sSEED-SETTINGS``), so a model's variants do not reuse each other's runs:

    .venv/bin/python benchmarks/detection.py --models deepsvdd --set features=pixels \
        --set epochs=8 --datasets ../shared/data/magnetic-tile --out runs/bench --write-docs

``--write-docs [PAGE]`` writes each dataset's table into ``docs/results/PAGE.md`` (default
``detection``) as the section ``detection-DATASET-SIZE[-sSEED][-SETTINGS]``, with the command
and the date; a rerun with the same dataset and settings replaces its section.

``--peers draem ganomaly`` also trains those anomalib models in the same run, on exactly the
split of the first model's run for each dataset, with ``benchmarks/anomalib_peer.py`` in the
anomalib venv (``benchmarks/anomalib/setup.sh``), scored with the same metrics and the same
normal-quantile thresholds, and prints their rows in the same table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import (
    add_write_docs,
    docs_key,
    fmt_number,
    job_rows,
    markdown_table,
    peak_rss_mb,
    write_section,
)

PEER_PYTHON = Path(__file__).with_name("anomalib") / ".venv" / "bin" / "python"
PEER_SETUP = "benchmarks/anomalib/setup.sh"
KEYS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "dice", "f1")
#: columns of the results page: metrics with 3 decimals, costs with 1 (a column no row has,
#: such as the pixel metrics of a dataset without masks, is left out)
DOC_COLUMNS = (
    ("model", "model", str),
    ("split", "split", str),
    ("image_auroc", "image AUROC", fmt_number(3)),
    ("image_ap", "image AP", fmt_number(3)),
    ("pixel_auroc", "pixel AUROC", fmt_number(3)),
    ("aupro", "AUPRO", fmt_number(3)),
    ("dice", "Dice", fmt_number(3)),
    ("train_seconds", "train s", fmt_number(1)),
    ("images_per_second", "img/s", fmt_number(1)),
    ("peak_rss_mb", "peak RAM MB", fmt_number(0)),
)


def settings_suffix(overrides: list[str]) -> str:
    """A short name of the ``--set`` overrides for run folders and section keys ("" for
    none): ``["features=pixels", "epochs=8"]`` → ``features-pixels-epochs-8``."""
    return docs_key(*(item.replace("=", "-") for item in overrides))


def run_name(model: str, dataset: str, args: argparse.Namespace) -> str:
    """The run folder of ``model`` on ``dataset`` under ``args.out``."""
    name = f"{model}-{Path(dataset).name}-{args.image_size}-s{args.seed}"
    suffix = settings_suffix(args.set)
    return f"{name}-{suffix}" if suffix else name


def run_one(args: argparse.Namespace) -> dict:
    """Train (or reuse) and evaluate one model on one dataset, in this process."""
    from defectlab import api

    name = Path(args.datasets[0]).name
    model = args.models[0]
    run_dir = args.out / run_name(model, args.datasets[0], args)
    started = time.perf_counter()
    if (run_dir / api.MODEL_FILE).exists():
        print(f"reusing trained run {run_dir}", file=sys.stderr)
        train_seconds = json.loads((run_dir / "metrics.json").read_text())["train_seconds"]
    else:
        api.train(
            model,
            args.datasets[0],
            run_dir,
            image_size=args.image_size,
            seed=args.seed,
            device=args.device,
            overrides=args.set,
        )
        train_seconds = round(time.perf_counter() - started, 1)
    metrics = api.evaluate(run_dir, args.datasets[0], run_dir / "eval", device=args.device)
    return {
        "model": model,
        "dataset": name,
        "split": metrics["split"],
        "image_size": args.image_size,
        "seed": args.seed,
        "n_normal": metrics["n_normal"],
        "n_defect": metrics["n_defect"],
        "train_seconds": train_seconds,
        "images_per_second": metrics["images_per_second"],
        "peak_rss_mb": peak_rss_mb(),
        **{k: metrics[k] for k in KEYS},
    }


def peer_rows(args: argparse.Namespace, dataset: str) -> list[dict]:
    """The anomalib peers' rows on the split of the first model's run on ``dataset``."""
    name = Path(dataset).name
    split = args.out / run_name(args.models[0], dataset, args) / "split.json"
    if not split.exists():
        print(f"FAILED: anomalib peers on {dataset}: no split file {split}", file=sys.stderr)
        return []
    command = [str(args.peer_python), str(Path(__file__).with_name("anomalib_peer.py"))]
    command += ["--split", str(split), "--models", *args.peers]
    command += ["--image-size", str(args.image_size), "--seed", str(args.seed)]
    command += ["--out", str(args.out / f"anomalib-{name}")]
    for flag, value in (("--epochs", args.peer_epochs), ("--max-train", args.peer_max_train)):
        if value is not None:
            command += [flag, str(value)]
    return job_rows(command, f"anomalib peers on {dataset}") or []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pixelstats"])
    parser.add_argument("--datasets", nargs="+", default=["elpv", "../shared/data/magnetic-tile"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--peers", nargs="*", default=[], help="anomalib models: draem ganomaly")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--peer-epochs", type=int, help="anomalib_peer.py --epochs")
    parser.add_argument("--peer-max-train", type=int, help="anomalib_peer.py --max-train")
    add_write_docs(parser, "detection")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peers and not args.peer_python.exists():
        parser.error(f"--peers needs the anomalib venv {args.peer_python}: run {PEER_SETUP}")

    if args.one:
        print(json.dumps(run_one(args)))
        return

    rows = []
    for dataset in args.datasets:
        for model in args.models:
            command = [sys.executable, __file__, "--one", "--models", model]
            command += ["--datasets", dataset, "--image-size", str(args.image_size)]
            command += ["--seed", str(args.seed), "--device", args.device, "--out", str(args.out)]
            for option in args.set:
                command += ["--set", option]
            rows += job_rows(command, f"{model} on {dataset}") or []
        if args.peers:
            rows += peer_rows(args, dataset)
    for row in rows:
        row["settings"] = list(args.set)
    merged = merge_results(args.out / "results.json", rows)
    header = f"{'model':<16} {'dataset':<15} {'split':<28} " + " ".join(f"{k:>11}" for k in KEYS)
    print(header + f" {'train_s':>8} {'img/s':>8} {'peak_MB':>8}")
    for r in rows:
        values = " ".join(f"{r[k]:>11.4f}" if r[k] is not None else f"{'n/a':>11}" for k in KEYS)
        extra = " ".join(
            f"{r[k]:>8.1f}" for k in ("train_seconds", "images_per_second", "peak_rss_mb")
        )
        print(f"{r['model']:<16} {r['dataset']:<15} {r['split']:<28} {values} {extra}")
    if args.write_docs:
        write_docs(args, merged)


def _identity(row: dict) -> tuple:
    return (
        row["model"],
        row["dataset"],
        row["image_size"],
        row["seed"],
        tuple(row.get("settings", [])),
    )


def merge_results(path: Path, rows: list[dict]) -> list[dict]:
    """Add ``rows`` to the results file ``path``, replacing earlier rows of the same model,
    dataset, size, seed and settings; returns (and writes) the merged list. Rows of earlier
    invocations stay, so a results page can gather models benchmarked one at a time."""
    old = json.loads(path.read_text()) if path.exists() else []
    new = {_identity(r) for r in rows}
    merged = [r for r in old if _identity(r) not in new] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2))
    return merged


def write_docs(args: argparse.Namespace, rows: list[dict]) -> None:
    """One section per dataset of this invocation in the results page ``args.write_docs``:
    every row of ``rows`` with that dataset and this invocation's size, seed and settings."""
    for dataset in args.datasets:
        name = Path(dataset).name
        wanted = (name, args.image_size, args.seed, tuple(args.set))
        table_rows = [r for r in rows if _identity(r)[1:] == wanted]
        if not table_rows:
            continue
        seed = f"s{args.seed}" if args.seed != 0 else ""
        key = docs_key("detection", name, args.image_size, seed, settings_suffix(args.set))
        settings = ", ".join(f"`{item}`" for item in args.set) or "each model's defaults"
        title = f"{name}, {args.image_size} px, seed {args.seed}: {settings}"
        notes = (
            f"Split {table_rows[0]['split']}; {table_rows[0]['n_normal']} normal and "
            f"{table_rows[0]['n_defect']} defective test images. Trained on normal training "
            "images only, thresholds from the normal validation images. Timing columns are "
            "measured on whatever else the machine was running: compare them only within a row."
        )
        columns = [c for c in DOC_COLUMNS if any(r.get(c[0]) is not None for r in table_rows)]
        path = write_section(
            args.write_docs, key, title, markdown_table(table_rows, columns), notes=notes
        )
        print(f"wrote section {key} of {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
