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

    ``refit(images, rescale=True)`` returns a scorer (a torch module whose forward gives an ``InferenceBatch``)
    fitted on ``images`` alone; ``rescale=False`` keeps the deployed model's score scale where the model has one
    (a grown model's fold models score on it).
    """

    def refit(self, images: torch.Tensor, rescale: bool = True) -> nn.Module:
        """A scorer fitted on ``images``, on its own scale or (``rescale=False``) on the deployed model's."""
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

    Each image is scored by the model refitted without it (past ``MAX_FOLDS`` images, without its group). Below
    ``VIEWS_BELOW`` images each held-out image is also scored in every flip and turn the symmetries allow, each view
    by the model refitted on the *same view* of the other images, so that the fit has seen that orientation, as the
    deployed model has seen the line's. With one image, the image's halves stand in for two images: in each view,
    each half is scored by the model fitted on the other half (a local score reads patches wherever they are).

    Returns ``scores`` and ``maxima`` (NaN where the model gives no map) of every held-out view, ``n`` (how many
    scores they are) and ``views`` (how many views of each image were scored).
    """
    k = images.shape[0]
    n_views = 1 if k >= VIEWS_BELOW else symmetries.count(square=images.shape[-1] == images.shape[-2])
    views = list(Views(n_views, symmetries).of(images))
    scores, maxima = [], []
    if k == 1:
        for view in views:
            half = view.shape[-1] // 2
            left, right = view[..., :half], view[..., half : 2 * half]
            for fit, held in ((left, right), (right, left)):
                part = score_batch(refit(fit), held)
                scores.append(part[0])
                maxima.append(part[1])
        return {"scores": torch.cat(scores), "maxima": torch.cat(maxima), "n": 2 * n_views, "views": n_views}
    for group in held_out_groups(k):
        kept = torch.tensor([i for i in range(k) if i not in group])
        for view in views:
            part = score_batch(refit(view[kept]), view[torch.tensor(group)])
            scores.append(part[0])
            maxima.append(part[1])
    return {"scores": torch.cat(scores), "maxima": torch.cat(maxima), "n": k * n_views, "views": n_views}
