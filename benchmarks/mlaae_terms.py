"""Which term of the multi-level adversarial autoencoder's score separates defects?

The seed's score is ``α‖x − x̂‖ + β Σᵢ ‖Eᵢ(x) − Eᵢ(x̂)‖`` over four encoder levels (two for
``input=features``, where x is the standardised backbone feature map). For a trained ``mlaae``
run this prints, on the run's own test split, the image AUROC of each term alone: the input
(pixel or feature-map) residual, each level's absolute feature residual, each level's relative
residual (``feature_residual="relative"``: divided by the image's own activation energy),
the seed's sum, the sum with the run's term weights (``term_weighting``: t0 the input term,
t1… the levels), and two image statistics that explain what the terms pick up (mean
brightness, and the signed residual x̂ − x: does the autoencoder brighten defects?).

    .venv/bin/python benchmarks/mlaae_terms.py runs/bench/mlaae-elpv-128-s0
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a trained mlaae run directory")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from defectlab import api
    from defectlab.data.splits import Split
    from defectlab.detect.mlaae import MLAAE
    from defectlab.evaluate.metrics import auroc

    run = api.load_run(args.run, args.device)
    if not isinstance(run.model, MLAAE):
        raise SystemExit(f"{args.run}: not an mlaae run ({run.model.name})")
    split = Split.load(args.run / "split.json")
    test = api.load_images(split["test"], run.config.data, "loading test images", True)
    labels = test.labels
    images = torch.from_numpy(np.ascontiguousarray(test.images.transpose(0, 3, 1, 2)))

    def terms(model: MLAAE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixel, features, recon = [], [], []
        for start in range(0, len(images), 32):
            batch = images[start : start + 32]
            residual, reconstruction, levels = model.residuals(batch)  # one forward pass
            p, f = model.residual_terms(residual, levels)  # the score's own term formula
            pixel.append(p.cpu().numpy())
            features.append(f.cpu().numpy())
            recon.append(reconstruction.cpu().numpy())
        return np.concatenate(pixel), np.concatenate(features), np.concatenate(recon)

    pixel, absolute, recon = terms(run.model)
    relative_model = MLAAE(
        dataclasses.replace(run.model.config, feature_residual="relative"),
        image_size=run.model.image_size,
        channels=run.model.channels,
        device=args.device,
    )
    relative_model.load_state_dict(run.model.state_dict())
    _, relative, _ = terms(relative_model)
    grey = test.images.mean(axis=-1)
    levels = run.model.config.levels
    kind = run.model.config.input
    rows = [(f"{kind} residual", pixel)]
    rows += [(f"level {i + 1} absolute feature residual", absolute[:, i]) for i in range(levels)]
    rows += [(f"level {i + 1} relative feature residual", relative[:, i]) for i in range(levels)]
    weights = run.model.term_weights.cpu().numpy()
    rows += [
        (f"seed score: {kind} + Σ absolute levels", pixel + absolute.sum(axis=1)),
        (
            "weighted: " + " + ".join(f"{w:.3g}·t{i}" for i, w in enumerate(weights)),
            pixel * weights[0] + (absolute * weights[1:]).sum(axis=1),
        ),
        ("mean brightness", grey.mean(axis=(1, 2))),
    ]
    if kind == "pixels":
        rows.append(("signed residual mean(x̂ − x)", (recon.mean(axis=1) - grey).mean(axis=(1, 2))))
    print(
        f"{args.run}: {len(labels)} test images ({int(labels.sum())} defective), split "
        f"{split.name}; image AUROC of each term alone (0.5 = chance, < 0.5 = ranks defects "
        "below normal images)"
    )
    for name, values in rows:
        print(f"  {name:<42} {auroc(labels, values):.3f}")


if __name__ == "__main__":
    main()
