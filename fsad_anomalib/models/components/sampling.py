"""Memory-bank subsampling: a k-center-greedy coreset that stays within one matrix-vector product per step."""

from __future__ import annotations

import torch

__all__ = ["MAX_ROWS", "evenly_spaced", "greedy_coreset"]

# the selection draws from at most this many rows (16 images' patches at the default layers and size): its cost grows
# with the square of the rows, and a pass over 32k rows of 152 floats no longer stays in cache (9 s against 0.65 s)
MAX_ROWS = 16_384


def evenly_spaced(rows: torch.Tensor, at_most: int) -> torch.Tensor:
    """``rows`` itself, or ``at_most`` of them evenly spaced (deterministic) where there are more."""
    if rows.shape[0] <= at_most:
        return rows
    return rows[torch.linspace(0, rows.shape[0] - 1, at_most, device=rows.device).long()]


def greedy_coreset(x: torch.Tensor, size: int, max_rows: int = MAX_ROWS) -> torch.Tensor:
    """``size`` rows of ``x`` ``(n, d)`` by k-center-greedy selection (each new row is the farthest from those kept).

    The same selection as anomalib's ``KCenterGreedy``, on the features themselves and deterministic (it
    starts from the row farthest from the mean). anomalib's version allocates an ``(n, d)`` tensor per
    selected row after a random projection, which fragments the heap of a long process (tens of GiB of
    resident memory on a few-shot memory bank); here each step costs one ``(n,)`` matrix-vector product.

    Args:
        x (torch.Tensor): Rows ``(n, d)``.
        size (int): How many rows to keep; all of them when ``size >= n``.
        max_rows (int): Past this many rows, the selection draws from this many evenly spaced ones.

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
    # past max_rows, evenly spaced rows: each step's pass over x then stays in the CPU's caches
    x = evenly_spaced(x, max_rows)
    n, size = x.shape[0], min(size, x.shape[0])
    sq = (x * x).sum(1)
    index = int(((x - x.mean(0)) ** 2).sum(1).argmax())
    chosen = [index]
    nearest = (sq - 2 * (x @ x[index]) + sq[index]).clamp_min(0)
    for _ in range(size - 1):
        index = int(nearest.argmax())
        chosen.append(index)
        nearest = torch.minimum(nearest, (sq - 2 * (x @ x[index]) + sq[index]).clamp_min(0))
    return x[torch.tensor(chosen, device=x.device)]
