"""The model contract, checked for every registered model through the real pipeline.

Each trainable model: its config survives a JSON round trip, an unknown ``--set`` key is an
error naming it, inference before training is refused, it trains on a tiny folder dataset
through :func:`defectlab.api.train`, the saved run reloads to identical outputs, a run
interrupted by Ctrl-C and resumed ends where an uninterrupted one does, and it exports to
ONNX or names why it cannot. A new model without an entry in ``SETTINGS`` fails here.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab import api, registry
from defectlab.base import Model, Scorer, Synthesizer
from defectlab.config import restore_tuples
from defectlab.deploy.onnx import export_onnx
from defectlab.errors import ConfigError, NotFittedError
from defectlab.runs import predict_arrays
from tests.conftest import interrupt_on_call, write_folder_dataset

SIZE = 64
COMMON = ["data.defects_per_class=2", "train.batch_size=4", "train.checkpoint_every=1"]
#: small settings per trainable model (``ensemble`` and ``fused`` get their member runs from
#: a fixture)
SETTINGS: dict[str, list[str]] = {
    "ae": ["epochs=2", "width=8", "latent_channels=8"],
    "vae": ["epochs=2", "width=8", "latent_channels=8"],
    "wae": ["epochs=2", "width=8", "latent_channels=8"],
    "canny": [],
    "template": [],
    "pixelstats": [],
    "deepsvdd": ["epochs=2", "features=pixels", "width=8", "depth=2", "rep_dim=16"],
    "mlaae": [
        "epochs=2",
        "input=pixels",
        "width=0.25",
        "low_dim=16",
        "low_hidden=64",
        "high_dim=32",
        "high_hidden=128",
        "disc_hidden=64",
    ],
    "flow": ["epochs=2", "flow_steps=4"],
    "patchmemory": ["memory_bank_size=64", "max_memory_mb=0.3"],
    "padim": ["feature_subset=32"],
    "memseg": ["epochs=2", "width=16", "roi=none", "memory_bank_size=64"],
    "synth-unet": ["epochs=2", "width=8", "cat_channels=8", "roi=none"],
    "synth-unet3plus": ["epochs=2", "width=8", "cat_channels=8", "roi=none"],
    "ensemble": [],
    "fused": [],
    "unet": ["epochs=2", "width=8", "cat_channels=8"],
    "unet3plus": ["epochs=2", "width=8", "cat_channels=8"],
    "cam": ["epochs=2", "width=8", "augment=false"],
    "arearatio-gcn": ["epochs=2", "width=8", "feature_dim=8", "n_segments=32", "gcn_hidden=16"],
    "crossgan": ["epochs=2", "width=4", "content_blocks=1", "detail_dim=4", "disc_layers=2"],
    "cyclegan": ["epochs=2", "width=4", "disc_layers=2"],
    "maskgan": [
        "epochs=2",
        "width=8",
        "mask_blocks=1",
        "image_blocks=1",
        "disc_layers=2",
        "object_margin=2",
    ],
}
TRAINABLE = sorted(e.name for e in registry.available() if issubclass(e.cls, Model))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("contract") / "parts"
    return write_folder_dataset(root, np.random.default_rng(3), 16, 8, size=SIZE)


@pytest.fixture(scope="module")
def member_runs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Trained runs for ``ensemble`` (two detectors) and ``fused`` (the first detector and a
    segmenter)."""
    out = tmp_path_factory.mktemp("members")
    runs = []
    for name, settings in (
        ("pixelstats", []),
        ("template", []),
        ("unet", [*COMMON, *SETTINGS["unet"]]),
    ):
        run = api.train(
            name, dataset, out / name, image_size=SIZE, seed=0, overrides=settings, progress=False
        )
        runs.append(str(run.run_dir))
    return runs


