"""The product's symmetries and the deterministic views of the K normal images they allow.

:class:`Symmetries` is the one value for the flips and turns a product may take; every user of it (the model's fit,
self-configuration, the normal-only threshold, fine-tuning's augmentation) resolves an unset value the same way,
with :func:`resolve_symmetries`: the model's own where it declares them (:class:`Symmetric`), else a default.
:class:`Views` is the fit's views: how many of each image, within those symmetries.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "MAX_FOLDS",
    "NO_SYMMETRY",
    "SYMMETRY_NAMES",
    "Symmetric",
    "Symmetries",
    "Views",
    "held_out_groups",
    "resolve_symmetries",
]

SYMMETRY_NAMES = ("hflip", "vflip", "rot90")
# held-out evidence (the parts' scales, the self-check, the threshold) leaves one image out at a time up to this many
# images; past it, each of this many folds holds out every MAX_FOLDS-th image, so that the refits grow linearly in K
MAX_FOLDS = 8


def held_out_groups(k: int, max_folds: int = MAX_FOLDS) -> list[list[int]]:
    """The images each held-out fold leaves out: one each up to ``max_folds`` images, else every ``max_folds``-th.

    Example:
        >>> held_out_groups(3), held_out_groups(10, 4)
        ([[0], [1], [2]], [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]])
    """
    if k < 1 or max_folds < 1:
        msg = f"held_out_groups needs k >= 1 and max_folds >= 1, got k={k}, max_folds={max_folds}."
        raise ValueError(msg)
    folds = min(k, max_folds)
    return [list(range(start, k, folds)) for start in range(folds)]


@dataclass(frozen=True)
class Symmetries:
    """Which flips and turns leave a good part good: ``hflip`` (left-right), ``vflip`` (top-bottom), ``rot90``.

    Example:
        >>> Symmetries.of(["hflip", "vflip"])
        Symmetries(hflip=True, vflip=True, rot90=False)
        >>> Symmetries.of(["hflip", "vflip"]).count(square=True)
        4
    """

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True

    @classmethod
    def of(cls, value: Symmetries | Sequence[str] | Mapping[str, bool]) -> Symmetries:
        """From the names of the allowed symmetries (``[]`` for none), a mapping of flags, or a ``Symmetries``."""
        if isinstance(value, Symmetries):
            return value
        if isinstance(value, Mapping):
            flags, named = dict(value), list(value)
        elif isinstance(value, Sequence) and not isinstance(value, str):
            named = list(value)
            flags = {name: name in named for name in SYMMETRY_NAMES}
        else:
            named, flags = [value], {}
        unknown = [name for name in named if name not in SYMMETRY_NAMES]
        if unknown or not all(isinstance(flag, bool) for flag in flags.values()):
            msg = (
                f"symmetries must be a list of names among {list(SYMMETRY_NAMES)} (e.g. [hflip, vflip]), got {value!r}."
            )
            raise ValueError(msg)
        return cls(**flags)

    @property
    def names(self) -> list[str]:
        """The allowed symmetries by name (plain types, for checkpoints and configs)."""
        return [name for name in SYMMETRY_NAMES if getattr(self, name)]

    def group(self, square: bool = True) -> list[tuple[int, bool, bool]]:
        """The distinct (turns, hflip, vflip) the flags allow, identity first; 90-degree turns on square images only."""
        candidates = [
            (turns, h, v)
            for turns in range(4 if (self.rot90 and square) else 1)
            for h in ((False, True) if self.hflip else (False,))
            for v in ((False, True) if self.vflip else (False,))
        ]
        # the dihedral group has 8 elements; a flip both ways equals a half turn: keep each distinct view once
        seen, unique = set(), []
        probe = torch.arange(16.0).view(1, 1, 4, 4)
        for turns, h, v in candidates:
            key = tuple(_apply(probe, turns, h, v).flatten().tolist())
            if key not in seen:
                seen.add(key)
                unique.append((turns, h, v))
        return unique

    def count(self, square: bool = True) -> int:
        """How many distinct views the flags allow (the identity included): 1, 2, 4 or 8."""
        return len(self.group(square))


NO_SYMMETRY = Symmetries(hflip=False, vflip=False, rot90=False)


@dataclass(frozen=True)
class Views:
    """The fit's views: ``n`` deterministic views of each image (identity first), within ``symmetries``.

    Example:
        >>> [view.shape for view in Views(2, Symmetries()).of(torch.rand(3, 3, 8, 8))]
        [torch.Size([3, 3, 8, 8]), torch.Size([3, 3, 8, 8])]
    """

    n: int = 1
    symmetries: Symmetries = Symmetries()

    def of(self, images: torch.Tensor, n: int | None = None) -> Iterator[torch.Tensor]:
        """Yield ``n`` (default: ``self.n``) views of ``images``; past the symmetry group's size the views repeat."""
        unique = self.symmetries.group(square=images.shape[-1] == images.shape[-2])
        for index in range(self.n if n is None else n):
            yield _apply(images, *unique[index % len(unique)])

    def held_out(self, images: torch.Tensor) -> int:
        """How many views of each image held-out scoring uses: ``n``, or with one image every view it allows."""
        if images.shape[0] >= 2:
            return self.n
        return max(self.n, self.symmetries.count(square=images.shape[-1] == images.shape[-2]))


@runtime_checkable
class Symmetric(Protocol):
    """A model that declares its product's symmetries (FewShotContrastive): unset symmetries elsewhere take these."""

    symmetries: Symmetries


def resolve_symmetries(value: Any, model: object, default: Symmetries) -> Symmetries:  # noqa: ANN401
    """The symmetries in force for an argument that may be unset.

    The one rule for an unset value, wherever symmetries are an argument: ``value`` where given, else the ``model``'s
    own (:class:`Symmetric`), else
    ``default``.
    """
    if value is not None:
        return Symmetries.of(value)
    if isinstance(model, Symmetric) and isinstance(model.symmetries, Symmetries):
        return model.symmetries
    return default


def _apply(images: torch.Tensor, turns: int, h: bool, v: bool) -> torch.Tensor:
    out = torch.rot90(images, turns, dims=(-2, -1)) if turns else images
    if h:
        out = out.flip(-1)
    if v:
        out = out.flip(-2)
    return out
