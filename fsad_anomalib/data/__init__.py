"""Few-shot data: a K-shot wrapper for any anomalib datamodule and real offline datasets."""

from .few_shot import FewShot, load_support_set, sample_support_set
from .offline import ELPV, SamplesDataset, Textile, elpv_samples, textile_samples

__all__ = ["ELPV", "FewShot", "SamplesDataset", "Textile", "elpv_samples", "load_support_set", "sample_support_set", "textile_samples"]