def overrides(name: str, member_runs: list[str] | None = None) -> list[str]:
    extra = []
    if name == "ensemble" and member_runs:
        extra = [f"runs={','.join(member_runs[:2])}"]
    if name == "fused" and member_runs:
        extra = [f"detector_run={member_runs[0]}", f"segmenter_run={member_runs[2]}"]
    return [*COMMON, *SETTINGS[name], *extra]


def test_every_registered_model_is_covered() -> None:
    assert set(TRAINABLE) == set(SETTINGS)
    procedural = [e.cls for e in registry.available() if e.name not in SETTINGS]
    assert all(issubclass(cls, Synthesizer) and not cls.needs_training for cls in procedural)


@pytest.mark.parametrize("name", TRAINABLE)
def test_config_survives_a_json_round_trip(name: str) -> None:
    cls = registry.get(name)
    config = cls.Config()
    stored = json.loads(json.dumps(asdict(config)))
    assert cls.Config(**restore_tuples(stored)) == config


@pytest.mark.parametrize("name", TRAINABLE)
def test_an_unknown_setting_is_named(name: str, dataset: Path) -> None:
    with pytest.raises(ConfigError, match="no_such_setting"):
        api.build_config(name, dataset, overrides=["model.no_such_setting=1"])


@pytest.mark.parametrize("name", sorted(set(TRAINABLE) - {"ensemble", "fused"}))
def test_inference_before_training_is_refused(name: str, dataset: Path) -> None:
    config = api.build_config(name, dataset, image_size=SIZE, overrides=overrides(name))
    cls = registry.get(name)
    model = cls(cls.Config(**restore_tuples(config.model_config)), image_size=SIZE, channels=1)
    assert not model.is_fitted
    if isinstance(model, Scorer):
        with pytest.raises(NotFittedError, match=f"{name}: predict before fit"):
            model.predict(torch.rand(2, 1, SIZE, SIZE))
    else:
        assert isinstance(model, Synthesizer) and not hasattr(model, "predict")
        with pytest.raises(NotFittedError, match=f"{name}: synthesize before fit"):
            model.synthesize(np.zeros((SIZE, SIZE, 1), np.float32), np.random.default_rng(0))


def outputs(model: Model) -> list[np.ndarray]:
    """What a trained model produces for fixed inputs: scores and maps, or a synthetic
    image and mask."""
    rng = np.random.default_rng(7)
    images = rng.random((3, SIZE, SIZE, model.channels)).astype(np.float32)
    if isinstance(model, Scorer):
        return list(predict_arrays(model, images))
    sample = model.synthesize(images[0], np.random.default_rng(0))
    return [sample.image, sample.mask]


@pytest.mark.parametrize("name", TRAINABLE)
def test_train_reload_resume_export(
    name: str,
    dataset: Path,
    member_runs: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = overrides(name, member_runs)

    def train(out: Path, resume: bool = False):
        return api.train(
            name,
            dataset,
            out,
            image_size=SIZE,
            seed=0,
            overrides=settings,
            resume=resume,
            progress=False,
        )

    run = train(tmp_path / "run")
    assert run.model.is_fitted
    expected = outputs(run.model)

    loaded = api.load_run(run.run_dir, "cpu")
    assert loaded.model.is_fitted and loaded.calibration == run.calibration
    for got, want in zip(outputs(loaded.model), expected, strict=True):
        np.testing.assert_array_equal(got, want)

    cls = type(run.model)
    original = interrupt_on_call(monkeypatch, cls, "training_step", 2)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed")
    monkeypatch.setattr(cls, "training_step", original)
    resumed = train(tmp_path / "resumed", resume=True)
    for got, want in zip(outputs(resumed.model), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    blocker = run.model.export_blocker() if isinstance(run.model, Scorer) else "synthesizer"
    if blocker is None:
        exported = export_onnx(run.run_dir, tmp_path / "export")
        assert (tmp_path / "export" / "model.onnx").is_file() and exported["model"] == name
    else:
        with pytest.raises(ConfigError):
            export_onnx(run.run_dir, tmp_path / "export")
