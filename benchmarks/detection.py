"""Detection benchmark on real data with the standard splits of ``../shared/data/README.md``.

Trains every requested detector on the normal training share of each dataset, calibrates on
the normal validation share, evaluates on the held-out test share and prints one row per
(model, dataset) with the split name. Results also go to ``OUT/results.json``.

    .venv/bin/python benchmarks/detection.py --models pixelstats \
        --datasets elpv ../shared/data/magnetic-tile --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from defectlab import api

KEYS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "dice", "f1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pixelstats"])
    parser.add_argument("--datasets", nargs="+", default=["elpv", "../shared/data/magnetic-tile"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()

    rows = []
    for dataset in args.datasets:
        name = Path(dataset).name
        for model in args.models:
            run_dir = args.out / f"{model}-{name}-{args.image_size}-s{args.seed}"
            started = time.perf_counter()
            if (run_dir / api.MODEL_FILE).exists():
                print(f"reusing trained run {run_dir}")
            else:
                api.train(
                    model,
                    dataset,
                    run_dir,
                    image_size=args.image_size,
                    seed=args.seed,
                    device=args.device,
                    overrides=args.set,
                )
            train_seconds = time.perf_counter() - started
            metrics = api.evaluate(run_dir, dataset, run_dir / "eval", device=args.device)
            row = {
                "model": model,
                "dataset": name,
                "split": metrics["split"],
                "image_size": args.image_size,
                "seed": args.seed,
                "n_normal": metrics["n_normal"],
                "n_defect": metrics["n_defect"],
                "train_seconds": round(train_seconds, 1),
                **{k: metrics[k] for k in KEYS},
            }
            rows.append(row)
            print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    header = f"{'model':<12} {'dataset':<15} {'split':<28} " + " ".join(f"{k:>11}" for k in KEYS)
    print(header)
    for r in rows:
        values = " ".join(f"{r[k]:>11.4f}" if r[k] is not None else f"{'n/a':>11}" for k in KEYS)
        print(f"{r['model']:<12} {r['dataset']:<15} {r['split']:<28} {values}")


if __name__ == "__main__":
    main()
