"""FewShotContrastive: few-shot anomaly detection through contrastive fine-tuning."""

from .lightning_model import FewShotContrastive
from .torch_model import FewShotContrastiveModel, NotFittedError

__all__ = ["FewShotContrastive", "FewShotContrastiveModel", "NotFittedError"]
