"""Shared building blocks of the model families: feature extractors, patch memory,
encoder/decoder networks, augmentations, losses, GAN layers and defect painting.

Models in ``detect/``, ``segment/`` and ``synth/`` build on these; none imports another family.
"""
