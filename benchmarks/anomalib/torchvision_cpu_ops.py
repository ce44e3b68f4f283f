"""Let the registry's torchvision import on the CPU torch of the anomalib venv.

The torchvision wheels on PyPI are CUDA builds: their C++ extension ``_C.so`` links
``libtorch_cuda.so``, which the CPU torch (``torch==2.13.0+cpu``) does not have, so it cannot
load. torchvision then imports without its C++ ops (``nms``, ``roi_align``, ...), except that
torchvision 0.28 registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``
unconditionally, and that fails ("operator torchvision::nms does not exist"). This module
declares those two operator schemas, with no kernel, just before torchvision is first imported
and only when ``_C.so`` cannot load; calling them still fails. anomalib's Patchcore and Padim
use none of torchvision's C++ ops (its transforms and models are plain torch).

``benchmarks/anomalib/setup.sh`` copies this file into the venv's site-packages with a
``.pth`` line that imports it at start-up; importing it costs nothing until torchvision is
imported (a meta-path hook), and it does nothing when the extension loads.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES: list = []  # keep the torch.library.Library alive


def _declare_missing_ops() -> None:
    try:
        import torch
    except ImportError:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    extensions = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"))
    if extensions:
        try:
            torch.ops.load_library(str(extensions[0]))
            return  # the ops are there: nothing to do
        except (ImportError, OSError):
            pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _LIBRARIES.append(library)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _declare_missing_ops()
        return None


if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, _BeforeTorchvision())
