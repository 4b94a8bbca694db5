"""Contrastive fine-tuning losses: L = L_Con + lambda_PP * L_PP + lambda_NP * (L_NP + L_NP^dense).

Every loss takes L2-normalised projections ``z`` (rows of unit norm) and a temperature ``tau``;
``s(a, b) = a . b / tau`` is the scaled cosine similarity. The NT-Xent of SimCLR is written out
here rather than taken from lightly or pytorch-metric-learning: neither is a dependency of anomalib,
and L_NP needs the same InfoNCE form with an explicit negative set, which neither exposes as such.

References:
    - Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020
      (NT-Xent, L_Con).
    - Liao et al., "COFT-AD: COntrastive Fine-Tuning for Few-Shot Anomaly Detection", IEEE TIP 33, 2024,
      arXiv:2402.18998 (cross-instance positives L_PP and synthesized negatives L_NP).
    - Wang et al., "Dense Contrastive Learning for Self-Supervised Visual Pre-Training", CVPR 2021 (the dense,
      per-location form of L_NP^dense).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def _check_temperature(temperature: float) -> float:
    if temperature <= 0:
        msg = f"temperature must be > 0, got {temperature}."
        raise ValueError(msg)
    return temperature


__all__ = [
    "CrossInstancePositiveLoss",
    "DenseSynthesizedNegativeLoss",
    "FewShotContrastiveLoss",
    "NTXentLoss",
    "SynthesizedNegativeLoss",
]


class NTXentLoss(nn.Module):
    r"""L_Con, SimCLR's NT-Xent over two augmented views of each of N images.

    With the 2N projections :math:`z_1..z_{2N}` where :math:`z_i` and :math:`z_{p(i)}` are the two views
    of one image,

    .. math::
        L_{Con} = \frac{1}{2N} \sum_{i=1}^{2N} -\log
            \frac{\exp(s(z_i, z_{p(i)}))}{\sum_{k \ne i} \exp(s(z_i, z_k))}

    Views of the other N - 1 images are the negatives. With N = 1 there is no negative and the loss is
    defined as 0 (fine-tuning then relies on L_NP).

    Reference: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
    ICML 2020, arXiv:2002.05709.

    Args:
        temperature (float): Temperature ``tau``. Defaults to ``0.1``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> z1, z2 = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
        >>> NTXentLoss(temperature=0.1)(z1, z2).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Compute the loss from the two views' projections, each ``(N, D)``."""
        n = z1.shape[0]
        if n < 2:
            return z1.sum() * 0.0
        z = torch.cat([z1, z2], dim=0)
        sim = z @ z.T / self.temperature
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(sim, targets)


