"""How a trained ``cam`` run's masks change with the CAM settings that act only at inference.

``cam_layers`` (which encoder stages' maps are averaged) and ``refine`` (guided filter or
none) do not change training: the classifier is the same, only the maps differ. So one trained
run can be rescored under several settings without retraining. For each run and setting this
prints, on the held-out images of the run's own split (as in ``weak_supervision.py``):

* ``dice``: micro Dice over the held-out defect images at CAM's own rule (pixels at or above
  ``--peak-fraction`` × each map's peak; default: the run's ``peak_fraction``);
* ``dice_oracle``: the best Dice over thresholds (peeks at the test masks: a reference only);
* ``pixel_auroc``: pixel AUROC over the held-out defect images;
* ``defect_flagged`` / ``normal_flagged``: the share of pixels flagged at the rule on
  held-out defect and normal images (the defects cover about 8.5% of a defect image).

This reads test masks for every setting, so it is a diagnosis, not a way to pick settings for
a results table: a setting chosen here must be confirmed on splits it was not chosen on.

    .venv/bin/python benchmarks/cam_localisation.py \\
        runs/weak-tf15-peak/cam-lite0-peak-k20-96-s0-e1 --layers=-1,-2 --layers=-1,-2,-3 \\
        --refine none guided
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import (
    add_write_docs,
    docs_key,
    fmt_number,
    held_out,
    markdown_table,
    segmentation_metrics,
    write_section,
)

COLUMNS = ("dice", "dice_oracle", "pixel_auroc", "defect_flagged", "normal_flagged")


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers wants comma-separated stage indices, got {text!r}"
        ) from None
    return layers


def score_setting(run: Any, defects: Any, normals: Any, peak_fraction: float) -> dict[str, float]:
    """Metrics of the run's model as currently configured (the weak benchmark's own
    :func:`segmentation_metrics`, at the peak rule)."""
    from defectlab import api

    _, defect_maps = api.predict_arrays(run.model, defects.images)
    _, normal_maps = api.predict_arrays(run.model, normals.images)
    types = [s.defect_type for s in defects.samples]
    metrics = segmentation_metrics(defects.masks, defect_maps, peak_fraction, types)
    return {
        "dice": metrics["dice"],
        "dice_oracle": metrics["dice_oracle"],
        "pixel_auroc": metrics["pixel_auroc_defect"],
        "defect_flagged": float((defect_maps >= peak_fraction).mean()),
        "normal_flagged": float((normal_maps >= peak_fraction).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="trained cam run folders")
    parser.add_argument("--layers", type=parse_layers, action="append", metavar="I,J,...")
    parser.add_argument("--refine", nargs="+", default=["none"], choices=["none", "guided"])
    parser.add_argument("--peak-fraction", type=float, default=None)
    parser.add_argument("--device", default="auto")
    add_write_docs(parser, "weak_supervision")
    args = parser.parse_args()
    if args.peak_fraction is not None and not 0 < args.peak_fraction < 1:
        parser.error("--peak-fraction must be in (0, 1)")

    from defectlab import api
    from defectlab.data.splits import Split
    from defectlab.errors import DefectlabError

    rows = []
    for run_dir in args.runs:
        try:
            run = api.load_run(run_dir, args.device)
        except (DefectlabError, OSError) as exc:
            sys.exit(f"{run_dir}: not a trained run ({exc})")
        if run.config.model != "cam":
            sys.exit(f"{run_dir}: a {run.config.model!r} run, not a cam run")
        config = run.model.config
        if config.normalize != "minmax":
            sys.exit(
                f"{run_dir}: CAM's peak rule needs normalize=minmax, the run has "
                f"{config.normalize!r}"
            )
        peak = args.peak_fraction if args.peak_fraction is not None else config.peak_fraction
        if not peak:
            sys.exit(f"{run_dir}: the run has no peak_fraction; pass --peak-fraction")
        split = Split.load(run_dir / "split.json")
        defects = held_out(split, run.config)
        normals = held_out(split, run.config, defects=False)
        for layers in args.layers or [config.cam_layers]:
            for refine in args.refine:
                try:  # replace() validates the setting like a config file would
                    run.model.config = replace(config, cam_layers=layers, refine=refine)
                except ValueError as exc:
                    sys.exit(f"--layers {layers}: {exc}")
                row = {"run": str(run_dir), "cam_layers": list(layers), "refine": refine}
                row |= {"peak_fraction": peak} | score_setting(run, defects, normals, peak)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"{'run':<48} {'layers':<12} {'refine':<7} " + " ".join(f"{c:>14}" for c in COLUMNS))
    for r in rows:
        values = " ".join(f"{r[c]:>14.4f}" for c in COLUMNS)
        layers = ",".join(str(i) for i in r["cam_layers"])
        print(f"{Path(r['run']).name:<48} {layers:<12} {r['refine']:<7} {values}")
    if args.write_docs:
        table = [
            r | {"run": Path(r["run"]).name, "cam_layers": ", ".join(map(str, r["cam_layers"]))}
            for r in rows
        ]
        columns = [("run", "run", str), ("cam_layers", "stages", str), ("refine", "refine", str)]
        columns += [(c, c, fmt_number(3)) for c in COLUMNS]
        path = write_section(
            args.write_docs,
            docs_key("cam-localisation", *(run.name for run in args.runs)),
            "CAM runs rescored under inference-only settings",
            markdown_table(table, columns),
            notes=(
                "Reads the test masks for every setting: a diagnosis, not a way to pick "
                "settings; a setting chosen here must be confirmed on other split seeds."
            ),
        )
        print(f"results → {path}")
