"""MaskGAN: a defect mask from a normal image and noise, then the defect painted inside it, so
every synthetic pair has an exact label.

Importing the package registers ``maskgan``. Modules: :mod:`.model` (config, training,
sampling), :mod:`.networks`, :mod:`.losses`, :mod:`.masks` (object region, mask rule).
"""

from defectlab.synth.maskgan.losses import (
    MASKGAN_LOSSES,
    boundary_loss,
    gan_loss,
    mode_seeking_loss,
)
from defectlab.synth.maskgan.masks import ObjectRule, binarize_mask, object_region
from defectlab.synth.maskgan.model import STAGES, MaskGAN, MaskGANConfig
from defectlab.synth.maskgan.networks import DefectPainter, MaskGenerator, compose

__all__ = [
    "MASKGAN_LOSSES",
    "STAGES",
    "DefectPainter",
    "MaskGAN",
    "MaskGANConfig",
    "MaskGenerator",
    "ObjectRule",
    "binarize_mask",
    "boundary_loss",
    "compose",
    "gan_loss",
    "mode_seeking_loss",
    "object_region",
]
