"""Label-free model selection benchmark: does synthetic-validation AUROC rank detectors?

For each dataset (standard splits of ``../shared/data/README.md``, the same as
``benchmarks/detection.py``) this runs ``defectlab train --model auto`` (the Python
:func:`defectlab.selection.select`): every candidate trains on the normal training share and
is scored on procedural defects painted onto the normal validation share; the z-score
``ensemble`` of the two best joins them. Then each candidate's run, the ensemble's included,
is evaluated on the real test share, and the script reports per candidate the synthetic-
validation AUROC and the real test AUROC, and the Spearman rank correlation between the two
over the candidates (with and without the ensemble). Each dataset runs in its own process;
a finished selection folder and a finished evaluation are reused, and with ``--reuse-runs``
the runs of ``benchmarks/detection.py`` with exactly a candidate's settings, size, seed and
split are scored instead of retrained (the selection checks that they match).

    .venv/bin/python benchmarks/selection.py --out runs/bench-selection --write-docs

``--write-docs [PAGE]`` writes one section per dataset and a verdict section into
``docs/results/PAGE.md`` (default ``selection``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from _common import add_write_docs, docs_key, fmt_number, job_rows, markdown_table, write_section

#: a rank correlation at least this high on every dataset counts as "ranks the candidates"
RANKS_THRESHOLD = 0.5
DOC_COLUMNS = (
    ("candidate", "candidate", str),
    ("synthetic_auroc", "synthetic-val AUROC", fmt_number(3)),
    ("synthetic_pixel_auroc", "synthetic-val pixel AUROC", fmt_number(3)),
    ("image_auroc", "test image AUROC", fmt_number(3)),
    ("pixel_auroc", "test pixel AUROC", fmt_number(3)),
    ("images_per_second", "img/s", fmt_number(1)),
    ("size_mb", "size MB", fmt_number(1)),
    ("train_seconds", "train s", fmt_number(0)),
    ("chosen", "synthetic rule's pick", lambda v: "**yes**" if v else ""),
)


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (ties averaged); ``None`` with fewer than 3 pairs or a
    constant side."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def _number(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def run_one(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Select (or reuse the selection) on one dataset, then evaluate every candidate."""
    from defectlab import api, selection

    dataset = args.datasets[0]
    name = Path(dataset).name
    out = args.out / f"auto-{name}-{args.image_size}-s{args.seed}"
    # the benchmark measures the synthetic rule whatever auto's default rule is
    overrides = ["selection.rule=synthetic"]
    overrides += ["selection.ensemble=false"] if args.no_ensemble else []
    overrides += [f"selection.candidates={','.join(args.candidates)}"] if args.candidates else []
    reuse = {}
    if args.reuse_runs is not None:  # benchmarks/detection.py's runs of the same candidates
        for spec in args.candidates or selection.SelectionConfig().candidates:
            model = spec.partition(":")[0]
            run = args.reuse_runs / f"{model}-{name}-{args.image_size}-s{args.seed}"
            if (run / api.MODEL_FILE).exists():
                reuse[spec] = run
    if not (out / selection.SELECTION_CSV).exists():
        chosen = selection.select(
            dataset,
            out,
            image_size=args.image_size,
            seed=args.seed,
            device=args.device,
            overrides=overrides,
            progress=False,
            reuse=reuse,
        )
        print(chosen.summary(), file=sys.stderr)
    else:
        print(f"reusing selection {out}", file=sys.stderr)
    reason = json.loads((out / "config.json").read_text())["resolved"]["model"]["reason"]
    rows = []
    with (out / selection.SELECTION_CSV).open(newline="") as f:
        for entry in csv.DictReader(f):
            row: dict[str, Any] = {
                "dataset": name,
                "image_size": args.image_size,
                "seed": args.seed,
                "candidate": entry["candidate"],
                "spec": entry["spec"],
                "status": entry["status"],
                "chosen": int(entry["chosen"]),
                "reason": reason,
                **{
                    k: _number(entry[k])
                    for k in (
                        "synthetic_auroc",
                        "synthetic_pixel_auroc",
                        "images_per_second",
                        "size_mb",
                        "train_seconds",
                    )
                },
            }
            if entry["status"] in ("trained", "reused"):
                run_dir = Path(entry["run"])
                done = run_dir / "eval" / "metrics.json"
                if done.exists():  # a finished evaluation of this run is reused
                    metrics = json.loads(done.read_text())
                else:
                    metrics = api.evaluate(run_dir, dataset, run_dir / "eval", progress=False)
                row |= {
                    "split": metrics["split"],
                    "n_normal": metrics["n_normal"],
                    "n_defect": metrics["n_defect"],
                    "image_auroc": metrics["image_auroc"],
                    "pixel_auroc": metrics.get("pixel_auroc"),
                }
            rows.append(row)
    return rows


