"""Backbones and pretrained weights that work without network access."""

from .offline import (
    OFFLINE_PREFIX,
    OfflineWeightsError,
    available_offline_backbones,
    cache_dir,
    offline_backbone,
    resolve_backbone,
)

__all__ = [
    "OFFLINE_PREFIX",
    "OfflineWeightsError",
    "available_offline_backbones",
    "cache_dir",
    "offline_backbone",
    "resolve_backbone",
]
