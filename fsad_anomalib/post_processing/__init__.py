"""Post-processing of fsad-anomalib, for any anomalib model: an OK/NG threshold from the K normal images alone."""

from .bounds import conformal_bound, prediction_bound
from .evidence import Refittable
from .normal_threshold import NormalThresholdPostProcessor

__all__ = ["NormalThresholdPostProcessor", "Refittable", "conformal_bound", "prediction_bound"]
