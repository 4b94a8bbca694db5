"""Scoring pieces of FewShotContrastive: feature extraction, Gaussian fit, memory-bank sampling, held-out scores."""

from .feature_extractor import build_feature_extractor
from .gaussian import fit_gaussian, mahalanobis
from .sampling import greedy_coreset

__all__ = ["build_feature_extractor", "fit_gaussian", "greedy_coreset", "mahalanobis"]
