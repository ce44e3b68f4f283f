import numpy as np
import pytest
import torch

from defectlab.detect.pixelstats import PixelStats, PixelStatsConfig


def _normal_batch(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, size).view(1, 1, size, 1)
    return (0.3 + 0.4 * y + 0.02 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)


def test_learns_mean_and_flags_a_bright_spot() -> None:
    model = PixelStats(image_size=32)
    images = _normal_batch(40)
    for chunk in images.split(8):
        model.training_step({"image": chunk})
    model.finish_training()
    assert torch.allclose(model.mean[0, :, 0], 0.3 + 0.4 * torch.linspace(0, 1, 32), atol=0.03)
    test = _normal_batch(2, seed=1)
    test[1, 0, 10:14, 20:24] = 1.0
    out = model.predict(test)
    assert out.maps.shape == (2, 32, 32) and out.scores.shape == (2,)
    assert out.scores[1] > 3 * out.scores[0]
    hot = np.unravel_index(out.maps[1].argmax().item(), (32, 32))
    assert 8 <= hot[0] <= 16 and 18 <= hot[1] <= 26


def test_state_round_trip_and_shape_check() -> None:
    model = PixelStats(image_size=16)
    model.training_step({"image": _normal_batch(4, 16)})
    model.finish_training()
    clone = PixelStats(image_size=16)
    clone.load_state_dict(model.state_dict())
    x = _normal_batch(2, 16, seed=5)
    assert torch.equal(model.predict(x).scores, clone.predict(x).scores)
    with pytest.raises(ValueError, match="shape"):
        PixelStats(image_size=32).load_state_dict(model.state_dict())


def test_predict_before_fit() -> None:
    with pytest.raises(RuntimeError, match="before fit"):
        PixelStats(image_size=16).predict(_normal_batch(1, 16))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="single pass"):
        PixelStatsConfig(epochs=2)
