"""Deterministic, seeded train/val/test splits, written into run directories and reloadable.

The standard protocol (``../shared/data/README.md``): sort the normal images by file stem,
shuffle them with ``numpy.random.default_rng(seed).permutation``, take the first
``train_fraction`` for training, the rest for test; every defect image goes to test. The
validation images that calibrate thresholds are the last ``val_fraction`` of the training
share, so the test share is exactly the standard one. With ``defects_per_class = K``, the
first K shuffled stems of each defect type move to ``train_defect`` (the K-shot protocol),
and with ``val_defects_per_class = V`` the next V move to ``val_defect``: labelled validation
images for the F1-optimal threshold, never tested on. Datasets that define their own split
(MVTec AD) keep it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectlab.data.io import atomic_write_text
from defectlab.data.layouts import DEFECT, NORMAL, Dataset, Sample
from defectlab.errors import DataError


@dataclass
class Split:
    """Named lists of samples plus the recipe that made them."""

    name: str
    seed: int
    parts: dict[str, list[Sample]] = field(default_factory=dict)
    root: str = ""
    layout: str = ""

    def __getitem__(self, key: str) -> list[Sample]:
        return self.parts.get(key, [])

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            part: {
                "normal": sum(s.label == NORMAL for s in samples),
                "defect": sum(s.label == DEFECT for s in samples),
            }
            for part, samples in self.parts.items()
        }

    def seen_in_training(self) -> set[str]:
        parts = ("train", "val", "train_defect", "val_defect")
        return {str(s.path) for part in parts for s in self[part]}

    def save(self, path: str | Path) -> None:
        payload = {
            "name": self.name,
            "seed": self.seed,
            "root": self.root,
            "layout": self.layout,
            "counts": self.counts(),
            "parts": {k: [s.to_dict() for s in v] for k, v in self.parts.items()},
        }
        atomic_write_text(path, json.dumps(payload, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Split:
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            parts = {k: [Sample.from_dict(d) for d in v] for k, v in payload["parts"].items()}
            return cls(
                payload["name"], int(payload["seed"]), parts, payload["root"], payload["layout"]
            )
        except FileNotFoundError as exc:
            raise DataError(f"{path}: split file does not exist") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: not a defectlab split file ({exc})") from exc


def _shuffled(samples: list[Sample], rng_seed: int) -> list[Sample]:
    ordered = sorted(samples, key=lambda s: (s.stem, str(s.path)))
    order = np.random.default_rng(rng_seed).permutation(len(ordered))
    return [ordered[i] for i in order]


def make_split(
    dataset: Dataset,
    seed: int = 0,
    train_fraction: float = 0.7,
    val_fraction: float = 0.15,
    defects_per_class: int = 0,
    val_defects_per_class: int = 0,
) -> Split:
    """Split a dataset by the standard protocol (see module docstring)."""
    if not 0 < train_fraction < 1:
        raise DataError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if dataset.predefined:
        train_pool = list(dataset.predefined["train"])
        test = list(dataset.predefined["test"])
        shuffled = _shuffled(train_pool, seed)
        name = f"{dataset.layout}-predefined"
    else:
        normals = dataset.normal
        if not normals:
            raise DataError(f"{dataset.root}: no normal images to train on")
        shuffled = _shuffled(normals, seed)
        n_train = int(len(shuffled) * train_fraction)
        test = shuffled[n_train:]
        shuffled = shuffled[:n_train]
        name = f"{dataset.layout}-normal-only-v1"
    n_val = round(len(shuffled) * val_fraction)
    if len(shuffled) - n_val < 1:
        raise DataError(f"{dataset.root}: too few normal images ({len(shuffled)}) to split")
    train, val = shuffled[: len(shuffled) - n_val], shuffled[len(shuffled) - n_val :]

    if defects_per_class < 0 or val_defects_per_class < 0:
        raise DataError("defects_per_class and val_defects_per_class must not be negative")
    train_defect: list[Sample] = []
    val_defect: list[Sample] = []
    if dataset.predefined:
        if defects_per_class or val_defects_per_class:
            raise DataError(
                f"{dataset.root}: the {dataset.layout} layout has its own split; "
                "defects_per_class and val_defects_per_class do not apply"
            )
    else:
        by_type: dict[str, list[Sample]] = {}
        for s in dataset.defect:
            by_type.setdefault(s.defect_type, []).append(s)
        for kind in sorted(by_type):
            ordered = _shuffled(by_type[kind], seed)
            held = defects_per_class + val_defects_per_class
            train_defect += ordered[:defects_per_class]
            val_defect += ordered[defects_per_class:held]
            test += ordered[held:]
    if defects_per_class:
        name = f"{dataset.layout}-{defects_per_class}-shot-v1"
    if val_defects_per_class:
        name += f"+val{val_defects_per_class}"
    parts = {"train": train, "val": val, "test": test}
    if train_defect:
        parts["train_defect"] = train_defect
    if val_defect:
        parts["val_defect"] = val_defect
    return Split(name, seed, parts, str(dataset.root), dataset.layout)
