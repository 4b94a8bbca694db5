"""Building blocks shared by FewShotContrastive and the fine-tuning callback."""

from .augment import ViewAugmentation, fit_views
from .fine_tuning import ContrastiveFineTuner
from .gaussian import fit_gaussian, ledoit_wolf, mahalanobis
from .synthesis import SYNTHESIS_MODES, AnomalySynthesizer, crack, cutpaste, cutpaste_scar, perlin, speck

__all__ = [
    "SYNTHESIS_MODES",
    "AnomalySynthesizer",
    "ContrastiveFineTuner",
    "ViewAugmentation",
    "crack",
    "cutpaste",
    "cutpaste_scar",
    "fit_gaussian",
    "fit_views",
    "ledoit_wolf",
    "mahalanobis",
    "perlin",
    "speck",
]
