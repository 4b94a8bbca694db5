"""Memory-bank subsampling: a k-center-greedy coreset that stays within one matrix-vector product per step."""

from __future__ import annotations

import torch

__all__ = ["greedy_coreset"]


def greedy_coreset(x: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` rows of ``x`` ``(n, d)`` by k-center-greedy selection (each new row is the farthest from those kept).

    The same selection as anomalib's ``KCenterGreedy``, on the features themselves and deterministic (it
    starts from the row farthest from the mean). anomalib's version allocates an ``(n, d)`` tensor per
    selected row after a random projection, which fragments the heap of a long process (tens of GiB of
    resident memory on a few-shot memory bank); here each step costs one ``(n,)`` matrix-vector product.

    Args:
        x (torch.Tensor): Rows ``(n, d)``.
        size (int): How many rows to keep; all of them when ``size >= n``.

    Returns:
        torch.Tensor: ``(min(size, n), d)`` rows of ``x``.

    Example:
        >>> import torch
        >>> greedy_coreset(torch.tensor([[0.0], [1.0], [10.0]]), 2)
        tensor([[10.],
                [ 0.]])
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
