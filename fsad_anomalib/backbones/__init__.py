"""Backbones and pretrained weights that work without network access."""

from . import offline
from .offline import *  # noqa: F403

__all__ = list(offline.__all__)
