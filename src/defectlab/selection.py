"""Label-free model selection: ``defectlab train --model auto``.

A user with normal images only cannot tell which detector suits their parts. This module
trains a small, bounded set of candidate detectors on the same split, scores each on
procedural defects painted onto the split's **normal validation images** (never test images),
optionally adds the z-score ``ensemble`` of the two best, and keeps the winner as the run in
``--out`` (its config, model and calibration, as any run), with ``selection.csv`` listing
every candidate's synthetic-validation AUROC, speed and size, and the reason in ``log.txt``
and ``config.json`` (``resolved["model"]``).

The painted shape families must differ from any family a candidate trained on: models that
learn from painted defects (a ``shapes`` setting, e.g. ``memseg``, ``synth-unet``) would
otherwise be scored on their own training distribution. Their shapes are removed from the
selection families, and a candidate whose shapes leave none is refused.

The rule is a setting. The default, ``selection.rule=synthetic``, keeps the best
synthetic-validation AUROC: on every benchmark dataset it ranks the candidates as their real
test AUROC does and picks at least as well as any fixed choice (``benchmarks/selection.py``
checks this; ``docs/results/selection.md``). ``fixed`` trains and keeps ``fixed_default``
only (``patchmemory``, Lite0: position-free, so safe on parts that move in the frame), for
a quick run or data where painted defects are known to mislead.

Settings are ``--set selection.KEY=VALUE`` (:class:`SelectionConfig`); ``data.``, ``train.``
and ``calibration.`` settings go to every candidate; model settings belong to a candidate
(``selection.candidates=patchmemory:backbone=lite1/coreset_ratio=0.05,flow``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from defectlab import api
from defectlab.components.painting import SHAPES, ProceduralConfig, ProceduralPainter
from defectlab.config import DataConfig, RunConfig, apply_overrides
from defectlab.data.io import write_csv
from defectlab.data.layouts import Sample
from defectlab.data.splits import Split
from defectlab.errors import ConfigError, DataError
from defectlab.evaluate.metrics import auroc, pixel_auroc
from defectlab.runs import (
    LAST_CHECKPOINT,
    MODEL_FILE,
    TrainedRun,
    load_run,
    predict_arrays,
    read_json,
    run_logger,
    trainable_class,
    write_json,
)

#: the value of ``--model`` that asks for a label-free choice
AUTO = "auto"
#: the fixed default kept when the rule is "fixed" (and the first candidate by default)
FIXED_DEFAULT = "patchmemory:backbone=lite0"
#: sub-folder of ``--out`` that holds every candidate's run
CANDIDATES_DIR = "candidates"
SELECTION_CSV = "selection.csv"
RULES = ("synthetic", "fixed")


@dataclass
class SelectionConfig:
    """Settings of ``--model auto`` (``--set selection.KEY=VALUE``)."""

    #: candidates as ``model[:key=value/key=value]``, trained in this order
    candidates: tuple[str, ...] = (
        FIXED_DEFAULT,
        "padim:backbone=lite0",
        "flow:backbone=lite0",
        "pixelstats",
        "template",
    )
    #: wall-time budget in seconds: no new candidate starts after it (the first always runs)
    budget_seconds: float = 3600.0
    #: painted shape families for scoring; empty: every family no candidate trains on
    shapes: tuple[str, ...] = ()
    #: painted copies of each normal validation image
    paints_per_image: int = 1
    #: also score the z-score ensemble of the two best candidates; it wins only when its
    #: synthetic-validation AUROC is strictly higher than the best single candidate's
    ensemble: bool = True
    #: "synthetic": keep the best synthetic-validation AUROC; "fixed": train and keep
    #: ``fixed_default`` only (quick, or for data where the synthetic ranking is not trusted)
    rule: str = "synthetic"
    #: the candidate the "fixed" rule keeps
    fixed_default: str = FIXED_DEFAULT
    #: fewer normal training images than this is refused (too few to compare candidates)
    min_normal_images: int = 8

    def __post_init__(self) -> None:
        self.candidates = tuple(self.candidates)
        self.shapes = tuple(self.shapes)
        if not self.candidates:
            raise ValueError("candidates must name at least one model")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"shapes: unknown {unknown}; available: {', '.join(SHAPES)}")
        if self.paints_per_image < 1 or self.min_normal_images < 2 or self.budget_seconds <= 0:
            raise ValueError(
                "paints_per_image must be >= 1, min_normal_images >= 2, budget_seconds > 0"
            )


@dataclass(frozen=True)
class Candidate:
    """One model with its own settings, e.g. ``patchmemory:backbone=lite1``."""

    spec: str
    model: str
    settings: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Candidate:
        model, _, rest = spec.strip().partition(":")
        settings = tuple(s.strip() for s in rest.split("/") if s.strip())
        bad = [s for s in settings if "=" not in s or "." in s.split("=", 1)[0]]
        if not model or bad:
            raise ConfigError(
                f"selection.candidates: {spec!r} is not model[:key=value/key=value] with model "
                "settings only (data., train. and calibration. keys go to every candidate)"
            )
        if model in (AUTO, "ensemble"):
            raise ConfigError(f"selection.candidates: {model!r} cannot be a candidate")
        trainable_class(model)  # an unknown model is a one-line error naming the valid ones
        return cls(spec.strip(), model, settings)

    @property
    def name(self) -> str:
        """A folder name: ``patchmemory-lite1``, ``flow-backbone-lite0-epochs-2``."""
        values = [s.split("=", 1)[1] if s.startswith("backbone=") else s for s in self.settings]
        words = [self.model, *(v.replace("=", "-").replace(",", "-") for v in values)]
        return "-".join(w.replace("/", "-") for w in words)


@dataclass
class Scored:
    """A trained candidate and its synthetic-validation scores."""

    name: str
    spec: str
    run_dir: Path | None
    status: str
    synthetic_auroc: float | None = None
    synthetic_pixel_auroc: float | None = None
    images_per_second: float | None = None
    size_mb: float | None = None
    train_seconds: float | None = None

    def row(self, chosen: str) -> dict[str, Any]:
        def r(value: float | None, digits: int = 4) -> Any:
            return "" if value is None else round(value, digits)

        return {
            "candidate": self.name,
            "spec": self.spec,
            "status": self.status,
            "synthetic_auroc": r(self.synthetic_auroc),
            "synthetic_pixel_auroc": r(self.synthetic_pixel_auroc),
            "images_per_second": r(self.images_per_second, 2),
            "size_mb": r(self.size_mb, 2),
            "train_seconds": r(self.train_seconds, 1),
            "chosen": int(self.name == chosen),
            "run": "" if self.run_dir is None else str(self.run_dir),
        }


@dataclass
class Selection:
    """What ``--model auto`` did: the kept run, every candidate, the reason, and the exact
    images it scored (the normal validation images, painted and clean)."""

    run: TrainedRun
    chosen: str
    reason: str
    candidates: list[Scored]
    shapes: tuple[str, ...]
    scored_paths: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """The one line the CLI prints last."""
        return (
            f"auto chose {self.chosen} of {len(self.candidates)} candidates → {self.run.run_dir} "
            f"(image threshold {self.run.image_threshold:.4g}; every candidate in "
            f"{self.run.run_dir / SELECTION_CSV})"
        )


def split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[SelectionConfig, list[str]]:
    """``--set`` items → the selection settings and the items every candidate gets.
    Model settings (no section) are refused: they belong to one candidate."""
    chosen: dict[str, str] = {}
    shared: list[str] = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key = key.strip()
        if key.startswith("selection."):
            chosen[key.removeprefix("selection.")] = value.strip()
        elif key.split(".", 1)[0] in ("data", "train", "calibration") and "." in key:
            shared.append(item)
        else:
            raise ConfigError(
                f"--set {key!r}: with --model auto, model settings belong to a candidate "
                "(selection.candidates=patchmemory:backbone=lite1,flow); valid here: "
                "selection., data., train. and calibration. keys"
            )
    # candidate specs hold commas only between candidates; "/" separates their settings
    config = apply_overrides(SelectionConfig(), chosen, "selection.")
    return config, shared


def selection_shapes(config: SelectionConfig, candidates: list[Candidate]) -> tuple[str, ...]:
    """The painted families: ``config.shapes`` (or every family) minus any family a
    candidate trains on. Refuses an explicit family a candidate trains on, and an empty set."""
    trained_on: set[str] = set()
    for candidate in candidates:
        cls = trainable_class(candidate.model)
        if not any(f.name == "shapes" for f in fields(cls.Config)):
            continue
        model_cfg = apply_overrides(
            cls.Config(), dict(s.split("=", 1) for s in candidate.settings), ""
        )
        trained_on |= set(model_cfg.shapes)
    if config.shapes:
        clash = sorted(set(config.shapes) & trained_on)
        if clash:
            raise ConfigError(
                f"selection.shapes: {', '.join(clash)} are painted into a candidate's training "
                "data; score with other families"
            )
        return config.shapes
    shapes = tuple(s for s in ProceduralConfig().shapes if s not in trained_on)
    if not shapes:
        raise ConfigError(
            "--model auto: the candidates train on every painted shape family, so none is "
            "left to score them on; give candidates fewer shapes (e.g. memseg:shapes=scratch)"
        )
    return shapes


def _run_size_mb(run_dir: Path) -> float:
    return (run_dir / MODEL_FILE).stat().st_size / 2**20


def score_run(
    run: TrainedRun, clean: np.ndarray, painted: np.ndarray, masks: np.ndarray
) -> dict[str, float | None]:
    """Image AUROC of clean vs painted validation images, pixel AUROC on the painted masks,
    and images/s (model time only)."""
    clean_scores, clean_maps = predict_arrays(run.model, clean)
    started = time.perf_counter()
    painted_scores, painted_maps = predict_arrays(run.model, painted)
    seconds = time.perf_counter() - started
    labels = np.r_[np.zeros(len(clean_scores), int), np.ones(len(painted_scores), int)]
    return {
        "synthetic_auroc": auroc(labels, np.r_[clean_scores, painted_scores]),
        "synthetic_pixel_auroc": pixel_auroc(
            np.concatenate([np.zeros(clean_maps.shape, bool), masks]),
            np.concatenate([clean_maps, painted_maps]),
        ),
        "images_per_second": len(painted_scores) / seconds if seconds > 0 else None,
    }


def _painted_validation(
    images: np.ndarray, shapes: tuple[str, ...], copies: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` painted versions of every image (at model size), with their masks."""
    painter = ProceduralPainter(ProceduralConfig(shapes=shapes))
    samples = [s for _, s in painter.generate(list(images), len(images) * copies, seed)]
    return np.stack([s.image for s in samples]), np.stack([s.mask for s in samples])


