"""Gaussian fit with Ledoit-Wolf shrinkage and the Mahalanobis distance.

Few-shot statistics are degenerate: K * N_A samples in hundreds of dimensions give a singular sample
covariance. The Ledoit-Wolf estimator shrinks it towards ``mu * I`` (``mu`` the mean eigenvalue) by the
analytically optimal amount; a floor of ``eps * mu`` on the diagonal (and ``eps`` absolute when all
samples coincide) keeps the result positive definite in every case, so the precision matrix exists and
scores are finite. Computed in float64.
"""

from __future__ import annotations

import torch

__all__ = ["fit_gaussian", "ledoit_wolf", "mahalanobis"]


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance of ``x`` ``(n, p)`` (same formula as scikit-learn). Returns (cov, shrinkage)."""
    x = x.double()
    n, p = x.shape
    xc = x - x.mean(0, keepdim=True)
    emp = xc.T @ xc / n
    mu = torch.trace(emp) / p
    if n < 2 or mu <= 0:  # noqa: PLR2004
        return mu * torch.eye(p, dtype=x.dtype, device=x.device), 1.0
    x2 = xc**2
    beta_ = (x2.T @ x2).sum() / n
    delta_ = (emp**2).sum()
    beta = (beta_ - delta_) / (p * n)
    delta = (delta_ - 2 * mu * torch.trace(emp) + p * mu**2) / p
    beta = torch.minimum(beta, delta)
    shrinkage = 0.0 if float(delta) == 0 else float(beta / delta)
    cov = (1 - shrinkage) * emp + shrinkage * mu * torch.eye(p, dtype=x.dtype, device=x.device)
    return cov, shrinkage


def fit_gaussian(x: torch.Tensor, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, precision (inverse of the shrunk covariance) and shrinkage of samples ``x`` ``(n, p)``."""
    if x.ndim != 2 or x.shape[0] < 1:  # noqa: PLR2004
        msg = f"fit_gaussian expects samples of shape (n >= 1, p), got {tuple(x.shape)}."
        raise ValueError(msg)
    if not torch.isfinite(x).all():
        msg = "fit_gaussian: the embeddings contain NaN or inf; check the input images and the backbone weights."
        raise ValueError(msg)
    x64 = x.double()
    mean = x64.mean(0)
    cov, shrinkage = ledoit_wolf(x64)
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
