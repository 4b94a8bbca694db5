"""PyTorch model of FewShotContrastive: backbone, Gaussian scoring and anomaly map."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin
from anomalib.models.components.filters import GaussianBlur2d
from anomalib.models.image.patchcore.torch_model import PatchcoreModel

from fsad_anomalib.backbones.features import patch_and_global, patch_features
from fsad_anomalib.models.components.feature_extractor import build_feature_extractor, features_until
from fsad_anomalib.models.components.gaussian import fit_gaussian, mahalanobis
from fsad_anomalib.models.components.sampling import greedy_coreset
from fsad_anomalib.models.components.views import fit_views

logger = logging.getLogger(__name__)

__all__ = ["SCORE_MODES", "FewShotContrastiveModel", "NotFittedError"]

SCORE_MODES = ("combined", "patch", "global", "knn", "knn_patch")
KNN_MODES = ("knn", "knn_patch")


def _gaussian_map(patch: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of every location of ``patch`` ``(B, C, h, w)`` to a Gaussian, as ``(B, 1, h, w)``."""
    b, c, h, w = patch.shape
    return mahalanobis(patch.permute(0, 2, 3, 1).reshape(b, h * w, c), mean, precision).reshape(b, 1, h, w)


class NotFittedError(RuntimeError):
    """Raised when a model that was never fitted is asked to score."""


