"""The features FewShotContrastive scores and contrastive fine-tuning trains, from a backbone's feature maps.

One definition for both, so that fine-tuning trains exactly what the model scores. It lives beside the
backbones, which import no model, so that :mod:`fsad_anomalib.fine_tuning` and the models can both use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812

__all__ = ["patch_and_global", "patch_features"]


def patch_features(patch_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Patch features from a backbone's feature maps.

    Each map gets a 3x3 local average (PatchCore's neighbourhood aggregation) at its own resolution and is then
    upsampled bilinearly to the first map's resolution; the maps are concatenated along channels.

    Args:
        patch_maps (Sequence[torch.Tensor]): Feature maps ``(B, C_i, h_i, w_i)``, the first one the finest.

    Returns:
        torch.Tensor: ``(B, sum of C_i, h_0, w_0)`` patch features.

    Example:
        >>> import torch
        >>> patch_features([torch.rand(1, 8, 16, 16), torch.rand(1, 4, 8, 8)]).shape
        torch.Size([1, 12, 16, 16])
    """
    pooled_maps = [F.avg_pool2d(f, kernel_size=3, stride=1, padding=1) for f in patch_maps]
    size = pooled_maps[0].shape[-2:]
    return torch.cat(
        [pooled_maps[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in pooled_maps[1:]],
        dim=1,
    )


def patch_and_global(patch_maps: Sequence[torch.Tensor], global_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features (:func:`patch_features`) and the image embedding.

    Args:
        patch_maps (Sequence[torch.Tensor]): Feature maps of the patch layers, the finest first.
        global_map (torch.Tensor): Feature map ``(B, C, h, w)`` whose global average pool, L2-normalised, is the
            image embedding.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``(B, sum of channels, h, w)`` patch features and ``(B, C)`` unit-norm
        embeddings.
    """
    return patch_features(patch_maps), F.normalize(global_map.mean(dim=(-2, -1)), dim=-1)
