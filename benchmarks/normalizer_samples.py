"""How many normal images does the image-statistics score normaliser need?

For a trained ``ae``/``vae``/``wae`` run, this scores every training, validation and test image
with the normaliser switched off (same network), then fits
:class:`defectlab.detect.nuisance.ScoreNormalizer` on random subsets of the training images
(``--draws`` per size) and prints the test image AUROC of the normalised score: mean, standard
deviation and minimum over the draws, plus the fits on all training images and on the
validation normals. The model's own fit (``normalization_samples`` images kept from the first
training batches) is one such draw.

    .venv/bin/python benchmarks/normalizer_samples.py \\
        runs/bench-ae100-normalized/ae-magnetic-tile-128-s0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _common import add_write_docs, content_statistics, docs_key, markdown_table, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a trained ae, vae or wae run directory")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    add_write_docs(parser, "diagnostics")
    args = parser.parse_args()

    from defectlab import api
    from defectlab.data.loading import load_samples
    from defectlab.data.splits import Split
    from defectlab.detect.nuisance import ScoreNormalizer
    from defectlab.evaluate.metrics import auroc

    run = api.load_run(args.run, "cpu")
    if not hasattr(run.model, "score_normalizer"):
        raise SystemExit(f"{args.run}: {run.model.name} has no score normaliser")
    run.model.score_normalizer = ScoreNormalizer()  # raw scores from here on
    split = Split.load(args.run / "split.json")
    data = run.config.data
    parts = {}
    for part in ("train", "val", "test"):
        loaded = load_samples(
            split[part], data.image_size, data.channels, data.mask_threshold, desc=part
        )
        scores, _ = api.predict_arrays(run.model, loaded.images)
        parts[part] = (torch.from_numpy(scores), content_statistics(loaded.images), loaded.labels)
    test_scores, test_statistics, labels = parts["test"]

    def test_auroc(scores: torch.Tensor, statistics: torch.Tensor) -> float:
        normalizer = ScoreNormalizer().fit(scores, statistics)
        return auroc(labels, normalizer(test_scores, test_statistics).numpy())

    train_scores, train_statistics, _ = parts["train"]
    raw = auroc(labels, test_scores.numpy())
    on_train = test_auroc(train_scores, train_statistics)
    on_val = test_auroc(*parts["val"][:2])
    print(
        f"{args.run}: test image AUROC raw {raw:.3f}; "
        f"normaliser fitted on all {len(train_scores)} training images "
        f"{on_train:.3f}, on the "
        f"{len(parts['val'][0])} validation normals {on_val:.3f}"
    )
    rows = [{"fit": "none (raw score)", "auroc": f"{raw:.3f}"}]
    generator = torch.Generator().manual_seed(args.seed)
    for size in args.sizes:
        if size >= len(train_scores):
            continue
        values = []
        for _ in range(args.draws):
            subset = torch.randperm(len(train_scores), generator=generator)[:size]
            values.append(test_auroc(train_scores[subset], train_statistics[subset]))
        print(
            f"  {size:>4} random training images: AUROC {np.mean(values):.3f} ± "
            f"{np.std(values):.3f} (min {min(values):.3f}, {args.draws} draws)"
        )
        rows.append(
            {
                "fit": f"{size} random training images ({args.draws} draws)",
                "auroc": f"{np.mean(values):.3f} ± {np.std(values):.3f} (min {min(values):.3f})",
            }
        )
    rows.append({"fit": f"all {len(train_scores)} training images", "auroc": f"{on_train:.3f}"})
    rows.append({"fit": f"the {len(parts['val'][0])} validation normals", "auroc": f"{on_val:.3f}"})
    if args.write_docs:
        path = write_section(
            args.write_docs,
            docs_key("normalizer-samples", args.run.name),
            f"Score normaliser: which normal images it is fitted on ({args.run.name})",
            markdown_table(
                rows, [("fit", "normal images in the fit", str), ("auroc", "test image AUROC", str)]
            ),
        )
        print(f"results → {path}")


if __name__ == "__main__":
    main()
