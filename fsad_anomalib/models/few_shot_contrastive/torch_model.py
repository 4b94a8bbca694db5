"""PyTorch model of FewShotContrastive: backbone, Gaussian / nearest-neighbour scoring and anomaly map."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin
from anomalib.models.components.filters import GaussianBlur2d

from fsad_anomalib.backbones.features import patch_and_global, patch_features
from fsad_anomalib.data.shifts import GLOBAL_FAMILIES, LOCAL_FAMILIES, SHIFT_FAMILIES, shift
from fsad_anomalib.models.components.feature_extractor import build_feature_extractor, features_until
from fsad_anomalib.models.components.gaussian import fit_gaussian, mahalanobis
from fsad_anomalib.models.components.held_out import (
    FUSIONS,
    LOCAL_MODES,
    auroc,
    folds_for,
    fuse,
    gaussian_map,
    local_map,
    part_scores,
    topk_mean,
)
from fsad_anomalib.models.components.sampling import greedy_coreset
from fsad_anomalib.data.views import fit_views, symmetry_count

logger = logging.getLogger(__name__)

__all__ = ["AUTO_FUSIONS", "LAYER_CANDIDATES", "SCORE_MODES", "FewShotContrastiveModel", "NotFittedError"]

SCORE_MODES = ("auto", "combined", "patch", "global", "knn", "knn_patch")
# an explicit score_mode is one (local scoring, fusion) pair
MODE_PARTS = {"patch": ("patch", "local"), "knn": ("knn", "local"), "knn_patch": ("knn_patch", "local"),
              "global": ("patch", "global"), "combined": ("patch", "mean")}  # fmt: skip
# what "auto" chooses among: every local scoring, the first (the prior) kept unless another is clearly better, each
# fused with the global score (both kinds of defect, always) by the larger of the two standardised parts
AUTO_LOCAL = ("knn_patch", "patch", "knn")
AUTO_FUSIONS = ("max", "local")
# "local" is the auto choice below K = 4 only (FewShotContrastive.MIN_IMAGES_FOR_GLOBAL): leave-one-out over fewer
# images fits the global Gaussian on one or two embeddings, and at K = 1 the views that stand in for held-out images
# (flips and turns) distort both parts' spread
# a candidate replaces the prior (the first) only when its self-check objective is higher by more than this: the
# objective rests on a few normals and synthetic anomalies, and a small lead is noise
SELECTION_MARGIN = 0.02
# floor of a part's held-out standard deviation, relative to its held-out mean (K = 2 gives two held-out scores)
MIN_RELATIVE_STD = 0.1
# layers="auto" chooses among these feature depths (timm out_indices). Not the default: on every development set
# measured the self-check preferred the finer (1, 2), right for the textile set's small flaws, wrong for ELPV's cracks
LAYER_CANDIDATES = ((2, 3), (1, 2))
# synthetic anomalies per held-out fold and family, so that a self-check has about this many per family in all
ANOMALIES_PER_FAMILY = 8

_gaussian_map = gaussian_map  # the name the scoring used before it moved to components.held_out


def standardisation(global_scores: torch.Tensor, local_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift and scale ``(2,)`` of the global and local parts: mean and standard deviation of held-out normal scores.

    The deviation has a floor of ``MIN_RELATIVE_STD`` times the mean (two held-out scores can lie close by chance);
    one score gives the floor.
    """
    shifts, scales = [], []
    for scores in (global_scores, local_scores):
        mean = scores.mean()
        std = scores.std() if scores.numel() > 1 else scores.new_zeros(())
        shifts.append(mean)
        scales.append(torch.maximum(std, MIN_RELATIVE_STD * mean.abs()).clamp_min(1e-6))
    return torch.stack(shifts), torch.stack(scales)


class NotFittedError(RuntimeError):
    """Raised when a model that was never fitted is asked to score."""


