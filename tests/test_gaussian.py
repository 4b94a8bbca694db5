"""Gaussian fit under degenerate few-shot statistics (property-based) and the K-shot sampler."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fsad_anomalib.data import sample_support_set
from fsad_anomalib.models.components.gaussian import fit_gaussian, mahalanobis


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    p=st.integers(1, 64),
    seed=st.integers(0, 2**16),
    duplicate=st.booleans(),
    scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]),
)
def test_fit_is_positive_definite_and_scores_finite(n, p, seed, duplicate, scale):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=gen) * scale
    if duplicate:  # identical samples: zero sample covariance
        x = x[:1].repeat(n, 1)
    mean, precision, shrinkage = fit_gaussian(x)
    assert 0.0 <= shrinkage <= 1.0
    eigenvalues = torch.linalg.eigvalsh(precision.double())
    assert torch.all(eigenvalues > 0)
    queries = torch.randn(5, p, generator=gen) * scale
    scores = mahalanobis(torch.cat([queries, x[:1]]), mean, precision)
    assert torch.isfinite(scores).all()
    if not duplicate or n == 1:
        assert scores[:5].std() > 0 or p == 1


def test_fit_rejects_non_finite_and_empty():
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_gaussian(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="expects samples"):
        fit_gaussian(torch.zeros(0, 3))


@settings(max_examples=50, deadline=None)
@given(pool_size=st.integers(1, 60), data=st.data())
def test_sampler_properties(pool_size, data):
    pool = [f"/data/img_{i:03d}.png" for i in range(pool_size)]
    k = data.draw(st.integers(1, pool_size))
    seed = data.draw(st.integers(0, 10_000))
    chosen = sample_support_set(pool, k, seed)
    assert len(chosen) == k == len(set(chosen))
    assert set(chosen) <= set(pool)
    assert chosen == sample_support_set(list(reversed(pool)), k, seed)  # independent of pool order
    with pytest.raises(ValueError, match="larger than the pool"):
        sample_support_set(pool, pool_size + 1, seed)
