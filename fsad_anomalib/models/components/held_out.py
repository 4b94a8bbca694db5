"""Scores of normal evidence a model did not see: leave-one-out over the K normals, or over views at K = 1.

Two uses in FewShotContrastive, both from the K normal images alone:

* the scale of each part of a fused score (global embedding and local patch evidence): a normal image scores low
  against a model fitted on itself, and the two parts unevenly so, so each part is divided by its mean on
  held-out normals;
* self-configuration: synthetic anomalies (:mod:`fsad_anomalib.data.shifts`) made from each held-out normal are
  scored beside it, and each candidate configuration is judged by how well it separates them.

Every function here is pure torch on features; the model computes the features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from sklearn.metrics import roc_auc_score

from fsad_anomalib.data.views import held_out_groups
from fsad_anomalib.models.components.gaussian import fit_gaussian, fit_subspace, mahalanobis
from fsad_anomalib.models.components.sampling import evenly_spaced, greedy_coreset

__all__ = [
    "FUSIONS",
    "KNN_MODES",
    "LOCAL_MODES",
    "Fold",
    "auroc",
    "fuse",
    "local_map",
    "part_scores",
    "standardisation",
    "topk_mean",
]

# the local scorings; "subspace" is the residual outside the normals' principal subspace (fit_subspace)
LOCAL_MODES = ("patch", "knn", "knn_patch", "subspace")
KNN_MODES = ("knn", "knn_patch")
# how the global (g) and local (p) parts, each standardised on held-out normals, make the image score
FUSIONS = ("local", "mean", "max", "global")
# floor of a part's held-out standard deviation, relative to its held-out mean (K = 2 gives two held-out scores)
MIN_RELATIVE_STD = 0.1


def gaussian_map(patch: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of every location of ``patch`` ``(B, C, h, w)`` to a Gaussian, as ``(B, 1, h, w)``."""
    b, c, h, w = patch.shape
    return mahalanobis(patch.permute(0, 2, 3, 1).reshape(b, h * w, c), mean, precision).reshape(b, 1, h, w)


