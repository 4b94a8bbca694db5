"""One contrastive fine-tuning step (views, synthesized negatives, L_Con + L_PP + L_NP).

Shared by :class:`fsad_anomalib.models.FewShotContrastive` and the
:class:`fsad_anomalib.callbacks.ContrastiveFineTuning` callback that adapts other anomalib models'
backbones, so both run exactly the same code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fsad_anomalib.models.components.augment import ViewAugmentation
from fsad_anomalib.models.components.synthesis import AnomalySynthesizer
from fsad_anomalib.models.few_shot_contrastive.loss import (
    DenseCrossInstancePositiveLoss,
    DenseSynthesizedNegativeLoss,
    FewShotContrastiveLoss,
    NearestNeighbourRankingLoss,
)

__all__ = ["ContrastiveFineTuner", "EmbedFn", "forwarded_arguments", "patch_and_global", "patch_features"]

# images in [0, 1] -> (global projections (B, D), dense projections (B, D', h, w) or None, both unit norm,
#                      scored patch features (B, C, h, w) or None)
EmbedFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def forwarded_arguments(
    values: Mapping[str, Any], target: Callable, renames: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The arguments of ``target`` found in ``values`` (a caller's ``locals()``), by name.

    FewShotContrastive hands its fine-tuning settings to the callback, and the callback its loss settings to
    :class:`ContrastiveFineTuner`, through this, so each setting is passed on in one place. ``renames`` maps a
    parameter of ``target`` to the caller's name for it (``{"steps": "fine_tune_steps"}``).
    """
    renames = renames or {}
    names = [n for n, p in inspect.signature(target).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    return {name: values[renames.get(name, name)] for name in names if renames.get(name, name) in values}


def patch_features(patch_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Patch features from a backbone's feature maps, ``(B, sum of channels, h, w)``.

    Each map gets a 3x3 local average (PatchCore's neighbourhood aggregation) at its own resolution and is then
    upsampled bilinearly to the first map's resolution; the maps are concatenated along channels.
    """
    pooled_maps = [F.avg_pool2d(f, kernel_size=3, stride=1, padding=1) for f in patch_maps]
    size = pooled_maps[0].shape[-2:]
    return torch.cat(
        [pooled_maps[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in pooled_maps[1:]],
        dim=1,
    )


def patch_and_global(patch_maps: Sequence[torch.Tensor], global_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features (:func:`patch_features`) and the image embedding from a backbone's feature maps.

    The image embedding is the L2-normalised global average pool of ``global_map``. FewShotContrastive
    scores these features and the fine-tuning callback trains them, for every model.

    Returns:
        ``(B, sum of channels, h, w)`` patch features and ``(B, C_global)`` unit-norm embeddings.
    """
    return patch_features(patch_maps), F.normalize(global_map.mean(dim=(-2, -1)), dim=-1)


class ContrastiveFineTuner(nn.Module):
    """Computes the fine-tuning loss of a batch of normal images in [0, 1].

    L = L_Con + lambda_PP * L_PP + lambda_NP * (L_NP + L_NP^dense) + lambda_NN * L_NN + lambda_PP^dense *
    L_PP^dense. L_NN ranks the scored patch features' nearest-neighbour distances (normal below synthesized
    anomalies), without a projection head; L_PP^dense pulls each scored patch towards its best match in the
    other normal images. The synthesized anomalies are made
    from the first view, so that they share its geometry and the dense term can compare locations.
    ``embed`` is called once on the two views and the anomalies together.
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
        dense_negatives: bool = True,
        lambda_nn: float = 0.0,
        lambda_pp_dense: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in {"lambda_nn": lambda_nn, "lambda_pp_dense": lambda_pp_dense}.items():
            if value < 0:
                msg = f"{name} must be >= 0, got {value}."
                raise ValueError(msg)
        self.augment = ViewAugmentation(crop_scale, hflip, vflip, rot90, color_jitter)
        self.synthesizer = AnomalySynthesizer(synthesis)
        self.loss = FewShotContrastiveLoss(temperature, lambda_pp, lambda_np)
        self.dense_loss = DenseSynthesizedNegativeLoss(temperature) if dense_negatives else None
        self.lambda_nn = lambda_nn
        self.nn_loss = NearestNeighbourRankingLoss(temperature)
        self.lambda_pp_dense = lambda_pp_dense
        self.pp_dense_loss = DenseCrossInstancePositiveLoss(temperature)

    @property
    def uses_negatives(self) -> bool:
        """Whether synthesized anomalies take part (L_NP or L_NN active)."""
        return self.synthesizer.enabled and (self.loss.lambda_np > 0 or self.lambda_nn > 0)

    def has_signal(self, n_images: int) -> bool:
        """Whether the loss can move the weights for a batch of ``n_images`` distinct images."""
        return n_images >= 2 or self.uses_negatives  # noqa: PLR2004

    def forward(self, images: torch.Tensor, embed: EmbedFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and its parts for a batch of normal images ``(N, C, H, W)``."""
        n = images.shape[0]
        v1 = self.augment(images)
        v2 = self.augment(images)
        parts = [v1, v2]
        mask = None
        if self.uses_negatives:
            anomalous, mask = self.synthesizer(v1)
            parts.append(anomalous)
        z, dense, patch = embed(torch.cat(parts))
        z1, z2 = z[:n], z[n : 2 * n]
        anomalies = z[2 * n :] if self.uses_negatives else None
        total, logs = self.loss(z1, z2, anomalies)
        if self.lambda_pp_dense > 0 and patch is not None and n >= 2:  # noqa: PLR2004
            loss_pp_dense = self.pp_dense_loss(patch[:n], patch[n : 2 * n])
            total = total + self.lambda_pp_dense * loss_pp_dense
            logs["loss_pp_dense"] = loss_pp_dense.detach()
        if not self.uses_negatives or mask is None:
            return total, logs
        if self.loss.lambda_np > 0 and self.dense_loss is not None and dense is not None:
            small = F.interpolate(mask, size=dense.shape[-2:], mode="area")
            loss_dense = self.dense_loss(dense[:n], dense[2 * n :], (small > 0.25).to(dense.dtype))  # noqa: PLR2004
            total = total + self.loss.lambda_np * loss_dense
            logs["loss_np_dense"] = loss_dense.detach()
        if self.lambda_nn > 0 and patch is not None:
            small = F.interpolate(mask, size=patch.shape[-2:], mode="area")
            loss_nn = self.nn_loss(patch[:n], patch[n : 2 * n], patch[2 * n :], (small > 0.25).to(patch.dtype))  # noqa: PLR2004
            total = total + self.lambda_nn * loss_nn
            logs["loss_nn"] = loss_nn.detach()
        return total, logs
