"""Dataset layouts: MVTec AD, plain folders, magnetic tile, ELPV. Detected automatically.

Every layout yields the same thing: a :class:`Dataset`, a list of :class:`Sample` (image path,
label, mask path, defect type) plus, for MVTec, the split the dataset itself defines.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from defectlab.data.io import IMAGE_EXTENSIONS, list_images
from defectlab.errors import DataError

NORMAL = 0
DEFECT = 1
UNCERTAIN = -1

NORMAL_DIR_NAMES = ("good", "normal", "ok", "free", "nondefective", "non_defective")
DEFECT_DIR_NAMES = ("defect", "defects", "defective", "bad", "ng", "anomaly", "abnormal")
MASK_DIR_NAMES = ("masks", "mask", "ground_truth", "gt", "labels")
MASK_SUFFIXES = ("_mask", "_gt", "_label", "")


@dataclass(frozen=True)
class Sample:
    """One image: where it is, what it is, and where its mask is (if any)."""

    path: Path
    label: int
    mask_path: Path | None = None
    defect_type: str = "good"
    group: str = ""
    probability: float | None = None

    @property
    def stem(self) -> str:
        return self.path.stem

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "label": self.label,
            "mask_path": str(self.mask_path) if self.mask_path else None,
            "defect_type": self.defect_type,
            "group": self.group,
            "probability": self.probability,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        return cls(
            path=Path(d["path"]),
            label=int(d["label"]),
            mask_path=Path(d["mask_path"]) if d.get("mask_path") else None,
            defect_type=d.get("defect_type", "good"),
            group=d.get("group", ""),
            probability=d.get("probability"),
        )


@dataclass
class Dataset:
    """All samples of one dataset, and its own train/test division where it has one."""

    root: Path
    layout: str
    samples: list[Sample]
    category: str | None = None
    predefined: dict[str, list[Sample]] = field(default_factory=dict)

    @property
    def normal(self) -> list[Sample]:
        return [s for s in self.samples if s.label == NORMAL]

    @property
    def defect(self) -> list[Sample]:
        return [s for s in self.samples if s.label == DEFECT]

    def summary(self) -> dict:
        defects = self.defect
        types: dict[str, int] = {}
        for s in defects:
            types[s.defect_type] = types.get(s.defect_type, 0) + 1
        return {
            "root": str(self.root),
            "layout": self.layout,
            "category": self.category,
            "n_images": len(self.samples),
            "n_normal": len(self.normal),
            "n_defect": len(defects),
            "n_defect_with_mask": sum(1 for s in defects if s.mask_path is not None),
            "n_uncertain": sum(1 for s in self.samples if s.label == UNCERTAIN),
            "defect_types": dict(sorted(types.items())),
        }


@dataclass(frozen=True)
class LayoutOptions:
    """Knobs of the layouts; every one has a default that fits the common case."""

    category: str | None = None
    normal_dirs: tuple[str, ...] = ()
    defect_dirs: tuple[str, ...] = ()
    mask_dir: str | None = None
    mask_suffix: str | None = None
    include_uncertain: bool = False


def synthetic_pairs(folder: str | Path) -> list[Sample]:
    """The (image, mask) pairs a ``defectlab synth`` output lists in its ``manifest.csv``, as
    defect samples of type ``synthetic:<folder name>``, so training can add them as it adds
    real defects. Every listed file must exist: a silently shorter set would skew a benchmark."""
    folder = Path(folder)
    manifest = folder / "manifest.csv"
    try:
        with manifest.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{folder}: cannot read a synth manifest.csv ({exc})") from exc
    if not rows or not {"image", "mask"} <= set(rows[0]):
        raise DataError(f"{manifest}: needs 'image' and 'mask' columns and at least one row")
    samples = []
    for row in rows:
        image, mask = folder / row["image"], folder / row["mask"]
        for path in (image, mask):
            if not path.is_file():
                raise DataError(f"{manifest}: lists {path}, which does not exist")
        samples.append(Sample(image, DEFECT, mask, f"synthetic:{folder.name}"))
    return samples


def _require_images(folder: Path, what: str) -> list[Path]:
    images = list_images(folder)
    if not images:
        raise DataError(f"{folder}: no images ({what}); expected {', '.join(IMAGE_EXTENSIONS)}")
    return images


# --- MVTec AD --------------------------------------------------------------------------------


def _is_mvtec_category(path: Path) -> bool:
    return (path / "train" / "good").is_dir() and (path / "test").is_dir()


def _detect_mvtec(path: Path) -> bool:
    return _is_mvtec_category(path) or any(
        _is_mvtec_category(p) for p in path.iterdir() if p.is_dir()
    )


def _load_mvtec(path: Path, options: LayoutOptions) -> Dataset:
    if not _is_mvtec_category(path):
        categories = sorted(p.name for p in path.iterdir() if p.is_dir() and _is_mvtec_category(p))
        if options.category is None:
            raise DataError(
                f"{path}: MVTec AD root with categories {categories}; choose one with --category"
            )
        if options.category not in categories:
            raise DataError(f"{path}: no MVTec category {options.category!r}; have {categories}")
        path = path / options.category
    train = [Sample(p, NORMAL) for p in _require_images(path / "train" / "good", "train/good")]
    test: list[Sample] = []
    for type_dir in sorted(p for p in (path / "test").iterdir() if p.is_dir()):
        for image in list_images(type_dir):
            if type_dir.name == "good":
                test.append(Sample(image, NORMAL))
                continue
            mask = path / "ground_truth" / type_dir.name / f"{image.stem}_mask.png"
            test.append(
                Sample(image, DEFECT, mask if mask.is_file() else None, defect_type=type_dir.name)
            )
    if not test:
        raise DataError(f"{path / 'test'}: no test images")
    return Dataset(
        root=path,
        layout="mvtec",
        samples=train + test,
        category=path.name,
        predefined={"train": train, "test": test},
    )


# --- magnetic tile ---------------------------------------------------------------------------


def _detect_magnetic_tile(path: Path) -> bool:
    return (path / "MT_Free" / "Imgs").is_dir()


def _load_magnetic_tile(path: Path, options: LayoutOptions) -> Dataset:
    """``MT_<Class>/Imgs/X.jpg`` images with ``X.png`` masks beside them; MT_Free is normal."""
    samples: list[Sample] = []
    for class_dir in sorted(p for p in path.glob("MT_*") if (p / "Imgs").is_dir()):
        kind = class_dir.name.removeprefix("MT_")
        images = [p for p in list_images(class_dir / "Imgs") if p.suffix.lower() == ".jpg"]
        for image in images:
            mask = image.with_suffix(".png")
            if kind == "Free":
                samples.append(Sample(image, NORMAL))
            else:
                samples.append(
                    Sample(image, DEFECT, mask if mask.is_file() else None, defect_type=kind)
                )
    if not samples:
        raise DataError(f"{path}: magnetic-tile layout but no MT_*/Imgs/*.jpg images")
    return Dataset(root=path, layout="magnetic-tile", samples=samples)


# --- ELPV ------------------------------------------------------------------------------------


def elpv_root() -> Path:
    """Folder of the installed ``elpv-dataset`` package's data (labels.csv, images/)."""
    try:
        import elpv_dataset
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise DataError("the ELPV dataset needs the package: pip install elpv-dataset") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def _detect_elpv(path: Path) -> bool:
    return (path / "labels.csv").is_file() and (path / "images").is_dir()


