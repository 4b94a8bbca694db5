"""Lightning callbacks of fsad-anomalib."""

from .contrastive_fine_tuning import ContrastiveFineTuning, find_feature_extractor

__all__ = ["ContrastiveFineTuning", "find_feature_extractor"]
