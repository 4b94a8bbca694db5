"""Gaussian fit with Ledoit-Wolf shrinkage and the Mahalanobis distance.

Few-shot statistics are degenerate: K * N_A samples in hundreds of dimensions give a singular sample
covariance. The Ledoit-Wolf estimator (scikit-learn's) shrinks it towards ``mu * I`` (``mu`` the mean eigenvalue) by the
analytically optimal amount; a floor of ``eps * mu`` on the diagonal (and ``eps`` absolute when all
samples coincide) keeps the result positive definite in every case, so the precision matrix exists and
scores are finite. Computed in float64.
"""

from __future__ import annotations

import torch
from sklearn.covariance import ledoit_wolf

__all__ = ["SUBSPACE_VARIANCE", "fit_gaussian", "fit_subspace", "mahalanobis"]

# the normal subspace keeps the principal directions that explain this share of the variance (SubspaceAD)
SUBSPACE_VARIANCE = 0.99


def _check_samples(x: torch.Tensor, who: str) -> None:
    if x.ndim != 2 or x.shape[0] < 1:
        msg = f"{who} expects samples of shape (n >= 1, p), got {tuple(x.shape)}."
        raise ValueError(msg)
    if not torch.isfinite(x).all():
        msg = f"{who}: the features contain NaN or inf; check the input images and the backbone weights."
        raise ValueError(msg)


def fit_gaussian(x: torch.Tensor, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, precision (inverse of the shrunk covariance) and shrinkage of samples ``x`` ``(n, p)``."""
    _check_samples(x, "fit_gaussian")
    x64 = x.double()
    mean = x64.mean(0)
    if x64.shape[0] < 2:
        cov, shrinkage = x64.new_zeros(x64.shape[1], x64.shape[1]), 1.0
    else:
        cov_np, shrinkage = ledoit_wolf(x64.cpu().numpy())  # scikit-learn's Ledoit-Wolf, in float64 on the CPU
        cov, shrinkage = torch.from_numpy(cov_np).to(x64.device), float(shrinkage)
    p = cov.shape[0]
    mu = float(torch.trace(cov) / p)
    floor = eps * mu if mu > 0 else eps
    cov = cov + floor * torch.eye(p, dtype=cov.dtype, device=cov.device)
    chol = torch.linalg.cholesky(cov)
    precision = torch.cholesky_inverse(chol)
    precision = 0.5 * (precision + precision.T)
    # contiguous: the symmetrised sum can come out with transposed strides, and BLAS then takes another path than for
    # the same matrix loaded from a checkpoint (scores that differ in the last bits after a round trip)
    return mean.to(x.dtype), precision.to(x.dtype).contiguous(), shrinkage


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of the rows of ``x`` (``(..., p)``); plain tensor ops, exportable."""
    d = x - mean
    return ((d @ precision) * d).sum(-1).clamp_min(0).sqrt()


def fit_subspace(x: torch.Tensor, variance: float = SUBSPACE_VARIANCE) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean, residual projector and rank of the principal subspace of samples ``x`` ``(n, p)``.

    The subspace of normal variation keeps the fewest principal directions that explain ``variance`` of the
    variance; ``mahalanobis(x, mean, projector)`` is then the norm of what a sample has outside it, its PCA
    reconstruction residual (SubspaceAD: Lendering et al., "SubspaceAD: training-free few-shot anomaly detection
    via subspace modelling", https://github.com/CLendering/SubspaceAD). The projector ``I - U U^T`` takes the place of
    a precision matrix, so scoring and export are the Gaussian's.
    """
    _check_samples(x, "fit_subspace")
    x64 = x.double()
    mean = x64.mean(0)
    centred = x64 - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    total = float(eigenvalues.sum())
    rank = int((eigenvalues.cumsum(0) < variance * total).sum()) + 1 if total > 0 else 0
    basis = eigenvectors[:, :rank]
    projector = torch.eye(x.shape[1], dtype=x64.dtype, device=x.device) - basis @ basis.T
    return mean.to(x.dtype), projector.to(x.dtype).contiguous(), rank
