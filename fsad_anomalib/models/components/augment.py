"""Batched views for contrastive fine-tuning and for the Gaussian fit (kornia)."""

from __future__ import annotations

import torch
from kornia import augmentation as K  # noqa: N812
from torch import nn

__all__ = ["ViewAugmentation", "fit_views"]


class ViewAugmentation(nn.Module):
    """Random views of a batch in [0, 1]: resized crop, flips, 90-degree turns, brightness/contrast jitter.

    Args:
        crop_scale: Smallest area fraction kept by the random resized crop (1.0 switches cropping off).
        hflip, vflip, rot90: Geometric symmetries the product is assumed to have. Switch off what a
            product does not have (e.g. ``rot90`` for objects with an up direction).
        color_jitter: Strength of brightness and contrast jitter (0 switches it off).
    """

    def __init__(
        self,
        crop_scale: float = 0.8,
        hflip: bool = True,
        vflip: bool = True,
        rot90: bool = True,
        color_jitter: float = 0.2,
    ) -> None:
        super().__init__()
        if not 0 < crop_scale <= 1:
            msg = f"crop_scale must be in (0, 1], got {crop_scale}."
            raise ValueError(msg)
        self.crop_scale = crop_scale
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.color_jitter = color_jitter
        self._pipelines: dict[tuple[int, int], K.AugmentationSequential] = {}

    def _build(self, size: tuple[int, int]) -> K.AugmentationSequential:
        ops: list[nn.Module] = []
        if self.crop_scale < 1:
            ops.append(K.RandomResizedCrop(size, scale=(self.crop_scale, 1.0), ratio=(0.9, 1.1)))
        if self.hflip:
            ops.append(K.RandomHorizontalFlip())
        if self.vflip:
            ops.append(K.RandomVerticalFlip())
        if self.rot90:
            ops.append(K.RandomRotation90(times=(0, 3), p=1.0))
        if self.color_jitter > 0:
            ops.append(K.ColorJitter(brightness=self.color_jitter, contrast=self.color_jitter, p=0.8))
        return K.AugmentationSequential(*ops) if ops else K.AugmentationSequential(K.RandomHorizontalFlip(p=0.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """One random view of each image."""
        size = tuple(images.shape[-2:])
        if size not in self._pipelines:
            self._pipelines[size] = self._build(size)
        return self._pipelines[size](images).clamp(0.0, 1.0)


def fit_views(images: torch.Tensor, n_views: int, hflip: bool = True, vflip: bool = True, rot90: bool = True):  # noqa: ANN201
    """Yield ``n_views`` deterministic views of ``images``: identity first, then the allowed flips and turns.

    The symmetry group allowed by the flags (up to the 8 elements of the dihedral group) is cycled
    through; views past its size repeat it. Only square images are turned by 90 degrees.
    """
    square = images.shape[-1] == images.shape[-2]
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
    for index in range(n_views):
        yield _apply(images, *unique[index % len(unique)])


def _apply(images: torch.Tensor, turns: int, h: bool, v: bool) -> torch.Tensor:
    out = torch.rot90(images, turns, dims=(-2, -1)) if turns else images
    if h:
        out = out.flip(-1)
    if v:
        out = out.flip(-2)
    return out
