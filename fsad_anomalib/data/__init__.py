"""Few-shot data: a K-shot wrapper for any anomalib datamodule and real offline datasets."""

from .few_shot import FewShot, load_support_set, sample_support_set
from .offline import ELPV, SamplesDataset, Textile

__all__ = ["ELPV", "FewShot", "SamplesDataset", "Textile", "load_support_set", "sample_support_set"]
