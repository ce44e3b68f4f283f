"""Typed run configuration and ``--set key=value`` overrides.

Keys are dotted: ``data.image_size=256``, ``train.batch_size=8``,
``calibration.image_quantile=0.995``; ``model.<field>`` (or a bare ``<field>``) goes to the
model's own config dataclass. Values are converted to the field's declared type, and an
unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from defectlab.errors import ConfigError

#: values of ``data.channels``
CHANNELS: tuple[int | str, ...] = ("auto", 1, 3)
#: values of ``data.tile``
TILE_MODES: tuple[str, ...] = ("auto", "on", "off")


@dataclass
class DataConfig:
    path: str = ""
    layout: str = "auto"
    category: str | None = None
    #: the model input side in pixels, or "auto": decided from the training images and the
    #: model at train time (a pretrained backbone's working size, 128 for pixel models) and
    #: stored resolved in the run's config with the reason
    image_size: int | str = "auto"
    #: "on": train on overlapping native-resolution tiles of image_size and score whole
    #: images by stitching tile maps; "off": resize whole images; "auto": "on" when an
    #: auto-sized run's training images are at least twice its input (long side)
    tile: str = "auto"
    #: 1 (grey), 3 (RGB) or "auto": decided from the training images at train time (RGB
    #: when they are colour), and stored resolved in the run's config with the reason
    channels: int | str = "auto"
    split_seed: int = 0
    train_fraction: float = 0.7
    val_fraction: float = 0.15
    defects_per_class: int = 0
    #: defect images per type held out as labelled validation (calibration.method=f1)
    val_defects_per_class: int = 0
    mask_threshold: int = 127
    include_uncertain: bool = False
    #: folder layout: names of the normal / defect sub-folders and of the mask folder, and
    #: the stem suffix of masks (e.g. "_mask"); empty/None = auto-detect
    normal_dirs: tuple[str, ...] = ()
    defect_dirs: tuple[str, ...] = ()
    mask_dir: str | None = None
    mask_suffix: str | None = None
    #: weak labels for area-ratio segmenters: a ``path,area_ratio[,margin]`` CSV; empty =
    #: derive each training image's ratio from its mask (normal images: 0)
    area_ratio_csv: str = ""
    #: ``defectlab synth`` output folders whose (image, mask) pairs are added to the training
    #: defects of mask-trained models (augmentation); never part of the split
    extra_pairs: tuple[str, ...] = ()
    workers: int = 2
    #: pixel budget: an image whose header declares more pixels is skipped, never decoded
    max_pixels: int = 100_000_000
    #: images whose shorter side is below this are skipped rather than up-scaled
    min_side: int = 8

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.min_side < 1:
            raise ConfigError(
                f"data.max_pixels and data.min_side must be at least 1, got "
                f"{self.max_pixels} and {self.min_side}"
            )
        if isinstance(self.channels, str) and self.channels.strip().isdigit():
            self.channels = int(self.channels)
        if self.channels not in CHANNELS:
            raise ConfigError(
                f"data.channels must be one of {', '.join(map(str, CHANNELS))}; "
                f"got {self.channels!r}"
            )
        if isinstance(self.image_size, str):
            value = self.image_size.strip()
            if not (value == "auto" or value.isdigit()):
                raise ConfigError(f"data.image_size: cannot read {value!r} as int (pixels) or auto")
            self.image_size = value if value == "auto" else int(value)
        if self.image_size != "auto" and self.image_size < 16:
            raise ConfigError(f"data.image_size must be at least 16, got {self.image_size}")
        if isinstance(self.tile, bool):  # a JSON or Python true/false
            self.tile = "on" if self.tile else "off"
        self.tile = {"true": "on", "false": "off"}.get(str(self.tile).lower(), str(self.tile))
        if self.tile not in TILE_MODES:
            raise ConfigError(
                f"data.tile must be one of {', '.join(TILE_MODES)}; got {self.tile!r}"
            )
        if not 0 <= self.mask_threshold < 255:
            raise ConfigError(f"data.mask_threshold must be in [0, 255), got {self.mask_threshold}")


@dataclass
class TrainConfig:
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be positive, got {self.batch_size}")
        if self.checkpoint_every < 1:
            raise ConfigError(
                f"train.checkpoint_every must be positive, got {self.checkpoint_every}"
            )


CALIBRATION_METHODS = ("auto", "quantile", "f1", "area", "model")


@dataclass
class CalibrationConfig:
    """How a run's image and pixel thresholds are set after training.

    * ``"quantile"``: quantiles of the scores and map values of normal validation images;
      no defect labels needed.
    * ``"f1"``: the image threshold with the best F1 (and the pixel threshold with the best
      Dice, when masks exist) on labelled validation images: the normal validation share
      plus ``data.val_defects_per_class`` held-out defects.
    * ``"area"``: for models taught by area ratios (``arearatio-gcn``, where it must be asked
      for: its default is ``"model"``): the image threshold as for ``"quantile"``, the pixel
      threshold such that the maps of the training images flag as much area in total as
      their area-ratio labels say
      (:func:`defectlab.evaluate.metrics.area_matched_threshold`). Normal images say nothing
      about how much of a defective image to flag; the ratios do.
    * ``"model"``: the thresholds the model fixes itself (``decision_thresholds``: CAM with
      ``peak_fraction``, a voting ensemble, ``arearatio-gcn``'s probability 0.5). A model
      that fixes them also gets them under ``"quantile"``, whose normal-image quantiles
      would say nothing about its decision rule.
    * ``"auto"`` (default): ``"model"`` for models that fix their own thresholds, else
      ``"area"`` for models taught by area ratios, else ``"quantile"``.
    """

    method: str = "auto"
    image_quantile: float = 0.99
    pixel_quantile: float = 0.999

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibration.method must be one of {', '.join(CALIBRATION_METHODS)}; "
                f"got {self.method!r}"
            )
        for name in ("image_quantile", "pixel_quantile"):
            q = getattr(self, name)
            if not 0 < q <= 1:
                raise ConfigError(f"calibration.{name} must be in (0, 1], got {q}")


@dataclass
class RunConfig:
    model: str
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    model_config: dict[str, Any] = field(default_factory=dict)
    #: settings decided from the data at train time (``"auto"`` values): dotted key →
    #: {"value": the resolved value, "reason": why}; the resolved values are in the sections
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.calibration.method == "f1" and self.data.val_defects_per_class < 1:
            raise ConfigError(
                "calibration.method=f1 needs labelled validation defects: "
                "set data.val_defects_per_class to 1 or more"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        try:
            return cls(
                model=d["model"],
                data=DataConfig(**restore_tuples(d.get("data", {}))),
                train=TrainConfig(**d.get("train", {})),
                calibration=CalibrationConfig(**d.get("calibration", {})),
                model_config=dict(d.get("model_config", {})),
                resolved=dict(d.get("resolved", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"not a defectlab run config: {exc}") from exc


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Model configs validate their string options with this, naming the field."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


#: range rules of :func:`check_fields`: name → (test that a value fails, what it must be)
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "at_least_one": (lambda v: v < 1, "must be at least 1"),
    "positive": (lambda v: v <= 0, "must be positive"),
    "nonnegative": (lambda v: v < 0, "must be >= 0"),
    "half_open_unit": (lambda v: not 0 <= v < 1, "must be in [0, 1)"),
    "open_unit": (lambda v: not 0 < v < 1, "must be in (0, 1)"),
}


def check_fields(config: object, **rules: Sequence[str]) -> None:
    """Range checks of model config fields, rule by rule in the order given (rules: the keys
    of ``_FIELD_RULES``), so every config words its errors alike; the first failure raises a
    ValueError that names the field."""
    for rule, keys in rules.items():
        fails, requirement = _FIELD_RULES[rule]
        for key in keys:
            value = getattr(config, key)
            if fails(value):
                raise ValueError(f"{key} {requirement}, got {value}")


def restore_tuples(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no tuples: turn lists read back from config.json into tuples again."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _convert(value: str, annotation: Any, key: str) -> Any:
    """Parse a command-line string into ``annotation`` (int, float, bool, str, tuples, unions)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        for option in options:
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: cannot read {value!r} as {annotation}")
    if origin is tuple:
        args = typing.get_args(annotation)
        parts = [p for p in value.strip("()[]").split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(p.strip(), args[0], key) for p in parts)
        if len(parts) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_convert(p.strip(), a, key) for p, a in zip(parts, args, strict=True))
    try:
        if annotation is bool:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float, str):
            return annotation(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: cannot read {value!r} as {annotation.__name__}") from exc
    raise ConfigError(f"{key}: cannot set a value of type {annotation} from the command line")


def apply_overrides(instance: Any, overrides: dict[str, str], prefix: str = "") -> Any:
    """Return a copy of dataclass ``instance`` with string ``overrides`` applied by field name."""
    fields = {f.name for f in dataclasses.fields(instance)}
    hints = typing.get_type_hints(type(instance))
    changes = {}
    for key, raw in overrides.items():
        if key not in fields:
            valid = ", ".join(f"{prefix}{name}" for name in fields)
            raise ConfigError(f"unknown setting {prefix + key!r}; valid: {valid}")
        changes[key] = _convert(raw, hints[key], f"{prefix}{key}")
    try:
        return dataclasses.replace(instance, **changes)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc


def parse_set_options(items: list[str]) -> dict[str, dict[str, str]]:
    """``["data.image_size=64", "epochs=3"]`` → {"data": {...}, "model": {"epochs": "3"}}."""
    sections: dict[str, dict[str, str]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        section, _, name = key.strip().rpartition(".")
        section = section or "model"
        if section not in ("data", "train", "calibration", "model"):
            raise ConfigError(f"--set {key!r}: section must be data, train, calibration or model")
        sections.setdefault(section, {})[name] = value.strip()
    return sections
