"""Name → model class, for detectors, segmenters and synthesizers alike.

Built-in models register themselves when their module is imported; the modules are listed
once here. Third-party packages add models through the ``defectlab.models`` entry-point
group. The CLI and benchmarks only ever call :func:`get` and :func:`available`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from defectlab.errors import ConfigError

FAMILIES = ("detector", "segmenter", "synthesizer")

BUILTIN_MODULES = (
    "defectlab.detect.pixelstats",
    "defectlab.detect.classical",
    "defectlab.detect.autoencoder",
    "defectlab.detect.mlaae",
    "defectlab.detect.deepsvdd",
    "defectlab.detect.flow",
    "defectlab.detect.patchmemory",
    "defectlab.detect.padim",
    "defectlab.detect.synthseg",
    "defectlab.detect.memseg",
    "defectlab.detect.ensemble",
    "defectlab.segment.unet",
    "defectlab.segment.arearatio",
    "defectlab.segment.cam",
    "defectlab.segment.fused",
    "defectlab.synth.crossgan",
    "defectlab.synth.cyclegan",
    "defectlab.synth.maskgan",
    "defectlab.synth.procedural",
)


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    description: str
    cls: type


_entries: dict[str, Entry] = {}
_loaded = False


def register(cls: type) -> type:
    """Class decorator: make a model available by its ``name``."""
    name, family = cls.name, cls.family
    if family not in FAMILIES:
        raise ValueError(f"{cls.__name__}: family {family!r} is not one of {FAMILIES}")
    existing = _entries.get(name)
    if existing is not None and existing.cls is not cls:
        raise ValueError(f"model name {name!r} is taken by {existing.cls.__qualname__}")
    _entries[name] = Entry(name, family, cls.description, cls)
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group="defectlab.models"):
        ep.load()


def available(family: str | None = None) -> list[Entry]:
    _load_all()
    return sorted(
        (e for e in _entries.values() if family is None or e.family == family),
        key=lambda e: (FAMILIES.index(e.family), e.name),
    )


def get(name: str, family: str | tuple[str, ...] | None = None) -> type:
    """The class registered as ``name``; a clear error lists the alternatives."""
    _load_all()
    families = (family,) if isinstance(family, str) else family
    entry = _entries.get(name)
    if entry is None or (families and entry.family not in families):
        names = [e.name for e in available() if not families or e.family in families]
        what = (
            (", ".join(families[:-1]) + " or " + families[-1] if len(families) > 1 else families[0])
            if families
            else "model"
        )
        raise ConfigError(f"unknown {what} {name!r}; available: {', '.join(names)}")
    return entry.cls
