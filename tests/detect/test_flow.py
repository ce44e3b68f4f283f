"""FastFlow-style flow: exact invertibility and log-determinant, maximum-likelihood training,
anomaly separation, NLL and gradient maps, checkpoints and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab.detect.flow import ActNorm, Flow, FlowConfig, ScaleFlow, location_nll
from defectlab.errors import CheckpointError
from defectlab.runs import load_checkpoint, restore_model, save_checkpoint
from defectlab.training import fit
from tests.conftest import striped_normals, to_nchw, with_square

SIZE = 64
SMALL = {"flow_steps": 4, "lr": 2e-3}
SQUARE = (36, 16, 12)  # top, left, side of the synthetic defect


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**overrides) -> Flow:
    torch.manual_seed(0)
    return Flow(FlowConfig(**(SMALL | {"epochs": 4} | overrides)), image_size=SIZE)


def _fit(model: Flow, run_dir: Path, n: int = 32, **kwargs) -> list[dict]:
    return fit(model, striped_normals(n), run_dir=run_dir, batch_size=8, progress=False, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Flow, list[dict]]:
    model = _model(epochs=8)
    history = _fit(model, tmp_path_factory.mktemp("flow"))
    return model, history


def _randomised_flow(channels: int, steps: int, seed: int = 0) -> ScaleFlow:
    """A flow whose couplings are not the identity (the last subnet convs start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    flow = ScaleFlow(channels, steps, 1.0, "alternate", 2.0, generator)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    for module in flow.modules():
        if isinstance(module, ActNorm):
            module.initialized.fill_(True)
    return flow.eval()


def test_flow_is_invertible() -> None:
    flow = _randomised_flow(channels=7, steps=4).double()  # odd channel count: uneven split
    x = torch.randn(2, 7, 5, 6, dtype=torch.float64)
    z, logdet = flow(x)
    assert z.shape == x.shape and logdet.shape == (2, 5, 6)
    assert not torch.allclose(z, x, atol=0.1)  # a real transformation
    assert torch.allclose(flow.inverse(z), x, atol=1e-9)
    assert torch.allclose(flow(flow.inverse(x))[0], x, atol=1e-9)


def test_log_determinant_matches_the_brute_force_jacobian() -> None:
    flow = _randomised_flow(channels=4, steps=3, seed=1).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(
        lambda v: flow(v.view(1, 4, 3, 3))[0].flatten(), x.flatten()
    )
    sign, brute = torch.linalg.slogdet(jacobian)  # sign ±1: the permutations flip it
    _, logdet = flow(x)
    assert sign.abs() == 1
    assert abs(brute.item()) > 0.5  # not a trivial volume-preserving map
    assert torch.allclose(logdet.sum(), brute, atol=1e-8)
    # the per-location NLL sums (times C) to the exact NLL of the whole feature map
    z, _ = flow(x)
    exact = 0.5 * (z**2).sum() + 0.5 * z.numel() * np.log(2 * np.pi) - brute
    assert torch.allclose(location_nll(z, logdet).sum() * 4, exact, atol=1e-8)


def test_actnorm_initialises_to_unit_statistics_on_the_first_batch() -> None:
    norm = ActNorm(3)
    x = 5 + 3 * torch.randn(4, 3, 8, 8)
    y, logdet = norm(x)
    assert bool(norm.initialized)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert torch.allclose(logdet, norm.log_scale.sum().expand(4, 8, 8))
    scale = norm.log_scale.detach().clone()
    norm(x + 100)  # initialised once only
    assert torch.equal(norm.log_scale, scale)


def test_training_increases_the_likelihood_of_normal_features(trained, tmp_path: Path) -> None:
    model, history = trained
    assert {"loss", "nll_s8", "nll_s16"} <= history[0].keys()
    first, last = history[0]["loss"], np.mean([r["loss"] for r in history if r["epoch"] == 8])
    assert last < first - 0.3
    held_out = to_nchw(striped_normals(16, seed=7))
    short = _model(epochs=1)
    _fit(short, tmp_path)
    assert model.log_likelihood(held_out).mean() > short.log_likelihood(held_out).mean() + 0.2


def test_separates_an_obvious_anomaly_and_localises_it(trained) -> None:
    model, _ = trained
    normals = striped_normals(8, seed=3)
    with torch.inference_mode():  # as the API calls it
        good = model.predict(to_nchw(normals))
        bad = model.predict(to_nchw(with_square(normals, *SQUARE)))
    assert good.maps.shape == (8, SIZE, SIZE) and good.scores.shape == (8,)
    assert bad.scores.min() > good.scores.max()
    top, left, side = SQUARE
    inside = bad.maps[:, top : top + side, left : left + side].mean()
    outside = bad.maps.clone()
    outside[:, top - 8 : top + side + 8, left - 8 : left + side + 8] = float("nan")
    assert inside > outside.nanmean() + 1.0  # nats per channel
    assert inside > good.maps[:, top : top + side, left : left + side].mean() + 1.0


def test_gradient_map_has_image_size_and_peaks_near_the_defect(trained) -> None:
    model, _ = trained
    gradient = Flow(FlowConfig(**(SMALL | {"epochs": 8, "map": "gradient"})), image_size=SIZE)
    gradient.load_state_dict(model.state_dict())
    images = to_nchw(with_square(striped_normals(6, seed=4), *SQUARE))
    with torch.inference_mode():  # the gradient branch must work under inference mode
        out = gradient.predict(images)
    assert out.maps.shape == (6, SIZE, SIZE)
    assert torch.isfinite(out.maps).all() and (out.maps >= 0).all()
    # classification is by likelihood in both modes
    assert torch.allclose(out.scores, model.predict(images).scores)
    top, left, side = SQUARE
    margin = 6
    for m in out.maps:
        y, x = np.unravel_index(int(m.argmax()), m.shape)
        assert top - margin <= y < top + side + margin and left - margin <= x < left + side + margin
    region = out.maps[:, top - 2 : top + side + 2, left - 2 : left + side + 2].mean()
    assert region > 2 * out.maps.mean()


def test_gradient_map_equals_autograd_of_the_total_nll(trained) -> None:
    model, _ = trained
    gradient = Flow(
        FlowConfig(**(SMALL | {"epochs": 8, "map": "gradient", "map_sigma": 0.0})),
        image_size=SIZE,
    )
    gradient.load_state_dict(model.state_dict())
    image = to_nchw(with_square(striped_normals(1, seed=5), *SQUARE)).double()
    gradient.features.double()
    gradient.flows.double()
    maps = gradient.predict(image).maps[0]

    def total(img: torch.Tensor) -> float:
        with torch.no_grad():
            return float(sum(n.sum() for n in gradient._scale_nll(img)))

    # central finite differences of the total NLL (tiny steps: ReLU6 kinks are nearby)
    eps = 1e-7
    for y, x in [(5, 5), (30, 50), (40, 20)]:
        plus, minus = image.clone(), image.clone()
        plus[0, 0, y, x] += eps
        minus[0, 0, y, x] -= eps
        numeric = (total(plus) - total(minus)) / (2 * eps)
        assert abs(abs(numeric) - maps[y, x].item()) < 1e-3 * abs(numeric), (y, x)


def test_save_load_gives_identical_scores(trained, tmp_path: Path) -> None:
    model, _ = trained
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    clone = Flow(model.config, image_size=SIZE)
    with pytest.raises(RuntimeError, match="before fit"):
        clone.predict(torch.rand(1, 1, SIZE, SIZE))
    restore_model(load_checkpoint(path, "flow"), clone, path)
    images = to_nchw(with_square(striped_normals(4, seed=6), *SQUARE))
    a, b = model.predict(images), clone.predict(images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    other = Flow(FlowConfig(**(SMALL | {"flow_steps": 2})), image_size=SIZE)
    with pytest.raises(CheckpointError, match="do not fit"):
        restore_model(load_checkpoint(path), other, path)


def test_interrupted_training_resumes_to_the_same_result(tmp_path: Path, monkeypatch) -> None:
    reference = _model(epochs=2)
    ref_history = _fit(reference, tmp_path / "ref", n=24, checkpoint_every=2)

    calls = {"n": 0}
    original = Flow.training_step

    def interrupted_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Flow, "training_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(epochs=2), tmp_path / "run", n=24, checkpoint_every=2)
    monkeypatch.setattr(Flow, "training_step", original)
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", "flow")
    # 3 steps per epoch; checkpoints at steps 2, 3 (epoch end) and 4; died in step 5
    assert saved["training"]["global_step"] == 4 and saved["training"]["step"] == 1

    torch.manual_seed(123)  # a fresh process would initialise the networks differently
    resumed = Flow(FlowConfig(**(SMALL | {"epochs": 2})), image_size=SIZE)
    history = _fit(resumed, tmp_path / "run", n=24, checkpoint_every=2, resume=True)
    assert [r["loss"] for r in history] == [r["loss"] for r in ref_history]
    for key, value in reference.flows.state_dict().items():
        assert torch.equal(value, resumed.flows.state_dict()[key]), key
    images = to_nchw(with_square(striped_normals(3, seed=8), *SQUARE))
    assert torch.equal(reference.predict(images).scores, resumed.predict(images).scores)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="map must be one of"):
        FlowConfig(map="heat")
    with pytest.raises(ValueError, match="strictly increasing"):
        FlowConfig(feature_blocks=(10, 4))
    with pytest.raises(ValueError, match="0-15"):
        FlowConfig(feature_blocks=(4, 16))
    with pytest.raises(ValueError, match="flow_steps"):
        FlowConfig(flow_steps=0)
    with pytest.raises(ValueError, match="score_top_fraction"):
        FlowConfig(score_top_fraction=0.0)
