"""``memseg``: a head trained on painted defects to turn the novelty of patches into masks.

``synth-unet`` learns what procedurally painted defects look like, and that does not carry
over to real blowholes and cracks (magnetic tile, image AUROC 0.69). ``patchmemory`` knows
what normal patches look like, but its map is a raw distance, not trained to outline
anything. This model joins the two, in the spirit of MemSeg (Yang et al. 2022: the
difference between an image's features and a memory of normal ones, fed to a segmentation
network trained on synthetic anomalies) and DRAEM (Zavrtanik et al. 2021: a discriminative
network given the image and a normality reference):

* **Memory** (first epoch): the patch features of ``patchmemory`` (frozen ImageNet
  EfficientNet-Lite ``backbone``, lite0 by default, its stride 8 and 16 blocks or
  ``feature_blocks``, locally averaged; :class:`~defectlab.components.memory.PatchMemoryBank` with
  the same coreset and RAM budget) of a *memory fold*, a seeded share ``memory_share`` of the
  training images.
* **Head** (every later epoch): on the other training images, defects are painted as for
  ``synth-unet`` (:func:`~defectlab.detect.synthseg.paint_defects`, same curriculum), and
  :class:`MonotoneDistanceHead` learns their masks from the distance of every stride-8
  patch to its nearest memory row: monotone convolutions on the grid (more distance never
  lowers a logit), up-sampled, plus a bounded full-resolution refinement that sees the
  image. Dice + BCE on pixels.
* **Why two folds**: an image whose own patches are in the memory matches them at distance
  zero. Trained on such images the head would learn "any distance at all is a defect", and
  unseen normal images, whose patches are never at distance zero, would light up. The head
  therefore only trains on images outside the memory, exactly the situation of a test image.
* **Why monotone, and why the distance only**: heads that also saw the patch features and
  their residual to the memory, or an unconstrained head on the distance, learned the look of
  painted defects and ranked real magnetic-tile defect pixels *below* normal ones (pixel
  AUROC 0.41–0.45; see the README). Differences from MemSeg: the memory is a PatchCore
  coreset searched patch by patch, not the closest of a few whole memory images, because
  magnetic-tile crops are not aligned; and the head sees only the distance.

Outputs: the map is the defect probability after the refinement; the image score is the mean
of the top ``score_top_fraction`` of the monotone logits (before the refinement, which moves
logits by up to ``refine_range`` on image appearance and made the image ranking worse on
magnetic tile; logits rather than probabilities, which saturate and tie).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from defectlab import distributed
from defectlab.base import Prediction
from defectlab.components.augment import AugmentSettings, augment_pairs
from defectlab.components.features import check_image_size
from defectlab.components.losses import segmentation_loss
from defectlab.components.memory import MemoryBankConfig, PatchMemoryBank, seeded_fold
from defectlab.detect.base import Detector
from defectlab.detect.synthseg import PaintingConfig, paint_defects
from defectlab.errors import TrainingError
from defectlab.ops import top_fraction_mean
from defectlab.registry import register

#: geometric augmentation only: brightness or blur would move every patch away from the
#: memory and teach the head that distance means nothing
_FLIPS = AugmentSettings(
    flip=True, brightness=0.0, contrast=0.0, noise=0.0, blur_probability=0.0, shift=0.0
)


@dataclass
class MemSegConfig(PaintingConfig, MemoryBankConfig):
    #: epoch 1 builds the memory, the others train the head
    epochs: int = 11
    #: seeded share of the training images that form the memory; the rest train the head
    memory_share: float = 0.5
    #: channels of the head's monotone convolutions on the stride-8 grid
    width: int = 32
    #: largest change, in logits, that the full-resolution refinement may make
    refine_range: float = 2.0
    #: AdamW learning rate and weight decay of the head (decay would pull the monotone
    #: layers' log-weights, not their weights, towards 0: off by default)
    lr: float = 1e-3
    weight_decay: float = 0.0
    dice_weight: float = 1.0
    pixel_weight: float = 1.0
    #: image score: mean of this top fraction of each image's pixel logits
    score_top_fraction: float = 0.01
    #: random horizontal and vertical flips of the head's training images
    flip: bool = True

    def __post_init__(self) -> None:
        MemoryBankConfig.__post_init__(self)
        PaintingConfig.__post_init__(self)
        if self.epochs < 2:
            raise ValueError(
                f"memseg needs at least 2 epochs (1 builds the memory), got {self.epochs}"
            )
        if not 0 < self.memory_share < 1:
            raise ValueError(f"memory_share must be in (0, 1), got {self.memory_share}")
        if self.width < 1:
            raise ValueError(f"width must be positive, got {self.width}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("weight_decay", "dice_weight", "pixel_weight", "refine_range"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        if self.dice_weight == 0 and self.pixel_weight == 0:
            raise ValueError("dice_weight and pixel_weight are both 0: nothing to segment")
        if not 0 < self.score_top_fraction <= 1:
            raise ValueError(f"score_top_fraction must be in (0, 1], got {self.score_top_fraction}")


class MonotoneConv2d(nn.Module):
    """A convolution with non-negative weights (the exponential of free parameters): its
    output never decreases when any input grows. Biases are free; they start spread over
    (−``threshold_range``, 0], so that the units after a ReLU switch on at different
    levels of the input."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, threshold_range: float = 0.0
    ) -> None:
        super().__init__()
        fan_in = in_channels * kernel * kernel
        self.padding = kernel // 2
        self.log_weight = nn.Parameter(
            torch.randn(out_channels, in_channels, kernel, kernel) * 0.5 - math.log(fan_in)
        )
        self.bias = nn.Parameter(-threshold_range * torch.rand(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.log_weight.exp(), self.bias, padding=self.padding)


class MonotoneDistanceHead(nn.Module):
    """Defect logits at image size from the memory distance on the stride-8 grid.

    The grid part is monotone: more distance anywhere in a location's neighbourhood never
    lowers its logit. An unconstrained head learns the *shape* of painted defects in the
    distance map (a compact peak over a flat surround) and then ranks real defects, whose
    distance is raised over a wide area, *below* normal surface (magnetic tile: pixel AUROC
    0.43 against 0.83 for the raw distance), and a saturated square below normal stripes.
    A bounded refinement at full resolution, which also sees the image, sharpens the edges
    but can move a logit by at most ``refine_range``.
    """

    def __init__(self, image_channels: int, width: int, refine_range: float) -> None:
        super().__init__()
        self.refine_range = refine_range
        #: typical distance of normal patches (set by :meth:`init_scale`)
        self.register_buffer("distance_scale", torch.ones(()))
        self.grid = nn.Sequential(
            MonotoneConv2d(1, width, 3, threshold_range=3.0),
            nn.ReLU(),
            MonotoneConv2d(width, width, 3),
            nn.ReLU(),
            MonotoneConv2d(width, 1, 1),
        )
        self.refine = nn.Sequential(
            nn.Conv2d(1 + image_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 1, 3, padding=1),
        )

    def init_scale(self, distance: torch.Tensor) -> None:
        """Data-dependent initialisation: divide distances by the median of a first batch,
        so the grid's thresholds start on the scale of the data."""
        self.distance_scale.fill_(float(distance.median().clamp_min(1e-6)))

    def forward(
        self, distance: torch.Tensor, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``distance`` (B, 1, h, w) on the grid, ``images`` (B, C, H, W) → the monotone
        logits up-sampled to (B, 1, H, W), and those logits after the refinement."""
        coarse = self.grid(distance / self.distance_scale)
        upsampled = F.interpolate(
            coarse, size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        if self.refine_range == 0:
            return upsampled, upsampled
        correction = self.refine(torch.cat([upsampled.detach(), 2.0 * images - 1.0], dim=1))
        return upsampled, upsampled + self.refine_range * torch.tanh(correction)


@register
class MemSeg(Detector):
    """A monotone head, trained on painted defects, on the distances to a normal memory."""

    name: ClassVar[str] = "memseg"
    description: ClassVar[str] = (
        "monotone head on the distances to a coreset of normal EfficientNet-Lite patches, "
        "trained on painted defects (MemSeg/DRAEM-style)"
    )
    Config = MemSegConfig
    config: MemSegConfig

    def __init__(self, config: MemSegConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        check_image_size(self.name, self.image_size)
        if self.channels not in (1, 3):
            raise ValueError(f"memseg: images must have 1 or 3 channels, got {self.channels}")
        cfg = self.config
        self.memory_bank = PatchMemoryBank(
            cfg.memory_bank_config(),
            image_size=self.image_size,
            channels=self.channels,
            device=self.device,
        )
        with torch.random.fork_rng(devices=[]):  # the head's initial weights follow the seed
            torch.manual_seed(cfg.seed)
            self.head = MonotoneDistanceHead(self.channels, cfg.width, cfg.refine_range).to(
                self.device
            )
        self.optimizer: torch.optim.Optimizer | None = None
        #: head training steps taken (seeds the painting and drives the curriculum)
        self.step = 0
        self.batch_size: int | None = None
        self.n_train = 0
        self.memory_fold: torch.Tensor | None = None

    # --- training ------------------------------------------------------------------------------
    def setup_training(self, n_train: int) -> None:
        cfg = self.config
        if n_train < 2:
            raise TrainingError(
                f"memseg needs at least 2 training images (a memory fold and a head fold), "
                f"got {n_train}"
            )
        self.n_train = n_train
        n_memory = min(n_train - 1, max(1, round(cfg.memory_share * n_train)))
        self.memory_fold = seeded_fold(n_train, n_memory, cfg.seed)
        self.optimizer = torch.optim.AdamW(
            self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )

    def curriculum_level(self) -> float:
        """0 (easy defects) … 1 (final, subtle ones) at the current head step."""
        if not self.batch_size:
            return self.config.curriculum_level(self.step, 0)
        head_images = self.n_train - int(self.memory_fold.sum())
        per_epoch = math.ceil(self.n_train / self.batch_size)
        # the head sees about head_images / n_train of each batch; batches with none of its
        # images are skipped and do not count as steps
        total = (self.config.epochs - 1) * min(per_epoch, head_images)
        return self.config.curriculum_level(self.step, total)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.optimizer is None or self.memory_fold is None:
            raise RuntimeError("memseg: training step before setup_training")
        if self.batch_size is None:  # of the global batch: a distributed rank sees a share
            self.batch_size = round(distributed.all_sum(batch["image"].shape[0]))
        in_memory = self.memory_fold[batch["index"].cpu()].to(batch["image"].device)
        if self.memory_bank.memory is None:
            if in_memory.any():
                self.memory_bank.add_images(batch["image"][in_memory])
            return {"memory_patches": float(self.memory_bank.patches_seen)}
        images = batch["image"][~in_memory]
        if len(images) == 0:
            return {}
        cfg = self.config
        level = self.curriculum_level()
        images, masks = paint_defects(images, cfg, self.step, level)
        if cfg.flip:
            images, masks = augment_pairs(images, masks, _FLIPS)
        self.head.train()
        distance = self.memory_bank.patch_distances(images)
        if self.step == 0:
            self.head.init_scale(distance)
        _, logits = self.head(distance, images)
        terms = segmentation_loss(
            logits,
            logits.new_zeros(len(images)),
            masks,
            dice_weight=cfg.dice_weight,
            pixel_weight=cfg.pixel_weight,
            classification_weight=0.0,
        )
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        self.step += 1
        return {**{k: float(v.detach()) for k, v in terms.items()}, "curriculum": level}

    def end_epoch(self, epoch: int) -> None:
        # the first epoch fed the memory fold to the pool: the final coreset now, so the
        # head trains against the memory that inference will use
        self.memory_bank.finish_training()

    def finish_training(self) -> None:
        self.memory_bank.finish_training()

    # --- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.memory_bank.memory is not None, "no memory bank")
        images = images.to(self.device).float()
        self.head.eval()
        monotone, logits = self.head(self.memory_bank.patch_distances(images), images)
        scores = top_fraction_mean(monotone[:, 0], self.config.score_top_fraction)
        return Prediction(scores, torch.sigmoid(logits[:, 0]))

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "memory_bank": self.memory_bank.state_dict(),
            "head": {k: v.cpu() for k, v in self.head.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory_bank.load_state_dict(dict(state["memory_bank"]))
        try:
            self.head.load_state_dict(state["head"])
        except RuntimeError as exc:
            raise ValueError(f"memseg: the saved head does not fit this config: {exc}") from exc

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "memory_pool": self.memory_bank.training_state(),
            "step": self.step,
            "batch_size": self.batch_size,
        }
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.memory_bank.load_training_state(state["memory_pool"])
        self.step = int(state["step"])
        size = state.get("batch_size")
        self.batch_size = None if size is None else int(size)
        if "optimizer" in state:
            if self.optimizer is None:
                raise RuntimeError("memseg: load_training_state before setup_training")
            self.optimizer.load_state_dict(state["optimizer"])