def nearest_map(patch: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every location of ``patch`` to its nearest row of ``bank``, as ``(B, 1, h, w)``.

    ``|x|^2 + x.(-2 y) + |y|^2`` (no ``cdist``, so it exports), the factor -2 folded into the bank: a product scaled
    or subtracted after the matrix product would be fused with it by OpenVINO's CPU plugin into a new operation
    that no longer carries the IR's FP32 marking (:mod:`~fsad_anomalib.models.components.openvino_ir`).
    """
    b, c, h, w = patch.shape
    flat = patch.permute(0, 2, 3, 1).reshape(b, h * w, c)
    squared = flat.pow(2).sum(-1, keepdim=True) + flat @ (-2 * bank).T + bank.pow(2).sum(-1)
    return squared.clamp_min(0).sqrt().min(dim=-1).values.reshape(b, 1, h, w)


def local_map(
    patch: torch.Tensor, mode: str, mean: torch.Tensor, precision: torch.Tensor, bank: torch.Tensor | None
) -> torch.Tensor:
    """The local anomaly map ``(B, 1, h, w)`` of ``mode``.

    ``patch`` (Mahalanobis to the patch Gaussian), ``subspace`` (the same expression with the residual projector of
    :func:`~fsad_anomalib.models.components.gaussian.fit_subspace` as ``precision``), ``knn`` (distance to the
    nearest memory-bank patch) or ``knn_patch`` (per patch, the geometric mean of ``knn`` and ``patch``).
    """
    if mode not in KNN_MODES or bank is None or bank.shape[0] == 0:
        return gaussian_map(patch, mean, precision)
    knn = nearest_map(patch, bank)
    if mode == "knn":
        return knn
    return (knn * gaussian_map(patch, mean, precision)).clamp_min(0).sqrt()


def topk_mean(patch_map: torch.Tensor, ratio: float) -> torch.Tensor:
    """Image score from a patch map: mean of its top ``ratio`` patches (at least one)."""
    flat = patch_map.flatten(1)
    k = max(1, round(ratio * int(flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


def fuse(g: torch.Tensor, p: torch.Tensor, fusion: str) -> torch.Tensor:
    """The image score of ``fusion`` from the scaled global ``g`` and local ``p`` scores."""
    if fusion == "local":
        return p
    if fusion == "global":
        return g
    if fusion == "mean":
        return 0.5 * (g + p)
    return torch.maximum(g, p)


def auroc(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    """The ROC curve's area of normal against anomalous scores (scikit-learn's; ties count one half).

    Not torchmetrics' ``binary_auroc``: it reads scores outside [0, 1] as logits, and their sigmoid ties distances.
    """
    scores = torch.cat([normal.flatten(), anomalous.flatten()]).double().cpu().numpy()
    return float(roc_auc_score([0] * normal.numel() + [1] * anomalous.numel(), scores))


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


@dataclass
class Fold:
    """One held-out split: what is fitted and what is scored.

    Attributes:
        fit (torch.Tensor): Boolean ``(V, K)`` mask over the normal views that the models of this fold fit on.
        query (torch.Tensor): Boolean ``(V, K)`` mask over the held-out normal views scored in this fold.
        anomalies (list[int]): Indices, into the anomaly features, of the synthetic anomalies made from the held-out
            normal(s) of this fold.
    """

    fit: torch.Tensor
    query: torch.Tensor
    anomalies: list[int] = field(default_factory=list)


def _fit_patches(patch: torch.Tensor, max_patches: int) -> torch.Tensor:
    return evenly_spaced(patch.permute(0, 2, 3, 1).reshape(-1, patch.shape[1]), max_patches)


@torch.no_grad()
def part_scores(
    folds: Sequence[Fold],
    normal_patch: torch.Tensor,
    normal_global: torch.Tensor,
    anomaly_patch: torch.Tensor | None = None,
    anomaly_global: torch.Tensor | None = None,
    local_modes: Sequence[str] = ("patch",),
    topk_ratio: float = 0.01,
    coreset_ratio: float = 0.1,
    max_patches: int = 200_000,
    with_global: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Held-out global and local image scores of normals and synthetic anomalies, fold by fold.

    In each fold a global Gaussian (``with_global``), a patch Gaussian (modes that use it) and (for ``knn`` modes)
    a coreset memory bank are fitted on the fold's ``fit`` views, as the model fits them, and the fold's held-out
    normals and anomalies are scored.

    Args:
        folds (Sequence[Fold]): The splits.
        normal_patch (torch.Tensor): ``(V, K, C, h, w)`` patch features of V views of the K normals.
        normal_global (torch.Tensor): ``(V, K, D)`` their embeddings.
        anomaly_patch (torch.Tensor | None): ``(A, C, h, w)`` patch features of synthetic anomalies.
        anomaly_global (torch.Tensor | None): ``(A, D)`` their embeddings.
        local_modes (Sequence[str]): Which local scores to compute (``LOCAL_MODES``).
        topk_ratio (float): Fraction of the patches whose mean is the image score.
        coreset_ratio (float): Memory-bank fraction of the fitted patches (``knn`` modes).
        max_patches (int): At most this many patches in each fit.
        with_global (bool): Score the global part too (not needed where only a local part is scored).

    Returns:
        dict[str, dict[str, torch.Tensor]]: ``{"normal": {...}, "anomaly": {...}}``, each mapping ``"global"`` (with
        ``with_global``) and every local mode to the concatenated scores of all folds (anomalies in the folds' order).
    """
    out: dict[str, dict[str, list[torch.Tensor]]] = {"normal": {}, "anomaly": {}}
    keys = (["global"] if with_global else []) + list(local_modes)
    gaussian_modes = {"patch", "knn_patch"} & set(local_modes)
    for part in out.values():
        for key in keys:
            part[key] = []
    for fold in folds:
        if with_global:
            g_mean, g_precision, _ = fit_gaussian(normal_global[fold.fit])
        rows = _fit_patches(normal_patch[fold.fit], max_patches)
        if gaussian_modes:
            p_mean, p_precision, _ = fit_gaussian(rows)
        subspace = fit_subspace(rows) if "subspace" in local_modes else None
        bank = None
        if any(mode in KNN_MODES for mode in local_modes):
            bank = greedy_coreset(rows, max(1, int(rows.shape[0] * coreset_ratio)))
        queries = {"normal": (normal_patch[fold.query], normal_global[fold.query])}
        if fold.anomalies and anomaly_patch is not None and anomaly_global is not None:
            index = torch.tensor(fold.anomalies, device=anomaly_patch.device)
            queries["anomaly"] = (anomaly_patch[index], anomaly_global[index])
        for name, (patch, emb) in queries.items():
            if with_global:
                out[name]["global"].append(mahalanobis(emb, g_mean, g_precision))
            gauss = gaussian_map(patch, p_mean, p_precision) if gaussian_modes else None
            knn = nearest_map(patch, bank) if bank is not None else None
            for mode in local_modes:
                if mode == "patch":
                    patch_map = gauss
                elif mode == "subspace":
                    patch_map = gaussian_map(patch, *subspace[:2])
                elif mode == "knn":
                    patch_map = knn
                else:
                    patch_map = (knn * gauss).clamp_min(0).sqrt()
                out[name][mode].append(topk_mean(patch_map, topk_ratio))
    empty = normal_global.new_zeros(0)
    return {
        name: {key: torch.cat(values) if values else empty for key, values in part.items()}
        for name, part in out.items()
    }


def folds_for(n_views: int, k: int, n_fit_views: int) -> list[Fold]:
    """Leave-one-out folds over the images, or over the views of one image.

    Over ``k`` images (each image's ``n_views`` views held out together; past ``MAX_FOLDS`` images, each fold holds
    out a group, :func:`~fsad_anomalib.data.views.held_out_groups`), or, for ``k = 1``, over its views (each view
    other than the first held out in turn, the first always fitted).

    The fit of each fold takes the first ``n_fit_views`` views of the images it keeps, as the model's fit does.
    """
    folds = []
    fitted = torch.zeros(n_views, k, dtype=torch.bool)
    fitted[:n_fit_views] = True
    if k >= 2:
        for group in held_out_groups(k):
            fit, query = fitted.clone(), torch.zeros(n_views, k, dtype=torch.bool)
            fit[:, group] = False
            query[:, group] = True
            folds.append(Fold(fit, query))
        return folds
    for v in range(1, n_views):
        fit, query = fitted.clone(), torch.zeros(n_views, k, dtype=torch.bool)
        fit[v] = False
        fit[0] = True
        query[v] = True
        folds.append(Fold(fit, query))
    return folds
