"""Deterministic views of the K normal images (identity, then the flips and turns the product allows): the fit's
views, and the held-out views of self-configuration and of the normal-only threshold."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["fit_views", "symmetry_count"]


def fit_views(
    images: torch.Tensor, n_views: int, hflip: bool = True, vflip: bool = True, rot90: bool = True
) -> Iterator[torch.Tensor]:
    """Yield ``n_views`` deterministic views of ``images``: identity first, then the allowed flips and turns.

    The symmetry group allowed by the flags (up to the 8 elements of the dihedral group) is cycled
    through; views past its size repeat it. Only square images are turned by 90 degrees.
    """
    unique = _group(hflip, vflip, rot90, square=images.shape[-1] == images.shape[-2])
    for index in range(n_views):
        yield _apply(images, *unique[index % len(unique)])


def symmetry_count(hflip: bool = True, vflip: bool = True, rot90: bool = True, square: bool = True) -> int:
    """How many distinct views the flags allow (the identity included): 1, 2, 4 or 8."""
    return len(_group(hflip, vflip, rot90, square))


def _group(hflip: bool, vflip: bool, rot90: bool, square: bool) -> list[tuple[int, bool, bool]]:
    """The distinct flips and turns the flags allow, identity first."""
    group = [(0, False, False)]
    for turns in range(4 if (rot90 and square) else 1):
        for h in (False, True) if hflip else (False,):
            for v in (False, True) if vflip else (False,):
                if (turns, h, v) != (0, False, False):
                    group.append((turns, h, v))
    # the dihedral group has 8 elements; h+v flips equal a 180 degree turn, drop duplicates
    seen, unique = set(), []
    probe = torch.arange(16.0).view(1, 1, 4, 4)
    for turns, h, v in group:
        t = _apply(probe, turns, h, v)
        key = tuple(t.flatten().tolist())
        if key not in seen:
            seen.add(key)
            unique.append((turns, h, v))
    return unique


def _apply(images: torch.Tensor, turns: int, h: bool, v: bool) -> torch.Tensor:
    out = torch.rot90(images, turns, dims=(-2, -1)) if turns else images
    if h:
        out = out.flip(-1)
    if v:
        out = out.flip(-2)
    return out