class ValidationSet:
    """The split's normal validation images, clean and painted, loaded as each candidate's
    resolved data settings load them (size, channels); painted with the same seed, cached
    per setting."""

    def __init__(
        self,
        samples: list[Sample],
        shapes: tuple[str, ...],
        copies: int,
        seed: int,
        progress: bool = False,
    ) -> None:
        self.samples, self.shapes, self.copies, self.seed = samples, shapes, copies, seed
        self.progress = progress
        self.paths: list[Path] = []
        self._cache: dict[tuple[Any, Any], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def arrays(self, data: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clean images, painted copies and their masks at ``data``'s size and channels."""
        key = (data.image_size, data.channels)
        if key not in self._cache:
            val = api.load_images(self.samples, data, "loading validation images", self.progress)
            if not len(val.samples):
                raise DataError(f"{data.path}: no readable normal validation image to score on")
            self.paths = [Path(s.path) for s in val.samples]
            painted, masks = _painted_validation(val.images, self.shapes, self.copies, self.seed)
            self._cache[key] = (val.images, painted, masks)
        return self._cache[key]


def select(
    data: str | Path,
    out: str | Path,
    *,
    category: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    seed: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
    reuse: Mapping[str, str | Path] | None = None,
    resume: bool = False,
) -> Selection:
    """Train the candidates into ``out/candidates/``, score each on painted normal
    validation images, and make ``out`` the winner's run (see the module docstring).

    ``reuse`` maps a candidate spec to a run already trained with exactly its settings on
    the same split (checked; e.g. a benchmark's runs): it is scored instead of retrained.
    ``resume=True`` continues an interrupted selection in ``out``: candidates that finished
    are scored from their runs, the interrupted one resumes from its checkpoint."""
    out = Path(out)
    started = time.perf_counter()
    config, shared = split_overrides(overrides)
    specs = (config.fixed_default,) if config.rule == "fixed" else config.candidates
    candidates = [Candidate.parse(s) for s in specs]
    shapes = selection_shapes(config, candidates)
    if (out / MODEL_FILE).exists():
        raise ConfigError(f"{out} already holds a run; use a new --out folder")
    if (out / CANDIDATES_DIR).exists() and not resume:
        raise ConfigError(
            f"{out} holds an interrupted selection; continue it with --resume or use a new --out"
        )

    # the data settings every candidate resolves to (same split, size and channels)
    base = api.build_config(
        candidates[0].model,
        data,
        category=category,
        image_size=image_size,
        device=device,
        seed=seed,
        overrides=shared,
    )
    _, split = api.dataset_split(base.data)
    n_train, n_val = len(split["train"]), len(split["val"])
    needed = config.min_normal_images
    if n_train < needed or n_val < 1:
        raise DataError(
            f"{base.data.path}: --model auto needs at least {needed} normal training images and "
            f"1 validation image to compare candidates; the split has {n_train} and {n_val} "
            "(add normal images, or train one model with --model patchmemory)"
        )
    validation = ValidationSet(
        split["val"], shapes, config.paints_per_image, base.train.seed, progress
    )

    scored: list[Scored] = []
    bar = tqdm(candidates, desc="auto: candidates", disable=not progress, file=sys.stderr)
    for candidate in bar:
        bar.set_postfix_str(candidate.name)
        run_dir = out / CANDIDATES_DIR / candidate.name
        if scored and time.perf_counter() - started > config.budget_seconds:
            scored.append(Scored(candidate.name, candidate.spec, None, "skipped: over budget"))
            continue
        existing = Path((reuse or {})[candidate.spec]) if candidate.spec in (reuse or {}) else None
        if existing is None and resume and (run_dir / MODEL_FILE).exists():
            existing = run_dir  # finished before the interruption
        if existing is not None:
            _check_reusable(existing, candidate, base, split)
            scored.append(_score_existing(existing, candidate.spec, candidate.name, validation))
            continue
        scored.append(
            _train_and_score(
                candidate.model,
                candidate.spec,
                candidate.name,
                run_dir,
                data,
                [*shared, *candidate.settings],
                (category, image_size, device, seed),
                validation,
                resume=resume and (run_dir / LAST_CHECKPOINT).exists(),
                progress=progress,
            )
        )
    bar.close()
    trained = [s for s in scored if s.synthetic_auroc is not None]
    in_budget = time.perf_counter() - started <= config.budget_seconds
    if config.ensemble and config.rule == "synthetic" and len(trained) >= 2 and in_budget:
        first, second = sorted(trained, key=lambda s: -(s.synthetic_auroc or 0.0))[:2]
        members = ",".join(str(s.run_dir.resolve()) for s in (first, second) if s.run_dir)
        name = f"ensemble-{first.name}+{second.name}"
        scored.append(
            _train_and_score(
                "ensemble",
                f"ensemble:runs={first.name},{second.name}",
                name,
                out / CANDIDATES_DIR / name,
                data,
                [*shared, f"runs={members}"],
                (category, image_size, device, seed),
                validation,
                progress=progress,
            )
        )
    winner, reason = _choose(scored, config, shapes, len(validation.paths))
    _keep(winner, out, reason)
    rows = [s.row(winner.name) for s in scored]
    write_csv(out / SELECTION_CSV, rows)
    run_logger(out).info("model=auto → %s: %s", winner.name, reason)
    return Selection(
        load_run(out, device), winner.name, reason, scored, shapes, list(validation.paths)
    )


def _check_reusable(run_dir: Path, candidate: Candidate, base: RunConfig, split: Split) -> None:
    """Refuse a run to reuse unless it is ``candidate`` trained on ``split`` at ``base``'s
    data settings."""
    stored = RunConfig.from_dict(read_json(run_dir / "config.json"))
    size = base.data.image_size
    wanted = api.build_config(
        candidate.model,
        base.data.path,
        image_size=None if size == "auto" else int(size),
        overrides=list(candidate.settings),
    )
    same_model = stored.model == candidate.model and json.dumps(
        stored.model_config, sort_keys=True, default=list
    ) == json.dumps(wanted.model_config, sort_keys=True, default=list)
    # "auto" settings as the candidate's training resolved them from this split
    size = api.resolve_auto_settings(
        replace(base, model=candidate.model, model_config=dict(wanted.model_config)), split
    ).data.image_size
    same_data = stored.data.image_size == size
    theirs = Split.load(run_dir / "split.json")
    same_split = all(
        [str(x.path) for x in theirs[part]] == [str(x.path) for x in split[part]]
        for part in ("train", "val", "test")
    )
    if not (same_model and same_data and same_split):
        raise ConfigError(
            f"{run_dir}: cannot reuse it for {candidate.spec}: it differs in "
            + ", ".join(
                w
                for w, ok in (("model", same_model), ("size", same_data), ("split", same_split))
                if not ok
            )
        )


def _score_existing(run_dir: Path, spec: str, name: str, validation: ValidationSet) -> Scored:
    run = load_run(run_dir)
    result = score_run(run, *validation.arrays(run.config.data))
    seconds = read_json(run_dir / "metrics.json").get("train_seconds")
    return Scored(
        name,
        spec,
        run_dir,
        "reused",
        train_seconds=seconds,
        size_mb=_run_size_mb(run_dir),
        **result,
    )


def _train_and_score(
    model: str,
    spec: str,
    name: str,
    run_dir: Path,
    data: str | Path,
    overrides: list[str],
    options: tuple[str | None, int | None, str, int | None],
    validation: ValidationSet,
    resume: bool = False,
    progress: bool = False,
) -> Scored:
    category, image_size, device, seed = options
    started = time.perf_counter()
    if run_dir.exists() and not resume:  # interrupted before its first checkpoint
        shutil.rmtree(run_dir)
    run = api.train(
        model,
        data,
        run_dir,
        category=category,
        image_size=image_size,
        device=device,
        seed=seed,
        overrides=overrides,
        resume=resume,
        progress=progress,
    )
    seconds = time.perf_counter() - started
    result = score_run(run, *validation.arrays(run.config.data))
    # an ensemble's size is its own file and its members'
    members = [Path(r) for r in run.config.model_config.get("runs", ())]
    return Scored(
        name,
        spec,
        run_dir,
        "trained",
        train_seconds=seconds,
        size_mb=sum(_run_size_mb(d) for d in [run_dir, *members]),
        **result,
    )


def _choose(
    scored: list[Scored], config: SelectionConfig, shapes: tuple[str, ...], n_val: int
) -> tuple[Scored, str]:
    """The winner and why. Ties go to the earlier candidate; the ensemble (last) wins only
    when strictly better."""
    trained = [s for s in scored if s.synthetic_auroc is not None]
    if config.rule == "fixed":
        return trained[0], (
            f"rule=fixed: the fixed default {trained[0].spec}, not compared with other "
            "candidates; selection.rule=synthetic (the default) compares them"
        )
    best = trained[0]
    for s in trained[1:]:
        if (s.synthetic_auroc or 0.0) > (best.synthetic_auroc or 0.0):
            best = s
    others = ", ".join(f"{s.name} {s.synthetic_auroc:.4f}" for s in trained if s is not best)
    return best, (
        f"highest synthetic-validation AUROC {best.synthetic_auroc:.4f} on {n_val} normal "
        f"validation images and {n_val * config.paints_per_image} painted copies "
        f"({'+'.join(shapes)}); others: {others or 'none'}"
    )


def _keep(winner: Scored, out: Path, reason: str) -> None:
    """Copy the winner's run into ``out`` and record the choice in its ``config.json``."""
    assert winner.run_dir is not None
    out.mkdir(parents=True, exist_ok=True)  # reused candidates alone never create it
    for item in winner.run_dir.iterdir():
        target = out / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    config = read_json(out / "config.json")
    config.setdefault("resolved", {})["model"] = {
        "value": winner.name,
        "spec": winner.spec,
        "reason": reason,
        "candidates": str(out / CANDIDATES_DIR),
    }
    write_json(out / "config.json", config)


__all__ = [
    "AUTO",
    "Candidate",
    "Scored",
    "Selection",
    "SelectionConfig",
    "score_run",
    "select",
    "selection_shapes",
    "split_overrides",
]
