"""One contrastive fine-tuning loss evaluation: views, synthesized negatives, L_Con + L_PP + L_NP."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fsad_anomalib.fine_tuning.loss import DenseSynthesizedNegativeLoss, FewShotContrastiveLoss
from fsad_anomalib.fine_tuning.synthesis import AnomalySynthesizer
from fsad_anomalib.fine_tuning.views import ViewAugmentation

__all__ = ["ContrastiveFineTuner", "EmbedFn"]

# images in [0, 1] -> (global projections (B, D), dense projections (B, D', h, w) or None), both unit norm
EmbedFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


class ContrastiveFineTuner(nn.Module):
    r"""The fine-tuning loss of a batch of normal images in [0, 1].

    :math:`L = L_{Con} + \lambda_{PP} L_{PP} + \lambda_{NP} (L_{NP} + L_{NP}^{dense})`: two random views of each
    image (:class:`~fsad_anomalib.fine_tuning.views.ViewAugmentation`), and, unless ``synthesis`` is ``none``, one
    synthesized anomaly made from the first view, so that it shares its geometry and the dense term can compare
    locations. ``embed`` is called once on the views and the anomalies together.

    Args:
        temperature (float): Temperature of L_Con and L_NP. Defaults to ``0.1``.
        lambda_pp (float): Weight of L_PP. Defaults to ``0.5``.
        lambda_np (float): Weight of L_NP and L_NP^dense. Defaults to ``1.0``.
        synthesis (str): ``cutpaste``, ``speck`` or ``none``. Defaults to ``"cutpaste"``.
        augment (ViewAugmentation | None): The views; ``None`` gives ``ViewAugmentation()``. Defaults to ``None``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> tuner = ContrastiveFineTuner(synthesis="none")
        >>> loss, parts = tuner(torch.rand(2, 3, 32, 32), lambda x: (F.normalize(x.flatten(1), dim=1), None))
        >>> sorted(parts)
        ['loss_con', 'loss_np', 'loss_pp']
    """

    def __init__(
        self,
        temperature: float = 0.1,
        lambda_pp: float = 0.5,
        lambda_np: float = 1.0,
        synthesis: str = "cutpaste",
        augment: ViewAugmentation | None = None,
    ) -> None:
        super().__init__()
        self.augment = augment if augment is not None else ViewAugmentation()
        self.synthesizer = AnomalySynthesizer(synthesis)
        self.loss = FewShotContrastiveLoss(temperature, lambda_pp, lambda_np)
        self.dense_loss = DenseSynthesizedNegativeLoss(temperature)

    @property
    def uses_negatives(self) -> bool:
        """Whether synthesized anomalies take part (a synthesis is set and L_NP has weight)."""
        return self.synthesizer.enabled and self.loss.lambda_np > 0

    def has_signal(self, n_images: int) -> bool:
        """Whether the loss can move the weights for a batch of ``n_images`` distinct images."""
        return n_images >= 2 or self.uses_negatives

    def forward(self, images: torch.Tensor, embed: EmbedFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and its parts (``loss_con``, ``loss_pp``, ``loss_np`` and ``loss_np_dense``) for ``(N, C, H, W)``."""
        n = images.shape[0]
        v1 = self.augment(images)
        v2 = self.augment(images)
        parts = [v1, v2]
        mask = None
        if self.uses_negatives:
            anomalous, mask = self.synthesizer(v1)
            parts.append(anomalous)
        z, dense = embed(torch.cat(parts))
        z1, z2 = z[:n], z[n : 2 * n]
        total, logs = self.loss(z1, z2, z[2 * n :] if self.uses_negatives else None)
        if mask is not None and dense is not None:
            small = F.interpolate(mask, size=dense.shape[-2:], mode="area")
            loss_dense = self.dense_loss(dense[:n], dense[2 * n :], (small > 0.25).to(dense.dtype))
            total = total + self.loss.lambda_np * loss_dense
            logs["loss_np_dense"] = loss_dense.detach()
        return total, logs
