"""Models of fsad-anomalib, laid out like anomalib's own."""

from .few_shot_contrastive import FewShotContrastive, FewShotContrastiveModel, NotFittedError

__all__ = ["FewShotContrastive", "FewShotContrastiveModel", "NotFittedError"]
