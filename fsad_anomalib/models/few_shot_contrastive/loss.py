"""Losses of FewShotContrastive: L = L_Con + lambda_PP * L_PP + lambda_NP * L_NP.

All three take L2-normalised projections ``z`` (rows of unit norm) and a temperature ``tau``;
``s(a, b) = a . b / tau`` is the scaled cosine similarity. The NT-Xent of SimCLR is written out
here rather than taken from lightly or pytorch-metric-learning: neither is a dependency of anomalib,
and L_NP needs the same InfoNCE form with an explicit negative set, which neither exposes as such.
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
    "NearestNeighbourRankingLoss",
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
    defined as 0 (the caller then relies on L_NP, see the model README).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Compute the loss from the two views' projections, each ``(N, D)``."""
        n = z1.shape[0]
        if n < 2:  # noqa: PLR2004
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
    """

    def forward(self, z: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
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

    It keeps the two views of a normal together and pushes every anomaly away from them. It is well
    defined for N = 1, which makes it the training signal at K = 1.
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
    """L = L_Con + lambda_PP * L_PP + lambda_NP * L_NP; returns the total and each term."""

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
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        anomalies: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts (``loss_con``, ``loss_pp``, ``loss_np``)."""
        n = z1.shape[0]
        loss_con = self.con(z1, z2)
        ids = torch.arange(n, device=z1.device).repeat(2)
        loss_pp = self.pp(torch.cat([z1, z2]), ids) if self.lambda_pp > 0 else z1.sum() * 0.0
        if anomalies is not None and self.lambda_np > 0:
            loss_np = self.np(z1, z2, anomalies)
        else:
            loss_np = z1.sum() * 0.0
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

    This trains exactly the patch features that score the anomaly map. ``max_anchors`` and
    ``max_negatives`` bound the cost by sampling.
    """

    def __init__(self, temperature: float = 0.1, max_anchors: int = 512, max_negatives: int = 512) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.max_anchors = max_anchors
        self.max_negatives = max_negatives

    def forward(self, normal: torch.Tensor, anomalous: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``normal``, ``anomalous``: ``(B, D, h, w)`` unit-norm dense projections; ``mask``: ``(B, 1, h, w)`` in {0,1}."""
        d = normal.shape[1]
        u = normal.permute(0, 2, 3, 1).reshape(-1, d)
        ua = anomalous.permute(0, 2, 3, 1).reshape(-1, d)
        m = mask.reshape(-1) > 0.5  # noqa: PLR2004
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


def _unit_patches(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` features as ``(B * h * w, C)`` rows of unit norm, image by image."""
    return F.normalize(x, dim=1).permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class NearestNeighbourRankingLoss(nn.Module):
    r"""L_NN, a ranking loss on the nearest-neighbour distance that ``score_mode="knn"`` scores with.

    The loss acts on the scored patch features themselves (no projection head), L2-normalised per location.
    With :math:`d(x) = 1 - \max_{b \in B} x \cdot b` the distance of a patch to its nearest neighbour in the
    bank :math:`B` (the second views' patches of the *other* images of the batch, as the test image is
    another instance than the K in the memory bank; the image's own second view when the batch holds one
    image), normal patches :math:`u_i` of the first views and synthesized anomalous patches :math:`a_j`
    (inside the synthesis mask) are ranked against each other:

    .. math::
        L_{NN} = \frac{1}{|U||A|} \sum_{i,j} \operatorname{softplus}\big((d(u_i) - d(a_j)) / \tau\big)

    a smooth surrogate of 1 - AUROC of the kNN score over patches. ``max_patches`` bounds the sampled
    normal and anomalous patches each.
    """

    def __init__(self, temperature: float = 0.1, max_patches: int = 256) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.max_patches = max_patches

    def _sample(self, index: torch.Tensor) -> torch.Tensor:
        if len(index) > self.max_patches:
            index = index[torch.randperm(len(index), device=index.device)[: self.max_patches]]
        return index

    def forward(
        self, normal: torch.Tensor, second: torch.Tensor, anomalous: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``normal``, ``second``, ``anomalous``: ``(B, C, h, w)`` patch features of the first views, the
        second views and the synthesized anomalies (made from the first views); ``mask``: ``(B, 1, h, w)``."""
        b, _, h, w = normal.shape
        image_of = torch.arange(b, device=normal.device).repeat_interleave(h * w)
        m = mask.reshape(-1) > 0.5  # noqa: PLR2004
        normal_idx = self._sample((~m).nonzero().flatten())
        anomalous_idx = self._sample(m.nonzero().flatten())
        if len(normal_idx) == 0 or len(anomalous_idx) == 0:
            return normal.sum() * 0.0
        bank = _unit_patches(second)

        def distance(x: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
            sim = x @ bank.T
            if b > 1:  # nearest neighbour among the other images
                sim = sim.masked_fill(owners[:, None] == image_of[None, :], float("-inf"))
            return 1.0 - sim.max(dim=1).values

        d_normal = distance(_unit_patches(normal)[normal_idx], image_of[normal_idx])
        d_anomalous = distance(_unit_patches(anomalous)[anomalous_idx], image_of[anomalous_idx])
        return F.softplus((d_normal[:, None] - d_anomalous[None, :]) / self.temperature).mean()


class DenseCrossInstancePositiveLoss(nn.Module):
    r"""L_PP at patch level: each normal patch's best match in the *other* normal images is its positive.

    The loss acts on the scored patch features themselves (no projection head), L2-normalised per location,
    so it trains exactly the distances ``score_mode="knn"`` scores with, and it needs no synthesized anomaly.
    For an anchor patch :math:`u` of image :math:`i` (first views) and the patches :math:`b` of the other
    images' second views, with :math:`b^+` the most similar of them (chosen without gradient):

    .. math::
        L_{PP}^{dense} = -\log \frac{\exp(u \cdot b^+ / \tau)}{\sum_{b} \exp(u \cdot b / \tau)}

    It pulls every normal patch towards its nearest neighbour among the other instances (the test image
    is another instance than the K in the memory bank) and away from the other instances' non-matching
    patches, which keeps the features from collapsing. ``max_anchors`` bounds the sampled anchors. Zero for
    a batch of one image (no other instance).
    """

    def __init__(self, temperature: float = 0.1, max_anchors: int = 512) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.max_anchors = max_anchors

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """``first``, ``second``: ``(B, C, h, w)`` patch features of two views of the same B normal images."""
        b, _, h, w = first.shape
        if b < 2:  # noqa: PLR2004
            return first.sum() * 0.0
        anchors, bank = _unit_patches(first), _unit_patches(second)
        image_of = torch.arange(b, device=first.device).repeat_interleave(h * w)
        index = torch.randperm(len(anchors), device=first.device)[: self.max_anchors]
        logits = anchors[index] @ bank.T / self.temperature
        logits = logits.masked_fill(image_of[index, None] == image_of[None, :], float("-inf"))
        positive = logits.detach().argmax(dim=1)
        return F.cross_entropy(logits, positive)
