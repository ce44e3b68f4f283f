from pathlib import Path

import numpy as np
import pytest

from defectlab.data.layouts import DEFECT, NORMAL, UNCERTAIN, LayoutOptions, load_dataset
from defectlab.errors import DataError
from tests.conftest import MAGNETIC_TILE, requires_magnetic_tile, textured, write_image


def test_mvtec_category(mvtec_root: Path) -> None:
    ds = load_dataset(mvtec_root)
    assert ds.layout == "mvtec" and ds.category == "bottle"
    assert len(ds.predefined["train"]) == 12 and len(ds.predefined["test"]) == 8
    defects = ds.defect
    assert len(defects) == 4 and all(s.mask_path and s.mask_path.is_file() for s in defects)
    assert {s.defect_type for s in defects} == {"crack"}


def test_mvtec_root_needs_category(mvtec_root: Path) -> None:
    with pytest.raises(DataError, match="--category"):
        load_dataset(mvtec_root.parent)
    assert load_dataset(mvtec_root.parent, options=LayoutOptions(category="bottle")).category == (
        "bottle"
    )
    with pytest.raises(DataError, match="no MVTec category 'cable'"):
        load_dataset(mvtec_root.parent, options=LayoutOptions(category="cable"))


def test_folder_layout_masks_by_stem_and_sibling(folder_root: Path) -> None:
    ds = load_dataset(folder_root)
    assert ds.layout == "folder"
    assert len(ds.normal) == 20 and len(ds.defect) == 6
    assert all(s.mask_path is not None and s.mask_path.parent.name == "masks" for s in ds.defect)
    # sibling masks: <stem>_mask.png beside the image, and never counted as images
    rng = np.random.default_rng(3)
    sib = folder_root.parent / "sib"
    write_image(sib / "good" / "a.png", textured(rng))
    write_image(sib / "bad" / "b.png", textured(rng))
    write_image(sib / "bad" / "b_mask.png", textured(rng))
    ds = load_dataset(sib)
    assert [s.path.name for s in ds.samples] == ["a.png", "b.png"]
    assert ds.defect[0].mask_path.name == "b_mask.png"


def test_unknown_layout_and_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "random").mkdir()
    with pytest.raises(DataError, match="no known dataset layout"):
        load_dataset(tmp_path / "random")
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_dataset(tmp_path / "empty")


def test_elpv_labels() -> None:
    ds = load_dataset("elpv")
    summary = ds.summary()
    assert (summary["n_normal"], summary["n_defect"], summary["n_uncertain"]) == (1508, 715, 401)
    assert {s.label for s in ds.samples} == {NORMAL, DEFECT, UNCERTAIN}
    assert {s.group for s in ds.samples} == {"mono", "poly"}
    with_uncertain = load_dataset("elpv", options=LayoutOptions(include_uncertain=True))
    assert len(with_uncertain.defect) == 715 + 401


@requires_magnetic_tile
def test_magnetic_tile_counts() -> None:
    ds = load_dataset(MAGNETIC_TILE)
    summary = ds.summary()
    assert summary["layout"] == "magnetic-tile"
    assert (summary["n_normal"], summary["n_defect"], summary["n_defect_with_mask"]) == (
        952,
        392,
        392,
    )
    assert summary["defect_types"] == {
        "Blowhole": 115,
        "Break": 85,
        "Crack": 57,
        "Fray": 32,
        "Uneven": 103,
    }
    assert all(s.path.suffix == ".jpg" for s in ds.samples)
