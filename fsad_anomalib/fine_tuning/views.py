"""Random views of the K normal images for contrastive fine-tuning (kornia)."""

from __future__ import annotations

import torch
from kornia import augmentation as K  # noqa: N812
from torch import nn

from fsad_anomalib.data.views import Symmetries

__all__ = ["ViewAugmentation"]


class ViewAugmentation(nn.Module):
    """Random views of a batch in [0, 1]: resized crop, flips, 90-degree turns, brightness/contrast jitter.

    Args:
        crop_scale (float): Smallest area fraction kept by the random resized crop, in (0, 1]; 1 switches
            cropping off. Defaults to ``0.8``.
        symmetries (Symmetries | None): Random flips and 90-degree turns, those the product allows. Defaults to
            all three.
        color_jitter (float): Strength of brightness and contrast jitter; 0 switches it off. Defaults to ``0.2``.

    Example:
        >>> import torch
        >>> ViewAugmentation(symmetries=Symmetries.of(["hflip", "vflip"]))(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(
        self, crop_scale: float = 0.8, symmetries: Symmetries | None = None, color_jitter: float = 0.2
    ) -> None:
        super().__init__()
        if not 0 < crop_scale <= 1:
            msg = f"crop_scale must be in (0, 1], got {crop_scale}."
            raise ValueError(msg)
        self.crop_scale = crop_scale
        self.symmetries = symmetries if symmetries is not None else Symmetries()
        self.color_jitter = color_jitter
        self._pipelines: dict[tuple[int, int], K.AugmentationSequential] = {}

    def _build(self, size: tuple[int, int]) -> K.AugmentationSequential:
        ops: list[nn.Module] = []
        if self.crop_scale < 1:
            ops.append(K.RandomResizedCrop(size, scale=(self.crop_scale, 1.0), ratio=(0.9, 1.1)))
        if self.symmetries.hflip:
            ops.append(K.RandomHorizontalFlip())
        if self.symmetries.vflip:
            ops.append(K.RandomVerticalFlip())
        if self.symmetries.rot90:
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
