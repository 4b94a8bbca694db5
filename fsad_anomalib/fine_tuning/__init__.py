"""Contrastive fine-tuning on the K normal images: losses, views, synthesized anomalies, the step and the callback.

:class:`ContrastiveFineTuning` is a Lightning callback that adapts the feature extractor of FewShotContrastive,
PatchCore, PaDiM or any anomalib model with a ``TimmFeatureExtractor``. This package imports no model.
"""

from .callback import ContrastiveFineTuning, find_feature_extractor
from .loss import (
    CrossInstancePositiveLoss,
    DenseSynthesizedNegativeLoss,
    FewShotContrastiveLoss,
    NTXentLoss,
    SynthesizedNegativeLoss,
)
from .synthesis import SYNTHESIS_MODES, AnomalySynthesizer, cutpaste, speck
from .tuner import ContrastiveFineTuner
from .views import ViewAugmentation

__all__ = [
    "SYNTHESIS_MODES",
    "AnomalySynthesizer",
    "ContrastiveFineTuner",
    "ContrastiveFineTuning",
    "CrossInstancePositiveLoss",
    "DenseSynthesizedNegativeLoss",
    "FewShotContrastiveLoss",
    "NTXentLoss",
    "SynthesizedNegativeLoss",
    "ViewAugmentation",
    "cutpaste",
    "find_feature_extractor",
    "speck",
]
