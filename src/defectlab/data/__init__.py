"""Data layer: image I/O, dataset layouts, splits, resizing and tiling."""

from defectlab.data.io import ImageReadError, read_image, read_mask
from defectlab.data.layouts import (
    DEFECT,
    NORMAL,
    UNCERTAIN,
    Dataset,
    LayoutOptions,
    Sample,
    load_dataset,
)
from defectlab.data.loading import LoadedImages, load_samples
from defectlab.data.splits import Split, make_split

__all__ = [
    "DEFECT",
    "NORMAL",
    "UNCERTAIN",
    "Dataset",
    "ImageReadError",
    "LayoutOptions",
    "LoadedImages",
    "Sample",
    "Split",
    "load_dataset",
    "load_samples",
    "make_split",
    "read_image",
    "read_mask",
]
