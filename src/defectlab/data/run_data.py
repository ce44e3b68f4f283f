"""A run's data, as a run reads it: the dataset and seeded split its ``data`` settings name,
and its images loaded at its size, channels and budgets. Training, evaluation, export and the
benchmarks all go through these two functions, so they see the same samples."""

from __future__ import annotations

from collections.abc import Sequence

from defectlab.config import DataConfig
from defectlab.data.io import image_limits
from defectlab.data.layouts import Dataset, LayoutOptions, Sample, load_dataset
from defectlab.data.loading import LoadedImages, load_samples, load_tiles
from defectlab.data.splits import Split, make_split


def layout_options(data: DataConfig) -> LayoutOptions:
    """The layout options of a run's ``data`` section."""
    return LayoutOptions(
        category=data.category,
        normal_dirs=data.normal_dirs,
        defect_dirs=data.defect_dirs,
        mask_dir=data.mask_dir,
        mask_suffix=data.mask_suffix,
        include_uncertain=data.include_uncertain,
    )


def dataset_split(data: DataConfig) -> tuple[Dataset, Split]:
    """The dataset that ``data`` (a run config's ``data`` section) names and the seeded
    train/validation/test :class:`~defectlab.data.splits.Split` that training with it makes:
    the same split a run saves as ``split.json``.

    >>> dataset, split = dataset_split(run.config.data)
    >>> split["test"]  # the samples ``evaluate`` scores
    """
    dataset = load_dataset(data.path, data.layout, layout_options(data))
    split = make_split(
        dataset,
        seed=data.split_seed,
        train_fraction=data.train_fraction,
        val_fraction=data.val_fraction,
        defects_per_class=data.defects_per_class,
        val_defects_per_class=data.val_defects_per_class,
    )
    return dataset, split


def load_images(
    samples: Sequence[Sample],
    data: DataConfig,
    desc: str = "loading images",
    progress: bool = False,
) -> LoadedImages:
    """Load samples (e.g. a part of a run's split, ``split["test"]``) as a run with data
    settings ``data`` loads them: at its image size and channel count, within its pixel budget
    and minimum side (other images are skipped and reported). ``desc`` labels the progress bar
    (on stderr, shown when ``progress``)."""
    with image_limits(max_pixels=data.max_pixels, min_side=data.min_side):
        return load_samples(
            samples,
            data.image_size,
            data.channels,
            data.mask_threshold,
            workers=data.workers,
            desc=desc,
            progress=progress,
        )


def load_training_images(
    samples: Sequence[Sample],
    data: DataConfig,
    desc: str = "loading train images",
    progress: bool = False,
) -> LoadedImages:
    """The images a run trains on: with ``data.tile="on"`` overlapping native-resolution
    tiles of ``data.image_size`` (:func:`~defectlab.data.loading.load_tiles`, sampled by
    ``data.split_seed`` beyond the tile budget), else whole images as :func:`load_images`."""
    if data.tile != "on":
        return load_images(samples, data, desc, progress)
    with image_limits(max_pixels=data.max_pixels, min_side=data.min_side):
        return load_tiles(
            samples,
            int(data.image_size),
            int(data.channels),
            data.mask_threshold,
            workers=data.workers,
            desc=desc,
            progress=progress,
            seed=data.split_seed,
        )
