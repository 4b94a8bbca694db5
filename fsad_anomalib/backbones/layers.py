"""Which feature layers a backbone offers, and the default ones: by stride for CNNs, by depth for ViTs.

A CNN's feature layers are timm's ``feature_info`` stages (index, module name, stride). The defaults are the
stages at stride 8 and 16 for the patch features and the last stage for the image embedding: EfficientNet-Lite0's
``blocks.2, blocks.4`` and ``blocks.6`` (indices 2, 3, 4), a ResNet's ``layer2, layer3`` and ``layer4`` (2, 3, 4),
ConvNeXt's ``stages.1, stages.2`` and ``stages.3`` (1, 2, 3). Every layer of a ViT (anomalib's rule: a name that
contains ``vit``) is a transformer block at the patch size's stride; the defaults are the blocks at half and three
quarters of the depth for the patch features and the last block for the image embedding (5, 8 and 11 of a
12-block ViT-S/14).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import timm
import torch

from fsad_anomalib.backbones.offline import resolve_backbone

__all__ = ["PATCH_STRIDES", "FeatureLayout", "default_layers", "feature_layout", "is_vit"]

# the strides of the default patch layers (the middle of a CNN: edges and textures with some context)
PATCH_STRIDES = (8, 16)


def is_vit(backbone: object) -> bool:
    """Whether anomalib's ``TimmFeatureExtractor`` treats ``backbone`` as a vision transformer (``vit`` in its name)."""
    return isinstance(backbone, str) and "vit" in backbone.lower()


@dataclass(frozen=True)
class FeatureLayout:
    """A backbone's feature layers: module names, strides and channels by index, and a ViT's patch size (else 1)."""

    names: tuple[str, ...]
    strides: tuple[int, ...]
    channels: tuple[int, ...]
    patch_size: int = 1

    def describe(self) -> str:
        """``index (name, stride s)`` for every layer, as the errors list them."""
        pairs = enumerate(zip(self.names, self.strides, strict=True))
        return ", ".join(f"{i} ({name}, stride {stride})" for i, (name, stride) in pairs)


@lru_cache(maxsize=32)
def feature_layout(backbone: str) -> FeatureLayout:
    """The feature layers of a timm backbone (``offline:`` and ``local-dir:`` names too), built without weights.

    Raises:
        ValueError: ``backbone`` is not a timm model with feature maps or transformer blocks.
    """
    name = resolve_backbone(backbone)
    vit = is_vit(name)
    try:  # its random initialisation must not draw from the caller's seeded stream
        with torch.random.fork_rng(devices=[]):
            network = timm.create_model(name, pretrained=False, **({} if vit else {"features_only": True}))
    except (RuntimeError, ValueError, OSError, AttributeError, TypeError) as exc:
        msg = f"backbone '{backbone}': not a timm model with feature maps ({' '.join(str(exc).split())[:300]})."
        raise ValueError(msg) from exc
    if vit:
        size, depth, width = int(network.patch_embed.patch_size[0]), len(network.blocks), int(network.num_features)
        return FeatureLayout(tuple(f"blocks.{i}" for i in range(depth)), (size,) * depth, (width,) * depth, size)
    info = network.feature_info
    return FeatureLayout(
        tuple(info.module_name()), tuple(int(r) for r in info.reduction()), tuple(int(c) for c in info.channels())
    )


def default_layers(backbone: str) -> tuple[list[int], int]:
    """The default patch layers and global layer of ``backbone``, as indices into :func:`feature_layout`.

    CNNs: the stages nearest stride 8 and 16 (one stage where both are the same) and the last stage. ViTs: the
    blocks at half and three quarters of the depth and the last block.
    """
    layout = feature_layout(backbone)
    last = len(layout.names) - 1
    if layout.patch_size > 1:
        depth = len(layout.names)
        return sorted({max(depth // 2 - 1, 0), max(3 * depth // 4 - 1, 0)}), last
    nearest = [min(range(len(layout.strides)), key=lambda i: (abs(layout.strides[i] - s), i)) for s in PATCH_STRIDES]
    return sorted(set(nearest)), last
