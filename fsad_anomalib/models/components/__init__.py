"""Scoring pieces of FewShotContrastive: feature extraction, Gaussian fit, memory-bank sampling, fit views."""

from .feature_extractor import build_feature_extractor, features_until
from .gaussian import fit_gaussian, ledoit_wolf, mahalanobis
from .sampling import greedy_coreset
from fsad_anomalib.data.views import fit_views

__all__ = [
    "build_feature_extractor",
    "features_until",
    "fit_gaussian",
    "fit_views",
    "greedy_coreset",
    "ledoit_wolf",
    "mahalanobis",
]
