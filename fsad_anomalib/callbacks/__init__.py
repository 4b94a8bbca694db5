"""Lightning callbacks of fsad-anomalib, for any anomalib model (``--trainer.callbacks+=ContrastiveFineTuning``)."""

from fsad_anomalib.callbacks.predictions import PredictionTable
from fsad_anomalib.fine_tuning import ContrastiveFineTuning

__all__ = ["ContrastiveFineTuning", "PredictionTable"]
