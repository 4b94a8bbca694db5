"""Post-processing of fsad-anomalib, for any anomalib model: an OK/NG threshold from the K normal images alone."""

from .normal_threshold import NormalThresholdPostProcessor, prediction_bound

__all__ = ["NormalThresholdPostProcessor", "prediction_bound"]
