"""Backbones, pretrained weights that work without network access, and the features taken from them."""

from . import offline
from .features import patch_and_global, patch_features
from .offline import *  # noqa: F403

__all__ = [*offline.__all__, "patch_and_global", "patch_features"]
