"""The ``arearatio-gcn`` segmenter: segmentation learnt from area ratios alone.

Each training image carries only the *fraction of its area* the target covers (optionally ±
an absolute margin), not a mask. Each training step turns that weak label into per-vertex
pseudo-labels on a superpixel graph:

1. an FCN (:mod:`.networks`) gives a ``feature_dim`` feature per pixel;
2. :func:`~.superpixels.superpixels` clusters the pixels on (feature, position) and
   :func:`~.superpixels.build_graph` makes each superpixel a vertex (its pixels' mean feature,
   through which the gradient reaches the FCN) joined to the superpixels it touches;
3. :class:`~.gcn.GraphConvNet` gives one logit per vertex;
4. :func:`~.pseudolabels.pseudo_labels` re-derives vertex labels at every step from the
   ranking (score plus a decaying novelty prior, :func:`~.pseudolabels.ranking_scores`);
5. the loss is BCE on the pseudo-labelled vertices (area-weighted, class-balanced: the target
   is often a few per cent of the image) plus the squared error of the predicted foreground
   share against the ratio.

``novelty="memory"`` (for training sets that hold normal images): in the first epoch a patch
memory of frozen Lite0 features is built from a seeded share of the normal training images;
from then on each pixel's distance to it is the novelty of the ranking prior and a second
input channel of the FCN, so the trained model keeps it. The memory images are left out of
the graph training: their own patches are in the memory at distance zero.

Training ratios come from ``batch["area_ratio"]``, else from ``batch["mask"]``;
:meth:`AreaRatioGCN.derive_area_ratios` turns masks into ratios once per image, with optional
noise drawn once per image (a person's error on an image does not change between epochs).

Prediction paints each vertex's probability back onto its pixels; a pixel is target when its
vertex's probability is at least 0.5, the point the class-balanced BCE trains around. Measured
choices: ``docs/models/arearatio-gcn.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from defectlab.base import ModelConfig, Prediction
from defectlab.components.memory import PatchMemoryBank, PatchMemoryConfig, seeded_fold
from defectlab.components.networks import (
    ENCODERS,
    check_encoder_input,
    load_network_state,
    network_state,
)
from defectlab.errors import TrainingError
from defectlab.ops import top_fraction_mean
from defectlab.registry import register
from defectlab.segment.arearatio.gcn import GraphConvNet
from defectlab.segment.arearatio.networks import FCN_STRIDE, Lite0PixelFeatureNet, PixelFeatureNet
from defectlab.segment.arearatio.pseudolabels import (
    PSEUDO_LABEL_RULES,
    pseudo_labels,
    ranking_scores,
)
from defectlab.segment.arearatio.superpixels import SuperpixelGraph, build_graph, superpixels
from defectlab.segment.base import Segmenter

NOVELTY = ("colour", "memory")
SCORES = ("top_mean", "max")


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


@dataclass
class AreaRatioConfig(ModelConfig):
    epochs: int = 30
    #: the FCN: "plain" (:class:`PixelFeatureNet`, trained from scratch) or "lite0"
    #: (:class:`Lite0PixelFeatureNet`, a decoder over the frozen ImageNet Lite0)
    encoder: str = "plain"
    #: FCN width: w of the plain FCN's stages w, 2w, 4w; the full-resolution stage of lite0's
    width: int = 24
    #: per-pixel feature dimension (FCN output, GCN input)
    feature_dim: int = 16
    #: superpixels per image (about; the seed grid is rows × cols ≈ n_segments)
    n_segments: int = 64
    #: weight of the position term in the superpixel distance (larger = more compact)
    position_weight: float = 1.0
    #: SLIC iterations
    superpixel_iterations: int = 5
    #: σ of the edge weight exp(-d² / σ²); 0 = the batch's mean squared edge distance
    edge_sigma: float = 0.0
    #: GCN hidden width and number of graph convolutions (2 or 3)
    gcn_hidden: int = 32
    gcn_layers: int = 2
    #: "area" (cumulative vertex area vs ratio × image area) or "count" (ratio × vertex count)
    pseudo_label_rule: str = "area"
    #: absolute margin on the ratio when the batch has no ``area_margin``; the band
    #: [r − m, r + m] is ignored
    area_margin: float = 0.02
    #: multiplicative noise on mask-derived ratios: r × U(1 − n, 1 + n), clipped to [0, 1],
    #: one draw per image (:meth:`AreaRatioGCN.derive_area_ratios`)
    ratio_noise: float = 0.0
    #: seed of the ratio-noise draws
    noise_seed: int = 0
    #: weight each pseudo-labelled vertex's BCE by its area
    area_weighted_loss: bool = True
    #: give target and background pseudo-labels equal total weight in the BCE (targets are
    #: usually a small share of the image)
    balance_classes: bool = True
    #: weight of (predicted foreground share − ratio)²; 0 = pseudo-label BCE only
    area_loss_weight: float = 1.0
    #: weight of the vertex novelty (feature distance from the image mean) in the
    #: pseudo-label ranking at the first step; 0 = rank by score alone (the seed's rule)
    novelty_prior: float = 1.0
    #: training steps over which the novelty prior decays linearly to 0
    prior_steps: int = 200
    #: what "novel" means: "colour" (distance of a vertex's mean colour from the image's) or
    #: "memory" (distance of its Lite0 patches to a memory of normal training patches, which
    #: is then also an input channel of the FCN; needs normal images in the training set)
    novelty: str = "colour"
    #: "memory": seeded share of the normal training images that form the memory (they
    #: build it in the first epoch and are left out of the graph training after it)
    memory_share: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: image score: "top_mean" (mean of the map's top share) or "max"
    score: str = "top_mean"
    score_top_fraction: float = 0.01

    def __post_init__(self) -> None:
        for name in ("epochs", "width", "feature_dim", "gcn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.n_segments < 2:
            raise ValueError(f"n_segments must be >= 2, got {self.n_segments}")
        if self.gcn_layers not in (2, 3):
            raise ValueError(f"gcn_layers must be 2 or 3, got {self.gcn_layers}")
        if self.superpixel_iterations < 0:
            raise ValueError(
                f"superpixel_iterations must be >= 0, got {self.superpixel_iterations}"
            )
        if self.position_weight < 0:
            raise ValueError(f"position_weight must be >= 0, got {self.position_weight}")
        if self.edge_sigma < 0:
            raise ValueError(f"edge_sigma must be >= 0, got {self.edge_sigma}")
        if self.pseudo_label_rule not in PSEUDO_LABEL_RULES:
            raise ValueError(
                f"pseudo_label_rule must be one of {PSEUDO_LABEL_RULES}, "
                f"got {self.pseudo_label_rule!r}"
            )
        if not 0 <= self.area_margin < 0.5:
            raise ValueError(f"area_margin must be in [0, 0.5), got {self.area_margin}")
        if not 0 <= self.ratio_noise < 1:
            raise ValueError(f"ratio_noise must be in [0, 1), got {self.ratio_noise}")
        if self.novelty_prior < 0:
            raise ValueError(f"novelty_prior must be >= 0, got {self.novelty_prior}")
        if self.novelty not in NOVELTY:
            raise ValueError(f"novelty must be one of {NOVELTY}, got {self.novelty!r}")
        if not 0 < self.memory_share < 1:
            raise ValueError(f"memory_share must be in (0, 1), got {self.memory_share}")
        if self.novelty == "memory" and self.epochs < 2:
            raise ValueError("novelty='memory' needs at least 2 epochs (1 builds the memory)")
        if self.prior_steps < 0:
            raise ValueError(f"prior_steps must be >= 0, got {self.prior_steps}")
        if self.area_loss_weight < 0:
            raise ValueError(f"area_loss_weight must be >= 0, got {self.area_loss_weight}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if not 0 < self.score_top_fraction <= 1:
            raise ValueError(f"score_top_fraction must be in (0, 1], got {self.score_top_fraction}")


@register
class AreaRatioGCN(Segmenter):
    name: ClassVar[str] = "arearatio-gcn"
    onnx_blocker: ClassVar[str | None] = (
        "superpixel clustering and graph construction are iterative and data-dependent per "
        "image (NumPy/SciPy), which a static graph cannot express"
    )
    #: the API passes per-image ``area_ratio``/``area_margin`` (from a CSV) in the batches
    learns_from_area_ratios: ClassVar[bool] = True
    description: ClassVar[str] = (
        "weak segmentation from area ratios: FCN features, superpixel graph, GCN pseudo-labels"
    )
    Config = AreaRatioConfig
    config: AreaRatioConfig

    def __init__(self, config: AreaRatioConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        if self.image_size < FCN_STRIDE or self.image_size % FCN_STRIDE:
            raise ValueError(
                f"{self.name}: image_size {self.image_size} must be a multiple of the FCN "
                f"stride {FCN_STRIDE}"
            )
        if cfg.n_segments > self.image_size**2:
            raise ValueError(
                f"n_segments {cfg.n_segments} exceeds the {self.image_size**2} pixels of an image"
            )
        #: novelty="memory": normal patches of the memory fold, and the typical distance that
        #: scales the distance channel (set at the first graph step)
        self.memory_bank: PatchMemoryBank | None = None
        self.distance_scale = 1.0
        self.memory_fold: torch.Tensor | None = None
        if cfg.novelty == "memory":
            self.memory_bank = PatchMemoryBank(
                PatchMemoryConfig(),
                image_size=self.image_size,
                channels=self.channels,
                device=self.device,
            )
        extra = 1 if self.memory_bank is not None else 0
        self.fcn: PixelFeatureNet | Lite0PixelFeatureNet
        if cfg.encoder == "lite0":
            check_encoder_input(self.name, cfg.encoder, self.image_size, self.channels)
            self.fcn = Lite0PixelFeatureNet(
                self.channels, extra, cfg.width, cfg.feature_dim, self.device
            )
        else:
            self.fcn = PixelFeatureNet(self.channels + extra, cfg.width, cfg.feature_dim).to(
                self.device
            )
        self.gcn = GraphConvNet(cfg.feature_dim, cfg.gcn_hidden, cfg.gcn_layers).to(self.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self._steps_done = 0

    def prior_weight(self) -> float:
        """Weight of the novelty prior in the pseudo-label ranking now: ``novelty_prior``,
        decaying linearly to 0 over ``prior_steps`` training steps."""
        cfg = self.config
        if cfg.prior_steps == 0:
            return 0.0
        return cfg.novelty_prior * max(0.0, 1.0 - self._steps_done / cfg.prior_steps)

    # --- graph forward ---------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"{self.name}: expected images (B, {self.channels}, H, W), got "
                f"{tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h % FCN_STRIDE or w % FCN_STRIDE:
            raise ValueError(
                f"{self.name}: image size {h}×{w} is not divisible by the FCN stride {FCN_STRIDE}"
            )
        return images.to(self.device).float()

    def raw_distance(self, images: torch.Tensor) -> torch.Tensor:
        """novelty="memory": each pixel's (bilinearly up-sampled) distance of its Lite0 patch
        to the nearest normal memory patch (B, 1, H, W); fixed, so no gradients."""
        if self.memory_bank is None:
            raise RuntimeError(f"{self.name}: raw_distance needs novelty='memory'")
        distance = self.memory_bank.patch_distances(images)
        return F.interpolate(distance, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def graph_forward(
        self, images: torch.Tensor
    ) -> tuple[SuperpixelGraph, torch.Tensor, torch.Tensor | None]:
        """Images → superpixel graph, vertex logits (N,) (grad-enabled if the caller is) and,
        with novelty="memory", the scaled distance map (B, 1, H, W) the FCN also saw."""
        cfg = self.config
        distance = None
        if self.memory_bank is not None:
            distance = self.raw_distance(images) / self.distance_scale
            images = torch.cat([images, distance], dim=1)
        features = self.fcn(images)
        labels = superpixels(
            features, cfg.n_segments, cfg.position_weight, cfg.superpixel_iterations
        )
        graph = build_graph(labels, features, cfg.edge_sigma)
        vertex_scores = self.gcn(graph.vertex_features, graph.edge_index, graph.edge_weight)
        return graph, vertex_scores, distance

    # --- training --------------------------------------------------------------------------
    def setup_training(self, n_train: int) -> None:
        if self.memory_bank is not None:
            count = round(self.config.memory_share * n_train)
            self.memory_fold = seeded_fold(n_train, count, self.config.noise_seed)
        trainable = [p for p in (*self.fcn.parameters(), *self.gcn.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            trainable,
            lr=self.config.lr,
            weight_decay=self.config.weight_decay,
        )

    def derive_area_ratios(self, masks: Any) -> np.ndarray:
        """Area ratios (N,) float32 of masks (N, H, W), each times its own fixed
        U(1 − ``ratio_noise``, 1 + ``ratio_noise``) factor (clipped to [0, 1]) drawn from
        ``noise_seed``: the same masks in the same order always get the same labels."""
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValueError(f"{self.name}: expected masks (N, H, W), got {masks.shape}")
        ratios = masks.reshape(len(masks), -1).astype(np.float64).mean(axis=1)
        if self.config.ratio_noise > 0:
            n, rng = self.config.ratio_noise, np.random.default_rng(self.config.noise_seed)
            factor = rng.uniform(1 - n, 1 + n, len(ratios))
            ratios = np.clip(ratios * factor, 0.0, 1.0)
        return ratios.astype(np.float32)

    def training_ratios(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Area ratios and margins (B,) on the CPU, float64: ``area_ratio`` as given, else the
        exact share of ``mask``. Noisy ratios must come in as ``area_ratio`` (from
        :meth:`derive_area_ratios`, as :func:`defectlab.api.train` does), fixed per image."""
        b = batch["image"].shape[0]
        if "area_ratio" in batch:
            ratios = torch.as_tensor(batch["area_ratio"]).detach().double().cpu().flatten()
        elif "mask" in batch:
            if self.config.ratio_noise > 0:
                raise ValueError(
                    f"{self.name}: ratio_noise is drawn once per image: pass "
                    "area_ratio=model.derive_area_ratios(masks) with the training data "
                    "instead of masks (defectlab.api.train does this)"
                )
            ratios = batch["mask"].detach().double().cpu().flatten(1).mean(dim=1)
        else:
            raise ValueError(f"{self.name}: a training batch needs 'area_ratio' or 'mask'")
        if ratios.numel() != b:
            raise ValueError(f"area_ratio has {ratios.numel()} values for {b} images")
        bad = ratios[~((ratios >= 0) & (ratios <= 1))]
        if bad.numel():
            raise ValueError(f"area_ratio must be in [0, 1], got {float(bad[0])}")
        if "area_margin" in batch:
            margins = torch.as_tensor(batch["area_margin"]).detach().double().cpu().flatten()
        else:
            margins = torch.full((b,), float(self.config.area_margin), dtype=torch.float64)
        bad = margins[~((margins >= 0) & (margins < 0.5))]
        if margins.numel() != b or bad.numel():
            raise ValueError(f"area_margin must be {b} values in [0, 0.5), got {margins.tolist()}")
        return ratios, margins

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.optimizer is None:
            self.setup_training(0)
        assert self.optimizer is not None
        cfg = self.config
        images = self._check_images(batch["image"])
        ratios, margins = self.training_ratios(batch)
        if self.memory_bank is not None:
            kept = self._memory_step(batch, images)
            if kept is None:
                return {"memory_patches": float(self.memory_bank.patches_seen)}
            if not kept.any():
                return {}
            images, ratios, margins = images[kept.to(images.device)], ratios[kept], margins[kept]
            if self._steps_done == 0:  # the distance channel's scale, from the first batch
                self.distance_scale = float(self.raw_distance(images).median().clamp_min(1e-6))
        self.fcn.train()
        self.gcn.train()
        graph, vertex_scores, distance = self.graph_forward(images)
        novelty = graph.vertex_mean(distance)[:, 0] if distance is not None else None
        ranking = ranking_scores(graph, vertex_scores, self.prior_weight(), images, novelty)
        targets = torch.cat(
            [
                pseudo_labels(
                    ranking[start : start + count],
                    graph.vertex_areas[start : start + count],
                    float(ratios[i]),
                    float(margins[i]),
                    cfg.pseudo_label_rule,
                )
                for i, (start, count) in enumerate(
                    zip(graph.offsets.tolist(), graph.counts.tolist(), strict=True)
                )
            ]
        )
        labelled = targets >= 0
        weights = graph.vertex_areas if cfg.area_weighted_loss else torch.ones_like(vertex_scores)
        weights = weights * labelled
        bce = F.binary_cross_entropy_with_logits(
            vertex_scores, targets.clamp_min(0).float(), reduction="none"
        )
        if cfg.balance_classes:
            positive, negative = targets == 1, targets == 0
            bce = 0.5 * _weighted_mean(bce, weights * positive) + 0.5 * _weighted_mean(
                bce, weights * negative
            )
        else:
            bce = _weighted_mean(bce, weights)
        loss = bce
        terms = {"bce": float(bce.detach())}
        if cfg.area_loss_weight > 0:
            image_index = torch.repeat_interleave(
                torch.arange(len(graph.counts), device=self.device), graph.counts
            )
            covered = torch.zeros(len(graph.counts), device=self.device).index_add(
                0, image_index, torch.sigmoid(vertex_scores) * graph.vertex_areas
            )
            share = covered / (images.shape[-2] * images.shape[-1])
            area_loss = (share - ratios.to(self.device, share.dtype)).pow(2).mean()
            loss = loss + cfg.area_loss_weight * area_loss
            terms["area_loss"] = float(area_loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._steps_done += 1
        return {
            "loss": float(loss.detach()),
            **terms,
            "labelled": float(labelled.float().mean()),
        }

    def _memory_step(
        self, batch: dict[str, torch.Tensor], images: torch.Tensor
    ) -> torch.Tensor | None:
        """novelty="memory": in the first epoch, add the batch's normal memory-fold images to
        the memory and return ``None`` (no graph step); later, the mask (B,) of the images the
        graph trains on: all but those memory images, whose own patches are in the memory
        at distance zero, unlike any image seen at test time."""
        assert self.memory_bank is not None
        if self.memory_fold is None:
            raise RuntimeError(f"{self.name}: training step before setup_training")
        normal = batch["label"].detach().cpu() == 0
        in_memory = normal & self.memory_fold[batch["index"].detach().cpu()]
        if self.memory_bank.memory is None:
            if in_memory.any():
                self.memory_bank.add_images(images[in_memory.to(images.device)])
            return None
        return ~in_memory

    def end_epoch(self, epoch: int) -> None:
        if self.memory_bank is not None and self.memory_bank.memory is None:
            if self.memory_bank.patches_seen == 0:
                raise TrainingError(
                    f"{self.name}: novelty='memory' needs normal (label 0) training images to "
                    "build the memory, and the first epoch saw none"
                )
            self.memory_bank.finish_training()

    # --- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.is_fitted, "untrained networks")
        images = self._check_images(images)
        if self.memory_bank is not None:
            self.check_fitted(self.memory_bank.memory is not None, "no memory bank")
        self.fcn.eval()
        self.gcn.eval()
        graph, vertex_scores, _ = self.graph_forward(images)
        maps = graph.paint(torch.sigmoid(vertex_scores))
        if self.config.score == "max":
            scores = maps.flatten(1).amax(dim=1)
        else:
            scores = top_fraction_mean(maps, self.config.score_top_fraction)
        return Prediction(scores, maps)

    @property
    def decision_thresholds(self) -> tuple[None, float]:
        """The vertex classifier's own pixel threshold, probability 0.5 (module docstring);
        the API's quantile and auto calibrations defer to it. The image threshold (None) stays
        a quantile of normal validation scores: normal images' maps peak high too."""
        return None, 0.5

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The FCN and GCN weights; a Lite0 FCN without its frozen backbone, whose identity
        (package versions, weight-file hash) is stored instead and checked on reload."""
        fcn = (
            network_state(self.fcn)
            if isinstance(self.fcn, Lite0PixelFeatureNet)
            else dict(self.fcn.state_dict())
        )
        state = {"fcn": fcn, "gcn": dict(self.gcn.state_dict())}
        if self.memory_bank is not None:
            state["memory_bank"] = self.memory_bank.state_dict()
            state["distance_scale"] = self.distance_scale
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, module in (("fcn", self.fcn), ("gcn", self.gcn)):
            try:
                if isinstance(module, Lite0PixelFeatureNet):
                    if "backbone" not in state[key]:
                        raise RuntimeError("the checkpoint's FCN is not on the Lite0 encoder")
                    load_network_state(self.name, module, dict(state[key]))
                else:
                    module.load_state_dict(state[key])
            except (KeyError, RuntimeError) as exc:
                raise ValueError(
                    f"{self.name}: {key} weights do not fit this configuration: {exc}"
                ) from exc
        if self.memory_bank is not None:
            if "memory_bank" not in state:
                raise ValueError(f"{self.name}: checkpoint has no memory bank (novelty='memory')")
            self.memory_bank.load_state_dict(dict(state["memory_bank"]))
            self.distance_scale = float(state["distance_scale"])

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps_done": self._steps_done}
        if self.memory_bank is not None:
            state["memory_pool"] = self.memory_bank.training_state()
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._steps_done = int(state["steps_done"])
        if self.memory_bank is not None:
            self.memory_bank.load_training_state(state["memory_pool"])
        if "optimizer" in state:
            if self.optimizer is None:
                self.setup_training(0)
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["optimizer"])
