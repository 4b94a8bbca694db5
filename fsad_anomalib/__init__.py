"""fsad-anomalib: few-shot anomaly detection through contrastive fine-tuning, as an anomalib plugin."""

__version__ = "0.1.0"
