from pathlib import Path

import numpy as np
import pytest

from defectlab.data.layouts import load_dataset
from defectlab.data.splits import Split, make_split
from defectlab.errors import DataError
from tests.conftest import MAGNETIC_TILE, requires_magnetic_tile


def test_split_is_deterministic_disjoint_and_reloadable(folder_root: Path, tmp_path: Path) -> None:
    ds = load_dataset(folder_root)
    a, b = make_split(ds, seed=0), make_split(ds, seed=0)
    assert [s.path for s in a["train"]] == [s.path for s in b["train"]]
    c = make_split(ds, seed=1)
    assert [s.path for s in a["train"]] != [s.path for s in c["train"]]
    parts = [{str(s.path) for s in a[k]} for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(map(len, parts)) == len(ds.samples)
    assert all(s.label == 0 for s in a["train"] + a["val"])
    a.save(tmp_path / "split.json")
    loaded = Split.load(tmp_path / "split.json")
    assert loaded.parts == a.parts and loaded.name == a.name


def test_k_shot_moves_first_k_per_class(folder_root: Path) -> None:
    split = make_split(load_dataset(folder_root), defects_per_class=2)
    assert len(split["train_defect"]) == 2
    assert not {s.path for s in split["train_defect"]} & {s.path for s in split["test"]}
    assert split.name.endswith("2-shot-v1")


def test_mvtec_keeps_its_own_test_set(mvtec_root: Path) -> None:
    split = make_split(load_dataset(mvtec_root))
    assert len(split["train"]) + len(split["val"]) == 12 and len(split["test"]) == 8


@requires_magnetic_tile
def test_standard_magnetic_tile_split_matches_the_data_readme() -> None:
    """MT-normal-only v1: stems sorted, default_rng(0).permutation, first 70% train."""
    split = make_split(load_dataset(MAGNETIC_TILE), seed=0)
    stems = sorted(p.stem for p in (MAGNETIC_TILE / "MT_Free" / "Imgs").glob("*.jpg"))
    order = np.random.default_rng(0).permutation(len(stems))
    expected_train = {stems[i] for i in order[:666]}
    assert {s.stem for s in split["train"] + split["val"]} == expected_train
    counts = split.counts()
    assert counts["test"] == {"normal": 286, "defect": 392}
    assert counts["val"]["normal"] == 100


def test_validation_defects_are_held_out_of_test_and_training(folder_root: Path) -> None:
    split = make_split(load_dataset(folder_root), defects_per_class=1, val_defects_per_class=2)
    train_defect = {s.path for s in split["train_defect"]}
    val_defect = {s.path for s in split["val_defect"]}
    test = {s.path for s in split["test"]}
    assert len(train_defect) == 1 and len(val_defect) == 2
    assert not (val_defect & test or val_defect & train_defect)
    assert {str(p) for p in val_defect} <= split.seen_in_training()
    assert split.name.endswith("1-shot-v1+val2")


def test_predefined_split_refuses_defect_hold_outs(mvtec_root: Path) -> None:
    with pytest.raises(DataError, match="own split"):
        make_split(load_dataset(mvtec_root), val_defects_per_class=1)
