"""The held-out evidence a threshold is set from: each normal image scored by the model refitted without it.

A model refits itself where it offers ``refit(images)`` (:class:`Refittable`, as FewShotContrastive); a memory-bank
anomalib model (PatchCore, PaDiM, DFM, ...) is refitted from a copy made before its training epoch
(:func:`refit_copy`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from anomalib.data import ImageBatch, InferenceBatch
from lightning import LightningModule
from torch import nn

from fsad_anomalib.data.views import Symmetries, Views, held_out_groups

__all__ = ["VIEWS_BELOW", "Refittable", "can_refit", "held_out_scores", "refit_copy", "score_batch"]

# below this many images, each held-out image is also scored in its flips and turns
VIEWS_BELOW = 4


@runtime_checkable
class Refittable(Protocol):
    """A model that refits itself for held-out scores.

    ``refit(images)`` returns a scorer (a torch module whose
    forward gives an ``InferenceBatch``) fitted on ``images`` alone.
    """

    def refit(self, images: torch.Tensor) -> nn.Module:
        """A scorer fitted on ``images``."""
        ...


def can_refit(model: object) -> bool:
    """Whether the post-processor can set a threshold for ``model``.

    It refits itself (:class:`Refittable`), or it
    is a memory-bank model with a ``fit()`` after its training epoch (PatchCore, PaDiM, DFM, ...).
    """
    return isinstance(model, Refittable) or callable(getattr(model, "fit", None))


def score_batch(scorer: nn.Module, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores and anomaly-map maxima (NaN without a map) of ``query`` under a fitted ``scorer``."""
    device = next((b.device for b in scorer.buffers()), query.device)
    with torch.no_grad():
        out = scorer(query.to(device))
    out = out if isinstance(out, InferenceBatch) else InferenceBatch(**dict(out))
    pred = out.pred_score if out.pred_score is not None else out.anomaly_map.flatten(1).amax(dim=1)
    if out.anomaly_map is not None:
        maxima = out.anomaly_map.detach().float().flatten(1).amax(dim=1).cpu()
    else:
        maxima = torch.full((query.shape[0],), float("nan"))
    return pred.detach().float().flatten().cpu(), maxima


def refit_copy(snapshot: LightningModule, images: torch.Tensor) -> nn.Module:
    """A memory-bank model refitted on ``images``: its torch model, fitted.

    A copy of ``snapshot`` (taken before its training epoch) runs its training steps on them and ``fit()``.
    """
    clone = copy.deepcopy(snapshot)
    device = next((p.device for p in clone.parameters()), torch.device("cpu"))
    clone.train()
    with torch.no_grad():
        for start in range(0, images.shape[0], 32):
            clone.training_step(ImageBatch(image=images[start : start + 32].to(device)), start // 32)
        clone.fit()
    if hasattr(clone, "_is_fitted"):  # anomalib's MemoryBankMixin
        clone._is_fitted = torch.tensor([True], device=device)  # noqa: SLF001
    return clone.model.eval()


def held_out_scores(
    images: torch.Tensor, refit: Callable[[torch.Tensor], nn.Module], symmetries: Symmetries
) -> dict[str, Any]:
    """Held-out image scores and anomaly-map maxima of the K normal ``images``.

    Returns ``scores`` and ``maxima`` (NaN where the model gives no map) of every held-out view, ``n`` (how many
    independent images they come from) and ``views`` (how many views of each were scored).
    """
    k = images.shape[0]
    n_views = 1 if k >= VIEWS_BELOW else symmetries.count(square=images.shape[-1] == images.shape[-2])
    views = Views(n_views, symmetries)
    if k == 1:
        if n_views < 2:
            msg = (
                "one training image and no flip or turn allowed (pass NormalThresholdPostProcessor(symmetries="
                "[...]) for the symmetries your product has) leave no normal evidence to hold out"
            )
            raise ValueError(msg)
        scores, maxima = score_batch(refit(images), torch.cat(list(views.of(images)))[1:])
        return {"scores": scores, "maxima": maxima, "n": n_views - 1, "views": n_views}
    # each image's views scored by the model refitted without it (past MAX_FOLDS images, without its group)
    scores, maxima = torch.empty(k, n_views), torch.empty(k, n_views)
    for group in held_out_groups(k):
        kept = torch.tensor([i for i in range(k) if i not in group])
        held = images[torch.tensor(group)]
        part = score_batch(refit(images[kept]), torch.cat(list(views.of(held))))
        # views.of yields view by view (all held images, then the next view): back to image by image
        scores[group] = part[0].view(n_views, len(group)).T
        maxima[group] = part[1].view(n_views, len(group)).T
    return {"scores": scores.flatten(), "maxima": maxima.flatten(), "n": k * n_views, "views": n_views}
