"""How faithfully a trained CrossGAN (or CycleGAN) copies its source image: the diagnosis
behind "why the translation GANs stay blurred" in docs/models/crossgan.md.

A translated defect image is only useful with a difference-derived mask if the generator
copies everything but the defect. On the run's own normal training images (its
``split.json``), in eval mode, this prints:

* ``self_recon_l1``: L1 between a normal image and ``G_X(E^c(x))`` (images in [-1, 1]);
* ``mean_image_l1``: the same L1 for the mean training image, the trivial reconstruction;
* ``translated_l1``: L1 between a normal image and its defect version ``G_Y(E^c(x), a)`` with
  ``a`` drawn from the prior (seeded), plus the correlations of the two images' brightness
  (mean) and contrast (std) over the images;
* from :meth:`synthesize` (the samples a benchmark trains on, prior detail codes seeded by
  ``--seed``): ``changed_outside_mask``, the share of pixels outside the sample's mask whose
  value differs at all from the source (0 by construction for ``generator=residual_attention``,
  where the mask is the thresholded attention map), ``changed_pixels``, the share that differ
  by more than 1/255, ``mask_area``, the mean mask share, ``empty_masks``, the share of
  samples whose mask is empty, and ``mask_change_iou``, the IoU between the mask and the
  pixels changed by more than 1/255 (1 = the mask marks exactly what changed), and
  ``change_in_mask``, the mean absolute change inside non-empty masks (image range [0, 1]): how
  strong the edits are;
* ``real_defect_area`` and ``real_defect_area_median``: the mean and median mask share of the
  run's real training defects (its ``split.json``), what ``mask_area`` should be near;
* for a CycleGAN run (no content codes) only ``translated_l1``, the correlations (``G(x)``
  against ``x``), the synthesis measures and the real defect area;
* ``autoencoder_l1`` (``--autoencoder-steps N``, 0 = off, CrossGAN only): the same content
  encoder and G_X architecture trained from scratch as a plain L1 autoencoder on those images
  for N steps (batch 16, the run's Adam settings), then scored like ``self_recon_l1``: what
  the networks can reach without the adversarial terms.

    .venv/bin/python benchmarks/translation_fidelity.py \\
        runs/augmentation-64/gen-crossgan-k5-64-s0-g20 --autoencoder-steps 200

``--write-docs [PAGE]`` also writes the row into ``docs/results/PAGE.md`` (default
``synthesis``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import add_write_docs, docs_key, fmt_number, markdown_table, write_section


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])


def train_autoencoder(model, images: torch.Tensor, steps: int, seed: int) -> float:
    """L1 of a freshly trained content encoder + G_X (same settings as ``model``)."""
    from defectlab.components.gan_layers import ResidualEncoder, UpDecoder

    cfg = model.config
    torch.manual_seed(seed)
    channels = images.shape[1]
    autoencoder = torch.nn.Sequential(
        ResidualEncoder(channels, cfg.width, cfg.content_blocks, cfg.encoder_norm),
        UpDecoder(channels, cfg.width),
    )
    optimizer = torch.optim.Adam(
        autoencoder.parameters(),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = images[torch.randint(len(images), (16,), generator=generator)]
        loss = F.l1_loss(autoencoder(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    autoencoder.eval()
    with torch.no_grad():
        return float(F.l1_loss(autoencoder(images), images))


def generator_key(generator: str) -> str:
    """The docs-key part of a generator: none for the seed's ``full`` (the keys of earlier
    sections), the name otherwise."""
    return "" if generator == "full" else generator


def mask_agreement(model, images: np.ndarray, seed: int) -> dict[str, object]:
    """Where the synthesized samples changed their source, against their masks (module
    docstring); ``images`` (N, H, W, C) in [0, 1] at the model's size."""
    outside, changed_share, areas, ious, empty, strength = [], [], [], [], [], []
    for i, image in enumerate(images):
        sample = model.synthesize(image, np.random.default_rng([seed, i]))
        out = sample.image if sample.image.ndim == 3 else sample.image[:, :, None]
        diff = np.abs(out - image).max(axis=2)
        mask = sample.mask
        if (~mask).any():
            outside.append(float((diff[~mask] > 0).mean()))
        changed = diff > 1 / 255
        changed_share.append(float(changed.mean()))
        areas.append(float(mask.mean()))
        empty.append(not mask.any())
        if mask.any():
            strength.append(float(diff[mask].mean()))
        union = (changed | mask).sum()
        ious.append(float((changed & mask).sum() / union) if union else 1.0)
    return {
        "generator": model.config.generator,
        "changed_outside_mask": float(np.mean(outside)) if outside else 0.0,
        "changed_pixels": float(np.mean(changed_share)),
        "mask_area": float(np.mean(areas)),
        "empty_masks": float(np.mean(empty)),
        "mask_change_iou": float(np.mean(ious)),
        "change_in_mask": float(np.mean(strength)) if strength else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished crossgan or cyclegan run folder")
    parser.add_argument("--autoencoder-steps", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    add_write_docs(parser, "synthesis")
    args = parser.parse_args()
    if args.autoencoder_steps < 0:
        parser.error("--autoencoder-steps must be 0 or more")

    from defectlab import api
    from defectlab.data.loading import load_samples
    from defectlab.data.splits import Split
    from defectlab.errors import DefectlabError

    try:
        run = api.load_run(args.run, "cpu")
        split = Split.load(args.run / "split.json")
    except (DefectlabError, OSError) as error:
        sys.exit(f"{args.run}: not a finished run ({error})")
    model = run.model
    if model.name not in ("crossgan", "cyclegan"):
        sys.exit(f"{args.run} holds a {model.name} run; this diagnosis reads translators")
    if model.name == "cyclegan" and args.autoencoder_steps:
        sys.exit("--autoencoder-steps rebuilds CrossGAN's content encoder: CrossGAN runs only")
    data = run.config.data
    loaded = load_samples(
        split["train"], data.image_size, data.channels, data.mask_threshold, desc="normals"
    )
    images = torch.from_numpy(np.ascontiguousarray(loaded.images.transpose(0, 3, 1, 2)))
    images = images * 2 - 1
    model.nets.eval()
    generator = torch.Generator().manual_seed(args.seed)
    row: dict[str, object] = {"run": str(args.run), "n_images": len(images)}
    with torch.no_grad():
        if model.name == "crossgan":
            content = model.content(images)
            rebuilt = model.to_normal(content, images)
            prior = torch.randn(len(images), model.config.detail_dim, generator=generator)
            translated = model.to_defect(content, prior, images)
            row["self_recon_l1"] = float(F.l1_loss(rebuilt, images))
        else:
            translated = model.to_defect(images)
    mean_image = images.mean(dim=0, keepdim=True).expand_as(images)
    row |= {
        "model": model.name,
        "mean_image_l1": float(F.l1_loss(mean_image, images)),
        "translated_l1": float(F.l1_loss(translated, images)),
        "brightness_correlation": correlation(
            translated.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3))
        ),
        "contrast_correlation": correlation(
            translated.std(dim=(1, 2, 3)), images.std(dim=(1, 2, 3))
        ),
    }
    row |= mask_agreement(model, loaded.images, args.seed)
    defects = load_samples(
        split["train_defect"], data.image_size, data.channels, data.mask_threshold, desc="defects"
    )
    real_areas = defects.masks.reshape(len(defects.masks), -1).astype(np.float64).mean(axis=1)
    row["real_defect_area"] = float(real_areas.mean())
    row["real_defect_area_median"] = float(np.median(real_areas))
    if args.autoencoder_steps:
        row["autoencoder_steps"] = args.autoencoder_steps
        row["autoencoder_l1"] = train_autoencoder(model, images, args.autoencoder_steps, args.seed)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    if args.write_docs:
        columns = [
            ("model", "model", str),
            ("n_images", "normal training tiles", str),
            ("self_recon_l1", "L1, rebuilt from its content code", fmt_number(3)),
            ("mean_image_l1", "L1 of the mean tile", fmt_number(3)),
            ("autoencoder_l1", "L1, plain autoencoder (same networks, same steps)", fmt_number(3)),
            ("translated_l1", "L1 of the defect version", fmt_number(3)),
            ("brightness_correlation", "brightness correlation", fmt_number(2)),
            ("contrast_correlation", "contrast correlation", fmt_number(2)),
            ("generator", "generator", str),
            ("changed_outside_mask", "changed outside the mask", fmt_number(4)),
            ("changed_pixels", "changed > 1/255", fmt_number(3)),
            ("mask_area", "mask area", fmt_number(3)),
            ("empty_masks", "empty masks", fmt_number(2)),
            ("real_defect_area", "real defect area (mean)", fmt_number(3)),
            ("real_defect_area_median", "real defect area (median)", fmt_number(3)),
            ("mask_change_iou", "IoU(mask, changed > 1/255)", fmt_number(3)),
            ("change_in_mask", "mean change in the mask", fmt_number(3)),
        ]
        path = write_section(
            args.write_docs,
            # runs of both generators share benchmark folder names: the key tells them apart
            docs_key("translation-fidelity", args.run.name, generator_key(model.config.generator)),
            f"How well {'CrossGAN' if model.name == 'crossgan' else 'CycleGAN'} copies its "
            f"source: {args.run.parent.name}/{args.run.name}",
            markdown_table([row], columns),
            notes=(
                "L1 columns: images in [-1, 1], eval mode; correlations between source and defect "
                "version; the synthesis columns (changed pixels, masks, mean change) on the "
                "synthesized samples in [0, 1]; areas are shares of the tile."
            ),
        )
        print(f"results → {path}")


if __name__ == "__main__":
    main()