def correlations(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Spearman of synthetic-validation vs test image AUROC over the trained candidates,
    without and with the ensemble."""
    scored = [r for r in rows if r.get("image_auroc") is not None]
    single = [r for r in scored if not r["candidate"].startswith("ensemble")]

    def rho(part: list[dict[str, Any]]) -> float | None:
        return spearman([r["synthetic_auroc"] for r in part], [r["image_auroc"] for r in part])

    return {"spearman_single": rho(single), "spearman_all": rho(scored)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["elpv", "../shared/data/magnetic-tile"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--candidates", nargs="*", default=[], help="candidate specs (default: auto's own)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-selection"))
    parser.add_argument(
        "--no-ensemble", action="store_true", help="score the single candidates only"
    )
    parser.add_argument(
        "--reuse-runs",
        type=Path,
        help="benchmarks/detection.py --out folder: its runs of the same candidates, size, "
        "seed and split are scored instead of retrained (checked by defectlab.selection)",
    )
    add_write_docs(parser, "selection")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        for row in run_one(args):
            print(json.dumps(row))
        return

    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for dataset in args.datasets:
        command = [sys.executable, __file__, "--one", "--datasets", dataset]
        command += ["--image-size", str(args.image_size), "--seed", str(args.seed)]
        command += ["--device", args.device, "--out", str(args.out)]
        if args.candidates:
            command += ["--candidates", *args.candidates]
        if args.reuse_runs is not None:
            command += ["--reuse-runs", str(args.reuse_runs)]
        if args.no_ensemble:
            command += ["--no-ensemble"]
        rows = job_rows(command, f"selection on {dataset}")
        if rows:
            by_dataset[Path(dataset).name] = rows
    summary = {name: correlations(rows) for name, rows in by_dataset.items()}
    for name, rows in by_dataset.items():
        print(f"\n{name}: {summary[name]}")
        for r in rows:
            print(
                f"  {r['candidate']:<44} synthetic {fmt_number(4)(r['synthetic_auroc']):>7} "
                f"test {fmt_number(4)(r.get('image_auroc')):>7}  chosen={r['chosen']}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selection_results.json").write_text(
        json.dumps({"rows": by_dataset, "spearman": summary}, indent=2)
    )
    if args.write_docs and by_dataset:
        write_docs(args, by_dataset, summary)


def verdict(
    by_dataset: dict[str, list[dict[str, Any]]], summary: dict[str, dict[str, float | None]]
) -> tuple[bool, str]:
    """Whether the synthetic rule can be trusted: on every dataset the rank correlation over
    single candidates is at least ``RANKS_THRESHOLD`` and its pick does at least as well on
    the test set as the fixed default; with one sentence per dataset saying so."""
    from defectlab.selection import FIXED_DEFAULT

    trusted, parts = True, []
    for name, rows in by_dataset.items():
        rho = summary[name]["spearman_single"]
        chosen = next((r for r in rows if r["chosen"]), None)
        default = next((r for r in rows if r["spec"] == FIXED_DEFAULT), None)
        picks_well = (
            chosen is not None
            and default is not None
            and chosen.get("image_auroc") is not None
            and chosen["image_auroc"] >= default["image_auroc"]
        )
        trusted = trusted and picks_well and rho is not None and rho >= RANKS_THRESHOLD
        if chosen is not None and default is not None:
            parts.append(
                f"{name}: Spearman {fmt_number(2)(rho)}; the synthetic pick "
                f"`{chosen['candidate']}` scores test image AUROC "
                f"{fmt_number(3)(chosen.get('image_auroc'))} against the fixed default's "
                f"{fmt_number(3)(default.get('image_auroc'))}"
            )
    return trusted, "; ".join(parts)


def write_docs(
    args: argparse.Namespace,
    by_dataset: dict[str, list[dict[str, Any]]],
    summary: dict[str, dict[str, float | None]],
) -> None:
    for name, rows in by_dataset.items():
        first = next((r for r in rows if r.get("split")), rows[0])
        chosen = next((r for r in rows if r["chosen"]), None)
        ensemble = next((r for r in rows if r["candidate"].startswith("ensemble")), None)
        singles = [r for r in rows if r.get("image_auroc") is not None and r is not ensemble]
        best_single = max(singles, key=lambda r: r["synthetic_auroc"]) if singles else None
        rho = summary[name]
        notes = [
            f"Split {first.get('split')}; {first.get('n_normal')} normal and "
            f"{first.get('n_defect')} defective test images. Synthetic validation: the split's "
            "normal validation images (the ones thresholds are calibrated on), each clean and "
            "with one procedural defect painted on it; no test image is read by the selection.",
            f"Spearman rank correlation, synthetic-validation vs test image AUROC: "
            f"{fmt_number(2)(rho['spearman_single'])} over the {len(singles)} single "
            "candidates"
            + (f", {fmt_number(2)(rho['spearman_all'])} with the ensemble." if ensemble else "."),
        ]
        if any(r["status"] == "reused" for r in rows):
            notes.append(
                "Single candidates marked by `--reuse-runs` are `benchmarks/detection.py`'s runs "
                "with exactly their settings, size, seed and split (checked), scored here; "
                "their train s is from that benchmark."
            )
        if chosen:
            notes.append(
                f"With `selection.rule=synthetic` `auto` keeps **{chosen['candidate']}**: "
                f"{chosen['reason']}."
            )
        notes.append(
            "`selection.rule=synthetic` is `--model auto`'s default; with "
            "`selection.rule=fixed` it keeps `patchmemory`, Lite0, whatever this table says."
        )
        here_trusted, here = verdict({name: rows}, {name: rho})
        notes.append(
            f"On this dataset the synthetic rule {'can' if here_trusted else 'cannot'} be "
            f"trusted ({here}; required: Spearman of at least {RANKS_THRESHOLD} and a pick at "
            "least as good as the fixed default `patchmemory`, Lite0, on the test set)."
        )
        if ensemble and best_single and ensemble.get("image_auroc") is not None:
            wins_synth = ensemble["synthetic_auroc"] > best_single["synthetic_auroc"]
            wins_test = ensemble["image_auroc"] > max(r["image_auroc"] for r in singles)
            notes.append(
                f"The z-score ensemble of the two best {'wins' if wins_synth else 'does not win'}"
                f" on the synthetic validation and {'beats' if wins_test else 'does not beat'} "
                "the best single candidate on the test set."
            )
        notes.append(
            "Timing columns are measured on a shared machine: compare them within a table only."
        )
        key = docs_key("selection", name, args.image_size, f"s{args.seed}" if args.seed else "")
        title = f"{name}, {args.image_size} px, seed {args.seed}: candidates of `--model auto`"
        path = write_section(
            args.write_docs,
            key,
            title,
            markdown_table(rows, DOC_COLUMNS),
            notes="\n\n".join(notes),
            page_title="Label-free model selection",
        )
        print(f"wrote section {key} of {path}", file=sys.stderr)
    if len(by_dataset) < 2:  # one dataset: its section says it; the verdict needs all
        return
    trusted, listed = verdict(by_dataset, summary)
    if trusted:
        text = (
            f"Synthetic-validation AUROC ranks the candidates and picks at least as well as "
            f"the fixed default on every dataset measured ({listed}; Spearman of at least "
            f"{RANKS_THRESHOLD} required), so `--model auto` keeps `selection.rule=synthetic`."
        )
    else:
        text = (
            f"Synthetic-validation AUROC is **not** good enough to choose on every dataset "
            f"measured ({listed}; required: Spearman of at least {RANKS_THRESHOLD} and a pick "
            "at least as good as the fixed default on the test set). `--model auto` therefore "
            "keeps the fixed default by default (`selection.rule=fixed`: `patchmemory`, "
            "Lite0) and says why; `--set selection.rule=synthetic` runs the comparison and "
            "writes every candidate to `selection.csv`. Under the fixed rule the ensemble is "
            "never auto's choice."
        )
    key = docs_key("selection-verdict", args.image_size, f"s{args.seed}" if args.seed else "")
    write_section(args.write_docs, key, "Verdict", text, page_title="Label-free model selection")


if __name__ == "__main__":
    main()
