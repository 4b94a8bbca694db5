"""PyTorch model of FewShotContrastive: backbone, Gaussian / nearest-neighbour scoring and anomaly map."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin
from anomalib.models.components.filters import GaussianBlur2d
from torch import nn

from fsad_anomalib.backbones.features import patch_and_global, patch_features
from fsad_anomalib.data.views import Views
from fsad_anomalib.models.components.feature_extractor import (
    build_feature_extractor,
    features_until,
    resolve_layers,
    snapped_size,
)
from fsad_anomalib.models.components.gaussian import fit_gaussian, fit_subspace, mahalanobis
from fsad_anomalib.models.components.held_out import (
    FUSIONS,
    KNN_MODES,
    LOCAL_MODES,
    fuse,
    gaussian_map,
    local_map,
    topk_mean,
)
from fsad_anomalib.models.components.sampling import greedy_coreset
from fsad_anomalib.models.few_shot_contrastive.scales import (
    MIN_IMAGES_DEPLOYED_SCALES,
    MIN_IMAGES_LOCAL_ALONE,
    held_out_scales,
    local_alone,
    two_out_level,
)
from fsad_anomalib.models.few_shot_contrastive.self_configuration import candidates_for

__all__ = ["FewShotContrastiveModel", "NotFittedError"]


class NotFittedError(RuntimeError):
    """Raised when a model that was never fitted is asked to score."""


class FewShotContrastiveModel(DynamicBufferMixin, nn.Module):
    """Backbone + Gaussians (global embedding and patch features) and, for ``knn`` scorings, a memory bank.

    Forward in eval mode takes images in [0, 1] (resized by the pre-processor) and returns an ``InferenceBatch``
    with ``pred_score`` and ``anomaly_map``; normalisation with the backbone's mean and std happens inside, so that
    the synthesis and augmentations work on plain pixels.

    The image score fuses two parts, each standardised by its mean and standard deviation on held-out normal
    evidence (leave-one-out over the K images, over their views when K = 1): the **global** Mahalanobis score of the
    image embedding, which sees a whole-image change, and a **local** score, the mean of the top ``topk_ratio`` of a
    patch anomaly map, which sees a small flaw. With ``fine_layers`` the local score reads two scales: the ``layers``
    map and the Mahalanobis map of finer features, each standardised on the held-out normals, averaged. Which local
    scoring and fusion are used is the model's configuration: ``score_mode`` fixes it, or (``"auto"``)
    self-configuration chooses it (:mod:`~fsad_anomalib.models.few_shot_contrastive.self_configuration`).

    Args:
        backbone (str | nn.Module): timm name, ``offline:<arch>``, ``local-dir:<folder>`` or an ``nn.Module``.
            Defaults to ``"offline:tf_efficientnet_lite0"``.
        pre_trained (bool): Load pretrained weights. Defaults to ``True``.
        layers (Sequence[int | str] | None): Feature layers (timm ``out_indices`` or names; a ViT's blocks) whose
            outputs form the patch features; the first sets the anomaly map's resolution. ``None``: the backbone's
            stride-8 and stride-16 stages (a ViT's blocks at half and three quarters of its depth,
            :func:`~fsad_anomalib.backbones.layers.default_layers`). Defaults to ``None``.
        global_layer (int | str | None): Layer whose global average pool (a ViT's mean patch token) is the image
            embedding. ``None``: the last stage or block. Defaults to ``None``.
        fine_layers (Sequence[int | str] | None): Finer layers whose patch Gaussian is the second scale of the local
            score (the first sets the anomaly map's resolution), e.g. ``(1, 2)``; ``None`` or empty: the ``layers``
            scale alone. Defaults to ``None``.
        score_mode (str): ``auto`` (the first of self-configuration's candidates until it chooses), ``combined``
            (patch and global, mean), ``patch`` (the patch Mahalanobis map), ``knn`` (each patch's distance to its
            nearest neighbour in a coreset of the training patches, PatchCore's scoring), ``knn_patch`` (per patch,
            the geometric mean of both distances), ``subspace`` (each patch's residual outside the normals' principal
            subspace, SubspaceAD's scoring) or ``global`` (the paper's image-level Mahalanobis score).
            Defaults to ``"auto"``.
        blur_sigma (float): Gaussian smoothing of the anomaly map, in input pixels. Defaults to ``4.0``.
        topk_ratio (float): Fraction of the patches whose mean is the local image score. Defaults to ``0.01``.
        coreset_ratio (float): ``knn`` scorings: fraction of the training patches kept in the memory bank.
            Defaults to ``0.1``.

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
        layers: Sequence[int | str] | None = None,
        global_layer: int | str | None = None,
        fine_layers: Sequence[int | str] | None = None,
        score_mode: str = "auto",
        blur_sigma: float = 4.0,
        topk_ratio: float = 0.01,
        coreset_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.candidates = candidates_for(score_mode)
        for name, ratio in (("topk_ratio", topk_ratio), ("coreset_ratio", coreset_ratio)):
            if not 0 < ratio <= 1:
                msg = f"{name} must be in (0, 1], got {ratio}."
                raise ValueError(msg)
        self.score_mode, self.topk_ratio, self.coreset_ratio = score_mode, topk_ratio, coreset_ratio
        if isinstance(fine_layers, str):
            msg = f"fine_layers must be a sequence of feature layers or None, got {fine_layers!r}."
            raise ValueError(msg)  # noqa: TRY004 - a bad argument value, reported as the CLI reports the others
        layers, global_layer = resolve_layers(backbone, layers, global_layer, fine_layers)
        self.layers, self.global_layer, self.blur_sigma = list(layers), global_layer, blur_sigma
        self.fine_layers = list(fine_layers or [])
        all_layers = list(dict.fromkeys([*self.layers, *self.fine_layers, global_layer]))
        if all(isinstance(layer, int) for layer in all_layers):  # timm out_indices: shallow to deep
            all_layers = sorted(all_layers)
        self.feature_extractor, mean, std = build_feature_extractor(backbone, all_layers, pre_trained)
        # a ViT takes sides that are multiples of its patch size: other inputs are resized to the nearest ones
        self.input_multiple = int(getattr(self.feature_extractor, "patch_size", 1) or 1)
        dims = dict(zip(self.feature_extractor.layers, self.feature_extractor.out_dims, strict=True))
        self.patch_dim, self.global_dim = sum(dims[layer] for layer in self.layers), dims[global_layer]
        self.fine_dim = sum(dims[layer] for layer in self.fine_layers)
        # the anomaly map is smoothed at feature resolution (sigma divided by the layer's stride), then upsampled:
        # the same smoothing as a blur at input resolution at a fraction of the cost
        feature_sigma = blur_sigma / self._stride((self.fine_layers or self.layers)[0])
        self.blur = GaussianBlur2d(sigma=feature_sigma, channels=1) if feature_sigma > 0 else nn.Identity()
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1))
        # the configuration in use, as indices into LOCAL_MODES and FUSIONS (kept in checkpoints)
        self.register_buffer("configuration", torch.zeros(2, dtype=torch.long))
        self.configure(*self.candidates[0])
        self.register_buffer("global_mean", torch.zeros(self.global_dim))
        self.register_buffer("global_precision", torch.eye(self.global_dim))
        self.register_buffer("patch_mean", torch.zeros(self.patch_dim))
        self.register_buffer("patch_precision", torch.eye(self.patch_dim))
        self.register_buffer("fine_mean", torch.zeros(self.fine_dim))
        self.register_buffer("fine_precision", torch.eye(self.fine_dim))
        # knn scorings: coreset of the training patches (its size follows the checkpoint, see DynamicBufferMixin)
        self.register_buffer("memory_bank", torch.zeros(0, self.patch_dim))
        # where parts are fused (global with local, the two local scales), and the local part alone from K = 2, each
        # is standardised, (score - shift) / scale, by the mean and standard deviation of its scores on held-out
        # normal evidence; otherwise shift 0 and scale 1 (scales.py). Order: global, local, fine
        self.register_buffer("score_shift", torch.zeros(3))
        self.register_buffer("score_scale", torch.ones(3))
        self.register_buffer("is_fitted", torch.tensor(False))
        # the local part's held-out level one step below (fits on K - 2), where the threshold's refits step to the
        # deployed scales (K = 3, 4; scales.stepped_scales); not a buffer: calibration uses it right after the fit
        self.two_out_level: float | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def current(self) -> tuple[str, str]:
        """The configuration in use: (local scoring, fusion)."""
        local, fusion = (int(v) for v in self.configuration)
        return LOCAL_MODES[local], FUSIONS[fusion]

    def describe(self) -> dict[str, Any]:
        """The configuration in use in plain types: layers, local scoring, fusion."""
        return {
            "layers": list(self.layers),
            "fine_layers": list(self.fine_layers) if self.two_scales else None,
            "local": self.local_mode,
            "fusion": self.fusion,
        }

    @property
    def two_scales(self) -> bool:
        """Whether the local score reads the ``fine_layers`` scale too (not where the global part is alone)."""
        return bool(self.fine_layers) and self.fusion != "global"

    def configure(self, local: str, fusion: str) -> None:
        """Switch to one of :attr:`candidates`; the model must be fitted again afterwards."""
        if (local, fusion) not in self.candidates:
            msg = f"configuration {(local, fusion)} is not among this model's candidates {self.candidates}."
            raise ValueError(msg)
        self.configuration = torch.tensor(
            [LOCAL_MODES.index(local), FUSIONS.index(fusion)], dtype=torch.long, device=self.configuration.device
        )
        self.local_mode, self.fusion = local, fusion
        if hasattr(self, "is_fitted"):
            self.is_fitted = torch.tensor(False, device=self.is_fitted.device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        """Take the checkpoint's configuration first, refusing one this ``score_mode`` does not allow."""
        saved = state_dict.get(f"{prefix}configuration")
        if saved is not None and saved.shape == self.configuration.shape:
            local, fusion = (int(v) for v in saved)
            candidate = (LOCAL_MODES[local], FUSIONS[fusion])
            if candidate not in self.candidates:
                msg = (
                    f"The checkpoint's configuration {candidate} is not among this model's candidates "
                    f"(score_mode '{self.score_mode}'); build the model with the checkpoint's arguments."
                )
                raise ValueError(msg)
            self.configure(*candidate)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _stride(self, layer: int | str) -> float:
        """Input pixels per feature-map cell of ``layer``: timm's ``feature_info`` reduction, kept by anomalib."""
        reductions = getattr(self.feature_extractor, "reductions", None)
        if reductions is not None:
            return float(reductions[list(self.feature_extractor.layers).index(layer)])
        if self.input_multiple > 1:  # a ViT: every block at the patch size's stride
            return float(self.input_multiple)
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
            if isinstance(module, nn.modules.batchnorm._BatchNorm):  # noqa: SLF001 - torch's base of every BatchNorm
                module.eval()
        return self

    def _normalised(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"FewShotContrastive expects RGB images of shape (B, 3, H, W), got {tuple(images.shape)}."
            raise ValueError(msg)
        size = snapped_size(images.shape[-2:], self.input_multiple)
        if size != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return (images - self.pixel_mean) / self.pixel_std

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features ``(B, C, h, w)`` (locally averaged, upsampled to the first layer) and global ``(B, D)``.

        The features the :class:`~fsad_anomalib.fine_tuning.ContrastiveFineTuning` callback trains
        (:func:`~fsad_anomalib.backbones.features.patch_and_global`).
        """
        feats = self.feature_extractor(self._normalised(images))
        return patch_and_global([feats[layer] for layer in self.layers], feats[self.global_layer])

    # the fine-tuning callback trains exactly the scored features (fine_tuning.ContrastiveFeatures)
    contrastive_features = features

    def scored_patch_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The patch features of :meth:`features` and the fine ones: the backbone stops after the deepest of them."""
        fine = self.fine_layers if self.two_scales else []
        wanted = list(dict.fromkeys([*self.layers, *fine]))
        feats = features_until(self.feature_extractor, self._normalised(images), wanted)
        fine_patch = patch_features([feats[layer] for layer in fine]) if fine else None
        return patch_features([feats[layer] for layer in self.layers]), fine_patch

    # ------------------------------------------------------------------ fit
    def _all_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Patch features, fine patch features (``None`` with one scale) and embeddings of one backbone pass."""
        feats = self.feature_extractor(self._normalised(images))
        patch, emb = patch_and_global([feats[layer] for layer in self.layers], feats[self.global_layer])
        fine = patch_features([feats[layer] for layer in self.fine_layers]) if self.two_scales else None
        return patch, fine, emb

    @torch.no_grad()
    def batched_parts(
        self, images: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`_all_features` batch by batch, concatenated."""
        parts = [self._all_features(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
        patch, fine, emb = (list(part) for part in zip(*parts, strict=True))
        return torch.cat(patch), torch.cat(fine) if fine[0] is not None else None, torch.cat(emb)

    @torch.no_grad()
    def fit(
        self,
        images: torch.Tensor,
        views: Views | None = None,
        batch_size: int = 32,
        max_patches: int = 200_000,
        rescale: bool = True,
    ) -> dict[str, float]:
        """Fit the Gaussians, memory bank and parts' scales on the K normal images.

        The current configuration's Gaussians (and memory bank) on the ``views`` of the K normal images
        ``(K, 3, H, W)`` in [0, 1] (default: the images alone), and the parts' scales on held-out normal evidence.
        ``rescale=False`` keeps the parts' scales as they are: a refit on fewer images (for the threshold's
        held-out scores) then scores as the deployed model does, with its references alone changed.
        """
        views = views or Views()
        if images.ndim != 4 or images.shape[0] < 1:
            msg = f"fit expects a non-empty batch of images (K, C, H, W), got {tuple(images.shape)}."
            raise ValueError(msg)
        was_training = self.training
        self.eval()
        per_view = [self.batched_parts(view, batch_size) for view in views.of(images)]  # per view: (K, ...) features
        g = torch.cat([emb for _, _, emb in per_view])
        p = _rows([patch for patch, _, _ in per_view], max_patches)
        self.global_mean, self.global_precision, g_shrink = fit_gaussian(g)
        # subspace scoring keeps the residual projector where the Gaussian keeps its precision (same map, same export)
        fit_patches = fit_subspace if self.local_mode == "subspace" else fit_gaussian
        self.patch_mean, self.patch_precision, p_shrink = fit_patches(p)
        if self.two_scales:
            self.fine_mean, self.fine_precision, _ = fit_gaussian(_rows([fine for _, fine, _ in per_view], max_patches))
        if self.local_mode in KNN_MODES:
            self.memory_bank = greedy_coreset(p, max(1, int(p.shape[0] * self.coreset_ratio)))
        else:
            self.memory_bank = p.new_zeros(0, p.shape[1])
        self.is_fitted = torch.tensor(True, device=self.is_fitted.device)
        if rescale:
            shift_, scale = held_out_scales(self, images, per_view, views, batch_size, max_patches)
            self.score_shift, self.score_scale = shift_.to(self.score_shift), scale.to(self.score_scale)
            stepped = MIN_IMAGES_LOCAL_ALONE < len(images) <= MIN_IMAGES_DEPLOYED_SCALES and local_alone(self)
            self.two_out_level = two_out_level(self, per_view, views, max_patches) if stepped else None
        self.train(was_training)
        names = ("global", "local", "fine")
        return {
            "global_shrinkage": g_shrink,
            "patch_shrinkage" if self.local_mode != "subspace" else "subspace_rank": p_shrink,
            "n_global": g.shape[0],
            "n_patch": p.shape[0],
            "memory_bank": self.memory_bank.shape[0],
            **{f"{name}_shift": float(value) for name, value in zip(names, self.score_shift, strict=True)},
            **{f"{name}_scale": float(value) for name, value in zip(names, self.score_scale, strict=True)},
        }

    # ------------------------------------------------------------------ score
    def _raw_maps(self, patch: torch.Tensor, fine: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unstandardised local map of ``layers`` and the fine scale's Mahalanobis map (``None`` with one scale)."""
        patch_map = local_map(patch, self.local_mode, self.patch_mean, self.patch_precision, self.memory_bank)
        return patch_map, gaussian_map(fine, self.fine_mean, self.fine_precision) if fine is not None else None

    def _local_map(self, patch: torch.Tensor, fine: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The local anomaly map and score; two scales are each standardised, then averaged (at the fine size)."""
        patch_map, fine_map = self._raw_maps(patch, fine)
        coarse = (patch_map - self.score_shift[1]) / self.score_scale[1]
        if fine_map is None:
            return coarse, topk_mean(coarse, self.topk_ratio)
        fine_map = (fine_map - self.score_shift[2]) / self.score_scale[2]
        score = 0.5 * (topk_mean(coarse, self.topk_ratio) + topk_mean(fine_map, self.topk_ratio))
        coarse = F.interpolate(coarse, size=fine_map.shape[-2:], mode="bilinear", align_corners=False)
        return 0.5 * (coarse + fine_map), score

    def raw_part_scores(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw global, local and fine image scores, unstandardised (the fine one 1 with one scale)."""
        patch, fine, emb = self._all_features(images)
        patch_map, fine_map = self._raw_maps(patch, fine)
        local = topk_mean(patch_map, self.topk_ratio)
        fine_score = topk_mean(fine_map, self.topk_ratio) if fine_map is not None else local.new_ones(())
        return [mahalanobis(emb, self.global_mean, self.global_precision), local, fine_score]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Image scores and anomaly maps of images in [0, 1].

        No gradient graph: scoring never trains (fine-tuning goes through :meth:`features`), and deployed outputs
        (anomalib's ``TorchInferencer`` calls the model without ``no_grad``) must convert to numpy. ``train()`` keeps
        the BatchNorm layers in eval mode, so the scores are the same in train mode.
        """
        if self.fusion == "local":
            # no global embedding on the hot path: the backbone stops after the deepest patch layer
            patch_map, score = self._local_map(*self.scored_patch_features(images))
        else:
            patch, fine, emb = self._all_features(images)  # one pass, no loop over the batch: it exports
            patch_map, local = self._local_map(patch, fine)
            g_score = mahalanobis(emb, self.global_mean, self.global_precision)
            g_score = (g_score - self.score_shift[0]) / self.score_scale[0]
            score = fuse(g_score, local, self.fusion)
        anomaly_map = F.interpolate(self.blur(patch_map), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map)


def _rows(patches: list[torch.Tensor], max_patches: int) -> torch.Tensor:
    """The patch features of every view as rows ``(n, C)``, at most ``max_patches`` of them drawn at random."""
    rows = torch.cat([patch.permute(0, 2, 3, 1).reshape(-1, patch.shape[1]) for patch in patches])
    if rows.shape[0] > max_patches:
        rows = rows[torch.randperm(rows.shape[0], device=rows.device)[:max_patches]]
    return rows