def _load_elpv(path: Path, options: LayoutOptions) -> Dataset:
    """Probability 0 → normal, 1 → defect; 1/3 and 2/3 are uncertain unless asked for."""
    samples: list[Sample] = []
    with open(path / "labels.csv", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3:
                raise DataError(
                    f"{path / 'labels.csv'}:{line_no}: expected 'path probability type'"
                )
            rel, prob_text, module_type = parts
            prob = float(prob_text)
            if prob == 0.0:
                label = NORMAL
            elif prob == 1.0 or (options.include_uncertain and prob > 0):
                label = DEFECT
            else:
                label = UNCERTAIN
            samples.append(
                Sample(
                    path / rel,
                    label,
                    defect_type="good" if label == NORMAL else "defective",
                    group=module_type,
                    probability=prob,
                )
            )
    return Dataset(root=path, layout="elpv", samples=samples)


# --- plain folders ---------------------------------------------------------------------------


def _subdirs(path: Path, names: tuple[str, ...]) -> list[Path]:
    wanted = {n.lower() for n in names}
    return sorted(p for p in path.iterdir() if p.is_dir() and p.name.lower() in wanted)


def _detect_folder(path: Path) -> bool:
    return bool(_subdirs(path, NORMAL_DIR_NAMES) or _subdirs(path, DEFECT_DIR_NAMES))


def is_mask_name(stem: str) -> bool:
    """File stems that name masks by convention (``<stem>_mask``, ``_gt``, ``_label``)."""
    return any(stem.endswith(s) for s in MASK_SUFFIXES if s)


def _find_mask(image: Path, mask_dirs: list[Path], suffixes: tuple[str, ...]) -> Path | None:
    for folder in [*mask_dirs, image.parent]:
        for suffix in suffixes:
            if folder == image.parent and suffix == "":
                continue
            for ext in IMAGE_EXTENSIONS:
                candidate = folder / f"{image.stem}{suffix}{ext}"
                if candidate.is_file():
                    return candidate
    return None


def _load_folder(path: Path, options: LayoutOptions) -> Dataset:
    """``normal/`` and ``defect/`` folders (optionally one sub-folder per defect type).

    Masks are found by stem in a mask folder (``masks/``, ``ground_truth/``...; sub-folders
    per type allowed) or beside the image as ``<stem>_mask.<ext>``.
    """
    normal_dirs = (
        [path / d for d in options.normal_dirs]
        if options.normal_dirs
        else _subdirs(path, NORMAL_DIR_NAMES)
    )
    defect_dirs = (
        [path / d for d in options.defect_dirs]
        if options.defect_dirs
        else _subdirs(path, DEFECT_DIR_NAMES)
    )
    for d in [*normal_dirs, *defect_dirs]:
        if not d.is_dir():
            raise DataError(f"{d}: folder does not exist")
    mask_root = [path / options.mask_dir] if options.mask_dir else _subdirs(path, MASK_DIR_NAMES)
    mask_dirs = [m for root in mask_root for m in [root, *sorted(root.rglob("*"))] if m.is_dir()]
    suffixes = (options.mask_suffix,) if options.mask_suffix is not None else MASK_SUFFIXES

    def images_in(folder: Path) -> list[tuple[Path, str]]:
        found = [(p, "") for p in list_images(folder)]
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            found += [(p, sub.name) for p in list_images(sub)]
        return [(p, t) for p, t in found if not is_mask_name(p.stem)]

    samples = [Sample(p, NORMAL) for d in normal_dirs for p, _ in images_in(d)]
    for d in defect_dirs:
        for image, sub in images_in(d):
            samples.append(
                Sample(image, DEFECT, _find_mask(image, mask_dirs, suffixes), sub or d.name)
            )
    if not samples:
        searched = ", ".join(str(d) for d in normal_dirs + defect_dirs)
        raise DataError(f"{path}: folder layout but no images in {searched}")
    return Dataset(root=path, layout="folder", samples=samples)


LAYOUTS: dict[str, tuple[Callable[[Path], bool], Callable[[Path, LayoutOptions], Dataset]]] = {
    "mvtec": (_detect_mvtec, _load_mvtec),
    "magnetic-tile": (_detect_magnetic_tile, _load_magnetic_tile),
    "elpv": (_detect_elpv, _load_elpv),
    "folder": (_detect_folder, _load_folder),
}


def resolve_data_path(path: str | Path) -> Path:
    """``elpv`` names the bundled ELPV data; anything else is a folder that must exist."""
    if str(path).lower() == "elpv":
        return elpv_root()
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"{resolved}: folder does not exist")
    if not resolved.is_dir():
        raise DataError(f"{resolved}: is a file; give the dataset's folder")
    return resolved.resolve()


def detect_layout(path: Path) -> str:
    for name, (detect, _) in LAYOUTS.items():
        if detect(path):
            return name
    raise DataError(
        f"{path}: no known dataset layout. Expected one of: MVTec AD (<category>/train/good, "
        "test/<type>, ground_truth/<type>/<stem>_mask.png); folder (normal/ and defect/ "
        "sub-folders, masks in masks/ or as <stem>_mask.png); magnetic tile (MT_Free/Imgs, "
        "MT_<type>/Imgs); ELPV (labels.csv + images/, or the word 'elpv')"
    )


def load_dataset(
    path: str | Path, layout: str = "auto", options: LayoutOptions | None = None
) -> Dataset:
    """Load a dataset folder (or ``'elpv'``), detecting its layout unless one is named."""
    options = options or LayoutOptions()
    root = resolve_data_path(path)
    if layout == "auto":
        named = options.normal_dirs or options.defect_dirs
        layout = "folder" if named else detect_layout(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    dataset = LAYOUTS[layout][1](root, options)
    if not dataset.samples:
        raise DataError(f"{root}: dataset is empty")
    return dataset