class FewShotContrastiveModel(DynamicBufferMixin, nn.Module):
    """Backbone + two Gaussians (global embedding and patch features).

    Forward in eval mode takes images in [0, 1] (resized by the pre-processor) and returns an
    ``InferenceBatch`` with ``pred_score`` and ``anomaly_map``. Normalisation with the backbone's
    mean and std happens inside, so that the synthesis and augmentations work on plain pixels.

    Args:
        backbone (str | nn.Module): timm name, ``offline:<arch>``, ``local-dir:<folder>`` or an ``nn.Module``.
            Defaults to ``"offline:tf_efficientnet_lite0"``.
        pre_trained (bool): Load pretrained weights. Defaults to ``True``.
        layers (Sequence[int | str]): Feature layers (timm ``out_indices`` or names) whose outputs form the patch
            features; the first sets the anomaly map's resolution. Defaults to ``(2, 3)``.
        global_layer (int | str): Layer whose global average pool is the image embedding. Defaults to ``4``.
        score_mode (str): ``patch`` (top-k mean of the patch Mahalanobis map), ``knn`` (each patch's Euclidean
            distance to its nearest neighbour in a coreset of the training patches, PatchCore's scoring),
            ``knn_patch`` (per patch, the geometric mean of both distances), ``global`` (the paper's image-level
            Mahalanobis score) or ``combined`` (global + patch, each divided by its mean on held-out normal
            evidence: leave-one-out over the K images, or over the views when K = 1). Defaults to ``"patch"``.
        blur_sigma (float): Gaussian smoothing of the anomaly map, in input pixels. Defaults to ``4.0``.
        topk_ratio (float): Fraction of the patches whose mean is the image score. Defaults to ``0.01``.
        coreset_ratio (float): ``knn`` modes: fraction of the training patches kept in the memory bank
            (:func:`~fsad_anomalib.models.components.sampling.greedy_coreset`). Defaults to ``0.1``.

    Example:
        >>> import torch
        >>> model = FewShotContrastiveModel(pre_trained=False)
        >>> _ = model.fit(torch.rand(2, 3, 64, 64))
        >>> model.eval()(torch.rand(1, 3, 64, 64)).anomaly_map.shape
        torch.Size([1, 1, 64, 64])
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
        # scale of each part (held-out normal evidence in "combined" mode), to put them on one scale
        self.register_buffer("score_scale", torch.ones(2))
        self.register_buffer("is_fitted", torch.tensor(False))
        # The anomaly map is smoothed at feature resolution (sigma divided by the layer's stride), then
        # upsampled: the same smoothing as a blur at input resolution at a fraction of the cost.
        self.map_stride = self._stride(self.layers[0])
        feature_sigma = blur_sigma / self.map_stride
        self.blur = GaussianBlur2d(sigma=feature_sigma, channels=1) if feature_sigma > 0 else nn.Identity()

    def _stride(self, layer: int | str) -> float:
        """Input pixels per feature-map cell of ``layer``: timm's ``feature_info`` reduction, kept by anomalib."""
        reductions = getattr(self.feature_extractor, "reductions", None)
        if reductions is not None:
            return float(reductions[list(self.feature_extractor.layers).index(layer)])
        # nn.Module backbones (torchvision feature extraction) carry no feature_info: measure it, in eval mode
        # so that the probe leaves the BatchNorm running statistics as they are
        was_training = self.feature_extractor.training
        self.feature_extractor.eval()
        with torch.no_grad():
            probe = self.feature_extractor(torch.zeros(1, 3, 64, 64))[layer]
        self.feature_extractor.train(was_training)
        return 64 / probe.shape[-1]

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
        (:func:`~fsad_anomalib.backbones.features.patch_and_global`).
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
        global_views, patch_views = [], []  # per view: (K, D) embeddings and (K, C, h, w) patch features
        for view in fit_views(images, n_views, hflip, vflip, rot90):
            parts = [self.features(view[start : start + batch_size]) for start in range(0, view.shape[0], batch_size)]
            patch_views.append(torch.cat([patch for patch, _ in parts]))
            global_views.append(torch.cat([emb for _, emb in parts]))
        g = torch.cat(global_views)
        p = torch.cat([patch.permute(0, 2, 3, 1).reshape(-1, patch.shape[1]) for patch in patch_views])
        if p.shape[0] > max_patches:
            p = p[torch.randperm(p.shape[0], device=p.device)[:max_patches]]
        self.global_mean, self.global_precision, g_shrink = fit_gaussian(g)
        self.patch_mean, self.patch_precision, p_shrink = fit_gaussian(p)
        if self.score_mode in KNN_MODES:
            size = max(1, int(p.shape[0] * self.coreset_ratio))
            self.memory_bank = greedy_coreset(p, size)
        self.is_fitted = torch.tensor(True, device=self.is_fitted.device)
        # put the two scores on one scale: in "combined" mode the mean of each on held-out normal evidence, elsewhere
        # (where the scale does not change the ranking) the mean on the (identity) training views
        self.score_scale = torch.ones(2, device=self.score_scale.device)
        held_out = None
        if self.score_mode == "combined":
            held_out = self._held_out_scores(torch.stack(global_views), torch.stack(patch_views), max_patches)
            if held_out is None:  # one image in one view: its other flips and turns are views the fit did not see
                held_out = self._unseen_view_scores(images, hflip, vflip, rot90)
            if held_out is None:
                logger.warning("FewShotContrastive: one image, one view and no flip or turn allowed leave no normal "
                               "evidence to hold out; the combined score's scales come from the training image itself.")
        if held_out is not None:
            g_score, p_score = held_out
        else:
            g_score, p_score = self._scores(images)
        self.score_scale = torch.stack([g_score.mean(), p_score.mean()]).clamp_min(1e-6).to(self.score_scale)
        if self.score_mode in KNN_MODES:  # training patches sit in the bank (distance 0): no scale to take from them
            self.score_scale[1] = 1.0
        self.train(was_training)
        return {"global_shrinkage": g_shrink, "patch_shrinkage": p_shrink, "n_global": g.shape[0], "n_patch": p.shape[0],
                "memory_bank": self.memory_bank.shape[0]}  # fmt: skip

    def _held_out_scores(
        self, global_views: torch.Tensor, patch_views: torch.Tensor, max_patches: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Global and patch Gaussian scores of normal evidence that the Gaussians did not see (leave-one-out).

        A normal image scores low against Gaussians fitted on itself, and the two parts unevenly so: the global
        Gaussian has K * N_A samples in hundreds of dimensions, the patch Gaussian thousands. Each of the K images
        (all its views) is held out in turn, the Gaussians are fitted on the others, and the held-out image's views
        are scored; with K = 1 each view is held out instead.

        Args:
            global_views (torch.Tensor): ``(V, K, D)`` embeddings of the fit's views.
            patch_views (torch.Tensor): ``(V, K, C, h, w)`` patch features of the fit's views.
            max_patches (int): At most this many patches in each leave-one-out patch fit.

        Returns:
            tuple[torch.Tensor, torch.Tensor] | None: The held-out global and patch image scores, or ``None`` for one
            image in one view, which leaves nothing to hold out.
        """
        n_views, k = global_views.shape[:2]
        if k >= 2:  # noqa: PLR2004
            groups = [(slice(None), [i]) for i in range(k)]
        elif n_views >= 2:  # noqa: PLR2004
            groups = [([v], slice(None)) for v in range(n_views)]
        else:
            return None
        g_scores, p_scores = [], []
        for views, images in groups:
            keep = torch.ones(n_views, k, dtype=torch.bool, device=global_views.device)
            keep[views, images] = False
            g_mean, g_precision, _ = fit_gaussian(global_views[keep])
            rest = patch_views[keep].permute(0, 2, 3, 1).reshape(-1, patch_views.shape[2])
            if rest.shape[0] > max_patches:
                rest = rest[torch.linspace(0, rest.shape[0] - 1, max_patches, device=rest.device).long()]
            p_mean, p_precision, _ = fit_gaussian(rest)
            g_scores.append(mahalanobis(global_views[~keep], g_mean, g_precision))
            p_scores.append(self._aggregate(_gaussian_map(patch_views[~keep], p_mean, p_precision)))
        return torch.cat(g_scores), torch.cat(p_scores)

    def _unseen_view_scores(
        self, images: torch.Tensor, hflip: bool, vflip: bool, rot90: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Global and patch scores of the flips and turns of ``images`` that the fit did not use (K = 1, one view)."""
        seen = [images]
        for view in fit_views(images, 8, hflip, vflip, rot90):
            if not any(torch.equal(view, other) for other in seen):
                seen.append(view)
        if len(seen) == 1:
            return None
        scores = [self._scores(view) for view in seen[1:]]
        return torch.cat([g for g, _ in scores]), torch.cat([p for _, p in scores])

    # ------------------------------------------------------------------ score
    def _patch_map(self, patch: torch.Tensor) -> torch.Tensor:
        b, c, h, w = patch.shape
        if self.score_mode not in KNN_MODES or self.memory_bank.shape[0] == 0:
            return _gaussian_map(patch, self.patch_mean, self.patch_precision)
        # anomalib's export-friendly distance (no cdist), batched: (b, h*w, bank size)
        flat = patch.permute(0, 2, 3, 1).reshape(b, h * w, c)
        knn = PatchcoreModel.euclidean_dist(flat, self.memory_bank).min(dim=-1).values.reshape(b, 1, h, w)
        if self.score_mode == "knn":
            return knn
        return (knn * _gaussian_map(patch, self.patch_mean, self.patch_precision)).clamp_min(0).sqrt()

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