class CrossInstancePositiveLoss(nn.Module):
    r"""L_PP, cross-instance positive pairs: views of two different normal images are pulled together.

    Over all pairs of projections :math:`(z_i, z_j)` that come from different images (M pairs),

    .. math::
        L_{PP} = \frac{1}{M} \sum_{(i,j)} \lVert z_i - z_j \rVert^2 = \frac{1}{M} \sum_{(i,j)} 2 - 2\, z_i \cdot z_j

    which is 0 when all normals share one embedding. It opposes L_Con, which pushes other images apart;
    ``lambda_PP`` balances the two. With one image there is no pair and the loss is 0.

    Reference: Liao et al., "COFT-AD: COntrastive Fine-Tuning for Few-Shot Anomaly Detection", IEEE TIP 33,
    2024, arXiv:2402.18998.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> z = F.normalize(torch.randn(4, 8), dim=1)
        >>> float(CrossInstancePositiveLoss()(z, torch.tensor([0, 0, 1, 1]))) > 0
        True
    """

    def forward(self, z: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:  # noqa: PLR6301 - nn.Module's forward
        """``z``: ``(M, D)`` projections; ``image_ids``: ``(M,)`` index of the image each row is a view of."""
        different = image_ids[:, None] != image_ids[None, :]
        if not bool(different.any()):
            return z.sum() * 0.0
        dist = 2.0 - 2.0 * (z @ z.T)
        return dist[different].mean()


class SynthesizedNegativeLoss(nn.Module):
    r"""L_NP, negative pairs between normals and their synthesized anomalous versions (InfoNCE).

    For each of the N images with views :math:`(z_1^{(n)}, z_2^{(n)})` and the set :math:`A` of the
    synthesized anomalies' projections :math:`a`,

    .. math::
        L_{NP} = \frac{1}{2N} \sum_{n,\,v} -\log \frac{\exp(s(z_v^{(n)}, z_{\bar v}^{(n)}))}
            {\exp(s(z_v^{(n)}, z_{\bar v}^{(n)})) + \sum_{a \in A} \exp(s(z_v^{(n)}, a))}

    It keeps the two views of a normal together and pushes every anomaly away from them (InfoNCE, van den
    Oord et al., arXiv:1807.03748). It is well defined for N = 1, which makes it the training signal at K = 1.

    Reference: Liao et al., "COFT-AD: COntrastive Fine-Tuning for Few-Shot Anomaly Detection", IEEE TIP 33,
    2024, arXiv:2402.18998.

    Args:
        temperature (float): Temperature ``tau``. Defaults to ``0.1``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> z1, z2, a = (F.normalize(torch.randn(n, 8), dim=1) for n in (2, 2, 2))
        >>> SynthesizedNegativeLoss()(z1, z2, a).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, anomalies: torch.Tensor) -> torch.Tensor:
        """``z1``, ``z2``: ``(N, D)`` normal views; ``anomalies``: ``(A, D)`` synthesized anomalies."""
        if anomalies.shape[0] == 0:
            return z1.sum() * 0.0
        anchors = torch.cat([z1, z2], dim=0)
        partners = torch.cat([z2, z1], dim=0)
        positive = (anchors * partners).sum(-1, keepdim=True) / self.temperature
        negative = anchors @ anomalies.T / self.temperature
        logits = torch.cat([positive, negative], dim=1)
        targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, targets)


class FewShotContrastiveLoss(nn.Module):
    r"""The image-level loss :math:`L = L_{Con} + \lambda_{PP} L_{PP} + \lambda_{NP} L_{NP}`.

    Reference: Liao et al., "COFT-AD: COntrastive Fine-Tuning for Few-Shot Anomaly Detection", IEEE TIP 33,
    2024, arXiv:2402.18998 (the three terms and their weights).

    Args:
        temperature (float): Temperature of L_Con and L_NP. Defaults to ``0.1``.
        lambda_pp (float): Weight of L_PP, ``>= 0``. Defaults to ``0.5``.
        lambda_np (float): Weight of L_NP, ``>= 0``. Defaults to ``1.0``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> z1, z2 = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
        >>> total, parts = FewShotContrastiveLoss()(z1, z2)
        >>> sorted(parts)
        ['loss_con', 'loss_np', 'loss_pp']
    """

    def __init__(self, temperature: float = 0.1, lambda_pp: float = 0.5, lambda_np: float = 1.0) -> None:
        super().__init__()
        if lambda_pp < 0 or lambda_np < 0:
            msg = f"lambda_pp and lambda_np must be >= 0, got {lambda_pp} and {lambda_np}."
            raise ValueError(msg)
        self.lambda_pp = lambda_pp
        self.lambda_np = lambda_np
        self.con = NTXentLoss(temperature)
        self.pp = CrossInstancePositiveLoss()
        self.np = SynthesizedNegativeLoss(temperature)

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, anomalies: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts (``loss_con``, ``loss_pp``, ``loss_np``)."""
        n = z1.shape[0]
        loss_con = self.con(z1, z2)
        ids = torch.arange(n, device=z1.device).repeat(2)
        loss_pp = self.pp(torch.cat([z1, z2]), ids) if self.lambda_pp > 0 else z1.sum() * 0.0
        loss_np = self.np(z1, z2, anomalies) if anomalies is not None and self.lambda_np > 0 else z1.sum() * 0.0
        total = loss_con + self.lambda_pp * loss_pp + self.lambda_np * loss_np
        return total, {"loss_con": loss_con.detach(), "loss_pp": loss_pp.detach(), "loss_np": loss_np.detach()}


class DenseSynthesizedNegativeLoss(nn.Module):
    r"""L_NP at patch level: synthesized anomalous patches are negatives of the normal patches.

    For a normal view with dense projections :math:`u_i` (one per feature-map location, unit norm) and
    its synthesized anomalous version :math:`u'_i` (same geometry, defect mask :math:`M`), every normal
    location :math:`i \notin M` is an anchor whose positive is :math:`u'_i` (the unchanged content) and
    whose negatives are all anomalous locations :math:`u'_j, j \in M` of the batch:

    .. math::
        L_{NP}^{dense} = \frac{1}{|\bar M|} \sum_{i \notin M} -\log
            \frac{\exp(s(u_i, u'_i))}{\exp(s(u_i, u'_i)) + \sum_{j \in M} \exp(s(u_i, u'_j))}

    This trains the patch features that score the anomaly map. ``max_anchors`` and ``max_negatives`` bound
    the cost by sampling.

    Reference: the per-location contrast of Wang et al., "Dense Contrastive Learning for Self-Supervised
    Visual Pre-Training", CVPR 2021, with the negatives of L_NP (Liao et al., arXiv:2402.18998).

    Args:
        temperature (float): Temperature ``tau``. Defaults to ``0.1``.
        max_anchors (int): At most this many normal locations per batch. Defaults to ``512``.
        max_negatives (int): At most this many anomalous locations per batch. Defaults to ``512``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> u, ua = F.normalize(torch.randn(2, 8, 4, 4), dim=1), F.normalize(torch.randn(2, 8, 4, 4), dim=1)
        >>> mask = torch.zeros(2, 1, 4, 4); mask[:, :, :2, :2] = 1
        >>> DenseSynthesizedNegativeLoss()(u, ua, mask).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.1, max_anchors: int = 512, max_negatives: int = 512) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.max_anchors = max_anchors
        self.max_negatives = max_negatives

    def forward(self, normal: torch.Tensor, anomalous: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``normal``, ``anomalous``: ``(B, D, h, w)`` unit-norm dense projections; ``mask``: ``(B, 1, h, w)``.

        The mask is 1 where the anomaly was pasted, 0 elsewhere.
        """
        d = normal.shape[1]
        u = normal.permute(0, 2, 3, 1).reshape(-1, d)
        ua = anomalous.permute(0, 2, 3, 1).reshape(-1, d)
        m = mask.reshape(-1) > 0.5
        anchors = (~m).nonzero().flatten()
        negatives = m.nonzero().flatten()
        if len(anchors) == 0 or len(negatives) == 0:
            return normal.sum() * 0.0
        if len(anchors) > self.max_anchors:
            anchors = anchors[torch.randperm(len(anchors), device=anchors.device)[: self.max_anchors]]
        if len(negatives) > self.max_negatives:
            negatives = negatives[torch.randperm(len(negatives), device=negatives.device)[: self.max_negatives]]
        positive = (u[anchors] * ua[anchors]).sum(-1, keepdim=True) / self.temperature
        negative = u[anchors] @ ua[negatives].T / self.temperature
        logits = torch.cat([positive, negative], dim=1)
        targets = torch.zeros(len(anchors), dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, targets)
