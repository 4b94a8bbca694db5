"""One contrastive fine-tuning step (views, synthesized negatives, L_Con + L_PP + L_NP).

Shared by :class:`fsad_anomalib.models.FewShotContrastive` and the
:class:`fsad_anomalib.callbacks.ContrastiveFineTuning` callback that adapts other anomalib models'
backbones, so both run exactly the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fsad_anomalib.models.components.augment import ViewAugmentation
from fsad_anomalib.models.components.synthesis import AnomalySynthesizer
from fsad_anomalib.models.few_shot_contrastive.loss import FewShotContrastiveLoss

__all__ = ["ContrastiveFineTuner"]


class ContrastiveFineTuner(nn.Module):
    """Computes the fine-tuning loss of a batch of normal images in [0, 1].

    ``project`` maps images to L2-normalised projections ``(B, D)``; it is called once on the two views
    and the synthesized anomalies together, so BatchNorm-free backbones see one batch.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        lambda_pp: float = 0.5,
        lambda_np: float = 1.0,
        synthesis: str = "cutpaste",
        crop_scale: float = 0.8,
        hflip: bool = True,
        vflip: bool = True,
        rot90: bool = True,
        color_jitter: float = 0.2,
    ) -> None:
        super().__init__()
        self.augment = ViewAugmentation(crop_scale, hflip, vflip, rot90, color_jitter)
        self.synthesizer = AnomalySynthesizer(synthesis)
        self.loss = FewShotContrastiveLoss(temperature, lambda_pp, lambda_np)

    @property
    def uses_negatives(self) -> bool:
        """Whether L_NP is active."""
        return self.synthesizer.enabled and self.loss.lambda_np > 0

    def has_signal(self, n_images: int) -> bool:
        """Whether the loss can move the weights for a batch of ``n_images`` distinct images."""
        return n_images >= 2 or self.uses_negatives  # noqa: PLR2004

    def forward(
        self,
        images: torch.Tensor,
        project: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and its parts for a batch of normal images ``(N, C, H, W)``."""
        n = images.shape[0]
        v1 = self.augment(images)
        v2 = self.augment(images)
        parts = [v1, v2]
        if self.uses_negatives:
            anomalous, _ = self.synthesizer(images)
            parts.append(self.augment(anomalous))
        z = project(torch.cat(parts))
        z1, z2 = z[:n], z[n : 2 * n]
        anomalies = z[2 * n :] if self.uses_negatives else None
        return self.loss(z1, z2, anomalies)
