"""``defectlab evaluate-synth``: quality of generated images against real ones, in
EfficientNet-Lite0 feature space (Lite0-FID/KID, not Inception FID/KID).

Kept apart from ``cli.py`` so the command is added with two lines there::

    from defectlab.evaluate import synthesis_cli
    synthesis_cli.add_parser(sub)
"""

from __future__ import annotations

import argparse
from typing import Any

from defectlab.evaluate.synthesis import RESULT_FILE, evaluate_synthesis


def _fmt(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def cmd_evaluate_synth(args: argparse.Namespace) -> str:
    """Print the metrics, each line naming the Lite0 feature space; return the summary line."""
    result = evaluate_synthesis(
        args.real,
        args.fake,
        args.out,
        device=args.device,
        image_size=args.image_size,
        batch_size=args.batch_size,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        diversity_metric=args.diversity_metric,
        seed=args.seed,
        workers=args.workers,
    )
    kid, score = result["lite0_kid"], result["lite0_inception_score"]
    div = result["diversity"]
    n_real, n_fake = result["real"]["n_images"], result["fake"]["n_images"]
    print(f"feature space: {result['feature_space']}, input {result['image_size']} px")
    print(f"Lite0-FID (not Inception FID, not comparable to papers): {result['lite0_fid']:.4f}")
    print(
        f"Lite0-KID (not Inception KID, not comparable to papers): {kid['mean']:.6f} "
        f"± {_fmt(kid['std'])} ({kid['n_subsets']} subsets of {kid['subset_size']})"
    )
    print(
        f"Lite0 Inception-style score (Lite0 ImageNet classifier, not Inception IS): fake "
        f"{score['fake']['mean']:.4f} ± {score['fake']['std']:.4f}, real "
        f"{score['real']['mean']:.4f} ± {score['real']['std']:.4f} "
        f"({score['fake']['splits']} split(s) of {score['fake']['images_per_split']} fake images)"
    )
    within = div["fake"].get("within_group")
    print(
        f"Lite0 {div['fake']['metric']} diversity: fake {_fmt(div['fake']['overall'])}, real "
        f"{_fmt(div['real']['overall'])}"
        + (
            f", fake within source {_fmt(within['mean'])} ({within['n_groups']} sources)"
            if within
            else ""
        )
    )
    realism = result.get("mask_realism")
    if realism:
        distance = realism["distance"]
        print(
            "mask realism (Wasserstein-1 / real std, fake vs real masks): "
            + ", ".join(
                f"{key} {_fmt(d['w1_relative'], 3)} (mean fake {_fmt(d['fake_mean'], 3)}, "
                f"real {_fmt(d['real_mean'], 3)})"
                for key, d in distance.items()
                if key in ("area_fraction", "elongation", "n_components")
            )
        )
        spread = realism["diversity"]
        print(
            f"mask diversity (mean 1 - IoU between masks; 0 = one mask for all): fake "
            f"{_fmt(spread['fake'], 3)}, real {_fmt(spread['real'], 3)}"
        )
        outside = realism.get("outside_object")
        if outside and outside["pixel_share"] is not None:
            print(
                f"generated mask pixels outside the object: {outside['pixel_share']:.2%} "
                f"(masks touching outside: {outside['masks_touching_outside']:.1%})"
            )
    if "warning" in result:
        print(f"warning: {result['warning']}")
    where = f" → {args.out}/{RESULT_FILE}" if args.out else ""
    return (
        f"Lite0-FID {result['lite0_fid']:.2f}, Lite0-KID {kid['mean']:.4g} ± {_fmt(kid['std'], 2)} "
        f"(Lite0 features, not Inception FID/KID) on {n_real} real / {n_fake} fake images"
        f"{where}"
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``evaluate-synth`` to the ``defectlab`` sub-commands; returns its parser."""
    p = subparsers.add_parser(
        "evaluate-synth",
        help="Lite0-FID/KID (not Inception FID), diversity of generated vs real images",
    )
    p.add_argument("--real", required=True, help="folder of real images (searched recursively)")
    p.add_argument(
        "--fake", required=True, help="folder of generated images or a `defectlab synth` output"
    )
    p.add_argument("--out", help=f"folder to write {RESULT_FILE} to")
    p.add_argument("--image-size", type=int, default=224, help="Lite0 input size, a multiple of 32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--diversity-metric", choices=("cosine", "l2"), default="cosine")
    p.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.set_defaults(func=cmd_evaluate_synth)
    return p
