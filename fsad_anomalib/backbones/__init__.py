"""Backbones, pretrained weights that work without network access, and the features taken from them."""

from .features import patch_and_global, patch_features
from .offline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFLINE_PREFIX,
    OfflineWeightsError,
    backbone_normalization,
    cache_dir,
    load_features_weights,
    offline_backbone,
    resolve_backbone,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFLINE_PREFIX",
    "OfflineWeightsError",
    "backbone_normalization",
    "cache_dir",
    "load_features_weights",
    "offline_backbone",
    "patch_and_global",
    "patch_features",
    "resolve_backbone",
]
