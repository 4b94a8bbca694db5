"""Gaussian and subspace fits under degenerate few-shot statistics, the K-shot sampler and the held-out folds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fsad_anomalib.data import sample_support_set
from fsad_anomalib.data.views import MAX_FOLDS, held_out_groups
from fsad_anomalib.models.components.gaussian import fit_gaussian, fit_subspace, mahalanobis


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


def test_subspace_residual_is_zero_inside_the_normal_subspace_and_grows_outside():
    """fit_subspace: the residual outside the normals' principal subspace (SubspaceAD), through mahalanobis."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 3, generator=gen))[0]  # a 3-dimensional plane in 16 dimensions
    normals = torch.randn(200, 3, generator=gen) @ basis.T + 5.0
    mean, projector, rank = fit_subspace(normals)
    assert rank == 3
    inside = torch.randn(10, 3, generator=gen) @ basis.T + 5.0
    off = (torch.eye(16) - basis @ basis.T) @ torch.randn(16, generator=gen)
    off = off / off.norm()
    outside = inside + 2.0 * off
    assert mahalanobis(inside, mean, projector).max() < 1e-3
    torch.testing.assert_close(mahalanobis(outside, mean, projector), torch.full((10,), 2.0), rtol=1e-3, atol=1e-3)
    # one sample: no variation, every direction is residual; NaN is refused by name
    _, projector, rank = fit_subspace(normals[:1])
    assert rank == 0 and torch.allclose(projector, torch.eye(16))
    with pytest.raises(ValueError, match="fit_subspace: the features contain NaN"):
        fit_subspace(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize("k", [1, 2, 8, 9, 16, 33])
def test_held_out_folds_leave_each_image_out_once_and_stay_at_most_eight(k):
    groups = held_out_groups(k)
    assert sorted(i for group in groups for i in group) == list(range(k))
    assert len(groups) == min(k, MAX_FOLDS)
    if k <= MAX_FOLDS:
        assert groups == [[i] for i in range(k)]  # plain leave-one-out
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    with pytest.raises(ValueError, match="k >= 1"):
        held_out_groups(0)