class FewShotContrastiveModel(DynamicBufferMixin, nn.Module):
    """Backbone + Gaussians (global embedding and patch features) and, for ``knn`` scorings, a memory bank.

    Forward in eval mode takes images in [0, 1] (resized by the pre-processor) and returns an
    ``InferenceBatch`` with ``pred_score`` and ``anomaly_map``. Normalisation with the backbone's
    mean and std happens inside, so that the synthesis and augmentations work on plain pixels.

    The image score fuses two parts, each standardised by its mean and standard deviation on held-out normal
    evidence (leave-one-out over the K images, over their views when K = 1): the **global** Mahalanobis score of the
    image embedding, which sees a whole-image change (colour, contrast, blur, texture scale), and a **local** score,
    the mean of the top ``topk_ratio`` of a patch anomaly map, which sees a small flaw. With ``score_mode="auto"``
    the model chooses the local scoring (and, with ``layers="auto"``, the patch layers) from the K normals alone
    (:meth:`self_check`): each candidate scores held-out normals against synthetic local flaws and whole-image
    shifts made from them (:mod:`fsad_anomalib.data.shifts`), and the prior (the first candidate) is kept unless
    another separates them clearly better.

    Args:
        backbone (str | nn.Module): timm name, ``offline:<arch>``, ``local-dir:<folder>`` or an ``nn.Module``.
            Defaults to ``"offline:tf_efficientnet_lite0"``.
        pre_trained (bool): Load pretrained weights. Defaults to ``True``.
        layers (Sequence[int | str] | str): Feature layers (timm ``out_indices`` or names) whose outputs form the
            patch features; the first sets the anomaly map's resolution. ``"auto"``: chosen by :meth:`self_check`
            among ``LAYER_CANDIDATES`` (``(2, 3)`` until then). Defaults to ``(2, 3)``.
        global_layer (int | str): Layer whose global average pool is the image embedding. Defaults to ``4``.
        score_mode (str): ``auto`` (chosen by :meth:`self_check`: local scoring ``knn_patch``, ``patch`` or ``knn``,
            fused with the global score by the larger of the two standardised parts from K = 4 on; the local
            score alone below); ``combined`` (patch and global, mean);
            ``patch`` (the patch Mahalanobis map alone); ``knn`` (each patch's Euclidean distance to its nearest
            neighbour in a coreset of the training patches, PatchCore's scoring); ``knn_patch`` (per patch, the
            geometric mean of both distances); ``global`` (the paper's image-level Mahalanobis score). Defaults to
            ``"auto"``.
        blur_sigma (float): Gaussian smoothing of the anomaly map, in input pixels. Defaults to ``4.0``.
        topk_ratio (float): Fraction of the patches whose mean is the local image score. Defaults to ``0.01``.
        coreset_ratio (float): ``knn`` scorings: fraction of the training patches kept in the memory bank
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
        layers: Sequence[int | str] | str = (2, 3),
        global_layer: int | str = 4,
        score_mode: str = "auto",
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
        if isinstance(layers, str):
            if layers != "auto":
                msg = f"layers must be 'auto' or a sequence of feature layers, got '{layers}'."
                raise ValueError(msg)
            self.layer_candidates = [tuple(c) for c in LAYER_CANDIDATES]
        else:
            if not layers:
                msg = "layers must name at least one feature layer."
                raise ValueError(msg)
            self.layer_candidates = [tuple(layers)]
        self.score_mode = score_mode
        self.auto_layers = len(self.layer_candidates) > 1
        if score_mode == "auto":
            self.local_candidates, self.fusion_candidates = list(AUTO_LOCAL), list(AUTO_FUSIONS)
        else:
            local, fusion = MODE_PARTS[score_mode]
            self.local_candidates, self.fusion_candidates = [local], [fusion]
        self.global_layer = global_layer
        wanted = [*itertools.chain.from_iterable(self.layer_candidates), global_layer]
        all_layers = list(dict.fromkeys(wanted))
        if all(isinstance(layer, int) for layer in all_layers):  # timm out_indices: shallow to deep
            all_layers = sorted(all_layers)
        self.feature_extractor, mean, std = build_feature_extractor(backbone, all_layers, pre_trained)
        self.layer_dims = dict(zip(self.feature_extractor.layers, self.feature_extractor.out_dims, strict=True))
        self.global_dim = self.layer_dims[global_layer]
        self.blur_sigma = blur_sigma
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1))
        # the chosen configuration: indices into layer_candidates, LOCAL_MODES and FUSIONS (kept in checkpoints)
        first = [0, LOCAL_MODES.index(self.local_candidates[0]), FUSIONS.index(self.fusion_candidates[0])]
        self.register_buffer("configuration", torch.tensor(first, dtype=torch.long))
        self._apply_configuration()
        self.register_buffer("global_mean", torch.zeros(self.global_dim))
        self.register_buffer("global_precision", torch.eye(self.global_dim))
        self.register_buffer("patch_mean", torch.zeros(self.patch_dim))
        self.register_buffer("patch_precision", torch.eye(self.patch_dim))
        # knn scorings: coreset of the training patches (its size follows the checkpoint, see DynamicBufferMixin)
        self.register_buffer("memory_bank", torch.zeros(0, self.patch_dim))
        # where the global and local parts are fused, each is standardised, (score - shift) / scale, with the mean and
        # standard deviation of its scores on held-out normal evidence; a part alone keeps shift 0 and scale 1
        self.register_buffer("score_shift", torch.zeros(2))
        self.register_buffer("score_scale", torch.ones(2))
        self.register_buffer("is_fitted", torch.tensor(False))

    # ------------------------------------------------------------------ configuration
    @property
    def candidates(self) -> list[tuple[int, str, str]]:
        """Every configuration this model may take: (index into ``layer_candidates``, local scoring, fusion)."""
        return list(itertools.product(range(len(self.layer_candidates)), self.local_candidates, self.fusion_candidates))

    def describe(self, candidate: tuple[int, str, str] | None = None) -> dict[str, Any]:
        """A candidate (by default the current configuration) in plain types: layers, local scoring, fusion."""
        index, local, fusion = candidate if candidate is not None else self.current
        return {"layers": list(self.layer_candidates[index]), "local": local, "fusion": fusion}

    @property
    def current(self) -> tuple[int, str, str]:
        """The configuration in use."""
        index, local, fusion = (int(v) for v in self.configuration)
        return index, LOCAL_MODES[local], FUSIONS[fusion]

    def configure(self, candidate: tuple[int, str, str]) -> None:
        """Switch to ``candidate`` (one of :attr:`candidates`); the model must be fitted again afterwards."""
        if candidate not in self.candidates:
            msg = f"configuration {candidate} is not among this model's candidates {self.candidates}."
            raise ValueError(msg)
        index, local, fusion = candidate
        self.configuration = torch.tensor(
            [index, LOCAL_MODES.index(local), FUSIONS.index(fusion)], dtype=torch.long, device=self.configuration.device
        )
        self._apply_configuration()
        self.is_fitted = torch.tensor(False, device=self.is_fitted.device)

    def _apply_configuration(self) -> None:
        """Layers, scoring and the anomaly map's blur from the ``configuration`` buffer."""
        index, self.local_mode, self.fusion = self.current
        self.layers = list(self.layer_candidates[index])
        self.patch_dim = sum(self.layer_dims[layer] for layer in self.layers)
        # The anomaly map is smoothed at feature resolution (sigma divided by the layer's stride), then
        # upsampled: the same smoothing as a blur at input resolution at a fraction of the cost.
        self.map_stride = self._stride(self.layers[0])
        feature_sigma = self.blur_sigma / self.map_stride
        device = self.configuration.device
        self.blur = GaussianBlur2d(sigma=feature_sigma, channels=1).to(device) if feature_sigma > 0 else nn.Identity()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:  # noqa: ANN002
        """Take the checkpoint's configuration first, so that the blur and the buffers have its shapes."""
        saved = state_dict.get(f"{prefix}configuration")
        if saved is not None and saved.shape == self.configuration.shape:
            index, local, fusion = (int(v) for v in saved)
            candidate = (index, LOCAL_MODES[local], FUSIONS[fusion]) if index < len(self.layer_candidates) else None
            if candidate not in self.candidates:
                msg = (f"The checkpoint's configuration {candidate or tuple(saved.tolist())} is not among this model's "
                       f"candidates (layers {self.layer_candidates}, score_mode '{self.score_mode}'); build the model "
                       "with the checkpoint's arguments.")  # fmt: skip
                raise ValueError(msg)
            self.configuration = saved.clone().to(self.configuration.device)
            self._apply_configuration()
        super()._load_from_state_dict(state_dict, prefix, *args)

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

    def _candidate_features(
        self, images: torch.Tensor, batch_size: int
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Patch features of every layer candidate and the embedding, from one backbone pass per batch."""
        patches: list[list[torch.Tensor]] = [[] for _ in self.layer_candidates]
        embeddings = []
        for start in range(0, images.shape[0], batch_size):
            feats = self.feature_extractor(self._normalised(images[start : start + batch_size]))
            for index, layers in enumerate(self.layer_candidates):
                patches[index].append(patch_features([feats[layer] for layer in layers]))
            embeddings.append(F.normalize(feats[self.global_layer].mean(dim=(-2, -1)), dim=-1))
        return [torch.cat(parts) for parts in patches], torch.cat(embeddings)

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
        """Fit the Gaussians (and memory bank) of the current configuration on ``n_views`` views of the K normal
        images ``(K, 3, H, W)`` in [0, 1], and the parts' scales on held-out normal evidence."""
        self._check_fit_args(images, n_views)
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
        if self.local_mode != "patch":
            size = max(1, int(p.shape[0] * self.coreset_ratio))
            self.memory_bank = greedy_coreset(p, size)
        else:
            self.memory_bank = p.new_zeros(0, p.shape[1])
        self.is_fitted = torch.tensor(True, device=self.is_fitted.device)
        self.score_shift, self.score_scale = self._held_out_standardisation(
            images, global_views, patch_views, n_views, hflip, vflip, rot90, batch_size, max_patches
        )
        self.train(was_training)
        return {"global_shrinkage": g_shrink, "patch_shrinkage": p_shrink, "n_global": g.shape[0], "n_patch": p.shape[0],
                "memory_bank": self.memory_bank.shape[0], "global_shift": float(self.score_shift[0]),
                "global_scale": float(self.score_scale[0]), "local_shift": float(self.score_shift[1]),
                "local_scale": float(self.score_scale[1])}  # fmt: skip

    @staticmethod
    def _check_fit_args(images: torch.Tensor, n_views: int) -> None:
        if images.ndim != 4 or images.shape[0] < 1:  # noqa: PLR2004
            msg = f"fit expects a non-empty batch of images (K, C, H, W), got {tuple(images.shape)}."
            raise ValueError(msg)
        if n_views < 1:
            msg = f"n_views must be >= 1, got {n_views}."
            raise ValueError(msg)

    def _held_out_standardisation(
        self,
        images: torch.Tensor,
        global_views: list[torch.Tensor],
        patch_views: list[torch.Tensor],
        n_views: int,
        hflip: bool,
        vflip: bool,
        rot90: bool,
        batch_size: int,
        max_patches: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each part's mean and standard deviation on normal evidence its fit did not see, where parts are fused.

        A normal image scores low against a model fitted on itself, and the two parts unevenly so (the global
        Gaussian has K * N_A samples in hundreds of dimensions, the patch Gaussian thousands; a memory bank scores
        its own patches 0). Each of the K images (all its views) is held out in turn, the parts are fitted on the
        others and the held-out views are scored; with K = 1 the fit keeps the first view and each other view the
        flags allow is held out. Standardising by the spread as well as the level keeps a part whose normals vary
        a lot (the global score of a product whose brightness varies) from raising false alarms on its own. Where
        one part alone makes the score, shift 0 and scale 1 leave it as it is.
        """
        shift_ = torch.zeros(2, device=self.score_scale.device)
        scale = torch.ones(2, device=self.score_scale.device)
        if self.fusion in {"local", "global"}:
            return shift_, scale
        k = images.shape[0]
        if k >= 2:  # noqa: PLR2004
            normal_patch, normal_global, total = torch.stack(patch_views), torch.stack(global_views), n_views
        else:
            total = max(n_views, symmetry_count(hflip, vflip, rot90, square=images.shape[-1] == images.shape[-2]))
            if total < 2:  # noqa: PLR2004
                logger.warning("FewShotContrastive: one image, one view and no flip or turn allowed leave no normal "
                               "evidence to hold out; each part is divided by its score on the training image, or by "
                               "1 where that is 0 (one embedding, a memory bank of its own patches).")
                g_score, p_score = self._scores(images)
                values = torch.stack([g_score.mean(), p_score.mean()]).to(scale)
                return shift_, torch.where(values > 1e-3, values, torch.ones_like(values))  # noqa: PLR2004
            views = torch.cat(list(fit_views(images, total, hflip, vflip, rot90)))
            patches, embeddings = [], []
            for start in range(0, views.shape[0], batch_size):
                patch, emb = self.features(views[start : start + batch_size])
                patches.append(patch)
                embeddings.append(emb)
            normal_patch, normal_global = torch.cat(patches)[:, None], torch.cat(embeddings)[:, None]
        scores = part_scores(folds_for(total, k, n_views), normal_patch, normal_global, local_modes=(self.local_mode,),
                             topk_ratio=self.topk_ratio, coreset_ratio=self.coreset_ratio, max_patches=max_patches)
        normal = scores["normal"]
        shift_, scale = standardisation(normal["global"], normal[self.local_mode])
        return shift_.to(self.score_shift), scale.to(self.score_scale)

    # ------------------------------------------------------------------ self-configuration
    @torch.no_grad()
    def self_check(
        self,
        images: torch.Tensor,
        n_views: int = 1,
        hflip: bool = True,
        vflip: bool = True,
        rot90: bool = True,
        families: Sequence[str] = SHIFT_FAMILIES,
        seed: int = 0,
        candidates: Sequence[tuple[int, str, str]] | None = None,
        batch_size: int = 32,
        max_patches: int = 200_000,
    ) -> list[dict[str, Any]] | None:
        """How well each candidate configuration separates held-out normals from synthetic anomalies made of them.

        From the K normal images alone. With K >= 2 each image is held out in turn: the Gaussians and memory bank
        are fitted on the ``n_views`` views of the others, as :meth:`fit` fits them, and the held-out image's
        ``n_views`` views are scored beside synthetic anomalies
        made from those views in turn, ``ceil(8 / K)`` per family (:func:`~fsad_anomalib.data.shifts.shift`). With K = 1 the fit
        keeps the image's first view and each other view is held out. Both parts are standardised by their held-out
        normal mean and deviation, as :meth:`fit` standardises them.

        The objective is the mean of two means: the AUROC over the local families and over the global ones, so that
        neither kind of defect is traded away for the other.

        Args:
            images (torch.Tensor): The K normal images ``(K, 3, H, W)`` in [0, 1].
            n_views (int): Views of each image in the fit. Defaults to ``1``.
            hflip (bool): The product may be flipped left-right. Defaults to ``True``.
            vflip (bool): Top-bottom. Defaults to ``True``.
            rot90 (bool): Turned by 90 degrees. Defaults to ``True``.
            families (Sequence[str]): Synthetic anomaly families (``SHIFT_FAMILIES``). Defaults to all.
            seed (int): Seeds the synthetic anomalies: the same seed gives the same table. Defaults to ``0``.
            candidates (Sequence[tuple[int, str, str]] | None): Configurations to judge; all by default.
            batch_size (int): Backbone batch size. Defaults to ``32``.
            max_patches (int): At most this many patches in each fit. Defaults to ``200_000``.

        Returns:
            list[dict[str, Any]] | None: One row per candidate, in :attr:`candidates` order: ``layers``, ``local``,
            ``fusion``, ``score`` (the objective), ``local_auroc``, ``global_auroc`` and ``families`` (the AUROC of
            each family). ``None`` when one image with no flip or turn leaves nothing to hold out.
        """
        self._check_fit_args(images, n_views)
        unknown = [family for family in families if family not in SHIFT_FAMILIES]
        if unknown or not families:
            msg = f"self_check: families must be a non-empty subset of {SHIFT_FAMILIES}, got {list(families)}."
            raise ValueError(msg)
        candidates = list(candidates) if candidates is not None else self.candidates
        k = images.shape[0]
        square = images.shape[-1] == images.shape[-2]
        # K >= 2: the held-out image in the fit's own views (the views test images are compared in); K = 1: every
        # view the flags allow, since only views can be held out
        total = n_views if k >= 2 else max(n_views, symmetry_count(hflip, vflip, rot90, square=square))  # noqa: PLR2004
        if k == 1 and total < 2:  # noqa: PLR2004
            return None
        views = list(fit_views(images, total, hflip, vflip, rot90))  # V x (K, 3, H, W)
        folds = folds_for(total, k, n_views)
        draws = max(1, math.ceil(ANOMALIES_PER_FAMILY / len(folds)))
        generator = torch.Generator().manual_seed(seed)
        sources, labels = [], []
        for index, fold in enumerate(folds):
            # anomalies of a fold are made from the views it holds out, in turn, so that they come in the same views
            # as the held-out normals they are ranked against: the image's views (K >= 2), or the one view (K = 1)
            held = [views[v][index : index + 1] for v in range(total)] if k >= 2 else [views[index + 1]]  # noqa: PLR2004
            for turn, (family, _) in enumerate(itertools.product(families, range(draws))):
                fold.anomalies.append(len(sources))
                source = held[(turn + index) % len(held)]
                sources.append(shift(source.cpu(), family, generator).to(images.device))
                labels.append(family)
        was_training = self.training
        self.eval()
        normal_patches, normal_global = self._candidate_features(torch.cat(views), batch_size)
        anomaly_patches, anomaly_global = self._candidate_features(torch.cat(sources), batch_size)
        self.train(was_training)
        normal_global = normal_global.view(total, k, -1)
        local_modes = sorted({local for _, local, _ in candidates}, key=LOCAL_MODES.index)
        rows = []
        for index in sorted({c[0] for c in candidates}):
            patch = normal_patches[index]
            scores = part_scores(folds, patch.view(total, k, *patch.shape[1:]), normal_global, anomaly_patches[index],
                                 anomaly_global, local_modes=local_modes, topk_ratio=self.topk_ratio,
                                 coreset_ratio=self.coreset_ratio, max_patches=max_patches)  # fmt: skip
            normal, anomaly = scores["normal"], scores["anomaly"]
            for candidate in (c for c in candidates if c[0] == index):
                _, local, fusion = candidate
                shift_, scale = standardisation(normal["global"], normal[local])
                if fusion in {"local", "global"}:
                    shift_, scale = torch.zeros_like(shift_), torch.ones_like(scale)
                fused_normal = fuse((normal["global"] - shift_[0]) / scale[0], (normal[local] - shift_[1]) / scale[1],
                                    fusion)  # fmt: skip
                fused_anomaly = fuse((anomaly["global"] - shift_[0]) / scale[0],
                                     (anomaly[local] - shift_[1]) / scale[1], fusion)  # fmt: skip
                per_family = {}
                for family in families:
                    chosen = torch.tensor([label == family for label in labels], device=fused_anomaly.device)
                    per_family[family] = auroc(fused_normal, fused_anomaly[chosen])
                groups = [[per_family[f] for f in families if f in group] for group in (LOCAL_FAMILIES, GLOBAL_FAMILIES)]
                means = [sum(group) / len(group) if group else None for group in groups]
                present = [m for m in means if m is not None]
                rows.append({**self.describe(candidate), "candidate": candidate, "score": sum(present) / len(present),
                             "local_auroc": means[0], "global_auroc": means[1], "families": per_family})  # fmt: skip
        order = {candidate: position for position, candidate in enumerate(candidates)}
        return sorted(rows, key=lambda row: order[row["candidate"]])

    @staticmethod
    def best(rows: Sequence[dict[str, Any]], margin: float = SELECTION_MARGIN) -> dict[str, Any]:
        """The choice from :meth:`self_check`'s rows: the first row (the prior) unless the row with the highest
        ``score`` (the first of equals) beats it by more than ``margin``. Deterministic."""
        prior, challenger = rows[0], rows[0]
        for row in rows[1:]:
            if row["score"] > challenger["score"]:
                challenger = row
        return challenger if challenger["score"] > prior["score"] + margin else prior

    # ------------------------------------------------------------------ score
    def _patch_map(self, patch: torch.Tensor) -> torch.Tensor:
        return local_map(patch, self.local_mode, self.patch_mean, self.patch_precision, self.memory_bank)

    def _scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch, emb = self.features(images)
        g_score = mahalanobis(emb, self.global_mean, self.global_precision)
        p_score = self._aggregate(self._patch_map(patch))
        return g_score, p_score

    def _aggregate(self, patch_map: torch.Tensor) -> torch.Tensor:
        """Image score from a patch map: mean of its top ``topk_ratio`` patches (at least one)."""
        return topk_mean(patch_map, self.topk_ratio)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Image scores and anomaly maps of images in [0, 1].

        No gradient graph: scoring never trains (fine-tuning goes through :meth:`features`), and deployed outputs (anomalib's
        ``TorchInferencer`` calls the model without ``no_grad``) must convert to numpy. ``train()`` keeps the BatchNorm
        layers in eval mode, so the scores are the same in train mode. Lightning,
        though, sets each submodule's mode itself during the training epoch (BatchNorm layers included), when this
        model runs no forward pass: fine-tuning and :meth:`fit` put the BatchNorm layers in eval mode explicitly.
        """
        if self.fusion == "local":
            # no global embedding on the hot path: the backbone stops after the deepest patch layer
            patch_map = self._patch_map(self.scored_patch_features(images))
            score = self._aggregate(patch_map)
        else:
            patch, emb = self.features(images)
            # the standardised local map: its top-k mean is the standardised local score (the map is affine in it)
            patch_map = (self._patch_map(patch) - self.score_shift[1]) / self.score_scale[1]
            g_score = (mahalanobis(emb, self.global_mean, self.global_precision) - self.score_shift[0]) / self.score_scale[0]
            score = fuse(g_score, self._aggregate(patch_map), self.fusion)
        anomaly_map = F.interpolate(self.blur(patch_map), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map)
